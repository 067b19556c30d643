//! Hardening found by attacking the daemon, kept found: deletes below the disk floor,
//! concurrent deletes of one upload, backslashes in filenames, bodies that trickle.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use upgate_e2e::harness::*;

const KEY: (&str, &str) = ("x-api-key", "demo-key");
const PDF: &[u8] = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n%%EOF\n";

fn korexo_upload(daemon: &Daemon) -> String {
    let form = Form::new()
        .file("file", "a.pdf", "application/pdf", PDF)
        .text("userReference", "ref")
        .text("uploadType", "runtime");
    let reply = post_form(
        &daemon.url("/api/v2/apps/app-1/environments/draft/attachments/upload"),
        &[KEY],
        &form,
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()["fileId"].as_str().unwrap().to_owned()
}

fn korexo_delete(base: &str, id: &str) -> u16 {
    let url = format!("{base}/api/v2/apps/app-1/environments/draft/attachments/{id}");
    let body = json!({"sessionId": "s-1"}).to_string().into_bytes();
    send("DELETE", &url, &[KEY], Some(("application/json", body))).status
}

#[test]
fn a_delete_frees_space_while_uploads_are_refused_below_the_disk_floor() {
    let dir = tempfile::tempdir().unwrap();
    let config = default_config(dir.path());
    let mut daemon = Daemon::start_in(dir.path().to_path_buf(), &config);
    let id = korexo_upload(&daemon);
    daemon.kill();
    drop(daemon);
    // Far more than any disk has free: below the floor from the start.
    let starved = config.replace("disk_free_floor: 1MiB", "disk_free_floor: 1000000TiB");
    let daemon = Daemon::start_in(dir.path().to_path_buf(), &starved);
    let form = Form::new().file("file", "a.txt", "text/plain", b"hello");
    let refused = post_form(
        &daemon.url("/v1/files/upload"),
        &[("Authorization", "Bearer demo-key")],
        &form,
    );
    assert_eq!(refused.status, 507, "{}", refused.text);
    assert_eq!(korexo_delete(&daemon.url(""), &id), 200, "the delete is served");
    assert_eq!(korexo_delete(&daemon.url(""), &id), 404);
}

#[test]
fn concurrent_deletes_of_one_upload_succeed_exactly_once() {
    let daemon = Daemon::start_with(default_config);
    let rounds = 5;
    for _ in 0..rounds {
        let id = korexo_upload(&daemon);
        let base = daemon.url("");
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let deletes: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| korexo_delete(&base, &id)))
                .collect();
            deletes.into_iter().map(|delete| delete.join().unwrap()).collect()
        });
        assert_eq!(
            statuses.iter().filter(|status| **status == 200).count(),
            1,
            "{statuses:?}"
        );
        assert!(
            statuses.iter().all(|status| *status == 200 || *status == 404),
            "{statuses:?}"
        );
    }
    assert_eq!(
        daemon.metric("upgate_uploads_total{dialect=\"korexo\",outcome=\"deleted\",provider=\"disk\"}"),
        rounds as f64
    );
}

#[test]
fn a_backslash_in_a_filename_is_refused_never_dropped() {
    let daemon = Daemon::start_with(default_config);
    let form = Form::new().file("file", "C:\\rtevil.txt", "text/plain", b"hello");
    let reply = post_form(
        &daemon.url("/v1/files/upload"),
        &[("Authorization", "Bearer demo-key")],
        &form,
    );
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.json()["code"], "invalid_param", "{}", reply.text);
    let count: i64 = daemon
        .db()
        .query_row("SELECT COUNT(*) FROM uploads", [], |row| row.get(0))
        .unwrap();
    assert_eq!(count, 0);
    assert!(std::fs::read_dir(daemon.files_dir()).map_or(true, |mut dir| dir.next().is_none()));
}

fn trickle_config(dir: &Path) -> String {
    default_config(dir).replace(
        "  idle_timeout: 2s\n",
        "  idle_timeout: 4s\n  min_body_rate: 1KiB\n  min_body_rate_grace: 2s\n",
    )
}

#[test]
fn a_body_trickling_below_the_minimum_rate_is_dropped_with_408() {
    let daemon = Daemon::start_with(trickle_config);
    let form = Form::new().file("file", "a.txt", "text/plain", &[b'a'; 64 * 1024]);
    let mut upload = RawUpload::start(
        &daemon.url(""),
        "/v1/files/upload",
        ("Authorization", "Bearer demo-key"),
        &form,
    );
    let started = Instant::now();
    // One byte every 500 ms: never idle for idle_timeout, far below 1 KiB/s.
    let mut dropped = false;
    while started.elapsed() < Duration::from_secs(12) {
        if upload.send(1).is_err() {
            dropped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        upload.stream.set_nonblocking(true).expect("nonblocking");
        let mut probe = [0u8; 1];
        let answered = std::io::Read::read(&mut upload.stream, &mut probe).is_ok();
        upload.stream.set_nonblocking(false).expect("blocking");
        if answered {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "still open after {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(5), || daemon.log().contains("status=408")),
        "{}",
        daemon.log()
    );
    assert_eq!(daemon.spool_files(), 0);
}

#[test]
fn a_slow_but_steady_body_is_kept() {
    let daemon = Daemon::start_with(trickle_config);
    let form = Form::new().file("file", "a.txt", "text/plain", &[b'a'; 12 * 1024]);
    let mut upload = RawUpload::start(
        &daemon.url(""),
        "/v1/files/upload",
        ("Authorization", "Bearer demo-key"),
        &form,
    );
    // 2 KiB every 500 ms, for three seconds: above the minimum, past the grace period.
    while upload.sent() < upload.len() {
        upload.send(2048).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    let (status, text) = upload.finish().unwrap();
    assert_eq!(status, 201, "{text}");
}

#[test]
fn a_client_that_leaves_during_a_sync_delivery_leaves_a_record_and_no_spool_file() {
    use upgate_e2e::mock::{MockUpstream, Vendor};
    let mock = MockUpstream::start(Vendor::Dify, "upstream-secret");
    mock.hang(Duration::from_secs(3));
    let daemon = Daemon::start_with(|dir| {
        default_config(dir)
            .replace(
                "providers:\n",
                &format!(
                    "providers:\n  up:\n    plugin: dify\n    settings:\n      base_url: {}\n      api_key: upstream-secret\n",
                    mock.base_url()
                ),
            )
            .replace("    provider: disk\n", "    provider: up\n")
    });
    let content = vec![b'x'; 1 << 20];
    let form = Form::new().file("file", "big.txt", "text/plain", &content);
    let mut upload = RawUpload::start(
        &daemon.url(""),
        "/v1/files/upload",
        ("Authorization", "Bearer demo-key"),
        &form,
    );
    upload.send(usize::MAX).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // Reset: the client is gone while the upstream holds its answer.
    let socket = socket2::SockRef::from(&upload.stream);
    socket.set_linger(Some(Duration::ZERO)).unwrap();
    drop(upload);
    let recorded = || -> Option<String> {
        daemon
            .db()
            .query_row("SELECT state FROM uploads", [], |row| row.get(0))
            .ok()
    };
    assert!(
        eventually(Duration::from_secs(10), || recorded().as_deref()
            == Some("forwarded")),
        "{:?} {}",
        recorded(),
        daemon.log()
    );
    assert_eq!(mock.stored().len(), 1);
    assert!(eventually(Duration::from_secs(2), || daemon.spool_files() == 0));
    assert!(
        eventually(Duration::from_secs(2), || daemon
            .log()
            .contains("route=/v1/files/upload dialect=\"dify\" status=201")),
        "{}",
        daemon.log()
    );
}

#[test]
fn a_delivered_file_whose_record_cannot_be_written_is_rolled_back() {
    let daemon = Daemon::start_with(default_config);
    // The store refuses every new record from now on (as a full disk would).
    daemon
        .db()
        .execute_batch(
            "CREATE TRIGGER refuse_uploads BEFORE INSERT ON uploads BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        )
        .unwrap();
    let form = Form::new().file("file", "a.txt", "text/plain", b"hello");
    let reply = post_form(
        &daemon.url("/v1/files/upload"),
        &[("Authorization", "Bearer demo-key")],
        &form,
    );
    assert_eq!(reply.status, 500, "{}", reply.text);
    let kept: Vec<_> = std::fs::read_dir(daemon.files_dir())
        .map(|dir| dir.flatten().map(|entry| entry.file_name()).collect())
        .unwrap_or_default();
    assert!(
        kept.is_empty(),
        "the provider's copy stayed without a record: {kept:?}"
    );
    assert_eq!(daemon.spool_files(), 0);
}

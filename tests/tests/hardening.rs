//! Hardening found by attacking the daemon, kept found: deletes below the disk floor,
//! concurrent deletes of one upload, backslashes in filenames, bodies that trickle, records
//! of sync deliveries a crash or a full disk interrupted, rejections before routing.

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

/// A multipart body with `boundary` made of `parts` (each a part's headers and content).
fn raw_form(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (headers, content) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n{headers}\r\n\r\n").as_bytes());
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

fn dify_raw(daemon: &Daemon, body: Vec<u8>) -> Reply {
    send(
        "POST",
        &daemon.url("/v1/files/upload"),
        &[("Authorization", "Bearer demo-key")],
        Some(("multipart/form-data; boundary=XyZ", body)),
    )
}

fn nothing_kept(daemon: &Daemon) {
    let count: i64 = daemon
        .db()
        .query_row("SELECT COUNT(*) FROM uploads", [], |row| row.get(0))
        .unwrap();
    assert_eq!(count, 0);
    assert_eq!(daemon.spool_files(), 0);
}

/// The form's parser and a scanner in front must see the same parts: a part's own
/// `Content-Length` (which RFC 7578 says to ignore, and the parser obeys) is refused, as is a
/// form of more parts than any dialect needs, and a name of blanks.
#[test]
fn part_lengths_endless_parts_and_blank_names_are_refused() {
    let daemon = Daemon::start_with(default_config);
    let file =
        "Content-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\nContent-Type: text/plain";
    // The length takes a boundary and a field into the file's bytes.
    let smuggled = b"hi\r\n--XyZ\r\nContent-Disposition: form-data; name=\"user\"\r\n\r\nx";
    let with_length = format!("{file}\r\nContent-Length: {}", smuggled.len());
    let reply = dify_raw(&daemon, raw_form("XyZ", &[(&with_length, smuggled)]));
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert!(reply.text.contains("Content-Length"), "{}", reply.text);

    let empty = "Content-Disposition: form-data; name=\"pad\"";
    let mut parts: Vec<(&str, &[u8])> = vec![(empty, b""); 1000];
    parts.push((file, b"hello"));
    let reply = dify_raw(&daemon, raw_form("XyZ", &parts));
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert!(reply.text.contains("1000 parts"), "{}", reply.text);

    let blank = "Content-Disposition: form-data; name=\"file\"; filename=\"   \"";
    let reply = dify_raw(&daemon, raw_form("XyZ", &[(blank, b"hello")]));
    assert_eq!(reply.status, 400, "{}", reply.text);
    nothing_kept(&daemon);

    // The same file, plainly sent, is taken.
    let reply = dify_raw(&daemon, raw_form("XyZ", &[(file, b"hello")]));
    assert_eq!(reply.status, 201, "{}", reply.text);
}

/// A chunked body has no length to refuse up front: it is refused once it passes what the
/// plan allows a request (its files plus 1 MiB of framing), whatever carries the bytes (here
/// preamble lines before the first boundary, which no part counts).
#[test]
fn a_chunked_body_is_bounded_however_its_bytes_are_framed() {
    let daemon =
        Daemon::start_with(|dir| default_config(dir).replace("max_file_size: 1MiB", "max_file_size: 1000"));
    let file = "Content-Disposition: form-data; name=\"file\"; filename=\"a.txt\"";
    let mut body = b"preamble line\r\n".repeat(150_000);
    body.extend_from_slice(&raw_form("XyZ", &[(file, b"hello")]));
    let host = daemon
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut request = format!(
        "POST /v1/files/upload HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer demo-key\r\n\
         Content-Type: multipart/form-data; boundary=XyZ\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n{:x}\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    let (status, answer) = raw_exchange(&daemon, &request);
    assert_eq!(status, 413, "{answer}");
    nothing_kept(&daemon);
    // The same file without the padding is taken.
    let reply = dify_raw(&daemon, raw_form("XyZ", &[(file, b"hello")]));
    assert_eq!(reply.status, 201, "{}", reply.text);
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
fn a_record_that_cannot_be_written_leaves_nothing_upstream() {
    let daemon = Daemon::start_with(default_config);
    let upload = || {
        let form = Form::new().file("file", "a.txt", "text/plain", b"hello");
        post_form(
            &daemon.url("/v1/files/upload"),
            &[("Authorization", "Bearer demo-key")],
            &form,
        )
    };
    let kept = || -> Vec<_> {
        std::fs::read_dir(daemon.files_dir())
            .map(|dir| dir.flatten().map(|entry| entry.file_name()).collect())
            .unwrap_or_default()
    };
    // The record of the delivery cannot be written before it (as with a full disk): the
    // provider is never called.
    daemon
        .db()
        .execute_batch(
            "CREATE TRIGGER refuse_uploads BEFORE INSERT ON uploads BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        )
        .unwrap();
    let reply = upload();
    assert_eq!(reply.status, 500, "{}", reply.text);
    assert!(kept().is_empty(), "{:?}", kept());
    // Its outcome cannot be written after it: the delivered copy is rolled back.
    daemon
        .db()
        .execute_batch(
            "DROP TRIGGER refuse_uploads;
             CREATE TRIGGER refuse_outcomes BEFORE UPDATE ON uploads WHEN NEW.state = 'forwarded'
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        )
        .unwrap();
    let reply = upload();
    assert_eq!(reply.status, 500, "{}", reply.text);
    assert!(
        kept().is_empty(),
        "the provider's copy stayed without a record: {:?}",
        kept()
    );
    assert_eq!(daemon.spool_files(), 0);
    let state: String = daemon
        .db()
        .query_row("SELECT state FROM uploads", [], |row| row.get(0))
        .unwrap();
    assert_eq!(state, "delivering", "failed by the sweep once its lease ends");
}

#[test]
fn a_daemon_killed_during_a_sync_delivery_leaves_a_record_of_it() {
    use upgate_e2e::mock::{MockUpstream, Vendor};
    let mock = MockUpstream::start(Vendor::Dify, "upstream-secret");
    mock.hang(Duration::from_secs(30));
    let dir = tempfile::tempdir().unwrap();
    let config = default_config(dir.path())
        .replace(
            "providers:\n",
            &format!(
                "providers:\n  up:\n    plugin: dify\n    settings:\n      base_url: {}\n      api_key: upstream-secret\n",
                mock.base_url()
            ),
        )
        .replace("    provider: disk\n", "    provider: up\n");
    let mut daemon = Daemon::start_in(dir.path().to_path_buf(), &config);
    let form = Form::new().file("file", "report.txt", "text/plain", b"delivered, never answered");
    let mut upload = RawUpload::start(
        &daemon.url(""),
        "/v1/files/upload",
        ("Authorization", "Bearer demo-key"),
        &form,
    );
    upload.send(usize::MAX).unwrap();
    // The upstream has the file and holds its answer: the daemon dies in the provider call.
    assert!(eventually(Duration::from_secs(10), || mock.stored().len() == 1));
    daemon.kill();
    drop(upload);
    drop(daemon);
    let daemon = Daemon::start_in(dir.path().to_path_buf(), &config);
    let (state, error): (String, String) = daemon
        .db()
        .query_row("SELECT state, last_error FROM uploads", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .expect("a record explains the copy upstream");
    assert_eq!(state, "failed");
    assert!(error.starts_with("interrupted"), "{error}");
    assert_eq!(daemon.spool_files(), 0);
    let (code, shown, _) = run_cli(&[
        "uploads",
        "list",
        "--state",
        "failed",
        "--config",
        dir.path().join("config.yaml").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{shown}");
    assert!(shown.contains("report.txt"), "{shown}");
}

/// Sends `request` on a new connection and reads the answer (status, whole text).
fn raw_exchange(daemon: &Daemon, request: &[u8]) -> (u16, String) {
    use std::io::Write;
    let address = daemon.url("").trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The daemon may answer and close before it has read all of a head too large.
    let _ = stream.write_all(request);
    RawUpload::read_answer(&mut stream).unwrap()
}

fn body_of(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

#[test]
fn rejections_before_routing_answer_in_the_dialect_of_the_path() {
    let daemon = Daemon::start_with(|dir| {
        default_config(dir).replace(
            "  idle_timeout: 2s\n",
            "  idle_timeout: 2s\n  header_timeout: 1s\n",
        )
    });
    // A head larger than the HTTP layer reads (128 KiB): 431, in Dify's JSON.
    let huge = format!(
        "POST /v1/files/upload HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(131_072)
    );
    let (status, answer) = raw_exchange(&daemon, huge.as_bytes());
    assert_eq!(status, 431, "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(body_of(&answer)).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert_eq!(body["status"], 431, "{body}");
    assert_eq!(body["code"], "invalid_param", "{body}");
    // A header that does not parse, on a Kore route: 400, in Kore's shape.
    let (status, answer) = raw_exchange(
        &daemon,
        b"POST /api/public/files HTTP/1.1\r\nHost: x\r\nContent-Length: twelve\r\n\r\n",
    );
    assert_eq!(status, 400, "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(body_of(&answer)).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert_eq!(body["errors"][0]["code"], 400, "{body}");
    assert!(
        body["errors"][0]["msg"].as_str().unwrap().contains("Malformed"),
        "{body}"
    );
    // tus answers in plain text; a query string does not hide the path.
    let (status, answer) = raw_exchange(
        &daemon,
        b"PATCH /files/abc?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("content-type: text/plain"),
        "{answer}"
    );
    // tus puts its version on every answer, these too.
    assert!(
        answer.to_ascii_lowercase().contains("tus-resumable: 1.0.0"),
        "{answer}"
    );
    assert!(!body_of(&answer).is_empty(), "{answer}");
    // A head that does not arrive in time on a MaiAgent route: 408, in MaiAgent's shape.
    let (status, answer) = raw_exchange(
        &daemon,
        b"POST /api/v1/attachments-upload/ HTTP/1.1\r\nHost: x\r\n",
    );
    assert_eq!(status, 408, "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(body_of(&answer)).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert!(body["detail"].as_str().is_some(), "{body}");
    // Outside every dialect's prefix: an empty body, as before.
    let (status, answer) = raw_exchange(
        &daemon,
        b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n",
    );
    assert_eq!(status, 400, "{answer}");
    assert_eq!(body_of(&answer), "", "{answer}");
    // The daemon still serves.
    let form = Form::new().file("file", "a.txt", "text/plain", b"hello");
    let reply = post_form(
        &daemon.url("/v1/files/upload"),
        &[("Authorization", "Bearer demo-key")],
        &form,
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
}

/// A path a dialect serves, asked with a method it does not take: 405 with `Allow` naming the
/// methods it takes, in the dialect's error shape, as the vendors' own servers answer; a path
/// nothing serves stays a 404.
#[test]
fn a_wrong_method_is_405_with_allow_in_the_dialects_shape() {
    let daemon = Daemon::start();
    for (path, allow, shape) in [
        ("/v1/files/upload", "POST", "code"),
        // Dify's alias: only Dify's methods, though tus's `/files/{id}` matches it too.
        ("/files/upload", "POST", "code"),
        // Percent-encoded as the router decodes it.
        ("/v1/files/%75pload", "POST", "code"),
        ("/api/public/files", "POST", "errors"),
        ("/api/public/files/session/start", "POST", "errors"),
        ("/api/v1/attachments-upload/", "POST", "detail"),
        ("/agent-setup/upload", "POST", "statusCode"),
        (
            "/api/v2/apps/app-1/environments/draft/attachments/f-1",
            "DELETE",
            "errors",
        ),
    ] {
        for method in ["GET", "PUT"] {
            let reply = send(method, &daemon.url(path), &[KEY], None);
            assert_eq!(reply.status, 405, "{method} {path}: {}", reply.text);
            assert_eq!(reply.header("allow"), Some(allow), "{method} {path}");
            let body = reply.json();
            assert!(body.get(shape).is_some(), "{method} {path}: {body}");
        }
    }
    // tus: its own headers and plain text, and every method of an upload's URL.
    let reply = send(
        "PUT",
        &daemon.url("/files/0123456789abcdef0123456789abcdef"),
        &[("Tus-Resumable", "1.0.0")],
        None,
    );
    assert_eq!(reply.status, 405, "{}", reply.text);
    assert_eq!(reply.header("allow"), Some("DELETE, HEAD, OPTIONS, PATCH, POST"));
    assert_eq!(reply.header("tus-resumable"), Some("1.0.0"));
    // Nothing serves these paths with any method.
    for path in ["/v1/files/nothing", "/api/public/files/a/b/c", "/elsewhere"] {
        let reply = send("GET", &daemon.url(path), &[KEY], None);
        assert_eq!(reply.status, 404, "{path}: {}", reply.text);
        assert_eq!(reply.header("allow"), None, "{path}");
    }
}

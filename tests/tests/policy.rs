//! Plans end to end: content verification, concurrency caps and daily quotas that survive a
//! restart. (Per-dialect limit rows live in each dialect's test file.)

use std::path::Path;
use std::time::Duration;

use upgate_e2e::harness::*;

const BEARER: (&str, &str) = ("Authorization", "Bearer demo-key");

fn upload(daemon: &Daemon, name: &str, bytes: &[u8]) -> Reply {
    post_form(
        &daemon.url("/v1/files/upload"),
        &[BEARER],
        &Form::new().file("file", name, "application/octet-stream", bytes),
    )
}

fn files_stored(daemon: &Daemon) -> usize {
    std::fs::read_dir(daemon.files_dir())
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The smallest package a `.docx` is checked for: a stored zip whose central directory lists
/// `[Content_Types].xml` and `word/document.xml` (both empty here).
const DOCX: &[u8] = b"PK\x03\x04\x14\0\0\0\0\0\0\0\x21\0\0\0\0\0\0\0\0\0\0\0\0\0\x13\0\0\0[Content_Types].xml\
PK\x03\x04\x14\0\0\0\0\0\0\0\x21\0\0\0\0\0\0\0\0\0\0\0\0\0\x11\0\0\0word/document.xml\
PK\x01\x02\x14\x03\x14\0\0\0\0\0\0\0\x21\0\0\0\0\0\0\0\0\0\0\0\0\0\x13\0\0\0\0\0\0\0\0\0\0\0\x80\x01\0\0\0\0[Content_Types].xml\
PK\x01\x02\x14\x03\x14\0\0\0\0\0\0\0\x21\0\0\0\0\0\0\0\0\0\0\0\0\0\x11\0\0\0\0\0\0\0\0\0\0\0\x80\x01\x31\0\0\0word/document.xml\
PK\x05\x06\0\0\0\0\x02\0\x02\0\x80\0\0\0\x60\0\0\0\0\0";

#[test]
fn content_must_match_the_extension() {
    let daemon = Daemon::start();
    let refused = [
        ("photo.png", ELF.to_vec(), "executable"),
        ("report.pdf", b"PK\x03\x04\x14\0\0\0\0\0".repeat(8), "zip"),
        ("notes.txt", vec![b'o', b'k', 0xff, 0xfe], "UTF-8"),
        ("data.json", br#"{"a": [1, 2"#.to_vec(), "JSON"),
        ("rows.jsonl", b"{\"a\":1}\nnot json\n".to_vec(), "line 2"),
        ("photo.jpg", PNG.to_vec(), "png"),
    ];
    for (name, bytes, says) in refused {
        let reply = upload(&daemon, name, &bytes);
        assert_eq!(reply.status, 415, "{name}: {}", reply.text);
        let body = reply.json();
        assert_eq!(body["code"], "unsupported_file_type");
        assert!(body["message"].as_str().unwrap().contains(says), "{name}: {body}");
    }
    assert_eq!(files_stored(&daemon), 0);
    assert_eq!(daemon.spool_files(), 0);
    assert_eq!(
        daemon.metric("upgate_rejections_total{dialect=\"dify\",reason=\"content\"}"),
        6.0
    );

    // The detected type is what is recorded and returned, not the client's claim.
    let accepted = [
        ("photo.png", PNG.to_vec(), "image/png"),
        ("rows.jsonl", b"{\"a\":1}\n[2]\n".to_vec(), "application/jsonl"),
        (
            "doc.docx",
            DOCX.to_vec(),
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ),
        (
            "blob.bin",
            vec![0u8, 159, 146, 150, 1, 2],
            "application/octet-stream",
        ),
    ];
    for (name, bytes, mime) in accepted {
        let reply = upload(&daemon, name, &bytes);
        assert_eq!(reply.status, 201, "{name}: {}", reply.text);
        assert_eq!(reply.json()["mime_type"], mime, "{name}");
    }
}

#[test]
fn verify_content_off_trusts_the_extension() {
    let daemon = Daemon::start_with(|dir| {
        default_config(dir).replace(
            "max_file_size: 1MiB\n",
            "max_file_size: 1MiB\n    verify_content: false\n",
        )
    });
    let reply = upload(&daemon, "photo.png", ELF);
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert_eq!(reply.json()["mime_type"], "image/png");
}

#[test]
fn the_tenant_concurrency_cap_answers_429_until_a_slot_frees() {
    let daemon = Daemon::start_with(|dir| {
        default_config(dir).replace(
            "max_file_size: 1MiB\n",
            "max_file_size: 1MiB\n    max_concurrent_uploads: 1\n",
        )
    });
    let form = Form::new().file("file", "slow.txt", "text/plain", &vec![b's'; 100_000]);
    let mut first = RawUpload::start(&daemon.base_url, "/v1/files/upload", BEARER, &form);
    first.send(1000).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let second = upload(&daemon, "b.txt", b"second");
    assert_eq!(second.status, 429, "{}", second.text);
    assert_eq!(second.header("retry-after"), Some("1"));
    assert_eq!(second.json()["code"], "too_many_requests");
    let (status, _) = first.finish().unwrap();
    assert_eq!(status, 201);
    assert_eq!(upload(&daemon, "c.txt", b"third").status, 201);
    assert_eq!(
        daemon.metric("upgate_rejections_total{dialect=\"dify\",reason=\"concurrency\"}"),
        1.0
    );
}

#[test]
fn daily_quotas_survive_a_restart() {
    let quota = |dir: &Path| {
        default_config(dir).replace(
            "max_file_size: 1MiB\n",
            "max_file_size: 1MiB\n    daily_uploads: 2\n    daily_bytes: 1000\n",
        )
    };
    let mut daemon = Daemon::start_with(quota);
    assert_eq!(upload(&daemon, "a.txt", &[b'a'; 100]).status, 201);
    // Over the byte quota: refused, nothing kept, nothing counted.
    let over = upload(&daemon, "big.txt", &[b'b'; 950]);
    assert_eq!(over.status, 429, "{}", over.text);
    let retry_after: u64 = over.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry_after));
    assert_eq!(upload(&daemon, "b.txt", &[b'b'; 100]).status, 201);
    // Third upload of the day: refused.
    assert_eq!(upload(&daemon, "c.txt", b"c").status, 429);
    assert_eq!(files_stored(&daemon), 2);

    daemon.kill();
    let daemon = Daemon::spawn(daemon.dir.clone(), daemon.config_path.clone(), &[]);
    let reply = upload(&daemon, "d.txt", b"d");
    assert_eq!(
        reply.status, 429,
        "the quota outlives the process: {}",
        reply.text
    );
    assert_eq!(
        daemon.metric("upgate_rejections_total{dialect=\"dify\",reason=\"quota\"}"),
        1.0
    );
    let rows: i64 = daemon
        .db()
        .query_row("SELECT COUNT(*) FROM uploads", [], |row| row.get(0))
        .unwrap();
    assert_eq!(rows, 2);
}

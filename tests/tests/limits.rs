//! Plan limits in every dialect: size (one byte over, exactly at), extension allowlist,
//! content that contradicts its extension, invalid UTF-8 text, and the per-key rate limit
//! (the burst admitted, then 429 with a Retry-After that is honoured), each answered in the
//! client's own dialect and leaving nothing behind.

use std::path::Path;
use std::time::Duration;

use upgate_e2e::harness::*;
use upgate_e2e::inbound::{self, DIALECTS};

const LIMIT: usize = 1000;

fn config(dir: &Path) -> String {
    let mut config = default_config(dir).replace(
        "plans:\n",
        &format!(
            "plans:\n  tight:\n    max_file_size: {LIMIT}\n    allowed_extensions: [txt, png]\n  bursty:\n    max_file_size: 1MiB\n    rate_limit: {{ requests_per_second: 1, burst: 3 }}\n"
        ),
    );
    for dialect in DIALECTS {
        config.push_str(&format!(
            "  tight-{dialect}:\n    plan: tight\n    provider: disk\n    keys: [tight-{dialect}]\n  bursty-{dialect}:\n    plan: bursty\n    provider: disk\n    keys: [bursty-{dialect}]\n"
        ));
    }
    config
}

fn rows(daemon: &Daemon) -> i64 {
    daemon
        .db()
        .query_row("SELECT COUNT(*) FROM uploads", [], |row| row.get(0))
        .unwrap()
}

fn stored(daemon: &Daemon) -> usize {
    std::fs::read_dir(daemon.files_dir())
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn size_extension_and_content_limits_in_every_dialect() {
    let daemon = Daemon::start_with(config);
    for dialect in DIALECTS {
        let key = format!("tight-{dialect}");
        let (rows_before, stored_before) = (rows(&daemon), stored(&daemon));
        let refuse = |name: &str, bytes: &[u8], status: u16, says: &str| {
            let reply = inbound::upload(&daemon, dialect, &key, name, bytes);
            assert_eq!(reply.status, status, "{dialect} {name}: {}", reply.text);
            let message = inbound::error_message(dialect, &reply);
            let lower = message.to_lowercase();
            let said = says.split('|').any(|word| lower.contains(&word.to_lowercase()));
            assert!(said, "{dialect} {name}: {message}");
        };
        refuse("big.txt", &[b'a'; LIMIT + 1], 413, "large|size");
        refuse("tool.exe", b"MZ", 415, "type");
        refuse("photo.png", ELF, 415, "executable");
        refuse("notes.txt", &[b'o', b'k', 0xc3, 0x28], 415, "UTF-8");
        assert_eq!(
            (rows(&daemon), stored(&daemon)),
            (rows_before, stored_before),
            "{dialect}: nothing kept"
        );

        let reply = inbound::upload(&daemon, dialect, &key, "exact.txt", &[b'a'; LIMIT]);
        assert_eq!(
            reply.status,
            inbound::success_status(dialect),
            "{dialect} at the limit: {}",
            reply.text
        );
        let id = inbound::id(dialect, &reply);
        assert_eq!(
            std::fs::metadata(daemon.files_dir().join(id)).unwrap().len(),
            LIMIT as u64
        );

        for reason in ["size", "extension", "content"] {
            let series = format!("upgate_rejections_total{{dialect=\"{dialect}\",reason=\"{reason}\"}}");
            assert!(daemon.metric(&series) >= 1.0, "{series}");
        }
    }
    assert_eq!(daemon.spool_files(), 0);
}

#[test]
fn the_rate_limit_admits_the_burst_then_429_in_every_dialect() {
    let daemon = Daemon::start_with(config);
    for dialect in DIALECTS {
        let key = format!("bursty-{dialect}");
        let send = || inbound::upload(&daemon, dialect, &key, "a.txt", b"hello");
        let admitted = (0..3)
            .filter(|_| send().status == inbound::success_status(dialect))
            .count();
        assert_eq!(admitted, 3, "{dialect}: the configured burst is admitted");
        let refused = send();
        assert_eq!(refused.status, 429, "{dialect}: {}", refused.text);
        let retry_after: u64 = refused
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!((1..=2).contains(&retry_after), "{dialect}: {retry_after}");
        let message = inbound::error_message(dialect, &refused);
        assert!(
            message.contains(&retry_after.to_string()),
            "{dialect} says when to retry: {message}"
        );
        std::thread::sleep(Duration::from_secs(retry_after));
        let retried = send();
        assert_eq!(
            retried.status,
            inbound::success_status(dialect),
            "{dialect}: retrying after Retry-After works"
        );
    }
}

/// Plans with a concurrency cap of one and a daily quota of one upload, a tenant of each per
/// dialect, and a daemon-wide cap of two concurrent uploads.
fn capped_config(dir: &Path) -> String {
    let mut config = default_config(dir)
        .replace(
            "  disk_free_floor: 1MiB\n",
            "  disk_free_floor: 1MiB\n  max_concurrent_uploads: 2\n",
        )
        .replace(
            "plans:\n",
            "plans:\n  single:\n    max_file_size: 1MiB\n    max_concurrent_uploads: 1\n  daily:\n    max_file_size: 1MiB\n    daily_uploads: 1\n",
        );
    config.push_str("  single:\n    plan: single\n    provider: disk\n    keys: [single-key]\n");
    for dialect in DIALECTS {
        config.push_str(&format!(
            "  daily-{dialect}:\n    plan: daily\n    provider: disk\n    keys: [daily-{dialect}]\n"
        ));
    }
    config
}

fn assert_throttled(dialect: &str, reply: &Reply, retry_after: impl Fn(u64) -> bool) {
    assert_eq!(reply.status, 429, "{dialect}: {}", reply.text);
    let secs: u64 = reply.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(retry_after(secs), "{dialect}: Retry-After {secs}");
    // The dialect's own shape, with a message.
    assert!(!inbound::error_message(dialect, reply).is_empty());
}

/// Starts a Dify upload for `key` and sends only part of it, so it holds its slots.
fn held_upload(daemon: &Daemon, key: &str) -> RawUpload {
    let form = Form::new().file("file", "slow.txt", "text/plain", &vec![b's'; 100_000]);
    let bearer = format!("Bearer {key}");
    let mut upload = RawUpload::start(
        &daemon.base_url,
        "/v1/files/upload",
        ("Authorization", bearer.as_str()),
        &form,
    );
    upload.send(1000).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    upload
}

#[test]
fn concurrency_caps_answer_429_in_every_dialect() {
    let daemon = Daemon::start_with(capped_config);
    // The tenant's one slot is taken: each dialect is refused, in its own shape.
    let holder = held_upload(&daemon, "single-key");
    for dialect in DIALECTS {
        let reply = inbound::upload(&daemon, dialect, "single-key", "a.txt", b"hello");
        assert_throttled(dialect, &reply, |secs| secs == 1);
    }
    // The daemon-wide cap (two): a second tenant's upload takes the other slot, and then a
    // third tenant is refused although its own plan has no cap.
    let second = held_upload(&daemon, "demo-key");
    for dialect in DIALECTS {
        let reply = inbound::upload(&daemon, dialect, &format!("daily-{dialect}"), "a.txt", b"x");
        assert_throttled(dialect, &reply, |secs| secs == 1);
    }
    for upload in [holder, second] {
        assert_eq!(upload.finish().unwrap().0, 201);
    }
    // Slots free again.
    for dialect in DIALECTS {
        let reply = inbound::upload(&daemon, dialect, "single-key", "a.txt", b"hello");
        assert_eq!(
            reply.status,
            inbound::success_status(dialect),
            "{dialect}: {}",
            reply.text
        );
    }
    assert_eq!(
        daemon.metric("upgate_rejections_total{dialect=\"beam\",reason=\"concurrency\"}"),
        2.0
    );
}

#[test]
fn daily_quotas_answer_429_in_every_dialect_and_survive_a_restart() {
    let mut daemon = Daemon::start_with(capped_config);
    let within_a_day = |secs: u64| (1..=86_400).contains(&secs);
    for dialect in DIALECTS {
        let key = format!("daily-{dialect}");
        let first = inbound::upload(&daemon, dialect, &key, "a.txt", b"first");
        assert_eq!(
            first.status,
            inbound::success_status(dialect),
            "{dialect}: {}",
            first.text
        );
        let second = inbound::upload(&daemon, dialect, &key, "b.txt", b"second");
        assert_throttled(dialect, &second, within_a_day);
    }
    daemon.kill();
    let daemon = Daemon::spawn(daemon.dir.clone(), daemon.config_path.clone(), &[]);
    for dialect in DIALECTS {
        let reply = inbound::upload(&daemon, dialect, &format!("daily-{dialect}"), "c.txt", b"third");
        assert_throttled(dialect, &reply, within_a_day);
    }
    // One upload kept per dialect; the refused ones left nothing.
    assert_eq!(rows(&daemon), DIALECTS.len() as i64);
    assert_eq!(stored(&daemon), DIALECTS.len());
}

/// Unfinished Kore sessions and tus uploads count towards no quota until they complete, so
/// a tenant may hold at most its plan's `max_open_sessions` of them, across both dialects:
/// the next is 429 with `Retry-After` in the client's dialect, nothing is created, and
/// finishing one makes room.
#[test]
fn open_sessions_are_capped_per_tenant_across_kore_and_tus() {
    use serde_json::json;
    let daemon = Daemon::start_with(|dir| {
        default_config(dir).replace(
            "plans:\n",
            "plans:\n  few:\n    max_file_size: 1MiB\n    max_open_sessions: 2\n",
        ) + "  few:\n    plan: few\n    provider: disk\n    keys: [few-key]\n"
    });
    let kore = ("x-api-key", "few-key");
    let start = |name: &str| {
        post_json(
            &daemon.url("/api/public/files/session/start"),
            &[kore],
            &json!({"fileContext": "bulkImport", "totalChunks": 1, "fileExtension": "txt",
                "fileName": name, "fileSize": 5}),
        )
    };
    let tus_create = || {
        send(
            "POST",
            &daemon.url("/files/"),
            &[
                ("Tus-Resumable", "1.0.0"),
                ("Authorization", "Bearer few-key"),
                ("Upload-Length", "5"),
                ("Upload-Metadata", &format!("filename {}", inbound::b64(b"t.txt"))),
            ],
            None,
        )
    };
    let first = start("a.txt");
    assert_eq!(first.status, 200, "{}", first.text);
    let created = tus_create();
    assert_eq!(created.status, 201, "{created:?}");
    assert_throttled("kore", &start("b.txt"), |secs| secs == 60);
    assert_throttled("tus", &tus_create(), |secs| secs == 60);
    let sessions: i64 = daemon
        .db()
        .query_row("SELECT COUNT(*) FROM sessions", [], |row| row.get(0))
        .unwrap();
    assert_eq!(sessions, 2);
    // Another tenant is not counted with this one.
    let other = post_json(
        &daemon.url("/api/public/files/session/start"),
        &[("x-api-key", "demo-key")],
        &json!({"fileContext": "bulkImport", "totalChunks": 1, "fileExtension": "txt",
            "fileName": "c.txt", "fileSize": 5}),
    );
    assert_eq!(other.status, 200, "{}", other.text);

    // The tus upload completes: room for one more.
    let location = created.header("location").unwrap().to_owned();
    let patched = send(
        "PATCH",
        &daemon.url(&location),
        &[
            ("Tus-Resumable", "1.0.0"),
            ("Authorization", "Bearer few-key"),
            ("Upload-Offset", "0"),
        ],
        Some(("application/offset+octet-stream", b"hello".to_vec())),
    );
    assert_eq!(patched.status, 204, "{patched:?}");
    let again = start("d.txt");
    assert_eq!(again.status, 200, "{}", again.text);
}

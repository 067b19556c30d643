//! The Dify dialect end to end: the real daemon, the real local plugin, real HTTP.

use std::path::Path;

use serde_json::Value;
use upgate_e2e::harness::*;

fn config(dir: &Path) -> String {
    default_config(dir)
        + "  strict:\n    plan: strict\n    provider: disk\n    keys: [strict-key]\n"
        + "  limited:\n    plan: limited\n    provider: disk\n    keys: [limited-key]\n"
        + "  koreonly:\n    plan: default\n    provider: disk\n    keys: [kore-only-key]\n    dialects: [kore]\n"
}

fn with_strict_plan(dir: &Path) -> String {
    config(dir).replace(
        "plans:\n",
        "plans:\n  strict:\n    max_file_size: 1000\n    allowed_extensions: [png, txt]\n  limited:\n    max_file_size: 1000\n    rate_limit: { requests_per_second: 1, burst: 3 }\n",
    )
}

const BEARER: (&str, &str) = ("Authorization", "Bearer demo-key");

fn upload(daemon: &Daemon, headers: &[(&str, &str)], form: &Form) -> Reply {
    post_form(&daemon.url("/v1/files/upload"), headers, form)
}

fn assert_error(reply: &Reply, status: u16, code: &str) -> Value {
    assert_eq!(reply.status, status, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    body
}

#[test]
fn upload_returns_every_field_and_stores_the_bytes() {
    let daemon = Daemon::start_with(with_strict_plan);
    let content = b"hello, dify\n".repeat(10);
    let form = Form::new()
        .text("user", "abc-123")
        .file("file", "notes.txt", "text/plain", &content);
    let reply = upload(&daemon, &[BEARER], &form);
    assert_eq!(reply.status, 201, "{}", reply.text);
    let body = reply.json();
    let id = body["id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok());
    assert_eq!(body["name"], "notes.txt");
    assert_eq!(body["size"], content.len());
    assert_eq!(body["extension"], "txt");
    assert_eq!(body["mime_type"], "text/plain");
    for field in ["created_by", "user_id", "tenant_id"] {
        assert!(
            uuid::Uuid::parse_str(body[field].as_str().unwrap()).is_ok(),
            "{field}: {body}"
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((body["created_at"].as_i64().unwrap() - now).abs() < 60);
    assert!(body["source_url"].as_str().unwrap().starts_with("file://"));
    assert!(
        body["preview_url"].is_null() && body["original_url"].is_null() && body["conversation_id"].is_null()
    );
    assert!(body["file_key"].as_str().unwrap().ends_with(&format!("{id}.txt")));

    // The local provider stored the bytes under the upload id.
    assert_eq!(sha256_file(&daemon.files_dir().join(id)), sha256_hex(&content));
    // The record.
    let (state, size, sha, dialect, tenant, remote_id): (String, i64, String, String, String, String) =
        daemon
            .db()
            .query_row(
                "SELECT state, size, sha256, dialect, tenant, remote_id FROM uploads WHERE id = ?1",
                [id],
                |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                        row.get(5)?,
                    ))
                },
            )
            .unwrap();
    assert_eq!(
        (state.as_str(), size as usize, dialect.as_str(), tenant.as_str()),
        ("forwarded", content.len(), "dify", "demo")
    );
    assert_eq!(sha, sha256_hex(&content));
    assert_eq!(remote_id, id);
    // Nothing left in the spool.
    assert_eq!(daemon.spool_files(), 0);

    // The excerpt's path without /v1 is the same endpoint.
    let reply = post_form(
        &daemon.url("/files/upload"),
        &[BEARER],
        &Form::new().file("file", "a.png", "image/png", PNG),
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert_eq!(reply.json()["mime_type"], "image/png");
}

#[test]
fn non_ascii_filenames_round_trip_byte_for_byte() {
    let daemon = Daemon::start();
    let name = "產品說明書 – résumé 📄.txt";
    let reply = upload(
        &daemon,
        &[BEARER],
        &Form::new().file("file", name, "text/plain", "內容".as_bytes()),
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert_eq!(reply.json()["name"], name);
    let stored: String = daemon
        .db()
        .query_row("SELECT filename FROM uploads", [], |row| row.get(0))
        .unwrap();
    assert_eq!(stored.as_bytes(), name.as_bytes());
}

#[test]
fn every_error_row() {
    let daemon = Daemon::start_with(with_strict_plan);
    let strict = ("Authorization", "Bearer strict-key");
    let txt = |name: &str| Form::new().file("file", name, "text/plain", b"text");

    // DIALECTS.md's messages, word for word.
    let message = |body: Value| body["message"].as_str().unwrap().to_owned();
    let body = assert_error(
        &upload(&daemon, &[BEARER], &Form::new().text("user", "u")),
        400,
        "no_file_uploaded",
    );
    assert_eq!(message(body), "Please upload your file.");
    // The file under another name: the same, however large it is.
    for size in [10, 3 << 19] {
        let misnamed = Form::new().file("upload", "a.txt", "text/plain", &vec![b'x'; size]);
        assert_error(&upload(&daemon, &[BEARER], &misnamed), 400, "no_file_uploaded");
    }
    let two = txt("a.txt").file("file", "b.txt", "text/plain", b"x");
    let body = assert_error(&upload(&daemon, &[BEARER], &two), 400, "too_many_files");
    assert_eq!(message(body), "Only one file is allowed.");
    let body = assert_error(
        &upload(&daemon, &[BEARER], &txt("")),
        400,
        "filename_not_exists_error",
    );
    assert_eq!(message(body), "The specified filename does not exist.");
    let body = assert_error(
        &upload(&daemon, &[BEARER], &txt("../etc/passwd")),
        400,
        "invalid_param",
    );
    assert!(body["message"].as_str().unwrap().contains('/'), "{body}");
    // A quoted-string escapes a backslash as `\\`: this is the name `a\b.txt`.
    assert_error(
        &upload(&daemon, &[BEARER], &txt("a\\\\b.txt")),
        400,
        "invalid_param",
    );

    // Policy rows, on the strict tenant (1000 bytes, png/txt).
    let body = assert_error(
        &upload(&daemon, &[strict], &txt("tool.exe")),
        415,
        "unsupported_file_type",
    );
    assert_eq!(message(body), "File type not allowed.");
    let body = assert_error(
        &upload(&daemon, &[strict], &txt("README")),
        415,
        "unsupported_file_type",
    );
    assert_eq!(message(body), "File type not allowed.");
    let at_limit = Form::new().file("file", "a.txt", "text/plain", &[b'a'; 1000]);
    assert_eq!(upload(&daemon, &[strict], &at_limit).status, 201);
    let over = Form::new().file("file", "a.txt", "text/plain", &[b'a'; 1001]);
    let body = assert_error(&upload(&daemon, &[strict], &over), 413, "file_too_large");
    assert!(body["message"].as_str().unwrap().contains("1000 bytes"), "{body}");
    assert!(message(body).starts_with("File size exceeded."));

    // Auth rows.
    for headers in [
        vec![],
        vec![("Authorization", "demo-key")],
        vec![("Authorization", "Basic demo-key")],
    ] {
        let reply = upload(&daemon, &headers, &txt("a.txt"));
        let body = assert_error(&reply, 401, "unauthorized");
        assert_eq!(
            body["message"],
            "Authorization header must be provided and start with 'Bearer'"
        );
        assert_eq!(reply.header("www-authenticate"), Some("Bearer realm=\"api\""));
    }
    let reply = upload(&daemon, &[("Authorization", "Bearer wrong-key")], &txt("a.txt"));
    let body = assert_error(&reply, 401, "unauthorized");
    assert_eq!(body["message"], "Access token is invalid");
    assert_eq!(reply.header("www-authenticate"), Some("Bearer realm=\"api\""));
    // A key limited to another dialect.
    assert_error(
        &upload(
            &daemon,
            &[("Authorization", "Bearer kore-only-key")],
            &txt("a.txt"),
        ),
        403,
        "forbidden",
    );

    // Nothing rejected left a file or a record behind.
    let rows: i64 = daemon
        .db()
        .query_row("SELECT COUNT(*) FROM uploads", [], |row| row.get(0))
        .unwrap();
    assert_eq!(rows, 1);
    assert_eq!(daemon.spool_files(), 0);
    assert_eq!(
        daemon.metric("upgate_rejections_total{dialect=\"dify\",reason=\"auth\"}"),
        5.0
    );
    assert_eq!(
        daemon.metric("upgate_rejections_total{dialect=\"dify\",reason=\"size\"}"),
        1.0
    );
}

#[test]
fn rate_limit_admits_the_burst_then_429_with_an_honoured_retry_after() {
    let daemon = Daemon::start_with(with_strict_plan);
    let strict = ("Authorization", "Bearer limited-key");
    let form = Form::new().file("file", "a.txt", "text/plain", b"x");
    let statuses: Vec<u16> = (0..5).map(|_| upload(&daemon, &[strict], &form).status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 3, "{statuses:?}");
    let reply = upload(&daemon, &[strict], &form);
    let body = assert_error(&reply, 429, "too_many_requests");
    let retry_after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert!(
        body["message"].as_str().unwrap().contains("Retry after"),
        "{body}"
    );
    std::thread::sleep(std::time::Duration::from_secs(retry_after));
    assert_eq!(upload(&daemon, &[strict], &form).status, 201);
    // Another key is not affected.
    assert_eq!(upload(&daemon, &[BEARER], &form).status, 201);
}

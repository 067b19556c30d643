//! The kore dialect end to end: single uploads and durable chunked sessions against the real
//! daemon and the real local plugin.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use upgate_e2e::harness::*;

const KEY: (&str, &str) = ("X-api-key", "demo-key");
const OTHER: (&str, &str) = ("x-api-key", "other-key");
const STRICT: (&str, &str) = ("x-api-key", "strict-key");

/// The excerpt's extension list as a plan, a rate-limited plan, a second tenant and a tenant
/// limited to another dialect.
fn config(dir: &Path) -> String {
    default_config(dir).replace(
        "plans:\n",
        "plans:\n  strict:\n    max_file_size: 1000\n    allowed_extensions: [m4a, mp3, webm, mp4, mpga, wav, mpeg, png, jpeg, jpg, webp, gif]\n  limited:\n    max_file_size: 1MiB\n    rate_limit: { requests_per_second: 1, burst: 2 }\n",
    ) + "  other:\n    plan: default\n    provider: disk\n    keys: [other-key]\n"
        + "  strict:\n    plan: strict\n    provider: disk\n    keys: [strict-key]\n"
        + "  limited:\n    plan: limited\n    provider: disk\n    keys: [limited-key]\n"
        + "  difyonly:\n    plan: default\n    provider: disk\n    keys: [dify-only-key]\n    dialects: [dify]\n"
}

fn assert_error(reply: &Reply, status: u16) -> String {
    assert_eq!(reply.status, status, "{}", reply.text);
    let body = reply.json();
    let errors = body["errors"].as_array().unwrap_or_else(|| panic!("{body}"));
    assert_eq!(errors.len(), 1, "{body}");
    assert_eq!(errors[0]["code"], status, "{body}");
    let message = errors[0]["msg"].as_str().unwrap_or_else(|| panic!("{body}"));
    assert!(!message.is_empty());
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    message.to_owned()
}

fn single(daemon: &Daemon, headers: &[(&str, &str)], form: &Form) -> Reply {
    post_form(&daemon.url("/api/public/files"), headers, form)
}

fn start(daemon: &Daemon, headers: &[(&str, &str)], body: &Value) -> Reply {
    post_json(&daemon.url("/api/public/files/session/start"), headers, body)
}

fn declare(name: &str, size: usize, chunks: u64) -> Value {
    let extension = name.rsplit_once('.').map_or("", |(_, e)| e);
    json!({"fileContext": "bulkImport", "totalChunks": chunks, "fileExtension": extension,
        "fileName": name, "fileSize": size})
}

/// Starts a session; returns its id.
fn open(daemon: &Daemon, headers: &[(&str, &str)], name: &str, size: usize, chunks: u64) -> String {
    let reply = start(daemon, headers, &declare(name, size, chunks));
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()["sessionId"].as_str().unwrap().to_owned()
}

fn chunk(daemon: &Daemon, headers: &[(&str, &str)], session: &str, number: &str, bytes: &[u8]) -> Reply {
    let form =
        Form::new()
            .text("chunkNumber", number)
            .file("file", "blob", "application/octet-stream", bytes);
    post_form(
        &daemon.url(&format!("/api/public/files/session/{session}")),
        headers,
        &form,
    )
}

fn send_ok(daemon: &Daemon, session: &str, number: u64, bytes: &[u8]) {
    let reply = chunk(daemon, &[KEY], session, &number.to_string(), bytes);
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json(), json!({"chunkNumber": number, "sessionId": session}));
}

fn complete(daemon: &Daemon, headers: &[(&str, &str)], session: &str) -> Reply {
    send(
        "POST",
        &daemon.url(&format!("/api/public/files/session/{session}/complete")),
        headers,
        None,
    )
}

/// A valid PNG (so content checks pass) of exactly `size` bytes (at least 80): the harness's
/// PNG with a private ancillary chunk of a pattern before its IEND, its CRC computed (the
/// content check walks every chunk and refuses anything after IEND).
fn png_of(size: usize) -> Vec<u8> {
    let iend = PNG.len() - 12;
    assert!(size >= PNG.len() + 12, "a PNG of {size} bytes");
    let pattern: Vec<u8> = (0..size - PNG.len() - 12).map(|i| (i * 31 % 251) as u8).collect();
    let mut covered = b"upGt".to_vec();
    covered.extend_from_slice(&pattern);
    let mut bytes = PNG[..iend].to_vec();
    bytes.extend_from_slice(&(pattern.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&covered);
    bytes.extend_from_slice(&crc32(&covered).to_be_bytes());
    bytes.extend_from_slice(&PNG[iend..]);
    assert_eq!(bytes.len(), size);
    bytes
}

/// CRC-32 (ISO-HDLC), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                0xedb8_8320 ^ (crc >> 1)
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn count(daemon: &Daemon, sql: &str) -> i64 {
    daemon.db().query_row(sql, [], |row| row.get(0)).unwrap()
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| entries.count())
}

fn session_dir(daemon: &Daemon, session: &str) -> std::path::PathBuf {
    daemon.data_dir().join("sessions").join(session)
}

/// Checks a `{fileId, url}` answer and the stored file; returns the file id.
fn assert_stored(daemon: &Daemon, reply: &Reply, content: &[u8]) -> String {
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
    let id = body["fileId"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 24, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    assert!(body["url"].as_str().unwrap().starts_with("file://"), "{body}");
    assert_eq!(sha256_file(&daemon.files_dir().join(&id)), sha256_hex(content));
    id
}

#[test]
fn single_upload_answers_file_id_and_url_and_records_the_context() {
    let daemon = Daemon::start_with(config);
    let content = b"kore single upload\n".repeat(20);
    let form = Form::new()
        .file("file", "notes.txt", "text/plain", &content)
        .text("fileContext", "bulkImport");
    let reply = single(&daemon, &[KEY], &form);
    let id = assert_stored(&daemon, &reply, &content);
    let (state, dialect, tenant, metadata, size): (String, String, String, String, i64) = daemon
        .db()
        .query_row(
            "SELECT state, dialect, tenant, metadata, size FROM uploads WHERE id = ?1",
            [&id],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
        )
        .unwrap();
    assert_eq!(
        (state.as_str(), dialect.as_str(), tenant.as_str()),
        ("forwarded", "kore", "demo")
    );
    assert_eq!(size as usize, content.len());
    let metadata: Value = serde_json::from_str(&metadata).unwrap();
    assert_eq!(metadata["fileContext"], "bulkImport");
    // Header names are case-insensitive.
    let form = Form::new()
        .text("fileContext", "x")
        .file("file", "a.png", "image/png", PNG);
    assert_eq!(single(&daemon, &[("X-API-KEY", "demo-key")], &form).status, 200);
}

#[test]
fn single_upload_error_rows() {
    let daemon = Daemon::start_with(config);
    let file = |name: &str, bytes: &[u8]| {
        Form::new()
            .text("fileContext", "bulkImport")
            .file("file", name, "application/octet-stream", bytes)
    };
    let message = assert_error(
        &single(
            &daemon,
            &[KEY],
            &Form::new().file("file", "a.png", "image/png", PNG),
        ),
        400,
    );
    assert!(message.contains("fileContext"), "{message}");
    let message = assert_error(
        &single(&daemon, &[KEY], &Form::new().text("fileContext", "x")),
        400,
    );
    assert!(message.contains("file"), "{message}");
    let two = file("a.png", PNG).file("file", "b.png", "image/png", PNG);
    assert_error(&single(&daemon, &[KEY], &two), 400);
    assert_error(&single(&daemon, &[KEY], &file("../a.png", PNG)), 400);
    assert_error(&single(&daemon, &[KEY], &file("", PNG)), 400);

    // Policy rows on the strict tenant (1000 bytes, the excerpt's extensions).
    let message = assert_error(&single(&daemon, &[STRICT], &file("a.pdf", b"%PDF-1.4")), 415);
    assert!(message.contains(".pdf"), "{message}");
    assert_error(&single(&daemon, &[STRICT], &file("a.png", ELF)), 415);
    let message = assert_error(&single(&daemon, &[STRICT], &file("a.png", &png_of(1001))), 413);
    assert!(message.contains("1000 bytes"), "{message}");
    assert_eq!(
        single(&daemon, &[STRICT], &file("a.png", &png_of(1000))).status,
        200
    );

    // Auth rows.
    let form = file("a.png", PNG);
    assert_error(&single(&daemon, &[], &form), 401);
    assert_error(&single(&daemon, &[("X-api-key", "")], &form), 401);
    assert_error(&single(&daemon, &[("X-api-key", "wrong")], &form), 401);
    assert_error(
        &single(&daemon, &[("Authorization", "Bearer demo-key")], &form),
        401,
    );
    assert_error(&single(&daemon, &[("X-api-key", "dify-only-key")], &form), 403);

    // Rate limit: burst 2, then 429 with Retry-After.
    let limited = ("X-api-key", "limited-key");
    let statuses: Vec<u16> = (0..3)
        .map(|_| single(&daemon, &[limited], &form).status)
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2, "{statuses:?}");
    let reply = single(&daemon, &[limited], &form);
    let message = assert_error(&reply, 429);
    assert!(message.contains("Retry after"), "{message}");
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");

    // Only the three good uploads were kept.
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM uploads"), 3);
    assert_eq!(files_in(&daemon.files_dir()), 3);
    assert_eq!(daemon.spool_files(), 0);
}

#[test]
fn chunks_in_any_order_and_resent_chunks_assemble_into_one_upload() {
    let daemon = Daemon::start_with(config);
    let content = png_of(250_000);
    let parts: Vec<&[u8]> = content.chunks(100_000).collect();
    let reply = start(&daemon, &[KEY], &declare("photo.png", content.len(), 3));
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
    let session = body["sessionId"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&session).is_ok(), "{session}");
    // Default expiry: 24 hours, ISO 8601 UTC with milliseconds.
    let expiration = body["expirationDate"].as_str().unwrap();
    assert_eq!(expiration.len(), 24, "{expiration}");
    assert!(expiration.ends_with('Z'), "{expiration}");
    let expires = humantime::parse_rfc3339(expiration).unwrap();
    let in_a_day = SystemTime::now() + Duration::from_secs(24 * 3600);
    let off = expires.duration_since(in_a_day).unwrap_or_else(|e| e.duration());
    assert!(off < Duration::from_secs(60), "{expiration}");

    send_ok(&daemon, &session, 2, parts[2]);
    // A wrong copy of chunk 0, then the right one: the last copy wins.
    send_ok(&daemon, &session, 0, &vec![b'x'; 100_000]);
    send_ok(&daemon, &session, 0, parts[0]);
    send_ok(&daemon, &session, 1, parts[1]);
    let sizes: Vec<(i64, i64)> = {
        let db = daemon.db();
        let mut statement = db
            .prepare(
                "SELECT chunk_number, size FROM session_chunks WHERE session_id = ?1 ORDER BY chunk_number",
            )
            .unwrap();
        statement
            .query_map([&session], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(sizes, vec![(0, 100_000), (1, 100_000), (2, 50_000)]);
    // Out of order or re-sent, each chunk is kept in a file of its own.
    let dir = session_dir(&daemon, &session);
    for number in ["0", "1", "2"] {
        assert!(
            dir.join(number).is_file(),
            "chunk {number} apart: {:?}",
            std::fs::read_dir(&dir)
        );
    }

    let reply = complete(&daemon, &[KEY], &session);
    let id = assert_stored(&daemon, &reply, &content);
    let (filename, mime, metadata): (String, String, String) = daemon
        .db()
        .query_row(
            "SELECT filename, mime, metadata FROM uploads WHERE id = ?1",
            [&id],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .unwrap();
    assert_eq!((filename.as_str(), mime.as_str()), ("photo.png", "image/png"));
    assert_eq!(
        serde_json::from_str::<Value>(&metadata).unwrap()["fileContext"],
        "bulkImport"
    );
    // The session, its chunks and every temporary file are gone.
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM sessions"), 0);
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM session_chunks"), 0);
    assert!(!session_dir(&daemon, &session).exists());
    assert_eq!(daemon.spool_files(), 0);
    // A completed session is gone for good.
    assert_error(&complete(&daemon, &[KEY], &session), 404);
    assert_error(&chunk(&daemon, &[KEY], &session, "0", b"x"), 404);
}

#[test]
fn chunk_numbers_and_start_bodies_are_checked() {
    let daemon = Daemon::start_with(config);
    let session = open(&daemon, &[KEY], "clip.png", 400, 4);
    for number in ["4", "99", "-1", "x", "1.5", ""] {
        let message = assert_error(&chunk(&daemon, &[KEY], &session, number, b"abc"), 400);
        assert!(message.contains("chunkNumber"), "{number}: {message}");
    }
    let no_number = Form::new().file("file", "blob", "application/octet-stream", b"abc");
    let url = daemon.url(&format!("/api/public/files/session/{session}"));
    assert!(assert_error(&post_form(&url, &[KEY], &no_number), 400).contains("chunkNumber"));
    let no_file = Form::new().text("chunkNumber", "0");
    assert!(assert_error(&post_form(&url, &[KEY], &no_file), 400).contains("file"));
    // The number twice, around the file: which one counts would depend on who reads it.
    let two_numbers = Form::new()
        .text("chunkNumber", "1")
        .file("file", "blob", "application/octet-stream", b"abc")
        .text("chunkNumber", "2");
    let message = assert_error(&post_form(&url, &[KEY], &two_numbers), 400);
    assert!(
        message.contains("chunkNumber") && message.contains("twice"),
        "{message}"
    );
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM session_chunks"), 0);
    // The file part may come before the number.
    let file_first = Form::new()
        .file("file", "blob", "application/octet-stream", &png_of(100))
        .text("chunkNumber", "0");
    assert_eq!(post_form(&url, &[KEY], &file_first).status, 200);
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM session_chunks"), 1);

    // Ids are validated before any lookup; unknown ones are not found.
    for bad in [
        "not-a-uuid",
        "..",
        "0F8C1F4E-3F43-4A55-9B9C-6B2F1D0E8A11",
        "0f8c1f4e-3f43-4a55-9b9c-6b2f1d0e8a11",
    ] {
        assert_error(&chunk(&daemon, &[KEY], bad, "0", b"abc"), 404);
        assert_error(&complete(&daemon, &[KEY], bad), 404);
    }

    // Start bodies.
    let base = declare("clip.png", 400, 4);
    for field in [
        "fileContext",
        "totalChunks",
        "fileExtension",
        "fileName",
        "fileSize",
    ] {
        let mut body = base.clone();
        body.as_object_mut().unwrap().remove(field);
        let message = assert_error(&start(&daemon, &[KEY], &body), 400);
        assert!(message.contains(field), "{field}: {message}");
    }
    for (field, value) in [
        ("totalChunks", json!(0)),
        ("totalChunks", json!("many")),
        ("fileSize", json!(-5)),
        ("fileName", json!("../clip.png")),
        ("fileName", json!("")),
        ("fileExtension", json!("p/ng")),
    ] {
        let mut body = base.clone();
        body[field] = value.clone();
        assert_error(&start(&daemon, &[KEY], &body), 400);
    }
    let reply = send(
        "POST",
        &daemon.url("/api/public/files/session/start"),
        &[KEY],
        Some(("application/json", b"{not json".to_vec())),
    );
    assert_error(&reply, 400);
    // Numbers as strings are accepted (JavaScript clients send them).
    let mut body = base.clone();
    body["totalChunks"] = json!("4");
    body["fileSize"] = json!("400");
    assert_eq!(start(&daemon, &[KEY], &body).status, 200);

    // The plan, at start: declared size over the limit, extensions not allowed.
    let message = assert_error(&start(&daemon, &[STRICT], &declare("a.png", 1001, 2)), 413);
    assert!(message.contains("1000 bytes"), "{message}");
    assert_error(&start(&daemon, &[STRICT], &declare("a.exe", 10, 1)), 415);
    let mut mismatched = declare("a.png", 10, 1);
    mismatched["fileExtension"] = json!("exe");
    assert_error(&start(&daemon, &[STRICT], &mismatched), 415);
    assert_error(&start(&daemon, &[("x-api-key", "nope")], &base), 401);
    assert_error(&start(&daemon, &[], &base), 401);
    assert_error(&start(&daemon, &[("x-api-key", "dify-only-key")], &base), 403);
    // A path under the dialect's prefix that no endpoint serves: Kore's own 404 shape.
    let reply = send("GET", &daemon.url("/api/public/files/nothing/here"), &[KEY], None);
    let message = assert_error(&reply, 404);
    assert_eq!(message, "No such endpoint.");
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM sessions"), 2);
    assert_eq!(daemon.spool_files(), 0);
}

#[test]
fn running_total_over_the_declared_size_is_413_while_chunks_arrive() {
    let daemon = Daemon::start_with(config);
    let content = png_of(1000);
    let session = open(&daemon, &[KEY], "a.png", 1000, 2);
    send_ok(&daemon, &session, 0, &vec![7; 600]);
    // A key whose tenant may not use this dialect cannot touch the session either.
    let dify_only = [("x-api-key", "dify-only-key")];
    assert_error(&chunk(&daemon, &dify_only, &session, "1", &[7; 10]), 403);
    assert_error(&complete(&daemon, &dify_only, &session), 403);
    let message = assert_error(&chunk(&daemon, &[KEY], &session, "1", &[7; 500]), 413);
    assert!(message.contains("1000 bytes"), "{message}");
    // The same with the number after the bytes.
    let late_number = Form::new()
        .file("file", "blob", "application/octet-stream", &[7; 500])
        .text("chunkNumber", "1");
    let url = daemon.url(&format!("/api/public/files/session/{session}"));
    assert_error(&post_form(&url, &[KEY], &late_number), 413);
    // A re-sent chunk replaces the old copy's size in the running total.
    send_ok(&daemon, &session, 0, &content[..500]);
    send_ok(&daemon, &session, 1, &content[500..]);
    assert_eq!(count(&daemon, "SELECT SUM(size) FROM session_chunks"), 1000);
    // Replacing a chunk with a larger copy that would pass the total is refused too.
    assert_error(&chunk(&daemon, &[KEY], &session, "1", &[7; 501]), 413);
    let id = assert_stored(&daemon, &complete(&daemon, &[KEY], &session), &content);
    assert_eq!(id.len(), 24);
    assert_eq!(daemon.spool_files(), 0);
}

#[test]
fn complete_names_missing_chunks_and_keeps_the_session_open() {
    let daemon = Daemon::start_with(config);
    let content = png_of(4000);
    let parts: Vec<&[u8]> = content.chunks(1000).collect();
    let session = open(&daemon, &[KEY], "a.png", content.len(), 4);
    send_ok(&daemon, &session, 0, parts[0]);
    send_ok(&daemon, &session, 2, parts[2]);
    let message = assert_error(&complete(&daemon, &[KEY], &session), 400);
    assert!(message.contains("1, 3"), "{message}");
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM sessions"), 1);
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM uploads"), 0);
    send_ok(&daemon, &session, 3, parts[3]);
    let message = assert_error(&complete(&daemon, &[KEY], &session), 400);
    assert!(message.contains("missing: 1."), "{message}");
    // Every chunk there, but fewer bytes than declared: refused, still open.
    send_ok(&daemon, &session, 1, &parts[1][..999]);
    let message = assert_error(&complete(&daemon, &[KEY], &session), 400);
    assert!(message.contains("3999") && message.contains("4000"), "{message}");
    send_ok(&daemon, &session, 1, parts[1]);
    assert_stored(&daemon, &complete(&daemon, &[KEY], &session), &content);
}

#[test]
fn complete_refused_for_its_content_leaves_nothing_behind_and_keeps_the_session_open() {
    let daemon = Daemon::start_with(config);
    let content = png_of(2000);
    let session = open(&daemon, &[KEY], "a.png", 2000, 2);
    // The first chunk is not the start of a PNG: the assembled file does not match `.png`.
    send_ok(&daemon, &session, 0, &[b'%'; 1000]);
    send_ok(&daemon, &session, 1, &content[1000..]);
    let message = assert_error(&complete(&daemon, &[KEY], &session), 415);
    assert!(message.to_lowercase().contains("png"), "{message}");
    assert_eq!(daemon.spool_files(), 0, "the assembled file is removed");
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM uploads"), 0);
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM sessions"), 1);
    assert_eq!(
        count(&daemon, "SELECT COUNT(*) FROM sessions WHERE upload_id IS NULL"),
        1,
        "the upload id noted for the attempt is taken back: the session counts as open again"
    );
    let in_place = session_dir(&daemon, &session).join("data");
    assert_eq!(
        std::fs::metadata(&in_place).map(|m| m.len()).ok(),
        Some(2000),
        "the chunks stay, in order in the session's in-place file"
    );
    assert_eq!(files_in(&session_dir(&daemon, &session)), 1);
    // The client sends the right first chunk again and completes.
    send_ok(&daemon, &session, 0, &content[..1000]);
    assert_stored(&daemon, &complete(&daemon, &[KEY], &session), &content);
    assert!(!session_dir(&daemon, &session).exists());
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM sessions"), 0);
}

#[test]
fn a_session_belongs_to_the_tenant_that_started_it() {
    let daemon = Daemon::start_with(config);
    let content = png_of(2000);
    let session = open(&daemon, &[KEY], "a.png", 2000, 2);
    send_ok(&daemon, &session, 0, &content[..1000]);
    // Another tenant cannot add to it, replace a chunk or complete it.
    assert_error(&chunk(&daemon, &[OTHER], &session, "1", &content[1000..]), 404);
    assert_error(&chunk(&daemon, &[OTHER], &session, "0", &[0; 1000]), 404);
    assert_error(&complete(&daemon, &[OTHER], &session), 404);
    send_ok(&daemon, &session, 1, &content[1000..]);
    assert_error(&complete(&daemon, &[OTHER], &session), 404);
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM uploads"), 0);
    assert_stored(&daemon, &complete(&daemon, &[KEY], &session), &content);
    let tenant: String = daemon
        .db()
        .query_row("SELECT tenant FROM uploads", [], |row| row.get(0))
        .unwrap();
    assert_eq!(tenant, "demo");
}

#[test]
fn expired_sessions_are_swept_with_their_chunks() {
    let daemon = Daemon::start_with(|dir| {
        config(dir).replace(
            "  idle_timeout: 2s\n",
            "  idle_timeout: 2s\n  session_expiry: 1s\n  sweep_interval: 200ms\n",
        )
    });
    let reply = start(&daemon, &[KEY], &declare("a.png", 2000, 2));
    let expiration = humantime::parse_rfc3339(reply.json()["expirationDate"].as_str().unwrap()).unwrap();
    assert!(expiration < SystemTime::now() + Duration::from_secs(2));
    let session = reply.json()["sessionId"].as_str().unwrap().to_owned();
    send_ok(&daemon, &session, 0, &png_of(1000));
    let dir = session_dir(&daemon, &session);
    assert!(dir.join("data").is_file());
    assert!(
        eventually(Duration::from_secs(5), || !dir.exists()),
        "chunk dir not swept"
    );
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM sessions"), 0);
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM session_chunks"), 0);
    let message = assert_error(&chunk(&daemon, &[KEY], &session, "1", &[1; 1000]), 404);
    assert!(message.contains("expired"), "{message}");
    assert_error(&complete(&daemon, &[KEY], &session), 404);
    assert!(!dir.exists());
    assert_eq!(daemon.spool_files(), 0);
}

#[test]
fn an_expired_session_not_yet_swept_is_410() {
    let daemon = Daemon::start_with(|dir| {
        config(dir).replace(
            "  idle_timeout: 2s\n",
            "  idle_timeout: 2s\n  session_expiry: 1s\n  sweep_interval: 1h\n",
        )
    });
    let session = open(&daemon, &[KEY], "a.png", 2000, 2);
    send_ok(&daemon, &session, 0, &png_of(1000));
    std::thread::sleep(Duration::from_millis(1200));
    let message = assert_error(&chunk(&daemon, &[KEY], &session, "1", &[1; 1000]), 410);
    assert!(message.contains("expired"), "{message}");
    assert_error(&complete(&daemon, &[KEY], &session), 410);
    // Another tenant still just gets 404.
    assert_error(&complete(&daemon, &[OTHER], &session), 404);
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM uploads"), 0);
}

#[test]
fn a_session_survives_sigkill_between_chunks() {
    let mut daemon = Daemon::start_with(config);
    let content = png_of(600_000);
    let parts: Vec<&[u8]> = content.chunks(100_000).collect();
    let session = open(&daemon, &[KEY], "big.png", content.len(), parts.len() as u64);
    for number in [4, 0, 2] {
        send_ok(&daemon, &session, number, parts[number as usize]);
    }
    daemon.kill();
    let daemon = Daemon::spawn(daemon.dir.clone(), daemon.config_path.clone(), &[]);
    let message = assert_error(&complete(&daemon, &[KEY], &session), 400);
    assert!(message.contains("1, 3, 5"), "{message}");
    for number in [5, 1, 3] {
        send_ok(&daemon, &session, number, parts[number as usize]);
    }
    let id = assert_stored(&daemon, &complete(&daemon, &[KEY], &session), &content);
    assert_eq!(sha256_file(&daemon.files_dir().join(&id)), sha256_hex(&content));
    assert!(!session_dir(&daemon, &session).exists());
}

#[test]
fn chunks_sent_in_order_are_written_once_and_survive_a_kill_9_between_them() {
    use std::os::unix::fs::MetadataExt;
    let mut daemon = Daemon::start_with(config);
    let content = png_of(300_000);
    let parts: Vec<&[u8]> = content.chunks(100_000).collect();
    let session = open(&daemon, &[KEY], "photo.png", content.len(), 3);
    send_ok(&daemon, &session, 0, parts[0]);
    send_ok(&daemon, &session, 1, parts[1]);
    let in_place = session_dir(&daemon, &session).join("data");
    assert_eq!(std::fs::metadata(&in_place).unwrap().len(), 200_000);
    assert_eq!(
        files_in(&session_dir(&daemon, &session)),
        1,
        "no chunk file of its own"
    );

    // Killed between two chunks, started again: the session goes on where it was.
    daemon.kill();
    let mut daemon = Daemon::spawn(daemon.dir.clone(), daemon.config_path.clone(), &[]);
    send_ok(&daemon, &session, 2, parts[2]);
    let inode = std::fs::metadata(&in_place).unwrap().ino();
    let id = assert_stored(&daemon, &complete(&daemon, &[KEY], &session), &content);
    // The stored file is the in-place file itself: no second copy of the upload was written.
    assert_eq!(
        std::fs::metadata(daemon.files_dir().join(&id)).unwrap().ino(),
        inode,
        "the upload was linked, not copied"
    );
    assert!(!session_dir(&daemon, &session).exists());
    assert_eq!(daemon.spool_files(), 0);

    // Without a restart, the sha256 recorded was computed as the chunks arrived; it is the
    // file's, for a binary type and for text (read once at completion for its UTF-8).
    let text: Vec<u8> = (0..250_000u32)
        .map(|i| b"chunked text\n"[(i % 13) as usize])
        .collect();
    for (name, bytes) in [("again.png", &content), ("notes.txt", &text)] {
        let session = open(&daemon, &[KEY], name, bytes.len(), 3);
        for (number, part) in bytes.chunks(100_000).enumerate() {
            send_ok(&daemon, &session, number as u64, part);
        }
        let id = assert_stored(&daemon, &complete(&daemon, &[KEY], &session), bytes);
        let recorded: String = daemon
            .db()
            .query_row("SELECT sha256 FROM uploads WHERE id = ?1", [&id], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(recorded, sha256_hex(bytes), "{name}");
    }
    daemon.kill();
}

/// The same chunk sent twice at once: one request writes it in place, the other is kept apart
/// (the in-place writer is busy) and recorded first. The copy recorded last is the chunk:
/// the one in place, whose bytes (and size) complete the upload, not the other's file.
#[test]
fn a_chunk_sent_twice_at_once_is_the_copy_recorded_last() {
    let daemon = Daemon::start_with(config);
    let first: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let in_place: Vec<u8> = (0..150_000u32).map(|i| b'A' + (i % 26) as u8).collect();
    let apart: Vec<u8> = (0..120_000u32).map(|i| b'0' + (i % 10) as u8).collect();
    let session = open(&daemon, &[KEY], "twice.txt", first.len() + in_place.len(), 2);
    send_ok(&daemon, &session, 0, &first);
    let form =
        Form::new()
            .text("chunkNumber", "1")
            .file("file", "blob", "application/octet-stream", &in_place);
    let path = format!("/api/public/files/session/{session}");
    let mut slow = RawUpload::start(&daemon.url(""), &path, KEY, &form);
    slow.send(slow.len() / 2).unwrap();
    // Its file part has begun (written in place) before the other copy arrives.
    std::thread::sleep(Duration::from_millis(500));
    send_ok(&daemon, &session, 1, &apart);
    let (status, text) = slow.finish().unwrap();
    assert_eq!(status, 200, "{text}");
    let mut content = first.clone();
    content.extend_from_slice(&in_place);
    assert_stored(&daemon, &complete(&daemon, &[KEY], &session), &content);
}

/// A recorded chunk whose bytes are gone from the spool is named missing at `complete`, as a
/// chunk never sent is: the client sends it again and the session completes.
#[test]
fn a_recorded_chunk_gone_from_disk_is_named_missing() {
    let daemon = Daemon::start_with(config);
    let content = png_of(3000);
    let parts: Vec<&[u8]> = content.chunks(1000).collect();
    let session = open(&daemon, &[KEY], "gone.png", content.len(), 3);
    // Out of order: every chunk gets a file of its own.
    for number in [2, 1, 0] {
        send_ok(&daemon, &session, number, parts[number as usize]);
    }
    std::fs::remove_file(session_dir(&daemon, &session).join("1")).unwrap();
    let message = assert_error(&complete(&daemon, &[KEY], &session), 400);
    assert!(message.contains("missing: 1."), "{message}");
    send_ok(&daemon, &session, 1, parts[1]);
    assert_stored(&daemon, &complete(&daemon, &[KEY], &session), &content);
}

/// A chunk of the in-place prefix sent again: the later chunks move into files of their own
/// and the in-place file is cut where the re-sent chunk began, so the session holds its bytes
/// once on disk (it held them twice, up to twice the plan's limit per session, until it
/// ended); the upload is the chunks recorded last.
#[test]
fn a_resent_chunk_of_the_prefix_leaves_no_second_copy_on_disk() {
    let daemon = Daemon::start_with(config);
    let parts: Vec<Vec<u8>> = (0..4u8)
        .map(|i| {
            (0..20_000u32)
                .map(|j| b'a' + ((j + u32::from(i)) % 26) as u8)
                .collect()
        })
        .collect();
    let total: usize = parts.iter().map(Vec::len).sum();
    let session = open(&daemon, &[KEY], "again.txt", total, 4);
    for (number, part) in parts.iter().enumerate() {
        send_ok(&daemon, &session, number as u64, part);
    }
    let dir = session_dir(&daemon, &session);
    let on_disk = || -> u64 {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().metadata().unwrap().len())
            .sum()
    };
    assert_eq!(std::fs::metadata(dir.join("data")).unwrap().len(), total as u64);
    let again: Vec<u8> = (0..20_000u32).map(|j| b'0' + (j % 10) as u8).collect();
    send_ok(&daemon, &session, 1, &again);
    assert_eq!(
        on_disk(),
        total as u64,
        "{:?}",
        std::fs::read_dir(&dir).unwrap().collect::<Vec<_>>()
    );
    assert_eq!(std::fs::metadata(dir.join("data")).unwrap().len(), 20_000);
    let content = [parts[0].as_slice(), &again, &parts[2], &parts[3]].concat();
    assert_stored(&daemon, &complete(&daemon, &[KEY], &session), &content);
}

/// Starts that arrive at once cannot all pass one count of the tenant's open sessions:
/// exactly `max_open_sessions` of them open a session, the others get 429.
#[test]
fn concurrent_starts_open_no_more_sessions_than_the_plan_allows() {
    let daemon = Daemon::start_with(|dir| {
        config(dir).replacen("  default:\n", "  default:\n    max_open_sessions: 3\n", 1)
    });
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let starts: Vec<_> = (0..24)
            .map(|i| {
                let daemon = &daemon;
                scope.spawn(move || start(daemon, &[KEY], &declare(&format!("s{i}.txt"), 10, 1)).status)
            })
            .collect();
        starts.into_iter().map(|start| start.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|status| **status == 200).count(),
        3,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|status| matches!(status, 200 | 429)),
        "{statuses:?}"
    );
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM sessions"), 3);
}

/// A `complete` retried after a crash between the upload's record and the session's removal
/// (the state such a crash leaves: the session names the upload noted for it, which is
/// recorded) answers that upload and removes the session: no second upload.
#[test]
fn a_complete_retried_after_its_upload_was_recorded_makes_no_second_upload() {
    let daemon = Daemon::start_with(config);
    let content = b"recorded once\n".repeat(100);
    let session = open(&daemon, &[KEY], "once.txt", content.len(), 1);
    send_ok(&daemon, &session, 0, &content);
    // The record the crashed attempt made: a copy of another of the tenant's uploads.
    let form = Form::new()
        .file("file", "once.txt", "text/plain", &content)
        .text("fileContext", "bulkImport");
    let earlier = assert_stored(&daemon, &single(&daemon, &[KEY], &form), &content);
    let noted = "0123456789abcdef01234567";
    daemon
        .db()
        .execute_batch(&format!(
            "CREATE TEMP TABLE crashed AS SELECT * FROM uploads WHERE id = '{earlier}';
             UPDATE crashed SET id = '{noted}';
             INSERT INTO uploads SELECT * FROM crashed;
             UPDATE sessions SET upload_id = '{noted}' WHERE id = '{session}';"
        ))
        .unwrap();
    let reply = complete(&daemon, &[KEY], &session);
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["fileId"], noted);
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM uploads"), 2);
    assert_eq!(count(&daemon, "SELECT COUNT(*) FROM sessions"), 0);
    assert!(!session_dir(&daemon, &session).exists());
}

//! One client per inbound dialect, so tests can run the same scenario through all six:
//! each sends a single-file upload the way that vendor's own clients do (tus: one creation
//! request carrying the whole file) and reads back the id, the URL and the error message
//! from that dialect's shapes.

use serde_json::Value;

use crate::harness::{Daemon, Form, Reply, post_form, send};

/// The six dialects, by name.
pub const DIALECTS: [&str; 6] = ["dify", "kore", "maiagent", "korexo", "beam", "tus"];

/// The status each dialect answers a successful upload with.
pub fn success_status(dialect: &str) -> u16 {
    match dialect {
        "kore" | "korexo" => 200,
        _ => 201,
    }
}

/// Standard base64 with padding, as tus's `Upload-Metadata` and `Upload-Checksum` carry it.
pub fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A Beam thread id used by the inbound Beam client.
pub const BEAM_THREAD: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

/// Uploads `bytes` as `name` through `dialect` with API key `key`.
pub fn upload(daemon: &Daemon, dialect: &str, key: &str, name: &str, bytes: &[u8]) -> Reply {
    let file = |field: &str| Form::new().file(field, name, "application/octet-stream", bytes);
    match dialect {
        "dify" => post_form(
            &daemon.url("/v1/files/upload"),
            &[("Authorization", &format!("Bearer {key}"))],
            &file("file"),
        ),
        "kore" => post_form(
            &daemon.url("/api/public/files"),
            &[("X-api-key", key)],
            &Form::new().text("fileContext", "bulkImport").file(
                "file",
                name,
                "application/octet-stream",
                bytes,
            ),
        ),
        "maiagent" => post_form(
            &daemon.url("/api/v1/attachments-upload/"),
            &[("Authorization", &format!("Api-Key {key}"))],
            &file("file"),
        ),
        "korexo" => post_form(
            &daemon.url("/api/v2/apps/app-1/environments/draft/attachments/upload"),
            &[("x-api-key", key)],
            &Form::new()
                .text("userReference", "user-1")
                .text("uploadType", "runtime")
                .file("file", name, "application/octet-stream", bytes),
        ),
        "beam" => post_form(
            &daemon.url("/agent-setup/upload"),
            &[("x-api-key", key), ("current-workspace-id", "ws-1")],
            &Form::new()
                .text("threadId", BEAM_THREAD)
                .file("files", name, "application/octet-stream", bytes),
        ),
        "tus" => send(
            "POST",
            &daemon.url("/files/"),
            &[
                ("Authorization", &format!("Bearer {key}")),
                ("Tus-Resumable", "1.0.0"),
                ("Upload-Length", &bytes.len().to_string()),
                ("Upload-Metadata", &format!("filename {}", b64(name.as_bytes()))),
            ],
            Some(("application/offset+octet-stream", bytes.to_vec())),
        ),
        other => panic!("unknown dialect {other}"),
    }
}

/// The file record of a success body (Beam answers an array of them).
pub fn record(dialect: &str, body: &Value) -> Value {
    if dialect == "beam" {
        body[0].clone()
    } else {
        body.clone()
    }
}

/// The upload id of a successful upload (tus: the `Upgate-Upload-Id` header).
pub fn id(dialect: &str, reply: &Reply) -> String {
    if dialect == "tus" {
        return reply
            .header("upgate-upload-id")
            .unwrap_or_else(|| panic!("tus: no Upgate-Upload-Id: {reply:?}"))
            .to_owned();
    }
    let body = &reply.json();
    let record = record(dialect, body);
    let key = if matches!(dialect, "kore" | "korexo") {
        "fileId"
    } else {
        "id"
    };
    record[key]
        .as_str()
        .unwrap_or_else(|| panic!("{dialect}: no {key} in {body}"))
        .to_owned()
}

/// The URL of a successful upload (the upstream's URL when forwarded; tus: the
/// `Upgate-Upload-Url` header); `None` for Kore XO, whose answer has no URL field
/// (`filePath` is a fixed vendor-side name).
pub fn url(dialect: &str, reply: &Reply) -> Option<Value> {
    if dialect == "tus" {
        return reply
            .header("upgate-upload-url")
            .map(|url| Value::String(url.to_owned()));
    }
    let body = &reply.json();
    let record = record(dialect, body);
    match dialect {
        "dify" => Some(record["source_url"].clone()),
        "kore" => Some(record["url"].clone()),
        "maiagent" => Some(record["file"].clone()),
        "korexo" => None,
        _ => Some(record["url"].clone()),
    }
}

/// The human message of an error answer, whatever the dialect's shape (tus: plain text).
pub fn error_message(dialect: &str, reply: &Reply) -> String {
    if dialect == "tus" {
        assert!(
            reply
                .header("content-type")
                .is_some_and(|value| value.starts_with("text/plain")),
            "tus: {reply:?}"
        );
        return reply.text.trim().to_owned();
    }
    let body = &reply.json();
    let text = match dialect {
        "dify" => body["message"].as_str().map(str::to_owned),
        "kore" | "korexo" => body["errors"][0]["msg"].as_str().map(str::to_owned),
        "maiagent" => body["detail"].as_str().map(str::to_owned).or_else(|| {
            body.as_object()
                .and_then(|map| map.values().next())
                .and_then(|v| v[0].as_str())
                .map(str::to_owned)
        }),
        _ => match &body["message"] {
            Value::String(text) => Some(text.clone()),
            Value::Array(items) => items.first().and_then(Value::as_str).map(str::to_owned),
            _ => None,
        },
    };
    text.unwrap_or_else(|| panic!("{dialect}: no error message in {body}"))
}

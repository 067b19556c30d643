//! The maiagent dialect end to end: the real daemon, the real local plugin, real HTTP.

use std::path::Path;

use serde_json::{Value, json};
use upgate_e2e::harness::*;

const KEY: (&str, &str) = ("Authorization", "Api-Key demo-key");
const PATH: &str = "/api/v1/attachments-upload/";

fn config(dir: &Path) -> String {
    default_config(dir).replace(
        "plans:\n",
        "plans:\n  strict:\n    max_file_size: 1000\n    allowed_extensions: [doc, docx, txt, pdf, md, xls, xlsx, csv, ppt, pptx, json, jsonl]\n  limited:\n    max_file_size: 1MiB\n    rate_limit: { requests_per_second: 1, burst: 2 }\n",
    ) + "  other:\n    plan: default\n    provider: disk\n    keys: [other-key]\n"
        + "  strict:\n    plan: strict\n    provider: disk\n    keys: [strict-key]\n"
        + "  limited:\n    plan: limited\n    provider: disk\n    keys: [limited-key]\n"
        + "  koreonly:\n    plan: default\n    provider: disk\n    keys: [kore-only-key]\n    dialects: [kore]\n"
}

fn upload(daemon: &Daemon, headers: &[(&str, &str)], form: &Form) -> Reply {
    post_form(&daemon.url(PATH), headers, form)
}

/// The start of an OLE compound file (what .xls/.doc/.ppt files are).
fn ole() -> Vec<u8> {
    let mut bytes = vec![0xd0, 0xcf, 0x11, 0xe0, 0xa1, 0xb1, 0x1a, 0xe1];
    bytes.extend(std::iter::repeat_n(0u8, 504));
    bytes
}

fn assert_attachment(daemon: &Daemon, reply: &Reply, name: &str, kind: &str, content: &[u8]) -> String {
    assert_eq!(reply.status, 201, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body.as_object().unwrap().len(), 4, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{body}");
    assert_eq!(body["type"], kind, "{body}");
    assert_eq!(body["filename"], name, "{body}");
    assert!(body["file"].as_str().unwrap().starts_with("file://"), "{body}");
    assert_eq!(sha256_file(&daemon.files_dir().join(&id)), sha256_hex(content));
    id
}

fn assert_detail(reply: &Reply, status: u16, detail: &str) {
    assert_eq!(reply.status, status, "{}", reply.text);
    assert_eq!(reply.json(), json!({ "detail": detail }));
}

#[test]
fn upload_answers_201_with_the_attachment_and_its_family() {
    let daemon = Daemon::start_with(config);
    let cases: [(&str, &str, &[u8], &str); 5] = [
        (
            "report.pdf",
            "application/pdf",
            b"%PDF-1.4\n%\xe2\xe3\n%%EOF\n",
            "document",
        ),
        ("notes.txt", "text/plain", b"plain text\n", "text"),
        ("table.csv", "text/csv", b"a,b\n1,2\n", "text"),
        ("data.json", "application/json", b"{\"a\": [1, 2]}", "text"),
        ("pixel.png", "image/png", PNG, "image"),
    ];
    for (name, mime, bytes, kind) in cases {
        let reply = upload(&daemon, &[KEY], &Form::new().file("file", name, mime, bytes));
        let id = assert_attachment(&daemon, &reply, name, kind, bytes);
        let (dialect, tenant, state): (String, String, String) = daemon
            .db()
            .query_row(
                "SELECT dialect, tenant, state FROM uploads WHERE id = ?1",
                [&id],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            (dialect.as_str(), tenant.as_str(), state.as_str()),
            ("maiagent", "demo", "forwarded")
        );
    }
    // The path without the trailing slash is the same endpoint; the scheme is case-insensitive.
    let reply = post_form(
        &daemon.url("/api/v1/attachments-upload"),
        &[("Authorization", "api-key demo-key")],
        &Form::new().file("file", "a.md", "text/markdown", b"# title\n"),
    );
    assert_attachment(&daemon, &reply, "a.md", "text", b"# title\n");
}

/// The excerpt's curl example, byte for byte apart from host and key: its headers (accept,
/// the key, `Content-Type: multipart/form-data` to which curl adds the boundary, the CSRF
/// token) and its file part with a CJK name and its own content type. The example puts the
/// bare key in `Authorization`; the documented form is `Api-Key KEY`: both work.
#[test]
fn the_excerpts_curl_example_succeeds_and_keeps_the_name_byte_for_byte() {
    let daemon = Daemon::start_with(config);
    let name = "32d91c61-79b3-40e1-b47d-e35d6d30861文件.xls";
    let content = ole();
    for authorization in ["demo-key", "Api-Key demo-key"] {
        let form = Form::new().file("file", name, "application/vnd.ms-excel", &content);
        let reply = send(
            "POST",
            &daemon.url(PATH),
            &[
                ("accept", "application/json"),
                ("Authorization", authorization),
                (
                    "X-CSRFTOKEN",
                    "B85SZ7NcBcOKGl4xXU9cSfFhoLG7larxgCy2RYoz0mKSvcQydAboukuKCCKjGKV",
                ),
            ],
            Some((&Form::content_type(), form.body())),
        );
        // The vendor's own example answers `"type": "other"` for this .xls.
        let id = assert_attachment(&daemon, &reply, name, "other", &content);
        let (stored, mime): (String, String) = daemon
            .db()
            .query_row("SELECT filename, mime FROM uploads WHERE id = ?1", [&id], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .unwrap();
        assert_eq!(stored.as_bytes(), name.as_bytes());
        assert_eq!(mime, "application/vnd.ms-excel");
    }
}

#[test]
fn every_error_row_in_drf_shapes() {
    let daemon = Daemon::start_with(config);
    let strict = ("Authorization", "Api-Key strict-key");
    let txt = |name: &str| Form::new().file("file", name, "text/plain", b"text");

    // Auth.
    assert_detail(
        &upload(&daemon, &[], &txt("a.txt")),
        401,
        "Authentication credentials were not provided.",
    );
    for value in [
        "Bearer demo-key",
        "Api-Key",
        "Token demo-key",
        "Api-Key nope",
        "nope",
    ] {
        assert_detail(
            &upload(&daemon, &[("Authorization", value)], &txt("a.txt")),
            401,
            "Invalid API key format.",
        );
    }
    assert_detail(
        &upload(
            &daemon,
            &[("Authorization", "Api-Key kore-only-key")],
            &txt("a.txt"),
        ),
        403,
        "You do not have permission to perform this action.",
    );

    // Field errors.
    let reply = upload(&daemon, &[KEY], &Form::new().text("note", "no file"));
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.json(), json!({"file": ["This field is required."]}));
    let two = txt("a.txt").file("file", "b.txt", "text/plain", b"x");
    let reply = upload(&daemon, &[KEY], &two);
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert!(reply.json()["file"][0].is_string(), "{}", reply.text);
    for bad in ["", "../a.txt"] {
        let reply = upload(&daemon, &[KEY], &txt(bad));
        assert_eq!(reply.status, 400, "{}", reply.text);
        let body = reply.json();
        assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
        assert!(body["file"][0].is_string(), "{body}");
    }

    // Policy on the strict tenant: 1000 bytes, the excerpt's types.
    let reply = upload(&daemon, &[strict], &txt("a.exe"));
    assert_eq!(reply.status, 415, "{}", reply.text);
    assert!(reply.json()["detail"].as_str().unwrap().contains(".exe"));
    let reply = upload(
        &daemon,
        &[strict],
        &Form::new().file("file", "a.pdf", "application/pdf", ELF),
    );
    assert_eq!(reply.status, 415, "{}", reply.text);
    assert!(reply.json()["detail"].is_string());
    let reply = upload(
        &daemon,
        &[strict],
        &Form::new().file("file", "a.txt", "text/plain", &[b'a'; 1001]),
    );
    assert_eq!(reply.status, 413, "{}", reply.text);
    let detail = reply.json()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("1000 bytes"), "{detail}");

    // Rate limit.
    let limited = ("Authorization", "Api-Key limited-key");
    let statuses: Vec<u16> = (0..3)
        .map(|_| upload(&daemon, &[limited], &txt("a.txt")).status)
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 2, "{statuses:?}");
    let reply = upload(&daemon, &[limited], &txt("a.txt"));
    assert_eq!(reply.status, 429, "{}", reply.text);
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let expected = if retry == 1 {
        "Request was throttled. Expected available in 1 second.".to_owned()
    } else {
        format!("Request was throttled. Expected available in {retry} seconds.")
    };
    assert_detail(&reply, 429, &expected);

    // Nothing refused was kept.
    let rows: i64 = daemon
        .db()
        .query_row("SELECT COUNT(*) FROM uploads", [], |row| row.get(0))
        .unwrap();
    assert_eq!(rows, 2);
    assert_eq!(daemon.spool_files(), 0);
}

#[test]
fn each_tenant_gets_its_own_records() {
    let daemon = Daemon::start_with(config);
    let form = Form::new().file("file", "a.txt", "text/plain", b"same bytes");
    let mine = upload(&daemon, &[KEY], &form).json();
    let theirs = upload(&daemon, &[("Authorization", "Api-Key other-key")], &form).json();
    assert_ne!(mine["id"], theirs["id"]);
    let tenant_of = |id: &Value| -> String {
        daemon
            .db()
            .query_row(
                "SELECT tenant FROM uploads WHERE id = ?1",
                [id.as_str().unwrap()],
                |row| row.get(0),
            )
            .unwrap()
    };
    assert_eq!(tenant_of(&mine["id"]), "demo");
    assert_eq!(tenant_of(&theirs["id"]), "other");
}

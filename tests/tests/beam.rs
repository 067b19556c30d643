//! The beam dialect end to end: multi-file uploads against the real daemon and the real
//! local plugin.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use upgate_e2e::harness::*;

const KEY: (&str, &str) = ("x-api-key", "demo-key");
const WORKSPACE: (&str, &str) = ("current-workspace-id", "ws-42");
const THREAD: &str = "1a2036c0-d533-4636-8f51-2a811763ef5c";
const PATH: &str = "/agent-setup/upload";

fn config(dir: &Path) -> String {
    default_config(dir)
        .replace(
            "plans:\n",
            "plans:\n  strict:\n    max_file_size: 1000\n    allowed_extensions: [txt, csv, pdf, xls, xlsx, docx, doc, ppt, pptx, png, jpeg, jpg, tiff, heif, bmp]\n  limited:\n    max_file_size: 1MiB\n    rate_limit: { requests_per_second: 1, burst: 2 }\n",
        )
        .replace(
            "tenants:\n",
            &format!(
                "  later:\n    plugin: local\n    delivery: async\n    settings:\n      root: {}\ntenants:\n",
                dir.join("files").display()
            ),
        )
        + "  other:\n    plan: default\n    provider: disk\n    keys: [other-key]\n"
        + "  strict:\n    plan: strict\n    provider: disk\n    keys: [strict-key]\n"
        + "  limited:\n    plan: limited\n    provider: disk\n    keys: [limited-key]\n"
        + "  async:\n    plan: default\n    provider: later\n    keys: [async-key]\n"
        + "  difyonly:\n    plan: default\n    provider: disk\n    keys: [dify-only-key]\n    dialects: [dify]\n"
}

fn upload(daemon: &Daemon, headers: &[(&str, &str)], form: &Form) -> Reply {
    post_form(&daemon.url(PATH), headers, form)
}

fn txt_files(names: &[&str]) -> Form {
    names
        .iter()
        .fold(Form::new().text("threadId", THREAD), |form, name| {
            form.file(
                "files",
                name,
                "text/plain",
                format!("content of {name}").as_bytes(),
            )
        })
}

fn assert_nest(reply: &Reply, status: u16, error: &str) -> String {
    assert_eq!(reply.status, status, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body.as_object().unwrap().len(), 3, "{body}");
    assert_eq!(body["statusCode"], status, "{body}");
    assert_eq!(body["error"], error, "{body}");
    body["message"].as_str().unwrap().to_owned()
}

fn assert_unauthorized(reply: &Reply) {
    assert_eq!(reply.status, 401, "{}", reply.text);
    assert_eq!(
        reply.json(),
        json!({"message": "Unauthorized", "statusCode": 401})
    );
}

fn count_uploads(daemon: &Daemon) -> i64 {
    daemon
        .db()
        .query_row("SELECT COUNT(*) FROM uploads", [], |row| row.get(0))
        .unwrap()
}

fn nothing_kept(daemon: &Daemon) {
    assert_eq!(count_uploads(daemon), 0);
    let files = std::fs::read_dir(daemon.files_dir()).map_or(0, |entries| entries.count());
    assert_eq!(files, 0);
    assert_eq!(daemon.spool_files(), 0);
}

fn assert_iso(text: &str) {
    assert_eq!(text.len(), 24, "{text}");
    assert!(text.ends_with('Z'), "{text}");
    let at = humantime::parse_rfc3339(text).unwrap();
    let age = SystemTime::now()
        .duration_since(at)
        .unwrap_or_else(|e| e.duration());
    assert!(age < Duration::from_secs(60), "{text}");
}

/// Checks one chat-file object; returns its id.
fn assert_chat_file(item: &Value, name: &str, mime: &str, status: &str, workspace: &str) -> String {
    let object = item.as_object().unwrap();
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "createdAt",
            "fileKey",
            "id",
            "mimeType",
            "name",
            "src",
            "threadId",
            "updatedAt",
            "uploadSource",
            "uploadStatus",
            "url",
            "user",
            "userId"
        ]
    );
    let id = item["id"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{item}");
    assert_eq!(item["name"], name);
    assert_eq!(item["threadId"], THREAD);
    assert_eq!(item["uploadStatus"], status);
    assert_eq!(item["uploadSource"], "file_upload");
    assert_iso(item["createdAt"].as_str().unwrap());
    assert_iso(item["updatedAt"].as_str().unwrap());
    assert_eq!(item["mimeType"], mime);
    let key = item["fileKey"].as_str().unwrap();
    assert!(key.starts_with(&format!("uploads/{workspace}/{id}")), "{key}");
    assert_eq!(item["src"], key);
    // The user: an id and a name, nothing else.
    let user = item["user"].as_object().unwrap();
    assert_eq!(user.len(), 2, "{item}");
    assert!(uuid::Uuid::parse_str(user["id"].as_str().unwrap()).is_ok());
    assert_eq!(item["userId"], user["id"]);
    id
}

#[test]
fn upload_answers_201_with_one_object_per_file_in_order() {
    let daemon = Daemon::start_with(config);
    let names = ["first.txt", "second.png", "第三.csv"];
    let form = Form::new()
        .file("files", names[0], "text/plain", b"one")
        .text("threadId", THREAD)
        .file("files", names[1], "image/png", PNG)
        .file("files", names[2], "text/csv", b"a,b\n1,2\n");
    let reply = upload(&daemon, &[KEY, WORKSPACE], &form);
    assert_eq!(reply.status, 201, "{}", reply.text);
    let items = reply.json().as_array().unwrap().clone();
    assert_eq!(items.len(), 3);
    let mimes = ["text/plain", "image/png", "text/csv"];
    let contents: [&[u8]; 3] = [b"one", PNG, b"a,b\n1,2\n"];
    for (index, item) in items.iter().enumerate() {
        let id = assert_chat_file(item, names[index], mimes[index], "uploaded", "ws-42");
        assert!(item["url"].as_str().unwrap().starts_with("file://"), "{item}");
        assert_eq!(item["user"]["name"], "demo");
        assert_eq!(
            sha256_file(&daemon.files_dir().join(&id)),
            sha256_hex(contents[index])
        );
        let metadata: String = daemon
            .db()
            .query_row("SELECT metadata FROM uploads WHERE id = ?1", [&id], |row| {
                row.get(0)
            })
            .unwrap();
        let metadata: Value = serde_json::from_str(&metadata).unwrap();
        assert_eq!(metadata["threadId"], THREAD);
        assert_eq!(metadata["workspaceId"], "ws-42");
    }
    // One user for the tenant; another tenant is another user.
    assert_eq!(items[0]["userId"], items[2]["userId"]);
    let theirs = upload(
        &daemon,
        &[("x-api-key", "other-key"), WORKSPACE],
        &txt_files(&["x.txt"]),
    );
    assert_eq!(theirs.status, 201, "{}", theirs.text);
    assert_ne!(theirs.json()[0]["userId"], items[0]["userId"]);
    assert_eq!(theirs.json()[0]["user"]["name"], "other");
    // Nothing of the real API's user row.
    for secret in ["password", "rememberToken", "email", "other-key", "demo-key"] {
        assert!(!reply.text.contains(secret), "{secret} in {}", reply.text);
    }
}

#[test]
fn async_delivery_answers_processing_then_delivers() {
    let daemon = Daemon::start_with(config);
    let reply = upload(
        &daemon,
        &[("x-api-key", "async-key"), WORKSPACE],
        &txt_files(&["a.txt"]),
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    let item = &reply.json()[0];
    let id = assert_chat_file(item, "a.txt", "text/plain", "processing", "ws-42");
    assert_eq!(item["url"], format!("upgate://uploads/{id}").as_str());
    let stored = daemon.files_dir().join(&id);
    assert!(eventually(Duration::from_secs(10), || stored.is_file()));
}

/// The excerpt's curl example apart from host and key: its headers (the workspace header
/// keeps its placeholder value), its `threadId`, and the example file sent as a `files` part.
/// (`files=<string>` makes curl read a file named `string>`; its `files.items` line is the
/// documentation renderer's name for the array's items, the field is `files`.)
#[test]
fn the_excerpts_curl_example_succeeds() {
    let daemon = Daemon::start_with(config);
    let form = Form::new()
        .text("threadId", THREAD)
        .text("files", "<string>")
        .file(
            // The generated example names the part `files.items`.
            "files.items",
            "example-file",
            "application/octet-stream",
            b"hello beam\n",
        );
    let reply = upload(
        &daemon,
        &[
            ("current-workspace-id", "<current-workspace-id>"),
            ("x-api-key", "demo-key"),
        ],
        &form,
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    let items = reply.json();
    assert_eq!(items.as_array().unwrap().len(), 1);
    assert_chat_file(
        &items[0],
        "example-file",
        "text/plain",
        "uploaded",
        "<current-workspace-id>",
    );
}

#[test]
fn every_error_row() {
    let daemon = Daemon::start_with(config);
    let one = txt_files(&["a.txt"]);

    assert_unauthorized(&upload(&daemon, &[WORKSPACE], &one));
    assert_unauthorized(&upload(&daemon, &[("x-api-key", "wrong"), WORKSPACE], &one));
    assert_unauthorized(&upload(&daemon, &[("x-api-key", ""), WORKSPACE], &one));
    let message = assert_nest(
        &upload(&daemon, &[("x-api-key", "dify-only-key"), WORKSPACE], &one),
        403,
        "Forbidden",
    );
    assert_eq!(message, "Forbidden resource");

    let message = assert_nest(&upload(&daemon, &[KEY], &one), 400, "Bad Request");
    assert!(message.contains("current-workspace-id"), "{message}");
    let message = assert_nest(
        &upload(&daemon, &[KEY, ("current-workspace-id", "")], &one),
        400,
        "Bad Request",
    );
    assert!(message.contains("current-workspace-id"), "{message}");
    // It is echoed in the path-shaped fileKey: no path of its own, no blanks.
    for bad in ["../../x", "a/b", "a\\b", "..", "ws 42"] {
        let message = assert_nest(
            &upload(&daemon, &[KEY, ("current-workspace-id", bad)], &one),
            400,
            "Bad Request",
        );
        assert!(message.contains("current-workspace-id"), "{bad}: {message}");
    }
    let message = assert_nest(
        &upload(
            &daemon,
            &[KEY, WORKSPACE, ("current-workspace-id", "ws-43")],
            &one,
        ),
        400,
        "Bad Request",
    );
    assert!(message.contains("given twice"), "{message}");
    // A form field twice, the form's Content-Type twice (equal copies even): which copy
    // counts would depend on who reads it.
    let two_threads = txt_files(&["a.txt"]).text("threadId", "6f1c2a4e-0000-4000-8000-000000000001");
    let message = assert_nest(
        &upload(&daemon, &[KEY, WORKSPACE], &two_threads),
        400,
        "Bad Request",
    );
    assert!(message.contains("threadId is given twice"), "{message}");
    let content_type = Form::content_type();
    let message = assert_nest(
        &upload(&daemon, &[KEY, WORKSPACE, ("Content-Type", &content_type)], &one),
        400,
        "Bad Request",
    );
    assert!(message.contains("Content-Type is given twice"), "{message}");

    let no_thread = Form::new().file("files", "a.txt", "text/plain", b"x");
    let message = assert_nest(
        &upload(&daemon, &[KEY, WORKSPACE], &no_thread),
        400,
        "Bad Request",
    );
    assert!(message.contains("threadId"), "{message}");
    for bad in [
        "not-a-uuid",
        "1a2036c0d5334636",
        "1a2036c0-d533-4636-8f51-2a811763ef5c0",
    ] {
        let form = Form::new()
            .text("threadId", bad)
            .file("files", "a.txt", "text/plain", b"x");
        let message = assert_nest(&upload(&daemon, &[KEY, WORKSPACE], &form), 400, "Bad Request");
        assert_eq!(message, "threadId must be a UUID");
    }
    let message = assert_nest(
        &upload(&daemon, &[KEY, WORKSPACE], &Form::new().text("threadId", THREAD)),
        400,
        "Bad Request",
    );
    assert!(message.contains("files"), "{message}");
    let bad_name = Form::new()
        .text("threadId", THREAD)
        .file("files", "../a.txt", "text/plain", b"x");
    assert_nest(&upload(&daemon, &[KEY, WORKSPACE], &bad_name), 400, "Bad Request");

    // Policy, on the strict tenant (1000 bytes, the excerpt's types).
    let strict = ("x-api-key", "strict-key");
    let message = assert_nest(
        &upload(
            &daemon,
            &[strict, WORKSPACE],
            &Form::new()
                .text("threadId", THREAD)
                .file("files", "a.txt", "text/plain", &[b'a'; 1001]),
        ),
        413,
        "Payload Too Large",
    );
    assert_eq!(message, "File too large");
    let message = assert_nest(
        &upload(&daemon, &[strict, WORKSPACE], &txt_files(&["a.exe"])),
        415,
        "Unsupported Media Type",
    );
    assert!(message.contains(".exe"), "{message}");

    // Rate limit.
    let limited = ("x-api-key", "limited-key");
    let statuses: Vec<u16> = (0..3)
        .map(|_| upload(&daemon, &[limited, WORKSPACE], &one).status)
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 2, "{statuses:?}");
    let reply = upload(&daemon, &[limited, WORKSPACE], &one);
    let message = assert_nest(&reply, 429, "Too Many Requests");
    assert!(message.contains("Retry after"), "{message}");
    assert!(reply.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(count_uploads(&daemon), 2);
}

#[test]
fn eleven_files_are_an_unexpected_field_and_nothing_is_stored() {
    let daemon = Daemon::start_with(config);
    let names: Vec<String> = (0..11).map(|i| format!("f{i}.txt")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let message = assert_nest(
        &upload(&daemon, &[KEY, WORKSPACE], &txt_files(&names)),
        400,
        "Bad Request",
    );
    assert_eq!(message, "Unexpected field");
    nothing_kept(&daemon);
    // Ten are fine.
    let reply = upload(&daemon, &[KEY, WORKSPACE], &txt_files(&names[..10]));
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert_eq!(reply.json().as_array().unwrap().len(), 10);
}

#[test]
fn a_plans_max_files_per_request_is_below_beams_ten() {
    let daemon = Daemon::start_with(|dir| {
        config(dir).replace(
            "plans:\n",
            "plans:\n  pairs:\n    max_file_size: 1MiB\n    max_files_per_request: 2\n",
        ) + "  pairs:\n    plan: pairs\n    provider: disk\n    keys: [pairs-key]\n"
    });
    let pairs = ("x-api-key", "pairs-key");
    let message = assert_nest(
        &upload(
            &daemon,
            &[pairs, WORKSPACE],
            &txt_files(&["a.txt", "b.txt", "c.txt"]),
        ),
        400,
        "Bad Request",
    );
    assert_eq!(message, "Unexpected field");
    nothing_kept(&daemon);
    let reply = upload(&daemon, &[pairs, WORKSPACE], &txt_files(&["a.txt", "b.txt"]));
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert_eq!(reply.json().as_array().unwrap().len(), 2);
}

#[test]
fn one_file_failing_policy_refuses_the_whole_request() {
    let daemon = Daemon::start_with(config);
    let strict = ("x-api-key", "strict-key");
    // A disallowed type among allowed ones.
    let form = Form::new()
        .text("threadId", THREAD)
        .file("files", "a.png", "image/png", PNG)
        .file("files", "b.exe", "application/octet-stream", b"MZ")
        .file("files", "c.png", "image/png", PNG);
    assert_nest(
        &upload(&daemon, &[strict, WORKSPACE], &form),
        415,
        "Unsupported Media Type",
    );
    nothing_kept(&daemon);
    // Content that contradicts its name, last of three.
    let form = Form::new()
        .text("threadId", THREAD)
        .file("files", "a.png", "image/png", PNG)
        .file("files", "b.txt", "text/plain", b"fine")
        .file("files", "c.pdf", "application/pdf", ELF);
    assert_nest(
        &upload(&daemon, &[strict, WORKSPACE], &form),
        415,
        "Unsupported Media Type",
    );
    nothing_kept(&daemon);
    // A bad threadId after the files: the spooled files go too.
    let form = Form::new()
        .file("files", "a.png", "image/png", PNG)
        .text("threadId", "nope");
    assert_nest(&upload(&daemon, &[KEY, WORKSPACE], &form), 400, "Bad Request");
    nothing_kept(&daemon);
}

#[test]
fn a_file_refused_upstream_rolls_back_the_files_of_the_same_request_already_delivered() {
    use upgate_e2e::mock::{MockUpstream, Vendor};
    // Beam in, Kore XO out (a provider that can delete): the first file is delivered, the
    // second refused upstream. The client is told the request failed, so the first file's
    // upstream copy goes too.
    let mock = MockUpstream::start(Vendor::Korexo, "xo-key");
    let daemon = Daemon::start_with(|dir| with_korexo_upstream(&default_config(dir), &mock));
    mock.fail_after(1, 1, 400);
    let reply = upload(
        &daemon,
        &[KEY, WORKSPACE],
        &txt_files(&["first.txt", "second.txt"]),
    );
    assert_nest(&reply, 400, "Bad Request");
    let methods: Vec<(String, u16)> = mock
        .received()
        .iter()
        .map(|received| (received.method.clone(), received.status))
        .collect();
    assert_eq!(
        methods,
        vec![("POST".into(), 200), ("POST".into(), 400), ("DELETE".into(), 200)],
        "{methods:?}"
    );
    assert!(mock.stored().is_empty(), "{:?}", mock.stored());
    let states: Vec<(String, String)> = daemon
        .db()
        .prepare("SELECT filename, state FROM uploads ORDER BY filename")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        states,
        vec![
            ("first.txt".into(), "deleted".into()),
            ("second.txt".into(), "failed".into())
        ]
    );
}

/// With `workspace_id` configured, the client's `current-workspace-id` chooses only among the
/// workspaces the provider allows: another one is a 404 that never reaches Beam.
#[test]
fn a_client_reaches_only_the_workspaces_the_provider_allows() {
    use upgate_e2e::mock::{MockUpstream, Vendor};
    let mock = MockUpstream::start(Vendor::Beam, "beam-upstream-key");
    let daemon = Daemon::start_with(|dir| {
        default_config(dir)
            .replace(
                "providers:\n",
                &format!(
                    "providers:\n  up:\n    plugin: beam\n    settings:\n      base_url: {}\n      api_key: beam-upstream-key\n      workspace_id: ws-settings\n      allowed_workspace_ids: [ws-42]\n",
                    mock.base_url()
                ),
            )
            .replacen("    provider: disk\n", "    provider: up\n", 1)
    });
    let reply = upload(
        &daemon,
        &[KEY, ("current-workspace-id", "ws-other")],
        &txt_files(&["a.txt"]),
    );
    let message = assert_nest(&reply, 404, "Not Found");
    assert!(message.contains("ws-other"), "{message}");
    assert!(mock.received().is_empty(), "{:?}", mock.received());
    for workspace in ["ws-42", "ws-settings"] {
        let reply = upload(
            &daemon,
            &[KEY, ("current-workspace-id", workspace)],
            &txt_files(&["a.txt"]),
        );
        assert_eq!(reply.status, 201, "{workspace}: {}", reply.text);
    }
    let workspaces: Vec<Option<String>> = mock
        .received()
        .iter()
        .map(|r| r.header("current-workspace-id").map(str::to_owned))
        .collect();
    assert_eq!(
        workspaces,
        [Some("ws-42".to_owned()), Some("ws-settings".to_owned())]
    );
}

/// A multipart body by hand: a `threadId` and the file parts' `Content-Disposition`
/// parameters as given (for `filename*`, which `Form` does not write).
fn disposition_body(files: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let mut body =
        format!("--B\r\nContent-Disposition: form-data; name=\"threadId\"\r\n\r\n{THREAD}\r\n").into_bytes();
    for (parameters, content) in files {
        body.extend_from_slice(
            format!("--B\r\nContent-Disposition: form-data; name=\"files\"; {parameters}\r\nContent-Type: text/plain\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--B--\r\n");
    ("multipart/form-data; boundary=B".to_owned(), body)
}

/// RFC 5987 `filename*` in ISO-8859-1 is read (every recipient must); one that cannot be read
/// refuses the request instead of taking the part for a text field and dropping its file.
#[test]
fn an_extended_filename_is_read_or_refused_never_dropped() {
    let daemon = Daemon::start_with(config);
    let (content_type, body) = disposition_body(&[
        ("filename=\"a.txt\"", b"first"),
        ("filename*=ISO-8859-1''caf%E9.txt", b"second"),
        ("filename*=UTF-8''%E7%AC%AC%E4%B8%89.txt", b"third"),
    ]);
    let reply = send(
        "POST",
        &daemon.url(PATH),
        &[KEY, WORKSPACE],
        Some((&content_type, body)),
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    let names: Vec<String> = reply
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(names, ["a.txt", "café.txt", "第三.txt"], "{}", reply.text);

    for unreadable in ["filename*=Shift_JIS''x.txt", "filename*=UTF-8''caf%E9.txt"] {
        let (content_type, body) =
            disposition_body(&[("filename=\"a.txt\"", b"first"), (unreadable, b"second")]);
        let before = count_uploads(&daemon);
        let reply = send(
            "POST",
            &daemon.url(PATH),
            &[KEY, WORKSPACE],
            Some((&content_type, body)),
        );
        assert_eq!(reply.status, 400, "{unreadable}: {}", reply.text);
        assert!(reply.text.contains("filename*"), "{}", reply.text);
        assert_eq!(count_uploads(&daemon), before, "{unreadable}: a file was kept");
    }
}

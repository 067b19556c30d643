//! The korexo dialect end to end: uploads and deletes against the real daemon and the real
//! local plugin.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use upgate_e2e::harness::*;

const KEY: (&str, &str) = ("x-api-key", "demo-key");
const OTHER: (&str, &str) = ("x-api-key", "other-key");
const PDF: &[u8] = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n%%EOF\n";

fn config(dir: &Path) -> String {
    default_config(dir).replace(
        "plans:\n",
        "plans:\n  strict:\n    max_file_size: 1000\n    allowed_extensions: [pdf, png, txt]\n  limited:\n    max_file_size: 1MiB\n    rate_limit: { requests_per_second: 1, burst: 2 }\n",
    ) + "  other:\n    plan: default\n    provider: disk\n    keys: [other-key]\n"
        + "  strict:\n    plan: strict\n    provider: disk\n    keys: [strict-key]\n"
        + "  limited:\n    plan: limited\n    provider: disk\n    keys: [limited-key]\n"
        + "  difyonly:\n    plan: default\n    provider: disk\n    keys: [dify-only-key]\n    dialects: [dify]\n"
}

fn upload_url(daemon: &Daemon, app: &str, env: &str) -> String {
    daemon.url(&format!(
        "/api/v2/apps/{app}/environments/{env}/attachments/upload"
    ))
}

fn file_url(daemon: &Daemon, app: &str, env: &str, id: &str) -> String {
    daemon.url(&format!("/api/v2/apps/{app}/environments/{env}/attachments/{id}"))
}

fn form(name: &str, mime: &str, bytes: &[u8]) -> Form {
    Form::new()
        .file("file", name, mime, bytes)
        .text("userReference", "session-ref-1")
        .text("uploadType", "runtime")
}

fn upload(daemon: &Daemon, headers: &[(&str, &str)], form: &Form) -> Reply {
    post_form(&upload_url(daemon, "app-1", "draft"), headers, form)
}

fn delete(daemon: &Daemon, headers: &[(&str, &str)], app: &str, env: &str, id: &str) -> Reply {
    let body = json!({"sessionId": "s-1"}).to_string().into_bytes();
    send(
        "DELETE",
        &file_url(daemon, app, env, id),
        headers,
        Some(("application/json", body)),
    )
}

fn assert_error(reply: &Reply, status: u16) -> String {
    assert_eq!(reply.status, status, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    let errors = body["errors"].as_array().unwrap_or_else(|| panic!("{body}"));
    assert_eq!(errors.len(), 1, "{body}");
    assert_eq!(errors[0]["code"], status, "{body}");
    errors[0]["msg"].as_str().unwrap().to_owned()
}

fn state_of(daemon: &Daemon, id: &str) -> String {
    daemon
        .db()
        .query_row("SELECT state FROM uploads WHERE id = ?1", [id], |row| row.get(0))
        .unwrap()
}

fn count_uploads(daemon: &Daemon) -> i64 {
    daemon
        .db()
        .query_row("SELECT COUNT(*) FROM uploads", [], |row| row.get(0))
        .unwrap()
}

/// Checks every field of an upload answer; returns the file id.
fn assert_file(daemon: &Daemon, reply: &Reply, name: &str, mime: &str, content: &[u8]) -> String {
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body.as_object().unwrap().len(), 7, "{body}");
    let id = body["fileId"].as_str().unwrap().to_owned();
    let uuid = id.strip_prefix("f-").unwrap_or_else(|| panic!("{id}"));
    assert!(uuid::Uuid::parse_str(uuid).is_ok(), "{id}");
    let extension = name.rsplit_once('.').map_or("", |(_, e)| e);
    assert_eq!(body["fileName"], name);
    assert_eq!(
        body["filePath"],
        format!("AppFileSystem/{id}.{extension}").as_str()
    );
    assert_eq!(body["fileSize"], content.len());
    assert_eq!(body["mimeType"], mime);
    assert_eq!(body["extension"], extension);
    let uploaded = body["uploadedAt"].as_str().unwrap();
    assert_eq!(uploaded.len(), 24, "{uploaded}");
    assert!(
        uploaded.ends_with('Z') && uploaded.as_bytes()[19] == b'.',
        "{uploaded}"
    );
    let at = humantime::parse_rfc3339(uploaded).unwrap();
    let age = SystemTime::now()
        .duration_since(at)
        .unwrap_or_else(|e| e.duration());
    assert!(age < Duration::from_secs(60), "{uploaded}");
    assert_eq!(sha256_file(&daemon.files_dir().join(&id)), sha256_hex(content));
    id
}

#[test]
fn upload_answers_every_field_and_records_app_env_and_user_reference() {
    let daemon = Daemon::start_with(config);
    let reply = upload(&daemon, &[KEY], &form("myfile.pdf", "application/pdf", PDF));
    let id = assert_file(&daemon, &reply, "myfile.pdf", "application/pdf", PDF);
    let (dialect, tenant, state, metadata): (String, String, String, String) = daemon
        .db()
        .query_row(
            "SELECT dialect, tenant, state, metadata FROM uploads WHERE id = ?1",
            [&id],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        (dialect.as_str(), tenant.as_str(), state.as_str()),
        ("korexo", "demo", "forwarded")
    );
    let metadata: Value = serde_json::from_str(&metadata).unwrap();
    assert_eq!(metadata["appId"], "app-1");
    assert_eq!(metadata["envName"], "draft");
    assert_eq!(metadata["userReference"], "session-ref-1");
    // A non-ASCII name and the widest valid path segments.
    let name = "報告 – résumé.txt";
    let app = format!("A.b_c-{}", "x".repeat(122));
    let reply = post_form(
        &upload_url(&daemon, &app, "env.1_x-y"),
        &[KEY],
        &form(name, "text/plain", "內容".as_bytes()),
    );
    assert_file(&daemon, &reply, name, "text/plain", "內容".as_bytes());
}

/// The excerpt's curl example, apart from host and key (with its broken quote closed). curl
/// expands `{appId}` and `{envName}` as URL globs to `appId` and `envName`, names the file
/// part `file.pdf` with type application/pdf, and sends `userReference` with the stray
/// quotes as part of the value.
#[test]
fn the_excerpts_curl_example_succeeds() {
    let daemon = Daemon::start_with(config);
    let curl_form = Form::new()
        .file("file", "file.pdf", "application/pdf", PDF)
        .text("userReference", "\"your-session-reference\u{201d}")
        .text("uploadType", "runtime");
    let reply = post_form(
        &upload_url(&daemon, "appId", "envName"),
        &[("x-api-key", "demo-key")],
        &curl_form,
    );
    let id = assert_file(&daemon, &reply, "file.pdf", "application/pdf", PDF);
    let reply = send(
        "DELETE",
        &file_url(&daemon, "appId", "envName", &id),
        &[("x-api-key", "demo-key")],
        Some((
            "application/json",
            br#"{"sessionId": "string", "sessionReference": "string"}"#.to_vec(),
        )),
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    // The excerpt's parameter table names the part `File`.
    let table_form = Form::new()
        .file("File", "table.pdf", "application/pdf", PDF)
        .text("userReference", "u")
        .text("uploadType", "runtime");
    let reply = post_form(
        &upload_url(&daemon, "appId", "envName"),
        &[("x-api-key", "demo-key")],
        &table_form,
    );
    assert_file(&daemon, &reply, "table.pdf", "application/pdf", PDF);
}

#[test]
fn every_error_row() {
    let daemon = Daemon::start_with(config);
    let strict = ("x-api-key", "strict-key");
    let pdf = |name: &str| form(name, "application/pdf", PDF);

    let without = |field: &str| {
        let mut form = Form::new().file("file", "a.pdf", "application/pdf", PDF);
        for (name, value) in [("userReference", "r"), ("uploadType", "runtime")] {
            if name != field {
                form = form.text(name, value);
            }
        }
        form
    };
    for field in ["userReference", "uploadType"] {
        let message = assert_error(&upload(&daemon, &[KEY], &without(field)), 400);
        assert!(message.contains(field), "{message}");
    }
    let design = Form::new()
        .file("file", "a.pdf", "application/pdf", PDF)
        .text("userReference", "r")
        .text("uploadType", "design");
    let message = assert_error(&upload(&daemon, &[KEY], &design), 400);
    assert!(message.contains("runtime"), "{message}");
    let no_file = Form::new()
        .text("userReference", "r")
        .text("uploadType", "runtime");
    assert_error(&upload(&daemon, &[KEY], &no_file), 400);
    let two = pdf("a.pdf").file("file", "b.pdf", "application/pdf", PDF);
    assert_error(&upload(&daemon, &[KEY], &two), 400);
    assert_error(&upload(&daemon, &[KEY], &pdf("a\\\\b.pdf")), 400);

    // Path segments.
    let long = "x".repeat(129);
    for (app, env) in [
        ("bad%20app", "draft"),
        ("app-1", "%2E%2E"),
        ("app-1", "a%2Fb"),
        ("a$b", "draft"),
        (long.as_str(), "draft"),
    ] {
        let message = assert_error(
            &post_form(&upload_url(&daemon, app, env), &[KEY], &pdf("a.pdf")),
            400,
        );
        assert!(
            message.contains("appId") || message.contains("envName"),
            "{message}"
        );
    }

    // Policy on the strict tenant.
    let message = assert_error(
        &upload(
            &daemon,
            &[strict],
            &form("a.exe", "application/octet-stream", b"MZ"),
        ),
        415,
    );
    assert!(message.contains(".exe"), "{message}");
    assert_error(
        &upload(&daemon, &[strict], &form("a.pdf", "application/pdf", ELF)),
        415,
    );
    let message = assert_error(
        &upload(&daemon, &[strict], &form("a.txt", "text/plain", &[b'a'; 1001])),
        413,
    );
    assert!(message.contains("1000 bytes"), "{message}");

    // Auth.
    assert_error(&upload(&daemon, &[], &pdf("a.pdf")), 401);
    assert_error(&upload(&daemon, &[("x-api-key", "wrong")], &pdf("a.pdf")), 401);
    assert_error(
        &upload(&daemon, &[("x-api-key", "dify-only-key")], &pdf("a.pdf")),
        403,
    );
    let unknown = "f-0f8c1f4e-3f43-4a55-9b9c-6b2f1d0e8a11";
    assert_error(&delete(&daemon, &[], "app-1", "draft", unknown), 401);
    assert_error(
        &delete(&daemon, &[("x-api-key", "wrong")], "app-1", "draft", unknown),
        401,
    );

    // Rate limit.
    let limited = ("x-api-key", "limited-key");
    let statuses: Vec<u16> = (0..3)
        .map(|_| upload(&daemon, &[limited], &pdf("a.pdf")).status)
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2, "{statuses:?}");
    let reply = upload(&daemon, &[limited], &pdf("a.pdf"));
    let message = assert_error(&reply, 429);
    assert!(message.contains("Retry after"), "{message}");
    assert!(reply.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);

    assert_eq!(count_uploads(&daemon), 2);
    assert_eq!(daemon.spool_files(), 0);
}

#[test]
fn delete_removes_the_stored_file_and_marks_the_record() {
    let daemon = Daemon::start_with(config);
    let reply = upload(&daemon, &[KEY], &form("a.pdf", "application/pdf", PDF));
    let id = assert_file(&daemon, &reply, "a.pdf", "application/pdf", PDF);
    let stored = daemon.files_dir().join(&id);
    assert!(stored.is_file());
    // Not under another app or environment.
    assert_error(&delete(&daemon, &[KEY], "app-2", "draft", &id), 404);
    assert_error(&delete(&daemon, &[KEY], "app-1", "live", &id), 404);
    assert!(stored.is_file());

    let reply = delete(&daemon, &[KEY], "app-1", "draft", &id);
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.json(),
        json!({"message": "file deleted successfully", "success": "true", "fileId": id})
    );
    assert!(!stored.exists());
    assert_eq!(state_of(&daemon, &id), "deleted");
    let message = assert_error(&delete(&daemon, &[KEY], "app-1", "draft", &id), 404);
    assert!(message.contains("not found"), "{message}");
    // Without a body too.
    let reply = upload(&daemon, &[KEY], &form("b.pdf", "application/pdf", PDF));
    let second = assert_file(&daemon, &reply, "b.pdf", "application/pdf", PDF);
    let reply = send(
        "DELETE",
        &file_url(&daemon, "app-1", "draft", &second),
        &[KEY],
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(!daemon.files_dir().join(&second).exists());
}

#[test]
fn unknown_malformed_and_other_tenants_ids_are_404_and_nothing_is_deleted() {
    let daemon = Daemon::start_with(config);
    let reply = upload(&daemon, &[KEY], &form("a.pdf", "application/pdf", PDF));
    let id = assert_file(&daemon, &reply, "a.pdf", "application/pdf", PDF);
    let stored = daemon.files_dir().join(&id);

    assert_error(&delete(&daemon, &[OTHER], "app-1", "draft", &id), 404);
    assert_error(
        &delete(&daemon, &[("x-api-key", "dify-only-key")], "app-1", "draft", &id),
        403,
    );
    for bad in [
        "f-0f8c1f4e-3f43-4a55-9b9c-6b2f1d0e8a11",
        id.trim_start_matches("f-"),
        &id.to_uppercase(),
        "f-..",
        "upload",
    ] {
        assert_error(&delete(&daemon, &[KEY], "app-1", "draft", bad), 404);
    }
    // The optional body: one that is not the documented JSON is refused, and deletes nothing.
    let delete_with = |body: &str| {
        send(
            "DELETE",
            &file_url(&daemon, "app-1", "draft", &id),
            &[KEY],
            Some(("application/json", body.as_bytes().to_vec())),
        )
    };
    for bad in ["{bad", "[]", r#"{"sessionReference": 5}"#, r#"{"sessionId": {}}"#] {
        assert_error(&delete_with(bad), 400);
    }
    assert!(stored.is_file());
    assert_eq!(state_of(&daemon, &id), "forwarded");
    // The owner still can.
    assert_eq!(
        delete_with(r#"{"sessionReference": "session-ref-1"}"#).status,
        200
    );
    assert!(!stored.exists());
}

#[test]
fn deletes_reach_the_kore_xo_upstream_from_the_client_and_from_the_operator() {
    use upgate_e2e::mock::{MockUpstream, Vendor};
    let mock = MockUpstream::start(Vendor::Korexo, "xo-upstream-key");
    let daemon = Daemon::start_with(|dir| with_korexo_upstream(&config(dir), &mock));
    let first = upload(&daemon, &[KEY], &form("a.pdf", "application/pdf", PDF));
    assert_eq!(first.status, 200, "{}", first.text);
    let second = upload(&daemon, &[KEY], &form("b.pdf", "application/pdf", PDF));
    let (first, second) = (
        first.json()["fileId"].as_str().unwrap().to_owned(),
        second.json()["fileId"].as_str().unwrap().to_owned(),
    );
    assert_eq!(mock.stored().len(), 2);

    // The client deletes through the dialect: the upstream copy goes, in the client's own
    // app and environment. A 2xx is a delete done, whatever its body says (here: not JSON).
    mock.replace_next_answer(200, b"OK");
    let reply = delete(&daemon, &[KEY], "app-1", "draft", &first);
    assert_eq!(reply.status, 200, "{}", reply.text);
    let deletes: Vec<String> = mock
        .received()
        .iter()
        .filter(|received| received.method == "DELETE")
        .map(|received| received.path.clone())
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert!(
        deletes[0].starts_with("/api/v2/apps/app-1/environments/draft/attachments/"),
        "{deletes:?}"
    );
    assert_eq!(state_of(&daemon, &first), "deleted");

    // The operator deletes the other one from the command line, daemon running.
    let config_path = daemon.config_path.display().to_string();
    let (code, stdout, stderr) = run_cli(&["uploads", "delete", &second, "--config", &config_path]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&second) && stdout.contains("provider xo"),
        "{stdout}"
    );
    assert!(mock.stored().is_empty(), "{:?}", mock.stored());
    assert_eq!(state_of(&daemon, &second), "deleted");
    // Again: nothing left to delete. A malformed id never reaches the store.
    let (code, _, stderr) = run_cli(&["uploads", "delete", &second, "--config", &config_path]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no upload"), "{stderr}");
    let (code, _, stderr) = run_cli(&["uploads", "delete", "../../etc/passwd", "--config", &config_path]);
    // A usage error, like the argument parser's own.
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not an upload id"), "{stderr}");
}

/// The operator's upstream key writes wherever the client's path says only within the apps and
/// environments the provider allows: another one is a 404 that never reaches the upstream.
#[test]
fn a_client_reaches_only_the_apps_and_environments_the_provider_allows() {
    use upgate_e2e::mock::{MockUpstream, Vendor};
    let mock = MockUpstream::start(Vendor::Korexo, "xo-upstream-key");
    let daemon = Daemon::start_with(|dir| with_korexo_upstream(&config(dir), &mock));
    let pdf = form("a.pdf", "application/pdf", PDF);
    for (app, env) in [
        ("app-2", "draft"),
        ("app-1", "live-2"),
        ("app-settings", "draft-x"),
    ] {
        let reply = post_form(&upload_url(&daemon, app, env), &[KEY], &pdf);
        let message = assert_error(&reply, 404);
        assert!(message.contains("not served"), "{app}/{env}: {message}");
    }
    assert!(mock.received().is_empty(), "{:?}", mock.received());
    // The configured scope and the listed one (harness: app-1 / draft) are reached.
    for (app, env) in [("app-settings", "live"), ("app-1", "draft"), ("app-1", "live")] {
        let reply = post_form(&upload_url(&daemon, app, env), &[KEY], &pdf);
        assert_eq!(reply.status, 200, "{app}/{env}: {}", reply.text);
    }
    let paths: Vec<String> = mock.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/api/v2/apps/app-settings/environments/live/attachments/upload",
            "/api/v2/apps/app-1/environments/draft/attachments/upload",
            "/api/v2/apps/app-1/environments/live/attachments/upload",
        ]
    );
}

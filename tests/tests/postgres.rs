//! Cluster mode's first slice end to end: the real daemon on a real PostgreSQL
//! (`server.store.url`), one node and two; check-config; concurrent migrations; PostgreSQL
//! stopped and started under a running daemon.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use upgate_e2e::harness::*;
use upgate_e2e::inbound::b64;
use upgate_e2e::postgres::PostgresServer;

const KORE: (&str, &str) = ("x-api-key", "demo-key");
const TUS: (&str, &str) = ("Tus-Resumable", "1.0.0");
/// Never accepted by the test server (trust authentication), so it can be looked for in
/// everything the daemon and the CLI print.
const PASSWORD: &str = "pg-s3cret-never-shown";

/// [`default_config`] with `server.store.url` at `url`, a plan of two uploads a day and its
/// tenant `daily`.
fn config_on(dir: &Path, url: &str) -> String {
    default_config(dir)
        .replacen("server:\n", &format!("server:\n  store:\n    url: {url}\n"), 1)
        .replace(
            "plans:\n",
            "plans:\n  daily:\n    max_file_size: 1MiB\n    daily_uploads: 2\n",
        )
        + "  daily:\n    plan: daily\n    provider: disk\n    keys: [daily-key]\n"
}

/// The URL of `database`, with the password the server never asks for.
fn url_with_password(server: &PostgresServer, database: &str) -> String {
    format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{database}",
        server.port()
    )
}

/// A daemon on `database`, storing its files in `files` (its own dir when `None`).
fn node(server: &PostgresServer, database: &str, files: Option<&Path>) -> Daemon {
    let url = url_with_password(server, database);
    Daemon::start_with(|dir| {
        let config = config_on(dir, &url);
        match files {
            Some(files) => config.replace(
                &format!("root: {}", dir.join("files").display()),
                &format!("root: {}", files.display()),
            ),
            None => config,
        }
    })
}

fn dify_upload(daemon: &Daemon, key: &str, name: &str, content: &[u8]) -> Reply {
    let form = Form::new()
        .text("user", "u-1")
        .file("file", name, "text/plain", content);
    post_form(
        &daemon.url("/v1/files/upload"),
        &[("Authorization", &format!("Bearer {key}"))],
        &form,
    )
}

fn korexo_upload(daemon: &Daemon, name: &str, content: &[u8]) -> Reply {
    let form = Form::new()
        .file("file", name, "text/plain", content)
        .text("userReference", "ref")
        .text("uploadType", "runtime");
    post_form(
        &daemon.url("/api/v2/apps/app-1/environments/draft/attachments/upload"),
        &[KORE],
        &form,
    )
}

fn korexo_delete(daemon: &Daemon, id: &str) -> Reply {
    send(
        "DELETE",
        &daemon.url(&format!("/api/v2/apps/app-1/environments/draft/attachments/{id}")),
        &[KORE],
        Some((
            "application/json",
            json!({"sessionId": "s-1"}).to_string().into_bytes(),
        )),
    )
}

/// The first file id of a Kore XO upload answer.
fn korexo_id(reply: &Reply) -> String {
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    let id = body["fileId"]
        .as_str()
        .unwrap_or_else(|| panic!("no fileId in {body}"));
    id.to_owned()
}

fn no_password_in(what: &str, text: &str) {
    assert!(!text.contains(PASSWORD), "{what} shows the password:\n{text}");
}

#[test]
fn one_node_on_postgresql_serves_dify_kore_and_tus_and_records_them_there() {
    let server = PostgresServer::start();
    server.create_database("one");
    let daemon = node(&server, "one", None);
    assert!(
        !daemon.data_dir().join("upgate.db").exists(),
        "no SQLite database when server.store is set"
    );

    // Dify: one multipart upload.
    let content = b"hello, postgres\n".repeat(4);
    let reply = dify_upload(&daemon, "demo-key", "notes.txt", &content);
    assert_eq!(reply.status, 201, "{}", reply.text);
    let dify_id = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        sha256_file(&daemon.files_dir().join(&dify_id)),
        sha256_hex(&content)
    );
    assert_eq!(
        server.psql(
            "one",
            &format!("SELECT state, size, sha256, dialect, tenant FROM uploads WHERE id = '{dify_id}'")
        ),
        format!("forwarded|{}|{}|dify|demo", content.len(), sha256_hex(&content))
    );

    // Kore: a chunked session of two chunks, in PostgreSQL while it is open.
    let whole: Vec<u8> = (0..150_000u32)
        .map(|i| b"abcdefghij\n"[(i % 11) as usize])
        .collect();
    let start = post_json(
        &daemon.url("/api/public/files/session/start"),
        &[KORE],
        &json!({"fileContext": "bulkImport", "totalChunks": 2, "fileExtension": "txt",
            "fileName": "chunked.txt", "fileSize": whole.len()}),
    );
    assert_eq!(start.status, 200, "{}", start.text);
    let session = start.json()["sessionId"].as_str().unwrap().to_owned();
    for (number, part) in whole.chunks(100_000).enumerate() {
        let form = Form::new().text("chunkNumber", &number.to_string()).file(
            "file",
            "blob",
            "application/octet-stream",
            part,
        );
        let reply = post_form(
            &daemon.url(&format!("/api/public/files/session/{session}")),
            &[KORE],
            &form,
        );
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    assert_eq!(
        server.psql(
            "one",
            &format!(
                "SELECT s.tenant, s.dialect, s.declared_size, s.total_chunks, s.length_deferred, \
                 string_agg(c.chunk_number || ':' || c.size, ',' ORDER BY c.chunk_number) \
                 FROM sessions s JOIN session_chunks c ON c.session_id = s.id WHERE s.id = '{session}' \
                 GROUP BY s.id"
            )
        ),
        format!(
            "demo|kore|{}|2|f|0:100000,1:{}",
            whole.len(),
            whole.len() - 100_000
        )
    );
    let reply = send(
        "POST",
        &daemon.url(&format!("/api/public/files/session/{session}/complete")),
        &[KORE],
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    let kore_id = reply.json()["fileId"].as_str().unwrap().to_owned();
    assert_eq!(
        sha256_file(&daemon.files_dir().join(&kore_id)),
        sha256_hex(&whole)
    );
    assert_eq!(
        server.psql(
            "one",
            &format!("SELECT state, dialect, filename, mime FROM uploads WHERE id = '{kore_id}'")
        ),
        "forwarded|kore|chunked.txt|text/plain"
    );
    assert_eq!(server.psql("one", "SELECT COUNT(*) FROM session_chunks"), "0");

    // tus: creation, then two PATCHes.
    let bearer = ("Authorization", "Bearer demo-key");
    let meta = format!("filename {}", b64(b"hello.txt"));
    let created = send(
        "POST",
        &daemon.url("/files/"),
        &[TUS, bearer, ("Upload-Length", "11"), ("Upload-Metadata", &meta)],
        None,
    );
    assert_eq!(created.status, 201, "{created:?}");
    let location = created.header("location").unwrap().to_owned();
    let tus_id = location.strip_prefix("/files/").unwrap().to_owned();
    let patch = |offset: &str, bytes: &[u8]| {
        send(
            "PATCH",
            &daemon.url(&location),
            &[TUS, bearer, ("Upload-Offset", offset)],
            Some(("application/offset+octet-stream", bytes.to_vec())),
        )
    };
    let first = patch("0", b"hello ");
    assert_eq!(first.status, 204, "{first:?}");
    assert_eq!(
        server.psql(
            "one",
            &format!(
                "SELECT s.dialect, s.declared_size, c.size FROM sessions s \
                 JOIN session_chunks c ON c.session_id = s.id WHERE s.id = '{tus_id}'"
            )
        ),
        "tus|11|6",
        "the durable offset is in PostgreSQL"
    );
    let last = patch("6", b"world");
    assert_eq!(last.status, 204, "{last:?}");
    let upload_id = last.header("upgate-upload-id").unwrap().to_owned();
    assert_eq!(
        std::fs::read(daemon.files_dir().join(&upload_id)).unwrap(),
        b"hello world"
    );
    assert_eq!(
        server.psql(
            "one",
            &format!("SELECT state, dialect, filename, size FROM uploads WHERE id = '{upload_id}'")
        ),
        "forwarded|tus|hello.txt|11"
    );
    assert_eq!(
        server.psql(
            "one",
            &format!("SELECT upload_id FROM sessions WHERE id = '{tus_id}'")
        ),
        upload_id,
        "the tus upload knows its record"
    );
    assert_eq!(
        server.psql(
            "one",
            "SELECT string_agg(dialect, ',' ORDER BY dialect) FROM uploads"
        ),
        "dify,kore,tus"
    );

    // The operator commands read the same store.
    let config = daemon.config_path.to_str().unwrap();
    let (code, listed, stderr) = run_cli(&["uploads", "list", "--json", "--config", config]);
    assert_eq!(code, 0, "{stderr}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");
    no_password_in("the daemon's log", &daemon.log());
}

#[test]
fn check_config_connects_reports_a_located_failure_and_never_shows_the_password() {
    let server = PostgresServer::start();
    server.create_database("check");
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let shown = format!("postgres://postgres:***@127.0.0.1:{}/check", server.port());

    let good = write(
        "good.yaml",
        config_on(dir.path(), &url_with_password(&server, "check")),
    );
    let (code, stdout, stderr) = run_cli(&["check-config", "--config", &good]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("store {shown}: reachable, not yet migrated")),
        "{stdout}"
    );
    no_password_in("check-config", &(stdout + &stderr));

    // Through ${VAR}, and a port where nothing listens: exit 2, located at the url.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let text = config_on(dir.path(), "postgres://postgres:${PG_PASSWORD}@127.0.0.1:9/check")
        .replace(":9/", &format!(":{closed_port}/"));
    let line = text
        .lines()
        .position(|line| line.trim_start().starts_with("url:"))
        .unwrap()
        + 1;
    let down = write("down.yaml", text);
    let output = std::process::Command::new(upgate_binary())
        .args(["check-config", "--config", &down])
        .env("PG_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("down.yaml:{line}:"))
            && stderr.contains("cannot use the PostgreSQL store at"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("postgres://postgres:***@127.0.0.1:{closed_port}/check")),
        "{stderr}"
    );
    no_password_in("check-config", &stderr);
    // Offline (systemd's reload check): the config and plugins only, so a reload goes
    // through while the store is down.
    let offline = std::process::Command::new(upgate_binary())
        .args(["check-config", "--offline", "--config", &down])
        .env("PG_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&offline.stdout).into_owned();
    assert_eq!(offline.status.code(), Some(0), "{stdout}");
    assert!(
        !stdout.contains("store postgres"),
        "no engine was tried: {stdout}"
    );

    // A scheme that is not PostgreSQL, and an unknown key: refused when the file is read.
    let mysql = write(
        "mysql.yaml",
        config_on(dir.path(), &format!("mysql://root:{PASSWORD}@127.0.0.1/db")),
    );
    let (code, stdout, stderr) = run_cli(&["check-config", "--config", &mysql]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("mysql.yaml:3:") && stderr.contains("unsupported scheme `mysql`"),
        "{stderr}"
    );
    no_password_in("check-config", &stderr);
    let unknown = write(
        "unknown.yaml",
        config_on(dir.path(), &url_with_password(&server, "check")).replacen(
            "  store:\n",
            "  store:\n    pool: 4\n",
            1,
        ),
    );
    let (code, _, stderr) = run_cli(&["check-config", "--config", &unknown]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unknown field `pool`"), "{stderr}");

    // The daemon refuses to start on a database it cannot reach, with the redacted URL.
    let output = std::process::Command::new(upgate_binary())
        .args(["serve", "--config", &down])
        .env("PG_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("postgres://postgres:***@"), "{stderr}");
    no_password_in("serve", &stderr);
}

#[test]
fn two_nodes_share_records_deletes_and_quotas() {
    let server = PostgresServer::start();
    server.create_database("two");
    let shared = tempfile::tempdir().unwrap();
    let a = node(&server, "two", Some(shared.path()));
    let b = node(&server, "two", Some(shared.path()));

    // An upload received by A is deleted through B (Kore XO DELETE): the record is shared,
    // and so is the provider's root.
    let id = korexo_id(&korexo_upload(&a, "a.txt", b"from node a"));
    assert!(shared.path().join(&id).is_file());
    let deleted = korexo_delete(&b, &id);
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert!(!shared.path().join(&id).exists(), "the provider's copy is gone");
    assert_eq!(
        server.psql("two", &format!("SELECT state FROM uploads WHERE id = '{id}'")),
        "deleted"
    );
    // Deleted once: A now says it is gone too.
    assert_eq!(korexo_delete(&a, &id).status, 404);

    // Two uploads a day for `daily`, counted across the nodes: two on A, the third on B is 429.
    for n in 0..2 {
        let reply = dify_upload(&a, "daily-key", &format!("q{n}.txt"), b"quota");
        assert_eq!(reply.status, 201, "{}", reply.text);
    }
    let third = dify_upload(&b, "daily-key", "q2.txt", b"quota");
    assert_eq!(third.status, 429, "{}", third.text);
    assert!(third.header("retry-after").is_some(), "{third:?}");
    assert_eq!(third.json()["code"], "too_many_requests");
    assert_eq!(
        server.psql("two", "SELECT uploads FROM usage WHERE tenant = 'daily'"),
        "2"
    );
    // The uploads both nodes recorded are in one table.
    assert_eq!(
        server.psql("two", "SELECT COUNT(*) FROM uploads WHERE tenant = 'daily'"),
        "2"
    );
    // The operator's delete works on any node's config too.
    let other = korexo_id(&korexo_upload(&b, "b.txt", b"from node b"));
    let (code, stdout, stderr) = run_cli(&[
        "uploads",
        "delete",
        &other,
        "--config",
        a.config_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!shared.path().join(&other).exists());
}

#[test]
fn nodes_starting_at_once_on_an_empty_database_migrate_it_once() {
    let server = PostgresServer::start();
    server.create_database("fresh");
    let server = &server;
    let nodes: Vec<Daemon> = std::thread::scope(|scope| {
        let starting: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| node(server, "fresh", None)))
            .collect();
        starting.into_iter().map(|node| node.join().unwrap()).collect()
    });
    for daemon in &nodes {
        let ready = get(&format!("{}/readyz", daemon.metrics_url));
        assert_eq!(ready.status, 200, "{}", ready.text);
    }
    let versions = server.psql(
        "fresh",
        "SELECT COUNT(*), COUNT(DISTINCT version), MIN(version), MAX(version) FROM schema_version",
    );
    let fields: Vec<u32> = versions.split('|').map(|f| f.parse().unwrap()).collect();
    assert_eq!(fields[0], fields[1], "each version once: {versions}");
    assert_eq!(
        (fields[2], fields[0]),
        (1, fields[3]),
        "every version up to the latest: {versions}"
    );
    let migrated = nodes
        .iter()
        .filter(|daemon| daemon.log().contains("PostgreSQL schema migrated"))
        .count();
    assert_eq!(migrated, 1, "one node migrated, the others waited");
}

#[test]
fn postgresql_stopped_is_503_with_retry_after_and_the_node_recovers_by_itself() {
    let mut server = PostgresServer::start();
    server.create_database("outage");
    let daemon = node(&server, "outage", None);
    let ready = format!("{}/readyz", daemon.metrics_url);
    assert_eq!(
        dify_upload(&daemon, "demo-key", "before.txt", b"before").status,
        201
    );
    assert_eq!(get(&ready).status, 200);

    let files = || std::fs::read_dir(daemon.files_dir()).unwrap().count();
    assert_eq!(files(), 1);
    server.stop();
    for key in ["demo-key", "daily-key"] {
        let started = Instant::now();
        let reply = dify_upload(&daemon, key, "during.txt", b"during");
        let took = started.elapsed();
        assert_eq!(reply.status, 503, "{key}: {}", reply.text);
        assert!(took < Duration::from_secs(10), "{key}: answered after {took:?}");
        eprintln!("PostgreSQL stopped, {key}: 503 after {took:?}");
        let retry_after: u64 = reply
            .header("retry-after")
            .unwrap_or_else(|| panic!("no Retry-After: {reply:?}"))
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        assert_eq!(reply.json()["code"], "service_unavailable", "{}", reply.text);
    }
    // The sync delivery made before the record failed was rolled back: nothing unrecorded
    // stays with the provider.
    assert_eq!(files(), 1);
    // The other dialects' shapes: Kore's errors list.
    let started = Instant::now();
    let kore = post_json(
        &daemon.url("/api/public/files/session/start"),
        &[KORE],
        &json!({"fileContext": "bulkImport", "totalChunks": 1, "fileExtension": "png",
            "fileName": "p.png", "fileSize": 10}),
    );
    assert_eq!(kore.status, 503, "{}", kore.text);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(kore.json()["errors"][0]["code"], 503);
    assert!(kore.header("retry-after").is_some());
    let started = Instant::now();
    let not_ready = get(&ready);
    assert_eq!(not_ready.status, 503, "{}", not_ready.text);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(not_ready.text.contains("store"), "{}", not_ready.text);

    server.start_again();
    // A hung server (connections open, nothing answers): 503 within the bound too.
    assert_eq!(dify_upload(&daemon, "daily-key", "warm.txt", b"w").status, 201);
    server.freeze();
    let started = Instant::now();
    let hung = dify_upload(&daemon, "daily-key", "hung.txt", b"hung");
    let took = started.elapsed();
    server.thaw();
    assert_eq!(hung.status, 503, "{}", hung.text);
    assert!(hung.header("retry-after").is_some(), "{hung:?}");
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
    eprintln!("PostgreSQL hung: 503 after {took:?}");

    let after = dify_upload(&daemon, "demo-key", "after.txt", b"after");
    assert_eq!(
        after.status, 201,
        "the first upload after the restart: {}",
        after.text
    );
    let id = after.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        server.psql("outage", &format!("SELECT state FROM uploads WHERE id = '{id}'")),
        "forwarded"
    );
    assert!(eventually(Duration::from_secs(10), || get(&ready).status == 200));
    no_password_in("the daemon's log", &daemon.log());
}

/// `sslmode=verify-full`: TLS to PostgreSQL, the server's certificate verified against the
/// Mozilla roots and `sslrootcert`. The server here takes TCP over TLS only, with a
/// certificate for 127.0.0.1 from a private CA: plaintext is refused by the server, TLS
/// without that CA by upgate, and with it the node serves and records there.
#[test]
fn tls_to_postgresql_verifies_the_server_and_the_node_records_over_it() {
    let server = PostgresServer::start_with_tls();
    server.create_database("tls");
    let dir = tempfile::tempdir().unwrap();
    let ca = upgate_e2e::tls::ca_file();
    let plain = url_with_password(&server, "tls");
    let check = |name: &str, url: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, config_on(dir.path(), url)).unwrap();
        let (code, stdout, stderr) = run_cli(&["check-config", "--config", path.to_str().unwrap()]);
        no_password_in("check-config", &(stdout.clone() + &stderr));
        (code, stdout + &stderr)
    };
    // Plaintext: the server's pg_hba refuses it.
    let (code, output) = check("plain.yaml", &plain);
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("cannot use the PostgreSQL store"), "{output}");
    // TLS without the private CA: the certificate does not verify.
    let (code, output) = check("unknown-ca.yaml", &format!("{plain}?sslmode=verify-full"));
    assert_eq!(code, 2, "{output}");
    assert!(
        output.contains("UnknownIssuer"),
        "names the certificate: {output}"
    );
    // A CA file that is not there is named.
    let (code, output) = check(
        "no-ca.yaml",
        &format!("{plain}?sslmode=verify-full&sslrootcert=missing-ca.pem"),
    );
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("missing-ca.pem"), "{output}");
    // With it: reachable, and a node serves uploads recorded over TLS.
    let verified = format!("{plain}?sslmode=verify-full&sslrootcert={}", ca.display());
    let (code, output) = check("verified.yaml", &verified);
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("reachable"), "{output}");
    let daemon = Daemon::start_with(|dir| config_on(dir, &verified));
    let reply = dify_upload(&daemon, "demo-key", "over-tls.txt", b"recorded over TLS\n");
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert_eq!(server.psql("tls", "SELECT filename FROM uploads"), "over-tls.txt");
    // The server sees upgate's connections over TLS.
    let tls_connections = server.psql(
        "tls",
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE application_name = 'upgate' AND ssl",
    );
    assert_ne!(tls_connections, "0");
}

/// A tus PATCH whose store goes away mid-body is 503; the lease its hold took in the store
/// could not be released then, and is released once the store answers again, so the upload's
/// next request on this same node is served at once, not refused (409) until the lease ran out.
#[test]
fn a_lease_left_by_a_store_outage_is_released_once_the_store_is_back() {
    use std::io::Write;
    let mut server = PostgresServer::start();
    server.create_database("leases");
    let daemon = node(&server, "leases", None);
    let bearer = ("Authorization", "Bearer demo-key");
    let created = send(
        "POST",
        &daemon.url("/files/"),
        &[TUS, bearer, ("Upload-Length", "1000")],
        None,
    );
    assert_eq!(created.status, 201, "{created:?}");
    let path = created.header("location").unwrap().to_owned();
    let address = daemon.base_url.trim_start_matches("http://").to_owned();
    let mut patch = std::net::TcpStream::connect(&address).unwrap();
    patch.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    patch
        .write_all(
            format!(
                "PATCH {path} HTTP/1.1\r\nHost: {address}\r\nTus-Resumable: 1.0.0\r\nAuthorization: Bearer demo-key\r\n\
Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    patch.write_all(&[b'a'; 500]).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || server
            .psql("leases", "SELECT COUNT(*) FROM session_leases")
            == "1"),
        "the PATCH holds the upload's lease"
    );
    server.stop();
    patch.write_all(&[b'b'; 500]).unwrap();
    let (status, answer) = RawUpload::read_answer(&mut patch).unwrap();
    assert_eq!(status, 503, "{answer}");
    server.start_again();
    // Served within a few seconds (a 409 with `Retry-After: 1` in the second before the lease
    // is released), not refused until the lease this node's own PATCH left runs out (30 s).
    let started = Instant::now();
    let again = loop {
        let reply = send(
            "PATCH",
            &daemon.url(&path),
            &[TUS, bearer, ("Upload-Offset", "0")],
            Some(("application/offset+octet-stream", vec![b'c'; 1000])),
        );
        if !matches!(reply.status, 409 | 503) || started.elapsed() > Duration::from_secs(20) {
            break reply;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        again.status,
        204,
        "after {:?}: {again:?}\n{}",
        started.elapsed(),
        daemon.log()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "served after {:?}",
        started.elapsed()
    );
}

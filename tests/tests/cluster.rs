//! Cluster mode end to end: real upgate nodes sharing one real PostgreSQL (`server.store`)
//! and one real SeaweedFS (`server.spool`, S3), each with its own `data_dir`. A Kore
//! session and a tus upload continue on another node after the first was killed with
//! SIGKILL; an async upload acknowledged by one node is delivered by another from the
//! shared spool; the spool's objects go once their bytes are delivered; object storage
//! stopped is a 503 with `Retry-After` in the client's dialect, and the node works again
//! when it returns; object storage that hangs does not hold a delete's answer.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use upgate_e2e::harness::*;
use upgate_e2e::inbound::b64;
use upgate_e2e::mock::{MockUpstream, Vendor};
use upgate_e2e::postgres::PostgresServer;
use upgate_e2e::seaweedfs::S3Server;

const KORE: (&str, &str) = ("x-api-key", "demo-key");
const TUS: (&str, &str) = ("Tus-Resumable", "1.0.0");
const BEARER: (&str, &str) = ("Authorization", "Bearer demo-key");
const UPSTREAM_KEY: &str = "upstream-key";

/// One PostgreSQL database, one bucket prefix and one provider root, shared by the nodes.
struct Cluster {
    postgres: PostgresServer,
    s3: S3Server,
    files: tempfile::TempDir,
    prefix: String,
}

impl Cluster {
    fn start(name: &str) -> Self {
        let postgres = PostgresServer::start();
        postgres.create_database(name);
        Self {
            postgres,
            s3: S3Server::start(),
            files: tempfile::tempdir().expect("temp dir"),
            prefix: name.to_owned(),
        }
    }

    /// [`default_config`] on the shared store and spool, files in the shared root;
    /// `change` edits it further.
    fn config(&self, dir: &Path, change: impl FnOnce(String) -> String) -> String {
        let url = self.postgres.url(&self.prefix);
        let config = default_config(dir)
            .replacen(
                "server:\n",
                &format!(
                    "server:\n  store:\n    url: {url}\n{}",
                    self.s3.spool_yaml(&self.prefix)
                ),
                1,
            )
            .replace(
                &format!("root: {}", dir.join("files").display()),
                &format!("root: {}", self.files.path().display()),
            );
        change(config)
    }

    fn node(&self) -> Daemon {
        Daemon::start_with(|dir| self.config(dir, |config| config))
    }

    /// Objects under this cluster's prefix and `under`.
    fn objects(&self, under: &str) -> Vec<(String, u64)> {
        self.s3.objects(&format!("{}/{under}", self.prefix))
    }

    fn psql(&self, sql: &str) -> String {
        self.postgres.psql(&self.prefix, sql)
    }
}

fn kore_chunk(daemon: &Daemon, session: &str, number: usize, bytes: &[u8]) -> Reply {
    let form = Form::new().text("chunkNumber", &number.to_string()).file(
        "file",
        "blob",
        "application/octet-stream",
        bytes,
    );
    post_form(
        &daemon.url(&format!("/api/public/files/session/{session}")),
        &[KORE],
        &form,
    )
}

fn dify_upload(daemon: &Daemon, name: &str, content: &[u8]) -> Reply {
    let form = Form::new()
        .text("user", "u-1")
        .file("file", name, "text/plain", content);
    post_form(&daemon.url("/v1/files/upload"), &[BEARER], &form)
}

fn text_of(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz\n"[(i + seed as usize) % 27])
        .collect()
}

#[test]
fn a_kore_session_and_a_tus_upload_continue_on_another_node_after_a_kill_9() {
    let cluster = Cluster::start("moved");
    let mut a = cluster.node();
    let b = cluster.node();

    // Kore: the session starts on A, which takes two chunks and dies; B takes the last and
    // completes it.
    let whole = text_of(250_000, 0);
    let start = post_json(
        &a.url("/api/public/files/session/start"),
        &[KORE],
        &json!({"fileContext": "bulkImport", "totalChunks": 3, "fileExtension": "txt",
            "fileName": "moved.txt", "fileSize": whole.len()}),
    );
    assert_eq!(start.status, 200, "{}", start.text);
    let session = start.json()["sessionId"].as_str().unwrap().to_owned();
    let chunks: Vec<&[u8]> = whole.chunks(100_000).collect();
    for (number, chunk) in chunks.iter().enumerate().take(2) {
        let reply = kore_chunk(&a, &session, number, chunk);
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    // Acknowledged chunks are in the bucket, whatever A's disk holds.
    let stored = cluster.objects(&format!("sessions/{session}/"));
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(stored.iter().all(|(_, size)| *size == 100_000), "{stored:?}");
    a.kill();
    let reply = kore_chunk(&b, &session, 2, chunks[2]);
    assert_eq!(reply.status, 200, "{}", reply.text);
    let done = send(
        "POST",
        &b.url(&format!("/api/public/files/session/{session}/complete")),
        &[KORE],
        None,
    );
    assert_eq!(done.status, 200, "{}", done.text);
    let kore_id = done.json()["fileId"].as_str().unwrap().to_owned();
    assert_eq!(
        sha256_file(&cluster.files.path().join(&kore_id)),
        sha256_hex(&whole),
        "the assembled file is the client's"
    );
    assert_eq!(
        cluster.psql(&format!(
            "SELECT state, size, sha256 FROM uploads WHERE id = '{kore_id}'"
        )),
        format!("forwarded|{}|{}", whole.len(), sha256_hex(&whole))
    );
    assert!(
        eventually(Duration::from_secs(5), || cluster
            .objects(&format!("sessions/{session}/"))
            .is_empty()),
        "the completed session's chunks leave the bucket"
    );

    // tus: created and half sent on B, B dies; a third node reports the offset B
    // acknowledged and takes the rest.
    let mut b = b;
    let content = text_of(180_000, 3);
    let meta = format!("filename {}", b64(b"moved.txt"));
    let created = send(
        "POST",
        &b.url("/files/"),
        &[
            TUS,
            BEARER,
            ("Upload-Length", &content.len().to_string()),
            ("Upload-Metadata", &meta),
        ],
        None,
    );
    assert_eq!(created.status, 201, "{created:?}");
    let location = created.header("location").unwrap().to_owned();
    let patch = |daemon: &Daemon, offset: usize, bytes: &[u8]| {
        send(
            "PATCH",
            &daemon.url(&location),
            &[TUS, BEARER, ("Upload-Offset", &offset.to_string())],
            Some(("application/offset+octet-stream", bytes.to_vec())),
        )
    };
    for (offset, end) in [(0, 50_000), (50_000, 120_000)] {
        let reply = patch(&b, offset, &content[offset..end]);
        assert_eq!(reply.status, 204, "{reply:?}");
    }
    b.kill();
    let c = cluster.node();
    let head = send("HEAD", &c.url(&location), &[TUS, BEARER], None);
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("upload-offset"), Some("120000"), "{head:?}");
    // The offset B acknowledged is the one to resume from: any other is a conflict.
    assert_eq!(patch(&c, 100_000, &content[100_000..]).status, 409);
    let last = patch(&c, 120_000, &content[120_000..]);
    assert_eq!(last.status, 204, "{last:?}");
    let upload_id = last.header("upgate-upload-id").unwrap().to_owned();
    assert_eq!(
        sha256_file(&cluster.files.path().join(&upload_id)),
        sha256_hex(&content)
    );
    assert_eq!(
        cluster.psql(&format!(
            "SELECT state, size, sha256 FROM uploads WHERE id = '{upload_id}'"
        )),
        format!("forwarded|{}|{}", content.len(), sha256_hex(&content))
    );
    assert!(
        eventually(Duration::from_secs(5), || cluster.objects("sessions/").is_empty()),
        "a delivered tus upload leaves nothing in the bucket: {:?}",
        cluster.objects("sessions/")
    );
}

#[test]
fn an_async_upload_acknowledged_by_a_node_that_dies_is_delivered_by_another() {
    let cluster = Cluster::start("outbox");
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    // A's upstream refuses connections: its attempt fails and is rescheduled. B's answers.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let provider = |base_url: &str| {
        format!(
            "providers:\n  up:\n    plugin: dify\n    delivery: async\n    retry: {{ max_attempts: 20, initial_backoff: 1s, max_backoff: 1s }}\n    settings:\n      base_url: {base_url}\n      api_key: {UPSTREAM_KEY}\n      connect_timeout: 1s\n"
        )
    };
    // Large enough for a multipart upload of three parts (16 + 16 + 8 MiB), put at once.
    let big_plan = |config: String| config.replace("max_file_size: 1MiB", "max_file_size: 64MiB");
    let mut a = Daemon::start_with(|dir| {
        cluster.config(dir, |config| {
            big_plan(config)
                .replace("providers:\n", &provider(&closed))
                .replace("    provider: disk\n", "    provider: up\n")
        })
    });
    let content = text_of((40 << 20) + 123, 7);
    let reply = dify_upload(&a, "queued.txt", &content);
    assert_eq!(
        reply.status, 201,
        "acknowledged once in the shared spool: {}",
        reply.text
    );
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        cluster.objects(&format!("uploads/{id}")),
        vec![(format!("{}/uploads/{id}", cluster.prefix), content.len() as u64)],
        "the bytes are in the bucket before the answer"
    );
    assert!(
        eventually(Duration::from_secs(10), || cluster
            .psql(&format!("SELECT attempts FROM uploads WHERE id = '{id}'"))
            .parse::<i64>()
            .is_ok_and(|attempts| attempts >= 1)),
        "A tried and failed"
    );
    a.kill();
    // A's disk is gone with it: B has only the bucket. Whose object is, for now, not the
    // upload (cut short, as a download that broke off or an error page served with 200
    // would be): B does not deliver it, and downloads it again later.
    std::fs::remove_dir_all(a.data_dir()).unwrap();
    let key = format!("{}/uploads/{id}", cluster.prefix);
    assert_eq!(cluster.s3.put(&key, &content[..1000]), 200);
    let b = Daemon::start_with(|dir| {
        cluster.config(dir, |config| {
            big_plan(config)
                .replace("providers:\n", &provider(&mock.base_url()))
                .replace("    provider: disk\n", "    provider: up\n")
        })
    });
    assert!(
        eventually(Duration::from_secs(20), || cluster
            .psql(&format!("SELECT last_error FROM uploads WHERE id = '{id}'"))
            .contains(&format!("holds 1000 bytes, not {}", content.len()))),
        "B refuses the short copy: {}",
        b.log()
    );
    assert!(mock.stored().is_empty(), "nothing short was delivered");
    assert_eq!(cluster.s3.put(&key, &content), 200);
    assert!(
        eventually(Duration::from_secs(60), || cluster
            .psql(&format!("SELECT state FROM uploads WHERE id = '{id}'"))
            == "forwarded"),
        "B delivers it: {}",
        b.log()
    );
    let stored = mock.stored();
    assert_eq!(stored.len(), 1, "delivered once: {stored:?}");
    assert_eq!(stored[0].sha256, sha256_hex(&content));
    assert_eq!(stored[0].size, content.len() as u64);
    assert!(
        eventually(Duration::from_secs(5), || cluster.objects("uploads/").is_empty()),
        "a delivered upload's object goes"
    );
}

#[test]
fn object_storage_stopped_is_503_with_retry_after_and_the_node_works_again_when_it_returns() {
    let mut cluster = Cluster::start("outage");
    let daemon = Daemon::start_with(|dir| {
        cluster.config(dir, |config| {
            config.replace("    plugin: local\n", "    plugin: local\n    delivery: async\n")
        })
    });
    let start = post_json(
        &daemon.url("/api/public/files/session/start"),
        &[KORE],
        &json!({"fileContext": "bulkImport", "totalChunks": 1, "fileExtension": "txt",
            "fileName": "late.txt", "fileSize": 5}),
    );
    assert_eq!(start.status, 200, "{}", start.text);
    let session = start.json()["sessionId"].as_str().unwrap().to_owned();

    let ready = format!("{}/readyz", daemon.metrics_url);
    assert_eq!(get(&ready).status, 200);
    cluster.s3.stop();
    let unready = get(&ready);
    assert_eq!(unready.status, 503, "{}", unready.text);
    assert!(
        unready.text.contains("spool"),
        "names the spool: {}",
        unready.text
    );
    let chunk = kore_chunk(&daemon, &session, 0, b"hello");
    assert_eq!(chunk.status, 503, "{}", chunk.text);
    assert!(chunk.header("retry-after").is_some(), "{chunk:?}");
    let async_upload = dify_upload(&daemon, "a.txt", b"kept for later");
    assert_eq!(async_upload.status, 503, "{}", async_upload.text);
    assert!(async_upload.header("retry-after").is_some(), "{async_upload:?}");
    assert_eq!(
        async_upload.json()["code"],
        "service_unavailable",
        "in Dify's shape: {}",
        async_upload.text
    );
    assert_eq!(
        cluster.psql("SELECT COUNT(*) FROM uploads"),
        "0",
        "nothing refused is recorded"
    );
    assert!(
        !daemon.log().contains("upgate-test-secret"),
        "the secret key is never logged"
    );

    cluster.s3.start_again();
    assert_eq!(get(&ready).status, 200, "ready again by itself");
    let chunk = kore_chunk(&daemon, &session, 0, b"hello");
    assert_eq!(chunk.status, 200, "{}", chunk.text);
    let reply = dify_upload(&daemon, "b.txt", b"stored at last");
    assert_eq!(reply.status, 201, "{}", reply.text);
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    assert!(
        eventually(Duration::from_secs(10), || cluster
            .files
            .path()
            .join(&id)
            .is_file()),
        "delivered once the storage is back"
    );
    assert_eq!(
        std::fs::read(cluster.files.path().join(&id)).unwrap(),
        b"stored at last"
    );
}

#[test]
fn check_config_reports_the_shared_spool_and_locates_its_failure() {
    let mut cluster = Cluster::start("check");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, cluster.config(dir.path(), |config| config)).unwrap();
    let config = path.to_str().unwrap();
    let (code, stdout, stderr) = run_cli(&["check-config", "--config", config]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("spool s3://upgate/{}/", cluster.prefix)) && stdout.contains("reachable"),
        "{stdout}"
    );
    cluster.s3.stop();
    let (code, stdout, stderr) = run_cli(&["check-config", "--config", config]);
    assert_ne!(code, 0, "{stdout}{stderr}");
    let text = format!("{stdout}{stderr}");
    assert!(
        text.contains("config.yaml:") && text.contains("cannot use the shared spool"),
        "{text}"
    );
    assert!(!text.contains("upgate-test-secret"), "{text}");
}

#[test]
fn a_session_held_on_one_node_is_a_conflict_on_another_for_tus_and_kore() {
    use std::io::Write;
    let cluster = Cluster::start("race");
    let a = cluster.node();
    let b = cluster.node();
    let content = text_of(200_000, 5);
    let created = send(
        "POST",
        &a.url("/files/"),
        &[
            TUS,
            BEARER,
            ("Upload-Length", &content.len().to_string()),
            ("Upload-Metadata", &format!("filename {}", b64(b"race.txt"))),
        ],
        None,
    );
    assert_eq!(created.status, 201, "{created:?}");
    let location = created.header("location").unwrap().to_owned();
    let id = location.strip_prefix("/files/").unwrap().to_owned();

    // A's PATCH: its head and the first half of its body sent, the rest held back.
    let address = a
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    let head = format!(
        "PATCH {location} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nTus-Resumable: 1.0.0\r\nAuthorization: Bearer demo-key\r\n\
         Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\nContent-Length: {}\r\n\r\n",
        content.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&content[..100_000]).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || cluster.psql(&format!(
            "SELECT COUNT(*) FROM session_leases WHERE session_id = '{id}'"
        )) == "1"),
        "A holds the upload's lease in the store"
    );
    // The same offset on B while A works on it: 409, to be tried again, nothing written.
    let raced = send(
        "PATCH",
        &b.url(&location),
        &[TUS, BEARER, ("Upload-Offset", "0")],
        Some(("application/offset+octet-stream", b"other bytes".to_vec())),
    );
    assert_eq!(raced.status, 409, "{raced:?}");
    assert!(raced.header("retry-after").is_some(), "{raced:?}");
    assert_eq!(raced.header("tus-resumable"), Some("1.0.0"));
    // A finishes: its bytes are the upload's, whole.
    stream.write_all(&content[100_000..]).unwrap();
    let (status, answer) = RawUpload::read_answer(&mut stream).unwrap();
    assert_eq!(status, 204, "{answer}");
    let head = send("HEAD", &b.url(&location), &[TUS, BEARER], None);
    assert_eq!(head.header("upload-offset"), Some("200000"), "{head:?}");
    let record = cluster.psql(&format!("SELECT upload_id FROM sessions WHERE id = '{id}'"));
    assert_eq!(
        sha256_file(&cluster.files.path().join(&record)),
        sha256_hex(&content),
        "the upload holds A's bytes and nothing of B's"
    );
    assert!(
        eventually(Duration::from_secs(5), || cluster
            .psql("SELECT COUNT(*) FROM session_leases")
            == "0"),
        "the lease is released"
    );

    // Kore: while another node holds the session (its lease in the store), a chunk for it
    // is a 409 in Kore's shape and changes nothing; once the lease is gone, it is taken.
    let start = post_json(
        &a.url("/api/public/files/session/start"),
        &[KORE],
        &json!({"fileContext": "bulkImport", "totalChunks": 1, "fileExtension": "txt",
            "fileName": "held.txt", "fileSize": 5}),
    );
    assert_eq!(start.status, 200, "{}", start.text);
    let session = start.json()["sessionId"].as_str().unwrap().to_owned();
    cluster.psql(&format!(
        "INSERT INTO session_leases VALUES ('{session}', 'another-node', \
         (extract(epoch FROM now()) * 1000)::bigint + 30000)"
    ));
    let held = kore_chunk(&b, &session, 0, b"hello");
    assert_eq!(held.status, 409, "{}", held.text);
    assert_eq!(held.json()["errors"][0]["code"], 409, "{}", held.text);
    assert!(held.header("retry-after").is_some(), "{held:?}");
    assert_eq!(
        cluster.psql(&format!(
            "SELECT COUNT(*) FROM session_chunks WHERE session_id = '{session}'"
        )),
        "0"
    );
    assert!(cluster.objects(&format!("sessions/{session}/")).is_empty());
    cluster.psql(&format!(
        "DELETE FROM session_leases WHERE session_id = '{session}'"
    ));
    let taken = kore_chunk(&b, &session, 0, b"hello");
    assert_eq!(taken.status, 200, "{}", taken.text);
    assert_eq!(cluster.objects(&format!("sessions/{session}/")).len(), 1);
}

#[test]
fn deletes_are_answered_while_object_storage_hangs_and_its_objects_go_when_it_returns() {
    let cluster = Cluster::start("hang");
    let daemon = cluster.node();
    // A delivered Kore XO upload, and a tus upload with bytes in the shared spool.
    let form = Form::new()
        .file("file", "kept.txt", "text/plain", b"delivered bytes")
        .text("userReference", "ref-1")
        .text("uploadType", "runtime");
    let url = daemon.url("/api/v2/apps/app-1/environments/draft/attachments/upload");
    let uploaded = post_form(&url, &[KORE], &form);
    assert_eq!(uploaded.status, 200, "{}", uploaded.text);
    let file_id = uploaded.json()["fileId"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", uploaded.text))
        .to_owned();
    let created = send(
        "POST",
        &daemon.url("/files/"),
        &[TUS, BEARER, ("Upload-Length", "100")],
        None,
    );
    assert_eq!(created.status, 201, "{created:?}");
    let location = created.header("location").unwrap().to_owned();
    let tus_id = location.strip_prefix("/files/").unwrap().to_owned();
    let patched = send(
        "PATCH",
        &daemon.url(&location),
        &[TUS, BEARER, ("Upload-Offset", "0")],
        Some(("application/offset+octet-stream", text_of(40, 1))),
    );
    assert_eq!(patched.status, 204, "{patched:?}");
    assert!(!cluster.objects(&format!("sessions/{tus_id}/")).is_empty());

    // Object storage stops answering (connections open, nothing said): the deletes are
    // still answered soon, not after the spool's timeouts and retries (16 s each).
    cluster.s3.freeze();
    let started = std::time::Instant::now();
    let deleted = send(
        "DELETE",
        &daemon.url(&format!(
            "/api/v2/apps/app-1/environments/draft/attachments/{file_id}"
        )),
        &[KORE],
        Some(("application/json", br#"{"sessionId":"s-1"}"#.to_vec())),
    );
    let terminated = send("DELETE", &daemon.url(&location), &[TUS, BEARER], None);
    let waited = started.elapsed();
    // A readiness probe is answered within its own bound too, naming what hangs.
    let asked = std::time::Instant::now();
    let ready = get(&format!("{}/readyz", daemon.metrics_url));
    let probed = asked.elapsed();
    cluster.s3.thaw();
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_eq!(terminated.status, 204, "{terminated:?}");
    assert!(waited < Duration::from_secs(10), "both answered in {waited:?}");
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert!(ready.text.contains("spool"), "{}", ready.text);
    assert!(probed < Duration::from_secs(6), "/readyz answered in {probed:?}");
    assert!(!cluster.files.path().join(&file_id).exists());
    assert_eq!(
        cluster.psql(&format!("SELECT COUNT(*) FROM sessions WHERE id = '{tus_id}'")),
        "0"
    );
    // The removal went on in the background and finishes once the storage answers.
    assert!(
        eventually(Duration::from_secs(40), || cluster
            .objects(&format!("sessions/{tus_id}/"))
            .is_empty()),
        "the tus upload's objects go"
    );
    let reply = dify_upload(&daemon, "after.txt", b"works again");
    assert_eq!(reply.status, 201, "{}", reply.text);
}

/// A node whose store is not the cluster's (left on its own SQLite here; a staging database
/// would be the same) but whose spool is the cluster's prefix would find none of the
/// bucket's uploads in its records and sweep them as orphans. The prefix names the store it
/// answers to (the first node to start puts `store-identity`), and such a node refuses to
/// start, saying why, before it sweeps anything.
#[test]
fn a_node_on_another_store_refuses_the_clusters_spool_prefix() {
    let cluster = Cluster::start("bound");
    let a = cluster.node();
    let identity = cluster
        .s3
        .get(&format!("{}/store-identity", cluster.prefix))
        .expect("the first node names the store");
    let store = cluster.psql("SELECT id FROM store_identity");
    assert_eq!(String::from_utf8_lossy(&identity), store);
    assert_eq!(store.len(), 32, "{store}");
    // Another node of the same store starts as before.
    let b = cluster.node();
    let reply = dify_upload(&b, "same-store.txt", b"served\n");
    assert_eq!(reply.status, 201, "{}", reply.text);
    drop((a, b));

    let dir = tempfile::tempdir().unwrap();
    let shared_store = format!("  store:\n    url: {}\n", cluster.postgres.url(&cluster.prefix));
    let config = cluster.config(dir.path(), |config| config.replacen(&shared_store, "", 1));
    assert!(!config.contains("  store:\n"), "{config}");
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, config).unwrap();
    let mut serving = std::process::Command::new(upgate_binary())
        .args(["serve", "--config", config_path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = eventually(Duration::from_secs(30), || serving.try_wait().unwrap().is_some());
    if !exited {
        let _ = serving.kill();
    }
    let output = serving.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(exited, "a node on another store started: {stderr}");
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the shared spool belongs to another store") && stderr.contains(&store),
        "{stderr}"
    );
    assert_eq!(
        cluster.s3.get(&format!("{}/store-identity", cluster.prefix)),
        Some(identity),
        "the prefix still names the cluster's store"
    );
}

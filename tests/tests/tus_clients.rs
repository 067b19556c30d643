//! The tus dialect against real tus clients: tus-js-client in Node.js (chunked, parallel
//! uploads through concatenation, resume after the daemon was SIGKILLed), tuspy (sync and
//! async, with checksums), and tus-js-client's browser build in headless Chromium on a page
//! of another origin (CORS preflights and exposed headers). Each test checks the bytes the
//! local provider stored against the source's sha256.
//!
//! The clients are installed by `tests/clients/setup.sh` (npm, PyPI, Debian), run once per
//! test process before the first client: a failed install fails every test here, with the
//! script's message; nothing is skipped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use upgate_e2e::harness::*;
use upgate_e2e::mock::{MockUpstream, Vendor};

const KEY: &str = "demo-key";
/// The longest one client run may take.
const CLIENT_LIMIT: Duration = Duration::from_secs(60);

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// Runs `tests/clients/setup.sh` once per process; every test waits for it and fails with its
/// output when it failed.
fn setup() {
    static SETUP: OnceLock<Result<(), String>> = OnceLock::new();
    let result = SETUP.get_or_init(|| {
        let script = clients_dir().join("setup.sh");
        let started = Instant::now();
        let output = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("cannot run {}: {error}", script.display()))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            return Err(format!(
                "{} failed ({}): the tus client tests need tus-js-client, tuspy and chromium\n{}{stderr}",
                script.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
            ));
        }
        eprintln!("{}: {:.1?}\n{stderr}", script.display(), started.elapsed());
        Ok(())
    });
    if let Err(message) = result {
        panic!("{message}");
    }
}

/// What a client run printed.
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The JSON report a client script prints as its last line.
    fn report(&self) -> Value {
        assert!(
            self.success,
            "the client failed:\n{}\n{}",
            self.stderr, self.stdout
        );
        let line = self.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{}\n{}", self.stdout, self.stderr))
    }
}

/// Runs `program` with `args` in tests/clients, killed after [`CLIENT_LIMIT`].
fn run(program: &Path, args: &[&str]) -> Run {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(clients_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    let collect = |mut stream: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            text
        })
    };
    let stdout = collect(Box::new(child.stdout.take().expect("stdout")));
    let stderr = collect(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + CLIENT_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the client") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let Some(status) = status else {
        panic!(
            "{} {args:?} ran past {CLIENT_LIMIT:?}:\n{stdout}\n{stderr}",
            program.display()
        );
    };
    Run {
        success: status.success(),
        stdout,
        stderr,
    }
}

/// tus-js-client (Node.js): `tests/clients/upload.mjs ENDPOINT KEY FILE CHUNK OPTIONS`.
fn tus_js(daemon: &Daemon, file: &Path, chunk: usize, options: Value) -> Run {
    run(
        Path::new("node"),
        &[
            "upload.mjs",
            &daemon.url("/files/"),
            KEY,
            file.to_str().unwrap(),
            &chunk.to_string(),
            &options.to_string(),
        ],
    )
}

/// tuspy: `tests/clients/upload.py ENDPOINT KEY FILE CHUNK MODE` in the setup's venv.
fn tuspy(daemon: &Daemon, file: &Path, chunk: usize, mode: &str) -> Run {
    run(
        &clients_dir().join(".venv/bin/python"),
        &[
            "upload.py",
            &daemon.url("/files/"),
            KEY,
            file.to_str().unwrap(),
            &chunk.to_string(),
            mode,
        ],
    )
}

/// The default config with room for the test files and, for the browser, CORS for `origin`.
fn config(dir: &Path, origin: Option<&str>) -> String {
    let text = default_config(dir).replace("max_file_size: 1MiB", "max_file_size: 16MiB");
    match origin {
        Some(origin) => text.replacen(
            "server:\n",
            &format!("server:\n  cors:\n    allowed_origins: [\"{origin}\"]\n"),
            1,
        ),
        None => text,
    }
}

fn start() -> Daemon {
    setup();
    Daemon::start_with(|dir| config(dir, None))
}

/// A file of `len` pseudo-random bytes (fixed per `name`) after an ASCII line (so no content
/// sniffer takes it for a known type), in the daemon's temp dir.
fn source(daemon: &Daemon, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
    let mut bytes = format!("upgate tus client test: {name}\n").into_bytes();
    let mut state = name.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    let path = daemon.dir.join(name);
    std::fs::write(&path, &bytes).expect("write the source file");
    (path, bytes)
}

fn tus_headers() -> [(&'static str, &'static str); 2] {
    [("Tus-Resumable", "1.0.0"), ("Authorization", "Bearer demo-key")]
}

/// The upload at `url` is complete and its record holds `content`: HEAD names the record
/// (`Upgate-Upload-Id`, which must equal what the client saw, if it saw one), the local
/// provider stored exactly these bytes and the record says so. Returns the record id.
fn assert_stored(daemon: &Daemon, url: &str, seen_id: Option<&str>, content: &[u8]) -> String {
    assert!(url.starts_with(&daemon.url("/files/")), "upload URL {url}");
    let reply = send("HEAD", url, &tus_headers(), None);
    assert_eq!(reply.status, 200, "HEAD {url}: {reply:?}");
    let length = content.len().to_string();
    assert_eq!(reply.header("upload-offset"), Some(length.as_str()), "{reply:?}");
    assert_eq!(reply.header("upload-length"), Some(length.as_str()), "{reply:?}");
    let id = reply
        .header("upgate-upload-id")
        .unwrap_or_else(|| panic!("a complete upload names its record: {reply:?}"))
        .to_owned();
    if let Some(seen) = seen_id {
        assert_eq!(seen, id, "the client saw another record id");
    }
    assert_eq!(
        sha256_file(&daemon.files_dir().join(&id)),
        sha256_hex(content),
        "the stored bytes differ from the source"
    );
    let (state, size, sha256): (String, i64, String) = daemon
        .db()
        .query_row(
            "SELECT state, size, sha256 FROM uploads WHERE id = ?1 AND dialect = 'tus'",
            [&id],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .unwrap_or_else(|e| panic!("record {id}: {e}"));
    assert_eq!(
        (state.as_str(), size as usize, sha256.as_str()),
        ("forwarded", content.len(), sha256_hex(content).as_str())
    );
    id
}

fn statuses(report: &Value) -> Vec<u64> {
    report["statuses"]
        .as_array()
        .expect("statuses")
        .iter()
        .map(|status| status.as_u64().expect("a status"))
        .collect()
}

fn uploads(daemon: &Daemon) -> i64 {
    daemon
        .db()
        .query_row("SELECT COUNT(*) FROM uploads", [], |row| row.get(0))
        .unwrap()
}

#[test]
fn tus_js_client_uploads_in_chunks() {
    let daemon = start();
    let (file, content) = source(&daemon, "chunked.bin", 1_000_000);
    let report = tus_js(&daemon, &file, 64 * 1024, serde_json::json!({})).report();
    assert_eq!(report["outcome"], "success", "{report}");
    // One creation, then a PATCH per 64 KiB chunk (16 for 1,000,000 bytes).
    let seen = statuses(&report);
    assert_eq!(seen.first(), Some(&201), "{report}");
    assert_eq!(seen[1..], [204; 16], "{report}");
    assert_stored(
        &daemon,
        report["url"].as_str().unwrap(),
        report["uploadId"].as_str(),
        &content,
    );

    // creation-with-upload: the first chunk rides on the POST.
    let (file, content) = source(&daemon, "with-creation.bin", 300_000);
    let options = serde_json::json!({"uploadDataDuringCreation": true});
    let report = tus_js(&daemon, &file, 100_000, options).report();
    assert_eq!(statuses(&report), [201, 204, 204], "{report}");
    assert_stored(
        &daemon,
        report["url"].as_str().unwrap(),
        report["uploadId"].as_str(),
        &content,
    );
    assert_eq!(uploads(&daemon), 2);
}

#[test]
fn tus_js_client_parallel_uploads_concatenate() {
    let daemon = start();
    let (file, content) = source(&daemon, "parallel.bin", 1_048_576);
    let options = serde_json::json!({"parallelUploads": 3});
    let report = tus_js(&daemon, &file, 64 * 1024, options).report();
    assert_eq!(report["outcome"], "success", "{report}");
    // Three partial uploads and the final one that joins them: four creations.
    let seen = statuses(&report);
    assert_eq!(seen.iter().filter(|&&s| s == 201).count(), 4, "{report}");
    assert!(seen.iter().all(|&s| s == 201 || s == 204), "{report}");
    assert_eq!(seen.last(), Some(&201), "the final upload comes last: {report}");
    assert_stored(
        &daemon,
        report["url"].as_str().unwrap(),
        report["uploadId"].as_str(),
        &content,
    );
    // Only the final upload became a record; the partials' bytes are gone from the spool.
    assert_eq!(uploads(&daemon), 1);
    assert!(
        eventually(Duration::from_secs(5), || daemon.spool_files() == 0),
        "spool: {} files",
        daemon.spool_files()
    );
}

#[test]
fn tus_js_client_resumes_after_the_daemon_was_killed() {
    let mut daemon = start();
    let (file, content) = source(&daemon, "resumed.bin", 1_000_000);
    // The restarted daemon listens where the upload URL points: the port it got, pinned.
    let port: u16 = daemon.base_url.rsplit(':').next().unwrap().parse().unwrap();
    let text = std::fs::read_to_string(&daemon.config_path).unwrap();
    let pinned = text.replacen(
        "  listen: 127.0.0.1:0\n",
        &format!("  listen: 127.0.0.1:{port}\n"),
        1,
    );
    assert_ne!(pinned, text);

    let options = serde_json::json!({"abortAfter": 400_000});
    let report = tus_js(&daemon, &file, 64 * 1024, options).report();
    assert_eq!(report["outcome"], "aborted", "{report}");
    let mut url = report["url"].as_str().unwrap().to_owned();
    let acknowledged = report["offset"].as_u64().unwrap();
    assert!((400_000..1_000_000).contains(&acknowledged), "{report}");

    daemon.kill();
    // Unless another socket took the port meanwhile (then the daemon gets a new one, and the
    // client resumes from the same upload path at the new address).
    let reusable = TcpListener::bind(("127.0.0.1", port)).is_ok();
    if reusable {
        std::fs::write(&daemon.config_path, pinned).unwrap();
    } else {
        eprintln!("port {port} was taken after the kill: the daemon restarts on another");
    }
    let daemon = Daemon::spawn(daemon.dir.clone(), daemon.config_path.clone(), &[]);
    if !reusable {
        let path = &url[url.find("/files/").expect("an upload path")..];
        url = daemon.url(path);
    }
    assert!(
        url.starts_with(&daemon.url("/files/")),
        "{url} vs {}",
        daemon.base_url
    );
    // What survived the kill is what the client was told.
    let reply = send("HEAD", &url, &tus_headers(), None);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("upload-offset"),
        Some(acknowledged.to_string().as_str()),
        "{reply:?}"
    );

    let options = serde_json::json!({"uploadUrl": url});
    let report = tus_js(&daemon, &file, 64 * 1024, options).report();
    assert_eq!(report["outcome"], "success", "{report}");
    // Resumed: a HEAD for the offset, then PATCHes of the rest; no new upload.
    let seen = statuses(&report);
    assert_eq!(seen.first(), Some(&200), "{report}");
    assert!(seen[1..].iter().all(|&s| s == 204), "{report}");
    let rest = (1_000_000 - acknowledged).div_ceil(64 * 1024) as usize;
    assert_eq!(seen.len(), 1 + rest, "{report}");
    assert_eq!(report["url"], url.as_str());
    assert_stored(&daemon, &url, report["uploadId"].as_str(), &content);
    assert_eq!(uploads(&daemon), 1);
}

/// A last PATCH whose sync delivery fails (502): tus-js-client retries with a HEAD alone
/// and, seeing every byte there, reports success without another PATCH. That HEAD makes the
/// upload, so what the client was told is true: one copy upstream, the bytes it sent.
#[test]
fn tus_js_client_retrying_a_failed_last_patch_gets_its_upload_made() {
    setup();
    let mock = MockUpstream::start(Vendor::Dify, "up-key");
    let daemon = Daemon::start_with(|dir| {
        config(dir, None)
            .replace(
                "providers:\n",
                &format!(
                    "providers:\n  up:\n    plugin: dify\n    retry: {{ max_attempts: 2, initial_backoff: 20ms, max_backoff: 20ms }}\n    settings:\n      base_url: {}\n      api_key: up-key\n",
                    mock.base_url()
                ),
            )
            .replacen("    provider: disk\n", "    provider: up\n", 1)
    });
    let (file, content) = source(&daemon, "retried.bin", 300_000);
    // The last PATCH's delivery: both attempts refused.
    mock.fail_next(2, 500);
    let options = serde_json::json!({"retryDelays": [100]});
    let report = tus_js(&daemon, &file, 128 * 1024, options).report();
    assert_eq!(report["outcome"], "success", "{report}");
    assert_eq!(statuses(&report), [201, 204, 204, 502, 200], "{report}");
    let stored = mock.stored();
    assert_eq!(stored.len(), 1, "{report}\n{}", daemon.log());
    assert_eq!(stored[0].sha256, sha256_hex(&content));
    let record = report["uploadId"].as_str().expect("the HEAD names the upload");
    let state: String = daemon
        .db()
        .query_row("SELECT state FROM uploads WHERE id = ?1", [record], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(state, "forwarded");
}

#[test]
fn tuspy_uploads_in_chunks_with_checksums() {
    let daemon = start();
    for (name, mode) in [("tuspy.bin", "sync"), ("tuspy-async.bin", "async")] {
        let (file, content) = source(&daemon, name, 700_000);
        let report = tuspy(&daemon, &file, 128 * 1024, mode).report();
        assert_eq!(report["offset"], 700_000, "{mode}: {report}");
        assert_stored(
            &daemon,
            report["url"].as_str().unwrap(),
            report["uploadId"].as_str(),
            &content,
        );
    }
    assert_eq!(uploads(&daemon), 2);
}

/// A static server for the browser test's page and tus-js-client's browser bundle, on its
/// own port (another origin than the daemon's). Serves until the process ends.
fn serve_page() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the page server");
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let clients = clients_dir();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request_line = String::new();
            let mut reader = BufReader::new(stream.try_clone().expect("clone the stream"));
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // The rest of the head.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let path = request_line.split(' ').nth(1).unwrap_or("/");
            let path = path.split('?').next().unwrap_or("/");
            let file = match path {
                "/page.html" => Some((clients.join("page.html"), "text/html; charset=utf-8")),
                "/tus.min.js" => Some((
                    clients.join("node_modules/tus-js-client/dist/tus.min.js"),
                    "text/javascript; charset=utf-8",
                )),
                _ => None,
            };
            let (status, content_type, body) = match file.and_then(|(p, t)| Some((t, std::fs::read(p).ok()?)))
            {
                Some((content_type, body)) => ("200 OK", content_type, body),
                None => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream
                .write_all(head.as_bytes())
                .and_then(|()| stream.write_all(&body));
        }
    });
    origin
}

/// The page's content: an ASCII line, then `(i * 7 + (i >> 8)) & 0xff` (page.html's `content`).
fn page_content(size: usize) -> Vec<u8> {
    let head = b"upgate browser upload\n";
    (0..size)
        .map(|i| match head.get(i) {
            Some(&byte) => byte,
            None => ((i * 7 + (i >> 8)) & 0xff) as u8,
        })
        .collect()
}

#[test]
fn a_browser_uploads_from_another_origin() {
    setup();
    let origin = serve_page();
    let daemon = Daemon::start_with(|dir| config(dir, Some(&origin)));
    assert_ne!(origin, daemon.base_url);
    let size = 300_000;
    let endpoint = daemon.url("/files/");
    let page = format!("{origin}/page.html?endpoint={endpoint}&key={KEY}&size={size}&chunk=100000");
    let run = run(Path::new("node"), &["browser.mjs", &page, "30000"]);
    let report = run.report();
    // The page read Location (the URL) and Upgate-Upload-Id (the record) from cross-origin
    // answers: both are exposed.
    assert_eq!(statuses(&report), [201, 204, 204, 204], "{report}");
    let seen = report["uploadId"].as_str();
    assert!(
        seen.is_some(),
        "the page could not read Upgate-Upload-Id: {report}"
    );
    assert_stored(
        &daemon,
        report["url"].as_str().unwrap(),
        seen,
        &page_content(size),
    );
    // The browser asked first (Authorization and Tus-* headers are not CORS-safelisted): a
    // preflight for the POST and one for the PATCHes (Chromium caches them per URL).
    let log = daemon.log();
    let preflights = log
        .lines()
        .filter(|line| line.contains("method=OPTIONS") && line.contains("status=204"))
        .count();
    assert!(preflights >= 2, "{preflights} preflights answered 204:\n{log}");
}

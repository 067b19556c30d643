//! The end-to-end harness: builds the workspace once, starts the real `upgate` binary on
//! port 0 with a temp config and data dir (plugins from this workspace's target dir), and
//! talks real HTTP to it.
//!
//! What flows through here: a config written by the test, the daemon's stdout (read for
//! its bound addresses), multipart bodies built by [`Form`], and the daemon's answers as
//! [`Reply`] (status, headers, JSON).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// `target/debug` (or whichever profile the tests were built with).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("target profile dir")
        .to_path_buf()
}

/// Builds the daemon and every plugin of the workspace (once per test process), so the
/// tests run the same artifacts a user builds.
pub fn build_workspace() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile_dir = target_dir();
        let target = profile_dir.parent().expect("target dir").to_path_buf();
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .join("Cargo.toml");
        // The ABI-mismatch fixture used to be a workspace member, built into this very
        // directory; a copy left by such a build would show as a broken plugin here. Removed
        // before building: were it a member again, the build would put it back.
        let stale = profile_dir.join(plugin_file("abi-mismatch"));
        let _ = std::fs::remove_file(stale);
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        command
            .args([
                "build",
                "--workspace",
                "--exclude",
                "upgate-e2e",
                "--lib",
                "--bins",
                "--manifest-path",
            ])
            .arg(&manifest);
        command.arg("--target-dir").arg(&target);
        // The variables cargo sets for this test process are not the build's: a build script
        // that tracks one (ring's tracks CARGO_MANIFEST_DIR) would rebuild, and then the outer
        // `cargo test` would rebuild it back, on every run.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_TARGET_TMPDIR",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .iter()
            .any(|prefix| name.starts_with(prefix))
            {
                command.env_remove(&name);
            }
        }
        if profile_dir.file_name().is_some_and(|name| name == "release") {
            command.arg("--release");
        }
        let status = command.status().expect("run cargo build");
        assert!(status.success(), "cargo build --workspace failed");
        profile_dir
    })
}

/// Path of the built daemon.
pub fn upgate_binary() -> PathBuf {
    build_workspace().join("upgate")
}

/// The file name of the plugin called `name` (`libupgate_plugin_<name>.so` on Linux).
pub fn plugin_file(name: &str) -> String {
    format!(
        "{}upgate_plugin_{}{}",
        std::env::consts::DLL_PREFIX,
        name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    )
}

/// The ABI-mismatch fixture (`tests/fixtures/abi-mismatch`: a plugin built against the
/// previous ABI, version 1), built once per test process into `target/fixtures`. It is not a workspace
/// member, so no build of the workspace puts it where the daemon looks for plugins.
pub fn abi_mismatch_plugin() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let target = target_dir().parent().expect("target dir").join("fixtures");
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/abi-mismatch/Cargo.toml");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--locked", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of {} failed", manifest.display());
        let built = target.join("debug").join(plugin_file("abi-mismatch"));
        assert!(built.is_file(), "{} was not built", built.display());
        built
    })
}

/// A running daemon. Killed (SIGKILL) when dropped, unless stopped first.
pub struct Daemon {
    pub child: Child,
    pub base_url: String,
    pub metrics_url: String,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// Output lines (stdout and stderr) collected so far.
    pub output: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// The config the tests start from: one tenant `demo` (key `demo-key`) on the local
/// provider (giving `file://` URLs of its files), generous plan. `extra` is appended verbatim (more plans, providers, tenants
/// must go in their sections: use [`Daemon::start_with`] for full control).
pub fn default_config(dir: &Path) -> String {
    format!(
        "server:\n  listen: 127.0.0.1:0\n  metrics_listen: 127.0.0.1:0\n  data_dir: {data}\n  plugin_dir: {plugins}\n  idle_timeout: 2s\n  shutdown_timeout: 10s\n  disk_free_floor: 1MiB\n\
plans:\n  default:\n    max_file_size: 1MiB\n\
providers:\n  disk:\n    plugin: local\n    settings:\n      root: {files}\n      public_base_url: file://{files}\n\
tenants:\n  demo:\n    plan: default\n    provider: disk\n    keys: [demo-key]\n",
        data = dir.join("data").display(),
        plugins = build_workspace().display(),
        files = dir.join("files").display(),
    )
}

/// `config` with a provider `xo` (the `korexo` plugin) forwarding to `mock`, a Kore XO mock
/// upstream, and the `demo` tenant moved onto it. Its clients may name app `app-1` and
/// environment `draft` beside the configured `app-settings` / `live`.
pub fn with_korexo_upstream(config: &str, mock: &crate::mock::MockUpstream) -> String {
    config
        .replace(
            "providers:\n",
            &format!(
                "providers:\n  xo:\n    plugin: korexo\n    settings:\n      base_url: {}\n      api_key: {}\n      app_id: app-settings\n      env_name: live\n      allowed_app_ids: [app-1]\n      allowed_env_names: [draft]\n",
                mock.base_url(),
                mock.api_key()
            ),
        )
        .replacen("    provider: disk\n", "    provider: xo\n", 1)
}

impl Daemon {
    /// Starts with [`default_config`].
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let config = default_config(&dir);
        Self::start_in(dir, &config)
    }

    /// Starts with a config built from the temp dir (for paths) by `config`.
    pub fn start_with(config: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let text = config(&dir);
        Self::start_in(dir, &text)
    }

    /// Starts in `dir` with the config text `config`.
    pub fn start_in(dir: PathBuf, config: &str) -> Self {
        let config_path = dir.join("config.yaml");
        std::fs::write(&config_path, config).expect("write config");
        Self::spawn(dir, config_path, &[])
    }

    /// Starts the daemon on an existing config (e.g. after a restart), with extra env vars.
    pub fn spawn(dir: PathBuf, config_path: PathBuf, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(upgate_binary());
        command.arg("serve").arg("--config").arg(&config_path);
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start upgate");
        let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for stream in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let output = output.clone();
            let lines_tx = lines_tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lock().unwrap().push(line.clone());
                    let _ = lines_tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut base_url, mut metrics_url) = (None, None);
        while base_url.is_none() || metrics_url.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines_rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("upgate: listening on ") {
                        base_url = Some(url.to_owned());
                    } else if let Some(url) = line.strip_prefix("upgate: metrics on ") {
                        metrics_url = Some(url.to_owned());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("upgate did not start: {:?}", output.lock().unwrap());
                }
            }
        }
        Self {
            child,
            base_url: base_url.unwrap_or_default(),
            metrics_url: metrics_url.unwrap_or_default(),
            dir,
            config_path,
            output,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Where the local provider of [`default_config`] stores files.
    pub fn files_dir(&self) -> PathBuf {
        self.dir.join("files")
    }

    /// Opens the daemon's SQLite database (read-only use).
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.data_dir().join("upgate.db")).expect("open db")
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, signal: i32) {
        // The shell's builtin `kill` does what libc::kill does without unsafe, and needs no
        // package (procps' /bin/kill is missing from minimal images).
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -{signal} {}", self.child.id()))
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal}");
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Files in the spool (partial uploads and uploads waiting for async delivery).
    pub fn spool_files(&self) -> usize {
        std::fs::read_dir(self.data_dir().join("spool"))
            .expect("the spool directory")
            .count()
    }

    /// Everything the daemon printed so far.
    pub fn log(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// The current value of a metric series (the exact text before the value, e.g.
    /// `upgate_uploads_total{dialect="dify",outcome="received",provider="disk"}`), 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        let text = get(&format!("{}/metrics", self.metrics_url)).text;
        text.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A multipart/form-data body.
#[derive(Default, Clone)]
pub struct Form {
    parts: Vec<u8>,
}

pub const BOUNDARY: &str = "upgate-test-boundary-7MA4YWxkTrZu0gW";

impl Form {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn text(mut self, name: &str, value: &str) -> Self {
        self.parts.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
        self
    }

    /// A file part; `filename` goes into the header byte for byte (UTF-8).
    pub fn file(mut self, name: &str, filename: &str, content_type: &str, bytes: &[u8]) -> Self {
        self.parts.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
            )
            .as_bytes(),
        );
        self.parts.extend_from_slice(bytes);
        self.parts.extend_from_slice(b"\r\n");
        self
    }

    pub fn body(&self) -> Vec<u8> {
        let mut body = self.parts.clone();
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        body
    }

    pub fn content_type() -> String {
        format!("multipart/form-data; boundary={BOUNDARY}")
    }
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .new_agent()
}

fn reply(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut response = response.unwrap_or_else(|e| panic!("request failed: {e}"));
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    Reply {
        status,
        headers,
        text,
    }
}

/// GET `url`.
pub fn get(url: &str) -> Reply {
    reply(agent().get(url).call())
}

/// A request with headers and an optional body.
pub fn send(method: &str, url: &str, headers: &[(&str, &str)], body: Option<(&str, Vec<u8>)>) -> Reply {
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let agent = agent();
    match body {
        Some((content_type, bytes)) => {
            let request = builder
                .header("content-type", content_type)
                .body(bytes)
                .expect("request");
            reply(agent.run(request))
        }
        None => reply(agent.run(builder.body(()).expect("request"))),
    }
}

/// POST a multipart form.
pub fn post_form(url: &str, headers: &[(&str, &str)], form: &Form) -> Reply {
    send("POST", url, headers, Some((&Form::content_type(), form.body())))
}

/// POST JSON.
pub fn post_json(url: &str, headers: &[(&str, &str)], value: &Value) -> Reply {
    send(
        "POST",
        url,
        headers,
        Some(("application/json", value.to_string().into_bytes())),
    )
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())))
}

/// A tiny valid PNG (1×1, RGBA): every chunk's CRC holds, nothing follows IEND, as the content
/// check requires.
pub const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89\
\0\0\0\x0bIDATx\xdac`\0\x02\0\0\x05\0\x01\xe9\xfa\xdc\xd8\0\0\0\0IEND\xaeB`\x82";
/// The start of an ELF executable.
pub const ELF: &[u8] = &[
    0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0x3e, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x40, 0, 0x38, 0, 1, 0, 0x40, 0, 0,
    0, 0, 0,
];

/// Polls `check` until it is true or `limit` passes.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    check()
}

/// An upload sent by hand over a raw TCP connection, so a test can pause mid-body.
pub struct RawUpload {
    pub stream: std::net::TcpStream,
    body: Vec<u8>,
    sent: usize,
}

impl RawUpload {
    /// Sends the request head of a Dify upload of `form` with `key`; nothing of the body yet.
    pub fn start(base_url: &str, path: &str, key_header: (&str, &str), form: &Form) -> Self {
        use std::io::Write;
        let address = base_url.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let body = form.body();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {address}\r\n{}: {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
            key_header.0,
            key_header.1,
            Form::content_type(),
            body.len()
        );
        stream.write_all(head.as_bytes()).expect("send head");
        Self {
            stream,
            body,
            sent: 0,
        }
    }

    /// Sends the next `n` bytes of the body (or what is left).
    pub fn send(&mut self, n: usize) -> std::io::Result<()> {
        use std::io::Write;
        let end = self.sent.saturating_add(n).min(self.body.len());
        self.stream.write_all(&self.body[self.sent..end])?;
        self.sent = end;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.body.len()
    }

    /// Bytes of the body sent so far.
    pub fn sent(&self) -> usize {
        self.sent
    }

    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    /// Sends the rest and reads the status line and body of the answer.
    pub fn finish(mut self) -> std::io::Result<(u16, String)> {
        self.send(usize::MAX)?;
        Self::read_answer(&mut self.stream)
    }

    /// Reads whatever answer arrives (status, whole text), without sending more.
    pub fn read_answer(stream: &mut std::net::TcpStream) -> std::io::Result<(u16, String)> {
        use std::io::Read;
        let mut answer = Vec::new();
        let mut buffer = [0u8; 8192];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&answer);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().to_owned())
                            })
                            .and_then(|v| v.parse::<usize>().ok());
                        if length.is_some_and(|length| body.len() >= length) {
                            break;
                        }
                    }
                }
                Err(error) => {
                    if answer.is_empty() {
                        return Err(error);
                    }
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok((status, text))
    }
}

/// Runs the `upgate` binary with `args` and returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(upgate_binary())
        .args(args)
        .output()
        .expect("run upgate");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A port of 127.0.0.1 nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Sends `signal` (`STOP`, `CONT`, `KILL`, ...) to the processes `pids` with the shell's
/// `kill` (no package, no unsafe); whether that worked for all of them (one that has already
/// exited is a `false`, not a message on the test's output).
pub fn signal_pids(pids: &[String], signal: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("kill -{signal} {}", pids.join(" ")))
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Installs Debian `package` with apt-get (updating the package lists once if the first try
/// fails); panics with `why` when it cannot be had: a test fails, never skips.
pub fn apt_install(package: &str, why: &str) {
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|status| status.success())
    };
    if !install() {
        let _ = Command::new("apt-get").args(["update", "-q"]).status();
        assert!(install(), "{why}: `apt-get install {package}` failed");
    }
}

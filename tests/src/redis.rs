//! A real Redis for tests: `redis-server` on a free port of 127.0.0.1, its files in a temp
//! dir, nothing saved (`--save "" --appendonly no`), stopped when dropped.
//!
//! What flows through here: Debian's `redis-server` (installed with apt-get when it is
//! missing; a test fails, never skips, when it cannot be had), started as a child process
//! that [`RedisServer::stop`] kills and [`RedisServer::start_again`] starts on the same port
//! (an outage, with every key lost, as a restart without persistence loses them) or
//! [`RedisServer::freeze`] stops answering (a hung host), and commands sent through
//! `redis-cli` ([`RedisServer::cli`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `redis-server`, installed first if there is none.
pub fn server_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(found) = find("redis-server") {
            return found;
        }
        crate::harness::apt_install("redis-server", "Redis is not installed");
        find("redis-server").expect("apt-get installed redis-server, but there is no redis-server")
    })
}

/// `program` on the PATH (or in /usr/bin, where Debian puts Redis).
fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// A Redis server of its own, in a temp dir. Stopped (and its files removed) when dropped.
pub struct RedisServer {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// TLS only on `port` (no plaintext port), with the test certificate for 127.0.0.1.
    tls: bool,
}

impl RedisServer {
    /// Starts a server on a free port.
    pub fn start() -> Self {
        Self::create(false)
    }

    /// [`RedisServer::start`], speaking TLS only on its port, with the test certificate for
    /// 127.0.0.1 signed by the test CA ([`crate::tls::ca_file`]).
    pub fn start_with_tls() -> Self {
        Self::create(true)
    }

    fn create(tls: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("upgate-redis-")
            .tempdir()
            .expect("temp dir");
        let mut server = Self {
            dir,
            port: crate::harness::free_port(),
            child: None,
            tls,
        };
        server.start_again();
        server
    }

    /// Starts the server again after [`RedisServer::stop`], on the same port (empty: nothing
    /// is saved).
    pub fn start_again(&mut self) {
        if self.child.is_some() {
            return;
        }
        let log = std::fs::File::create(self.log_path()).expect("redis log file");
        let mut command = Command::new(server_binary());
        if self.tls {
            let fixtures = crate::tls::fixtures();
            command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(fixtures.join("server.pem"))
                .arg("--tls-key-file")
                .arg(fixtures.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(fixtures.join("ca.pem"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            command.args(["--port", &self.port.to_string()]);
        }
        let child = command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("redis log file"))
            .stderr(log)
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.cli(&["PING"]) != "PONG" {
            assert!(
                Instant::now() < deadline,
                "Redis does not answer on port {}: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stops the server (SIGKILL: connections are cut off, every key is lost) and waits
    /// until nothing listens on its port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, as with a
    /// hung host. [`RedisServer::thaw`] resumes it.
    pub fn freeze(&self) {
        assert!(self.signal("STOP"), "cannot freeze Redis");
    }

    pub fn thaw(&self) {
        assert!(self.signal("CONT"), "cannot thaw Redis");
    }

    fn signal(&self, signal: &str) -> bool {
        let Some(child) = &self.child else {
            return false;
        };
        crate::harness::signal_pids(&[child.id().to_string()], signal)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Runs one command with `redis-cli` and returns its raw output, trimmed (empty when the
    /// server does not answer).
    pub fn cli(&self, args: &[&str]) -> String {
        let cli = server_binary().with_file_name("redis-cli");
        let mut command = Command::new(cli);
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--raw"]);
        if self.tls {
            command.arg("--tls").arg("--cacert").arg(crate::tls::ca_file());
        }
        let output = command.args(args).stdin(Stdio::null()).output();
        match output {
            Ok(output) if output.status.success() => {
                String::from_utf8_lossy(&output.stdout).trim().to_owned()
            }
            _ => String::new(),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a frozen server too.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

//! A real PostgreSQL for tests: `initdb` into a temp dir, `postgres` on a free port of
//! 127.0.0.1 with its unix socket in the same temp dir and trust authentication, stopped
//! when dropped.
//!
//! What flows through here: Debian's `postgresql` (installed with apt-get when `initdb` is
//! missing; a test fails, never skips, when it cannot be had), run as the `postgres` user
//! when the tests run as root (PostgreSQL refuses to run as root), and SQL sent through
//! `psql` ([`PostgresServer::psql`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The directory of Debian's PostgreSQL programs (`initdb`, `pg_ctl`, `postgres`, `psql`):
/// the newest under /usr/lib/postgresql, installed first if there is none.
pub fn bin_dir() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(found) = find_bin_dir() {
            return found;
        }
        crate::harness::apt_install("postgresql", "PostgreSQL is not installed");
        find_bin_dir().expect("apt-get installed postgresql, but no /usr/lib/postgresql/*/bin/initdb")
    })
}

fn find_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// `program` of the PostgreSQL bin dir, run as the `postgres` user when we are root.
fn server_command(program: &str) -> Command {
    let path = bin_dir().join(program);
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        command
    } else {
        Command::new(path)
    }
}

fn check(output: std::io::Result<Output>, what: &str) -> Output {
    let output = output.unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A PostgreSQL server of its own, in a temp dir. Stopped (and its files removed) when
/// dropped.
pub struct PostgresServer {
    dir: tempfile::TempDir,
    port: u16,
    running: bool,
}

impl PostgresServer {
    /// Creates a cluster (superuser `postgres`, trust authentication) and starts it.
    pub fn start() -> Self {
        Self::create(false)
    }

    /// [`PostgresServer::start`], accepting TCP connections over TLS only (`hostnossl`
    /// rejected), with the test certificate for 127.0.0.1 signed by the test CA
    /// ([`crate::tls::ca_file`]).
    pub fn start_with_tls() -> Self {
        Self::create(true)
    }

    fn create(tls: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("upgate-pg-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir(dir.path().join("socket")).expect("socket dir");
        if running_as_root() {
            check(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir.path())
                    .output(),
                "chown the temp dir to postgres",
            );
        }
        check(
            server_command("initdb")
                .args([
                    "--no-sync",
                    "--auth=trust",
                    "--username=postgres",
                    "--encoding=UTF8",
                    "-D",
                ])
                .arg(dir.path().join("data"))
                .output(),
            "initdb",
        );
        if tls {
            let data = dir.path().join("data");
            for file in ["server.pem", "server.key"] {
                std::fs::copy(crate::tls::fixtures().join(file), data.join(file))
                    .expect("copy the TLS fixture");
            }
            // PostgreSQL refuses a key others can read, or that its user does not own.
            std::fs::set_permissions(
                data.join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .expect("chmod server.key");
            if running_as_root() {
                check(
                    Command::new("chown")
                        .args(["postgres:postgres", "server.pem", "server.key"])
                        .current_dir(&data)
                        .output(),
                    "chown the TLS files to postgres",
                );
            }
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("postgresql.conf"))
                .expect("postgresql.conf");
            std::io::Write::write_all(
                &mut conf,
                b"ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n",
            )
            .expect("write postgresql.conf");
            let hba = std::fs::read_to_string(data.join("pg_hba.conf")).expect("pg_hba.conf");
            std::fs::write(
                data.join("pg_hba.conf"),
                format!("hostnossl all all all reject\n{hba}"),
            )
            .expect("write pg_hba.conf");
        }
        let mut server = Self {
            dir,
            port: crate::harness::free_port(),
            running: false,
        };
        server.start_again();
        server
    }

    /// Starts the server again after [`PostgresServer::stop`], on the same port.
    pub fn start_again(&mut self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200",
            self.port,
            self.dir.path().join("socket").display()
        );
        let started = server_command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.log_path())
            .args(["-o", &options, "-w", "-t", "60", "start"])
            .output();
        let started = started.expect("run pg_ctl start");
        assert!(
            started.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&started.stderr),
            self.log()
        );
        self.running = true;
        // pg_ctl -w waits for the server to accept connections; make sure TCP does too.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL does not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown: sessions are cut off), keeping its data.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let _ = server_command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "-t", "60", "stop"])
            .output();
        self.running = false;
    }

    /// Freezes the server (SIGSTOP to the postmaster and every backend): connections stay
    /// open and nothing answers, as with a hung host. [`PostgresServer::thaw`] resumes it.
    pub fn freeze(&self) {
        assert!(self.signal_all("STOP"), "cannot freeze PostgreSQL");
    }

    pub fn thaw(&self) {
        assert!(self.signal_all("CONT"), "cannot thaw PostgreSQL");
    }

    /// Sends `signal` to the postmaster and its children; whether that worked.
    fn signal_all(&self, signal: &str) -> bool {
        let Ok(pid_file) = std::fs::read_to_string(self.dir.path().join("data").join("postmaster.pid"))
        else {
            return false;
        };
        let postmaster = pid_file.lines().next().unwrap_or_default().trim().to_owned();
        // The postmaster's children, from /proc (no procps needed).
        let mut pids = vec![postmaster.clone()];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...: the comm may hold spaces, so split after its `)`.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if parent == Some(postmaster.as_str()) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        crate::harness::signal_pids(&pids, signal)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A new, empty database.
    pub fn create_database(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
    }

    /// Runs `sql` in `database` with psql and returns its unaligned, tuples-only output
    /// (one line per row, columns separated by `|`), trimmed.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let output = check(
            Command::new(bin_dir().join("psql"))
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                ])
                .args(["-p", &self.port.to_string(), "-d", database, "-c", sql])
                .output(),
            &format!("psql -c {sql:?}"),
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.running {
            // A test that failed while the server was frozen must not leave it stopped.
            self.signal_all("CONT");
            let _ = server_command("pg_ctl")
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                .output();
        }
    }
}

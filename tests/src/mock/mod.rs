//! Mock upstreams for the five vendor upload APIs (dify, kore, maiagent, korexo, beam).
//!
//! Each mock answers like the real service (paths, auth headers, required fields, status
//! codes and JSON shapes from `shared/DIALECTS.md`) and records what it received. Uploads
//! are never held in memory: file parts stream through sha256 (kore chunks also go to a
//! temporary directory, to be assembled at `complete`). Faults can be staged per request:
//! [`MockUpstream::fail_next`], [`MockUpstream::rate_limit_next`], [`MockUpstream::hang`],
//! [`MockUpstream::reset_next`].
//!
//! ```no_run
//! use upgate_e2e::mock::{MockUpstream, Vendor};
//! let mock = MockUpstream::start(Vendor::Dify, "app-key");
//! // point a client or a provider plugin at mock.base_url() ...
//! let received = mock.received();
//! ```
//!
//! The `mock-upstream` binary runs one of them standalone, for benchmarks.

pub mod checks;
mod http;
mod multipart;
#[cfg(test)]
mod tests;
mod vendors;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use self::http::{Answer, BodyReader, Head};
pub use self::vendors::wrong_key_reason;

/// How many requests [`MockUpstream::received`] remembers (the oldest are dropped).
pub const RECEIVED_CAPACITY: usize = 10_000;
/// How long an idle keep-alive connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// The five vendor APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vendor {
    Dify,
    Kore,
    Maiagent,
    Korexo,
    Beam,
}

impl Vendor {
    pub const ALL: [Vendor; 5] = [
        Vendor::Dify,
        Vendor::Kore,
        Vendor::Maiagent,
        Vendor::Korexo,
        Vendor::Beam,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Vendor::Dify => "dify",
            Vendor::Kore => "kore",
            Vendor::Maiagent => "maiagent",
            Vendor::Korexo => "korexo",
            Vendor::Beam => "beam",
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Vendor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Vendor::ALL
            .into_iter()
            .find(|vendor| vendor.name().eq_ignore_ascii_case(text))
            .ok_or_else(|| format!("unknown vendor {text:?} (dify, kore, maiagent, korexo, beam)"))
    }
}

/// A file part as the mock received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFile {
    /// The form field name (`file`, `files`).
    pub field: String,
    /// The name the server uses: `filename*` decoded when sent, else `filename`, as bytes.
    pub filename: Vec<u8>,
    /// The quoted `filename` parameter exactly as sent (unescaped), as bytes.
    pub filename_raw: Vec<u8>,
    pub content_type: Option<String>,
    pub size: u64,
    /// Lower-case hex sha256 of the part's content.
    pub sha256: String,
}

/// Which kore chunk a request carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkInfo {
    pub session_id: String,
    pub chunk_number: u64,
}

/// One request as the mock saw it, and what it answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// Header names lower-cased, in the order sent.
    pub headers: Vec<(String, String)>,
    /// Text form fields, in order.
    pub fields: Vec<(String, String)>,
    pub files: Vec<ReceivedFile>,
    /// A JSON body (kore's session start).
    pub json: Option<Value>,
    pub chunk: Option<ChunkInfo>,
    /// Body bytes read (after de-chunking).
    pub body_bytes: u64,
    /// The status answered; 0 when the connection was reset instead.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The first file part.
    pub fn file(&self) -> Option<&ReceivedFile> {
        self.files.first()
    }
}

/// A file the mock accepted and would serve (for kore chunked uploads: the assembled file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: String,
    pub filename: Vec<u8>,
    pub size: u64,
    pub sha256: String,
    pub url: String,
    /// Vendor scope: korexo `app/env`, beam workspace id, dify `user`, else empty.
    pub scope: String,
}

#[derive(Debug, Default)]
struct Faults {
    reset: usize,
    /// Requests answered normally before the `fail` ones.
    pass: usize,
    fail: usize,
    fail_status: u16,
    rate_limit: usize,
    retry_after_secs: u64,
    hang: Duration,
    /// Requests acted on whose answer then breaks off after its head.
    broken_answers: usize,
    /// An answer (status, raw body) given to the next request after acting on it.
    replaced: Option<(u16, Vec<u8>)>,
}

#[derive(Debug)]
struct KoreSession {
    total_chunks: u64,
    file_name: String,
    file_size: u64,
    dir: PathBuf,
    /// chunk number → size
    chunks: HashMap<u64, u64>,
}

#[derive(Debug, Default)]
struct State {
    received: VecDeque<Received>,
    faults: Faults,
    stored: Vec<Stored>,
    sessions: HashMap<String, KoreSession>,
    /// Kore's single-upload limit when a test set one (else the real 25 MB).
    kore_single_upload_limit: Option<u64>,
    /// Beam's `uploadStatus` for the next uploads' records (the API's own: `processing`).
    beam_upload_status: Option<&'static str>,
}

struct Shared {
    vendor: Vendor,
    api_key: String,
    origin: String,
    spool: tempfile::TempDir,
    state: Mutex<State>,
    stop: AtomicBool,
    /// Request body bytes read so far, requests in progress included.
    body_bytes_seen: AtomicU64,
    /// Requests whose body broke off (the client reset or closed the connection mid-body).
    broken_bodies: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record(&self, received: Received) {
        let mut state = self.state();
        if state.received.len() == RECEIVED_CAPACITY {
            state.received.pop_front();
        }
        state.received.push_back(received);
    }
}

/// A running mock upstream. Stops (no new connections) when dropped.
pub struct MockUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockUpstream")
            .field("vendor", &self.shared.vendor)
            .field("addr", &self.addr)
            .finish()
    }
}

impl MockUpstream {
    /// Starts a mock of `vendor` on 127.0.0.1 (a free port) that accepts `api_key`.
    ///
    /// # Panics
    /// If no socket or temporary directory can be had.
    pub fn start(vendor: Vendor, api_key: &str) -> MockUpstream {
        Self::start_on(vendor, api_key, "127.0.0.1:0").expect("start mock upstream")
    }

    /// Starts a mock listening on `listen`.
    pub fn start_on(vendor: Vendor, api_key: &str, listen: impl ToSocketAddrs) -> io::Result<MockUpstream> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            vendor,
            api_key: api_key.to_owned(),
            origin: format!("http://{addr}"),
            spool: tempfile::Builder::new().prefix("mock-upstream-").tempdir()?,
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            body_bytes_seen: AtomicU64::new(0),
            broken_bodies: AtomicU64::new(0),
        });
        let accept_shared = shared.clone();
        let accept = std::thread::Builder::new()
            .name(format!("mock-{vendor}-accept"))
            .spawn(move || accept_loop(listener, accept_shared))?;
        Ok(MockUpstream {
            shared,
            addr,
            accept: Some(accept),
        })
    }

    pub fn vendor(&self) -> Vendor {
        self.shared.vendor
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the server's origin.
    pub fn origin(&self) -> String {
        self.shared.origin.clone()
    }

    /// The base URL a client of the real API would configure: for dify the origin plus `/v1`,
    /// for the others the origin.
    pub fn base_url(&self) -> String {
        match self.shared.vendor {
            Vendor::Dify => format!("{}/v1", self.shared.origin),
            _ => self.shared.origin.clone(),
        }
    }

    pub fn api_key(&self) -> &str {
        &self.shared.api_key
    }

    /// Every request so far (the last [`RECEIVED_CAPACITY`]), oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.shared.state().received.iter().cloned().collect()
    }

    /// Request body bytes read so far, requests still arriving included.
    pub fn body_bytes_seen(&self) -> u64 {
        self.shared.body_bytes_seen.load(Ordering::SeqCst)
    }

    /// Requests whose body broke off before its end (nothing of them was kept).
    pub fn broken_bodies(&self) -> u64 {
        self.shared.broken_bodies.load(Ordering::SeqCst)
    }

    pub fn clear_received(&self) {
        self.shared.state().received.clear();
    }

    /// The files currently stored.
    pub fn stored(&self) -> Vec<Stored> {
        self.shared.state().stored.clone()
    }

    /// Open kore upload sessions.
    pub fn open_sessions(&self) -> usize {
        self.shared.state().sessions.len()
    }

    /// Answers the next `n` requests with `status` (in the vendor's error shape), without
    /// acting on them.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.fail_after(0, n, status);
    }

    /// Lets `pass` requests through, then answers the `n` after them with `status`.
    pub fn fail_after(&self, pass: usize, n: usize, status: u16) {
        let mut state = self.shared.state();
        state.faults.pass = pass;
        state.faults.fail = n;
        state.faults.fail_status = status;
    }

    /// Answers the next `n` requests with 429 and `Retry-After: retry_after_secs`.
    /// Kore: refuse single uploads over `bytes` (the real service's limit is 25 MB) with
    /// 413, so a test with small files can tell a chunked upload from a single one.
    /// Beam: the `uploadStatus` the next answers give their records (`failed`, say).
    pub fn beam_upload_status(&self, status: &'static str) {
        self.shared.state().beam_upload_status = Some(status);
    }

    pub fn limit_single_upload(&self, bytes: u64) {
        self.shared.state().kore_single_upload_limit = Some(bytes);
    }

    pub fn rate_limit_next(&self, n: usize, retry_after_secs: u64) {
        let mut state = self.shared.state();
        state.faults.rate_limit = n;
        state.faults.retry_after_secs = retry_after_secs;
    }

    /// Waits `delay` before writing each answer (the request is read and acted on first),
    /// until set back to zero.
    pub fn hang(&self, delay: Duration) {
        self.shared.state().faults.hang = delay;
    }

    /// Acts on the next `n` requests (a file is stored), then sends the head of their
    /// answer and half its body, and closes the connection: the answer breaks off.
    pub fn break_next_answers(&self, n: usize) {
        self.shared.state().faults.broken_answers = n;
    }

    /// Acts on the next request, then answers it with `status` and `body` as they are
    /// (JSON or not) instead of the vendor's answer.
    pub fn replace_next_answer(&self, status: u16, body: &[u8]) {
        self.shared.state().faults.replaced = Some((status, body.to_vec()));
    }

    /// Resets (RST) the connection of the next `n` requests after reading their heads,
    /// without answering or acting on them.
    pub fn reset_next(&self, n: usize) {
        self.shared.state().faults.reset = n;
    }

    /// Serves until the process ends (for the standalone binary).
    pub fn wait(mut self) {
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Lower-case hex sha256 of `bytes` (for comparing with [`ReceivedFile::sha256`]).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("mock-{}-conn", shared.vendor))
            .spawn(move || serve_connection(&shared, stream));
        if spawned.is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The request body, reduced to what the mocks look at.
#[derive(Debug)]
enum Content {
    None,
    Form(multipart::Form),
    Json(Value),
    /// A body of another type, or one that could not be parsed (the reason).
    Other(Option<String>),
}

/// A request handed to a vendor.
pub(crate) struct Incoming {
    head: Head,
    content: Content,
    chunk: Option<ChunkInfo>,
}

impl Incoming {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    fn path(&self) -> &str {
        self.head.path()
    }

    fn field(&self, name: &str) -> Option<&str> {
        match &self.content {
            Content::Form(form) => form
                .fields
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    fn files(&self) -> &[multipart::FilePart] {
        match &self.content {
            Content::Form(form) => &form.files,
            _ => &[],
        }
    }

    fn files_mut(&mut self) -> &mut [multipart::FilePart] {
        match &mut self.content {
            Content::Form(form) => &mut form.files,
            _ => &mut [],
        }
    }

    fn take_files(&mut self) -> Vec<multipart::FilePart> {
        match &mut self.content {
            Content::Form(form) => std::mem::take(&mut form.files),
            _ => Vec::new(),
        }
    }
}

fn received_of(incoming: &Incoming, files: &[multipart::FilePart], body_bytes: u64, status: u16) -> Received {
    let (fields, json) = match &incoming.content {
        Content::Form(form) => (form.fields.clone(), None),
        Content::Json(value) => (Vec::new(), Some(value.clone())),
        _ => (Vec::new(), None),
    };
    Received {
        method: incoming.head.method.clone(),
        path: incoming.path().to_owned(),
        headers: incoming.head.headers.clone(),
        fields,
        files: files
            .iter()
            .map(|file| ReceivedFile {
                field: file.field.clone(),
                filename: file.filename.clone(),
                filename_raw: file.filename_raw.clone(),
                content_type: file.content_type.clone(),
                size: file.size,
                sha256: file.sha256.clone(),
            })
            .collect(),
        json,
        chunk: incoming.chunk.clone(),
        body_bytes,
        status,
    }
}

fn serve_connection(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    loop {
        let head = match http::read_head(&mut reader) {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(error) if error.kind() == io::ErrorKind::InvalidData => {
                let answer = vendors::error(shared.vendor, 400, "bad_request", &error.to_string());
                let _ = http::write_answer(&mut writer, &answer, true);
                return;
            }
            Err(_) => return,
        };
        if !serve_request(shared, head, &mut reader, &mut writer) {
            return;
        }
    }
}

/// Serves one request; false when the connection must close.
fn serve_request(
    shared: &Shared,
    head: Head,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
) -> bool {
    let keep_alive = head.keep_alive();
    let (reset, hang) = {
        let mut state = shared.state();
        let reset = state.faults.reset > 0;
        if reset {
            state.faults.reset -= 1;
        }
        (reset, state.faults.hang)
    };
    if reset {
        let incoming = Incoming {
            head,
            content: Content::None,
            chunk: None,
        };
        shared.record(received_of(&incoming, &[], 0, 0));
        // SO_LINGER 0: closing sends RST instead of FIN.
        // Both handles are dropped when the connection's thread returns.
        let _ = socket2::SockRef::from(&*writer).set_linger(Some(Duration::ZERO));
        return false;
    }

    let framing = match http::framing(&head) {
        Ok(framing) => framing,
        Err(error) => {
            let answer = vendors::error(shared.vendor, 400, "bad_request", &error.to_string());
            let _ = http::write_answer(writer, &answer, true);
            return false;
        }
    };
    if framing != http::Framing::Length(0)
        && head
            .header("expect")
            .is_some_and(|value| value.eq_ignore_ascii_case("100-continue"))
        && http::write_continue(writer).is_err()
    {
        return false;
    }
    let mut body = Counted {
        inner: BodyReader::new(reader, framing),
        seen: &shared.body_bytes_seen,
    };
    let content = match read_content(shared, &head, &mut body) {
        Ok(content) => content,
        Err(error) if error.kind() == io::ErrorKind::InvalidData => Content::Other(Some(error.to_string())),
        Err(_) => {
            // The client went away inside the body: nothing is kept.
            shared.broken_bodies.fetch_add(1, Ordering::SeqCst);
            return false;
        }
    };
    let malformed = matches!(content, Content::Other(Some(_)));
    if !malformed && io::copy(&mut body, &mut io::sink()).is_err() {
        shared.broken_bodies.fetch_add(1, Ordering::SeqCst);
        return false;
    }
    let body = body.inner;
    let body_bytes = body.total;
    let finished = body.is_done();

    let mut incoming = Incoming {
        head,
        content,
        chunk: None,
    };
    let mut answer = match fault_answer(shared) {
        Some(answer) => answer,
        None => vendors::handle(shared, &mut incoming),
    };
    let (broken, replaced) = {
        let mut state = shared.state();
        let broken = state.faults.broken_answers > 0;
        state.faults.broken_answers = state.faults.broken_answers.saturating_sub(1);
        (broken, state.faults.replaced.take())
    };
    if let Some((status, body)) = replaced {
        answer.status = status;
        answer.body = body;
    }
    let files = incoming.take_files();
    shared.record(received_of(&incoming, &files, body_bytes, answer.status));
    drop(files);
    if !hang.is_zero() {
        std::thread::sleep(hang);
    }
    if broken {
        let _ = http::write_broken_answer(writer, &answer);
        return false;
    }
    let close = !keep_alive || !finished || malformed;
    http::write_answer(writer, &answer, close).is_ok() && !close
}

/// A body reader that counts what it reads into the mock's total as it goes.
struct Counted<'s, R> {
    inner: R,
    seen: &'s AtomicU64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.seen.fetch_add(read as u64, Ordering::SeqCst);
        Ok(read)
    }
}

fn fault_answer(shared: &Shared) -> Option<Answer> {
    let mut state = shared.state();
    let faults = &mut state.faults;
    if faults.fail > 0 && faults.pass > 0 {
        faults.pass -= 1;
    } else if faults.fail > 0 {
        faults.fail -= 1;
        let status = faults.fail_status;
        return Some(vendors::error(
            shared.vendor,
            status,
            "internal_server_error",
            "mock upstream failure",
        ));
    }
    if faults.rate_limit > 0 {
        faults.rate_limit -= 1;
        let secs = faults.retry_after_secs;
        let answer = vendors::error(
            shared.vendor,
            429,
            "too_many_requests",
            &format!("Request was throttled. Expected available in {secs} seconds."),
        );
        return Some(answer.with_header("retry-after", secs.to_string()));
    }
    None
}

/// Reads the body: multipart forms are parsed (file parts hashed, kore chunks spooled),
/// JSON is parsed, anything else is drained.
fn read_content(shared: &Shared, head: &Head, body: &mut impl Read) -> io::Result<Content> {
    let content_type = head.header("content-type").unwrap_or_default();
    if let Some(boundary) = multipart::boundary_of(content_type) {
        let spool = vendors::spools_files(shared.vendor, head).then(|| shared.spool.path());
        return multipart::parse(body, &boundary, spool).map(Content::Form);
    }
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" {
        let mut bytes = Vec::new();
        body.take(1 << 20).read_to_end(&mut bytes)?;
        return Ok(match serde_json::from_slice(&bytes) {
            Ok(value) => Content::Json(value),
            Err(error) => Content::Other(Some(format!("invalid JSON body: {error}"))),
        });
    }
    let drained = io::copy(body, &mut io::sink())?;
    Ok(if drained == 0 {
        Content::None
    } else {
        Content::Other(None)
    })
}

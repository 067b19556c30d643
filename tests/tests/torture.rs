//! Torture: the real daemon and its real plugins attacked the way a hostile network and a
//! hostile machine would. A seeded raw-socket fuzzer over every dialect's requests (bit flips,
//! truncation, broken framing, multipart and header abuse, path traversal, pipelined garbage)
//! and what it found (pipelined answers framed for the wrong request, plain text taken for a
//! binary format); the answers of requests the HTTP parser refuses before any route (issue
//! #10); `kill -9` under concurrent load and during sync and async deliveries, restarts on the
//! same data_dir; a small tmpfs filled to the last byte; many slowloris connections at once
//! and a trickled body on a kept-alive connection (what `slowloris.rs` and `hardening.rs` do
//! not already cover); races on one upload, one chunk, one session and one tus offset, in
//! rounds.
//!
//! Every draw (requests, mutations, sizes, contents, kill moments) comes from the seed, which
//! a failing test prints with the command that reruns it; where a kill lands in the daemon's
//! work, and how threads interleave, is up to the machine. Knobs (environment):
//! `UPGATE_TORTURE_SEED` (decimal or `0x` hex; a fixed default), `UPGATE_TORTURE_CASES` (fuzz
//! cases, default 3000), `UPGATE_TORTURE_SECS` (fuzz for this many seconds instead of a fixed
//! number of cases), `UPGATE_TORTURE_ROUNDS` (kill -9 rounds, tmpfs fill cycles and race
//! rounds, default 3). `bench/torture.sh` runs the same tests for minutes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use upgate_e2e::harness::*;
use upgate_e2e::inbound::b64;

// ---------------------------------------------------------------------------------------------
// Knobs, seeds and the PRNG
// ---------------------------------------------------------------------------------------------

const DEFAULT_SEED: u64 = 0x7570_6761_7465_2116;

#[derive(Debug, Clone, Copy)]
struct Knobs {
    seed: u64,
    rounds: usize,
    cases: usize,
    secs: Option<u64>,
}

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={text} is not a number")))
}

fn knobs() -> Knobs {
    Knobs {
        seed: env_number("UPGATE_TORTURE_SEED").unwrap_or(DEFAULT_SEED),
        rounds: env_number("UPGATE_TORTURE_ROUNDS").map_or(3, |n| n.max(1) as usize),
        cases: env_number("UPGATE_TORTURE_CASES").map_or(3000, |n| n.max(1) as usize),
        secs: env_number("UPGATE_TORTURE_SECS"),
    }
}

/// One test's run: its knobs and seed, printed with a command line to reproduce it if the test
/// panics (in any of its threads: a scoped thread's panic reaches the test's own thread).
struct Run {
    name: &'static str,
    knobs: Knobs,
}

impl Run {
    fn begin(name: &'static str) -> (Self, Rng) {
        let knobs = knobs();
        eprintln!(
            "{name}: UPGATE_TORTURE_SEED={:#x} UPGATE_TORTURE_ROUNDS={} UPGATE_TORTURE_CASES={} UPGATE_TORTURE_SECS={}",
            knobs.seed,
            knobs.rounds,
            knobs.cases,
            knobs.secs.map_or("(unset)".into(), |s| s.to_string())
        );
        // Each test draws from its own stream, so that one test's draws never depend on another's.
        let stream = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        (Self { name, knobs }, Rng::new(knobs.seed ^ stream))
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let secs = self
                .knobs
                .secs
                .map_or(String::new(), |s| format!(" UPGATE_TORTURE_SECS={s}"));
            let release = if target_dir().ends_with("release") {
                " --release"
            } else {
                ""
            };
            eprintln!(
                "\n*** {} failed with seed {:#x}. Reproduce with:\n    UPGATE_TORTURE_SEED={:#x} UPGATE_TORTURE_ROUNDS={} UPGATE_TORTURE_CASES={}{secs} \
                 cargo test{release} -p upgate-e2e --test torture -- --exact {}\n",
                self.name, self.knobs.seed, self.knobs.seed, self.knobs.rounds, self.knobs.cases, self.name
            );
        }
    }
}

/// splitmix64: small, fast, and the same on every machine.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// In `lo..=hi`.
    fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }

    /// An independent stream (for a thread, or one case).
    fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    fn bytes_between(&mut self, lo: usize, hi: usize) -> Vec<u8> {
        let n = self.between(lo, hi);
        self.bytes(n)
    }

    fn text_between(&mut self, lo: usize, hi: usize) -> Vec<u8> {
        let n = self.between(lo, hi);
        self.text(n)
    }

    /// `n` bytes of printable ASCII and newlines: valid UTF-8, so a `.txt` passes the content
    /// check. The first byte is always `t`: the content check reads two-byte magic numbers
    /// into plain text (a `.txt` starting `BC`, `BM` or `MZ` is refused as LLVM bitcode, BMP
    /// or an executable; see `plain_text_that_starts_like_a_magic_number_is_text`).
    fn text(&mut self, n: usize) -> Vec<u8> {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:-_\n";
        let mut out = Vec::with_capacity(n);
        if n > 0 {
            out.push(b't');
        }
        while out.len() < n {
            let mut word = self.next_u64();
            for _ in 0..8 {
                if out.len() == n {
                    break;
                }
                out.push(ALPHABET[(word & 0x3f) as usize % ALPHABET.len()]);
                word >>= 8;
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Talking to the daemon
// ---------------------------------------------------------------------------------------------

const KEY: &str = "demo-key";
const TUS: (&str, &str) = ("Tus-Resumable", "1.0.0");
const OFFSET_STREAM: &str = "application/offset+octet-stream";
const BEAM_THREAD: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";
const KOREXO_BASE: &str = "/api/v2/apps/app-1/environments/draft/attachments";

fn address(daemon: &Daemon) -> String {
    daemon.base_url.trim_start_matches("http://").to_owned()
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .new_agent()
}

/// A request that may fail at the connection (a daemon killed under it): `None` then, and
/// also when the answer's body was cut off.
fn try_send(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, Vec<u8>)>,
) -> Option<Reply> {
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = match body {
        Some((content_type, bytes)) => agent.run(
            builder
                .header("content-type", content_type)
                .body(bytes)
                .expect("request"),
        ),
        None => agent.run(builder.body(()).expect("request")),
    };
    let mut response = response.ok()?;
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
    let text = response.body_mut().read_to_string().ok()?;
    Some(Reply {
        status,
        headers,
        text,
    })
}

fn tus_metadata(name: &str) -> String {
    format!(
        "filename {},filetype {}",
        b64(name.as_bytes()),
        b64(b"text/plain")
    )
}

/// The path of a tus upload from a creation's `Location` (relative or absolute).
fn tus_path(reply: &Reply) -> Option<String> {
    let location = reply.header("location")?;
    let at = location.find("/files/")?;
    Some(location[at..].to_owned())
}

/// Creates a tus upload of `length` bytes (no body); returns its path `/files/<id>`.
fn fresh_tus(daemon: &Daemon, length: usize) -> String {
    let meta = tus_metadata("fuzz.txt");
    let length = length.to_string();
    let reply = send(
        "POST",
        &daemon.url("/files/"),
        &[
            TUS,
            ("Authorization", "Bearer demo-key"),
            ("Upload-Length", &length),
            ("Upload-Metadata", &meta),
        ],
        None,
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    tus_path(&reply).unwrap_or_else(|| panic!("no Location: {reply:?}"))
}

fn korexo_form(name: &str, bytes: &[u8]) -> Form {
    Form::new()
        .text("userReference", "user-1")
        .text("uploadType", "runtime")
        .file("file", name, "text/plain", bytes)
}

/// A Kore XO upload that must succeed; returns its fileId.
fn fresh_korexo(daemon: &Daemon, bytes: &[u8]) -> String {
    let reply = post_form(
        &daemon.url(&format!("{KOREXO_BASE}/upload")),
        &[("x-api-key", KEY)],
        &korexo_form("del.txt", bytes),
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()["fileId"].as_str().unwrap().to_owned()
}

fn kore_start(daemon: &Daemon, name: &str, size: usize, chunks: usize) -> String {
    let reply = post_json(
        &daemon.url("/api/public/files/session/start"),
        &[("X-api-key", KEY)],
        &json!({"fileContext": "bulkImport", "totalChunks": chunks, "fileExtension": "txt",
            "fileName": name, "fileSize": size}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()["sessionId"].as_str().unwrap().to_owned()
}

fn kore_chunk_form(number: usize, bytes: &[u8]) -> Form {
    Form::new().text("chunkNumber", &number.to_string()).file(
        "file",
        "blob",
        "application/octet-stream",
        bytes,
    )
}

fn kore_chunk(agent: &ureq::Agent, base: &str, session: &str, number: usize, bytes: &[u8]) -> Option<Reply> {
    let form = kore_chunk_form(number, bytes);
    try_send(
        agent,
        "POST",
        &format!("{base}/api/public/files/session/{session}"),
        &[("X-api-key", KEY)],
        Some((&Form::content_type(), form.body())),
    )
}

/// A valid Dify upload must still succeed (the daemon is up and serving).
fn assert_serving(daemon: &mut Daemon, context: &str) {
    if let Ok(Some(status)) = daemon.child.try_wait() {
        panic!(
            "{context}: the daemon exited ({status})\n{}",
            tail(&daemon.log(), 60)
        );
    }
    let form = Form::new().file("file", "alive.txt", "text/plain", b"still here");
    let reply = try_send(
        &agent(Duration::from_secs(30)),
        "POST",
        &daemon.url("/v1/files/upload"),
        &[("Authorization", "Bearer demo-key")],
        Some((&Form::content_type(), form.body())),
    );
    match reply {
        Some(reply) if reply.status == 201 => {}
        other => panic!(
            "{context}: a valid upload failed: {other:?}\n{}",
            tail(&daemon.log(), 60)
        ),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Bytes for a message: printable ASCII as is, the rest escaped, cut after `limit` bytes.
fn escaped(bytes: &[u8], limit: usize) -> String {
    let mut out = String::new();
    for &byte in bytes.iter().take(limit) {
        match byte {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n\n"),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(byte as char),
            _ => out.push_str(&format!("\\x{byte:02x}")),
        }
    }
    if bytes.len() > limit {
        out.push_str(&format!("... ({} bytes in all)", bytes.len()));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP: requests by hand, answers parsed strictly
// ---------------------------------------------------------------------------------------------

/// What came back on one connection.
struct Exchange {
    received: Vec<u8>,
    /// The connection was reset (the daemon closed with bytes of ours unread).
    reset: bool,
    /// Neither closed nor answered in full within the limit.
    timed_out: bool,
}

/// Sends `request` on a fresh connection and reads until the daemon closes it. With
/// `half_close` the connection is shut for writing once the request is sent, so the daemon
/// sees the end of what we send (a truncated request ends there instead of waiting for a
/// timeout); the daemon then takes body bytes it has received but not yet handed to the
/// handler as lost (a 400 "payload reached EOF"), so requests with large bodies go without it
/// (and `Connection: close`).
fn exchange(address: &str, request: &[u8], limit: Duration, half_close: bool) -> Exchange {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(limit)).unwrap();
    stream.set_write_timeout(Some(limit)).unwrap();
    // A daemon that answers early and closes makes this fail: what it answered is still read.
    let _ = stream.write_all(request);
    if half_close {
        let _ = stream.shutdown(Shutdown::Write);
    }
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let (mut reset, mut timed_out) = (false, false);
    loop {
        if Instant::now() > deadline {
            timed_out = true;
            break;
        }
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                timed_out = true;
                break;
            }
            Err(_) => {
                reset = true;
                break;
            }
        }
    }
    Exchange {
        received,
        reset,
        timed_out,
    }
}

/// One HTTP answer off the wire.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|window| window == needle)
}

fn is_token(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Splits what a connection received into answers, strictly: a status line `HTTP/1.x NNN
/// reason`, header lines `token: value`, then a body framed by `Content-Length` or chunked
/// (none for 1xx, 204, 304 and answers to HEAD; `bodyless[i]` says the i-th final answer is
/// one to a HEAD). Returns the answers and the bytes after the last whole one.
fn parse_answers<'a>(mut bytes: &'a [u8], bodyless: &[bool]) -> Result<(Vec<Answer>, &'a [u8]), String> {
    let mut answers = Vec::new();
    let mut finals = 0;
    while !bytes.is_empty() {
        let Some(end) = find(bytes, b"\r\n\r\n") else {
            return Ok((answers, bytes));
        };
        let head = &bytes[..end];
        let text = std::str::from_utf8(head).map_err(|_| "a head that is not UTF-8".to_owned())?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let rest = status_line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let code = rest
            .get(..3)
            .filter(|code| code.bytes().all(|b| b.is_ascii_digit()));
        let status: u16 = code
            .and_then(|code| code.parse().ok())
            .filter(|status| (100..600).contains(status))
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        if rest.len() > 3 && !rest[3..].starts_with(' ') {
            return Err(format!("bad status line {status_line:?}"));
        }
        let mut headers = Vec::new();
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("a header line without a colon: {line:?}"))?;
            if name.is_empty() || !name.bytes().all(is_token) {
                return Err(format!("a bad header name: {line:?}"));
            }
            if value.bytes().any(|b| b == 0 || b == b'\r' || b == b'\n') {
                return Err(format!("a bad header value: {line:?}"));
            }
            headers.push((name.to_owned(), value.trim().to_owned()));
        }
        let lengths: Vec<&str> = headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .map(|(_, value)| value.as_str())
            .collect();
        if lengths.len() > 1 {
            return Err(format!("{} Content-Length headers", lengths.len()));
        }
        let chunked = headers.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked")
        });
        bytes = &bytes[end + 4..];
        let interim = status < 200;
        let no_body =
            interim || status == 204 || status == 304 || bodyless.get(finals).copied().unwrap_or(false);
        let body = if no_body {
            Vec::new()
        } else if chunked {
            let mut body = Vec::new();
            loop {
                let Some(line_end) = find(bytes, b"\r\n") else {
                    return Ok((answers, bytes));
                };
                let size_text = std::str::from_utf8(&bytes[..line_end]).unwrap_or("");
                let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| format!("a bad chunk size {size_text:?}"))?;
                let data = line_end + 2;
                if bytes.len() < data + size + 2 {
                    return Ok((answers, bytes));
                }
                if size == 0 {
                    // No trailers from upgate: the last chunk's line, then CRLF.
                    if &bytes[data..data + 2] != b"\r\n" {
                        return Err("trailers or a bad end after the last chunk".into());
                    }
                    bytes = &bytes[data + 2..];
                    break;
                }
                body.extend_from_slice(&bytes[data..data + size]);
                if &bytes[data + size..data + size + 2] != b"\r\n" {
                    return Err("a chunk not followed by CRLF".into());
                }
                bytes = &bytes[data + size + 2..];
            }
            body
        } else if let Some(length) = lengths.first() {
            let length: usize = length
                .parse()
                .map_err(|_| format!("a bad Content-Length {length:?}"))?;
            if bytes.len() < length {
                return Ok((answers, bytes));
            }
            let body = bytes[..length].to_vec();
            bytes = &bytes[length..];
            body
        } else {
            // Delimited by the close.
            let body = bytes.to_vec();
            bytes = &[];
            body
        };
        if !interim {
            finals += 1;
        }
        answers.push(Answer {
            status,
            headers,
            body,
        });
    }
    Ok((answers, bytes))
}

/// The method and path of a request's first line, if it has a usable one.
fn request_line(request: &[u8]) -> Option<(String, String)> {
    let end = find(request, b"\r\n")?;
    let line = std::str::from_utf8(&request[..end]).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return None;
    }
    let path = target.split('?').next().unwrap_or_default();
    Some((method.to_owned(), path.to_owned()))
}

/// Which dialect answers a path, as the daemon decides it for routes and for its 404s
/// (`http::dialect_of_path`); `none` for paths of no dialect, answered `{"message", "status"}`.
fn dialect_of(path: &str) -> &'static str {
    if path.starts_with("/v1/files/") || path == "/files/upload" {
        "dify"
    } else if path == "/files" || path.starts_with("/files/") {
        "tus"
    } else if path.starts_with("/api/public/files") {
        "kore"
    } else if path.starts_with("/api/v1/attachments-upload") {
        "maiagent"
    } else if path.starts_with("/api/v2/apps/") {
        "korexo"
    } else if path.starts_with("/agent-setup/") {
        "beam"
    } else {
        "none"
    }
}

/// What is wrong with the status of an answer: a 5xx other than 503 with `Retry-After` or 507.
fn status_problem(answer: &Answer) -> Option<String> {
    match answer.status {
        500..=599 if answer.status == 507 => None,
        503 if answer
            .header("retry-after")
            .is_some_and(|v| v.parse::<u64>().is_ok()) =>
        {
            None
        }
        503 => Some("503 without a Retry-After in seconds".into()),
        500..=599 => Some(format!("status {}", answer.status)),
        _ => None,
    }
}

fn is_text(value: &Value) -> bool {
    value.as_str().is_some_and(|text| !text.is_empty())
}

/// What is wrong with the body of a JSON error of `dialect` with `status`.
fn error_shape_problem(dialect: &str, status: u16, body: &Value) -> Option<String> {
    let ok = match dialect {
        "dify" => is_text(&body["code"]) && is_text(&body["message"]) && body["status"] == status,
        "kore" | "korexo" => {
            body.as_object().is_some_and(|map| map.len() == 1)
                && body["errors"].as_array().is_some_and(|errors| {
                    errors.len() == 1 && is_text(&errors[0]["msg"]) && errors[0]["code"] == status
                })
        }
        "maiagent" => {
            is_text(&body["detail"])
                || body.as_object().is_some_and(|map| {
                    !map.is_empty()
                        && map.values().all(|messages| {
                            messages
                                .as_array()
                                .is_some_and(|list| !list.is_empty() && list.iter().all(is_text))
                        })
                })
        }
        "beam" => {
            body["statusCode"] == status
                && (is_text(&body["message"])
                    || body["message"]
                        .as_array()
                        .is_some_and(|list| !list.is_empty() && list.iter().all(is_text)))
        }
        _ => is_text(&body["message"]) && body["status"] == status,
    };
    (!ok).then(|| format!("not a {dialect} error body for {status}: {body}"))
}

/// What is wrong with the body of a JSON success of `dialect`.
fn success_shape_problem(dialect: &str, body: &Value) -> Option<String> {
    let ok = match dialect {
        "dify" | "maiagent" => is_text(&body["id"]),
        "kore" => is_text(&body["fileId"]) || is_text(&body["sessionId"]),
        "korexo" => is_text(&body["fileId"]),
        "beam" => body
            .as_array()
            .is_some_and(|files| !files.is_empty() && files.iter().all(|file| is_text(&file["id"]))),
        _ => false,
    };
    (!ok).then(|| format!("not a {dialect} success body: {body}"))
}

/// What is wrong with the body of an answer to a request routed to `dialect`: JSON in the
/// vendor's shape, short plain text for tus errors. Bodyless answers are not checked.
fn shape_problem(dialect: &str, method: &str, answer: &Answer) -> Option<String> {
    if method == "HEAD" || answer.status < 200 || answer.status == 204 || answer.status == 304 {
        return None;
    }
    let content_type = answer
        .header("content-type")
        .unwrap_or_default()
        .to_ascii_lowercase();
    if dialect == "tus" {
        if answer.status < 300 {
            return None;
        }
        let Ok(text) = std::str::from_utf8(&answer.body) else {
            return Some("a tus error body that is not UTF-8".into());
        };
        if !content_type.starts_with("text/plain") {
            return Some(format!("a tus error as {content_type:?}: {text:?}"));
        }
        if text.trim().is_empty() || text.starts_with('{') || text.starts_with('[') || text.len() > 4096 {
            return Some(format!("not a short plain text tus error: {text:?}"));
        }
        return None;
    }
    if !content_type.starts_with("application/json") {
        return Some(format!(
            "a {dialect} answer as {content_type:?}: {}",
            escaped(&answer.body, 300)
        ));
    }
    let body: Value = match serde_json::from_slice(&answer.body) {
        Ok(body) => body,
        Err(error) => {
            return Some(format!(
                "a {dialect} answer that is not JSON ({error}): {}",
                escaped(&answer.body, 300)
            ));
        }
    };
    if answer.status >= 400 {
        error_shape_problem(dialect, answer.status, &body)
    } else {
        success_shape_problem(dialect, &body)
    }
}

/// An answer of the HTTP parser itself, before any route (issue #10: an empty body).
fn is_prerouting(answer: &Answer) -> bool {
    matches!(answer.status, 400 | 408 | 431) && answer.body.is_empty()
}

// ---------------------------------------------------------------------------------------------
// Store and disk consistency
// ---------------------------------------------------------------------------------------------

fn rows(daemon: &Daemon) -> BTreeMap<String, (String, i64, String)> {
    let db = daemon.db();
    let mut statement = db.prepare("SELECT id, state, size, sha256 FROM uploads").unwrap();
    statement
        .query_map([], |row| {
            Ok((row.get(0)?, (row.get(1)?, row.get(2)?, row.get(3)?)))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Files in the provider's `root` without a `forwarded` record (the store does not know them:
/// nothing ever deletes them).
/// Files in `root` that no record explains: a record explains a file when it is `forwarded`,
/// or `failed` as an interrupted sync delivery (the daemon died in the provider call, which
/// may have put the file in place).
fn orphan_files(daemon: &Daemon, root: &Path) -> Vec<String> {
    let rows = rows(daemon);
    let interrupted = |name: &str| -> bool {
        daemon
            .db()
            .query_row("SELECT last_error FROM uploads WHERE id = ?1", [name], |row| {
                row.get::<_, Option<String>>(0)
            })
            .ok()
            .flatten()
            .is_some_and(|error| error.starts_with("interrupted:"))
    };
    names_in(root)
        .into_iter()
        .filter_map(|name| match rows.get(&name) {
            Some((state, ..)) if state == "forwarded" => None,
            Some((state, ..)) if state == "failed" && interrupted(&name) => None,
            Some((state, ..)) => Some(format!("file {name} in the root, its record is {state}")),
            None => Some(format!("file {name} in the root without a record")),
        })
        .collect()
}

/// `forwarded` records whose file in `root` is missing or holds other bytes.
fn records_without_their_file(daemon: &Daemon, root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for (id, (state, size, sha256)) in rows(daemon) {
        if state != "forwarded" {
            continue;
        }
        match std::fs::read(root.join(&id)) {
            Err(error) => problems.push(format!("record {id} is forwarded, its file: {error}")),
            Ok(bytes) => {
                if bytes.len() as i64 != size || sha256_hex(&bytes) != sha256 {
                    problems.push(format!(
                        "record {id}: {size} bytes sha256 {sha256}, the file: {} bytes sha256 {}",
                        bytes.len(),
                        sha256_hex(&bytes)
                    ));
                }
            }
        }
    }
    problems
}

/// Where the store and the provider's root disagree, either way.
fn store_disk_problems(daemon: &Daemon, root: &Path) -> Vec<String> {
    let mut problems = orphan_files(daemon, root);
    problems.extend(records_without_their_file(daemon, root));
    problems
}

/// Anything under the daemon's directory but where upgate keeps things: its config, the
/// database, `spool/<name>`, `sessions/<id>/<n>`, `files/<id>` (names checked elsewhere).
fn stray_paths(daemon: &Daemon) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            }
            out.push(path);
        }
    }
    let mut all = Vec::new();
    walk(&daemon.dir, &mut all);
    all.into_iter()
        .filter_map(|path| {
            let relative = path
                .strip_prefix(&daemon.dir)
                .ok()?
                .to_string_lossy()
                .into_owned();
            let parts: Vec<&str> = relative.split('/').collect();
            let expected = match parts.as_slice() {
                ["config.yaml"] | ["data"] | ["files"] | ["files", _] => true,
                ["data", "spool"] | ["data", "spool", _] | ["data", "sessions"] | ["data", "sessions", _] => {
                    true
                }
                // A chunk kept apart (its number), or the chunks written in place.
                ["data", "sessions", _, n] => n.bytes().all(|b| b.is_ascii_digit()) || *n == "data",
                ["data", name] => name.starts_with("upgate.db"),
                _ => false,
            };
            (!expected).then_some(relative)
        })
        .collect()
}

/// Session directories without a session record.
fn orphan_session_dirs(daemon: &Daemon) -> Vec<String> {
    let db = daemon.db();
    let mut statement = db.prepare("SELECT id FROM sessions").unwrap();
    let known: BTreeSet<String> = statement
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    names_in(&daemon.data_dir().join("sessions"))
        .into_iter()
        .filter(|dir| !known.contains(dir))
        .collect()
}

fn spool_names(daemon: &Daemon) -> BTreeSet<String> {
    names_in(&daemon.data_dir().join("spool"))
}

// ---------------------------------------------------------------------------------------------
// 1. The raw-socket fuzzer
// ---------------------------------------------------------------------------------------------

/// A request being built: its first line, header lines and body, all bytes.
#[derive(Debug, Clone)]
struct Draft {
    method: String,
    target: String,
    version: String,
    headers: Vec<Vec<u8>>,
    body: Vec<u8>,
}

impl Draft {
    fn new(method: &str, target: &str, host: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Self {
        let mut lines = vec![format!("Host: {host}").into_bytes()];
        for (name, value) in headers {
            lines.push(format!("{name}: {value}").into_bytes());
        }
        if !body.is_empty() || matches!(method, "POST" | "PATCH" | "PUT") {
            lines.push(format!("Content-Length: {}", body.len()).into_bytes());
        }
        Self {
            method: method.to_owned(),
            target: target.to_owned(),
            version: "HTTP/1.1".to_owned(),
            headers: lines,
            body,
        }
    }

    fn name_of(line: &[u8]) -> Vec<u8> {
        line.split(|b| *b == b':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.headers
            .iter()
            .position(|line| Self::name_of(line) == name.as_bytes())
    }

    fn value(&self, name: &str) -> Option<Vec<u8>> {
        let line = &self.headers[self.position(name)?];
        let at = line.iter().position(|b| *b == b':')?;
        Some(line[at + 1..].trim_ascii().to_vec())
    }

    /// Replaces every header `name` with one carrying `value` (or adds it).
    fn set(&mut self, name: &str, value: &[u8]) {
        let mut line = format!("{name}: ").into_bytes();
        line.extend_from_slice(value);
        match self.position(name) {
            Some(at) => {
                self.remove(name);
                self.headers.insert(at.min(self.headers.len()), line);
            }
            None => self.headers.push(line),
        }
    }

    fn remove(&mut self, name: &str) {
        self.headers.retain(|line| Self::name_of(line) != name.as_bytes());
    }

    /// After a change of the body: an existing Content-Length follows it (none is added).
    fn sync_length(&mut self) {
        if self.position("content-length").is_some() {
            let length = self.body.len().to_string();
            self.set("Content-Length", length.as_bytes());
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} {}\r\n", self.method, self.target, self.version).into_bytes();
        for line in &self.headers {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    fn is_multipart(&self) -> bool {
        self.value("content-type")
            .is_some_and(|value| value.starts_with(b"multipart/form-data"))
    }
}

/// The valid request each fuzz case starts from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Base {
    DifyUpload,
    KoreUpload,
    KoreStart,
    KoreChunk,
    KoreComplete,
    MaiagentUpload,
    KorexoUpload,
    KorexoDelete,
    BeamUpload,
    TusCreate,
    TusCreateWithUpload,
    TusPatch,
    TusHead,
    TusDelete,
    TusOptions,
}

const BASES: [Base; 15] = [
    Base::DifyUpload,
    Base::KoreUpload,
    Base::KoreStart,
    Base::KoreChunk,
    Base::KoreComplete,
    Base::MaiagentUpload,
    Base::KorexoUpload,
    Base::KorexoDelete,
    Base::BeamUpload,
    Base::TusCreate,
    Base::TusCreateWithUpload,
    Base::TusPatch,
    Base::TusHead,
    Base::TusDelete,
    Base::TusOptions,
];

impl Base {
    /// What the unmutated request is answered.
    fn status(self) -> u16 {
        match self {
            Base::DifyUpload
            | Base::MaiagentUpload
            | Base::BeamUpload
            | Base::TusCreate
            | Base::TusCreateWithUpload => 201,
            Base::TusPatch | Base::TusDelete | Base::TusOptions => 204,
            _ => 200,
        }
    }
}

/// What the cases of one batch share: an open Kore session with room for many chunks.
struct Fixtures {
    kore_session: String,
}

fn base_draft(base: Base, daemon: &Daemon, fixtures: &Fixtures, rng: &mut Rng) -> Draft {
    let host = address(daemon);
    let content = rng.text_between(1, 3000);
    let name = format!("fuzz-{}.txt", rng.below(1000));
    let multipart = Form::content_type();
    let bearer = ("Authorization", "Bearer demo-key");
    let tus_auth = [TUS, bearer];
    match base {
        Base::DifyUpload => Draft::new(
            "POST",
            "/v1/files/upload",
            &host,
            &[bearer, ("Content-Type", &multipart)],
            Form::new()
                .text("user", "fuzzer")
                .file("file", &name, "text/plain", &content)
                .body(),
        ),
        Base::KoreUpload => Draft::new(
            "POST",
            "/api/public/files",
            &host,
            &[("X-api-key", KEY), ("Content-Type", &multipart)],
            Form::new()
                .text("fileContext", "bulkImport")
                .file("file", &name, "text/plain", &content)
                .body(),
        ),
        Base::KoreStart => Draft::new(
            "POST",
            "/api/public/files/session/start",
            &host,
            &[("X-api-key", KEY), ("Content-Type", "application/json")],
            json!({"fileContext": "bulkImport", "totalChunks": rng.between(1, 9), "fileExtension": "txt",
                "fileName": name, "fileSize": content.len()})
            .to_string()
            .into_bytes(),
        ),
        Base::KoreChunk => Draft::new(
            "POST",
            &format!("/api/public/files/session/{}", fixtures.kore_session),
            &host,
            &[("X-api-key", KEY), ("Content-Type", &multipart)],
            kore_chunk_form(rng.below(1000), &content[..content.len().min(400)]).body(),
        ),
        Base::KoreComplete => {
            let session = kore_start(daemon, &name, content.len(), 1);
            let sent = kore_chunk(
                &agent(Duration::from_secs(30)),
                &daemon.base_url,
                &session,
                0,
                &content,
            );
            assert_eq!(sent.map(|reply| reply.status), Some(200));
            Draft::new(
                "POST",
                &format!("/api/public/files/session/{session}/complete"),
                &host,
                &[("X-api-key", KEY)],
                Vec::new(),
            )
        }
        Base::MaiagentUpload => Draft::new(
            "POST",
            "/api/v1/attachments-upload/",
            &host,
            &[
                ("Authorization", "Api-Key demo-key"),
                ("Content-Type", &multipart),
            ],
            Form::new().file("file", &name, "text/plain", &content).body(),
        ),
        Base::KorexoUpload => Draft::new(
            "POST",
            &format!("{KOREXO_BASE}/upload"),
            &host,
            &[("x-api-key", KEY), ("Content-Type", &multipart)],
            korexo_form(&name, &content).body(),
        ),
        Base::KorexoDelete => {
            let id = fresh_korexo(daemon, &content);
            Draft::new(
                "DELETE",
                &format!("{KOREXO_BASE}/{id}"),
                &host,
                &[("x-api-key", KEY), ("Content-Type", "application/json")],
                json!({"sessionId": "s-1"}).to_string().into_bytes(),
            )
        }
        Base::BeamUpload => Draft::new(
            "POST",
            "/agent-setup/upload",
            &host,
            &[
                ("x-api-key", KEY),
                ("current-workspace-id", "ws-1"),
                ("Content-Type", &multipart),
            ],
            Form::new()
                .text("threadId", BEAM_THREAD)
                .file("files", &name, "text/plain", &content)
                .body(),
        ),
        Base::TusCreate => {
            let length = content.len().to_string();
            let meta = tus_metadata(&name);
            Draft::new(
                "POST",
                "/files/",
                &host,
                &[
                    tus_auth[0],
                    tus_auth[1],
                    ("Upload-Length", &length),
                    ("Upload-Metadata", &meta),
                ],
                Vec::new(),
            )
        }
        Base::TusCreateWithUpload => {
            let length = content.len().to_string();
            let meta = tus_metadata(&name);
            Draft::new(
                "POST",
                "/files/",
                &host,
                &[
                    tus_auth[0],
                    tus_auth[1],
                    ("Upload-Length", &length),
                    ("Upload-Metadata", &meta),
                    ("Content-Type", OFFSET_STREAM),
                ],
                content,
            )
        }
        Base::TusPatch => {
            let path = fresh_tus(daemon, 4096);
            Draft::new(
                "PATCH",
                &path,
                &host,
                &[
                    tus_auth[0],
                    tus_auth[1],
                    ("Upload-Offset", "0"),
                    ("Content-Type", OFFSET_STREAM),
                ],
                content,
            )
        }
        Base::TusHead => {
            let path = fresh_tus(daemon, 4096);
            Draft::new("HEAD", &path, &host, &tus_auth, Vec::new())
        }
        Base::TusDelete => {
            let path = fresh_tus(daemon, 4096);
            Draft::new("DELETE", &path, &host, &tus_auth, Vec::new())
        }
        Base::TusOptions => Draft::new("OPTIONS", "/files/", &host, &[bearer], Vec::new()),
    }
}

const NASTY_NAMES: &[&str] = &[
    "",
    ".",
    "..",
    "../../../../etc/passwd",
    "..\\..\\..\\boot.ini",
    "a/b.txt",
    "/etc/passwd",
    "C:\\evil.txt",
    "a\0b.txt",
    "a\r\nX-Injected: 1.txt",
    "\u{202e}txt.exe",
    "con.txt",
    "%2e%2e%2fescape.txt",
    "\u{1f600}.txt",
    "a\".txt",
    "a;b=c.txt",
    " .txt",
    "file.txt.",
    "FILE.TXT",
    "\t.txt",
    "\u{7f}.txt",
    "\u{0}",
];

const TRAVERSALS: &[&str] = &[
    "../../../../etc/passwd",
    "..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc",
    "%2e%2e",
    "....//....//etc",
    "..\\..\\..\\windows",
    "%252e%252e%252f",
    "%00",
    "a%00b",
    ".",
    "..",
    "f-../../x",
    "0123456789abcdef0123456789abcdef/../../x",
    "%ff%fe",
    "..;/",
    "%c0%ae%c0%ae/",
    "~root",
    "%2f",
    "*",
];

/// Structured mutations: they know what a header, a multipart body or an id is. Those that
/// mostly reach a route (and test the dialects, not the HTTP parser) are listed twice.
const STRUCTURED: &[&str] = &[
    "duplicate-header",
    "duplicate-header",
    "remove-header",
    "remove-header",
    "huge-header",
    "many-headers",
    "content-length",
    "chunked",
    "chunked",
    "bad-chunked",
    "boundary",
    "boundary",
    "boundary",
    "filename",
    "filename",
    "filename",
    "traversal",
    "traversal",
    "long-target",
    "method",
    "version",
    "header-syntax",
    "connection",
    "expect",
    "tus-headers",
    "tus-headers",
    "tus-headers",
    "key",
    "key",
    "body",
    "body",
];

/// Mutations of the serialized bytes.
const BYTEWISE: &[&str] = &["bit-flip", "truncate", "nul", "overwrite", "pipeline"];

fn huge(rng: &mut Rng) -> Vec<u8> {
    let size = rng.pick(&[4096, 16 * 1024, 64 * 1024, 127 * 1024, 129 * 1024, 300 * 1024]);
    if rng.chance(50) {
        vec![b'a'; size]
    } else {
        rng.text(size)
            .iter()
            .map(|b| if *b == b'\n' { b'z' } else { *b })
            .collect()
    }
}

/// The chunked framing of `body`, split at random, optionally broken in one way.
fn chunked_body(rng: &mut Rng, body: &[u8], broken: Option<usize>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    let mut first = true;
    while !rest.is_empty() {
        let size = rng.between(1, rest.len().min(4096));
        let (chunk, after) = rest.split_at(size);
        let mut size_line = match rng.below(4) {
            0 => format!("{size:X}"),
            1 => format!("000{size:x}"),
            2 => format!("{size:x};ext=\"v\""),
            _ => format!("{size:x}"),
        };
        let mut data_end = "\r\n";
        if first {
            match broken {
                Some(0) => size_line = "zz".into(),
                Some(1) => size_line = format!("{:x}", size + rng.between(1, 50)),
                Some(2) => size_line = format!("{:x}", size.saturating_sub(1).max(1)),
                Some(3) => data_end = "",
                Some(4) => data_end = "\n",
                Some(5) => size_line = "fffffffffffffffffffff".into(),
                Some(6) => size_line = "-1".into(),
                Some(7) => size_line = format!(" {size:x}"),
                Some(8) => size_line = format!("{size:x};{}", "e".repeat(20_000)),
                Some(9) => size_line = format!("{size:x}\n"),
                _ => {}
            }
            first = false;
        }
        out.extend_from_slice(size_line.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(chunk);
        out.extend_from_slice(data_end.as_bytes());
        rest = after;
    }
    match broken {
        Some(10) => {}                                 // no last chunk
        Some(11) => out.extend_from_slice(b"0\r\n\n"), // a bare LF after the last chunk
        Some(12) => out.extend_from_slice(b"0\r\nX-Trailer: 1\r\nbad trailer\r\n\r\n"),
        Some(13) => out.extend_from_slice(b"0\r\n\r\n0\r\n\r\n"), // a second last chunk
        _ if rng.chance(20) => out.extend_from_slice(b"0\r\nX-Trailer: fine\r\n\r\n"),
        _ => out.extend_from_slice(b"0\r\n\r\n"),
    }
    out
}

/// Applies the structured mutation `what`; false if it does not apply to this request.
fn mutate(what: &str, rng: &mut Rng, draft: &mut Draft) -> bool {
    match what {
        "duplicate-header" => {
            if draft.headers.is_empty() {
                return false;
            }
            let at = rng.below(draft.headers.len());
            let mut line = draft.headers[at].clone();
            if Draft::name_of(&line) == b"content-length" && rng.chance(60) {
                line = format!("Content-Length: {}", draft.body.len() + rng.between(0, 3)).into_bytes();
            }
            let to = if rng.chance(50) {
                at + 1
            } else {
                draft.headers.len()
            };
            draft.headers.insert(to, line);
        }
        "remove-header" => {
            if draft.headers.is_empty() {
                return false;
            }
            let at = rng.below(draft.headers.len());
            draft.headers.remove(at);
        }
        "huge-header" => {
            let value = huge(rng);
            if rng.chance(50) && !draft.headers.is_empty() {
                let at = rng.below(draft.headers.len());
                draft.headers[at].extend_from_slice(&value);
            } else {
                let mut line = b"X-Torture: ".to_vec();
                line.extend_from_slice(&value);
                draft.headers.insert(rng.below(draft.headers.len() + 1), line);
            }
        }
        "many-headers" => {
            for n in 0..rng.between(80, 200) {
                draft.headers.insert(0, format!("X-Many-{n}: {n}").into_bytes());
            }
        }
        "content-length" => {
            let length = draft.body.len();
            let more = rng.between(1, 100);
            let value = rng.pick(&[
                String::new(),
                "-1".into(),
                "abc".into(),
                "18446744073709551616".into(),
                "99999999999".into(),
                format!("{}", length + more),
                format!("{}", length.saturating_sub(more)),
                format!("{length}, {length}"),
                format!("{length},{}", length + 1),
                format!("+{length}"),
                format!("0x{length:x}"),
                format!("{length} 1"),
                "0".into(),
            ]);
            draft.set("Content-Length", value.as_bytes());
        }
        "chunked" | "bad-chunked" => {
            if draft.body.is_empty() {
                return false;
            }
            let broken = (what == "bad-chunked").then(|| rng.below(14));
            draft.body = chunked_body(rng, &draft.body.clone(), broken);
            if what == "bad-chunked" && rng.chance(25) {
                // Both framings: refused, never smuggled.
                draft.sync_length();
            } else {
                draft.remove("content-length");
            }
            let encoding: &[u8] = if what == "chunked" {
                b"chunked"
            } else {
                rng.pick(&[
                    &b"chunked"[..],
                    b"chunked",
                    b"chunked, chunked",
                    b"gzip, chunked",
                    b"identity",
                    b"Chunked",
                    b"chunked;q=1",
                ])
            };
            draft.set("Transfer-Encoding", encoding);
        }
        "boundary" => {
            if !draft.is_multipart() {
                return false;
            }
            let boundary = BOUNDARY.as_bytes();
            match rng.below(13) {
                0 => draft.set("Content-Type", b"multipart/form-data"),
                1 => draft.set("Content-Type", b"multipart/form-data; boundary="),
                2 => {
                    let long = "b".repeat(rng.pick(&[71, 200, 5000]));
                    draft.body = replace_all(&draft.body, boundary, long.as_bytes());
                    draft.set(
                        "Content-Type",
                        format!("multipart/form-data; boundary={long}").as_bytes(),
                    );
                }
                3 => draft.set("Content-Type", b"multipart/form-data; boundary=other"),
                4 => {
                    let end = format!("--{BOUNDARY}--");
                    if let Some(at) = find(&draft.body, end.as_bytes()) {
                        draft.body.truncate(at);
                    }
                }
                5 => {
                    let wrong = format!("--{}X", &BOUNDARY[..BOUNDARY.len() - 1]);
                    let first = format!("--{BOUNDARY}");
                    if let Some(at) = find(&draft.body, first.as_bytes()) {
                        draft.body.splice(at..at + first.len(), wrong.bytes());
                    }
                }
                6 => draft.set("Content-Type", b"multipart/form-data; boundary=\"a\\\"b\""),
                7 => draft.set("Content-Type", b"multipart/form-data; boundary=a b;c"),
                8 => {
                    let other = rng.pick(&[
                        &b"application/json"[..],
                        b"text/plain",
                        b"multipart/mixed",
                        b"\xff\xfe",
                    ]);
                    draft.set("Content-Type", other);
                }
                9 => {
                    // The first part's headers never end.
                    if let Some(at) = find(&draft.body, b"\r\n\r\n") {
                        draft.body.splice(at..at + 4, b"\r\n".iter().copied());
                    }
                }
                10 => {
                    // A delimiter inside the file's content.
                    if let Some(at) = find(&draft.body, b"Content-Type: text/plain\r\n\r\n") {
                        let delimiter = format!("\r\n--{BOUNDARY}\r\n");
                        let at = at + 28;
                        draft.body.splice(at..at, delimiter.bytes());
                    }
                }
                11 => {
                    // A part header of 100 KiB.
                    if let Some(at) = find(&draft.body, b"Content-Disposition") {
                        let mut filler = b"X-Part: ".to_vec();
                        filler.extend(std::iter::repeat_n(b'p', 100 * 1024));
                        filler.extend_from_slice(b"\r\n");
                        draft.body.splice(at..at, filler);
                    }
                }
                _ => {
                    // Hundreds of small fields before the rest.
                    let mut fields = Vec::new();
                    for n in 0..rng.between(200, 2000) {
                        fields.extend_from_slice(
                            format!(
                                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"f{n}\"\r\n\r\nv\r\n"
                            )
                            .as_bytes(),
                        );
                    }
                    draft.body.splice(0..0, fields);
                }
            }
            draft.sync_length();
        }
        "filename" => {
            let is_tus = draft.target.starts_with("/files");
            let name: Vec<u8> = if rng.chance(40) {
                let n = rng.between(1, 300);
                rng.bytes(n)
            } else if rng.chance(15) {
                let mut long = "a".repeat(rng.pick(&[255, 256, 300, 5000])).into_bytes();
                long.extend_from_slice(b".txt");
                long
            } else {
                rng.pick(NASTY_NAMES).as_bytes().to_vec()
            };
            if is_tus {
                let mut value = b"filename ".to_vec();
                if rng.chance(20) {
                    value.extend_from_slice(&name);
                } else {
                    value.extend_from_slice(b64(&name).as_bytes());
                }
                draft.set("Upload-Metadata", &value);
                return true;
            }
            let Some(at) = find(&draft.body, b"filename=\"") else {
                return false;
            };
            let start = at + 10;
            let Some(len) = draft.body[start..].iter().position(|b| *b == b'"') else {
                return false;
            };
            if rng.chance(15) {
                // The RFC 5987 form, with the name percent-encoded.
                let encoded: String = name.iter().map(|b| format!("%{b:02X}")).collect();
                let replacement = format!("filename*=UTF-8''{encoded}");
                draft.body.splice(at..start + len + 1, replacement.bytes());
            } else {
                draft.body.splice(start..start + len, name);
            }
            draft.sync_length();
        }
        "traversal" => {
            let evil = rng.pick(TRAVERSALS);
            let target = draft.target.clone();
            let replaced = if target.starts_with("/files/") {
                format!("/files/{evil}")
            } else if let Some(rest) = target.strip_prefix("/api/public/files/session/") {
                match rest.split_once('/') {
                    Some((_, tail)) => format!("/api/public/files/session/{evil}/{tail}"),
                    None => format!("/api/public/files/session/{evil}"),
                }
            } else if target.starts_with("/api/v2/apps/") {
                let parts: Vec<&str> = target.split('/').collect();
                // ["", api, v2, apps, app, environments, env, attachments, id|upload]
                let mut parts: Vec<String> = parts.iter().map(|p| (*p).to_owned()).collect();
                let slot = rng.pick(&[4usize, 6, 8]);
                if slot < parts.len() {
                    parts[slot] = evil.to_owned();
                }
                parts.join("/")
            } else {
                format!("{target}/{evil}")
            };
            draft.target = replaced;
        }
        "long-target" => {
            let n = rng.pick(&[8 * 1024, 64 * 1024, 130 * 1024]);
            if rng.chance(50) {
                draft.target.push('/');
                draft.target.push_str(&"a".repeat(n));
            } else {
                draft.target.push('?');
                draft.target.push_str(&"q=1&".repeat(n / 4));
            }
        }
        "method" => {
            draft.method = rng
                .pick(&[
                    "GET",
                    "PUT",
                    "PATCH",
                    "DELETE",
                    "HEAD",
                    "OPTIONS",
                    "TRACE",
                    "CONNECT",
                    "post",
                    "P0ST",
                    "BREW",
                    "",
                    "POST POST",
                ])
                .to_owned();
            if rng.chance(10) {
                draft.method = "M".repeat(5000);
            }
        }
        "version" => {
            draft.version = rng
                .pick(&[
                    "HTTP/1.0",
                    "HTTP/2.0",
                    "HTTP/1.2",
                    "HTTP/0.9",
                    "HTTP/1.1x",
                    "http/1.1",
                    "HTTP/1",
                    "",
                ])
                .to_owned();
        }
        "header-syntax" => {
            let at = rng.below(draft.headers.len() + 1);
            let line: Vec<u8> = match rng.below(10) {
                0 => {
                    // A space before the colon.
                    if draft.headers.is_empty() {
                        return false;
                    }
                    let at = rng.below(draft.headers.len());
                    let line = draft.headers.remove(at);
                    replace_first(&line, b":", b" :")
                }
                1 => b"Garbage without a colon".to_vec(),
                2 => b"X-Folded: a\r\n continued".to_vec(),
                3 => b": empty name".to_vec(),
                4 => b"X-Bad\x7fName: 1".to_vec(),
                5 => b"X Bad: 1".to_vec(),
                6 => b"X-A: 1\nX-B: 2".to_vec(),
                7 => b"X-A: 1\r2".to_vec(),
                8 => {
                    let mut line = "X".repeat(10_000).into_bytes();
                    line.extend_from_slice(b": long name");
                    line
                }
                _ => {
                    // obs-text in a key header's value.
                    let name = rng.pick(&["Authorization", "x-api-key", "X-api-key", "current-workspace-id"]);
                    let mut line = format!("{name}: ").into_bytes();
                    line.extend_from_slice(b"\xe9\xff demo-key \x80");
                    draft.remove(&name.to_ascii_lowercase());
                    line
                }
            };
            draft.headers.insert(at.min(draft.headers.len()), line);
        }
        "connection" => {
            let value = rng.pick(&[
                &b"close"[..],
                b"keep-alive",
                b"Upgrade",
                b"TE, close",
                b"garbage, , ,",
                b"upgrade, close",
            ]);
            draft.set("Connection", value);
            if value.to_ascii_lowercase().starts_with(b"upgrade") {
                let protocol = rng.pick(&[&b"websocket"[..], b"h2c", b"tls/1.0", b"\x01"]);
                draft.set("Upgrade", protocol);
            }
        }
        "expect" => {
            let value = rng.pick(&[&b"100-continue"[..], b"100-Continue", b"200-ok", b""]);
            draft.set("Expect", value);
        }
        "tus-headers" => {
            if !draft.target.starts_with("/files") {
                return false;
            }
            let numbers = [
                "-1",
                "18446744073709551616",
                "1e3",
                " 0",
                "0x10",
                "",
                "99999999999",
                "1,2",
                "1048577",
                "0",
                "4096",
            ];
            match rng.below(9) {
                0 => draft.set("Upload-Offset", rng.pick(&numbers).as_bytes()),
                1 => draft.set("Upload-Length", rng.pick(&numbers).as_bytes()),
                2 => draft.set(
                    "Upload-Defer-Length",
                    rng.pick(&["1", "0", "2", "yes"]).as_bytes(),
                ),
                3 => {
                    let metadata = match rng.below(6) {
                        0 => "filename".to_owned(),
                        1 => "filename !!!".to_owned(),
                        2 => "filename aGVsbG8=,filename aGVsbG8=".to_owned(),
                        3 => ",,,".to_owned(),
                        4 => format!("{} YQ==", "k".repeat(9000)),
                        _ => (0..40)
                            .map(|n| format!("k{n} YQ=="))
                            .collect::<Vec<_>>()
                            .join(","),
                    };
                    draft.set("Upload-Metadata", metadata.as_bytes());
                }
                4 => {
                    let checksum = match rng.below(5) {
                        0 => "sha1 xxx".to_owned(),
                        1 => "crc32 AAAA".to_owned(),
                        2 => "sha256".to_owned(),
                        3 => format!("md5 {}", b64(&rng.bytes(16))),
                        _ => format!("sha1 {}", b64(&rng.bytes(20))),
                    };
                    draft.set("Upload-Checksum", checksum.as_bytes());
                }
                5 => {
                    let concat = match rng.below(6) {
                        0 => "partial".to_owned(),
                        1 => "final;".to_owned(),
                        2 => "final;/files/../../etc/passwd".to_owned(),
                        3 => "final;/files/0123456789abcdef0123456789abcdef".to_owned(),
                        4 => format!("final;{}", "/files/x ".repeat(200)),
                        _ => "bogus".to_owned(),
                    };
                    draft.set("Upload-Concat", concat.as_bytes());
                }
                6 => draft.set(
                    "Tus-Resumable",
                    rng.pick(&["0.2.2", "", "1.0.0, 1.0.0", "1.0"]).as_bytes(),
                ),
                7 => draft.set(
                    "X-HTTP-Method-Override",
                    rng.pick(&["PATCH", "DELETE", "HEAD", "GET", "BREW", ""])
                        .as_bytes(),
                ),
                _ => draft.set(
                    "Content-Type",
                    rng.pick(&["application/offset+octet-stream; x=y", "text/plain", ""])
                        .as_bytes(),
                ),
            }
        }
        "key" => {
            let (name, values): (&str, &[&str]) = if draft.position("x-api-key").is_some() {
                (
                    "x-api-key",
                    &[
                        "",
                        " ",
                        "wrong",
                        "demo-key ",
                        "demo-key, demo-key",
                        "DEMO-KEY",
                        "demo-key\t",
                    ],
                )
            } else if draft.position("authorization").is_some() {
                (
                    "Authorization",
                    &[
                        "",
                        "Bearer",
                        "Bearer ",
                        "Bearer wrong-key",
                        "bearer demo-key",
                        "Bearer demo-key extra",
                        "Bearer\tdemo-key",
                        "Basic ZGVtbzprZXk=",
                        "Api-Key demo-key",
                        "Bearer  demo-key",
                    ],
                )
            } else {
                return false;
            };
            if rng.chance(15) {
                let mut value = b"Bearer ".to_vec();
                value.extend(std::iter::repeat_n(b'k', 10_000));
                draft.set(name, &value);
            } else {
                draft.set(name, rng.pick(values).as_bytes());
            }
        }
        "body" => {
            if draft.body.is_empty() {
                draft.body = rng.bytes_between(1, 500);
            } else {
                match rng.below(3) {
                    0 => {
                        let at = rng.below(draft.body.len());
                        let n = rng.between(1, (draft.body.len() - at).min(200));
                        let noise = rng.bytes(n);
                        draft.body.splice(at..at + n, noise);
                    }
                    1 => {
                        let noise = rng.bytes_between(1, 2000);
                        draft.body.extend_from_slice(&noise);
                    }
                    _ => {
                        let keep = rng.below(draft.body.len());
                        draft.body.truncate(keep);
                    }
                }
            }
            if rng.chance(70) {
                draft.sync_length();
            }
        }
        other => unreachable!("mutation {other}"),
    }
    true
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = find(rest, from) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(to);
        rest = &rest[at + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

fn replace_first(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    match find(haystack, from) {
        Some(at) => [&haystack[..at], to, &haystack[at + from.len()..]].concat(),
        None => haystack.to_vec(),
    }
}

/// Applies the bytewise mutation `what` to a serialized request (`head` bytes long).
fn mutate_bytes(what: &str, rng: &mut Rng, bytes: &mut Vec<u8>, head: usize, host: &str) {
    if bytes.is_empty() {
        return;
    }
    // Mostly in the head, where the parser is.
    let position = |rng: &mut Rng, len: usize| {
        if rng.chance(40) && head > 0 {
            rng.below(head.min(len))
        } else {
            rng.below(len)
        }
    };
    match what {
        "bit-flip" => {
            for _ in 0..rng.between(1, 8) {
                let at = position(rng, bytes.len());
                bytes[at] ^= 1 << rng.below(8);
            }
        }
        "truncate" => {
            let keep = rng.below(bytes.len());
            bytes.truncate(keep);
        }
        "nul" => {
            for _ in 0..rng.between(1, 3) {
                let at = position(rng, bytes.len());
                bytes.insert(at, 0);
            }
        }
        "overwrite" => {
            let at = position(rng, bytes.len());
            let n = rng.between(1, (bytes.len() - at).min(64));
            let noise = rng.bytes(n);
            bytes.splice(at..at + n, noise);
        }
        "pipeline" => {
            let tail: Vec<u8> = match rng.below(7) {
                0 => {
                    let n = rng.between(1, 2000);
                    rng.bytes(n)
                }
                1 => b"\r\n".repeat(rng.between(1, 50)),
                2 => bytes.clone(),
                3 => format!("POST /v1/files/upload HTTP/1.1\r\nHost: {host}\r\n").into_bytes(),
                4 => b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                5 => format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
                _ => {
                    let mut second = format!("GET /files/ HTTP/1.1\r\nHost: {host}\r\nX-Huge: ").into_bytes();
                    second.extend(std::iter::repeat_n(b'h', 140 * 1024));
                    second.extend_from_slice(b"\r\n\r\n");
                    second
                }
            };
            bytes.extend_from_slice(&tail);
        }
        other => unreachable!("mutation {other}"),
    }
}

/// One fuzz case: the request sent and what it was.
struct Case {
    number: usize,
    base: Base,
    mutations: Vec<&'static str>,
    bytes: Vec<u8>,
}

fn build_case(number: usize, rng: &mut Rng, daemon: &Daemon, fixtures: &Fixtures) -> Case {
    let base = rng.pick(&BASES);
    let mut draft = base_draft(base, daemon, fixtures, rng);
    let mut mutations = Vec::new();
    // About one case in twelve goes as is: a control that must succeed.
    if !rng.chance(8) {
        let count = match rng.below(100) {
            0..50 => 1,
            50..85 => 2,
            _ => 3,
        };
        let mut bytewise = Vec::new();
        while mutations.len() + bytewise.len() < count {
            if rng.chance(75) {
                let what = rng.pick(STRUCTURED);
                if mutate(what, rng, &mut draft) {
                    mutations.push(what);
                }
            } else {
                bytewise.push(rng.pick(BYTEWISE));
            }
        }
        let mut bytes = draft.bytes();
        let head = bytes.len() - draft.body.len();
        let host = address(daemon);
        for what in bytewise {
            mutate_bytes(what, rng, &mut bytes, head, &host);
            mutations.push(what);
        }
        return Case {
            number,
            base,
            mutations,
            bytes,
        };
    }
    Case {
        number,
        base,
        mutations,
        bytes: draft.bytes(),
    }
}

/// Tallies of a fuzz run, printed at its end.
#[derive(Default)]
struct Tally {
    cases: usize,
    answers: BTreeMap<u16, usize>,
    prerouting: usize,
    routed: usize,
    unanswered: usize,
    resets: usize,
}

/// Checks one case's answers; returns what is wrong with them.
fn check_case(case: &Case, exchange: &Exchange, tally: &mut Tally) -> Vec<String> {
    let mut problems = Vec::new();
    let line = request_line(&case.bytes);
    let method = line
        .as_ref()
        .map(|(method, _)| method.as_str())
        .unwrap_or_default();
    let dialect = line.as_ref().map(|(_, path)| dialect_of(path));
    // A pipelined copy of a HEAD request is answered bodyless too.
    let heads = if method == "HEAD" {
        let again = case.mutations.contains(&"pipeline") && find(&case.bytes[4..], b"HEAD /").is_some();
        vec![true; 1 + usize::from(again)]
    } else {
        Vec::new()
    };
    for needle in [KEY.as_bytes(), sha256_hex(KEY.as_bytes()).as_bytes()] {
        if find(&exchange.received, needle).is_some() {
            problems.push("the answer contains the API key (or its sha256)".into());
        }
    }
    if exchange.reset {
        tally.resets += 1;
    }
    let (answers, rest) = match parse_answers(&exchange.received, &heads) {
        Ok(parsed) => parsed,
        Err(why) => {
            problems.push(format!("a malformed answer: {why}"));
            return problems;
        }
    };
    if !rest.is_empty() && !exchange.reset {
        problems.push(format!(
            "a cut-off answer ({} bytes after the last whole one)",
            rest.len()
        ));
    }
    if exchange.timed_out && !rest.is_empty() {
        problems.push("an answer that never completed".into());
    }
    if answers.iter().all(|answer| answer.status < 200) {
        tally.unanswered += 1;
        if exchange.timed_out {
            problems.push("neither answered nor closed within the limit".into());
        }
    }
    for (n, answer) in answers.iter().enumerate() {
        *tally.answers.entry(answer.status).or_default() += 1;
        if let Some(problem) = status_problem(answer) {
            problems.push(format!("answer {n}: {problem}"));
        }
        if is_prerouting(answer) {
            tally.prerouting += 1;
            continue;
        }
        tally.routed += 1;
        // Only the first final answer is to this request; the rest are to what was
        // pipelined after it (their own paths, not checked here beyond the status).
        let first_final = answers.iter().position(|a| a.status >= 200) == Some(n);
        if let (true, Some(dialect)) = (first_final, dialect)
            && let Some(problem) = shape_problem(dialect, method, answer)
        {
            problems.push(format!("answer {n}: {problem}"));
        }
    }
    if case.mutations.is_empty() {
        let first = answers.iter().find(|answer| answer.status >= 200);
        if first.map(|answer| answer.status) != Some(case.base.status()) {
            problems.push(format!(
                "the unmutated {:?} request was answered {:?}, not {}",
                case.base,
                first.map(|answer| answer.status),
                case.base.status()
            ));
        }
    }
    problems
}

#[test]
fn fuzzed_requests_of_every_dialect_never_break_the_daemon() {
    let (run, mut rng) = Run::begin("fuzzed_requests_of_every_dialect_never_break_the_daemon");
    // Thousands of cases, many of which open a tus upload or a Kore session and leave it.
    let mut daemon = Daemon::start_with(|dir| {
        default_config(dir)
            .replace(
                "  idle_timeout: 2s\n",
                "  idle_timeout: 2s\n  header_timeout: 3s\n",
            )
            .replace(
                "    max_file_size: 1MiB\n",
                "    max_file_size: 1MiB\n    max_open_sessions: 1000000\n",
            )
    });
    let address = address(&daemon);
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut problems: Vec<String> = Vec::new();
    let mut number = 0;
    const BATCH: usize = 30;
    let more = |number: usize| match run.knobs.secs {
        Some(secs) => started.elapsed() < Duration::from_secs(secs),
        None => number < run.knobs.cases,
    };
    while more(number) {
        let fixtures = Fixtures {
            kore_session: kore_start(&daemon, "chunks.txt", 1024 * 1024, 1000),
        };
        let mut batch = Vec::new();
        for _ in 0..BATCH {
            if !more(number) {
                break;
            }
            let mut case_rng = rng.fork();
            let case = build_case(number, &mut case_rng, &daemon, &fixtures);
            let exchange = exchange(&address, &case.bytes, Duration::from_secs(8), true);
            tally.cases += 1;
            for problem in check_case(&case, &exchange, &mut tally) {
                problems.push(format!(
                    "case {} ({:?} + {:?}): {problem}\n--- request:\n{}\n--- answer:\n{}\n",
                    case.number,
                    case.base,
                    case.mutations,
                    escaped(&case.bytes, 1500),
                    escaped(&exchange.received, 1500)
                ));
            }
            batch.push(format!("{} {:?} {:?}", case.number, case.base, case.mutations));
            number += 1;
        }
        assert_serving(
            &mut daemon,
            &format!("after cases {}", batch.first().cloned().unwrap_or_default()),
        );
        assert!(problems.len() < 200, "{}", problems.join("\n"));
    }
    eprintln!(
        "fuzz: {} cases in {:?}; answers by status {:?}; {} routed, {} pre-routing (empty 400/408/431), {} unanswered, {} resets",
        tally.cases,
        started.elapsed(),
        tally.answers,
        tally.routed,
        tally.prerouting,
        tally.unanswered,
        tally.resets
    );
    assert_serving(&mut daemon, "at the end");
    let spool_empty = eventually(Duration::from_secs(15), || daemon.spool_files() == 0);
    if !spool_empty {
        problems.push(format!("files left in the spool: {:?}", spool_names(&daemon)));
    }
    let mut disk = store_disk_problems(&daemon, &daemon.files_dir());
    if !disk.is_empty() {
        // The daemon may still be finishing an upload: once more, later.
        std::thread::sleep(Duration::from_secs(2));
        disk = store_disk_problems(&daemon, &daemon.files_dir());
    }
    problems.extend(disk);
    problems.extend(
        stray_paths(&daemon)
            .into_iter()
            .map(|path| format!("{path}: a file where upgate keeps none")),
    );
    problems.extend(
        orphan_session_dirs(&daemon)
            .into_iter()
            .map(|dir| format!("session directory {dir} without a session record")),
    );
    assert!(
        problems.is_empty(),
        "{} problems in {} cases:\n{}\n--- daemon log (tail):\n{}",
        problems.len(),
        tally.cases,
        problems.join("\n"),
        tail(&daemon.log(), 40)
    );
}

// ---------------------------------------------------------------------------------------------
// 1b. Pre-routing rejections (issue #10)
// ---------------------------------------------------------------------------------------------

#[test]
fn prerouting_rejections_answer_in_dialect_shape() {
    let (_run, mut rng) = Run::begin("prerouting_rejections_answer_in_dialect_shape");
    let mut daemon = Daemon::start_with(default_config);
    let address = address(&daemon);
    let fixtures = Fixtures {
        kore_session: kore_start(&daemon, "chunks.txt", 1024 * 1024, 1000),
    };
    let requests = [
        ("dify", Base::DifyUpload),
        ("kore", Base::KoreUpload),
        ("maiagent", Base::MaiagentUpload),
        ("korexo", Base::KorexoUpload),
        ("beam", Base::BeamUpload),
        ("tus", Base::TusCreate),
        ("tus", Base::TusPatch),
    ];
    type Breaker = fn(&mut Draft);
    let cases: [(&str, u16, Breaker); 8] = [
        ("a header over 128 KiB", 431, |d| {
            let mut line = b"X-Pad: ".to_vec();
            line.extend(std::iter::repeat_n(b'p', 130 * 1024));
            d.headers.push(line);
        }),
        ("100 headers", 431, |d| {
            for n in 0..100 {
                d.headers.push(format!("X-Many-{n}: {n}").into_bytes());
            }
        }),
        ("a NUL in a header value", 400, |d| {
            d.headers.push(b"X-Torture: a\0b".to_vec())
        }),
        ("an invalid byte in a header name", 400, |d| {
            d.headers.push(b"X(Torture): 1".to_vec());
        }),
        ("Content-Length not a number", 400, |d| {
            d.set("Content-Length", b"abc")
        }),
        ("Content-Length and Transfer-Encoding", 400, |d| {
            d.set("Transfer-Encoding", b"chunked");
        }),
        ("Transfer-Encoding other than chunked", 400, |d| {
            d.remove("content-length");
            d.set("Transfer-Encoding", b"gzip");
        }),
        ("HTTP/1.1 without Host", 400, |d| d.remove("host")),
    ];
    let mut failures = Vec::new();
    let mut total = 0;
    for (dialect, base) in requests {
        for (what, status, breaker) in &cases {
            let mut draft = base_draft(base, &daemon, &fixtures, &mut rng);
            breaker(&mut draft);
            let (method, path) = (draft.method.clone(), draft.target.clone());
            let exchange = exchange(&address, &draft.bytes(), Duration::from_secs(8), true);
            total += 1;
            let answer = parse_answers(&exchange.received, &[method == "HEAD"])
                .ok()
                .and_then(|(answers, _)| answers.into_iter().find(|answer| answer.status >= 200));
            let verdict = match &answer {
                None => Some(format!("no answer ({})", escaped(&exchange.received, 200))),
                Some(answer) if answer.status != *status => {
                    Some(format!("status {}, not {status}", answer.status))
                }
                Some(answer) if answer.body.is_empty() => {
                    Some(format!("{} with an empty body", answer.status))
                }
                Some(answer) => shape_problem(dialect, &method, answer),
            };
            if let Some(verdict) = verdict {
                failures.push(format!("{dialect} {method} {path}, {what}: {verdict}"));
            }
        }
    }
    assert_serving(&mut daemon, "after the pre-routing cases");
    assert!(
        failures.is_empty(),
        "{} of {total} requests refused before routing are not answered in their dialect's shape:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Two requests in one write (HTTP/1.1 pipelining): each answer framed for its own request.
/// A HEAD's answer has no body, the next request's answer has its own.
#[test]
fn pipelined_answers_are_framed_for_their_own_request() {
    let (_run, _rng) = Run::begin("pipelined_answers_are_framed_for_their_own_request");
    let mut daemon = Daemon::start_with(default_config);
    let address = address(&daemon);
    let request = |method: &str, path: &str| format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\n\r\n");
    let mut failures = Vec::new();
    for path in [
        "/nowhere",
        "/v1/files/upload",
        "/api/public/files",
        "/agent-setup/upload",
    ] {
        for (first, second) in [("HEAD", "GET"), ("GET", "HEAD"), ("HEAD", "HEAD"), ("GET", "GET")] {
            let both = format!("{}{}", request(first, path), request(second, path));
            let exchange = exchange(&address, both.as_bytes(), Duration::from_secs(8), true);
            let bodyless = [first == "HEAD", second == "HEAD"];
            let verdict = match parse_answers(&exchange.received, &bodyless) {
                Err(why) => Some(why),
                Ok((answers, rest)) if answers.len() != 2 || !rest.is_empty() => {
                    Some(format!("{} answers and {} bytes more", answers.len(), rest.len()))
                }
                Ok((answers, _)) => answers
                    .iter()
                    .zip([first, second])
                    .find_map(|(answer, method)| shape_problem(dialect_of(path), method, answer)),
            };
            if let Some(verdict) = verdict {
                failures.push(format!(
                    "{first} {path} then {second} {path}: {verdict}\n{}",
                    escaped(&exchange.received, 600)
                ));
            }
        }
    }
    assert_serving(&mut daemon, "after the pipelined requests");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Found by the fuzzer: plain UTF-8 text whose first two letters are another format's magic
/// number (`BC`: LLVM bitcode, whose real magic is `BC\xc0\xde`; `BM`: BMP) is still text.
#[test]
fn plain_text_that_starts_like_a_magic_number_is_text() {
    let (_run, _rng) = Run::begin("plain_text_that_starts_like_a_magic_number_is_text");
    let daemon = Daemon::start_with(default_config);
    let mut refused = Vec::new();
    for text in ["BC Hydro invoice, March", "BMW service plan"] {
        let form = Form::new().file("file", "note.txt", "text/plain", text.as_bytes());
        let reply = post_form(
            &daemon.url("/v1/files/upload"),
            &[("Authorization", "Bearer demo-key")],
            &form,
        );
        if reply.status != 201 {
            refused.push(format!("{text:?}: {} {}", reply.status, reply.text));
        }
    }
    assert!(refused.is_empty(), "plain text refused:\n{}", refused.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Raw requests for the other classes
// ---------------------------------------------------------------------------------------------

/// A request by hand on its own connection (`Connection: close`, a Content-Length); the first
/// final answer, if one came. Unlike an HTTP client, it still reads an answer the daemon sent
/// before it read the whole body (a 409, a 507).
fn raw_request(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Answer> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    let exchange = exchange(address, &bytes, Duration::from_secs(30), false);
    let (answers, _) = parse_answers(&exchange.received, &[method == "HEAD"]).ok()?;
    answers.into_iter().find(|answer| answer.status >= 200)
}

fn answer_text(answer: &Answer) -> String {
    String::from_utf8_lossy(&answer.body).into_owned()
}

/// Found by the tmpfs test: a client may shut its side of the connection once its request is
/// sent whole (a half-close); the daemon must still read the body it has received. Under load
/// (other uploads at once), a tus creation whose body arrived whole then met the end of the
/// stream was answered 400 "payload reached EOF before completing".
#[test]
fn a_request_sent_whole_then_half_closed_is_served() {
    let (_run, mut rng) = Run::begin("a_request_sent_whole_then_half_closed_is_served");
    let daemon = Daemon::start_with(default_config);
    let address = address(&daemon);
    let failures: Vec<String> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                let (mut rng, address) = (rng.fork(), &address);
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    for n in 0..16 {
                        let name = format!("half-{thread}-{n}.txt");
                        if n % 2 == 1 {
                            // Load beside: a Kore XO upload sent the ordinary way.
                            let content = rng.text_between(128 * 1024, 1_000_000);
                            let body = korexo_form(&name, &content).body();
                            let multipart = Form::content_type();
                            let headers = [("x-api-key", KEY), ("Content-Type", multipart.as_str())];
                            raw_request(address, "POST", &format!("{KOREXO_BASE}/upload"), &headers, &body);
                            continue;
                        }
                        let content = rng.text_between(100 * 1024, 600 * 1024);
                        let draft = Draft::new(
                            "POST",
                            "/files/",
                            address,
                            &[
                                TUS,
                                ("Authorization", "Bearer demo-key"),
                                ("Upload-Length", "1000000"),
                                ("Upload-Metadata", &tus_metadata(&name)),
                                ("Content-Type", OFFSET_STREAM),
                                ("Connection", "close"),
                            ],
                            content.clone(),
                        );
                        let exchange = exchange(address, &draft.bytes(), Duration::from_secs(30), true);
                        let answer = parse_answers(&exchange.received, &[])
                            .ok()
                            .and_then(|(answers, _)| answers.into_iter().next());
                        let offset = content.len().to_string();
                        match answer {
                            Some(answer)
                                if answer.status == 201
                                    && answer.header("upload-offset") == Some(offset.as_str()) => {}
                            Some(answer) => failures.push(format!(
                                "{name} ({} bytes, all sent, then SHUT_WR): {} {}",
                                content.len(),
                                answer.status,
                                answer_text(&answer).trim()
                            )),
                            None => failures.push(format!("{name}: no answer")),
                        }
                    }
                    failures
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of 32 whole requests refused after a half-close:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. kill -9 under concurrent load
// ---------------------------------------------------------------------------------------------

/// The default config plus an async twin of the local provider (same root) and a tenant on it.
fn kill_config(dir: &Path) -> String {
    default_config(dir).replace(
        "providers:\n",
        &format!(
            "providers:\n  lazy:\n    plugin: local\n    delivery: async\n    settings:\n      root: {}\n",
            dir.join("files").display()
        ),
    ) + "  lazy:\n    plan: default\n    provider: lazy\n    keys: [lazy-key]\n"
}

/// An upload the client was answered 2xx for.
#[derive(Debug, Clone)]
struct Acked {
    id: String,
    size: usize,
    sha256: String,
    how: String,
}

/// A tus upload whose creation was acknowledged and whose end was not.
#[derive(Debug, Clone)]
struct Unfinished {
    path: String,
    key: &'static str,
    content: Arc<Vec<u8>>,
    /// The last offset an answer acknowledged.
    acked: u64,
    how: String,
}

#[derive(Default)]
struct Load {
    acked: Vec<Acked>,
    unfinished: Vec<Unfinished>,
    problems: Vec<String>,
    attempts: usize,
}

fn upload_size(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0..4 => rng.between(1, 1024),
        4..7 => rng.between(1025, 64 * 1024),
        7..9 => rng.between(64 * 1024, 256 * 1024),
        _ => rng.between(256 * 1024, 1_000_000),
    }
}

fn ack(id: Option<&str>, content: &[u8], how: &str) -> Result<Acked, String> {
    let id = id.ok_or_else(|| format!("{how}: no id in a success"))?;
    Ok(Acked {
        id: id.to_owned(),
        size: content.len(),
        sha256: sha256_hex(content),
        how: how.to_owned(),
    })
}

/// Uploads in a loop (Dify, tus in one request, tus created with a part and finished by a
/// PATCH; as the tenants of `keys`: `demo-key` sync, `lazy-key` async) until `stop`; what was
/// acknowledged.
fn load_worker(base: &str, mut rng: Rng, stop: &AtomicBool, label: &str, keys: &[&'static str]) -> Load {
    let agent = agent(Duration::from_secs(30));
    let mut load = Load::default();
    while !stop.load(Ordering::SeqCst) {
        load.attempts += 1;
        let key = rng.pick(keys);
        let auth = format!("Bearer {key}");
        let size = upload_size(&mut rng);
        let content = Arc::new(rng.text(size));
        let name = format!("{label}-{}.txt", load.attempts);
        let how = |kind: &str| format!("{kind} {name} ({} bytes, {key})", content.len());
        let result: Result<(), String> = match rng.below(3) {
            0 => {
                let form = Form::new().file("file", &name, "text/plain", &content);
                let how = how("dify");
                match try_send(
                    &agent,
                    "POST",
                    &format!("{base}/v1/files/upload"),
                    &[("Authorization", &auth)],
                    Some((&Form::content_type(), form.body())),
                ) {
                    None => Ok(()),
                    Some(reply) if reply.status == 201 => {
                        let body: Value = serde_json::from_str(&reply.text).unwrap_or(Value::Null);
                        ack(body["id"].as_str(), &content, &how).map(|a| load.acked.push(a))
                    }
                    Some(reply) => Err(format!("{how}: {} {}", reply.status, reply.text)),
                }
            }
            1 => {
                let how = how("tus whole");
                let length = content.len().to_string();
                let meta = tus_metadata(&name);
                match try_send(
                    &agent,
                    "POST",
                    &format!("{base}/files/"),
                    &[
                        TUS,
                        ("Authorization", &auth),
                        ("Upload-Length", &length),
                        ("Upload-Metadata", &meta),
                    ],
                    Some((OFFSET_STREAM, content.to_vec())),
                ) {
                    None => Ok(()),
                    Some(reply) if reply.status == 201 => {
                        ack(reply.header("upgate-upload-id"), &content, &how).map(|a| load.acked.push(a))
                    }
                    Some(reply) => Err(format!("{how}: {} {}", reply.status, reply.text)),
                }
            }
            _ => {
                let how = how("tus in two");
                let first = if content.len() > 1 {
                    rng.between(1, content.len() - 1)
                } else {
                    1
                };
                let length = content.len().to_string();
                let meta = tus_metadata(&name);
                match try_send(
                    &agent,
                    "POST",
                    &format!("{base}/files/"),
                    &[
                        TUS,
                        ("Authorization", &auth),
                        ("Upload-Length", &length),
                        ("Upload-Metadata", &meta),
                    ],
                    Some((OFFSET_STREAM, content[..first].to_vec())),
                ) {
                    None => Ok(()),
                    Some(reply)
                        if reply.status == 201
                            && reply.header("upload-offset") == Some(&first.to_string()) =>
                    {
                        match tus_path(&reply) {
                            None => Err(format!("{how}: no Location: {reply:?}")),
                            Some(_) if first == content.len() => {
                                ack(reply.header("upgate-upload-id"), &content, &how)
                                    .map(|a| load.acked.push(a))
                            }
                            Some(path) => {
                                let offset = first.to_string();
                                let finished = try_send(
                                    &agent,
                                    "PATCH",
                                    &format!("{base}{path}"),
                                    &[TUS, ("Authorization", &auth), ("Upload-Offset", &offset)],
                                    Some((OFFSET_STREAM, content[first..].to_vec())),
                                );
                                match finished {
                                    None => {
                                        load.unfinished.push(Unfinished {
                                            path,
                                            key,
                                            content: content.clone(),
                                            acked: first as u64,
                                            how: how.clone(),
                                        });
                                        Ok(())
                                    }
                                    Some(reply) if reply.status == 204 => {
                                        ack(reply.header("upgate-upload-id"), &content, &how)
                                            .map(|a| load.acked.push(a))
                                    }
                                    Some(reply) => {
                                        Err(format!("{how}, its PATCH: {} {}", reply.status, reply.text))
                                    }
                                }
                            }
                        }
                    }
                    Some(reply) => Err(format!(
                        "{how}: {} {:?} {}",
                        reply.status, reply.headers, reply.text
                    )),
                }
            }
        };
        if let Err(problem) = result {
            load.problems.push(problem);
        }
    }
    load
}

/// After a restart: the sweep left no stray spool file, async deliveries finish, every
/// acknowledged upload is stored whole, and every unfinished tus upload resumes from an offset
/// no lower than the one acknowledged and completes.
fn verify_restart(
    daemon: &Daemon,
    acked: &mut Vec<Acked>,
    unfinished: &mut Vec<Unfinished>,
    round: usize,
) -> Vec<String> {
    let mut problems = Vec::new();
    let spooled = spool_names(daemon);
    let known = rows(daemon);
    for name in &spooled {
        match known.get(name) {
            Some((state, ..)) if state != "deleted" => {}
            other => problems.push(format!(
                "round {round}: spool file {name} after the restart's sweep (record: {other:?})"
            )),
        }
    }
    let agent = agent(Duration::from_secs(30));
    for upload in std::mem::take(unfinished) {
        let auth = format!("Bearer {}", upload.key);
        let url = daemon.url(&upload.path);
        let Some(head) = try_send(&agent, "HEAD", &url, &[TUS, ("Authorization", &auth)], None) else {
            problems.push(format!("round {round}: HEAD {} failed", upload.path));
            continue;
        };
        let offset: Option<u64> = head.header("upload-offset").and_then(|v| v.parse().ok());
        let length = upload.content.len() as u64;
        let Some(offset) = offset.filter(|o| head.status == 200 && (upload.acked..=length).contains(o))
        else {
            problems.push(format!(
                "round {round}: {} acknowledged at {} of {length}, after the kill HEAD says {} {:?}",
                upload.how, upload.acked, head.status, head.headers
            ));
            continue;
        };
        let id = upload.path.trim_start_matches("/files/");
        let session_file = daemon.data_dir().join("sessions").join(id).join("0");
        if let Ok(bytes) = std::fs::read(&session_file)
            && (bytes.len() < offset as usize
                || bytes[..offset as usize] != upload.content[..offset as usize])
        {
            problems.push(format!(
                "round {round}: {}: the bytes before offset {offset} are not the ones sent",
                upload.how
            ));
            continue;
        }
        let id = match head.header("upgate-upload-id") {
            Some(id) if offset == length => Some(id.to_owned()),
            _ => {
                let at = offset.to_string();
                let done = try_send(
                    &agent,
                    "PATCH",
                    &url,
                    &[TUS, ("Authorization", &auth), ("Upload-Offset", &at)],
                    Some((OFFSET_STREAM, upload.content[offset as usize..].to_vec())),
                );
                match done {
                    Some(reply) if reply.status == 204 => reply.header("upgate-upload-id").map(str::to_owned),
                    other => {
                        problems.push(format!(
                            "round {round}: {} resumed at {offset}: {other:?}",
                            upload.how
                        ));
                        continue;
                    }
                }
            }
        };
        match ack(
            id.as_deref(),
            &upload.content,
            &format!("{} (resumed)", upload.how),
        ) {
            Ok(done) => acked.push(done),
            Err(problem) => problems.push(problem),
        }
    }
    let delivered = eventually(Duration::from_secs(30), || {
        daemon.spool_files() == 0 && rows(daemon).values().all(|(state, ..)| state != "received")
    });
    if !delivered {
        problems.push(format!(
            "round {round}: async deliveries unfinished after 30 s: spool {:?}",
            spool_names(daemon)
        ));
    }
    let known = rows(daemon);
    for upload in acked.iter() {
        match known.get(&upload.id) {
            Some((state, size, sha256))
                if state == "forwarded" && *size as usize == upload.size && *sha256 == upload.sha256 =>
            {
                match std::fs::read(daemon.files_dir().join(&upload.id)) {
                    Ok(bytes) if sha256_hex(&bytes) == upload.sha256 => {}
                    Ok(bytes) => problems.push(format!(
                        "round {round}: {} ({}): the stored file has {} bytes, sha256 {}",
                        upload.how,
                        upload.id,
                        bytes.len(),
                        sha256_hex(&bytes)
                    )),
                    Err(error) => problems.push(format!(
                        "round {round}: {} ({}) acknowledged, its file: {error}",
                        upload.how, upload.id
                    )),
                }
            }
            other => problems.push(format!(
                "round {round}: {} ({}) acknowledged ({} bytes, sha256 {}), its record: {other:?}",
                upload.how, upload.id, upload.size, upload.sha256
            )),
        }
    }
    // Files without a record are `a_kill_9_during_sync_deliveries_leaves_no_file_without_a_record`'s.
    problems.extend(
        records_without_their_file(daemon, &daemon.files_dir())
            .into_iter()
            .map(|problem| format!("round {round}: {problem}")),
    );
    problems
}

#[test]
fn kill_9_under_concurrent_load_loses_nothing_acknowledged() {
    let (run, mut rng) = Run::begin("kill_9_under_concurrent_load_loses_nothing_acknowledged");
    let dir = tempfile::tempdir().unwrap();
    let config = kill_config(dir.path());
    let mut daemon = Daemon::start_in(dir.path().to_path_buf(), &config);
    let mut acked: Vec<Acked> = Vec::new();
    let mut unfinished: Vec<Unfinished> = Vec::new();
    let mut problems = Vec::new();
    for round in 0..run.knobs.rounds {
        let stop = AtomicBool::new(false);
        let kill_after = Duration::from_millis(rng.between(300, 2500) as u64);
        let base = daemon.base_url.clone();
        let loads: Vec<Load> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|thread| {
                    let worker_rng = rng.fork();
                    let (base, stop) = (&base, &stop);
                    let label = format!("r{round}t{thread}");
                    scope
                        .spawn(move || load_worker(base, worker_rng, stop, &label, &["demo-key", "lazy-key"]))
                })
                .collect();
            std::thread::sleep(kill_after);
            daemon.kill();
            stop.store(true, Ordering::SeqCst);
            workers.into_iter().map(|worker| worker.join().unwrap()).collect()
        });
        let before = acked.len();
        let mut attempts = 0;
        for load in loads {
            attempts += load.attempts;
            acked.extend(load.acked);
            unfinished.extend(load.unfinished);
            problems.extend(load.problems);
        }
        eprintln!(
            "round {round}: SIGKILL after {kill_after:?}: {attempts} uploads tried, {} acknowledged, {} tus uploads unfinished",
            acked.len() - before,
            unfinished.len()
        );
        let (dir, config_path) = (daemon.dir.clone(), daemon.config_path.clone());
        daemon = Daemon::spawn(dir, config_path, &[]);
        problems.extend(verify_restart(&daemon, &mut acked, &mut unfinished, round));
        assert!(
            problems.is_empty(),
            "{}\n--- daemon log (tail):\n{}",
            problems.join("\n"),
            tail(&daemon.log(), 40)
        );
    }
    // Nothing lost only means something when something was acknowledged before a kill.
    assert!(!acked.is_empty(), "no upload was acknowledged in any round");
    assert_serving(&mut daemon, "after the last restart");
}

/// A sync delivery puts the provider's copy in place before its outcome is written: a kill
/// in between must not leave a copy nobody knows (its record, written before the delivery,
/// says it was interrupted).
#[test]
fn a_kill_9_during_sync_deliveries_leaves_no_file_without_a_record() {
    let (run, mut rng) = Run::begin("a_kill_9_during_sync_deliveries_leaves_no_file_without_a_record");
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start_in(dir.path().to_path_buf(), &kill_config(dir.path()));
    let (mut found, mut seen) = (Vec::new(), BTreeSet::new());
    let mut acknowledged = 0;
    let rounds = run.knobs.rounds * 3;
    for round in 0..rounds {
        let stop = AtomicBool::new(false);
        let kill_after = Duration::from_millis(rng.between(200, 900) as u64);
        let base = daemon.base_url.clone();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|thread| {
                    let worker_rng = rng.fork();
                    let (base, stop) = (&base, &stop);
                    let label = format!("o{round}t{thread}");
                    scope.spawn(move || load_worker(base, worker_rng, stop, &label, &["demo-key"]))
                })
                .collect();
            std::thread::sleep(kill_after);
            daemon.kill();
            stop.store(true, Ordering::SeqCst);
            for worker in workers {
                acknowledged += worker.join().unwrap().acked.len();
            }
        });
        let (dir, config_path) = (daemon.dir.clone(), daemon.config_path.clone());
        daemon = Daemon::spawn(dir, config_path, &[]);
        for orphan in orphan_files(&daemon, &daemon.files_dir()) {
            if seen.insert(orphan.clone()) {
                found.push(format!("round {round} (SIGKILL after {kill_after:?}): {orphan}"));
            }
        }
    }
    assert!(acknowledged > 0, "no sync upload was delivered before any kill");
    assert!(
        found.is_empty(),
        "after {rounds} kills during sync uploads, {} provider files without a record:\n{}",
        found.len(),
        found.join("\n")
    );
}

/// An async upload is acknowledged once it is spooled; a kill while the outbox delivers it
/// must not turn it into a failure after the restart (its delivery runs again).
#[test]
fn a_kill_9_during_async_deliveries_fails_no_acknowledged_upload() {
    let (run, mut rng) = Run::begin("a_kill_9_during_async_deliveries_fails_no_acknowledged_upload");
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start_in(dir.path().to_path_buf(), &kill_config(dir.path()));
    let mut acked: Vec<Acked> = Vec::new();
    let mut acknowledged = 0;
    let mut found = Vec::new();
    let rounds = run.knobs.rounds * 4;
    for round in 0..rounds {
        let stop = AtomicBool::new(false);
        let kill_after = Duration::from_millis(rng.between(150, 700) as u64);
        let base = daemon.base_url.clone();
        let loads: Vec<Load> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|thread| {
                    let worker_rng = rng.fork();
                    let (base, stop) = (&base, &stop);
                    let label = format!("a{round}t{thread}");
                    scope.spawn(move || load_worker(base, worker_rng, stop, &label, &["lazy-key"]))
                })
                .collect();
            std::thread::sleep(kill_after);
            daemon.kill();
            stop.store(true, Ordering::SeqCst);
            workers.into_iter().map(|worker| worker.join().unwrap()).collect()
        });
        for load in loads {
            assert!(load.problems.is_empty(), "{}", load.problems.join("\n"));
            acknowledged += load.acked.len();
            acked.extend(load.acked);
        }
        let (dir, config_path) = (daemon.dir.clone(), daemon.config_path.clone());
        daemon = Daemon::spawn(dir, config_path, &[]);
        // Whatever is still waiting then is reported below, upload by upload.
        let _settled = eventually(Duration::from_secs(30), || {
            rows(&daemon).values().all(|(state, ..)| state != "received")
        });
        let known = rows(&daemon);
        acked.retain(|upload| match known.get(&upload.id) {
            Some((state, ..)) if state == "forwarded" => true,
            other => {
                let on_disk = daemon.files_dir().join(&upload.id).exists();
                found.push(format!(
                    "round {round} (SIGKILL after {kill_after:?}): {} ({}) acknowledged, its record {other:?}, \
                     its file {} the provider's root",
                    upload.how,
                    upload.id,
                    if on_disk { "in" } else { "not in" }
                ));
                false
            }
        });
    }
    assert!(
        acknowledged > 0,
        "no async upload was acknowledged before any kill"
    );
    assert!(
        found.is_empty(),
        "after {rounds} kills during async deliveries, {} acknowledged uploads not delivered:\n{}\n--- daemon log (failures):\n{}",
        found.len(),
        found.join("\n"),
        daemon
            .log()
            .lines()
            .filter(|line| line.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A small tmpfs filled to full
// ---------------------------------------------------------------------------------------------

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output();
        match output {
            Ok(output) if output.status.success() => Self { dir },
            Ok(output) => panic!(
                "cannot mount a {size} tmpfs at {} (`mount -t tmpfs` needs root or CAP_SYS_ADMIN; this test \
                 needs one and never skips): {}",
                dir.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(error) => panic!("cannot run `mount` (this test needs it and never skips): {error}"),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|status| status.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// What one filling thread got.
#[derive(Default)]
struct Fill {
    stored: Vec<Acked>,
    korexo: Vec<String>,
    partial: Vec<String>,
    full: usize,
    unanswered: usize,
    problems: Vec<String>,
}

/// Uploads in parallel into a filling disk until the disk is full: each answer must be a
/// success or a 507, in its dialect's shape.
fn fill_worker(address: &str, mut rng: Rng, label: &str) -> Fill {
    let mut fill = Fill::default();
    let multipart = Form::content_type();
    for attempt in 0..80 {
        if fill.full >= 4 {
            break;
        }
        let name = format!("{label}-{attempt}.txt");
        let (dialect, method, path, answer, content) = match rng.below(20) {
            0..11 => {
                let content = rng.text_between(128 * 1024, 1_000_000);
                let body = korexo_form(&name, &content).body();
                let answer = raw_request(
                    address,
                    "POST",
                    &format!("{KOREXO_BASE}/upload"),
                    &[("x-api-key", KEY), ("Content-Type", &multipart)],
                    &body,
                );
                ("korexo", "POST", "upload", answer, content)
            }
            11..16 => {
                let content = rng.text_between(100 * 1024, 600 * 1024);
                let meta = tus_metadata(&name);
                let answer = raw_request(
                    address,
                    "POST",
                    "/files/",
                    &[
                        TUS,
                        ("Authorization", "Bearer demo-key"),
                        ("Upload-Length", "1000000"),
                        ("Upload-Metadata", &meta),
                        ("Content-Type", OFFSET_STREAM),
                    ],
                    &content,
                );
                ("tus", "POST", "partial", answer, content)
            }
            _ => {
                let content = rng.text_between(1, 48 * 1024);
                let body = Form::new().file("file", &name, "text/plain", &content).body();
                let answer = raw_request(
                    address,
                    "POST",
                    "/v1/files/upload",
                    &[("Authorization", "Bearer demo-key"), ("Content-Type", &multipart)],
                    &body,
                );
                ("dify", "POST", "upload", answer, content)
            }
        };
        let Some(answer) = answer else {
            fill.unanswered += 1;
            continue;
        };
        let what = format!("{dialect} {path} {name} ({} bytes)", content.len());
        if answer.status == 507 {
            fill.full += 1;
        } else if !(200..300).contains(&answer.status) {
            fill.problems
                .push(format!("{what}: {} {}", answer.status, answer_text(&answer)));
            continue;
        }
        if let Some(problem) = shape_problem(dialect, method, &answer) {
            fill.problems.push(format!("{what}: {problem}"));
            continue;
        }
        if answer.status == 507 {
            continue;
        }
        let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
        match (dialect, path) {
            ("korexo", _) => {
                let id = body["fileId"].as_str().unwrap_or_default().to_owned();
                fill.stored.push(Acked {
                    id: id.clone(),
                    size: content.len(),
                    sha256: sha256_hex(&content),
                    how: what,
                });
                fill.korexo.push(id);
            }
            ("tus", _) => match tus_path(&Reply {
                status: answer.status,
                headers: answer.headers.clone(),
                text: String::new(),
            }) {
                Some(location) => fill.partial.push(location),
                None => fill
                    .problems
                    .push(format!("{what}: no Location: {:?}", answer.headers)),
            },
            _ => fill.stored.push(Acked {
                id: body["id"].as_str().unwrap_or_default().to_owned(),
                size: content.len(),
                sha256: sha256_hex(&content),
                how: what,
            }),
        }
    }
    fill
}

#[test]
fn a_full_disk_is_507_in_every_dialect_and_deletes_make_room_again() {
    let (run, mut rng) = Run::begin("a_full_disk_is_507_in_every_dialect_and_deletes_make_room_again");
    let tmpfs = Tmpfs::mount("16m");
    // No floor: the disk itself runs out, mid-upload, mid-record.
    let config = default_config(&tmpfs.dir).replace(
        "  disk_free_floor: 1MiB\n",
        "  disk_free_floor: 0\n  sweep_interval: 1s\n",
    );
    let mut daemon = Daemon::start_in(tmpfs.dir.clone(), &config);
    let address = address(&daemon);
    let mut kept: Vec<Acked> = Vec::new();
    for cycle in 0..run.knobs.rounds {
        let fills: Vec<Fill> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|thread| {
                    let worker_rng = rng.fork();
                    let address = &address;
                    scope.spawn(move || fill_worker(address, worker_rng, &format!("c{cycle}t{thread}")))
                })
                .collect();
            workers.into_iter().map(|worker| worker.join().unwrap()).collect()
        });
        let mut problems: Vec<String> = Vec::new();
        let (mut korexo, mut partial, mut full, mut unanswered) = (Vec::new(), Vec::new(), 0, 0);
        for fill in fills {
            problems.extend(fill.problems);
            kept.extend(fill.stored.into_iter().filter(|a| !a.how.starts_with("korexo")));
            korexo.extend(fill.korexo);
            partial.extend(fill.partial);
            full += fill.full;
            unanswered += fill.unanswered;
        }
        eprintln!(
            "cycle {cycle}: {} Kore XO uploads and {} partial tus uploads stored, {full} answered 507, {unanswered} unanswered",
            korexo.len(),
            partial.len()
        );
        assert!(full > 0, "cycle {cycle}: the disk never filled (no 507)");
        // The last bytes: small uploads until even those are refused, so that the record
        // store itself meets the full disk.
        let (mut refused_in_a_row, mut small) = (0, 0);
        while refused_in_a_row < 10 && small < 400 {
            small += 1;
            let content = rng.text_between(1, 2048);
            let name = format!("c{cycle}-small-{small}.txt");
            let body = Form::new().file("file", &name, "text/plain", &content).body();
            let answer = raw_request(
                &address,
                "POST",
                "/v1/files/upload",
                &[
                    ("Authorization", "Bearer demo-key"),
                    ("Content-Type", &Form::content_type()),
                ],
                &body,
            );
            let Some(answer) = answer else {
                problems.push(format!("cycle {cycle}: {name}: no answer"));
                continue;
            };
            if let Some(problem) = shape_problem("dify", "POST", &answer) {
                problems.push(format!("cycle {cycle}: {name}: {problem}"));
            }
            match answer.status {
                507 => refused_in_a_row += 1,
                201 => {
                    refused_in_a_row = 0;
                    let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
                    kept.push(Acked {
                        id: body["id"].as_str().unwrap_or_default().to_owned(),
                        size: content.len(),
                        sha256: sha256_hex(&content),
                        how: format!("dify {name}"),
                    });
                }
                status => problems.push(format!(
                    "cycle {cycle}: {name}: {status} {}",
                    answer_text(&answer)
                )),
            }
        }
        eprintln!(
            "cycle {cycle}: {small} small uploads, the last {refused_in_a_row} refused; {}",
            df(&tmpfs.dir).lines().last().unwrap_or_default()
        );
        assert_serving_or_full(&mut daemon, cycle);
        // Make room: Kore XO deletes, tus terminations.
        let agent = agent(Duration::from_secs(30));
        for id in &korexo {
            let body = json!({"sessionId": "s-1"}).to_string().into_bytes();
            let reply = try_send(
                &agent,
                "DELETE",
                &daemon.url(&format!("{KOREXO_BASE}/{id}")),
                &[("x-api-key", KEY)],
                Some(("application/json", body)),
            );
            match reply {
                Some(reply) if reply.status == 200 => {}
                other => problems.push(format!(
                    "cycle {cycle}: DELETE of Kore XO {id} on a full disk: {other:?}"
                )),
            }
        }
        for path in &partial {
            let reply = try_send(
                &agent,
                "DELETE",
                &daemon.url(path),
                &[TUS, ("Authorization", "Bearer demo-key")],
                None,
            );
            match reply {
                Some(reply) if reply.status == 204 => {}
                other => problems.push(format!(
                    "cycle {cycle}: tus DELETE {path} on a full disk: {other:?}"
                )),
            }
        }
        // Room again: an upload succeeds.
        let content = rng.text(200 * 1024);
        let form = Form::new().file("file", "room.txt", "text/plain", &content);
        let mut last = None;
        let stored = eventually(Duration::from_secs(5), || {
            last = try_send(
                &agent,
                "POST",
                &daemon.url("/v1/files/upload"),
                &[("Authorization", "Bearer demo-key")],
                Some((&Form::content_type(), form.body())),
            );
            last.as_ref().is_some_and(|reply| reply.status == 201)
        });
        if !stored {
            problems.push(format!(
                "cycle {cycle}: after the deletes an upload still fails: {last:?}"
            ));
        }
        if !eventually(Duration::from_secs(10), || daemon.spool_files() == 0) {
            problems.push(format!(
                "cycle {cycle}: files left in the spool: {:?}",
                spool_names(&daemon)
            ));
        }
        problems.extend(store_disk_problems(&daemon, &daemon.files_dir()));
        problems.extend(
            orphan_session_dirs(&daemon)
                .into_iter()
                .map(|dir| format!("session directory {dir} without a session record")),
        );
        let known = rows(&daemon);
        for upload in &kept {
            match known.get(&upload.id) {
                Some((state, size, sha256))
                    if state == "forwarded" && *size as usize == upload.size && *sha256 == upload.sha256 => {}
                other => problems.push(format!(
                    "{} ({}) was stored, its record: {other:?}",
                    upload.how, upload.id
                )),
            }
        }
        assert!(
            problems.is_empty(),
            "cycle {cycle}:\n{}\n--- df: {}\n--- daemon log (tail):\n{}",
            problems.join("\n"),
            df(&tmpfs.dir),
            tail(&daemon.log(), 40)
        );
    }
    daemon.kill();
    drop(daemon);
    drop(tmpfs);
}

/// The daemon is still running (a full disk is no reason to exit).
fn assert_serving_or_full(daemon: &mut Daemon, cycle: usize) {
    if let Ok(Some(status)) = daemon.child.try_wait() {
        panic!(
            "cycle {cycle}: the daemon exited on a full disk ({status})\n{}",
            tail(&daemon.log(), 60)
        );
    }
}

fn df(dir: &Path) -> String {
    Command::new("df")
        .arg("-k")
        .arg(dir)
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// 4. Slowloris: many at once, and a body trickled on a kept-alive connection
// ---------------------------------------------------------------------------------------------
//
// `slowloris.rs` covers one trickled head, first or later on a kept-alive connection, and
// `hardening.rs` a trickled body on a connection's first request: not repeated here.

const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// A whole Dify upload of `content` named `name`, for raw connections.
fn dify_request(address: &str, name: &str, content: &[u8], extra: &str) -> Vec<u8> {
    let body = Form::new().file("file", name, "text/plain", content).body();
    let mut request = format!(
        "POST /v1/files/upload HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer demo-key\r\nContent-Type: {}\r\nContent-Length: {}\r\n{extra}\r\n",
        Form::content_type(),
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request
}

/// One slow connection: where it is in its endless head, and when it was cut.
struct Slow {
    stream: TcpStream,
    later: bool,
    sent: usize,
    started: Option<Instant>,
    cut: Option<(Duration, String)>,
}

#[test]
fn many_slowloris_connections_do_not_starve_real_uploads() {
    let (_run, mut rng) = Run::begin("many_slowloris_connections_do_not_starve_real_uploads");
    let daemon = Daemon::start_with(|dir| {
        default_config(dir).replace(
            "  idle_timeout: 2s\n",
            &format!(
                "  idle_timeout: 2s\n  header_timeout: {}s\n",
                HEADER_TIMEOUT.as_secs()
            ),
        )
    });
    let address = address(&daemon);
    // A head that never ends: no blank line in it.
    let head = format!(
        "POST /v1/files/upload HTTP/1.1\r\nHost: {address}\r\nX-Slow: {}",
        "s".repeat(4096)
    );
    let mut slow: Vec<Slow> = (0..48)
        .map(|n| {
            let mut stream = TcpStream::connect(&address).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let later = n % 2 == 1;
            if later {
                // One request answered first: the trickled head is this connection's second.
                stream
                    .write_all(&dify_request(&address, &format!("first-{n}.txt"), b"first", ""))
                    .unwrap();
                let (status, text) = RawUpload::read_answer(&mut stream).unwrap();
                assert_eq!(status, 201, "{text}");
            }
            Slow {
                stream,
                later,
                sent: 0,
                started: None,
                cut: None,
            }
        })
        .collect();
    let stop = AtomicBool::new(false);
    let real: Vec<(u16, Duration)> = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            let agent = agent(Duration::from_secs(30));
            let mut results = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let form = Form::new().file("file", &format!("real-{n}.txt"), "text/plain", b"real");
                let started = Instant::now();
                let reply = try_send(
                    &agent,
                    "POST",
                    &daemon.url("/v1/files/upload"),
                    &[("Authorization", "Bearer demo-key")],
                    Some((&Form::content_type(), form.body())),
                );
                results.push((reply.map_or(0, |reply| reply.status), started.elapsed()));
                std::thread::sleep(Duration::from_millis(200));
            }
            results
        });
        let began = Instant::now();
        while began.elapsed() < 4 * HEADER_TIMEOUT && slow.iter().any(|s| s.cut.is_none()) {
            for connection in slow.iter_mut().filter(|s| s.cut.is_none()) {
                let byte = head.as_bytes()[connection.sent % head.len()];
                let started = *connection.started.get_or_insert_with(Instant::now);
                if connection.stream.write_all(&[byte]).is_err() {
                    connection.cut = Some((started.elapsed(), String::new()));
                    continue;
                }
                connection.sent += 1;
                connection.stream.set_nonblocking(true).unwrap();
                let mut buffer = [0u8; 4096];
                match connection.stream.read(&mut buffer) {
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Ok(n) => {
                        connection.cut = Some((
                            started.elapsed(),
                            String::from_utf8_lossy(&buffer[..n]).into_owned(),
                        ))
                    }
                    Err(_) => connection.cut = Some((started.elapsed(), String::new())),
                }
                connection.stream.set_nonblocking(false).unwrap();
            }
            std::thread::sleep(Duration::from_millis(rng.between(150, 300) as u64));
        }
        stop.store(true, Ordering::SeqCst);
        client.join().unwrap()
    });
    for (n, connection) in slow.iter().enumerate() {
        let which = if connection.later {
            "a later head"
        } else {
            "a first head"
        };
        let Some((after, answer)) = &connection.cut else {
            panic!(
                "connection {n} ({which}) still open after {:?} of trickling",
                4 * HEADER_TIMEOUT
            );
        };
        assert!(
            *after <= HEADER_TIMEOUT + Duration::from_millis(2500),
            "connection {n} ({which}) cut only after {after:?}; header_timeout is {HEADER_TIMEOUT:?}"
        );
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "connection {n} ({which}): {answer}"
        );
    }
    assert!(real.len() >= 5, "only {} real uploads were made", real.len());
    for (status, took) in &real {
        assert_eq!(*status, 201, "a real upload among slow connections: {real:?}");
        assert!(
            *took < Duration::from_secs(2),
            "a real upload took {took:?}: {real:?}"
        );
    }
}

#[test]
fn a_body_trickling_on_a_kept_alive_connection_is_dropped_with_408() {
    let (_run, _rng) = Run::begin("a_body_trickling_on_a_kept_alive_connection_is_dropped_with_408");
    let daemon = Daemon::start_with(|dir| {
        default_config(dir).replace(
            "  idle_timeout: 2s\n",
            "  idle_timeout: 4s\n  min_body_rate: 1KiB\n  min_body_rate_grace: 2s\n",
        )
    });
    let address = address(&daemon);
    let mut stream = TcpStream::connect(&address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
        .write_all(&dify_request(&address, "first.txt", b"first", ""))
        .unwrap();
    let (status, text) = RawUpload::read_answer(&mut stream).unwrap();
    assert_eq!(status, 201, "{text}");
    // The second request's body: one byte every 500 ms, never idle for idle_timeout, far below
    // the minimum rate.
    let second = dify_request(&address, "second.txt", &[b'a'; 64 * 1024], "");
    let body_at = find(&second, b"\r\n\r\n").unwrap() + 4;
    stream.write_all(&second[..body_at]).unwrap();
    let started = Instant::now();
    let mut cut = None;
    for byte in &second[body_at..] {
        if started.elapsed() > Duration::from_secs(12) {
            break;
        }
        if stream.write_all(std::slice::from_ref(byte)).is_err() {
            cut = Some(String::new());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        stream.set_nonblocking(true).unwrap();
        let mut buffer = [0u8; 4096];
        let read = stream.read(&mut buffer);
        stream.set_nonblocking(false).unwrap();
        match read {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Ok(n) => {
                cut = Some(String::from_utf8_lossy(&buffer[..n]).into_owned());
                break;
            }
            Err(_) => {
                cut = Some(String::new());
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    let answer = cut.unwrap_or_else(|| panic!("a trickled second body still open after {elapsed:?}"));
    assert!(elapsed < Duration::from_secs(8), "cut after {elapsed:?}");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(
        eventually(Duration::from_secs(5), || daemon.log().contains("status=408")),
        "{}",
        daemon.log()
    );
    assert!(eventually(Duration::from_secs(5), || daemon.spool_files() == 0));
    let names: Vec<String> = daemon
        .db()
        .prepare("SELECT filename FROM uploads")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(names, ["first.txt"]);
}

// ---------------------------------------------------------------------------------------------
// 5. Races, in rounds
// ---------------------------------------------------------------------------------------------
//
// `hardening.rs` races 8 deletes of one Kore XO upload (5 rounds) and `tus.rs` one PATCH held
// mid-body against another: here the races run unstaged, many at once, in rounds.

#[test]
fn racing_kore_xo_deletes_succeed_exactly_once_per_upload() {
    let (run, mut rng) = Run::begin("racing_kore_xo_deletes_succeed_exactly_once_per_upload");
    let daemon = Daemon::start_with(default_config);
    for round in 0..run.knobs.rounds * 2 {
        let ids: Vec<String> = (0..rng.between(2, 5))
            .map(|_| fresh_korexo(&daemon, &rng.text_between(1, 50_000)))
            .collect();
        let deleters: Vec<(usize, usize)> = ids
            .iter()
            .enumerate()
            .flat_map(|(n, _)| {
                let count = rng.between(2, 8);
                (0..count).map(move |k| (n, k))
            })
            .collect();
        let barrier = Barrier::new(deleters.len());
        let statuses: Vec<(usize, Option<u16>)> = std::thread::scope(|scope| {
            let threads: Vec<_> = deleters
                .iter()
                .map(|&(n, _)| {
                    let (barrier, url) = (&barrier, daemon.url(&format!("{KOREXO_BASE}/{}", ids[n])));
                    scope.spawn(move || {
                        let agent = agent(Duration::from_secs(30));
                        let body = json!({"sessionId": "s-1"}).to_string().into_bytes();
                        barrier.wait();
                        let reply = try_send(
                            &agent,
                            "DELETE",
                            &url,
                            &[("x-api-key", KEY)],
                            Some(("application/json", body)),
                        );
                        (n, reply.map(|reply| reply.status))
                    })
                })
                .collect();
            threads.into_iter().map(|thread| thread.join().unwrap()).collect()
        });
        for (n, id) in ids.iter().enumerate() {
            let mine: Vec<Option<u16>> = statuses
                .iter()
                .filter(|(m, _)| *m == n)
                .map(|(_, s)| *s)
                .collect();
            assert_eq!(
                mine.iter().filter(|s| **s == Some(200)).count(),
                1,
                "round {round}: deletes of {id}: {mine:?}"
            );
            assert!(
                mine.iter().all(|s| matches!(s, Some(200 | 404))),
                "round {round}: deletes of {id}: {mine:?}"
            );
            assert!(
                !daemon.files_dir().join(id).exists(),
                "round {round}: {id} still on disk"
            );
            assert_eq!(rows(&daemon)[id].0, "deleted", "round {round}: {id}");
        }
    }
    assert!(store_disk_problems(&daemon, &daemon.files_dir()).is_empty());
}

#[test]
fn racing_resends_of_kore_chunks_keep_one_whole_copy_of_each() {
    let (run, mut rng) = Run::begin("racing_resends_of_kore_chunks_keep_one_whole_copy_of_each");
    let daemon = Daemon::start_with(default_config);
    for round in 0..run.knobs.rounds * 2 {
        let (chunks, size) = (rng.between(1, 4), rng.between(1024, 96 * 1024));
        // copies[n][c]: copy c of chunk n, all of one size, no two alike.
        let copies: Vec<Vec<Vec<u8>>> = (0..chunks)
            .map(|_| (0..rng.between(2, 6)).map(|_| rng.text(size)).collect())
            .collect();
        let session = kore_start(&daemon, "race.txt", chunks * size, chunks);
        let sends: Vec<(usize, usize)> = copies
            .iter()
            .enumerate()
            .flat_map(|(n, list)| (0..list.len()).map(move |c| (n, c)))
            .collect();
        let barrier = Barrier::new(sends.len());
        let answers: Vec<(usize, Option<Reply>)> = std::thread::scope(|scope| {
            let threads: Vec<_> = sends
                .iter()
                .map(|&(n, c)| {
                    let (barrier, copies, session, base) = (&barrier, &copies, &session, &daemon.base_url);
                    scope.spawn(move || {
                        let agent = agent(Duration::from_secs(30));
                        barrier.wait();
                        (n, kore_chunk(&agent, base, session, n, &copies[n][c]))
                    })
                })
                .collect();
            threads.into_iter().map(|thread| thread.join().unwrap()).collect()
        });
        for (n, reply) in &answers {
            let reply = reply
                .as_ref()
                .unwrap_or_else(|| panic!("round {round}: a re-send of chunk {n} got no answer"));
            assert_eq!(
                reply.status, 200,
                "round {round}: a re-send of chunk {n}: {}",
                reply.text
            );
            assert_eq!(reply.json(), json!({"chunkNumber": n, "sessionId": session}));
        }
        let sizes: Vec<(i64, i64)> = {
            let db = daemon.db();
            let mut statement = db
                .prepare("SELECT chunk_number, size FROM session_chunks WHERE session_id = ?1 ORDER BY chunk_number")
                .unwrap();
            statement
                .query_map([&session], |row| Ok((row.get(0)?, row.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let expected: Vec<(i64, i64)> = (0..chunks).map(|n| (n as i64, size as i64)).collect();
        assert_eq!(sizes, expected, "round {round}: the session's chunks");
        let done = send(
            "POST",
            &daemon.url(&format!("/api/public/files/session/{session}/complete")),
            &[("X-api-key", KEY)],
            None,
        );
        assert_eq!(done.status, 200, "round {round}: complete: {}", done.text);
        let id = done.json()["fileId"].as_str().unwrap().to_owned();
        let stored = std::fs::read(daemon.files_dir().join(&id)).unwrap();
        assert_eq!(stored.len(), chunks * size, "round {round}");
        for (n, list) in copies.iter().enumerate() {
            let part = &stored[n * size..(n + 1) * size];
            assert!(
                list.iter().any(|copy| copy == part),
                "round {round}: chunk {n} of the stored file is none of the {} copies sent (a mix?)",
                list.len()
            );
        }
        let (_, recorded_size, sha256) = rows(&daemon)[&id].clone();
        assert_eq!(
            (recorded_size as usize, sha256),
            (stored.len(), sha256_hex(&stored))
        );
    }
    assert!(store_disk_problems(&daemon, &daemon.files_dir()).is_empty());
    assert!(eventually(Duration::from_secs(5), || daemon.spool_files() == 0));
}

#[test]
fn racing_completes_of_one_kore_session_store_the_file_once() {
    let (run, mut rng) = Run::begin("racing_completes_of_one_kore_session_store_the_file_once");
    let daemon = Daemon::start_with(default_config);
    let client = agent(Duration::from_secs(30));
    for round in 0..run.knobs.rounds * 2 {
        let parts: Vec<Vec<u8>> = (0..rng.between(1, 3))
            .map(|_| rng.text_between(1, 200_000))
            .collect();
        let content = parts.concat();
        let session = kore_start(&daemon, "once.txt", content.len(), parts.len());
        for (n, part) in parts.iter().enumerate() {
            let reply = kore_chunk(&client, &daemon.base_url, &session, n, part).expect("a chunk");
            assert_eq!(reply.status, 200, "{}", reply.text);
        }
        let before = names_in(&daemon.files_dir()).len();
        let racers = rng.between(2, 8);
        let barrier = Barrier::new(racers);
        let url = daemon.url(&format!("/api/public/files/session/{session}/complete"));
        let replies: Vec<Option<Reply>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..racers)
                .map(|_| {
                    let (barrier, url) = (&barrier, &url);
                    scope.spawn(move || {
                        let agent = agent(Duration::from_secs(30));
                        barrier.wait();
                        try_send(&agent, "POST", url, &[("X-api-key", KEY)], None)
                    })
                })
                .collect();
            threads.into_iter().map(|thread| thread.join().unwrap()).collect()
        });
        let statuses: Vec<Option<u16>> = replies.iter().map(|r| r.as_ref().map(|r| r.status)).collect();
        assert_eq!(
            statuses.iter().filter(|s| **s == Some(200)).count(),
            1,
            "round {round}: {racers} completes: {replies:?}"
        );
        for reply in replies.iter().flatten().filter(|reply| reply.status != 200) {
            assert!(
                matches!(reply.status, 404 | 409),
                "round {round}: a losing complete: {} {}",
                reply.status,
                reply.text
            );
            assert_eq!(error_shape_problem("kore", reply.status, &reply.json()), None);
        }
        let winner = replies
            .iter()
            .flatten()
            .find(|reply| reply.status == 200)
            .unwrap();
        let id = winner.json()["fileId"].as_str().unwrap().to_owned();
        assert_eq!(sha256_file(&daemon.files_dir().join(&id)), sha256_hex(&content));
        assert_eq!(
            names_in(&daemon.files_dir()).len(),
            before + 1,
            "round {round}: stored once"
        );
        let copies: i64 = daemon
            .db()
            .query_row(
                "SELECT COUNT(*) FROM uploads WHERE sha256 = ?1",
                [sha256_hex(&content)],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(copies, 1, "round {round}: records of the file");
    }
    assert!(store_disk_problems(&daemon, &daemon.files_dir()).is_empty());
    assert!(eventually(Duration::from_secs(5), || daemon.spool_files() == 0));
    assert!(
        orphan_session_dirs(&daemon).is_empty(),
        "{:?}",
        orphan_session_dirs(&daemon)
    );
}

#[test]
fn racing_tus_patches_at_one_offset_apply_exactly_one() {
    let (run, mut rng) = Run::begin("racing_tus_patches_at_one_offset_apply_exactly_one");
    let daemon = Daemon::start_with(default_config);
    let address = address(&daemon);
    for round in 0..run.knobs.rounds * 2 {
        let size = rng.between(1, 48 * 1024);
        let bodies: Vec<Vec<u8>> = (0..rng.between(2, 5)).map(|_| rng.text(size)).collect();
        let rest = rng.text_between(1, 48 * 1024);
        let path = fresh_tus(&daemon, size + rest.len());
        let barrier = Barrier::new(bodies.len());
        let answers: Vec<Option<Answer>> = std::thread::scope(|scope| {
            let threads: Vec<_> = bodies
                .iter()
                .map(|body| {
                    let (barrier, address, path) = (&barrier, &address, &path);
                    scope.spawn(move || {
                        barrier.wait();
                        raw_request(
                            address,
                            "PATCH",
                            path,
                            &[
                                TUS,
                                ("Authorization", "Bearer demo-key"),
                                ("Upload-Offset", "0"),
                                ("Content-Type", OFFSET_STREAM),
                            ],
                            body,
                        )
                    })
                })
                .collect();
            threads.into_iter().map(|thread| thread.join().unwrap()).collect()
        });
        let statuses: Vec<Option<u16>> = answers.iter().map(|a| a.as_ref().map(|a| a.status)).collect();
        let winners: Vec<usize> = statuses
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == Some(204))
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: {} PATCHes at 0: {statuses:?}",
            bodies.len()
        );
        let at = size.to_string();
        for answer in answers.iter().flatten() {
            // The winner's 204, or 409 for each PATCH that found the offset moved.
            assert!(
                matches!(answer.status, 204 | 409),
                "round {round}: {statuses:?}: {}",
                answer_text(answer)
            );
            assert_eq!(
                answer.header("upload-offset"),
                Some(at.as_str()),
                "round {round}: {answer:?}"
            );
        }
        let winner = &bodies[winners[0]];
        let id = path.trim_start_matches("/files/");
        let on_disk = std::fs::read(daemon.data_dir().join("sessions").join(id).join("0")).unwrap();
        assert_eq!(
            &on_disk[..size],
            &winner[..],
            "round {round}: the bytes at 0 are not the winner's"
        );
        let done = raw_request(
            &address,
            "PATCH",
            &path,
            &[
                TUS,
                ("Authorization", "Bearer demo-key"),
                ("Upload-Offset", &at),
                ("Content-Type", OFFSET_STREAM),
            ],
            &rest,
        )
        .expect("an answer");
        assert_eq!(done.status, 204, "round {round}: {}", answer_text(&done));
        let record = done
            .header("upgate-upload-id")
            .expect("Upgate-Upload-Id")
            .to_owned();
        let whole = [winner.as_slice(), rest.as_slice()].concat();
        assert_eq!(rows(&daemon)[&record].2, sha256_hex(&whole), "round {round}");
        assert_eq!(sha256_file(&daemon.files_dir().join(&record)), sha256_hex(&whole));
    }
    assert!(store_disk_problems(&daemon, &daemon.files_dir()).is_empty());
}

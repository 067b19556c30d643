//! Slow request heads over raw sockets: every request head on a connection must arrive within
//! `server.header_timeout` (a kept-alive connection's later requests as much as its first),
//! and an idle kept-alive connection waits the keep-alive time instead.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use upgate_e2e::harness::*;

const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// What `server.rs` gives actix (`keep_alive(75 s)`); not configurable.
const KEEP_ALIVE: Duration = Duration::from_secs(75);
/// Past the head timer's deadline, a closed connection must be seen within this.
const SLACK: Duration = Duration::from_secs(1);

fn start() -> Daemon {
    Daemon::start_with(|dir| {
        default_config(dir).replace(
            "  idle_timeout: 2s\n",
            &format!(
                "  idle_timeout: 2s\n  header_timeout: {}s\n",
                HEADER_TIMEOUT.as_secs()
            ),
        )
    })
}

fn connect(daemon: &Daemon) -> (TcpStream, String) {
    let address = daemon.base_url.trim_start_matches("http://").to_owned();
    let stream = TcpStream::connect(&address).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (stream, address)
}

/// A whole Dify upload of a small text file called `filename`; `extra` goes into the head as
/// is (`Connection: close\r\n`, ...), `version` is `HTTP/1.1` or `HTTP/1.0`.
fn upload(address: &str, version: &str, filename: &str, extra: &str) -> Vec<u8> {
    let body = Form::new()
        .file("file", filename, "text/plain", filename.as_bytes())
        .body();
    let mut request = format!(
        "POST /v1/files/upload {version}\r\nHost: {address}\r\nAuthorization: Bearer demo-key\r\nContent-Type: {}\r\nContent-Length: {}\r\n{extra}\r\n",
        Form::content_type(),
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request
}

/// Sends `request` and reads its answer (the connection stays open unless the daemon closes it).
fn exchange(stream: &mut TcpStream, request: &[u8]) -> (u16, String) {
    stream.write_all(request).expect("send the request");
    RawUpload::read_answer(stream).expect("an answer")
}

/// Everything the daemon sends until it closes the connection; `closed` is false if it was
/// still open when `limit` ran out.
fn read_to_close(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    let closed = loop {
        match stream.read(&mut buffer) {
            Ok(0) => break true,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break false;
            }
            // A reset closes it too.
            Err(_) => break true,
        }
    };
    (String::from_utf8_lossy(&received).into_owned(), closed)
}

struct Trickled {
    /// From the first byte sent to the daemon's answer or close.
    after: Duration,
    answer: String,
    closed: bool,
}

/// Sends the start of an upload's head one byte a second, the slowloris way, until the daemon
/// answers or closes the connection; `None` if it did neither in 4x `HEADER_TIMEOUT`.
fn trickle(stream: &mut TcpStream, address: &str) -> Option<Trickled> {
    let head = format!("POST /v1/files/upload HTTP/1.1\r\nHost: {address}\r\n");
    let bytes = (4 * HEADER_TIMEOUT).as_secs() as usize;
    stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let started = Instant::now();
    for byte in head.as_bytes().iter().take(bytes) {
        if stream.write_all(std::slice::from_ref(byte)).is_err() {
            return Some(Trickled {
                after: started.elapsed(),
                answer: String::new(),
                closed: true,
            });
        }
        let mut buffer = [0u8; 8192];
        match stream.read(&mut buffer) {
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Ok(0) | Err(_) => {
                return Some(Trickled {
                    after: started.elapsed(),
                    answer: String::new(),
                    closed: true,
                });
            }
            Ok(n) => {
                let after = started.elapsed();
                let (rest, closed) = read_to_close(stream, Duration::from_secs(5));
                return Some(Trickled {
                    after,
                    answer: format!("{}{rest}", String::from_utf8_lossy(&buffer[..n])),
                    closed,
                });
            }
        }
    }
    None
}

fn assert_cut_by_the_head_timer(trickled: Option<Trickled>) {
    let trickled = trickled.unwrap_or_else(|| {
        panic!(
            "a head sent one byte a second was neither answered nor closed in {:?}",
            4 * HEADER_TIMEOUT
        )
    });
    assert!(
        trickled.after >= HEADER_TIMEOUT - Duration::from_millis(600)
            && trickled.after <= HEADER_TIMEOUT + SLACK,
        "cut after {:?}, header_timeout is {HEADER_TIMEOUT:?}",
        trickled.after
    );
    assert!(trickled.closed, "answered but not closed: {}", trickled.answer);
    if !trickled.answer.is_empty() {
        assert!(trickled.answer.starts_with("HTTP/1.1 408"), "{}", trickled.answer);
    }
}

#[test]
fn the_first_request_head_must_arrive_within_header_timeout() {
    let daemon = start();
    let (mut stream, address) = connect(&daemon);
    assert_cut_by_the_head_timer(trickle(&mut stream, &address));
}

#[test]
fn a_later_request_head_on_a_kept_alive_connection_must_arrive_within_header_timeout() {
    let daemon = start();
    let (mut stream, address) = connect(&daemon);
    let (status, text) = exchange(&mut stream, &upload(&address, "HTTP/1.1", "first.txt", ""));
    assert_eq!(status, 201, "{text}");
    assert!(!text.to_ascii_lowercase().contains("connection: close"), "{text}");
    // The next head, one byte a second: it gets the same header_timeout as the first.
    assert_cut_by_the_head_timer(trickle(&mut stream, &address));
    // And a head that completes in time is still served after a slow start: a fresh
    // connection, one answered request, then the next head sent well within the timeout.
    let (mut stream, address) = connect(&daemon);
    let (status, _) = exchange(&mut stream, &upload(&address, "HTTP/1.1", "a.txt", ""));
    assert_eq!(status, 201);
    let next = upload(&address, "HTTP/1.1", "b.txt", "");
    let (head, body) = next.split_at(10);
    stream.write_all(head).unwrap();
    std::thread::sleep(HEADER_TIMEOUT / 2);
    let (status, text) = exchange(&mut stream, body);
    assert_eq!(status, 201, "{text}");
}

#[test]
fn an_idle_kept_alive_connection_waits_the_keep_alive_time_not_header_timeout() {
    let daemon = start();
    let (mut stream, address) = connect(&daemon);
    let (status, text) = exchange(&mut stream, &upload(&address, "HTTP/1.1", "first.txt", ""));
    assert_eq!(status, 201, "{text}");
    // No byte at all after an answer is keep-alive idling, not a slow head: header_timeout
    // does not apply to it.
    std::thread::sleep(HEADER_TIMEOUT + Duration::from_millis(1500));
    let (status, text) = exchange(&mut stream, &upload(&address, "HTTP/1.1", "second.txt", ""));
    assert_eq!(status, 201, "the idle connection was dropped early: {text}");
    let answered = Instant::now();
    // Idle again: the daemon closes it after the keep-alive time.
    let (rest, closed) = read_to_close(&mut stream, KEEP_ALIVE + Duration::from_secs(10));
    let idle = answered.elapsed();
    assert!(closed, "still open after {idle:?} of keep-alive idling: {rest}");
    assert!(rest.is_empty(), "{rest}");
    assert!(
        idle >= KEEP_ALIVE - Duration::from_secs(2) && idle <= KEEP_ALIVE + Duration::from_secs(5),
        "closed after {idle:?} idle, keep-alive is {KEEP_ALIVE:?}"
    );
}

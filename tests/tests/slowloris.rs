//! Slow and pipelined request heads over raw sockets: every request head on a connection must
//! arrive within `server.header_timeout` (a kept-alive connection's later requests as much as
//! its first), an idle kept-alive connection waits the keep-alive time instead, and nothing
//! sent after a request that closes the connection is processed (RFC 9112 §9.6).

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

/// The status lines of a run of answers on one connection, each answer cut off by its
/// `Content-Length` (the next one follows its body directly); what is left over too.
fn status_lines(text: &str) -> (Vec<&str>, &str) {
    let mut statuses = Vec::new();
    let mut rest = text;
    while let Some((head, after)) = rest.split_once("\r\n\r\n") {
        let Some(status) = head.lines().next().filter(|line| line.starts_with("HTTP/1.")) else {
            break;
        };
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())
                    .flatten()
            })
            .unwrap_or(0);
        statuses.push(status);
        rest = after.get(length.min(after.len())..).unwrap_or("");
    }
    (statuses, rest)
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

/// Sends `first` and a second upload (`second.txt`) in one write, and checks that only
/// `first` was answered and processed and that the daemon then closed the connection.
fn assert_nothing_after_the_closing_request_is_processed(first: Vec<u8>, address: &str, daemon: &Daemon) {
    let (mut stream, _) = connect(daemon);
    let mut both = first;
    both.extend_from_slice(&upload(address, "HTTP/1.1", "second.txt", ""));
    stream.write_all(&both).unwrap();
    let (answers, closed) = read_to_close(&mut stream, Duration::from_secs(10));
    let (statuses, rest) = status_lines(&answers);
    assert_eq!(statuses.len(), 1, "{answers}");
    assert!(rest.is_empty(), "{answers}");
    assert!(statuses[0].ends_with(" 201 Created"), "{answers}");
    assert!(answers.contains("first.txt"), "{answers}");
    // The answer says the connection closes (HTTP/1.0: by not offering keep-alive).
    let lower = answers.to_ascii_lowercase();
    if statuses[0].starts_with("HTTP/1.1 ") {
        assert!(lower.contains("\r\nconnection: close\r\n"), "{answers}");
    } else {
        assert!(!lower.contains("\r\nconnection: keep-alive"), "{answers}");
    }
    assert!(closed, "the connection stayed open: {answers}");
    let names: Vec<String> = daemon
        .db()
        .prepare("SELECT filename FROM uploads ORDER BY filename")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(names, ["first.txt"]);
}

#[test]
fn a_request_pipelined_after_connection_close_is_not_processed() {
    let daemon = start();
    let address = daemon.base_url.trim_start_matches("http://").to_owned();
    let first = upload(&address, "HTTP/1.1", "first.txt", "Connection: close\r\n");
    assert_nothing_after_the_closing_request_is_processed(first, &address, &daemon);
}

#[test]
fn a_request_pipelined_after_an_http_1_0_request_is_not_processed() {
    let daemon = start();
    let address = daemon.base_url.trim_start_matches("http://").to_owned();
    // HTTP/1.0 without `Connection: keep-alive` closes after its answer.
    let first = upload(&address, "HTTP/1.0", "first.txt", "");
    assert_nothing_after_the_closing_request_is_processed(first, &address, &daemon);
}

#[test]
fn pipelined_kept_alive_requests_are_all_answered_in_order() {
    let daemon = start();
    let (mut stream, address) = connect(&daemon);
    let mut all = Vec::new();
    for name in ["one.txt", "two.txt"] {
        all.extend_from_slice(&upload(&address, "HTTP/1.1", name, ""));
    }
    // The last asks to close, so the run ends with the connection.
    all.extend_from_slice(&upload(
        &address,
        "HTTP/1.1",
        "three.txt",
        "Connection: close\r\n",
    ));
    stream.write_all(&all).unwrap();
    let (answers, closed) = read_to_close(&mut stream, Duration::from_secs(10));
    let (statuses, rest) = status_lines(&answers);
    assert_eq!(statuses.len(), 3, "{answers}");
    assert!(rest.is_empty(), "{answers}");
    assert!(statuses.iter().all(|s| s.ends_with(" 201 Created")), "{answers}");
    let one = answers.find("one.txt").expect("one.txt answered");
    let two = answers.find("two.txt").expect("two.txt answered");
    let three = answers.find("three.txt").expect("three.txt answered");
    assert!(one < two && two < three, "{answers}");
    assert!(closed, "{answers}");
}

/// A chunked body left unread when its answer goes out (a refused key before any byte of it;
/// a form that ended while the body went on) does not keep the connection: the answer says
/// `Connection: close` and the daemon closes it, as for a body with a `Content-Length`.
/// Unpatched, actix drained such a body with no timer, and a body that never ends held the
/// connection for good (actix-http patch 8).
#[test]
fn a_chunked_body_left_unread_does_not_hold_the_connection() {
    let daemon = start();
    let (mut stream, address) = connect(&daemon);
    let refused = format!(
        "POST /v1/files/upload HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer not-a-key\r\n\
Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(refused.as_bytes()).unwrap();
    let (text, closed) = read_to_close(&mut stream, Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
    assert!(closed, "the connection stayed open after the answer: {text}");

    // A whole form, then more chunks that never end.
    let (mut stream, address) = connect(&daemon);
    let form = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\
Content-Type: text/plain\r\n\r\nhello\r\n--b--\r\n";
    let head = format!(
        "POST /v1/files/upload HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer demo-key\r\n\
Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream
        .write_all(format!("{:x}\r\n", form.len()).as_bytes())
        .unwrap();
    stream.write_all(form).unwrap();
    stream.write_all(b"\r\n").unwrap();
    // The rest trickles (a byte a chunk), never ending, for as long as the test reads.
    let mut trickle = stream.try_clone().unwrap();
    let trickling = std::thread::spawn(move || {
        for _ in 0..40 {
            if trickle.write_all(b"1\r\nx\r\n").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let (text, closed) = read_to_close(&mut stream, Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    assert!(closed, "the connection stayed open after the answer: {text}");
    trickling.join().unwrap();
}

/// `server.max_connections` caps the daemon's connections, not each worker's: with a cap of
/// 2 over 2 workers, a third connection is not served while two hold a request head open,
/// and is served once one of them goes.
#[test]
fn max_connections_caps_the_whole_daemon() {
    let daemon = Daemon::start_with(|dir| {
        default_config(dir).replace(
            "  idle_timeout: 2s\n",
            "  idle_timeout: 2s\n  header_timeout: 8s\n  workers: 2\n  max_connections: 2\n",
        )
    });
    let (mut first, address) = connect(&daemon);
    let (mut second, _) = connect(&daemon);
    for held in [&mut first, &mut second] {
        held.write_all(b"POST /v1/files/upload HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let (mut third, _) = connect(&daemon);
    third.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    third
        .write_all(&upload(
            &address,
            "HTTP/1.1",
            "third.txt",
            "Connection: close\r\n",
        ))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        third.read(&mut byte).is_err(),
        "a third connection was served past max_connections"
    );
    drop(first);
    third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (status, text) = RawUpload::read_answer(&mut third).expect("an answer once a connection went");
    assert_eq!(status, 201, "{text}");
}

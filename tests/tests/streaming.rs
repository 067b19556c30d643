//! Pass-through delivery end to end: the real daemon with sync delivery through streaming
//! plugins (dify to its mock upstream, the example plugin), bytes leaving for the upstream
//! while the client is still sending, and every way an upload can end before it is accepted.

use std::path::Path;
use std::time::Duration;

use upgate_e2e::harness::*;
use upgate_e2e::mock::{MockUpstream, Vendor};

const BEARER: (&str, &str) = ("Authorization", "Bearer demo-key");
const UPSTREAM_KEY: &str = "upstream-secret";

/// The default config with the tenant on the `dify` plugin at `mock`, sync delivery, a plan of
/// `max_file_size`.
fn dify_config(dir: &Path, mock: &MockUpstream, max_file_size: &str) -> String {
    upstream_config(dir, "dify", mock, max_file_size, "")
}

/// The default config with the tenant on `plugin` at `mock` (with `settings`, indented lines),
/// sync delivery, a plan of `max_file_size`.
fn upstream_config(
    dir: &Path,
    plugin: &str,
    mock: &MockUpstream,
    max_file_size: &str,
    settings: &str,
) -> String {
    default_config(dir)
        .replace("max_file_size: 1MiB", &format!("max_file_size: {max_file_size}"))
        .replace(
            "providers:\n",
            &format!(
                "providers:\n  up:\n    plugin: {plugin}\n    retry: {{ max_attempts: 3, initial_backoff: 50ms, max_backoff: 200ms }}\n    settings:\n      base_url: {}\n      api_key: {UPSTREAM_KEY}\n      connect_timeout: 1s\n{settings}",
                mock.base_url()
            ),
        )
        .replace("    provider: disk\n", "    provider: up\n")
}

/// The kore plugin forwarding to `mock`, uploads above 1 MiB in sessions of 1 MiB chunks.
fn kore_sessions_config(dir: &Path, mock: &MockUpstream) -> String {
    upstream_config(
        dir,
        "kore",
        mock,
        "64MiB",
        "      single_upload_limit: 1MiB\n      chunk_size: 1MiB\n",
    )
}

/// `size` bytes of text, distinct lines.
fn text(size: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(size + 32);
    let mut line = 0u64;
    while bytes.len() < size {
        bytes.extend_from_slice(format!("line {line} of a streamed upload\n").as_bytes());
        line += 1;
    }
    bytes.truncate(size);
    bytes
}

fn state_of(daemon: &Daemon) -> Vec<(String, String, i64)> {
    let db = daemon.db();
    let mut query = db
        .prepare("SELECT state, sha256, attempts FROM uploads ORDER BY created_at")
        .unwrap();
    query
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn bytes_reach_the_upstream_while_the_client_is_still_sending() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    let daemon = Daemon::start_with(|dir| dify_config(dir, &mock, "16MiB"));
    let content = text(4 << 20);
    // The `user` field comes after the file, as in Dify's own curl example: it reaches the
    // upstream although the file part was already on its way.
    let form = Form::new()
        .file("file", "streamed.txt", "text/plain", &content)
        .text("user", "late-user");
    let mut upload = RawUpload::start(&daemon.url(""), "/v1/files/upload", BEARER, &form);
    upload.send(2 << 20).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || mock.body_bytes_seen() >= 1 << 20),
        "the upstream saw {} bytes while the client had sent {} of {}",
        mock.body_bytes_seen(),
        upload.sent(),
        upload.len()
    );
    assert!(upload.sent() < upload.len());
    let (status, answer) = upload.finish().unwrap();
    assert_eq!(status, 201, "{answer}");

    let received = mock.received();
    assert_eq!(received.len(), 1, "one upstream request: {received:?}");
    let request = &received[0];
    assert_eq!(request.status, 201);
    assert_eq!(
        request.header("transfer-encoding"),
        Some("chunked"),
        "sent as it arrived"
    );
    assert_eq!(request.field("user"), Some("late-user"));
    let file = request.file().unwrap();
    assert_eq!(
        (file.size, file.sha256.as_str()),
        (content.len() as u64, sha256_hex(&content).as_str())
    );
    let stored = mock.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].scope, "late-user");
    assert_eq!(
        state_of(&daemon),
        vec![("forwarded".to_owned(), sha256_hex(&content), 1)],
        "recorded with the sha256 of what arrived, in one attempt"
    );
    assert!(
        eventually(Duration::from_secs(5), || daemon.spool_files() == 0),
        "the spooled copy goes once delivered"
    );
}

#[test]
fn kore_streams_a_single_upload_that_the_requests_length_keeps_below_its_limit() {
    let mock = MockUpstream::start(Vendor::Kore, UPSTREAM_KEY);
    // The plan allows more than Kore's single upload: the request's Content-Length decides.
    let daemon = Daemon::start_with(|dir| {
        upstream_config(dir, "kore", &mock, "64MiB", "      single_upload_limit: 8MiB\n")
    });
    let content = text(4 << 20);
    let form = Form::new().file("file", "streamed.txt", "text/plain", &content);
    let mut upload = RawUpload::start(&daemon.url(""), "/v1/files/upload", BEARER, &form);
    upload.send(2 << 20).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || mock.body_bytes_seen() >= 1 << 20),
        "the upstream saw {} bytes while the client had sent {} of {}",
        mock.body_bytes_seen(),
        upload.sent(),
        upload.len()
    );
    let (status, answer) = upload.finish().unwrap();
    assert_eq!(status, 201, "{answer}");
    let received = mock.received();
    assert_eq!(received.len(), 1, "one single upload: {received:?}");
    let request = &received[0];
    assert_eq!(
        (request.path.as_str(), request.status),
        ("/api/public/files", 200)
    );
    assert_eq!(request.header("transfer-encoding"), Some("chunked"));
    assert_eq!(request.field("fileContext"), Some("bulkImport"));
    let file = request.file().unwrap();
    assert_eq!(
        (file.size, file.sha256.as_str()),
        (content.len() as u64, sha256_hex(&content).as_str())
    );
    assert_eq!(
        state_of(&daemon),
        vec![("forwarded".to_owned(), sha256_hex(&content), 1)]
    );
}

#[test]
fn kore_declines_to_stream_an_upload_that_may_need_a_session_and_puts_it_from_the_spool() {
    let mock = MockUpstream::start(Vendor::Kore, UPSTREAM_KEY);
    let daemon = Daemon::start_with(|dir| kore_sessions_config(dir, &mock));
    let content = text((2 << 20) + 100);
    let form = Form::new().file("file", "session.txt", "text/plain", &content);
    let (status, answer) = RawUpload::start(&daemon.url(""), "/v1/files/upload", BEARER, &form)
        .finish()
        .unwrap();
    assert_eq!(status, 201, "{answer}");
    let paths: Vec<String> = mock.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths.len(), 5, "start, three chunks, complete: {paths:?}");
    assert_eq!(paths[0], "/api/public/files/session/start");
    assert!(paths.iter().all(|path| path != "/api/public/files"), "{paths:?}");
    let start = mock.received()[0].json.clone().unwrap();
    assert_eq!(
        start["fileSize"],
        content.len() as u64,
        "the size, known from the spool"
    );
    let stored = mock.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].sha256, sha256_hex(&content));
    assert_eq!(
        state_of(&daemon),
        vec![("forwarded".to_owned(), sha256_hex(&content), 1)],
        "declining is not an attempt: the put from the spool is the first"
    );
}

/// Kore has no delete API: a chunked put the host stopped waiting for must not `complete` its
/// session afterwards (the file would stay upstream beside a record still waiting, and the
/// next attempt would store it again). The host's deadline travels in the put; the plugin
/// stops there. Async delivery: the spooled file stays for the retries, so nothing else
/// stops the late session.
#[test]
fn kore_stops_a_chunked_session_at_the_hosts_deadline_and_never_completes_it() {
    let mock = MockUpstream::start(Vendor::Kore, UPSTREAM_KEY);
    let daemon = Daemon::start_with(|dir| {
        kore_sessions_config(dir, &mock).replace(
            "    plugin: kore\n",
            "    plugin: kore\n    delivery: async\n    timeout: 2s\n",
        )
    });
    // Each request takes 700 ms: start and two chunks outlast the 2 s the host waits, every
    // attempt.
    mock.hang(Duration::from_millis(700));
    let content = text((2 << 20) + 100);
    let form = Form::new().file("file", "late.txt", "text/plain", &content);
    let (status, answer) = RawUpload::start(&daemon.url(""), "/v1/files/upload", BEARER, &form)
        .finish()
        .unwrap();
    assert_eq!(status, 201, "{answer}");
    // Attempts stop at their deadline: three of them (`max_attempts`), then the record fails.
    assert!(
        eventually(Duration::from_secs(20), || state_of(&daemon)
            .last()
            .is_some_and(|state| state.0 == "failed")),
        "{:?}",
        state_of(&daemon)
    );
    // Long enough for a late session's last chunk and `complete`, had one gone on.
    std::thread::sleep(Duration::from_secs(2));
    let paths: Vec<String> = mock.received().iter().map(|r| r.path.clone()).collect();
    assert!(!paths.iter().any(|path| path.ends_with("/complete")), "{paths:?}");
    assert!(mock.stored().is_empty(), "{:?}", mock.stored());
    mock.hang(Duration::ZERO);
}

#[test]
fn an_over_limit_body_aborts_the_upstream_request_and_nothing_is_kept() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    let daemon = Daemon::start_with(|dir| dify_config(dir, &mock, "1MiB"));
    // Within the Content-Length ceiling (one file plus 1 MiB of framing): the limit is hit
    // mid-stream.
    let content = text(1536 << 10);
    let form = Form::new().file("file", "big.txt", "text/plain", &content);
    let mut upload = RawUpload::start(&daemon.url(""), "/v1/files/upload", BEARER, &form);
    upload.send(600 << 10).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || mock.body_bytes_seen() > 0),
        "streaming had begun"
    );
    let answer = upload.finish();
    let (status, text) = match answer {
        Ok(answer) => answer,
        // The daemon may close before the client has sent the rest.
        Err(error) => panic!("no answer: {error}"),
    };
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("file_too_large"), "Dify's shape: {text}");
    assert!(
        eventually(Duration::from_secs(10), || mock.broken_bodies() == 1),
        "the upstream request was abandoned mid-body (broken bodies: {})",
        mock.broken_bodies()
    );
    assert!(mock.stored().is_empty(), "nothing kept upstream");
    assert!(
        mock.received().is_empty(),
        "no request completed: {:?}",
        mock.received()
    );
    assert!(state_of(&daemon).is_empty(), "nothing recorded");
    assert!(eventually(Duration::from_secs(5), || daemon.spool_files() == 0));
}

#[test]
fn an_upstream_failing_mid_stream_is_retried_from_the_spool() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    // The first request is reset as soon as its head is read: the streamed body breaks off.
    mock.reset_next(1);
    let daemon = Daemon::start_with(|dir| dify_config(dir, &mock, "16MiB"));
    let content = text(3 << 20);
    let reply = post_form(
        &daemon.url("/v1/files/upload"),
        &[BEARER],
        &Form::new()
            .text("user", "u-1")
            .file("file", "retried.txt", "text/plain", &content),
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    let received = mock.received();
    assert_eq!(
        received.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![0, 201]
    );
    let retried = &received[1];
    assert!(
        retried.header("content-length").is_some(),
        "the retry sends the spooled copy, its length known"
    );
    assert_eq!(retried.file().unwrap().sha256, sha256_hex(&content));
    assert_eq!(
        state_of(&daemon),
        vec![("forwarded".to_owned(), sha256_hex(&content), 2)]
    );
}

#[test]
fn a_stalled_client_aborts_both_sides() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    let daemon = Daemon::start_with(|dir| dify_config(dir, &mock, "16MiB"));
    let content = text(2 << 20);
    let form = Form::new().file("file", "stalled.txt", "text/plain", &content);
    let mut upload = RawUpload::start(&daemon.url(""), "/v1/files/upload", BEARER, &form);
    upload.send(512 << 10).unwrap();
    assert!(eventually(Duration::from_secs(10), || mock.body_bytes_seen() > 0));
    // Nothing more: the idle timeout (2 s) drops the body.
    let (status, text) = RawUpload::read_answer(&mut upload.stream).unwrap();
    assert_eq!(status, 408, "{text}");
    assert!(
        eventually(Duration::from_secs(10), || mock.broken_bodies() == 1),
        "the upstream request was abandoned"
    );
    assert!(mock.stored().is_empty() && mock.received().is_empty());
    assert!(state_of(&daemon).is_empty());
}

#[test]
fn a_streaming_plugin_that_panics_mid_read_gives_502_and_the_next_upload_succeeds() {
    let daemon = Daemon::start_with(|dir| {
        default_config(dir)
            .replace("max_file_size: 1MiB", "max_file_size: 16MiB")
            .replace(
                "providers:\n",
                "providers:\n  example:\n    plugin: example\n    settings:\n      panic_on: boom.txt\n",
            )
            .replace("    provider: disk\n", "    provider: example\n")
    });
    let content = text(1 << 20);
    let upload = |name: &str| {
        post_form(
            &daemon.url("/v1/files/upload"),
            &[BEARER],
            &Form::new().file("file", name, "text/plain", &content),
        )
    };
    let reply = upload("boom.txt");
    assert_eq!(reply.status, 502, "{}", reply.text);
    assert!(
        daemon.log().contains("told to panic on boom.txt"),
        "{}",
        daemon.log()
    );
    // Logged once, by the host, in its own lines: the plugin's std wrote nothing of its own.
    assert!(!daemon.log().contains("panicked at"), "{}", daemon.log());
    let reply = upload("fine.txt");
    assert_eq!(reply.status, 201, "{}", reply.text);
    // The example plugin names what it hashed: the bytes that streamed through it.
    let hashed = format!("example-{}", &sha256_hex(&content)[..16]);
    let states = state_of(&daemon);
    assert_eq!(states.len(), 2);
    assert_eq!(states[0].0, "failed");
    assert_eq!(states[1].0, "forwarded");
    let remote: String = daemon
        .db()
        .query_row(
            "SELECT remote_id FROM uploads WHERE state = 'forwarded'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(remote, hashed);
}

/// An upload the provider stores after the gateway stopped waiting for it (the provider's
/// timeout passed: the client was told 504, the record says failed) is deleted upstream,
/// whether it was passed through or put from the spool.
#[test]
fn an_upload_stored_after_the_gateway_stopped_waiting_is_deleted_upstream() {
    let mock = MockUpstream::start(Vendor::Korexo, UPSTREAM_KEY);
    let daemon = Daemon::start_with(|dir| {
        upstream_config(
            dir,
            "korexo",
            &mock,
            "16MiB",
            "      app_id: app-1\n      env_name: dev\n",
        )
        .replace("    plugin: korexo\n", "    plugin: korexo\n    timeout: 1s\n")
    });
    // Every request is acted on at once and answered 3 s later.
    mock.hang(Duration::from_secs(3));
    // Above the sniffed 8 KiB, passed through; below it, put from the spool after the body.
    for (name, size) in [("streamed.txt", 256 << 10), ("put.txt", 100)] {
        let content = text(size);
        let reply = post_form(
            &daemon.url("/v1/files/upload"),
            &[BEARER],
            &Form::new().file("file", name, "text/plain", &content),
        );
        assert_eq!(reply.status, 504, "{name}: {}", reply.text);
        assert!(
            eventually(Duration::from_secs(15), || mock.stored().is_empty()
                && mock.received().iter().any(|r| r.method == "DELETE")),
            "{name}: still stored upstream: {:?}",
            mock.stored()
        );
        assert_eq!(state_of(&daemon).last().unwrap().0, "failed");
        mock.clear_received();
    }
    mock.hang(Duration::ZERO);
}

/// A request's file does not pass through after one that did not: that one is put from the
/// spool after the body, and with every delivery slot held by the later file's stream
/// (which waits for its end until the request is accepted) it would wait forever.
#[test]
fn a_file_after_one_put_from_the_spool_is_not_passed_through() {
    let mock = MockUpstream::start(Vendor::Korexo, UPSTREAM_KEY);
    let daemon = Daemon::start_with(|dir| {
        with_korexo_upstream(&default_config(dir), &mock)
            .replace("    plugin: korexo\n", "    plugin: korexo\n    timeout: 5s\n")
            .replacen(
                "  idle_timeout: 2s\n",
                "  idle_timeout: 2s\n  forward_concurrency: 1\n",
                1,
            )
    });
    let big = text(256 << 10);
    let form = Form::new()
        .text("threadId", "1a2036c0-d533-4636-8f51-2a811763ef5c")
        .file(
            "files",
            "small.txt",
            "text/plain",
            b"a first file below the sniffed bytes",
        )
        .file("files", "big.txt", "text/plain", &big);
    let reply = post_form(
        &daemon.url("/agent-setup/upload"),
        &[("x-api-key", "demo-key"), ("current-workspace-id", "ws-1")],
        &form,
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    let stored: Vec<String> = mock.stored().iter().map(|stored| stored.sha256.clone()).collect();
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(stored.contains(&sha256_hex(&big)));
}

/// An upstream that takes no body of unknown length (411 Length Required to the streamed,
/// chunked request) gets the spooled copy, its length known, at once.
#[test]
fn an_upstream_that_wants_a_length_gets_the_spooled_copy() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    mock.fail_next(1, 411);
    let daemon = Daemon::start_with(|dir| dify_config(dir, &mock, "16MiB"));
    let content = text(256 << 10);
    let reply = post_form(
        &daemon.url("/v1/files/upload"),
        &[BEARER],
        &Form::new()
            .text("user", "u-1")
            .file("file", "length.txt", "text/plain", &content),
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    let received = mock.received();
    assert_eq!(
        received.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![411, 201]
    );
    assert!(received[1].header("content-length").is_some());
    assert_eq!(received[1].file().unwrap().sha256, sha256_hex(&content));
}

/// Streams hold their delivery slot for as long as their client sends: they may take half
/// of `forward_concurrency` at most, so that slow clients never starve the deliveries every
/// other upload waits for (before, two slow streams held both slots and a small upload
/// waited out the provider's timeout: 504).
#[test]
fn slow_streaming_clients_leave_delivery_slots_for_the_others() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    let daemon = Daemon::start_with(|dir| {
        dify_config(dir, &mock, "16MiB")
            .replace("    plugin: dify\n", "    plugin: dify\n    timeout: 3s\n")
            .replacen(
                "  idle_timeout: 2s\n",
                "  idle_timeout: 2s\n  forward_concurrency: 2\n",
                1,
            )
    });
    let slow_form = |name: &str| Form::new().file("file", name, "text/plain", &text(2 << 20));
    let mut first = RawUpload::start(
        &daemon.url(""),
        "/v1/files/upload",
        BEARER,
        &slow_form("first.txt"),
    );
    first.send(1 << 20).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || mock.body_bytes_seen() >= 512 << 10),
        "the first upload is not streamed: {}",
        daemon.log()
    );
    // The second would stream too, but the streams' share is taken: it is spooled.
    let mut second = RawUpload::start(
        &daemon.url(""),
        "/v1/files/upload",
        BEARER,
        &slow_form("second.txt"),
    );
    second.send(1 << 20).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let small = text(4096);
    let started = std::time::Instant::now();
    let reply = post_form(
        &daemon.url("/v1/files/upload"),
        &[BEARER],
        &Form::new().file("file", "small.txt", "text/plain", &small),
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    for upload in [first, second] {
        let (status, answer) = upload.finish().unwrap();
        assert_eq!(status, 201, "{answer}");
    }
    let received = mock.received();
    assert_eq!(received.len(), 3, "{received:?}");
    let chunked: Vec<bool> = received
        .iter()
        .map(|request| request.header("transfer-encoding") == Some("chunked"))
        .collect();
    assert_eq!(
        chunked.iter().filter(|streamed| **streamed).count(),
        1,
        "one stream only: {chunked:?}"
    );
}

/// A request's first file whose streamed attempt fails is retried from the spool; the later
/// files' streams are aborted then (they go from the spool after it) instead of holding
/// their upstream requests, idle, and their delivery slots through the retries.
#[test]
fn a_retry_of_an_earlier_file_aborts_the_later_files_streams() {
    let mock = MockUpstream::start(Vendor::Korexo, UPSTREAM_KEY);
    // The first request is read whole, then answered 500: the streamed attempt of the first
    // file fails once its end was released.
    mock.fail_next(1, 500);
    let daemon = Daemon::start_with(|dir| {
        with_korexo_upstream(&default_config(dir), &mock)
            .replace("    plugin: korexo\n", "    plugin: korexo\n    timeout: 10s\n")
    });
    let (first, second) = (text(256 << 10), text(300 << 10));
    let form = Form::new()
        .text("threadId", "1a2036c0-d533-4636-8f51-2a811763ef5c")
        .file("files", "first.txt", "text/plain", &first)
        .file("files", "second.txt", "text/plain", &second);
    let reply = post_form(
        &daemon.url("/agent-setup/upload"),
        &[("x-api-key", "demo-key"), ("current-workspace-id", "ws-1")],
        &form,
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    let received = mock.received();
    let of = |content: &[u8]| {
        received
            .iter()
            .filter(|request| {
                request
                    .file()
                    .is_some_and(|file| file.sha256 == sha256_hex(content))
            })
            .map(|request| {
                (
                    request.status,
                    request.header("transfer-encoding") == Some("chunked"),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(of(&first), vec![(500, true), (200, false)], "{received:?}");
    assert_eq!(
        of(&second),
        vec![(200, false)],
        "the second file went from the spool: {received:?}"
    );
    assert_eq!(mock.stored().len(), 2);
}

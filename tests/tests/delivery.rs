//! Delivery end to end: the real daemon forwarding through the real vendor plugins to the
//! mock upstreams, sync and async, with upstream faults.

use std::path::Path;
use std::time::Duration;

use upgate_e2e::harness::*;
use upgate_e2e::mock::{MockUpstream, Vendor};
use upgate_e2e::tls::TlsFront;

const BEARER: (&str, &str) = ("Authorization", "Bearer demo-key");
const UPSTREAM_KEY: &str = "upstream-secret";

/// The default config with the tenant's provider replaced by the `dify` plugin at `base_url`.
fn forwarding_config(dir: &Path, base_url: &str, provider_extra: &str, settings_extra: &str) -> String {
    default_config(dir)
        .replace(
            "providers:\n",
            &format!(
                "providers:\n  up:\n    plugin: dify\n    retry: {{ max_attempts: 5, initial_backoff: 50ms, max_backoff: 200ms }}\n{provider_extra}    settings:\n      base_url: {base_url}\n      api_key: {UPSTREAM_KEY}\n      connect_timeout: 1s\n{settings_extra}"
            ),
        )
        .replace("    provider: disk\n", "    provider: up\n")
}

fn upload(daemon: &Daemon, name: &str, bytes: &[u8]) -> Reply {
    post_form(
        &daemon.url("/v1/files/upload"),
        &[BEARER],
        &Form::new()
            .text("user", "u-1")
            .file("file", name, "text/plain", bytes),
    )
}

fn row(daemon: &Daemon) -> (String, i64, Option<String>) {
    daemon
        .db()
        .query_row("SELECT state, attempts, remote_id FROM uploads", [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .unwrap()
}

#[test]
fn sync_delivery_retries_500_twice_then_delivers_on_the_third_try() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    mock.fail_next(2, 500);
    let daemon = Daemon::start_with(|dir| forwarding_config(dir, &mock.base_url(), "", ""));
    let content = b"forward me\n".repeat(100);
    let reply = upload(&daemon, "report.txt", &content);
    assert_eq!(reply.status, 201, "{}", reply.text);
    let body = reply.json();
    let received = mock.received();
    assert_eq!(
        received.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![500, 500, 201]
    );
    let delivered = &received[2];
    assert_eq!(delivered.path, "/v1/files/upload");
    assert_eq!(
        delivered.header("authorization"),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    assert_eq!(
        delivered.field("user"),
        Some("u-1"),
        "the client's user travels with the file"
    );
    let file = delivered.file().unwrap();
    assert_eq!(
        (file.sha256.as_str(), file.filename.as_slice()),
        (sha256_hex(&content).as_str(), b"report.txt".as_slice())
    );
    let stored = mock.stored();
    assert_eq!(
        body["source_url"],
        stored[0].url.as_str(),
        "the client sees the upstream URL"
    );
    let (state, attempts, remote_id) = row(&daemon);
    assert_eq!((state.as_str(), attempts), ("forwarded", 3));
    assert_eq!(remote_id.as_deref(), Some(stored[0].id.as_str()));
    assert_eq!(
        daemon.metric("upgate_upstream_retries_total{provider=\"up\"}"),
        2.0
    );
    // The spooled copy is gone once delivered.
    assert_eq!(daemon.spool_files(), 0);
}

#[test]
fn sync_delivery_over_tls_trusts_the_ca_file_given_relative_to_the_config() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    let front = TlsFront::start(mock.addr());
    let base_url = format!("{}/v1", front.origin());
    let daemon = Daemon::start_with(|dir| {
        std::fs::copy(upgate_e2e::tls::ca_file(), dir.join("upstream-ca.pem")).unwrap();
        forwarding_config(dir, &base_url, "", "      ca_file: upstream-ca.pem\n")
    });
    let content = b"sent over TLS\n".repeat(5000);
    let reply = upload(&daemon, "private.txt", &content);
    assert_eq!(reply.status, 201, "{}", reply.text);
    let received = mock.received();
    assert_eq!(received.len(), 1);
    let file = received[0].file().unwrap();
    assert_eq!(file.sha256, sha256_hex(&content));
    assert_eq!(
        received[0].header("authorization"),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    assert_eq!(row(&daemon).0, "forwarded");

    // Without the private CA the same upstream is not trusted: nothing reaches the mock.
    let untrusting = Daemon::start_with(|dir| forwarding_config(dir, &base_url, "", ""));
    let reply = upload(&untrusting, "private.txt", &content);
    assert_eq!(reply.status, 502, "{}", reply.text);
    assert_eq!(reply.json()["code"], "provider_error");
    assert_eq!(
        mock.received().len(),
        1,
        "no request got through the failed handshakes"
    );
    assert_eq!(row(&untrusting).0, "failed");
    assert_eq!(untrusting.spool_files(), 0);
}

#[test]
fn sync_delivery_gives_up_after_max_attempts_with_502() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    mock.fail_next(10, 503);
    let daemon = Daemon::start_with(|dir| forwarding_config(dir, &mock.base_url(), "", ""));
    let reply = upload(&daemon, "a.txt", b"never delivered");
    assert_eq!(reply.status, 502, "{}", reply.text);
    assert_eq!(reply.json()["code"], "provider_error");
    // max_attempts: 5 in this config, and not one more.
    assert_eq!(mock.received().len(), 5);
    let (state, attempts, remote_id) = row(&daemon);
    assert_eq!((state.as_str(), attempts, remote_id), ("failed", 5, None));
    assert!(mock.stored().is_empty());
    assert_eq!(
        daemon.spool_files(),
        0,
        "a sync upload that was refused leaves nothing in the spool"
    );
}

#[test]
fn sync_delivery_honours_429_retry_after() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    mock.rate_limit_next(1, 1);
    let daemon = Daemon::start_with(|dir| forwarding_config(dir, &mock.base_url(), "", ""));
    let started = std::time::Instant::now();
    assert_eq!(upload(&daemon, "a.txt", b"a").status, 201);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(row(&daemon).1, 2);
}

#[test]
fn a_hanging_upstream_times_out_as_504() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    mock.hang(Duration::from_secs(5));
    let daemon = Daemon::start_with(|dir| {
        forwarding_config(dir, &mock.base_url(), "    timeout: 1s\n", "      timeout: 1s\n")
    });
    let started = std::time::Instant::now();
    let reply = upload(&daemon, "a.txt", b"slow");
    assert_eq!(reply.status, 504, "{}", reply.text);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let body = reply.json();
    assert_eq!(
        (body["code"].as_str(), body["status"].as_u64()),
        (Some("provider_timeout"), Some(504))
    );
    assert_eq!(row(&daemon).0, "failed");
    mock.hang(Duration::ZERO);
}

#[test]
fn upstream_refusals_reach_the_client_with_their_reason_and_are_not_retried() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    mock.fail_next(1, 415);
    let daemon = Daemon::start_with(|dir| forwarding_config(dir, &mock.base_url(), "", ""));
    let reply = upload(&daemon, "a.txt", b"x");
    assert_eq!(reply.status, 415, "{}", reply.text);
    assert_eq!(reply.json()["code"], "provider_rejected");
    assert_eq!(mock.received().len(), 1, "a 4xx is not retried");
    assert_eq!(row(&daemon), ("failed".to_owned(), 1, None));

    // Wrong upstream credentials are the gateway's problem: 502, with the upstream's reason.
    let wrong_key = MockUpstream::start(Vendor::Dify, "another-key");
    let daemon = Daemon::start_with(|dir| forwarding_config(dir, &wrong_key.base_url(), "", ""));
    let reply = upload(&daemon, "a.txt", b"x");
    assert_eq!(reply.status, 502, "{}", reply.text);
    let message = reply.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("refused"), "{message}");
    assert!(
        !message.contains(UPSTREAM_KEY) && !daemon.log().contains(UPSTREAM_KEY),
        "the upstream key never leaks"
    );
}

#[test]
fn async_delivery_survives_an_upstream_outage_and_a_daemon_restart() {
    // Reserve an address for the upstream, then take it down.
    let first = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    let address = first.addr();
    let base_url = first.base_url();
    drop(first);

    let extra = "    delivery: async\n";
    let mut daemon = Daemon::start_with(|dir| {
        forwarding_config(dir, &base_url, extra, "").replace("max_attempts: 5", "max_attempts: 1000")
    });
    let content = b"queued while the upstream is down\n".repeat(50);
    let reply = upload(&daemon, "queued.txt", &content);
    assert_eq!(reply.status, 201, "answered once safely stored: {}", reply.text);
    assert!(reply.json()["source_url"].is_null(), "not delivered yet");
    assert!(
        eventually(Duration::from_secs(10), || row(&daemon).1 >= 2),
        "attempts are recorded: {:?}",
        row(&daemon)
    );
    let (state, _, _) = row(&daemon);
    assert_eq!(state, "received");
    let last_error: String = daemon
        .db()
        .query_row("SELECT last_error FROM uploads", [], |r| r.get(0))
        .unwrap();
    assert!(!last_error.is_empty());

    // The daemon dies; the upstream comes back; the daemon restarts.
    daemon.kill();
    let mock = MockUpstream::start_on(Vendor::Dify, UPSTREAM_KEY, address).expect("same address again");
    let daemon = Daemon::spawn(daemon.dir.clone(), daemon.config_path.clone(), &[]);
    assert!(
        eventually(Duration::from_secs(20), || row(&daemon).0 == "forwarded"),
        "{:?}\n{}",
        row(&daemon),
        daemon.log()
    );
    let stored = mock.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].sha256, sha256_hex(&content));
    assert_eq!(row(&daemon).2.as_deref(), Some(stored[0].id.as_str()));
    assert_eq!(daemon.spool_files(), 0);
}

#[test]
fn an_async_delivery_cut_off_by_a_crash_is_retried_as_soon_as_the_daemon_is_back() {
    // The upstream takes the file but answers slowly; the daemon is killed mid-attempt. The
    // claim that attempt held on the upload must not outlive the process.
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    mock.hang(Duration::from_secs(60));
    let mut daemon =
        Daemon::start_with(|dir| forwarding_config(dir, &mock.base_url(), "    delivery: async\n", ""));
    let content = b"in flight when the daemon died\n".repeat(20);
    let reply = upload(&daemon, "inflight.txt", &content);
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert!(
        eventually(Duration::from_secs(10), || !mock.stored().is_empty()),
        "the attempt reached the upstream"
    );
    daemon.kill();
    assert_eq!(row(&daemon).0, "received");
    mock.hang(Duration::ZERO);
    let daemon = Daemon::spawn(daemon.dir.clone(), daemon.config_path.clone(), &[]);
    assert!(
        eventually(Duration::from_secs(15), || row(&daemon).0 == "forwarded"),
        "{:?}\n{}",
        row(&daemon),
        daemon.log()
    );
    let stored = mock.stored();
    let last = stored.last().unwrap();
    assert_eq!(last.sha256, sha256_hex(&content));
    assert_eq!(row(&daemon).2.as_deref(), Some(last.id.as_str()));
}

#[test]
fn an_upload_the_upstream_refused_does_not_use_up_the_daily_quota() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    mock.fail_next(1, 400);
    let daemon = Daemon::start_with(|dir| {
        forwarding_config(dir, &mock.base_url(), "", "").replace(
            "max_file_size: 1MiB\n",
            "max_file_size: 1MiB\n    daily_uploads: 1\n",
        )
    });
    assert_eq!(upload(&daemon, "a.txt", b"first try").status, 400);
    // The client sends it again: the failed try did not count.
    let retried = upload(&daemon, "a.txt", b"first try");
    assert_eq!(retried.status, 201, "{}", retried.text);
    // The quota still holds for what was kept.
    assert_eq!(upload(&daemon, "b.txt", b"second").status, 429);
}

/// SIGTERM while an async delivery hangs upstream: the daemon takes no new outbox work,
/// waits for the delivery at most `shutdown_timeout` and exits; the upload stays in the
/// outbox (claimed again when its lease ends) instead of holding the process.
#[test]
fn sigterm_does_not_wait_for_a_delivery_hanging_upstream() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    mock.hang(Duration::from_secs(60));
    let mut daemon = Daemon::start_with(|dir| {
        forwarding_config(
            dir,
            &mock.base_url(),
            "    delivery: async\n    timeout: 120s\n",
            "      timeout: 120s\n",
        )
        .replace("shutdown_timeout: 10s", "shutdown_timeout: 2s")
    });
    let reply = upload(&daemon, "hanging.txt", b"delivered later");
    assert!(reply.status / 100 == 2, "{}", reply.text);
    assert!(
        eventually(Duration::from_secs(10), || mock.body_bytes_seen() > 0),
        "the delivery began"
    );
    let stopping = std::time::Instant::now();
    daemon.signal(15);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        daemon.log()
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(row(&daemon).0, "received", "still in the outbox");
    mock.hang(Duration::ZERO);
}

/// The upstream took the request and stored the file, then its answer broke off: the
/// outcome is unknown, and a retry would store a second copy at a vendor that cannot delete.
#[test]
fn a_success_whose_answer_breaks_off_is_not_sent_again() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    mock.break_next_answers(5);
    let daemon = Daemon::start_with(|dir| forwarding_config(dir, &mock.base_url(), "", ""));
    let reply = upload(&daemon, "a.txt", b"stored once");
    assert_eq!(reply.status, 502, "{}", reply.text);
    assert_eq!(reply.json()["code"], "provider_error");
    assert_eq!(mock.received().len(), 1, "sent once: {:?}", mock.received());
    assert_eq!(mock.stored().len(), 1);
    let (state, attempts, _) = row(&daemon);
    assert_eq!((state.as_str(), attempts), ("failed", 1));
    assert!(daemon.log().contains("broke off"), "{}", daemon.log());
}

/// A plugin `timeout` longer than the provider's is cut to it: the call ends when the host
/// stops waiting, and the delivery slot it held is free for the next upload at once.
#[test]
fn a_plugin_timeout_above_the_providers_ends_with_the_hosts_wait() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    mock.hang(Duration::from_secs(30));
    let daemon = Daemon::start_with(|dir| {
        forwarding_config(dir, &mock.base_url(), "    timeout: 2s\n", "      timeout: 60s\n").replacen(
            "server:\n",
            "server:\n  forward_concurrency: 1\n",
            1,
        )
    });
    let reply = upload(&daemon, "a.txt", b"slow");
    assert_eq!(reply.status, 504, "{}", reply.text);
    mock.hang(Duration::ZERO);
    let started = std::time::Instant::now();
    let reply = upload(&daemon, "b.txt", b"next");
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// What an upstream answers as the file's id and URL is stored, shown to the operator and
/// put in the client's answer: an id that is not a plain one fails the delivery (not
/// retried), a URL that is not one is dropped.
#[test]
fn an_upstream_id_that_is_not_plain_fails_and_a_url_that_is_not_one_is_dropped() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    let daemon = Daemon::start_with(|dir| forwarding_config(dir, &mock.base_url(), "", ""));
    mock.replace_next_answer(201, br#"{"id":"a/../b\u001b[2J\nforged","name":"a.txt"}"#);
    let reply = upload(&daemon, "a.txt", b"odd id");
    assert_eq!(reply.status, 502, "{}", reply.text);
    assert_eq!(mock.received().len(), 1);
    let stored: Option<String> = daemon
        .db()
        .query_row("SELECT remote_id FROM uploads", [], |row| row.get(0))
        .unwrap();
    assert_eq!(stored, None);

    mock.replace_next_answer(
        201,
        br#"{"id":"f-1","name":"b.txt","source_url":"javascript:alert(1)//\u202e"}"#,
    );
    let reply = upload(&daemon, "b.txt", b"odd url");
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert!(!reply.text.contains("javascript"), "{}", reply.text);
    let url: Option<String> = daemon
        .db()
        .query_row(
            "SELECT remote_url FROM uploads WHERE remote_id = 'f-1'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(url, None);
}

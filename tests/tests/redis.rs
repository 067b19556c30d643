//! Cluster mode's shared limits end to end: real upgate nodes on one real Redis
//! (`server.limits`): a key's burst and a tenant's concurrency cap counted across two nodes
//! (on one PostgreSQL, the real cluster shape); Redis stopped under a running node, with
//! `fault_tolerant` true (each node's own limits, counted) and false (503 with Retry-After
//! in the dialect's shape, until Redis is back); check-config.

use std::path::Path;
use std::time::{Duration, Instant};

use upgate_e2e::harness::*;
use upgate_e2e::inbound;
use upgate_e2e::postgres::PostgresServer;
use upgate_e2e::redis::RedisServer;

/// Never accepted by anything, so it can be looked for in everything upgate prints.
const PASSWORD: &str = "redis-s3cret-never-shown";

/// [`default_config`] with `server.limits` on `redis` (and `server.store` on `store`), a
/// plan `bursty` (a burst of 4, then one request per 100 s) for the key `bursty-key`, and a
/// plan `single` (one upload at a time per tenant) for `single-key`.
fn config(dir: &Path, redis: &str, fault_tolerant: bool, store: Option<&str>) -> String {
    let mut server = format!("server:\n  limits:\n    url: {redis}\n    fault_tolerant: {fault_tolerant}\n");
    if let Some(url) = store {
        server.push_str(&format!("  store:\n    url: {url}\n"));
    }
    default_config(dir).replacen("server:\n", &server, 1).replace(
        "plans:\n",
        "plans:\n  bursty:\n    max_file_size: 1MiB\n    rate_limit: { requests_per_second: 0.01, burst: 4 }\n  \
         single:\n    max_file_size: 1MiB\n    max_concurrent_uploads: 1\n",
    ) + "  bursty:\n    plan: bursty\n    provider: disk\n    keys: [bursty-key]\n  \
         single:\n    plan: single\n    provider: disk\n    keys: [single-key]\n"
}

fn node(redis: &RedisServer, fault_tolerant: bool, store: Option<&str>) -> Daemon {
    Daemon::start_with(|dir| config(dir, &redis.url(), fault_tolerant, store))
}

fn dify(daemon: &Daemon, key: &str, name: &str) -> Reply {
    inbound::upload(daemon, "dify", key, name, b"shared limits\n")
}

fn sha256_key(key: &str) -> String {
    sha256_hex(key.as_bytes())
}

fn retry_after(reply: &Reply) -> u64 {
    reply
        .header("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After: {reply:?}"))
        .parse()
        .unwrap()
}

/// A Dify upload of `single-key` started on `daemon` by hand and paused mid-body, holding
/// the tenant's slot until [`RawUpload::finish`].
fn slow_upload(daemon: &Daemon) -> RawUpload {
    let form = Form::new()
        .text("user", "u-1")
        .file("file", "slow.txt", "text/plain", &[b'a'; 64 * 1024]);
    let mut upload = RawUpload::start(
        &daemon.base_url,
        "/v1/files/upload",
        ("Authorization", "Bearer single-key"),
        &form,
    );
    upload.send(1000).unwrap();
    upload
}

/// Members of the tenant `single`'s slot set in Redis.
fn slots(redis: &RedisServer) -> String {
    redis.cli(&["ZCARD", "upgate:slots:single"])
}

fn no_key_in(what: &str, text: &str) {
    for key in ["bursty-key", "single-key"] {
        assert!(!text.contains(key), "{what} shows a key:\n{text}");
        assert!(
            !text.contains(&sha256_key(key)),
            "{what} shows a key's digest:\n{text}"
        );
    }
}

#[test]
fn two_nodes_share_a_keys_burst_and_a_tenants_concurrency_cap() {
    let postgres = PostgresServer::start();
    postgres.create_database("limits");
    let store = postgres.url("limits");
    let redis = RedisServer::start();
    let a = node(&redis, true, Some(&store));
    let b = node(&redis, true, Some(&store));

    // A burst of 4 for the key, across both nodes: A, B, A, B pass...
    for (n, daemon) in [&a, &b, &a, &b].into_iter().enumerate() {
        let reply = dify(daemon, "bursty-key", &format!("burst-{n}.txt"));
        assert_eq!(reply.status, 201, "request {n}: {}", reply.text);
    }
    // ...and the fifth is 429 on either node, with how long to wait.
    for daemon in [&a, &b] {
        let reply = dify(daemon, "bursty-key", "fifth.txt");
        assert_eq!(reply.status, 429, "{}", reply.text);
        assert_eq!(reply.json()["code"], "too_many_requests", "{}", reply.text);
        let wait = retry_after(&reply);
        assert!((90..=100).contains(&wait), "Retry-After {wait}");
    }
    // The counter is named by the key's digest, never the key, and expires.
    let keys = redis.cli(&["KEYS", "upgate:rate:*"]);
    assert!(
        keys.starts_with(&format!("upgate:rate:{}:", sha256_key("bursty-key"))),
        "{keys}"
    );
    let ttl: i64 = redis.cli(&["PTTL", &keys]).parse().unwrap();
    assert!(ttl > 0 && ttl <= 400_000, "PTTL {ttl}");
    // Other keys and plans without a rate are not limited by it.
    assert_eq!(dify(&b, "demo-key", "other.txt").status, 201);

    // One upload at a time for `single`: one in progress on A makes B answer 429...
    let held = slow_upload(&a);
    assert!(
        eventually(Duration::from_secs(5), || slots(&redis) == "1"),
        "the slot is in Redis: {}",
        slots(&redis)
    );
    let busy = dify(&b, "single-key", "busy.txt");
    assert_eq!(busy.status, 429, "{}", busy.text);
    assert_eq!(busy.json()["code"], "too_many_requests", "{}", busy.text);
    assert!(busy.header("retry-after").is_some(), "{busy:?}");
    assert_eq!(dify(&a, "single-key", "busy-too.txt").status, 429);
    // ...and once it ends, B accepts.
    let (status, text) = held.finish().unwrap();
    assert_eq!(status, 201, "{text}");
    assert!(
        eventually(Duration::from_secs(5), || slots(&redis) == "0"),
        "the slot is given back: {}",
        slots(&redis)
    );
    let after = dify(&b, "single-key", "after.txt");
    assert_eq!(after.status, 201, "{}", after.text);
    // No fallback was needed.
    for daemon in [&a, &b] {
        for limit in ["rate", "concurrency"] {
            let series = format!("upgate_limits_fallback_total{{limit=\"{limit}\"}}");
            assert_eq!(daemon.metric(&series), 0.0, "{series}");
        }
        no_key_in("the daemon's log", &daemon.log());
    }
}

#[test]
fn redis_stopped_with_fault_tolerance_counts_on_each_nodes_own_limits_and_comes_back() {
    let mut redis = RedisServer::start();
    let daemon = node(&redis, true, None);
    let fallbacks =
        |limit: &str| daemon.metric(&format!("upgate_limits_fallback_total{{limit=\"{limit}\"}}"));
    assert_eq!(dify(&daemon, "bursty-key", "before.txt").status, 201);
    assert_eq!(fallbacks("rate"), 0.0);

    redis.stop();
    // Uploads pass, under this node's own limits: a burst of 4 here, then 429.
    for n in 0..4 {
        let started = Instant::now();
        let reply = dify(&daemon, "bursty-key", &format!("during-{n}.txt"));
        assert_eq!(reply.status, 201, "request {n}: {}", reply.text);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "answered after {:?}",
            started.elapsed()
        );
    }
    let fifth = dify(&daemon, "bursty-key", "fifth.txt");
    assert_eq!(fifth.status, 429, "{}", fifth.text);
    assert!(fallbacks("rate") >= 5.0, "{}", fallbacks("rate"));
    // The tenant's cap, on this node's own semaphore.
    let held = slow_upload(&daemon);
    assert!(eventually(Duration::from_secs(5), || fallbacks("concurrency") >= 1.0));
    let busy = dify(&daemon, "single-key", "busy.txt");
    assert_eq!(busy.status, 429, "{}", busy.text);
    let (status, text) = held.finish().unwrap();
    assert_eq!(status, 201, "{text}");
    assert_eq!(dify(&daemon, "single-key", "free.txt").status, 201);
    assert!(fallbacks("concurrency") >= 3.0, "{}", fallbacks("concurrency"));
    assert!(
        daemon
            .log()
            .contains("Redis unreachable: counting rate limits and tenant concurrency on this node's own"),
        "{}",
        daemon.log()
    );

    // Redis back (empty: nothing was saved): once it has rested (a second), the limits are
    // shared again, from a fresh burst.
    redis.start_again();
    std::thread::sleep(Duration::from_millis(1500));
    let before = (fallbacks("rate"), fallbacks("concurrency"));
    let shared = dify(&daemon, "bursty-key", "after.txt");
    assert_eq!(shared.status, 201, "{}", shared.text);
    let keys = redis.cli(&["KEYS", "upgate:rate:*"]);
    assert!(keys.starts_with("upgate:rate:"), "counted in Redis again: {keys}");
    assert_eq!(dify(&daemon, "single-key", "after.txt").status, 201);
    assert_eq!(
        (fallbacks("rate"), fallbacks("concurrency")),
        before,
        "no fallback once Redis answers"
    );
    assert!(daemon.log().contains("Redis answers again"), "{}", daemon.log());
    no_key_in("the daemon's log", &daemon.log());
}

#[test]
fn redis_stopped_without_fault_tolerance_is_503_with_retry_after_until_it_is_back() {
    let mut redis = RedisServer::start();
    let daemon = node(&redis, false, None);
    let refused =
        |limit: &str| daemon.metric(&format!("upgate_limits_unavailable_total{{limit=\"{limit}\"}}"));
    assert_eq!(dify(&daemon, "bursty-key", "before.txt").status, 201);
    let ready = || get(&format!("{}/readyz", daemon.metrics_url));
    assert_eq!(ready().status, 200, "{}", ready().text);

    redis.stop();
    let unready = ready();
    assert_eq!(unready.status, 503, "{}", unready.text);
    assert!(unready.text.contains("Redis"), "{}", unready.text);
    for (key, limit) in [("bursty-key", "rate"), ("single-key", "concurrency")] {
        let started = Instant::now();
        let reply = dify(&daemon, key, "during.txt");
        let took = started.elapsed();
        assert_eq!(reply.status, 503, "{key}: {}", reply.text);
        assert!(took < Duration::from_secs(3), "{key}: answered after {took:?}");
        assert!((1..=60).contains(&retry_after(&reply)), "{reply:?}");
        assert_eq!(reply.json()["code"], "service_unavailable", "{}", reply.text);
        assert!(refused(limit) >= 1.0, "{limit}");
    }
    // Kore's errors list.
    let kore = inbound::upload(&daemon, "kore", "single-key", "during.txt", b"x");
    assert_eq!(kore.status, 503, "{}", kore.text);
    assert_eq!(kore.json()["errors"][0]["code"], 503, "{}", kore.text);
    assert!(kore.header("retry-after").is_some(), "{kore:?}");
    // A plan without shared limits does not need Redis.
    assert_eq!(dify(&daemon, "demo-key", "unlimited.txt").status, 201);
    assert!(
        daemon
            .log()
            .contains("Redis unreachable: refusing requests with 503"),
        "{}",
        daemon.log()
    );

    redis.start_again();
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || dify(
            &daemon,
            "single-key",
            "after.txt"
        )
        .status
            == 201),
        "uploads pass once Redis is back"
    );
    eprintln!("Redis back: uploads pass after {:?}", started.elapsed());
    assert_eq!(ready().status, 200, "{}", ready().text);
    assert_eq!(dify(&daemon, "bursty-key", "after.txt").status, 201);
    assert_eq!(
        daemon.metric("upgate_limits_fallback_total{limit=\"rate\"}"),
        0.0,
        "never counted on its own"
    );
    no_key_in("the daemon's log", &daemon.log());
}

#[test]
fn check_config_pings_redis_and_reports_an_unreachable_one_where_it_is() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };

    let good = write("good.yaml", config(dir.path(), &redis.url(), true, None));
    let (code, stdout, stderr) = run_cli(&["check-config", "--config", &good]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("limits redis://127.0.0.1:{}: reachable", redis.port())),
        "{stdout}"
    );

    // Through ${VAR}, and a port where nothing listens: exit 2, located at the url.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let text = config(
        dir.path(),
        &format!("redis://:${{REDIS_PASSWORD}}@127.0.0.1:{closed_port}/2"),
        false,
        None,
    );
    let line = text
        .lines()
        .position(|line| line.trim_start().starts_with("url:"))
        .unwrap()
        + 1;
    let down = write("down.yaml", text);
    let started = Instant::now();
    let output = std::process::Command::new(upgate_binary())
        .args(["check-config", "--config", &down])
        .env("REDIS_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains(&format!("down.yaml:{line}:"))
            && stderr.contains(&format!(
                "cannot reach the Redis of the shared limits at redis://:***@127.0.0.1:{closed_port}/2"
            ))
            && stderr.contains("fault_tolerant: false"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(PASSWORD),
        "check-config shows the password:\n{stderr}"
    );

    // Unknown keys under limits: refused when the file is read, where they are.
    let unknown = write(
        "unknown.yaml",
        config(dir.path(), &redis.url(), true, None).replacen("  limits:\n", "  limits:\n    prefix: x\n", 1),
    );
    let (code, _, stderr) = run_cli(&["check-config", "--config", &unknown]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("unknown.yaml:3:") && stderr.contains("unknown field `prefix`"),
        "{stderr}"
    );
}

/// `rediss://`: TLS to Redis, the server's certificate verified against `ca_file` (the
/// system's roots without it). The server here speaks TLS only, with a certificate for
/// 127.0.0.1 from a private CA: plaintext and an unknown CA fail, and with the CA a node's
/// burst is counted there.
#[test]
fn tls_to_redis_verifies_the_server_and_counts_there() {
    let redis = RedisServer::start_with_tls();
    let ca = upgate_e2e::tls::ca_file();
    let with_ca = |text: String| {
        text.replacen(
            "    fault_tolerant: false\n",
            &format!("    fault_tolerant: false\n    ca_file: {}\n", ca.display()),
            1,
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let (code, stdout, stderr) = run_cli(&["check-config", "--config", path.to_str().unwrap()]);
        (code, stdout + &stderr)
    };
    let tls_url = redis.url();
    assert!(tls_url.starts_with("rediss://"), "{tls_url}");
    let (code, output) = check(
        "verified.yaml",
        with_ca(config(dir.path(), &tls_url, false, None)),
    );
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains(&format!("limits rediss://127.0.0.1:{}: reachable", redis.port())),
        "{output}"
    );
    // The system's roots do not know the private CA.
    let (code, output) = check("system-roots.yaml", config(dir.path(), &tls_url, false, None));
    assert_eq!(code, 2, "{output}");
    assert!(
        output.contains("cannot reach the Redis") && output.contains("UnknownIssuer"),
        "{output}"
    );
    // Plaintext to a TLS port.
    let plain = tls_url.replacen("rediss://", "redis://", 1);
    let (code, output) = check("plain.yaml", config(dir.path(), &plain, false, None));
    assert_eq!(code, 2, "{output}");
    // ca_file with a plaintext URL is a config error where it is.
    let (code, output) = check("ca-plain.yaml", with_ca(config(dir.path(), &plain, false, None)));
    assert_eq!(code, 2, "{output}");
    assert!(
        output.contains("ca_file is used only with a rediss://"),
        "{output}"
    );

    // A node counts its burst in that Redis, over TLS.
    let daemon = Daemon::start_with(|dir| with_ca(config(dir, &tls_url, false, None)));
    for index in 0..4 {
        let reply = dify(&daemon, "bursty-key", &format!("{index}.txt"));
        assert_eq!(reply.status, 201, "{}", reply.text);
    }
    assert_eq!(dify(&daemon, "bursty-key", "over.txt").status, 429);
    let keys = redis.cli(&["KEYS", "upgate:rate:*"]);
    assert!(keys.contains(&sha256_key("bursty-key")), "{keys}");
    assert_eq!(
        daemon.metric("upgate_limits_unavailable_total{limit=\"rate\"}"),
        0.0
    );
}

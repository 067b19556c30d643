//! Operations end to end: systemd notifications (the test plays systemd), SIGHUP reload,
//! and the Prometheus exposition.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use upgate_e2e::harness::*;

const BEARER: (&str, &str) = ("Authorization", "Bearer demo-key");

/// Receives notify datagrams until one contains `wanted`; returns everything received.
fn wait_for(socket: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) -> bool {
    let mut buffer = [0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buffer) {
            let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
            let found = message
                .lines()
                .any(|line| line == wanted || line.starts_with(wanted));
            seen.push(message);
            if found {
                return true;
            }
        }
    }
    false
}

#[test]
fn notifies_systemd_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap().keep();
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let config_path = dir.join("config.yaml");
    std::fs::write(&config_path, default_config(&dir)).unwrap();
    let mut daemon = Daemon::spawn(
        dir.clone(),
        config_path,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            // As systemd sets it for WatchdogSec=400ms: pings every 200 ms.
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = Vec::new();
    assert!(wait_for(&socket, "READY=1", &mut seen), "{seen:?}");
    assert!(seen.last().unwrap().contains("STATUS=serving"), "{seen:?}");
    for _ in 0..2 {
        assert!(wait_for(&socket, "WATCHDOG=1", &mut seen), "{seen:?}");
    }
    // Ready means serving.
    assert_eq!(get(&format!("{}/readyz", daemon.metrics_url)).status, 200);

    daemon.signal(1);
    assert!(wait_for(&socket, "RELOADING=1", &mut seen), "{seen:?}");
    let reloading = seen.last().unwrap();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    assert!(wait_for(&socket, "READY=1", &mut seen), "{seen:?}");

    daemon.signal(15);
    assert!(wait_for(&socket, "STOPPING=1", &mut seen), "{seen:?}");
    assert!(seen.last().unwrap().contains("STATUS=draining"), "{seen:?}");
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)), Some(0));
}

#[test]
fn sighup_applies_a_new_plan_to_the_next_upload_while_one_in_flight_finishes() {
    let daemon = Daemon::start(); // default plan: 1 MiB
    let big = vec![b'b'; 600_000];
    let form = Form::new().file("file", "started-before.txt", "text/plain", &big);
    let mut in_flight = RawUpload::start(&daemon.base_url, "/v1/files/upload", BEARER, &form);
    in_flight.send(100_000).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    // Lower the limit to 500 KB and reload.
    let config = std::fs::read_to_string(&daemon.config_path).unwrap();
    std::fs::write(
        &daemon.config_path,
        config.replace("max_file_size: 1MiB", "max_file_size: 500KB"),
    )
    .unwrap();
    daemon.signal(1);
    let reloaded = eventually(Duration::from_secs(10), || {
        daemon.metric("upgate_config_reloads_total{result=\"ok\"}") == 1.0
    });
    assert!(reloaded, "{}", daemon.log());

    let next = post_form(&daemon.url("/v1/files/upload"), &[BEARER], &form);
    assert_eq!(next.status, 413, "the new plan applies: {}", next.text);
    let (status, text) = in_flight.finish().unwrap();
    assert_eq!(
        status, 201,
        "the upload that started under the old plan finishes: {text}"
    );

    // A config that fails validation is refused; the running one stays.
    std::fs::write(&daemon.config_path, "server: [this is not valid\n").unwrap();
    daemon.signal(1);
    let refused = eventually(Duration::from_secs(10), || {
        daemon.metric("upgate_config_reloads_total{result=\"error\"}") == 1.0
    });
    assert!(refused, "{}", daemon.log());
    let small = Form::new().file("file", "small.txt", "text/plain", b"still here");
    assert_eq!(
        post_form(&daemon.url("/v1/files/upload"), &[BEARER], &small).status,
        201
    );
    assert!(
        daemon.log().contains("configuration reload refused"),
        "{}",
        daemon.log()
    );
}

/// A reload that bans an extension applies to the tus uploads opened before it, as to Kore
/// sessions: their completion is checked against the plan of now, and refused.
#[test]
fn a_reloaded_plan_applies_to_a_tus_upload_opened_before_it() {
    let daemon = Daemon::start();
    let tus = |method: &str, path: &str, extra: &[(&str, &str)], body: Option<&[u8]>| {
        let mut headers = vec![("Tus-Resumable", "1.0.0"), BEARER];
        headers.extend_from_slice(extra);
        send(
            method,
            &daemon.url(path),
            &headers,
            body.map(|bytes| ("application/offset+octet-stream", bytes.to_vec())),
        )
    };
    let metadata = format!("filename {}", upgate_e2e::inbound::b64(b"notes.txt"));
    let created = tus(
        "POST",
        "/files/",
        &[("Upload-Length", "10"), ("Upload-Metadata", &metadata)],
        None,
    );
    assert_eq!(created.status, 201, "{created:?}");
    let location = created.header("location").unwrap().to_owned();
    let half = tus("PATCH", &location, &[("Upload-Offset", "0")], Some(b"hello"));
    assert_eq!(half.status, 204, "{half:?}");

    let config = std::fs::read_to_string(&daemon.config_path).unwrap();
    std::fs::write(
        &daemon.config_path,
        config.replace(
            "max_file_size: 1MiB",
            "max_file_size: 1MiB\n    allowed_extensions: [png]",
        ),
    )
    .unwrap();
    daemon.signal(1);
    assert!(
        eventually(Duration::from_secs(10), || {
            daemon.metric("upgate_config_reloads_total{result=\"ok\"}") == 1.0
        }),
        "{}",
        daemon.log()
    );
    let last = tus("PATCH", &location, &[("Upload-Offset", "5")], Some(b"world"));
    assert_eq!(last.status, 415, "{last:?}");
    let uploads: i64 = daemon
        .db()
        .query_row("SELECT COUNT(*) FROM uploads", [], |row| row.get(0))
        .unwrap();
    assert_eq!(uploads, 0, "nothing made of a banned file");
}

#[test]
fn health_readiness_and_metrics_exposition() {
    let daemon = Daemon::start();
    assert_eq!(get(&format!("{}/healthz", daemon.metrics_url)).status, 200);
    assert_eq!(get(&format!("{}/readyz", daemon.metrics_url)).status, 200);
    let sizes = [1000usize, 5000, 20_000];
    for (index, size) in sizes.iter().enumerate() {
        let form = Form::new().file("file", &format!("f{index}.txt"), "text/plain", &vec![b'm'; *size]);
        assert_eq!(
            post_form(&daemon.url("/v1/files/upload"), &[BEARER], &form).status,
            201
        );
    }
    let reply = post_form(
        &daemon.url("/v1/files/upload"),
        &[("Authorization", "Bearer nope")],
        &Form::new(),
    );
    assert_eq!(reply.status, 401);
    let total: usize = sizes.iter().sum();
    assert_eq!(
        daemon.metric("upgate_uploads_total{dialect=\"dify\",outcome=\"received\",provider=\"disk\"}"),
        3.0
    );
    assert_eq!(
        daemon.metric("upgate_uploads_total{dialect=\"dify\",outcome=\"forwarded\",provider=\"disk\"}"),
        3.0
    );
    assert_eq!(
        daemon.metric("upgate_received_bytes_total{dialect=\"dify\"}"),
        total as f64
    );
    assert_eq!(
        daemon.metric("upgate_forwarded_bytes_total{provider=\"disk\"}"),
        total as f64
    );
    assert_eq!(
        daemon.metric("upgate_upload_size_bytes_count{dialect=\"dify\"}"),
        3.0
    );
    assert_eq!(
        daemon.metric("upgate_upload_size_bytes_sum{dialect=\"dify\"}"),
        total as f64
    );
    assert_eq!(
        daemon.metric("upgate_upload_size_bytes_bucket{dialect=\"dify\",le=\"4096\"}"),
        1.0
    );
    assert_eq!(
        daemon.metric("upgate_upload_size_bytes_bucket{dialect=\"dify\",le=\"16384\"}"),
        2.0
    );
    assert_eq!(
        daemon.metric("upgate_upstream_request_duration_seconds_count{outcome=\"ok\",provider=\"disk\"}"),
        3.0
    );
    assert_eq!(
        daemon.metric(
            "upgate_http_requests_total{dialect=\"dify\",route=\"/v1/files/upload\",status_class=\"2xx\"}"
        ),
        3.0
    );
    assert_eq!(
        daemon.metric("upgate_rejections_total{dialect=\"dify\",reason=\"auth\"}"),
        1.0
    );
    assert_eq!(daemon.metric("upgate_build_info{version=\"0.1.0\"}"), 1.0);

    let exposition = get(&format!("{}/metrics", daemon.metrics_url)).text;
    // Labels are bounded: no filename, key or id in the exposition.
    for secret in ["demo-key", "nope", "f0.txt"] {
        assert!(!exposition.contains(secret), "{secret} leaked into metrics");
    }
    // Kept for `promtool check metrics` in .ci/run.
    let sample = target_dir().parent().unwrap().join("upgate-metrics.prom");
    std::fs::write(sample, &exposition).unwrap();
    // Keys never reach the log either.
    assert!(!daemon.log().contains("demo-key") && !daemon.log().contains("nope"));
}

#[test]
fn json_logs_carry_one_line_per_request_without_keys() {
    let daemon = Daemon::start_with(|dir| {
        default_config(dir).replace("  idle_timeout: 2s\n", "  idle_timeout: 2s\n  log_format: json\n")
    });
    let form = Form::new().file("file", "log me.txt", "text/plain", b"contents-never-logged");
    let reply = post_form(&daemon.url("/v1/files/upload"), &[BEARER], &form);
    assert_eq!(reply.status, 201);
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    assert!(eventually(Duration::from_secs(5), || daemon.log().contains(&id)));
    let log = daemon.log();
    let line = log.lines().find(|line| line.contains(&id)).unwrap();
    let entry: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let fields = &entry["fields"];
    assert_eq!(fields["message"], "request");
    assert_eq!(fields["status"], 201);
    assert_eq!(fields["dialect"], "dify");
    assert_eq!(fields["route"], "/v1/files/upload");
    assert_eq!(fields["tenant"], "demo");
    assert!(fields["duration_ms"].is_u64() && fields["bytes"].as_u64().unwrap() > 0);
    // A refused upload is logged with its tenant and its error, never with its bytes.
    let big = Form::new().file("file", "big.txt", "text/plain", &vec![b'z'; (1 << 20) + 1]);
    let reply = post_form(&daemon.url("/v1/files/upload"), &[BEARER], &big);
    assert_eq!(reply.status, 413);
    let refused = |log: &str| {
        log.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|entry| entry["fields"]["status"] == 413)
    };
    assert!(eventually(Duration::from_secs(5), || refused(&daemon.log()).is_some()));
    let entry = refused(&daemon.log()).unwrap();
    assert_eq!(entry["fields"]["tenant"], "demo", "{entry}");
    assert!(
        entry["fields"]["error"].as_str().unwrap().contains("too large"),
        "{entry}"
    );
    let log = daemon.log();
    assert!(!log.contains("demo-key") && !log.contains("contents-never-logged") && !log.contains("zzzz"));
}

#[test]
fn counters_and_histograms_move_for_every_dialect() {
    use upgate_e2e::inbound::{self, DIALECTS};
    let daemon = Daemon::start();
    for (index, dialect) in DIALECTS.iter().enumerate() {
        let sizes = [100 * (index + 1), 3000];
        for size in sizes {
            let reply = inbound::upload(&daemon, dialect, "demo-key", "m.txt", &vec![b'q'; size]);
            assert_eq!(
                reply.status,
                inbound::success_status(dialect),
                "{dialect}: {}",
                reply.text
            );
        }
        let refused = inbound::upload(&daemon, dialect, "not-a-key", "m.txt", b"x");
        assert_eq!(refused.status, 401, "{dialect}: {}", refused.text);

        let total: usize = sizes.iter().sum();
        let series = |name: &str, labels: &str| daemon.metric(&format!("{name}{{{labels}}}"));
        let dialect_label = format!("dialect=\"{dialect}\"");
        let uploads = |outcome: &str| {
            series(
                "upgate_uploads_total",
                &format!("{dialect_label},outcome=\"{outcome}\",provider=\"disk\""),
            )
        };
        assert_eq!(uploads("received"), 2.0, "{dialect}");
        assert_eq!(uploads("forwarded"), 2.0, "{dialect}");
        assert_eq!(
            series("upgate_received_bytes_total", &dialect_label),
            total as f64,
            "{dialect}"
        );
        assert_eq!(
            series("upgate_upload_size_bytes_count", &dialect_label),
            2.0,
            "{dialect}"
        );
        assert_eq!(
            series("upgate_upload_size_bytes_sum", &dialect_label),
            total as f64,
            "{dialect}"
        );
        assert_eq!(
            series(
                "upgate_upload_size_bytes_bucket",
                &format!("{dialect_label},le=\"1024\"")
            ),
            1.0,
            "{dialect}"
        );
        assert_eq!(
            series("upgate_upload_duration_seconds_count", &dialect_label),
            2.0,
            "{dialect}: successful requests only"
        );
        assert_eq!(
            series(
                "upgate_rejections_total",
                &format!("{dialect_label},reason=\"auth\"")
            ),
            1.0,
            "{dialect}"
        );
    }
    assert_eq!(
        daemon.metric("upgate_forwarded_bytes_total{provider=\"disk\"}"),
        {
            let per_dialect: Vec<usize> = (0..DIALECTS.len()).map(|i| 100 * (i + 1) + 3000).collect();
            per_dialect.iter().sum::<usize>() as f64
        }
    );
}

/// A stop signal during a reload is not kept waiting for it: the reload is dropped (the
/// running configuration stays) and the daemon stops at once. A second stop signal during a
/// drain closes the connections still open instead of waiting out `shutdown_timeout`.
#[test]
fn stop_signals_are_not_kept_waiting_by_a_reload_or_a_drain() {
    let mut daemon = Daemon::start();
    // A config that takes seconds to read (and is refused in the end): 60,000 nested lists.
    let config = std::fs::read_to_string(&daemon.config_path).unwrap();
    let depth = 60_000;
    let slow = format!("{config}extra: {}{}\n", "[".repeat(depth), "]".repeat(depth));
    std::fs::write(&daemon.config_path, slow).unwrap();
    daemon.signal(1);
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    daemon.signal(15);
    assert!(
        daemon.wait_exit(Duration::from_secs(4)).is_some(),
        "still running {:?} after SIGTERM: {}",
        started.elapsed(),
        daemon.log()
    );
    assert!(daemon.log().contains("the reload is dropped"), "{}", daemon.log());

    let mut daemon = Daemon::start(); // shutdown_timeout: 10s
    let form = Form::new().file("file", "slow.txt", "text/plain", &vec![b's'; 300_000]);
    let mut held = RawUpload::start(&daemon.base_url, "/v1/files/upload", BEARER, &form);
    held.send(100_000).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal(15);
    std::thread::sleep(Duration::from_millis(500));
    assert!(daemon.wait_exit(Duration::from_millis(100)).is_none(), "draining");
    daemon.signal(15);
    assert!(
        daemon.wait_exit(Duration::from_secs(4)).is_some(),
        "a second SIGTERM ends the drain: {}",
        daemon.log()
    );
    assert!(daemon.log().contains("a second stop signal"), "{}", daemon.log());
}

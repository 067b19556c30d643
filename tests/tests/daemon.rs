//! The daemon as an operator meets it: CLI, config errors, plugin loading (ABI mismatch,
//! panicking plugin), streaming limits, stalled clients and SIGTERM draining.

use std::path::Path;
use std::time::Duration;

use upgate_e2e::harness::*;

const BEARER: (&str, &str) = ("Authorization", "Bearer demo-key");

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn help_version_and_usage_errors() {
    let (code, stdout, _) = run_cli(&["--help"]);
    assert_eq!(code, 0);
    for command in ["serve", "check-config", "plugins"] {
        assert!(stdout.contains(command), "{stdout}");
    }
    let (code, stdout, _) = run_cli(&["--version"]);
    assert_eq!(
        (code, stdout.trim()),
        (0, format!("upgate {}", env!("CARGO_PKG_VERSION")).as_str())
    );
    let (code, _, stderr) = run_cli(&["frobnicate"]);
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) = run_cli(&["serve", "--config"]);
    assert_eq!(code, 2, "{stderr}");
}

#[test]
fn config_errors_name_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let good = default_config(dir.path());
    let path = write_config(dir.path(), &good);
    let (code, stdout, stderr) = run_cli(&["check-config", "--config", &path]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(": ok ("), "{stdout}");

    // Unknown field, line 4 (data_dir is line 4 of default_config; the typo replaces it).
    let typo = good.replace("  data_dir:", "  data_dri:");
    let path = write_config(dir.path(), &typo);
    for command in ["check-config", "serve"] {
        let (code, _, stderr) = run_cli(&[command, "--config", &path]);
        assert_eq!(code, 2, "{command}: {stderr}");
        assert!(
            stderr.contains(&format!("{path}:4:3: server: unknown field `data_dri`")),
            "{command}: {stderr}"
        );
    }

    // A bad size names its line and says what was expected.
    let path = write_config(
        dir.path(),
        &good.replace("max_file_size: 1MiB", "max_file_size: lots"),
    );
    let (code, _, stderr) = run_cli(&["check-config", "--config", &path]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(&format!("{path}:11:5: plans.default: `lots` is not a size")),
        "{stderr}"
    );
    assert!(stderr.contains("expected e.g. 10MiB"), "{stderr}");

    // An unset variable is named.
    let path = write_config(
        dir.path(),
        &good.replace("keys: [demo-key]", "keys: [\"${UPGATE_E2E_UNSET_KEY}\"]"),
    );
    let (code, _, stderr) = run_cli(&["check-config", "--config", &path]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("environment variable UPGATE_E2E_UNSET_KEY is not set"),
        "{stderr}"
    );

    // A missing plugin is reported by check-config, with every other problem.
    let path = write_config(
        dir.path(),
        &good
            .replace("plugin: local", "plugin: nosuch")
            .replace("plan: default", "plan: gold"),
    );
    let (code, _, stderr) = run_cli(&["check-config", "--config", &path]);
    assert_eq!(code, 2);
    assert!(stderr.contains("unknown plan `gold`"), "{stderr}");
    let path = write_config(dir.path(), &good.replace("plugin: local", "plugin: nosuch"));
    let (code, _, stderr) = run_cli(&["check-config", "--config", &path]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("plugin `nosuch`: no file") && stderr.contains("libupgate_plugin_nosuch"),
        "{stderr}"
    );
}

/// `dir/plugins`: the workspace's plugins (linked) and the ABI-mismatch fixture beside them;
/// returns `config` with that as its plugin_dir.
fn with_the_abi_mismatch_fixture(dir: &Path, config: &str) -> String {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for entry in std::fs::read_dir(build_workspace()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let prefix = format!("{}upgate_plugin_", std::env::consts::DLL_PREFIX);
        if name.starts_with(&prefix) && name.ends_with(std::env::consts::DLL_SUFFIX) {
            std::os::unix::fs::symlink(&path, plugins.join(&name)).unwrap();
        }
    }
    std::os::unix::fs::symlink(abi_mismatch_plugin(), plugins.join(plugin_file("abi-mismatch"))).unwrap();
    config.replace(
        &format!("plugin_dir: {}\n", build_workspace().display()),
        &format!("plugin_dir: {}\n", plugins.display()),
    )
}

#[test]
fn a_plugin_built_for_the_previous_abi_is_refused_naming_file_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let config = default_config(dir.path()).replace(
        "plugin: local\n    settings:\n      root: ",
        "plugin: abi-mismatch\n    settings:\n      root: ",
    );
    let path = write_config(dir.path(), &with_the_abi_mismatch_fixture(dir.path(), &config));
    for command in ["check-config", "serve"] {
        let (code, _, stderr) = run_cli(&[command, "--config", &path]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("libupgate_plugin_abi_mismatch"), "{stderr}");
        assert!(
            stderr.contains("built for plugin ABI version 1") && stderr.contains("speaks ABI version 2"),
            "{stderr}"
        );
    }
    // `plugins list` shows the good ones and flags the bad one.
    let path = write_config(
        dir.path(),
        &default_config(dir.path()).replace(
            &format!("plugin_dir: {}\n", build_workspace().display()),
            &format!("plugin_dir: {}\n", dir.path().join("plugins").display()),
        ),
    );
    let (code, stdout, _) = run_cli(&["plugins", "list", "--config", &path]);
    assert_eq!(
        code, 1,
        "a broken plugin in plugin_dir makes the listing fail: {stdout}"
    );
    let local = stdout
        .lines()
        .find(|l| l.starts_with("local "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        local.contains(env!("CARGO_PKG_VERSION"))
            && local.contains(" 2 ")
            && local.contains("libupgate_plugin_local")
    );
    assert!(stdout.lines().any(|l| l.starts_with("example ")), "{stdout}");
    assert!(
        stdout.contains("libupgate_plugin_abi_mismatch") && stdout.contains("ABI version 1"),
        "{stdout}"
    );
}

#[test]
fn the_shipped_config_lists_the_workspace_plugins_and_no_test_fixture() {
    // What a newcomer runs after the quick start's `cargo build --release --workspace`:
    // `upgate plugins list` beside the shipped config.yaml, whose plugin_dir is
    // ./target/release. Here ./target/release is the directory this test process's workspace
    // build filled (target/release itself under `cargo test --release`).
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.yaml");
    std::fs::copy(&shipped, dir.path().join("config.yaml")).unwrap();
    std::fs::create_dir(dir.path().join("target")).unwrap();
    std::os::unix::fs::symlink(build_workspace(), dir.path().join("target/release")).unwrap();
    let run = |args: &[&str]| {
        let output = std::process::Command::new(upgate_binary())
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&["plugins", "list"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!stdout.contains("abi_mismatch"), "{stdout}");
    for name in ["beam", "dify", "example", "kore", "korexo", "local", "maiagent"] {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}: {stdout}"));
        // The relative plugin_dir, joined to the config's directory (`.`) without `././`.
        assert!(
            line.ends_with(&format!(" ./target/release/{}", plugin_file(name))),
            "{line}"
        );
    }
    assert_eq!(stdout.lines().count(), 8, "a header and seven plugins: {stdout}");
    let (code, stdout, stderr) = run(&["check-config"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    // A missing plugin is named by a clean path too.
    let text = std::fs::read_to_string(dir.path().join("config.yaml")).unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        text.replace("plugin: local", "plugin: nosuch"),
    )
    .unwrap();
    let (code, _, stderr) = run(&["check-config"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!(" no file ./target/release/{} ", plugin_file("nosuch"))),
        "{stderr}"
    );
}

#[test]
fn a_panicking_plugin_gives_502_and_the_daemon_keeps_serving() {
    let daemon = Daemon::start_with(|dir| {
        default_config(dir)
            .replace(
                "providers:\n",
                "providers:\n  crashy:\n    plugin: example\n    settings:\n      panic_on: panic.txt\n",
            )
            .replace("    provider: disk\n", "    provider: crashy\n")
    });
    let reply = post_form(
        &daemon.url("/v1/files/upload"),
        &[BEARER],
        &Form::new().file("file", "panic.txt", "text/plain", b"x"),
    );
    assert_eq!(reply.status, 502, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["code"], "provider_error");
    assert_eq!(body["status"], 502);
    assert!(
        !body["message"].as_str().unwrap().contains("panic"),
        "internals stay in the log: {body}"
    );
    let state: String = daemon
        .db()
        .query_row("SELECT state FROM uploads", [], |row| row.get(0))
        .unwrap();
    assert_eq!(state, "failed");

    let reply = post_form(
        &daemon.url("/v1/files/upload"),
        &[BEARER],
        &Form::new().file("file", "fine.txt", "text/plain", b"x"),
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert_eq!(
        daemon.metric("upgate_plugin_errors_total{kind=\"panic\",provider=\"crashy\"}"),
        1.0
    );
}

#[test]
fn size_limit_is_enforced_mid_stream_and_nothing_is_kept() {
    use std::io::Write;
    let daemon = Daemon::start();
    // Chunked transfer encoding: no Content-Length to judge by, so the limit (1 MiB) must
    // stop the stream itself.
    let address = daemon.base_url.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "POST /v1/files/upload HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer demo-key\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        Form::content_type()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let part = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\r\n"
    );
    write!(stream, "{:x}\r\n{part}\r\n", part.len()).unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let mut status = None;
    for _ in 0..64 {
        // 4 MiB in all, 4x the limit; the daemon answers before the end.
        if write!(stream, "{:x}\r\n", chunk.len())
            .and_then(|_| stream.write_all(&chunk))
            .and_then(|_| stream.write_all(b"\r\n"))
            .is_err()
        {
            break;
        }
    }
    if let Ok((code, text)) = RawUpload::read_answer(&mut stream) {
        status = Some(code);
        assert!(text.contains("file_too_large"), "{text}");
    }
    assert_eq!(status, Some(413));
    assert!(eventually(Duration::from_secs(5), || daemon.spool_files() == 0));
    let rows: i64 = daemon
        .db()
        .query_row("SELECT COUNT(*) FROM uploads", [], |row| row.get(0))
        .unwrap();
    assert_eq!(rows, 0);
    // A declared Content-Length over the limit is refused before any byte is read.
    let big = Form::new().file("file", "big.bin", "application/octet-stream", &vec![0u8; 3 << 20]);
    let reply = post_form(&daemon.url("/v1/files/upload"), &[BEARER], &big);
    assert_eq!(reply.status, 413);
}

#[test]
fn a_stalled_client_is_dropped_and_its_partial_file_removed() {
    let daemon = Daemon::start(); // idle_timeout: 2s
    let form = Form::new().file("file", "slow.txt", "text/plain", &vec![b'x'; 200_000]);
    let mut upload = RawUpload::start(&daemon.base_url, "/v1/files/upload", BEARER, &form);
    upload.send(100_000).unwrap();
    let started = std::time::Instant::now();
    let answer = RawUpload::read_answer(&mut upload.stream);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    // Told why, in its dialect's shape, before the connection closes.
    let (status, text) = answer.expect("an answer before the close");
    assert_eq!(status, 408, "{text}");
    assert!(eventually(Duration::from_secs(5), || daemon.spool_files() == 0));
    // The daemon still serves.
    let reply = post_form(
        &daemon.url("/v1/files/upload"),
        &[BEARER],
        &Form::new().file("file", "a.txt", "text/plain", b"ok"),
    );
    assert_eq!(reply.status, 201);
}

#[test]
fn sigterm_lets_an_upload_in_flight_finish_then_exits_zero() {
    let mut daemon = Daemon::start();
    let content = vec![b'z'; 300_000];
    let form = Form::new().file("file", "inflight.txt", "text/plain", &content);
    let mut upload = RawUpload::start(&daemon.base_url, "/v1/files/upload", BEARER, &form);
    upload.send(150_000).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal(15);
    std::thread::sleep(Duration::from_millis(300));
    // New connections are no longer accepted while draining.
    let address = daemon.base_url.trim_start_matches("http://").to_owned();
    let refused = std::net::TcpStream::connect(&address).is_err();
    // A load balancer asking meanwhile is told to send nothing more.
    let ready = get(&format!("{}/readyz", daemon.metrics_url));
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert!(ready.text.contains("stopping"), "{}", ready.text);
    let (status, text) = upload.finish().unwrap();
    assert_eq!(status, 201, "{text}");
    let id = text
        .split("\"id\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(sha256_file(&daemon.files_dir().join(&id)), sha256_hex(&content));
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        daemon.log()
    );
    assert!(refused, "the listener was closed on SIGTERM");
}

#[test]
fn a_request_with_both_content_length_and_transfer_encoding_is_refused() {
    use std::io::Write;
    let daemon = Daemon::start();
    let address = daemon.base_url.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!(
        "POST /v1/files/upload HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer demo-key\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nContent-Type: {}\r\n\r\n0\r\n\r\n",
        Form::content_type()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let (status, text) = RawUpload::read_answer(&mut stream).unwrap();
    assert_eq!(status, 400, "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
}

#[test]
fn a_bare_lf_after_the_last_chunk_is_refused() {
    use std::io::{Read, Write};
    // CVE-2026-134342: an unpatched chunked decoder reads `0\r\n\n` as the start of a trailer
    // section and skips into the next request on the connection, so that request's body is
    // served as a request of its own (smuggled past whatever filtered the outer request).
    let daemon = Daemon::start();
    let address = daemon.base_url.trim_start_matches("http://").to_owned();
    let smuggled_form = Form::new().file("file", "smuggled.txt", "text/plain", b"smuggled");
    let smuggled_body = smuggled_form.body();
    let smuggled = [
        format!(
            "POST /v1/files/upload HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer demo-key\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
            Form::content_type(),
            smuggled_body.len()
        )
        .into_bytes(),
        smuggled_body,
    ]
    .concat();
    let outer_body = Form::new()
        .file("file", "outer.txt", "text/plain", b"outer")
        .body();
    let mut request = format!(
        "POST /v1/files/upload HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer demo-key\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        Form::content_type(),
        outer_body.len()
    )
    .into_bytes();
    request.extend_from_slice(&outer_body);
    request.extend_from_slice(b"\r\n0\r\n\n");
    request.extend_from_slice(
        format!(
            "GET /carrier HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\n\r\n",
            smuggled.len()
        )
        .as_bytes(),
    );
    request.extend_from_slice(&smuggled);
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(&request).unwrap();
    let mut answers = Vec::new();
    let _ = stream.read_to_end(&mut answers);
    let answers = String::from_utf8_lossy(&answers);
    assert!(!answers.contains("smuggled.txt"), "{answers}");
    let smuggled_rows: i64 = daemon
        .db()
        .query_row(
            "SELECT COUNT(*) FROM uploads WHERE filename = 'smuggled.txt'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(smuggled_rows, 0, "{answers}");
}

#[test]
fn relative_paths_in_the_config_are_relative_to_the_config_file() {
    // The daemon runs from another directory than the config's: `data_dir` and the local
    // provider's `root` must still land beside the config file.
    let daemon = Daemon::start_with(|dir| {
        default_config(dir)
            .replace(
                &format!("data_dir: {}", dir.join("data").display()),
                "data_dir: ./data",
            )
            .replace(&format!("root: {}", dir.join("files").display()), "root: files")
    });
    let config = std::fs::read_to_string(&daemon.config_path).unwrap();
    assert!(
        config.contains("root: files") && config.contains("data_dir: ./data"),
        "{config}"
    );
    let reply = post_form(
        &daemon.url("/v1/files/upload"),
        &[BEARER],
        &Form::new().file("file", "where.txt", "text/plain", b"beside the config"),
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        std::fs::read(daemon.dir.join("files").join(&id)).unwrap(),
        b"beside the config"
    );
    assert!(daemon.dir.join("data").join("upgate.db").exists());
}

/// An upload still arriving when `shutdown_timeout` passes is cut, and the log says how many
/// connections were: the operator learns that clients were cut, not only that it stopped.
#[test]
fn uploads_cut_at_shutdown_timeout_are_reported() {
    let mut daemon = Daemon::start_with(|dir| {
        default_config(dir).replace("shutdown_timeout: 10s", "shutdown_timeout: 2s")
    });
    let form = Form::new().file("file", "slow.txt", "text/plain", &vec![b's'; 300_000]);
    let mut held = RawUpload::start(&daemon.base_url, "/v1/files/upload", BEARER, &form);
    held.send(100_000).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal(15);
    // The client keeps sending, slowly enough to outlast the drain.
    for _ in 0..25 {
        std::thread::sleep(Duration::from_millis(100));
        if held.send(1000).is_err() {
            break;
        }
    }
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("connections=1") && daemon.log().contains("the requests still running are cut"),
        "{}",
        daemon.log()
    );
    assert_eq!(daemon.spool_files(), 0);
}

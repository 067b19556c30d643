//! Operator tools for what faults leave behind: `upgate uploads list | show | retry` and
//! `upgate sessions list`, run against a daemon that is running.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use upgate_e2e::harness::*;
use upgate_e2e::mock::{MockUpstream, Vendor};

const UPSTREAM_KEY: &str = "upstream-secret";

fn config(dir: &Path, base_url: &str) -> String {
    default_config(dir)
        .replace(
            "providers:\n",
            &format!(
                "providers:\n  up:\n    plugin: dify\n    delivery: async\n    retry: {{ max_attempts: 1 }}\n    settings:\n      base_url: {base_url}\n      api_key: {UPSTREAM_KEY}\n"
            ),
        )
        .replace("    provider: disk\n", "    provider: up\n")
        + "  other:\n    plan: default\n    provider: disk\n    keys: [other-key]\n"
}

fn cli_json(daemon: &Daemon, args: &[&str]) -> Value {
    let config = daemon.config_path.display().to_string();
    let mut all = args.to_vec();
    all.extend(["--json", "--config", &config]);
    let (code, stdout, stderr) = run_cli(&all);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"))
}

fn state(daemon: &Daemon, id: &str) -> String {
    daemon
        .db()
        .query_row("SELECT state FROM uploads WHERE id = ?1", [id], |row| row.get(0))
        .unwrap()
}

#[test]
fn a_failed_async_delivery_is_found_shown_and_re_driven() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    mock.fail_next(1, 400);
    let daemon = Daemon::start_with(|dir| config(dir, &mock.base_url()));
    let content = b"deliver me later\n".repeat(20);
    let reply = post_form(
        &daemon.url("/v1/files/upload"),
        &[("Authorization", "Bearer demo-key")],
        &Form::new().file("file", "late.txt", "text/plain", &content),
    );
    assert_eq!(reply.status, 201, "{}", reply.text);
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    assert!(eventually(Duration::from_secs(10), || state(&daemon, &id) == "failed"));
    // Another tenant's upload, for the filters.
    let other = post_form(
        &daemon.url("/v1/files/upload"),
        &[("Authorization", "Bearer other-key")],
        &Form::new().file("file", "o.txt", "text/plain", b"other"),
    );
    assert_eq!(other.status, 201, "{}", other.text);

    let failed = cli_json(&daemon, &["uploads", "list", "--state", "failed"]);
    let ids: Vec<&str> = failed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id.as_str()]);
    assert_eq!(failed[0]["tenant"], "demo");
    assert!(
        failed[0]["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{failed}"
    );
    let mine = cli_json(&daemon, &["uploads", "list", "--tenant", "demo", "--since", "1h"]);
    assert_eq!(mine.as_array().unwrap().len(), 1, "{mine}");
    let all = cli_json(&daemon, &["uploads", "list"]);
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");

    let shown = cli_json(&daemon, &["uploads", "show", &id]);
    assert_eq!(
        (shown["state"].clone(), shown["attempts"].clone()),
        (json!("failed"), json!(1))
    );
    let spooled = shown["spooled_at"]
        .as_str()
        .expect("the bytes are kept for a retry");
    assert_eq!(sha256_file(Path::new(spooled)), sha256_hex(&content));
    // The table form too.
    let config = daemon.config_path.display().to_string();
    let (code, table, _) = run_cli(&["uploads", "show", &id, "--config", &config]);
    assert_eq!(code, 0);
    assert!(table.contains(spooled) && table.contains("failed"), "{table}");

    // Accepted for a provider the config no longer has: a retry would only fail again.
    let provider: String = daemon
        .db()
        .query_row("SELECT provider FROM uploads WHERE id = ?1", [&id], |row| {
            row.get(0)
        })
        .unwrap();
    let set_provider = |name: &str| {
        daemon
            .db()
            .execute(
                "UPDATE uploads SET provider = ?2 WHERE id = ?1",
                [id.as_str(), name],
            )
            .unwrap()
    };
    set_provider("gone");
    let (code, _, stderr) = run_cli(&["uploads", "retry", &id, "--config", &config]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("provider gone, which the config no longer has"),
        "{stderr}"
    );
    assert_eq!(state(&daemon, &id), "failed");
    set_provider(&provider);

    // The upstream is fine again: the operator re-drives the delivery.
    let (code, stdout, stderr) = run_cli(&["uploads", "retry", &id, "--config", &config]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        eventually(Duration::from_secs(10), || state(&daemon, &id) == "forwarded"),
        "{}",
        daemon.log()
    );
    assert_eq!(mock.stored().len(), 1);
    assert_eq!(mock.stored()[0].sha256, sha256_hex(&content));
    // Nothing to retry now, and no such upload: refused with a reason.
    let (code, _, stderr) = run_cli(&["uploads", "retry", &id, "--config", &config]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not failed"), "{stderr}");
    let (code, _, stderr) = run_cli(&["uploads", "show", "../../etc/passwd", "--config", &config]);
    // A usage error, like the argument parser's own.
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not an upload id"), "{stderr}");
}

#[test]
fn sessions_in_progress_are_listed() {
    let mock = MockUpstream::start(Vendor::Dify, UPSTREAM_KEY);
    let daemon = Daemon::start_with(|dir| config(dir, &mock.base_url()));
    let started = post_json(
        &daemon.url("/api/public/files/session/start"),
        &[("x-api-key", "demo-key")],
        &json!({"fileContext": "bulkImport", "totalChunks": 2, "fileExtension": "txt",
                "fileName": "big.txt", "fileSize": 10}),
    );
    assert_eq!(started.status, 200, "{}", started.text);
    let session = started.json()["sessionId"].as_str().unwrap().to_owned();
    let listed = cli_json(&daemon, &["sessions", "list"]);
    let sessions = listed.as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{listed}");
    assert_eq!(sessions[0]["id"], session.as_str());
    assert_eq!(sessions[0]["dialect"], "kore");
    assert_eq!(sessions[0]["declared_size"], 10);
    let config = daemon.config_path.display().to_string();
    let (code, table, _) = run_cli(&["sessions", "list", "--config", &config]);
    assert_eq!(code, 0);
    assert!(table.contains(&session) && table.contains("big.txt"), "{table}");
}

/// Root in the `data_dir` of a daemon run as another user (`sudo upgate uploads list` beside
/// the packaged unit) would leave root's files there (SQLite's `-wal`/`-shm` when the daemon
/// is stopped), which that daemon could not open at its next start: refused, with how to run
/// it. A data_dir whose files are root's (a daemon run as root, in a container whose volume
/// another user owns) is not refused. The rule is root's: this test needs root (to chown),
/// and fails without it rather than skipping.
#[test]
fn root_is_refused_in_the_data_dir_of_a_daemon_run_as_another_user() {
    use std::os::unix::fs::MetadataExt;

    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.yaml");
    std::fs::write(&config_path, default_config(dir.path())).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = config_path.display().to_string();
    // The store is made (by whoever runs this).
    let (code, stdout, stderr) = run_cli(&["uploads", "list", "--config", &config]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        std::fs::metadata("/proc/self").unwrap().uid(),
        0,
        "this test runs as root (it chowns the data_dir to another user) and never skips"
    );
    {
        let chown = |owner: &str, recursive: bool| {
            let mut command = std::process::Command::new("chown");
            if recursive {
                command.arg("-R");
            }
            assert!(command.arg(owner).arg(&data).status().unwrap().success());
        };
        // A volume another user owns, with root's files in it: root's daemon, not refused.
        chown("65534:65534", false);
        let (code, stdout, stderr) = run_cli(&["uploads", "list", "--config", &config]);
        assert_eq!(code, 0, "{stdout}{stderr}");
        // The files are that user's: refused, and nothing is made.
        chown("65534:65534", true);
        let entries = || {
            let mut names: Vec<_> = std::fs::read_dir(&data)
                .unwrap()
                .flatten()
                .map(|entry| entry.file_name())
                .collect();
            names.sort();
            names
        };
        let before = entries();
        for args in [
            vec!["uploads", "list", "--config", &config],
            vec!["sessions", "list", "--config", &config],
            vec!["serve", "--config", &config],
        ] {
            let (code, stdout, stderr) = run_cli(&args);
            assert_eq!(code, 1, "{args:?}: {stdout}{stderr}");
            assert!(
                stderr.contains("run as user id 65534") && stderr.contains("sudo -u upgate"),
                "{args:?}: {stderr}"
            );
        }
        assert_eq!(entries(), before, "nothing made");
        chown("0:0", true);
    }
    let (code, stdout, stderr) = run_cli(&["uploads", "list", "--config", &config]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

/// A store of another schema version (an older daemon still serving it while a newer
/// upgate's commands run, or the reverse) is refused by every operator command, and never
/// migrated under the daemon that serves it.
#[test]
fn a_store_of_another_schema_version_is_refused_not_migrated() {
    let daemon = Daemon::start();
    let config = daemon.config_path.display().to_string();
    let version = |db: &rusqlite::Connection| -> i64 {
        db.query_row("PRAGMA user_version", [], |row| row.get(0)).unwrap()
    };
    let current = version(&daemon.db());
    assert_eq!(run_cli(&["uploads", "list", "--config", &config]).0, 0);
    for other in [current - 1, current + 1] {
        daemon.db().pragma_update(None, "user_version", other).unwrap();
        for command in [
            vec!["uploads", "list"],
            vec!["sessions", "list"],
            vec!["uploads", "show", "0f8c1f4e-3f43-4a55-9b9c-6b2f1d0e8a11"],
            vec!["uploads", "delete", "0f8c1f4e-3f43-4a55-9b9c-6b2f1d0e8a11"],
        ] {
            let mut args = command.clone();
            args.extend(["--config", &config]);
            let (code, _, stderr) = run_cli(&args);
            assert_eq!(code, 1, "{command:?}: {stderr}");
            assert!(
                stderr.contains(&format!("schema version {other}, this upgate uses {current}")),
                "{command:?}: {stderr}"
            );
        }
        assert_eq!(version(&daemon.db()), other, "not migrated");
    }
}

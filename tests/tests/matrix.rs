//! The dialect x provider matrix: every inbound dialect (tus included) uploads through every provider (the
//! local disk and the five vendor plugins against their mock upstreams). The bytes arrive
//! intact (sha256 at the far end) and the client gets its own dialect's shape.

use std::path::Path;

use serde_json::Value;
use upgate_e2e::harness::*;
use upgate_e2e::inbound;
use upgate_e2e::mock::{MockUpstream, Vendor};

const UPSTREAM_KEY: &str = "matrix-upstream-key";
const WORKSPACE: &str = "ws-settings";
const THREAD: &str = "5b3cf0a4-59a3-4b8e-9d0c-3f7e0c1d2e3f";

const VENDORS: [Vendor; 5] = [
    Vendor::Dify,
    Vendor::Kore,
    Vendor::Maiagent,
    Vendor::Korexo,
    Vendor::Beam,
];

struct Matrix {
    daemon: Daemon,
    mocks: Vec<MockUpstream>,
}

/// One tenant per provider: `local` (key `key-local`) and one per vendor (`key-<vendor>`).
fn start() -> Matrix {
    let mocks: Vec<MockUpstream> = VENDORS
        .iter()
        .map(|vendor| MockUpstream::start(*vendor, UPSTREAM_KEY))
        .collect();
    // The kore mock refuses single uploads over the plugin's configured limit: a file that
    // is not sent in chunks fails.
    for mock in mocks.iter().filter(|mock| mock.vendor() == Vendor::Kore) {
        mock.limit_single_upload(1000);
    }
    let daemon = Daemon::start_with(|dir: &Path| {
        let mut config = format!(
            "server:\n  listen: 127.0.0.1:0\n  metrics_listen: 127.0.0.1:0\n  data_dir: {data}\n  plugin_dir: {plugins}\n  disk_free_floor: 1MiB\n\
plans:\n  default:\n    max_file_size: 1MiB\n\
providers:\n  local:\n    plugin: local\n    settings: {{ root: {files} }}\n",
            data = dir.join("data").display(),
            plugins = build_workspace().display(),
            files = dir.join("files").display(),
        );
        for mock in &mocks {
            let name = mock.vendor().name();
            let extra = match mock.vendor() {
                Vendor::Korexo => "      app_id: app-1\n      env_name: draft\n".to_owned(),
                Vendor::Beam => format!(
                    "      workspace_id: {WORKSPACE}\n      allowed_workspace_ids: [ws-1]\n      thread_id: {THREAD}\n"
                ),
                Vendor::Kore => "      single_upload_limit: 1000\n      chunk_size: 700\n".to_owned(),
                _ => String::new(),
            };
            config.push_str(&format!(
                "  {name}:\n    plugin: {name}\n    retry: {{ max_attempts: 2, initial_backoff: 50ms }}\n    settings:\n      base_url: {}\n      api_key: {UPSTREAM_KEY}\n{extra}",
                mock.base_url()
            ));
        }
        config.push_str("tenants:\n");
        for provider in std::iter::once("local").chain(VENDORS.iter().map(|v| v.name())) {
            config.push_str(&format!(
                "  t-{provider}:\n    plan: default\n    provider: {provider}\n    keys: [key-{provider}]\n"
            ));
        }
        config
    });
    Matrix { daemon, mocks }
}

fn check_dialect(matrix: &Matrix, dialect: &str) {
    let daemon = &matrix.daemon;
    // Bigger than kore's single-upload limit in this config: kore forwards in chunks.
    let content: Vec<u8> = (0..2500u32).map(|i| (i % 7) as u8 + b'a').collect();
    let name = format!("{dialect}-報告.txt");
    let reply = inbound::upload(daemon, dialect, "key-local", &name, &content);
    assert_eq!(
        reply.status,
        inbound::success_status(dialect),
        "{dialect} -> local: {}",
        reply.text
    );
    let (id, url) = (inbound::id(dialect, &reply), inbound::url(dialect, &reply));
    assert_eq!(
        sha256_file(&daemon.files_dir().join(&id)),
        sha256_hex(&content),
        "{dialect} -> local"
    );
    // The local provider has no public_base_url here: the answer names no path of this
    // server; a URL field the dialect requires names the upload in upgate instead.
    let files = daemon.files_dir().to_string_lossy().into_owned();
    assert!(!reply.text.contains(&files), "{dialect} -> local: {}", reply.text);
    assert!(
        reply.headers.iter().all(|(_, value)| !value.contains(&files)),
        "{dialect} -> local: {:?}",
        reply.headers
    );
    if let Some(url) = url {
        let named = format!("upgate://uploads/{id}");
        assert!(
            url.is_null() || url.as_str() == Some(named.as_str()),
            "{dialect} -> local: {url}"
        );
    }

    for mock in &matrix.mocks {
        let vendor = mock.vendor().name();
        let before = mock.stored().len();
        let reply = inbound::upload(daemon, dialect, &format!("key-{vendor}"), &name, &content);
        assert_eq!(
            reply.status,
            inbound::success_status(dialect),
            "{dialect} -> {vendor}: {}",
            reply.text
        );
        let stored = mock.stored();
        assert_eq!(stored.len(), before + 1, "{dialect} -> {vendor}");
        let last = stored.last().unwrap();
        assert_eq!(
            last.sha256,
            sha256_hex(&content),
            "{dialect} -> {vendor}: bytes intact"
        );
        assert_eq!(
            last.filename,
            name.as_bytes(),
            "{dialect} -> {vendor}: the name byte for byte"
        );
        let (id, url) = (inbound::id(dialect, &reply), inbound::url(dialect, &reply));
        match url {
            Some(url) => assert_eq!(
                url,
                Value::String(last.url.clone()),
                "{dialect} -> {vendor}: the upstream URL reaches the client"
            ),
            // Kore XO's answer has no URL field; every other dialect carries one.
            None => assert_eq!(
                dialect, "korexo",
                "{dialect} -> {vendor}: no URL reached the client"
            ),
        }
        let remote: String = daemon
            .db()
            .query_row(
                "SELECT remote_id FROM uploads WHERE id = ?1 AND state = 'forwarded'",
                [&id],
                |row| row.get(0),
            )
            .unwrap_or_else(|e| panic!("{dialect} -> {vendor}: {e}"));
        assert_eq!(remote, last.id, "{dialect} -> {vendor}");
    }
}

#[test]
fn every_dialect_through_every_provider() {
    let matrix = start();
    for dialect in inbound::DIALECTS {
        check_dialect(&matrix, dialect);
    }
    // Vendor-specific things the upstreams must have received.
    let received = |vendor: Vendor| {
        matrix
            .mocks
            .iter()
            .find(|m| m.vendor() == vendor)
            .unwrap()
            .received()
    };
    // Beam needs a workspace and a thread: a Beam client's own travel with its upload, the
    // other dialects' uploads use the provider's settings.
    let beam = received(Vendor::Beam);
    let scope = |r: &upgate_e2e::mock::Received| {
        (
            r.header("current-workspace-id").map(str::to_owned),
            r.field("threadId").map(str::to_owned),
        )
    };
    let from_client = (Some("ws-1".to_owned()), Some(inbound::BEAM_THREAD.to_owned()));
    let from_settings = (Some(WORKSPACE.to_owned()), Some(THREAD.to_owned()));
    assert_eq!(
        beam.iter().filter(|r| scope(r) == from_client).count(),
        1,
        "{beam:?}"
    );
    assert_eq!(
        beam.iter().filter(|r| scope(r) == from_settings).count(),
        beam.len() - 1,
        "{beam:?}"
    );
    let korexo = received(Vendor::Korexo);
    assert!(korexo.iter().all(|r| r.field("uploadType") == Some("runtime")
        && r.path.starts_with("/api/v2/apps/app-1/environments/draft/")));
    let kore = received(Vendor::Kore);
    assert!(
        kore.iter().any(|r| r.path == "/api/public/files/session/start"),
        "kore used chunked sessions"
    );
}

//! The beam provider against the beam mock.

use serde_json::json;
use upgate_e2e::mock::checks::{self, Upload, expect_error};
use upgate_e2e::mock::{MockUpstream, Vendor};
use upgate_plugin_api::{DeleteRequest, ErrorKind, InitContext, Provider};
use upgate_plugin_beam::Beam;

const KEY: &str = "beam-key-123456";
const THREAD: &str = "1a2036c0-d533-4636-8f51-2a811763ef5c";

#[test]
fn put_sends_thread_workspace_and_one_files_part() {
    let mock = MockUpstream::start(Vendor::Beam, KEY);
    let beam = Beam::init(
        &InitContext::default(),
        checks::settings(
            &mock,
            json!({"workspace_id": "ws-config", "allowed_workspace_ids": ["ws-42"]}),
        ),
    )
    .unwrap();
    let metadata = json!({"threadId": THREAD, "workspaceId": "ws-42"});
    let upload = Upload::new(b"col1,col2\n1,2\n", "table.csv", "text/csv", metadata).in_dialect("beam");

    let result = beam.put(upload.request.clone()).unwrap();

    let request = &mock.received()[0];
    assert_eq!(request.path, "/agent-setup/upload");
    assert_eq!(request.header("x-api-key"), Some(KEY));
    assert_eq!(request.header("current-workspace-id"), Some("ws-42"));
    assert_eq!(request.field("threadId"), Some(THREAD));
    assert_eq!(request.files.len(), 1);
    let file = request.file().unwrap();
    assert_eq!(
        (file.field.as_str(), file.sha256.as_str()),
        ("files", upload.sha256())
    );
    assert_eq!(request.status, 201);
    let stored = &mock.stored()[0];
    assert_eq!(
        (result.remote_id.as_str(), stored.scope.as_str()),
        (stored.id.as_str(), "ws-42")
    );
    assert_eq!(result.url.as_deref(), Some(stored.url.as_str()));
    // The user row the real API leaks is cut down to id and name.
    let user = &result.raw["user"];
    assert_eq!(user.as_object().unwrap().len(), 2, "{user}");
    assert!(!result.raw.to_string().contains("password"));
    assert!(!result.raw.to_string().contains("rememberToken"));
}

/// A record Beam answers with `uploadStatus: failed` is no delivery: an error the host
/// retries, not a file id.
#[test]
fn a_record_beam_says_failed_is_retried_not_delivered() {
    let mock = MockUpstream::start(Vendor::Beam, KEY);
    let beam = Beam::init(
        &InitContext::default(),
        checks::settings(&mock, json!({"workspace_id": "ws-config"})),
    )
    .unwrap();
    let upload = Upload::new(b"a,b\n", "t.csv", "text/csv", json!({"threadId": THREAD})).in_dialect("beam");
    mock.beam_upload_status("failed");
    let error = expect_error(
        beam.put(upload.request.clone()),
        ErrorKind::Unavailable,
        Some(201),
    );
    assert!(error.message.contains("failed"), "{error:?}");
    mock.beam_upload_status("uploaded");
    assert!(beam.put(upload.request).is_ok());
}

/// A workspace or thread in the metadata of an upload that came through another dialect (a
/// tus client's `Upload-Metadata` may say anything) chooses nothing: the settings do.
#[test]
fn only_a_beam_clients_metadata_chooses_the_workspace() {
    let mock = MockUpstream::start(Vendor::Beam, KEY);
    let beam = Beam::init(
        &InitContext::default(),
        checks::settings(&mock, json!({"workspace_id": "ws-1", "thread_id": THREAD})),
    )
    .unwrap();
    let other_thread = "0b6f1c52-8a37-4c1e-9d0e-5f2a7d3e9b10";
    let metadata = json!({"workspaceId": "ws-evil", "threadId": other_thread});
    beam.put(
        Upload::new(b"x", "a.txt", "text/plain", metadata)
            .in_dialect("tus")
            .request,
    )
    .unwrap();
    let request = &mock.received()[0];
    assert_eq!(
        (request.header("current-workspace-id"), request.field("threadId")),
        (Some("ws-1"), Some(THREAD))
    );
}

#[test]
fn settings_supply_thread_and_workspace() {
    let mock = MockUpstream::start(Vendor::Beam, KEY);
    let beam = Beam::init(
        &InitContext::default(),
        checks::settings(&mock, json!({"workspace_id": "ws-1", "thread_id": THREAD})),
    )
    .unwrap();
    beam.put(Upload::new(b"x", "a.txt", "text/plain", json!({})).request)
        .unwrap();
    let request = &mock.received()[0];
    assert_eq!(
        (request.header("current-workspace-id"), request.field("threadId")),
        (Some("ws-1"), Some(THREAD))
    );
}

#[test]
fn missing_or_bad_ids_are_rejected_before_sending() {
    let mock = MockUpstream::start(Vendor::Beam, KEY);
    let beam = Beam::init(&InitContext::default(), checks::settings(&mock, json!({}))).unwrap();
    let put = |metadata| {
        beam.put(
            Upload::new(b"x", "a.txt", "text/plain", metadata)
                .in_dialect("beam")
                .request,
        )
    };
    let error = expect_error(put(json!({"threadId": THREAD})), ErrorKind::Rejected, None);
    assert!(error.message.contains("no workspace"), "{error:?}");
    let error = expect_error(put(json!({"workspaceId": "w"})), ErrorKind::Rejected, None);
    assert!(error.message.contains("no thread id"), "{error:?}");
    expect_error(
        put(json!({"workspaceId": "w", "threadId": "not-a-uuid"})),
        ErrorKind::Rejected,
        None,
    );
    expect_error(
        put(json!({"workspaceId": "w\r\nx: y", "threadId": THREAD})),
        ErrorKind::Rejected,
        None,
    );
    assert!(mock.received().is_empty());

    let error = Beam::init(
        &InitContext::default(),
        checks::settings(&mock, json!({"thread_id": "nope"})),
    )
    .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Config);
    let error = beam
        .delete(DeleteRequest {
            upload_id: "u".into(),
            remote_id: "r".into(),
            metadata: Default::default(),
            dialect: "dify".into(),
        })
        .unwrap_err();
    assert_eq!(
        (error.kind, error.message.as_str()),
        (ErrorKind::Rejected, "beam has no delete API")
    );
}

#[test]
fn failures_map_to_error_kinds() {
    let mock = MockUpstream::start(Vendor::Beam, KEY);
    checks::check_failure_mapping::<Beam>(
        &mock,
        json!({"workspace_id": "ws", "thread_id": THREAD}),
        json!({}),
    );
}

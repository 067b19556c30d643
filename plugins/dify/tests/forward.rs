//! The dify provider against the dify mock.

use serde_json::json;
use upgate_e2e::mock::checks::{self, Upload, expect_error};
use upgate_e2e::mock::{MockUpstream, Vendor};
use upgate_plugin_api::{DeleteRequest, ErrorKind, InitContext, Provider};
use upgate_plugin_dify::Dify;

const KEY: &str = "app-dify-key-123";

#[test]
fn put_forwards_the_file_and_the_user() {
    let mock = MockUpstream::start(Vendor::Dify, KEY);
    let dify = Dify::init(
        &InitContext::default(),
        checks::settings(&mock, json!({"user": "configured-user"})),
    )
    .unwrap();
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let upload = Upload::new(
        &bytes,
        "產品 \"photo\".png",
        "image/png",
        json!({"user": "alice"}),
    );

    let result = dify.put(upload.request.clone()).unwrap();

    let received = mock.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("POST", "/v1/files/upload")
    );
    assert_eq!(
        request.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(request.field("user"), Some("alice"));
    let file = request.file().unwrap();
    assert_eq!(file.field, "file");
    assert_eq!(file.filename, "產品 \"photo\".png".as_bytes());
    assert_eq!(file.filename_raw, "產品 \"photo\".png".as_bytes());
    assert_eq!(file.content_type.as_deref(), Some("image/png"));
    assert_eq!(
        (file.size, file.sha256.as_str()),
        (bytes.len() as u64, upload.sha256())
    );
    assert_eq!(request.status, 201);

    let stored = mock.stored();
    assert_eq!(result.remote_id, stored[0].id);
    assert_eq!(result.url.as_deref(), Some(stored[0].url.as_str()));
    assert_eq!(result.raw["size"], json!(bytes.len()));

    // Without metadata the configured user goes.
    dify.put(Upload::new(b"x", "a.txt", "text/plain", json!({})).request)
        .unwrap();
    assert_eq!(mock.received()[1].field("user"), Some("configured-user"));
}

#[test]
fn default_user_and_settings_errors() {
    let mock = MockUpstream::start(Vendor::Dify, KEY);
    let dify = Dify::init(&InitContext::default(), checks::settings(&mock, json!({}))).unwrap();
    dify.put(Upload::new(b"x", "a.txt", "text/plain", json!({})).request)
        .unwrap();
    assert_eq!(mock.received()[0].field("user"), Some("upgate"));

    let error = Dify::init(
        &InitContext::default(),
        checks::settings(&mock, json!({"usr": "typo"})),
    )
    .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Config);
    assert!(error.message.contains("`usr`"), "{}", error.message);
    let error = Dify::init(
        &InitContext::default(),
        json!({"base_url": "https://api.dify.ai/v1"}),
    )
    .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Config);
}

#[test]
fn failures_map_to_error_kinds() {
    let mock = MockUpstream::start(Vendor::Dify, KEY);
    checks::check_failure_mapping::<Dify>(&mock, json!({}), json!({}));
}

#[test]
fn delete_is_not_supported() {
    let mock = MockUpstream::start(Vendor::Dify, KEY);
    let dify = Dify::init(&InitContext::default(), checks::settings(&mock, json!({}))).unwrap();
    let error = expect_error(
        dify.delete(DeleteRequest {
            upload_id: "u".into(),
            remote_id: "r".into(),
            metadata: Default::default(),
            dialect: "dify".into(),
        }),
        ErrorKind::Rejected,
        None,
    );
    assert_eq!(error.message, "dify has no delete API");
    assert!(mock.received().is_empty());
}

#[test]
fn a_missing_or_changed_spool_file_is_internal() {
    let mock = MockUpstream::start(Vendor::Dify, KEY);
    let dify = Dify::init(&InitContext::default(), checks::settings(&mock, json!({}))).unwrap();
    let mut upload = Upload::new(b"abc", "a.txt", "text/plain", json!({}));
    upload.request.size = 4;
    expect_error(dify.put(upload.request.clone()), ErrorKind::Internal, None);
    upload.request.path = "/nonexistent/spool".into();
    expect_error(dify.put(upload.request), ErrorKind::Internal, None);
    assert!(mock.received().is_empty());
}

//! The maiagent provider against the maiagent mock.

use serde_json::json;
use upgate_e2e::mock::checks::{self, Upload, expect_error};
use upgate_e2e::mock::{MockUpstream, Vendor};
use upgate_plugin_api::{DeleteRequest, ErrorKind, InitContext, Provider};
use upgate_plugin_maiagent::Maiagent;

const KEY: &str = "mai-key-123456";

#[test]
fn put_round_trips_a_cjk_filename_and_the_bytes() {
    let mock = MockUpstream::start(Vendor::Maiagent, KEY);
    let maiagent = Maiagent::init(&InitContext::default(), checks::settings(&mock, json!({}))).unwrap();
    let name = "32d91c61-79b3-40e1-b47d-e35d6d30861文件.xls";
    // A few MiB, so the body crosses many buffer windows on both sides.
    let bytes: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let upload = Upload::new(&bytes, name, "application/vnd.ms-excel", json!({}));

    let result = maiagent.put(upload.request.clone()).unwrap();

    let request = &mock.received()[0];
    assert_eq!(request.path, "/api/v1/attachments-upload/");
    assert_eq!(
        request.header("authorization"),
        Some(format!("Api-Key {KEY}").as_str())
    );
    let file = request.file().unwrap();
    assert_eq!(file.field, "file");
    assert_eq!(file.filename, name.as_bytes());
    assert_eq!(file.filename_raw, name.as_bytes());
    assert_eq!(
        (file.size, file.sha256.as_str()),
        (bytes.len() as u64, upload.sha256())
    );
    assert_eq!(request.status, 201);
    assert_eq!(result.raw["filename"], json!(name));
    assert_eq!(result.raw["type"], json!("document"));
    let stored = &mock.stored()[0];
    assert_eq!(result.remote_id, stored.id);
    assert_eq!(result.url.as_deref(), Some(stored.url.as_str()));
}

#[test]
fn failures_map_to_error_kinds() {
    let mock = MockUpstream::start(Vendor::Maiagent, KEY);
    checks::check_failure_mapping::<Maiagent>(&mock, json!({}), json!({}));
}

#[test]
fn no_extra_settings_and_no_delete() {
    let mock = MockUpstream::start(Vendor::Maiagent, KEY);
    let error = Maiagent::init(
        &InitContext::default(),
        checks::settings(&mock, json!({"user": "x"})),
    )
    .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Config);
    let maiagent = Maiagent::init(&InitContext::default(), checks::settings(&mock, json!({}))).unwrap();
    let error = expect_error(
        maiagent.delete(DeleteRequest {
            upload_id: "u".into(),
            remote_id: "r".into(),
            metadata: Default::default(),
            dialect: "dify".into(),
        }),
        ErrorKind::Rejected,
        None,
    );
    assert_eq!(error.message, "maiagent has no delete API");
}

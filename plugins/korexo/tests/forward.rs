//! The korexo provider against the korexo mock: uploads and deletes.

use serde_json::json;
use upgate_e2e::mock::checks::{self, Upload, expect_error};
use upgate_e2e::mock::{MockUpstream, Vendor};
use upgate_plugin_api::{DeleteRequest, ErrorKind, InitContext, Provider};
use upgate_plugin_korexo::Korexo;

const KEY: &str = "xo-key-1234567";

fn settings(mock: &MockUpstream) -> serde_json::Value {
    checks::settings(mock, json!({"app_id": "st-app-1", "env_name": "draft"}))
}

#[test]
fn put_then_delete() {
    let mock = MockUpstream::start(Vendor::Korexo, KEY);
    let korexo = Korexo::init(&InitContext::default(), settings(&mock)).unwrap();
    let upload = Upload::new(
        b"%PDF-1.7 tiny",
        "myfile.pdf",
        "application/pdf",
        json!({"userReference": "s-42"}),
    );

    let result = korexo.put(upload.request.clone()).unwrap();

    let request = &mock.received()[0];
    assert_eq!(
        request.path,
        "/api/v2/apps/st-app-1/environments/draft/attachments/upload"
    );
    assert_eq!(request.header("x-api-key"), Some(KEY));
    assert_eq!(request.field("userReference"), Some("s-42"));
    assert_eq!(request.field("uploadType"), Some("runtime"));
    let file = request.file().unwrap();
    assert_eq!(
        (file.field.as_str(), file.sha256.as_str()),
        ("file", upload.sha256())
    );
    assert!(result.remote_id.starts_with("f-"), "{}", result.remote_id);
    assert_eq!(
        result.url,
        Some(format!("AppFileSystem/{}.pdf", result.remote_id))
    );
    assert_eq!(result.raw["mimeType"], json!("application/pdf"));

    let delete = DeleteRequest {
        upload_id: upload.request.upload_id.clone(),
        remote_id: result.remote_id.clone(),
        metadata: Default::default(),
        dialect: "korexo".into(),
    };
    korexo.delete(delete.clone()).unwrap();
    let request = mock.received().pop().unwrap();
    assert_eq!(request.method, "DELETE");
    assert_eq!(
        request.path,
        format!(
            "/api/v2/apps/st-app-1/environments/draft/attachments/{}",
            result.remote_id
        )
    );
    assert!(mock.stored().is_empty());
    expect_error(korexo.delete(delete), ErrorKind::NotFound, Some(404));

    let bad = DeleteRequest {
        upload_id: "u".into(),
        remote_id: "../../x".into(),
        metadata: Default::default(),
        dialect: "korexo".into(),
    };
    expect_error(korexo.delete(bad), ErrorKind::Rejected, None);
}

#[test]
fn metadata_routes_the_upload_when_valid() {
    let mock = MockUpstream::start(Vendor::Korexo, KEY);
    let settings = checks::settings(
        &mock,
        json!({"app_id": "st-app-1", "env_name": "draft",
               "allowed_app_ids": ["st-other"], "allowed_env_names": ["published"]}),
    );
    let korexo = Korexo::init(&InitContext::default(), settings).unwrap();
    let routed = json!({"appId": "st-other", "envName": "published"});
    let upload = Upload::new(b"a", "a.txt", "text/plain", routed.clone()).in_dialect("korexo");
    let put = korexo.put(upload.request.clone()).unwrap();
    let invalid = json!({"appId": "../admin", "envName": "a/b"});
    korexo
        .put(
            Upload::new(b"b", "b.txt", "text/plain", invalid)
                .in_dialect("korexo")
                .request,
        )
        .unwrap();
    // The same keys from another dialect's client (tus metadata) choose nothing.
    korexo
        .put(
            Upload::new(b"c", "c.txt", "text/plain", routed)
                .in_dialect("tus")
                .request,
        )
        .unwrap();
    let received = mock.received();
    assert_eq!(
        received[0].path,
        "/api/v2/apps/st-other/environments/published/attachments/upload"
    );
    assert_eq!(received[0].field("userReference"), Some("upgate"));
    assert_eq!(
        received[1].path,
        "/api/v2/apps/st-app-1/environments/draft/attachments/upload"
    );
    assert_eq!(
        received[2].path,
        "/api/v2/apps/st-app-1/environments/draft/attachments/upload"
    );
    // Deleting finds the upload where it was put.
    let delete = DeleteRequest {
        upload_id: upload.request.upload_id.clone(),
        remote_id: put.remote_id.clone(),
        metadata: upload.request.metadata.clone(),
        dialect: "korexo".into(),
    };
    korexo.delete(delete).unwrap();
    let request = mock.received().pop().unwrap();
    assert_eq!(
        request.path,
        format!(
            "/api/v2/apps/st-other/environments/published/attachments/{}",
            put.remote_id
        )
    );
    assert_eq!(request.status, 200);
}

#[test]
fn failures_map_to_error_kinds() {
    let mock = MockUpstream::start(Vendor::Korexo, KEY);
    checks::check_failure_mapping::<Korexo>(&mock, json!({"app_id": "a", "env_name": "e"}), json!({}));
}

#[test]
fn app_and_environment_are_required_and_checked() {
    let mock = MockUpstream::start(Vendor::Korexo, KEY);
    for bad in [
        json!({"app_id": "a"}),
        json!({"env_name": "e"}),
        json!({"app_id": "a/b", "env_name": "e"}),
    ] {
        let error = Korexo::init(&InitContext::default(), checks::settings(&mock, bad)).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Config, "{error:?}");
    }
    let settings = checks::settings(
        &mock,
        json!({"app_id": "a", "env_name": "..", "user_reference": "me"}),
    );
    assert_eq!(
        Korexo::init(&InitContext::default(), settings).unwrap_err().kind,
        ErrorKind::Config
    );
}

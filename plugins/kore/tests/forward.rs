//! The kore provider against the kore mock: single uploads and chunked sessions.

use serde_json::json;
use upgate_e2e::mock::checks::{self, Upload, expect_error};
use upgate_e2e::mock::{ChunkInfo, MockUpstream, Vendor};
use upgate_plugin_api::{DeleteRequest, ErrorKind, InitContext, Provider};
use upgate_plugin_kore::Kore;

const KEY: &str = "kore-key-123456";

fn bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 256) as u8).collect()
}

#[test]
fn small_files_go_in_one_request() {
    let mock = MockUpstream::start(Vendor::Kore, KEY);
    let kore = Kore::init(
        &InitContext::default(),
        checks::settings(&mock, json!({"file_context": "agentFiles"})),
    )
    .unwrap();
    let data = bytes(5000);
    let upload = Upload::new(
        &data,
        "voice.mp3",
        "audio/mpeg",
        json!({"fileContext": "bulkImport"}),
    );

    let result = kore.put(upload.request.clone()).unwrap();

    let request = &mock.received()[0];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("POST", "/api/public/files")
    );
    assert_eq!(request.header("x-api-key"), Some(KEY));
    assert_eq!(request.field("fileContext"), Some("bulkImport"));
    let file = request.file().unwrap();
    assert_eq!(
        (file.field.as_str(), file.filename.as_slice()),
        ("file", "voice.mp3".as_bytes())
    );
    assert_eq!((file.size, file.sha256.as_str()), (5000, upload.sha256()));
    assert_eq!(result.remote_id.len(), 24);
    assert!(result.remote_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(result.url.as_deref(), Some(mock.stored()[0].url.as_str()));

    // Without metadata: the configured context.
    kore.put(Upload::new(b"x", "a.png", "image/png", json!({})).request)
        .unwrap();
    assert_eq!(mock.received()[1].field("fileContext"), Some("agentFiles"));
}

#[test]
fn large_files_go_in_a_chunked_session() {
    let mock = MockUpstream::start(Vendor::Kore, KEY);
    let kore = Kore::init(
        &InitContext::default(),
        checks::settings(&mock, json!({"single_upload_limit": "1KB", "chunk_size": 400})),
    )
    .unwrap();
    let data = bytes(1100);
    let upload = Upload::new(&data, "clip.mp4", "video/mp4", json!({}));

    let result = kore.put(upload.request.clone()).unwrap();

    let received = mock.received();
    let paths: Vec<&str> = received.iter().map(|r| r.path.as_str()).collect();
    let session = received[0].json.as_ref().unwrap();
    assert_eq!(
        session,
        &json!({"fileContext": "bulkImport", "totalChunks": 3, "fileExtension": "mp4",
                "fileName": "clip.mp4", "fileSize": 1100})
    );
    let session_id = received[1].chunk.as_ref().unwrap().session_id.clone();
    assert_eq!(paths[0], "/api/public/files/session/start");
    assert!(
        paths[1..4]
            .iter()
            .all(|p| *p == format!("/api/public/files/session/{session_id}"))
    );
    assert_eq!(
        paths[4],
        format!("/api/public/files/session/{session_id}/complete")
    );
    for (number, request) in received[1..4].iter().enumerate() {
        assert_eq!(
            request.chunk,
            Some(ChunkInfo {
                session_id: session_id.clone(),
                chunk_number: number as u64
            })
        );
        assert_eq!(request.field("chunkNumber"), Some(number.to_string().as_str()));
        let file = request.file().unwrap();
        let expected = &data[number * 400..(number * 400 + 400).min(1100)];
        assert_eq!(file.sha256, upgate_e2e::mock::sha256_hex(expected));
    }
    assert!(
        received
            .iter()
            .all(|r| r.header("x-api-key") == Some(KEY) && r.status == 200)
    );

    let stored = &mock.stored()[0];
    assert_eq!((stored.sha256.as_str(), stored.size), (upload.sha256(), 1100));
    assert_eq!(result.remote_id, stored.id);
    assert_eq!(mock.open_sessions(), 0);
}

#[test]
fn a_failing_session_step_fails_the_put() {
    let mock = MockUpstream::start(Vendor::Kore, KEY);
    let kore = Kore::init(
        &InitContext::default(),
        checks::settings(&mock, json!({"single_upload_limit": 10, "chunk_size": 4})),
    )
    .unwrap();
    let upload = Upload::new(&bytes(11), "a.wav", "audio/wav", json!({}));
    mock.fail_next(1, 503);
    let error = expect_error(
        kore.put(upload.request.clone()),
        ErrorKind::Unavailable,
        Some(503),
    );
    assert!(error.message.contains("session start"), "{error:?}");
    mock.rate_limit_next(1, 3);
    let error = expect_error(
        kore.put(upload.request.clone()),
        ErrorKind::Unavailable,
        Some(429),
    );
    assert_eq!(error.retry_after_secs, Some(3));
    kore.put(upload.request).unwrap();
}

/// One chunk refused once (a 503) is sent again, not the whole file; a session gone upstream
/// (404) is worth a new one (Unavailable: the host starts over), not a failure for good.
#[test]
fn a_chunk_refused_once_is_sent_again_and_a_lost_session_is_retryable() {
    let mock = MockUpstream::start(Vendor::Kore, KEY);
    let kore = Kore::init(
        &InitContext::default(),
        checks::settings(&mock, json!({"single_upload_limit": 10, "chunk_size": 4})),
    )
    .unwrap();
    let data = bytes(11);
    let upload = Upload::new(&data, "a.wav", "audio/wav", json!({}));
    // The session start and chunk 0 pass, chunk 1 is refused once.
    mock.fail_after(2, 1, 503);
    let result = kore.put(upload.request.clone()).unwrap();
    let statuses: Vec<u16> = mock.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 200, 503, 200, 200, 200], "{statuses:?}");
    let stored = &mock.stored()[0];
    assert_eq!((stored.sha256.as_str(), stored.size), (upload.sha256(), 11));
    assert_eq!(result.remote_id, stored.id);

    mock.clear_received();
    mock.fail_after(1, 1, 404);
    let error = expect_error(kore.put(upload.request), ErrorKind::Unavailable, Some(404));
    assert!(error.message.contains("chunk 0"), "{error:?}");
}

#[test]
fn failures_map_to_error_kinds() {
    let mock = MockUpstream::start(Vendor::Kore, KEY);
    checks::check_failure_mapping::<Kore>(&mock, json!({}), json!({}));
}

#[test]
fn settings_and_delete() {
    let mock = MockUpstream::start(Vendor::Kore, KEY);
    for bad in [
        json!({"chunk_size": 0}),
        json!({"single_upload_limit": "lots"}),
        json!({"chunks": 1}),
    ] {
        assert_eq!(
            Kore::init(&InitContext::default(), checks::settings(&mock, bad))
                .unwrap_err()
                .kind,
            ErrorKind::Config
        );
    }
    let kore = Kore::init(&InitContext::default(), checks::settings(&mock, json!({}))).unwrap();
    let error = kore
        .delete(DeleteRequest {
            upload_id: "u".into(),
            remote_id: "r".into(),
            metadata: Default::default(),
            dialect: "dify".into(),
        })
        .unwrap_err();
    assert_eq!(
        (error.kind, error.message.as_str()),
        (ErrorKind::Rejected, "kore has no delete API")
    );
}

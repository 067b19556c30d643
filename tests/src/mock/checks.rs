//! Shared checks for the provider plugins' tests: an upload on disk as the host would hand
//! it over, settings pointing at a mock, and the failure mapping every vendor plugin must
//! get right (wrong key, 5xx, 429, hang, reset, refused connection).

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use upgate_plugin_api::{ErrorKind, InitContext, PluginError, Provider, PutRequest, PutResult};

use super::{MockUpstream, sha256_hex, wrong_key_reason};

/// A spooled upload: the file and the request naming it.
pub struct Upload {
    pub file: tempfile::NamedTempFile,
    pub request: PutRequest,
}

impl Upload {
    /// Writes `bytes` to a temporary file and describes it. `metadata` is a JSON object.
    pub fn new(bytes: &[u8], filename: &str, mime_type: &str, metadata: Value) -> Upload {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(bytes).expect("write upload");
        file.flush().expect("flush upload");
        let extension = match filename.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => ext.to_ascii_lowercase(),
            _ => String::new(),
        };
        let metadata = match metadata {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => panic!("metadata must be an object, not {other}"),
        };
        let request = PutRequest {
            upload_id: uuid::Uuid::new_v4().to_string(),
            filename: filename.to_owned(),
            extension,
            mime_type: mime_type.to_owned(),
            size: bytes.len() as u64,
            sha256: sha256_hex(bytes),
            path: file.path().to_string_lossy().into_owned(),
            tenant: "tenant-a".to_owned(),
            dialect: "dify".to_owned(),
            metadata,
            deadline_ms: None,
        };
        Upload { file, request }
    }

    /// The same upload as if it came through `dialect` (`dify` by default).
    pub fn in_dialect(mut self, dialect: &str) -> Upload {
        self.request.dialect = dialect.to_owned();
        self
    }

    pub fn sha256(&self) -> &str {
        &self.request.sha256
    }
}

/// Settings for a provider aimed at `mock`: its base URL and key, 1 s timeouts, plus `extra`.
pub fn settings(mock: &MockUpstream, extra: Value) -> Value {
    let mut settings = json!({
        "base_url": mock.base_url(),
        "api_key": mock.api_key(),
        "connect_timeout": "1s",
        "timeout": "1s",
    });
    if let (Some(map), Value::Object(extra)) = (settings.as_object_mut(), extra) {
        map.extend(extra);
    }
    settings
}

/// Asserts that `result` failed with `kind` (and `status`, when given); returns the error.
#[track_caller]
pub fn expect_error<T: std::fmt::Debug>(
    result: Result<T, PluginError>,
    kind: ErrorKind,
    status: Option<u16>,
) -> PluginError {
    let error = result.expect_err("expected an error");
    assert_eq!(error.kind, kind, "{error:?}");
    if status.is_some() {
        assert_eq!(error.status, status, "{error:?}");
    }
    error
}

/// Runs one put through a fresh instance of `P` built from `settings`.
pub fn put_with<P: Provider>(settings: Value, upload: &Upload) -> Result<PutResult, PluginError> {
    P::init(&InitContext::default(), settings)?.put(upload.request.clone())
}

/// The failure mapping every vendor plugin shares, against `mock` (which must answer a
/// plain upload of a small file with `extra` settings and `metadata` successfully):
/// wrong key → `Rejected` 401 with the vendor's reason and without the key; 500 →
/// `Unavailable`; 429 → `Unavailable` with `retry_after_secs`; an answer later than
/// `timeout` → `Timeout`; a reset → `Unavailable`; nobody listening → `Unavailable`; and a
/// put succeeds once the faults are over.
pub fn check_failure_mapping<P: Provider>(mock: &MockUpstream, extra: Value, metadata: Value) {
    let upload = Upload::new(b"failure mapping", "notes.txt", "text/plain", metadata);
    let provider = P::init(&InitContext::default(), settings(mock, extra.clone())).expect("init");

    let mut wrong = settings(mock, extra.clone());
    wrong["api_key"] = json!("wrong-key-0123456789");
    let error = expect_error(put_with::<P>(wrong, &upload), ErrorKind::Rejected, Some(401));
    assert!(
        error.message.contains(wrong_key_reason(mock.vendor())),
        "{error:?}"
    );
    assert!(!error.message.contains("wrong-key-0123456789"), "{error:?}");

    mock.fail_next(1, 500);
    expect_error(
        provider.put(upload.request.clone()),
        ErrorKind::Unavailable,
        Some(500),
    );
    mock.fail_next(1, 502);
    expect_error(
        provider.put(upload.request.clone()),
        ErrorKind::Unavailable,
        Some(502),
    );

    mock.rate_limit_next(1, 7);
    let error = expect_error(
        provider.put(upload.request.clone()),
        ErrorKind::Unavailable,
        Some(429),
    );
    assert_eq!(error.retry_after_secs, Some(7), "{error:?}");

    mock.reset_next(1);
    expect_error(provider.put(upload.request.clone()), ErrorKind::Unavailable, None);

    mock.hang(Duration::from_millis(1500));
    let started = Instant::now();
    expect_error(provider.put(upload.request.clone()), ErrorKind::Timeout, None);
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "timeout took {:?}",
        started.elapsed()
    );
    mock.hang(Duration::ZERO);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let mut nowhere = settings(mock, extra);
    nowhere["base_url"] = json!(format!("http://127.0.0.1:{port}"));
    expect_error(put_with::<P>(nowhere, &upload), ErrorKind::Unavailable, None);

    let stored_before = mock.stored().len();
    provider
        .put(upload.request.clone())
        .expect("put after the faults");
    assert_eq!(mock.stored().len(), stored_before + 1);
    provider.health().expect("health");
}

//! What the vendor provider plugins (dify, kore, maiagent, korexo, beam) share.
//!
//! A stored upload flows from the host into a plugin's `put` as a [`PutRequest`] (metadata
//! plus the path of the spooled file); the plugin describes the vendor's request with the
//! pieces here and gets back the vendor's JSON answer or a [`PluginError`] of the right kind:
//!
//! - [`UpstreamSettings`]: `base_url`, `api_key`, `connect_timeout`, `timeout`, `ca_file`,
//!   plus typed access to each plugin's own keys; unknown keys are refused.
//! - [`Upstream`]: a pooled blocking HTTP client (ureq, rustls, Mozilla roots plus an
//!   optional private CA) that adds the vendor's auth header and makes exactly one attempt
//!   per call; retries are the host's business.
//! - [`Multipart`]: a streaming `multipart/form-data` body with an exact `Content-Length`,
//!   whose file part (a whole file or a byte range) is read from disk as it is sent.
//! - [`StreamedMultipart`] and [`Content`]: the same form for an upload still arriving
//!   (`put_stream`), sent chunked, its text fields after the file part once the final
//!   metadata is known; [`Upstream::post_upload`] sends either.
//! - [`classify`]: 2xx → JSON; 429/5xx → `Unavailable` (with `Retry-After`); 404 →
//!   `NotFound`; other 4xx → `Rejected` with the vendor's reason. Transport timeouts are
//!   `Timeout`, connection failures `Unavailable`. The API key never appears in a message.
#![forbid(unsafe_code)]

mod client;
mod multipart;
mod response;
pub mod s3;
mod scope;
mod settings;

pub use client::{Auth, Upstream};
pub use multipart::{FileRange, LateFields, Metadata, Multipart, MultipartBody, StreamedMultipart};
pub use response::{
    MAX_REASON_CHARS, Reply, classify, extract_reason, json_str, parse_retry_after, sanitize,
};
pub use scope::AllowedScope;
pub use settings::{COMMON_KEYS, UpstreamSettings};

use upgate_plugin_api::{Body, ErrorKind, PluginError, PutRequest, StreamRequest};

/// Where an upload's bytes come from, for a plugin whose `put` and `put_stream` share one
/// code path ([`Upstream::post_upload`]).
pub enum Content<'a, 'h> {
    /// The complete spooled file (`put`).
    Spooled(&'a PutRequest),
    /// The upload as it arrives (`put_stream`).
    Arriving(&'a StreamRequest, &'a mut Body<'h>),
}

impl Content<'_, '_> {
    /// The metadata known when the call starts (for a streamed upload, what the client sent
    /// before the file part; the rest reaches the fields of [`Upstream::post_upload`]).
    pub fn metadata(&self) -> &Metadata {
        match self {
            Content::Spooled(request) => &request.metadata,
            Content::Arriving(request, _) => &request.metadata,
        }
    }

    /// The inbound dialect the upload came through: whose metadata keys mean what (a tus
    /// client's `Upload-Metadata` may hold any key).
    pub fn dialect(&self) -> &str {
        match self {
            Content::Spooled(request) => &request.dialect,
            Content::Arriving(request, _) => &request.dialect,
        }
    }
}

/// A non-blank string value of a metadata map.
pub fn metadata_value<'a>(
    metadata: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Option<&'a str> {
    metadata
        .get(key)
        .and_then(|value| value.as_str())
        .filter(|text| !text.trim().is_empty())
}

/// A form with the upload as its file part under `field` (filename and content type from
/// the request). Checks that the spooled file has the size the host recorded.
pub fn upload_form(request: &PutRequest, field: &str) -> Result<Multipart, PluginError> {
    let range = upload_range(request)?;
    Ok(Multipart::new().file(field, &request.filename, &request.mime_type, range))
}

/// The whole spooled file of `request`, checked against `request.size`.
pub fn upload_range(request: &PutRequest) -> Result<FileRange, PluginError> {
    let range = FileRange::whole(&request.path).map_err(|error| {
        PluginError::new(
            ErrorKind::Internal,
            format!("cannot read the spooled upload {}: {error}", request.path),
        )
    })?;
    if range.len != request.size {
        return Err(PluginError::new(
            ErrorKind::Internal,
            format!(
                "spooled upload {} has {} bytes, expected {}",
                request.path, range.len, request.size
            ),
        ));
    }
    Ok(range)
}

/// What `delete` answers for a vendor without a documented delete API (the host treats it
/// as "not supported").
pub fn no_delete_api(vendor: &str) -> PluginError {
    PluginError::new(ErrorKind::Rejected, format!("{vendor} has no delete API"))
}

/// A value safe to put in a URL path segment: `[A-Za-z0-9._-]+`, not `.` or `..`.
pub fn is_path_segment(text: &str) -> bool {
    !text.is_empty()
        && text != "."
        && text != ".."
        && text.len() <= 200
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

/// A hyphenated UUID (`1a2036c0-d533-4636-8f51-2a811763ef5c`).
pub fn is_uuid(text: &str) -> bool {
    text.len() == 36 && uuid::Uuid::try_parse(text).is_ok()
}

/// A value that can be sent as an HTTP header value as is (visible ASCII and spaces).
pub fn is_header_value(text: &str) -> bool {
    !text.is_empty() && text.len() <= 1024 && text.bytes().all(|byte| (0x20..0x7f).contains(&byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validators() {
        assert!(is_path_segment("f-a84242a9-9d9f-4590-8622-59cd93c7f7c3"));
        assert!(is_path_segment("dev.env_1"));
        for bad in ["", ".", "..", "a/b", "a?b", "a b", "a%2F", "é"] {
            assert!(!is_path_segment(bad), "{bad}");
        }
        assert!(is_uuid("1a2036c0-d533-4636-8f51-2a811763ef5c"));
        assert!(!is_uuid("1a2036c0d5334636 8f512a811763ef5c"));
        assert!(!is_uuid("1a2036c0d53346368f512a811763ef5c"));
        assert!(is_header_value("ws 1"));
        assert!(!is_header_value("a\r\nb"));
    }
}

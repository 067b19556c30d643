//! Dialects: the edges where each vendor's API meets upgate's neutral upload model.
//!
//! What flows through here: HTTP requests on each vendor's paths. A dialect knows where its
//! clients put their key, what its upload form looks like and how its success and error
//! bodies are shaped; everything else (policy, intake, store, forwarding) is the shared
//! [`crate::gateway::Gateway`]. Adding a dialect is one module: routes, a [`Dialect`] impl
//! and its renderers.

pub mod beam;
pub mod dify;
pub mod kore;
pub mod korexo;
pub mod maiagent;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, web};
use serde_json::Value;

use crate::error::ApiError;

/// The dialects upgate speaks, a bounded set (also used as a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DialectName {
    Dify,
    Kore,
    Maiagent,
    Korexo,
    Beam,
}

impl DialectName {
    pub const ALL: [DialectName; 5] = [Self::Dify, Self::Kore, Self::Maiagent, Self::Korexo, Self::Beam];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dify => "dify",
            Self::Kore => "kore",
            Self::Maiagent => "maiagent",
            Self::Korexo => "korexo",
            Self::Beam => "beam",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|dialect| dialect.as_str() == text)
    }

    /// A new upload id in the vendor's own format. Ids are time-ordered (UUIDv7; for Kore a
    /// MongoDB ObjectId-like 4-byte seconds timestamp and 8 random bytes), so new records
    /// land at the end of the uploads table's primary key: a commit of many uploads then
    /// rewrites a page or two, not one random page per upload.
    pub fn new_upload_id(self) -> String {
        match self {
            Self::Kore => {
                let seconds = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_secs() as u32);
                let random = uuid::Uuid::new_v4();
                let mut id = [0u8; 12];
                id[..4].copy_from_slice(&seconds.to_be_bytes());
                id[4..].copy_from_slice(&random.as_bytes()[..8]);
                hex::encode(id)
            }
            Self::Korexo => format!("f-{}", uuid::Uuid::now_v7()),
            Self::Dify | Self::Maiagent | Self::Beam => uuid::Uuid::now_v7().to_string(),
        }
    }

    /// Checks that a client-supplied id has this dialect's id format before any lookup.
    pub fn is_valid_upload_id(self, id: &str) -> bool {
        match self {
            Self::Kore => {
                id.len() == 24
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            }
            Self::Korexo => id.strip_prefix("f-").is_some_and(is_uuid),
            Self::Dify | Self::Maiagent | Self::Beam => is_uuid(id),
        }
    }
}

/// True for a canonical lower-case hyphenated uuid.
pub fn is_uuid(text: &str) -> bool {
    text.len() == 36 && uuid::Uuid::parse_str(text).is_ok_and(|uuid| uuid.hyphenated().to_string() == text)
}

/// What each dialect provides to the shared flow.
pub trait Dialect: Send + Sync {
    fn name(&self) -> DialectName;
    /// The API key from the request, or why there is none.
    fn credentials(&self, request: &HttpRequest) -> Result<String, ApiError>;
    /// The `WWW-Authenticate` challenge sent with 401s, if the vendor sends one.
    fn www_authenticate(&self) -> Option<&'static str> {
        None
    }
    /// The body of an error response, in the vendor's shape.
    fn error_body(&self, error: &ApiError, status: StatusCode) -> Value;
}

/// The dialect object for a name.
pub fn get(name: DialectName) -> &'static dyn Dialect {
    match name {
        DialectName::Dify => &dify::Dify,
        DialectName::Kore => &kore::Kore,
        DialectName::Maiagent => &maiagent::Maiagent,
        DialectName::Korexo => &korexo::Korexo,
        DialectName::Beam => &beam::Beam,
    }
}

/// Registers every dialect's routes.
pub fn configure(config: &mut web::ServiceConfig) {
    dify::routes(config);
    kore::routes(config);
    maiagent::routes(config);
    korexo::routes(config);
    beam::routes(config);
}

/// Which dialect a request path belongs to (for metrics and logs of requests that never
/// reached a handler).
pub fn of_path(path: &str) -> Option<DialectName> {
    if path.starts_with("/v1/files/") || path.starts_with("/files/") {
        Some(DialectName::Dify)
    } else if path.starts_with("/api/public/files") {
        Some(DialectName::Kore)
    } else if path.starts_with("/api/v1/attachments-upload") {
        Some(DialectName::Maiagent)
    } else if path.starts_with("/api/v2/apps/") {
        Some(DialectName::Korexo)
    } else if path.starts_with("/agent-setup/") {
        Some(DialectName::Beam)
    } else {
        None
    }
}

/// The value of a key header (`X-api-key` and friends): present, non-empty, visible ASCII.
pub fn header_key(request: &HttpRequest, name: &str) -> Result<String, ApiError> {
    let value = request.headers().get(name).ok_or(ApiError::MissingCredentials)?;
    let text = value.to_str().map_err(|_| ApiError::MalformedCredentials)?.trim();
    if text.is_empty() {
        return Err(ApiError::MissingCredentials);
    }
    Ok(text.to_owned())
}

/// The credential after `scheme` in `Authorization: <scheme> <key>` (scheme compared
/// case-insensitively).
pub fn authorization_key(request: &HttpRequest, scheme: &str) -> Result<String, ApiError> {
    let value = request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or(ApiError::MissingCredentials)?;
    let text = value.to_str().map_err(|_| ApiError::MalformedCredentials)?.trim();
    let (given_scheme, key) = text.split_once(' ').ok_or(ApiError::MalformedCredentials)?;
    let key = key.trim();
    if !given_scheme.eq_ignore_ascii_case(scheme) || key.is_empty() {
        return Err(ApiError::MalformedCredentials);
    }
    Ok(key.to_owned())
}

/// Seconds in a human sentence, for messages that say when to retry.
pub fn seconds(n: u64) -> String {
    if n == 1 {
        "1 second".into()
    } else {
        format!("{n} seconds")
    }
}

/// A plan limit in words, e.g. "15MiB".
pub fn limit_text(limit: u64) -> String {
    crate::config::ByteSize(limit).to_string()
}

/// A plain-words message for errors every dialect renders the same way apart from its body
/// shape (the dialects add their own codes around it).
pub fn plain_message(error: &ApiError) -> String {
    match error {
        ApiError::MissingCredentials => "API key missing.".into(),
        ApiError::MalformedCredentials => "API key header malformed.".into(),
        ApiError::InvalidCredentials => "Invalid API key.".into(),
        ApiError::DialectNotAllowed => "This API key may not use this API.".into(),
        ApiError::NoFile => "No file uploaded.".into(),
        ApiError::TooManyFiles { max } => format!("Too many files: at most {max} per request."),
        ApiError::EmptyFilename => "The filename is empty.".into(),
        ApiError::InvalidFilename(reason) => format!("Invalid filename: {reason}."),
        ApiError::MissingField(field) => format!("{field} is required."),
        ApiError::InvalidField { field, message } => format!("{field}: {message}"),
        ApiError::Malformed(reason) => format!("Malformed request: {reason}."),
        ApiError::UnsupportedType { extension } if extension.is_empty() => {
            "File type not allowed: the file has no extension.".into()
        }
        ApiError::UnsupportedType { extension } => format!("File type not allowed: .{extension}."),
        ApiError::ContentMismatch(reason) => format!("File type not allowed: {reason}."),
        ApiError::TooLarge { limit } => format!("File too large: the limit is {}.", limit_text(*limit)),
        ApiError::Throttled { retry_after_secs, .. } => {
            format!("Too many requests. Retry after {}.", seconds(*retry_after_secs))
        }
        ApiError::NotFound => "Not found.".into(),
        ApiError::NoSuchEndpoint => "No such endpoint.".into(),
        ApiError::SessionExpired => "The upload session has expired.".into(),
        ApiError::MissingChunks(missing) => format!(
            "Chunks missing: {}.",
            missing.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        ),
        ApiError::UpstreamRejected { reason, .. } => {
            format!("The upstream provider refused the file: {reason}")
        }
        ApiError::UpstreamFailed(_) => "The upstream provider failed; the file was not delivered.".into(),
        ApiError::UpstreamTimeout => "The upstream provider did not answer in time.".into(),
        ApiError::BodyTimeout => "The request body stalled; the upload was dropped.".into(),
        ApiError::InsufficientStorage => "Not enough storage space on the gateway.".into(),
        ApiError::Internal => "Internal error.".into(),
    }
}

/// `{"errors": [{"msg", "code"}]}`, the error body of kore and korexo (code = HTTP status).
pub fn errors_body(message: String, status: StatusCode) -> Value {
    serde_json::json!({ "errors": [{ "msg": message, "code": status.as_u16() }] })
}

/// An epoch-milliseconds time as ISO 8601 UTC with milliseconds (`2025-04-23T12:05:45.782Z`).
pub fn iso_millis(epoch_ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(epoch_ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// The URL a dialect returns for an upload: the provider's URL once delivered; before that
/// (async delivery, or a provider that gives none) `upgate://uploads/<id>`, which names the
/// upload in upgate and is never null, so clients that require a URL keep working.
pub fn file_url(record: &crate::store::UploadRecord) -> String {
    record
        .remote_url
        .clone()
        .unwrap_or_else(|| format!("upgate://uploads/{}", record.id))
}

/// A stable uuid derived from `text`, for vendor fields that are uuids of things upgate does
/// not have (users, tenants).
pub fn derived_uuid(text: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_each_vendor_format() {
        for dialect in DialectName::ALL {
            let id = dialect.new_upload_id();
            assert!(dialect.is_valid_upload_id(&id), "{dialect:?} {id}");
        }
        assert_eq!(DialectName::Kore.new_upload_id().len(), 24);
        assert!(DialectName::Korexo.new_upload_id().starts_with("f-"));
        assert!(!DialectName::Korexo.is_valid_upload_id("f-../../etc"));
        assert!(!DialectName::Dify.is_valid_upload_id("A1B2C3D4-5678-90AB-CDEF-1234567890AB"));
        assert!(!DialectName::Kore.is_valid_upload_id("zz0000000000000000000000"));
    }

    #[test]
    fn ids_are_time_ordered_and_distinct() {
        for dialect in DialectName::ALL {
            let first = dialect.new_upload_id();
            // Kore's timestamp counts seconds: compare across one.
            let pause = if dialect == DialectName::Kore { 1001 } else { 2 };
            std::thread::sleep(std::time::Duration::from_millis(pause));
            let later: Vec<String> = (0..1000).map(|_| dialect.new_upload_id()).collect();
            assert!(later.iter().all(|id| *id > first), "{dialect:?}");
            let distinct: std::collections::HashSet<&String> = later.iter().collect();
            assert_eq!(distinct.len(), later.len(), "{dialect:?}");
        }
    }
}

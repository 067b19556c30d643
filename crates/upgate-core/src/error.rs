//! The neutral API error: every failure the upload flow can report to a client.
//!
//! What flows through here: an [`ApiError`] from any step (admission, intake, record,
//! delivery), dialect-neutral. Each variant has one [`Class`], and both its HTTP status and
//! its rejection label derive from that class, so the two can never disagree. The HTTP
//! edge (`http::respond`) turns an `ApiError` into a response in the client's dialect;
//! module errors below (store, limits, spool, plugins, content) become an `ApiError` through
//! the `From` impls here, each logging what the client is not told (a refusal by a limit is
//! no failure: nothing to log; an unreachable Redis is logged by the limiter).

use std::time::Duration;

use actix_web::http::StatusCode;
use upgate_plugin_api::{ErrorKind, PluginError};

use crate::content::ContentError;
use crate::limits::LimitError;
use crate::store::StoreError;

/// Why a request was throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// Per-key request rate.
    Rate,
    /// Too many uploads in progress (tenant or daemon).
    Concurrency,
    /// Daily quota of the tenant's plan.
    Quota,
}

/// Everything that can go wrong for a client, independent of dialect.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("credentials missing")]
    MissingCredentials,
    #[error("credentials malformed")]
    MalformedCredentials,
    #[error("credentials invalid")]
    InvalidCredentials,
    #[error("this key may not use this API")]
    DialectNotAllowed,
    #[error("no file uploaded")]
    NoFile,
    #[error("too many files (at most {max})")]
    TooManyFiles { max: usize },
    #[error("empty filename")]
    EmptyFilename,
    #[error("invalid filename: {0}")]
    InvalidFilename(String),
    #[error("field `{0}` is required")]
    MissingField(&'static str),
    #[error("field `{field}`: {message}")]
    InvalidField { field: &'static str, message: String },
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("file type not allowed")]
    UnsupportedType { extension: String },
    #[error("content does not match the file type: {0}")]
    ContentMismatch(String),
    #[error("file too large (limit {limit} bytes)")]
    TooLarge { limit: u64 },
    #[error("too many requests, retry after {retry_after_secs} s")]
    Throttled { retry_after_secs: u64, why: Throttle },
    #[error("not found")]
    NotFound,
    /// A path under a dialect's prefix that no route of it serves.
    #[error("no such endpoint")]
    NoSuchEndpoint,
    /// A path some route serves, with another method: 405, `Allow` naming `allowed`.
    #[error("method not allowed")]
    MethodNotAllowed { allowed: Vec<String> },
    #[error("upload session expired")]
    SessionExpired,
    #[error("chunks missing: {0:?}")]
    MissingChunks(Vec<u64>),
    #[error("the upstream refused the file ({status}): {reason}")]
    UpstreamRejected { status: u16, reason: String },
    #[error("the upstream failed: {0}")]
    UpstreamFailed(String),
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("the request body stalled")]
    BodyTimeout,
    /// A request head that did not arrive within `server.header_timeout` (refused by the HTTP
    /// layer before routing).
    #[error("the request head did not arrive in time")]
    HeadTimeout,
    /// A request head larger than the HTTP layer reads (refused before routing).
    #[error("the request head is too large")]
    HeadTooLarge,
    #[error("not enough disk space")]
    InsufficientStorage,
    /// A resumable upload's request at another offset than the upload's.
    #[error("the upload is at offset {offset}")]
    OffsetMismatch { offset: u64 },
    /// Another request (on this node or another) is working on the same session or upload:
    /// 409, to be tried again in a moment.
    #[error("another request is working on this upload")]
    SessionBusy,
    /// A tus `HEAD` that would complete an upload another request is completing: 423,
    /// which tus clients retry (any other refusal of a `HEAD` makes tus-js-client start the
    /// upload over).
    #[error("another request is completing this upload")]
    UploadLocked,
    /// A resumable upload's body does not match the checksum its request gave.
    #[error("checksum mismatch")]
    ChecksumMismatch,
    /// A protocol version upgate does not speak (tus `Tus-Resumable`).
    #[error("unsupported protocol version")]
    UnsupportedVersion,
    /// A body of another media type than the protocol requires.
    #[error("wrong content type")]
    WrongContentType,
    /// A request that would change an upload that cannot change (a final concatenation).
    #[error("the upload cannot be changed")]
    ImmutableUpload,
    /// A shared engine cannot be reached (the store's database, or the limits' Redis with
    /// `fault_tolerant: false`, down or restarting): 503, retry later.
    #[error("a shared engine is unavailable, retry after {retry_after_secs} s")]
    Unavailable { retry_after_secs: u64 },
    /// Every delivery slot (`forward_concurrency`) stayed taken while the upload waited for
    /// one, or the daemon is stopping: 503, retry later. Not the upstream's doing.
    #[error("every delivery slot is taken, retry after {retry_after_secs} s")]
    DeliveryBusy { retry_after_secs: u64 },
    #[error("internal error")]
    Internal,
}

/// What a client is told to wait when the store is unavailable.
pub(crate) const STORE_RETRY_AFTER_SECS: u64 = 5;
/// What a client is told to wait when the shared limits are unavailable (`fault_tolerant:
/// false`): the limiter asks Redis again after a second, so a short outage is short.
pub(crate) const LIMITS_RETRY_AFTER_SECS: u64 = 2;
/// What a client is told to wait while the shared spool's object storage is unreachable.
pub(crate) const SPOOL_RETRY_AFTER_SECS: u64 = 5;

/// Whole seconds, rounded up, at least 1: a wait as `Retry-After` says it.
pub(crate) fn ceil_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// What kind of failure an [`ApiError`] is: the one classification both the status and the
/// `upgate_rejections_total{reason}` label come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The key is missing, malformed or unknown (401).
    Unauthenticated,
    /// The key may not use this dialect (403).
    Forbidden,
    /// The request is not well formed (400).
    Invalid,
    /// The file's type is not allowed (415).
    Extension,
    /// The file's content contradicts its type (415).
    Content,
    /// The file is larger than the plan allows (413).
    Size,
    /// A limit of the plan says not now (429).
    Throttled(Throttle),
    /// What was asked for is not there (404).
    NotFound,
    /// The session is gone (410).
    Gone,
    /// The upstream provider refused or failed.
    Upstream,
    /// The client's head or body stalled (408).
    BodyTimeout,
    /// The request head is larger than the gateway reads (431).
    HeadTooLarge,
    /// The gateway's disk is full (507).
    Storage,
    /// The gateway failed (500).
    Internal,
    /// What the gateway depends on is down for now (503).
    Unavailable,
    /// The request is at another state of the resource than the client thinks (409).
    Conflict,
    /// Another request is working on the resource; try again in a moment (423).
    Locked,
    /// The body does not match its checksum (460, tus).
    Checksum,
    /// The protocol version is not spoken (412).
    Version,
    /// The body's media type is not the one required (415).
    MediaType,
    /// The resource may not be changed (403).
    Immutable,
    /// The path is served, with other methods (405).
    MethodNotAllowed,
}

impl ApiError {
    /// The one classification of this error.
    pub fn class(&self) -> Class {
        match self {
            Self::MissingCredentials | Self::MalformedCredentials | Self::InvalidCredentials => {
                Class::Unauthenticated
            }
            Self::DialectNotAllowed => Class::Forbidden,
            Self::NoFile
            | Self::TooManyFiles { .. }
            | Self::EmptyFilename
            | Self::InvalidFilename(_)
            | Self::MissingField(_)
            | Self::InvalidField { .. }
            | Self::Malformed(_)
            | Self::MissingChunks(_) => Class::Invalid,
            Self::UnsupportedType { .. } => Class::Extension,
            Self::ContentMismatch(_) => Class::Content,
            Self::TooLarge { .. } => Class::Size,
            Self::Throttled { why, .. } => Class::Throttled(*why),
            Self::NotFound | Self::NoSuchEndpoint => Class::NotFound,
            Self::MethodNotAllowed { .. } => Class::MethodNotAllowed,
            Self::SessionExpired => Class::Gone,
            Self::UpstreamRejected { .. } | Self::UpstreamFailed(_) | Self::UpstreamTimeout => {
                Class::Upstream
            }
            Self::BodyTimeout | Self::HeadTimeout => Class::BodyTimeout,
            Self::HeadTooLarge => Class::HeadTooLarge,
            Self::InsufficientStorage => Class::Storage,
            Self::Internal => Class::Internal,
            Self::Unavailable { .. } | Self::DeliveryBusy { .. } => Class::Unavailable,
            Self::OffsetMismatch { .. } | Self::SessionBusy => Class::Conflict,
            Self::UploadLocked => Class::Locked,
            Self::ChecksumMismatch => Class::Checksum,
            Self::UnsupportedVersion => Class::Version,
            Self::WrongContentType => Class::MediaType,
            Self::ImmutableUpload => Class::Immutable,
        }
    }

    /// The reason phrase of a status HTTP does not name (tus's 460, as tusd words it).
    pub fn reason(&self) -> Option<&'static str> {
        matches!(self.class(), Class::Checksum).then_some("Checksum Mismatch")
    }

    /// The status every dialect uses unless it overrides it.
    pub fn status(&self) -> StatusCode {
        match self.class() {
            Class::Unauthenticated => StatusCode::UNAUTHORIZED,
            Class::Forbidden => StatusCode::FORBIDDEN,
            Class::Invalid => StatusCode::BAD_REQUEST,
            Class::Extension | Class::Content => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Class::Size => StatusCode::PAYLOAD_TOO_LARGE,
            Class::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            Class::NotFound => StatusCode::NOT_FOUND,
            Class::Gone => StatusCode::GONE,
            Class::Upstream => match self {
                Self::UpstreamRejected { status, .. } => StatusCode::from_u16(*status)
                    .ok()
                    .filter(|s| s.is_client_error())
                    .unwrap_or(StatusCode::BAD_GATEWAY),
                Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            },
            Class::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Class::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Class::Storage => StatusCode::INSUFFICIENT_STORAGE,
            Class::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Class::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Class::Conflict => StatusCode::CONFLICT,
            Class::Locked => StatusCode::LOCKED,
            Class::Checksum => StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST),
            Class::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Class::Version => StatusCode::PRECONDITION_FAILED,
            Class::MediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Class::Immutable => StatusCode::FORBIDDEN,
        }
    }

    /// The seconds a client should wait before trying again (`Retry-After`), for the errors
    /// that say "not now".
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::Throttled { retry_after_secs, .. }
            | Self::Unavailable { retry_after_secs }
            | Self::DeliveryBusy { retry_after_secs } => Some(*retry_after_secs),
            Self::SessionBusy | Self::UploadLocked => Some(1),
            _ => None,
        }
    }

    /// The `Allow` header of a 405: the methods the path is served with.
    pub fn allow(&self) -> Option<String> {
        match self {
            Self::MethodNotAllowed { allowed } => Some(allowed.join(", ")),
            _ => None,
        }
    }

    /// The bounded label for `upgate_rejections_total{reason}`, for policy rejections.
    pub fn rejection_reason(&self) -> Option<&'static str> {
        Some(match self.class() {
            Class::Unauthenticated | Class::Forbidden => "auth",
            Class::Size => "size",
            Class::Extension => "extension",
            Class::Content => "content",
            Class::Throttled(Throttle::Rate) => "rate",
            Class::Throttled(Throttle::Concurrency) => "concurrency",
            Class::Throttled(Throttle::Quota) => "quota",
            // A missing chunk is the client's to send, not a refusal of the upload.
            Class::Invalid if !matches!(self, Self::MissingChunks(_)) => "invalid",
            Class::Checksum | Class::Version | Class::MediaType | Class::HeadTooLarge => "invalid",
            _ => return None,
        })
    }
}

/// A store failure: logged here; a 503 with `Retry-After` for the client when the store is
/// unavailable (it comes back by itself), a 500 otherwise.
impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        if let StoreError::Unavailable(_) = error {
            tracing::warn!(%error, "store unavailable");
            return Self::Unavailable {
                retry_after_secs: STORE_RETRY_AFTER_SECS,
            };
        }
        if let StoreError::Full = error {
            tracing::error!(%error, "store failure: disk full");
            return Self::InsufficientStorage;
        }
        tracing::error!(%error, "store failure");
        Self::Internal
    }
}

/// A limit that said no: 429 with how long to wait (a rate: until the key's next request
/// would pass; a concurrency cap: a second), or, when the shared limits cannot be asked and
/// the node may not count on its own (`fault_tolerant: false`), 503 with `Retry-After`, as
/// for an unavailable store. Not logged here: the limiter logs an unreachable Redis itself,
/// at most every few seconds rather than once per request.
impl From<LimitError> for ApiError {
    fn from(error: LimitError) -> Self {
        match error {
            LimitError::Rate(wait) => Self::Throttled {
                retry_after_secs: ceil_secs(wait),
                why: Throttle::Rate,
            },
            LimitError::Busy => Self::Throttled {
                retry_after_secs: 1,
                why: Throttle::Concurrency,
            },
            LimitError::Unavailable(_) => Self::Unavailable {
                retry_after_secs: LIMITS_RETRY_AFTER_SECS,
            },
        }
    }
}

/// The gateway failing at its own spool work (files, chunks): 507 when the disk is full;
/// 503 with `Retry-After` when the shared spool's object storage cannot be reached (its
/// client reports that as a connection error, after its own retries); otherwise logged and
/// a 500.
impl From<std::io::Error> for ApiError {
    fn from(error: std::io::Error) -> Self {
        use std::io::ErrorKind as Kind;
        if error.raw_os_error() == Some(libc::ENOSPC) {
            Self::InsufficientStorage
        } else if matches!(
            error.kind(),
            Kind::NotConnected
                | Kind::ConnectionRefused
                | Kind::ConnectionReset
                | Kind::ConnectionAborted
                | Kind::TimedOut
        ) {
            tracing::warn!(%error, "spool unavailable");
            Self::Unavailable {
                retry_after_secs: SPOOL_RETRY_AFTER_SECS,
            }
        } else {
            tracing::error!(%error, "spool i/o failed");
            Self::Internal
        }
    }
}

/// A content check: the client's file contradicts its type (415), or the gateway could not
/// read its own spool file (a 500, counted as internal, never as a content rejection).
impl From<ContentError> for ApiError {
    fn from(error: ContentError) -> Self {
        match error {
            ContentError::Io(message) => {
                tracing::error!(error = %message, "cannot read a spooled file for its content check");
                Self::Internal
            }
            other => Self::ContentMismatch(other.to_string()),
        }
    }
}

/// A provider failure, as the client is told it.
impl From<&PluginError> for ApiError {
    fn from(error: &PluginError) -> Self {
        match error.kind {
            // The upstream's refusal of the file reaches the client with its status; refusals
            // of upgate's own credentials (401, 403, 407) are a gateway problem, so 502.
            ErrorKind::Rejected => Self::UpstreamRejected {
                status: error
                    .status
                    .filter(|s| (400..500).contains(s) && ![401, 403, 407, 429].contains(s))
                    .unwrap_or(502),
                reason: error.message.clone(),
            },
            ErrorKind::Timeout => Self::UpstreamTimeout,
            ErrorKind::Busy => Self::DeliveryBusy {
                retry_after_secs: error.retry_after_secs.unwrap_or(1),
            },
            _ => Self::UpstreamFailed(error.message.clone()),
        }
    }
}

/// A blocking task that panicked or was cancelled: a 500.
impl From<tokio::task::JoinError> for ApiError {
    fn from(error: tokio::task::JoinError) -> Self {
        tracing::error!(%error, "a blocking task failed");
        Self::Internal
    }
}

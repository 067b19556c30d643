//! The neutral API error and the one place it becomes an HTTP response.
//!
//! What flows through here: every failure the upload flow can report to a client, as an
//! [`ApiError`] (dialect-neutral), paired with the dialect that must render it. The status
//! code, `Retry-After` and `WWW-Authenticate` headers are decided here, once; the body shape
//! comes from the dialect ([`crate::dialects::Dialect::error_body`]).

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};

use crate::dialects::{self, DialectName};

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
    #[error("not enough disk space")]
    InsufficientStorage,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The status every dialect uses unless it overrides it.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingCredentials | Self::MalformedCredentials | Self::InvalidCredentials => {
                StatusCode::UNAUTHORIZED
            }
            Self::DialectNotAllowed => StatusCode::FORBIDDEN,
            Self::NoFile
            | Self::TooManyFiles { .. }
            | Self::EmptyFilename
            | Self::InvalidFilename(_)
            | Self::MissingField(_)
            | Self::InvalidField { .. }
            | Self::Malformed(_)
            | Self::MissingChunks(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedType { .. } | Self::ContentMismatch(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotFound | Self::NoSuchEndpoint => StatusCode::NOT_FOUND,
            Self::SessionExpired => StatusCode::GONE,
            Self::UpstreamRejected { status, .. } => StatusCode::from_u16(*status)
                .ok()
                .filter(|s| s.is_client_error())
                .unwrap_or(StatusCode::BAD_GATEWAY),
            Self::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The bounded label for `upgate_rejections_total{reason}`, for policy rejections.
    pub fn rejection_reason(&self) -> Option<&'static str> {
        Some(match self {
            Self::MissingCredentials
            | Self::MalformedCredentials
            | Self::InvalidCredentials
            | Self::DialectNotAllowed => "auth",
            Self::TooLarge { .. } => "size",
            Self::UnsupportedType { .. } => "extension",
            Self::ContentMismatch(_) => "content",
            Self::Throttled {
                why: Throttle::Rate, ..
            } => "rate",
            Self::Throttled {
                why: Throttle::Concurrency,
                ..
            } => "concurrency",
            Self::Throttled {
                why: Throttle::Quota, ..
            } => "quota",
            Self::NoFile
            | Self::TooManyFiles { .. }
            | Self::EmptyFilename
            | Self::InvalidFilename(_)
            | Self::MissingField(_)
            | Self::InvalidField { .. }
            | Self::Malformed(_) => "invalid",
            _ => return None,
        })
    }
}

/// An [`ApiError`] on its way to a client of `dialect`.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct DialectError {
    pub dialect: DialectName,
    pub error: ApiError,
}

impl DialectError {
    pub fn new(dialect: DialectName, error: ApiError) -> Self {
        Self { dialect, error }
    }
}

impl ResponseError for DialectError {
    fn status_code(&self) -> StatusCode {
        self.error.status()
    }

    fn error_response(&self) -> HttpResponse {
        let dialect = dialects::get(self.dialect);
        let status = self.error.status();
        let mut response = HttpResponse::build(status);
        if let ApiError::Throttled { retry_after_secs, .. } = self.error {
            response.insert_header((header::RETRY_AFTER, retry_after_secs.max(1).to_string()));
        }
        if status == StatusCode::UNAUTHORIZED
            && let Some(challenge) = dialect.www_authenticate()
        {
            response.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge)));
        }
        response.json(dialect.error_body(&self.error, status))
    }
}

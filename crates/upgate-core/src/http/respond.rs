//! Responders: the one place an outcome of the upload flow becomes an HTTP response.
//!
//! What flows through here: a handler's [`ApiError`] paired with its dialect (a
//! [`DialectError`]), whose status, `Retry-After`, `Allow` and `WWW-Authenticate` headers are decided
//! here once while the body shape comes from the dialect
//! ([`super::dialects::Dialect::error_body`]); and the
//! records of a successful upload, attached to the response for the request log
//! ([`uploaded`]).

use std::future::Future;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, HttpResponseBuilder, ResponseError};
use serde::Serialize;

use super::dialect;
use crate::error::ApiError;
use crate::store::UploadRecord;
use crate::vocab::DialectName;

/// An [`ApiError`] on its way to a client of `dialect`.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub(crate) struct DialectError {
    pub(crate) dialect: DialectName,
    pub(crate) error: ApiError,
}

impl DialectError {
    pub(crate) fn new(dialect: DialectName, error: ApiError) -> Self {
        Self { dialect, error }
    }
}

impl ResponseError for DialectError {
    fn status_code(&self) -> StatusCode {
        self.error.status()
    }

    fn error_response(&self) -> HttpResponse {
        let dialect = dialect(self.dialect);
        let status = self.error.status();
        let mut response = HttpResponse::build(status);
        if let Some(reason) = self.error.reason() {
            response.reason(reason);
        }
        if let Some(retry_after_secs) = self.error.retry_after_secs() {
            response.insert_header((header::RETRY_AFTER, retry_after_secs.max(1).to_string()));
        }
        if let Some(allow) = self.error.allow() {
            response.insert_header((header::ALLOW, allow));
        }
        if status == StatusCode::UNAUTHORIZED
            && let Some(challenge) = dialect.www_authenticate()
        {
            response.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge)));
        }
        dialect.render_error(&self.error, status, response)
    }
}

/// Runs a handler's work and renders its error, if any, in `dialect`'s shape: every handler
/// of every dialect is `answer(NAME, async { ... }).await`, its body free to use `?` on
/// [`ApiError`]s.
pub(crate) async fn answer(
    dialect: DialectName,
    work: impl Future<Output = Result<HttpResponse, ApiError>>,
) -> Result<HttpResponse, DialectError> {
    work.await.map_err(|error| DialectError::new(dialect, error))
}

/// What the request log learns from a handler.
#[derive(Debug, Clone, Default)]
pub(crate) struct UploadLog {
    pub(crate) ids: Vec<String>,
    /// Bytes of the files received (what the log reports when the request had no
    /// Content-Length, as with chunked transfer encoding).
    pub(crate) bytes: u64,
}

/// A JSON answer for stored `records`, which the request log names.
pub(crate) fn uploaded(status: StatusCode, records: &[UploadRecord], body: impl Serialize) -> HttpResponse {
    let mut builder = HttpResponseBuilder::new(status);
    log_uploads(&mut builder, records);
    builder.json(body)
}

/// Names `records` in the request log line of this response.
pub(crate) fn log_uploads(builder: &mut HttpResponseBuilder, records: &[UploadRecord]) {
    if records.is_empty() {
        return;
    }
    let log = UploadLog {
        ids: records.iter().map(|record| record.id.clone()).collect(),
        bytes: records.iter().map(|record| record.size).sum(),
    };
    builder.extensions_mut().insert(log);
}

//! The request log and request metrics: one line and one observation per request.
//!
//! What flows through here: every request on the dialect listener, wrapped as middleware.
//! In: the method, path and declared length; out, after the handler: the route, status,
//! duration, the upload ids and sizes a handler attached ([`super::respond::uploaded`]),
//! the tenant the key belonged to ([`RequestTenant`]) and a refusal's reason. Keys,
//! filenames and bodies never reach the log.

use std::time::Instant;

use actix_web::HttpMessage;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;

use super::respond::{DialectError, UploadLog};
use crate::metrics;

/// The tenant a request was identified as, for the request log (set on the request once its
/// key is known, admitted or not).
#[derive(Debug, Clone)]
pub(crate) struct RequestTenant(pub(crate) String);

/// Runs the request in a task of its own: a client that goes away (a reset connection drops
/// the request's future) does not cut a delivery, its record, its cleanup or its log line
/// short; the work ends as if the client were still there, and only the answer is lost.
pub(crate) async fn observe<B: MessageBody + 'static>(
    request: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<B>, actix_web::Error> {
    // What the line of a request whose task panicked can still say (the route's pattern, never
    // the path the client wrote).
    let (started, method) = (Instant::now(), request.method().clone());
    let dialect = super::dialect_of_path(request.path());
    let route = request.match_pattern().unwrap_or_else(|| "unmatched".to_owned());
    match actix_web::rt::spawn(observed(request, next)).await {
        Ok(result) => result,
        Err(_) => {
            metrics::http_request(dialect, &route, 500, started.elapsed());
            tracing::error!(%method, %route, dialect = dialect.map_or("", |d| d.as_str()), status = 500,
                duration_ms = started.elapsed().as_millis() as u64, "request failed: its task panicked");
            Err(actix_web::error::ErrorInternalServerError(
                "the request's task failed",
            ))
        }
    }
}

async fn observed<B: MessageBody + 'static>(
    request: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<B>, actix_web::Error> {
    let started = Instant::now();
    let dialect = super::dialect_of_path(request.path());
    let method = request.method().clone();
    let declared_bytes = request
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let response = next.call(request).await?;
    let route = response
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let status = response.status();
    let elapsed = started.elapsed();
    metrics::http_request(dialect, &route, status.as_u16(), elapsed);
    let error = response
        .response()
        .error()
        .and_then(|e| e.as_error::<DialectError>());
    if let Some(reason) = error.and_then(|error| {
        error
            .error
            .rejection_reason()
            .map(|reason| (error.dialect, reason))
    }) {
        metrics::rejection(reason.0, reason.1);
    }
    let log = response
        .response()
        .extensions()
        .get::<UploadLog>()
        .cloned()
        .unwrap_or_default();
    let tenant = response
        .request()
        .extensions()
        .get::<RequestTenant>()
        .map(|tenant| tenant.0.clone())
        .unwrap_or_default();
    let bytes = declared_bytes.unwrap_or(log.bytes);
    tracing::info!(
        method = %method,
        route = %route,
        dialect = dialect.map_or("none", |d| d.as_str()),
        status = status.as_u16(),
        bytes,
        duration_ms = elapsed.as_millis() as u64,
        upload_ids = %log.ids.join(","),
        tenant = %tenant,
        error = error.map(|e| e.error.to_string()).unwrap_or_default(),
        "request"
    );
    Ok(response)
}

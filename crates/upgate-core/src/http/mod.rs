//! The HTTP edge: actix-web routes, responders, the request log and the probes.
//!
//! What flows through here: HTTP requests in, HTTP responses out. [`dialects`] parse each
//! vendor's requests into calls on the shared upload flow ([`crate::upload::Gateway`]) and
//! render its records and errors in the vendor's shape; [`respond`] is the one place an
//! error becomes a response; [`request_log`] observes every request. Nothing below this
//! folder knows about actix's request types; this folder knows nothing of the daemon.

pub(crate) mod body_rate;
pub(crate) mod cors;
pub(crate) mod dialects;
pub(crate) mod request_log;
pub(crate) mod respond;
#[cfg(test)]
mod tests;

use actix_web::body::MessageBody;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap};
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};

use crate::error::ApiError;
use crate::metrics;
use crate::upload::Gateway;
use crate::vocab::DialectName;
use dialects::Dialect;
use respond::DialectError;

/// Every dialect's routes, and the answer for paths no route serves.
pub(crate) fn routes(config: &mut web::ServiceConfig) {
    dialects::configure(config);
    config.default_service(web::to(not_found));
}

/// The probe listener's routes: `/metrics`, `/healthz`, `/readyz`.
pub(crate) fn probes(config: &mut web::ServiceConfig) {
    config
        .route("/metrics", web::get().to(metrics_text))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz));
}

/// The dialect object for a name.
pub(crate) fn dialect(name: DialectName) -> &'static dyn Dialect {
    match name {
        DialectName::Dify => &dialects::dify::Dify,
        DialectName::Kore => &dialects::kore::Kore,
        DialectName::Maiagent => &dialects::maiagent::Maiagent,
        DialectName::Korexo => &dialects::korexo::Korexo,
        DialectName::Beam => &dialects::beam::Beam,
        DialectName::Tus => &dialects::tus::Tus,
    }
}

/// Which dialect a request path belongs to (for metrics and logs of requests that never
/// reached a handler).
pub(crate) fn dialect_of_path(path: &str) -> Option<DialectName> {
    if path.starts_with("/v1/files/") || path == "/files/upload" {
        Some(DialectName::Dify)
    } else if path == "/files" || path.starts_with(dialects::tus::BASE) {
        Some(DialectName::Tus)
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

/// The body of an answer to a request the HTTP layer refused before routing (a head that
/// does not parse, 400; too large, 431; too slow, 408), given the start of its target: in
/// the shape of the dialect whose prefix the path has, as its handlers would answer; `None`
/// (an empty body) elsewhere, with the headers the dialect puts on every answer (tus's
/// `Tus-Resumable`). Registered with the vendored actix-http at start.
pub(crate) fn rejection_body(status: StatusCode, target: Option<&str>) -> Option<(HeaderMap, Bytes)> {
    let path = target?.split(['?', '#']).next()?;
    let dialect = dialect(dialect_of_path(path)?);
    let error = match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ApiError::HeadTooLarge,
        StatusCode::REQUEST_TIMEOUT => ApiError::HeadTimeout,
        _ => ApiError::Malformed("the request head is not valid HTTP/1.1".into()),
    };
    let response = dialect.render_error(&error, status, HttpResponse::build(status));
    response.headers().get(header::CONTENT_TYPE)?;
    let headers = response.headers().clone();
    let body = response.into_body().try_into_bytes().ok()?;
    Some((headers, body))
}

/// No route matched: under a dialect's prefix, that dialect's 405 (with `Allow`) when a route
/// serves the path with other methods, else its 404; elsewhere a plain 404.
async fn not_found(request: HttpRequest) -> Result<HttpResponse, DialectError> {
    match dialect_of_path(request.path()) {
        Some(dialect) => {
            let allowed = dialects::methods_serving(request.match_info().as_str());
            let error = if allowed.is_empty() {
                ApiError::NoSuchEndpoint
            } else {
                ApiError::MethodNotAllowed { allowed }
            };
            Err(DialectError::new(dialect, error))
        }
        None => Ok(HttpResponse::NotFound()
            .json(serde_json::json!({ "message": "no such endpoint", "status": 404 }))),
    }
}

async fn metrics_text() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(metrics::render())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// The longest `/readyz` waits for any of its checks: a check still running then (an engine
/// that accepts and never answers, a plugin's `health` that blocks) is a problem of its own.
const READY_CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// A readiness check's problem, or `what` did not answer within [`READY_CHECK_WAIT`].
async fn within(what: &str, check: impl std::future::Future<Output = Option<String>>) -> Option<String> {
    let waited = READY_CHECK_WAIT.as_secs();
    tokio::time::timeout(READY_CHECK_WAIT, check)
        .await
        .unwrap_or_else(|_| Some(format!("{what}: no answer within {waited}s")))
}

/// A blocking readiness check, on a blocking thread.
async fn blocking(check: impl FnOnce() -> Option<String> + Send + 'static) -> Option<String> {
    tokio::task::spawn_blocking(check)
        .await
        .unwrap_or_else(|_| Some("a check did not finish".to_owned()))
}

async fn readyz(gateway: web::Data<Gateway>) -> HttpResponse {
    let mut problems = Vec::new();
    if gateway.stopping() {
        problems.push("stopping: draining in-flight uploads".to_owned());
    }
    // Everything is asked at once, each within the same bound: a probe answers within
    // `READY_CHECK_WAIT` whatever hangs.
    let (store, limiter, spool) = (
        gateway.store.clone(),
        gateway.limiter.clone(),
        gateway.spool.clone(),
    );
    let mut checks: Vec<futures_util::future::BoxFuture<'static, Option<String>>> = vec![
        Box::pin(within("store", async move {
            store
                .outbox_len()
                .await
                .err()
                .map(|error| format!("store: {error}"))
        })),
        Box::pin(within("limits", async move { limiter.unready().await })),
        Box::pin(within("spool", blocking(move || spool.unready()))),
    ];
    for provider in gateway.policy().providers.values() {
        let checked = provider.clone();
        let unhealthy = move || {
            let failed = checked.health().is_err();
            failed.then(|| format!("provider {} is not healthy", checked.name))
        };
        checks.push(Box::pin(within("a provider", blocking(unhealthy))));
    }
    problems.extend(futures_util::future::join_all(checks).await.into_iter().flatten());
    if gateway.below_disk_floor() {
        problems.push("data_dir is below its free-space floor (bytes or inodes)".to_owned());
    }
    if problems.is_empty() {
        HttpResponse::Ok().json(serde_json::json!({ "status": "ready" }))
    } else {
        HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({ "status": "not ready", "problems": problems }))
    }
}

/// Counts open connections: one guard lives in each connection's extensions.
pub(crate) struct ConnectionGuard;

impl ConnectionGuard {
    pub(crate) fn new() -> Self {
        metrics::get().open_connections.inc();
        Self
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        metrics::get().open_connections.dec();
    }
}

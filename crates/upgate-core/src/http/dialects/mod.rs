//! Dialects: the edges where each vendor's API meets upgate's neutral upload model.
//!
//! What flows through here: HTTP requests on each vendor's paths. A dialect knows where its
//! clients put their key, what its upload form looks like and how its success and error
//! bodies are shaped; everything else (policy, intake, store, delivery) is the shared
//! [`crate::upload::Gateway`]. Adding a dialect is one module: routes, a [`Dialect`] impl
//! and its renderers; its handlers open with [`admit`] (or [`upload_multipart`]) and wrap
//! their work in [`crate::http::respond::answer`].

pub(crate) mod beam;
pub(crate) mod dify;
pub(crate) mod kore;
pub(crate) mod korexo;
pub(crate) mod maiagent;
pub(crate) mod tus;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, OnceLock};

use actix_web::http::{Method, StatusCode};
use actix_web::web::Payload;
use actix_web::{HttpMessage, HttpRequest, HttpResponse, HttpResponseBuilder, web};
use serde_json::Value;

use super::request_log::RequestTenant;
use crate::error::ApiError;
use crate::store::UploadRecord;
use crate::upload::admit::Admission;
pub(crate) use crate::upload::admit::Work;
use crate::upload::intake::{FormSpec, Received};
use crate::upload::{Gateway, Metadata};
pub(crate) use crate::vocab::DialectName;

/// What each dialect provides to the shared flow.
pub(crate) trait Dialect: Send + Sync {
    fn name(&self) -> DialectName;
    /// The API key from the request, or why there is none.
    fn credentials(&self, request: &HttpRequest) -> Result<String, ApiError>;
    /// The request headers the dialect reads beyond `Authorization` and `Content-Type` (its
    /// key header, ...), for CORS preflights.
    fn request_headers(&self) -> &'static [&'static str] {
        &[]
    }
    /// The `WWW-Authenticate` challenge sent with 401s, if the vendor sends one.
    fn www_authenticate(&self) -> Option<&'static str> {
        None
    }
    /// The body of an error response, in the vendor's shape.
    fn error_body(&self, error: &ApiError, status: StatusCode) -> Value;
    /// The whole error response, status and headers already set: JSON of
    /// [`Dialect::error_body`] unless the dialect answers otherwise.
    fn render_error(
        &self,
        error: &ApiError,
        status: StatusCode,
        mut response: HttpResponseBuilder,
    ) -> HttpResponse {
        response.json(self.error_body(error, status))
    }
}

/// Admits a request of `dialect`: the key from where the dialect keeps it, then the
/// gateway's checks. The tenant the key belongs to is noted for the request log, whether or
/// not the request is let in.
pub(crate) async fn admit(
    gateway: &Gateway,
    dialect: &dyn Dialect,
    request: &HttpRequest,
) -> Result<Admission, ApiError> {
    admit_for(gateway, dialect, request, Work::Upload).await
}

/// [`admit`] for a request that does `work` ([`Work::Lookup`]: a `HEAD` or `DELETE` that adds
/// nothing, so no concurrency slot and no quota).
pub(crate) async fn admit_for(
    gateway: &Gateway,
    dialect: &dyn Dialect,
    request: &HttpRequest,
    work: Work,
) -> Result<Admission, ApiError> {
    let key = dialect.credentials(request)?;
    let admitted = gateway.admit(dialect.name(), &key, work).await;
    let tenant = match &admitted {
        Ok(admission) => Some(admission.tenant.name.clone()),
        Err(_) => gateway
            .policy()
            .tenant_of_key(&key)
            .map(|tenant| tenant.name.clone()),
    };
    if let Some(tenant) = tenant {
        request.extensions_mut().insert(RequestTenant(tenant));
    }
    admitted
}

/// Admission, intake and recording for a dialect whose upload is one multipart request;
/// `metadata_of` picks the dialect's metadata from the received text fields.
pub(crate) async fn upload_multipart(
    gateway: &Gateway,
    dialect: &dyn Dialect,
    request: &HttpRequest,
    payload: Payload,
    spec: &FormSpec,
    metadata_of: impl FnOnce(&Received) -> Result<Metadata, ApiError>,
) -> Result<Vec<UploadRecord>, ApiError> {
    let admission = admit(gateway, dialect, request).await?;
    let received = gateway
        .receive(&admission, request.headers(), payload, spec, &Metadata::new())
        .await?;
    let metadata = metadata_of(&received)?;
    gateway.accept(&admission, received.files, metadata).await
}

/// Registers every dialect's routes.
pub(crate) fn configure(config: &mut web::ServiceConfig) {
    let mut routes = Routes(config);
    dify::routes(&mut routes);
    kore::routes(&mut routes);
    maiagent::routes(&mut routes);
    korexo::routes(&mut routes);
    beam::routes(&mut routes);
    // After Dify's, whose `POST /files/upload` shares tus's base path.
    tus::routes(&mut routes);
}

/// Every dialect route's path pattern with the methods it is served with: what a 405's
/// `Allow` names. Filled as the routes are registered (once per worker, the same each time).
static SERVED: Mutex<BTreeMap<String, BTreeSet<String>>> = Mutex::new(BTreeMap::new());

/// Where the dialects register their routes: actix's, each noted in [`SERVED`].
pub(crate) struct Routes<'a>(&'a mut web::ServiceConfig);

impl Routes<'_> {
    /// Serves `method` requests to `path` (an actix pattern) with `handler`.
    pub(crate) fn add<F, Args>(&mut self, method: Method, path: &str, handler: F) -> &mut Self
    where
        F: actix_web::Handler<Args>,
        Args: actix_web::FromRequest + 'static,
        F::Output: actix_web::Responder + 'static,
    {
        SERVED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(path.to_owned())
            .or_default()
            .insert(method.as_str().to_owned());
        self.0.route(path, web::method(method).to(handler));
        self
    }
}

/// A registered pattern, compiled, with the dialect whose prefix it has and its methods.
type ServedPattern = (actix_web::dev::ResourceDef, Option<DialectName>, BTreeSet<String>);

/// The methods the routes of `path`'s own dialect serve it with, sorted; empty when none
/// does. `path` is the one the router matched (percent-decoded where actix decodes). The
/// patterns are compiled once, at the first call (every worker has registered the same
/// routes by then: its own, before it serves).
pub(crate) fn methods_serving(path: &str) -> Vec<String> {
    static COMPILED: OnceLock<Vec<ServedPattern>> = OnceLock::new();
    let compiled = COMPILED.get_or_init(|| {
        SERVED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(pattern, methods)| {
                let dialect = crate::http::dialect_of_path(pattern);
                (
                    actix_web::dev::ResourceDef::new(pattern.as_str()),
                    dialect,
                    methods.clone(),
                )
            })
            .collect()
    });
    let dialect = crate::http::dialect_of_path(path);
    let methods: BTreeSet<&String> = compiled
        .iter()
        .filter(|(pattern, of, _)| *of == dialect && pattern.is_match(path))
        .flat_map(|(_, _, methods)| methods)
        .collect();
    methods.into_iter().cloned().collect()
}

pub(crate) use crate::upload::intake::{SentTwice, header_once};

/// The most a dialect's JSON body (Kore's session start, Kore XO's delete) may hold.
const MAX_JSON_BODY: usize = 64 * 1024;

/// Reads a small JSON body: `None` when there is none, refused when it is too long or not
/// JSON.
pub(crate) async fn read_json(
    mut payload: Payload,
    idle: std::time::Duration,
) -> Result<Option<Value>, ApiError> {
    let mut body = Vec::new();
    while let Some(bytes) = crate::upload::intake::next_or_stall(&mut payload, idle).await? {
        let bytes = bytes.map_err(crate::upload::intake::body_error)?;
        if body.len() + bytes.len() > MAX_JSON_BODY {
            return Err(ApiError::Malformed("the JSON body is too long".into()));
        }
        body.extend_from_slice(&bytes);
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|error| ApiError::Malformed(format!("the body must be a JSON object: {error}")))
}

/// The one value of a credential header: sent twice it is malformed, whichever copy holds a
/// valid key.
pub(crate) fn single_header(
    request: &HttpRequest,
    name: impl actix_web::http::header::AsHeaderName,
) -> Result<&actix_web::http::header::HeaderValue, ApiError> {
    header_once(request.headers(), name)
        .map_err(|SentTwice| ApiError::MalformedCredentials)?
        .ok_or(ApiError::MissingCredentials)
}

/// The value of a key header (`X-api-key` and friends): present once, non-empty, visible
/// ASCII.
pub(crate) fn header_key(request: &HttpRequest, name: &str) -> Result<String, ApiError> {
    let value = single_header(request, name)?;
    let text = value.to_str().map_err(|_| ApiError::MalformedCredentials)?.trim();
    if text.is_empty() {
        return Err(ApiError::MissingCredentials);
    }
    Ok(text.to_owned())
}

/// The credential after `scheme` in `Authorization: <scheme> <key>` (scheme compared
/// case-insensitively).
pub(crate) fn authorization_key(request: &HttpRequest, scheme: &str) -> Result<String, ApiError> {
    let value = single_header(request, actix_web::http::header::AUTHORIZATION)?;
    let text = value.to_str().map_err(|_| ApiError::MalformedCredentials)?.trim();
    let (given_scheme, key) = text.split_once(' ').ok_or(ApiError::MalformedCredentials)?;
    let key = key.trim();
    if !given_scheme.eq_ignore_ascii_case(scheme) || key.is_empty() {
        return Err(ApiError::MalformedCredentials);
    }
    Ok(key.to_owned())
}

/// Seconds in a human sentence, for messages that say when to retry.
pub(crate) fn seconds(n: u64) -> String {
    if n == 1 {
        "1 second".into()
    } else {
        format!("{n} seconds")
    }
}

/// A plan limit in words, e.g. "15MiB".
pub(crate) fn limit_text(limit: u64) -> String {
    crate::config::ByteSize(limit).to_string()
}

/// A plain-words message for errors every dialect renders the same way apart from its body
/// shape (the dialects add their own codes around it).
pub(crate) fn plain_message(error: &ApiError) -> String {
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
        ApiError::MethodNotAllowed { allowed } => {
            format!("Method not allowed: this endpoint takes {}.", allowed.join(", "))
        }
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
        ApiError::HeadTimeout => "The request head did not arrive in time.".into(),
        ApiError::HeadTooLarge => "The request head is too large.".into(),
        ApiError::InsufficientStorage => "Not enough storage space on the gateway.".into(),
        ApiError::Internal => "Internal error.".into(),
        ApiError::Unavailable { retry_after_secs } => format!(
            "The service is temporarily unavailable. Retry after {}.",
            seconds(*retry_after_secs)
        ),
        ApiError::DeliveryBusy { retry_after_secs } => format!(
            "The gateway is delivering as many files as it may at once. Retry after {}.",
            seconds(*retry_after_secs)
        ),
        ApiError::OffsetMismatch { offset } => format!("The upload is at offset {offset}."),
        ApiError::SessionBusy => "Another request is working on this upload; try again in a moment.".into(),
        ApiError::UploadLocked => "Another request is completing this upload; try again in a moment.".into(),
        ApiError::ChecksumMismatch => "The body does not match its checksum.".into(),
        ApiError::UnsupportedVersion => "Unsupported protocol version.".into(),
        ApiError::WrongContentType => "Wrong content type.".into(),
        ApiError::ImmutableUpload => "This upload cannot be changed.".into(),
    }
}

/// `{"errors": [{"msg", "code"}]}`, the error body of kore and korexo (code = HTTP status).
pub(crate) fn errors_body(message: String, status: StatusCode) -> Value {
    serde_json::json!({ "errors": [{ "msg": message, "code": status.as_u16() }] })
}

/// An epoch-milliseconds time as ISO 8601 UTC with milliseconds (`2025-04-23T12:05:45.782Z`).
pub(crate) fn iso_millis(epoch_ms: i64) -> String {
    humantime::format_rfc3339_millis(crate::vocab::stored_time(epoch_ms)).to_string()
}

/// The URL a dialect returns for an upload: the provider's URL once delivered; before that
/// (async delivery, or a provider that gives none) `upgate://uploads/<id>`, which names the
/// upload in upgate and is never null, so clients that require a URL keep working.
pub(crate) fn file_url(record: &UploadRecord) -> String {
    record
        .remote_url
        .clone()
        .unwrap_or_else(|| format!("upgate://uploads/{}", record.id))
}

/// A stable uuid derived from `text`, for vendor fields that are uuids of things upgate does
/// not have (users, tenants).
pub(crate) fn derived_uuid(text: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
}

//! CORS: browsers of the configured origins may call every dialect.
//!
//! What flows through here: every request on the dialect listener, before routing. A
//! preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) from an allowed
//! origin is answered here, for any route of any dialect, with the methods upgate serves and
//! the request headers its dialects read (each dialect's key header, tus's headers); every
//! other answer to an allowed origin, errors included (a browser shown a 413 without CORS
//! headers reports a CORS failure instead), carries `Access-Control-Allow-Origin` and the
//! headers a client must read (`Location`, `Upload-Offset`, `Tus-*`, upgate's own). An
//! origin not listed, or no `server.cors`, gets no CORS header at all; with `server.cors`,
//! every answer says `Vary: Origin`, so that a shared cache never hands an answer made for
//! one origin (or none) to another.

use std::sync::LazyLock;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};

use super::dialect;
use super::dialects::tus;
use crate::upload::Gateway;
use crate::vocab::DialectName;

const METHODS: &str = "GET, HEAD, POST, PATCH, DELETE, OPTIONS";
/// How long a browser may cache a preflight.
const MAX_AGE_SECS: &str = "86400";

/// The request headers every dialect together reads.
static ALLOW_HEADERS: LazyLock<String> = LazyLock::new(|| {
    let mut names: Vec<&str> = vec!["authorization", "content-type"];
    for name in DialectName::ALL {
        names.extend_from_slice(dialect(name).request_headers());
    }
    names.extend_from_slice(tus::REQUEST_HEADERS);
    names.sort_unstable();
    names.dedup();
    names.join(", ")
});

/// The answer headers a browser client may read.
static EXPOSE_HEADERS: LazyLock<String> = LazyLock::new(|| {
    let mut names: Vec<&str> = vec!["retry-after", "www-authenticate"];
    names.extend_from_slice(tus::RESPONSE_HEADERS);
    names.join(", ")
});

/// What the config says of the request's origin.
enum Origin {
    /// No `server.cors`: CORS plays no part.
    Unconfigured,
    /// No `Origin`, or one the config does not list.
    NotAllowed,
    Allowed(HeaderValue),
}

fn origin_of(request: &ServiceRequest) -> Origin {
    let Some(gateway) = request.app_data::<web::Data<Gateway>>() else {
        return Origin::Unconfigured;
    };
    let policy = gateway.policy();
    let Some(cors) = policy.config.server.cors.as_ref() else {
        return Origin::Unconfigured;
    };
    match request.headers().get(header::ORIGIN) {
        Some(origin) if origin.to_str().is_ok_and(|text| cors.allows(text)) => {
            Origin::Allowed(origin.clone())
        }
        _ => Origin::NotAllowed,
    }
}

pub(crate) async fn cors(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let allowed = match origin_of(&request) {
        Origin::Unconfigured => return Ok(next.call(request).await?.map_into_boxed_body()),
        Origin::NotAllowed => None,
        Origin::Allowed(origin) => Some(origin),
    };
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if let Some(origin) = allowed.clone().filter(|_| preflight) {
        let answer = HttpResponse::NoContent()
            .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin))
            .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, METHODS))
            .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOW_HEADERS.as_str()))
            .insert_header((header::ACCESS_CONTROL_MAX_AGE, MAX_AGE_SECS))
            .insert_header((header::VARY, "Origin"))
            .finish();
        return Ok(request.into_response(answer));
    }
    let mut response = next.call(request).await?.map_into_boxed_body();
    let headers = response.headers_mut();
    if let Some(origin) = allowed {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS.as_str()),
        );
    }
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    Ok(response)
}

//! The blocking HTTP client of one provider instance.

use std::io::{self, Read};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value;
use upgate_plugin_api::{ErrorKind, PluginError};
use ureq::http::{Method, Request, Response};
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
use ureq::{Agent, Body, SendBody};

use crate::multipart::{Metadata, Multipart, StreamedMultipart};
use crate::response::{Reply, classify, sanitize};
use crate::settings::UpstreamSettings;
use crate::{Content, upload_form};

/// Largest success body read. Vendors answer with small JSON documents (well under 4 KiB);
/// parsed, a dense one costs about 16 times its size, and up to `forward_concurrency` are
/// parsed at once.
const MAX_REPLY_BYTES: u64 = 64 << 10;
/// Largest error body read for its reason.
const MAX_ERROR_BYTES: u64 = 64 << 10;

/// How the API key travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Auth {
    header: &'static str,
    scheme: Option<&'static str>,
}

impl Auth {
    /// `Authorization: Bearer KEY`.
    pub const fn bearer() -> Self {
        Self {
            header: "authorization",
            scheme: Some("Bearer"),
        }
    }

    /// `<header>: <scheme> KEY`, e.g. `Authorization: Api-Key KEY`.
    pub const fn scheme(header: &'static str, scheme: &'static str) -> Self {
        Self {
            header,
            scheme: Some(scheme),
        }
    }

    /// `<header>: KEY`, e.g. `x-api-key: KEY`.
    pub const fn header(header: &'static str) -> Self {
        Self { header, scheme: None }
    }
}

/// One provider instance's connection to its vendor: settings, auth and a pooled agent.
/// Shared by all threads that call the provider.
pub struct Upstream {
    vendor: &'static str,
    settings: UpstreamSettings,
    auth_header: &'static str,
    auth_value: String,
    agent: Agent,
    /// The vendor can delete a file: an upload's request waits for its answer past the
    /// host's deadline (up to `timeout`), so that a late success can be deleted.
    deletes_late_uploads: bool,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("vendor", &self.vendor)
            .field("settings", &self.settings)
            .finish()
    }
}

enum OutBody<'s, 'b, 'h, 'f> {
    None,
    Bytes(Vec<u8>, &'static str),
    Multipart(Multipart),
    /// An upload still arriving: sent chunked, with no overall deadline (the host bounds a
    /// stalled body); the answer must come within `timeout` of the body's end.
    Streamed(&'s mut StreamedMultipart<'b, 'h, 'f>),
}

impl Upstream {
    /// Builds the agent: rustls with the Mozilla roots (plus `ca_file`), the configured
    /// timeouts, no redirects, no compression, 4xx/5xx returned as answers.
    pub fn new(vendor: &'static str, settings: UpstreamSettings, auth: Auth) -> Result<Self, PluginError> {
        let root_certs = match &settings.ca_file {
            None => RootCerts::WebPki,
            Some(_) => {
                let mut roots: Vec<Certificate<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
                    .iter()
                    .map(|der| Certificate::from_der(der.as_ref()).to_owned())
                    .collect();
                roots.extend(load_ca_file(&settings)?);
                RootCerts::from(roots)
            }
        };
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(root_certs)
            .build();
        let config = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_connect(Some(settings.connect_timeout))
            .timeout_global(Some(settings.timeout))
            .user_agent(concat!("upgate/", env!("CARGO_PKG_VERSION")))
            .accept("application/json")
            .tls_config(tls)
            .build();
        let auth_value = match auth.scheme {
            Some(scheme) => format!("{scheme} {}", settings.api_key()),
            None => settings.api_key().to_owned(),
        };
        Ok(Self {
            vendor,
            auth_header: auth.header,
            auth_value,
            agent: config.new_agent(),
            settings,
            deletes_late_uploads: false,
        })
    }

    /// For a vendor with a delete API: an upload's request keeps waiting for its answer
    /// after the host stopped waiting (up to the `timeout` setting), so that the host can
    /// delete a file stored late. Without it, the request ends with the host's wait
    /// ([`upgate_plugin_api::PutRequest::time_left`]): a late success could not be undone
    /// anyway, and the request would only hold a delivery slot.
    pub fn deleting_late_uploads(mut self) -> Self {
        self.deletes_late_uploads = true;
        self
    }

    pub fn vendor(&self) -> &'static str {
        self.vendor
    }

    pub fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }

    /// Settings-only readiness: the CA file, if any, still loads.
    pub fn health(&self) -> Result<(), PluginError> {
        if self.settings.ca_file.is_some() {
            load_ca_file(&self.settings)?;
        }
        Ok(())
    }

    /// `POST path` with a multipart body. `left`, here and below: the time the host has
    /// left for the whole call ([`upgate_plugin_api::PutRequest::time_left`]); a request
    /// gets the smaller of it and the `timeout` setting, so that no request outlives the
    /// host's wait while holding one of its delivery slots.
    pub fn post_multipart(
        &self,
        what: &str,
        path: &str,
        headers: &[(&str, &str)],
        form: Multipart,
        left: Option<Duration>,
    ) -> Result<Reply, PluginError> {
        self.call(what, Method::POST, path, headers, OutBody::Multipart(form), left)
    }

    /// `POST path` with the upload as the multipart file part `file_field` and the text
    /// `fields` made from its metadata: the spooled file with its exact length, or the upload
    /// as it arrives (chunked; the fields after the file part, made once the body has ended
    /// and the final metadata is known). One code path for a plugin's `put` and `put_stream`.
    pub fn post_upload<'f>(
        &self,
        what: &str,
        path: &str,
        headers: &[(&str, &str)],
        content: Content<'_, '_>,
        file_field: &str,
        fields: impl FnOnce(&Metadata) -> Result<Vec<(String, String)>, PluginError> + Send + 'f,
    ) -> Result<Reply, PluginError> {
        match content {
            Content::Spooled(request) => {
                let form = fields(&request.metadata)?
                    .iter()
                    .fold(upload_form(request, file_field)?, |form, (name, value)| {
                        form.text(name, value)
                    });
                let left = request.time_left().filter(|_| !self.deletes_late_uploads);
                self.post_multipart(what, path, headers, form, left)
            }
            Content::Arriving(request, body) => {
                let mut form = StreamedMultipart::new(
                    file_field,
                    &request.filename,
                    &request.mime_type,
                    body,
                    Box::new(fields),
                );
                let sent = self.call(
                    what,
                    Method::POST,
                    path,
                    headers,
                    OutBody::Streamed(&mut form),
                    None,
                );
                match form.failure() {
                    Some(failure) => Err(failure),
                    None => sent,
                }
            }
        }
    }

    /// `POST path` with a JSON body.
    pub fn post_json(
        &self,
        what: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &Value,
        left: Option<Duration>,
    ) -> Result<Reply, PluginError> {
        let bytes = serde_json::to_vec(body).map_err(|error| self.internal(what, error))?;
        self.call(
            what,
            Method::POST,
            path,
            headers,
            OutBody::Bytes(bytes, "application/json"),
            left,
        )
    }

    /// `POST path` with an empty body (`Content-Length: 0`).
    pub fn post_empty(
        &self,
        what: &str,
        path: &str,
        headers: &[(&str, &str)],
        left: Option<Duration>,
    ) -> Result<Reply, PluginError> {
        self.call(
            what,
            Method::POST,
            path,
            headers,
            OutBody::Bytes(Vec::new(), ""),
            left,
        )
    }

    /// `DELETE path` without a body. Its answer's body is not read: any 2xx is done.
    pub fn delete(&self, what: &str, path: &str, headers: &[(&str, &str)]) -> Result<(), PluginError> {
        self.call(what, Method::DELETE, path, headers, OutBody::None, None)
            .map(drop)
            .or_else(|error| match error.status {
                // A 2xx whose body is not JSON: deleted all the same.
                Some(200..=299) => Ok(()),
                _ => Err(error),
            })
    }

    fn context(&self, what: &str) -> String {
        format!("{} {what}", self.vendor)
    }

    fn internal(&self, what: &str, error: impl std::fmt::Display) -> PluginError {
        PluginError::new(ErrorKind::Internal, format!("{}: {error}", self.context(what)))
    }

    fn call(
        &self,
        what: &str,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: OutBody,
        left: Option<Duration>,
    ) -> Result<Reply, PluginError> {
        let timeout = left.map_or(self.settings.timeout, |left| left.min(self.settings.timeout));
        let mut builder = Request::builder()
            .method(method)
            .uri(self.settings.url(path))
            .header(self.auth_header, &self.auth_value);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut failure: Option<Arc<OnceLock<String>>> = None;
        let send_body = match body {
            OutBody::None => SendBody::none(),
            OutBody::Bytes(bytes, content_type) => {
                if !content_type.is_empty() {
                    builder = builder.header("content-type", content_type);
                }
                builder = builder.header("content-length", bytes.len());
                SendBody::from_owned_reader(io::Cursor::new(bytes))
            }
            OutBody::Multipart(form) => {
                builder = builder.header("content-type", form.content_type());
                let reader = form.into_reader().map_err(|error| self.internal(what, error))?;
                builder = builder.header("content-length", reader.len());
                failure = Some(reader.failure_slot());
                SendBody::from_owned_reader(reader)
            }
            OutBody::Streamed(form) => {
                builder = builder.header("content-type", form.content_type());
                let request = builder
                    .body(SendBody::from_reader(form))
                    .map_err(|error| self.internal(what, error))?;
                // No bound on the whole call (the body lasts as long as the client sends it),
                // but on each write and read: an upstream that stops taking the body, or
                // answers and then stalls, fails the call instead of holding its thread.
                let timeout = Some(self.settings.timeout);
                let request = self
                    .agent
                    .configure_request(request)
                    .timeout_global(None)
                    .timeout_per_write(timeout)
                    .timeout_per_read(timeout)
                    .timeout_recv_response(timeout)
                    .timeout_recv_body(timeout)
                    .build();
                let response = self
                    .agent
                    .run(request)
                    .map_err(|error| self.transport_error(what, error))?;
                return self.read_reply(what, response);
            }
        };
        let request = builder
            .body(send_body)
            .map_err(|error| self.internal(what, error))?;
        let request = self
            .agent
            .configure_request(request)
            .timeout_global(Some(timeout))
            .build();
        let response = self.agent.run(request).map_err(|error| {
            if let Some(local) = failure.as_ref().and_then(|slot| slot.get()) {
                return self.internal(what, local);
            }
            self.transport_error(what, error)
        })?;
        self.read_reply(what, response)
    }

    fn read_reply(&self, what: &str, response: Response<Body>) -> Result<Reply, PluginError> {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let limit = if (200..300).contains(&status) {
            MAX_REPLY_BYTES
        } else {
            MAX_ERROR_BYTES
        };
        let mut bytes = Vec::new();
        let mut body = response.into_body();
        let read = body.as_reader().take(limit + 1).read_to_end(&mut bytes);
        match read {
            Ok(_) if (200..300).contains(&status) && bytes.len() as u64 > limit => {
                return Err(self.internal(what, format!("HTTP {status} answer larger than {limit} bytes")));
            }
            Ok(_) => {}
            // An error answer whose body breaks off still has its status.
            Err(_) if !(200..300).contains(&status) => {}
            // A success whose body breaks off or stalls: the upstream has taken the request,
            // maybe stored the file. Not worth a retry (`Internal`), which would store it
            // again at a vendor that cannot delete.
            Err(error) => {
                let cause = sanitize(&ureq::Error::from(error).to_string(), 200);
                let mut error = self.internal(
                    what,
                    format!(
                        "HTTP {status} answer broke off ({cause}); not tried again: the upstream may hold it"
                    ),
                );
                error.status = Some(status);
                return Err(error);
            }
        }
        bytes.truncate(limit as usize);
        classify(
            &self.context(what),
            status,
            retry_after.as_deref(),
            &bytes,
            self.settings.api_key(),
        )
    }

    fn transport_error(&self, what: &str, error: ureq::Error) -> PluginError {
        let context = self.context(what);
        match error {
            ureq::Error::Timeout(which) => PluginError::new(
                ErrorKind::Timeout,
                format!(
                    "{context}: timed out ({which}; connect_timeout {:?}, timeout {:?})",
                    self.settings.connect_timeout, self.settings.timeout
                ),
            ),
            ureq::Error::Io(error) => self.io_error(what, error),
            ureq::Error::BadUri(_) | ureq::Error::Http(_) | ureq::Error::BodyExceedsLimit(_) => {
                self.internal(what, sanitize(&error.to_string(), 200))
            }
            // The upstream answered, but not in HTTP that can be read: it has had the request
            // (maybe stored the file), so this is not worth a retry either.
            ureq::Error::Protocol(_) | ureq::Error::LargeResponseHeader(..) => self.internal(
                what,
                format!(
                    "a malformed answer ({}); not tried again: the upstream may hold it",
                    sanitize(&error.to_string(), 200)
                ),
            ),
            other => PluginError::new(
                ErrorKind::Unavailable,
                format!("{context}: {}", sanitize(&other.to_string(), 200)),
            ),
        }
    }

    fn io_error(&self, what: &str, error: io::Error) -> PluginError {
        let context = self.context(what);
        let kind = match error.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ErrorKind::Timeout,
            _ => ErrorKind::Unavailable,
        };
        PluginError::new(kind, format!("{context}: {}", sanitize(&error.to_string(), 200)))
    }
}

/// Reads the PEM certificates of `ca_file`; none is a configuration error.
fn load_ca_file(settings: &UpstreamSettings) -> Result<Vec<Certificate<'static>>, PluginError> {
    let Some(path) = &settings.ca_file else {
        return Ok(Vec::new());
    };
    let config = |message: String| PluginError::new(ErrorKind::Config, message);
    let pem = std::fs::read(path).map_err(|error| {
        config(format!(
            "setting `ca_file`: cannot read {}: {error}",
            path.display()
        ))
    })?;
    let mut certificates = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(certificate)) => certificates.push(certificate),
            Ok(_) => {}
            Err(error) => {
                return Err(config(format!(
                    "setting `ca_file`: bad PEM in {}: {error}",
                    path.display()
                )));
            }
        }
    }
    if certificates.is_empty() {
        return Err(config(format!(
            "setting `ca_file`: no certificate in {}",
            path.display()
        )));
    }
    Ok(certificates)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for group in bytes.chunks(3) {
            let n = group
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..4 {
                if i <= group.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn with_ca(path: &std::path::Path) -> Result<Upstream, PluginError> {
        let settings = UpstreamSettings::parse(
            &upgate_plugin_api::InitContext::default(),
            json!({"base_url": "https://upstream.internal", "api_key": "k", "ca_file": path}),
            &[],
        )?;
        Upstream::new("test", settings, Auth::header("x-api-key"))
    }

    #[test]
    fn ca_file_is_loaded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let der = webpki_root_certs::TLS_SERVER_ROOT_CERTS[0].as_ref();
        let body: Vec<String> = base64(der)
            .as_bytes()
            .chunks(64)
            .map(|line| String::from_utf8_lossy(line).into_owned())
            .collect();
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            body.join("\n")
        );
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, pem).unwrap();
        let upstream = with_ca(&ca).unwrap();
        upstream.health().unwrap();
        std::fs::remove_file(&ca).unwrap();
        assert_eq!(upstream.health().unwrap_err().kind, ErrorKind::Config);

        assert_eq!(with_ca(&ca).unwrap_err().kind, ErrorKind::Config);
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let error = with_ca(&empty).unwrap_err();
        assert!(error.message.contains("no certificate"), "{}", error.message);
    }
}

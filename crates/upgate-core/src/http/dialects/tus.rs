//! The tus 1.0 dialect: resumable uploads at `/files/` (tusd's base path), key in
//! `Authorization: Bearer` on every request.
//!
//! What flows through here: tus requests, their headers parsed and checked here
//! (`Tus-Resumable`, `Upload-Length` or `Upload-Defer-Length`, `Upload-Metadata`,
//! `Upload-Offset`, `Upload-Checksum`, `Upload-Concat`, `X-HTTP-Method-Override`) and turned
//! into calls on the shared resumable flow ([`crate::upload::resumable`]); its answers as
//! tus headers (`Location`, `Upload-Offset`, `Upload-Expires`, ...), with upgate's upload id
//! and the provider's URL (`Upgate-Upload-Id`, `Upgate-Upload-Url`) once an upload is
//! complete. Errors are short plain text with the statuses the protocol names. Extensions:
//! creation, creation-with-upload, creation-defer-length, termination, checksum (sha1, md5,
//! sha256), expiration, concatenation.

use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::web::{self, Payload};
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

use super::{Dialect, DialectName, Routes, SentTwice, Work, admit, admit_for, header_once};
use crate::error::ApiError;
use crate::http::respond::{DialectError, answer};
use crate::store::{Concat, SessionRecord, UploadRecord};
use crate::upload::resumable::{Append, Checksum, Completion, Creation, MAX_PARTS, Progress};
use crate::upload::{Gateway, Metadata};

pub(crate) struct Tus;

/// The protocol version upgate speaks.
pub(crate) const TUS_VERSION: &str = "1.0.0";
const EXTENSIONS: &str =
    "creation,creation-with-upload,creation-defer-length,termination,checksum,expiration,concatenation";
const CHECKSUM_ALGORITHMS: &str = "sha1,md5,sha256";
const OFFSET_STREAM: &str = "application/offset+octet-stream";
/// Most `Upload-Metadata` pairs, and bytes of the header.
const MAX_METADATA_PAIRS: usize = 32;
const MAX_METADATA_BYTES: usize = 8 * 1024;
/// The base path; uploads are `/files/<id>`.
pub(crate) const BASE: &str = "/files/";

/// The request headers tus clients send, for CORS preflights.
pub(crate) const REQUEST_HEADERS: &[&str] = &[
    "tus-resumable",
    "upload-length",
    "upload-defer-length",
    "upload-metadata",
    "upload-offset",
    "upload-checksum",
    "upload-concat",
    "x-http-method-override",
    "x-requested-with",
];

/// The answer headers a browser client must be able to read.
pub(crate) const RESPONSE_HEADERS: &[&str] = &[
    "location",
    "upload-offset",
    "upload-length",
    "upload-defer-length",
    "upload-metadata",
    "upload-expires",
    "upload-concat",
    "tus-resumable",
    "tus-version",
    "tus-extension",
    "tus-max-size",
    "tus-checksum-algorithm",
    "upgate-upload-id",
    "upgate-upload-url",
];

pub(crate) fn routes(routes: &mut Routes) {
    // After Dify's `POST /files/upload`: a PATCH, HEAD or DELETE there reaches these routes,
    // and `upload` is never a tus id.
    routes
        .add(Method::POST, "/files", create)
        .add(Method::POST, BASE, create)
        .add(Method::OPTIONS, "/files", options)
        .add(Method::OPTIONS, BASE, options)
        .add(Method::OPTIONS, "/files/{id}", options)
        .add(Method::HEAD, "/files/{id}", head)
        .add(Method::PATCH, "/files/{id}", patch)
        .add(Method::DELETE, "/files/{id}", terminate)
        .add(Method::POST, "/files/{id}", overridden);
}

/// `Tus-Resumable` must name the version upgate speaks, once.
fn check_version(request: &HttpRequest) -> Result<(), ApiError> {
    match header_text(request.headers(), "tus-resumable")? {
        Some(TUS_VERSION) => Ok(()),
        _ => Err(ApiError::UnsupportedVersion),
    }
}

/// A tus header's one value, trimmed. Sent twice it is malformed: which copy counts would
/// depend on who reads it (a proxy in front may read the other one).
fn header_text<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, ApiError> {
    let Some(value) = header_once(headers, name)
        .map_err(|SentTwice| ApiError::Malformed(format!("{name} is given twice")))?
    else {
        return Ok(None);
    };
    value
        .to_str()
        .map(|text| Some(text.trim()))
        .map_err(|_| ApiError::Malformed(format!("{name} is not visible ASCII")))
}

/// A non-negative integer header (`Upload-Length`, `Upload-Offset`).
fn number_header(headers: &HeaderMap, name: &'static str) -> Result<Option<u64>, ApiError> {
    header_text(headers, name)?
        .map(|text| {
            text.parse::<u64>()
                .ok()
                .filter(|_| text.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| ApiError::Malformed(format!("{name} must be a non-negative integer")))
        })
        .transpose()
}

/// `Upload-Metadata`: `key base64value` pairs, comma separated. Out: the filename (from
/// `filename` or `name`), and every pair as metadata (`filetype` or `type` included).
fn parse_metadata(headers: &HeaderMap) -> Result<(Option<String>, Metadata), ApiError> {
    let mut metadata = Metadata::new();
    let Some(text) = header_text(headers, "upload-metadata")? else {
        return Ok((None, metadata));
    };
    if text.len() > MAX_METADATA_BYTES {
        return Err(ApiError::Malformed("Upload-Metadata is too long".into()));
    }
    for pair in text.split(',').map(str::trim).filter(|pair| !pair.is_empty()) {
        let (key, encoded) = pair.split_once(' ').unwrap_or((pair, ""));
        if key.is_empty() || key.len() > 64 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiError::Malformed(
                "an Upload-Metadata key is not a token".into(),
            ));
        }
        let decoded = BASE64
            .decode(encoded.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| {
                ApiError::Malformed(format!("Upload-Metadata `{key}` is not base64 of UTF-8 text"))
            })?;
        if metadata.insert(key.to_owned(), decoded.into()).is_some() {
            return Err(ApiError::Malformed(format!(
                "Upload-Metadata `{key}` is given twice"
            )));
        }
        if metadata.len() > MAX_METADATA_PAIRS {
            return Err(ApiError::Malformed("Upload-Metadata has too many pairs".into()));
        }
    }
    let filename = ["filename", "name"]
        .iter()
        .find_map(|key| metadata.get(*key).and_then(Value::as_str))
        .map(str::to_owned);
    Ok((filename, metadata))
}

/// The metadata as `Upload-Metadata` again.
fn encode_metadata(metadata: &Metadata) -> String {
    metadata
        .iter()
        .filter_map(|(key, value)| {
            value
                .as_str()
                .map(|text| format!("{key} {}", BASE64.encode(text)))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `Upload-Checksum: <algorithm> <base64 digest>`.
fn parse_checksum(headers: &HeaderMap) -> Result<Option<Checksum>, ApiError> {
    let Some(text) = header_text(headers, "upload-checksum")? else {
        return Ok(None);
    };
    let (algorithm, encoded) = text
        .split_once(' ')
        .ok_or_else(|| ApiError::Malformed("Upload-Checksum is `<algorithm> <base64 digest>`".into()))?;
    let digest = BASE64
        .decode(encoded.trim())
        .map_err(|_| ApiError::Malformed("the Upload-Checksum digest is not base64".into()))?;
    let (checksum, size) = match algorithm {
        "sha1" => (Checksum::Sha1(digest), 20),
        "md5" => (Checksum::Md5(digest), 16),
        "sha256" => (Checksum::Sha256(digest), 32),
        _ => {
            return Err(ApiError::Malformed(format!(
                "unsupported checksum algorithm (supported: {CHECKSUM_ALGORITHMS})"
            )));
        }
    };
    match &checksum {
        Checksum::Sha1(bytes) | Checksum::Md5(bytes) | Checksum::Sha256(bytes) if bytes.len() != size => Err(
            ApiError::Malformed("the Upload-Checksum digest has the wrong length".into()),
        ),
        _ => Ok(Some(checksum)),
    }
}

/// The upload ids of `Upload-Concat: final;/files/a /files/b` (absolute URLs too).
fn final_parts(value: &str) -> Result<Vec<String>, ApiError> {
    let parts: Vec<String> = value
        .split(' ')
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    if parts.is_empty()
        || parts.len() > MAX_PARTS
        || parts.iter().any(|id| !DialectName::Tus.is_valid_upload_id(id))
    {
        return Err(ApiError::Malformed(
            "Upload-Concat: final; names upload URLs of this server".into(),
        ));
    }
    Ok(parts)
}

fn content_type_is_offset_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(';').next().unwrap_or("").trim() == OFFSET_STREAM)
}

/// Whether the request has a body: a non-zero Content-Length, or a chunked body that says
/// what it is (an empty POST that a client sends chunked, with no Content-Type, is none).
fn has_body(headers: &HeaderMap) -> bool {
    match headers.get(header::CONTENT_LENGTH) {
        Some(length) => {
            length
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                != Some(0)
        }
        None => headers.contains_key(header::TRANSFER_ENCODING) && headers.contains_key(header::CONTENT_TYPE),
    }
}

/// A success answer with the tus headers every answer carries.
fn tus_answer(status: StatusCode) -> HttpResponseBuilder {
    let mut response = HttpResponse::build(status);
    response.insert_header(("Tus-Resumable", TUS_VERSION));
    response
}

/// Adds where the upload stands: offset, expiry, and what a completed upload became.
fn progress_headers(response: &mut HttpResponseBuilder, upload: &SessionRecord, records: &[UploadRecord]) {
    response
        .insert_header(("Upload-Offset", upload.offset().to_string()))
        .insert_header(("Upload-Expires", http_date(upload.expires_at_ms)));
    if let Some(id) = records
        .first()
        .map(|record| record.id.as_str())
        .or(upload.upload_id.as_deref())
    {
        response.insert_header(("Upgate-Upload-Id", id.to_owned()));
    }
    if let Some(url) = records.first().and_then(|record| record.remote_url.as_deref())
        && let Ok(value) = HeaderValue::from_str(url)
    {
        response.insert_header(("Upgate-Upload-Url", value));
    }
}

fn http_date(epoch_ms: i64) -> String {
    httpdate::fmt_http_date(crate::vocab::stored_time(epoch_ms))
}

/// The answer for an upload's request log line: the records it made.
fn with_records(mut response: HttpResponseBuilder, records: &[UploadRecord]) -> HttpResponse {
    crate::http::respond::log_uploads(&mut response, records);
    response.finish()
}

async fn options(request: HttpRequest, gateway: web::Data<Gateway>) -> HttpResponse {
    let mut response = tus_answer(StatusCode::NO_CONTENT);
    response
        .insert_header(("Tus-Version", TUS_VERSION))
        .insert_header(("Tus-Extension", EXTENSIONS))
        .insert_header(("Tus-Checksum-Algorithm", CHECKSUM_ALGORITHMS));
    // The plan's limit, for a client that says who it is: admitted like any request (its
    // key's rate, the tenant logged), so that OPTIONS is no faster way to try keys than the
    // rest. Any refusal just leaves the limit out.
    if Tus.credentials(&request).is_ok()
        && let Ok(admission) = admit_for(&gateway, &Tus, &request, Work::Lookup).await
    {
        response.insert_header(("Tus-Max-Size", admission.tenant.plan.max_file_size().to_string()));
    }
    response.finish()
}

async fn create(
    request: HttpRequest,
    payload: Payload,
    gateway: web::Data<Gateway>,
) -> Result<HttpResponse, DialectError> {
    answer(DialectName::Tus, async move {
        check_version(&request)?;
        let admission = admit(&gateway, &Tus, &request).await?;
        let headers = request.headers();
        let (filename, metadata) = parse_metadata(headers)?;
        let concat = header_text(headers, "upload-concat")?;
        let progress = if let Some(parts) = concat.and_then(|value| value.strip_prefix("final;")) {
            if headers.contains_key("upload-length")
                || headers.contains_key("upload-defer-length")
                || has_body(headers)
            {
                return Err(ApiError::Malformed(
                    "a final upload has neither Upload-Length, Upload-Defer-Length nor a body".into(),
                ));
            }
            gateway
                .concatenate(&admission, final_parts(parts)?, filename, metadata)
                .await?
        } else {
            let partial = match concat {
                None => false,
                Some("partial") => true,
                Some(_) => {
                    return Err(ApiError::Malformed(
                        "Upload-Concat is `partial` or `final;<urls>`".into(),
                    ));
                }
            };
            let length = number_header(headers, "upload-length")?;
            let deferred = header_text(headers, "upload-defer-length")?;
            match (length, deferred) {
                (Some(_), None) | (None, Some("1")) => {}
                (Some(_), Some(_)) => {
                    return Err(ApiError::Malformed(
                        "Upload-Length and Upload-Defer-Length exclude each other".into(),
                    ));
                }
                (None, Some(_)) => return Err(ApiError::Malformed("Upload-Defer-Length must be 1".into())),
                (None, None) => return Err(ApiError::MissingField("Upload-Length")),
            }
            let body = has_body(headers);
            if body && !content_type_is_offset_stream(headers) {
                return Err(ApiError::WrongContentType);
            }
            let checksum = if body { parse_checksum(headers)? } else { None };
            let creation = Creation {
                length,
                filename,
                metadata,
                partial,
            };
            // An upload of 0 bytes is whole as soon as it is created, body or not: clients
            // (tus-js-client) send no PATCH for an empty file.
            let whole = !creation.partial
                && checksum.is_none()
                && match creation.length {
                    Some(0) => true,
                    Some(length) => body && crate::upload::intake::content_length(headers) == Some(length),
                    None => false,
                };
            if whole {
                gateway
                    .create_whole_resumable(&admission, creation, payload)
                    .await?
            } else {
                let upload = gateway.create_resumable(&admission, creation).await?;
                if body {
                    let append = Append {
                        offset: 0,
                        length: None,
                        checksum,
                    };
                    match gateway
                        .append_resumable(&admission, &upload.id, append, payload)
                        .await
                    {
                        Ok(progress) => progress,
                        Err(error) => {
                            // Refused, the answer carries no Location: nobody could resume or
                            // terminate the upload, so it goes now instead of at its expiry.
                            let _ = gateway.terminate_resumable(&admission, &upload.id).await;
                            return Err(error);
                        }
                    }
                } else {
                    Progress {
                        upload,
                        records: Vec::new(),
                    }
                }
            }
        };
        let mut response = tus_answer(StatusCode::CREATED);
        response.insert_header((header::LOCATION, format!("{BASE}{}", progress.upload.id)));
        progress_headers(&mut response, &progress.upload, &progress.records);
        Ok(with_records(response, &progress.records))
    })
    .await
}

async fn head(request: HttpRequest, gateway: web::Data<Gateway>) -> Result<HttpResponse, DialectError> {
    answer(DialectName::Tus, async move {
        check_version(&request)?;
        let admission = admit_for(&gateway, &Tus, &request, Work::Lookup).await?;
        let id = request.match_info().get("id").unwrap_or_default();
        let mut upload = gateway.resumable(&admission, id).await?;
        let mut records = Vec::new();
        match gateway.completion_due(&admission, &upload).await? {
            // Every byte is here but no upload was made of them (its last PATCH failed, or
            // the daemon died during it). A client that sees its offset at the length asks
            // nothing more (tus-js-client resumes with this HEAD alone), so the upload is
            // completed now, admitted like a PATCH (its key's rate taken once); a failure
            // is this answer's status.
            Completion::Due => {
                let admission = gateway.for_upload(admission).await?;
                let progress = gateway.finish_resumable(&admission, id).await?;
                (upload, records) = (progress.upload, progress.records);
            }
            // Another request is completing it: 423, which tus clients retry (any other
            // refusal of a HEAD makes tus-js-client start over).
            Completion::Running => return Err(ApiError::UploadLocked),
            Completion::NotDue => {}
        }
        let mut response = tus_answer(StatusCode::OK);
        response.insert_header((header::CACHE_CONTROL, "no-store"));
        progress_headers(&mut response, &upload, &records);
        match upload.length() {
            Some(length) => response.insert_header(("Upload-Length", length.to_string())),
            None => response.insert_header(("Upload-Defer-Length", "1")),
        };
        let metadata = encode_metadata(&upload.metadata);
        if !metadata.is_empty()
            && let Ok(value) = HeaderValue::from_str(&metadata)
        {
            response.insert_header(("Upload-Metadata", value));
        }
        match &upload.concat {
            Some(Concat::Partial) => {
                response.insert_header(("Upload-Concat", "partial"));
            }
            Some(Concat::Final { parts }) if parts.is_empty() => {
                response.insert_header(("Upload-Concat", "final"));
            }
            Some(Concat::Final { parts }) => {
                let urls: Vec<String> = parts.iter().map(|part| format!("{BASE}{part}")).collect();
                response.insert_header(("Upload-Concat", format!("final;{}", urls.join(" "))));
            }
            None => {}
        }
        Ok(with_records(response, &records))
    })
    .await
}

async fn patch(
    request: HttpRequest,
    payload: Payload,
    gateway: web::Data<Gateway>,
) -> Result<HttpResponse, DialectError> {
    answer(DialectName::Tus, async move {
        check_version(&request)?;
        let admission = admit(&gateway, &Tus, &request).await?;
        let headers = request.headers();
        if !content_type_is_offset_stream(headers) {
            return Err(ApiError::WrongContentType);
        }
        let append = Append {
            offset: number_header(headers, "upload-offset")?
                .ok_or(ApiError::MissingField("Upload-Offset"))?,
            length: number_header(headers, "upload-length")?,
            checksum: parse_checksum(headers)?,
        };
        let id = request.match_info().get("id").unwrap_or_default();
        let progress = gateway.append_resumable(&admission, id, append, payload).await?;
        let mut response = tus_answer(StatusCode::NO_CONTENT);
        progress_headers(&mut response, &progress.upload, &progress.records);
        Ok(with_records(response, &progress.records))
    })
    .await
}

async fn terminate(request: HttpRequest, gateway: web::Data<Gateway>) -> Result<HttpResponse, DialectError> {
    answer(DialectName::Tus, async move {
        check_version(&request)?;
        let admission = admit_for(&gateway, &Tus, &request, Work::Lookup).await?;
        let id = request.match_info().get("id").unwrap_or_default();
        gateway.terminate_resumable(&admission, id).await?;
        Ok(tus_answer(StatusCode::NO_CONTENT).finish())
    })
    .await
}

/// `POST /files/{id}` with `X-HTTP-Method-Override`, for clients that cannot send PATCH,
/// HEAD or DELETE.
async fn overridden(
    request: HttpRequest,
    payload: Payload,
    gateway: web::Data<Gateway>,
) -> Result<HttpResponse, DialectError> {
    let method = request
        .headers()
        .get("x-http-method-override")
        .and_then(|value| value.to_str().ok())
        .map(str::to_ascii_uppercase);
    match method.as_deref() {
        Some("PATCH") => patch(request, payload, gateway).await,
        Some("DELETE") => terminate(request, gateway).await,
        Some("HEAD") => head(request, gateway).await,
        _ => Err(DialectError::new(
            DialectName::Tus,
            ApiError::Malformed(
                "POST on an upload needs X-HTTP-Method-Override: PATCH, HEAD or DELETE".into(),
            ),
        )),
    }
}

impl Dialect for Tus {
    fn name(&self) -> DialectName {
        DialectName::Tus
    }

    fn credentials(&self, request: &HttpRequest) -> Result<String, ApiError> {
        super::authorization_key(request, "Bearer")
    }

    fn www_authenticate(&self) -> Option<&'static str> {
        Some("Bearer")
    }

    fn error_body(&self, error: &ApiError, _status: StatusCode) -> Value {
        Value::String(match error {
            ApiError::OffsetMismatch { offset } => {
                format!("Upload-Offset does not match the upload's offset {offset}")
            }
            ApiError::UnsupportedVersion => format!("Tus-Resumable must be {TUS_VERSION}"),
            other => super::plain_message(other),
        })
    }

    /// Plain text, with `Tus-Resumable` (and `Tus-Version` for a version refused).
    fn render_error(
        &self,
        error: &ApiError,
        status: StatusCode,
        mut response: HttpResponseBuilder,
    ) -> HttpResponse {
        response.insert_header(("Tus-Resumable", TUS_VERSION));
        if *error == ApiError::UnsupportedVersion {
            response.insert_header(("Tus-Version", TUS_VERSION));
        }
        if let ApiError::OffsetMismatch { offset } = error {
            response.insert_header(("Upload-Offset", offset.to_string()));
        }
        let text = match self.error_body(error, status) {
            Value::String(text) => text,
            other => other.to_string(),
        };
        response
            .content_type("text/plain; charset=utf-8")
            .body(format!("{text}\n"))
    }
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut request = TestRequest::default();
        for (name, value) in pairs {
            request = request.append_header((*name, *value));
        }
        request.to_http_request().headers().clone()
    }

    #[test]
    fn metadata_pairs() {
        let (filename, metadata) = parse_metadata(&headers(&[(
            "upload-metadata",
            "filename cmVwb3J0LnBkZg==,filetype YXBwbGljYXRpb24vcGRm,empty",
        )]))
        .unwrap();
        assert_eq!(filename.as_deref(), Some("report.pdf"));
        assert_eq!(metadata["filetype"], "application/pdf");
        assert_eq!(metadata["empty"], "");
        assert_eq!(
            encode_metadata(&metadata),
            "empty ,filename cmVwb3J0LnBkZg==,filetype YXBwbGljYXRpb24vcGRm"
        );
        assert!(parse_metadata(&headers(&[("upload-metadata", "filename !!!")])).is_err());
        assert!(parse_metadata(&headers(&[("upload-metadata", "a YQ==,a YQ==")])).is_err());
        let many: Vec<String> = (0..40).map(|i| format!("k{i} YQ==")).collect();
        assert!(parse_metadata(&headers(&[("upload-metadata", &many.join(","))])).is_err());
    }

    #[test]
    fn checksums_and_numbers() {
        let sha1 = parse_checksum(&headers(&[(
            "upload-checksum",
            "sha1 Kq5sNclPz7QV2+lfQIuc6R7oRu0=",
        )]))
        .unwrap()
        .unwrap();
        assert!(matches!(sha1, Checksum::Sha1(bytes) if bytes.len() == 20));
        assert!(parse_checksum(&headers(&[("upload-checksum", "crc32 AAAA")])).is_err());
        assert!(parse_checksum(&headers(&[("upload-checksum", "md5 AAAA")])).is_err());
        assert_eq!(
            number_header(&headers(&[("upload-offset", "42")]), "upload-offset").unwrap(),
            Some(42)
        );
        assert!(number_header(&headers(&[("upload-offset", "-1")]), "upload-offset").is_err());
        assert!(number_header(&headers(&[("upload-offset", "+1")]), "upload-offset").is_err());
        // Twice, even with the same value: which copy counts is not for a reader to pick.
        let twice = headers(&[("upload-offset", "0"), ("upload-offset", "0")]);
        assert!(number_header(&twice, "upload-offset").is_err());
        let twice = headers(&[("upload-metadata", "a YQ=="), ("upload-metadata", "b YQ==")]);
        assert!(parse_metadata(&twice).is_err());
    }

    #[test]
    fn final_parts_are_ids() {
        let id = DialectName::Tus.new_upload_id();
        assert_eq!(
            final_parts(&format!("/files/{id} http://h/files/{id}")).unwrap(),
            vec![id.clone(), id]
        );
        assert!(final_parts("/files/../../etc").is_err());
        assert!(final_parts("").is_err());
    }
}

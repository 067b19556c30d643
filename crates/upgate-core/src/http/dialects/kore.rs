//! The kore dialect (Kore.ai agent platform public files), `X-api-key` header.
//!
//! What flows through here: single uploads, `POST /api/public/files` (multipart `file` and a
//! required `fileContext`), handed to the shared gateway flow and answered 200
//! `{fileId, url}` (fileId: the upload's 24 hex digits); and chunked uploads: a JSON
//! `session/start` declaring the file (`fileContext, totalChunks, fileExtension, fileName,
//! fileSize`, checked against the plan) answered `{sessionId, expirationDate}`, multipart
//! chunks (`file` + 0-based `chunkNumber`) answered `{chunkNumber, sessionId}`, and
//! `session/{sessionId}/complete`, which assembles the chunks into one upload and answers
//! like a single upload. Sessions, chunks and their checks are the shared
//! [`crate::sessions`]; this module parses kore's requests and renders its answers. Errors
//! are `{"errors": [{"msg", "code"}]}`.

use actix_web::http::{Method, StatusCode};
use actix_web::web::{self, Payload};
use actix_web::{HttpRequest, HttpResponse};
use serde_json::{Map, Value, json};

use super::{
    Dialect, DialectName, Routes, admit, errors_body, file_url, iso_millis, plain_message, read_json,
    upload_multipart,
};
use crate::error::ApiError;
use crate::http::respond::{DialectError, answer, uploaded};
use crate::store::UploadRecord;
use crate::upload::chunked::{ChunkForm, MAX_CHUNKS, NewSession};
use crate::upload::intake::{FormSpec, extension_of};
use crate::upload::{Gateway, Metadata};

pub(crate) struct Kore;

const FORM: FormSpec = FormSpec {
    file_fields: &["file"],
    max_files: 1,
    text_fields: &["fileContext"],
};

const CHUNK_FORM: ChunkForm = ChunkForm {
    file_field: "file",
    number_field: "chunkNumber",
};

/// Largest `session/start` body.
/// Most missing chunk numbers named in one error message.
const MISSING_NAMED: usize = 100;

pub(crate) fn routes(routes: &mut Routes) {
    // `start` before `{sessionId}`: routes match in registration order.
    routes
        .add(Method::POST, "/api/public/files", upload)
        .add(Method::POST, "/api/public/files/session/start", start)
        .add(Method::POST, "/api/public/files/session/{sessionId}", chunk)
        .add(
            Method::POST,
            "/api/public/files/session/{sessionId}/complete",
            complete,
        );
}

fn file_object(record: &UploadRecord) -> Value {
    json!({ "fileId": record.id, "url": file_url(record) })
}

async fn upload(
    request: HttpRequest,
    payload: Payload,
    gateway: web::Data<Gateway>,
) -> Result<HttpResponse, DialectError> {
    answer(DialectName::Kore, async move {
        let records = upload_multipart(&gateway, &Kore, &request, payload, &FORM, |received| {
            let context = received
                .fields
                .get("fileContext")
                .map(|context| context.trim())
                .filter(|context| !context.is_empty())
                .ok_or(ApiError::MissingField("fileContext"))?;
            let mut metadata = Metadata::new();
            metadata.insert("fileContext".into(), context.into());
            Ok(metadata)
        })
        .await?;
        Ok(uploaded(StatusCode::OK, &records, file_object(&records[0])))
    })
    .await
}

async fn start(
    request: HttpRequest,
    payload: Payload,
    gateway: web::Data<Gateway>,
) -> Result<HttpResponse, DialectError> {
    answer(DialectName::Kore, async move {
        let admission = admit(&gateway, &Kore, &request).await?;
        let idle = admission.policy.config.server.idle_timeout.0;
        let body = read_json(payload, idle)
            .await?
            .ok_or_else(|| ApiError::Malformed("the body must be a JSON object".into()))?;
        let (new, declared_extension) = parse_start(&body)?;
        // Both the name's extension (checked by the session) and the declared one must be allowed.
        admission.tenant.plan.check_extension(&declared_extension)?;
        let session = gateway.start_session(&admission, new).await?;
        Ok(HttpResponse::Ok().json(json!({
            "sessionId": session.id,
            "expirationDate": iso_millis(session.expires_at_ms),
        })))
    })
    .await
}

async fn chunk(
    request: HttpRequest,
    payload: Payload,
    gateway: web::Data<Gateway>,
) -> Result<HttpResponse, DialectError> {
    answer(DialectName::Kore, async move {
        let admission = admit(&gateway, &Kore, &request).await?;
        let id = request.match_info().get("sessionId").unwrap_or_default();
        // The gateway validates the id (a uuid) before looking it up.
        let (number, _) = gateway
            .receive_chunk(&admission, id, request.headers(), payload, &CHUNK_FORM)
            .await?;
        Ok(HttpResponse::Ok().json(json!({ "chunkNumber": number, "sessionId": id })))
    })
    .await
}

async fn complete(request: HttpRequest, gateway: web::Data<Gateway>) -> Result<HttpResponse, DialectError> {
    answer(DialectName::Kore, async move {
        let gateway = gateway.into_inner();
        let admission = admit(&gateway, &Kore, &request).await?;
        let id = request.match_info().get("sessionId").unwrap_or_default();
        let records = gateway.complete_session(admission, id).await?;
        Ok(uploaded(StatusCode::OK, &records, file_object(&records[0])))
    })
    .await
}

fn text_field<'a>(object: &'a Map<String, Value>, key: &'static str) -> Result<&'a str, ApiError> {
    match object.get(key) {
        None | Some(Value::Null) => Err(ApiError::MissingField(key)),
        Some(Value::String(text)) if text.trim().is_empty() => Err(ApiError::MissingField(key)),
        Some(Value::String(text)) => Ok(text.trim()),
        Some(_) => Err(ApiError::InvalidField {
            field: key,
            message: "must be a string".into(),
        }),
    }
}

/// A non-negative integer, as a JSON number or a numeric string (JavaScript clients send
/// either).
fn number_field(object: &Map<String, Value>, key: &'static str) -> Result<u64, ApiError> {
    let invalid = || ApiError::InvalidField {
        field: key,
        message: "must be a non-negative integer".into(),
    };
    match object.get(key) {
        None | Some(Value::Null) => Err(ApiError::MissingField(key)),
        Some(Value::Number(number)) => number.as_u64().ok_or_else(invalid),
        Some(Value::String(text)) => text.trim().parse().map_err(|_| invalid()),
        Some(_) => Err(invalid()),
    }
}

/// The session a `session/start` body declares, and its `fileExtension` (lower case, no dot).
fn parse_start(body: &Value) -> Result<(NewSession, String), ApiError> {
    let object = body
        .as_object()
        .ok_or_else(|| ApiError::Malformed("the body must be a JSON object".into()))?;
    let context = text_field(object, "fileContext")?;
    let total_chunks = number_field(object, "totalChunks")?;
    if !(1..=MAX_CHUNKS).contains(&total_chunks) {
        return Err(ApiError::InvalidField {
            field: "totalChunks",
            message: format!("must be between 1 and {MAX_CHUNKS}"),
        });
    }
    let declared_extension = text_field(object, "fileExtension")?
        .trim_start_matches('.')
        .to_ascii_lowercase();
    if declared_extension.is_empty()
        || declared_extension.len() > 32
        || !declared_extension.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(ApiError::InvalidField {
            field: "fileExtension",
            message: "must be a file extension such as mp4".into(),
        });
    }
    let file_name = match object.get("fileName") {
        None | Some(Value::Null) => return Err(ApiError::MissingField("fileName")),
        Some(Value::String(name)) => name.clone(),
        Some(_) => {
            return Err(ApiError::InvalidField {
                field: "fileName",
                message: "must be a string".into(),
            });
        }
    };
    let file_size = number_field(object, "fileSize")?;
    // The name's own extension is what the content is checked against; a name without one
    // takes the declared extension.
    let extension = match extension_of(&file_name) {
        extension if extension.is_empty() => declared_extension.clone(),
        extension => extension,
    };
    let mut metadata = Metadata::new();
    metadata.insert("fileContext".into(), context.into());
    let new = NewSession {
        filename: file_name,
        extension,
        declared_size: file_size,
        total_chunks,
        metadata,
    };
    Ok((new, declared_extension))
}

fn missing_text(missing: &[u64]) -> String {
    let named: Vec<String> = missing.iter().take(MISSING_NAMED).map(u64::to_string).collect();
    let more = missing.len().saturating_sub(MISSING_NAMED);
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(
        "Chunks missing: {}{tail}. Upload them, then complete the session again.",
        named.join(", ")
    )
}

impl Dialect for Kore {
    fn name(&self) -> DialectName {
        DialectName::Kore
    }

    fn credentials(&self, request: &HttpRequest) -> Result<String, ApiError> {
        super::header_key(request, "x-api-key")
    }

    fn request_headers(&self) -> &'static [&'static str] {
        &["x-api-key"]
    }

    fn error_body(&self, error: &ApiError, status: StatusCode) -> Value {
        let message = match error {
            ApiError::NoFile => "file is required.".to_owned(),
            ApiError::TooManyFiles { .. } => "Only one file is allowed per request.".to_owned(),
            // Kore's only lookups are sessions.
            ApiError::NotFound => "Upload session not found: it does not exist, it expired and was removed, \
                                   or it belongs to another API key."
                .to_owned(),
            ApiError::SessionExpired => "The upload session has expired; start a new session.".to_owned(),
            ApiError::MissingChunks(missing) => missing_text(missing),
            other => plain_message(other),
        };
        errors_body(message, status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_bodies() {
        let body = json!({"fileContext": "bulkImport", "totalChunks": 3, "fileExtension": ".MP4",
            "fileName": "clip.mp4", "fileSize": "1000"});
        let (new, declared) = parse_start(&body).unwrap();
        assert_eq!(
            (new.total_chunks, new.declared_size, new.extension.as_str()),
            (3, 1000, "mp4")
        );
        assert_eq!(declared, "mp4");
        assert_eq!(new.metadata["fileContext"], "bulkImport");

        let without = |key: &str| {
            let mut body = body.clone();
            body.as_object_mut().unwrap().remove(key);
            parse_start(&body).unwrap_err()
        };
        assert_eq!(without("fileContext"), ApiError::MissingField("fileContext"));
        assert_eq!(without("fileSize"), ApiError::MissingField("fileSize"));
        assert_eq!(without("fileName"), ApiError::MissingField("fileName"));
        let mut zero = body.clone();
        zero["totalChunks"] = json!(0);
        assert!(matches!(
            parse_start(&zero),
            Err(ApiError::InvalidField {
                field: "totalChunks",
                ..
            })
        ));
        let mut negative = body.clone();
        negative["fileSize"] = json!(-1);
        assert!(matches!(
            parse_start(&negative),
            Err(ApiError::InvalidField {
                field: "fileSize",
                ..
            })
        ));
        let mut sneaky = body.clone();
        sneaky["fileExtension"] = json!("../x");
        assert!(parse_start(&sneaky).is_err());
        assert!(parse_start(&json!([1])).is_err());
    }

    #[test]
    fn missing_chunks_are_named_up_to_a_limit() {
        assert_eq!(
            missing_text(&[1, 3]),
            "Chunks missing: 1, 3. Upload them, then complete the session again."
        );
        let many: Vec<u64> = (0..250).collect();
        assert!(missing_text(&many).contains(", 99 and 150 more."));
    }
}

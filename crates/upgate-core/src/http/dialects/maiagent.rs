//! The maiagent dialect: `POST /api/v1/attachments-upload/`, `Authorization: Api-Key KEY`.
//!
//! What flows through here: a multipart body with one `file` part, handed to the shared
//! gateway flow; the stored record rendered as MaiAgent's 201 attachment
//! `{id, type, filename, file}` (`type` is the family of the detected MIME type, `filename`
//! the client's name byte for byte, `file` the upload's URL, never null), and errors in
//! Django REST framework's shapes: `{"detail": "..."}`, or field maps such as
//! `{"file": ["This field is required."]}` for 400s.

use actix_web::http::header::AUTHORIZATION;
use actix_web::http::{Method, StatusCode};
use actix_web::web::{self, Payload};
use actix_web::{HttpRequest, HttpResponse};
use serde_json::{Value, json};

use super::{
    Dialect, DialectName, Routes, file_url, plain_message, seconds, single_header, upload_multipart,
};
use crate::content;
use crate::error::ApiError;
use crate::http::respond::{DialectError, answer, uploaded};
use crate::store::UploadRecord;
use crate::upload::intake::FormSpec;
use crate::upload::{Gateway, Metadata};

pub(crate) struct Maiagent;

const FORM: FormSpec = FormSpec {
    file_fields: &["file"],
    max_files: 1,
    text_fields: &[],
};

pub(crate) fn routes(routes: &mut Routes) {
    // Django would redirect the path without the slash; answering it directly is kinder.
    routes
        .add(Method::POST, "/api/v1/attachments-upload/", upload)
        .add(Method::POST, "/api/v1/attachments-upload", upload);
}

async fn upload(
    request: HttpRequest,
    payload: Payload,
    gateway: web::Data<Gateway>,
) -> Result<HttpResponse, DialectError> {
    answer(DialectName::Maiagent, async move {
        let records = upload_multipart(&gateway, &Maiagent, &request, payload, &FORM, |_| {
            Ok(Metadata::new())
        })
        .await?;
        Ok(uploaded(StatusCode::CREATED, &records, attachment(&records[0])))
    })
    .await
}

fn attachment(record: &UploadRecord) -> Value {
    json!({
        "id": record.id,
        "type": content::family(&record.mime, &record.extension),
        "filename": record.filename,
        "file": file_url(record),
    })
}

/// A DRF field error map: `{field: [message]}`.
fn field_error(field: &str, message: String) -> Value {
    json!({ field: [message] })
}

impl Dialect for Maiagent {
    fn name(&self) -> DialectName {
        DialectName::Maiagent
    }

    /// `Authorization: Api-Key KEY` (scheme case-insensitive). The excerpt's own curl example
    /// sends the bare key (`Authorization: KEY`), so a value without a scheme is taken as the
    /// key too; any other scheme is malformed.
    fn credentials(&self, request: &HttpRequest) -> Result<String, ApiError> {
        let value = single_header(request, AUTHORIZATION)?;
        let text = value.to_str().map_err(|_| ApiError::MalformedCredentials)?.trim();
        if text.is_empty() {
            return Err(ApiError::MissingCredentials);
        }
        match text.split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("Api-Key") && !key.trim().is_empty() => {
                Ok(key.trim().to_owned())
            }
            Some(_) => Err(ApiError::MalformedCredentials),
            None => Ok(text.to_owned()),
        }
    }

    fn error_body(&self, error: &ApiError, _status: StatusCode) -> Value {
        let detail = |message: String| json!({ "detail": message });
        match error {
            ApiError::MissingCredentials => detail("Authentication credentials were not provided.".into()),
            ApiError::MalformedCredentials | ApiError::InvalidCredentials => {
                detail("Invalid API key format.".into())
            }
            ApiError::DialectNotAllowed => {
                detail("You do not have permission to perform this action.".into())
            }
            ApiError::NoFile => field_error("file", "This field is required.".into()),
            ApiError::TooManyFiles { .. } => {
                field_error("file", "Only one file may be uploaded per request.".into())
            }
            ApiError::EmptyFilename => field_error("file", "No filename could be determined.".into()),
            ApiError::InvalidFilename(_) => field_error("file", plain_message(error)),
            ApiError::MissingField(field) => field_error(field, "This field is required.".into()),
            ApiError::InvalidField { field, message } => field_error(field, message.clone()),
            ApiError::Throttled { retry_after_secs, .. } => detail(format!(
                "Request was throttled. Expected available in {}.",
                seconds(*retry_after_secs)
            )),
            other => detail(plain_message(other)),
        }
    }
}

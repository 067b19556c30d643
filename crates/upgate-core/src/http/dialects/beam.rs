//! The beam dialect (Beam Studio agent setup): `POST /agent-setup/upload`, headers
//! `x-api-key` and `current-workspace-id`.
//!
//! What flows through here: a multipart body with a `threadId` (uuid) and 1 to 10 `files`
//! parts, handed to the shared gateway flow as one request (one file failing policy fails
//! them all and nothing is kept), with the thread and workspace recorded as metadata; the
//! stored records rendered as Beam's 201 array, one chat-file object per file in order. The
//! `user` object carries only an `id` (a stable uuid derived from the tenant) and `name`
//! (the tenant's name): never the secrets the real API leaks. Errors are NestJS-shaped,
//! `{"statusCode", "message", "error"}`, and 401 is `{"message": "Unauthorized",
//! "statusCode": 401}`.

use actix_web::http::{Method, StatusCode};
use actix_web::web::{self, Payload};
use actix_web::{HttpRequest, HttpResponse};
use serde_json::{Value, json};

use super::{
    Dialect, DialectName, Routes, SentTwice, admit, derived_uuid, file_url, header_once, iso_millis,
    plain_message,
};
use crate::error::ApiError;
use crate::http::respond::{DialectError, answer, uploaded};
use crate::store::{UploadRecord, UploadState};
use crate::upload::intake::FormSpec;
use crate::upload::{Gateway, Metadata};

pub(crate) struct Beam;

const FORM: FormSpec = FormSpec {
    file_fields: &["files", "files.items"],
    max_files: 10,
    text_fields: &["threadId"],
};

const WORKSPACE_HEADER: &str = "current-workspace-id";

pub(crate) fn routes(routes: &mut Routes) {
    routes.add(Method::POST, "/agent-setup/upload", upload);
}

/// The workspace id header: required, at most 256 visible ASCII characters (no space),
/// neither `/` nor `\` among them and not `.` or `..`: it is echoed inside the path-shaped
/// `fileKey` (`uploads/<workspace>/<id>.<ext>`), so `../x` is no id.
fn workspace_id(request: &HttpRequest) -> Result<String, ApiError> {
    let invalid = || ApiError::InvalidField {
        field: WORKSPACE_HEADER,
        message: format!(
            "{WORKSPACE_HEADER} must be at most 256 visible ASCII characters, without `/`, `\\` or spaces"
        ),
    };
    let value = header_once(request.headers(), WORKSPACE_HEADER)
        .map_err(|SentTwice| ApiError::InvalidField {
            field: WORKSPACE_HEADER,
            message: format!("{WORKSPACE_HEADER} is given twice"),
        })?
        .ok_or(ApiError::MissingField(WORKSPACE_HEADER))?;
    let text = value.to_str().map_err(|_| invalid())?.trim();
    if text.is_empty() {
        return Err(ApiError::MissingField(WORKSPACE_HEADER));
    }
    let id_like = text
        .bytes()
        .all(|byte| byte.is_ascii_graphic() && !matches!(byte, b'/' | b'\\'));
    if text.len() > 256 || !id_like || matches!(text, "." | "..") {
        return Err(invalid());
    }
    Ok(text.to_owned())
}

async fn upload(
    request: HttpRequest,
    payload: Payload,
    gateway: web::Data<Gateway>,
) -> Result<HttpResponse, DialectError> {
    answer(DialectName::Beam, async move {
        let admission = admit(&gateway, &Beam, &request).await?;
        let workspace = workspace_id(&request)?;
        let mut metadata = Metadata::new();
        metadata.insert("workspaceId".into(), workspace.into());
        let received = gateway
            .receive(&admission, request.headers(), payload, &FORM, &metadata)
            .await?;
        let thread_id = received
            .fields
            .get("threadId")
            .map(|thread| thread.trim().to_owned())
            .filter(|thread| !thread.is_empty())
            .ok_or(ApiError::MissingField("threadId"))?;
        if thread_id.len() != 36 || uuid::Uuid::try_parse(&thread_id).is_err() {
            return Err(ApiError::InvalidField {
                field: "threadId",
                message: "threadId must be a UUID".into(),
            });
        }
        metadata.insert("threadId".into(), thread_id.into());
        let records = gateway.accept(&admission, received.files, metadata).await?;
        let files: Vec<Value> = records.iter().map(chat_file).collect();
        Ok(uploaded(StatusCode::CREATED, &records, files))
    })
    .await
}

fn chat_file(record: &UploadRecord) -> Value {
    let meta = |key: &str| record.metadata.get(key).and_then(Value::as_str).unwrap_or("");
    let status = match record.state {
        UploadState::Forwarded => "uploaded",
        UploadState::Received | UploadState::Delivering => "processing",
        UploadState::Failed | UploadState::Deleted => "failed",
    };
    let key = if record.extension.is_empty() {
        format!("uploads/{}/{}", meta("workspaceId"), record.id)
    } else {
        format!(
            "uploads/{}/{}.{}",
            meta("workspaceId"),
            record.id,
            record.extension
        )
    };
    let user_id = derived_uuid(&format!("beam-user:{}", record.tenant));
    json!({
        "name": record.filename,
        "threadId": meta("threadId"),
        "uploadStatus": status,
        "uploadSource": "file_upload",
        "id": record.id,
        "createdAt": iso_millis(record.created_at_ms),
        "updatedAt": iso_millis(record.updated_at_ms),
        "src": key,
        "fileKey": key,
        "url": file_url(record),
        "mimeType": record.mime,
        "userId": user_id,
        "user": { "id": user_id, "name": record.tenant },
    })
}

impl Dialect for Beam {
    fn name(&self) -> DialectName {
        DialectName::Beam
    }

    fn credentials(&self, request: &HttpRequest) -> Result<String, ApiError> {
        super::header_key(request, "x-api-key")
    }

    fn request_headers(&self) -> &'static [&'static str] {
        &["x-api-key", WORKSPACE_HEADER]
    }

    fn error_body(&self, error: &ApiError, status: StatusCode) -> Value {
        let message = match error {
            ApiError::MissingCredentials | ApiError::MalformedCredentials | ApiError::InvalidCredentials => {
                return json!({ "message": "Unauthorized", "statusCode": 401 });
            }
            ApiError::DialectNotAllowed => "Forbidden resource".to_owned(),
            // multer's answers.
            ApiError::TooManyFiles { .. } => "Unexpected field".to_owned(),
            ApiError::TooLarge { .. } => "File too large".to_owned(),
            ApiError::NoFile => "No files uploaded: send 1 to 10 file parts named `files`.".to_owned(),
            ApiError::MissingField(WORKSPACE_HEADER) => format!("{WORKSPACE_HEADER} header is required"),
            ApiError::MissingField(field) => format!("{field} should not be empty"),
            ApiError::InvalidField { message, .. } => message.clone(),
            other => plain_message(other),
        };
        json!({
            "statusCode": status.as_u16(),
            "message": message,
            "error": status.canonical_reason().unwrap_or("Error"),
        })
    }
}

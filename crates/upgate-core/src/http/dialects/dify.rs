//! The Dify dialect: `POST /v1/files/upload` (and `/files/upload`), `Authorization: Bearer`.
//!
//! What flows through here: a multipart body with one `file` part and an optional `user`
//! field, handed to the shared gateway flow; the stored record rendered as Dify's 201 file
//! object (never null in the fields typed SDKs require), and errors as
//! `{"code", "message", "status"}` with Dify's codes.

use actix_web::http::{Method, StatusCode};
use actix_web::web::{self, Payload};
use actix_web::{HttpRequest, HttpResponse};
use serde::Serialize;
use serde_json::{Value, json};

use super::{Dialect, DialectName, Routes, derived_uuid, plain_message, upload_multipart};
use crate::error::ApiError;
use crate::http::respond::{DialectError, answer, uploaded};
use crate::store::UploadRecord;
use crate::upload::intake::FormSpec;
use crate::upload::{Gateway, Metadata};

pub(crate) struct Dify;

const FORM: FormSpec = FormSpec {
    file_fields: &["file"],
    max_files: 1,
    text_fields: &["user"],
};

pub(crate) fn routes(routes: &mut Routes) {
    routes
        .add(Method::POST, "/v1/files/upload", upload)
        .add(Method::POST, "/files/upload", upload);
}

async fn upload(
    request: HttpRequest,
    payload: Payload,
    gateway: web::Data<Gateway>,
) -> Result<HttpResponse, DialectError> {
    answer(DialectName::Dify, async move {
        let records = upload_multipart(&gateway, &Dify, &request, payload, &FORM, |received| {
            let mut metadata = Metadata::new();
            if let Some(user) = received.fields.get("user") {
                metadata.insert("user".into(), user.clone().into());
            }
            Ok(metadata)
        })
        .await?;
        Ok(uploaded(StatusCode::CREATED, &records, file_object(&records[0])))
    })
    .await
}

/// Dify's file object, as its 201 answers it. Serialized straight from the record's fields:
/// no intermediate `serde_json::Value` map on the hot path.
#[derive(Serialize)]
struct FileObject<'a> {
    id: &'a str,
    name: &'a str,
    size: u64,
    extension: &'a str,
    mime_type: &'a str,
    created_by: String,
    created_at: i64,
    preview_url: Option<&'a str>,
    source_url: Option<&'a str>,
    original_url: Option<&'a str>,
    user_id: String,
    tenant_id: String,
    conversation_id: Option<&'a str>,
    file_key: String,
}

fn file_object(record: &UploadRecord) -> FileObject<'_> {
    let user = record.metadata.get("user").and_then(Value::as_str).unwrap_or("");
    let user_id = derived_uuid(&format!("user:{}:{user}", record.tenant));
    let tenant_id = derived_uuid(&format!("tenant:{}", record.tenant));
    let file_key = if record.extension.is_empty() {
        format!("upload_files/{tenant_id}/{}", record.id)
    } else {
        format!("upload_files/{tenant_id}/{}.{}", record.id, record.extension)
    };
    FileObject {
        id: &record.id,
        name: &record.filename,
        size: record.size,
        extension: &record.extension,
        mime_type: &record.mime,
        created_by: user_id.clone(),
        created_at: record.created_at_ms / 1000,
        preview_url: None,
        source_url: record.remote_url.as_deref(),
        original_url: None,
        user_id,
        tenant_id,
        conversation_id: None,
        file_key,
    }
}

impl Dialect for Dify {
    fn name(&self) -> DialectName {
        DialectName::Dify
    }

    fn credentials(&self, request: &HttpRequest) -> Result<String, ApiError> {
        super::authorization_key(request, "Bearer").map_err(|error| match error {
            // Dify answers a missing and a malformed header alike.
            ApiError::MalformedCredentials => ApiError::MissingCredentials,
            other => other,
        })
    }

    fn www_authenticate(&self) -> Option<&'static str> {
        Some("Bearer realm=\"api\"")
    }

    fn error_body(&self, error: &ApiError, status: StatusCode) -> Value {
        let (code, message) = match error {
            ApiError::MissingCredentials | ApiError::MalformedCredentials => (
                "unauthorized",
                "Authorization header must be provided and start with 'Bearer'".to_owned(),
            ),
            ApiError::InvalidCredentials => ("unauthorized", "Access token is invalid".to_owned()),
            ApiError::DialectNotAllowed => ("forbidden", "This API key may not use the Dify API.".to_owned()),
            ApiError::NoFile => ("no_file_uploaded", "Please upload your file.".to_owned()),
            ApiError::TooManyFiles { .. } => ("too_many_files", "Only one file is allowed.".to_owned()),
            ApiError::EmptyFilename => (
                "filename_not_exists_error",
                "The specified filename does not exist.".to_owned(),
            ),
            ApiError::UnsupportedType { .. } => {
                ("unsupported_file_type", "File type not allowed.".to_owned())
            }
            ApiError::ContentMismatch(reason) => (
                "unsupported_file_type",
                format!("File type not allowed: {reason}."),
            ),
            ApiError::TooLarge { limit } => (
                "file_too_large",
                format!("File size exceeded. The limit is {}.", super::limit_text(*limit)),
            ),
            ApiError::Throttled { .. } => ("too_many_requests", plain_message(error)),
            ApiError::InvalidFilename(_)
            | ApiError::MissingField(_)
            | ApiError::InvalidField { .. }
            | ApiError::Malformed(_)
            | ApiError::MissingChunks(_) => ("invalid_param", plain_message(error)),
            ApiError::NotFound | ApiError::NoSuchEndpoint | ApiError::SessionExpired => {
                ("not_found", plain_message(error))
            }
            ApiError::MethodNotAllowed { .. } => ("method_not_allowed", plain_message(error)),
            ApiError::UpstreamRejected { .. } => ("provider_rejected", plain_message(error)),
            ApiError::UpstreamFailed(_) => ("provider_error", plain_message(error)),
            ApiError::UpstreamTimeout => ("provider_timeout", plain_message(error)),
            ApiError::BodyTimeout | ApiError::HeadTimeout => ("request_timeout", plain_message(error)),
            ApiError::HeadTooLarge => ("invalid_param", plain_message(error)),
            ApiError::InsufficientStorage => ("insufficient_storage", plain_message(error)),
            ApiError::Internal => ("internal_server_error", plain_message(error)),
            ApiError::Unavailable { .. } | ApiError::DeliveryBusy { .. } => {
                ("service_unavailable", plain_message(error))
            }
            ApiError::OffsetMismatch { .. }
            | ApiError::SessionBusy
            | ApiError::UploadLocked
            | ApiError::ChecksumMismatch
            | ApiError::UnsupportedVersion
            | ApiError::WrongContentType
            | ApiError::ImmutableUpload => ("invalid_param", plain_message(error)),
        };
        json!({ "code": code, "message": message, "status": status.as_u16() })
    }
}

//! The korexo dialect (Kore.ai XO platform v2 attachments), `x-api-key` header.
//!
//! What flows through here: `POST /api/v2/apps/{appId}/environments/{envName}/attachments/upload`
//! with a multipart `file`, a required `userReference` and `uploadType` (only `runtime`),
//! handed to the shared gateway flow with the app, environment and user reference recorded
//! as metadata, and answered 200 `{fileId: "f-<uuid>", fileName, filePath, fileSize,
//! mimeType, extension, uploadedAt}`; and `DELETE .../attachments/{fileId}` (its optional
//! JSON body `{sessionId | sessionReference}` is ignored), which deletes the tenant's upload
//! made under the same app and environment through [`Gateway::delete`] (stored bytes,
//! upstream copy, record state) and answers `{"message", "success", "fileId"}`. Path segments
//! are validated before anything else; errors are `{"errors": [{"msg", "code"}]}`.

use actix_web::http::{Method, StatusCode};
use actix_web::web::{self, Payload};
use actix_web::{HttpRequest, HttpResponse};
use serde_json::{Value, json};

use super::{
    Dialect, DialectName, Routes, Work, admit, admit_for, errors_body, iso_millis, plain_message, read_json,
};
use crate::error::ApiError;
use crate::http::respond::{DialectError, answer, uploaded};
use crate::store::{UploadRecord, UploadState};
use crate::upload::intake::FormSpec;
use crate::upload::{Gateway, Metadata};

pub(crate) struct Korexo;

const FORM: FormSpec = FormSpec {
    // The vendor's curl example sends `file`; its parameter table spells it `File`.
    file_fields: &["file", "File"],
    max_files: 1,
    text_fields: &["userReference", "uploadType"],
};

const BASE: &str = "/api/v2/apps/{appId}/environments/{envName}/attachments";

pub(crate) fn routes(routes: &mut Routes) {
    routes.add(Method::POST, &format!("{BASE}/upload"), upload).add(
        Method::DELETE,
        &format!("{BASE}/{{fileId}}"),
        delete,
    );
}

/// An `appId` or `envName` from the path: 1 to 128 of `A-Z a-z 0-9 . _ -`, not `.` or `..`.
fn segment(request: &HttpRequest, name: &'static str) -> Result<String, ApiError> {
    let value = request.match_info().get(name).unwrap_or_default();
    let valid = (1..=128).contains(&value.len())
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(ApiError::InvalidField {
            field: name,
            message: "must be 1 to 128 characters of A-Z, a-z, 0-9, `.`, `_` and `-` (not `.` or `..`)"
                .into(),
        })
    }
}

fn scope(request: &HttpRequest) -> Result<(String, String), ApiError> {
    Ok((segment(request, "appId")?, segment(request, "envName")?))
}

fn file_object(record: &UploadRecord) -> Value {
    let file_path = if record.extension.is_empty() {
        format!("AppFileSystem/{}", record.id)
    } else {
        format!("AppFileSystem/{}.{}", record.id, record.extension)
    };
    json!({
        "fileId": record.id,
        "fileName": record.filename,
        "filePath": file_path,
        "fileSize": record.size,
        "mimeType": record.mime,
        "extension": record.extension,
        "uploadedAt": iso_millis(record.created_at_ms),
    })
}

async fn upload(
    request: HttpRequest,
    payload: Payload,
    gateway: web::Data<Gateway>,
) -> Result<HttpResponse, DialectError> {
    answer(DialectName::Korexo, async move {
        let admission = admit(&gateway, &Korexo, &request).await?;
        let (app_id, env_name) = scope(&request)?;
        let mut metadata = Metadata::new();
        metadata.insert("appId".into(), app_id.into());
        metadata.insert("envName".into(), env_name.into());
        let received = gateway
            .receive(&admission, request.headers(), payload, &FORM, &metadata)
            .await?;
        let field = |name: &'static str| {
            received
                .fields
                .get(name)
                .map(|value| value.trim().to_owned())
                .filter(|value| !value.is_empty())
                .ok_or(ApiError::MissingField(name))
        };
        let user_reference = field("userReference")?;
        if field("uploadType")? != "runtime" {
            return Err(ApiError::InvalidField {
                field: "uploadType",
                message: "must be `runtime`".into(),
            });
        }
        metadata.insert("userReference".into(), user_reference.into());
        let records = gateway.accept(&admission, received.files, metadata).await?;
        Ok(uploaded(StatusCode::OK, &records, file_object(&records[0])))
    })
    .await
}

/// The optional body of a delete, `{sessionId | sessionReference}`, checked for its shape.
/// What it names narrows nothing: upgate keeps no vendor session ids, and the excerpt's own
/// sample (`"sessionReference": "string"`) deletes a file uploaded under another reference.
fn check_delete_body(body: Option<Value>) -> Result<(), ApiError> {
    let object = match body {
        None => return Ok(()),
        Some(Value::Object(object)) => object,
        Some(_) => return Err(ApiError::Malformed("the body must be a JSON object".into())),
    };
    for key in ["sessionId", "sessionReference"] {
        if !matches!(object.get(key), None | Some(Value::Null | Value::String(_))) {
            return Err(ApiError::InvalidField {
                field: key,
                message: "must be a string".into(),
            });
        }
    }
    Ok(())
}

async fn delete(
    request: HttpRequest,
    payload: Payload,
    gateway: web::Data<Gateway>,
) -> Result<HttpResponse, DialectError> {
    answer(DialectName::Korexo, async move {
        let admission = admit_for(&gateway, &Korexo, &request, Work::Lookup).await?;
        let (app_id, env_name) = scope(&request)?;
        let id = request.match_info().get("fileId").unwrap_or_default();
        if !DialectName::Korexo.is_valid_upload_id(id) {
            return Err(ApiError::NotFound);
        }
        let idle = admission.policy.config.server.idle_timeout.0;
        check_delete_body(read_json(payload, idle).await?)?;
        // Only the tenant's own upload, made under this app and environment.
        let in_scope = |record: &UploadRecord| {
            let meta = |key: &str| record.metadata.get(key).and_then(Value::as_str);
            record.state != UploadState::Deleted
                && meta("appId") == Some(app_id.as_str())
                && meta("envName") == Some(env_name.as_str())
        };
        let found = gateway
            .store
            .upload_of(admission.tenant.name.clone(), id.to_owned())
            .await?
            .is_some_and(|record| in_scope(&record));
        if !found {
            return Err(ApiError::NotFound);
        }
        let record = gateway.delete(&admission, id).await?;
        Ok(uploaded(
            StatusCode::OK,
            std::slice::from_ref(&record),
            json!({
                "message": "file deleted successfully",
                "success": "true",
                "fileId": record.id,
            }),
        ))
    })
    .await
}

impl Dialect for Korexo {
    fn name(&self) -> DialectName {
        DialectName::Korexo
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
            // Korexo's only lookups are files.
            ApiError::NotFound => "File not found.".to_owned(),
            other => plain_message(other),
        };
        errors_body(message, status)
    }
}

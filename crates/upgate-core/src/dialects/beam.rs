//! The beam dialect (in progress).

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, web};
use serde_json::{Value, json};

use super::{Dialect, DialectName, plain_message};
use crate::error::ApiError;

pub struct Beam;

pub fn routes(_config: &mut web::ServiceConfig) {}

impl Dialect for Beam {
    fn name(&self) -> DialectName {
        DialectName::Beam
    }

    fn credentials(&self, request: &HttpRequest) -> Result<String, ApiError> {
        super::header_key(request, "x-api-key")
    }

    fn error_body(&self, error: &ApiError, _status: StatusCode) -> Value {
        json!({ "message": plain_message(error) })
    }
}

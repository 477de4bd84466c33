//! The one place that turns a control-plane error into an HTTP answer.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::control::error::{ControlError, ErrorClass};

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let (status, code) = match self.class() {
            ErrorClass::Invalid => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorClass::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorClass::Conflict => (StatusCode::CONFLICT, "conflict"),
            ErrorClass::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            ErrorClass::Host => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        (status, Json(json!({ "error": code, "message": self.to_string() }))).into_response()
    }
}

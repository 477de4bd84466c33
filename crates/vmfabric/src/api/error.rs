//! The one place that turns a control-plane error into an HTTP answer.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::control::error::{ControlError, ErrorClass};

/// What every failed request answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorCode,
    /// What is wrong, in a sentence.
    pub message: String,
}

#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    NotFound,
    Conflict,
    Busy,
    Internal,
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let (status, error) = match self.class() {
            ErrorClass::Invalid => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            ErrorClass::NotFound => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            ErrorClass::Conflict => (StatusCode::CONFLICT, ErrorCode::Conflict),
            ErrorClass::Busy => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Busy),
            ErrorClass::Host => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
        };
        let body = ErrorBody {
            error,
            message: self.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

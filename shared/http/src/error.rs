//! The API's error shape: `{"error": {"code", "message"}}` with the matching 4xx/5xx status.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// Also what another owner's job looks like: its existence is not revealed.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such job")
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<gateway::ports::StoreError> for ApiError {
    fn from(err: gateway::ports::StoreError) -> Self {
        tracing::error!(error = %err, "job store error");
        Self::unavailable("the job store is unavailable; try again")
    }
}

impl From<gateway::ports::ObjectError> for ApiError {
    fn from(err: gateway::ports::ObjectError) -> Self {
        tracing::error!(error = %err, "object store error");
        Self::unavailable("storage is unavailable; try again")
    }
}

//! `POST /webhooks/runpod/{job_id}?token=…`: the webhook use case behind an axum route.
use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use gateway::app::webhook::{WebhookHandler, WebhookOutcome, MAX_WEBHOOK_BYTES};
use serde::Serialize;

use crate::error::ApiError;

/// What RunPod gets back once the report is handled.
#[derive(Serialize)]
struct Received {
    received: bool,
}

/// The webhook route, as (method, path); the deployment contract test holds it equal to the
/// template's `HttpApi` event.
pub const ROUTE: (&str, &str) = ("POST", "/webhooks/runpod/{job_id}");

pub fn router(handler: Arc<WebhookHandler>) -> Router {
    Router::new()
        .route(ROUTE.1, post(receive))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_WEBHOOK_BYTES))
        .with_state(handler)
}

async fn receive(
    State(handler): State<Arc<WebhookHandler>>,
    Path(job_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let token = query.get("token").map(String::as_str).unwrap_or_default();
    match handler.receive(&job_id, token, &body).await {
        WebhookOutcome::Unauthorized => {
            ApiError::unauthorized("invalid webhook token").into_response()
        }
        WebhookOutcome::Handled(_) => {
            (StatusCode::OK, Json(Received { received: true })).into_response()
        }
        // 503 makes RunPod retry; meanwhile the sweeper settles the job anyway.
        WebhookOutcome::Deferred(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "try_again",
            "the job could not be updated now; it will be retried",
        )
        .into_response(),
    }
}

//! The RunPod webhook receiver: `POST /webhooks/runpod/{job_id}?token=…`.
//!
//! RunPod signs nothing, so the per-job HMAC token in the URL is the only proof the call is ours.
//! A verified call is handled as a hint: the body is used when it is a well-formed report for
//! this job, and otherwise (empty, unparseable, another id) RunPod's `/status` is asked instead.
use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use crate::app::api::error::ApiError;
use crate::app::finalize::{FinalizeError, Finalizer, Outcome};
use crate::domain::job::Actor;
use crate::domain::token::WebhookSigner;
use crate::ports::{JobStore, RunPod, RunPodError, RunPodStatus};

/// RunPod's webhook echoes the whole job input; ours are small, but cap what we parse.
pub const MAX_WEBHOOK_BYTES: usize = 6 * 1024 * 1024;

pub struct WebhookState {
    pub store: Arc<dyn JobStore>,
    pub runpod: Arc<dyn RunPod>,
    pub finalizer: Arc<Finalizer>,
    pub signer: WebhookSigner,
}

pub fn router(state: Arc<WebhookState>) -> Router {
    Router::new()
        .route("/webhooks/runpod/{job_id}", post(receive))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_WEBHOOK_BYTES))
        .with_state(state)
}

async fn receive(
    State(state): State<Arc<WebhookState>>,
    Path(job_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let token = query.get("token").map(String::as_str).unwrap_or_default();
    if !state.signer.verify(&job_id, token) {
        tracing::warn!(job_id, "webhook with a bad or missing token refused");
        return ApiError::unauthorized("invalid webhook token").into_response();
    }
    match handle(&state, &job_id, &body).await {
        Ok(outcome) => {
            tracing::info!(job_id, ?outcome, "webhook handled");
            (StatusCode::OK, Json(json!({ "received": true }))).into_response()
        }
        Err(response) => response,
    }
}

async fn handle(state: &WebhookState, job_id: &str, body: &[u8]) -> Result<Outcome, Response> {
    let job = match state.store.get(job_id).await {
        Ok(Some(job)) => job,
        // A valid token for a job we no longer keep: nothing to do, and no reason to be retried.
        Ok(None) => return Ok(Outcome::Unchanged),
        Err(err) => return Err(unavailable(&err.to_string())),
    };
    if job.is_terminal() {
        return Ok(Outcome::Unchanged);
    }
    let parsed = serde_json::from_slice::<RunPodStatus>(body).ok();
    let from_body = parsed.filter(|status| {
        status.status.is_some()
            && job.runpod_job_id.is_some()
            && status.id.is_some()
            && status.id == job.runpod_job_id
    });
    let outcome = match from_body {
        Some(status) => {
            state
                .finalizer
                .observe_as(job.clone(), &status, Actor::Webhook)
                .await
        }
        None => Ok(Outcome::NeedsStatus),
    };
    let outcome = match outcome {
        Ok(Outcome::NeedsStatus) => {
            let Some(runpod_id) = job.runpod_job_id.clone() else {
                // RunPod has it but dispatch has not recorded the id yet: ask to be called again.
                return Err(unavailable("job not yet recorded as submitted"));
            };
            match state.runpod.status(&runpod_id).await {
                Ok(status) => {
                    state
                        .finalizer
                        .observe_as(job, &status, Actor::Webhook)
                        .await
                }
                // Gone at RunPod: leave it to the sweeper, which records the expiry.
                Err(RunPodError::NotFound) => Ok(Outcome::Unchanged),
                Err(err) => return Err(unavailable(&err.to_string())),
            }
        }
        other => other,
    };
    match outcome {
        // Another call is finishing the job; a retry from RunPod (or the sweeper) settles it.
        Ok(Outcome::Busy) => Err(unavailable("job is busy")),
        Ok(outcome) => Ok(outcome),
        Err(FinalizeError::RetryLater(reason)) => Err(unavailable(&reason)),
        Err(FinalizeError::Store(err)) => Err(unavailable(&err.to_string())),
    }
}

fn unavailable(reason: &str) -> Response {
    tracing::warn!(reason, "webhook deferred");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "try_again",
        "the job could not be updated now; it will be retried",
    )
    .into_response()
}

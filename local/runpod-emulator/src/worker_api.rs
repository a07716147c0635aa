//! The worker ↔ control-plane protocol the `runpod` Python SDK speaks (reference §4), so a real
//! SDK worker can serve this endpoint instead of (or next to) the built-in one:
//!
//! ```text
//! RUNPOD_WEBHOOK_GET_JOB='http://127.0.0.1:8090/v2/local-endpoint/job-take/$ID?gpu=SIM'
//! RUNPOD_WEBHOOK_POST_OUTPUT='http://127.0.0.1:8090/v2/local-endpoint/job-done/$RUNPOD_POD_ID/$ID?gpu=SIM'
//! RUNPOD_WEBHOOK_POST_STREAM='http://127.0.0.1:8090/v2/local-endpoint/job-stream/$RUNPOD_POD_ID/$ID?gpu=SIM'
//! RUNPOD_WEBHOOK_PING='http://127.0.0.1:8090/v2/local-endpoint/ping/$RUNPOD_POD_ID?gpu=SIM'
//! RUNPOD_AI_API_KEY=<api key>  RUNPOD_POD_ID=pod1  RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true  RUNPOD_SKIP_GPU_CHECK=true
//! ```
//!
//! Run the emulator with `builtin_worker = false` unless both should compete for jobs.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value};

use crate::api::error;
use crate::jobs::{Finish, Lease, Outcome};
use crate::App;

/// Above this a `job-done` body is refused with 400, and the job ends COMPLETED without output:
/// the symptom users report for large results (runpod-python#309). RunPod's real limit is
/// UNCONFIRMED; 20 MB matches the documented `/runsync` payload limit.
const JOB_DONE_MAX_BYTES: usize = 20 * 1024 * 1024;

pub(crate) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v2/{endpoint_id}/job-take/{pod}", get(job_take))
        .route(
            "/v2/{endpoint_id}/job-take-batch/{pod}",
            get(job_take_batch),
        )
        .route("/v2/{endpoint_id}/job-done/{pod}/{job_id}", post(job_done))
        .route(
            "/v2/{endpoint_id}/job-stream/{pod}/{job_id}",
            post(job_stream),
        )
        .route("/v2/{endpoint_id}/job-stop/{pod}", get(job_stop))
        .route("/v2/{endpoint_id}/ping/{pod}", get(ping))
}

/// The job dict the SDK passes to the handler; it needs `id` and `input`, extra keys survive.
fn job_dict(lease: &Lease) -> Value {
    let mut job = Map::new();
    job.insert("id".into(), Value::String(lease.job_id.clone()));
    job.insert("input".into(), lease.input.clone());
    if let Some(webhook) = &lease.webhook {
        job.insert("webhook".into(), Value::String(webhook.clone()));
    }
    // UNCONFIRMED how RunPod hands `s3Config` to workers; the key name is the likely one.
    if let Some(s3_config) = &lease.s3_config {
        job.insert("s3Config".into(), s3_config.clone());
    }
    Value::Object(job)
}

/// Long-poll: retries `attempt` on every state change until it yields, the hold ends or the
/// emulator shuts down. The SDK re-polls immediately after a 204, so answering at once would
/// make it spin.
async fn hold<T>(app: &App, mut attempt: impl FnMut() -> Option<T>) -> Option<T> {
    let mut changes = app.store.subscribe();
    let mut shutdown = app.shutdown.clone();
    let deadline = tokio::time::Instant::now() + app.config.worker_poll_hold;
    loop {
        changes.borrow_and_update();
        if let Some(found) = attempt() {
            return Some(found);
        }
        tokio::select! {
            changed = tokio::time::timeout_at(deadline, changes.changed()) => {
                if !matches!(changed, Ok(Ok(()))) {
                    return None;
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return None,
        }
    }
}

async fn job_take(State(app): State<Arc<App>>, Path((_, pod)): Path<(String, String)>) -> Response {
    let taken = hold(&app, || app.store.take_external(&pod, 1).pop()).await;
    match taken {
        Some(lease) => {
            tracing::info!(job_id = lease.job_id, pod, "job taken by external worker");
            Json(job_dict(&lease)).into_response()
        }
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

async fn job_take_batch(
    State(app): State<Arc<App>>,
    Path((_, pod)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let size = query
        .get("batch_size")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, 1000);
    let taken = hold(&app, || {
        let leases = app.store.take_external(&pod, size);
        (!leases.is_empty()).then_some(leases)
    })
    .await;
    match taken {
        Some(leases) => Json(leases.iter().map(job_dict).collect::<Vec<_>>()).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

/// `job-done`: the body is JSON text whatever the Content-Type says (the SDK sends
/// `application/x-www-form-urlencoded`).
async fn job_done(
    State(app): State<Arc<App>>,
    Path((_, pod, job_id)): Path<(String, String, String)>,
    body: Body,
) -> Response {
    let Ok(bytes) = to_bytes(body, JOB_DONE_MAX_BYTES).await else {
        tracing::warn!(
            job_id,
            pod,
            "job-done body too large; job completes without output"
        );
        app.store
            .finish_external(&pod, &job_id, Outcome::Completed(None));
        return error(StatusCode::BAD_REQUEST, "result too large");
    };
    let report: Value = match serde_json::from_slice(&bytes) {
        Ok(Value::Object(report)) => Value::Object(report),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "job-done body must be a JSON object",
            )
        }
    };
    let output = report.get("output").cloned();
    if report.get("stopPod").and_then(Value::as_bool) == Some(true) {
        tracing::info!(job_id, pod, "worker asked to be stopped (stopPod); ignored");
    }
    let finish = if report.get("status").and_then(Value::as_str) == Some("IN_PROGRESS") {
        app.store.progress_external(&pod, &job_id, output)
    } else {
        let outcome = match report.get("error") {
            // Only a string error fails the job; a dict error leaves it COMPLETED on RunPod
            // (runpod-python#299, reference §6.10).
            Some(Value::String(error)) => Outcome::Failed {
                error: error.clone(),
                output,
            },
            _ => Outcome::Completed(output),
        };
        app.store.finish_external(&pod, &job_id, outcome)
    };
    match finish {
        Finish::Accepted => StatusCode::OK.into_response(),
        Finish::Stale => {
            tracing::info!(job_id, pod, "job-done for a job no longer held; ignored");
            StatusCode::OK.into_response()
        }
        // Expired jobs answer 404 to job-done (runpod-python#56).
        Finish::NotFound => error(StatusCode::NOT_FOUND, "job not found"),
    }
}

/// Streamed chunks are accepted and dropped: `/stream` is not emulated.
async fn job_stream(
    State(app): State<Arc<App>>,
    Path((_, pod, _job_id)): Path<(String, String, String)>,
) -> StatusCode {
    app.store.touch(&pod);
    StatusCode::OK
}

async fn job_stop(State(app): State<Arc<App>>, Path((_, pod)): Path<(String, String)>) -> Response {
    let stops = hold(&app, || {
        let stops = app.store.take_stops(&pod);
        (!stops.is_empty()).then_some(stops)
    })
    .await;
    match stops {
        Some(ids) => Json(serde_json::json!({ "jobsToStop": ids })).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

async fn ping(
    State(app): State<Arc<App>>,
    Path((_, pod)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> StatusCode {
    if query.get("status").map(String::as_str) == Some("unhealthy") {
        tracing::warn!(pod, ?query, "worker reports itself unhealthy");
    }
    app.store.touch(&pod);
    StatusCode::OK
}

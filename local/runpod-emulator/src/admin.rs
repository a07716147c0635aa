//! `/_emulator/…`: the test controls of [`crate::Emulator`] over HTTP, for the local dev stack
//! (a separate process) and curl. No auth: the emulator only ever listens on loopback in practice.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::api::error;
use crate::config::Faults;
use crate::App;

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/_emulator/faults", get(get_faults).put(put_faults))
        .route("/_emulator/chaos", get(chaos))
        .route("/_emulator/webhooks", get(webhooks))
        .route("/_emulator/webhooks/{job_id}/redeliver", post(redeliver))
        .route("/_emulator/jobs", get(jobs))
        .route("/_emulator/jobs/{job_id}", get(job))
        .route("/_emulator/worker-calls", get(worker_calls))
        .route("/_emulator/workers", get(workers))
        .route("/_emulator/volume", get(volume))
        .with_state(app)
}

/// Every answered call of an external worker, oldest first; `?pod=` narrows to one worker.
async fn worker_calls(
    State(app): State<Arc<App>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let mut calls = app.worker_log.calls();
    if let Some(pod) = query.get("pod") {
        calls.retain(|call| &call.pod == pod);
    }
    Json(calls).into_response()
}

/// The built-in worker's workers: up, idle, running, the most ever up, min and max.
async fn workers(State(app): State<Arc<App>>) -> Response {
    Json(app.store.workers()).into_response()
}

/// What the volume holds: all its bytes, and the multipart uploads in progress with theirs.
async fn volume(State(app): State<Arc<App>>) -> Response {
    let dir = app.config.volume_dir.clone();
    let walked = tokio::task::spawn_blocking(move || {
        serde_json::json!({
            "bytes": crate::volume::volume_bytes(&dir),
            "staged_upload_bytes": crate::volume::staged_upload_bytes(&dir),
            "uploads": crate::volume::staged_uploads(&dir),
        })
    })
    .await;
    match walked {
        Ok(report) => Json(report).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("volume walk: {e}"),
        ),
    }
}

/// Faults injected by the chaos configuration: counts by kind, and every one, oldest first.
async fn chaos(State(app): State<Arc<App>>) -> Response {
    let counts: serde_json::Map<String, serde_json::Value> = app
        .faults
        .chaos
        .counts()
        .into_iter()
        .map(|(kind, n)| (kind.as_str().to_owned(), n.into()))
        .collect();
    Json(serde_json::json!({
        "counts": counts,
        "injected": app.faults.chaos.log(),
    }))
    .into_response()
}

async fn get_faults(State(app): State<Arc<App>>) -> Response {
    Json(app.faults.get()).into_response()
}

/// Replaces the whole fault set; fields left out take their defaults.
async fn put_faults(State(app): State<Arc<App>>, body: Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(faults) => {
            tracing::info!(?faults, "faults set");
            app.faults.set(faults.clone());
            Json(faults).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, format!("invalid faults JSON: {e}")),
    }
}

/// All attempts, oldest first; `?job_id=` narrows to one job.
async fn webhooks(
    State(app): State<Arc<App>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let mut log = app.hooks.log();
    if let Some(job_id) = query.get("job_id") {
        log.retain(|attempt| &attempt.job_id == job_id);
    }
    Json(log).into_response()
}

async fn redeliver(State(app): State<Arc<App>>, Path(job_id): Path<String>) -> Response {
    match app.hooks.redeliver(&job_id).await {
        Some(attempt) => Json(attempt).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "no webhook was ever sent for this job",
        ),
    }
}

async fn jobs(State(app): State<Arc<App>>) -> Response {
    Json(app.store.all()).into_response()
}

async fn job(State(app): State<Arc<App>>, Path(job_id): Path<String>) -> Response {
    match app.store.get(&job_id) {
        Some(job) => Json(job).into_response(),
        None => error(StatusCode::NOT_FOUND, "job not found"),
    }
}

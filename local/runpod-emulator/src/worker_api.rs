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
//! Run the emulator with `builtin_worker = false` unless both should compete for jobs. The
//! end-to-end tests run the real SDK this way (`tests/tests/sdk.rs`, handlers in
//! `tests/python/`); every answered call is kept in the worker-call log
//! (`Emulator::worker_calls`, `GET /_emulator/worker-calls`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::api::error;
use crate::jobs::{Finish, Lease, Outcome};
use crate::App;

/// Most calls kept in the worker-call log; the oldest go first.
const WORKER_LOG_CAPACITY: usize = 10_000;

/// One answered call of an external worker, for tests (`Emulator::worker_calls`,
/// `GET /_emulator/worker-calls`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCall {
    /// The worker id in the URL (the SDK's `RUNPOD_POD_ID`).
    pub pod: String,
    /// `job-take`, `job-take-batch`, `job-done`, `job-progress` (a job-done with
    /// `status: IN_PROGRESS`), `job-stream`, `job-stop` or `ping`.
    pub route: String,
    /// Jobs the call was about: handed out, reported on, or told to stop.
    pub job_ids: Vec<String>,
    /// The HTTP status the emulator answered.
    pub status: u16,
    /// Wall-clock time of the answer, ms since the Unix epoch.
    pub at_ms: u64,
}

/// The worker-call log, oldest first.
#[derive(Debug, Default)]
pub(crate) struct WorkerLog {
    calls: Mutex<VecDeque<WorkerCall>>,
}

impl WorkerLog {
    fn record(&self, pod: &str, route: &str, job_ids: Vec<String>, status: StatusCode) {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut calls = self
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if calls.len() >= WORKER_LOG_CAPACITY {
            calls.pop_front();
        }
        calls.push_back(WorkerCall {
            pod: pod.to_owned(),
            route: route.to_owned(),
            job_ids,
            status: status.as_u16(),
            at_ms,
        });
    }

    pub(crate) fn calls(&self) -> Vec<WorkerCall> {
        self.calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

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
fn job_dict(app: &App, lease: &Lease) -> Value {
    let mut job = Map::new();
    job.insert("id".into(), Value::String(lease.job_id.clone()));
    job.insert("input".into(), lease.input.clone());
    if let Some(webhook) = &lease.webhook {
        job.insert("webhook".into(), Value::String(webhook.clone()));
    }
    // UNCONFIRMED how RunPod hands `s3Config` to workers: `EmulatorConfig::s3_config_job_key`.
    if let (Some(s3_config), Some(key)) = (&lease.s3_config, &app.config.s3_config_job_key) {
        job.insert(key.clone(), s3_config.clone());
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
            app.worker_log
                .record(&pod, "job-take", vec![lease.job_id.clone()], StatusCode::OK);
            Json(job_dict(&app, &lease)).into_response()
        }
        None => {
            app.worker_log
                .record(&pod, "job-take", Vec::new(), StatusCode::NO_CONTENT);
            StatusCode::NO_CONTENT.into_response()
        }
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
        Some(leases) => {
            let ids = leases.iter().map(|lease| lease.job_id.clone()).collect();
            app.worker_log
                .record(&pod, "job-take-batch", ids, StatusCode::OK);
            let jobs: Vec<Value> = leases.iter().map(|lease| job_dict(&app, lease)).collect();
            Json(jobs).into_response()
        }
        None => {
            app.worker_log
                .record(&pod, "job-take-batch", Vec::new(), StatusCode::NO_CONTENT);
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

/// `job-done`: the body is JSON text whatever the Content-Type says (the SDK sends
/// `application/x-www-form-urlencoded`).
async fn job_done(
    State(app): State<Arc<App>>,
    Path((_, pod, job_id)): Path<(String, String, String)>,
    body: Body,
) -> Response {
    let log = |route: &str, status: StatusCode| {
        app.worker_log
            .record(&pod, route, vec![job_id.clone()], status);
    };
    let Ok(bytes) = to_bytes(body, app.config.job_done_max_bytes).await else {
        tracing::warn!(
            job_id,
            pod,
            "job-done body too large; job completes without output"
        );
        app.store
            .finish_external(&pod, &job_id, Outcome::Completed(None));
        log("job-done", StatusCode::BAD_REQUEST);
        return error(StatusCode::BAD_REQUEST, "result too large");
    };
    let report: Value = match serde_json::from_slice(&bytes) {
        Ok(Value::Object(report)) => Value::Object(report),
        _ => {
            log("job-done", StatusCode::BAD_REQUEST);
            return error(
                StatusCode::BAD_REQUEST,
                "job-done body must be a JSON object",
            );
        }
    };
    let output = report.get("output").cloned();
    if report.get("stopPod").and_then(Value::as_bool) == Some(true) {
        tracing::info!(job_id, pod, "worker asked to be stopped (stopPod); ignored");
    }
    let progress = report.get("status").and_then(Value::as_str) == Some("IN_PROGRESS");
    let route = if progress { "job-progress" } else { "job-done" };
    let finish = if progress {
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
        Finish::Accepted => {
            log(route, StatusCode::OK);
            StatusCode::OK.into_response()
        }
        Finish::Stale => {
            tracing::info!(job_id, pod, "job-done for a job no longer held; ignored");
            log(route, StatusCode::OK);
            StatusCode::OK.into_response()
        }
        // Expired jobs answer 404 to job-done (runpod-python#56).
        Finish::NotFound => {
            log(route, StatusCode::NOT_FOUND);
            error(StatusCode::NOT_FOUND, "job not found")
        }
    }
}

/// Streamed chunks are accepted and dropped: `/stream` is not emulated.
async fn job_stream(
    State(app): State<Arc<App>>,
    Path((_, pod, job_id)): Path<(String, String, String)>,
) -> StatusCode {
    app.store.touch(&pod);
    app.worker_log
        .record(&pod, "job-stream", vec![job_id], StatusCode::OK);
    StatusCode::OK
}

async fn job_stop(State(app): State<Arc<App>>, Path((_, pod)): Path<(String, String)>) -> Response {
    let stops = hold(&app, || {
        let stops = app.store.take_stops(&pod);
        (!stops.is_empty()).then_some(stops)
    })
    .await;
    match stops {
        Some(ids) => {
            tracing::info!(?ids, pod, "external worker told to stop jobs");
            app.worker_log
                .record(&pod, "job-stop", ids.clone(), StatusCode::OK);
            Json(serde_json::json!({ "jobsToStop": ids })).into_response()
        }
        None => {
            app.worker_log
                .record(&pod, "job-stop", Vec::new(), StatusCode::NO_CONTENT);
            StatusCode::NO_CONTENT.into_response()
        }
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
    // `job_id` lists the jobs in flight, comma-separated (absent when idle).
    let in_flight = query
        .get("job_id")
        .map(|ids| {
            ids.split(',')
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    app.worker_log
        .record(&pod, "ping", in_flight, StatusCode::OK);
    StatusCode::OK
}

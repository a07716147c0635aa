//! RunPod's serverless endpoint API (reference §1) under `/v2/{endpoint_id}/`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::chaos::LostAnswer;
use serde_json::{json, Value};

use crate::jobs::{JobStatus, NewJob, RetryError};
use crate::App;

const RUN_BODY_LIMIT: usize = 10 * 1024 * 1024;
const RUNSYNC_BODY_LIMIT: usize = 20 * 1024 * 1024;
const MAX_POLICY_MS: u64 = 7 * 24 * 60 * 60 * 1000;
const DEFAULT_EXECUTION_TIMEOUT_MS: u64 = 600_000;
const DEFAULT_TTL_MS: u64 = 86_400_000;
const DEFAULT_RUNSYNC_WAIT_MS: u64 = 90_000;

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A refused request, kept small so `Result`s carrying it stay cheap.
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.status, self.message)
    }
}

/// The 404 for an unknown, expired or purged job; its body is UNCONFIRMED
/// (`EmulatorConfig::job_not_found_body`).
fn job_not_found(app: &App) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(app.config.job_not_found_body.clone()),
    )
        .into_response()
}

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v2/{endpoint_id}/run", post(run))
        .route("/v2/{endpoint_id}/runsync", post(runsync))
        .route(
            "/v2/{endpoint_id}/status/{job_id}",
            get(status).post(status),
        )
        .route("/v2/{endpoint_id}/cancel/{job_id}", post(cancel))
        .route("/v2/{endpoint_id}/retry/{job_id}", post(retry))
        .route("/v2/{endpoint_id}/purge-queue", post(purge_queue))
        .route("/v2/{endpoint_id}/health", get(health))
        .merge(crate::worker_api::routes())
        .route_layer(middleware::from_fn_with_state(app.clone(), authorize))
        .with_state(app)
}

/// Both `Authorization: Bearer <key>` and the raw key are in use (reference §1.1). Auth comes
/// before the endpoint check so an unauthenticated caller learns nothing about endpoint ids.
async fn authorize(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .map(|v| match v.split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => key.trim(),
            _ => v,
        });
    if presented != Some(app.config.api_key.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let endpoint = req.uri().path().split('/').nth(2).unwrap_or("");
    if endpoint != app.config.endpoint_id {
        return error(
            StatusCode::NOT_FOUND,
            format!("endpoint '{endpoint}' not found"),
        );
    }
    next.run(req).await
}

async fn run(State(app): State<Arc<App>>, body: Body) -> Response {
    let job = match submit(&app, body, false).await {
        Ok(job) => job,
        Err(refused) => return refused.into_response(),
    };
    // The job is queued; the caller may still never learn it.
    let lost = app
        .faults
        .chaos_config()
        .and_then(|chaos| app.faults.chaos.run_answer_lost(&chaos, &job.id));
    match lost {
        None => Json(json!({ "id": job.id, "status": job.status })).into_response(),
        Some(LostAnswer::Status(code)) => error(
            StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
            "upstream error",
        ),
        Some(LostAnswer::CutBody) => {
            let whole = json!({ "id": job.id, "status": job.status }).to_string();
            let cut = &whole[..whole.find(&job.id).unwrap_or(0) + job.id.len() / 2];
            (StatusCode::OK, cut.to_string()).into_response()
        }
        Some(LostAnswer::Hang(ms)) => {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            error(StatusCode::GATEWAY_TIMEOUT, "no answer in time")
        }
    }
}

async fn runsync(
    State(app): State<Arc<App>>,
    Query(query): Query<HashMap<String, String>>,
    body: Body,
) -> Response {
    let wait_ms = match query.get("wait") {
        None => DEFAULT_RUNSYNC_WAIT_MS,
        Some(raw) => match raw.parse::<u64>() {
            Ok(ms) if (1000..=300_000).contains(&ms) => ms,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "wait must be an integer between 1000 and 300000 (ms)",
                )
            }
        },
    };
    let job = match submit(&app, body, true).await {
        Ok(job) => job,
        Err(refused) => return refused.into_response(),
    };
    let mut changes = app.store.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    loop {
        changes.borrow_and_update();
        let Some(current) = app.store.get(&job.id) else {
            return job_not_found(&app);
        };
        if current.status.is_terminal() {
            return Json(current.status_body()).into_response();
        }
        let changed = tokio::time::timeout_at(deadline, changes.changed()).await;
        if !matches!(changed, Ok(Ok(()))) {
            // Out of time (or shutting down): the non-final status, as RunPod does.
            return match app.store.get(&job.id) {
                Some(current) => Json(current.status_body()).into_response(),
                None => job_not_found(&app),
            };
        }
    }
}

/// Validates and enqueues a `/run` or `/runsync` body.
async fn submit(app: &App, body: Body, sync: bool) -> Result<crate::JobSnapshot, ApiError> {
    if let Some(status) = app.faults.take_run_failure() {
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err(ApiError::new(code, format!("injected fault: {status}")));
    }
    if let Some(limit) = app.faults.get().run_queue_limit {
        if app.store.queued() as u64 > limit {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("more than {limit} jobs in the queue"),
            ));
        }
    }
    let limit = if sync {
        RUNSYNC_BODY_LIMIT
    } else {
        RUN_BODY_LIMIT
    };
    let bytes = to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds {} MB", limit / (1024 * 1024)),
        )
    })?;
    let request: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))?;
    let request = request
        .as_object()
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "body must be a JSON object"))?;
    let bad = |message: &str| ApiError::new(StatusCode::BAD_REQUEST, message);

    let input = match request.get("input") {
        Some(input @ Value::Object(_)) => input.clone(),
        Some(_) => return Err(bad("'input' must be a JSON object")),
        None => return Err(bad("missing 'input'")),
    };
    let webhook = match request.get("webhook") {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) => match reqwest::Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => Some(url.clone()),
            _ => return Err(bad("'webhook' must be an http(s) URL")),
        },
        Some(_) => return Err(bad("'webhook' must be a string")),
    };
    let policy = match request.get("policy") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(policy)) => policy.clone(),
        Some(_) => return Err(bad("'policy' must be an object")),
    };
    let execution_timeout = policy_ms(
        &policy,
        "executionTimeout",
        DEFAULT_EXECUTION_TIMEOUT_MS,
        app.config.min_execution_timeout,
    )?;
    let ttl = policy_ms(&policy, "ttl", DEFAULT_TTL_MS, app.config.min_ttl)?;
    let low_priority = match policy.get("lowPriority") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("'policy.lowPriority' must be a boolean")),
    };
    let s3_config = request.get("s3Config").filter(|v| !v.is_null()).cloned();

    let chaos_key = match app.faults.chaos_config() {
        Some(chaos) => {
            let key = crate::chaos::input_key(&chaos, &input);
            if let Some(status) = app.faults.chaos.run_refusal(&chaos, key.as_deref()) {
                let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                return Err(ApiError::new(code, format!("injected fault: {status}")));
            }
            key
        }
        None => None,
    };

    Ok(app.store.submit(NewJob {
        input,
        webhook,
        s3_config,
        execution_timeout,
        ttl,
        low_priority,
        sync,
        chaos_key,
    }))
}

fn policy_ms(
    policy: &serde_json::Map<String, Value>,
    name: &str,
    default_ms: u64,
    min: Duration,
) -> Result<Duration, ApiError> {
    let ms = match policy.get(name) {
        None | Some(Value::Null) => default_ms,
        Some(value) => value.as_u64().ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("'policy.{name}' must be an integer number of ms"),
            )
        })?,
    };
    let min_ms = u64::try_from(min.as_millis()).unwrap_or(u64::MAX);
    if ms < min_ms || ms > MAX_POLICY_MS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("'policy.{name}' must be between {min_ms} and {MAX_POLICY_MS} ms"),
        ));
    }
    Ok(Duration::from_millis(ms))
}

/// The chaos faults drawn for a `/status` or `/cancel` call: a delay (served here) and a 5xx.
async fn injected_api_failure(app: &App, what: String) -> Option<Response> {
    let chaos = app.faults.chaos_config()?;
    let (slow, status) = app.faults.chaos.api_fault(&chaos, &what);
    if let Some(slow) = slow {
        tokio::time::sleep(slow).await;
    }
    let status = status?;
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    Some(error(code, format!("injected fault: {status}")))
}

async fn status(
    State(app): State<Arc<App>>,
    Path((_, job_id)): Path<(String, String)>,
) -> Response {
    if let Some(refused) = injected_api_failure(&app, format!("GET /status/{job_id}")).await {
        return refused;
    }
    match app.store.get(&job_id) {
        Some(job) => Json(job.status_body()).into_response(),
        None => job_not_found(&app),
    }
}

async fn cancel(
    State(app): State<Arc<App>>,
    Path((_, job_id)): Path<(String, String)>,
) -> Response {
    if let Some(refused) = injected_api_failure(&app, format!("POST /cancel/{job_id}")).await {
        return refused;
    }
    match app.store.cancel(&job_id) {
        Some(status) => Json(json!({ "id": job_id, "status": status })).into_response(),
        None => job_not_found(&app),
    }
}

async fn retry(State(app): State<Arc<App>>, Path((_, job_id)): Path<(String, String)>) -> Response {
    match app.store.retry(&job_id) {
        Ok(status) => Json(json!({ "id": job_id, "status": status })).into_response(),
        Err(RetryError::NotFound) => job_not_found(&app),
        Err(RetryError::NotRetryable(status)) => error(
            StatusCode::BAD_REQUEST,
            format!(
                "job is {status}; only {} or {} jobs can be retried",
                JobStatus::Failed,
                JobStatus::TimedOut
            ),
        ),
    }
}

async fn purge_queue(State(app): State<Arc<App>>) -> Response {
    let removed = app.store.purge_queue();
    Json(json!({ "removed": removed, "status": "completed" })).into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let h = app.store.health();
    Json(json!({
        "jobs": {
            "completed": h.completed,
            "failed": h.failed,
            "inProgress": h.in_progress,
            "inQueue": h.in_queue,
            "retried": h.retried,
        },
        "workers": { "idle": h.workers_idle, "running": h.workers_running },
    }))
    .into_response()
}

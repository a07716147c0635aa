//! The public API (the `submit` function): one axum router, served by `lambda_http` in AWS and by
//! `axum::serve` in the local runner.
//!
//! - `POST /jobs`: validate, store the input, create the job, enqueue it → 202.
//! - `POST /uploads`: a presigned PUT for inputs too large for a Lambda request body.
//! - `GET /jobs/{id}`: state, timestamps, error and, once succeeded, presigned output URLs.
//! - `GET /jobs`: the caller's jobs, newest first, with an opaque cursor.
//! - `POST /jobs/{id}/cancel`: cancel at any non-terminal stage.
pub mod identity;
pub mod input;
pub mod views;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use gateway::app::api::Api;
use gateway::app::{commit_as, Committed};
use gateway::config::Settings;
use gateway::domain::job::{
    Actor, ErrorCode, InputRef, Job, JobError, JobState, JobTiming, NewJob,
};
use gateway::ports::{CreateOutcome, RunPodError};

use crate::error::ApiError;
use identity::IdentitySource;

/// Room for a 4 MB image in base64 plus the JSON around it; API Gateway caps Lambda at 6 MB.
pub const MAX_BODY_BYTES: usize = 6 * 1024 * 1024;
const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The API use case's ports and who may call: the router's state. Reads as the `Api` it holds
/// (`state.store`, `state.settings`, …).
pub struct ApiState {
    pub api: Api,
    pub identity: IdentitySource,
}

impl std::ops::Deref for ApiState {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl ApiState {
    pub fn new(api: Api, identity: IdentitySource) -> Self {
        Self { api, identity }
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/jobs", post(create_job).get(list_jobs))
        .route("/jobs/{id}", get(get_job))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/uploads", post(create_upload))
        .route("/health", get(|| async { Json(json!({ "ok": true })) }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The authenticated caller; requests without one get 401 before any handler runs.
pub struct Owner(pub String);

impl FromRequestParts<Arc<ApiState>> for Owner {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ApiError> {
        state
            .identity
            .owner(parts)
            .map(Owner)
            .ok_or_else(|| ApiError::unauthorized("a valid bearer token is required"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateJobRequest {
    workflow: String,
    #[serde(default)]
    params: Option<Map<String, Value>>,
    input: JobInput,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobInput {
    image_base64: Option<String>,
    upload_id: Option<String>,
}

fn timing(settings: &Settings) -> JobTiming {
    JobTiming {
        deadline_ms: settings.job_deadline.as_millis() as i64,
        first_check_ms: settings.requeue_after.as_millis() as i64,
        retention_secs: settings.record_retention.as_secs() as i64,
    }
}

async fn create_job(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: CreateJobRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the body is not a valid job request: {e}"),
        )
    })?;
    let idempotency_key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .ok()
                .map(str::trim)
                .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY && !k.contains('#'))
                .map(str::to_string)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_idempotency_key",
                        "Idempotency-Key must be 1-128 visible characters without '#'",
                    )
                })
        })
        .transpose()?;

    // Everything is validated before anything is written: a bad job leaves no trace.
    let workflow = state.catalog.get(&request.workflow).ok_or_else(|| {
        ApiError::bad_request(
            "unknown_workflow",
            format!(
                "unknown workflow {:?}; available: {}",
                request.workflow,
                state.catalog.names().join(", ")
            ),
        )
    })?;
    let params = workflow
        .validate(&request.params.unwrap_or_default(), &mut rand::rng())
        .map_err(|e| ApiError::bad_request("invalid_params", e.to_string()))?;

    let job_id = uuid::Uuid::now_v7().to_string();
    let input = match (request.input.image_base64, request.input.upload_id) {
        (Some(encoded), None) => store_inline_image(&state, &owner, &job_id, &encoded).await?,
        (None, Some(upload_id)) => uploaded_image(&state, &owner, &upload_id).await?,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_input",
                "input needs exactly one of image_base64 or upload_id",
            ))
        }
    };

    let now = state.clock.now_ms();
    let job = Job::new(
        NewJob {
            id: job_id,
            owner,
            workflow: workflow.name().to_string(),
            workflow_version: workflow.version().to_string(),
            params,
            input,
            idempotency_key,
            callback_url: None,
        },
        timing(&state.settings),
        now,
    );
    match state.store.create(&job).await? {
        CreateOutcome::Existing(existing) => {
            return Ok((StatusCode::OK, Json(views::job_summary(&existing))).into_response());
        }
        CreateOutcome::Created => {}
    }
    // If this send fails the job is still safe: the sweeper re-enqueues queued jobs.
    if let Err(err) = state.queue.enqueue(&job.id).await {
        tracing::warn!(job_id = %job.id, error = %err, "enqueue failed; the sweeper will retry");
    }
    tracing::info!(job_id = %job.id, owner = %job.owner, workflow = %job.workflow, "job accepted");
    Ok((StatusCode::ACCEPTED, Json(views::job_summary(&job))).into_response())
}

async fn store_inline_image(
    state: &ApiState,
    owner: &str,
    job_id: &str,
    encoded: &str,
) -> Result<InputRef, ApiError> {
    let limit = state.settings.max_inline_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "input_too_large",
            format!(
                "inline images are limited to {limit} bytes; use POST /uploads for larger ones"
            ),
        )
    };
    // Reject on the encoded length before spending memory on decoding.
    let encoded = encoded.trim();
    let encoded = encoded
        .split_once(";base64,")
        .map(|(_, data)| data)
        .unwrap_or(encoded);
    if encoded.len() > limit.div_ceil(3) * 4 + 4 {
        return Err(too_large());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| {
            ApiError::bad_request("invalid_input_image", "image_base64 is not valid base64")
        })?;
    if bytes.len() > limit {
        return Err(too_large());
    }
    let kind = input::check_image(&bytes)?;
    let key = format!("inputs/{owner}/{job_id}/input.{}", kind.extension);
    let size = bytes.len() as u64;
    state
        .uploads
        .put_bytes(&key, bytes.into(), kind.content_type)
        .await?;
    Ok(InputRef {
        key,
        content_type: kind.content_type.to_string(),
        size,
        extension: kind.extension.to_string(),
    })
}

fn upload_key(owner: &str, upload_id: &str) -> String {
    format!("uploads/{owner}/{upload_id}")
}

async fn uploaded_image(
    state: &ApiState,
    owner: &str,
    upload_id: &str,
) -> Result<InputRef, ApiError> {
    let unknown = || ApiError::bad_request("unknown_upload", "no completed upload with that id");
    // Upload ids are ours (UUIDs); anything else cannot name an upload and must not reach a key.
    let upload_id = uuid::Uuid::parse_str(upload_id)
        .map_err(|_| unknown())?
        .to_string();
    let key = upload_key(owner, &upload_id);
    let meta = state.uploads.head(&key).await?.ok_or_else(unknown)?;
    if meta.size > state.settings.max_upload_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "input_too_large",
            format!(
                "uploads are limited to {} bytes",
                state.settings.max_upload_bytes
            ),
        ));
    }
    let prefix = state.uploads.read_prefix(&key, 64).await?;
    let kind = input::sniff(&prefix)?;
    Ok(InputRef {
        key,
        content_type: kind.content_type.to_string(),
        size: meta.size,
        extension: kind.extension.to_string(),
    })
}

#[derive(Deserialize, Default)]
struct UploadRequest {
    content_type: Option<String>,
}

async fn create_upload(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: UploadRequest = if body.is_empty() {
        UploadRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
        })?
    };
    let content_type = request.content_type.unwrap_or_else(|| "image/jpeg".into());
    if !matches!(
        content_type.as_str(),
        "image/jpeg" | "image/png" | "image/webp"
    ) {
        return Err(ApiError::bad_request(
            "unsupported_content_type",
            "content_type must be image/jpeg, image/png or image/webp",
        ));
    }
    let upload_id = uuid::Uuid::now_v7().to_string();
    let key = upload_key(&owner, &upload_id);
    let presigned = state
        .uploads
        .presign_put(&key, &content_type, state.settings.presign_ttl)
        .await?;
    let headers: Map<String, Value> = presigned
        .headers
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "upload_id": upload_id,
            "method": presigned.method,
            "url": presigned.url,
            "headers": headers,
            "max_bytes": state.settings.max_upload_bytes,
            "expires_in_seconds": state.settings.presign_ttl.as_secs(),
        })),
    )
        .into_response())
}

/// Loads a job for its owner; anyone else's job is indistinguishable from a missing one.
async fn owned_job(state: &ApiState, owner: &str, id: &str) -> Result<Job, ApiError> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(ApiError::not_found());
    }
    match state.store.get(id).await? {
        Some(job) if job.owner == owner => Ok(job),
        _ => Err(ApiError::not_found()),
    }
}

async fn get_job(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = owned_job(&state, &owner, &id).await?;
    let mut outputs = Vec::with_capacity(job.outputs.len());
    if job.state == JobState::Succeeded {
        for output in &job.outputs {
            let url = state
                .results
                .presign_get(
                    &output.key,
                    state.settings.presign_ttl,
                    Some(&output.file_name),
                )
                .await?;
            outputs.push(views::output(output, &url.url));
        }
    }
    Ok(Json(views::job_detail(&job, outputs)).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn list_jobs(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            "limit must be between 1 and 100",
        ));
    }
    let page = state
        .store
        .list_by_owner(&owner, limit, query.cursor.as_deref())
        .await
        .map_err(|err| match err {
            gateway::ports::StoreError::Corrupt(_) => {
                ApiError::bad_request("invalid_cursor", "the cursor is not valid")
            }
            other => other.into(),
        })?;
    let jobs: Vec<Value> = page.jobs.iter().map(views::job_summary).collect();
    Ok(Json(json!({ "jobs": jobs, "next_cursor": page.cursor })).into_response())
}

async fn cancel_job(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = owned_job(&state, &owner, &id).await?;
    if job.is_terminal() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_finished",
            format!("the job is already {}", job.state),
        ));
    }
    // Stop the GPU first; only then say the job is cancelled.
    if let Some(runpod_id) = &job.runpod_job_id {
        match state.runpod.cancel(runpod_id).await {
            Ok(()) | Err(RunPodError::NotFound) => {}
            Err(err) => {
                tracing::warn!(job_id = %job.id, error = %err, "RunPod cancel failed");
                return Err(ApiError::unavailable(
                    "RunPod could not be reached to cancel the job; try again",
                ));
            }
        }
    }
    let now = state.clock.now_ms();
    let error = JobError::new(ErrorCode::CancelledByClient, "cancelled by the client");
    match commit_as(state.store.as_ref(), job, Actor::Client, |job| {
        job.cancel(error.clone(), now)
    })
    .await?
    {
        Committed::Written(job) => Ok(Json(views::job_summary(&job)).into_response()),
        Committed::Refused(job, _) if job.is_terminal() => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_finished",
            format!("the job is already {}", job.state),
        )),
        Committed::Refused(..) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "busy",
            "the job is changing state; try again",
        )),
        Committed::Missing => Err(ApiError::not_found()),
    }
}

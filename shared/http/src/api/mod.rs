//! The public API (the `submit` function): one axum router, served by `lambda_http` in AWS and by
//! `axum::serve` in the local runner.
//!
//! - `POST /jobs`: validate, store the input, create the job, enqueue it → 202.
//! - `POST /uploads`: a presigned PUT for inputs too large for a Lambda request body.
//! - `GET /jobs/{id}`: state, timestamps, error and, once succeeded, presigned output URLs.
//! - `GET /jobs`: the caller's jobs, newest first, with an opaque cursor.
//! - `POST /jobs/{id}/cancel`: cancel at any non-terminal stage.
//! - `DELETE /jobs/{id}`: cancel if in flight, delete the job's data, leave a tombstone (410).
//! - `GET /jobs/{id}/deliveries`, `POST /jobs/{id}/deliveries/{delivery_id}/redeliver`: the
//!   job's callbacks, and one sent again.
//! - `GET /callbacks/secret`, `POST /callbacks/secret/rotate`, `POST /callbacks/test`: the
//!   caller's signing secrets, and a signed test event.
pub mod identity;
pub mod openapi;
pub mod requests;
pub mod views;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post, MethodRouter};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use gateway::app::api::{Api, Submitted};
use gateway::app::callbacks::{CallbackError, Callbacks};
use gateway::domain::callback::DeliveryRefusal;

use crate::error::ApiError;
use identity::IdentitySource;
use openapi::ErrorResponse;
use requests::{
    BatchRequestBody, JobRequestBody, ListQuery, TestEventRequest, UploadRequest, UsageQuery,
};
use views::{
    BatchView, DeletedView, DeliveryLogView, DeliveryView, Health, JobList, JobSummary, JobView,
    SecretsView, TestEventView, UploadView, UsageView, WorkflowList,
};

/// Room for a 4 MB image in base64 plus the JSON around it; API Gateway caps Lambda at 6 MB.
pub const MAX_BODY_BYTES: usize = 6 * 1024 * 1024;

/// The API use case's ports and who may call: the router's state. Reads as the `Api` it holds
/// (`state.store`, `state.settings`, …).
pub struct ApiState {
    pub api: Api,
    /// The owners' callbacks: delivery logs, redelivery, signing secrets, test events.
    pub callbacks: Callbacks,
    pub identity: IdentitySource,
}

impl std::ops::Deref for ApiState {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl ApiState {
    pub fn new(api: Api, callbacks: Callbacks, identity: IdentitySource) -> Self {
        Self {
            api,
            callbacks,
            identity,
        }
    }
}

/// Every route of the public API, as (method, path). The router is built from this table, and
/// the deployment contract test holds it equal to the template's `HttpApi` events.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/jobs"),
    ("GET", "/jobs"),
    ("GET", "/jobs/{id}"),
    ("POST", "/jobs/{id}/cancel"),
    ("DELETE", "/jobs/{id}"),
    ("GET", "/jobs/{id}/deliveries"),
    ("POST", "/jobs/{id}/deliveries/{delivery_id}/redeliver"),
    ("POST", "/batches"),
    ("GET", "/batches/{id}"),
    ("POST", "/batches/{id}/cancel"),
    ("GET", "/callbacks/secret"),
    ("POST", "/callbacks/secret/rotate"),
    ("POST", "/callbacks/test"),
    ("POST", "/uploads"),
    ("GET", "/usage"),
    ("GET", "/workflows"),
    ("GET", "/health"),
    ("GET", "/openapi.json"),
];

fn handler(method: &str, path: &str) -> MethodRouter<Arc<ApiState>> {
    match (method, path) {
        ("POST", "/jobs") => post(create_job),
        ("GET", "/jobs") => get(list_jobs),
        ("GET", "/jobs/{id}") => get(get_job),
        ("POST", "/jobs/{id}/cancel") => post(cancel_job),
        ("DELETE", "/jobs/{id}") => delete(delete_job),
        ("GET", "/jobs/{id}/deliveries") => get(deliveries),
        ("POST", "/jobs/{id}/deliveries/{delivery_id}/redeliver") => post(redeliver),
        ("POST", "/batches") => post(create_batch),
        ("GET", "/batches/{id}") => get(get_batch),
        ("POST", "/batches/{id}/cancel") => post(cancel_batch),
        ("GET", "/callbacks/secret") => get(signing_secret),
        ("POST", "/callbacks/secret/rotate") => post(rotate_signing_secret),
        ("POST", "/callbacks/test") => post(test_event),
        ("POST", "/uploads") => post(create_upload),
        ("GET", "/usage") => get(usage),
        ("GET", "/workflows") => get(workflows),
        ("GET", "/health") => get(health),
        ("GET", "/openapi.json") => get(openapi::serve),
        _ => unreachable!("{method} {path} is in ROUTES without a handler"),
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    ROUTES
        .iter()
        .fold(Router::new(), |router, (method, path)| {
            router.route(path, handler(method, path))
        })
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

/// A JSON body, or a 400 that says what is wrong with it.
fn json_body<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not {what}: {e}")))
}

/// A query string, or a 400 in the API's error shape that says what is wrong with it.
fn query<T: DeserializeOwned>(uri: &axum::http::Uri) -> Result<T, ApiError> {
    Query::<T>::try_from_uri(uri)
        .map(|Query(query)| query)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

/// A path segment, or a 400 in the API's error shape.
struct JobId(String);

impl FromRequestParts<Arc<ApiState>> for JobId {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| JobId(id))
            .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
    }
}

/// Submits a job.
#[utoipa::path(
    post,
    path = "/jobs",
    tag = "jobs",
    request_body = JobRequestBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 128 visible characters: the same key with the same request answers what the first got")),
    responses(
        (status = 202, description = "Accepted (or a replay of an accepted request)", body = JobSummary),
        (status = 400, description = "Invalid request; nothing was stored", body = ErrorResponse),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 413, description = "The image is too large", body = ErrorResponse),
        (status = 422, description = "The idempotency key was used for another request", body = ErrorResponse),
        (status = 429, description = "Over the owner's submit rate (`rate_limited`); nothing stored; try again after `Retry-After` seconds", body = ErrorResponse, headers(("Retry-After" = u64, description = "Seconds until a token of the owner's submit bucket is back"))),
        (status = 503, description = "A store could not be reached; try again", body = ErrorResponse),
    )
)]
async fn create_job(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<JobSummary>), ApiError> {
    let request: JobRequestBody = json_body(&body, "a valid job request")?;
    let key = headers.get("idempotency-key").map(|v| v.as_bytes());
    // A replay gets what the first request got: 202 and the job as it was accepted.
    let job = match state
        .submit_traced(&owner, request.into(), key, trace_of(&headers))
        .await?
    {
        Submitted::Accepted(job) | Submitted::Existing(job) => job,
    };
    Ok((StatusCode::ACCEPTED, Json(JobSummary::accepted(&job))))
}

/// The request's trace id: API Gateway (and X-Ray) put it in `X-Amzn-Trace-Id`; a client may
/// send one too, to find its request in the gateway's logs.
fn trace_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-amzn-trace-id")
        .and_then(|v| v.to_str().ok())
        .and_then(gateway::domain::job::trace_from_header)
}

/// Submits a batch: one job per input, all checked before anything is stored.
#[utoipa::path(
    post,
    path = "/batches",
    tag = "batches",
    request_body = BatchRequestBody,
    responses(
        (status = 202, description = "Accepted: the batch and its jobs, queued", body = BatchView),
        (status = 400, description = "Invalid request (an input's refusal names it, `inputs[i]`); nothing was stored", body = ErrorResponse),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 413, description = "An image is too large", body = ErrorResponse),
        (status = 429, description = "Over the owner's submit rate (`rate_limited`); nothing stored; try again after `Retry-After` seconds", body = ErrorResponse, headers(("Retry-After" = u64, description = "Seconds until a token of the owner's submit bucket is back"))),
        (status = 503, description = "A store could not be reached; nothing of the batch is left; try again", body = ErrorResponse),
    )
)]
async fn create_batch(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<BatchView>), ApiError> {
    let request: BatchRequestBody = json_body(&body, "a valid batch request")?;
    let (batch, jobs) = state
        .submit_batch_traced(&owner, request.into(), trace_of(&headers))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(BatchView::new(&batch, &jobs))))
}

/// A batch: its jobs counted by state, and each job.
#[utoipa::path(
    get,
    path = "/batches/{id}",
    tag = "batches",
    params(("id" = String, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "OK", body = BatchView),
        (status = 400, description = "Invalid path", body = ErrorResponse),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 404, description = "No such batch of the caller's", body = ErrorResponse),
        (status = 503, description = "Try again", body = ErrorResponse),
    )
)]
async fn get_batch(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    JobId(id): JobId,
) -> Result<Json<BatchView>, ApiError> {
    let (batch, jobs) = state.batch(&owner, &id).await?;
    Ok(Json(BatchView::new(&batch, &jobs)))
}

/// Cancels every job of the batch that has not ended.
#[utoipa::path(
    post,
    path = "/batches/{id}/cancel",
    tag = "batches",
    params(("id" = String, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "The batch after the cancels", body = BatchView),
        (status = 400, description = "Invalid path", body = ErrorResponse),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 404, description = "No such batch of the caller's", body = ErrorResponse),
        (status = 503, description = "A run's stop could not be queued; the jobs not cancelled yet are as they were; try again", body = ErrorResponse),
    )
)]
async fn cancel_batch(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    JobId(id): JobId,
) -> Result<Json<BatchView>, ApiError> {
    let (batch, jobs) = state.cancel_batch(&owner, &id).await?;
    Ok(Json(BatchView::new(&batch, &jobs)))
}

/// A presigned POST to upload a photo too large to send inline.
#[utoipa::path(
    post,
    path = "/uploads",
    tag = "jobs",
    request_body(content = Option<UploadRequest>, description = "May be empty"),
    responses(
        (status = 201, description = "Where and how to upload", body = UploadView),
        (status = 400, description = "Invalid request", body = ErrorResponse),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 503, description = "Try again", body = ErrorResponse),
    )
)]
async fn create_upload(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    body: Bytes,
) -> Result<(StatusCode, Json<UploadView>), ApiError> {
    let request: UploadRequest = if body.is_empty() {
        UploadRequest::default()
    } else {
        json_body(&body, "valid JSON")?
    };
    let ticket = state
        .create_upload(&owner, request.content_type.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(UploadView::from(ticket))))
}

/// A job: its state, progress, cost, history and, once succeeded, its outputs.
#[utoipa::path(
    get,
    path = "/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "OK", body = JobView),
        (status = 400, description = "Invalid path", body = ErrorResponse),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 404, description = "No such job of the caller's", body = ErrorResponse),
        (status = 410, description = "Deleted, or past its expires_at", body = ErrorResponse),
        (status = 503, description = "Try again", body = ErrorResponse),
    )
)]
async fn get_job(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    JobId(id): JobId,
) -> Result<Json<JobView>, ApiError> {
    let detail = state.job(&owner, &id).await?;
    Ok(Json(JobView::from(&detail)))
}

/// The caller's jobs, newest first.
#[utoipa::path(
    get,
    path = "/jobs",
    tag = "jobs",
    params(ListQuery),
    responses(
        (status = 200, description = "OK", body = JobList),
        (status = 400, description = "Invalid status, limit or cursor", body = ErrorResponse),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 503, description = "Try again", body = ErrorResponse),
    )
)]
async fn list_jobs(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    uri: axum::http::Uri,
) -> Result<Json<JobList>, ApiError> {
    let query: ListQuery = query(&uri)?;
    let page = state
        .list(
            &owner,
            query.status.as_deref(),
            query.limit,
            query.cursor.as_deref(),
        )
        .await?;
    Ok(Json(JobList::from(&page)))
}

/// The workflows a job may run, with their parameters as JSON Schema.
#[utoipa::path(
    get,
    path = "/workflows",
    tag = "workflows",
    responses(
        (status = 200, description = "OK", body = WorkflowList),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
    )
)]
async fn workflows(State(state): State<Arc<ApiState>>, Owner(_): Owner) -> Json<WorkflowList> {
    Json(WorkflowList::from(state.catalog.as_ref()))
}

/// The caller's totals per UTC day.
#[utoipa::path(
    get,
    path = "/usage",
    tag = "usage",
    params(UsageQuery),
    responses(
        (status = 200, description = "OK", body = UsageView),
        (status = 400, description = "Not a range of at most 92 days", body = ErrorResponse),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 503, description = "Try again", body = ErrorResponse),
    )
)]
async fn usage(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    uri: axum::http::Uri,
) -> Result<Json<UsageView>, ApiError> {
    let query: UsageQuery = query(&uri)?;
    let (Some(from), Some(to)) = (query.from, query.to) else {
        return Err(ApiError::bad_request(
            "invalid_range",
            "from and to (YYYY-MM-DD, UTC, both included) are required",
        ));
    };
    let days = state.usage(&owner, &from, &to).await?;
    Ok(Json(UsageView::new(&from, &to, &days)))
}

/// Deletes the job and everything it left; a job in flight is cancelled first.
#[utoipa::path(
    delete,
    path = "/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 202, description = "Deleted (again, for a job already deleted)", body = DeletedView),
        (status = 400, description = "Invalid path", body = ErrorResponse),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 404, description = "No such job of the caller's", body = ErrorResponse),
        (status = 410, description = "Past its expires_at", body = ErrorResponse),
        (status = 503, description = "Try again", body = ErrorResponse),
    )
)]
async fn delete_job(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    JobId(id): JobId,
) -> Result<(StatusCode, Json<DeletedView>), ApiError> {
    let job = state.delete(&owner, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(DeletedView::from(&job))))
}

/// Cancels the job at any stage before it ends.
#[utoipa::path(
    post,
    path = "/jobs/{id}/cancel",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "OK", body = JobSummary),
        (status = 400, description = "Invalid path", body = ErrorResponse),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 404, description = "No such job of the caller's", body = ErrorResponse),
        (status = 409, description = "Already ended", body = ErrorResponse),
        (status = 410, description = "Deleted, or past its expires_at", body = ErrorResponse),
        (status = 503, description = "The run's stop could not be queued; try again", body = ErrorResponse),
    )
)]
async fn cancel_job(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    JobId(id): JobId,
) -> Result<Json<JobSummary>, ApiError> {
    let job = state.cancel(&owner, &id).await?;
    Ok(Json(JobSummary::from(&job)))
}

/// A callback use case's failure as the API answers it.
fn callback_error(err: CallbackError) -> ApiError {
    match err {
        CallbackError::Refused(DeliveryRefusal::UnknownMessage(_)) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such delivery of this job",
        ),
        CallbackError::Refused(refusal) => ApiError::new(
            StatusCode::CONFLICT,
            "delivery_refused",
            refusal.to_string(),
        ),
        CallbackError::Store(_) | CallbackError::Queue(_) | CallbackError::Objects(_) => {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "storage is unavailable; try again",
            )
        }
    }
}

/// The job's callbacks: every message, every attempt, and when the next is due.
#[utoipa::path(
    get,
    path = "/jobs/{id}/deliveries",
    tag = "callbacks",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "OK (no deliveries for a job without callbacks)", body = DeliveryLogView),
        (status = 400, description = "Invalid path", body = ErrorResponse),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 404, description = "No such job of the caller's", body = ErrorResponse),
        (status = 410, description = "Deleted, or past its expires_at", body = ErrorResponse),
        (status = 503, description = "Try again", body = ErrorResponse),
    )
)]
async fn deliveries(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    JobId(id): JobId,
) -> Result<Json<DeliveryLogView>, ApiError> {
    let job = state.live_job(&owner, &id).await?;
    let log = state
        .callbacks
        .log(&owner, &job.id)
        .await
        .map_err(callback_error)?;
    Ok(Json(DeliveryLogView::new(&job.id, log.as_ref())))
}

/// Sends one of the job's callbacks again, now, whatever became of it (not to a URL that
/// answered 410). It keeps its `webhook-id`.
#[utoipa::path(
    post,
    path = "/jobs/{id}/deliveries/{delivery_id}/redeliver",
    tag = "callbacks",
    params(
        ("id" = String, Path, description = "The job's id"),
        ("delivery_id" = String, Path, description = "The delivery's id (`msg_…`)"),
    ),
    responses(
        (status = 202, description = "Queued; the delivery as it stands", body = DeliveryView),
        (status = 400, description = "Invalid path", body = ErrorResponse),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 404, description = "No such job of the caller's, or no such delivery", body = ErrorResponse),
        (status = 409, description = "Its URL answered 410 for this job", body = ErrorResponse),
        (status = 410, description = "Deleted, or past its expires_at", body = ErrorResponse),
        (status = 503, description = "Try again", body = ErrorResponse),
    )
)]
async fn redeliver(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Result<(StatusCode, Json<DeliveryView>), ApiError> {
    let Path((id, delivery_id)) =
        path.map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))?;
    let job = state.live_job(&owner, &id).await?;
    let not_found = || {
        callback_error(CallbackError::Refused(DeliveryRefusal::UnknownMessage(
            delivery_id.clone(),
        )))
    };
    let queued = state
        .callbacks
        .redeliver(&owner, &job.id, &delivery_id)
        .await
        .map_err(callback_error)?;
    if !queued {
        return Err(not_found());
    }
    let log = state
        .callbacks
        .log(&owner, &job.id)
        .await
        .map_err(callback_error)?;
    let message = log
        .as_ref()
        .and_then(|log| log.message(&delivery_id))
        .ok_or_else(not_found)?;
    Ok((StatusCode::ACCEPTED, Json(DeliveryView::from(message))))
}

/// The caller's signing secrets (their first is made on first ask): what their Standard
/// Webhooks verifier checks callbacks with.
#[utoipa::path(
    get,
    path = "/callbacks/secret",
    tag = "callbacks",
    responses(
        (status = 200, description = "OK", body = SecretsView),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 503, description = "Try again", body = ErrorResponse),
    )
)]
async fn signing_secret(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
) -> Result<Json<SecretsView>, ApiError> {
    let secrets = state
        .callbacks
        .secrets(&owner)
        .await
        .map_err(callback_error)?;
    Ok(Json(SecretsView::from(secrets.as_slice())))
}

/// Starts a rotation: a new secret signs from now on, and the one before it keeps signing
/// beside it until the next rotation, so receivers can switch over.
#[utoipa::path(
    post,
    path = "/callbacks/secret/rotate",
    tag = "callbacks",
    responses(
        (status = 200, description = "The new secret, and the one before it", body = SecretsView),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 503, description = "Try again", body = ErrorResponse),
    )
)]
async fn rotate_signing_secret(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
) -> Result<Json<SecretsView>, ApiError> {
    let secrets = state
        .callbacks
        .rotate(&owner)
        .await
        .map_err(callback_error)?;
    Ok(Json(SecretsView::from(secrets.as_slice())))
}

/// Sends a signed `test` event to a URL now, under the rules of a job's callbacks, and says
/// how the receiver answered.
#[utoipa::path(
    post,
    path = "/callbacks/test",
    tag = "callbacks",
    request_body = TestEventRequest,
    responses(
        (status = 200, description = "Sent (or tried): how the receiver answered", body = TestEventView),
        (status = 400, description = "Invalid body, or a URL the egress rules refuse", body = ErrorResponse),
        (status = 401, description = "No valid bearer token", body = ErrorResponse),
        (status = 503, description = "Try again", body = ErrorResponse),
    )
)]
async fn test_event(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    body: Bytes,
) -> Result<Json<TestEventView>, ApiError> {
    let request: TestEventRequest = json_body(&body, "a test event request")?;
    match state
        .callbacks
        .test_event(&owner, &request.url)
        .await
        .map_err(callback_error)?
    {
        Ok(result) => Ok(Json(TestEventView::from(&result))),
        Err(why) => Err(ApiError::bad_request("callback_url_refused", why)),
    }
}

/// Whether the API answers.
#[utoipa::path(get, path = "/health", tag = "meta", security(()), responses((status = 200, description = "OK", body = Health)))]
async fn health() -> Json<Health> {
    Json(Health { ok: true })
}

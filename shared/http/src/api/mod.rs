//! The public API (the `submit` function): one axum router, served by `lambda_http` in AWS and by
//! `axum::serve` in the local runner.
//!
//! - `POST /jobs`: validate, store the input, create the job, enqueue it → 202.
//! - `POST /uploads`: a presigned PUT for inputs too large for a Lambda request body.
//! - `GET /jobs/{id}`: state, timestamps, error and, once succeeded, presigned output URLs.
//! - `GET /jobs`: the caller's jobs, newest first, with an opaque cursor.
//! - `POST /jobs/{id}/cancel`: cancel at any non-terminal stage.
//! - `DELETE /jobs/{id}`: cancel if in flight, delete the job's data, leave a tombstone (410).
pub mod identity;
pub mod views;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post, MethodRouter};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use gateway::app::api::{Api, JobRequest, Submitted};

use crate::error::ApiError;
use identity::IdentitySource;
use views::{
    DeletedView, Health, JobList, JobSummary, JobView, UploadView, UsageView, WorkflowList,
};

/// Room for a 4 MB image in base64 plus the JSON around it; API Gateway caps Lambda at 6 MB.
pub const MAX_BODY_BYTES: usize = 6 * 1024 * 1024;

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

/// Every route of the public API, as (method, path). The router is built from this table, and
/// the deployment contract test holds it equal to the template's `HttpApi` events.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/jobs"),
    ("GET", "/jobs"),
    ("GET", "/jobs/{id}"),
    ("POST", "/jobs/{id}/cancel"),
    ("DELETE", "/jobs/{id}"),
    ("POST", "/uploads"),
    ("GET", "/usage"),
    ("GET", "/workflows"),
    ("GET", "/health"),
];

fn handler(method: &str, path: &str) -> MethodRouter<Arc<ApiState>> {
    match (method, path) {
        ("POST", "/jobs") => post(create_job),
        ("GET", "/jobs") => get(list_jobs),
        ("GET", "/jobs/{id}") => get(get_job),
        ("POST", "/jobs/{id}/cancel") => post(cancel_job),
        ("DELETE", "/jobs/{id}") => delete(delete_job),
        ("POST", "/uploads") => post(create_upload),
        ("GET", "/usage") => get(usage),
        ("GET", "/workflows") => get(workflows),
        ("GET", "/health") => get(|| async { Json(Health { ok: true }) }),
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

async fn create_job(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<JobSummary>), ApiError> {
    let request: JobRequest = json_body(&body, "a valid job request")?;
    let key = headers.get("idempotency-key").map(|v| v.as_bytes());
    // A replay gets what the first request got: 202 and the job as it was accepted.
    let job = match state.submit(&owner, request, key).await? {
        Submitted::Accepted(job) | Submitted::Existing(job) => job,
    };
    Ok((StatusCode::ACCEPTED, Json(JobSummary::accepted(&job))))
}

#[derive(Deserialize, Default)]
struct UploadRequest {
    content_type: Option<String>,
}

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

async fn get_job(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let detail = state.job(&owner, &id).await?;
    Ok(Json(JobView::from(&detail)))
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn list_jobs(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    Query(query): Query<ListQuery>,
) -> Result<Json<JobList>, ApiError> {
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

async fn workflows(State(state): State<Arc<ApiState>>, Owner(_): Owner) -> Json<WorkflowList> {
    Json(WorkflowList::from(state.catalog.as_ref()))
}

#[derive(Deserialize)]
struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
}

async fn usage(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    Query(query): Query<UsageQuery>,
) -> Result<Json<UsageView>, ApiError> {
    let (Some(from), Some(to)) = (query.from, query.to) else {
        return Err(ApiError::bad_request(
            "invalid_range",
            "from and to (YYYY-MM-DD, UTC, both included) are required",
        ));
    };
    let days = state.usage(&owner, &from, &to).await?;
    Ok(Json(UsageView::new(&from, &to, &days)))
}

async fn delete_job(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DeletedView>), ApiError> {
    let job = state.delete(&owner, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(DeletedView::from(&job))))
}

async fn cancel_job(
    State(state): State<Arc<ApiState>>,
    Owner(owner): Owner,
    Path(id): Path<String>,
) -> Result<Json<JobSummary>, ApiError> {
    let job = state.cancel(&owner, &id).await?;
    Ok(Json(JobSummary::from(&job)))
}

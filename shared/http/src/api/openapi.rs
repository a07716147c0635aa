//! The API's OpenAPI 3.1 document, generated from the handlers' annotations and the response
//! and request types themselves, served at `GET /openapi.json`. A copy is committed at
//! `docs/openapi.json`; a test fails when the two differ.
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::requests::{
    BatchRequestBody, JobInputBody, JobRequestBody, TestEventRequest, UploadRequest,
};
use super::views;

/// Every error: `{"error": {"code", "message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code, such as `invalid_params` or `job_deleted`.
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// What RunPod gets back once its report is handled.
#[derive(Serialize, ToSchema)]
pub struct WebhookReceived {
    pub received: bool,
}

/// RunPod's notice that a run changed state; the gateway asks RunPod's `/status` before it
/// believes it. For RunPod only: the token is the one the gateway put in the run's webhook URL.
#[utoipa::path(
    post,
    path = "/webhooks/runpod/{job_id}",
    tag = "runpod",
    security(()),
    params(
        ("job_id" = String, Path, description = "The gateway's job id"),
        ("token" = Option<String>, Query, description = "The job's webhook token"),
    ),
    request_body(content = Object, description = "RunPod's webhook body (a /status answer); any body, even empty"),
    responses(
        (status = 200, description = "OK", body = WebhookReceived),
        (status = 400, description = "Invalid path or query", body = ErrorResponse),
        (status = 401, description = "A missing or wrong token", body = ErrorResponse),
        (status = 413, description = "A body over the webhook's limit", body = ErrorResponse),
        (status = 503, description = "The job could not be updated now; RunPod retries", body = ErrorResponse),
    )
)]
#[allow(dead_code)] // documents crate::webhook's route, which is served without this crate's api feature
fn runpod_webhook() {}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object))
)]
pub async fn serve() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "In AWS a JWT checked by API Gateway (its sub claim is the owner); locally a token of GATEWAY_DEV_TOKENS",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "RunPod job gateway",
        description = "Runs ComfyUI workflows (photo restoration first) on RunPod GPUs: submit a job, follow it, fetch its outputs.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        super::create_job,
        super::list_jobs,
        super::get_job,
        super::cancel_job,
        super::delete_job,
        super::deliveries,
        super::redeliver,
        super::signing_secret,
        super::rotate_signing_secret,
        super::test_event,
        super::create_upload,
        super::create_batch,
        super::get_batch,
        super::cancel_batch,
        super::usage,
        super::workflows,
        super::health,
        serve,
        runpod_webhook,
    ),
    components(schemas(
        JobRequestBody,
        JobInputBody,
        BatchRequestBody,
        views::BatchView,
        views::BatchJobView,
        UploadRequest,
        TestEventRequest,
        ErrorResponse,
        ErrorDetail,
        WebhookReceived,
        views::JobSummary,
        views::JobList,
        views::JobView,
        views::ErrorView,
        views::OutputView,
        views::EventView,
        views::ProgressView,
        views::DeletedView,
        views::UploadView,
        views::UploadField,
        views::UsageView,
        views::DayView,
        views::UsageTotals,
        views::WorkflowList,
        views::WorkflowView,
        views::Health,
        views::DeliveryLogView,
        views::DeliveryView,
        views::AttemptView,
        views::TestEventView,
        views::SecretsView,
    )),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
struct ApiDoc;

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    // The crate's version would make every release a drift; the document has its own.
    doc.info.version = "1".into();
    doc
}

/// The document as the API serves it and `docs/openapi.json` holds it.
pub fn document_json() -> String {
    let mut json = document()
        .to_pretty_json()
        .expect("the document serialises");
    json.push('\n');
    json
}

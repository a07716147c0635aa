//! What clients send, as types: the bodies and query strings of the public API, parsed here and
//! handed to the use case as its own types.
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use gateway::app::api::{JobInput, JobRequest};
use gateway::app::batches::BatchRequest;

/// The body of `POST /jobs`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequestBody {
    /// A workflow's name, from `GET /workflows`.
    pub workflow: String,
    /// The workflow's parameters; `GET /workflows` gives their JSON Schema. Left out, the
    /// defaults.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub params: Option<Map<String, Value>>,
    pub input: JobInputBody,
    /// How long to keep the job's input and outputs, in seconds, within the gateway's bounds
    /// (an hour to 90 days by default); its default retention when left out.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub retention_secs: Option<u64>,
    /// Where to POST the job's signed callbacks (Standard Webhooks): https, to a host that
    /// resolves to public addresses only; redirects are not followed. The job's end is always
    /// sent.
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub callback_url: Option<String>,
    /// Events beyond the end to send: `job.running`, `job.progress` (at most one every ten
    /// seconds). Needs `callback_url`.
    #[serde(default)]
    #[schema(max_items = 3)]
    pub callback_events: Option<Vec<String>>,
    /// Where to run the job: `serverless` (a RunPod serverless endpoint) or `pod` (a ComfyUI
    /// server on a RunPod pod), among the backends this deployment runs and the workflow
    /// lists (`GET /workflows`). Left out, the deployment's default. Otherwise
    /// `400 backend_unavailable`.
    #[serde(default)]
    #[schema(pattern = "^(serverless|pod)$")]
    pub backend: Option<String>,
    /// `normal` (the default) or `low`: a low job does not make RunPod start workers for it
    /// (RunPod's `policy.lowPriority`); it runs on workers already up. Otherwise
    /// `400 invalid_priority`.
    #[serde(default)]
    #[schema(pattern = "^(normal|low)$")]
    pub priority: Option<String>,
}

/// The body of `POST /batches`: one job per input, with one workflow and its params.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequestBody {
    /// A workflow's name, from `GET /workflows`.
    pub workflow: String,
    /// The workflow's parameters, the same for every job (a parameter drawn at random is
    /// drawn per job). Left out, the defaults.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub params: Option<Map<String, Value>>,
    /// One job per input, in this order: each an upload, a small inline image or a URL, as
    /// for `POST /jobs` (1 to 500; the request body is limited to 6 MB, so large photos go
    /// through `POST /uploads`).
    #[schema(min_items = 1, max_items = 500)]
    pub inputs: Vec<JobInputBody>,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub retention_secs: Option<u64>,
    /// Where to POST each job's signed callbacks, as for `POST /jobs`.
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub callback_url: Option<String>,
    #[serde(default)]
    #[schema(max_items = 3)]
    pub callback_events: Option<Vec<String>>,
    /// `serverless` or `pod`; left out, the deployment's batch backend (the pod, when it runs
    /// one and the workflow does).
    #[serde(default)]
    #[schema(pattern = "^(serverless|pod)$")]
    pub backend: Option<String>,
    /// Most of its jobs dispatched at once (1 to 64; the deployment's `BATCH_MAX_IN_FLIGHT`,
    /// 4, when left out): the others wait queued, and start in the order of the inputs as
    /// those end.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 64)]
    pub max_in_flight: Option<u32>,
    /// `normal` or `low`, for every job, as for `POST /jobs`.
    #[serde(default)]
    #[schema(pattern = "^(normal|low)$")]
    pub priority: Option<String>,
}

impl From<JobInputBody> for JobInput {
    fn from(input: JobInputBody) -> Self {
        Self {
            image_base64: input.image_base64,
            upload_id: input.upload_id,
            url: input.url,
        }
    }
}

impl From<BatchRequestBody> for BatchRequest {
    fn from(body: BatchRequestBody) -> Self {
        Self {
            workflow: body.workflow,
            params: body.params,
            inputs: body.inputs.into_iter().map(JobInput::from).collect(),
            retention_secs: body.retention_secs,
            callback_url: body.callback_url,
            callback_events: body.callback_events,
            backend: body.backend,
            max_in_flight: body.max_in_flight,
            priority: body.priority,
        }
    }
}

/// The body of `POST /callbacks/test`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestEventRequest {
    /// Where to send a signed `test` event, under the same rules as a job's `callback_url`.
    #[schema(max_length = 2048)]
    pub url: String,
}

/// The input photo: exactly one of the three.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobInputBody {
    /// The image itself, base64 (JPEG, PNG or WebP, at most 4 MB decoded).
    #[serde(default)]
    pub image_base64: Option<String>,
    /// An upload made with `POST /uploads`.
    #[serde(default)]
    pub upload_id: Option<String>,
    /// An https URL the photo is fetched from when the job is dispatched; its host must
    /// resolve to public addresses only, and redirects are not followed.
    #[serde(default)]
    pub url: Option<String>,
}

impl From<JobRequestBody> for JobRequest {
    fn from(body: JobRequestBody) -> Self {
        Self {
            workflow: body.workflow,
            params: body.params,
            input: body.input.into(),
            retention_secs: body.retention_secs,
            callback_url: body.callback_url,
            callback_events: body.callback_events,
            backend: body.backend,
            priority: body.priority,
        }
    }
}

/// The body of `POST /uploads` (it may be empty).
#[derive(Debug, Deserialize, Default, ToSchema)]
pub struct UploadRequest {
    /// The type of the file to upload: `image/jpeg` (the default), `image/png` or `image/webp`.
    #[serde(default)]
    pub content_type: Option<String>,
}

/// `GET /jobs`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this state.
    #[param(value_type = Option<String>, pattern = "^(queued|submitted|running|succeeded|failed|cancelled|timed_out)$")]
    pub status: Option<String>,
    /// Jobs per page (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the page before.
    pub cursor: Option<String>,
}

/// `GET /usage`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// First day, `YYYY-MM-DD` (UTC). Required.
    #[param(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
    pub from: Option<String>,
    /// Last day, `YYYY-MM-DD` (UTC), at most 91 days after `from`. Required.
    #[param(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
    pub to: Option<String>,
}

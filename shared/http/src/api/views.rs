//! The JSON clients see, as types. Internal steps (leases, versions, sweeper bookkeeping,
//! RunPod's id) never appear; times are RFC 3339.
use serde::Serialize;
use utoipa::ToSchema;

use gateway::app::api::{JobDetail, UploadTicket};
use gateway::domain::callback::{AttemptResult, DeliveryLog, Message, SigningSecret};
use gateway::domain::job::{Job, JobEvent, OutputFile};
use gateway::domain::usage::DailyUsage;
use gateway::domain::workflow::{ValidatedParams, WorkflowCatalog};
use gateway::ports::JobPage;

use gateway::domain::job::rfc3339 as time;

/// What `POST /jobs`, `POST /jobs/{id}/cancel` and `GET /jobs` say about a job.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobSummary {
    pub job_id: String,
    pub status: &'static str,
    pub workflow: String,
    pub created_at: String,
    pub updated_at: String,
    /// When the job's input and outputs are deleted (its retention's end).
    pub expires_at: String,
}

impl From<&Job> for JobSummary {
    fn from(job: &Job) -> Self {
        Self {
            job_id: job.id.clone(),
            status: job.state.as_str(),
            workflow: job.workflow.clone(),
            created_at: time(job.timestamps.created_at),
            updated_at: time(job.timestamps.updated_at),
            expires_at: time(job.retained_until()),
        }
    }
}

/// `POST /batches`, `GET /batches/{id}`, `POST /batches/{id}/cancel`: the batch, its jobs
/// counted by state, and each job (in the order of the inputs).
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchView {
    pub batch_id: String,
    pub workflow: String,
    pub backend: &'static str,
    pub max_in_flight: u32,
    pub created_at: String,
    /// How many jobs are in each state (every state named).
    #[schema(value_type = Object)]
    pub counts: std::collections::BTreeMap<&'static str, usize>,
    pub jobs: Vec<BatchJobView>,
}

/// One job of a batch; `GET /jobs/{id}` has the rest (its outputs' links included).
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchJobView {
    pub job_id: String,
    pub status: &'static str,
    pub error: Option<ErrorView>,
    /// How many outputs it stored, once succeeded.
    pub outputs: usize,
}

impl BatchView {
    pub fn new(batch: &gateway::domain::batch::Batch, jobs: &[Job]) -> Self {
        Self {
            batch_id: batch.id.clone(),
            workflow: batch.workflow.clone(),
            backend: batch.backend.as_str(),
            max_in_flight: batch.max_in_flight,
            created_at: time(batch.created_at),
            counts: gateway::domain::batch::counts(jobs)
                .into_iter()
                .map(|(state, n)| (state.as_str(), n))
                .collect(),
            jobs: jobs
                .iter()
                .map(|job| BatchJobView {
                    job_id: job.id.clone(),
                    status: job.state.as_str(),
                    error: job.error.as_ref().map(ErrorView::from),
                    outputs: job.outputs.len(),
                })
                .collect(),
        }
    }
}

/// `DELETE /jobs/{id}`: the job is a tombstone; its data is removed (what the sweeper purges
/// within the minute included).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedView {
    pub job_id: String,
    pub status: &'static str,
    pub deleted_at: String,
}

impl From<&Job> for DeletedView {
    fn from(job: &Job) -> Self {
        Self {
            job_id: job.id.clone(),
            status: "deleted",
            deleted_at: time(
                job.deletion
                    .as_ref()
                    .map_or(job.timestamps.updated_at, |d| d.at),
            ),
        }
    }
}

impl JobSummary {
    /// The job as it was when it was accepted: what `POST /jobs` answered then, and answers
    /// again to a replay of the same request.
    pub fn accepted(job: &Job) -> Self {
        Self {
            status: gateway::domain::job::JobState::Queued.as_str(),
            updated_at: time(job.timestamps.created_at),
            ..Self::from(job)
        }
    }
}

/// `GET /jobs`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobSummary>,
    pub next_cursor: Option<String>,
}

impl From<&JobPage> for JobList {
    fn from(page: &JobPage) -> Self {
        Self {
            jobs: page.jobs.iter().map(JobSummary::from).collect(),
            next_cursor: page.cursor.clone(),
        }
    }
}

/// `GET /jobs/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub job_id: String,
    pub status: &'static str,
    pub workflow: String,
    pub workflow_version: String,
    /// Where it runs: `serverless` or `pod`.
    pub backend: &'static str,
    /// The batch it belongs to, if any (`GET /batches/{id}`).
    pub batch_id: Option<String>,
    /// `normal` or `low`.
    pub priority: &'static str,
    /// The parameters the job runs with: the client's, defaults filled in, random ones drawn.
    #[schema(value_type = Object)]
    pub params: ValidatedParams,
    pub created_at: String,
    pub submitted_at: Option<String>,
    pub running_at: Option<String>,
    pub finished_at: Option<String>,
    pub updated_at: String,
    /// When the job's input and outputs are deleted (its retention's end); no URL outlives it.
    pub expires_at: String,
    pub error: Option<ErrorView>,
    pub delay_time_ms: Option<u64>,
    pub execution_time_ms: Option<u64>,
    /// What the worker last reported of its progress, while running and after.
    pub progress: Option<ProgressView>,
    /// Time in RunPod's queue, and GPU time (RunPod's `delayTime` and `executionTime`).
    pub queue_seconds: Option<f64>,
    pub gpu_seconds: Option<f64>,
    /// The GPU time at the price per GPU-second in effect when the job was accepted; absent
    /// when no price is configured.
    pub cost_usd: Option<f64>,
    pub outputs: Vec<OutputView>,
    pub events: Vec<EventView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProgressView {
    /// Done so far, from 0 to 1.
    pub fraction: Option<f64>,
    pub message: Option<String>,
    pub updated_at: String,
}

/// `GET /usage`: an owner's totals per UTC day, every day of the range.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    pub from: String,
    pub to: String,
    pub days: Vec<DayView>,
    pub total: UsageTotals,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DayView {
    pub day: String,
    #[serde(flatten)]
    pub totals: UsageTotals,
}

/// Jobs that ended, by state, and what they used.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct UsageTotals {
    pub jobs: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub timed_out: u64,
    pub gpu_seconds: f64,
    pub cost_usd: f64,
}

impl UsageTotals {
    fn of(days: &[DailyUsage]) -> Self {
        let mut sum = DailyUsage::default();
        for day in days {
            sum.succeeded += day.succeeded;
            sum.failed += day.failed;
            sum.cancelled += day.cancelled;
            sum.timed_out += day.timed_out;
            sum.gpu_ms += day.gpu_ms;
            sum.cost_nano_usd += day.cost_nano_usd;
        }
        Self {
            jobs: sum.jobs(),
            succeeded: sum.succeeded,
            failed: sum.failed,
            cancelled: sum.cancelled,
            timed_out: sum.timed_out,
            gpu_seconds: sum.gpu_ms as f64 / 1000.0,
            cost_usd: usd(sum.cost_nano_usd),
        }
    }
}

impl UsageView {
    pub fn new(from: &str, to: &str, days: &[DailyUsage]) -> Self {
        Self {
            from: from.to_string(),
            to: to.to_string(),
            days: days
                .iter()
                .map(|day| DayView {
                    day: day.day.clone(),
                    totals: UsageTotals::of(std::slice::from_ref(day)),
                })
                .collect(),
            total: UsageTotals::of(days),
        }
    }
}

fn usd(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorView {
    pub code: &'static str,
    pub message: String,
    pub retryable: bool,
}

impl From<&gateway::domain::job::JobError> for ErrorView {
    fn from(error: &gateway::domain::job::JobError) -> Self {
        Self {
            code: error.code.as_str(),
            message: error.message.clone(),
            retryable: error.retryable,
        }
    }
}

/// One output file and a presigned URL to download it.
#[derive(Debug, Serialize, ToSchema)]
pub struct OutputView {
    pub file_name: String,
    pub content_type: String,
    pub size: u64,
    pub url: String,
}

/// One state change of the job: `from` is null for its creation; states are the public ones.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub at: String,
    pub from: Option<&'static str>,
    pub to: &'static str,
    pub by: &'static str,
}

impl From<&JobEvent> for EventView {
    fn from(event: &JobEvent) -> Self {
        Self {
            at: time(event.at),
            from: event.from.map(|s| s.as_str()),
            to: event.to.as_str(),
            by: event.by.as_str(),
        }
    }
}

fn output(file: &OutputFile, url: &str) -> OutputView {
    OutputView {
        file_name: file.file_name.clone(),
        content_type: file.content_type.clone(),
        size: file.size,
        url: url.to_string(),
    }
}

impl From<&JobDetail> for JobView {
    fn from(detail: &JobDetail) -> Self {
        let job = &detail.job;
        Self {
            job_id: job.id.clone(),
            status: job.state.as_str(),
            workflow: job.workflow.clone(),
            workflow_version: job.workflow_version.clone(),
            backend: job.backend.as_str(),
            batch_id: job.batch_id.clone(),
            priority: job.priority.as_str(),
            params: job.params.clone(),
            created_at: time(job.timestamps.created_at),
            submitted_at: job.timestamps.submitted_at.map(time),
            running_at: job.timestamps.running_at.map(time),
            finished_at: job.timestamps.finished_at.map(time),
            updated_at: time(job.timestamps.updated_at),
            expires_at: time(job.retained_until()),
            error: job.error.as_ref().map(ErrorView::from),
            delay_time_ms: job.delay_time_ms,
            execution_time_ms: job.execution_time_ms,
            progress: job.progress.as_ref().map(|p| ProgressView {
                fraction: p.fraction,
                message: p.message.clone(),
                updated_at: time(p.at),
            }),
            queue_seconds: job.delay_time_ms.map(|ms| ms as f64 / 1000.0),
            gpu_seconds: job.gpu_seconds(),
            cost_usd: job.cost_nano_usd().map(usd),
            outputs: detail
                .outputs
                .iter()
                .map(|(file, url)| output(file, url))
                .collect(),
            events: job.history.iter().map(EventView::from).collect(),
        }
    }
}

/// `POST /uploads`: where to POST the file, with the signed form fields to send before it.
#[derive(Debug, Serialize, ToSchema)]
pub struct UploadView {
    pub upload_id: String,
    pub method: &'static str,
    pub url: String,
    /// Every field goes into the `multipart/form-data` body, in this order, then the file as
    /// the last field (`file`).
    pub fields: Vec<UploadField>,
    pub max_bytes: u64,
    pub expires_in_seconds: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UploadField {
    pub name: String,
    pub value: String,
}

impl From<UploadTicket> for UploadView {
    fn from(ticket: UploadTicket) -> Self {
        Self {
            upload_id: ticket.upload_id,
            method: "POST",
            url: ticket.request.url,
            fields: ticket
                .request
                .fields
                .into_iter()
                .map(|(name, value)| UploadField { name, value })
                .collect(),
            max_bytes: ticket.max_bytes,
            expires_in_seconds: ticket.expires_in.as_secs(),
        }
    }
}

/// `GET /workflows`: what a job may run, and the `params` each accepts.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowList {
    pub workflows: Vec<WorkflowView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowView {
    pub name: String,
    pub version: String,
    pub description: String,
    /// The backends its graph runs on (`serverless`, `pod`); a job may ask for one of them
    /// that the deployment runs.
    pub backends: Vec<&'static str>,
    /// A JSON Schema (2020-12) of the job's `params`.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
}

impl From<&WorkflowCatalog> for WorkflowList {
    fn from(catalog: &WorkflowCatalog) -> Self {
        Self {
            workflows: catalog
                .workflows()
                .map(|w| WorkflowView {
                    name: w.name().to_string(),
                    version: w.version().to_string(),
                    description: w.description().to_string(),
                    backends: w.backends().iter().map(|b| b.as_str()).collect(),
                    params: w.params_schema(),
                })
                .collect(),
        }
    }
}

/// `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub ok: bool,
}

/// `GET /jobs/{id}/deliveries`: every callback message of the job, with every attempt.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryLogView {
    pub job_id: String,
    /// Oldest first.
    pub deliveries: Vec<DeliveryView>,
    /// URLs that answered 410 for this job: nothing more is sent to them.
    pub disabled_urls: Vec<String>,
}

/// One callback message: one event of the job, to one URL.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    /// `msg_…`: the `webhook-id` header of every attempt, and the id to redeliver it by.
    pub delivery_id: String,
    /// `job.succeeded`, `job.failed`, `job.cancelled`, `job.timed_out`, `job.running` or
    /// `job.progress`.
    #[serde(rename = "type")]
    pub event_type: String,
    pub url: String,
    /// `pending` (waiting for `next_attempt_at`), `delivered`, `failed` (the schedule is spent)
    /// or `disabled` (the URL answered 410).
    #[schema(pattern = "^(pending|delivered|failed|disabled)$")]
    pub status: String,
    pub created_at: String,
    pub next_attempt_at: Option<String>,
    pub attempts: Vec<AttemptView>,
    /// The body every attempt carried (signed with that attempt's timestamp).
    pub payload: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    pub at: String,
    /// The receiver's status code, if it answered.
    pub status_code: Option<u16>,
    /// Why there was no answer (a timeout, a refused connection or address).
    pub error: Option<String>,
    /// Asked for with `redeliver`, not by the schedule.
    pub manual: bool,
}

impl DeliveryLogView {
    pub fn new(job_id: &str, log: Option<&DeliveryLog>) -> Self {
        Self {
            job_id: job_id.to_string(),
            deliveries: log
                .map(|log| log.messages.iter().map(DeliveryView::from).collect())
                .unwrap_or_default(),
            disabled_urls: log.map(|log| log.disabled_urls.clone()).unwrap_or_default(),
        }
    }
}

impl From<&Message> for DeliveryView {
    fn from(message: &Message) -> Self {
        let status = serde_json::to_value(message.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        Self {
            delivery_id: message.id.clone(),
            event_type: message.event_type.clone(),
            url: message.url.clone(),
            status,
            created_at: time(message.created_at),
            next_attempt_at: message.next_attempt_at.map(time),
            attempts: message
                .attempts
                .iter()
                .map(|a| AttemptView {
                    at: time(a.at),
                    status_code: a.status,
                    error: a.error.clone(),
                    manual: a.manual,
                })
                .collect(),
            payload: message.body.clone(),
        }
    }
}

/// `POST /callbacks/test`: how the signed test event went.
#[derive(Debug, Serialize, ToSchema)]
pub struct TestEventView {
    /// The receiver answered 2xx.
    pub delivered: bool,
    pub status_code: Option<u16>,
    pub error: Option<String>,
}

impl From<&AttemptResult> for TestEventView {
    fn from(result: &AttemptResult) -> Self {
        let (status_code, error) = match result {
            AttemptResult::Delivered(status) => (Some(*status), None),
            AttemptResult::Gone => (Some(410), None),
            AttemptResult::Refused { status, .. } => (Some(*status), None),
            AttemptResult::NoAnswer(why) => (None, Some(why.clone())),
        };
        Self {
            delivered: matches!(result, AttemptResult::Delivered(_)),
            status_code,
            error,
        }
    }
}

/// `GET /callbacks/secret` and `POST /callbacks/secret/rotate`: the caller's signing secrets,
/// for their Standard Webhooks verifier.
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretsView {
    /// The secret that signs first (`whsec_…`).
    pub secret: String,
    /// During a rotation, the secret before it: every callback carries a signature by each.
    pub previous_secret: Option<String>,
}

impl From<&[SigningSecret]> for SecretsView {
    fn from(secrets: &[SigningSecret]) -> Self {
        Self {
            secret: secrets
                .first()
                .map(SigningSecret::expose)
                .unwrap_or_default(),
            previous_secret: secrets.get(1).map(SigningSecret::expose),
        }
    }
}

//! Dispatch: takes a queued job off SQS, puts its input on the RunPod volume, renders the
//! workflow and submits it to RunPod. A message names only a job id; the job record decides
//! what (if anything) to do, so redelivered and duplicated messages are harmless.
use std::sync::Arc;

use crate::app::{commit_as, transfer, Committed};
use crate::config::Settings;
use crate::domain::job::{Actor, ErrorCode, Job, JobError, JobState, LeaseKind};
use crate::domain::keys;
use crate::domain::token::WebhookSigner;
use crate::domain::workflow::WorkflowCatalog;
use crate::ports::{
    Classified, Clock, Failure, JobStore, ObjectStore, RunPod, RunPolicy, RunRequest, StoreError,
};

#[derive(Debug, Clone, PartialEq)]
pub enum DispatchOutcome {
    Submitted(String),
    /// The message needs no work: the job is gone, already past queued, or cancelled.
    Skipped(&'static str),
    /// The job failed permanently at dispatch.
    Failed(ErrorCode),
}

/// The message should come back later (SQS redelivers it after its visibility timeout).
#[derive(Debug, thiserror::Error)]
#[error("dispatch will be retried: {0}")]
pub struct RetryLater(pub String);

impl From<StoreError> for RetryLater {
    fn from(err: StoreError) -> Self {
        Self(err.to_string())
    }
}

pub struct Dispatcher {
    pub store: Arc<dyn JobStore>,
    pub uploads: Arc<dyn ObjectStore>,
    pub volume: Arc<dyn ObjectStore>,
    pub runpod: Arc<dyn RunPod>,
    pub catalog: Arc<WorkflowCatalog>,
    pub signer: WebhookSigner,
    /// Public base URL the webhook route is reached at.
    pub webhook_base: String,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
}

impl Dispatcher {
    /// The webhook URL RunPod will call for this job: per-job HMAC token in the query.
    pub fn webhook_url(&self, job_id: &str) -> String {
        format!(
            "{}/webhooks/runpod/{}?token={}",
            self.webhook_base,
            job_id,
            self.signer.token(job_id)
        )
    }

    pub async fn dispatch(&self, job_id: &str) -> Result<DispatchOutcome, RetryLater> {
        let Some(job) = self.store.get(job_id).await? else {
            return Ok(DispatchOutcome::Skipped("no such job"));
        };
        if job.state != JobState::Queued {
            return Ok(DispatchOutcome::Skipped("already dispatched or finished"));
        }
        let now = self.clock.now_ms();
        if job.attempts >= self.settings.max_dispatch_attempts {
            let error = JobError::new(
                ErrorCode::DispatchAttemptsExhausted,
                format!("gave up after {} dispatch attempts", job.attempts),
            );
            commit_as(self.store.as_ref(), job, Actor::Dispatch, |job| {
                job.fail(error.clone(), now)
            })
            .await?;
            return Ok(DispatchOutcome::Failed(
                ErrorCode::DispatchAttemptsExhausted,
            ));
        }
        let lease_ms = self.settings.dispatch_lease.as_millis() as i64;
        let leased = match commit_as(self.store.as_ref(), job, Actor::Dispatch, |job| {
            if job.state != JobState::Queued {
                return Err(crate::domain::job::TransitionError::Backwards {
                    from: job.state,
                    to: JobState::Queued,
                });
            }
            job.acquire_lease(LeaseKind::Dispatch, now, lease_ms)
        })
        .await?
        {
            Committed::Written(job) => job,
            Committed::Refused(_, crate::domain::job::TransitionError::Leased(..)) => {
                // Another delivery of this message is mid-dispatch: come back after it.
                return Err(RetryLater("another dispatch holds the job".into()));
            }
            Committed::Refused(..) | Committed::Missing => {
                return Ok(DispatchOutcome::Skipped("no longer queued"))
            }
        };

        match self.submit(&leased).await {
            Ok(runpod_id) => self.record_submission(leased, runpod_id).await,
            Err(Step::Permanent(error)) => {
                let code = error.code;
                let now = self.clock.now_ms();
                commit_as(self.store.as_ref(), leased, Actor::Dispatch, |job| {
                    job.fail(error.clone(), now)
                })
                .await?;
                Ok(DispatchOutcome::Failed(code))
            }
            // The job's last attempt: fail it now rather than send the message round again
            // (which would only come back to say the budget is spent, or reach the DLQ).
            Err(Step::Transient(reason))
                if leased.attempts >= self.settings.max_dispatch_attempts =>
            {
                let now = self.clock.now_ms();
                let error = JobError::new(
                    ErrorCode::DispatchAttemptsExhausted,
                    format!(
                        "gave up after {} dispatch attempts; the last one: {reason}",
                        leased.attempts
                    ),
                );
                commit_as(self.store.as_ref(), leased, Actor::Dispatch, |job| {
                    job.fail(error.clone(), now)
                })
                .await?;
                Ok(DispatchOutcome::Failed(
                    ErrorCode::DispatchAttemptsExhausted,
                ))
            }
            Err(Step::Transient(reason)) => {
                let now = self.clock.now_ms();
                let mut released = leased.clone();
                released.release_lease(now, now + self.settings.requeue_after.as_millis() as i64);
                let _ = self.store.save(&released, leased.version).await;
                Err(RetryLater(reason))
            }
        }
    }

    async fn submit(&self, job: &Job) -> Result<String, Step> {
        let workflow = self.catalog.get(&job.workflow).ok_or_else(|| {
            Step::Permanent(JobError::new(
                ErrorCode::RunpodRejected,
                format!("workflow {} is no longer available", job.workflow),
            ))
        })?;
        let input_key = keys::volume_input(&job.id, &format!("input.{}", job.input.extension));
        transfer::copy(
            self.uploads.as_ref(),
            &job.input.key,
            self.volume.as_ref(),
            &input_key,
            Some(&job.input.content_type),
        )
        .await
        .map_err(|err| match err.failure() {
            Failure::Missing => Step::Permanent(JobError::new(
                ErrorCode::InputMissing,
                "the input image is no longer in the uploads bucket",
            )),
            // A bucket or the volume refusing us is the gateway's configuration, not the job's
            // fault: retried within the attempt budget, so a fixed key saves the job.
            Failure::Transient | Failure::Permanent => Step::Transient(err.to_string()),
        })?;
        let output_prefix = format!("{}{}", keys::volume_outputs(&job.id), workflow.name());
        let graph = workflow.render(&job.params, &input_key, &output_prefix);
        // The graph under the key the workflow's worker reads; the input image stays on the
        // volume (LoadImage names its key), so RunPod's echoed input stays small.
        let mut input = serde_json::Map::new();
        input.insert(workflow.output_contract().input_key().to_string(), graph);
        let request = RunRequest {
            input: serde_json::Value::Object(input),
            webhook: Some(self.webhook_url(&job.id)),
            policy: RunPolicy {
                execution_timeout: self.settings.execution_timeout.as_millis() as u64,
                ttl: self.settings.runpod_ttl.as_millis() as u64,
            },
        };
        self.runpod
            .run(&request)
            .await
            .map_err(|err| match err.failure() {
                Failure::Transient => Step::Transient(err.to_string()),
                Failure::Missing => Step::Permanent(JobError::new(
                    ErrorCode::RunpodRejected,
                    "RunPod does not know the configured endpoint",
                )),
                Failure::Permanent => Step::Permanent(JobError::new(
                    ErrorCode::RunpodRejected,
                    format!("RunPod refused the job: {err}"),
                )),
            })
    }

    async fn record_submission(
        &self,
        leased: Job,
        runpod_id: String,
    ) -> Result<DispatchOutcome, RetryLater> {
        let now = self.clock.now_ms();
        let next_check = now + self.settings.status_poll_after.as_millis() as i64;
        let mut submitted = leased.clone();
        if submitted
            .acting_as(Actor::Dispatch)
            .mark_submitted(runpod_id.clone(), now, next_check)
            .is_ok()
        {
            match self.store.save(&submitted, leased.version).await {
                Ok(()) => return Ok(DispatchOutcome::Submitted(runpod_id)),
                Err(StoreError::Conflict) => {}
                Err(err) => {
                    // The job is at RunPod but we could not say so; keep the id on the record
                    // when the store is back. Until then the sweeper finds the job via its lease.
                    tracing::error!(job_id = %leased.id, runpod_id, error = %err, "could not record the submission");
                    return Err(err.into());
                }
            }
        }
        // Someone changed the job while we submitted: the client cancelled it, or RunPod's
        // first report beat us. Re-apply the submission to what is stored now.
        let Some(current) = self.store.get(&leased.id).await? else {
            return Ok(DispatchOutcome::Skipped("job vanished while dispatching"));
        };
        if current.is_terminal() {
            // Cancelled by the client, or timed out by the sweeper, while RunPod was taking the
            // job: nobody will ever read its result, so stop the GPU.
            if let Err(err) = self.runpod.cancel(&runpod_id).await {
                tracing::warn!(job_id = %current.id, runpod_id, error = %err, "cancel after a raced dispatch failed");
            }
            return Ok(DispatchOutcome::Skipped("finished while dispatching"));
        }
        match commit_as(self.store.as_ref(), current, Actor::Dispatch, |job| {
            job.mark_submitted(runpod_id.clone(), now, next_check)
        })
        .await?
        {
            Committed::Written(_) => Ok(DispatchOutcome::Submitted(runpod_id)),
            _ => Ok(DispatchOutcome::Skipped("job changed while dispatching")),
        }
    }
}

enum Step {
    Transient(String),
    Permanent(JobError),
}

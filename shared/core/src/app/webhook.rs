//! The RunPod webhook use case: a call to `/webhooks/runpod/{job_id}?token=…` (the route is the
//! HTTP crate's).
//!
//! RunPod signs nothing, so the per-job HMAC token in the URL is the only proof the call is
//! ours, and the URL passes through RunPod, its logs and the worker. A verified call is
//! therefore only a trigger: the job changes on what RunPod's `/status` says about the job's
//! run, never on what the body claims. The body is at most a hint of which run it is about.
//!
//! That hint matters for one case: a run whose `/run` answer was lost announces itself here.
//! If the job has no run yet, the run is confirmed with `/status` and adopted; if the job has
//! another run, it is confirmed and cancelled, and its result is never used.
use std::sync::Arc;

use crate::app::finalize::FinalizeError;
use crate::app::observe::{Observer, Outcome};
use crate::app::{commit_as, Committed};
use crate::domain::job::{Actor, Job, Millis};
use crate::domain::token::WebhookSigner;
use crate::ports::{
    Classified, Failure, JobStore, RunPod, RunPodError, RunPodStatus, StopQueue, StopReason,
    StopRun,
};

fn finalize_error(err: FinalizeError) -> String {
    match err {
        FinalizeError::RetryLater(reason) => reason,
        FinalizeError::Store(err) => err.to_string(),
    }
}

/// RunPod's webhook echoes the whole job input; ours are small, but cap what we parse.
pub const MAX_WEBHOOK_BYTES: usize = 6 * 1024 * 1024;

pub struct WebhookHandler {
    pub store: Arc<dyn JobStore>,
    pub runpod: Arc<dyn RunPod>,
    pub stops: Arc<dyn StopQueue>,
    pub observer: Arc<Observer>,
    pub signer: WebhookSigner,
}

/// What became of one webhook call; the HTTP layer turns it into a status code.
#[derive(Debug, PartialEq)]
pub enum WebhookOutcome {
    /// The token is not this job's: nothing was read or changed.
    Unauthorized,
    /// Handled (or nothing to do): RunPod need not call again.
    Handled(Outcome),
    /// Not settled now (store or RunPod unavailable, another caller finishing the job): RunPod's
    /// retry, or the sweeper, settles it. The reason is for the log.
    Deferred(String),
}

impl WebhookHandler {
    pub async fn receive(&self, job_id: &str, token: &str, body: &[u8]) -> WebhookOutcome {
        if !self.signer.verify(job_id, token) {
            tracing::warn!(job_id, "webhook with a bad or missing token refused");
            return WebhookOutcome::Unauthorized;
        }
        crate::metrics::webhook_received();
        let job = match self.store.get(job_id).await {
            Ok(Some(job)) => job,
            // A valid token for a job we no longer keep: nothing to do, and no reason to retry.
            Ok(None) => {
                tracing::info!(job_id, "webhook for a job no longer kept");
                return WebhookOutcome::Handled(Outcome::Unchanged);
            }
            Err(err) => {
                tracing::warn!(job_id, error = %err, "webhook deferred");
                return WebhookOutcome::Deferred(err.to_string());
            }
        };
        let span = crate::app::job_span(&job);
        let handled = async {
            match self.handle(job, body).await {
                Ok(outcome) => {
                    tracing::info!(?outcome, "webhook handled");
                    WebhookOutcome::Handled(outcome)
                }
                Err(reason) => {
                    tracing::warn!(reason, "webhook deferred");
                    WebhookOutcome::Deferred(reason)
                }
            }
        };
        tracing::Instrument::instrument(handled, span).await
    }

    async fn handle(&self, job: Job, body: &[u8]) -> Result<Outcome, String> {
        if job.is_terminal() {
            return Ok(Outcome::Unchanged);
        }
        let hint = serde_json::from_slice::<RunPodStatus>(body)
            .ok()
            .and_then(|status| status.id)
            .filter(|id| !id.is_empty());
        let outcome = match (job.runpod_job_id.clone(), hint) {
            // RunPod has it but dispatch has not recorded the id yet: be called again.
            (None, None) => return Err("job not yet recorded as submitted".into()),
            // A run nobody recorded (its /run answer was lost) announces itself.
            (None, Some(run)) => self.adopt(job, &run).await?,
            (Some(tracked), Some(run)) if run != tracked => {
                self.stop_extra_run(&job, &run).await;
                self.observe(job, &tracked).await?
            }
            (Some(tracked), _) => self.observe(job, &tracked).await?,
        };
        match outcome {
            // Another call is finishing the job; a retry from RunPod (or the sweeper) settles it.
            Outcome::Busy => Err("job is busy".into()),
            outcome => Ok(outcome),
        }
    }

    /// Acts on what RunPod's `/status` says about `run`, the job's own run.
    async fn observe(&self, job: Job, run: &str) -> Result<Outcome, String> {
        match self.runpod.status(run).await {
            Ok(status) => self
                .observer
                .observe_as(job, &status, Actor::Webhook)
                .await
                .map_err(finalize_error),
            Err(RunPodError::TooLarge { limit }) => self
                .observer
                .report_too_large(job, run, limit, Actor::Webhook)
                .await
                .map_err(finalize_error),
            // Gone at RunPod: leave it to the sweeper, which records the expiry.
            Err(err) if err.failure() == Failure::Missing => Ok(Outcome::Unchanged),
            Err(err) => Err(err.to_string()),
        }
    }

    /// A run the job does not track announced itself while the job has none: once RunPod
    /// confirms it exists, it becomes the job's run; if the job got another run (or ended)
    /// meanwhile, it is stopped instead.
    async fn adopt(&self, job: Job, run: &str) -> Result<Outcome, String> {
        let status = match self.runpod.status(run).await {
            Ok(status) if status.id.as_deref().is_none_or(|id| id == run) => Some(status),
            // RunPod knows it, and it completed with an output too long to read.
            Err(RunPodError::TooLarge { .. }) => None,
            // RunPod does not know it (forged, or long gone): nothing to adopt.
            Ok(_) => return Ok(Outcome::Unchanged),
            Err(err) if err.failure() == Failure::Missing => return Ok(Outcome::Unchanged),
            Err(err) => return Err(err.to_string()),
        };
        let now = self.observer.clock.now_ms();
        let next_check = now + self.observer.settings.poll_interval.as_millis() as Millis;
        let adopted = commit_as(self.store.as_ref(), job, Actor::Webhook, |job| {
            job.mark_submitted(run.to_string(), now, next_check)
        })
        .await
        .map_err(|err| err.to_string())?;
        match adopted {
            Committed::Written(job) => {
                tracing::warn!(job_id = %job.id, runpod_id = run, "adopted a run whose /run answer was lost");
                let acted = match status {
                    Some(status) => self.observer.observe_as(job, &status, Actor::Webhook).await,
                    None => {
                        let limit = self.observer.settings.max_status_bytes;
                        self.observer
                            .report_too_large(job, run, limit, Actor::Webhook)
                            .await
                    }
                };
                acted.map_err(finalize_error)
            }
            Committed::Refused(job, _) => {
                self.stop_extra_run(&job, run).await;
                Ok(Outcome::Unchanged)
            }
            Committed::Missing => Ok(Outcome::Unchanged),
        }
    }

    /// A second run of the job (its `/run` answer was lost and the job was dispatched again):
    /// once RunPod confirms it, it is cancelled, and its result is never used.
    async fn stop_extra_run(&self, job: &Job, run: &str) {
        match self.runpod.status(run).await {
            // Too long to read is still RunPod's word that the run exists.
            Ok(_) | Err(RunPodError::TooLarge { .. }) => {}
            Err(err) => {
                tracing::info!(job_id = %job.id, runpod_id = run, error = %err, "an unconfirmed run was not stopped");
                return;
            }
        }
        let stop = StopRun::new(job, run, StopReason::ExtraRun);
        match self.stops.request_stop(&stop).await {
            Ok(()) => {
                tracing::warn!(job_id = %job.id, runpod_id = run, "an extra run is being stopped")
            }
            Err(err) => {
                tracing::warn!(job_id = %job.id, runpod_id = run, error = %err, "could not queue an extra run's stop")
            }
        }
    }
}

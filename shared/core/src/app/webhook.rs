//! The RunPod webhook use case: a call to `/webhooks/runpod/{job_id}?token=…` (the route is the
//! HTTP crate's).
//!
//! RunPod signs nothing, so the per-job HMAC token in the URL is the only proof the call is
//! ours, and the URL passes through RunPod, its logs and the worker. A verified call is
//! therefore only a trigger: the job changes on what RunPod's `/status` says about the job's
//! run, never on what the body claims. The body is at most a hint of which run it is about.
use std::sync::Arc;

use crate::app::finalize::{FinalizeError, Finalizer, Outcome};
use crate::domain::job::Actor;
use crate::domain::token::WebhookSigner;
use crate::ports::{Classified, Failure, JobStore, RunPod, RunPodStatus};

/// RunPod's webhook echoes the whole job input; ours are small, but cap what we parse.
pub const MAX_WEBHOOK_BYTES: usize = 6 * 1024 * 1024;

pub struct WebhookHandler {
    pub store: Arc<dyn JobStore>,
    pub runpod: Arc<dyn RunPod>,
    pub finalizer: Arc<Finalizer>,
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
        match self.handle(job_id, body).await {
            Ok(outcome) => {
                tracing::info!(job_id, ?outcome, "webhook handled");
                WebhookOutcome::Handled(outcome)
            }
            Err(reason) => {
                tracing::warn!(job_id, reason, "webhook deferred");
                WebhookOutcome::Deferred(reason)
            }
        }
    }

    async fn handle(&self, job_id: &str, body: &[u8]) -> Result<Outcome, String> {
        let job = match self.store.get(job_id).await {
            Ok(Some(job)) => job,
            // A valid token for a job we no longer keep: nothing to do, and no reason to retry.
            Ok(None) => return Ok(Outcome::Unchanged),
            Err(err) => return Err(err.to_string()),
        };
        if job.is_terminal() {
            return Ok(Outcome::Unchanged);
        }
        let hint = serde_json::from_slice::<RunPodStatus>(body)
            .ok()
            .and_then(|status| status.id);
        let Some(runpod_id) = job.runpod_job_id.clone() else {
            // RunPod has it but dispatch has not recorded the id yet: be called again.
            return Err("job not yet recorded as submitted".into());
        };
        if hint.as_ref().is_some_and(|hint| *hint != runpod_id) {
            tracing::warn!(
                job_id,
                ?hint,
                runpod_id,
                "webhook names another run; asking about the job's own"
            );
        }
        let outcome = match self.runpod.status(&runpod_id).await {
            Ok(status) => {
                self.finalizer
                    .observe_as(job, &status, Actor::Webhook)
                    .await
            }
            // Gone at RunPod: leave it to the sweeper, which records the expiry.
            Err(err) if err.failure() == Failure::Missing => Ok(Outcome::Unchanged),
            Err(err) => return Err(err.to_string()),
        };
        match outcome {
            // Another call is finishing the job; a retry from RunPod (or the sweeper) settles it.
            Ok(Outcome::Busy) => Err("job is busy".into()),
            Ok(outcome) => Ok(outcome),
            Err(FinalizeError::RetryLater(reason)) => Err(reason),
            Err(FinalizeError::Store(err)) => Err(err.to_string()),
        }
    }
}

//! Dispatch: takes a queued job off SQS, puts its input on the RunPod volume, renders the
//! workflow and submits it to RunPod. A message names only a job id; the job record decides
//! what (if anything) to do, so redelivered and duplicated messages are harmless.
use std::sync::Arc;

use crate::app::{commit_leased, inputs, Committed, Writer};
use crate::config::Settings;
use crate::domain::egress::EgressRefusal;
use crate::domain::job::{
    Actor, ErrorCode, Job, JobError, JobState, LeaseKind, Millis, TransitionError,
};
use crate::domain::keys::VolumeRoot;
use crate::domain::token::WebhookSigner;
use crate::domain::workflow::WorkflowCatalog;
use futures::StreamExt;

use crate::app::backends::Backends;
use crate::ports::{
    BackendError, CallbackQueue, Classified, Clock, Failure, ImageProbe, JobStore, ObjectStore,
    PollQueue, Resolver, StopQueue, StopReason, StopRun, StoreError, UrlFetcher,
};

#[derive(Debug, Clone, PartialEq)]
pub enum DispatchOutcome {
    Submitted(String),
    /// RunPod may hold a run nobody recorded (`/run`'s answer was lost, or recording it
    /// failed). The message is done: the run is adopted when it announces itself, and the
    /// sweeper brings the job back to dispatch when `run_outcome_grace` ends.
    Unconfirmed(String),
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
    /// Where the callbacks the job's client asked for are requested.
    pub callbacks: Arc<dyn CallbackQueue>,
    pub uploads: Arc<dyn ObjectStore>,
    pub volume: Arc<dyn ObjectStore>,
    /// An input given by URL: where its host resolves, how it is fetched (connecting only to
    /// the address checked), and how it is recognised as an image.
    pub resolver: Arc<dyn Resolver>,
    pub fetcher: Arc<dyn UrlFetcher>,
    pub images: Arc<dyn ImageProbe>,
    /// This deployment's folder on the volume: the job's input goes there, and its runs are
    /// told to write there.
    pub volume_root: VolumeRoot,
    /// Where runs start: the job's backend.
    pub backends: Backends,
    /// A polled backend's first check is asked for here.
    pub polls: Arc<dyn PollQueue>,
    /// A held job (a batch's) starts only with a slot of its key.
    pub turns: Arc<crate::app::holds::Turns>,
    /// Where runs nobody will read are sent to be stopped.
    pub stops: Arc<dyn StopQueue>,
    pub catalog: Arc<WorkflowCatalog>,
    pub signer: WebhookSigner,
    /// Public base URL the webhook route is reached at.
    pub webhook_base: String,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
}

impl Dispatcher {
    /// How dispatch writes jobs.
    fn writer(&self) -> Writer<'_> {
        Writer::new(&*self.store, &*self.callbacks, Actor::Dispatch)
    }

    /// The webhook URL RunPod will call for this job: per-job HMAC token in the query.
    pub fn webhook_url(&self, job_id: &str) -> String {
        format!(
            "{}/webhooks/runpod/{}?token={}",
            self.webhook_base,
            job_id,
            self.signer.token(job_id)
        )
    }

    /// [`Dispatcher::dispatch_before`] without an invocation deadline (the local runner, tests).
    pub async fn dispatch(&self, job_id: &str) -> Result<DispatchOutcome, RetryLater> {
        self.dispatch_before(job_id, None).await
    }

    /// Dispatches the job, never starting `/run` with less than `run_reserve` left before
    /// `deadline` (the invocation's end, epoch ms): an answer nobody could record would leave a
    /// run nobody tracks.
    pub async fn dispatch_before(
        &self,
        job_id: &str,
        deadline: Option<Millis>,
    ) -> Result<DispatchOutcome, RetryLater> {
        let Some(job) = self.store.get(job_id).await? else {
            return Ok(DispatchOutcome::Skipped("no such job"));
        };
        let span = crate::app::job_span(&job);
        tracing::Instrument::instrument(self.dispatch_job(job, deadline), span).await
    }

    async fn dispatch_job(
        &self,
        job: Job,
        deadline: Option<Millis>,
    ) -> Result<DispatchOutcome, RetryLater> {
        if !job.awaits_dispatch() {
            return Ok(DispatchOutcome::Skipped("already dispatched or finished"));
        }
        let now = self.clock.now_ms();
        let grace = self.settings.run_outcome_grace.as_millis() as Millis;
        if job.unconfirmed_run_at.is_some_and(|at| now < at + grace) {
            // The sweeper requeues the job when the grace ends (its next check); holding the
            // message instead would spend its receives towards the dead-letter queue.
            return Ok(DispatchOutcome::Skipped(
                "an unconfirmed run may still announce itself",
            ));
        }
        // Held back until a slot of its key frees; the job then is woken with a message of its
        // own (and the sweeper sends it again meanwhile, should that be lost).
        if !self.turns.take(&job).await? {
            return Ok(DispatchOutcome::Skipped("held back until a slot frees"));
        }
        if job.attempts >= self.settings.max_dispatch_attempts {
            let error = JobError::new(
                ErrorCode::DispatchAttemptsExhausted,
                format!("gave up after {} dispatch attempts", job.attempts),
            );
            self.writer()
                .commit(job, |job| job.fail(error.clone(), now))
                .await?;
            return Ok(DispatchOutcome::Failed(
                ErrorCode::DispatchAttemptsExhausted,
            ));
        }
        let lease_ms = self.settings.dispatch_lease.as_millis() as i64;
        let leased = match self
            .writer()
            .commit(job, |job| {
                if !job.awaits_dispatch() {
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

        if leased.attempts > 0 {
            crate::metrics::retried("dispatch");
        }
        let mut leased = leased;
        let submitted = match self.fetch_input(&leased).await {
            Ok(Some(fetched)) => {
                leased = fetched;
                self.submit(&leased, deadline).await
            }
            Ok(None) => self.submit(&leased, deadline).await,
            Err(step) => Err(step),
        };
        match submitted {
            Ok(runpod_id) => self.record_submission(leased, runpod_id).await,
            Err(Step::Unknown(reason)) => {
                tracing::warn!(job_id = %leased.id, reason, "run outcome unknown; waiting for the run to announce itself");
                let now = self.clock.now_ms();
                self.writer()
                    .commit(leased, |job| {
                        job.note_unconfirmed_run(now, now + grace);
                        Ok(())
                    })
                    .await?;
                Ok(DispatchOutcome::Unconfirmed(reason))
            }
            Err(Step::Permanent(error)) => {
                let code = error.code;
                let now = self.clock.now_ms();
                self.writer()
                    .commit(leased, |job| job.fail(error.clone(), now))
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
                self.writer()
                    .commit(leased, |job| job.fail(error.clone(), now))
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

    /// An input given by URL, fetched into the job's own key in the uploads bucket on the
    /// first dispatch: the egress rules applied again (DNS may have changed since the job was
    /// accepted) and the connection made to the address checked, the body capped, the image
    /// checked as an upload is. The job then records what it got. Nothing to do for another
    /// input, or one fetched by an earlier attempt.
    async fn fetch_input(&self, leased: &Job) -> Result<Option<Job>, Step> {
        let Some(source) = leased
            .input
            .source_url
            .as_deref()
            .filter(|_| leased.input.awaits_fetch())
        else {
            return Ok(None);
        };
        let unavailable =
            |message: String| Step::Permanent(JobError::new(ErrorCode::InputUnavailable, message));
        let rejected =
            |message: String| Step::Permanent(JobError::new(ErrorCode::InputRejected, message));
        let url = url::Url::parse(source)
            .map_err(|_| unavailable("the input URL is not valid".into()))?;
        let destination = inputs::destination(self.settings.egress, self.resolver.as_ref(), &url)
            .await
            .map_err(|refusal| match refusal {
                // DNS may be back later; the attempt budget bounds the wait.
                EgressRefusal::Unresolved { .. } => Step::Transient(refusal.to_string()),
                refused => unavailable(format!("the input URL is refused: {refused}")),
            })?;
        let fetched = self
            .fetcher
            .open_at(&url, &destination)
            .await
            .map_err(|err| match err.failure() {
                Failure::Transient | Failure::Unknown => {
                    Step::Transient(format!("fetching the input: {err}"))
                }
                Failure::Missing | Failure::Permanent => {
                    unavailable(format!("fetching the input: {err}"))
                }
            })?;
        let cap = self.settings.max_upload_bytes;
        let too_large = || rejected(format!("the input is larger than {cap} bytes"));
        if fetched.size.is_some_and(|size| size > cap) {
            return Err(too_large());
        }
        let mut bytes = Vec::with_capacity(fetched.size.unwrap_or(0).min(cap) as usize);
        let mut body = fetched.body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Step::Transient(format!("reading the input: {e}")))?;
            if (bytes.len() + chunk.len()) as u64 > cap {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        let kind = inputs::check_image(self.images.as_ref(), &bytes)
            .map_err(|refusal| rejected(refusal.to_string()))?;
        let size = bytes.len() as u64;
        self.uploads
            .put_bytes(&leased.input.key, bytes.into(), kind.content_type)
            .await
            .map_err(|e| Step::Transient(format!("storing the input: {e}")))?;
        let committed = commit_leased(
            self.store.as_ref(),
            self.callbacks.as_ref(),
            leased,
            Actor::Dispatch,
            |job| {
                job.input.content_type = kind.content_type.to_string();
                job.input.extension = kind.extension.to_string();
                job.input.size = size;
                Ok(())
            },
        )
        .await
        .map_err(|e| Step::Transient(e.to_string()))?;
        match committed {
            Committed::Written(job) => Ok(Some(job)),
            _ => Err(Step::Transient(
                "the job changed while its input was fetched".into(),
            )),
        }
    }

    async fn submit(&self, job: &Job, deadline: Option<Millis>) -> Result<String, Step> {
        let workflow = self.catalog.get(&job.workflow).ok_or_else(|| {
            Step::Permanent(JobError::new(
                ErrorCode::RunpodRejected,
                format!("workflow {} is no longer available", job.workflow),
            ))
        })?;
        let reserve = self.settings.run_reserve.as_millis() as Millis;
        if deadline.is_some_and(|deadline| deadline - self.clock.now_ms() < reserve) {
            return Err(Step::Transient(
                "too little of the invocation left to record a run".into(),
            ));
        }
        let backend = self
            .backends
            .of(job)
            .map_err(|err| Step::Transient(err.to_string()))?;
        backend
            .start(job, workflow, &self.webhook_url(&job.id))
            .await
            .map_err(|err| match err {
                BackendError::Refused(error) => Step::Permanent(error),
                BackendError::Unknown(reason) => Step::Unknown(reason),
                other => Step::Transient(other.to_string()),
            })
    }

    async fn record_submission(
        &self,
        leased: Job,
        runpod_id: String,
    ) -> Result<DispatchOutcome, RetryLater> {
        let now = self.clock.now_ms();
        // A backend that calls nobody back is checked at its own pace from the start.
        let polled = self.backends.polled_every(&leased);
        let first_check = polled.unwrap_or(self.settings.status_poll_after);
        let next_check = now + first_check.as_millis() as i64;
        let job_id = leased.id.clone();
        let recorded = self
            .record_run(leased, runpod_id.clone(), now, next_check)
            .await;
        if let (Ok(DispatchOutcome::Submitted(_)), Some(delay)) = (&recorded, polled) {
            if let Err(err) = self.polls.request_check(&job_id, next_check, delay).await {
                // The sweeper checks the job when it comes due, and asks again then.
                tracing::warn!(job_id, runpod_id, error = %err, "could not ask for the run's first check");
            }
        }
        recorded
    }

    async fn record_run(
        &self,
        leased: Job,
        runpod_id: String,
        now: Millis,
        next_check: Millis,
    ) -> Result<DispatchOutcome, RetryLater> {
        let mut submitted = leased.clone();
        if submitted
            .acting_as(Actor::Dispatch)
            .mark_submitted(runpod_id.clone(), now, next_check)
            .is_ok()
        {
            // RunPod has the run: the id is in hand, so a failed save is retried here, never by
            // dispatching again (which would start a second run).
            let mut last_error = None;
            for _ in 0..RECORD_ATTEMPTS {
                match self.store.save(&submitted, leased.version).await {
                    Ok(()) => return Ok(DispatchOutcome::Submitted(runpod_id)),
                    Err(StoreError::Conflict) => {
                        last_error = None;
                        break;
                    }
                    Err(err) => last_error = Some(err),
                }
            }
            if let Some(err) = last_error {
                // The run will announce itself (its webhook) and be adopted then; the message
                // is done either way.
                tracing::error!(job_id = %leased.id, runpod_id, error = %err, "could not record the submission");
                return Ok(DispatchOutcome::Unconfirmed(format!(
                    "RunPod took the job as {runpod_id}, but recording it failed: {err}"
                )));
            }
        }
        // Someone changed the job while we submitted: the client cancelled it, RunPod's first
        // report beat us, or a lost earlier run announced itself and was adopted.
        let Some(current) = self.store.get(&leased.id).await? else {
            self.stop_run(&leased, &runpod_id, StopReason::EndedWhileDispatching)
                .await;
            return Ok(DispatchOutcome::Skipped("job vanished while dispatching"));
        };
        if current.is_terminal() {
            // Cancelled by the client, or timed out by the sweeper, while RunPod was taking the
            // job: nobody will ever read its result, so stop the GPU.
            self.stop_run(&current, &runpod_id, StopReason::EndedWhileDispatching)
                .await;
            return Ok(DispatchOutcome::Skipped("finished while dispatching"));
        }
        match self
            .writer()
            .commit(current, |job| {
                job.mark_submitted(runpod_id.clone(), now, next_check)
            })
            .await?
        {
            Committed::Written(_) => Ok(DispatchOutcome::Submitted(runpod_id)),
            Committed::Refused(job, TransitionError::Stale) => {
                // The job already has another run: ours is the extra one.
                self.stop_run(&job, &runpod_id, StopReason::ExtraRun).await;
                Ok(DispatchOutcome::Skipped("the job already has a run"))
            }
            _ => Ok(DispatchOutcome::Skipped("job changed while dispatching")),
        }
    }

    /// Has a run nobody will read stopped; if the stop cannot even be queued, its result is
    /// still never used (only the job's own run is ever asked about), and its webhook, when
    /// it announces itself, asks for the stop again.
    async fn stop_run(&self, job: &Job, runpod_id: &str, reason: StopReason) {
        let job_id = job.id.as_str();
        let stop = StopRun::new(job, runpod_id, reason);
        if let Err(err) = self.stops.request_stop(&stop).await {
            tracing::warn!(job_id, runpod_id, error = %err, "could not queue an extra run's stop");
        }
    }
}

/// How many times the record of a run RunPod took is written before giving up on this call.
const RECORD_ATTEMPTS: usize = 3;

enum Step {
    Transient(String),
    /// `/run` may have started a run whose id we do not have.
    Unknown(String),
    Permanent(JobError),
}

//! Acting on what RunPod's `/status` says about a job's run. The webhook and the sweeper both
//! call [`Observer::observe_as`]; it is safe to call any number of times, concurrently, for the
//! same job, since every write is conditional on the version read.
//!
//! A run that completed is not collected here: its report is stored (RunPod keeps a finished
//! run's output for only 30 minutes, and `worker_comfyui` images exist nowhere else), the job
//! records the hand-off, and the finalize queue is asked to collect it. So the webhook answers
//! in milliseconds whatever the outputs weigh, and the finalize function has the time and
//! memory for the largest allowed output.
use std::sync::Arc;
use std::time::Duration;

use crate::app::finalize::FinalizeError;
use crate::app::{callbacks, Committed, Writer};
use crate::config::Settings;
use crate::domain::callback::CallbackEvent;
use crate::domain::job::{Actor, ErrorCode, Job, JobError, JobState, Millis, TransitionError};
use crate::domain::keys;
use crate::domain::report::{ProgressReport, Reported};
use crate::ports::{CallbackQueue, Clock, FinalizeQueue, JobStore, ObjectStore, RunPodStatus};

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Nothing to do: the job already reflects the report, or is terminal.
    Unchanged,
    /// The job moved to a non-terminal state (e.g. running).
    Progressed(JobState),
    /// This call moved the job to its terminal state.
    Finished(JobState),
    /// The run completed: its report is stored and the finalize function asked to collect it.
    HandedOff,
    /// Finalize met a transient failure, gave the job back, and asked to try again later.
    Retrying(String),
    /// Someone else holds the job right now (a dispatch or finalize lease); try later.
    Busy,
    /// The report cannot be acted on (empty or unknown); ask `/status`.
    NeedsStatus,
}

/// What a RunPod report asks of a job, decided from the report alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The report says nothing usable (empty, or a status nobody knows): ask `/status`.
    AskStatus,
    /// Still queued at RunPod: nothing to record.
    Wait,
    /// A worker has it.
    MarkRunning(Option<ProgressReport>),
    /// It ended without outputs: failed, timed out or cancelled at RunPod.
    End(JobState, JobError),
    /// It completed: hand it to finalize, which collects its outputs.
    Collect(Option<serde_json::Value>),
}

/// The first step of observing: what `status` means for the job it is about.
pub fn decide(status: &RunPodStatus) -> Decision {
    let report = Reported::from_status(
        status.status.as_deref(),
        status.output.as_ref(),
        status.error.as_ref(),
    );
    match report {
        Reported::Unknown => Decision::AskStatus,
        Reported::Queued => Decision::Wait,
        Reported::Running(progress) => Decision::MarkRunning(progress),
        Reported::Completed(output) => Decision::Collect(output),
        Reported::Failed(message) => Decision::End(
            JobState::Failed,
            JobError::new(ErrorCode::WorkerFailed, message),
        ),
        Reported::TimedOut => Decision::End(
            JobState::TimedOut,
            JobError::new(
                ErrorCode::ExecutionTimedOut,
                "RunPod timed the job out before it finished",
            ),
        ),
        Reported::Cancelled => Decision::End(
            JobState::Cancelled,
            JobError::new(ErrorCode::CancelledByRunpod, "RunPod cancelled the job"),
        ),
    }
}

/// The report is about one RunPod run; if the job (as stored when a change is applied) tracks
/// another, the report is not about it any more.
pub(crate) struct SameRun(pub(crate) Option<String>);

impl SameRun {
    pub(crate) fn check(&self, job: &Job) -> Result<(), TransitionError> {
        match (&self.0, &job.runpod_job_id) {
            (Some(reported), Some(tracked)) if reported != tracked => Err(TransitionError::Stale),
            _ => Ok(()),
        }
    }
}

/// The longest a handed-off job waits before the sweeper asks finalize again: the finalize
/// lease (no sooner, while an attempt may still hold the job), and at most five minutes, so that
/// a lost request costs minutes at most.
pub fn handoff_recheck(settings: &Settings) -> Duration {
    settings.finalize_lease.min(Duration::from_secs(5 * 60))
}

pub struct Observer {
    pub store: Arc<dyn JobStore>,
    /// Where the callbacks the job's client asked for are requested.
    pub callbacks: Arc<dyn CallbackQueue>,
    /// Where a completed run's report is kept for finalize: the results bucket, in the job's
    /// own folder.
    pub reports: Arc<dyn ObjectStore>,
    pub finalize: Arc<dyn FinalizeQueue>,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
}

impl Observer {
    /// How this use case writes jobs, as `by`.
    fn writer(&self, by: Actor) -> Writer<'_> {
        Writer::new(&*self.store, &*self.callbacks, by)
    }

    /// [`Observer::observe_as`] for a caller that does not say who it is.
    pub async fn observe(&self, job: Job, status: &RunPodStatus) -> Result<Outcome, FinalizeError> {
        self.observe_as(job, status, Actor::Gateway).await
    }

    /// Acts on what RunPod reports about `job`; the changes are recorded as made `by` (the
    /// webhook or the sweeper). `status` must be RunPod's own `/status` answer: a completed
    /// run is handed to finalize on its word.
    pub async fn observe_as(
        &self,
        job: Job,
        status: &RunPodStatus,
        by: Actor,
    ) -> Result<Outcome, FinalizeError> {
        if job.is_terminal() {
            return Ok(Outcome::Unchanged);
        }
        let same_run = SameRun(status.id.clone());
        if same_run.check(&job).is_err() {
            return Ok(Outcome::Unchanged);
        }
        // Handed off already: finalize has all it needs, and no later report changes that.
        // Asking again costs one message and recovers one that was lost.
        if job.current_handoff().is_some() {
            self.request_finalize(&job.id).await?;
            return Ok(Outcome::Unchanged);
        }
        let (delay, execution) = (status.delay_time, status.execution_time);
        let now = self.clock.now_ms();
        let committed = match decide(status) {
            Decision::AskStatus => return Ok(Outcome::NeedsStatus),
            Decision::Wait => return Ok(Outcome::Unchanged),
            Decision::MarkRunning(progress) => {
                let (fraction, message) = progress
                    .map(|p| (p.fraction, p.message))
                    .unwrap_or_default();
                // Nothing new: a job already running, with this progress or none reported.
                let unchanged = job.state == JobState::Running
                    && (fraction.is_none() && message.is_none()
                        || job
                            .progress
                            .as_ref()
                            .is_some_and(|p| p.fraction == fraction && p.message == message));
                if unchanged {
                    return Ok(Outcome::Unchanged);
                }
                let next_check = now + self.settings.poll_interval.as_millis() as Millis;
                let committed = self
                    .writer(by)
                    .commit(job, |job| {
                        same_run.check(job)?;
                        job.ensure_unleased(now)?;
                        if job.state != JobState::Running {
                            job.mark_running(now)?;
                            job.next_check_at = Some(next_check);
                        }
                        if fraction.is_some() || message.is_some() {
                            job.report_progress(fraction, message.clone(), now)?;
                            // Rate-limited: this write notes the turn it takes.
                            job.take_progress_turn(now);
                        }
                        Ok(())
                    })
                    .await?;
                if let Committed::Written(job) = &committed {
                    if job.progress_told_at == Some(now) {
                        callbacks::tell(self.callbacks.as_ref(), job, CallbackEvent::Progress)
                            .await;
                    }
                }
                committed
            }
            Decision::End(state, error) => {
                self.writer(by)
                    .commit(job, |job| {
                        same_run.check(job)?;
                        job.ensure_unleased(now)?;
                        job.record_runpod_times(delay, execution);
                        job.end(state, error.clone(), now)
                    })
                    .await?
            }
            Decision::Collect(_) => return self.hand_off(job, status, by).await,
        };
        Ok(match committed {
            Committed::Written(job) if job.is_terminal() => Outcome::Finished(job.state),
            Committed::Written(job) => Outcome::Progressed(job.state),
            Committed::Refused(_, TransitionError::Leased(..)) => Outcome::Busy,
            Committed::Refused(..) | Committed::Missing => Outcome::Unchanged,
        })
    }

    /// A completed run: store its report, record the hand-off, then ask finalize. In this
    /// order, a crash anywhere loses nothing: a report without a hand-off is removed with the
    /// job's leftovers, and a hand-off whose request was lost is asked again by the sweeper
    /// when the job comes due.
    async fn hand_off(
        &self,
        job: Job,
        status: &RunPodStatus,
        by: Actor,
    ) -> Result<Outcome, FinalizeError> {
        let Some(run) = job.runpod_job_id.clone() else {
            return Ok(Outcome::Unchanged);
        };
        let now = self.clock.now_ms();
        if job.active_lease(now).is_some() {
            return Ok(Outcome::Busy);
        }
        let report_key = keys::report(&job.owner, &job.id, &run);
        let body = serde_json::to_vec(status)
            .map_err(|err| FinalizeError::RetryLater(format!("encoding the report: {err}")))?;
        self.reports
            .put_bytes(&report_key, body.into(), "application/json")
            .await
            .map_err(|err| FinalizeError::RetryLater(format!("storing the report: {err}")))?;
        let (delay, execution) = (status.delay_time, status.execution_time);
        // If finalize has not taken the job by then (the request was lost, or every attempt
        // failed), the sweeper asks again.
        let recheck = now + handoff_recheck(&self.settings).as_millis() as Millis;
        let committed = self
            .writer(by)
            .commit(job, |job| {
                job.ensure_unleased(now)?;
                job.record_runpod_times(delay, execution);
                job.hand_off(&run, report_key.clone(), now, recheck)
            })
            .await?;
        match committed {
            Committed::Written(job) => {
                tracing::info!(job_id = %job.id, runpod_id = %run, "run completed; handed to finalize");
                self.request_finalize(&job.id).await?;
                Ok(Outcome::HandedOff)
            }
            Committed::Refused(_, TransitionError::Leased(..)) => Ok(Outcome::Busy),
            // Ended meanwhile (a client's cancel): nobody will read the report.
            Committed::Refused(job, _) if job.is_terminal() => {
                if let Err(err) = self.reports.delete(&report_key).await {
                    tracing::info!(job_id = %job.id, error = %err, "the report stays until the clean-up");
                }
                Ok(Outcome::Unchanged)
            }
            // Handed off meanwhile by another caller, who asks finalize itself.
            Committed::Refused(..) | Committed::Missing => Ok(Outcome::Unchanged),
        }
    }

    /// RunPod's answer about `run`, the job's run, is longer than any report the gateway reads
    /// (`RUNPOD_MAX_STATUS_BYTES`): only a completed run's output makes it so. The job fails
    /// `output_too_large` with nothing stored, and the answer is never held.
    pub async fn report_too_large(
        &self,
        job: Job,
        run: &str,
        limit: u64,
        by: Actor,
    ) -> Result<Outcome, FinalizeError> {
        let now = self.clock.now_ms();
        let same_run = SameRun(Some(run.to_string()));
        let error = JobError::new(
            ErrorCode::OutputTooLarge,
            format!("RunPod's report of the run is longer than {limit} bytes"),
        );
        let committed = self
            .writer(by)
            .commit(job, |job| {
                same_run.check(job)?;
                if job.current_handoff().is_some() {
                    return Err(TransitionError::Stale);
                }
                job.ensure_unleased(now)?;
                job.fail(error.clone(), now)
            })
            .await?;
        Ok(match committed {
            Committed::Written(job) => {
                tracing::warn!(job_id = %job.id, runpod_id = run, limit, "RunPod's report is too long; the job failed");
                Outcome::Finished(JobState::Failed)
            }
            Committed::Refused(_, TransitionError::Leased(..)) => Outcome::Busy,
            Committed::Refused(..) | Committed::Missing => Outcome::Unchanged,
        })
    }

    async fn request_finalize(&self, job_id: &str) -> Result<(), FinalizeError> {
        self.finalize
            .request_finalize(job_id, Duration::ZERO)
            .await
            .map_err(|err| FinalizeError::RetryLater(format!("asking finalize: {err}")))
    }
}

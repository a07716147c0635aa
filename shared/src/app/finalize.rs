//! Finalizing: acting on what RunPod reports about a job. The webhook and the sweeper both call
//! [`Finalizer::observe`]; it is safe to call any number of times, concurrently, for the same
//! job. Completion takes a finalize lease first, so only one caller copies outputs; every write
//! is conditional on the version read, so only one caller moves the job to a terminal state.
use std::sync::Arc;
use std::time::Duration;

use crate::app::{commit, transfer, Committed};
use crate::config::Settings;
use crate::domain::job::{ErrorCode, Job, JobError, JobState, LeaseKind, OutputFile};
use crate::domain::paths::{file_name, results_key, VolumeLayout};
use crate::domain::report::{volume_output_keys, Reported};
use crate::ports::{Clock, JobStore, ObjectError, ObjectStore, RunPodStatus, StoreError};

/// After a transient copy failure, look again this soon.
const RETRY_SOON: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Nothing to do: the job already reflects the report, or is terminal.
    Unchanged,
    /// The job moved to a non-terminal state (e.g. running).
    Progressed(JobState),
    /// This call moved the job to its terminal state.
    Finished(JobState),
    /// Someone else holds the job right now (a dispatch or finalize lease); try later.
    Busy,
    /// The report cannot be acted on (empty or unknown); ask `/status`.
    NeedsStatus,
}

#[derive(Debug, thiserror::Error)]
pub enum FinalizeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Copying outputs failed for a reason that may pass; the lease was released.
    #[error("output copy failed, will retry: {0}")]
    RetryLater(String),
}

pub struct Finalizer {
    pub store: Arc<dyn JobStore>,
    pub volume: Arc<dyn ObjectStore>,
    pub results: Arc<dyn ObjectStore>,
    pub layout: VolumeLayout,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
}

impl Finalizer {
    pub async fn observe(&self, job: Job, status: &RunPodStatus) -> Result<Outcome, FinalizeError> {
        if job.is_terminal() {
            return Ok(Outcome::Unchanged);
        }
        let report = Reported::from_status(
            status.status.as_deref(),
            status.output.as_ref(),
            status.error.as_ref(),
        );
        let (delay, execution) = (status.delay_time, status.execution_time);
        let now = self.clock.now_ms();
        let terminal = |state: JobState, error: JobError| {
            move |job: &mut Job| {
                job.record_runpod_times(delay, execution);
                match state {
                    JobState::Failed => job.fail(error.clone(), now),
                    JobState::Cancelled => job.cancel(error.clone(), now),
                    _ => job.time_out(error.clone(), now),
                }
            }
        };
        let committed = match report {
            Reported::Unknown => return Ok(Outcome::NeedsStatus),
            Reported::Queued => return Ok(Outcome::Unchanged),
            Reported::Running => {
                if job.state == JobState::Running {
                    return Ok(Outcome::Unchanged);
                }
                let next_check = now + self.settings.poll_interval.as_millis() as i64;
                commit(self.store.as_ref(), job, |job| {
                    job.mark_running(now)?;
                    job.next_check_at = Some(next_check);
                    Ok(())
                })
                .await?
            }
            Reported::Completed(output) => {
                return self.complete(job, output, delay, execution).await
            }
            Reported::Failed(message) => {
                commit(
                    self.store.as_ref(),
                    job,
                    terminal(
                        JobState::Failed,
                        JobError::new(ErrorCode::WorkerFailed, message),
                    ),
                )
                .await?
            }
            Reported::TimedOut => {
                commit(
                    self.store.as_ref(),
                    job,
                    terminal(
                        JobState::TimedOut,
                        JobError::new(
                            ErrorCode::ExecutionTimedOut,
                            "RunPod timed the job out before it finished",
                        ),
                    ),
                )
                .await?
            }
            Reported::Cancelled => {
                commit(
                    self.store.as_ref(),
                    job,
                    terminal(
                        JobState::Cancelled,
                        JobError::new(ErrorCode::CancelledByRunpod, "RunPod cancelled the job"),
                    ),
                )
                .await?
            }
        };
        Ok(match committed {
            Committed::Written(job) if job.is_terminal() => Outcome::Finished(job.state),
            Committed::Written(job) => Outcome::Progressed(job.state),
            Committed::Refused(_, crate::domain::job::TransitionError::Leased(..)) => Outcome::Busy,
            Committed::Refused(..) | Committed::Missing => Outcome::Unchanged,
        })
    }

    async fn complete(
        &self,
        job: Job,
        output: Option<serde_json::Value>,
        delay: Option<u64>,
        execution: Option<u64>,
    ) -> Result<Outcome, FinalizeError> {
        let now = self.clock.now_ms();
        let lease_ms = self.settings.finalize_lease.as_millis() as i64;
        // Only the holder of the finalize lease copies outputs; everyone else backs off.
        let leased = match commit(self.store.as_ref(), job, |job| {
            job.acquire_lease(LeaseKind::Finalize, now, lease_ms)
        })
        .await?
        {
            Committed::Written(job) => job,
            Committed::Refused(job, _) if job.is_terminal() => return Ok(Outcome::Unchanged),
            Committed::Refused(..) => return Ok(Outcome::Busy),
            Committed::Missing => return Ok(Outcome::Unchanged),
        };

        let keys = match volume_output_keys(output.as_ref(), &self.layout, &leased.id) {
            Ok(keys) => keys,
            Err(error) => return self.finish_failed(leased, error, delay, execution).await,
        };

        let mut outputs = Vec::with_capacity(keys.len());
        for key in &keys {
            let name = file_name(key).to_string();
            let destination = results_key(&leased.owner, &leased.id, &name);
            let content_type = transfer::content_type_for(&name);
            match transfer::copy(
                self.volume.as_ref(),
                key,
                self.results.as_ref(),
                &destination,
                Some(content_type),
            )
            .await
            {
                Ok(meta) => outputs.push(OutputFile {
                    key: destination,
                    file_name: name,
                    size: meta.size,
                    content_type: content_type.to_string(),
                }),
                Err(ObjectError::NotFound(_)) => {
                    let error = JobError::new(
                        ErrorCode::OutputMissing,
                        format!("the worker reported {name} but it is not on the volume"),
                    );
                    return self.finish_failed(leased, error, delay, execution).await;
                }
                Err(err) => {
                    tracing::warn!(job_id = %leased.id, error = %err, "output copy failed; releasing the lease");
                    let retry_at = self.clock.now_ms() + RETRY_SOON.as_millis() as i64;
                    let mut released = leased.clone();
                    released.release_lease(self.clock.now_ms(), retry_at);
                    // If this write loses a race the lease simply runs out; nothing is lost.
                    let _ = self.store.save(&released, leased.version).await;
                    return Err(FinalizeError::RetryLater(err.to_string()));
                }
            }
        }

        let finished_at = self.clock.now_ms();
        let mut done = leased.clone();
        done.record_runpod_times(delay, execution);
        if done.succeed(outputs, finished_at).is_err() {
            return Ok(Outcome::Unchanged);
        }
        match self.store.save(&done, leased.version).await {
            Ok(()) => {
                tracing::info!(job_id = %done.id, outputs = done.outputs.len(), "job succeeded");
                Ok(Outcome::Finished(JobState::Succeeded))
            }
            // Our lease ran out and someone else took over: their outcome stands.
            Err(StoreError::Conflict) => Ok(Outcome::Unchanged),
            Err(err) => Err(err.into()),
        }
    }

    async fn finish_failed(
        &self,
        leased: Job,
        error: JobError,
        delay: Option<u64>,
        execution: Option<u64>,
    ) -> Result<Outcome, FinalizeError> {
        tracing::warn!(job_id = %leased.id, code = error.code.as_str(), message = %error.message, "job failed while finalizing");
        let mut failed = leased.clone();
        failed.record_runpod_times(delay, execution);
        if failed.fail(error, self.clock.now_ms()).is_err() {
            return Ok(Outcome::Unchanged);
        }
        match self.store.save(&failed, leased.version).await {
            Ok(()) => Ok(Outcome::Finished(JobState::Failed)),
            Err(StoreError::Conflict) => Ok(Outcome::Unchanged),
            Err(err) => Err(err.into()),
        }
    }
}

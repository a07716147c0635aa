//! The sweeper: every minute, one Query on the sparse index for jobs in flight whose next check
//! is due, then for each: re-enqueue a job stuck in the queue, ask RunPod about a submitted one
//! whose webhook never came (and act on the answer as the webhook would), ask finalize again
//! about a handed-off job it has not ended, give up on a job past its deadline, or clean up
//! after an ended one. It never scans: its cost follows the jobs due, not the jobs ever run.
use std::sync::Arc;

use futures::StreamExt;
use serde::Serialize;

use crate::app::backends::Backends;
use crate::app::cleanup::{remove_everything, remove_leftovers};
use crate::app::observe::{decide, handoff_recheck, Decision, Observer, Outcome};
use crate::app::{next_check_after_failure, Committed, Writer};
use crate::config::Settings;
use crate::domain::callback::CallbackEvent;
use crate::domain::job::{
    Actor, DeletionReason, ErrorCode, Job, JobError, JobState, Millis, TransitionError,
};
use crate::domain::keys::VolumeRoot;
use crate::ports::{
    BackendError, CallbackQueue, Classified, Clock, DeliveryLogs, Failure, FinalizeQueue, JobQueue,
    JobStore, ObjectStore, PollQueue, RunPodStatus, StopQueue, StopReason, StopRun, StoreError,
};

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct SweepReport {
    /// DynamoDB items read to find the due jobs (the sweep's cost).
    pub items_read: u64,
    pub due: usize,
    pub requeued: usize,
    pub polled: usize,
    pub finished: usize,
    /// Completed runs handed to finalize by this sweep (their webhook never came).
    pub handed_off: usize,
    /// Handed-off jobs finalize had not ended by their next check: asked again.
    pub refinalized: usize,
    pub timed_out: usize,
    pub skipped: usize,
    /// Ended jobs whose leftovers were removed, and how many objects that took (purges
    /// included).
    pub cleaned: usize,
    pub removed_objects: usize,
    /// Deleted or expired jobs whose data was purged for good.
    pub purged: usize,
    /// Due items that could not be read as jobs, and index parts that could not be read: each
    /// also counts as an error, so the errors alarm sees them.
    pub unreadable: usize,
    pub failed_parts: usize,
    pub errors: usize,
}

/// What one check of one job did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    Requeued,
    Polled {
        finished: bool,
    },
    HandedOff,
    Refinalized,
    TimedOut,
    Cleaned(usize),
    /// A purge pass removed this many objects; `done` once nothing can come back.
    Purged {
        removed: usize,
        done: bool,
    },
    Skipped,
    Error,
}

/// Counts one check's outcome in the sweep's report.
fn tally(report: &mut SweepReport, action: Action) {
    match action {
        Action::Requeued => report.requeued += 1,
        Action::Polled { finished } => {
            report.polled += 1;
            report.finished += finished as usize;
        }
        Action::HandedOff => {
            report.polled += 1;
            report.handed_off += 1;
        }
        Action::Refinalized => report.refinalized += 1,
        Action::TimedOut => report.timed_out += 1,
        Action::Cleaned(removed) => {
            report.cleaned += 1;
            report.removed_objects += removed;
        }
        Action::Purged { removed, done } => {
            report.removed_objects += removed;
            report.purged += done as usize;
        }
        Action::Skipped => report.skipped += 1,
        Action::Error => report.errors += 1,
    }
}

pub struct Sweeper {
    pub store: Arc<dyn JobStore>,
    /// Where the callbacks the job's client asked for are requested.
    pub callbacks: Arc<dyn CallbackQueue>,
    pub queue: Arc<dyn JobQueue>,
    /// Where the jobs' runs are asked about.
    pub backends: Backends,
    /// A polled backend's next check of a job is asked for here.
    pub polls: Arc<dyn PollQueue>,
    pub stops: Arc<dyn StopQueue>,
    pub observer: Arc<Observer>,
    pub finalize: Arc<dyn FinalizeQueue>,
    /// A purged job's callback log goes with the rest of its data.
    pub delivery_logs: Arc<dyn DeliveryLogs>,
    /// The results and uploads buckets and the RunPod volume, for removing what ended jobs
    /// left behind, and all of a deleted or expired job's data.
    pub results: Arc<dyn ObjectStore>,
    pub uploads: Arc<dyn ObjectStore>,
    pub volume: Arc<dyn ObjectStore>,
    pub volume_root: VolumeRoot,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
}

/// Most due jobs read from the index at once; a page is checked before the next is read, and
/// the checked jobs have moved on by then, so the next page holds the next ones due.
pub const SWEEP_PAGE: u32 = 500;

/// No page is begun this close to the invocation's end.
const SWEEP_RESERVE_MS: Millis = 10_000;

impl Sweeper {
    /// How the sweeper writes jobs.
    fn writer(&self) -> Writer<'_> {
        Writer::new(&*self.store, &*self.callbacks, Actor::Sweeper)
    }

    /// [`Sweeper::sweep_before`] with no invocation deadline.
    pub async fn sweep(&self) -> Result<SweepReport, StoreError> {
        self.sweep_before(None).await
    }

    /// One sweep: due jobs are read from the index a page at a time, oldest due first, and
    /// checked `sweep_concurrency` at a time, until none is due, `sweep_batch` were taken, or
    /// the invocation (ending at `deadline`, epoch ms) is nearly over. What is not reached stays
    /// due for the next sweep, still first in line.
    pub async fn sweep_before(&self, deadline: Option<Millis>) -> Result<SweepReport, StoreError> {
        let mut report = SweepReport::default();
        let mut seen = std::collections::HashSet::new();
        let batch = self.settings.sweep_batch.max(1) as usize;
        let mut pages = 0;
        loop {
            let now = self.clock.now_ms();
            if deadline.is_some_and(|end| now + SWEEP_RESERVE_MS > end) {
                break;
            }
            let page = SWEEP_PAGE.min(batch.saturating_sub(report.due) as u32);
            if page == 0 {
                break;
            }
            let due = match self.store.due_for_check(now, page).await {
                Ok(due) => due,
                Err(err) if pages == 0 => return Err(err),
                Err(err) => {
                    tracing::error!(error = %err, "the sweep index could not be read further");
                    report.errors += 1;
                    break;
                }
            };
            pages += 1;
            report.items_read += due.items_read;
            let full = due.jobs.len() + due.unreadable.len() >= page as usize;
            for key in due.unreadable.iter().filter(|k| seen.insert((*k).clone())) {
                tracing::error!(key = %key, "a due item is not a readable job; skipped");
                report.unreadable += 1;
                report.errors += 1;
            }
            for part in &due.failed_parts {
                tracing::error!(error = %part, "part of the sweep index could not be read");
                report.failed_parts += 1;
                report.errors += 1;
            }
            // A job checked earlier in this sweep that is still due (leased, or its check
            // failed) waits for the next sweep.
            let fresh: Vec<Job> = due
                .jobs
                .into_iter()
                .filter(|job| seen.insert(job.id.clone()))
                .collect();
            if fresh.is_empty() {
                break;
            }
            report.due += fresh.len();
            let actions: Vec<Action> = futures::stream::iter(fresh)
                .map(|job| self.check(job))
                .buffer_unordered(self.settings.sweep_concurrency.max(1))
                .collect()
                .await;
            for action in actions {
                tally(&mut report, action);
            }
            if !full {
                break;
            }
        }
        // One line per sweep with every count as its own JSON field: the template's metric
        // filters read `timed_out` and `errors` from it (`{ $.errors > 0 }`).
        tracing::info!(
            items_read = report.items_read,
            due = report.due,
            requeued = report.requeued,
            polled = report.polled,
            finished = report.finished,
            handed_off = report.handed_off,
            refinalized = report.refinalized,
            timed_out = report.timed_out,
            skipped = report.skipped,
            cleaned = report.cleaned,
            removed_objects = report.removed_objects,
            purged = report.purged,
            unreadable = report.unreadable,
            failed_parts = report.failed_parts,
            errors = report.errors,
            "sweep done"
        );
        Ok(report)
    }

    /// One job's check at the time a [`PollQueue`] message asked for: done only if the job is
    /// still due at `due`, so that of two messages for one check, and of a message the sweep
    /// overtook, only one acts. Each check of a polled backend's job asks for the next.
    pub async fn check_polled(&self, job_id: &str, due: Millis) -> Result<Action, StoreError> {
        let Some(job) = self.store.get(job_id).await? else {
            return Ok(Action::Skipped);
        };
        if job.next_check_at != Some(due) {
            return Ok(Action::Skipped);
        }
        Ok(self.check(job).await)
    }

    async fn check(&self, job: Job) -> Action {
        let span = crate::app::job_span(&job);
        let checked = async {
            // Not the sweep's start: that may be a while ago by the time this job's turn comes.
            let now = self.clock.now_ms();
            match self.check_inner(job, now).await {
                Ok(action) => action,
                Err(err) => {
                    tracing::warn!(error = %err, "sweeper could not check the job");
                    Action::Error
                }
            }
        };
        tracing::Instrument::instrument(checked, span).await
    }

    async fn check_inner(&self, job: Job, now: Millis) -> Result<Action, StoreError> {
        if job.is_terminal() {
            if let Some(reason) = job.gone(now) {
                return self.purge(job, reason, now).await;
            }
            return self.clean_up(job, now).await;
        }
        if job.active_lease(now).is_some() {
            return Ok(Action::Skipped);
        }
        // The GPU's work is done and confirmed: the job's deadline no longer applies, only
        // how long finalize may keep trying.
        if let Some(handed_at) = job.current_handoff().map(|h| h.at) {
            return self.refinalize(job, handed_at, now).await;
        }
        if job.past_deadline(now) {
            return self.expire(job, now).await;
        }
        match (job.state, job.runpod_job_id.clone()) {
            // Its run was lost; dispatch starts it again.
            _ if job.rerun_pending => self.requeue(job, now).await,
            (_, Some(runpod_id)) => self.poll(job, &runpod_id, now).await,
            (JobState::Queued, None) => self.requeue(job, now).await,
            // Submitted without a RunPod id cannot happen; look again later rather than guess.
            (_, None) => self.reschedule(job, now).await.map(|_| Action::Skipped),
        }
    }

    /// An ended job: once no finalize attempt can still be copying (its lease, which outlives
    /// the invocation holding it, has run out), remove what the job left behind.
    async fn clean_up(&self, job: Job, now: Millis) -> Result<Action, StoreError> {
        // A copy from the index, which lags: the clean-up may be done already.
        if !job.cleanup_pending {
            return Ok(Action::Skipped);
        }
        let lease = self.settings.finalize_lease.as_millis() as Millis;
        let ready_at = job.timestamps.finished_at.unwrap_or(now) + lease;
        if now < ready_at {
            self.writer()
                .commit(job, |job| job.defer_cleanup(ready_at))
                .await?;
            return Ok(Action::Skipped);
        }
        // The end's callback, asked for again in case the request made when the job ended was
        // lost; the write below clears the flag only once this one is queued.
        if job.callback_pending {
            if let Err(err) = self
                .callbacks
                .request_notice(&job.id, CallbackEvent::Ended)
                .await
            {
                tracing::warn!(job_id = %job.id, error = %err, "could not ask for the end's callback; retried later");
                let retry_at = now + self.settings.poll_interval.as_millis() as Millis;
                self.writer()
                    .commit(job, |job| job.defer_cleanup(retry_at))
                    .await?;
                return Ok(Action::Error);
            }
        }
        match remove_leftovers(
            self.results.as_ref(),
            self.volume.as_ref(),
            &self.volume_root,
            &job,
            &self.backends.volume_leftovers(&job),
        )
        .await
        {
            Ok(removed) => {
                let objects = removed.total();
                if objects > 0 {
                    tracing::info!(
                        job_id = %job.id,
                        results = removed.results,
                        volume = removed.volume,
                        "removed what an ended job left behind"
                    );
                }
                self.writer().commit(job, |job| job.cleaned_up()).await?;
                Ok(Action::Cleaned(objects))
            }
            Err(err) => {
                tracing::warn!(job_id = %job.id, error = %err, "clean-up of an ended job failed; retried later");
                let retry_at = now + self.settings.poll_interval.as_millis() as Millis;
                self.writer()
                    .commit(job, |job| job.defer_cleanup(retry_at))
                    .await?;
                Ok(Action::Error)
            }
        }
    }

    /// A handed-off job finalize has not ended by its next check (the request was lost, an
    /// attempt died, or every attempt failed so far): ask again, until `finalize_give_up`
    /// after the hand-off, when the job ends `timed_out`.
    async fn refinalize(
        &self,
        job: Job,
        handed_at: Millis,
        now: Millis,
    ) -> Result<Action, StoreError> {
        if now >= handed_at + self.settings.finalize_give_up.as_millis() as Millis {
            let error = JobError::new(
                ErrorCode::DeadlineExceeded,
                "the run completed but its outputs could not be collected in time",
            );
            let done = self
                .writer()
                .commit(job, |job| {
                    job.ensure_unleased(now)?;
                    job.time_out(error.clone(), now)
                })
                .await?;
            return Ok(match done {
                Committed::Written(_) => Action::TimedOut,
                _ => Action::Skipped,
            });
        }
        if let Err(err) = self
            .finalize
            .request_finalize(&job.id, std::time::Duration::ZERO)
            .await
        {
            tracing::warn!(job_id = %job.id, error = %err, "could not ask finalize again");
            self.reschedule_after_failure(job, now).await?;
            return Ok(Action::Error);
        }
        let next = now + handoff_recheck(&self.settings).as_millis() as Millis;
        self.writer()
            .commit(job, |job| job.reschedule(now, next))
            .await?;
        Ok(Action::Refinalized)
    }

    /// A deleted job, or one past its retention: removes all it left (results folder, inputs,
    /// volume folders, idempotency record) and leaves a tombstone. While a finalize attempt may
    /// still be copying (its lease outlives a cancel), the purge runs again once it cannot be.
    async fn purge(
        &self,
        job: Job,
        reason: DeletionReason,
        now: Millis,
    ) -> Result<Action, StoreError> {
        if job.deletion.as_ref().is_some_and(|d| d.purged) {
            return Ok(Action::Skipped);
        }
        let removed = remove_everything(
            self.results.as_ref(),
            self.uploads.as_ref(),
            self.volume.as_ref(),
            &self.volume_root,
            &job,
            &self.backends.volume_leftovers(&job),
        )
        .await;
        let removed = match removed {
            Ok(removed) => match self.store.forget_idempotency_key(&job).await {
                Ok(()) => match self.delivery_logs.forget_delivery_log(&job.id).await {
                    Ok(()) => Ok(removed),
                    Err(err) => Err(format!("delivery log: {err}")),
                },
                Err(err) => Err(format!("idempotency record: {err}")),
            },
            Err(err) => Err(err.to_string()),
        };
        let removed = match removed {
            Ok(removed) => removed,
            Err(err) => {
                tracing::warn!(job_id = %job.id, error = %err, "purge failed; retried later");
                let retry_at = now + self.settings.poll_interval.as_millis() as Millis;
                self.writer()
                    .commit(job, |job| job.defer_purge(retry_at))
                    .await?;
                return Ok(Action::Error);
            }
        };
        tracing::info!(
            job_id = %job.id,
            reason = ?reason,
            results = removed.results,
            uploads = removed.uploads,
            volume = removed.volume,
            "purged a job's data"
        );
        let lease = self.settings.finalize_lease.as_millis() as Millis;
        let settled_at = job.timestamps.finished_at.unwrap_or(now) + lease;
        let done = now >= settled_at;
        self.writer()
            .commit(job, |job| {
                if done {
                    job.purged(reason, now)
                } else {
                    job.defer_purge(settled_at)
                }
            })
            .await?;
        Ok(Action::Purged {
            removed: removed.total(),
            done,
        })
    }

    async fn requeue(&self, job: Job, now: Millis) -> Result<Action, StoreError> {
        if let Err(err) = self.queue.enqueue(&job.id, Some(&job.trace())).await {
            tracing::warn!(job_id = %job.id, error = %err, "re-enqueue failed");
            return Ok(Action::Error);
        }
        let next = now + self.settings.requeue_after.as_millis() as i64;
        self.writer()
            .commit(job, |job| job.reschedule(now, next))
            .await?;
        Ok(Action::Requeued)
    }

    async fn poll(&self, job: Job, runpod_id: &str, now: Millis) -> Result<Action, StoreError> {
        let status = match self.status(&job, runpod_id).await {
            Ok(status) => status,
            Err(BackendError::TooLarge { limit }) => {
                return self.too_large(job, runpod_id, limit).await
            }
            Err(BackendError::Unseen) => return self.unseen(job, runpod_id, now).await,
            Err(err) if err.failure() == Failure::Missing => {
                let error = JobError::new(
                    ErrorCode::RunpodJobExpired,
                    "RunPod no longer knows the job: its result expired or its TTL passed",
                );
                // Unless a webhook took the job meanwhile: it holds a report from before the
                // result went away, and finishes the job from it.
                let now = self.clock.now_ms();
                let done = self
                    .writer()
                    .commit(job, |job| {
                        // Only the run we asked about is gone; the job may track another by now.
                        if job.runpod_job_id.as_deref() != Some(runpod_id) {
                            return Err(TransitionError::Stale);
                        }
                        job.ensure_unleased(now)?;
                        job.fail(error.clone(), now)
                    })
                    .await?;
                return Ok(Action::Polled {
                    finished: matches!(done, Committed::Written(_)),
                });
            }
            Err(err) => {
                tracing::warn!(job_id = %job.id, error = %err, "status poll failed");
                self.reschedule_after_failure(job, now).await?;
                return Ok(Action::Error);
            }
        };
        self.finalize(job, &status, now).await
    }

    /// RunPod's answer about the job's run is too long to read: the job fails, as the webhook
    /// would have failed it.
    async fn too_large(&self, job: Job, run: &str, limit: u64) -> Result<Action, StoreError> {
        match self
            .observer
            .report_too_large(job, run, limit, Actor::Sweeper)
            .await
        {
            Ok(outcome) => Ok(Action::Polled {
                finished: matches!(outcome, Outcome::Finished(_)),
            }),
            Err(err) => {
                tracing::warn!(error = %err, "could not record a report too long");
                Ok(Action::Error)
            }
        }
    }

    /// Acts on RunPod's `status` of the job's run, as the webhook would have.
    async fn finalize(
        &self,
        job: Job,
        status: &RunPodStatus,
        now: Millis,
    ) -> Result<Action, StoreError> {
        let job_id = job.id.clone();
        // A backend that calls back should have ended the job itself: the sweeper ending it
        // instead is a rescue. A polled backend's jobs are always ended here.
        let rescue = self.backends.polled_every(&job).is_none();
        // Kept to reschedule without a second read when the report changed nothing.
        let read = job.clone();
        match self.observer.observe_as(job, status, Actor::Sweeper).await {
            Ok(outcome @ (Outcome::Finished(_) | Outcome::HandedOff)) => {
                if rescue {
                    crate::metrics::sweeper_rescue();
                }
                Ok(match outcome {
                    Outcome::HandedOff => Action::HandedOff,
                    _ => Action::Polled { finished: true },
                })
            }
            // Someone else holds the job (a webhook finalizing it): its lease already made the
            // job due when it runs out, and any write here would only get in its way.
            Ok(Outcome::Busy) => Ok(Action::Skipped),
            Ok(outcome) => {
                // Still in flight: look again after the poll interval. Only a report that
                // changed the job needs it read again; otherwise the copy in hand is current
                // (and if it is not, `commit` re-reads on the version conflict).
                let current = match outcome {
                    Outcome::Progressed(_) => self.store.get(&job_id).await?,
                    _ => Some(read),
                };
                if let Some(current) = current {
                    if current.active_lease(now).is_none() {
                        self.reschedule(current, now).await?;
                    }
                }
                Ok(Action::Polled { finished: false })
            }
            Err(err) => {
                tracing::warn!(job_id, error = %err, "finalize from the sweeper failed");
                Ok(Action::Error)
            }
        }
    }

    async fn expire(&self, job: Job, now: Millis) -> Result<Action, StoreError> {
        // What RunPod has, as far as this (possibly stale) copy of the job knows.
        let cancelled = job.runpod_job_id.clone();
        if let Some(runpod_id) = &job.runpod_job_id {
            // A run that already ended is the job's result, deadline or not: throwing it away
            // here while a late webhook would have kept it would make the outcome a race.
            match self.status(&job, runpod_id).await {
                Ok(status)
                    if matches!(decide(&status), Decision::Collect(_) | Decision::End(..)) =>
                {
                    return self.finalize(job, &status, now).await;
                }
                Ok(_) => {}
                Err(BackendError::TooLarge { limit }) => {
                    let run = runpod_id.clone();
                    return self.too_large(job, &run, limit).await;
                }
                Err(err) if err.failure() == Failure::Missing => {}
                Err(err) => {
                    tracing::warn!(job_id = %job.id, error = %err, "status at deadline failed");
                    self.reschedule_after_failure(job, now).await?;
                    return Ok(Action::Error);
                }
            }
            let stop = StopRun::new(&job, runpod_id, StopReason::Deadline);
            if let Err(err) = self.stops.request_stop(&stop).await {
                // Do not record a timeout while nothing is set to stop the GPU.
                tracing::warn!(job_id = %job.id, error = %err, "could not queue the stop at deadline");
                self.reschedule_after_failure(job, now).await?;
                return Ok(Action::Error);
            }
        }
        // Time held back counts: the deadline is the client's promise from acceptance. A job
        // that never left the queue says so, so that its owner can tell a backlog from a slow
        // run.
        let error = JobError::new(
            ErrorCode::DeadlineExceeded,
            if job.runpod_job_id.is_none() && job.state == JobState::Queued {
                "the job did not finish before its deadline: it was still queued (held back by its owner's or its batch's in-flight limit, or never dispatched)"
            } else {
                "the job did not finish before its deadline"
            },
        );
        let now = self.clock.now_ms();
        let done = self
            .writer()
            .commit(job, |job| {
                // The copy came from the index, which lags: if RunPod got the job since (or got
                // another run of it), what was cancelled is not what runs. Leave the job due; the
                // next sweep cancels what runs and times the job out.
                if job.runpod_job_id != cancelled {
                    return Err(TransitionError::Stale);
                }
                job.ensure_unleased(now)?;
                job.time_out(error.clone(), now)
            })
            .await?;
        Ok(match done {
            Committed::Written(_) => Action::TimedOut,
            _ => Action::Skipped,
        })
    }

    async fn reschedule(&self, job: Job, now: Millis) -> Result<(), StoreError> {
        if job.is_terminal() {
            return Ok(());
        }
        let polled = self.backends.polled_every(&job);
        let every = polled.unwrap_or(self.settings.poll_interval);
        let next = (now + every.as_millis() as i64).min(job.deadline_at);
        let committed = self
            .writer()
            .commit(job, |job| {
                // Handed off or taken since this sweep read it (a webhook won the race): its
                // schedule is the hand-off's or the lease's, not a poll's.
                if job.current_handoff().is_some() {
                    return Err(TransitionError::Stale);
                }
                job.ensure_unleased(now)?;
                // The run was found where it should be.
                job.unseen_at = None;
                job.reschedule(now, next)
            })
            .await?;
        self.ask_next_check(&committed, next, now).await;
        Ok(())
    }

    /// Asks for the next check of a polled backend's job, at `next`, once the write that
    /// scheduled it landed. If the request is lost, the sweep finds the job due at `next` and
    /// asks again then: a chain of checks is never lost for longer than a sweep's period.
    async fn ask_next_check(&self, committed: &Committed, next: Millis, now: Millis) {
        let Committed::Written(job) = committed else {
            return;
        };
        if job.is_terminal() || self.backends.polled_every(job).is_none() {
            return;
        }
        let delay = std::time::Duration::from_millis((next - now).max(0) as u64);
        if let Err(err) = self.polls.request_check(&job.id, next, delay).await {
            tracing::warn!(job_id = %job.id, error = %err, "could not ask for the job's next check; the sweep will");
        }
    }

    /// Where the job's run stands, from its backend.
    async fn status(&self, job: &Job, run: &str) -> Result<RunPodStatus, BackendError> {
        self.backends.of(job)?.status(job, run).await
    }

    /// The backend has the job's run in neither its queue nor its history. Once is no proof
    /// (history forgets, and a prompt may move from the queue to the history between two
    /// reads); seen so again a poll period later, the run is lost: started again once with the
    /// same input, and the job failed `backend_lost` if that run is lost too.
    async fn unseen(&self, job: Job, run: &str, now: Millis) -> Result<Action, StoreError> {
        let apart = self
            .backends
            .polled_every(&job)
            .unwrap_or(self.settings.poll_interval)
            .as_millis() as Millis;
        let lost = job.unseen_at.is_some_and(|first| now - first >= apart);
        if !lost {
            let next = (now + apart).min(job.deadline_at);
            let committed = self
                .writer()
                .commit(job, |job| {
                    if job.runpod_job_id.as_deref() != Some(run) {
                        return Err(TransitionError::Stale);
                    }
                    job.ensure_unleased(now)?;
                    job.note_unseen(now)?;
                    job.reschedule(now, next)
                })
                .await?;
            self.ask_next_check(&committed, next, now).await;
            return Ok(Action::Polled { finished: false });
        }
        if job.may_rerun() {
            tracing::warn!(job_id = %job.id, run, "the backend lost the run; it is started again");
            crate::metrics::retried("rerun");
            let next = now + self.settings.requeue_after.as_millis() as Millis;
            let committed = self
                .writer()
                .commit(job, |job| {
                    job.ensure_unleased(now)?;
                    job.rerun_lost(run, now, next)
                })
                .await?;
            return match committed {
                Committed::Written(job) => self.requeue(job, now).await,
                _ => Ok(Action::Skipped),
            };
        }
        let error = JobError::new(
            ErrorCode::BackendLost,
            "the backend lost the run twice (a restart loses its queue and history)",
        );
        let done = self
            .writer()
            .commit(job, |job| {
                if job.runpod_job_id.as_deref() != Some(run) {
                    return Err(TransitionError::Stale);
                }
                job.ensure_unleased(now)?;
                job.fail(error.clone(), now)
            })
            .await?;
        Ok(Action::Polled {
            finished: matches!(done, Committed::Written(_)),
        })
    }

    /// After a check failed transiently (RunPod unreachable): count the failure and look again
    /// later the more failures came in a row (`next_check_after_failure`), so an outage is
    /// not met with a poll of every job in flight every minute.
    async fn reschedule_after_failure(&self, job: Job, now: Millis) -> Result<(), StoreError> {
        if job.is_terminal() {
            return Ok(());
        }
        let base = self
            .backends
            .polled_every(&job)
            .unwrap_or(self.settings.poll_interval);
        let committed = self
            .writer()
            .commit(job, |job| {
                job.note_check_failure();
                let next = next_check_after_failure(base, job, now);
                job.reschedule(now, next)
            })
            .await?;
        if let Committed::Written(job) = &committed {
            if let Some(next) = job.next_check_at {
                self.ask_next_check(&committed, next, now).await;
            }
        }
        Ok(())
    }
}

//! Use cases, written against the ports: the public API, dispatch, observing RunPod's reports
//! (the webhook and the sweeper share it), finalizing, stopping runs, the sweeper, and the
//! volume's janitor.
pub mod api;
pub mod backends;
pub mod batches;
pub mod callbacks;
pub mod cleanup;
pub mod dispatch;
pub mod finalize;
pub mod holds;
pub mod inputs;
pub mod janitor;
pub mod observe;
pub mod stop;
pub mod sweeper;
pub mod tenants;
pub mod transfer;
pub mod webhook;

use std::time::Duration;

use crate::domain::job::JobState;
use crate::domain::job::{Actor, Job, Millis, TransitionError};
use crate::domain::retry::check_backoff;
use crate::ports::{CallbackQueue, JobStore, StoreError};

/// How many times a change is re-applied to a freshly read job after losing a version race.
const CONFLICT_RETRIES: usize = 3;

/// The longest the sweeper waits between two checks of a job whose checks keep failing; well
/// under RunPod's 30-minute result retention, so a result is still there when RunPod is back.
pub const MAX_CHECK_BACKOFF: Duration = Duration::from_secs(10 * 60);

/// When to look at `job` again after a check that failed transiently (its
/// `check_failures` already counted): `base` doubled per failure in a row, with jitter, at
/// most [`MAX_CHECK_BACKOFF`], and never after the job's deadline.
pub fn next_check_after_failure(base: Duration, job: &Job, now: Millis) -> Millis {
    let wait = check_backoff(
        base,
        job.check_failures,
        MAX_CHECK_BACKOFF,
        rand::random::<f64>(),
    );
    (now + wait.as_millis() as Millis).min(job.deadline_at.max(now))
}

/// The result of [`commit_as`].
pub enum Committed {
    /// The change was written; here is the job as stored.
    Written(Job),
    /// The job's current state refuses the change (already terminal, would go backwards, leased).
    Refused(Job, TransitionError),
    /// The job is gone.
    Missing,
}

/// Applies `change` to `job` and writes it conditionally on the version read. When another writer
/// got there first, reads the job again and re-applies the change to what is stored now, so a
/// change is decided on the latest state and never overwrites someone else's. State changes are
/// recorded in the job's history as made `by`.
pub async fn commit_as<F>(
    store: &dyn JobStore,
    mut job: Job,
    by: Actor,
    change: F,
) -> Result<Committed, StoreError>
where
    F: Fn(&mut Job) -> Result<(), TransitionError>,
{
    for _ in 0..CONFLICT_RETRIES {
        let read_version = job.version;
        let mut next = job.clone();
        next.acting_as(by);
        if let Err(refusal) = change(&mut next) {
            return Ok(Committed::Refused(job, refusal));
        }
        // Every write takes the next version, whatever the change touched: a write that kept
        // the version read would let a second writer on the same read overwrite it.
        next.version = read_version + 1;
        // The write that ends the job carries what it adds to its owner's usage, so that the
        // store counts it in the same transaction, and only if this write wins.
        let ends = next.is_terminal() && !job.is_terminal();
        if ends {
            next.count_usage(next.version);
        }
        next.write_id = Some(rand::random());
        // Counted by the one write that ends the job, as its usage is.
        let counted = |written: &Job| {
            if ends {
                crate::metrics::job_ended(written);
            }
        };
        match store.save(&next, read_version).await {
            Ok(()) => {
                counted(&next);
                return Ok(Committed::Written(next));
            }
            Err(StoreError::Conflict) => match store.get(&job.id).await? {
                // This very write: it committed, its answer was lost, and the store's retry
                // of it met its own version. Re-applying the change would take it for someone
                // else's (a job finished twice, or its outputs removed as a loser's).
                Some(fresh) if fresh.write_id == next.write_id => {
                    counted(&fresh);
                    return Ok(Committed::Written(fresh));
                }
                Some(fresh) => job = fresh,
                None => return Ok(Committed::Missing),
            },
            Err(other) => return Err(other),
        }
    }
    Err(StoreError::Conflict)
}

/// The span every log line about `job` is written in, whichever function writes it: the job's
/// id and its trace id (`Job::trace`), which the JSON logs carry on each line.
pub fn job_span(job: &Job) -> tracing::Span {
    tracing::info_span!("job", job_id = %job.id, trace_id = %job.trace())
}

/// [`commit_as`], then asks for the callback the write calls for, if the job's client asked
/// for one: its end, or a worker taking it ([`callbacks::announce`]). Every use case that may
/// end a job or start it running writes through this.
pub async fn commit_told<F>(
    store: &dyn JobStore,
    callbacks: &dyn CallbackQueue,
    job: Job,
    by: Actor,
    change: F,
) -> Result<Committed, StoreError>
where
    F: Fn(&mut Job) -> Result<(), TransitionError>,
{
    let before: JobState = job.state;
    let committed = commit_as(store, job, by, change).await?;
    if let Committed::Written(job) = &committed {
        callbacks::announce(callbacks, before, job).await;
    }
    Ok(committed)
}

/// A use case's writes: the store, the queue the callbacks its writes call for are asked on,
/// and who it is, held once for [`commit_told`].
#[derive(Clone, Copy)]
pub struct Writer<'a> {
    pub store: &'a dyn JobStore,
    pub callbacks: &'a dyn CallbackQueue,
    pub by: Actor,
}

impl<'a> Writer<'a> {
    pub fn new(store: &'a dyn JobStore, callbacks: &'a dyn CallbackQueue, by: Actor) -> Self {
        Self {
            store,
            callbacks,
            by,
        }
    }

    pub async fn commit<F>(&self, job: Job, change: F) -> Result<Committed, StoreError>
    where
        F: Fn(&mut Job) -> Result<(), TransitionError>,
    {
        commit_told(self.store, self.callbacks, job, self.by, change).await
    }
}

/// [`commit_told`] for a change decided while holding the lease `leased` carries. Writes that
/// slipped in meanwhile without taking the job away (a reschedule, a progress report) do not
/// cost the change: it is re-applied as long as the stored job still carries that lease, and
/// refused with [`TransitionError::LeaseLost`] once it does not (the lease ran out and another
/// caller took the job, or the job ended).
pub async fn commit_leased<F>(
    store: &dyn JobStore,
    callbacks: &dyn CallbackQueue,
    leased: &Job,
    by: Actor,
    change: F,
) -> Result<Committed, StoreError>
where
    F: Fn(&mut Job) -> Result<(), TransitionError>,
{
    let lease = leased.lease.clone();
    commit_told(store, callbacks, leased.clone(), by, |job| {
        job.ensure_holds(lease.as_ref())?;
        change(job)
    })
    .await
}

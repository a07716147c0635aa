//! Use cases, written against the ports: the public API, dispatch, finalizing (webhook and
//! sweeper share it) and the sweeper.
pub mod api;
pub mod dispatch;
pub mod finalize;
pub mod sweeper;
pub mod transfer;
pub mod webhook;

use crate::domain::job::{Job, TransitionError};
use crate::ports::{JobStore, StoreError};

/// How many times a change is re-applied to a freshly read job after losing a version race.
const CONFLICT_RETRIES: usize = 3;

/// The result of [`commit`].
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
/// change is decided on the latest state and never overwrites someone else's.
pub async fn commit<F>(
    store: &dyn JobStore,
    mut job: Job,
    change: F,
) -> Result<Committed, StoreError>
where
    F: Fn(&mut Job) -> Result<(), TransitionError>,
{
    for _ in 0..CONFLICT_RETRIES {
        let read_version = job.version;
        let mut next = job.clone();
        if let Err(refusal) = change(&mut next) {
            return Ok(Committed::Refused(job, refusal));
        }
        match store.save(&next, read_version).await {
            Ok(()) => return Ok(Committed::Written(next)),
            Err(StoreError::Conflict) => match store.get(&job.id).await? {
                Some(fresh) => job = fresh,
                None => return Ok(Committed::Missing),
            },
            Err(other) => return Err(other),
        }
    }
    Err(StoreError::Conflict)
}

//! What an ended job leaves behind, removed: copies in the results bucket that no output of the
//! job names (an attempt killed mid-copy, or one that could not clean up after itself), and the
//! job's folders on the RunPod volume (its input, and every run's outputs). The volume is a
//! fixed-size disk every worker mounts: nothing of a customer's stays there once the job is
//! over. The sweeper calls this for ended jobs once no finalize attempt can still be at work.
use std::collections::HashSet;

use crate::domain::job::Job;
use crate::domain::keys;
use crate::ports::{ObjectError, ObjectStore};

/// Most keys looked at per folder and clean-up: a job's folders hold a few inputs and outputs
/// per attempt; anything beyond is left to the next clean-up of the job.
pub const MAX_KEYS_PER_FOLDER: usize = 1_000;

/// What one clean-up removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub results: usize,
    pub volume: usize,
}

/// Removes `job`'s leftovers. Any failure stops it with an error, to be retried: whatever was
/// removed already stays removed, and the rest is found again next time.
pub async fn remove_leftovers(
    results: &dyn ObjectStore,
    volume: &dyn ObjectStore,
    job: &Job,
) -> Result<Removed, ObjectError> {
    let mut removed = Removed::default();
    let kept: HashSet<&str> = job.outputs.iter().map(|o| o.key.as_str()).collect();
    for key in results
        .list(&keys::results_of(&job.owner, &job.id), MAX_KEYS_PER_FOLDER)
        .await?
    {
        if !kept.contains(key.as_str()) {
            results.delete(&key).await?;
            removed.results += 1;
        }
    }
    for folder in [keys::volume_inputs(&job.id), keys::volume_outputs(&job.id)] {
        for key in volume.list(&folder, MAX_KEYS_PER_FOLDER).await? {
            volume.delete(&key).await?;
            removed.volume += 1;
        }
    }
    Ok(removed)
}

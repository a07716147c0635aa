//! What an ended job leaves behind, removed: copies in the results bucket that no output of the
//! job names (an attempt killed mid-copy, or one that could not clean up after itself), and the
//! job's folders on the RunPod volume (its input, and every run's outputs). The volume is a
//! fixed-size disk every worker mounts: nothing of a customer's stays there once the job is
//! over. The sweeper calls this for ended jobs once no finalize attempt can still be at work.
use std::collections::HashSet;

use crate::domain::job::Job;
use crate::domain::keys::{self, VolumeRoot};
use crate::ports::{ObjectError, ObjectStore};

/// Most keys looked at per folder and clean-up: a job's folders hold a few inputs and outputs
/// per attempt; anything beyond is left to the next clean-up of the job.
pub const MAX_KEYS_PER_FOLDER: usize = 1_000;

/// What one clean-up removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub results: usize,
    pub uploads: usize,
    pub volume: usize,
}

impl Removed {
    pub fn total(&self) -> usize {
        self.results + self.uploads + self.volume
    }
}

/// Removes `job`'s leftovers. Any failure stops it with an error, to be retried: whatever was
/// removed already stays removed, and the rest is found again next time.
/// `backend_folders` are the folders the job's backend left on the volume besides the gateway's
/// own (`Backend::volume_leftovers`).
pub async fn remove_leftovers(
    results: &dyn ObjectStore,
    volume: &dyn ObjectStore,
    root: &VolumeRoot,
    job: &Job,
    backend_folders: &[String],
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
    removed.volume = remove_volume_folders(volume, root, job, backend_folders).await?;
    Ok(removed)
}

/// Removes everything `job` left, whatever its outputs name: the job's data is being deleted
/// (its owner asked, or its retention ended). Its results folder, its inputs in the uploads
/// bucket, its folders on the volume. Retried as a whole on any failure.
pub async fn remove_everything(
    results: &dyn ObjectStore,
    uploads: &dyn ObjectStore,
    volume: &dyn ObjectStore,
    root: &VolumeRoot,
    job: &Job,
    backend_folders: &[String],
) -> Result<Removed, ObjectError> {
    let mut removed = Removed::default();
    for key in results
        .list(&keys::results_of(&job.owner, &job.id), MAX_KEYS_PER_FOLDER)
        .await?
    {
        results.delete(&key).await?;
        removed.results += 1;
    }
    for key in uploads
        .list(&keys::job_inputs(&job.owner, &job.id), MAX_KEYS_PER_FOLDER)
        .await?
    {
        uploads.delete(&key).await?;
        removed.uploads += 1;
    }
    removed.volume = remove_volume_folders(volume, root, job, backend_folders).await?;
    Ok(removed)
}

/// The job's folders on the volume (its input, every run's outputs), and its backend's.
async fn remove_volume_folders(
    volume: &dyn ObjectStore,
    root: &VolumeRoot,
    job: &Job,
    backend_folders: &[String],
) -> Result<usize, ObjectError> {
    let mut removed = 0;
    let own = [root.inputs(&job.id), root.outputs(&job.id)];
    for folder in own.iter().chain(backend_folders) {
        removed += remove_volume_folder(volume, folder).await?;
    }
    Ok(removed)
}

/// One folder on the volume: its files first, then the folders themselves, deepest first
/// (RunPod lists empty folders, and a folder left behind is a job's trace on a shared disk).
/// Returns how many files went; a folder of more than [`MAX_KEYS_PER_FOLDER`] files is
/// emptied over several calls.
pub async fn remove_volume_folder(
    volume: &dyn ObjectStore,
    folder: &str,
) -> Result<usize, ObjectError> {
    let crate::ports::Tree {
        files,
        mut folders,
        bytes,
    } = volume.list_tree(folder, MAX_KEYS_PER_FOLDER).await?;
    for key in &files {
        volume.delete(key).await?;
    }
    crate::metrics::cleanup_bytes(bytes);
    if files.len() < MAX_KEYS_PER_FOLDER {
        folders.sort_by_key(|f| std::cmp::Reverse(f.len()));
        for folder in folders {
            volume.delete(&folder).await?;
        }
    }
    Ok(files.len())
}

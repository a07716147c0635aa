//! The janitor: on a schedule, removes from the RunPod volume what the job-by-job clean-up
//! could not. The sweeper removes an ended job's volume folders once; the janitor catches
//! what came after or slipped past it: a run that wrote after its job ended, a clean-up that
//! kept failing, a job whose record is gone, and multipart uploads nobody finished.
//!
//! It touches only this deployment's folder on the volume ([`VolumeRoot`]), and the folders a
//! backend keeps its jobs' files in there (`backend_folders`: the pod's ComfyUI writes under
//! `ComfyUI/{input,output}/gateway/`, where a prompt nobody tracks any more may write after its
//! job's clean-up): other stacks, pods and people may share the disk. Under it, a folder is removed only when its name is a job id
//! this gateway minted and either the job ended at least `min_age` ago, or the job is unknown
//! and its id is at least that old. Anything else is left alone and counted.
//!
//! Job ids are UUIDv7s, so the job folders list oldest first: a run stops reading a listing
//! at the first folder too young to remove, and its work is what there is to remove, not the
//! size of the volume. Each run looks at `max_folders` at most and gives up a listing on a
//! continuation token it was handed before (RunPod's listing is reported to repeat them): what
//! it did not reach, the next run does, from the start of a shorter listing.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use crate::app::cleanup::remove_volume_folder;
use crate::config::JanitorSettings;
use crate::domain::job::{job_id_minted_at, Job, Millis};
use crate::domain::keys::VolumeRoot;
use crate::ports::{Clock, JobStore, ObjectStore, StagedUploads};

pub struct Janitor {
    pub store: Arc<dyn JobStore>,
    pub volume: Arc<dyn ObjectStore>,
    pub staged: Arc<dyn StagedUploads>,
    pub root: VolumeRoot,
    /// Folders of job folders a backend writes on the volume, beside the root's own (each
    /// ending in `/`): the same rules apply to the job folders under them.
    pub backend_folders: Vec<String>,
    pub settings: JanitorSettings,
    pub clock: Arc<dyn Clock>,
}

/// What one run did; logged as one JSON line.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct JanitorReport {
    /// Job folders looked at.
    pub folders_seen: usize,
    /// Job folders removed, and the files in them.
    pub folders_removed: usize,
    pub files_removed: usize,
    /// Of the folders removed, those whose job this deployment no longer knows.
    pub orphans_removed: usize,
    /// Folders of jobs not ended, or ended too recently.
    pub kept: usize,
    /// Names under the root that are not job folders: left alone.
    pub foreign: usize,
    /// Listings given up on a continuation token handed out before.
    pub repeated_pages: usize,
    /// Multipart uploads under the root aborted, and those left because they are recent.
    pub uploads_aborted: usize,
    pub uploads_kept: usize,
    /// The run ended before its listings did: out of budget or out of time.
    pub stopped_early: bool,
    pub errors: usize,
}

/// What becomes of one job folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// The job ended at least `min_age` ago.
    Ended,
    /// No such job: its record is gone.
    Orphan,
    Keep,
}

/// No folder is begun this close to the invocation's end.
const RESERVE_MS: Millis = 10_000;

impl Janitor {
    /// One run, ending before `deadline` (epoch ms) if one is given.
    pub async fn run_before(&self, deadline: Option<Millis>) -> JanitorReport {
        let mut report = JanitorReport::default();
        let mut verdicts = HashMap::new();
        let folders = self.root.job_folders();
        for folder in folders.iter().chain(&self.backend_folders) {
            if !self
                .clear_folder(folder, deadline, &mut verdicts, &mut report)
                .await
            {
                report.stopped_early = true;
                break;
            }
        }
        if self.settings.abort_uploads && !report.stopped_early {
            self.abort_abandoned_uploads(deadline, &mut report).await;
        }
        tracing::info!(
            folders_seen = report.folders_seen,
            folders_removed = report.folders_removed,
            files_removed = report.files_removed,
            orphans_removed = report.orphans_removed,
            kept = report.kept,
            foreign = report.foreign,
            repeated_pages = report.repeated_pages,
            uploads_aborted = report.uploads_aborted,
            uploads_kept = report.uploads_kept,
            stopped_early = report.stopped_early,
            errors = report.errors,
            "janitor run"
        );
        report
    }

    /// Goes through the job folders under `parent` (`{root}inputs/` or `{root}outputs/`),
    /// oldest first. Returns false when the run must end here (budget or time spent).
    async fn clear_folder(
        &self,
        parent: &str,
        deadline: Option<Millis>,
        verdicts: &mut HashMap<String, Verdict>,
        report: &mut JanitorReport,
    ) -> bool {
        let mut token: Option<String> = None;
        let mut tokens_seen = HashSet::new();
        let mut last_seen: Option<String> = None;
        loop {
            let page = match self.volume.list_folder(parent, token.as_deref()).await {
                Ok(page) => page,
                Err(err) => {
                    tracing::warn!(folder = parent, error = %err, "janitor could not list the volume");
                    report.errors += 1;
                    return true;
                }
            };
            report.foreign += page.files.len();
            for folder in page.folders {
                // A repeated page hands back folders already seen; they were dealt with.
                if last_seen.as_ref().is_some_and(|last| folder <= *last) {
                    continue;
                }
                last_seen = Some(folder.clone());
                if report.folders_seen >= self.settings.max_folders || self.out_of_time(deadline) {
                    return false;
                }
                let name = folder[parent.len()..].trim_end_matches('/');
                let Some(minted) = job_id_minted_at(name) else {
                    report.foreign += 1;
                    continue;
                };
                report.folders_seen += 1;
                let cutoff = self.clock.now_ms() - self.settings.min_age.as_millis() as Millis;
                if minted > cutoff {
                    // Ids sort by age: every folder after this one is younger still.
                    report.kept += 1;
                    return true;
                }
                let verdict = match verdicts.get(name) {
                    Some(verdict) => *verdict,
                    None => match self.store.get(name).await {
                        Ok(job) => {
                            let verdict = self.verdict(job.as_ref(), cutoff);
                            verdicts.insert(name.to_string(), verdict);
                            verdict
                        }
                        Err(err) => {
                            tracing::warn!(job_id = name, error = %err, "janitor could not read the job");
                            report.errors += 1;
                            continue;
                        }
                    },
                };
                if verdict == Verdict::Keep {
                    report.kept += 1;
                    continue;
                }
                match remove_volume_folder(self.volume.as_ref(), &folder).await {
                    Ok(files) => {
                        let reason = if verdict == Verdict::Orphan {
                            "orphan"
                        } else {
                            "ended"
                        };
                        tracing::info!(folder = %folder, files, reason, "janitor removed a job folder");
                        report.folders_removed += 1;
                        report.files_removed += files;
                        if verdict == Verdict::Orphan {
                            report.orphans_removed += 1;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(folder = %folder, error = %err, "janitor could not remove a job folder");
                        report.errors += 1;
                    }
                }
            }
            match page.next {
                None => return true,
                Some(next) if !tokens_seen.insert(next.clone()) => {
                    tracing::warn!(folder = parent, "the volume's listing repeated a continuation token; the rest waits for the next run");
                    report.repeated_pages += 1;
                    return true;
                }
                Some(next) => token = Some(next),
            }
        }
    }

    /// Whether a job's folder may go. Only a job that ended at least `min_age` ago and that no
    /// finalize attempt can still be copying for, or one this deployment no longer has.
    fn verdict(&self, job: Option<&Job>, cutoff: Millis) -> Verdict {
        let Some(job) = job else {
            return Verdict::Orphan;
        };
        let ended_long_ago = job.is_terminal()
            && job
                .timestamps
                .finished_at
                .unwrap_or(job.timestamps.updated_at)
                <= cutoff;
        let leased = job.lease.as_ref().is_some_and(|lease| lease.until > cutoff);
        if ended_long_ago && !leased {
            Verdict::Ended
        } else {
            Verdict::Keep
        }
    }

    /// Aborts the multipart uploads under the root begun more than `abort_uploads_after` ago:
    /// their parts fill the volume's hidden staging folder and nobody will finish them.
    async fn abort_abandoned_uploads(&self, deadline: Option<Millis>, report: &mut JanitorReport) {
        let cutoff = self.clock.now_ms() - self.settings.abort_uploads_after.as_millis() as Millis;
        let mut after: Option<(String, String)> = None;
        let mut seen = 0usize;
        loop {
            let page = match self
                .staged
                .staged_uploads(self.root.as_str(), after.as_ref())
                .await
            {
                Ok(page) => page,
                Err(err) => {
                    tracing::warn!(error = %err, "janitor could not list the volume's multipart uploads");
                    report.errors += 1;
                    return;
                }
            };
            for upload in page.uploads {
                seen += 1;
                if seen > self.settings.max_folders || self.out_of_time(deadline) {
                    report.stopped_early = true;
                    return;
                }
                // An upload whose start the store does not give is not known to be abandoned.
                if upload.initiated.is_none_or(|at| at > cutoff) {
                    report.uploads_kept += 1;
                    continue;
                }
                match self
                    .staged
                    .abort_upload(&upload.key, &upload.upload_id)
                    .await
                {
                    Ok(()) => {
                        tracing::info!(key = %upload.key, upload_id = %upload.upload_id, initiated = upload.initiated, "janitor aborted a multipart upload");
                        report.uploads_aborted += 1;
                    }
                    Err(err) => {
                        tracing::warn!(key = %upload.key, error = %err, "janitor could not abort a multipart upload");
                        report.errors += 1;
                    }
                }
            }
            match page.next {
                Some(next) if after.as_ref() != Some(&next) => after = Some(next),
                Some(_) => {
                    report.repeated_pages += 1;
                    return;
                }
                None => return,
            }
        }
    }

    fn out_of_time(&self, deadline: Option<Millis>) -> bool {
        deadline.is_some_and(|deadline| deadline - self.clock.now_ms() < RESERVE_MS)
    }
}

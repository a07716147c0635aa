//! Finalizing: acting on what RunPod reports about a job. The webhook and the sweeper both call
//! [`Finalizer::observe`]; it is safe to call any number of times, concurrently, for the same
//! job. Completion takes a finalize lease first, so only one caller copies outputs; every write
//! is conditional on the version read, so only one caller moves the job to a terminal state.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::app::{commit_as, commit_leased, next_check_after_failure, transfer, Committed};
use crate::config::Settings;
use crate::domain::job::{
    Actor, ErrorCode, Job, JobError, JobState, LeaseKind, OutputFile, TransitionError,
};
use crate::domain::keys;
use crate::domain::paths::{file_name, VolumeLayout};
use crate::domain::report::{
    unique_name, volume_output_keys, worker_comfyui_images, ImageSource, InlineImagePolicy,
    Reported, MAX_OUTPUT_FILES,
};
use crate::domain::workflow::{OutputContract, WorkflowCatalog};
use crate::ports::{
    ByteChunks, Classified, Clock, Failure, Fetched, JobStore, ObjectError, ObjectMeta,
    ObjectStore, RunPodStatus, StoreError, UrlFetcher,
};

/// After a transient copy failure, look again this soon (or after the poll interval, if
/// shorter); it doubles with each failure in a row.
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
    /// Says which output contract a job's workflow uses.
    pub catalog: Arc<WorkflowCatalog>,
    /// Downloads `s3_url` images of the worker-comfyui contract.
    pub fetcher: Arc<dyn UrlFetcher>,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
}

/// What a RunPod report asks of a job, decided from the report alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The report says nothing usable (empty, or a status nobody knows): ask `/status`.
    AskStatus,
    /// Still queued at RunPod: nothing to record.
    Wait,
    /// A worker has it.
    MarkRunning,
    /// It ended without outputs: failed, timed out or cancelled at RunPod.
    End(JobState, JobError),
    /// It completed: collect its outputs under the finalize lease.
    Collect(Option<serde_json::Value>),
}

/// The first step of finalizing: what `status` means for the job it is about.
pub fn decide(status: &RunPodStatus) -> Decision {
    let report = Reported::from_status(
        status.status.as_deref(),
        status.output.as_ref(),
        status.error.as_ref(),
    );
    match report {
        Reported::Unknown => Decision::AskStatus,
        Reported::Queued => Decision::Wait,
        Reported::Running => Decision::MarkRunning,
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
struct SameRun(Option<String>);

impl SameRun {
    fn check(&self, job: &Job) -> Result<(), TransitionError> {
        match (&self.0, &job.runpod_job_id) {
            (Some(reported), Some(tracked)) if reported != tracked => Err(TransitionError::Stale),
            _ => Ok(()),
        }
    }
}

/// Why collecting a job's outputs stopped short.
enum Collect {
    /// The worker's output is unusable: the job fails with this error.
    Fail(JobError),
    /// A store or download hiccup: release the lease and try again soon.
    Retry(String),
}

impl Finalizer {
    /// [`Finalizer::observe_as`] for a caller that does not say who it is.
    pub async fn observe(&self, job: Job, status: &RunPodStatus) -> Result<Outcome, FinalizeError> {
        self.observe_as(job, status, Actor::Gateway).await
    }

    /// Acts on what RunPod reports about `job`; the changes are recorded as made `by` (the
    /// webhook or the sweeper).
    pub async fn observe_as(
        &self,
        job: Job,
        status: &RunPodStatus,
        by: Actor,
    ) -> Result<Outcome, FinalizeError> {
        if job.is_terminal() {
            return Ok(Outcome::Unchanged);
        }
        let (delay, execution) = (status.delay_time, status.execution_time);
        let same_run = SameRun(status.id.clone());
        let now = self.clock.now_ms();
        let committed = match decide(status) {
            Decision::AskStatus => return Ok(Outcome::NeedsStatus),
            Decision::Wait => return Ok(Outcome::Unchanged),
            Decision::MarkRunning if job.state == JobState::Running => {
                return Ok(Outcome::Unchanged)
            }
            Decision::MarkRunning => {
                let next_check = now + self.settings.poll_interval.as_millis() as i64;
                commit_as(self.store.as_ref(), job, by, |job| {
                    // A finalize in progress means RunPod already reported the end: this report
                    // is stale, and writing it would only get in the finalizer's way.
                    same_run.check(job)?;
                    job.ensure_unleased(now)?;
                    job.mark_running(now)?;
                    job.next_check_at = Some(next_check);
                    Ok(())
                })
                .await?
            }
            Decision::End(state, error) => {
                commit_as(self.store.as_ref(), job, by, |job| {
                    same_run.check(job)?;
                    job.ensure_unleased(now)?;
                    job.record_runpod_times(delay, execution);
                    job.end(state, error.clone(), now)
                })
                .await?
            }
            Decision::Collect(output) => {
                return self
                    .complete(job, output, (delay, execution), by, &same_run)
                    .await
            }
        };
        Ok(match committed {
            Committed::Written(job) if job.is_terminal() => Outcome::Finished(job.state),
            Committed::Written(job) => Outcome::Progressed(job.state),
            Committed::Refused(_, TransitionError::Leased(..)) => Outcome::Busy,
            Committed::Refused(..) | Committed::Missing => Outcome::Unchanged,
        })
    }

    /// A completed run: take the finalize lease, collect the outputs, then write the one
    /// result that follows (succeeded, failed, or the lease released for a retry), and clean
    /// up whatever this call wrote that no result refers to.
    async fn complete(
        &self,
        job: Job,
        output: Option<serde_json::Value>,
        (delay, execution): (Option<u64>, Option<u64>),
        by: Actor,
        same_run: &SameRun,
    ) -> Result<Outcome, FinalizeError> {
        let now = self.clock.now_ms();
        let lease_ms = self.settings.finalize_lease.as_millis() as i64;
        // Only the holder of the finalize lease copies outputs; everyone else backs off.
        let leased = match commit_as(self.store.as_ref(), job, by, |job| {
            same_run.check(job)?;
            job.acquire_lease(LeaseKind::Finalize, now, lease_ms)
        })
        .await?
        {
            Committed::Written(job) => job,
            Committed::Refused(job, _) if job.is_terminal() => return Ok(Outcome::Unchanged),
            Committed::Refused(_, TransitionError::Stale) => return Ok(Outcome::Unchanged),
            Committed::Refused(..) => return Ok(Outcome::Busy),
            Committed::Missing => return Ok(Outcome::Unchanged),
        };

        // Every results key this call wrote or began to write, whatever happens next.
        let mut written = Vec::new();
        let collected = self.collect(&leased, output.as_ref(), &mut written).await;
        let now = self.clock.now_ms();
        let store = self.store.as_ref();
        let (committed, outcome) = match collected {
            Ok(outputs) => {
                let committed = commit_leased(store, &leased, by, |job| {
                    job.record_runpod_times(delay, execution);
                    job.succeed(outputs.clone(), now)
                })
                .await?;
                (committed, Ok(Outcome::Finished(JobState::Succeeded)))
            }
            Err(Collect::Fail(error)) => {
                tracing::warn!(job_id = %leased.id, code = error.code.as_str(), message = %error.message, "job failed while finalizing");
                let committed = commit_leased(store, &leased, by, |job| {
                    job.record_runpod_times(delay, execution);
                    job.fail(error.clone(), now)
                })
                .await?;
                (committed, Ok(Outcome::Finished(JobState::Failed)))
            }
            Err(Collect::Retry(reason)) => {
                tracing::warn!(job_id = %leased.id, error = %reason, "output copy failed; releasing the lease");
                let base = RETRY_SOON.min(self.settings.poll_interval);
                let released = commit_leased(store, &leased, by, |job| {
                    job.note_check_failure();
                    let retry_at = next_check_after_failure(base, job, now);
                    job.release_lease(now, retry_at);
                    Ok(())
                })
                .await;
                match released {
                    Ok(committed) => (committed, Err(FinalizeError::RetryLater(reason))),
                    // The lease simply runs out; the next holder writes the same keys again.
                    Err(_) => return Err(FinalizeError::RetryLater(reason)),
                }
            }
        };
        match committed {
            Committed::Written(settled) => {
                if settled.state == JobState::Succeeded {
                    tracing::info!(job_id = %settled.id, outputs = settled.outputs.len(), "job succeeded");
                } else {
                    self.remove(&leased, &written).await;
                }
                outcome
            }
            // Our lease ran out and someone else took over, or the client cancelled meanwhile:
            // their outcome stands.
            Committed::Refused(..) | Committed::Missing => {
                self.remove_if_orphaned(&leased, &written).await;
                outcome.map(|_| Outcome::Unchanged)
            }
        }
    }

    /// Collects the outputs as the job's output contract says, into the results bucket,
    /// adding each key to `written` before writing it.
    async fn collect(
        &self,
        job: &Job,
        output: Option<&serde_json::Value>,
        written: &mut Vec<String>,
    ) -> Result<Vec<OutputFile>, Collect> {
        match self.contract_of(job, output) {
            OutputContract::VolumeFiles => self.copy_volume_files(job, output, written).await,
            OutputContract::WorkerComfyui => self.store_inline_images(job, output, written).await,
        }
    }

    /// Outputs written by an attempt whose result was not recorded (its lease ran out and
    /// another attempt took over, or the client cancelled meanwhile) are in this attempt's own
    /// folder and no job refers to them: remove them, unless the stored job does after all.
    async fn remove_if_orphaned(&self, leased: &Job, written: &[String]) {
        if written.is_empty() {
            return;
        }
        match self.store.get(&leased.id).await {
            Ok(Some(fresh)) if fresh.outputs.iter().any(|o| written.contains(&o.key)) => {}
            Ok(_) => self.remove(leased, written).await,
            // Unknown: keeping a leftover costs storage; removing an output would lose it.
            Err(_) => {}
        }
    }

    /// The one clean-up path. Best effort: a leftover costs storage but is never shown to
    /// anyone.
    async fn remove(&self, job: &Job, written: &[String]) {
        for key in written {
            if let Err(err) = self.results.delete(key).await {
                tracing::warn!(job_id = %job.id, key = %key, error = %err, "could not remove a partial output");
            }
        }
    }

    /// The contract of the job's workflow. A workflow no longer in the catalog (a job from
    /// before a deploy) is judged by the shape of its output.
    fn contract_of(&self, job: &Job, output: Option<&serde_json::Value>) -> OutputContract {
        match self.catalog.get(&job.workflow) {
            Some(workflow) => workflow.output_contract(),
            None if output.is_some_and(|o| o.get("images").is_some()) => {
                OutputContract::WorkerComfyui
            }
            None => OutputContract::VolumeFiles,
        }
    }

    /// `volume_files`: copies the files the worker named, volume → results bucket.
    async fn copy_volume_files(
        &self,
        job: &Job,
        output: Option<&serde_json::Value>,
        written: &mut Vec<String>,
    ) -> Result<Vec<OutputFile>, Collect> {
        let files = volume_output_keys(output, &self.layout, &job.id).map_err(Collect::Fail)?;
        let sizes = self.check_volume_sizes(&files).await?;
        let attempt = attempt_of(job);
        let mut outputs: Vec<OutputFile> = Vec::with_capacity(files.len());
        for (file, size) in files.iter().zip(sizes) {
            // Two outputs may share a name in different folders (two SaveImage nodes with
            // prefixes "a/img" and "b/img"): each gets its own name, hence its own result key.
            let taken: Vec<&str> = outputs.iter().map(|o| o.file_name.as_str()).collect();
            let name = unique_name(file_name(file), &taken);
            let destination = keys::result(&job.owner, &job.id, &attempt, &name);
            let content_type = transfer::content_type_for(&name);
            written.push(destination.clone());
            let meta = self
                .copy_at_most(file, &destination, content_type, &name, size)
                .await?;
            outputs.push(OutputFile {
                key: destination,
                file_name: name,
                size: meta.size,
                content_type: content_type.to_string(),
            });
        }
        Ok(outputs)
    }

    /// The size of each file the worker named, from the volume, before anything is copied: a
    /// file over `OUTPUT_MAX_FILE_BYTES`, or files over `OUTPUT_MAX_JOB_BYTES` together, fail
    /// the job with nothing stored.
    async fn check_volume_sizes(&self, files: &[String]) -> Result<Vec<u64>, Collect> {
        let (file_cap, job_cap) = (
            self.settings.max_output_file_bytes,
            self.settings.max_output_job_bytes,
        );
        let mut sizes = Vec::with_capacity(files.len());
        for file in files {
            let name = file_name(file);
            let meta = self
                .volume
                .head(file)
                .await
                .map_err(|err| Collect::Retry(format!("checking {name}: {err}")))?
                .ok_or_else(|| {
                    Collect::Fail(JobError::new(
                        ErrorCode::OutputMissing,
                        format!("the worker reported {name} but it is not on the volume"),
                    ))
                })?;
            if meta.size > file_cap {
                return Err(Collect::Fail(too_large(name, file_cap)));
            }
            sizes.push(meta.size);
        }
        let total: u64 = sizes.iter().sum();
        if total > job_cap {
            return Err(Collect::Fail(JobError::new(
                ErrorCode::OutputTooLarge,
                format!("the job's outputs are {total} bytes together; the limit is {job_cap}"),
            )));
        }
        Ok(sizes)
    }

    /// Streams one volume file into the results bucket, never past the size its check found:
    /// a file that grew since is refused as too large rather than stored in part.
    async fn copy_at_most(
        &self,
        file: &str,
        destination: &str,
        content_type: &str,
        name: &str,
        checked: u64,
    ) -> Result<ObjectMeta, Collect> {
        let fail = |err: ObjectError| match err.failure() {
            Failure::Missing => Collect::Fail(JobError::new(
                ErrorCode::OutputMissing,
                format!("the worker reported {name} but it is not on the volume"),
            )),
            // A refusal by our own bucket or the volume is the gateway's configuration,
            // not the worker's output: retried until fixed or the deadline.
            Failure::Transient | Failure::Permanent | Failure::Unknown => {
                Collect::Retry(err.to_string())
            }
        };
        let (mut meta, body) = self.volume.open(file).await.map_err(fail)?;
        meta.content_type = Some(content_type.to_string());
        let counted = Arc::new(AtomicU64::new(0));
        let over = Arc::new(AtomicU64::new(0));
        let body = limited(body, checked, counted.clone(), over.clone());
        let result = self.results.put_stream(destination, &meta, body).await;
        if over.load(Ordering::SeqCst) > 0 {
            return Err(Collect::Fail(JobError::new(
                ErrorCode::OutputTooLarge,
                format!("{name} grew past the {checked} bytes it had when checked"),
            )));
        }
        result.map_err(fail)?;
        meta.size = counted.load(Ordering::SeqCst);
        Ok(meta)
    }

    /// `worker_comfyui`: stores the images of the job output (base64 decoded, URLs downloaded
    /// with the size cap) in the results bucket, under the same keys as volume files.
    ///
    /// Nothing is written until every image has passed the checks that can be made up front
    /// (shape, count, names, base64, size, allowed host, and each download's status and
    /// declared size). A download that still goes wrong midway (longer than declared or than
    /// the cap, or cut off) stops the collection; what was written is in `written`.
    async fn store_inline_images(
        &self,
        job: &Job,
        output: Option<&serde_json::Value>,
        written: &mut Vec<String>,
    ) -> Result<Vec<OutputFile>, Collect> {
        let cap = self.settings.max_output_image_bytes;
        let policy = InlineImagePolicy {
            max_images: MAX_OUTPUT_FILES,
            max_image_bytes: cap,
            max_job_bytes: self.settings.max_output_job_bytes,
            allowed_hosts: self.settings.output_url_allowed_hosts.clone(),
        };
        let images = worker_comfyui_images(output, &policy).map_err(Collect::Fail)?;

        // Open every download first: status and declared size decide before any write.
        let mut sources = Vec::with_capacity(images.len());
        for image in images {
            let source = match image.source {
                ImageSource::Inline(bytes) => Source::Inline(bytes),
                ImageSource::Url(url) => {
                    let fetched =
                        self.fetcher
                            .open(&url)
                            .await
                            .map_err(|err| match err.failure() {
                                Failure::Transient => Collect::Retry(format!(
                                    "downloading {}: {err}",
                                    image.file_name
                                )),
                                Failure::Missing | Failure::Permanent | Failure::Unknown => {
                                    Collect::Fail(JobError::new(
                                        ErrorCode::OutputMissing,
                                        format!("the worker's URL for {}: {err}", image.file_name),
                                    ))
                                }
                            })?;
                    if fetched.size.is_some_and(|size| size > cap) {
                        return Err(Collect::Fail(too_large(&image.file_name, cap)));
                    }
                    Source::Download(fetched)
                }
            };
            sources.push((image.file_name, source));
        }
        // All of the job's images together, as far as known before any write.
        let job_cap = self.settings.max_output_job_bytes;
        let known: u64 = sources
            .iter()
            .map(|(_, source)| match source {
                Source::Inline(bytes) => bytes.len() as u64,
                Source::Download(fetched) => fetched.size.unwrap_or(0),
            })
            .sum();
        if known > job_cap {
            return Err(Collect::Fail(JobError::new(
                ErrorCode::OutputTooLarge,
                format!("the job's images are {known} bytes together; the limit is {job_cap}"),
            )));
        }

        let attempt = attempt_of(job);
        let mut outputs: Vec<OutputFile> = Vec::with_capacity(sources.len());
        let mut stored: u64 = 0;
        for (name, source) in sources {
            let destination = keys::result(&job.owner, &job.id, &attempt, &name);
            let content_type = transfer::content_type_for(&name);
            written.push(destination.clone());
            let size = match source {
                Source::Inline(bytes) => {
                    let size = bytes.len() as u64;
                    self.results
                        .put_bytes(&destination, bytes, content_type)
                        .await
                        .map_err(|err| Collect::Retry(err.to_string()))?;
                    size
                }
                Source::Download(fetched) => {
                    // A download of undeclared length may use only what the job has left.
                    let left = job_cap.saturating_sub(stored);
                    self.store_download(&destination, &name, content_type, fetched, cap.min(left))
                        .await?
                }
            };
            stored += size;
            outputs.push(OutputFile {
                key: destination,
                file_name: name,
                size,
                content_type: content_type.to_string(),
            });
        }
        Ok(outputs)
    }

    /// Streams one download into the results bucket, never past `cap` (nor past the declared
    /// length); returns the bytes stored.
    async fn store_download(
        &self,
        destination: &str,
        name: &str,
        content_type: &str,
        fetched: Fetched,
        cap: u64,
    ) -> Result<u64, Collect> {
        let limit = fetched.size.unwrap_or(cap).min(cap);
        let counted = Arc::new(AtomicU64::new(0));
        let over = Arc::new(AtomicU64::new(0));
        let body = limited(fetched.body, limit, counted.clone(), over.clone());
        let meta = ObjectMeta {
            size: limit,
            content_type: Some(content_type.to_string()),
        };
        let result = self.results.put_stream(destination, &meta, body).await;
        let size = counted.load(Ordering::SeqCst);
        if over.load(Ordering::SeqCst) > 0 {
            return Err(Collect::Fail(if limit < cap {
                JobError::new(
                    ErrorCode::InvalidOutput,
                    format!("{name} is longer than the {limit} bytes its server declared"),
                )
            } else {
                too_large(name, cap)
            }));
        }
        if let Err(err) = result {
            return Err(Collect::Retry(format!("storing {name}: {err}")));
        }
        if fetched.size.is_some_and(|declared| declared != size) {
            return Err(Collect::Retry(format!(
                "{name}: the download ended after {size} of {limit} bytes"
            )));
        }
        Ok(size)
    }
}

/// An output image ready to store.
enum Source {
    Inline(bytes::Bytes),
    Download(Fetched),
}

/// This finalize attempt's folder in the results bucket.
fn attempt_of(leased: &Job) -> String {
    keys::finalize_attempt(leased.write_id.unwrap_or_default())
}

fn too_large(name: &str, cap: u64) -> JobError {
    JobError::new(
        ErrorCode::OutputTooLarge,
        format!("{name} is larger than the {cap}-byte limit"),
    )
}

/// Passes `body` through until more than `limit` bytes have come, then ends it with an error
/// (so the store aborts the write) and marks `over`. `counted` holds the bytes passed.
fn limited(
    body: ByteChunks,
    limit: u64,
    counted: Arc<AtomicU64>,
    over: Arc<AtomicU64>,
) -> ByteChunks {
    body.scan(false, move |stopped, chunk| {
        if *stopped {
            return futures::future::ready(None);
        }
        let item = match chunk {
            Ok(bytes) => {
                let total =
                    counted.fetch_add(bytes.len() as u64, Ordering::SeqCst) + bytes.len() as u64;
                if total > limit {
                    over.store(total, Ordering::SeqCst);
                    *stopped = true;
                    Err(ObjectError::Permanent(format!("more than {limit} bytes")))
                } else {
                    Ok(bytes)
                }
            }
            Err(err) => {
                *stopped = true;
                Err(err)
            }
        };
        futures::future::ready(Some(item))
    })
    .boxed()
}

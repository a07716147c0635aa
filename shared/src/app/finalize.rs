//! Finalizing: acting on what RunPod reports about a job. The webhook and the sweeper both call
//! [`Finalizer::observe`]; it is safe to call any number of times, concurrently, for the same
//! job. Completion takes a finalize lease first, so only one caller copies outputs; every write
//! is conditional on the version read, so only one caller moves the job to a terminal state.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::app::{commit, transfer, Committed};
use crate::config::Settings;
use crate::domain::job::{ErrorCode, Job, JobError, JobState, LeaseKind, OutputFile};
use crate::domain::paths::{file_name, results_key, VolumeLayout};
use crate::domain::report::{
    volume_output_keys, worker_comfyui_images, ImageSource, InlineImagePolicy, Reported,
    MAX_OUTPUT_FILES,
};
use crate::domain::workflow::{OutputContract, WorkflowCatalog};
use crate::ports::{
    ByteChunks, Clock, FetchError, Fetched, JobStore, ObjectError, ObjectMeta, ObjectStore,
    RunPodStatus, StoreError, UrlFetcher,
};

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
    /// Says which output contract a job's workflow uses.
    pub catalog: Arc<WorkflowCatalog>,
    /// Downloads `s3_url` images of the worker-comfyui contract.
    pub fetcher: Arc<dyn UrlFetcher>,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
}

/// Why collecting a job's outputs stopped short.
enum Collect {
    /// The worker's output is unusable: the job fails with this error.
    Fail(JobError),
    /// A store or download hiccup: release the lease and try again soon.
    Retry(String),
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

        let collected = match self.contract_of(&leased, output.as_ref()) {
            OutputContract::VolumeFiles => self.copy_volume_files(&leased, output.as_ref()).await,
            OutputContract::WorkerComfyui => {
                self.store_inline_images(&leased, output.as_ref()).await
            }
        };
        let outputs = match collected {
            Ok(outputs) => outputs,
            Err(Collect::Fail(error)) => {
                return self.finish_failed(leased, error, delay, execution).await
            }
            Err(Collect::Retry(reason)) => {
                tracing::warn!(job_id = %leased.id, error = %reason, "output copy failed; releasing the lease");
                let retry_at = self.clock.now_ms() + RETRY_SOON.as_millis() as i64;
                let mut released = leased.clone();
                released.release_lease(self.clock.now_ms(), retry_at);
                // If this write loses a race the lease simply runs out; nothing is lost.
                let _ = self.store.save(&released, leased.version).await;
                return Err(FinalizeError::RetryLater(reason));
            }
        };

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
    ) -> Result<Vec<OutputFile>, Collect> {
        let keys = volume_output_keys(output, &self.layout, &job.id).map_err(Collect::Fail)?;
        let mut outputs = Vec::with_capacity(keys.len());
        for key in &keys {
            let name = file_name(key).to_string();
            let destination = results_key(&job.owner, &job.id, &name);
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
                    return Err(Collect::Fail(JobError::new(
                        ErrorCode::OutputMissing,
                        format!("the worker reported {name} but it is not on the volume"),
                    )));
                }
                Err(err) => return Err(Collect::Retry(err.to_string())),
            }
        }
        Ok(outputs)
    }

    /// `worker_comfyui`: stores the images of the job output (base64 decoded, URLs downloaded
    /// with the size cap) in the results bucket, under the same keys as volume files.
    ///
    /// Nothing is written until every image has passed the checks that can be made up front
    /// (shape, count, names, base64, size, allowed host, and each download's status and
    /// declared size). A download that still goes wrong midway (longer than declared or than
    /// the cap, or cut off) removes whatever this call had already written.
    async fn store_inline_images(
        &self,
        job: &Job,
        output: Option<&serde_json::Value>,
    ) -> Result<Vec<OutputFile>, Collect> {
        let cap = self.settings.max_output_image_bytes;
        let policy = InlineImagePolicy {
            max_images: MAX_OUTPUT_FILES,
            max_image_bytes: cap,
            allowed_hosts: self.settings.output_url_allowed_hosts.clone(),
        };
        let images = worker_comfyui_images(output, &policy).map_err(Collect::Fail)?;

        // Open every download first: status and declared size decide before any write.
        let mut sources = Vec::with_capacity(images.len());
        for image in images {
            let source = match image.source {
                ImageSource::Inline(bytes) => Source::Inline(bytes),
                ImageSource::Url(url) => {
                    let fetched = self.fetcher.open(&url).await.map_err(|err| match err {
                        FetchError::Transient(reason) => {
                            Collect::Retry(format!("downloading {}: {reason}", image.file_name))
                        }
                        FetchError::Status(status) => Collect::Fail(JobError::new(
                            ErrorCode::OutputMissing,
                            format!(
                                "the worker's URL for {} answered HTTP {status}",
                                image.file_name
                            ),
                        )),
                    })?;
                    if fetched.size.is_some_and(|size| size > cap) {
                        return Err(Collect::Fail(too_large(&image.file_name, cap)));
                    }
                    Source::Download(fetched)
                }
            };
            sources.push((image.file_name, source));
        }

        let mut outputs: Vec<OutputFile> = Vec::with_capacity(sources.len());
        for (name, source) in sources {
            let destination = results_key(&job.owner, &job.id, &name);
            let content_type = transfer::content_type_for(&name);
            let written = match source {
                Source::Inline(bytes) => {
                    let size = bytes.len() as u64;
                    self.results
                        .put_bytes(&destination, bytes, content_type)
                        .await
                        .map(|()| size)
                        .map_err(|err| Collect::Retry(err.to_string()))
                }
                Source::Download(fetched) => {
                    self.store_download(&destination, &name, content_type, fetched, cap)
                        .await
                }
            };
            match written {
                Ok(size) => outputs.push(OutputFile {
                    key: destination,
                    file_name: name,
                    size,
                    content_type: content_type.to_string(),
                }),
                Err(failure) => {
                    for done in &outputs {
                        if let Err(err) = self.results.delete(&done.key).await {
                            tracing::warn!(job_id = %job.id, key = %done.key, error = %err, "could not remove a partial output");
                        }
                    }
                    return Err(failure);
                }
            }
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
            let _ = self.results.delete(destination).await;
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
            let _ = self.results.delete(destination).await;
            return Err(Collect::Retry(format!("storing {name}: {err}")));
        }
        if fetched.size.is_some_and(|declared| declared != size) {
            let _ = self.results.delete(destination).await;
            return Err(Collect::Retry(format!(
                "{name}: the download ended after {size} of {limit} bytes"
            )));
        }
        Ok(size)
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

/// An output image ready to store.
enum Source {
    Inline(bytes::Bytes),
    Download(Fetched),
}

fn too_large(name: &str, cap: u64) -> JobError {
    JobError::new(
        ErrorCode::InvalidOutput,
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

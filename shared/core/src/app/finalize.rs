//! Finalizing: collecting a completed run's outputs into the results bucket, in the finalize
//! function, from the report the webhook or the sweeper stored when RunPod confirmed the run
//! completed ([`crate::app::observe`]). It is safe to call any number of times, concurrently,
//! for the same job: it takes a finalize lease first, so only one caller copies outputs, and
//! every write is conditional on the version read, so only one caller ends the job.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::app::backends::{comfy_files, Backends};
use crate::app::observe::{Outcome, SameRun};
use crate::app::{commit_leased, transfer, Committed, Writer};
use crate::config::Settings;
use crate::domain::job::{
    Actor, ErrorCode, Job, JobError, JobState, LeaseKind, Millis, OutputFile, TransitionError,
};
use crate::domain::keys;
use crate::domain::paths::{file_name, VolumeLayout};
use crate::domain::report::{
    safe_file_name, unique_name, volume_output_keys, worker_comfyui_images, Base64Image,
    ImageSource, InlineImagePolicy, MAX_OUTPUT_FILES,
};
use crate::domain::retry::check_backoff;
use crate::domain::workflow::{OutputContract, WorkflowCatalog};
use crate::ports::{
    ByteChunks, CallbackQueue, Classified, Clock, Failure, Fetched, FinalizeQueue, JobStore,
    ObjectError, ObjectMeta, ObjectStore, RunPodStatus, StoreError, UrlFetcher,
};

/// How long a finalize lease outlives the invocation that holds it: the writers' clocks differ
/// by this much at most.
const LEASE_MARGIN_MS: Millis = 5_000;

/// Time set aside before the invocation's end for the final write.
const FINAL_WRITE_RESERVE_MS: Millis = 5_000;

/// The slowest copy rate planned for (bytes per second): a file is not started unless the
/// invocation has time left to copy it at this rate.
const SLOWEST_COPY_RATE: u64 = 4 * 1024 * 1024;

/// After a transient copy failure, try again this soon (or after the poll interval, if
/// shorter); it doubles with each failure in a row, up to [`MAX_RETRY_WAIT`].
const RETRY_SOON: Duration = Duration::from_secs(15);

/// The longest wait between two finalize attempts (or an eighth of `finalize_give_up`, if
/// less): a job whose outputs cannot be stored yet is retried within minutes, until then.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5 * 60);

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
    /// Where the callbacks the job's client asked for are requested.
    pub callbacks: Arc<dyn CallbackQueue>,
    pub volume: Arc<dyn ObjectStore>,
    pub results: Arc<dyn ObjectStore>,
    pub layout: VolumeLayout,
    /// Says which output contract a job's workflow uses.
    pub catalog: Arc<WorkflowCatalog>,
    /// Downloads `s3_url` images of the worker-comfyui contract.
    pub fetcher: Arc<dyn UrlFetcher>,
    /// The job's backend says how its outputs come back, and serves those it keeps.
    pub backends: Backends,
    /// Its own queue, to retry a job later after a transient failure.
    pub queue: Arc<dyn FinalizeQueue>,
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

/// Why a stored report could not be used.
enum ReportError {
    /// Gone, or not what the hand-off wrote: the job cannot be finalized from it.
    Unusable(JobError),
    /// The results bucket did not answer; try again.
    Retry(String),
}

impl Finalizer {
    /// How this use case writes jobs, as `by`.
    fn writer(&self, by: Actor) -> Writer<'_> {
        Writer::new(&*self.store, &*self.callbacks, by)
    }

    /// The finalize function's work for one request: collects the outputs of `job_id`'s
    /// handed-off run from its stored report. `deadline` is when the invocation ends (epoch
    /// ms), if known: the lease then lasts no longer than the invocation can, so that a killed
    /// attempt is retried as soon as it is dead, and no file is begun without time to copy it.
    pub async fn finalize(
        &self,
        job_id: &str,
        deadline: Option<Millis>,
    ) -> Result<Outcome, FinalizeError> {
        let Some(job) = self.store.get(job_id).await? else {
            return Ok(Outcome::Unchanged);
        };
        let span = crate::app::job_span(&job);
        let finalized = async {
            let finalized = self.finalize_job(job, deadline).await;
            match &finalized {
                Ok(outcome) => tracing::info!(?outcome, "finalize done"),
                Err(err) => tracing::warn!(error = %err, "finalize deferred"),
            }
            finalized
        };
        tracing::Instrument::instrument(finalized, span).await
    }

    async fn finalize_job(
        &self,
        job: Job,
        deadline: Option<Millis>,
    ) -> Result<Outcome, FinalizeError> {
        let job_id = job.id.clone();
        let job_id = job_id.as_str();
        if job.is_terminal() {
            // Ended before finalize came (a client's cancel): its report goes now.
            self.drop_report(&job).await;
            return Ok(Outcome::Unchanged);
        }
        // Not handed off (a stale request), or handed off for a run the job no longer tracks.
        let Some(handoff) = job.current_handoff().cloned() else {
            return Ok(Outcome::Unchanged);
        };
        let now = self.clock.now_ms();
        if job.active_lease(now).is_some() {
            return Ok(Outcome::Busy);
        }
        let status = match self.read_report(&handoff.report_key).await {
            Ok(status) => status,
            Err(ReportError::Retry(reason)) => return self.retry_at(job_id, None, reason).await,
            Err(ReportError::Unusable(error)) => {
                tracing::error!(job_id, code = error.code.as_str(), message = %error.message, "the stored report cannot be used");
                let committed = self
                    .writer(Actor::Finalize)
                    .commit(job, |job| {
                        job.ensure_unleased(now)?;
                        job.fail(error.clone(), now)
                    })
                    .await?;
                return Ok(match committed {
                    Committed::Written(failed) => {
                        self.drop_report(&failed).await;
                        Outcome::Finished(JobState::Failed)
                    }
                    _ => Outcome::Unchanged,
                });
            }
        };
        let same_run = SameRun(Some(handoff.run));
        self.complete(
            job,
            status.output,
            (status.delay_time, status.execution_time),
            &same_run,
            deadline,
        )
        .await
    }

    /// After a transient failure: asks finalize to try the job again at `at` (soon, if
    /// unknown). Should even that fail, the caller's message comes back, and the sweeper asks
    /// again when the job comes due.
    async fn retry_at(
        &self,
        job_id: &str,
        at: Option<Millis>,
        reason: String,
    ) -> Result<Outcome, FinalizeError> {
        let now = self.clock.now_ms();
        let delay = at.map_or(RETRY_SOON, |at| {
            Duration::from_millis((at - now).max(0) as u64)
        });
        match self.queue.request_finalize(job_id, delay).await {
            Ok(()) => Ok(Outcome::Retrying(reason)),
            Err(err) => Err(FinalizeError::RetryLater(format!(
                "{reason}; and the retry could not be queued: {err}"
            ))),
        }
    }

    /// The report the hand-off stored, read no further than RunPod's answers may be long.
    async fn read_report(&self, key: &str) -> Result<RunPodStatus, ReportError> {
        let cap = self.settings.max_status_bytes;
        let unusable = |message: String| {
            ReportError::Unusable(JobError::new(ErrorCode::OutputMissing, message))
        };
        let (meta, mut body) = match self.results.open(key).await {
            Ok(opened) => opened,
            Err(err) if err.failure() == Failure::Missing => {
                return Err(unusable("the stored report of the run is gone".into()))
            }
            Err(err) => return Err(ReportError::Retry(format!("reading the report: {err}"))),
        };
        if meta.size > cap {
            return Err(ReportError::Unusable(too_large("the run's report", cap)));
        }
        let mut bytes = Vec::with_capacity(meta.size as usize);
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|err| ReportError::Retry(format!("reading the report: {err}")))?;
            if (bytes.len() + chunk.len()) as u64 > cap {
                return Err(ReportError::Unusable(too_large("the run's report", cap)));
            }
            bytes.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&bytes)
            .map_err(|err| unusable(format!("the stored report is not readable: {err}")))
    }

    /// A completed run: take the finalize lease, collect the outputs, then write the one
    /// result that follows (succeeded, failed, or the lease released for a retry), and clean
    /// up whatever this call wrote that no result refers to.
    async fn complete(
        &self,
        job: Job,
        output: Option<serde_json::Value>,
        (delay, execution): (Option<u64>, Option<u64>),
        same_run: &SameRun,
        deadline: Option<Millis>,
    ) -> Result<Outcome, FinalizeError> {
        let by = Actor::Finalize;
        let now = self.clock.now_ms();
        let mut lease_ms = self.settings.finalize_lease.as_millis() as Millis;
        if let Some(deadline) = deadline {
            lease_ms = lease_ms.min((deadline - now).max(0) + LEASE_MARGIN_MS);
        }
        // Only the holder of the finalize lease copies outputs; everyone else backs off.
        let leased = match self
            .writer(by)
            .commit(job, |job| {
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
        let collected = self
            .collect(&leased, output.as_ref(), deadline, &mut written)
            .await;
        let now = self.clock.now_ms();
        let store = self.store.as_ref();
        let (committed, outcome) = match collected {
            Ok(outputs) => {
                let committed = commit_leased(store, self.callbacks.as_ref(), &leased, by, |job| {
                    job.record_runpod_times(delay, execution);
                    job.succeed(outputs.clone(), now)
                })
                .await?;
                (committed, Ok(Outcome::Finished(JobState::Succeeded)))
            }
            Err(Collect::Fail(error)) => {
                tracing::warn!(job_id = %leased.id, code = error.code.as_str(), message = %error.message, "job failed while finalizing");
                let committed = commit_leased(store, self.callbacks.as_ref(), &leased, by, |job| {
                    job.record_runpod_times(delay, execution);
                    job.fail(error.clone(), now)
                })
                .await?;
                (committed, Ok(Outcome::Finished(JobState::Failed)))
            }
            Err(Collect::Retry(reason)) => {
                tracing::warn!(job_id = %leased.id, error = %reason, "output copy failed; releasing the lease");
                let base = RETRY_SOON.min(self.settings.poll_interval);
                // Several tries fit in the time finalize is given, however short.
                let max_wait = MAX_RETRY_WAIT.min(self.settings.finalize_give_up / 8);
                let released = commit_leased(store, self.callbacks.as_ref(), &leased, by, |job| {
                    job.note_check_failure();
                    let wait =
                        check_backoff(base, job.check_failures, max_wait, rand::random::<f64>());
                    job.release_lease(now, now + wait.as_millis() as Millis);
                    Ok(())
                })
                .await;
                match released {
                    Ok(committed) => {
                        let retry_at = match &committed {
                            Committed::Written(job) => job.next_check_at,
                            _ => None,
                        };
                        (committed, self.retry_at(&leased.id, retry_at, reason).await)
                    }
                    // The lease simply runs out; the sweeper asks finalize again then.
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
                if settled.is_terminal() {
                    self.drop_report(&settled).await;
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

    /// The stored report of an ended job is of no more use: removed at once, since it holds
    /// the customer's outputs (inline images) in full. Best effort: the job's clean-up removes
    /// it otherwise.
    async fn drop_report(&self, job: &Job) {
        let Some(handoff) = &job.handoff else {
            return;
        };
        if let Err(err) = self.results.delete(&handoff.report_key).await {
            tracing::info!(job_id = %job.id, error = %err, "the report stays until the clean-up");
        }
    }

    /// Collects the outputs as the job's output contract says, into the results bucket,
    /// adding each key to `written` before writing it.
    async fn collect(
        &self,
        job: &Job,
        output: Option<&serde_json::Value>,
        deadline: Option<Millis>,
        written: &mut Vec<String>,
    ) -> Result<Vec<OutputFile>, Collect> {
        match self.contract_of(job, output) {
            OutputContract::VolumeFiles => {
                self.copy_volume_files(job, output, deadline, written).await
            }
            OutputContract::WorkerComfyui => self.store_inline_images(job, output, written).await,
            OutputContract::ComfyView => self.store_viewed_files(job, output, written).await,
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
            Ok(fresh) => {
                self.remove(leased, written).await;
                if let Some(ended) = fresh.filter(|job| job.is_terminal()) {
                    self.drop_report(&ended).await;
                }
            }
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
        let workflow = self.catalog.get(&job.workflow);
        let backend = self.backends.of(job).ok();
        if let Some(contract) = backend.and_then(|b| b.output_contract(workflow)) {
            return contract;
        }
        match workflow {
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
        deadline: Option<Millis>,
        written: &mut Vec<String>,
    ) -> Result<Vec<OutputFile>, Collect> {
        let files = volume_output_keys(output, &self.layout, &job.id).map_err(Collect::Fail)?;
        let sizes = self.check_volume_sizes(&files).await?;
        let attempt = attempt_of(job);
        let mut outputs: Vec<OutputFile> = Vec::with_capacity(files.len());
        for (file, size) in files.iter().zip(sizes) {
            self.ensure_time_for(size, deadline)?;
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

    /// Refuses to begin a copy of `size` bytes that the invocation may not live to finish: the
    /// attempt then gives the job back cleanly for the next one, instead of dying mid-copy
    /// with the lease held.
    fn ensure_time_for(&self, size: u64, deadline: Option<Millis>) -> Result<(), Collect> {
        let Some(deadline) = deadline else {
            return Ok(());
        };
        let needed = FINAL_WRITE_RESERVE_MS + (size * 1000 / SLOWEST_COPY_RATE) as Millis;
        let left = deadline - self.clock.now_ms();
        if left < needed {
            return Err(Collect::Retry(format!(
                "{left} ms left in this invocation, {needed} ms needed for the next file"
            )));
        }
        Ok(())
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
                ImageSource::Inline(image) => Source::Inline(image),
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
        self.store_sources(job, sources, written).await
    }

    /// `comfy_view`: the files the server's history lists for the prompt, each in the job's
    /// own output folder, fetched through the backend (`/view`), streamed into the results
    /// bucket with the size caps. Every file is opened before anything is written.
    async fn store_viewed_files(
        &self,
        job: &Job,
        output: Option<&serde_json::Value>,
        written: &mut Vec<String>,
    ) -> Result<Vec<OutputFile>, Collect> {
        let files = comfy_files(output, &job.id, MAX_OUTPUT_FILES).map_err(Collect::Fail)?;
        let backend = self
            .backends
            .of(job)
            .map_err(|err| Collect::Retry(err.to_string()))?;
        let cap = self.settings.max_output_image_bytes;
        let mut sources = Vec::with_capacity(files.len());
        for file in &files {
            let fetched = backend
                .open_output(file)
                .await
                .map_err(|err| match err.failure() {
                    Failure::Missing => Collect::Fail(JobError::new(
                        ErrorCode::OutputMissing,
                        format!("the server no longer has {}: {err}", file.filename),
                    )),
                    _ => Collect::Retry(format!("fetching {}: {err}", file.filename)),
                })?;
            if fetched.size.is_some_and(|size| size > cap) {
                return Err(Collect::Fail(too_large(&file.filename, cap)));
            }
            let taken: Vec<&str> = sources
                .iter()
                .map(|(n, _): &(String, Source)| n.as_str())
                .collect();
            let name = unique_name(&safe_file_name(&file.filename, sources.len()), &taken);
            sources.push((name, Source::Download(fetched)));
        }
        self.store_sources(job, sources, written).await
    }

    /// Stores opened outputs under the job's result keys, within the job's byte cap; what was
    /// written is in `written`.
    async fn store_sources(
        &self,
        job: &Job,
        sources: Vec<(String, Source<'_>)>,
        written: &mut Vec<String>,
    ) -> Result<Vec<OutputFile>, Collect> {
        let cap = self.settings.max_output_image_bytes;
        // All of the job's images together, as far as known before any write.
        let job_cap = self.settings.max_output_job_bytes;
        let known: u64 = sources
            .iter()
            .map(|(_, source)| match source {
                Source::Inline(image) => image.size,
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
                Source::Inline(image) => {
                    let bytes = image.decode().map_err(Collect::Fail)?;
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
enum Source<'a> {
    Inline(Base64Image<'a>),
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

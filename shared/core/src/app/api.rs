//! The public API's use case: submitting, reading, listing, cancelling and deleting jobs, and
//! handing out upload URLs. Every check is made here, before anything is written, so a refused request
//! leaves no trace. The routes, identity and JSON shapes are the HTTP crate's
//! (`gateway_http::api`); it maps each [`Refusal`] to a status.
use crate::app::inputs::InputRefusal;
use crate::domain::callback::{CallbackEvent, EVENT_NAMES};
use crate::domain::job::{BackendKind, JobState, Millis, Priority};
use crate::domain::usage::{days_between, DailyUsage};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::app::{Committed, Writer};
use crate::config::Settings;
use crate::domain::job::{
    Actor, DeletionReason, ErrorCode, InputRef, Job, JobError, JobTiming, NewJob, OutputFile,
    TransitionError,
};
use crate::domain::keys;
use crate::domain::workflow::WorkflowCatalog;
use crate::ports::{
    CallbackQueue, Classified, Clock, CreateOutcome, Failure, ImageKind, ImageProbe, JobPage,
    JobQueue, JobStore, ObjectError, ObjectStore, PresignedPost, Resolver, StopQueue, StopReason,
    StopRun, StoreError, JPEG,
};

/// Longest `Idempotency-Key` accepted; it becomes part of a DynamoDB key.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;
pub use crate::app::inputs::{INPUT_KINDS, MAX_PIXELS};
/// What `GET /jobs` returns when the client names no limit, and the most it may name.
pub const DEFAULT_PAGE: u32 = 20;
pub const MAX_PAGE: u32 = 100;
/// How many times a cancel goes round (stop the run, record the cancel) when dispatch keeps
/// giving the job a new run meanwhile.
const CANCEL_ROUNDS: usize = 3;
/// How much of an uploaded image is read to check its format and dimensions: headers (EXIF
/// included) come first.
pub(crate) const PROBE_BYTES: u64 = 256 * 1024;

pub struct Api {
    pub store: Arc<dyn JobStore>,
    /// Where the callbacks the job's client asked for are requested.
    pub callbacks: Arc<dyn CallbackQueue>,
    pub queue: Arc<dyn JobQueue>,
    pub uploads: Arc<dyn ObjectStore>,
    pub results: Arc<dyn ObjectStore>,
    /// Runs to stop at RunPod: the API holds no RunPod key, and the stopper keeps to RunPod's pace.
    pub stops: Arc<dyn StopQueue>,
    pub images: Arc<dyn ImageProbe>,
    /// Resolves the host of an input URL, to refuse one that leads inside before it is stored.
    pub resolver: Arc<dyn Resolver>,
    pub catalog: Arc<WorkflowCatalog>,
    /// Batches, and the slots that hold their jobs back.
    pub batches: Arc<dyn crate::ports::BatchStore>,
    pub turns: Arc<crate::app::holds::Turns>,
    /// Owners' limits: the submit rate is spent here, the in-flight limit held at dispatch.
    pub tenants: Arc<crate::app::tenants::Tenants>,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
}

/// Why a request was not carried out. `code` is the machine-readable reason clients see.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The request is malformed or names something that does not exist.
    Invalid { code: &'static str, message: String },
    /// The input is over a size limit.
    TooLarge { message: String },
    /// No such job for this caller: another owner's job looks the same as a missing one.
    NotFound,
    /// The job's state does not allow the request.
    Conflict { code: &'static str, message: String },
    /// Well-formed, but contradicts an earlier request (an idempotency key reused for another
    /// request).
    Unprocessable { code: &'static str, message: String },
    /// The job's data was deleted (by its owner, or when its retention ended): the record
    /// stands as a tombstone until its TTL.
    Gone { code: &'static str, message: String },
    /// A store or RunPod could not be reached; the same request may succeed later.
    Unavailable { message: String },
    /// Over the owner's submit rate: the same request may go through after `retry_after_secs`.
    RateLimited { retry_after_secs: u64 },
}

impl Refusal {
    fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            code,
            message: message.into(),
        }
    }

    fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::Conflict {
            code,
            message: message.into(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { code, .. }
            | Self::Conflict { code, .. }
            | Self::Unprocessable { code, .. }
            | Self::Gone { code, .. } => code,
            Self::TooLarge { .. } => "input_too_large",
            Self::NotFound => "not_found",
            Self::Unavailable { .. } => "unavailable",
            Self::RateLimited { .. } => "rate_limited",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Invalid { message, .. }
            | Self::Conflict { message, .. }
            | Self::Unprocessable { message, .. }
            | Self::Gone { message, .. }
            | Self::TooLarge { message }
            | Self::Unavailable { message } => message,
            Self::NotFound => "no such job",
            Self::RateLimited { .. } => "too many submits; try again after Retry-After seconds",
        }
    }
}

impl From<crate::app::tenants::Refused> for Refusal {
    fn from(refused: crate::app::tenants::Refused) -> Self {
        match refused {
            crate::app::tenants::Refused::Rate { wait_ms } => Self::RateLimited {
                // Whole seconds, rounded up: a client retrying on the dot finds a token.
                retry_after_secs: (wait_ms.max(1) as u64).div_ceil(1_000),
            },
            crate::app::tenants::Refused::Store(err) => err.into(),
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(err: StoreError) -> Self {
        tracing::error!(error = %err, "job store error");
        Self::Unavailable {
            message: "the job store is unavailable; try again".into(),
        }
    }
}

impl From<ObjectError> for Refusal {
    fn from(err: ObjectError) -> Self {
        tracing::error!(error = %err, "object store error");
        Self::Unavailable {
            message: "storage is unavailable; try again".into(),
        }
    }
}

/// The body of `POST /jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub workflow: String,
    #[serde(default)]
    pub params: Option<Map<String, Value>>,
    pub input: JobInput,
    /// How long to keep the job's input and outputs, in seconds (`JOB_RETENTION_MIN_SECS` to
    /// `JOB_RETENTION_MAX_DAYS`; `JOB_RETENTION_DAYS` when absent). Past it they are deleted
    /// and the job answers 410.
    #[serde(default)]
    pub retention_secs: Option<u64>,
    /// Where to send the job's signed callbacks (its end always).
    #[serde(default)]
    pub callback_url: Option<String>,
    /// The events beyond the end to send there: `job.running`, `job.progress`.
    #[serde(default)]
    pub callback_events: Option<Vec<String>>,
    /// Where to run it: `serverless` or `pod`, among those the deployment runs and the
    /// workflow supports; the deployment's default otherwise.
    #[serde(default)]
    pub backend: Option<String>,
    /// `normal` (the default) or `low`: a low job does not make RunPod start workers.
    #[serde(default)]
    pub priority: Option<String>,
}

/// Exactly one of the three.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobInput {
    pub image_base64: Option<String>,
    pub upload_id: Option<String>,
    /// An https URL the photo is fetched from at dispatch.
    #[serde(default)]
    pub url: Option<String>,
}

#[derive(Debug)]
pub enum Submitted {
    /// A new job, stored and queued.
    Accepted(Job),
    /// A replay: the owner already submitted this request with this idempotency key. That job,
    /// untouched; nothing was stored for the replay.
    Existing(Job),
}

/// Where and how a client uploads an input too large to send inline.
#[derive(Debug)]
pub struct UploadTicket {
    pub upload_id: String,
    pub request: PresignedPost,
    pub max_bytes: u64,
    pub expires_in: Duration,
}

/// A job as its owner may see it, with a download URL per output once it succeeded.
#[derive(Debug)]
pub struct JobDetail {
    pub job: Job,
    pub outputs: Vec<(OutputFile, String)>,
}

impl Api {
    /// How this use case writes jobs, as `by`.
    fn writer(&self, by: Actor) -> Writer<'_> {
        Writer::new(&*self.store, &*self.callbacks, by)
    }

    /// The backend a job of `workflow` runs on: the one asked for, or the deployment's default
    /// (or, if the workflow does not run there, the first backend of the deployment it does
    /// run on).
    pub(crate) fn backend_for(
        &self,
        workflow: &crate::domain::workflow::Workflow,
        asked: Option<&str>,
    ) -> Result<BackendKind, Refusal> {
        let deployed = &self.settings.backends;
        let supported = workflow.backends();
        let unavailable = |message: String| Refusal::invalid("backend_unavailable", message);
        let Some(asked) = asked else {
            let default = self.settings.default_backend;
            return std::iter::once(default)
                .chain(deployed.iter().copied())
                .find(|kind| supported.contains(kind) && deployed.contains(kind))
                .ok_or_else(|| {
                    unavailable(format!(
                        "workflow {} runs on no backend this deployment has",
                        workflow.name()
                    ))
                });
        };
        let kind = BackendKind::parse(asked).ok_or_else(|| {
            unavailable(format!("unknown backend {asked:?}; known: serverless, pod"))
        })?;
        if !deployed.contains(&kind) {
            return Err(unavailable(format!(
                "this deployment does not run the {asked} backend"
            )));
        }
        if !supported.contains(&kind) {
            return Err(unavailable(format!(
                "workflow {} does not run on the {asked} backend",
                workflow.name()
            )));
        }
        Ok(kind)
    }

    /// Validates `request`, stores its input, creates the job and queues it. `idempotency_key`
    /// is the raw header value, if the client sent one.
    pub async fn submit(
        &self,
        owner: &str,
        request: JobRequest,
        idempotency_key: Option<&[u8]>,
    ) -> Result<Submitted, Refusal> {
        self.submit_traced(owner, request, idempotency_key, None)
            .await
    }

    /// [`Api::submit`] under the request's trace id (from its `X-Amzn-Trace-Id`); a new one
    /// when it has none. The job keeps it for every log line about it.
    pub async fn submit_traced(
        &self,
        owner: &str,
        request: JobRequest,
        idempotency_key: Option<&[u8]>,
        trace_id: Option<String>,
    ) -> Result<Submitted, Refusal> {
        let idempotency_key = idempotency_key.map(parse_idempotency_key).transpose()?;
        let request_digest = idempotency_key.as_ref().map(|_| digest(&request));
        // A replay is answered from the first job before anything is stored for it.
        if let (Some(key), Some(digest)) = (&idempotency_key, &request_digest) {
            let now = self.clock.now_ms();
            if let Some(existing) = self.store.find_by_idempotency_key(owner, key, now).await? {
                return replay(existing, digest);
            }
        }
        // Everything is validated before anything is written: a bad job leaves no trace.
        let workflow = self.catalog.get(&request.workflow).ok_or_else(|| {
            Refusal::invalid(
                "unknown_workflow",
                format!(
                    "unknown workflow {:?}; available: {}",
                    request.workflow,
                    self.catalog.names().join(", ")
                ),
            )
        })?;
        let params = workflow
            .validate(&request.params.unwrap_or_default(), &mut rand::rng())
            .map_err(|e| Refusal::invalid("invalid_params", e.to_string()))?;
        let retention = self.retention(request.retention_secs)?;
        let backend = self.backend_for(workflow, request.backend.as_deref())?;
        let priority = priority_of(request.priority.as_deref())?;
        let (callback_url, callback_events) = self
            .callback(
                request.callback_url.as_deref(),
                request.callback_events.as_deref(),
            )
            .await?;

        let job_id = crate::domain::job::mint_job_id(self.clock.now_ms());
        let input = match (
            request.input.image_base64,
            request.input.upload_id,
            request.input.url,
        ) {
            (Some(encoded), None, None) => {
                self.store_inline_image(owner, &job_id, &encoded).await?
            }
            (None, Some(upload_id), None) => {
                self.uploaded_image(owner, &job_id, &upload_id).await?
            }
            (None, None, Some(url)) => self.url_input(owner, &job_id, &url).await?,
            _ => {
                return Err(Refusal::invalid(
                    "invalid_input",
                    "input needs exactly one of image_base64, upload_id or url",
                ))
            }
        };

        let mut job = Job::new(
            NewJob {
                id: job_id,
                owner: owner.to_string(),
                workflow: workflow.name().to_string(),
                workflow_version: workflow.version().to_string(),
                params,
                input,
                idempotency_key,
                request_digest: request_digest.clone(),
                callback_url,
                callback_events,
                backend,
                priority,
            },
            timing(&self.settings, retention),
            self.clock.now_ms(),
        );
        // Priced at acceptance: a later change of price does not reprice jobs already taken.
        job.gpu_price_nano_usd = self.settings.gpu_price_nano_usd;
        // The token is spent last, so that a request refused for what it is costs none and
        // writes nothing (a replay, answered above, costs none either); a refused one leaves
        // no input behind.
        let limits = match self.tenants.admit(owner).await {
            Ok(limits) => limits,
            Err(refused) => {
                self.remove_input(&job).await;
                return Err(refused.into());
            }
        };
        job.holds.extend(limits.hold(owner));
        job.trace_id = Some(
            trace_id.unwrap_or_else(|| crate::domain::job::new_trace(job.timestamps.created_at)),
        );
        match self.store.create(&job).await {
            Ok(CreateOutcome::Created) => {}
            // Another request with the key got there between the lookup and the create: what
            // this one stored belongs to no job.
            Ok(CreateOutcome::Existing(existing)) => {
                self.remove_input(&job).await;
                return replay(*existing, request_digest.as_deref().unwrap_or_default());
            }
            // The write may have committed with its answer lost (the client's retry with its
            // Idempotency-Key then finds the job): its input must stay. An input whose job
            // truly was not created expires with the uploads bucket's lifecycle rule.
            Err(err) if err.failure() == Failure::Transient => return Err(err.into()),
            Err(err) => {
                self.remove_input(&job).await;
                return Err(err.into());
            }
        }
        // If this send fails the job is still safe: the sweeper re-enqueues queued jobs.
        if let Err(err) = self.queue.enqueue(&job.id, Some(&job.trace())).await {
            tracing::warn!(job_id = %job.id, trace_id = %job.trace(), error = %err, "enqueue failed; the sweeper will retry");
        }
        tracing::info!(job_id = %job.id, trace_id = %job.trace(), owner = %job.owner, workflow = %job.workflow, "job accepted");
        crate::metrics::job_accepted();
        Ok(Submitted::Accepted(job))
    }

    async fn store_inline_image(
        &self,
        owner: &str,
        job_id: &str,
        encoded: &str,
    ) -> Result<InputRef, Refusal> {
        let (bytes, kind) = self.decode_inline(encoded)?;
        self.put_inline(owner, job_id, bytes, kind).await
    }

    /// Stores an inline image already decoded and checked as the job's input.
    pub(crate) async fn put_inline(
        &self,
        owner: &str,
        job_id: &str,
        bytes: Vec<u8>,
        kind: ImageKind,
    ) -> Result<InputRef, Refusal> {
        let key = keys::inline_input(owner, job_id, kind.extension);
        let size = bytes.len() as u64;
        self.uploads
            .put_bytes(&key, bytes.into(), kind.content_type)
            .await?;
        Ok(input_ref(key, kind, size))
    }

    /// An inline image, decoded and checked (size, format, dimensions); nothing is stored.
    pub(crate) fn decode_inline(&self, encoded: &str) -> Result<(Vec<u8>, ImageKind), Refusal> {
        let limit = self.settings.max_inline_bytes;
        let too_large = || Refusal::TooLarge {
            message: format!(
                "inline images are limited to {limit} bytes; use POST /uploads for larger ones"
            ),
        };
        // Reject on the encoded length before spending memory on decoding.
        let encoded = encoded.trim();
        let encoded = encoded
            .split_once(";base64,")
            .map(|(_, data)| data)
            .unwrap_or(encoded);
        if encoded.len() > limit.div_ceil(3) * 4 + 4 {
            return Err(too_large());
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| {
                Refusal::invalid("invalid_input_image", "image_base64 is not valid base64")
            })?;
        if bytes.len() > limit {
            return Err(too_large());
        }
        let kind = self.check_image(&bytes)?;
        Ok((bytes, kind))
    }

    /// The format, and that the header decodes to sane dimensions (inline images are held whole).
    pub(crate) fn check_image(&self, bytes: &[u8]) -> Result<ImageKind, Refusal> {
        crate::app::inputs::check_image(self.images.as_ref(), bytes).map_err(
            |refusal| match refusal {
                InputRefusal::NotAnImage => not_an_image(),
                too_many @ InputRefusal::TooManyPixels { .. } => {
                    Refusal::invalid("input_too_large", too_many.to_string())
                }
            },
        )
    }

    /// An input given by URL: checked now against the egress rules (an https URL whose host
    /// resolves only to public addresses), fetched and checked as an image at dispatch, when
    /// the rules are applied again to the address then connected to.
    pub(crate) async fn url_input(
        &self,
        owner: &str,
        job_id: &str,
        url: &str,
    ) -> Result<InputRef, Refusal> {
        let (parsed, _) =
            crate::app::inputs::checked_url(self.settings.egress, self.resolver.as_ref(), url)
                .await
                .map_err(|message| Refusal::invalid("input_url_refused", message))?;
        Ok(InputRef {
            key: keys::pinned_upload(owner, job_id),
            content_type: String::new(),
            size: 0,
            extension: String::new(),
            source_url: Some(parsed.to_string()),
        })
    }

    /// The job's callback, checked: a URL the egress rules allow, now (it is checked again at
    /// each attempt), and the events it asks for, each named once.
    pub(crate) async fn callback(
        &self,
        url: Option<&str>,
        events: Option<&[String]>,
    ) -> Result<(Option<String>, Vec<String>), Refusal> {
        let events = events.unwrap_or_default();
        let Some(url) = url else {
            if events.is_empty() {
                return Ok((None, Vec::new()));
            }
            return Err(Refusal::invalid(
                "invalid_callback",
                "callback_events needs a callback_url",
            ));
        };
        let (url, _) =
            crate::app::inputs::checked_url(self.settings.egress, self.resolver.as_ref(), url)
                .await
                .map_err(|message| Refusal::invalid("callback_url_refused", message))?;
        if events.len() > EVENT_NAMES.len() {
            return Err(Refusal::invalid(
                "invalid_callback",
                format!("at most {} callback events", EVENT_NAMES.len()),
            ));
        }
        let mut names = Vec::new();
        for name in events {
            if CallbackEvent::parse(name).is_none() {
                return Err(Refusal::invalid(
                    "invalid_callback",
                    format!(
                        "unknown callback event {name:?}; known: {}",
                        EVENT_NAMES.join(", ")
                    ),
                ));
            }
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        Ok((Some(url.to_string()), names))
    }

    /// Removes the input stored for a job that was not created (always the job's own copy,
    /// inline or pinned: never the client's upload). Best effort.
    pub(crate) async fn remove_input(&self, job: &Job) {
        if let Err(err) = self.uploads.delete(&job.input.key).await {
            tracing::warn!(key = %job.input.key, error = %err, "could not remove the input of a job not created");
        }
    }

    /// Pins a client's upload as the job's input: copies it to the job's own key, where no
    /// presigned URL reaches, then checks the copy (size, format, dimensions), so what the GPU
    /// receives is what was checked, whatever is PUT to the upload URL later. A refused copy
    /// is removed.
    pub(crate) async fn uploaded_image(
        &self,
        owner: &str,
        job_id: &str,
        upload_id: &str,
    ) -> Result<InputRef, Refusal> {
        let unknown = || Refusal::invalid("unknown_upload", "no completed upload with that id");
        // Upload ids are ours (UUIDs); anything else cannot name an upload and must not reach a key.
        let upload_id = uuid::Uuid::parse_str(upload_id)
            .map_err(|_| unknown())?
            .to_string();
        let source = keys::upload(owner, &upload_id);
        let limit = self.settings.max_upload_bytes;
        let too_large = || Refusal::TooLarge {
            message: format!("uploads are limited to {limit} bytes"),
        };
        let meta = self.uploads.head(&source).await?.ok_or_else(unknown)?;
        if meta.size > limit {
            return Err(too_large());
        }
        let pinned = keys::pinned_upload(owner, job_id);
        let copied = match crate::app::transfer::copy(
            self.uploads.as_ref(),
            &source,
            self.uploads.as_ref(),
            &pinned,
            None,
        )
        .await
        {
            Ok(copied) => copied,
            Err(ObjectError::NotFound(_)) => return Err(unknown()),
            Err(err) => {
                let _ = self.uploads.delete(&pinned).await;
                return Err(err.into());
            }
        };
        let checked = async {
            // Checked again on the copy: the upload may have changed since the HEAD.
            if copied.size > limit {
                return Err(too_large());
            }
            let head = self.uploads.read_prefix(&pinned, PROBE_BYTES).await?;
            self.check_image(&head)
        }
        .await;
        match checked {
            Ok(kind) => Ok(input_ref(pinned, kind, copied.size)),
            Err(refusal) => {
                if let Err(err) = self.uploads.delete(&pinned).await {
                    tracing::warn!(key = %pinned, error = %err, "could not remove a refused upload's copy");
                }
                Err(refusal)
            }
        }
    }

    /// A presigned POST for an input too large for a request body, limited to
    /// `max_upload_bytes` by the uploads bucket itself; JPEG unless the client names another
    /// accepted type.
    pub async fn create_upload(
        &self,
        owner: &str,
        content_type: Option<&str>,
    ) -> Result<UploadTicket, Refusal> {
        let content_type = content_type.unwrap_or(JPEG.content_type);
        if !INPUT_KINDS.iter().any(|k| k.content_type == content_type) {
            return Err(Refusal::invalid(
                "unsupported_content_type",
                "content_type must be image/jpeg, image/png or image/webp",
            ));
        }
        let upload_id = uuid::Uuid::now_v7().to_string();
        let request = self
            .uploads
            .presign_post(
                &keys::upload(owner, &upload_id),
                content_type,
                self.settings.max_upload_bytes,
                self.settings.presign_ttl,
            )
            .await?;
        Ok(UploadTicket {
            upload_id,
            request,
            max_bytes: self.settings.max_upload_bytes,
            expires_in: self.settings.presign_ttl,
        })
    }

    /// The client's retention, if it named one, within the configured bounds.
    pub(crate) fn retention(&self, asked: Option<u64>) -> Result<Option<Duration>, Refusal> {
        let Some(secs) = asked else {
            return Ok(None);
        };
        let (min, max) = (self.settings.retention_min, self.settings.retention_max);
        let asked = Duration::from_secs(secs);
        if !(min..=max).contains(&asked) {
            return Err(Refusal::invalid(
                "invalid_retention",
                format!(
                    "retention_secs must be between {} and {}",
                    min.as_secs(),
                    max.as_secs()
                ),
            ));
        }
        Ok(Some(asked))
    }

    /// The owner's job, with download URLs for its outputs once it succeeded. No URL outlives
    /// the job's retention.
    pub async fn job(&self, owner: &str, id: &str) -> Result<JobDetail, Refusal> {
        let job = self.live_job(owner, id).await?;
        let outputs = output_links(
            self.results.as_ref(),
            &self.settings,
            &job,
            self.clock.now_ms(),
        )
        .await?;
        Ok(JobDetail { job, outputs })
    }

    /// Deletes the owner's job and everything it left: a job in flight is cancelled first
    /// (its run stopped), then the job becomes a tombstone that names no output, its outputs
    /// and input are removed from the buckets at once (no URL handed out works any more), and
    /// the sweeper purges the rest right away: every copy in its results folder, its folders
    /// on the RunPod volume, its idempotency record. Deleting it again changes nothing.
    pub async fn delete(&self, owner: &str, id: &str) -> Result<Job, Refusal> {
        let job = self.owned_job(owner, id).await?;
        if job.deletion.is_some() {
            return Ok(job);
        }
        let job = if job.is_terminal() {
            job
        } else {
            match self.cancel(owner, id).await {
                Ok(cancelled) => cancelled,
                // Ended meanwhile on its own: delete it as it ended.
                Err(Refusal::Conflict {
                    code: "already_finished",
                    ..
                }) => self.owned_job(owner, id).await?,
                Err(other) => return Err(other),
            }
        };
        let outputs: Vec<String> = job.outputs.iter().map(|o| o.key.clone()).collect();
        let now = self.clock.now_ms();
        let deleted = match self
            .writer(Actor::Client)
            .commit(job, |job| job.delete(now))
            .await?
        {
            Committed::Written(job) => job,
            Committed::Refused(job, _) if job.deletion.is_some() => return Ok(job),
            Committed::Refused(..) => {
                return Err(Refusal::conflict(
                    "busy",
                    "the job is changing state; try again",
                ))
            }
            Committed::Missing => return Err(Refusal::NotFound),
        };
        // Best effort: whatever is left, the sweeper's purge removes.
        for key in &outputs {
            if let Err(err) = self.results.delete(key).await {
                tracing::warn!(job_id = %deleted.id, key, error = %err, "an output stays for the purge");
            }
        }
        if let Err(err) = self.uploads.delete(&deleted.input.key).await {
            tracing::warn!(job_id = %deleted.id, error = %err, "the input stays for the purge");
        }
        tracing::info!(job_id = %deleted.id, outputs = outputs.len(), "job deleted by its owner");
        Ok(deleted)
    }

    /// The owner's jobs, newest first, `limit` (default [`DEFAULT_PAGE`]) at a time.
    /// The owner's usage for each day from `from` to `to` (UTC, `YYYY-MM-DD`, both included):
    /// every day of the range, those without ended jobs at zero. Read from the counters the
    /// terminal writes keep, a handful of reads whatever the number of jobs.
    pub async fn usage(
        &self,
        owner: &str,
        from: &str,
        to: &str,
    ) -> Result<Vec<DailyUsage>, Refusal> {
        let days =
            days_between(from, to).map_err(|e| Refusal::invalid("invalid_range", e.to_string()))?;
        let mut found = self.store.usage(owner, &days).await?.into_iter().peekable();
        Ok(days
            .iter()
            .map(|day| match found.next_if(|usage| usage.day == *day) {
                Some(usage) => usage,
                None => DailyUsage::new(day),
            })
            .collect())
    }

    /// The owner's jobs, newest first; with `status` (a public status name), only those in it.
    pub async fn list(
        &self,
        owner: &str,
        status: Option<&str>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<JobPage, Refusal> {
        let status = status
            .map(|name| {
                JobState::parse(name).ok_or_else(|| {
                    Refusal::invalid(
                        "invalid_status",
                        "status must be one of queued, submitted, running, succeeded, failed, cancelled, timed_out",
                    )
                })
            })
            .transpose()?;
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(Refusal::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {MAX_PAGE}"),
            ));
        }
        let mut page = self
            .store
            .list_by_owner(owner, status, limit, cursor)
            .await
            .map_err(|err| match err {
                StoreError::Corrupt(_) => {
                    Refusal::invalid("invalid_cursor", "the cursor is not valid")
                }
                other => other.into(),
            })?;
        // Deleted and expired jobs are not listed (a page may come back shorter than `limit`;
        // the cursor still goes on from where the store stopped).
        let now = self.clock.now_ms();
        page.jobs.retain(|job| job.gone(now).is_none());
        Ok(page)
    }

    /// Cancels the owner's job at any non-terminal stage. A job RunPod has is only called
    /// cancelled once its run's stop is queued (the stopper carries it out, retrying while
    /// RunPod cannot be reached), including a run dispatch recorded while this cancel was
    /// under way.
    pub async fn cancel(&self, owner: &str, id: &str) -> Result<Job, Refusal> {
        let mut job = self.live_job(owner, id).await?;
        // The run whose stop has been queued, if any.
        let mut stopped: Option<String> = None;
        for _ in 0..CANCEL_ROUNDS {
            if job.is_terminal() {
                return Err(already_finished(&job));
            }
            if let Some(run) = job
                .runpod_job_id
                .clone()
                .filter(|run| stopped.as_ref() != Some(run))
            {
                let stop = StopRun::new(&job, &run, StopReason::ClientCancel);
                if let Err(err) = self.stops.request_stop(&stop).await {
                    tracing::warn!(job_id = %job.id, error = %err, "could not queue the run's stop");
                    return Err(Refusal::Unavailable {
                        message: "the cancel could not be recorded; try again".into(),
                    });
                }
                stopped = Some(run);
            }
            let now = self.clock.now_ms();
            let error = JobError::new(ErrorCode::CancelledByClient, "cancelled by the client");
            let committed = self
                .writer(Actor::Client)
                .commit(job, |job| {
                    // RunPod got a run since it was told to stop: stop that one first.
                    if job.runpod_job_id.is_some() && job.runpod_job_id != stopped {
                        return Err(TransitionError::Stale);
                    }
                    job.cancel(error.clone(), now)
                })
                .await?;
            match committed {
                Committed::Written(job) => return Ok(job),
                Committed::Refused(fresh, TransitionError::Stale) => job = fresh,
                Committed::Refused(job, _) if job.is_terminal() => {
                    return Err(already_finished(&job))
                }
                Committed::Refused(..) => break,
                Committed::Missing => return Err(Refusal::NotFound),
            }
        }
        Err(Refusal::conflict(
            "busy",
            "the job is changing state; try again",
        ))
    }

    /// The owner's job, unless its data is gone (deleted, or past its retention): then 410.
    pub async fn live_job(&self, owner: &str, id: &str) -> Result<Job, Refusal> {
        let job = self.owned_job(owner, id).await?;
        match job.gone(self.clock.now_ms()) {
            None => Ok(job),
            Some(DeletionReason::Client) => Err(Refusal::Gone {
                code: "job_deleted",
                message: "the job was deleted by its owner".into(),
            }),
            Some(DeletionReason::Expired) => Err(Refusal::Gone {
                code: "job_expired",
                message: "the job's retention has ended; its data is deleted".into(),
            }),
        }
    }

    /// Loads a job for its owner; anyone else's job is indistinguishable from a missing one.
    pub(crate) async fn owned_job(&self, owner: &str, id: &str) -> Result<Job, Refusal> {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(Refusal::NotFound);
        }
        match self.store.get(id).await? {
            Some(job) if job.owner == owner => Ok(job),
            _ => Err(Refusal::NotFound),
        }
    }
}

/// The first job for a replayed idempotency key, if the replay is the same request.
fn replay(existing: Job, digest: &str) -> Result<Submitted, Refusal> {
    match &existing.request_digest {
        // Jobs from before digests were kept cannot be compared: the key alone decides.
        Some(first) if first != digest => Err(Refusal::Unprocessable {
            code: "idempotency_key_reused",
            message: "this Idempotency-Key was used for a different request".into(),
        }),
        _ => Ok(Submitted::Existing(existing)),
    }
}

/// A digest of what a job request asks for: the same workflow, parameters and input give the
/// same digest whatever the JSON's key order or spacing. An inline image counts by its bytes'
/// text, an upload by its id.
fn digest(request: &JobRequest) -> String {
    use sha2::{Digest, Sha256};
    let input = match (
        &request.input.image_base64,
        &request.input.upload_id,
        &request.input.url,
    ) {
        (Some(image), _, _) => format!("inline:{}", hex::encode(Sha256::digest(image.trim()))),
        (None, Some(upload), _) => format!("upload:{upload}"),
        (None, None, Some(url)) => format!("url:{url}"),
        (None, None, None) => String::new(),
    };
    let params = request
        .params
        .as_ref()
        .map(|p| canonical(&Value::Object(p.clone())))
        .unwrap_or_default();
    let mut text = format!("{}\n{params}\n{input}", request.workflow);
    // Only when asked for, so that the digests of requests without one stay as they were.
    if let Some(backend) = &request.backend {
        text.push_str(&format!("\nbackend:{backend}"));
    }
    if let Some(priority) = &request.priority {
        text.push_str(&format!("\npriority:{priority}"));
    }
    // Only with a callback, so that the digests of requests without one stay as they were.
    if let Some(url) = &request.callback_url {
        let events = request
            .callback_events
            .clone()
            .unwrap_or_default()
            .join(",");
        text.push_str(&format!("\ncallback:{url}\n{events}"));
    }
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A download link for each output of a succeeded job (none otherwise), valid for
/// `PRESIGN_TTL_SECS` and never past the job's retention.
pub(crate) async fn output_links(
    results: &dyn ObjectStore,
    settings: &Settings,
    job: &Job,
    now: Millis,
) -> Result<Vec<(OutputFile, String)>, ObjectError> {
    let mut outputs = Vec::new();
    if job.state != JobState::Succeeded {
        return Ok(outputs);
    }
    let left = job.retained_until() - now;
    let ttl = settings
        .presign_ttl
        .min(Duration::from_millis(left.max(1_000) as u64));
    for output in &job.outputs {
        let url = results
            .presign_get(&output.key, ttl, Some(&output.file_name))
            .await?;
        outputs.push((output.clone(), url.url));
    }
    Ok(outputs)
}

/// JSON text with every object's keys sorted.
fn canonical(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical(v)))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", inner.join(","))
        }
        other => other.to_string(),
    }
}

/// 1-128 visible characters, trimmed; no `#`, which separates the parts of its DynamoDB key.
fn parse_idempotency_key(raw: &[u8]) -> Result<String, Refusal> {
    std::str::from_utf8(raw)
        .ok()
        .map(str::trim)
        .filter(|k| {
            !k.is_empty()
                && k.len() <= MAX_IDEMPOTENCY_KEY
                && !k.contains('#')
                && k.chars()
                    .all(|c| c.is_ascii_graphic() || c == ' ' || c == '\t')
        })
        .map(str::to_string)
        .ok_or_else(|| {
            Refusal::invalid(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1-128 visible characters without '#'",
            )
        })
}

/// The timing policy of a new job under `settings`, kept `retention` (the default when the
/// client names none).
pub fn timing(settings: &Settings, retention: Option<Duration>) -> JobTiming {
    JobTiming {
        deadline_ms: settings.job_deadline.as_millis() as i64,
        first_check_ms: settings.requeue_after.as_millis() as i64,
        retention_secs: retention.unwrap_or(settings.record_retention).as_secs() as i64,
        tombstone_secs: settings.tombstone.as_secs() as i64,
        idempotency_window_secs: settings.idempotency_window.as_secs() as i64,
        cleanup_delay_ms: settings.finalize_lease.as_millis() as i64,
    }
}

/// The priority a request asks for: `normal` when it does not say.
pub(crate) fn priority_of(asked: Option<&str>) -> Result<Priority, Refusal> {
    match asked {
        None => Ok(Priority::Normal),
        Some(name) => Priority::parse(name).ok_or_else(|| {
            Refusal::invalid(
                "invalid_priority",
                format!("unknown priority {name:?}; known: normal, low"),
            )
        }),
    }
}

pub(crate) fn input_ref(key: String, kind: ImageKind, size: u64) -> InputRef {
    InputRef {
        key,
        content_type: kind.content_type.to_string(),
        size,
        extension: kind.extension.to_string(),
        source_url: None,
    }
}

fn not_an_image() -> Refusal {
    Refusal::invalid(
        "invalid_input_image",
        "the input is not a JPEG, PNG or WebP image",
    )
}

fn already_finished(job: &Job) -> Refusal {
    Refusal::conflict(
        "already_finished",
        format!("the job is already {}", job.state),
    )
}

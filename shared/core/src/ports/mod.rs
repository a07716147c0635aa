//! What the application needs from the outside world, as narrow traits. Adapters implement them
//! against DynamoDB, SQS, S3 and RunPod; tests of the domain may use in-memory versions.
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::domain::job::{BackendKind, Job, JobError, JobState, Millis};
use crate::domain::usage::DailyUsage;

// ---------------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------------

/// The one split every port error maps into, so each use case decides on it the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// May pass: throttling, 5xx, timeouts, broken connections, a lost version race.
    Transient,
    /// What was asked for does not exist (an object, a RunPod job).
    Missing,
    /// Refused, and the same call would be refused again.
    Permanent,
    /// The call may have taken effect: its answer was lost (a `/run` that timed out, answered
    /// 500/502/504, or answered 200 with no readable id).
    Unknown,
}

/// A port error's [`Failure`] class.
pub trait Classified: std::error::Error {
    fn failure(&self) -> Failure;
}

// ---------------------------------------------------------------------------------------------
// Job store
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stored version is not the one the write was based on: somebody else changed the job.
    #[error("the job changed since it was read")]
    Conflict,
    #[error("job store unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt job record: {0}")]
    Corrupt(String),
}

impl Classified for StoreError {
    fn failure(&self) -> Failure {
        match self {
            Self::Conflict | Self::Unavailable(_) => Failure::Transient,
            Self::Corrupt(_) => Failure::Permanent,
        }
    }
}

pub enum CreateOutcome {
    Created,
    /// The owner already used this idempotency key; here is that job instead.
    Existing(Box<Job>),
}

#[derive(Debug)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Opaque; hand back to get the next page.
    pub cursor: Option<String>,
}

/// Jobs due for a sweeper look, and what finding them cost.
#[derive(Debug, Default)]
pub struct DueJobs {
    pub jobs: Vec<Job>,
    /// Items DynamoDB read to answer (its `ScannedCount`): the sweeper's cost figure.
    pub items_read: u64,
    /// Keys of due items that could not be read as jobs: skipped, and never counted against
    /// the limit, so they cannot crowd out the jobs behind them.
    pub unreadable: Vec<String>,
    /// Parts of the index that could not be read this time (a shard's error); the other parts
    /// were.
    pub failed_parts: Vec<String>,
}

#[async_trait]
pub trait JobStore: Send + Sync {
    /// Stores a new job, or returns the owner's existing job for the same idempotency key
    /// (while that key has not expired: see [`Job::idempotency_expires_at`]).
    async fn create(&self, job: &Job) -> Result<CreateOutcome, StoreError>;
    /// The job the owner's idempotency `key` stands for at `now`, if the key is taken and has
    /// not expired.
    async fn find_by_idempotency_key(
        &self,
        owner: &str,
        key: &str,
        now: Millis,
    ) -> Result<Option<Job>, StoreError>;
    async fn get(&self, job_id: &str) -> Result<Option<Job>, StoreError>;
    /// Removes the record that reserves `job`'s idempotency key, if it still names `job` (a
    /// deleted job's key may then create a new job). Nothing to do is not an error.
    async fn forget_idempotency_key(&self, job: &Job) -> Result<(), StoreError>;
    /// Writes `job` only if the stored version is still `expected_version`. The write that
    /// ends the job ([`Job::usage_to_count`]) adds the job to its owner's usage totals in the
    /// same transaction: counted once, and only if the write lands.
    async fn save(&self, job: &Job, expected_version: u64) -> Result<(), StoreError>;
    /// The owner's usage totals for those of `days` (`YYYY-MM-DD`) that have any.
    async fn usage(&self, owner: &str, days: &[String]) -> Result<Vec<DailyUsage>, StoreError>;
    /// The owner's jobs, newest first; with `status`, only the jobs in that state, read from
    /// an index of their own, so that a page reads about `limit` items whatever the owner's
    /// other jobs. A cursor goes on only the listing it came from (same owner, same status).
    async fn list_by_owner(
        &self,
        owner: &str,
        status: Option<JobState>,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<JobPage, StoreError>;
    /// Non-terminal jobs whose next check is due at `now`, read from the sparse index only.
    async fn due_for_check(&self, now: Millis, limit: u32) -> Result<DueJobs, StoreError>;
}

// ---------------------------------------------------------------------------------------------
// Queue between submit and dispatch
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
#[error("queue unavailable: {0}")]
pub struct QueueError(pub String);

impl Classified for QueueError {
    fn failure(&self) -> Failure {
        Failure::Transient
    }
}

#[async_trait]
pub trait JobQueue: Send + Sync {
    /// Sends `job_id` to dispatch, with its trace id when the sender knows it (the consumer's
    /// log lines carry it before the job is read).
    async fn enqueue(&self, job_id: &str, trace_id: Option<&str>) -> Result<(), QueueError>;
}

/// The finalize function's queue. A message names only the job: the job record (its
/// [`crate::domain::job::Handoff`]) is the truth, so a stale or duplicated message is harmless.
#[async_trait]
pub trait FinalizeQueue: Send + Sync {
    /// Asks finalize to collect `job_id`'s outputs, not before `delay` (at most 15 minutes, as
    /// SQS allows).
    async fn request_finalize(
        &self,
        job_id: &str,
        delay: std::time::Duration,
    ) -> Result<(), QueueError>;
}

/// Why a run is to be stopped; it only goes into the stopper's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The client cancelled the job.
    ClientCancel,
    /// A second run of a job that already has one (a `/run` answer was lost).
    ExtraRun,
    /// The job ended (cancelled, timed out) while dispatch was starting this run.
    EndedWhileDispatching,
    /// The job passed its deadline.
    Deadline,
}

/// A RunPod run to stop. Only the stopper (`app::stop`) calls RunPod's `/cancel`, at a pace
/// RunPod allows; everyone else asks through a [`StopQueue`], which also keeps the public API
/// free of the RunPod key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopRun {
    pub job_id: String,
    /// The run's id at its backend (RunPod's job id, or a ComfyUI prompt id).
    pub runpod_id: String,
    pub reason: StopReason,
    /// Where the run is; requests from before the pod backend are serverless runs.
    #[serde(default)]
    pub backend: BackendKind,
}

impl StopRun {
    /// A stop of `run`, a run of `job` on the job's backend.
    pub fn new(job: &Job, run: &str, reason: StopReason) -> Self {
        Self {
            job_id: job.id.clone(),
            runpod_id: run.to_string(),
            reason,
            backend: job.backend,
        }
    }
}

/// The queue of runs to stop. A request that was accepted is carried out, retried while RunPod
/// cannot be reached, and dead-lettered (and alarmed on) if it never can.
#[async_trait]
pub trait StopQueue: Send + Sync {
    async fn request_stop(&self, stop: &StopRun) -> Result<(), QueueError>;
}

/// Checks of single jobs, at a time of their own: a polled backend's runs are looked at every
/// few seconds, more often than the scheduled sweep can run (EventBridge: once a minute), by
/// delayed messages that each ask for the next.
#[async_trait]
pub trait PollQueue: Send + Sync {
    /// Asks for `job_id` to be checked after `delay` (at most 15 minutes, as SQS allows), if
    /// it is then still due at `due` (its `next_check_at`): a check that finds the job
    /// rescheduled since (by another check) does nothing, so a duplicate message never starts
    /// a second chain.
    async fn request_check(
        &self,
        job_id: &str,
        due: Millis,
        delay: Duration,
    ) -> Result<(), QueueError>;
}

// ---------------------------------------------------------------------------------------------
// Object stores: the uploads and results buckets, and the RunPod volume
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("no such object: {0}")]
    NotFound(String),
    /// Worth retrying: throttling, 5xx, timeouts, broken connections.
    #[error("object store unavailable: {0}")]
    Transient(String),
    #[error("object store refused: {0}")]
    Permanent(String),
}

impl Classified for ObjectError {
    fn failure(&self) -> Failure {
        match self {
            Self::NotFound(_) => Failure::Missing,
            Self::Transient(_) => Failure::Transient,
            Self::Permanent(_) => Failure::Permanent,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ObjectMeta {
    pub size: u64,
    pub content_type: Option<String>,
}

pub type ByteChunks = BoxStream<'static, Result<Bytes, ObjectError>>;

/// A form upload a client can make without our credentials: `fields`, then the file (as the
/// last field, `file`), sent as `multipart/form-data` to `url`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PresignedPost {
    pub url: String,
    pub fields: Vec<(String, String)>,
}

/// A presigned request a client can make without our credentials.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PresignedRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
}

#[async_trait]
pub trait ObjectStore: Send + Sync {
    async fn put_bytes(
        &self,
        key: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<(), ObjectError>;
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, ObjectError>;
    /// The first `len` bytes (or fewer, for a shorter object).
    async fn read_prefix(&self, key: &str, len: u64) -> Result<Bytes, ObjectError>;
    /// Opens the object as a stream of chunks, so nobody has to hold it whole.
    async fn open(&self, key: &str) -> Result<(ObjectMeta, ByteChunks), ObjectError>;
    /// Writes a stream of known total size; implementations keep at most one part in memory.
    async fn put_stream(
        &self,
        key: &str,
        meta: &ObjectMeta,
        body: ByteChunks,
    ) -> Result<(), ObjectError>;
    async fn presign_get(
        &self,
        key: &str,
        expires_in: Duration,
        download_name: Option<&str>,
    ) -> Result<PresignedRequest, ObjectError>;
    /// A presigned POST for one upload to `key`: of `content_type`, at most `max_bytes`,
    /// enforced by the store at upload time.
    async fn presign_post(
        &self,
        key: &str,
        content_type: &str,
        max_bytes: u64,
        expires_in: Duration,
    ) -> Result<PresignedPost, ObjectError>;
    /// Removes one object; removing an absent one is not an error.
    async fn delete(&self, key: &str) -> Result<(), ObjectError>;
    /// The keys under `prefix`, at most `max` of them (a job's own folders hold a handful).
    async fn list(&self, prefix: &str, max: usize) -> Result<Vec<String>, ObjectError>;
    /// The files under `prefix` as [`ObjectStore::list`] gives them, and the folders the
    /// listing met on the way (`prefix` itself included, if it exists), each ending in `/`.
    /// Only a store with folders of its own has any: RunPod's volume, a filesystem behind an S3
    /// API, lists empty folders, and they stay after their files are removed.
    async fn list_tree(&self, prefix: &str, max: usize) -> Result<Tree, ObjectError> {
        Ok(Tree {
            files: self.list(prefix, max).await?,
            ..Tree::default()
        })
    }
    /// One page of what lies directly under `folder` (one level, as S3's `Delimiter=/` gives
    /// it), from where `token` (a previous page's `next`) left off. A store may hand out a
    /// token it handed out before (RunPod's volume is reported to): callers must not loop on
    /// one.
    async fn list_folder(
        &self,
        folder: &str,
        token: Option<&str>,
    ) -> Result<FolderPage, ObjectError>;
}

/// One page of a folder's listing, one level deep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FolderPage {
    /// The sub-folders, each ending in `/`, in key order.
    pub folders: Vec<String>,
    /// The files, in key order.
    pub files: Vec<String>,
    /// The files' sizes, added up (0 where the store does not say).
    pub bytes: u64,
    /// Where the next page starts; `None` after the last.
    pub next: Option<String>,
}

/// What [`ObjectStore::list_tree`] found under a prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub files: Vec<String>,
    /// The folders met on the way, each ending in `/`.
    pub folders: Vec<String>,
    /// The files' sizes, added up (0 where the store does not say).
    pub bytes: u64,
}

/// A multipart upload begun and neither completed nor aborted. Its parts take space on the
/// store (on RunPod's volume, in a hidden `.s3compat_uploads/` folder) until one of the two.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedUpload {
    pub key: String,
    pub upload_id: String,
    /// When it began, if the store says.
    pub initiated: Option<Millis>,
}

/// One page of the multipart uploads in progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StagedPage {
    pub uploads: Vec<StagedUpload>,
    /// The last upload of this page, where the next page starts; `None` after the last.
    pub next: Option<(String, String)>,
}

/// The multipart uploads in progress on a store, for the janitor to abort the abandoned ones.
#[async_trait]
pub trait StagedUploads: Send + Sync {
    /// Uploads to keys under `prefix`, after the `(key, upload_id)` a previous page ended with.
    async fn staged_uploads(
        &self,
        prefix: &str,
        after: Option<&(String, String)>,
    ) -> Result<StagedPage, ObjectError>;
    /// Aborts one upload, dropping its parts; aborting one already gone is not an error.
    async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), ObjectError>;
}

// ---------------------------------------------------------------------------------------------
// Fetching a worker's output from a URL (worker-comfyui `s3_url` images)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Timeouts, connection errors, 429 and 5xx: worth trying again later.
    #[error("download failed, may pass: {0}")]
    Transient(String),
    /// Any other non-2xx answer, redirects included (they are not followed).
    #[error("the server answered {0}")]
    Status(u16),
    /// The egress rules refuse the URL (see `domain::egress`): nothing was sent.
    #[error("refused: {0}")]
    Refused(String),
}

impl Classified for FetchError {
    fn failure(&self) -> Failure {
        match self {
            Self::Transient(_) => Failure::Transient,
            Self::Status(404 | 410) => Failure::Missing,
            Self::Status(_) | Self::Refused(_) => Failure::Permanent,
        }
    }
}

/// A downloaded body as it arrives.
pub struct Fetched {
    /// The declared `Content-Length`, if the server sent one.
    pub size: Option<u64>,
    pub body: ByteChunks,
}

/// Names to addresses, for the egress checks: DNS in AWS, a table in tests (which must never
/// send traffic to a private address).
#[async_trait]
pub trait Resolver: Send + Sync {
    /// Every address `host` resolves to, with `port`; an empty list when it resolves to none.
    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<std::net::SocketAddr>, String>;
}

#[async_trait]
pub trait UrlFetcher: Send + Sync {
    /// GETs `url` without following redirects; the body is not read yet.
    async fn open(&self, url: &url::Url) -> Result<Fetched, FetchError>;
    /// The same, connecting to `destination.address` only: the address the egress rules
    /// checked, whatever a second resolution of the host would say.
    async fn open_at(
        &self,
        url: &url::Url,
        destination: &crate::domain::egress::Destination,
    ) -> Result<Fetched, FetchError>;
}

// ---------------------------------------------------------------------------------------------
// RunPod serverless endpoint
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum RunPodError {
    /// 429, 5xx, timeouts, connection errors: try again later.
    #[error("RunPod unavailable: {0}")]
    Transient(String),
    /// RunPod does not know the job (expired result, TTL passed, wrong id).
    #[error("RunPod job not found")]
    NotFound,
    /// `/run` only: RunPod may have accepted the job, but its answer was lost.
    #[error("RunPod may have taken the job; its answer was lost: {0}")]
    Unknown(String),
    /// Any other refusal; retrying the same request will not help.
    #[error("RunPod refused ({status}): {message}")]
    Permanent { status: u16, message: String },
    /// RunPod's answer is longer than the gateway reads (`RUNPOD_MAX_STATUS_BYTES`): only a
    /// completed run's output makes a `/status` answer that long.
    #[error("RunPod's answer is longer than {limit} bytes")]
    TooLarge { limit: u64 },
}

impl Classified for RunPodError {
    fn failure(&self) -> Failure {
        match self {
            Self::Transient(_) => Failure::Transient,
            Self::NotFound => Failure::Missing,
            Self::Permanent { .. } | Self::TooLarge { .. } => Failure::Permanent,
            Self::Unknown(_) => Failure::Unknown,
        }
    }
}

/// The body of `/run`, as RunPod documents it.
#[derive(Clone, Debug, Serialize)]
pub struct RunRequest {
    pub input: serde_json::Value,
    pub webhook: Option<String>,
    pub policy: RunPolicy,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    pub execution_timeout: u64,
    pub ttl: u64,
    /// The job does not make RunPod scale workers up.
    pub low_priority: bool,
}

/// RunPod's job status, as `/status` returns it and as the webhook echoes it. Every field is
/// optional because the webhook has been seen empty or odd; callers decide what is usable.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunPodStatus {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub output: Option<serde_json::Value>,
    #[serde(default)]
    pub error: Option<serde_json::Value>,
    #[serde(default)]
    pub delay_time: Option<u64>,
    #[serde(default)]
    pub execution_time: Option<u64>,
}

#[async_trait]
pub trait RunPod: Send + Sync {
    /// Submits a job; returns RunPod's job id.
    async fn run(&self, request: &RunRequest) -> Result<String, RunPodError>;
    async fn status(&self, runpod_job_id: &str) -> Result<RunPodStatus, RunPodError>;
    async fn cancel(&self, runpod_job_id: &str) -> Result<(), RunPodError>;
}

// ---------------------------------------------------------------------------------------------
// Reading a client's input image
// ---------------------------------------------------------------------------------------------

/// An image format the gateway accepts as input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageKind {
    pub content_type: &'static str,
    pub extension: &'static str,
}

pub const JPEG: ImageKind = ImageKind {
    content_type: "image/jpeg",
    extension: "jpg",
};
pub const PNG: ImageKind = ImageKind {
    content_type: "image/png",
    extension: "png",
};
pub const WEBP: ImageKind = ImageKind {
    content_type: "image/webp",
    extension: "webp",
};

/// Recognises input images without trusting the client's word for what they are.
pub trait ImageProbe: Send + Sync {
    /// The format, from the first bytes alone (an upload is only read that far).
    fn sniff(&self, prefix: &[u8]) -> Option<ImageKind>;
    /// The format and the width and height its header declares, if the header decodes.
    fn dimensions(&self, bytes: &[u8]) -> Option<(ImageKind, u32, u32)>;
}

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

pub trait Clock: Send + Sync {
    fn now_ms(&self) -> Millis;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// Client callbacks
// ---------------------------------------------------------------------------------------------

/// Each job's delivery log, written conditionally like the job itself.
#[async_trait]
pub trait DeliveryLogs: Send + Sync {
    /// The log and the version to save it against; `None` before the job's first callback.
    async fn delivery_log(
        &self,
        job_id: &str,
    ) -> Result<Option<(crate::domain::callback::DeliveryLog, u64)>, StoreError>;
    /// Writes `log` as version `expected + 1` only if the stored one is still `expected`
    /// (0: none stored yet); `StoreError::Conflict` otherwise.
    async fn save_delivery_log(
        &self,
        log: &crate::domain::callback::DeliveryLog,
        expected: u64,
    ) -> Result<(), StoreError>;
    /// Removes the job's log (its job's data is purged); nothing to remove is no error.
    async fn forget_delivery_log(&self, job_id: &str) -> Result<(), StoreError>;
}

/// The delivery function's queue: one message per event to tell a client of, and one per
/// attempt due, delayed at most 15 minutes (SQS's limit), so a longer wait is a chain of
/// delayed messages.
#[async_trait]
pub trait CallbackQueue: Send + Sync {
    /// Asks for `event` about the job to be told its client: the delivery function reads the
    /// job, adds the message to its log and makes the first attempt. Off the path of the use
    /// case that asks, which only pays for one send.
    async fn request_notice(
        &self,
        job_id: &str,
        event: crate::domain::callback::CallbackEvent,
    ) -> Result<(), QueueError>;
    async fn request_delivery(
        &self,
        job_id: &str,
        message_id: &str,
        delay: Duration,
    ) -> Result<(), QueueError>;
}

/// Sends one signed callback: a POST to `destination.address` only (the address checked), no
/// redirect followed, bounded in time.
#[async_trait]
pub trait CallbackSender: Send + Sync {
    async fn post(
        &self,
        url: &url::Url,
        destination: &crate::domain::egress::Destination,
        headers: &[(&'static str, String)],
        body: &[u8],
    ) -> crate::domain::callback::AttemptResult;
}

/// Each owner's signing secrets: the current one first, and the one before it while a
/// rotation settles. They are the owners', kept encrypted; the gateway only signs with them.
#[async_trait]
pub trait SigningKeys: Send + Sync {
    /// The owner's secrets, creating the first one if they have none.
    async fn secrets(
        &self,
        owner: &str,
    ) -> Result<Vec<crate::domain::callback::SigningSecret>, StoreError>;
    /// Puts a new secret first and keeps the current one second, so that receivers can
    /// switch over; returns the owner's secrets.
    async fn rotate(
        &self,
        owner: &str,
    ) -> Result<Vec<crate::domain::callback::SigningSecret>, StoreError>;
}

// ---------------------------------------------------------------------------------------------
// The pod backend: a ComfyUI server over HTTP
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum ComfyError {
    /// The server refused the prompt (400: validation, an unknown node type): why, in its words.
    #[error("the server refused the prompt: {0}")]
    Refused(String),
    /// Timeouts, connection errors, 5xx, a proxy's 524: worth trying again later.
    #[error("the ComfyUI server is unreachable or failing: {0}")]
    Unavailable(String),
    /// No such file (`/view` 404).
    #[error("no such file on the ComfyUI server")]
    NotFound,
    /// An answer that is not what ComfyUI answers (not JSON, a missing field, another 4xx).
    #[error("the ComfyUI server answered {0}")]
    BadAnswer(String),
}

impl Classified for ComfyError {
    fn failure(&self) -> Failure {
        match self {
            Self::Unavailable(_) => Failure::Transient,
            Self::NotFound => Failure::Missing,
            Self::Refused(_) | Self::BadAnswer(_) => Failure::Permanent,
        }
    }
}

/// A ComfyUI server (on a RunPod pod, behind its proxy, or anywhere): ComfyUI's own HTTP API.
/// It has no webhooks, so its prompts are polled; none of these calls waits on the GPU.
#[async_trait]
pub trait ComfyServer: Send + Sync {
    /// Uploads an input image (`POST /upload/image`, never overwriting): the name the server
    /// stored it under, which the graph's LoadImage must name.
    async fn upload_image(
        &self,
        subfolder: &str,
        name: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<String, ComfyError>;
    /// Queues `graph` as prompt `prompt_id` (`POST /prompt`, our own lowercase UUID); the id
    /// the server answered with (another one: it ignores the field).
    async fn queue_prompt(
        &self,
        prompt_id: &str,
        graph: &serde_json::Value,
    ) -> Result<String, ComfyError>;
    /// Where the prompt stands: the queue read first, then the history, in that order so that a
    /// prompt finishing between the two reads is still seen (`domain::comfy`).
    async fn prompt_state(
        &self,
        prompt_id: &str,
    ) -> Result<crate::domain::comfy::PromptState, ComfyError>;
    /// One output file (`GET /view`), as it arrives.
    async fn view(&self, file: &crate::domain::comfy::ComfyFile) -> Result<Fetched, ComfyError>;
    /// Stops the prompt: removed from the queue while pending (`POST /queue {"delete"}`), and
    /// interrupted if it runs (`POST /interrupt {"prompt_id"}`, which touches no other prompt).
    async fn cancel(&self, prompt_id: &str) -> Result<(), ComfyError>;
}

// ---------------------------------------------------------------------------------------------
// Holding jobs back, and batches
// ---------------------------------------------------------------------------------------------

/// Each hold-back key's slots and line (`domain::hold`), written conditionally like jobs.
#[async_trait]
pub trait SlotStore: Send + Sync {
    /// The key's record and the version to save it against; `None` before its first use.
    async fn slots(
        &self,
        key: &str,
    ) -> Result<Option<(crate::domain::hold::Slots, u64)>, StoreError>;
    /// Writes `slots` as version `expected + 1` only if the stored one is still `expected`
    /// (0: none stored yet); `StoreError::Conflict` otherwise.
    async fn save_slots(
        &self,
        slots: &crate::domain::hold::Slots,
        expected: u64,
    ) -> Result<(), StoreError>;
}

/// Per-tenant limits: an operator's overrides for an owner, and the owner's submit bucket.
#[async_trait]
pub trait TenantStore: Send + Sync {
    /// What an operator set for `owner`; `None` when nothing is set.
    async fn overrides(
        &self,
        owner: &str,
    ) -> Result<Option<crate::domain::tenant::LimitOverrides>, StoreError>;
    async fn set_overrides(
        &self,
        owner: &str,
        overrides: &crate::domain::tenant::LimitOverrides,
    ) -> Result<(), StoreError>;
    /// Spends one of `owner`'s submit tokens at `now` as [`crate::domain::tenant::Rate::admit`]
    /// decides, atomically (two submits never spend the same token). `Err(wait_ms)` inside
    /// `Ok`: refused, a token is back in `wait_ms`.
    async fn spend_submit(
        &self,
        owner: &str,
        rate: &crate::domain::tenant::Rate,
        now: Millis,
    ) -> Result<Result<(), Millis>, StoreError>;
}

#[async_trait]
pub trait BatchStore: Send + Sync {
    /// Stores a new batch; one with the same id is `StoreError::Conflict`.
    async fn create_batch(&self, batch: &crate::domain::batch::Batch) -> Result<(), StoreError>;
    async fn batch(&self, id: &str) -> Result<Option<crate::domain::batch::Batch>, StoreError>;
}

// ---------------------------------------------------------------------------------------------
// Backends: where a job's runs go
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Unreachable, throttled, failing: try again later.
    #[error("backend unavailable: {0}")]
    Transient(String),
    /// The backend does not know the run (RunPod's result expired).
    #[error("the backend does not know the run")]
    NotFound,
    /// The backend is not where the run is: a polled backend whose queue and history both
    /// lack it. Not proof of loss alone (see `domain::comfy`).
    #[error("the run is in neither the backend's queue nor its history")]
    Unseen,
    /// Starting only: the run may have started, but the answer was lost.
    #[error("the backend may have taken the run; its answer was lost: {0}")]
    Unknown(String),
    /// Refused for good; the job fails with this error.
    #[error("{}", .0.message)]
    Refused(JobError),
    /// The backend's answer is longer than the gateway reads.
    #[error("the backend's answer is longer than {limit} bytes")]
    TooLarge { limit: u64 },
}

impl Classified for BackendError {
    fn failure(&self) -> Failure {
        match self {
            Self::Transient(_) => Failure::Transient,
            Self::NotFound | Self::Unseen => Failure::Missing,
            Self::Unknown(_) => Failure::Unknown,
            Self::Refused(_) | Self::TooLarge { .. } => Failure::Permanent,
        }
    }
}

/// Where a job's runs go. The use cases start, check, stop and collect runs through this, and
/// never ask which backend a job has: RunPod serverless (`app::backends::Serverless`) or a
/// ComfyUI server (`app::backends::Pod`).
#[async_trait]
pub trait Backend: Send + Sync {
    /// Puts the job's input where the run reads it, renders the workflow for it and starts a
    /// run (attempt `job.attempts`); the run's id. `webhook` is where a backend that calls
    /// back reports the run.
    async fn start(
        &self,
        job: &Job,
        workflow: &crate::domain::workflow::Workflow,
        webhook: &str,
    ) -> Result<String, BackendError>;
    /// Where `run`, a run of `job`, stands, in RunPod's status vocabulary (the one the
    /// observer reads).
    async fn status(&self, job: &Job, run: &str) -> Result<RunPodStatus, BackendError>;
    /// Stops the run.
    async fn cancel(&self, run: &str) -> Result<(), BackendError>;
    /// How its runs' outputs come back, for `workflow` (`None`: no longer in the catalog).
    fn output_contract(
        &self,
        workflow: Option<&crate::domain::workflow::Workflow>,
    ) -> Option<crate::domain::workflow::OutputContract>;
    /// One output file a run's report names, for a contract that fetches them back from the
    /// backend ([`crate::domain::workflow::OutputContract::ComfyView`]).
    async fn open_output(
        &self,
        file: &crate::domain::comfy::ComfyFile,
    ) -> Result<Fetched, BackendError>;
    /// How often its runs must be checked, for a backend that sends no webhooks.
    fn polled_every(&self) -> Option<Duration>;
    /// Folders (ending in `/`) on the RunPod volume that the job's runs leave behind, beside
    /// the gateway's own folders for the job.
    fn volume_leftovers(&self, job: &Job) -> Vec<String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_error_falls_in_one_class() {
        assert_eq!(StoreError::Conflict.failure(), Failure::Transient);
        assert_eq!(
            StoreError::Corrupt("x".into()).failure(),
            Failure::Permanent
        );
        assert_eq!(QueueError("x".into()).failure(), Failure::Transient);
        assert_eq!(
            ObjectError::NotFound("k".into()).failure(),
            Failure::Missing
        );
        assert_eq!(
            ObjectError::Permanent("403".into()).failure(),
            Failure::Permanent
        );
        assert_eq!(
            FetchError::Transient("503".into()).failure(),
            Failure::Transient
        );
        assert_eq!(FetchError::Status(404).failure(), Failure::Missing);
        assert_eq!(FetchError::Status(403).failure(), Failure::Permanent);
        assert_eq!(RunPodError::NotFound.failure(), Failure::Missing);
        let refused = RunPodError::Permanent {
            status: 400,
            message: "bad input".into(),
        };
        assert_eq!(refused.failure(), Failure::Permanent);
        assert_eq!(
            ComfyError::Unavailable("524".into()).failure(),
            Failure::Transient
        );
        assert_eq!(ComfyError::NotFound.failure(), Failure::Missing);
        assert_eq!(
            ComfyError::Refused("missing_node_type".into()).failure(),
            Failure::Permanent
        );
    }
}

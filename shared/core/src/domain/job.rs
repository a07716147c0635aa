//! The job: its record, its states and the only ways a state may change.
//!
//! States move forward only and a terminal state is final. The store makes every write
//! conditional on the version that was read, so the methods here bump `version` and the caller
//! saves with the previous one as the condition: two writers racing on the same version cannot
//! both win.
//!
//! Every state change also appends a [`JobEvent`] to the job's `history`, in the same record and
//! so in the same conditional write: a writer that loses the race leaves no event behind, and
//! the history is exactly the sequence of changes that were stored.
use serde::{Deserialize, Serialize};

use super::workflow::ValidatedParams;

/// Epoch milliseconds. The domain never reads a clock; callers pass `now`.
pub type Millis = i64;

/// How urgent a job is. A low one asks RunPod not to scale workers up for it
/// (`policy.lowPriority`): it runs on workers already up, when they are free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Normal, Self::Low]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// Where a job's runs go: RunPod serverless (webhooks), or a ComfyUI server on a pod (polled).
/// The use cases reach either through the `Backend` port and never branch on this.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// A RunPod serverless endpoint; every job before the pod backend existed ran here.
    #[default]
    Serverless,
    /// A ComfyUI server reached over its own HTTP API (on a RunPod pod, through its proxy).
    Pod,
}

impl BackendKind {
    pub const ALL: [BackendKind; 2] = [Self::Serverless, Self::Pod];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serverless => "serverless",
            Self::Pod => "pod",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == s)
    }
}

/// A new job id: a UUIDv7 of `now`, so ids sort by when they were minted (the volume's job
/// folders list oldest first) and tell their age without a read.
pub fn mint_job_id(now: Millis) -> String {
    let millis = now.max(0) as u64;
    let timestamp = uuid::Timestamp::from_unix(
        uuid::NoContext,
        millis / 1000,
        (millis % 1000) as u32 * 1_000_000,
    );
    uuid::Uuid::new_v7(timestamp).to_string()
}

/// When a job id from [`mint_job_id`] was minted; `None` for anything that is not one, in
/// its canonical form.
pub fn job_id_minted_at(id: &str) -> Option<Millis> {
    let uuid = uuid::Uuid::try_parse(id).ok()?;
    if uuid.get_version_num() != 7 || uuid.to_string() != id {
        return None;
    }
    let (secs, nanos) = uuid.get_timestamp()?.to_unix();
    Some((secs * 1000 + u64::from(nanos) / 1_000_000) as Millis)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted and on the queue; RunPod does not have it yet.
    Queued,
    /// RunPod accepted it (IN_QUEUE on their side).
    Submitted,
    /// A worker is running it (IN_PROGRESS).
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::TimedOut
        )
    }

    /// Position in the forward-only order; all terminal states share the last rank.
    fn rank(self) -> u8 {
        match self {
            Self::Queued => 0,
            Self::Submitted => 1,
            Self::Running => 2,
            _ => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Submitted => "submitted",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Submitted,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
            Self::TimedOut,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Machine-readable causes of failure. Clients branch on these, so they are part of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The input file was gone when the job was dispatched.
    InputMissing,
    /// The input's URL could not be fetched: refused by the egress rules at dispatch, or
    /// answered with an error that will not pass.
    InputUnavailable,
    /// What the input's URL served is not an accepted image, or is too large.
    InputRejected,
    /// RunPod refused the job permanently (4xx on /run).
    RunpodRejected,
    /// Dispatch kept hitting transient errors until the job's attempt budget ran out.
    DispatchAttemptsExhausted,
    /// The worker reported FAILED.
    WorkerFailed,
    /// RunPod no longer knows the job (result expired or TTL passed).
    RunpodJobExpired,
    /// The worker named an output outside the job's output prefix.
    InvalidOutputPath,
    /// The worker's output was not in a shape the workflow's contract allows.
    InvalidOutput,
    /// The worker completed with no output at all.
    EmptyOutput,
    /// A file the worker named is not on the volume.
    OutputMissing,
    /// An output, or all of a job's outputs together, is over the configured byte cap; nothing
    /// is stored.
    OutputTooLarge,
    /// RunPod or the gateway gave up on the job's deadline.
    DeadlineExceeded,
    /// RunPod reported TIMED_OUT.
    ExecutionTimedOut,
    /// The client cancelled it.
    CancelledByClient,
    /// RunPod reported the job cancelled without the client asking.
    CancelledByRunpod,
    /// The backend refused the workflow: a node type it does not have, or a node's input
    /// that fails its validation (the server's own message is kept).
    InvalidWorkflow,
    /// The backend lost the run (a ComfyUI restart drops its queue and history), and the one
    /// re-submission it was allowed was lost too.
    BackendLost,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InputMissing => "input_missing",
            Self::InputUnavailable => "input_unavailable",
            Self::InputRejected => "input_rejected",
            Self::RunpodRejected => "runpod_rejected",
            Self::DispatchAttemptsExhausted => "dispatch_attempts_exhausted",
            Self::WorkerFailed => "worker_failed",
            Self::RunpodJobExpired => "runpod_job_expired",
            Self::InvalidOutputPath => "invalid_output_path",
            Self::InvalidOutput => "invalid_output",
            Self::EmptyOutput => "empty_output",
            Self::OutputMissing => "output_missing",
            Self::OutputTooLarge => "output_too_large",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::ExecutionTimedOut => "execution_timed_out",
            Self::CancelledByClient => "cancelled_by_client",
            Self::CancelledByRunpod => "cancelled_by_runpod",
            Self::InvalidWorkflow => "invalid_workflow",
            Self::BackendLost => "backend_lost",
        }
    }

    /// Whether submitting the same job again could succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::DispatchAttemptsExhausted
                | Self::RunpodJobExpired
                | Self::DeadlineExceeded
                | Self::ExecutionTimedOut
                | Self::WorkerFailed
                | Self::BackendLost
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
}

impl JobError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retryable: code.retryable(),
        }
    }
}

/// Who made a change: the API on a client's request, or one of the functions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    /// The public API, on the client's request (submission, cancel).
    Client,
    Dispatch,
    Webhook,
    Sweeper,
    /// The finalize function, collecting a completed run's outputs.
    Finalize,
    /// A caller that did not say (tools, tests).
    #[default]
    Gateway,
}

impl Actor {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Dispatch => "dispatch",
            Self::Webhook => "webhook",
            Self::Sweeper => "sweeper",
            Self::Finalize => "finalize",
            Self::Gateway => "gateway",
        }
    }
}

/// One state change, as stored: append-only, at most one per state (states only move forward),
/// so a history has at most [`MAX_HISTORY`] entries and exactly one terminal entry once the job
/// is terminal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub at: Millis,
    /// `None` for the job's creation.
    pub from: Option<JobState>,
    pub to: JobState,
    pub by: Actor,
}

/// Creation plus one entry per later state: queued → submitted → running → terminal.
pub const MAX_HISTORY: usize = 4;

/// Where the job's input image sits in the uploads bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputRef {
    pub key: String,
    pub content_type: String,
    pub size: u64,
    /// Extension used for the copy on the volume (`jpg`, `png`, `webp`).
    pub extension: String,
    /// An input given by URL: fetched (and checked) at dispatch into `key`; until then
    /// `size` is 0 and the type unknown.
    #[serde(default)]
    pub source_url: Option<String>,
}

impl InputRef {
    /// An input given by URL that dispatch has not fetched yet.
    pub fn awaits_fetch(&self) -> bool {
        self.source_url.is_some() && self.size == 0
    }
}

/// One output copied into the results bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputFile {
    pub key: String,
    pub file_name: String,
    pub size: u64,
    pub content_type: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timestamps {
    pub created_at: Millis,
    pub submitted_at: Option<Millis>,
    pub running_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub updated_at: Millis,
}

/// What a lease is held for. A lease marks an internal step in progress (a dispatch calling
/// RunPod, a finalize copying outputs) so that a concurrent duplicate backs off instead of doing
/// the work twice; it expires so a crashed holder never blocks the job for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseKind {
    Dispatch,
    Finalize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub kind: LeaseKind,
    pub until: Millis,
}

/// Why a job's data was deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletionReason {
    /// The owner asked (`DELETE /jobs/{id}`).
    Client,
    /// Its retention ended (`expires_at`).
    Expired,
}

/// A job whose data is deleted, or being deleted: the record stays as a tombstone until its
/// TTL, so that the job answers 410 rather than 404 meanwhile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deletion {
    pub reason: DeletionReason,
    pub at: Millis,
    /// Everything the job left (results, input, volume folders, idempotency record) is gone.
    pub purged: bool,
}

/// The latest progress a running job's worker reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Done so far, from 0 to 1.
    pub fraction: Option<f64>,
    pub message: Option<String>,
    /// When the gateway learnt it.
    pub at: Millis,
}

/// What one ended job adds to its owner's usage totals for a day. The store adds it in the
/// same transaction as the write that ends the job, the one whose version is `version`: once,
/// whatever writes follow, and never for a write that lost its race.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEntry {
    /// The UTC day the job ended, `YYYY-MM-DD`.
    pub day: String,
    pub state: JobState,
    /// GPU time RunPod reported (its `executionTime`).
    pub gpu_ms: u64,
    /// What that cost at the job's price; 0 without a price.
    pub cost_nano_usd: u64,
    pub version: u64,
}

/// The UTC calendar day of `at`, `YYYY-MM-DD`.
pub fn utc_day(at: Millis) -> String {
    let date = time::OffsetDateTime::from_unix_timestamp(at.div_euclid(1000))
        .map(|t| t.date())
        .unwrap_or(time::Date::MIN);
    super::usage::format_date(date)
}

/// `at` as the API and the callbacks show times: RFC 3339 in UTC, to the millisecond
/// (`2027-01-15T08:00:00.000Z`); times before 1970 show as its start.
pub fn rfc3339(at: Millis) -> String {
    let at = at.max(0);
    let t = time::OffsetDateTime::from_unix_timestamp(at / 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        at % 1000
    )
}

/// RunPod confirmed that `run` completed, and its report (the `/status` answer, whose output
/// RunPod keeps for only 30 minutes) is stored at `report_key`: from here the finalize function
/// collects the outputs from that copy, without asking RunPod again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Handoff {
    pub run: String,
    pub report_key: String,
    /// When the report was confirmed; the finalize attempts are bounded from here.
    pub at: Millis,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub owner: String,
    pub workflow: String,
    pub workflow_version: String,
    pub params: ValidatedParams,
    pub input: InputRef,
    pub state: JobState,
    /// Dispatch attempts started (each one may call RunPod /run).
    pub attempts: u32,
    pub runpod_job_id: Option<String>,
    pub timestamps: Timestamps,
    pub outputs: Vec<OutputFile>,
    pub error: Option<JobError>,
    /// RunPod's `delayTime` (ms in RunPod's queue) and `executionTime` (ms on a worker).
    pub delay_time_ms: Option<u64>,
    pub execution_time_ms: Option<u64>,
    pub idempotency_key: Option<String>,
    /// With an idempotency key: a digest of the request that created the job (a replay must
    /// carry the same request), and until when (epoch seconds) the key stands for this job.
    /// Absent in records from before idempotency keys expired.
    #[serde(default)]
    pub request_digest: Option<String>,
    #[serde(default)]
    pub idempotency_expires_at: Option<i64>,
    pub callback_url: Option<String>,
    /// The events beyond the job's end its callback asked for (`job.running`,
    /// `job.progress`); the end is always sent.
    #[serde(default)]
    pub callback_events: Vec<String>,
    /// Bumped by every change; the store writes only if the stored version is the one read.
    pub version: u64,
    /// When the job must be terminal; past it the sweeper cancels it as `timed_out`.
    pub deadline_at: Millis,
    /// When the sweeper should next look at the job. `None` exactly when the job is terminal,
    /// which keeps it out of the sparse sweeper index.
    pub next_check_at: Option<Millis>,
    pub lease: Option<Lease>,
    /// Epoch seconds after which DynamoDB may delete the record (TTL): the end of its
    /// retention plus the tombstone period.
    pub expires_at: i64,
    /// When the job's data stops being served and is deleted (the API's `expires_at`): the
    /// client's retention, within the configured bounds. 0 in records from before it existed,
    /// which keep the record's TTL as their retention ([`Job::retained_until`]).
    #[serde(default)]
    pub retain_until: Millis,
    /// Set once the job's data is deleted, or being deleted.
    #[serde(default)]
    pub deletion: Option<Deletion>,
    /// Every state change, oldest first (records from before the history existed have none).
    #[serde(default)]
    pub history: Vec<JobEvent>,
    /// Checks of this job that failed transiently in a row (RunPod or the volume unreachable);
    /// the sweeper waits longer after each. Reset when the job moves on.
    #[serde(default)]
    pub check_failures: u32,
    /// When a `/run` for the job last ended with an unknown outcome (timed out, 5xx, an
    /// unreadable answer): RunPod may hold a run nobody recorded. Cleared when a run is
    /// recorded.
    #[serde(default)]
    pub unconfirmed_run_at: Option<Millis>,
    /// A random number drawn for the write that stored this version. A writer whose answer was
    /// lost (the write committed, the connection dropped, the retry met its own version) finds
    /// its own number there; two writers that made the same change from the same copy never
    /// both do.
    #[serde(default)]
    pub write_id: Option<u64>,
    /// Ended, with what it left behind still to remove: copies in the results bucket no output
    /// names, and its folders on the RunPod volume. The job stays in the sweep index (its
    /// `next_check_at`) until the sweeper has removed them.
    #[serde(default)]
    pub cleanup_pending: bool,
    /// How long after its end the sweeper removes the job's leftovers ([`JobTiming`]); records
    /// from before it have 0, and the sweeper then waits on its own clock.
    #[serde(default)]
    pub cleanup_delay_ms: Millis,
    /// Set once RunPod confirmed the run completed and finalize has what it needs; the job
    /// shows as running until finalize ends it.
    #[serde(default)]
    pub handoff: Option<Handoff>,
    /// The latest progress the worker reported while running. Only the latest: an entry per
    /// update would grow the record towards DynamoDB's 400 KB item limit.
    #[serde(default)]
    pub progress: Option<Progress>,
    /// Ended with a callback URL or a held slot, and the notice of its end (which the
    /// callbacks function turns into the client's callback and the slot's release) not yet
    /// known to be queued: the write that ends the job sets it, so the sweeper, which visits
    /// every ended job for its clean-up, asks for the notice again before clearing it. A
    /// callback or a release lost between the job's end and the queue happens late, never not
    /// at all.
    #[serde(default)]
    pub callback_pending: bool,
    /// When a `job.progress` callback was last asked for, which rate-limits them.
    #[serde(default)]
    pub progress_told_at: Option<Millis>,
    /// The price of a GPU-second when the job was accepted, in nano-USD: its cost is priced at
    /// what was in effect then. `None`: no price configured, no cost shown.
    #[serde(default)]
    pub gpu_price_nano_usd: Option<u64>,
    /// What the job adds to its owner's usage totals, set by the write that ends it.
    #[serde(default)]
    pub usage: Option<UsageEntry>,
    /// Where the job's runs go; records from before there was a choice ran on serverless.
    #[serde(default)]
    pub backend: BackendKind,
    /// Records from before priorities are normal.
    #[serde(default)]
    pub priority: Priority,
    /// When a check first found the job's run nowhere at its backend (a polled backend's
    /// queue and history both without it). Alone it proves nothing; seen so again some
    /// seconds later, the run is lost. Cleared by any check that finds it.
    #[serde(default)]
    pub unseen_at: Option<Millis>,
    /// The run was lost and the job waits for dispatch to start it again (the state stays
    /// what it was: states only move forward).
    #[serde(default)]
    pub rerun_pending: bool,
    /// How many lost runs were started again; one is allowed.
    #[serde(default)]
    pub reruns: u32,
    /// The batch it belongs to, if any.
    #[serde(default)]
    pub batch_id: Option<String>,
    /// The one trace id every log line about the job carries, from the API request through
    /// the queues, RunPod (in the run's input) and back: X-Ray's format, taken from the
    /// request's `X-Amzn-Trace-Id` when it has one. Records from before it have none
    /// ([`Job::trace`] then derives one from the job's id).
    #[serde(default)]
    pub trace_id: Option<String>,
    /// What holds it back (its batch's slots, then its owner's), in the order it takes them:
    /// dispatched only with a slot of each, which it gives back when it ends.
    #[serde(default, alias = "hold", deserialize_with = "super::hold::one_or_many")]
    pub holds: Vec<super::hold::Hold>,
    /// Who is changing the job in this process; recorded in the history, never stored.
    #[serde(skip)]
    acting: Acting,
}

/// The transient [`Actor`] of a job in memory. It is not part of the record, so it never makes
/// two jobs unequal.
#[derive(Clone, Copy, Debug, Default)]
struct Acting(Actor);

impl PartialEq for Acting {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransitionError {
    #[error("job is already {0}")]
    AlreadyTerminal(JobState),
    #[error("job cannot go back from {from} to {to}")]
    Backwards { from: JobState, to: JobState },
    #[error("a {0:?} lease is held until {1}")]
    Leased(LeaseKind, Millis),
    /// The job changed since the caller decided on it in a way that voids the decision (e.g.
    /// RunPod got the job after the sweeper decided what to cancel).
    #[error("the job changed since the decision was made")]
    Stale,
    /// A change decided under a lease, and the job no longer carries that lease (it ran out and
    /// someone else took the job, or the job ended).
    #[error("the lease the change was decided under is no longer held")]
    LeaseLost,
}

/// How many times a job's lost run is started again before the job fails `backend_lost`.
pub const MAX_RERUNS: u32 = 1;

/// Everything a new job needs; the rest starts empty.
pub struct NewJob {
    pub id: String,
    pub owner: String,
    pub workflow: String,
    pub workflow_version: String,
    pub params: ValidatedParams,
    pub input: InputRef,
    pub idempotency_key: Option<String>,
    /// A digest of the request, kept with an idempotency key.
    pub request_digest: Option<String>,
    pub callback_url: Option<String>,
    pub callback_events: Vec<String>,
    pub backend: BackendKind,
    pub priority: Priority,
}

/// A new trace id in X-Ray's format (`1-<epoch seconds, 8 hex>-<96 random bits, 24 hex>`),
/// so that X-Ray and the logs name a request the same way.
pub fn new_trace(now: Millis) -> String {
    format!(
        "1-{:08x}-{:024x}",
        (now / 1000).max(0) as u32,
        rand::random::<u128>() >> 32
    )
}

/// The trace id in an `X-Amzn-Trace-Id` header (`Root=1-…;Parent=…;Sampled=1`), if it has a
/// well-formed one; anything else is ignored rather than logged as a client's trace.
pub fn trace_from_header(header: &str) -> Option<String> {
    let root = header
        .split(';')
        .find_map(|part| part.trim().strip_prefix("Root="))?;
    let mut parts = root.split('-');
    let well_formed = parts.next() == Some("1")
        && parts
            .next()
            .is_some_and(|t| t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        && parts
            .next()
            .is_some_and(|r| r.len() == 24 && r.bytes().all(|b| b.is_ascii_hexdigit()))
        && parts.next().is_none();
    well_formed.then(|| root.to_ascii_lowercase())
}

fn derived_trace(job_id: &str, created_at: Millis) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(job_id.as_bytes());
    format!(
        "1-{:08x}-{}",
        (created_at / 1000).max(0) as u32,
        hex::encode(&digest[..12])
    )
}

/// The timing policy a job is created with.
#[derive(Clone, Copy, Debug)]
pub struct JobTiming {
    /// How long a job may take from acceptance to a terminal state.
    pub deadline_ms: Millis,
    /// First sweeper look after acceptance: a job still queued then is re-enqueued.
    pub first_check_ms: Millis,
    /// How long the job's data is kept after creation.
    pub retention_secs: i64,
    /// How long the record stays after that, as a tombstone (DynamoDB TTL).
    pub tombstone_secs: i64,
    /// How long an idempotency key stands for the job it created.
    pub idempotency_window_secs: i64,
    /// How long after its end the job's leftovers are removed: no finalize attempt can still
    /// be at work by then (the finalize lease).
    pub cleanup_delay_ms: Millis,
}

impl Job {
    pub fn new(new: NewJob, timing: JobTiming, now: Millis) -> Self {
        Self {
            id: new.id,
            owner: new.owner,
            workflow: new.workflow,
            workflow_version: new.workflow_version,
            params: new.params,
            input: new.input,
            state: JobState::Queued,
            attempts: 0,
            runpod_job_id: None,
            timestamps: Timestamps {
                created_at: now,
                updated_at: now,
                ..Timestamps::default()
            },
            outputs: Vec::new(),
            error: None,
            delay_time_ms: None,
            execution_time_ms: None,
            idempotency_expires_at: new
                .idempotency_key
                .as_ref()
                .map(|_| now / 1000 + timing.idempotency_window_secs),
            idempotency_key: new.idempotency_key,
            request_digest: new.request_digest,
            callback_url: new.callback_url,
            callback_events: new.callback_events,
            version: 1,
            deadline_at: now + timing.deadline_ms,
            next_check_at: Some(now + timing.first_check_ms),
            lease: None,
            expires_at: now / 1000 + timing.retention_secs + timing.tombstone_secs,
            retain_until: now + timing.retention_secs * 1000,
            deletion: None,
            history: vec![JobEvent {
                at: now,
                from: None,
                to: JobState::Queued,
                by: Actor::Client,
            }],
            check_failures: 0,
            unconfirmed_run_at: None,
            write_id: None,
            cleanup_pending: false,
            cleanup_delay_ms: timing.cleanup_delay_ms,
            handoff: None,
            progress: None,
            callback_pending: false,
            progress_told_at: None,
            gpu_price_nano_usd: None,
            usage: None,
            backend: new.backend,
            priority: new.priority,
            unseen_at: None,
            rerun_pending: false,
            reruns: 0,
            batch_id: None,
            holds: Vec::new(),
            trace_id: None,
            acting: Acting::default(),
        }
    }

    /// Names who makes the changes that follow (recorded in their history entries). The app
    /// layer sets it before each change it applies; a job read from the store starts as
    /// [`Actor::Gateway`].
    pub fn acting_as(&mut self, by: Actor) -> &mut Self {
        self.acting = Acting(by);
        self
    }

    /// Refuses while another caller holds a lease on the job: a caller that did not take the
    /// lease must not decide the job's end under the holder's feet (the holder is finishing it,
    /// and when it is gone its lease runs out).
    pub fn ensure_unleased(&self, now: Millis) -> Result<(), TransitionError> {
        match self.active_lease(now) {
            Some(lease) => Err(TransitionError::Leased(lease.kind, lease.until)),
            None => Ok(()),
        }
    }

    /// Counts one more transient failure to check the job; see [`Job::check_failures`].
    pub fn note_check_failure(&mut self) {
        self.check_failures = self.check_failures.saturating_add(1);
    }

    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }

    /// The job's trace id: the one it was given, or for older records one derived from its id
    /// (the same every time, so that their lines still go together).
    pub fn trace(&self) -> String {
        match &self.trace_id {
            Some(trace) => trace.clone(),
            None => derived_trace(&self.id, self.timestamps.created_at),
        }
    }

    pub fn past_deadline(&self, now: Millis) -> bool {
        now >= self.deadline_at
    }

    /// The lease still in force at `now`, if any.
    pub fn active_lease(&self, now: Millis) -> Option<&Lease> {
        self.lease.as_ref().filter(|lease| lease.until > now)
    }

    fn touch(&mut self, now: Millis) {
        self.version += 1;
        self.timestamps.updated_at = now;
    }

    fn ensure_open(&self) -> Result<(), TransitionError> {
        if self.is_terminal() {
            return Err(TransitionError::AlreadyTerminal(self.state));
        }
        Ok(())
    }

    /// Takes a lease for an internal step; refused while another lease is in force.
    pub fn acquire_lease(
        &mut self,
        kind: LeaseKind,
        now: Millis,
        duration_ms: Millis,
    ) -> Result<(), TransitionError> {
        self.ensure_open()?;
        if let Some(lease) = self.active_lease(now) {
            return Err(TransitionError::Leased(lease.kind, lease.until));
        }
        let until = now + duration_ms;
        self.lease = Some(Lease { kind, until });
        // If the holder dies, the sweeper picks the job up right after the lease runs out.
        self.next_check_at = Some(until);
        if kind == LeaseKind::Dispatch {
            self.attempts += 1;
        }
        self.touch(now);
        Ok(())
    }

    /// Refuses unless the job still carries `lease`, the lease its caller took.
    pub fn ensure_holds(&self, lease: Option<&Lease>) -> Result<(), TransitionError> {
        if self.lease.as_ref() == lease {
            Ok(())
        } else {
            Err(TransitionError::LeaseLost)
        }
    }

    /// Gives a lease back after a step failed transiently, so a retry need not wait it out.
    pub fn release_lease(&mut self, now: Millis, next_check_at: Millis) {
        self.lease = None;
        if !self.is_terminal() {
            self.next_check_at = Some(next_check_at);
        }
        self.touch(now);
    }

    /// RunPod accepted the job. A report from RunPod may have moved the job on before dispatch
    /// could record the submission; then only RunPod's id is added, the state stays.
    pub fn mark_submitted(
        &mut self,
        runpod_job_id: String,
        now: Millis,
        next_check_at: Millis,
    ) -> Result<(), TransitionError> {
        // The first run recorded is the job's run; any other is an extra to cancel, unless
        // the job's run was lost and this is the run that replaces it.
        if !self.rerun_pending
            && self
                .runpod_job_id
                .as_ref()
                .is_some_and(|tracked| *tracked != runpod_job_id)
        {
            return Err(TransitionError::Stale);
        }
        self.rerun_pending = false;
        self.unseen_at = None;
        if self.state == JobState::Queued {
            self.advance(JobState::Submitted, now)?;
        } else {
            self.ensure_open()?;
            self.touch(now);
        }
        self.runpod_job_id = Some(runpod_job_id);
        self.unconfirmed_run_at = None;
        if matches!(
            self.lease,
            Some(Lease {
                kind: LeaseKind::Dispatch,
                ..
            })
        ) {
            self.lease = None;
        }
        self.next_check_at = Some(next_check_at);
        Ok(())
    }

    /// A `/run` whose outcome is unknown (RunPod may hold a run it could not confirm): the
    /// lease goes, and the job is not dispatched again before `recheck_at`, giving a lost run
    /// time to announce itself.
    pub fn note_unconfirmed_run(&mut self, now: Millis, recheck_at: Millis) {
        self.unconfirmed_run_at = Some(now);
        self.release_lease(now, recheck_at);
    }

    /// A check found the job's run at neither its backend's queue nor its history: noted the
    /// first time only, so that the time between two such checks can be told.
    pub fn note_unseen(&mut self, now: Millis) -> Result<(), TransitionError> {
        self.ensure_open()?;
        if self.unseen_at.is_none() {
            self.unseen_at = Some(now);
        }
        self.touch(now);
        Ok(())
    }

    /// The job's run is lost (unseen twice, some seconds apart): the job waits for dispatch
    /// to start it again with the same input, once. Refused if the job has moved on since the
    /// run was found missing (another run, a hand-off), or if its one re-run was spent.
    pub fn rerun_lost(
        &mut self,
        run: &str,
        now: Millis,
        next_check_at: Millis,
    ) -> Result<(), TransitionError> {
        self.ensure_open()?;
        if self.runpod_job_id.as_deref() != Some(run) || self.current_handoff().is_some() {
            return Err(TransitionError::Stale);
        }
        if self.reruns >= MAX_RERUNS {
            return Err(TransitionError::Stale);
        }
        self.reruns += 1;
        self.rerun_pending = true;
        self.unseen_at = None;
        self.progress = None;
        self.next_check_at = Some(next_check_at);
        self.touch(now);
        Ok(())
    }

    /// Whether the job's one re-run of a lost run is still to be had.
    pub fn may_rerun(&self) -> bool {
        self.reruns < MAX_RERUNS
    }

    /// Whether dispatch has a run to start: the job is queued, or its run was lost and waits
    /// to be started again.
    pub fn awaits_dispatch(&self) -> bool {
        self.state == JobState::Queued || (self.rerun_pending && !self.is_terminal())
    }

    /// A worker took the job.
    pub fn mark_running(&mut self, now: Millis) -> Result<(), TransitionError> {
        self.advance(JobState::Running, now)
    }

    /// RunPod confirmed that `run`, the job's run, completed, and its report is stored at
    /// `report_key`: the job is the finalize function's from here. A second hand-off of the
    /// same run changes nothing (refused as [`TransitionError::Stale`]), so a duplicate webhook
    /// or a sweep racing the webhook stores one hand-off.
    pub fn hand_off(
        &mut self,
        run: &str,
        report_key: String,
        now: Millis,
        next_check_at: Millis,
    ) -> Result<(), TransitionError> {
        self.ensure_open()?;
        if self.runpod_job_id.as_deref() != Some(run) {
            return Err(TransitionError::Stale);
        }
        if self.handoff.as_ref().is_some_and(|h| h.run == run) {
            return Err(TransitionError::Stale);
        }
        if self.state.rank() < JobState::Running.rank() {
            self.advance(JobState::Running, now)?;
        }
        self.handoff = Some(Handoff {
            run: run.to_string(),
            report_key,
            at: now,
        });
        self.next_check_at = Some(next_check_at);
        self.touch(now);
        Ok(())
    }

    /// The hand-off finalize works from: only while it is about the run the job tracks.
    pub fn current_handoff(&self) -> Option<&Handoff> {
        self.handoff
            .as_ref()
            .filter(|h| self.runpod_job_id.as_deref() == Some(h.run.as_str()))
    }

    /// Schedules the next sweeper look without changing the state.
    pub fn reschedule(
        &mut self,
        now: Millis,
        next_check_at: Millis,
    ) -> Result<(), TransitionError> {
        self.ensure_open()?;
        self.next_check_at = Some(next_check_at);
        self.touch(now);
        Ok(())
    }

    pub fn succeed(
        &mut self,
        outputs: Vec<OutputFile>,
        now: Millis,
    ) -> Result<(), TransitionError> {
        self.finish(JobState::Succeeded, None, now)?;
        self.outputs = outputs;
        Ok(())
    }

    pub fn fail(&mut self, error: JobError, now: Millis) -> Result<(), TransitionError> {
        self.finish(JobState::Failed, Some(error), now)
    }

    /// Ends the job without outputs: `state` is failed, cancelled or timed out.
    pub fn end(
        &mut self,
        state: JobState,
        error: JobError,
        now: Millis,
    ) -> Result<(), TransitionError> {
        debug_assert!(
            state.is_terminal() && state != JobState::Succeeded,
            "{state} is not an end without outputs"
        );
        self.finish(state, Some(error), now)
    }

    pub fn cancel(&mut self, error: JobError, now: Millis) -> Result<(), TransitionError> {
        self.finish(JobState::Cancelled, Some(error), now)
    }

    pub fn time_out(&mut self, error: JobError, now: Millis) -> Result<(), TransitionError> {
        self.finish(JobState::TimedOut, Some(error), now)
    }

    /// Records what the worker last reported of its progress, making a submitted job running
    /// (a worker reporting progress has the job). Returns whether anything changed: a report
    /// repeating the last one is no reason to write.
    pub fn report_progress(
        &mut self,
        fraction: Option<f64>,
        message: Option<String>,
        now: Millis,
    ) -> Result<bool, TransitionError> {
        self.ensure_open()?;
        let mut changed = false;
        if self.state != JobState::Running {
            self.mark_running(now)?;
            changed = true;
        }
        let same = self
            .progress
            .as_ref()
            .is_some_and(|p| p.fraction == fraction && p.message == message);
        if !same {
            self.progress = Some(Progress {
                fraction,
                message,
                at: now,
            });
            changed = true;
        }
        Ok(changed)
    }

    /// GPU-seconds RunPod reported for the job (its `executionTime`).
    pub fn gpu_seconds(&self) -> Option<f64> {
        self.execution_time_ms.map(|ms| ms as f64 / 1000.0)
    }

    /// What the job's GPU time cost at its price, in nano-USD; `None` without a price.
    pub fn cost_nano_usd(&self) -> Option<u64> {
        let price = self.gpu_price_nano_usd?;
        let gpu_ms = u128::from(self.execution_time_ms.unwrap_or(0));
        u64::try_from(gpu_ms * u128::from(price) / 1000).ok()
    }

    /// Records what the job adds to its owner's usage, as the write of `version` ends it.
    pub fn count_usage(&mut self, version: u64) {
        let ended = self
            .timestamps
            .finished_at
            .unwrap_or(self.timestamps.updated_at);
        self.usage = Some(UsageEntry {
            day: utc_day(ended),
            state: self.state,
            gpu_ms: self.execution_time_ms.unwrap_or(0),
            cost_nano_usd: self.cost_nano_usd().unwrap_or(0),
            version,
        });
    }

    /// The usage entry the write of this version must add to its owner's totals, if this
    /// version is the one that ended the job.
    pub fn usage_to_count(&self) -> Option<&UsageEntry> {
        self.usage.as_ref().filter(|u| u.version == self.version)
    }

    /// Records RunPod's timings when it reports them.
    pub fn record_runpod_times(&mut self, delay_ms: Option<u64>, execution_ms: Option<u64>) {
        self.delay_time_ms = delay_ms.or(self.delay_time_ms);
        self.execution_time_ms = execution_ms.or(self.execution_time_ms);
    }

    fn finish(
        &mut self,
        state: JobState,
        error: Option<JobError>,
        now: Millis,
    ) -> Result<(), TransitionError> {
        self.advance(state, now)?;
        self.error = error;
        self.lease = None;
        // Due for the sweeper once no finalize attempt can still be at work, to remove what
        // the job left behind.
        self.next_check_at = Some(now + self.cleanup_delay_ms);
        self.cleanup_pending = true;
        // The end's follow-ups: the client's callback, and the slot it held for the next job.
        self.callback_pending = self.callback_url.is_some() || !self.holds.is_empty();
        self.timestamps.finished_at = Some(now);
        Ok(())
    }

    /// An ended job's clean-up is to happen at `at`, not sooner.
    pub fn defer_cleanup(&mut self, at: Millis) -> Result<(), TransitionError> {
        if !self.is_terminal() || !self.cleanup_pending {
            return Err(TransitionError::Stale);
        }
        self.next_check_at = Some(at);
        Ok(())
    }

    /// What an ended job left behind is gone. The job stays in the sweep index until its
    /// retention ends, when the sweeper deletes its data.
    pub fn cleaned_up(&mut self) -> Result<(), TransitionError> {
        if !self.is_terminal() || !self.cleanup_pending {
            return Err(TransitionError::Stale);
        }
        self.cleanup_pending = false;
        // The sweeper asked for the job's end callback before this write.
        self.callback_pending = false;
        self.next_check_at = self.purge_due();
        Ok(())
    }

    /// When the job's data stops being served: its retention's end.
    pub fn retained_until(&self) -> Millis {
        if self.retain_until > 0 {
            self.retain_until
        } else {
            self.expires_at * 1000
        }
    }

    /// The job's data is no longer to be served at `now`: deleted, or past its retention.
    pub fn gone(&self, now: Millis) -> Option<DeletionReason> {
        match &self.deletion {
            Some(deletion) => Some(deletion.reason),
            None if now >= self.retained_until() => Some(DeletionReason::Expired),
            None => None,
        }
    }

    /// When the sweeper is next to purge the job's data, if it still has any.
    fn purge_due(&self) -> Option<Millis> {
        match &self.deletion {
            Some(deletion) if deletion.purged => None,
            Some(deletion) => Some(deletion.at),
            None => Some(self.retained_until()),
        }
    }

    /// The owner deleted the job (it has ended: the API cancels one in flight first). Its
    /// outputs are no longer named, and the sweeper purges everything it left right away.
    /// Deleting a deleted job changes nothing.
    pub fn delete(&mut self, now: Millis) -> Result<(), TransitionError> {
        if !self.is_terminal() {
            return Err(TransitionError::Backwards {
                from: self.state,
                to: self.state,
            });
        }
        if self.deletion.is_some() {
            return Err(TransitionError::Stale);
        }
        self.deletion = Some(Deletion {
            reason: DeletionReason::Client,
            at: now,
            purged: false,
        });
        self.outputs.clear();
        self.next_check_at = Some(now);
        self.touch(now);
        Ok(())
    }

    /// The purge is to run again at `at`: it failed, or a finalize attempt may still be
    /// copying until then.
    pub fn defer_purge(&mut self, at: Millis) -> Result<(), TransitionError> {
        if !self.is_terminal() || self.deletion.as_ref().is_some_and(|d| d.purged) {
            return Err(TransitionError::Stale);
        }
        self.next_check_at = Some(at);
        Ok(())
    }

    /// Everything the job left is gone (the sweeper listed and removed it): the job leaves the
    /// sweep index for good, a tombstone until the record's TTL.
    pub fn purged(&mut self, reason: DeletionReason, now: Millis) -> Result<(), TransitionError> {
        if !self.is_terminal() {
            return Err(TransitionError::Stale);
        }
        let at = self.deletion.as_ref().map_or(now, |d| d.at);
        let reason = self.deletion.as_ref().map_or(reason, |d| d.reason);
        self.deletion = Some(Deletion {
            reason,
            at,
            purged: true,
        });
        self.outputs.clear();
        self.cleanup_pending = false;
        // Its delivery log is gone with the rest: a deleted job is told of no more.
        self.callback_pending = false;
        self.next_check_at = None;
        self.touch(now);
        Ok(())
    }

    fn advance(&mut self, to: JobState, now: Millis) -> Result<(), TransitionError> {
        self.ensure_open()?;
        if to.rank() <= self.state.rank() {
            return Err(TransitionError::Backwards {
                from: self.state,
                to,
            });
        }
        // A job can be seen running only after RunPod has it; jumping over states (a webhook
        // that arrives before the IN_PROGRESS poll) still stamps the skipped ones once.
        if to.rank() >= JobState::Submitted.rank() && self.timestamps.submitted_at.is_none() {
            self.timestamps.submitted_at = Some(now);
        }
        if to == JobState::Running {
            self.timestamps.running_at = Some(now);
        }
        if self.history.len() < MAX_HISTORY {
            // Writers run on different machines with their own clocks (and may have read the
            // time a little before writing): the history stays in order whatever they say.
            let after = self.history.last().map_or(now, |last| last.at);
            self.history.push(JobEvent {
                at: now.max(after),
                from: Some(self.state),
                to,
                by: self.acting.0,
            });
        }
        self.state = to;
        self.check_failures = 0;
        self.touch(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_id_tells_when_it_was_minted() {
        let id = mint_job_id(1_790_000_000_123);
        assert_eq!(job_id_minted_at(&id), Some(1_790_000_000_123));
    }

    #[test]
    fn job_ids_sort_by_when_they_were_minted() {
        let ids: Vec<String> = [
            5_000,
            1_790_000_000_000,
            1_790_000_000_001,
            1_890_000_000_000,
        ]
        .map(mint_job_id)
        .into();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids);
    }

    #[test]
    fn only_a_canonical_uuid_v7_is_a_job_id() {
        let id = mint_job_id(1_790_000_000_000);
        assert_eq!(job_id_minted_at(&id.to_uppercase()), None);
        assert_eq!(job_id_minted_at(&id.replace('-', "")), None);
        assert_eq!(job_id_minted_at(&uuid::Uuid::new_v4().to_string()), None);
        assert_eq!(job_id_minted_at("inputs"), None);
        assert_eq!(job_id_minted_at(""), None);
    }
    use std::collections::BTreeMap;

    const TIMING: JobTiming = JobTiming {
        deadline_ms: 3_600_000,
        first_check_ms: 120_000,
        retention_secs: 86_400,
        tombstone_secs: 7 * 86_400,
        idempotency_window_secs: 86_400,
        cleanup_delay_ms: 5_000,
    };

    fn job() -> Job {
        Job::new(
            NewJob {
                id: "01900000-0000-7000-8000-000000000001".into(),
                owner: "alice".into(),
                workflow: "restore".into(),
                workflow_version: "1".into(),
                params: ValidatedParams(BTreeMap::new()),
                input: InputRef {
                    key: "uploads/alice/x/input.jpg".into(),
                    content_type: "image/jpeg".into(),
                    size: 10,
                    extension: "jpg".into(),
                    source_url: None,
                },
                idempotency_key: None,
                request_digest: None,
                callback_url: None,
                callback_events: Vec::new(),
                backend: Default::default(),
                priority: Default::default(),
            },
            TIMING,
            1_000,
        )
    }

    #[test]
    fn a_new_job_is_queued_and_due_for_a_first_check() {
        let job = job();
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.next_check_at, Some(121_000));
        assert_eq!(job.deadline_at, 3_601_000);
        assert_eq!(job.version, 1);
    }

    #[test]
    fn every_change_bumps_the_version() {
        let mut job = job();
        job.mark_submitted("rp-1".into(), 2_000, 62_000).unwrap();
        assert_eq!(job.version, 2);
        job.mark_running(3_000).unwrap();
        assert_eq!(job.version, 3);
    }

    #[test]
    fn states_never_move_backwards() {
        let mut job = job();
        job.mark_running(2_000).unwrap();
        let err = job.mark_running(3_000).unwrap_err();
        assert!(matches!(err, TransitionError::Backwards { .. }));
        assert_eq!(job.state, JobState::Running);
    }

    #[test]
    fn a_late_submission_record_adds_the_runpod_id_without_going_back() {
        let mut job = job();
        job.mark_running(2_000).unwrap();
        job.mark_submitted("rp-1".into(), 3_000, 9_000).unwrap();
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.runpod_job_id.as_deref(), Some("rp-1"));
    }

    #[test]
    fn a_terminal_state_is_final() {
        let mut job = job();
        job.succeed(vec![], 2_000).unwrap();
        let before = job.clone();
        assert_eq!(
            job.fail(JobError::new(ErrorCode::WorkerFailed, "x"), 3_000),
            Err(TransitionError::AlreadyTerminal(JobState::Succeeded))
        );
        assert!(job.reschedule(3_000, 4_000).is_err());
        assert_eq!(job, before);
    }

    #[test]
    fn an_ended_job_stays_in_the_sweeper_index_until_its_data_is_purged() {
        let mut job = job();
        job.mark_submitted("rp".into(), 2_000, 5_000).unwrap();
        job.time_out(JobError::new(ErrorCode::DeadlineExceeded, "late"), 9_000)
            .unwrap();
        assert_eq!(
            job.next_check_at,
            Some(9_000 + TIMING.cleanup_delay_ms),
            "due once no finalize can be at work"
        );
        assert!(job.cleanup_pending);
        assert_eq!(job.timestamps.finished_at, Some(9_000));

        job.defer_cleanup(20_000).unwrap();
        assert_eq!(job.next_check_at, Some(20_000));
        job.cleaned_up().unwrap();
        assert_eq!(
            job.next_check_at,
            Some(job.retained_until()),
            "due again when its retention ends"
        );
        assert_eq!(job.cleaned_up(), Err(TransitionError::Stale), "once");
        assert_eq!(job.defer_cleanup(30_000), Err(TransitionError::Stale));
        job.purged(DeletionReason::Expired, job.retained_until())
            .unwrap();
        assert_eq!(job.next_check_at, None, "out of the index for good");
    }

    #[test]
    fn only_an_ended_job_can_be_deleted_and_only_once() {
        let mut job = job();
        assert!(job.delete(2_000).is_err(), "the API cancels it first");
        job.cancel(JobError::new(ErrorCode::CancelledByClient, "x"), 2_000)
            .unwrap();
        job.delete(3_000).unwrap();
        assert_eq!(job.next_check_at, Some(3_000), "purged at once");
        assert_eq!(job.gone(3_000), Some(DeletionReason::Client));
        assert_eq!(job.delete(4_000), Err(TransitionError::Stale));
    }

    #[test]
    fn a_job_in_flight_has_no_cleanup_to_defer() {
        let mut job = job();
        assert_eq!(job.defer_cleanup(1), Err(TransitionError::Stale));
        assert_eq!(job.cleaned_up(), Err(TransitionError::Stale));
    }

    #[test]
    fn a_second_lease_is_refused_while_the_first_is_in_force() {
        let mut job = job();
        job.acquire_lease(LeaseKind::Dispatch, 2_000, 30_000)
            .unwrap();
        assert!(matches!(
            job.acquire_lease(LeaseKind::Dispatch, 3_000, 30_000),
            Err(TransitionError::Leased(LeaseKind::Dispatch, 32_000))
        ));
    }

    #[test]
    fn an_expired_lease_can_be_taken_over() {
        let mut job = job();
        job.acquire_lease(LeaseKind::Dispatch, 2_000, 30_000)
            .unwrap();
        job.acquire_lease(LeaseKind::Dispatch, 40_000, 30_000)
            .unwrap();
        assert_eq!(job.attempts, 2);
    }

    #[test]
    fn a_lease_makes_the_job_due_when_it_runs_out() {
        let mut job = job();
        job.acquire_lease(LeaseKind::Finalize, 2_000, 30_000)
            .unwrap();
        assert_eq!(job.next_check_at, Some(32_000));
    }

    #[test]
    fn skipping_to_a_terminal_state_stamps_submission_once() {
        let mut job = job();
        job.mark_submitted("rp".into(), 2_000, 5_000).unwrap();
        job.succeed(vec![], 9_000).unwrap();
        assert_eq!(job.timestamps.submitted_at, Some(2_000));
        assert_eq!(job.timestamps.finished_at, Some(9_000));
    }

    #[test]
    fn error_codes_say_whether_a_retry_can_help() {
        assert!(!JobError::new(ErrorCode::InvalidOutputPath, "x").retryable);
        assert!(JobError::new(ErrorCode::RunpodJobExpired, "x").retryable);
    }

    #[test]
    fn every_state_change_is_in_the_history_once() {
        let mut job = job();
        job.acting_as(Actor::Dispatch)
            .mark_submitted("rp".into(), 2_000, 5_000)
            .unwrap();
        // A second submission record (a late dispatch) changes no state: no event.
        job.mark_submitted("rp".into(), 2_500, 5_000).unwrap();
        job.acting_as(Actor::Webhook).mark_running(3_000).unwrap();
        job.acting_as(Actor::Sweeper)
            .succeed(vec![], 4_000)
            .unwrap();
        assert!(job
            .acting_as(Actor::Client)
            .cancel(JobError::new(ErrorCode::CancelledByClient, "x"), 5_000)
            .is_err());
        let steps: Vec<_> = job
            .history
            .iter()
            .map(|e| (e.from, e.to, e.by, e.at))
            .collect();
        assert_eq!(
            steps,
            [
                (None, JobState::Queued, Actor::Client, 1_000),
                (
                    Some(JobState::Queued),
                    JobState::Submitted,
                    Actor::Dispatch,
                    2_000
                ),
                (
                    Some(JobState::Submitted),
                    JobState::Running,
                    Actor::Webhook,
                    3_000
                ),
                (
                    Some(JobState::Running),
                    JobState::Succeeded,
                    Actor::Sweeper,
                    4_000
                ),
            ]
        );
    }

    #[test]
    fn the_history_stays_in_time_order_when_a_writers_clock_lags() {
        let mut job = job();
        job.mark_submitted("rp".into(), 5_000, 9_000).unwrap();
        job.time_out(JobError::new(ErrorCode::DeadlineExceeded, "late"), 4_000)
            .unwrap();
        let times: Vec<_> = job.history.iter().map(|e| e.at).collect();
        assert_eq!(times, [1_000, 5_000, 5_000]);
    }

    #[test]
    fn leases_and_reschedules_are_not_state_changes() {
        let mut job = job();
        job.acquire_lease(LeaseKind::Dispatch, 2_000, 1_000)
            .unwrap();
        job.release_lease(2_500, 9_000);
        job.reschedule(3_000, 9_000).unwrap();
        assert_eq!(job.history.len(), 1);
    }

    #[test]
    fn moving_on_clears_the_check_failures() {
        let mut job = job();
        job.note_check_failure();
        job.note_check_failure();
        assert_eq!(job.check_failures, 2);
        job.mark_running(2_000).unwrap();
        assert_eq!(job.check_failures, 0);
    }

    #[test]
    fn a_record_without_history_still_reads() {
        let mut value = serde_json::to_value(job()).unwrap();
        let object = value.as_object_mut().unwrap();
        object.remove("history");
        object.remove("check_failures");
        let old: Job = serde_json::from_value(value).unwrap();
        assert!(old.history.is_empty());
        assert_eq!(old.check_failures, 0);
    }

    #[test]
    fn a_record_with_one_hold_reads_as_a_list_of_one() {
        let mut value = serde_json::to_value(job()).unwrap();
        let object = value.as_object_mut().unwrap();
        object.remove("holds");
        object.insert(
            "hold".into(),
            serde_json::json!({"key": "batch:b", "limit": 3}),
        );

        let old: Job = serde_json::from_value(value).unwrap();

        assert_eq!(old.holds.len(), 1);
        assert_eq!(old.holds[0].key, "batch:b");
    }

    #[test]
    fn a_record_without_holds_reads_with_none() {
        let mut value = serde_json::to_value(job()).unwrap();
        value.as_object_mut().unwrap().remove("holds");

        let old: Job = serde_json::from_value(value).unwrap();

        assert!(old.holds.is_empty());
    }

    #[test]
    fn a_trace_header_gives_its_root() {
        assert_eq!(
            trace_from_header(
                "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
            ),
            Some("1-5759e988-bd862e3fe1be46a994272793".into())
        );
    }

    #[test]
    fn a_malformed_trace_header_is_ignored() {
        for header in [
            "",
            "Root=",
            "Root=1-xyz-abc",
            "Root=2-5759e988-bd862e3fe1be46a994272793",
            "Root=1-5759e988-bd862e3fe1be46a994272793-9",
        ] {
            assert_eq!(trace_from_header(header), None, "{header}");
        }
    }

    #[test]
    fn a_new_trace_is_well_formed() {
        let trace = new_trace(1_700_000_000_000);
        assert_eq!(trace_from_header(&format!("Root={trace}")), Some(trace));
    }

    #[test]
    fn a_record_without_a_trace_derives_the_same_one_every_time() {
        let job = job();
        assert!(job.trace_id.is_none());
        assert_eq!(job.trace(), job.trace());
        assert!(trace_from_header(&format!("Root={}", job.trace())).is_some());
    }

    #[test]
    fn state_names_round_trip() {
        for state in [JobState::Queued, JobState::TimedOut, JobState::Succeeded] {
            assert_eq!(JobState::parse(state.as_str()), Some(state));
        }
        assert_eq!(JobState::parse("finalizing"), None);
    }
}

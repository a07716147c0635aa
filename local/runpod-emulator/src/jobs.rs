//! The endpoint's job table and queue.
//!
//! Workers never touch jobs directly: they take a [`Lease`] and hand back an [`Outcome`]. The
//! lease carries the job's attempt number, so a result that arrives after the job was cancelled,
//! timed out, expired or retried is recognised as stale and dropped. The built-in worker uses
//! [`Store::builtin_turn`]/[`Store::finish`] and watches [`Lease::stop`]; external workers
//! (RunPod's `job-take`/`job-done`/`job-stop` protocol, see `worker_api`) use the `*_external`
//! variants and learn about stops from [`Store::take_stops`].
//!
//! The built-in worker's scaling lives here too (see [`Pool`]), so that a scale-up is decided
//! under the same lock as the queue change that calls for it: once `/run` has answered, whether
//! the job started a worker is settled.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::chaos::{FaultKind, JobPlan, Removal, WorkerPlan};
use crate::config::EmulatorConfig;
use crate::faults::FaultState;
use crate::webhook::WebhookDispatcher;

/// A job's state as `/status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    InQueue,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobStatus::InQueue | JobStatus::InProgress)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::InQueue => "IN_QUEUE",
            JobStatus::InProgress => "IN_PROGRESS",
            JobStatus::Completed => "COMPLETED",
            JobStatus::Failed => "FAILED",
            JobStatus::Cancelled => "CANCELLED",
            JobStatus::TimedOut => "TIMED_OUT",
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A point-in-time copy of one job, for tests and `GET /_emulator/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSnapshot {
    pub id: String,
    pub status: JobStatus,
    pub input: Value,
    pub webhook: Option<String>,
    pub s3_config: Option<Value>,
    pub execution_timeout_ms: u64,
    pub ttl_ms: u64,
    pub low_priority: bool,
    /// Submitted through `/runsync` (shorter result retention, `sync-` id).
    pub sync: bool,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// ms between (re)queueing and a worker taking the job (so far, while still queued).
    pub delay_time_ms: u64,
    /// ms the job has been running (so far, while still running).
    pub execution_time_ms: u64,
    /// 1 for the first run, +1 per `/retry`.
    pub attempt: u32,
    /// The worker holding or last holding the job.
    pub worker_id: Option<String>,
}

impl JobSnapshot {
    /// The `/status` body: `{"delayTime","executionTime","id","status","output"?,"error"?}`.
    pub fn status_body(&self) -> Value {
        let mut body = Map::new();
        body.insert("delayTime".into(), json!(self.delay_time_ms));
        body.insert("executionTime".into(), json!(self.execution_time_ms));
        body.insert("id".into(), json!(self.id));
        body.insert("status".into(), json!(self.status));
        if let Some(output) = &self.output {
            body.insert("output".into(), output.clone());
        }
        if let Some(error) = &self.error {
            body.insert("error".into(), json!(error));
        }
        Value::Object(body)
    }
}

/// What a submission asks for, already validated by the API layer.
#[derive(Debug, Clone)]
pub(crate) struct NewJob {
    pub input: Value,
    pub webhook: Option<String>,
    pub s3_config: Option<Value>,
    pub execution_timeout: Duration,
    pub ttl: Duration,
    pub low_priority: bool,
    pub sync: bool,
    /// Keys the job's chaos draws (see `chaos.rs`); `None`: order of arrival.
    pub chaos_key: Option<String>,
}

/// A worker's claim on one attempt of a job.
#[derive(Debug, Clone)]
pub struct Lease {
    pub job_id: String,
    pub attempt: u32,
    pub input: Value,
    pub webhook: Option<String>,
    pub s3_config: Option<Value>,
    /// Turns `true` when the worker must stop (cancel, executionTimeout, TTL); the channel closing
    /// means the same.
    pub stop: watch::Receiver<bool>,
    /// What chaos decided for the job (the built-in worker honours it).
    pub(crate) plan: JobPlan,
}

/// How a worker ended a job.
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed(Option<Value>),
    Failed {
        error: String,
        output: Option<Value>,
    },
}

/// What became of a worker's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Accepted,
    /// The job exists but is no longer this worker's to finish (cancelled, timed out, retried).
    Stale,
    /// Unknown or expired job.
    NotFound,
}

/// Why `/retry` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryError {
    NotFound,
    NotRetryable(JobStatus),
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Health {
    pub completed: u64,
    pub failed: u64,
    pub in_progress: u64,
    pub in_queue: u64,
    pub retried: u64,
    pub workers_idle: u64,
    pub workers_running: u64,
}

#[derive(Debug)]
struct Job {
    id: String,
    input: Value,
    webhook: Option<String>,
    s3_config: Option<Value>,
    execution_timeout: Duration,
    ttl: Duration,
    low_priority: bool,
    sync: bool,
    submitted_at: Instant,
    queued_at: Instant,
    started_at: Option<Instant>,
    finished_at: Option<Instant>,
    status: JobStatus,
    output: Option<Value>,
    error: Option<String>,
    attempt: u32,
    worker_id: Option<String>,
    /// Held by an external worker, which learns about stops by polling `job-stop`.
    external: bool,
    /// Present exactly while the job is IN_PROGRESS.
    stop_tx: Option<watch::Sender<bool>>,
    /// Chaos decisions for this job (all normal without a chaos configuration).
    plan: JobPlan,
}

impl Job {
    fn snapshot(&self, now: Instant) -> JobSnapshot {
        let end = self.finished_at.unwrap_or(now);
        let delay_end = self.started_at.unwrap_or(end);
        let execution = self.started_at.map_or(Duration::ZERO, |started| {
            end.saturating_duration_since(started)
        });
        JobSnapshot {
            id: self.id.clone(),
            status: self.status,
            input: self.input.clone(),
            webhook: self.webhook.clone(),
            s3_config: self.s3_config.clone(),
            execution_timeout_ms: millis(self.execution_timeout),
            ttl_ms: millis(self.ttl),
            low_priority: self.low_priority,
            sync: self.sync,
            output: self.output.clone(),
            error: self.error.clone(),
            delay_time_ms: millis(delay_end.saturating_duration_since(self.queued_at)),
            execution_time_ms: millis(execution),
            attempt: self.attempt,
            worker_id: self.worker_id.clone(),
        }
    }

    /// Tells the holding worker to abandon the job: the built-in one through the lease, an
    /// external one through its next `job-stop` answer.
    fn signal_stop(&mut self, stops: &mut HashMap<String, Vec<String>>) {
        if let Some(tx) = self.stop_tx.take() {
            tx.send_replace(true);
            if let (true, Some(worker)) = (self.external, &self.worker_id) {
                stops
                    .entry(worker.clone())
                    .or_default()
                    .push(self.id.clone());
            }
        }
    }

    /// When the job stops existing for `/status`, given its current state.
    fn removal_deadline(&self, config: &EmulatorConfig) -> Instant {
        let ttl_end = self.submitted_at + self.ttl;
        match self.finished_at {
            None => ttl_end,
            Some(finished) => {
                let retention = if let Some(early) = self.plan.retention {
                    early
                } else if self.sync {
                    config.runsync_result_retention
                } else {
                    config.result_retention
                };
                let result_end = finished + retention;
                // A chaos TTL deletion removes the job at its TTL, finished or not.
                if config.ttl_covers_results || self.plan.ttl.is_some() {
                    result_end.min(ttl_end)
                } else {
                    result_end
                }
            }
        }
    }
}

/// An external worker that has not called in for this long no longer counts in `/health`
/// (the SDK long-polls `job-take` about once a minute at most).
const EXTERNAL_WORKER_LIVENESS: Duration = Duration::from_secs(120);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<String, Job>,
    queue: VecDeque<String>,
    /// External worker id → jobs it must stop, drained by `job-stop`.
    stops: HashMap<String, Vec<String>>,
    /// External worker id → last time it called in (job-take, job-done, ping…).
    pods: HashMap<String, Instant>,
    completed: u64,
    failed: u64,
    retried: u64,
    pool: Pool,
}

impl Inner {
    /// Starts built-in workers while more normal-priority jobs are queued than workers are idle,
    /// up to the maximum. Low-priority jobs do not count: RunPod documents that they do not
    /// trigger worker scaling. Called wherever the balance can tip: a job queued, a worker
    /// taking one (it may take a low-priority job, leaving a normal one without a free worker).
    fn scale_up(&mut self, now: Instant) {
        let waiting = self
            .queue
            .iter()
            .filter(|id| {
                self.jobs
                    .get(*id)
                    .is_some_and(|job| job.status == JobStatus::InQueue && !job.low_priority)
            })
            .count();
        while waiting > self.pool.idle() {
            let Some(slot) = self.pool.slots.iter_mut().find(|slot| **slot == Slot::Down) else {
                break;
            };
            *slot = Slot::Idle { since: now };
        }
        self.pool.peak = self.pool.peak.max(self.pool.up());
    }

    /// Removes and returns the id of the job a free worker takes next: the queue's head, or with
    /// `low_priority_last` the oldest normal-priority job if there is one.
    fn next_queued(&mut self, low_priority_last: bool) -> Option<String> {
        let Inner { queue, jobs, .. } = self;
        queue.retain(|id| {
            jobs.get(id)
                .is_some_and(|job| job.status == JobStatus::InQueue)
        });
        let normal = || queue.iter().position(|id| !jobs[id].low_priority);
        let at = if low_priority_last {
            normal().unwrap_or(0)
        } else {
            0
        };
        queue.remove(at)
    }
}

/// The built-in worker's workers, for tests (`Emulator::workers`, `GET /_emulator/workers`).
/// External (SDK) workers are not counted here; `/health` adds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCounts {
    /// Workers up now: `idle + running`.
    pub up: usize,
    pub idle: usize,
    pub running: usize,
    /// The most ever up at once since the emulator started.
    pub peak: usize,
    /// `workers_min` and `workers_max`, resolved (0 and 0 without the built-in worker).
    pub min: usize,
    pub max: usize,
}

/// One built-in worker, by slot index (`builtin-{index}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Down,
    /// Up with no job since `since` (when it came up or ended its last job).
    Idle {
        since: Instant,
    },
    Busy,
}

/// The built-in worker as RunPod's autoscaler runs an endpoint's workers: `max` slots, `min` of
/// them up from the start and never idling out; the others come up only for normal-priority jobs
/// ([`Inner::scale_up`]) and go down after the idle timeout ([`Store::builtin_turn`]).
#[derive(Debug, Default)]
struct Pool {
    slots: Vec<Slot>,
    min: usize,
    peak: usize,
}

impl Pool {
    fn new(min: usize, max: usize, now: Instant) -> Self {
        let slots = (0..max)
            .map(|i| {
                if i < min {
                    Slot::Idle { since: now }
                } else {
                    Slot::Down
                }
            })
            .collect();
        Self {
            slots,
            min,
            peak: min,
        }
    }

    fn count(&self, wanted: impl Fn(&Slot) -> bool) -> usize {
        self.slots.iter().filter(|slot| wanted(slot)).count()
    }

    fn idle(&self) -> usize {
        self.count(|slot| matches!(slot, Slot::Idle { .. }))
    }

    fn up(&self) -> usize {
        self.count(|slot| *slot != Slot::Down)
    }

    fn counts(&self) -> WorkerCounts {
        let idle = self.idle();
        let running = self.count(|slot| *slot == Slot::Busy);
        WorkerCounts {
            up: idle + running,
            idle,
            running,
            peak: self.peak,
            min: self.min,
            max: self.slots.len(),
        }
    }
}

/// What a built-in worker slot does next.
#[derive(Debug)]
pub(crate) enum Turn {
    Run(Lease),
    /// Nothing to run: wait for a change, or until the deadline, when an idle worker above the
    /// minimum is due to go down.
    Wait(Option<Instant>),
}

#[derive(Debug)]
pub(crate) struct Store {
    inner: Mutex<Inner>,
    /// Bumped on every state change; workers, `/runsync` waiters and the deadline task watch it.
    changes: watch::Sender<u64>,
    config: Arc<EmulatorConfig>,
    faults: Arc<FaultState>,
    hooks: Arc<WebhookDispatcher>,
    /// What the built-in worker wrote, by volume key: the truth a test compares stored outputs
    /// with after the gateway has cleaned the volume.
    written: Mutex<std::collections::HashMap<String, Vec<u8>>>,
}

impl Store {
    pub(crate) fn record_written(&self, key: String, bytes: Vec<u8>) {
        self.written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key, bytes);
    }

    pub(crate) fn written(&self, key: &str) -> Option<Vec<u8>> {
        self.written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(key)
            .cloned()
    }

    pub(crate) fn new(
        config: Arc<EmulatorConfig>,
        faults: Arc<FaultState>,
        hooks: Arc<WebhookDispatcher>,
    ) -> Self {
        let mut inner = Inner::default();
        if config.builtin_worker {
            let (min, max) = config.worker_bounds();
            inner.pool = Pool::new(min, max, Instant::now());
        }
        Self {
            inner: Mutex::new(inner),
            changes: watch::Sender::new(0),
            config,
            faults,
            hooks,
            written: Mutex::default(),
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Locks the table with every time-based transition that is due already applied, so reads
    /// are exact even between two runs of the deadline task.
    fn lock_current(&self) -> (MutexGuard<'_, Inner>, Instant) {
        let now = Instant::now();
        let mut inner = self.lock();
        if self.apply_deadlines(&mut inner, now) {
            self.bump();
        }
        (inner, now)
    }

    pub(crate) fn submit(&self, new: NewJob) -> JobSnapshot {
        let suffix = &self.config.job_id_suffix;
        let id = if new.sync {
            format!("sync-{}{suffix}", uuid::Uuid::new_v4())
        } else {
            format!("{}{suffix}", uuid::Uuid::new_v4())
        };
        let plan = match self.faults.chaos_config() {
            Some(chaos) => {
                self.faults.chaos.accepted(&id, new.webhook.as_deref());
                self.faults.chaos.plan(&chaos, new.chaos_key.as_deref())
            }
            None => JobPlan::default(),
        };
        let (mut inner, now) = self.lock_current();
        let job = Job {
            id: id.clone(),
            input: new.input,
            webhook: new.webhook,
            s3_config: new.s3_config,
            execution_timeout: new.execution_timeout,
            ttl: plan.ttl.map_or(new.ttl, |cut| cut.min(new.ttl)),
            low_priority: new.low_priority,
            sync: new.sync,
            submitted_at: now,
            queued_at: now,
            started_at: None,
            finished_at: None,
            status: JobStatus::InQueue,
            output: None,
            error: None,
            attempt: 1,
            worker_id: None,
            external: false,
            stop_tx: None,
            plan,
        };
        let snapshot = job.snapshot(now);
        inner.jobs.insert(id.clone(), job);
        inner.queue.push_back(id);
        inner.scale_up(now);
        drop(inner);
        self.bump();
        snapshot
    }

    /// A job that ran elsewhere and COMPLETED with `output`, under the given id: the state a
    /// test starts from when it replays a recorded webhook for that id.
    pub(crate) fn insert_completed(&self, id: &str, output: Value) -> JobSnapshot {
        let (mut inner, now) = self.lock_current();
        let job = Job {
            id: id.to_string(),
            input: Value::Null,
            webhook: None,
            s3_config: None,
            execution_timeout: Duration::from_secs(600),
            ttl: Duration::from_secs(86_400),
            low_priority: false,
            sync: false,
            submitted_at: now,
            queued_at: now,
            started_at: Some(now),
            finished_at: Some(now),
            status: JobStatus::Completed,
            output: Some(output),
            error: None,
            attempt: 1,
            worker_id: None,
            external: false,
            stop_tx: None,
            plan: JobPlan::default(),
        };
        let snapshot = job.snapshot(now);
        inner.jobs.insert(id.to_string(), job);
        drop(inner);
        self.bump();
        snapshot
    }

    /// Jobs waiting for a worker.
    pub(crate) fn queued(&self) -> usize {
        let (inner, _) = self.lock_current();
        inner
            .jobs
            .values()
            .filter(|job| job.status == JobStatus::InQueue)
            .count()
    }

    pub(crate) fn get(&self, id: &str) -> Option<JobSnapshot> {
        let (inner, now) = self.lock_current();
        inner.jobs.get(id).map(|job| job.snapshot(now))
    }

    pub(crate) fn all(&self) -> Vec<JobSnapshot> {
        let (inner, now) = self.lock_current();
        let mut jobs: Vec<_> = inner.jobs.values().map(|job| job.snapshot(now)).collect();
        jobs.sort_by(|a, b| a.id.cmp(&b.id));
        jobs
    }

    /// `/cancel`: queued jobs leave the queue, running ones are told to stop, terminal jobs stay
    /// as they are. Returns the resulting status, or `None` for an unknown job.
    pub(crate) fn cancel(&self, id: &str) -> Option<JobStatus> {
        let (mut inner, now) = self.lock_current();
        let inner = &mut *inner;
        let job = inner.jobs.get_mut(id)?;
        if job.status.is_terminal() {
            return Some(job.status);
        }
        if job.status == JobStatus::InQueue {
            inner.queue.retain(|queued| queued != id);
        }
        job.signal_stop(&mut inner.stops);
        job.status = JobStatus::Cancelled;
        // A progress report is no output: an ended run without a result shows none.
        job.output = None;
        job.finished_at = Some(now);
        self.record_end(job, now);
        self.send_webhook(job, now);
        self.bump();
        Some(JobStatus::Cancelled)
    }

    /// `/retry`: only FAILED or TIMED_OUT jobs whose result still exists go back to the queue,
    /// same id and input, previous output and error dropped.
    pub(crate) fn retry(&self, id: &str) -> Result<JobStatus, RetryError> {
        let (mut inner, now) = self.lock_current();
        let inner = &mut *inner;
        let job = inner.jobs.get_mut(id).ok_or(RetryError::NotFound)?;
        if !matches!(job.status, JobStatus::Failed | JobStatus::TimedOut) {
            return Err(RetryError::NotRetryable(job.status));
        }
        job.status = JobStatus::InQueue;
        job.queued_at = now;
        job.started_at = None;
        job.finished_at = None;
        job.output = None;
        job.error = None;
        job.worker_id = None;
        job.attempt += 1;
        inner.queue.push_back(id.to_owned());
        inner.retried += 1;
        inner.scale_up(now);
        self.bump();
        Ok(JobStatus::InQueue)
    }

    /// `/purge-queue`: drops every queued job. Whether RunPod keeps purged jobs around as
    /// CANCELLED is not documented; here they are gone (404), like any removed job.
    pub(crate) fn purge_queue(&self) -> usize {
        let (mut inner, _) = self.lock_current();
        let inner = &mut *inner;
        let queued: Vec<String> = inner.queue.drain(..).collect();
        let mut removed = 0;
        for id in queued {
            if inner
                .jobs
                .get(&id)
                .is_some_and(|job| job.status == JobStatus::InQueue)
                && inner.jobs.remove(&id).is_some()
            {
                self.record_removal(&id, Removal::Purged);
                removed += 1;
            }
        }
        if removed > 0 {
            self.bump();
        }
        removed
    }

    pub(crate) fn health(&self) -> Health {
        let (inner, _) = self.lock_current();
        let mut health = Health {
            completed: inner.completed,
            failed: inner.failed,
            retried: inner.retried,
            ..Health::default()
        };
        for job in inner.jobs.values() {
            match job.status {
                JobStatus::InQueue => health.in_queue += 1,
                JobStatus::InProgress => health.in_progress += 1,
                _ => {}
            }
        }
        let builtin = inner.pool.counts();
        health.workers_running = builtin.running as u64;
        health.workers_idle = builtin.idle as u64;
        let now = Instant::now();
        for (pod, seen) in &inner.pods {
            if now.saturating_duration_since(*seen) > EXTERNAL_WORKER_LIVENESS {
                continue;
            }
            let busy = inner.jobs.values().any(|job| {
                job.external
                    && job.status == JobStatus::InProgress
                    && job.worker_id.as_deref() == Some(pod.as_str())
            });
            if busy {
                health.workers_running += 1;
            } else {
                health.workers_idle += 1;
            }
        }
        health
    }

    /// Slots of the built-in worker (`workers_max`; 0 without it).
    pub(crate) fn builtin_slots(&self) -> usize {
        self.lock().pool.slots.len()
    }

    /// The built-in worker's counts now.
    pub(crate) fn workers(&self) -> WorkerCounts {
        self.lock().pool.counts()
    }

    /// The next step of built-in worker slot `slot`: a job if it is up and one is queued;
    /// otherwise it waits, and an idle worker above the minimum goes down once it has been idle
    /// for the idle timeout. Taking a job comes first, so a worker never goes down with work
    /// queued that it could run.
    pub(crate) fn builtin_turn(&self, slot: usize) -> Turn {
        let (mut inner, now) = self.lock_current();
        let Some(Slot::Idle { since }) = inner.pool.slots.get(slot).copied() else {
            return Turn::Wait(None);
        };
        let worker_id = format!("builtin-{slot}");
        if let Some(lease) = self.start_next(&mut inner, &worker_id, false, now) {
            inner.pool.slots[slot] = Slot::Busy;
            inner.scale_up(now);
            drop(inner);
            self.bump();
            return Turn::Run(lease);
        }
        if inner.pool.up() <= inner.pool.min {
            // Any change that could lift the count above the minimum wakes the slot again.
            return Turn::Wait(None);
        }
        let due = since + self.config.worker_idle_timeout;
        if now < due {
            return Turn::Wait(Some(due));
        }
        inner.pool.slots[slot] = Slot::Down;
        tracing::info!(worker_id, "worker idle timeout: down");
        drop(inner);
        self.bump();
        Turn::Wait(None)
    }

    /// Built-in worker slot `slot` is done with its job (ended, stopped or dropped): idle again.
    pub(crate) fn builtin_done(&self, slot: usize) {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(state) = inner.pool.slots.get_mut(slot) {
            *state = Slot::Idle { since: now };
        }
        drop(inner);
        self.bump();
    }

    /// Hands up to `max` queued jobs to the external worker `pod`.
    pub fn take_external(&self, pod: &str, max: usize) -> Vec<Lease> {
        self.touch(pod);
        std::iter::from_fn(|| {
            let (mut inner, now) = self.lock_current();
            let lease = self.start_next(&mut inner, pod, true, now)?;
            drop(inner);
            self.bump();
            Some(lease)
        })
        .take(max)
        .collect()
    }

    /// Moves the next queued job (see [`Inner::next_queued`]) to IN_PROGRESS under `worker_id`.
    fn start_next(
        &self,
        inner: &mut Inner,
        worker_id: &str,
        external: bool,
        now: Instant,
    ) -> Option<Lease> {
        let id = inner.next_queued(self.config.low_priority_last)?;
        let job = inner.jobs.get_mut(&id)?;
        let (stop_tx, stop_rx) = watch::channel(false);
        job.status = JobStatus::InProgress;
        job.started_at = Some(now);
        job.worker_id = Some(worker_id.to_owned());
        job.external = external;
        job.stop_tx = Some(stop_tx);
        Some(Lease {
            job_id: id,
            attempt: job.attempt,
            input: job.input.clone(),
            webhook: job.webhook.clone(),
            s3_config: job.s3_config.clone(),
            stop: stop_rx,
            plan: job.plan.clone(),
        })
    }

    /// Records a worker's result. Returns `false` (and changes nothing) when the lease is stale:
    /// the job was cancelled, timed out, expired or retried since it was taken.
    pub fn finish(&self, job_id: &str, attempt: u32, outcome: Outcome) -> bool {
        self.finish_if(job_id, outcome, |job| job.attempt == attempt) == Finish::Accepted
    }

    /// `job-done` from an external worker. The SDK does not echo an attempt number, so the
    /// holder's id decides whether the result is current.
    pub fn finish_external(&self, pod: &str, job_id: &str, outcome: Outcome) -> Finish {
        self.touch(pod);
        self.finish_if(job_id, outcome, |job| {
            job.external && job.worker_id.as_deref() == Some(pod)
        })
    }

    fn finish_if(&self, job_id: &str, outcome: Outcome, current: impl Fn(&Job) -> bool) -> Finish {
        let (mut inner, now) = self.lock_current();
        let inner = &mut *inner;
        let Some(job) = inner.jobs.get_mut(job_id) else {
            return Finish::NotFound;
        };
        if job.status != JobStatus::InProgress || !current(job) {
            return Finish::Stale;
        }
        job.stop_tx = None;
        job.finished_at = Some(now);
        match outcome {
            Outcome::Completed(output) => {
                job.status = JobStatus::Completed;
                job.output = output;
                inner.completed += 1;
            }
            Outcome::Failed { error, output } => {
                job.status = JobStatus::Failed;
                job.output = output;
                job.error = Some(error);
                inner.failed += 1;
            }
        }
        self.record_end(job, now);
        self.send_webhook(job, now);
        self.bump();
        Finish::Accepted
    }

    /// The built-in worker's `progress_update` for attempt `attempt` of the job: `/status`
    /// shows IN_PROGRESS with this value as `output`. Ignored once that attempt is over.
    pub fn progress(&self, job_id: &str, attempt: u32, output: Value) {
        let (mut inner, _) = self.lock_current();
        if let Some(job) = inner.jobs.get_mut(job_id) {
            if job.status == JobStatus::InProgress && job.attempt == attempt {
                job.output = Some(output);
            }
        }
        drop(inner);
        self.bump();
    }

    /// A `progress_update`: `/status` shows IN_PROGRESS with this value as `output`.
    pub fn progress_external(&self, pod: &str, job_id: &str, output: Option<Value>) -> Finish {
        self.touch(pod);
        let (mut inner, _) = self.lock_current();
        let Some(job) = inner.jobs.get_mut(job_id) else {
            return Finish::NotFound;
        };
        if job.status != JobStatus::InProgress || job.worker_id.as_deref() != Some(pod) {
            return Finish::Stale;
        }
        job.output = output;
        drop(inner);
        self.bump();
        Finish::Accepted
    }

    /// Records that an external worker called in (for `/health`'s worker counts).
    pub fn touch(&self, pod: &str) {
        let now = Instant::now();
        self.lock().pods.insert(pod.to_owned(), now);
    }

    /// Drains the jobs the external worker `pod` must abandon (RunPod's `job-stop` answer):
    /// cancelled, timed out or expired while it held them.
    pub fn take_stops(&self, pod: &str) -> Vec<String> {
        self.touch(pod);
        let (mut inner, _) = self.lock_current();
        inner.stops.remove(pod).unwrap_or_default()
    }

    /// Applies due deadlines and returns when the next one falls, for the deadline task.
    pub(crate) fn tick(&self) -> Option<Instant> {
        let (inner, _) = self.lock_current();
        let mut next: Option<Instant> = None;
        for job in inner.jobs.values() {
            let mut candidates = vec![job.removal_deadline(&self.config)];
            if let (JobStatus::InProgress, Some(started)) = (job.status, job.started_at) {
                candidates.push(started + job.execution_timeout);
            }
            for deadline in candidates {
                next = Some(next.map_or(deadline, |n: Instant| n.min(deadline)));
            }
        }
        next
    }

    /// TTL, executionTimeout and result retention. Returns whether anything changed.
    fn apply_deadlines(&self, inner: &mut Inner, now: Instant) -> bool {
        let mut changed = false;
        let mut removed = Vec::new();
        let Inner {
            jobs,
            stops,
            failed,
            ..
        } = inner;
        for job in jobs.values_mut() {
            if job.status == JobStatus::InProgress {
                if let Some(started) = job.started_at {
                    let deadline = started + job.execution_timeout;
                    // TTL wins when both fall due: RunPod removes the job outright.
                    if now >= deadline && now < job.submitted_at + job.ttl {
                        job.signal_stop(stops);
                        job.status = JobStatus::TimedOut;
                        job.output = None;
                        job.finished_at = Some(deadline);
                        *failed += 1;
                        if job.plan.worker == WorkerPlan::Hang {
                            self.faults.chaos.record(FaultKind::WorkerTimedOut, &job.id);
                        }
                        self.record_end(job, now);
                        self.send_webhook(job, now);
                        changed = true;
                    }
                }
            }
            if now >= job.removal_deadline(&self.config) {
                job.signal_stop(stops);
                self.note_removal(job);
                removed.push(job.id.clone());
            }
        }
        if !removed.is_empty() {
            for id in &removed {
                inner.jobs.remove(id);
            }
            inner.queue.retain(|id| inner.jobs.contains_key(id));
            changed = true;
        }
        changed
    }

    /// Keeps the terminal snapshot for tests while a chaos configuration is set.
    fn record_end(&self, job: &Job, now: Instant) {
        if self.faults.chaos_config().is_some() {
            self.faults.chaos.ended(job.snapshot(now));
        }
    }

    fn record_removal(&self, id: &str, why: Removal) {
        if self.faults.chaos_config().is_some() {
            self.faults.chaos.removed(id, why);
        }
    }

    /// Records why a job is being removed, and the chaos fault behind it if there is one.
    fn note_removal(&self, job: &Job) {
        let why = if job.finished_at.is_none() {
            Removal::Ttl
        } else {
            let ttl_end = job.submitted_at + job.ttl;
            let by_ttl = (self.config.ttl_covers_results || job.plan.ttl.is_some())
                && job.removal_deadline(&self.config) >= ttl_end;
            if by_ttl {
                Removal::Ttl
            } else {
                Removal::Retention
            }
        };
        match why {
            Removal::Ttl if job.plan.ttl.is_some() => {
                self.faults.chaos.record(FaultKind::TtlDelete, &job.id);
            }
            Removal::Retention if job.plan.retention.is_some() => {
                self.faults.chaos.record(FaultKind::ResultExpiry, &job.id);
            }
            _ => {}
        }
        self.record_removal(&job.id, why);
    }

    /// Fires the job's webhook if it has one and the (partly UNCONFIRMED) rules say this state
    /// sends one. Delivery runs in the background.
    fn send_webhook(&self, job: &Job, now: Instant) {
        let Some(url) = job.webhook.as_deref() else {
            return;
        };
        let faults = self.faults.get();
        if job.sync && !faults.webhook_on_runsync {
            return;
        }
        let fires = match job.status {
            JobStatus::Completed | JobStatus::Failed => true,
            JobStatus::TimedOut => faults.webhook_on_timed_out,
            JobStatus::Cancelled => faults.webhook_on_cancelled,
            JobStatus::InQueue | JobStatus::InProgress => false,
        };
        if fires {
            let payload = crate::webhook::payload(&job.snapshot(now), url, &faults);
            self.hooks
                .dispatch(&job.id, url, &payload, &faults, job.plan.webhook);
        }
    }
}

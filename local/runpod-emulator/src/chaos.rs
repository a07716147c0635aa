//! Probabilistic faults under a seed ([`ChaosConfig`]), and the record of every fault injected.
//!
//! Every decision is a pure function of `(seed, decision, key, n)`:
//! - per-job decisions (worker outcome and delay, TTL deletion, result expiry, webhook faults) use
//!   the job's *chaos key*: the value at `job_key_pointer` in the job's input when that is set
//!   and present (a test puts a per-job number there), otherwise the order in which `/run`
//!   accepted the job;
//! - `/run` refusals use the job key and how many `/run` calls that key has made so far;
//! - `/status`/`/cancel` 5xx and volume S3 faults use a global request counter.
//!
//! So with a job key, a replay with the same seed injects the same per-job faults into the same
//! jobs, and the same `/run` refusals, whatever the timing. What thread timing still changes:
//! which request gets an S3 or status fault (counters follow arrival order), whether a fault
//! has an effect (a webhook lost for a job the client already cancelled), and what the gateway
//! does meanwhile. Without a job key, per-job faults follow the order of arrival too.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::ChaosConfig;
use crate::jobs::JobSnapshot;

/// The kinds of fault the emulator injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// `/run` answered 429.
    Run429,
    /// `/run` answered 500, 502 or 503.
    Run5xx,
    /// `/run` took the job, then answered 500/502/504, cut its answer off, or never answered.
    RunAnswerLost,
    /// `/status` or `/cancel` answered 500, 502 or 503.
    Api5xx,
    /// `/status` or `/cancel` was held `api_slow_ms` before answering.
    ApiSlow,
    /// The built-in worker ended the job FAILED.
    WorkerFailed,
    /// The built-in worker hung until the job's executionTimeout (TIMED_OUT).
    WorkerTimedOut,
    /// The job's TTL ran out and it was removed (404 on `/status`), whatever its state.
    TtlDelete,
    /// The job's result was removed early after it finished (404 on `/status`).
    ResultExpiry,
    /// The job's webhook was never sent.
    WebhookLost,
    /// The webhook was delivered twice, in parallel.
    WebhookDuplicate,
    /// The webhook's first attempt waited `webhook_delay_ms`.
    WebhookDelayed,
    /// The webhook was sent with an empty body.
    WebhookEmpty,
    /// A stale IN_PROGRESS report was sent after the final one.
    WebhookOutOfOrder,
    /// A volume S3 request answered 502.
    S3Error502,
    /// A volume S3 request was held `s3_slow_ms` before being served.
    S3Slow,
    /// A volume S3 GET was cut off halfway through its body.
    S3Truncated,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Run429 => "run_429",
            Self::Run5xx => "run_5xx",
            Self::RunAnswerLost => "run_answer_lost",
            Self::Api5xx => "api_5xx",
            Self::ApiSlow => "api_slow",
            Self::WorkerFailed => "worker_failed",
            Self::WorkerTimedOut => "worker_timed_out",
            Self::TtlDelete => "ttl_delete",
            Self::ResultExpiry => "result_expiry",
            Self::WebhookLost => "webhook_lost",
            Self::WebhookDuplicate => "webhook_duplicate",
            Self::WebhookDelayed => "webhook_delayed",
            Self::WebhookEmpty => "webhook_empty",
            Self::WebhookOutOfOrder => "webhook_out_of_order",
            Self::S3Error502 => "s3_502",
            Self::S3Slow => "s3_slow",
            Self::S3Truncated => "s3_truncated",
        }
    }
}

/// One injected fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InjectedFault {
    pub kind: FaultKind,
    /// The RunPod job id, or the request (`GET /bucket/key`) the fault hit.
    pub subject: String,
    /// Wall-clock time, ms since the Unix epoch.
    pub at_ms: u64,
}

/// Why a job stopped existing for `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Removal {
    /// Its TTL ran out (queued or running, or finished with a chaos TTL deletion).
    Ttl,
    /// Its result's retention ended.
    Retention,
    /// `/purge-queue` dropped it.
    Purged,
}

/// What the worker does with a job.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum WorkerPlan {
    #[default]
    Normal,
    Fail,
    Hang,
}

/// How a job's terminal webhook misbehaves.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct WebhookPlan {
    pub lost: bool,
    pub duplicate: bool,
    pub delay: Option<Duration>,
    pub empty: bool,
    pub out_of_order: bool,
}

/// Everything decided for one job when `/run` accepts it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct JobPlan {
    pub worker: WorkerPlan,
    pub worker_delay: Duration,
    /// Replaces the job's TTL; the job is then removed at submission + this, finished or not.
    pub ttl: Option<Duration>,
    /// Replaces the result retention after the job finishes.
    pub retention: Option<Duration>,
    pub webhook: WebhookPlan,
}

// One stream per decision, so decisions are independent of each other.
const RUN: u64 = 1;
const RUN_CODE: u64 = 2;
const API: u64 = 3;
const API_CODE: u64 = 4;
const WORKER: u64 = 5;
const WORKER_DELAY: u64 = 6;
const TTL: u64 = 7;
const TTL_AFTER: u64 = 8;
const EXPIRY: u64 = 9;
const HOOK_LOST: u64 = 10;
const HOOK_DUP: u64 = 11;
const HOOK_DELAY: u64 = 12;
const HOOK_EMPTY: u64 = 13;
const HOOK_ORDER: u64 = 14;
const S3_502: u64 = 15;
const S3_SLOW: u64 = 16;
const S3_CUT: u64 = 17;
const API_SLOW: u64 = 18;
const RUN_LOST: u64 = 19;
const RUN_LOST_HOW: u64 = 20;

/// How the answer to a `/run` that took the job is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LostAnswer {
    /// 500, 502 or 504.
    Status(u16),
    /// A 200 whose body stops inside the id.
    CutBody,
    /// No answer for this long (past the caller's timeout).
    Hang(u64),
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn fnv(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A uniform draw in [0, 1) fixed by its inputs (SplitMix64, stable across crate versions).
pub(crate) fn unit(seed: u64, stream: u64, key: &str, n: u64) -> f64 {
    let mixed = splitmix(splitmix(splitmix(seed ^ splitmix(stream)) ^ fnv(key)) ^ n);
    (mixed >> 11) as f64 / (1u64 << 53) as f64
}

fn between(u: f64, min: u64, max: u64) -> u64 {
    if max <= min {
        return min;
    }
    min + ((max - min + 1) as f64 * u) as u64
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Counters and the record of injected faults; lives in the fault state.
#[derive(Debug, Default)]
pub(crate) struct ChaosState {
    jobs: AtomicU64,
    runs: AtomicU64,
    requests: AtomicU64,
    s3_requests: AtomicU64,
    runs_per_key: Mutex<HashMap<String, u64>>,
    log: Mutex<Vec<InjectedFault>>,
    /// Terminal snapshots, kept after the job is removed, so a test can compare what the worker
    /// produced with what the gateway made of it.
    ended: Mutex<HashMap<String, JobSnapshot>>,
    /// When each job ended (Unix ms), for a test judging whether the gateway noticed in time.
    ended_at: Mutex<HashMap<String, u64>>,
    removed: Mutex<HashMap<String, Removal>>,
    /// Every job `/run` accepted: its id and webhook URL.
    accepted: Mutex<Vec<(String, Option<String>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ChaosState {
    /// Restarts the counters (a new run with the same seed replays from the start); the record
    /// of what was injected stays.
    pub(crate) fn restart(&self) {
        self.jobs.store(0, Ordering::SeqCst);
        self.runs.store(0, Ordering::SeqCst);
        self.requests.store(0, Ordering::SeqCst);
        self.s3_requests.store(0, Ordering::SeqCst);
        lock(&self.runs_per_key).clear();
    }

    pub(crate) fn record(&self, kind: FaultKind, subject: impl Into<String>) {
        let subject = subject.into();
        tracing::info!(kind = kind.as_str(), subject, "chaos: fault injected");
        lock(&self.log).push(InjectedFault {
            kind,
            subject,
            at_ms: now_ms(),
        });
    }

    pub(crate) fn log(&self) -> Vec<InjectedFault> {
        lock(&self.log).clone()
    }

    pub(crate) fn counts(&self) -> BTreeMap<FaultKind, u64> {
        let mut counts = BTreeMap::new();
        for fault in lock(&self.log).iter() {
            *counts.entry(fault.kind).or_default() += 1;
        }
        counts
    }

    pub(crate) fn ended(&self, snapshot: JobSnapshot) {
        lock(&self.ended_at)
            .entry(snapshot.id.clone())
            .or_insert_with(now_ms);
        lock(&self.ended).insert(snapshot.id.clone(), snapshot);
    }

    pub(crate) fn ended_at(&self, id: &str) -> Option<u64> {
        lock(&self.ended_at).get(id).copied()
    }

    pub(crate) fn ended_job(&self, id: &str) -> Option<JobSnapshot> {
        lock(&self.ended).get(id).cloned()
    }

    pub(crate) fn accepted(&self, id: &str, webhook: Option<&str>) {
        lock(&self.accepted).push((id.to_owned(), webhook.map(str::to_owned)));
    }

    pub(crate) fn accepted_jobs(&self) -> Vec<(String, Option<String>)> {
        lock(&self.accepted).clone()
    }

    pub(crate) fn removed(&self, id: &str, why: Removal) {
        lock(&self.removed).insert(id.to_owned(), why);
    }

    pub(crate) fn removal(&self, id: &str) -> Option<Removal> {
        lock(&self.removed).get(id).copied()
    }

    /// The job key for a newly accepted job: from its input, or its arrival number.
    fn job_key(&self, key: Option<&str>) -> String {
        match key {
            Some(key) => format!("k:{key}"),
            None => format!("#{}", self.jobs.fetch_add(1, Ordering::SeqCst)),
        }
    }

    /// The status `/run` must refuse this submission with, if any.
    pub(crate) fn run_refusal(&self, config: &ChaosConfig, key: Option<&str>) -> Option<u16> {
        let (key, n) = match key {
            Some(key) => {
                let mut runs = lock(&self.runs_per_key);
                let n = runs.entry(key.to_owned()).or_default();
                *n += 1;
                (format!("k:{key}"), *n)
            }
            None => ("run".to_owned(), self.runs.fetch_add(1, Ordering::SeqCst)),
        };
        let u = unit(config.seed, RUN, &key, n);
        let code = if u < config.p_run_429 {
            self.record(FaultKind::Run429, format!("POST /run {key} #{n}"));
            429
        } else if u < config.p_run_429 + config.p_run_5xx {
            self.record(FaultKind::Run5xx, format!("POST /run {key} #{n}"));
            [500, 502, 503][(unit(config.seed, RUN_CODE, &key, n) * 3.0) as usize % 3]
        } else {
            return None;
        };
        Some(code)
    }

    /// Whether the answer to a `/run` that took job `id` is lost, and how. Drawn per job id,
    /// so a replay loses the same answers.
    pub(crate) fn run_answer_lost(&self, config: &ChaosConfig, id: &str) -> Option<LostAnswer> {
        if unit(config.seed, RUN_LOST, id, 0) >= config.p_run_answer_lost {
            return None;
        }
        self.record(FaultKind::RunAnswerLost, format!("POST /run {id}"));
        let how = (unit(config.seed, RUN_LOST_HOW, id, 0) * 5.0) as usize % 5;
        Some(match how {
            0 => LostAnswer::Status(500),
            1 => LostAnswer::Status(502),
            2 => LostAnswer::Status(504),
            3 => LostAnswer::CutBody,
            _ => LostAnswer::Hang(config.run_answer_hang_ms),
        })
    }

    /// How a `/status` or `/cancel` call misbehaves: how long it is held first, and the status
    /// it must fail with, if any.
    pub(crate) fn api_fault(
        &self,
        config: &ChaosConfig,
        what: &str,
    ) -> (Option<Duration>, Option<u16>) {
        let n = self.requests.fetch_add(1, Ordering::SeqCst);
        let slow = (unit(config.seed, API_SLOW, "api", n) < config.p_api_slow).then(|| {
            self.record(FaultKind::ApiSlow, what);
            Duration::from_millis(config.api_slow_ms)
        });
        (slow, self.api_failure(config, what, n))
    }

    fn api_failure(&self, config: &ChaosConfig, what: &str, n: u64) -> Option<u16> {
        if unit(config.seed, API, "api", n) >= config.p_api_5xx {
            return None;
        }
        self.record(FaultKind::Api5xx, what);
        Some([500, 502, 503][(unit(config.seed, API_CODE, "api", n) * 3.0) as usize % 3])
    }

    /// Decides a new job's fate. Nothing is recorded yet: each fault is recorded when (and if)
    /// it takes effect.
    pub(crate) fn plan(&self, config: &ChaosConfig, key: Option<&str>) -> JobPlan {
        let key = self.job_key(key);
        let draw = |stream| unit(config.seed, stream, &key, 0);
        let worker = {
            let u = draw(WORKER);
            if u < config.p_worker_failed {
                WorkerPlan::Fail
            } else if u < config.p_worker_failed + config.p_worker_timed_out {
                WorkerPlan::Hang
            } else {
                WorkerPlan::Normal
            }
        };
        let ttl = (draw(TTL) < config.p_ttl_delete).then(|| {
            Duration::from_millis(between(
                draw(TTL_AFTER),
                config.ttl_delete_min_ms,
                config.ttl_delete_max_ms,
            ))
        });
        let retention = (draw(EXPIRY) < config.p_result_expiry)
            .then(|| Duration::from_millis(config.result_expiry_ms));
        JobPlan {
            worker,
            worker_delay: Duration::from_millis(between(
                draw(WORKER_DELAY),
                config.worker_delay_min_ms,
                config.worker_delay_max_ms,
            )),
            ttl,
            retention,
            webhook: WebhookPlan {
                lost: draw(HOOK_LOST) < config.p_webhook_lost,
                duplicate: draw(HOOK_DUP) < config.p_webhook_duplicate,
                delay: (draw(HOOK_DELAY) < config.p_webhook_delayed)
                    .then(|| Duration::from_millis(config.webhook_delay_ms)),
                empty: draw(HOOK_EMPTY) < config.p_webhook_empty,
                out_of_order: draw(HOOK_ORDER) < config.p_webhook_out_of_order,
            },
        }
    }

    /// What happens to one volume S3 request.
    pub(crate) fn s3_fault(&self, config: &ChaosConfig, is_get: bool) -> S3Fault {
        let n = self.s3_requests.fetch_add(1, Ordering::SeqCst);
        let draw = |stream| unit(config.seed, stream, "s3", n);
        S3Fault {
            error_502: draw(S3_502) < config.p_s3_502,
            slow: (draw(S3_SLOW) < config.p_s3_slow)
                .then(|| Duration::from_millis(config.s3_slow_ms)),
            truncate: is_get && draw(S3_CUT) < config.p_s3_truncated,
        }
    }
}

/// The faults drawn for one volume S3 request.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct S3Fault {
    pub error_502: bool,
    pub slow: Option<Duration>,
    pub truncate: bool,
}

/// The chaos key of a job input: the JSON value at `pointer`, if any.
pub(crate) fn input_key(config: &ChaosConfig, input: &Value) -> Option<String> {
    let pointer = config.job_key_pointer.as_deref()?;
    input.pointer(pointer).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_fixed_by_their_inputs_and_spread_evenly() {
        assert_eq!(unit(7, RUN, "k:1", 1), unit(7, RUN, "k:1", 1));
        assert_ne!(unit(7, RUN, "k:1", 1), unit(8, RUN, "k:1", 1));
        assert_ne!(unit(7, RUN, "k:1", 1), unit(7, RUN_CODE, "k:1", 1));
        let below: usize = (0..10_000)
            .filter(|n| unit(42, S3_502, "s3", *n) < 0.1)
            .count();
        assert!((800..1200).contains(&below), "{below}");
    }

    #[test]
    fn the_same_seed_and_key_plan_the_same_job() {
        let config = ChaosConfig {
            seed: 99,
            p_worker_failed: 0.3,
            p_worker_timed_out: 0.3,
            p_ttl_delete: 0.5,
            ttl_delete_min_ms: 10,
            ttl_delete_max_ms: 500,
            p_webhook_lost: 0.5,
            worker_delay_max_ms: 100,
            ..ChaosConfig::default()
        };
        let a = ChaosState::default();
        let b = ChaosState::default();
        for key in 0..50 {
            let key = key.to_string();
            assert_eq!(
                a.plan(&config, Some(&key)),
                b.plan(&config, Some(&key)),
                "{key}"
            );
        }
        // Without a key, arrival order decides; a restart replays it.
        let first: Vec<_> = (0..20).map(|_| a.plan(&config, None)).collect();
        a.restart();
        let again: Vec<_> = (0..20).map(|_| a.plan(&config, None)).collect();
        assert_eq!(first, again);
    }

    #[test]
    fn run_refusals_follow_each_keys_own_count() {
        let config = ChaosConfig {
            seed: 5,
            p_run_429: 0.2,
            p_run_5xx: 0.2,
            ..ChaosConfig::default()
        };
        let a = ChaosState::default();
        let b = ChaosState::default();
        let seq_a: Vec<_> = (0..30)
            .map(|i| a.run_refusal(&config, Some(&(i % 3).to_string())))
            .collect();
        // Interleaved differently, each key still sees the same sequence.
        let mut seq_b = vec![None; 30];
        for key in [2, 0, 1] {
            for i in (0..30).filter(|i| i % 3 == key) {
                seq_b[i] = b.run_refusal(&config, Some(&key.to_string()));
            }
        }
        assert_eq!(seq_a, seq_b);
        assert!(a.counts().values().sum::<u64>() > 0);
    }

    #[test]
    fn the_input_key_is_read_through_the_pointer() {
        let config = ChaosConfig {
            job_key_pointer: Some("/workflow_api/3/inputs/seed".into()),
            ..ChaosConfig::default()
        };
        let input = serde_json::json!({"workflow_api": {"3": {"inputs": {"seed": 17}}}});
        assert_eq!(input_key(&config, &input).as_deref(), Some("17"));
        assert_eq!(input_key(&config, &serde_json::json!({})), None);
        assert_eq!(input_key(&ChaosConfig::default(), &input), None);
    }
}

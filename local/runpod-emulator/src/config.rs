//! Emulator configuration and the runtime-switchable fault set.
//!
//! Values default to RunPod's documented behaviour (reference §1, §2). Items the reference marks
//! UNCONFIRMED are switches in [`Faults`] so tests can exercise both answers.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Static configuration of one emulated serverless endpoint and its network volume.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// The `{endpoint_id}` in `/v2/{endpoint_id}/…`; any other id answers 404.
    pub endpoint_id: String,
    /// The API key clients must send as `Authorization: Bearer <key>` or as the raw key.
    pub api_key: String,
    /// Root of the network volume. The built-in worker reads and writes here, and the S3 API
    /// serves this directory as bucket [`volume_id`](Self::volume_id), key = path relative to it.
    ///
    /// s3s-fs maps bucket `b` to the directory `<fs root>/b` and keeps its own bookkeeping
    /// (`.bucket-*.metadata.json`, temp files) directly in `<fs root>`. So that none of that
    /// lands inside the volume, and so that any directory name works, each emulator instance
    /// gives s3s-fs a private root next to the volume, `<parent>/.<dir name>.s3s-<random>/`,
    /// holding one symlink `<volume_id> -> volume_dir`; it is removed when the emulator stops.
    /// Multipart parts, unlike that bookkeeping, wait inside the volume, in
    /// `.s3compat_uploads/`, as on RunPod. The volume directory is created if missing and must
    /// be on the same filesystem as its parent (s3s-fs renames temp files into place).
    pub volume_dir: PathBuf,
    /// Bucket name of the volume on the S3 API (RunPod: the network volume id).
    pub volume_id: String,
    /// SigV4 access key id for the volume S3 API (RunPod: `user_…`).
    pub volume_access_key: String,
    /// SigV4 secret for the volume S3 API (RunPod: `rps_…`).
    pub volume_secret_key: String,
    /// Where the volume is mounted inside a serverless worker. The built-in worker reports
    /// output files as absolute paths under it.
    pub mount_prefix: String,
    /// Initial fault set; change it at runtime with `Emulator::set_faults`.
    pub faults: Faults,
    /// Pause between webhook attempts (RunPod: 10 s).
    pub webhook_retry_delay: Duration,
    /// Webhook attempts in total, first one included (RunPod: 3).
    pub webhook_attempts: u32,
    /// Per-attempt timeout; a slower receiver counts as a failed attempt.
    pub webhook_timeout: Duration,
    /// How long a `/run` result stays readable after the job ends (RunPod: 30 min).
    pub result_retention: Duration,
    /// How long a `/runsync` result stays readable after the job ends (RunPod: 1 min).
    pub runsync_result_retention: Duration,
    /// Lowest `policy.executionTimeout` accepted (RunPod: 5 s). Lower it in tests.
    pub min_execution_timeout: Duration,
    /// Lowest `policy.ttl` accepted (RunPod: 10 s). Lower it in tests.
    pub min_ttl: Duration,
    /// UNCONFIRMED whether the TTL also cuts a finished job's result short. `false`: once a job
    /// is terminal only the result retention applies. `true`: the result also disappears at
    /// submission + ttl if that comes first.
    pub ttl_covers_results: bool,
    /// Built-in workers when `workers_min`/`workers_max` are unset: that many, always up, each
    /// running one job at a time (the emulator's behaviour before it modelled scaling).
    pub worker_concurrency: usize,
    /// RunPod's "max workers": the most built-in workers up at once. `None`: `worker_concurrency`.
    pub workers_max: Option<usize>,
    /// RunPod's "active workers" (min workers): built-in workers that are always up and never
    /// idle out. `None`: the resolved `workers_max`, i.e. every worker always up, no scaling.
    ///
    /// Between min and max, workers come up only for normal-priority jobs: one starts when a
    /// queued job without `policy.lowPriority` has no free worker up and fewer than max are up.
    /// A low-priority job never starts one (RunPod: "the job does not trigger worker scaling");
    /// it waits for a worker already up. Starting takes no time here (no cold start).
    pub workers_min: Option<usize>,
    /// RunPod's idle timeout (default 5 s): a worker above `workers_min` that has had no job for
    /// this long goes down.
    pub worker_idle_timeout: Duration,
    /// UNCONFIRMED whether RunPod serves low-priority jobs after normal ones (only "does not
    /// trigger worker scaling" is documented). `true`: a free worker takes the oldest
    /// normal-priority queued job before any low-priority one. `false` (default): the queue is
    /// FIFO whatever the priority. Applies to external (SDK) workers' `job-take` too.
    pub low_priority_last: bool,
    /// Run the built-in ComfyUI-subset worker. Turn it off to leave jobs queued (or, later, to
    /// let an external worker take them).
    pub builtin_worker: bool,
    /// RunPod does not support presigned URLs on the volume S3 API; reject them like it does.
    pub s3_reject_presigned: bool,
    /// UNCONFIRMED: whether the hidden folder where multipart parts wait,
    /// `.s3compat_uploads/` at the volume root, shows up in ListObjects(V2). Its bytes are on
    /// the volume either way. Default `false`: hidden, as its name says.
    pub s3_list_staging_folder: bool,
    /// RunPod's listings include empty directories (docs, "Known issues"); their representation
    /// is UNCONFIRMED. `true`: an empty directory is a key `dir/` of size 0 (so, with a
    /// delimiter, a common prefix `dir/`), as a filesystem-backed listing would give it.
    /// `false`: directories appear only through the files under them, as on AWS.
    pub s3_list_empty_folders: bool,
    /// UNCONFIRMED: DeleteObject on `dir/` removes `dir` when it is an empty directory.
    /// `false`: it answers 204 and the folder stays. A folder with anything in it is never
    /// removed, and deleting a file never removes its folder: a filesystem keeps emptied folders.
    pub s3_delete_removes_empty_folder: bool,
    /// RunPod's known listing bug: once a recursive ListObjectsV2 (no `Delimiter`) has handed
    /// out this many keys, the next page repeats the previous page, contents and
    /// `NextContinuationToken` alike, so a client loops or stops with "The same next token was
    /// received twice". Listings with a `Delimiter` never repeat: RunPod's own example lists one
    /// level at a time to get past the bug. `None`: never.
    ///
    /// Default `Some(10_000)`: the bug is documented for listings above 10k files, and the
    /// emulator defaults to the documented platform, so a recursive walk that would break on
    /// RunPod breaks here too. Tests lower it to reach the bug with a handful of files.
    pub s3_repeat_token_above: Option<usize>,
    /// UNCONFIRMED: whether the repeat of `s3_repeat_token_above` also hits listings with a
    /// `Delimiter` (one folder level at a time). RunPod's own example lists that way to get
    /// past the bug, which suggests not. Default `false`; `true` makes every listing repeat
    /// past the threshold, for clients that must survive either way.
    pub s3_repeat_token_delimited: bool,
    /// How long `job-take` and `job-stop` hold an external worker's long-poll before answering
    /// 204 (reference §4.3: about 60 s, under the SDK's 90 s client timeout).
    pub worker_poll_hold: Duration,
    /// UNCONFIRMED (reference §1.6, §8): the server-side limit on a `job-done` body. Above it
    /// the POST gets 400 and the job ends COMPLETED without output, the symptom users report
    /// (runpod-python#309). Default 20 MB, the documented `/runsync` payload limit.
    pub job_done_max_bytes: usize,
    /// UNCONFIRMED (reference §1.3, §8): how a `/run` body's `s3Config` reaches the worker.
    /// `Some(key)`: as `job[key]` in the job-take answer (default `"s3Config"`, the likely
    /// name); `None`: not at all.
    pub s3_config_job_key: Option<String>,
    /// UNCONFIRMED (reference §1.9, §8): the suffix of job ids (`-e1`, `-u1`, …); ids are opaque
    /// to clients either way. `/runsync` ids also get the documented `sync-` prefix.
    pub job_id_suffix: String,
    /// UNCONFIRMED (reference §1.5, §8): the body of a 404 for an unknown, expired or purged
    /// job (sent as JSON).
    pub job_not_found_body: serde_json::Value,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            endpoint_id: "local-endpoint".to_owned(),
            api_key: "test-runpod-key".to_owned(),
            volume_dir: PathBuf::from(".local/volume"),
            volume_id: "local-volume".to_owned(),
            volume_access_key: "user_local".to_owned(),
            volume_secret_key: "rps_local-secret".to_owned(),
            mount_prefix: "/runpod-volume".to_owned(),
            faults: Faults::default(),
            webhook_retry_delay: Duration::from_secs(10),
            webhook_attempts: 3,
            webhook_timeout: Duration::from_secs(10),
            result_retention: Duration::from_secs(30 * 60),
            runsync_result_retention: Duration::from_secs(60),
            min_execution_timeout: Duration::from_secs(5),
            min_ttl: Duration::from_secs(10),
            ttl_covers_results: false,
            worker_concurrency: 2,
            workers_max: None,
            workers_min: None,
            worker_idle_timeout: Duration::from_secs(5),
            low_priority_last: false,
            builtin_worker: true,
            s3_reject_presigned: true,
            s3_list_staging_folder: false,
            s3_list_empty_folders: true,
            s3_delete_removes_empty_folder: true,
            s3_repeat_token_above: Some(10_000),
            s3_repeat_token_delimited: false,
            worker_poll_hold: Duration::from_secs(55),
            job_done_max_bytes: 20 * 1024 * 1024,
            s3_config_job_key: Some("s3Config".to_owned()),
            job_id_suffix: "-e1".to_owned(),
            job_not_found_body: serde_json::json!({ "error": "job not found" }),
        }
    }
}

impl EmulatorConfig {
    /// The built-in worker's `(min, max)` workers up, unset values resolved (see
    /// [`workers_min`](Self::workers_min), [`workers_max`](Self::workers_max)).
    pub fn worker_bounds(&self) -> (usize, usize) {
        let max = self.workers_max.unwrap_or(self.worker_concurrency);
        (self.workers_min.unwrap_or(max), max)
    }
}

/// Faults and UNCONFIRMED platform behaviours, switchable while the emulator runs.
///
/// Every field has a serde default, so `PUT /_emulator/faults` accepts a partial JSON object
/// (missing fields take their defaults, not their previous values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// `false`: never send webhooks (the gateway's sweeper must rescue the jobs).
    pub webhooks_enabled: bool,
    /// Send an empty body instead of the JSON payload (RunPod incident, runpod-python#381).
    pub webhook_empty_body: bool,
    /// `/run` and `/runsync` answer this HTTP status instead of accepting the job.
    pub run_status: Option<u16>,
    /// With `run_status`: only the next N submissions fail, then it is back to normal.
    /// 0 means every submission fails. The count restarts whenever the faults are set.
    pub run_fail_count: u32,
    /// The built-in worker ends every job FAILED with this error string.
    pub worker_fail_message: Option<String>,
    /// Extra simulated GPU time per job, in ms.
    pub worker_delay_ms: u64,
    /// The built-in worker returns this output verbatim instead of running the workflow
    /// (a hostile or buggy handler, e.g. paths outside `outputs/`).
    pub worker_output_override: Option<serde_json::Value>,
    /// UNCONFIRMED: RunPod sends a webhook when a job ends TIMED_OUT.
    pub webhook_on_timed_out: bool,
    /// UNCONFIRMED: RunPod sends a webhook when a job is CANCELLED.
    pub webhook_on_cancelled: bool,
    /// UNCONFIRMED: `true` = only exactly 200 counts as delivered; `false` = any 2xx.
    pub webhook_success_only_200: bool,
    /// UNCONFIRMED: `/runsync` honours the `webhook` field like `/run` does.
    pub webhook_on_runsync: bool,
    /// UNCONFIRMED: the webhook's `Content-Type` header; empty sends none.
    pub webhook_content_type: String,
    /// UNCONFIRMED: the webhook payload carries `workerId` (the worker that ran the job).
    pub webhook_worker_id: bool,
    /// UNCONFIRMED (historical docs, reference §1.7): `/run` and `/runsync` answer 429 while
    /// more than this many jobs are queued. `None`: no queue-size limit.
    pub run_queue_limit: Option<u64>,
    /// Probabilistic faults under a seed, on top of the switches above (`None`: none). Every
    /// fault injected is recorded (`Emulator::injected_faults`, `GET /_emulator/chaos`).
    pub chaos: Option<ChaosConfig>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            webhooks_enabled: true,
            webhook_empty_body: false,
            run_status: None,
            run_fail_count: 0,
            worker_fail_message: None,
            worker_delay_ms: 0,
            worker_output_override: None,
            webhook_on_timed_out: true,
            webhook_on_cancelled: false,
            webhook_success_only_200: true,
            webhook_on_runsync: true,
            webhook_content_type: "application/json".to_owned(),
            webhook_worker_id: false,
            run_queue_limit: None,
            chaos: None,
        }
    }
}

/// Faults drawn at random, deterministically under `seed` (see `chaos.rs` for what a replay
/// reproduces). Probabilities are per job (worker, TTL, result, webhook faults) or per request
/// (`/run`, `/status`/`/cancel`, volume S3); 0 turns a fault off. Partial JSON is accepted.
/// The built-in worker honours the worker faults; an external (SDK) worker is not affected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChaosConfig {
    pub seed: u64,
    /// JSON pointer into a job's `input` whose value keys the job's draws (e.g.
    /// `/workflow_api/3/inputs/seed`), so a replay hits the same jobs however requests
    /// interleave. Unset, or absent from an input: jobs are keyed by order of arrival.
    pub job_key_pointer: Option<String>,
    /// `/run` and `/runsync` answer 429 (per call).
    pub p_run_429: f64,
    /// `/run` and `/runsync` answer 500, 502 or 503 before accepting anything (per call).
    pub p_run_5xx: f64,
    /// `/run` takes the job, then the caller sees a failure (per call): 500, 502 or 504, an
    /// answer cut off inside the id, or no answer for `run_answer_hang_ms`. RunPod has the job;
    /// the caller cannot know it.
    pub p_run_answer_lost: f64,
    pub run_answer_hang_ms: u64,
    /// `/status` and `/cancel` answer 500, 502 or 503 (per call).
    pub p_api_5xx: f64,
    /// `/status` and `/cancel` are held `api_slow_ms` before they answer (per call).
    pub p_api_slow: f64,
    pub api_slow_ms: u64,
    /// The built-in worker ends the job FAILED.
    pub p_worker_failed: f64,
    /// The built-in worker hangs until the job's executionTimeout ends it TIMED_OUT.
    pub p_worker_timed_out: f64,
    /// Simulated GPU time per job, drawn uniformly from this range (ms).
    pub worker_delay_min_ms: u64,
    pub worker_delay_max_ms: u64,
    /// The job's TTL is cut to a value drawn from `ttl_delete_min_ms..=ttl_delete_max_ms`
    /// after submission: it is removed then (404 on `/status`, no webhook), whatever its state.
    pub p_ttl_delete: f64,
    pub ttl_delete_min_ms: u64,
    pub ttl_delete_max_ms: u64,
    /// The job's result is removed `result_expiry_ms` after it finishes instead of after the
    /// configured retention (30 min on RunPod).
    pub p_result_expiry: f64,
    pub result_expiry_ms: u64,
    /// The job's webhook is never sent (all attempts lost).
    pub p_webhook_lost: f64,
    /// The webhook is delivered twice at once (two parallel deliveries, each with retries).
    pub p_webhook_duplicate: f64,
    /// The webhook's first attempt waits `webhook_delay_ms` (e.g. past the gateway's sweeper).
    pub p_webhook_delayed: f64,
    pub webhook_delay_ms: u64,
    /// The webhook is sent with an empty body.
    pub p_webhook_empty: f64,
    /// After the final webhook, a stale IN_PROGRESS report for the job arrives.
    pub p_webhook_out_of_order: f64,
    /// A volume S3 request answers 502 Bad Gateway (per request).
    pub p_s3_502: f64,
    /// A volume S3 request is held `s3_slow_ms` before it is served (per request).
    pub p_s3_slow: f64,
    pub s3_slow_ms: u64,
    /// A volume S3 GET sends half its body, then drops the connection (per request).
    pub p_s3_truncated: f64,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            job_key_pointer: None,
            p_run_429: 0.0,
            p_run_5xx: 0.0,
            p_run_answer_lost: 0.0,
            run_answer_hang_ms: 0,
            p_api_5xx: 0.0,
            p_api_slow: 0.0,
            api_slow_ms: 0,
            p_worker_failed: 0.0,
            p_worker_timed_out: 0.0,
            worker_delay_min_ms: 0,
            worker_delay_max_ms: 0,
            p_ttl_delete: 0.0,
            ttl_delete_min_ms: 0,
            ttl_delete_max_ms: 0,
            p_result_expiry: 0.0,
            result_expiry_ms: 0,
            p_webhook_lost: 0.0,
            p_webhook_duplicate: 0.0,
            p_webhook_delayed: 0.0,
            webhook_delay_ms: 0,
            p_webhook_empty: 0.0,
            p_webhook_out_of_order: 0.0,
            p_s3_502: 0.0,
            p_s3_slow: 0.0,
            s3_slow_ms: 0,
            p_s3_truncated: 0.0,
        }
    }
}

//! What the gateway counts, on the `metrics` facade (a recorder-agnostic API, as `tracing` is
//! for logs): the use cases say what happened, and the binary's recorder decides where it goes
//! (CloudWatch's embedded metric format in the functions, `gateway_aws::metrics`). Without a
//! recorder, as in the use cases' unit tests, every call is a no-op.
//!
//! Every name is here, once, so that the dashboard and alarms in `template.yaml` and the tests
//! that read the functions' metric lines name the same thing.
use metrics::{counter, describe_counter, describe_histogram, histogram, Unit};

use crate::domain::job::{Job, JobState};

pub const JOBS_ACCEPTED: &str = "JobsAccepted";
/// Every job that reached a terminal state, whichever it is: the denominator of the rates.
pub const JOBS_ENDED: &str = "JobsEnded";
pub const JOBS_SUCCEEDED: &str = "JobsSucceeded";
pub const JOBS_FAILED: &str = "JobsFailed";
/// Failed jobs by error code (dimension `code`).
pub const JOBS_FAILED_BY_CODE: &str = "JobsFailedByCode";
pub const JOBS_CANCELLED: &str = "JobsCancelled";
pub const JOBS_TIMED_OUT: &str = "JobsTimedOut";
/// From acceptance to the terminal state.
pub const TIME_TO_END: &str = "TimeToEnd";
/// From acceptance until a worker took the job (held back, queued at RunPod).
pub const QUEUE_TIME: &str = "QueueTime";
/// The GPU time the backend reported for the job.
pub const GPU_TIME: &str = "GpuTime";
pub const WEBHOOKS_RECEIVED: &str = "WebhooksReceived";
/// Jobs the sweeper brought to an end or a hand-off because no webhook had.
pub const SWEEPER_RESCUES: &str = "SweeperRescues";
/// Work done again (dimension `kind`: `dispatch`, a dispatch attempt after the first;
/// `rerun`, a lost pod prompt run again; `callback`, a client callback delivered again).
pub const RETRIES: &str = "Retries";
/// Bytes of a job's files removed from the volume after its end.
pub const CLEANUP_BYTES: &str = "CleanupBytes";
/// Submits refused over the owner's rate.
pub const RATE_LIMITED: &str = "RateLimited";

/// Gives each metric its unit; call once, after installing the recorder.
pub fn describe() {
    for name in [
        JOBS_ACCEPTED,
        JOBS_ENDED,
        JOBS_SUCCEEDED,
        JOBS_FAILED,
        JOBS_FAILED_BY_CODE,
        JOBS_CANCELLED,
        JOBS_TIMED_OUT,
        WEBHOOKS_RECEIVED,
        SWEEPER_RESCUES,
        RETRIES,
        RATE_LIMITED,
    ] {
        describe_counter!(name, Unit::Count, "");
    }
    describe_counter!(CLEANUP_BYTES, Unit::Bytes, "");
    for name in [TIME_TO_END, QUEUE_TIME, GPU_TIME] {
        describe_histogram!(name, Unit::Milliseconds, "");
    }
}

pub fn job_accepted() {
    counter!(JOBS_ACCEPTED).increment(1);
}

/// `job` was just written terminal, by the one write that ended it.
pub fn job_ended(job: &Job) {
    counter!(JOBS_ENDED).increment(1);
    match job.state {
        JobState::Succeeded => counter!(JOBS_SUCCEEDED).increment(1),
        JobState::Failed => {
            counter!(JOBS_FAILED).increment(1);
            let code = job
                .error
                .as_ref()
                .map_or("unknown", |error| error.code.as_str());
            counter!(JOBS_FAILED_BY_CODE, "code" => code).increment(1);
        }
        JobState::Cancelled => counter!(JOBS_CANCELLED).increment(1),
        JobState::TimedOut => counter!(JOBS_TIMED_OUT).increment(1),
        _ => {}
    }
    let accepted = job.timestamps.created_at;
    let ended = job
        .timestamps
        .finished_at
        .unwrap_or(job.timestamps.updated_at);
    histogram!(TIME_TO_END).record((ended - accepted).max(0) as f64);
    if let Some(running) = job.timestamps.running_at {
        histogram!(QUEUE_TIME).record((running - accepted).max(0) as f64);
    }
    if let Some(gpu_ms) = job.execution_time_ms {
        histogram!(GPU_TIME).record(gpu_ms as f64);
    }
}

pub fn webhook_received() {
    counter!(WEBHOOKS_RECEIVED).increment(1);
}

pub fn sweeper_rescue() {
    counter!(SWEEPER_RESCUES).increment(1);
}

pub fn retried(kind: &'static str) {
    counter!(RETRIES, "kind" => kind).increment(1);
}

pub fn cleanup_bytes(bytes: u64) {
    counter!(CLEANUP_BYTES).increment(bytes);
}

pub fn rate_limited() {
    counter!(RATE_LIMITED).increment(1);
}

//! The JSON clients see. Internal steps (leases, versions, sweeper bookkeeping, RunPod's id)
//! never appear; times are RFC 3339.
use serde_json::{json, Value};

use gateway::domain::job::{Job, JobEvent, JobState, Millis, OutputFile};

fn time(ms: Millis) -> Value {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    Value::String(humantime::format_rfc3339_millis(at).to_string())
}

fn optional_time(ms: Option<Millis>) -> Value {
    ms.map(time).unwrap_or(Value::Null)
}

pub fn job_summary(job: &Job) -> Value {
    json!({
        "job_id": job.id,
        "status": job.state.as_str(),
        "workflow": job.workflow,
        "created_at": time(job.timestamps.created_at),
        "updated_at": time(job.timestamps.updated_at),
    })
}

pub fn output(file: &OutputFile, url: &str) -> Value {
    json!({
        "file_name": file.file_name,
        "content_type": file.content_type,
        "size": file.size,
        "url": url,
    })
}

pub fn job_detail(job: &Job, outputs: Vec<Value>) -> Value {
    json!({
        "job_id": job.id,
        "status": job.state.as_str(),
        "workflow": job.workflow,
        "workflow_version": job.workflow_version,
        "params": job.params,
        "created_at": time(job.timestamps.created_at),
        "submitted_at": optional_time(job.timestamps.submitted_at),
        "running_at": optional_time(job.timestamps.running_at),
        "finished_at": optional_time(job.timestamps.finished_at),
        "updated_at": time(job.timestamps.updated_at),
        "error": job.error.as_ref().map(|e| json!({
            "code": e.code.as_str(),
            "message": e.message,
            "retryable": e.retryable,
        })),
        "delay_time_ms": job.delay_time_ms,
        "execution_time_ms": job.execution_time_ms,
        "outputs": outputs,
        "events": job.history.iter().map(event).collect::<Vec<_>>(),
    })
}

/// One state change of the job: `from` is null for its creation; states are the public ones.
pub fn event(event: &JobEvent) -> Value {
    json!({
        "at": time(event.at),
        "from": event.from.map(JobState::as_str),
        "to": event.to.as_str(),
        "by": event.by.as_str(),
    })
}

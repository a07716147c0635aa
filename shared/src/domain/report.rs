//! What RunPod reports about a job (from `/status` or a webhook), read into the few cases the
//! gateway acts on. Everything here is untrusted input: odd shapes become `Unknown` or a coded
//! failure, never a panic.
use serde_json::Value;

use super::job::{ErrorCode, JobError};
use super::paths::{PathError, VolumeLayout};

/// Longest error message kept from a worker; the rest is noise (and possibly large).
const MAX_MESSAGE_CHARS: usize = 1_000;
/// More files than this from one job is not a restoration result; refuse rather than copy.
pub const MAX_OUTPUT_FILES: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub enum Reported {
    Queued,
    Running,
    Completed(Option<Value>),
    Failed(String),
    TimedOut,
    Cancelled,
    /// An empty, partial or unrecognised report: ask `/status` rather than act on it.
    Unknown,
}

impl Reported {
    pub fn from_status(
        status: Option<&str>,
        output: Option<&Value>,
        error: Option<&Value>,
    ) -> Self {
        match status.map(str::to_ascii_uppercase).as_deref() {
            Some("IN_QUEUE") => Self::Queued,
            // The docs list RUNNING too; treat it as IN_PROGRESS.
            Some("IN_PROGRESS" | "RUNNING") => Self::Running,
            Some("COMPLETED") => Self::Completed(output.filter(|v| !v.is_null()).cloned()),
            Some("FAILED") => Self::Failed(worker_error_message(error)),
            Some("TIMED_OUT") => Self::TimedOut,
            Some("CANCELLED") => Self::Cancelled,
            _ => Self::Unknown,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Completed(_) | Self::Failed(_) | Self::TimedOut | Self::Cancelled
        )
    }
}

/// The message a client may see for a failed worker. The runpod SDK sends a raised exception as
/// a JSON string with `error_type`, `error_message` and `error_traceback`; only the message is
/// kept: tracebacks leak worker internals and help no client.
pub fn worker_error_message(error: Option<&Value>) -> String {
    let text = match error {
        None | Some(Value::Null) => {
            return "the worker reported a failure without a message".into()
        }
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(map)) => map
                .get("error_message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| s.clone()),
            _ => s.clone(),
        },
        Some(Value::Object(map)) => map
            .get("error_message")
            .or_else(|| map.get("message"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| Value::Object(map.clone()).to_string()),
        Some(other) => other.to_string(),
    };
    let cleaned: String = text
        .chars()
        .filter(|c| !c.is_control() || *c == '\n')
        .take(MAX_MESSAGE_CHARS)
        .collect();
    if cleaned.trim().is_empty() {
        "the worker reported a failure without a message".into()
    } else {
        cleaned.trim().to_string()
    }
}

/// Reads the seed handler's output contract `{"prompt_id", "files": [absolute paths], "file_count"}`
/// into volume keys, each checked to lie under the job's own output prefix. Any bad path fails
/// the whole job: nothing is copied from a worker that named a file it must not.
pub fn volume_output_keys(
    output: Option<&Value>,
    layout: &VolumeLayout,
    job_id: &str,
) -> Result<Vec<String>, JobError> {
    let Some(output) = output else {
        return Err(JobError::new(
            ErrorCode::EmptyOutput,
            "the worker completed without any output",
        ));
    };
    let files = output
        .get("files")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            JobError::new(
                ErrorCode::InvalidOutput,
                "the worker's output has no \"files\" list",
            )
        })?;
    if files.is_empty() {
        return Err(JobError::new(
            ErrorCode::EmptyOutput,
            "the worker completed without any output file",
        ));
    }
    if files.len() > MAX_OUTPUT_FILES {
        return Err(JobError::new(
            ErrorCode::InvalidOutput,
            format!(
                "the worker returned {} files; at most {MAX_OUTPUT_FILES} are accepted",
                files.len()
            ),
        ));
    }
    let allowed = VolumeLayout::output_prefix(job_id);
    let mut keys = Vec::with_capacity(files.len());
    for file in files {
        let path = file.as_str().ok_or_else(|| {
            JobError::new(ErrorCode::InvalidOutput, "an output file is not a string")
        })?;
        let key = layout.output_key(path, &allowed).map_err(|e: PathError| {
            let shown: String = path.chars().filter(|c| !c.is_control()).take(200).collect();
            JobError::new(
                ErrorCode::InvalidOutputPath,
                format!("output path {shown:?} rejected: {e}"),
            )
        })?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn layout() -> VolumeLayout {
        VolumeLayout::new(vec!["/runpod-volume".into(), "/workspace".into()])
    }

    #[test]
    fn statuses_map_to_reports() {
        assert_eq!(
            Reported::from_status(Some("IN_QUEUE"), None, None),
            Reported::Queued
        );
        assert_eq!(
            Reported::from_status(Some("RUNNING"), None, None),
            Reported::Running
        );
        assert_eq!(
            Reported::from_status(Some("TIMED_OUT"), None, None),
            Reported::TimedOut
        );
        assert_eq!(Reported::from_status(None, None, None), Reported::Unknown);
        assert_eq!(
            Reported::from_status(Some("WEIRD"), None, None),
            Reported::Unknown
        );
    }

    #[test]
    fn a_raised_exception_shows_its_message_without_the_traceback() {
        let error = json!(
            "{\"error_type\": \"<class 'ValueError'>\", \"error_message\": \"boom\", \"error_traceback\": \"Traceback (most recent call last): secret/path.py\"}"
        );
        let message = worker_error_message(Some(&error));
        assert_eq!(message, "boom");
    }

    #[test]
    fn a_plain_error_string_is_kept_and_bounded() {
        let long = "x".repeat(5_000);
        assert_eq!(
            worker_error_message(Some(&json!(long))).len(),
            MAX_MESSAGE_CHARS
        );
        assert_eq!(worker_error_message(Some(&json!("bad input"))), "bad input");
    }

    #[test]
    fn files_under_the_jobs_prefix_become_volume_keys() {
        let output = json!({"prompt_id": "p", "files": ["/runpod-volume/outputs/job-1/a_00001_.png"], "file_count": 1});
        let keys = volume_output_keys(Some(&output), &layout(), "job-1").unwrap();
        assert_eq!(keys, vec!["outputs/job-1/a_00001_.png"]);
    }

    #[test]
    fn a_file_of_another_job_fails_the_whole_output() {
        let output = json!({"files": ["/runpod-volume/outputs/job-1/a.png", "/runpod-volume/outputs/job-2/b.png"]});
        let err = volume_output_keys(Some(&output), &layout(), "job-1").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidOutputPath);
    }

    #[test]
    fn traversal_is_rejected() {
        let output = json!({"files": ["/runpod-volume/outputs/job-1/../../etc/passwd"]});
        let err = volume_output_keys(Some(&output), &layout(), "job-1").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidOutputPath);
    }

    #[test]
    fn missing_or_odd_outputs_are_coded() {
        assert_eq!(
            volume_output_keys(None, &layout(), "j").unwrap_err().code,
            ErrorCode::EmptyOutput
        );
        assert_eq!(
            volume_output_keys(Some(&json!({"files": []})), &layout(), "j")
                .unwrap_err()
                .code,
            ErrorCode::EmptyOutput
        );
        assert_eq!(
            volume_output_keys(Some(&json!({"images": []})), &layout(), "j")
                .unwrap_err()
                .code,
            ErrorCode::InvalidOutput
        );
        assert_eq!(
            volume_output_keys(Some(&json!({"files": [1]})), &layout(), "j")
                .unwrap_err()
                .code,
            ErrorCode::InvalidOutput
        );
    }
}

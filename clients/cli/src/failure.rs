//! Everything that can stop a command, and the exit code each one means.

use std::fmt;

/// The API refused the request, it could not be reached, it answered something it does not
/// document, or a local file could not be read or written.
pub const EXIT_FAILED: u8 = 1;
/// The command line is wrong: clap's own exit code for usage errors, kept for ours.
pub const EXIT_USAGE: u8 = 2;
/// `submit --wait`: the job ended `failed`, `cancelled` or `timed_out`.
pub const EXIT_JOB_NOT_SUCCEEDED: u8 = 3;
/// `submit --wait` interrupted (Ctrl-C): the job itself goes on. 128 + SIGINT, as shells say.
pub const EXIT_INTERRUPTED: u8 = 130;

/// The exit codes as `gateway --help` shows them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    done
  1    the API refused the request (error: <code>: <message>), could not be reached, or
       answered something unreadable; or a local file could not be read or written
  2    usage error (bad arguments, an unreadable photo, a photo that is not JPEG, PNG or WebP)
  3    submit --wait: the job ended failed, cancelled or timed_out
  130  submit --wait interrupted; the job goes on";

#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The API's refusal, from its `{"error": {"code", "message"}}` body.
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// No answer: refused connection, DNS, timeout, a connection cut mid-answer.
    Unreachable(String),
    /// An answer the API does not document: not JSON, or without a field it always has.
    /// `status` is the HTTP status when there was one.
    BadAnswer { status: Option<u16>, detail: String },
    /// Object storage (a presigned upload or download) refused the transfer.
    Storage(String),
    /// A local file could not be read or written.
    Io(String),
    /// What clap cannot check: a repeated `--param`, an unreadable or unsupported photo.
    Usage(String),
    /// `submit --wait`: the job ended other than `succeeded`.
    JobEnded {
        job_id: String,
        status: String,
        error: Option<(String, String)>,
    },
    /// Ctrl-C while waiting for the job.
    Interrupted { job_id: String },
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => EXIT_USAGE,
            Failure::JobEnded { .. } => EXIT_JOB_NOT_SUCCEEDED,
            Failure::Interrupted { .. } => EXIT_INTERRUPTED,
            _ => EXIT_FAILED,
        }
    }

    /// Worth asking again a moment later: while waiting on a job, a blip of the network or a
    /// 5xx must not end the wait (the job goes on regardless).
    pub fn is_transient(&self) -> bool {
        match self {
            Failure::Unreachable(_) => true,
            Failure::Api { status, .. } => *status == 429 || *status >= 500,
            Failure::BadAnswer {
                status: Some(status),
                ..
            } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Api { code, message, .. } => write!(f, "{code}: {message}"),
            Failure::Unreachable(detail) => write!(f, "cannot reach the gateway: {detail}"),
            Failure::BadAnswer {
                status: Some(status),
                detail,
            } => write!(f, "unexpected answer from the gateway (HTTP {status}): {detail}"),
            Failure::BadAnswer {
                status: None,
                detail,
            } => write!(f, "unexpected answer from the gateway: {detail}"),
            Failure::Storage(detail) => write!(f, "storage: {detail}"),
            Failure::Io(detail) => write!(f, "{detail}"),
            Failure::Usage(detail) => write!(f, "{detail}"),
            Failure::JobEnded {
                job_id,
                status,
                error,
            } => {
                write!(f, "job {job_id} {status}")?;
                if let Some((code, message)) = error {
                    write!(f, ": {code}: {message}")?;
                }
                Ok(())
            }
            Failure::Interrupted { job_id } => write!(
                f,
                "interrupted; job {job_id} goes on (gateway status {job_id}, gateway cancel {job_id})"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_refusal_reads_as_its_code_and_message_and_exits_1() {
        let failure = Failure::Api {
            status: 404,
            code: "not_found".into(),
            message: "no such job".into(),
        };
        assert_eq!(failure.to_string(), "not_found: no such job");
        assert_eq!(failure.exit_code(), 1);
    }

    #[test]
    fn usage_errors_exit_2_as_clap_does_and_an_unsuccessful_job_exits_3() {
        assert_eq!(Failure::Usage("x".into()).exit_code(), 2);
        let ended = Failure::JobEnded {
            job_id: "j".into(),
            status: "failed".into(),
            error: Some(("worker_failed".into(), "out of memory".into())),
        };
        assert_eq!(ended.exit_code(), 3);
        assert_eq!(
            ended.to_string(),
            "job j failed: worker_failed: out of memory"
        );
    }

    #[test]
    fn only_network_blips_and_server_errors_are_worth_asking_again() {
        assert!(Failure::Unreachable("reset".into()).is_transient());
        let api = |status| Failure::Api {
            status,
            code: "c".into(),
            message: "m".into(),
        };
        assert!(api(503).is_transient());
        assert!(api(429).is_transient());
        assert!(!api(404).is_transient());
        assert!(!api(410).is_transient());
        assert!(Failure::BadAnswer {
            status: Some(502),
            detail: "html".into()
        }
        .is_transient());
        assert!(!Failure::BadAnswer {
            status: Some(200),
            detail: "not json".into()
        }
        .is_transient());
    }
}

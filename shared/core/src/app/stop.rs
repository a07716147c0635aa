//! The stopper: the one place that stops runs (RunPod's `/cancel`, a ComfyUI server's queue
//! delete and interrupt). Client cancels, deadlines and
//! extra runs all reach it through the stop queue, so one consumer, paced, keeps the gateway
//! under RunPod's limit on cancels however many jobs end at once, and the public API holds no
//! RunPod key.

use crate::app::backends::Backends;
use crate::ports::{BackendError, Classified, Failure, StopRun};

pub struct Stopper {
    pub backends: Backends,
}

/// What became of a stop request.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// RunPod accepted the cancel.
    Stopped,
    /// RunPod no longer knows the run (it ended and aged out): nothing is left to stop.
    Gone,
}

impl Stopper {
    /// Tells RunPod to stop the run. An error means the request must be tried again: the GPU
    /// may still be running, so a stop is never dropped, only retried and, in the end,
    /// dead-lettered where the alarm shows it.
    pub async fn stop(&self, request: &StopRun) -> Result<Stopped, BackendError> {
        let backend = self.backends.get(request.backend)?;
        match backend.cancel(&request.runpod_id).await {
            Ok(()) => {
                tracing::info!(
                    job_id = %request.job_id,
                    runpod_id = %request.runpod_id,
                    reason = ?request.reason,
                    "run stopped"
                );
                Ok(Stopped::Stopped)
            }
            Err(err) if err.failure() == Failure::Missing => Ok(Stopped::Gone),
            Err(err) => {
                tracing::warn!(
                    job_id = %request.job_id,
                    runpod_id = %request.runpod_id,
                    error = %err,
                    "RunPod did not take the cancel; it will be retried"
                );
                Err(err)
            }
        }
    }
}

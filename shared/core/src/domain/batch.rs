//! A batch: many inputs, one workflow and its params, one job per input under the batch's id.
//! The jobs are ordinary jobs; the batch holds their ids, and they share a hold-back key, so
//! that at most `max_in_flight` of them are dispatched at once.
use serde::{Deserialize, Serialize};

use super::hold::Hold;
use super::job::{BackendKind, Job, JobState, Millis};

/// Most inputs one batch takes.
pub const MAX_BATCH_INPUTS: usize = 500;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub id: String,
    pub owner: String,
    pub workflow: String,
    pub backend: BackendKind,
    pub max_in_flight: u32,
    /// Its jobs, in the order of the inputs.
    pub job_ids: Vec<String>,
    pub created_at: Millis,
    /// DynamoDB's TTL (epoch seconds): with its jobs' records.
    pub expires_at: i64,
}

impl Batch {
    pub fn hold(&self) -> Hold {
        Hold::batch(&self.id, self.max_in_flight)
    }
}

/// How many of a batch's jobs are in each state, every state named (zero included).
pub fn counts(jobs: &[Job]) -> Vec<(JobState, usize)> {
    const STATES: [JobState; 7] = [
        JobState::Queued,
        JobState::Submitted,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
    ];
    STATES
        .iter()
        .map(|state| (*state, jobs.iter().filter(|j| j.state == *state).count()))
        .collect()
}

//! Taking and giving back a hold-back key's slots (`domain::hold`), and waking the job first
//! in line when one frees. Dispatch takes a slot before it starts a held job; the job's end is
//! announced on the callback queue, whose consumer gives the slot back (`app::callbacks`), and
//! the sweeper's clean-up of every ended job asks for that again if the announcement was lost.
use std::sync::Arc;

use crate::domain::hold::{Hold, Slots};
use crate::domain::job::{Job, Priority};
use crate::ports::{JobQueue, SlotStore, StoreError};

/// Read-modify-write rounds before a change of a busy key's record gives up for now.
const ROUNDS: usize = 8;

pub struct Turns {
    pub slots: Arc<dyn SlotStore>,
    /// The dispatch queue, where a woken job is sent.
    pub queue: Arc<dyn JobQueue>,
}

impl Turns {
    /// Applies `change` to the key's record as stored now, and saves it on the version read.
    async fn change<R>(
        &self,
        hold: &Hold,
        change: impl Fn(&mut Slots) -> R,
    ) -> Result<(R, Slots), StoreError> {
        for _ in 0..ROUNDS {
            let (mut slots, version) = match self.slots.slots(&hold.key).await? {
                Some(found) => found,
                None => (Slots::new(hold), 0),
            };
            let before = slots.clone();
            // The limit is the latest job's: an owner's new limit applies from its next job.
            slots.limit = hold.limit.max(1);
            let result = change(&mut slots);
            if slots == before {
                return Ok((result, slots));
            }
            match self.slots.save_slots(&slots, version).await {
                Ok(()) => return Ok((result, slots)),
                Err(StoreError::Conflict) => continue,
                Err(other) => return Err(other),
            }
        }
        Err(StoreError::Conflict)
    }

    /// Puts `jobs` in line for `hold`'s slots, in order, and wakes as many as may start.
    pub async fn line_up(
        &self,
        hold: &Hold,
        jobs: &[String],
        priority: Priority,
    ) -> Result<(), StoreError> {
        let low = priority == Priority::Low;
        let ((), slots) = self
            .change(hold, |slots| {
                slots.line_up(jobs.iter().map(String::as_str), low)
            })
            .await?;
        self.wake(&slots).await;
        Ok(())
    }

    /// Whether `job` may be dispatched now: it is held by nothing, or holds a slot of each of
    /// its keys (taken now, in the job's order, where one is free and the job is first in
    /// line). A job that may not is in line for the first key it lacks, and is woken when its
    /// turn comes; what it took so far it keeps (see `domain::hold` on why that cannot
    /// deadlock).
    pub async fn take(&self, job: &Job) -> Result<bool, StoreError> {
        let low = job.priority == Priority::Low;
        for hold in &job.holds {
            let (taken, slots) = self.change(hold, |slots| slots.take(&job.id, low)).await?;
            // A slot may still be free for the next in line (or for the one ahead of this
            // job, whose own wake-up was lost).
            self.wake(&slots).await;
            if !taken {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `job` ended: its slots (or places in line) go, and the next in each line is woken.
    pub async fn release(&self, job: &Job) -> Result<(), StoreError> {
        for hold in &job.holds {
            let ((), slots) = self.change(hold, |slots| slots.give_back(&job.id)).await?;
            self.wake(&slots).await;
        }
        Ok(())
    }

    /// Sends the jobs whose turn it is to dispatch. A lost send is made good by the sweeper,
    /// which sends every queued job to dispatch again after `JOB_REQUEUE_AFTER_SECS`.
    async fn wake(&self, slots: &Slots) {
        for job_id in slots.next_up() {
            // The woken job's trace is in its record; the wake-up does not know it.
            if let Err(err) = self.queue.enqueue(&job_id, None).await {
                tracing::warn!(job_id, key = %slots.key, error = %err, "could not wake the next in line");
            }
        }
    }
}

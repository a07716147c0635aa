//! Holding jobs back: a key's slots (at most `limit` of its jobs dispatched and not yet ended)
//! and its line (the jobs waiting for one, in order). A batch's jobs share its key, so a pod's
//! queue stays short; per-tenant limits use the same mechanism with a key per owner.
//!
//! A job takes a slot only when one is free and it is first in line; a job not in line joins
//! its back first, so nobody jumps the line. A slot is given back when its job ends (or is
//! found ended), and whoever frees a slot wakes the job now first in line. Every change is a
//! whole-record write conditional on the version read, so two dispatchers cannot both take the
//! last slot.
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// What a job is held back by: its key and the key's limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub key: String,
    pub limit: u32,
}

impl Hold {
    /// A batch's jobs share one key.
    pub fn batch(batch_id: &str, limit: u32) -> Self {
        Self {
            key: format!("batch:{batch_id}"),
            limit: limit.max(1),
        }
    }
}

/// One key's slots and line, as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slots {
    pub key: String,
    pub limit: u32,
    /// Jobs dispatched under the key and not yet ended.
    pub holders: Vec<String>,
    /// Jobs waiting for a slot, first first.
    pub line: VecDeque<String>,
}

impl Slots {
    pub fn new(hold: &Hold) -> Self {
        Self {
            key: hold.key.clone(),
            limit: hold.limit.max(1),
            ..Self::default()
        }
    }

    /// Puts `jobs` at the back of the line, in order; one already in line or holding a slot
    /// keeps its place.
    pub fn line_up<'a>(&mut self, jobs: impl IntoIterator<Item = &'a str>) {
        for job in jobs {
            if !self.holds(job) && !self.line.iter().any(|queued| queued == job) {
                self.line.push_back(job.to_string());
            }
        }
    }

    pub fn holds(&self, job: &str) -> bool {
        self.holders.iter().any(|holder| holder == job)
    }

    /// Whether `job` holds a slot after asking for one: it did already, or a slot was free and
    /// it was first in line. A job that gets none is in line.
    pub fn take(&mut self, job: &str) -> bool {
        if self.holds(job) {
            return true;
        }
        self.line_up([job]);
        if self.free() > 0 && self.line.front().map(String::as_str) == Some(job) {
            self.line.pop_front();
            self.holders.push(job.to_string());
            return true;
        }
        false
    }

    /// `job` ended: its slot, or its place in line, is given up. Nothing held is no error.
    pub fn give_back(&mut self, job: &str) {
        self.holders.retain(|holder| holder != job);
        self.line.retain(|queued| queued != job);
    }

    pub fn free(&self) -> u32 {
        self.limit.saturating_sub(self.holders.len() as u32)
    }

    /// The jobs to wake: as many of the first in line as there are free slots.
    pub fn next_up(&self) -> Vec<String> {
        self.line
            .iter()
            .take(self.free() as usize)
            .cloned()
            .collect()
    }

    /// Nothing held and nobody waiting: the record may go.
    pub fn is_idle(&self) -> bool {
        self.holders.is_empty() && self.line.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(limit: u32, line: &[&str]) -> Slots {
        let mut slots = Slots::new(&Hold {
            key: "batch:b".into(),
            limit,
        });
        slots.line_up(line.iter().copied());
        slots
    }

    #[test]
    fn the_first_in_line_takes_a_free_slot() {
        let mut slots = slots(2, &["a", "b", "c"]);

        assert!(slots.take("a"));
        assert_eq!(slots.holders, vec!["a"]);
        assert_eq!(slots.line, ["b", "c"]);
    }

    #[test]
    fn a_job_behind_others_waits_even_with_a_slot_free() {
        let mut slots = slots(2, &["a", "b"]);

        assert!(!slots.take("b"));
        assert_eq!(slots.next_up(), vec!["a", "b"]);
    }

    #[test]
    fn no_slot_is_taken_past_the_limit() {
        let mut slots = slots(1, &["a", "b"]);
        assert!(slots.take("a"));

        assert!(!slots.take("b"));
        assert_eq!(slots.holders, vec!["a"]);
        assert!(slots.next_up().is_empty());
    }

    #[test]
    fn a_holder_asking_again_keeps_its_slot() {
        let mut slots = slots(1, &["a"]);
        assert!(slots.take("a"));

        assert!(slots.take("a"));
        assert_eq!(slots.holders, vec!["a"]);
    }

    #[test]
    fn a_job_not_in_line_joins_its_back() {
        let mut slots = slots(1, &["a"]);
        assert!(slots.take("a"));

        assert!(!slots.take("z"));
        assert_eq!(slots.line, ["z"]);
    }

    #[test]
    fn an_ended_job_frees_its_slot_for_the_next_in_line() {
        let mut slots = slots(1, &["a", "b"]);
        slots.take("a");

        slots.give_back("a");

        assert_eq!(slots.next_up(), vec!["b"]);
        assert!(slots.take("b"));
    }

    #[test]
    fn a_job_that_ended_while_waiting_leaves_the_line() {
        let mut slots = slots(1, &["a", "b"]);

        slots.give_back("a");

        assert_eq!(slots.line, ["b"]);
    }

    #[test]
    fn giving_back_twice_changes_nothing_more() {
        let mut slots = slots(2, &["a", "b"]);
        slots.take("a");
        slots.give_back("a");
        let once = slots.clone();

        slots.give_back("a");

        assert_eq!(slots, once);
    }
}

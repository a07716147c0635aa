//! Holding jobs back: a key's slots (at most `limit` of its jobs dispatched and not yet ended)
//! and its line (the jobs waiting for one, in order). A batch's jobs share its key, so a pod's
//! queue stays short; per-tenant limits use the same mechanism with a key per owner.
//!
//! A job takes a slot only when one is free and it is first in line; a job not in line joins
//! its back first, so nobody jumps the line. A slot is given back when its job ends (or is
//! found ended), and whoever frees a slot wakes the job now first in line. Every change is a
//! whole-record write conditional on the version read, so two dispatchers cannot both take the
//! last slot.
//!
//! Low-priority jobs wait in a line of their own, behind every normal job of the key.
//!
//! A job held by several keys (a batch's job is also held by its owner's) takes them in the
//! order the job lists them and keeps what it took while it waits for the next. There is no
//! deadlock: the holders of the last key a job takes are always dispatched, so they end and
//! free it; a job waiting for an earlier key holds nothing at all.
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

/// Reads a job's holds as stored now (a list) or by records from before a job could have
/// several (one hold, or none).
pub fn one_or_many<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<Hold>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Many(Vec<Hold>),
        One(Hold),
    }
    Ok(match Option::<Stored>::deserialize(de)? {
        None => Vec::new(),
        Some(Stored::Many(holds)) => holds,
        Some(Stored::One(hold)) => vec![hold],
    })
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
    /// Low-priority jobs waiting, after everyone in `line`.
    #[serde(default)]
    pub low: VecDeque<String>,
}

/// The most jobs one key keeps in line: the record is one DynamoDB item (400 KB at most, and
/// every change rewrites it). A job that finds the line full is not lost: it stays queued, and
/// the sweeper sends it to dispatch again later, when it asks for its place once more.
pub const MAX_LINE: usize = 4_000;

impl Slots {
    pub fn new(hold: &Hold) -> Self {
        Self {
            key: hold.key.clone(),
            limit: hold.limit.max(1),
            ..Self::default()
        }
    }

    /// Puts `jobs` at the back of their line (`low`: the low-priority one), in order; one
    /// already in line or holding a slot keeps its place. Past [`MAX_LINE`] nobody joins.
    pub fn line_up<'a>(&mut self, jobs: impl IntoIterator<Item = &'a str>, low: bool) {
        for job in jobs {
            if self.holds(job) || self.waiting().any(|queued| queued == job) {
                continue;
            }
            if self.line.len() + self.low.len() >= MAX_LINE {
                return;
            }
            let line = if low { &mut self.low } else { &mut self.line };
            line.push_back(job.to_string());
        }
    }

    /// Everyone waiting, in the order they will get a slot.
    pub fn waiting(&self) -> impl Iterator<Item = &String> {
        self.line.iter().chain(self.low.iter())
    }

    pub fn holds(&self, job: &str) -> bool {
        self.holders.iter().any(|holder| holder == job)
    }

    /// Whether `job` holds a slot after asking for one: it did already, or a slot was free and
    /// it was first in line. A job that gets none is in line.
    pub fn take(&mut self, job: &str, low: bool) -> bool {
        if self.holds(job) {
            return true;
        }
        self.line_up([job], low);
        if self.free() > 0 && self.waiting().next().map(String::as_str) == Some(job) {
            self.give_back(job);
            self.holders.push(job.to_string());
            return true;
        }
        false
    }

    /// `job` ended: its slot, or its place in line, is given up. Nothing held is no error.
    pub fn give_back(&mut self, job: &str) {
        self.holders.retain(|holder| holder != job);
        self.line.retain(|queued| queued != job);
        self.low.retain(|queued| queued != job);
    }

    pub fn free(&self) -> u32 {
        self.limit.saturating_sub(self.holders.len() as u32)
    }

    /// The jobs to wake: as many of the first in line as there are free slots.
    pub fn next_up(&self) -> Vec<String> {
        self.waiting().take(self.free() as usize).cloned().collect()
    }

    /// Nothing held and nobody waiting: the record may go.
    pub fn is_idle(&self) -> bool {
        self.holders.is_empty() && self.line.is_empty() && self.low.is_empty()
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
        slots.line_up(line.iter().copied(), false);
        slots
    }

    #[test]
    fn the_first_in_line_takes_a_free_slot() {
        let mut slots = slots(2, &["a", "b", "c"]);

        assert!(slots.take("a", false));
        assert_eq!(slots.holders, vec!["a"]);
        assert_eq!(slots.line, ["b", "c"]);
    }

    #[test]
    fn a_job_behind_others_waits_even_with_a_slot_free() {
        let mut slots = slots(2, &["a", "b"]);

        assert!(!slots.take("b", false));
        assert_eq!(slots.next_up(), vec!["a", "b"]);
    }

    #[test]
    fn no_slot_is_taken_past_the_limit() {
        let mut slots = slots(1, &["a", "b"]);
        assert!(slots.take("a", false));

        assert!(!slots.take("b", false));
        assert_eq!(slots.holders, vec!["a"]);
        assert!(slots.next_up().is_empty());
    }

    #[test]
    fn a_holder_asking_again_keeps_its_slot() {
        let mut slots = slots(1, &["a"]);
        assert!(slots.take("a", false));

        assert!(slots.take("a", false));
        assert_eq!(slots.holders, vec!["a"]);
    }

    #[test]
    fn a_job_not_in_line_joins_its_back() {
        let mut slots = slots(1, &["a"]);
        assert!(slots.take("a", false));

        assert!(!slots.take("z", false));
        assert_eq!(slots.line, ["z"]);
    }

    #[test]
    fn an_ended_job_frees_its_slot_for_the_next_in_line() {
        let mut slots = slots(1, &["a", "b"]);
        slots.take("a", false);

        slots.give_back("a");

        assert_eq!(slots.next_up(), vec!["b"]);
        assert!(slots.take("b", false));
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
        slots.take("a", false);
        slots.give_back("a");
        let once = slots.clone();

        slots.give_back("a");

        assert_eq!(slots, once);
    }

    #[test]
    fn a_low_priority_job_waits_behind_every_normal_one() {
        let mut slots = slots(1, &[]);
        slots.line_up(["low"], true);
        slots.line_up(["normal"], false);

        assert!(!slots.take("low", true));
        assert!(slots.take("normal", false));
        assert_eq!(slots.low, ["low"]);
    }

    #[test]
    fn a_low_priority_job_takes_a_slot_when_no_normal_one_waits() {
        let mut slots = slots(1, &[]);

        assert!(slots.take("low", true));
        assert!(slots.low.is_empty());
    }

    #[test]
    fn the_next_up_are_normal_jobs_before_low_ones() {
        let mut slots = slots(2, &[]);
        slots.line_up(["l1"], true);
        slots.line_up(["n1", "n2"], false);

        assert_eq!(slots.next_up(), vec!["n1", "n2"]);
    }

    #[test]
    fn nobody_joins_a_full_line() {
        let mut slots = slots(1, &[]);
        let many: Vec<String> = (0..MAX_LINE).map(|i| format!("j{i}")).collect();
        slots.line_up(many.iter().map(String::as_str), false);

        slots.line_up(["late"], false);

        assert_eq!(slots.line.len(), MAX_LINE);
        assert!(!slots.waiting().any(|job| job == "late"));
    }
}

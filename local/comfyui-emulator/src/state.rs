//! The server's memory: pending queue, the running prompt, history. All of it is lost on a
//! restart, as in ComfyUI, where it lives in the Python process.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::Faults;

/// One queued prompt: ComfyUI's `(number, prompt_id, prompt, extra_data, outputs_to_execute)`.
#[derive(Debug, Clone)]
pub(crate) struct QueueItem {
    /// The queue position as the client sees it: an integer when minted, a float when the
    /// client sent one (ComfyUI converts it with `float()`).
    pub number: Value,
    pub order: f64,
    /// Arrival order, to break ties between equal numbers.
    pub seq: u64,
    pub prompt_id: String,
    pub prompt: Value,
    pub extra_data: Value,
    pub outputs: Vec<String>,
}

impl QueueItem {
    pub fn to_json(&self) -> Value {
        json!([
            self.number,
            self.prompt_id,
            self.prompt,
            self.extra_data,
            self.outputs
        ])
    }

    pub fn create_time(&self) -> Value {
        self.extra_data
            .get("create_time")
            .cloned()
            .unwrap_or(Value::Null)
    }
}

#[derive(Debug)]
pub(crate) struct Running {
    pub item: QueueItem,
    pub started_ms: u64,
    /// Fired by `/interrupt` and by a restart.
    pub interrupt: Arc<Notify>,
}

/// How a finished prompt ended, in the terms of `/api/jobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Completed,
    Failed,
    Cancelled,
}

impl Outcome {
    pub fn job_status(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct HistoryEntry {
    /// The body `/history/{id}` serves under the id.
    pub body: Value,
    pub outcome: Outcome,
    pub item: QueueItem,
    pub started_ms: u64,
    pub ended_ms: u64,
}

#[derive(Debug)]
pub(crate) struct State {
    pub pending: Vec<QueueItem>,
    pub running: Option<Running>,
    /// Oldest first, as ComfyUI's insertion-ordered dict.
    pub history: VecDeque<(String, HistoryEntry)>,
    /// ComfyUI's `self.number`, the next minted queue number.
    pub next_number: u64,
    pub next_seq: u64,
    /// Bumped by each restart, so that a run from before it leaves no trace.
    pub epoch: u64,
    pub faults: Faults,
}

impl State {
    pub fn new(faults: Faults) -> Self {
        Self {
            pending: Vec::new(),
            running: None,
            history: VecDeque::new(),
            next_number: 0,
            next_seq: 0,
            epoch: 0,
            faults,
        }
    }

    pub fn restart(&mut self) {
        self.pending.clear();
        if let Some(running) = self.running.take() {
            running.interrupt.notify_one();
        }
        self.history.clear();
        self.next_number = 0;
        self.epoch += 1;
    }

    /// Pending items in the order they will run.
    pub fn sort_pending(&mut self) {
        self.pending
            .sort_by(|a, b| a.order.total_cmp(&b.order).then(a.seq.cmp(&b.seq)));
    }

    /// Takes the next item to run, unless the queue is stalled or something runs.
    pub fn take_next(&mut self) -> Option<QueueItem> {
        if self.faults.stall_queue || self.running.is_some() || self.pending.is_empty() {
            return None;
        }
        self.sort_pending();
        Some(self.pending.remove(0))
    }

    pub fn history_entry(&self, prompt_id: &str) -> Option<&HistoryEntry> {
        self.history
            .iter()
            .find(|(id, _)| id == prompt_id)
            .map(|(_, entry)| entry)
    }

    /// ComfyUI's `self.history[prompt_id] = …`: a re-run of an id replaces its entry in place.
    pub fn record(&mut self, prompt_id: String, entry: HistoryEntry, max: usize) {
        if let Some((_, existing)) = self.history.iter_mut().find(|(id, _)| *id == prompt_id) {
            *existing = entry;
            return;
        }
        self.history.push_back((prompt_id, entry));
        while self.history.len() > max {
            self.history.pop_front();
        }
    }
}

/// A JSON object that keeps the order of its keys (serde_json's map sorts them here).
pub(crate) struct OrderedObject(pub Vec<(String, Value)>);

impl Serialize for OrderedObject {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

//! Shared, runtime-switchable fault state.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::RwLock;

use crate::chaos::ChaosState;
use crate::config::{ChaosConfig, Faults};

#[derive(Debug)]
pub(crate) struct FaultState {
    faults: RwLock<Faults>,
    /// Submissions already refused under the current `run_status` fault; reset on every set so
    /// "fail the next N" means the next N after the switch.
    run_failures: AtomicU32,
    /// Counters and the record of probabilistic faults (`Faults::chaos`).
    pub(crate) chaos: ChaosState,
}

impl FaultState {
    pub(crate) fn new(faults: Faults) -> Self {
        Self {
            faults: RwLock::new(faults),
            run_failures: AtomicU32::new(0),
            chaos: ChaosState::default(),
        }
    }

    pub(crate) fn get(&self) -> Faults {
        self.faults
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub(crate) fn set(&self, faults: Faults) {
        let mut guard = self
            .faults
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard = faults;
        self.run_failures.store(0, Ordering::SeqCst);
        self.chaos.restart();
    }

    /// The chaos configuration in force, if any.
    pub(crate) fn chaos_config(&self) -> Option<ChaosConfig> {
        self.faults
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .chaos
            .clone()
    }

    /// The status a submission must be refused with, if the `run_status` fault applies to it.
    pub(crate) fn take_run_failure(&self) -> Option<u16> {
        let faults = self
            .faults
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let status = faults.run_status?;
        if faults.run_fail_count == 0 {
            return Some(status);
        }
        // Counting under the read lock keeps a concurrent `set` from mixing old and new limits.
        let served = self
            .run_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < faults.run_fail_count).then_some(n + 1)
            });
        served.is_ok().then_some(status)
    }
}

//! Per-tenant limits: how many of an owner's jobs may be in flight at once, and how fast the
//! owner may submit. The in-flight limit is a hold-back key per owner (`domain::hold`): jobs
//! past it are accepted and wait queued, holding nothing at the backend. The submit rate is a
//! token bucket, kept as one number per owner (GCRA: the bucket's "theoretical arrival time"),
//! so a store can check and spend a token in one conditional write.
use serde::{Deserialize, Serialize};

use super::hold::Hold;
use super::job::Millis;

/// One owner's limits; 0 turns a limit off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantLimits {
    /// Jobs dispatched and not yet ended, at most.
    pub max_in_flight: u32,
    /// Submit requests a minute, sustained.
    pub submits_per_minute: u32,
    /// Submit requests allowed at once after a quiet spell (the bucket's size).
    pub submit_burst: u32,
}

/// What an operator set for one owner, over the configured defaults; an absent field keeps
/// the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitOverrides {
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    #[serde(default)]
    pub submits_per_minute: Option<u32>,
    #[serde(default)]
    pub submit_burst: Option<u32>,
}

impl TenantLimits {
    pub fn with(self, overrides: &LimitOverrides) -> Self {
        Self {
            max_in_flight: overrides.max_in_flight.unwrap_or(self.max_in_flight),
            submits_per_minute: overrides
                .submits_per_minute
                .unwrap_or(self.submits_per_minute),
            submit_burst: overrides.submit_burst.unwrap_or(self.submit_burst),
        }
    }

    /// The hold that keeps `owner`'s jobs to the in-flight limit; none without a limit.
    pub fn hold(&self, owner: &str) -> Option<Hold> {
        (self.max_in_flight > 0).then(|| Hold {
            key: format!("tenant:{owner}"),
            limit: self.max_in_flight,
        })
    }

    /// The submit rate as a bucket; none without a rate.
    pub fn rate(&self) -> Option<Rate> {
        (self.submits_per_minute > 0).then(|| {
            let interval_ms = (60_000 / self.submits_per_minute as Millis).max(1);
            Rate {
                interval_ms,
                tolerance_ms: interval_ms * (self.submit_burst.max(1) as Millis - 1),
            }
        })
    }
}

/// A token bucket as GCRA sees it: a token comes back every `interval_ms`, and a request is
/// allowed while the owner's theoretical arrival time is at most `tolerance_ms` ahead of now
/// (a full bucket of `burst` tokens is `(burst - 1) * interval` of tolerance).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub interval_ms: Millis,
    pub tolerance_ms: Millis,
}

impl Rate {
    /// Spends a token at `now` against the stored arrival time `tat` (none: a full bucket).
    /// Allowed: the new arrival time to store. Refused: how long until a token is back.
    pub fn admit(&self, tat: Option<Millis>, now: Millis) -> Result<Millis, Millis> {
        let tat = tat.unwrap_or(now).max(now);
        let allowed_from = tat - self.tolerance_ms;
        if now < allowed_from {
            return Err(allowed_from - now);
        }
        Ok(tat + self.interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_minute: u32, burst: u32) -> TenantLimits {
        TenantLimits {
            max_in_flight: 4,
            submits_per_minute: per_minute,
            submit_burst: burst,
        }
    }

    /// Spends tokens at `now` until one is refused; returns how many passed and the wait.
    fn drain(rate: Rate, tat: &mut Option<Millis>, now: Millis) -> (u32, Millis) {
        let mut passed = 0;
        loop {
            match rate.admit(*tat, now) {
                Ok(next) => {
                    *tat = Some(next);
                    passed += 1;
                }
                Err(wait) => return (passed, wait),
            }
        }
    }

    #[test]
    fn a_quiet_owner_may_submit_a_whole_burst_at_once() {
        let rate = limits(60, 5).rate().unwrap();
        let mut tat = None;

        let (passed, wait) = drain(rate, &mut tat, 1_000);

        assert_eq!(passed, 5);
        assert_eq!(wait, 1_000, "one token a second comes back");
    }

    #[test]
    fn tokens_come_back_at_the_rate() {
        let rate = limits(60, 5).rate().unwrap();
        let mut tat = None;
        drain(rate, &mut tat, 0);

        assert_eq!(drain(rate, &mut tat, 2_500).0, 2);
    }

    #[test]
    fn a_long_quiet_spell_refills_no_more_than_the_burst() {
        let rate = limits(60, 3).rate().unwrap();
        let mut tat = None;
        drain(rate, &mut tat, 0);

        assert_eq!(drain(rate, &mut tat, 3_600_000).0, 3);
    }

    #[test]
    fn a_burst_of_one_spaces_requests_by_the_interval() {
        let rate = limits(120, 1).rate().unwrap();
        let mut tat = None;

        assert_eq!(drain(rate, &mut tat, 0), (1, 500));
        assert_eq!(drain(rate, &mut tat, 500).0, 1);
    }

    #[test]
    fn a_zero_limit_turns_it_off() {
        let none = TenantLimits {
            max_in_flight: 0,
            submits_per_minute: 0,
            submit_burst: 0,
        };

        assert_eq!(none.hold("o"), None);
        assert_eq!(none.rate(), None);
    }

    #[test]
    fn an_override_replaces_only_what_it_names() {
        let overridden = limits(60, 5).with(&LimitOverrides {
            max_in_flight: Some(50),
            ..LimitOverrides::default()
        });

        assert_eq!(overridden.max_in_flight, 50);
        assert_eq!(overridden.submits_per_minute, 60);
        assert_eq!(overridden.submit_burst, 5);
    }

    #[test]
    fn an_owners_hold_is_keyed_by_the_owner() {
        let hold = limits(60, 5).hold("acme").unwrap();

        assert_eq!(hold.key, "tenant:acme");
        assert_eq!(hold.limit, 4);
    }
}

//! The retry policy, as pure arithmetic: exponential backoff with full jitter, bounded by a
//! number of attempts and by a time budget, and the sweeper's growing interval for jobs whose
//! checks keep failing. Callers pass the random draw (`unit`, uniform in [0, 1)) so the policy
//! is testable; which errors are worth retrying is the callers' business (README, "Retries and
//! error codes").
use std::time::Duration;

/// Exponential backoff: before retry `n` (1 = the first retry) wait up to `base × 2^(n-1)`,
/// never more than `cap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The longest wait before retry `retry`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(20);
        self.base.saturating_mul(1u32 << exponent).min(self.cap)
    }

    /// Full jitter: a wait drawn uniformly from `[0, ceiling]`, so clients that failed together
    /// do not retry together.
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        self.ceiling(retry).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// How one call is retried within one invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1 = no retries).
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// No attempt starts unless it could end (at its timeout) within this long after the first
    /// began, so the whole call is bounded even when every attempt times out.
    pub budget: Duration,
}

impl RetryPolicy {
    /// No retries at all.
    pub const ONCE: Self = Self {
        max_attempts: 1,
        backoff: Backoff {
            base: Duration::ZERO,
            cap: Duration::ZERO,
        },
        budget: Duration::MAX,
    };

    /// Whether to try again after `attempts` failed attempts, `elapsed` after the first began,
    /// and after how long. `attempt_timeout` bounds one more attempt; `retry_after` is the
    /// server's hint (429 `Retry-After`), honoured when the budget allows it.
    pub fn next_delay(
        &self,
        attempts: u32,
        elapsed: Duration,
        attempt_timeout: Duration,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Option<Duration> {
        if attempts >= self.max_attempts {
            return None;
        }
        let jittered = self.backoff.delay(attempts, unit);
        let delay = retry_after.map_or(jittered, |hint| hint.max(jittered));
        let ends = elapsed
            .saturating_add(delay)
            .saturating_add(attempt_timeout);
        (ends <= self.budget).then_some(delay)
    }
}

/// When the sweeper should look at a job again after `failures` transient failures in a row to
/// check it: `interval × 2^failures`, capped at `cap`, with equal jitter (half fixed, half
/// drawn) so that jobs which failed together during an outage do not all come due together.
/// No failures: exactly `interval`.
pub fn check_backoff(interval: Duration, failures: u32, cap: Duration, unit: f64) -> Duration {
    if failures == 0 {
        return interval;
    }
    let grown = interval
        .saturating_mul(1u32 << failures.min(16))
        .min(cap.max(interval));
    let half = grown / 2;
    half + half.mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            backoff: Backoff {
                base: MS(250),
                cap: MS(2_000),
            },
            budget: Duration::from_secs(15),
        }
    }

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        let b = policy().backoff;
        let ceilings: Vec<_> = (1..=6).map(|n| b.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [MS(250), MS(500), MS(1_000), MS(2_000), MS(2_000), MS(2_000)]
        );
        assert_eq!(b.ceiling(u32::MAX), MS(2_000));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let b = policy().backoff;
        assert_eq!(b.delay(2, 0.0), Duration::ZERO);
        assert_eq!(b.delay(2, 0.5), MS(250));
        assert!(b.delay(2, 0.999_999) <= MS(500));
    }

    #[test]
    fn attempts_are_bounded() {
        let p = policy();
        let t = Duration::from_secs(1);
        assert!(p.next_delay(1, MS(10), t, None, 0.5).is_some());
        assert!(p.next_delay(2, MS(10), t, None, 0.5).is_some());
        assert_eq!(p.next_delay(3, MS(10), t, None, 0.5), None);
        assert_eq!(RetryPolicy::ONCE.next_delay(1, MS(0), t, None, 0.5), None);
    }

    #[test]
    fn no_attempt_starts_that_could_end_past_the_budget() {
        let p = policy();
        // A first attempt that timed out after 10 s leaves no room for another 10 s one.
        let timeout = Duration::from_secs(10);
        assert_eq!(
            p.next_delay(1, Duration::from_secs(10), timeout, None, 0.0),
            None
        );
        // A fast refusal does.
        assert!(p.next_delay(1, MS(30), timeout, None, 0.0).is_some());
    }

    #[test]
    fn a_retry_after_hint_is_honoured_within_the_budget() {
        let p = policy();
        let t = Duration::from_secs(1);
        assert_eq!(
            p.next_delay(1, MS(0), t, Some(Duration::from_secs(3)), 0.5),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            p.next_delay(1, MS(0), t, Some(Duration::from_secs(60)), 0.5),
            None
        );
    }

    #[test]
    fn checks_back_off_after_failures_within_the_cap() {
        let minute = Duration::from_secs(60);
        let cap = Duration::from_secs(600);
        assert_eq!(check_backoff(minute, 0, cap, 0.9), minute);
        assert_eq!(check_backoff(minute, 1, cap, 0.0), minute);
        assert_eq!(check_backoff(minute, 1, cap, 1.0), 2 * minute);
        assert_eq!(check_backoff(minute, 3, cap, 1.0), 8 * minute);
        assert_eq!(check_backoff(minute, 30, cap, 1.0), cap);
        assert_eq!(check_backoff(minute, 30, cap, 0.0), cap / 2);
        // A cap below the interval never shortens the normal interval.
        assert_eq!(check_backoff(minute, 5, MS(10), 1.0), minute);
    }
}

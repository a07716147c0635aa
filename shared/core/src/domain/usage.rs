//! An owner's usage: totals per UTC day of the jobs that ended that day, kept as counters the
//! write that ends each job adds to, never computed by reading jobs.
use serde::{Deserialize, Serialize};

use super::job::{JobState, UsageEntry};

/// Most days one usage query may cover.
pub const MAX_USAGE_DAYS: usize = 92;

/// One owner's totals for one UTC day.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DailyUsage {
    /// `YYYY-MM-DD`.
    pub day: String,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub timed_out: u64,
    /// GPU time of those jobs, as RunPod reported it.
    pub gpu_ms: u64,
    /// Its cost at each job's price, in nano-USD.
    pub cost_nano_usd: u64,
}

impl DailyUsage {
    pub fn new(day: &str) -> Self {
        Self {
            day: day.to_string(),
            ..Self::default()
        }
    }

    /// Counts one ended job.
    pub fn add(&mut self, entry: &UsageEntry) {
        match entry.state {
            JobState::Succeeded => self.succeeded += 1,
            JobState::Failed => self.failed += 1,
            JobState::Cancelled => self.cancelled += 1,
            JobState::TimedOut => self.timed_out += 1,
            // Only an ended job is counted.
            JobState::Queued | JobState::Submitted | JobState::Running => return,
        }
        self.gpu_ms += entry.gpu_ms;
        self.cost_nano_usd += entry.cost_nano_usd;
    }

    pub fn jobs(&self) -> u64 {
        self.succeeded + self.failed + self.cancelled + self.timed_out
    }
}

/// Why a usage range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("{0:?} is not a date (YYYY-MM-DD)")]
    NotADate(String),
    #[error("'from' is after 'to'")]
    Reversed,
    #[error("at most {MAX_USAGE_DAYS} days at once")]
    TooLong,
}

/// Every day from `from` to `to`, both included, as `YYYY-MM-DD`.
pub fn days_between(from: &str, to: &str) -> Result<Vec<String>, RangeError> {
    let (from, to) = (date(from)?, date(to)?);
    if from > to {
        return Err(RangeError::Reversed);
    }
    if (to - from).whole_days() >= MAX_USAGE_DAYS as i64 {
        return Err(RangeError::TooLong);
    }
    let mut days = Vec::new();
    let mut day = Some(from);
    while let Some(d) = day.filter(|d| *d <= to) {
        days.push(format_date(d));
        day = d.next_day();
    }
    Ok(days)
}

fn date(text: &str) -> Result<time::Date, RangeError> {
    let bad = || RangeError::NotADate(text.chars().take(40).collect());
    let mut parts = text.split('-');
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return Err(bad());
    }
    let year: i32 = y.parse().map_err(|_| bad())?;
    let month: u8 = m.parse().map_err(|_| bad())?;
    let day: u8 = d.parse().map_err(|_| bad())?;
    let month = time::Month::try_from(month).map_err(|_| bad())?;
    time::Date::from_calendar_date(year, month, day).map_err(|_| bad())
}

pub(crate) fn format_date(date: time::Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: JobState, gpu_ms: u64, cost: u64) -> UsageEntry {
        UsageEntry {
            day: "2027-01-15".into(),
            state,
            gpu_ms,
            cost_nano_usd: cost,
            version: 3,
        }
    }

    #[test]
    fn a_day_counts_each_ended_job_by_its_state() {
        let mut day = DailyUsage::new("2027-01-15");
        day.add(&entry(JobState::Succeeded, 2_000, 620_000));
        day.add(&entry(JobState::Failed, 500, 155_000));
        day.add(&entry(JobState::TimedOut, 0, 0));
        assert_eq!((day.succeeded, day.failed, day.timed_out), (1, 1, 1));
        assert_eq!(
            (day.gpu_ms, day.cost_nano_usd, day.jobs()),
            (2_500, 775_000, 3)
        );
    }

    #[test]
    fn a_job_not_ended_counts_for_nothing() {
        let mut day = DailyUsage::new("2027-01-15");
        day.add(&entry(JobState::Running, 2_000, 1));
        assert_eq!(day, DailyUsage::new("2027-01-15"));
    }

    #[test]
    fn a_range_lists_every_day_across_months_and_leap_days() {
        assert_eq!(
            days_between("2028-02-28", "2028-03-01").unwrap(),
            ["2028-02-28", "2028-02-29", "2028-03-01"]
        );
        assert_eq!(days_between("2027-01-15", "2027-01-15").unwrap().len(), 1);
    }

    #[test]
    fn a_range_must_be_real_dates_in_order_and_not_too_long() {
        assert!(matches!(
            days_between("2027-1-5", "2027-01-06"),
            Err(RangeError::NotADate(_))
        ));
        assert!(matches!(
            days_between("2027-02-30", "2027-03-01"),
            Err(RangeError::NotADate(_))
        ));
        assert_eq!(
            days_between("2027-01-06", "2027-01-05"),
            Err(RangeError::Reversed)
        );
        assert_eq!(
            days_between("2027-01-01", "2027-12-31"),
            Err(RangeError::TooLong)
        );
        assert_eq!(days_between("2027-01-01", "2027-04-02").unwrap().len(), 92);
    }
}

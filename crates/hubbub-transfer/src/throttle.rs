//! When to tell an uploader how far its upload has got (`fileProgress`).

use std::time::{Duration, Instant};

/// How often progress is reported. A config value with documented defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgressPolicy {
    /// Report each time the upload passes another multiple of this percentage
    /// of the file. Default 10. Zero reports every bit of progress.
    pub step_percent: u8,
    /// Report when this long has passed since the last report and there is
    /// new progress, however little. Default one second.
    pub period: Duration,
}

impl Default for ProgressPolicy {
    fn default() -> Self {
        Self { step_percent: 10, period: Duration::from_secs(1) }
    }
}

/// Decides when a `fileProgress` report is due for one upload: when another
/// step of the file (10 % by default) has arrived or a period (a second by
/// default) has passed with progress, whichever comes first, and always when
/// the upload completes.
///
/// It reads no clock: the driver passes `now` with every count.
///
/// ```
/// use std::time::{Duration, Instant};
/// use hubbub_transfer::{ProgressPolicy, ProgressThrottle};
///
/// let start = Instant::now();
/// let mut throttle = ProgressThrottle::new(1000, ProgressPolicy::default(), start);
/// let ms = |n| start + Duration::from_millis(n);
/// assert!(!throttle.should_report(ms(10), 50)); // 5 %, too soon
/// assert!(throttle.should_report(ms(20), 120)); // passed 10 %
/// assert!(!throttle.should_report(ms(30), 150));
/// assert!(throttle.should_report(ms(1020), 160)); // a second since the last report
/// assert!(throttle.should_report(ms(1030), 1000)); // complete
/// ```
#[derive(Clone, Debug)]
pub struct ProgressThrottle {
    /// The reporting cadence.
    policy: ProgressPolicy,
    /// The upload's size in bytes.
    size: u64,
    /// When the last report was made, or when the upload started.
    last_at: Instant,
    /// The count last reported; zero at the start.
    last_bytes: u64,
    /// Set once completion has been reported, so it is reported only once.
    completed: bool,
}

impl ProgressThrottle {
    /// A throttle for a `size`-byte upload that started at `now`.
    pub fn new(size: u64, policy: ProgressPolicy, now: Instant) -> Self {
        Self { policy, size, last_at: now, last_bytes: 0, completed: false }
    }

    /// True when a report of `received` bytes at `now` is due; the throttle
    /// then takes it as made.
    ///
    /// The first call that sees the whole file received always reports; later
    /// calls never do, so a duplicate chunk at the end does not repeat 100 %.
    /// Otherwise a report is due when `received` has grown past another step
    /// of the file since the last report, or has grown at all and a period has
    /// passed since the last report.
    pub fn should_report(&mut self, now: Instant, received: u64) -> bool {
        if self.completed {
            return false;
        }
        let due = if received >= self.size {
            self.completed = true;
            true
        } else {
            received > self.last_bytes
                && (self.step(received) > self.step(self.last_bytes)
                    || now.saturating_duration_since(self.last_at) >= self.policy.period)
        };
        if due {
            self.last_at = now;
            self.last_bytes = received;
        }
        due
    }

    /// Which step of the file `bytes` is in; each new step is worth a report.
    fn step(&self, bytes: u64) -> u128 {
        // Only called with `bytes < size`, so `size` is not zero; u128 keeps
        // the products exact for any u64 sizes.
        let step = u128::from(self.size) * u128::from(self.policy.step_percent);
        (u128::from(bytes) * 100).checked_div(step).unwrap_or(u128::from(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn reports_each_ten_percent_of_a_fast_upload() {
        let start = Instant::now();
        let mut t = ProgressThrottle::new(1000, ProgressPolicy::default(), start);
        let reported: Vec<u64> =
            (1..=100).map(|i| i * 10).filter(|&b| t.should_report(at(start, b / 10), b)).collect();
        assert_eq!(reported, [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]);
    }

    #[test]
    fn reports_each_period_of_a_slow_upload() {
        let start = Instant::now();
        let mut t = ProgressThrottle::new(1000, ProgressPolicy::default(), start);
        assert!(!t.should_report(at(start, 999), 1));
        assert!(t.should_report(at(start, 1000), 2));
        assert!(!t.should_report(at(start, 1999), 3));
        assert!(t.should_report(at(start, 2000), 4));
    }

    #[test]
    fn no_progress_means_no_report() {
        let start = Instant::now();
        let mut t = ProgressThrottle::new(1000, ProgressPolicy::default(), start);
        assert!(t.should_report(at(start, 2000), 10));
        assert!(!t.should_report(at(start, 5000), 10));
        // A count going backwards (a confused driver) is not progress either.
        assert!(!t.should_report(at(start, 9000), 5));
    }

    #[test]
    fn completion_is_reported_once() {
        let start = Instant::now();
        let mut t = ProgressThrottle::new(1000, ProgressPolicy::default(), start);
        assert!(t.should_report(start, 1000));
        assert!(!t.should_report(at(start, 5000), 1000));
        let mut empty = ProgressThrottle::new(0, ProgressPolicy::default(), start);
        assert!(empty.should_report(start, 0));
    }

    #[test]
    fn policy_is_configurable() {
        let start = Instant::now();
        let every = ProgressPolicy { step_percent: 0, period: Duration::from_secs(3600) };
        let mut t = ProgressThrottle::new(1000, every, start);
        assert!(t.should_report(start, 1));
        assert!(t.should_report(start, 2));
        let quarters = ProgressPolicy { step_percent: 25, period: Duration::from_millis(100) };
        let mut t = ProgressThrottle::new(1000, quarters, start);
        assert!(!t.should_report(at(start, 50), 240));
        assert!(t.should_report(at(start, 60), 250));
        assert!(t.should_report(at(start, 160), 260));
    }
}

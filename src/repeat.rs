//! When a failure that goes on is logged again: at its start, when its reason changes, every
//! `[service] log_repeat` while it lasts, and once when it ends (like rngd and chrony do), so
//! a failing target or source neither floods the log nor goes quiet. Below every other module:
//! the pool, the service and the configuration use it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// `[service] log_repeat`: how often a failure that goes on is logged again.
pub const DEFAULT_LOG_REPEAT: Duration = Duration::from_secs(600);
pub const LOG_REPEAT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 3600);

static LOG_REPEAT_MS: AtomicU64 = AtomicU64::new(DEFAULT_LOG_REPEAT.as_millis() as u64);

/// Sets `log_repeat` for every failure report of the process (at start and at each reload,
/// like the log level it goes with).
pub fn set_log_repeat(every: Duration) {
    LOG_REPEAT_MS.store(every.as_millis() as u64, Ordering::Relaxed);
}

pub fn log_repeat() -> Duration {
    Duration::from_millis(LOG_REPEAT_MS.load(Ordering::Relaxed))
}

/// What to log about one failure in a run of them (see [`FailureRun`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The first failure after success: log it as a warning.
    Started,
    /// The reason is not the one logged last: log it as a warning.
    Changed,
    /// Same reason, `log_repeat` since it was last logged: log it again, with the count.
    Repeated { since: Duration, failures: u64 },
    /// Same reason, logged recently: debug level only.
    Quiet,
}

/// A run of failures of one thing (a target's rounds, the source's requests): loud when it
/// starts, when its reason changes and every `log_repeat` while it goes on; one line when it
/// ends. The clock is the caller's, so tests can drive it.
#[derive(Debug, Default)]
pub struct FailureRun {
    run: Option<Run>,
}

#[derive(Debug)]
struct Run {
    since: tokio::time::Instant,
    failures: u64,
    reason: String,
    logged: tokio::time::Instant,
}

/// How a run of failures ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub lasted: Duration,
    pub failures: u64,
}

impl FailureRun {
    /// Files a failure for `reason` (a stable label, not the message: a message may hold a
    /// changing figure) and says what to log.
    pub fn failed(&mut self, reason: &str, now: tokio::time::Instant, every: Duration) -> Report {
        let Some(run) = &mut self.run else {
            self.run = Some(Run {
                since: now,
                failures: 1,
                reason: reason.to_string(),
                logged: now,
            });
            return Report::Started;
        };
        run.failures += 1;
        if run.reason != reason {
            run.reason = reason.to_string();
            run.logged = now;
            return Report::Changed;
        }
        if now.duration_since(run.logged) >= every {
            run.logged = now;
            return Report::Repeated {
                since: now.duration_since(run.since),
                failures: run.failures,
            };
        }
        Report::Quiet
    }

    /// A success: ends the run, if there was one.
    pub fn succeeded(&mut self, now: tokio::time::Instant) -> Option<Recovery> {
        self.run.take().map(|run| Recovery {
            lasted: now.duration_since(run.since),
            failures: run.failures,
        })
    }

    pub fn failing(&self) -> bool {
        self.run.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{advance, Instant};

    const MINUTE: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_lasting_failure_is_logged_at_its_start_on_change_and_every_log_repeat() {
        let every = 10 * MINUTE;
        let mut run = FailureRun::default();
        assert_eq!(
            run.failed("slot_gone", Instant::now(), every),
            Report::Started
        );
        // A round every 10 s for 25 minutes: quiet except at 10 and 20 minutes.
        let mut loud = Vec::new();
        for round in 1..=150u64 {
            advance(Duration::from_secs(10)).await;
            match run.failed("slot_gone", Instant::now(), every) {
                Report::Quiet => {}
                Report::Repeated { since, failures } => loud.push((round, since, failures)),
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(
            loud,
            vec![(60, 10 * MINUTE, 61), (120, 20 * MINUTE, 121)],
            "repeated exactly every log_repeat, with the time since the start and the count"
        );
        advance(Duration::from_secs(10)).await;
        assert_eq!(
            run.failed("timeout", Instant::now(), every),
            Report::Changed
        );
        advance(Duration::from_secs(10)).await;
        assert_eq!(run.failed("timeout", Instant::now(), every), Report::Quiet);
        advance(Duration::from_secs(10)).await;
        assert_eq!(
            run.succeeded(Instant::now()),
            Some(Recovery {
                lasted: Duration::from_secs(1530),
                failures: 153
            })
        );
        assert!(!run.failing());
        assert_eq!(
            run.succeeded(Instant::now()),
            None,
            "one recovery line per run"
        );
        assert_eq!(
            run.failed("timeout", Instant::now(), every),
            Report::Started
        );
    }

    #[test]
    fn log_repeat_is_process_wide() {
        set_log_repeat(Duration::from_secs(42));
        assert_eq!(log_repeat(), Duration::from_secs(42));
        set_log_repeat(DEFAULT_LOG_REPEAT);
    }
}

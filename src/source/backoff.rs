//! When to ask a failing source again.
//!
//! Schedule, after the n-th failure in a row:
//!
//! - a transient failure (network, timeout, 5xx, 429, a bad answer) waits `0.5 s * 2^(n-1)`,
//!   capped at `cap`, with ±25 % jitter so that many agents do not retry in step. `cap` is half
//!   the shortest target period (at most [`MAX_CAP`]), so the pool refills, and service
//!   resumes, within one period of the source recovering;
//! - a `Retry-After` from the server (429, 503) is honoured when it is longer, up to
//!   [`MAX_RETRY_AFTER`];
//! - a rejected token (401) or a spent quota (403) waits [`AUTH_RETRY`]: the operator has to act,
//!   and hammering the API helps no one. A reload (SIGHUP) resets the schedule.

use std::time::Duration;

use tokio::time::Instant;

use super::SourceError;

pub const FIRST_DELAY: Duration = Duration::from_millis(500);
pub const MAX_CAP: Duration = Duration::from_secs(300);
pub const AUTH_RETRY: Duration = Duration::from_secs(300);
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Consecutive failures and the earliest time of the next try.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    /// `Err(wait)` while the next try must wait.
    pub fn ready(&self, now: Instant) -> Result<(), Duration> {
        match self.not_before {
            Some(t) if t > now => Err(t - now),
            _ => Ok(()),
        }
    }

    /// Records a failure; returns the wait before the next try.
    pub fn failed(&mut self, error: &SourceError, cap: Duration, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = delay(self.failures, error, cap, jitter());
        self.not_before = Some(now + delay);
        delay
    }

    pub fn succeeded(&mut self) {
        *self = Self::default();
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// The wait after the `failures`-th failure in a row; `jitter` in `[-1, 1]` scales ±25 %.
pub fn delay(failures: u32, error: &SourceError, cap: Duration, jitter: f64) -> Duration {
    let cap = cap.clamp(FIRST_DELAY, MAX_CAP);
    let base = match error {
        SourceError::TokenRejected | SourceError::Forbidden => return AUTH_RETRY,
        _ => FIRST_DELAY
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
            .min(cap),
    };
    let jittered = base.mul_f64(1.0 + 0.25 * jitter.clamp(-1.0, 1.0));
    let asked = match error {
        SourceError::RateLimited { retry_after } | SourceError::Unavailable { retry_after } => {
            retry_after.map(|d| d.min(MAX_RETRY_AFTER))
        }
        _ => None,
    };
    match asked {
        Some(asked) if asked > jittered => asked,
        _ => jittered,
    }
}

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        return 0.0;
    }
    (u32::from_le_bytes(b) as f64 / u32::MAX as f64) * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network() -> SourceError {
        SourceError::Timeout(Duration::from_secs(10))
    }

    #[test]
    fn doubles_up_to_the_cap() {
        let cap = Duration::from_secs(10);
        let waits: Vec<u128> = (1..=7)
            .map(|n| delay(n, &network(), cap, 0.0).as_millis())
            .collect();
        assert_eq!(waits, vec![500, 1000, 2000, 4000, 8000, 10000, 10000]);
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        let cap = Duration::from_secs(60);
        assert_eq!(delay(5, &network(), cap, 1.0), Duration::from_secs(10));
        assert_eq!(delay(5, &network(), cap, -1.0), Duration::from_secs(6));
    }

    #[test]
    fn retry_after_is_honoured_when_longer() {
        let limited = SourceError::RateLimited {
            retry_after: Some(Duration::from_secs(30)),
        };
        assert_eq!(
            delay(1, &limited, Duration::from_secs(10), 0.0),
            Duration::from_secs(30)
        );
        let short = SourceError::Unavailable {
            retry_after: Some(Duration::from_millis(10)),
        };
        assert_eq!(
            delay(4, &short, Duration::from_secs(10), 0.0),
            Duration::from_secs(4)
        );
    }

    #[test]
    fn token_problems_retry_slowly() {
        let cap = Duration::from_secs(1);
        assert_eq!(delay(1, &SourceError::TokenRejected, cap, 0.0), AUTH_RETRY);
        assert_eq!(delay(9, &SourceError::Forbidden, cap, 1.0), AUTH_RETRY);
    }

    #[tokio::test(start_paused = true)]
    async fn ready_after_the_wait_and_reset_by_success() {
        let mut backoff = Backoff::default();
        let now = Instant::now();
        assert!(backoff.ready(now).is_ok());
        let wait = backoff.failed(&network(), Duration::from_secs(10), now);
        assert!(backoff.ready(now).is_err());
        assert!(backoff.ready(now + wait).is_ok());
        backoff.succeeded();
        assert_eq!(backoff.failures(), 0);
        assert!(backoff.ready(now).is_ok());
    }
}

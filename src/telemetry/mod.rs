//! What qseed tells its operator: logs ([`logs`]), metrics and health endpoints ([`metrics`],
//! [`server`]) and systemd's notify protocol ([`systemd`]). No log line, metric or status ever
//! carries the API token, a PIN or entropy bytes: the types that hold them print as redacted.

pub mod clock;
pub mod ledger;
pub mod log_batch;
pub mod logs;
pub mod metrics;
pub mod server;
pub mod systemd;

pub use logs::{init, LogFormat};

/// From now on, this thread's ledger records and routine log lines wait for its own flush,
/// which it makes through a [`HeldOutput`] before they are older than their delays (a PKCS#11
/// timer thread: see [`ledger::write_own_records`] and [`log_batch`]).
pub fn hold_this_threads_output() {
    ledger::write_own_records();
    log_batch::hold_this_threads_lines();
}

/// Writes the held ledger records and log lines, whoever held them.
pub fn flush_held() {
    ledger::flush();
    log_batch::flush();
}

/// Since when a thread that holds its output (see [`hold_this_threads_output`]) holds log
/// lines and ledger records: each kind is written before a sleep would keep it past its own
/// delay ([`log_batch::HELD_LINES_DELAY`], [`ledger::OWN_RECORDS_DELAY`]).
#[derive(Debug, Default)]
pub struct HeldOutput {
    lines_since: Option<std::time::Instant>,
    records_since: Option<std::time::Instant>,
}

impl HeldOutput {
    /// A record and a line were held at `now` (a round's audit record).
    pub fn held(&mut self, now: std::time::Instant) {
        self.lines_since.get_or_insert(now);
        self.records_since.get_or_insert(now);
    }

    /// Whether a sleep until `wake` would keep something past its delay.
    pub fn overdue_at(&self, wake: std::time::Instant) -> bool {
        self.lines_overdue(wake) || self.records_overdue(wake)
    }

    /// Writes what a sleep until `wake` would keep past its delay.
    pub fn write_overdue(&mut self, wake: std::time::Instant) {
        if self.records_overdue(wake) {
            ledger::flush();
            self.records_since = None;
        }
        if self.lines_overdue(wake) {
            log_batch::flush();
            self.lines_since = None;
        }
    }

    fn lines_overdue(&self, wake: std::time::Instant) -> bool {
        overdue(self.lines_since, wake, log_batch::HELD_LINES_DELAY)
    }

    fn records_overdue(&self, wake: std::time::Instant) -> bool {
        overdue(self.records_since, wake, ledger::OWN_RECORDS_DELAY)
    }
}

fn overdue(
    since: Option<std::time::Instant>,
    wake: std::time::Instant,
    delay: std::time::Duration,
) -> bool {
    since.is_some_and(|since| wake.saturating_duration_since(since) >= delay)
}

/// The `tracing` target of the one-line-per-injection records.
pub const AUDIT: &str = "qseed::audit";

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Lines are due after a second, records after five: a round a second writes its lines
    /// every other round and its records every fifth or sixth.
    #[test]
    fn held_lines_and_records_fall_due_each_after_its_own_delay() {
        let start = Instant::now();
        let at = |s: f64| start + Duration::from_secs_f64(s);
        let mut held = HeldOutput::default();
        assert!(!held.overdue_at(at(100.0)), "nothing held, nothing due");
        held.held(start);
        assert!(!held.overdue_at(at(0.9)));
        assert!(held.overdue_at(at(1.0)));
        held.write_overdue(at(1.0));
        assert_eq!(held.lines_since, None, "the lines were written");
        assert_eq!(held.records_since, Some(start), "the records wait on");
        held.held(at(1.0));
        assert_eq!(held.lines_since, Some(at(1.0)));
        assert!(!held.overdue_at(at(1.9)));
        assert!(held.overdue_at(at(2.0)));
        held.write_overdue(at(5.0));
        assert_eq!((held.lines_since, held.records_since), (None, None));
        assert!(!held.overdue_at(at(100.0)));
    }
}

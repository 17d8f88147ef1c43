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

/// From now on, this thread's ledger records and routine log lines wait for its own
/// [`flush_held`], which it makes before they are [`ledger::OWN_RECORDS_DELAY`] old (a PKCS#11
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

/// The `tracing` target of the one-line-per-injection records.
pub const AUDIT: &str = "qseed::audit";

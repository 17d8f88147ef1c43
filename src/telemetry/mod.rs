//! What qseed tells its operator: logs ([`logs`]), metrics and health endpoints ([`metrics`],
//! [`server`]) and systemd's notify protocol ([`systemd`]). No log line, metric or status ever
//! carries the API token, a PIN or entropy bytes: the types that hold them print as redacted.

pub mod ledger;
pub mod logs;
pub mod metrics;
pub mod server;
pub mod systemd;

pub use logs::{init, LogFormat};

/// The `tracing` target of the one-line-per-injection records.
pub const AUDIT: &str = "qseed::audit";

//! Logs. Human-readable lines on stderr; the level comes from `--verbose`/`--quiet` or
//! `QSEED_LOG` (e.g. `QSEED_LOG=qseed=debug`). No log line ever carries the API token, a PIN or
//! entropy bytes: the types that hold them print as redacted.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The `tracing` target of the one-line-per-injection records.
pub const AUDIT: &str = "qseed::audit";

/// Installs the stderr logger. `default_level` applies where `QSEED_LOG` is not set.
pub fn init(default_level: &str) {
    let filter = EnvFilter::try_from_env("QSEED_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("qseed={default_level},warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

//! Logs. Human-readable lines on stderr; the level comes from `--verbose`/`--quiet` or
//! `QSEED_LOG` (e.g. `QSEED_LOG=qseed=debug`). No log line ever carries the API token, a PIN or
//! entropy bytes: the types that hold them print as redacted.

pub mod metrics;
pub mod server;
pub mod systemd;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The `tracing` target of the one-line-per-injection records.
pub const AUDIT: &str = "qseed::audit";

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, fields at the top level, for log pipelines. Audit records
    /// have `"target": "qseed::audit"` and `"event": "injection"`.
    Json,
}

/// Installs the stderr logger. `default_level` applies where `QSEED_LOG` is not set.
pub fn init(default_level: &str, format: LogFormat) {
    // cryptoki logs only when dropping a session fails to close it, which qseed does on
    // purpose for sessions it knows are dead: noise for an operator.
    let filter = EnvFilter::try_from_env("QSEED_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("qseed={default_level},cryptoki=off,warn")));
    // A closed stderr (`qseed run 2>&1 | head`) must not matter: by default the subscriber
    // reports its own write errors with `eprintln!`, which panics on that same closed stderr.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match format {
        // The audit record's fields repeat its message: text lines show the message only.
        LogFormat::Text => builder
            .fmt_fields(tracing_subscriber::fmt::format::debug_fn(
                |w, field, value| {
                    if field.name() == "message" {
                        write!(w, "{value:?}")
                    } else {
                        Ok(())
                    }
                },
            ))
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_target(true)
            .try_init(),
    };
}

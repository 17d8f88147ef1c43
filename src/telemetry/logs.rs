//! Where log lines go, and how often a lasting failure is repeated.
//!
//! Under systemd (stderr is the journal stream named by `JOURNAL_STREAM`) events go to the
//! journal natively: real priorities (`journalctl -p warning`), fields (`TARGET_NAME`, the
//! audit record's `EVENT`, `BYTES`, `REQUEST_IDS`...) and the journal's own timestamps.
//! Elsewhere: text lines on stderr, or one JSON object per line. The level comes from
//! `--verbose`/`--quiet` or `QSEED_LOG` (e.g. `QSEED_LOG=qseed=debug`).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The name journald files qseed's events under (`journalctl -t qseed`).
pub const SYSLOG_IDENTIFIER: &str = "qseed";

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// The journal when stderr is connected to it (under systemd), text otherwise.
    #[default]
    Auto,
    /// One human-readable line per event on stderr.
    Text,
    /// One JSON object per line on stderr, fields at the top level, for log pipelines. Audit
    /// records have `"target": "qseed::audit"` and `"event": "injection"`.
    Json,
    /// journald's native protocol, with priorities and fields.
    Journal,
}

/// Installs the logger and returns the format in use (`Auto` resolved). `default_level`
/// applies where `QSEED_LOG` is not set.
pub fn init(default_level: &str, format: LogFormat) -> LogFormat {
    // cryptoki logs only when dropping a session fails to close it, which qseed does on
    // purpose for sessions it knows are dead: noise for an operator.
    let filter = || {
        EnvFilter::try_from_env("QSEED_LOG")
            .unwrap_or_else(|_| EnvFilter::new(format!("qseed={default_level},cryptoki=off,warn")))
    };
    let wanted = match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journal,
        LogFormat::Auto => LogFormat::Text,
        other => other,
    };
    if wanted == LogFormat::Journal {
        match tracing_journald::layer() {
            Ok(journal) => {
                let journal = journal
                    .with_syslog_identifier(SYSLOG_IDENTIFIER.into())
                    // Fields keep their own names (TARGET_NAME, BYTES...): none of qseed's
                    // collides with a field journald defines.
                    .with_field_prefix(None);
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(journal)
                    .try_init();
                return LogFormat::Journal;
            }
            Err(e) => {
                init_stderr(filter(), LogFormat::Text);
                tracing::warn!("cannot write to the journal ({e}); logging to stderr");
                return LogFormat::Text;
            }
        }
    }
    init_stderr(filter(), wanted);
    wanted
}

fn init_stderr(filter: EnvFilter, format: LogFormat) {
    // A closed stderr (`qseed run 2>&1 | head`) must not matter: by default the subscriber
    // reports its own write errors with `eprintln!`, which panics on that same closed stderr.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_target(true)
            .try_init(),
        // Fields repeat what the message says (the target's name, the audit record's
        // figures): text lines show the message only.
        _ => builder
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
    };
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` names its
/// device and inode, and matches only while stderr was not redirected since (systemd's rule,
/// see systemd.exec(5)).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(device), Ok(inode)) = (device.parse::<u64>(), inode.parse::<u64>()) else {
        return false;
    };
    rustix::fs::fstat(std::io::stderr())
        .is_ok_and(|stat| stat.st_dev == device && stat.st_ino == inode)
}

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

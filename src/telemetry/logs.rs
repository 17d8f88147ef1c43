//! Where log lines go, and how often a lasting failure is repeated.
//!
//! Under systemd (stderr is the journal stream named by `JOURNAL_STREAM`) events go to the
//! journal natively: real priorities (`journalctl -p warning`), fields (`TARGET_NAME`, the
//! audit record's `EVENT`, `BYTES`, `REQUEST_IDS`...) and the journal's own timestamps.
//! Elsewhere: text lines on stderr, or one JSON object per line. The level comes from
//! `--verbose`/`--quiet` or `QSEED_LOG` (e.g. `QSEED_LOG=qseed=debug`).

use std::io::IsTerminal;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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

/// Installs the logger and returns the format in use (`Auto` resolved). `default_level` is
/// qseed's own level where `QSEED_LOG` is not set.
///
/// `QSEED_LOG` takes `target=level` directives and a bare default level, comma-separated
/// (`qseed=debug,warn`); a filter that does not parse is reported and the default used.
pub fn init(default_level: LevelFilter, format: LogFormat) -> LogFormat {
    let (filter, refused) = filter(std::env::var("QSEED_LOG").ok(), default_level);
    let filter = || filter.clone();
    let format = install(filter, format);
    if format != LogFormat::Journal {
        super::log_batch::flush_before_panics();
    }
    if let Some(problem) = refused {
        tracing::warn!("{problem}");
    }
    format
}

/// The filter from `QSEED_LOG` (`value`), and why it was refused if it was.
fn filter(value: Option<String>, default_level: LevelFilter) -> (Targets, Option<String>) {
    // cryptoki logs only when dropping a session fails to close it, which qseed does on
    // purpose for sessions it knows are dead: noise for an operator.
    // A checklist command (doctor, check) asks for errors only: then the libraries (a TLS
    // library's own ERROR line) stay silent too, and the checklist reads on its own.
    let libraries = if default_level <= LevelFilter::ERROR {
        LevelFilter::OFF
    } else {
        LevelFilter::WARN
    };
    let default = Targets::new()
        .with_target("qseed", default_level)
        .with_target("cryptoki", LevelFilter::OFF)
        .with_default(libraries);
    match value.as_deref().map(str::trim) {
        None | Some("") => (default, None),
        Some(text) => match text.parse::<Targets>() {
            Ok(targets) => (targets, None),
            Err(e) => (
                default,
                Some(format!(
                    "QSEED_LOG is not a log filter ({e}); using the default. \
                     Write target=level pairs and a default level, comma-separated, \
                     e.g. QSEED_LOG=qseed=debug,warn"
                )),
            ),
        },
    }
}

fn install(filter: impl Fn() -> Targets, format: LogFormat) -> LogFormat {
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

fn init_stderr(filter: Targets, format: LogFormat) {
    if format == LogFormat::Json {
        // A closed stderr (`qseed run 2>&1 | head`) must not matter: by default the
        // subscriber reports its own write errors with `eprintln!`, which panics on that same
        // closed stderr. The builder's own filter stays wide open (it would stop at INFO):
        // `filter` decides.
        let _ = tracing_subscriber::fmt()
            .with_max_level(LevelFilter::TRACE)
            .with_writer(super::log_batch::Stderr)
            .with_timer(super::clock::LogTimer)
            .log_internal_errors(false)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_target(true)
            .finish()
            .with(filter)
            .try_init();
        return;
    }
    let ansi = std::io::stderr().is_terminal();
    let audit_lines = filter.would_enable(super::AUDIT, &tracing::Level::INFO);
    let installed = text_subscriber(super::log_batch::Stderr, super::clock::LogTimer, ansi)
        .with(filter)
        .try_init()
        .is_ok();
    // Only the subscriber installed here may be written for.
    if installed && audit_lines && !ansi {
        super::log_batch::write_audit_text_directly();
    }
}

/// The text lines' subscriber, without its filter: `<time> <level> <message>`. Fields repeat
/// what the message says (the target's name, the audit record's figures): text lines show the
/// message only. [`super::log_batch::audit_text`] writes its uncoloured lines the same way.
pub fn text_subscriber<W, T>(writer: W, timer: T, ansi: bool) -> impl tracing::Subscriber
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
    T: tracing_subscriber::fmt::time::FormatTime + Send + Sync + 'static,
{
    // As in the JSON branch: write errors are not reported, the filter is the caller's.
    tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .with_writer(writer)
        .with_timer(timer)
        .log_internal_errors(false)
        .fmt_fields(tracing_subscriber::fmt::format::debug_fn(
            |w, field, value| {
                if field.name() == "message" {
                    write!(w, "{value:?}")
                } else {
                    Ok(())
                }
            },
        ))
        .with_ansi(ansi)
        .with_target(false)
        .finish()
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

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn without_qseed_log_qseed_logs_at_its_level_and_cryptoki_not_at_all() {
        let (targets, refused) = filter(None, LevelFilter::INFO);
        assert!(refused.is_none());
        assert!(targets.would_enable("qseed::audit", &Level::INFO));
        assert!(!targets.would_enable("qseed::service", &Level::DEBUG));
        assert!(!targets.would_enable("cryptoki::session", &Level::ERROR));
        assert!(targets.would_enable("hyper", &Level::WARN));
        assert!(!targets.would_enable("hyper", &Level::INFO));
    }

    #[test]
    fn qseed_log_replaces_the_default() {
        let (targets, refused) = filter(Some("qseed=debug,rustls=trace".into()), LevelFilter::WARN);
        assert!(refused.is_none());
        assert!(targets.would_enable("qseed::service", &Level::DEBUG));
        assert!(targets.would_enable("rustls::client", &Level::TRACE));
        assert!(!targets.would_enable("hyper", &Level::ERROR));
    }

    #[test]
    fn a_filter_that_does_not_parse_is_named_and_the_default_kept() {
        let (targets, refused) = filter(Some("qseed=loud".into()), LevelFilter::INFO);
        let problem = refused.expect("refused");
        assert!(
            problem.contains("QSEED_LOG is not a log filter"),
            "{problem}"
        );
        assert!(
            problem.contains("e.g. QSEED_LOG=qseed=debug,warn"),
            "{problem}"
        );
        assert!(targets.would_enable("qseed", &Level::INFO));
        assert!(!targets.would_enable("qseed", &Level::DEBUG));
    }
}

//! Text and JSON log lines on stderr, where a PKCS#11 timer thread's routine lines wait for
//! its next flush.
//!
//! With targets staggered over the period, every injection's audit line was a `write` of its
//! own: on a file, an inode update each; on a pipe (a container runtime, a log shipper), a
//! wake-up of the reader each. A timer thread already writes its ledger records before a sleep
//! that would keep them past [`ledger::OWN_RECORDS_DELAY`](super::ledger::OWN_RECORDS_DELAY);
//! its INFO and DEBUG lines now wait for that same flush, so 64 staggered targets make one
//! write a second instead of 64. Each line keeps the timestamp of its event.
//!
//! Order is kept: a line that is not held (a warning, any line of another thread, a message
//! the command prints) writes the held lines first, in the same lock. Held lines are written
//! at a timer thread's flush, when they reach [`HELD_BYTES`], at the end of the command and
//! before a panic's message. Only a process killed outright (SIGKILL, the OOM killer) loses
//! them, at most a second of routine lines, as it loses that second of ledger records.
//!
//! The journal is not concerned: its native protocol takes one datagram per event.
//!
//! Plain text lines (no colours) of the audit records skip `tracing`: [`audit_text`] writes
//! them as the subscriber would, byte for byte. At one target a round runs from a cache a
//! second cold, and the event's path through the subscriber (dispatch, filter, field visitors
//! of ten fields, the formatter) cost about 15 µs of a 200 µs round (BENCHMARKS.md, eighth
//! and thirteenth passes); the line's shape is fixed: time, level, message.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Held lines beyond this are written at once (64 targets' audit lines for a second are
/// about 11 KiB).
pub const HELD_BYTES: usize = 64 * 1024;

static HELD: Mutex<Held> = Mutex::new(Held { lines: Vec::new() });

thread_local! {
    static HOLDS: Cell<bool> = const { Cell::new(false) };
    /// The line [`audit_text`] formats, kept for the next one.
    static AUDIT_LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Audit records go to stderr as plain text lines, and the log filter lets them through: set
/// by [`super::logs`] when it installs that subscriber, never otherwise.
static PLAIN_AUDIT_TEXT: AtomicBool = AtomicBool::new(false);

/// Lets [`audit_text`] write the audit records' lines (plain text on stderr, the filter
/// letting `qseed::audit` INFO through).
pub fn write_audit_text_directly() {
    PLAIN_AUDIT_TEXT.store(true, Ordering::Relaxed);
}

/// Writes an audit record's INFO line with `message`, as the plain text subscriber formats it
/// (`<time>  INFO <message>`), held like any of this thread's routine lines; `false` when
/// another format (JSON, the journal, colours) or the filter leaves the line to `tracing`.
pub fn audit_text(message: std::fmt::Arguments<'_>) -> bool {
    if !PLAIN_AUDIT_TEXT.load(Ordering::Relaxed) {
        return false;
    }
    AUDIT_LINE.with(|line| {
        let mut line = line.borrow_mut();
        line.clear();
        plain_info_line(&mut line, SystemTime::now(), message);
        let mut writer = Line {
            hold: held_here(Level::INFO),
        };
        // As the subscriber does with its own writer's errors: a closed stderr is not ours.
        let _ = writer.write(line.as_bytes());
        // A burst of long lines does not keep its peak.
        line.shrink_to(1024);
    });
    true
}

/// An INFO line as the text subscriber writes it without colours, spans, target or thread
/// (see `logs::init_stderr`): the time as [`super::clock::LogTimer`] writes it, a space, the
/// level right-aligned to five, a space, the message.
pub(crate) fn plain_info_line(
    out: &mut String,
    time: SystemTime,
    message: std::fmt::Arguments<'_>,
) {
    use std::fmt::Write as _;
    let _ = super::clock::write(out, time, super::clock::Fraction::Micros);
    out.push_str("  INFO ");
    let _ = out.write_fmt(message);
    out.push('\n');
}

/// From now on this thread's INFO and DEBUG lines wait for a [`flush`], which the thread
/// promises to make before they are [`ledger::OWN_RECORDS_DELAY`](super::ledger::OWN_RECORDS_DELAY)
/// old (a PKCS#11 timer thread, with its ledger records).
pub fn hold_this_threads_lines() {
    HOLDS.with(|holds| holds.set(true));
}

/// Whether a line at `level` written on this thread waits for a [`flush`].
fn held_here(level: Level) -> bool {
    // Levels compare by verbosity: INFO, DEBUG and TRACE are >= INFO.
    level >= Level::INFO && HOLDS.with(Cell::get)
}

/// Writes the held lines now.
pub fn flush() {
    let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
    // stderr closed or full: the lines are dropped, as a direct write would drop them.
    let _ = held.write_out(&mut std::io::stderr().lock());
}

/// Makes every panic write the held lines before its message. A panic on the thread that
/// holds the buffer's lock (not expected: nothing in a write panics) leaves them for later.
pub fn flush_before_panics() {
    let message = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut held) = HELD.try_lock() {
            let _ = held.write_out(&mut std::io::stderr().lock());
        }
        message(info);
    }));
}

/// Writes `text` to stderr after the held lines (the messages a command prints itself).
pub fn write_now(text: std::fmt::Arguments<'_>) {
    let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
    let mut stderr = std::io::stderr().lock();
    let _ = held.write_out(&mut stderr);
    let _ = stderr.write_fmt(text);
}

/// Lines waiting for a flush, at most [`HELD_BYTES`].
struct Held {
    lines: Vec<u8>,
}

impl Held {
    /// Keeps `line` if it fits.
    fn keep(&mut self, line: &[u8]) -> bool {
        if self.lines.len() + line.len() > HELD_BYTES {
            return false;
        }
        self.lines.extend_from_slice(line);
        true
    }

    /// Writes the lines to `out` and forgets them, written or not.
    fn write_out(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if self.lines.is_empty() {
            return Ok(());
        }
        let written = out.write_all(&self.lines);
        self.lines.clear();
        // A burst of lines does not keep its peak of memory.
        self.lines.shrink_to(HELD_BYTES / 4);
        written
    }
}

/// The subscriber's writer: stderr, with the routine lines of a thread that holds them held.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { hold: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line {
            hold: held_here(*meta.level()),
        }
    }
}

/// One event's line (the subscriber formats the whole line, then writes it in one call).
#[derive(Debug)]
pub struct Line {
    hold: bool,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        if self.hold && held.keep(buf) {
            return Ok(buf.len());
        }
        let mut stderr = std::io::stderr().lock();
        let _ = held.write_out(&mut stderr);
        stderr.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holding_threads_routine_lines_wait_and_nothing_else_does() {
        std::thread::spawn(|| {
            assert!(
                !held_here(Level::INFO),
                "a thread holds nothing until it asks"
            );
            hold_this_threads_lines();
            assert!(held_here(Level::INFO));
            assert!(held_here(Level::DEBUG));
            assert!(!held_here(Level::WARN));
            assert!(!held_here(Level::ERROR));
        })
        .join()
        .unwrap();
        assert!(
            !held_here(Level::INFO),
            "another thread's choice is its own"
        );
    }

    #[test]
    fn held_lines_are_bounded_and_written_out_in_order_once() {
        let mut held = Held { lines: Vec::new() };
        assert!(held.keep(b"first\n"));
        assert!(held.keep(b"second\n"));
        let mut out = Vec::new();
        held.write_out(&mut out).unwrap();
        assert_eq!(out, b"first\nsecond\n");
        held.write_out(&mut out).unwrap();
        assert_eq!(out, b"first\nsecond\n", "written once");
        assert!(held.keep(&vec![b'x'; HELD_BYTES - 1]));
        assert!(held.keep(b"\n"), "up to the bound");
        assert!(!held.keep(b"y"), "not past it");
        assert!(held.lines.capacity() <= 2 * HELD_BYTES);
        held.write_out(&mut Vec::new()).unwrap();
        assert!(held.lines.is_empty());
        assert!(held.lines.capacity() <= HELD_BYTES / 4 * 2);
    }
}

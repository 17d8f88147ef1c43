//! Wall-clock timestamps for log lines and ledger records: RFC 3339, UTC, `Z`
//! ("2026-12-05T12:02:48.795240Z"). Turning seconds into a calendar date and time is most of
//! a timestamp's cost, and a PKCS#11 timer thread serving staggered targets writes two per
//! injection (its audit line's and its ledger record's), dozens a second: each thread formats
//! a second's date and time once and reuses them for every timestamp within that second.

use std::cell::Cell;
use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// "2026-12-05T12:02:48": the part of a timestamp that changes once a second.
const SECOND_LEN: usize = 19;

thread_local! {
    /// The last second this thread formatted, and its text.
    static LAST_SECOND: Cell<(u64, [u8; SECOND_LEN])> = const { Cell::new((u64::MAX, [0; SECOND_LEN])) };
}

/// Digits after the second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fraction {
    Millis,
    Micros,
}

/// The last second RFC 3339's four-digit years can write: 9999-12-31T23:59:59.
const LAST_SECOND_WRITABLE: u64 = 253_402_300_799;

/// Writes `time` as RFC 3339 in UTC with `fraction`'s digits, as humantime's
/// `format_rfc3339_millis` and `format_rfc3339_micros` do. A clock set before 1970 or past
/// 9999 (which humantime refuses, with a panic or an error) is written as the nearest time it
/// can write.
pub fn write(out: &mut impl Write, time: SystemTime, fraction: Fraction) -> std::fmt::Result {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let since = if since.as_secs() > LAST_SECOND_WRITABLE {
        Duration::new(LAST_SECOND_WRITABLE, 999_999_999)
    } else {
        since
    };
    let second = LAST_SECOND.with(|last| {
        let (cached, text) = last.get();
        if cached == since.as_secs() {
            return text;
        }
        // "2026-12-05T12:02:48Z": always 20 bytes within the range above.
        let full =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(since.as_secs()))
                .to_string();
        let mut text = [b'0'; SECOND_LEN];
        text.copy_from_slice(&full.as_bytes()[..SECOND_LEN]);
        last.set((since.as_secs(), text));
        text
    });
    // ASCII digits and separators, as humantime wrote them.
    out.write_str(std::str::from_utf8(&second).map_err(|_| std::fmt::Error)?)?;
    match fraction {
        Fraction::Millis => write!(out, ".{:03}Z", since.subsec_millis()),
        Fraction::Micros => write!(out, ".{:06}Z", since.subsec_micros()),
    }
}

/// `time` as [`write`] writes it.
pub fn format(time: SystemTime, fraction: Fraction) -> String {
    let mut text = String::with_capacity(SECOND_LEN + 8);
    let _ = write(&mut text, time, fraction);
    text
}

/// The log lines' timer (text and JSON): the time each line is written, to the microsecond, as
/// `tracing_subscriber`'s default timer writes it.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogTimer;

impl tracing_subscriber::fmt::time::FormatTime for LogTimer {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write(w, SystemTime::now(), Fraction::Micros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn timestamps_read_as_humantime_writes_them() {
        // Within one second (the cached text), across seconds, days and years, and the ends
        // of a second's fraction.
        let times = [
            at(1_764_936_168, 795_240_123),
            at(1_764_936_168, 0),
            at(1_764_936_168, 999_999_999),
            at(1_764_936_169, 1_000),
            at(1_764_979_199, 999_999_000),
            at(1_764_979_200, 0),
            at(1_798_761_599, 500_000_000),
            at(1_798_761_600, 7),
            at(0, 0),
            at(253_402_300_799, 999_999_999),
        ];
        for time in times {
            assert_eq!(
                format(time, Fraction::Micros),
                humantime::format_rfc3339_micros(time).to_string()
            );
            assert_eq!(
                format(time, Fraction::Millis),
                humantime::format_rfc3339_millis(time).to_string()
            );
        }
    }

    #[test]
    fn a_clock_out_of_range_is_written_as_the_nearest_time_without_a_panic() {
        let before_1970 = UNIX_EPOCH - Duration::from_secs(86_400);
        assert_eq!(
            format(before_1970, Fraction::Millis),
            "1970-01-01T00:00:00.000Z"
        );
        let year_10000 = at(253_402_300_800, 0);
        assert_eq!(
            format(year_10000, Fraction::Micros),
            "9999-12-31T23:59:59.999999Z"
        );
    }

    #[test]
    fn log_lines_keep_the_default_timers_form() {
        use tracing_subscriber::fmt::time::FormatTime;
        let mut ours = String::new();
        let mut theirs = String::new();
        LogTimer
            .format_time(&mut tracing_subscriber::fmt::format::Writer::new(&mut ours))
            .unwrap();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut tracing_subscriber::fmt::format::Writer::new(
                &mut theirs,
            ))
            .unwrap();
        // Taken microseconds apart: the same form, the same second (or the next).
        assert_eq!(ours.len(), theirs.len(), "{ours} / {theirs}");
        assert_eq!(ours.as_bytes()[SECOND_LEN], b'.');
        assert_eq!(theirs.as_bytes()[SECOND_LEN], b'.');
        assert!(ours.ends_with('Z') && theirs.ends_with('Z'));
        assert_eq!(ours[..16], theirs[..16], "{ours} / {theirs}");
    }
}

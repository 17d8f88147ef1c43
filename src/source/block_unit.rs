//! `POST /api/v1/entropy`'s `block_size`, read two ways (issue 25; see `entropy-api.md`).
//!
//! The appliance's written specification counts it in bytes (1..1024); Qrypt's own qseed sends
//! `block_size: 1` and reads 1,024 bytes back, as if it counted KiB (1..512). Nobody here can
//! ask the real service, so qseed works with both. `[source] block_unit`:
//!
//! - `"bytes"`: `block_size: 1024` per 1 KiB block, as the specification says;
//! - `"kib"`: `block_size: 1` per 1 KiB block, as Qrypt's qseed sends;
//! - `"auto"` (the default): bytes first, and KiB from the first answer that says the server
//!   reads KiB. Only two signals count: a 400 whose message speaks of `block_size`, or blocks
//!   of exactly 1,024 times the size asked. In KiB, blocks of exactly 1/1,024 of the size
//!   asked switch back. A switch is logged once with its reason and remembered in the state
//!   folder per source URL, so the next start asks in the right unit at once.
//!
//! Bytes of an answer whose unit was misread are never used: a block of the wrong length is
//! refused whole (see [`super::answer`]), and the request is made again in the other unit.
//! With `"bytes"` or `"kib"` nothing is probed; a mismatch is an error that names
//! `block_unit` and the fix.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::Deserialize;

use super::answer::AnswerError;
use super::{SourceError, BLOCK_LEN};

/// `[source] block_unit` as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockUnit {
    #[default]
    Auto,
    Bytes,
    Kib,
}

impl BlockUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            BlockUnit::Auto => "auto",
            BlockUnit::Bytes => "bytes",
            BlockUnit::Kib => "kib",
        }
    }
}

/// How the server reads `block_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    Bytes,
    Kib,
}

impl Reading {
    pub fn as_str(self) -> &'static str {
        match self {
            Reading::Bytes => "bytes",
            Reading::Kib => "kib",
        }
    }

    fn other(self) -> Self {
        match self {
            Reading::Bytes => Reading::Kib,
            Reading::Kib => Reading::Bytes,
        }
    }

    /// `block_size` for one [`BLOCK_LEN`]-byte block.
    pub fn block_size(self) -> usize {
        match self {
            Reading::Bytes => BLOCK_LEN,
            Reading::Kib => 1,
        }
    }
}

/// The unit one source asks in, and what it learned (shared by the clones of a client).
#[derive(Debug)]
pub struct UnitChoice {
    setting: BlockUnit,
    current: Mutex<Reading>,
    /// Where a learned unit is remembered: `<state>/sources/` and the file's name.
    memo: Option<(PathBuf, String)>,
}

/// What a failed request says about the unit.
#[derive(Debug)]
pub enum Verdict {
    /// Nothing: the error stands.
    Unrelated,
    /// The server reads the other unit, and `auto` switched to it: ask again.
    Switched,
    /// The server reads the other unit, and the setting forbids switching: this error says so.
    Mismatch(SourceError),
}

impl UnitChoice {
    /// The choice for the source at `url`; `state` is the state folder, where `auto` keeps
    /// what it learned.
    pub fn new(setting: BlockUnit, url: &str, state: Option<&Path>) -> Self {
        let memo = state.map(|s| (s.to_path_buf(), memo_name(url)));
        let current = match setting {
            BlockUnit::Bytes => Reading::Bytes,
            BlockUnit::Kib => Reading::Kib,
            BlockUnit::Auto => memo
                .as_ref()
                .and_then(|(state, name)| recall(state, name))
                .unwrap_or(Reading::Bytes),
        };
        Self {
            setting,
            current: Mutex::new(current),
            memo,
        }
    }

    pub fn setting(&self) -> BlockUnit {
        self.setting
    }

    /// The unit requests are made in now.
    pub fn reading(&self) -> Reading {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads `error` of a request made in `asked`: whether the server reads the other unit.
    pub fn judge(&self, error: &SourceError, asked: Reading, url: &str) -> Verdict {
        let Some(reason) = other_unit_signal(error, asked) else {
            return Verdict::Unrelated;
        };
        let other = asked.other();
        if self.setting != BlockUnit::Auto {
            return Verdict::Mismatch(SourceError::BlockUnit(format!(
                "{url} reads block_size in {} ({reason}), and source.block_unit = \"{}\" asks in \
                 {}; set block_unit = \"{}\" (or \"auto\", which finds out by itself)",
                unit_words(other),
                self.setting.as_str(),
                unit_words(asked),
                other.as_str()
            )));
        }
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if *current == asked {
            *current = other;
            tracing::warn!(
                "{url}: the server reads block_size in {} ({reason}); asking in {} from now on \
                 (source.block_unit = \"auto\"; set it to \"{}\" to skip this probe)",
                unit_words(other),
                unit_words(other),
                other.as_str()
            );
            drop(current);
            self.remember(other);
        }
        Verdict::Switched
    }

    fn remember(&self, reading: Reading) {
        let Some((state, name)) = &self.memo else {
            return;
        };
        let written = crate::folder::StateFolder::open(state)
            .and_then(|s| s.subfolder("sources"))
            .and_then(|folder| {
                folder
                    .write_atomic(name, format!("{}\n", reading.as_str()).as_bytes())
                    .map_err(|e| format!("cannot write {}: {e}", folder.file_path(name).display()))
            });
        if let Err(e) = written {
            tracing::warn!("the block unit learned is not remembered for the next start: {e}");
        }
    }
}

fn unit_words(reading: Reading) -> &'static str {
    match reading {
        Reading::Bytes => "bytes",
        Reading::Kib => "KiB",
    }
}

/// `block-unit-<first 12 hex digits of SHA-256 of the URL>`.
fn memo_name(url: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, url.as_bytes());
    format!("block-unit-{}", hex::encode(&digest.as_ref()[..6]))
}

fn recall(state: &Path, name: &str) -> Option<Reading> {
    let folder = crate::folder::StateFolder::open(state)
        .and_then(|s| s.subfolder("sources"))
        .ok()?;
    let text = folder.read(name, 64).ok()??;
    match std::str::from_utf8(&text).ok()?.trim() {
        "kib" => Some(Reading::Kib),
        "bytes" => Some(Reading::Bytes),
        _ => None,
    }
}

/// Why `error`, for a request made in `asked`, means that the server reads the other unit;
/// `None` when it does not say so.
fn other_unit_signal(error: &SourceError, asked: Reading) -> Option<String> {
    match (error, asked) {
        // A KiB reading refuses 1024 "KiB" as out of its range.
        (
            SourceError::Status {
                status: 400,
                detail,
            },
            Reading::Bytes,
        ) if detail.to_ascii_lowercase().contains("block_size") => Some(format!(
            "it refused block_size {} with HTTP 400: {}",
            BLOCK_LEN,
            detail.trim()
        )),
        (SourceError::BadAnswer(AnswerError::WrongBlockLength { asked: a, got, .. }), _) => {
            match asked {
                Reading::Bytes if *got == a * 1024 => Some(format!(
                    "blocks of {got} bytes came back for block_size {}",
                    asked.block_size()
                )),
                Reading::Kib if got * 1024 == *a => Some(format!(
                    "blocks of {got} byte(s) came back for block_size {}",
                    asked.block_size()
                )),
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad_request(detail: &str) -> SourceError {
        SourceError::Status {
            status: 400,
            detail: detail.into(),
        }
    }

    fn wrong_length(asked: usize, got: usize) -> SourceError {
        SourceError::BadAnswer(AnswerError::WrongBlockLength {
            index: 0,
            asked,
            got,
        })
    }

    #[test]
    fn auto_switches_on_the_two_signals_only_and_remembers() {
        let state = tempfile::tempdir().unwrap();
        let url = "https://api.example/";
        let choice = UnitChoice::new(BlockUnit::Auto, url, Some(state.path()));
        assert_eq!(choice.reading(), Reading::Bytes);
        // Other 400s, other lengths: nothing is guessed.
        for error in [
            bad_request("block_count must be 1..512"),
            wrong_length(1024, 1000),
            SourceError::Status {
                status: 500,
                detail: "block_size".into(),
            },
        ] {
            assert!(matches!(
                choice.judge(&error, Reading::Bytes, url),
                Verdict::Unrelated
            ));
        }
        assert!(matches!(
            choice.judge(
                &bad_request("block_size must be 1..512 KiB"),
                Reading::Bytes,
                url
            ),
            Verdict::Switched
        ));
        assert_eq!(choice.reading(), Reading::Kib);
        // The next start asks in KiB at once.
        let later = UnitChoice::new(BlockUnit::Auto, url, Some(state.path()));
        assert_eq!(later.reading(), Reading::Kib);
        // Another URL has its own.
        let other = UnitChoice::new(BlockUnit::Auto, "https://b.example/", Some(state.path()));
        assert_eq!(other.reading(), Reading::Bytes);
        // Blocks of 1/1024 the size asked switch back.
        assert!(matches!(
            later.judge(&wrong_length(1024, 1), Reading::Kib, url),
            Verdict::Switched
        ));
        assert_eq!(later.reading(), Reading::Bytes);
        assert!(matches!(
            later.judge(&wrong_length(1024, 1024 * 1024), Reading::Bytes, url),
            Verdict::Switched
        ));
        assert_eq!(later.reading(), Reading::Kib);
    }

    #[test]
    fn a_fixed_unit_names_the_setting_and_the_fix() {
        let url = "https://api.example/";
        let kib = UnitChoice::new(BlockUnit::Kib, url, None);
        match kib.judge(&wrong_length(1024, 1), Reading::Kib, url) {
            Verdict::Mismatch(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("block_unit = \"kib\"") && text.contains("\"bytes\""),
                    "{text}"
                );
            }
            _ => panic!("a mismatch"),
        }
        assert_eq!(kib.reading(), Reading::Kib);
        let bytes = UnitChoice::new(BlockUnit::Bytes, url, None);
        match bytes.judge(&bad_request("block_size out of range"), Reading::Bytes, url) {
            Verdict::Mismatch(e) => assert!(e.to_string().contains("set block_unit = \"kib\"")),
            _ => panic!("a mismatch"),
        }
    }
}

//! The PIN guard: a PIN that a token refused is never presented to it again, by this process
//! or any later one (HSMs lock users after a few wrong PINs; some wipe partitions).
//!
//! A record per token (module, label, serial) sits in `<state folder>/pin-guard/` and names
//! the *identity* of the PIN source that failed (a PIN file's inode and change times; for a
//! PIN qseed cannot watch, the configuration file's, see [`crate::config::PinSource`]). It
//! never holds the PIN nor anything computed from it: PINs are short enough that any hash of
//! one can be searched. While the source's identity is unchanged, no login is attempted; when
//! the operator changes the source, the next login presents the new PIN once. `qseed doctor
//! --retry-pin TARGET`, or deleting the record file, lifts a record explicitly.
//!
//! Crash safety: before `C_Login`, an *attempt* record is written and synced; the outcome
//! replaces it (removed when the PIN was accepted or not judged, *failed* when refused). An
//! attempt record found later means a process stopped mid-login, the outcome unknown: it
//! blocks like a failure. An exclusive `flock` on the record's lock file for the whole
//! check-login-record sequence keeps two processes (`run` beside a cron `once`) from both
//! presenting the same PIN.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::error::HsmError;
use super::token::TokenIdentity;
use crate::config::PinSource;
use crate::state::StateDir;

/// Subfolder of the state folder holding the records.
const FOLDER: &str = "pin-guard";
/// Records are a few hundred bytes; a larger file is not one of ours.
const RECORD_LIMIT: u64 = 16 * 1024;

/// Shared by every target of the process (clones share the same records).
#[derive(Debug, Clone)]
pub struct PinGuard {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `<state>/pin-guard`, or `None` when state lasts for this process only.
    folder: Option<PathBuf>,
    /// Why there is no folder, for the one warning.
    memory_only_because: Option<String>,
    warned: AtomicBool,
    /// Set when the folder failed a write: from then on the memory below counts too.
    degraded: AtomicBool,
    /// Failures seen by this process, by token key. With a working folder the folder decides
    /// (an operator who deletes a record, or runs `--retry-pin` from another process, lifts it
    /// for a running service too); without one, or after a failed write, this does.
    failed: Mutex<HashMap<String, Record>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Outcome {
    /// A login was under way; if found by a later process, its outcome is unknown.
    Attempt,
    /// The token refused the PIN (or its flags forbid a login).
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    outcome: Outcome,
    target: String,
    module: String,
    token_label: String,
    token_serial: String,
    pin_source: String,
    pin_source_identity: String,
    reason: String,
    time: String,
    pid: u32,
}

/// One token, as the guard knows it.
#[derive(Debug, Clone)]
struct TokenKey {
    /// File stem of the record: readable, and unique through a digest of the full key.
    id: String,
    module: PathBuf,
    label: String,
    serial: String,
}

impl TokenKey {
    fn new(module: &Path, token: &TokenIdentity) -> Self {
        // Two paths to one module file are one module.
        let module = std::fs::canonicalize(module).unwrap_or_else(|_| module.to_path_buf());
        let mut full = Vec::new();
        for part in [
            module.as_os_str().as_encoded_bytes(),
            token.label.as_bytes(),
            token.serial.as_bytes(),
        ] {
            full.extend_from_slice(part);
            full.push(0);
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &full);
        let short: String = digest.as_ref()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self {
            id: format!(
                "{}-{}-{short}",
                file_safe(&token.label),
                file_safe(&token.serial)
            ),
            module,
            label: token.label.clone(),
            serial: token.serial.clone(),
        }
    }
}

fn file_safe(text: &str) -> String {
    let safe: String = text
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    if safe.is_empty() {
        "token".into()
    } else {
        safe
    }
}

impl PinGuard {
    /// A guard keeping its records in `state` (or in memory, if it has no folder).
    pub fn new(state: &StateDir) -> Self {
        let (folder, memory_only_because) = match state {
            StateDir::Folder(dir) => {
                let folder = dir.join(FOLDER);
                let made = match std::fs::DirBuilder::new().mode(0o700).create(&folder) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                    _ => tempfile::Builder::new()
                        .prefix(".probe")
                        .tempfile_in(&folder)
                        .map(drop),
                };
                match made {
                    Ok(()) => (Some(folder), None),
                    // A folder made by another user (root, by hand) is not this one's to use.
                    Err(e) => (
                        None,
                        Some(format!(
                            "cannot write {} ({e}); make it {}'s (chown -R)",
                            folder.display(),
                            super::quirks::running_user()
                        )),
                    ),
                }
            }
            StateDir::Memory { why } => (None, Some(why.clone())),
        };
        Self {
            inner: Arc::new(Inner {
                folder,
                memory_only_because,
                warned: AtomicBool::new(false),
                degraded: AtomicBool::new(false),
                failed: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Where the records are, for `doctor` and the logs.
    pub fn describe(&self) -> Result<String, String> {
        match (&self.inner.folder, &self.inner.memory_only_because) {
            (Some(folder), _) => Ok(folder.display().to_string()),
            (None, why) => Err(why.clone().unwrap_or_default()),
        }
    }

    /// Before `C_Login` with `source` on `token`: refuses when this source already failed on
    /// this token (or a login with it was cut short); otherwise records the attempt and
    /// returns it, to be settled with the login's outcome.
    pub fn begin(
        &self,
        target: &str,
        module: &Path,
        token: &TokenIdentity,
        source: &PinSource,
    ) -> Result<LoginAttempt, HsmError> {
        let key = TokenKey::new(module, token);
        let memory_decides =
            self.inner.folder.is_none() || self.inner.degraded.load(Ordering::Relaxed);
        if let Some(failed) = self.failed_lock().get(&key.id).filter(|_| memory_decides) {
            if failed.pin_source_identity == source.identity {
                return Err(blocked(failed, target, source, None));
            }
        }
        let record = Record {
            outcome: Outcome::Attempt,
            target: target.to_string(),
            module: key.module.display().to_string(),
            token_label: key.label.clone(),
            token_serial: key.serial.clone(),
            pin_source: source.described.clone(),
            pin_source_identity: source.identity.clone(),
            reason: String::new(),
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            pid: std::process::id(),
        };
        let Some(folder) = &self.inner.folder else {
            self.warn_memory_only();
            return Ok(LoginAttempt::new(self.clone(), key, record, None));
        };
        let lock = match lock(folder, &key) {
            Ok(lock) => lock,
            Err(LockError::Busy) => return Err(HsmError::LoginBusy),
            Err(LockError::Io(e)) => {
                self.degrade(&format!(
                    "cannot lock a record in {}: {e}",
                    folder.display()
                ));
                return Ok(LoginAttempt::new(self.clone(), key, record, None));
            }
        };
        let path = record_path(folder, &key);
        match read_record(&path) {
            Ok(None) => {}
            Ok(Some(earlier)) if earlier.pin_source_identity == source.identity => {
                return Err(blocked(&earlier, target, source, Some(&path)));
            }
            Ok(Some(earlier)) => tracing::info!(
                "{target}: {} changed since the login that {} on {}; presenting it once",
                source.described,
                match earlier.outcome {
                    Outcome::Failed => format!("failed ({})", earlier.reason),
                    Outcome::Attempt => "was cut short".to_string(),
                },
                earlier.time
            ),
            Err(e) => {
                return Err(HsmError::PinGuarded(format!(
                    "the PIN guard's record {} cannot be read ({e}), so qseed will not risk a \
                     login; delete that file to allow one",
                    path.display()
                )))
            }
        }
        if let Err(e) = write_record(folder, &path, &record) {
            self.degrade(&format!("cannot write {}: {e}", path.display()));
        }
        Ok(LoginAttempt::new(self.clone(), key, record, Some(lock)))
    }

    /// Records a failure that needed no login (the token's flags say the PIN is locked, or
    /// that the next wrong PIN locks it).
    pub fn record_flag(
        &self,
        target: &str,
        module: &Path,
        token: &TokenIdentity,
        source: &PinSource,
        reason: &str,
    ) {
        if let Ok(attempt) = self.begin(target, module, token, source) {
            attempt.refused(reason);
        }
    }

    /// Forgets the record for `token` (`doctor --retry-pin`); returns the file removed, if any.
    pub fn lift(&self, module: &Path, token: &TokenIdentity) -> Result<Option<PathBuf>, String> {
        let key = TokenKey::new(module, token);
        self.failed_lock().remove(&key.id);
        let Some(folder) = &self.inner.folder else {
            return Ok(None);
        };
        let _lock = lock(folder, &key).map_err(|e| match e {
            LockError::Busy => "another qseed process is logging in to this token right now; \
                                try again in a moment"
                .to_string(),
            LockError::Io(e) => format!("cannot lock the record in {}: {e}", folder.display()),
        })?;
        let path = record_path(folder, &key);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(Some(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot remove {}: {e}", path.display())),
        }
    }

    fn warn_memory_only(&self) {
        if !self.inner.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "PIN guard: {}; a refused PIN is remembered only while this process runs. Set \
                 [service] state_dir to a folder qseed's user can write",
                self.inner
                    .memory_only_because
                    .as_deref()
                    .unwrap_or("no state folder")
            );
        }
    }

    fn degrade(&self, why: &str) {
        self.inner.degraded.store(true, Ordering::Relaxed);
        if !self.inner.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "PIN guard: {why}; a refused PIN is remembered only while this process runs"
            );
        }
    }

    fn failed_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.inner
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A login under way; settle it with the outcome. Dropped unsettled (a thread that died), the
/// attempt record stays and blocks, which is the safe side.
#[derive(Debug)]
pub struct LoginAttempt {
    guard: PinGuard,
    key: TokenKey,
    record: Record,
    /// Held until settled: no other process presents a PIN to this token meanwhile.
    lock: Option<File>,
}

impl LoginAttempt {
    fn new(guard: PinGuard, key: TokenKey, record: Record, lock: Option<File>) -> Self {
        Self {
            guard,
            key,
            record,
            lock,
        }
    }

    /// The token accepted the PIN: no record.
    pub fn accepted(self) {
        self.clear();
    }

    /// The login failed for a reason that says nothing about the PIN (a device error): no
    /// record, the next login may try.
    pub fn inconclusive(self) {
        self.clear();
    }

    /// The token refused the PIN: recorded for this process and, where possible, for good.
    pub fn refused(mut self, reason: &str) {
        self.record.outcome = Outcome::Failed;
        self.record.reason = reason.to_string();
        self.record.time =
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        self.guard
            .failed_lock()
            .insert(self.key.id.clone(), self.record.clone());
        if let (Some(folder), Some(_)) = (&self.guard.inner.folder, &self.lock) {
            let path = record_path(folder, &self.key);
            if let Err(e) = write_record(folder, &path, &self.record) {
                self.guard
                    .degrade(&format!("cannot write {}: {e}", path.display()));
            }
        }
    }

    fn clear(self) {
        self.guard.failed_lock().remove(&self.key.id);
        if let (Some(folder), Some(_)) = (&self.guard.inner.folder, &self.lock) {
            let path = record_path(folder, &self.key);
            match std::fs::remove_file(&path) {
                Ok(()) => sync_folder(folder),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("PIN guard: cannot remove {}: {e}", path.display()),
            }
        }
    }
}

fn blocked(record: &Record, target: &str, source: &PinSource, path: Option<&Path>) -> HsmError {
    let file = path
        .map(|p| format!(", or delete {}", p.display()))
        .unwrap_or_default();
    let change = if source.watches_file {
        "correct the PIN file (qseed notices the change)"
    } else {
        "correct the PIN, then change the configuration file (qseed cannot watch an inline, \
         environment or credential PIN; `touch` will do)"
    };
    HsmError::PinGuarded(match record.outcome {
        Outcome::Failed => format!(
            "not logging in: a login with {} failed on {} ({}), and HSMs lock users after a \
             few wrong PINs. To present a PIN again, {change}, or run `qseed doctor \
             --retry-pin {target}`{file}",
            source.described, record.time, record.reason
        ),
        Outcome::Attempt => format!(
            "not logging in: a qseed process (pid {}) stopped during a login with {} on {}, so \
             whether the token accepted that PIN is unknown, and HSMs lock users after a few \
             wrong PINs. If the PIN is right, run `qseed doctor --retry-pin {target}`{file}",
            record.pid, source.described, record.time
        ),
    })
}

fn record_path(folder: &Path, key: &TokenKey) -> PathBuf {
    folder.join(format!("{}.record", key.id))
}

enum LockError {
    Busy,
    Io(std::io::Error),
}

fn lock(folder: &Path, key: &TokenKey) -> Result<File, LockError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(folder.join(format!("{}.lock", key.id)))
        .map_err(LockError::Io)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(LockError::Busy),
        Err(e) => Err(LockError::Io(e.into())),
    }
}

fn read_record(path: &Path) -> Result<Option<Record>, String> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut text = String::new();
    file.take(RECORD_LIMIT + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > RECORD_LIMIT {
        return Err("it is too large to be a record".into());
    }
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| e.message().trim().to_string())
}

/// Writes `record` to `path` whole or not at all (a temporary file, synced, then renamed).
fn write_record(folder: &Path, path: &Path, record: &Record) -> std::io::Result<()> {
    let body = toml::to_string(record).map_err(std::io::Error::other)?;
    let mut file = tempfile::Builder::new()
        .prefix(".record")
        .tempfile_in(folder)?;
    write!(
        file,
        "# qseed PIN guard: qseed will not present this PIN source to this token again.\n\
         # To allow one more login, correct the PIN source, run\n\
         #   qseed doctor --retry-pin {}\n\
         # or delete this file.\n{body}",
        record.target
    )?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    sync_folder(folder);
    Ok(())
}

fn sync_folder(folder: &Path) {
    if let Ok(dir) = File::open(folder) {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(serial: &str) -> TokenIdentity {
        TokenIdentity {
            slot: cryptoki::slot::Slot::try_from(1u64).unwrap(),
            label: "hsm one".into(),
            serial: serial.into(),
            model: "m".into(),
            manufacturer: "x".into(),
            slot_description: String::new(),
            slot_manufacturer: String::new(),
            initialized: true,
            has_rng: true,
            user_pin_final_try: false,
            user_pin_locked: false,
            login_required: true,
            user_pin_initialized: true,
            user_pin_count_low: false,
            user_pin_to_be_changed: false,
            protected_authentication_path: false,
            partly_unknown: None,
        }
    }

    fn source(identity: &str) -> PinSource {
        PinSource {
            described: "pin_file \"hsm.pin\"".into(),
            identity: identity.into(),
            watches_file: true,
        }
    }

    fn guard(dir: &Path) -> PinGuard {
        PinGuard::new(&StateDir::Folder(dir.to_path_buf()))
    }

    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

    #[test]
    fn a_refused_pin_is_blocked_in_later_processes_until_its_source_changes() {
        let dir = tempfile::tempdir().unwrap();
        let t = token("1234");
        let attempt = guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &source("v1"))
            .unwrap();
        attempt.refused("C_Login: CKR_PIN_INCORRECT");
        // A new guard is a new process: it reads the record.
        let later = guard(dir.path());
        let err = later
            .begin("a", Path::new(MODULE), &t, &source("v1"))
            .unwrap_err();
        assert!(err.is_pin_error() && err.is_permanent());
        let text = err.to_string();
        assert!(text.contains("CKR_PIN_INCORRECT"), "{text}");
        assert!(text.contains("--retry-pin a"), "{text}");
        // Another token of the same module is not affected.
        later
            .begin("b", Path::new(MODULE), &token("5678"), &source("v1"))
            .unwrap()
            .accepted();
        // A changed source is presented once; accepted, the record is gone.
        later
            .begin("a", Path::new(MODULE), &t, &source("v2"))
            .unwrap()
            .accepted();
        guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &source("v1"))
            .unwrap()
            .accepted();
    }

    #[test]
    fn a_login_cut_short_blocks_until_lifted() {
        let dir = tempfile::tempdir().unwrap();
        let t = token("1");
        let attempt = guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &source("v1"))
            .unwrap();
        // The process dies mid-login: the attempt is never settled, its lock released.
        drop(attempt);
        let later = guard(dir.path());
        let err = later
            .begin("a", Path::new(MODULE), &t, &source("v1"))
            .unwrap_err();
        assert!(err.to_string().contains("stopped during a login"), "{err}");
        let removed = later.lift(Path::new(MODULE), &t).unwrap();
        assert!(removed.is_some());
        later
            .begin("a", Path::new(MODULE), &t, &source("v1"))
            .unwrap()
            .accepted();
    }

    #[test]
    fn two_processes_never_present_a_pin_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = token("1");
        let first = guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &source("v1"))
            .unwrap();
        let second = guard(dir.path()).begin("a", Path::new(MODULE), &t, &source("v1"));
        assert!(matches!(second, Err(HsmError::LoginBusy)), "{second:?}");
        first.inconclusive();
        guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &source("v1"))
            .unwrap()
            .accepted();
    }

    #[test]
    fn records_hold_no_pin_and_a_damaged_record_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let t = token("1");
        guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &source("file:/x:ino=7"))
            .unwrap()
            .refused("C_Login: CKR_PIN_INCORRECT");
        let folder = dir.path().join(FOLDER);
        let record = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "record"))
            .unwrap();
        let text = std::fs::read_to_string(&record).unwrap();
        assert!(text.contains("outcome = \"failed\""), "{text}");
        assert!(text.contains("token_serial = \"1\""), "{text}");
        assert!(
            record
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("hsm_one-1-"),
            "{record:?}"
        );
        std::fs::write(&record, "garbage").unwrap();
        let err = guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &source("other"))
            .unwrap_err();
        assert!(err.to_string().contains("cannot be read"), "{err}");
    }

    #[test]
    fn a_deleted_record_lifts_the_guard_for_a_running_process_too() {
        let dir = tempfile::tempdir().unwrap();
        let running = guard(dir.path());
        let t = token("1");
        running
            .begin("a", Path::new(MODULE), &t, &source("v1"))
            .unwrap()
            .refused("C_Login: CKR_PIN_INCORRECT");
        assert!(running
            .begin("a", Path::new(MODULE), &t, &source("v1"))
            .is_err());
        // Another process (`doctor --retry-pin`) lifts it.
        assert!(guard(dir.path())
            .lift(Path::new(MODULE), &t)
            .unwrap()
            .is_some());
        running
            .begin("a", Path::new(MODULE), &t, &source("v1"))
            .unwrap()
            .accepted();
    }

    #[test]
    fn without_a_folder_the_guard_lasts_for_the_process() {
        let guard = PinGuard::new(&StateDir::Memory { why: "test".into() });
        let t = token("1");
        guard
            .begin("a", Path::new(MODULE), &t, &source("v1"))
            .unwrap()
            .refused("C_Login: CKR_PIN_INCORRECT");
        assert!(guard
            .begin("a", Path::new(MODULE), &t, &source("v1"))
            .is_err());
        assert!(guard.describe().is_err());
    }
}

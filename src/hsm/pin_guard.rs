//! The PIN guard: a PIN that a token refused is never presented to it again, by this process
//! or any later one (HSMs lock users after a few wrong PINs; some wipe partitions).
//!
//! A record per token sits in `<state folder>/pin-guard/`. A token is known by what it says of
//! itself (label, serial, model, manufacturer), not by the module that reaches it: one token
//! behind p11-kit's proxy and directly is one token. The record names the PIN that failed by a
//! keyed digest of the PIN itself (HMAC-SHA-256 under `pin-guard/key`, 32 random bytes, 0600):
//! without the key the digest says nothing about the PIN (PINs are short enough that a plain
//! hash of one could be searched), and with it the guard notices a changed PIN whatever the
//! operator did to the file (a `chmod`, a link, an upgrade's `chown` change nothing). While the
//! PIN is the one that failed, no login is attempted; a new PIN is presented once. `qseed
//! doctor --retry-pin TARGET`, or deleting the record file, lifts a record explicitly.
//!
//! Fails closed: a login goes ahead only once its attempt is written and synced. No state
//! folder, a record that cannot be read or written, a link, folder or FIFO in a record's
//! place, a lock that cannot be taken: the login is refused and the target stops with the
//! reason. Every file is opened through [`StateFolder`] (relative to the folder's descriptor,
//! never following a link).
//!
//! Crash safety: before `C_Login`, an *attempt* record is written and synced; the outcome
//! replaces it (removed when the PIN was accepted or not judged, *failed* when refused). An
//! attempt record found later means a process stopped mid-login, the outcome unknown: it
//! blocks like a failure. An exclusive `flock` on the record's lock file for the whole
//! check-login-record sequence keeps two processes (`run` beside a cron `once`) from both
//! presenting the same PIN.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::hmac;
use serde::{Deserialize, Serialize};

use super::error::HsmError;
use super::token::TokenIdentity;
use crate::config::UserLogin;
use crate::folder::{LockError, StateFolder};
use crate::state::StateDir;

/// Subfolder of the state folder holding the records.
const FOLDER: &str = "pin-guard";
/// The digest key's file in that folder.
const KEY_FILE: &str = "key";
const KEY_LEN: usize = 32;
/// Records are a few hundred bytes; a larger file is not one of ours.
const RECORD_LIMIT: u64 = 16 * 1024;

/// Shared by every target of the process (clones share the same folder).
#[derive(Debug, Clone)]
pub struct PinGuard {
    inner: Arc<Result<Folder, String>>,
}

/// The records' folder and the key of their digests.
struct Folder {
    folder: StateFolder,
    key: hmac::Key,
    /// Names the key in records: a record made under another key cannot be compared.
    key_id: String,
}

impl std::fmt::Debug for Folder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Folder")
            .field("folder", &self.folder.path())
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
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
    #[serde(default)]
    token_model: String,
    #[serde(default)]
    token_manufacturer: String,
    pin_source: String,
    /// Earlier versions named the PIN by its file's metadata; kept readable, not written.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pin_source_identity: String,
    /// HMAC-SHA-256 of the PIN under the folder's key, hex, first 128 bits.
    #[serde(default)]
    pin_digest: String,
    /// Which key made `pin_digest`.
    #[serde(default)]
    key_id: String,
    reason: String,
    time: String,
    pid: u32,
}

/// One token, as the guard knows it.
#[derive(Debug, Clone)]
struct TokenKey {
    /// File stem of the record: readable, and unique through a digest of the full key.
    id: String,
    /// What every record of this token's file name starts with, earlier versions' included.
    prefix: String,
    label: String,
    serial: String,
    model: String,
    manufacturer: String,
}

impl TokenKey {
    fn new(token: &TokenIdentity) -> Self {
        let mut full = Vec::new();
        for part in [
            &token.label,
            &token.serial,
            &token.model,
            &token.manufacturer,
        ] {
            full.extend_from_slice(part.as_bytes());
            full.push(0);
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &full);
        let prefix = format!("{}-{}-", file_safe(&token.label), file_safe(&token.serial));
        Self {
            id: format!("{prefix}{}", hex::encode(&digest.as_ref()[..6])),
            prefix,
            label: token.label.clone(),
            serial: token.serial.clone(),
            model: token.model.clone(),
            manufacturer: token.manufacturer.clone(),
        }
    }

    fn record_name(&self) -> String {
        format!("{}.record", self.id)
    }

    fn lock_name(&self) -> String {
        format!("{}.lock", self.id)
    }

    /// Whether `record` is about this token (an earlier version's record lacks model and
    /// manufacturer, and is taken as this token's when label and serial match).
    fn matches(&self, record: &Record) -> bool {
        record.token_label == self.label
            && record.token_serial == self.serial
            && (record.token_model.is_empty() || record.token_model == self.model)
            && (record.token_manufacturer.is_empty()
                || record.token_manufacturer == self.manufacturer)
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
    /// A guard keeping its records in `state`. Without a usable folder every login is refused.
    pub fn new(state: &StateDir) -> Self {
        let folder = match state {
            StateDir::Folder(dir) => Folder::open(dir),
            StateDir::Memory { why } => Err(why.clone()),
        };
        Self {
            inner: Arc::new(folder),
        }
    }

    /// Where the records are, for `doctor` and the logs; else why logins are refused.
    pub fn describe(&self) -> Result<String, String> {
        match &*self.inner {
            Ok(folder) => Ok(folder.folder.path().display().to_string()),
            Err(why) => Err(why.clone()),
        }
    }

    /// Before `C_Login` with `login` on `token`: refuses when this PIN already failed on this
    /// token (or a login with it was cut short), or when the attempt cannot be recorded;
    /// otherwise records the attempt and returns it, to be settled with the login's outcome.
    pub fn begin(
        &self,
        target: &str,
        module: &Path,
        token: &TokenIdentity,
        login: &UserLogin,
    ) -> Result<LoginAttempt, HsmError> {
        let folder = match &*self.inner {
            Ok(folder) => folder,
            Err(why) => {
                return Err(HsmError::PinGuarded(format!(
                    "not logging in: the PIN guard cannot record login attempts ({why}), and \
                     without a record a wrong PIN could be presented again by the next process \
                     (HSMs lock users after a few). Give qseed a state folder of its own user's \
                     ([service] state_dir, or the package's /var/lib/qseed)"
                )))
            }
        };
        let key = TokenKey::new(token);
        let digest = folder.digest(login);
        let lock = match folder.folder.lock(&key.lock_name(), true, false) {
            Ok(lock) => lock,
            Err(LockError::Busy) => return Err(HsmError::LoginBusy),
            Err(LockError::Io(e)) => {
                return Err(cannot_record(&format!(
                    "cannot lock {}: {e}",
                    folder.folder.file_path(&key.lock_name()).display()
                )))
            }
        };
        for (name, earlier) in folder.records_of(&key).map_err(|e| cannot_record(&e))? {
            let path = folder.folder.file_path(&name);
            if earlier.pin_digest.is_empty() || earlier.key_id != folder.key_id {
                // Made by an earlier version (which named the PIN by file metadata) or under
                // a key since lost: whether the PIN changed cannot be told.
                return Err(blocked(&earlier, target, login, &path, true));
            }
            if earlier.pin_digest == digest {
                return Err(blocked(&earlier, target, login, &path, false));
            }
            tracing::info!(
                "{target}: the PIN of {} changed since the login that {} on {}; presenting it \
                 once",
                login.source.described,
                match earlier.outcome {
                    Outcome::Failed => format!("failed ({})", earlier.reason),
                    Outcome::Attempt => "was cut short".to_string(),
                },
                earlier.time
            );
        }
        let record = Record {
            outcome: Outcome::Attempt,
            target: target.to_string(),
            module: std::fs::canonicalize(module)
                .unwrap_or_else(|_| module.to_path_buf())
                .display()
                .to_string(),
            token_label: key.label.clone(),
            token_serial: key.serial.clone(),
            token_model: key.model.clone(),
            token_manufacturer: key.manufacturer.clone(),
            pin_source: login.source.described.clone(),
            pin_source_identity: String::new(),
            pin_digest: digest,
            key_id: folder.key_id.clone(),
            reason: String::new(),
            time: now(),
            pid: std::process::id(),
        };
        folder.write(&key, &record).map_err(|e| cannot_record(&e))?;
        Ok(LoginAttempt {
            guard: self.clone(),
            key,
            record,
            _lock: lock,
        })
    }

    /// Records a failure that needed no login (the token's flags say the PIN is locked, or
    /// that the next wrong PIN locks it).
    pub fn record_flag(
        &self,
        target: &str,
        module: &Path,
        token: &TokenIdentity,
        login: &UserLogin,
        reason: &str,
    ) {
        if let Ok(attempt) = self.begin(target, module, token, login) {
            attempt.refused(reason);
        }
    }

    /// Forgets the records for `token` (`doctor --retry-pin`); returns the file removed, if any.
    pub fn lift(&self, token: &TokenIdentity) -> Result<Option<PathBuf>, String> {
        let folder = match &*self.inner {
            Ok(folder) => folder,
            Err(why) => return Err(format!("the PIN guard has no folder: {why}")),
        };
        let key = TokenKey::new(token);
        let _lock = folder
            .folder
            .lock(&key.lock_name(), true, false)
            .map_err(|e| match e {
                LockError::Busy => "another qseed process is logging in to this token right \
                                    now; try again in a moment"
                    .to_string(),
                LockError::Io(e) => format!(
                    "cannot lock the record in {}: {e}",
                    folder.folder.path().display()
                ),
            })?;
        let mut removed = None;
        for name in folder.removable(&key)? {
            match folder.folder.remove(&name) {
                Ok(true) => removed = Some(folder.folder.file_path(&name)),
                Ok(false) => {}
                Err(e) => {
                    return Err(format!(
                        "cannot remove {}: {e}",
                        folder.folder.file_path(&name).display()
                    ))
                }
            }
        }
        Ok(removed)
    }

    fn folder(&self) -> Option<&Folder> {
        self.inner.as_ref().as_ref().ok()
    }
}

impl Folder {
    fn open(state: &Path) -> Result<Self, String> {
        let folder = StateFolder::open(state)
            .and_then(|state| state.subfolder(FOLDER))
            .map_err(|e| {
                format!(
                    "{e}; qseed's user must own the state folder and what is in it (run: chown \
                     -R {} {})",
                    crate::trust::login_name(rustix::process::geteuid().as_raw()),
                    state.display()
                )
            })?;
        let key = match folder.read_key(KEY_FILE, KEY_LEN) {
            Ok(Some(key)) => key,
            Ok(None) => folder.create_key(KEY_FILE, KEY_LEN)?,
            Err(e) => {
                return Err(format!(
                    "{e}; remove it (the records made under it then block until lifted with \
                     `qseed doctor --retry-pin`)"
                ))
            }
        };
        let key_id = hex::encode(&ring::digest::digest(&ring::digest::SHA256, &key).as_ref()[..4]);
        Ok(Self {
            folder,
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
            key_id,
        })
    }

    fn digest(&self, login: &UserLogin) -> String {
        use secrecy::ExposeSecret;
        let tag = hmac::sign(&self.key, login.pin.expose_secret().as_bytes());
        hex::encode(&tag.as_ref()[..16])
    }

    /// The names of the record files that may be `key`'s (this version's and earlier ones').
    fn record_names(&self, key: &TokenKey) -> Result<Vec<String>, String> {
        let names = self
            .folder
            .names()
            .map_err(|e| format!("cannot list {}: {e}", self.folder.path().display()))?;
        Ok(names
            .into_iter()
            .filter(|n| n.starts_with(&key.prefix) && n.ends_with(".record"))
            .collect())
    }

    /// The record files to remove for `key`: its own, and earlier versions' that are about
    /// this token (a record of another token whose name starts alike stays).
    fn removable(&self, key: &TokenKey) -> Result<Vec<String>, String> {
        let own = key.record_name();
        let mut names = vec![own.clone()];
        for name in self.record_names(key)? {
            if name == own {
                continue;
            }
            let about_this_token = self
                .folder
                .read(&name, RECORD_LIMIT)
                .ok()
                .flatten()
                .and_then(|bytes| toml::from_str::<Record>(std::str::from_utf8(&bytes).ok()?).ok())
                .is_some_and(|record| key.matches(&record));
            if about_this_token {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// `key`'s records. One that cannot be read is an error: qseed will not risk a login.
    fn records_of(&self, key: &TokenKey) -> Result<Vec<(String, Record)>, String> {
        let mut found = Vec::new();
        for name in self.record_names(key)? {
            let path = self.folder.file_path(&name);
            let damaged = |e: &dyn std::fmt::Display| {
                format!(
                    "the PIN guard's record {} cannot be read ({e}); delete that file to allow \
                     one login",
                    path.display()
                )
            };
            let Some(bytes) = self
                .folder
                .read(&name, RECORD_LIMIT)
                .map_err(|e| damaged(&e))?
            else {
                continue;
            };
            let text = std::str::from_utf8(&bytes).map_err(|e| damaged(&e))?;
            let record: Record = toml::from_str(text).map_err(|e| damaged(&e.message().trim()))?;
            if key.matches(&record) {
                found.push((name, record));
            }
        }
        Ok(found)
    }

    /// Writes `record` as `key`'s record, whole or not at all, and removes earlier versions'.
    fn write(&self, key: &TokenKey, record: &Record) -> Result<(), String> {
        let body = toml::to_string(record).map_err(|e| e.to_string())?;
        let text = format!(
            "# qseed PIN guard: qseed will not present this PIN to this token again.\n\
             # To allow one more login, correct the PIN, run\n\
             #   qseed doctor --retry-pin {}\n\
             # (under the package: systemctl start qseed-retry-pin@{})\n\
             # or delete this file.\n{body}",
            record.target, record.target
        );
        let name = key.record_name();
        self.folder
            .write_atomic(&name, text.as_bytes())
            .map_err(|e| {
                format!(
                    "cannot write {}: {e}",
                    self.folder.file_path(&name).display()
                )
            })
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn cannot_record(why: &str) -> HsmError {
    HsmError::PinGuarded(format!(
        "not logging in: the PIN guard {why}, and qseed logs in only once the attempt is on \
         record (HSMs lock users after a few wrong PINs). Fix the state folder, then restart"
    ))
}

/// A login under way; settle it with the outcome. Dropped unsettled (a thread that died), the
/// attempt record stays and blocks, which is the safe side.
#[derive(Debug)]
pub struct LoginAttempt {
    guard: PinGuard,
    key: TokenKey,
    record: Record,
    /// Held until settled: no other process presents a PIN to this token meanwhile.
    _lock: File,
}

impl LoginAttempt {
    /// The token accepted the PIN: no record.
    pub fn accepted(self) {
        self.clear();
    }

    /// The login failed for a reason that says nothing about the PIN (a device error): no
    /// record, the next login may try.
    pub fn inconclusive(self) {
        self.clear();
    }

    /// The token refused the PIN: recorded for good. If that write fails, the attempt record
    /// already on disk blocks the PIN just the same.
    pub fn refused(mut self, reason: &str) {
        self.record.outcome = Outcome::Failed;
        self.record.reason = reason.to_string();
        self.record.time = now();
        if let Some(folder) = self.guard.folder() {
            if let Err(e) = folder.write(&self.key, &self.record) {
                tracing::warn!("PIN guard: {e}; the attempt's record blocks this PIN instead");
            }
        }
    }

    fn clear(self) {
        let Some(folder) = self.guard.folder() else {
            return;
        };
        let names = match folder.removable(&self.key) {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!("PIN guard: {e}");
                return;
            }
        };
        for name in names {
            if let Err(e) = folder.folder.remove(&name) {
                tracing::warn!(
                    "PIN guard: cannot remove {}: {e}",
                    folder.folder.file_path(&name).display()
                );
            }
        }
    }
}

/// How the operator lets one more login through for `target`. Under systemd the service's
/// user, credentials and state folder are only the unit's, so the packaged template unit
/// runs the doctor with them (issue 22, item 6).
pub fn lift_command(target: &str) -> String {
    if std::env::var_os("INVOCATION_ID").is_some() {
        format!(
            "run `systemctl start qseed-retry-pin@{target}` (the packaged unit that runs \
             `qseed doctor --retry-pin {target}` as the service runs; its output: `journalctl \
             -u qseed-retry-pin@{target}`)"
        )
    } else {
        format!(
            "run `qseed doctor --retry-pin {target}` (as qseed's user, with its state folder; \
             under the package: `systemctl start qseed-retry-pin@{target}`)"
        )
    }
}

fn blocked(
    record: &Record,
    target: &str,
    login: &UserLogin,
    path: &Path,
    undecidable: bool,
) -> HsmError {
    let lift = format!("{}, or delete {}", lift_command(target), path.display());
    if undecidable {
        return HsmError::PinGuarded(format!(
            "not logging in: {} with {} on {} ({}), and that record was made by an earlier \
             qseed version or under a lost key, so whether the PIN changed since cannot be \
             told; HSMs lock users after a few wrong PINs. If the PIN is right now, {lift}",
            match record.outcome {
                Outcome::Failed => "a login failed",
                Outcome::Attempt => "a login was cut short",
            },
            login.source.described,
            record.time,
            if record.reason.is_empty() {
                "no outcome"
            } else {
                &record.reason
            },
        ));
    }
    HsmError::PinGuarded(match record.outcome {
        Outcome::Failed => format!(
            "not logging in: a login with this PIN ({}) failed on {} ({}), and HSMs lock users \
             after a few wrong PINs. To present a PIN again, correct the PIN (qseed notices \
             the change), or {lift}",
            login.source.described, record.time, record.reason
        ),
        Outcome::Attempt => format!(
            "not logging in: a qseed process (pid {}) stopped during a login with this PIN \
             ({}) on {}, so whether the token accepted it is unknown, and HSMs lock users \
             after a few wrong PINs. If the PIN is right, {lift}",
            record.pid, login.source.described, record.time
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PinSource;

    fn token(serial: &str) -> TokenIdentity {
        TokenIdentity {
            serial: serial.into(),
            ..TokenIdentity::for_tests(1)
        }
    }

    fn login(pin: &str) -> UserLogin {
        UserLogin {
            pin: cryptoki::types::AuthPin::from(pin.to_string()),
            source: PinSource {
                described: "pin_file \"hsm.pin\"".into(),
            },
        }
    }

    fn guard(dir: &Path) -> PinGuard {
        PinGuard::new(&StateDir::Folder(dir.to_path_buf()))
    }

    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
    const PROXY: &str = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so";

    fn records(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir.join(FOLDER))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "record"))
            .collect()
    }

    #[test]
    fn a_refused_pin_is_blocked_in_later_processes_until_the_pin_changes() {
        let dir = tempfile::tempdir().unwrap();
        let t = token("1234");
        let attempt = guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap();
        attempt.refused("C_Login: CKR_PIN_INCORRECT");
        // A new guard is a new process: it reads the record.
        let later = guard(dir.path());
        let err = later
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap_err();
        assert!(err.is_pin_error() && err.is_permanent());
        let text = err.to_string();
        assert!(text.contains("CKR_PIN_INCORRECT"), "{text}");
        assert!(text.contains("--retry-pin a"), "{text}");
        // Another token of the same module is not affected.
        later
            .begin("b", Path::new(MODULE), &token("5678"), &login("1111"))
            .unwrap()
            .accepted();
        // A changed PIN is presented once; accepted, the record is gone.
        later
            .begin("a", Path::new(MODULE), &t, &login("2222"))
            .unwrap()
            .accepted();
        assert!(records(dir.path()).is_empty());
        guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap()
            .accepted();
    }

    /// Issue 21, item 2: what the operator does to the PIN's file (its metadata, its path) is
    /// not a new PIN; only the PIN itself decides.
    #[test]
    fn item_02_the_pin_source_is_known_by_its_content_not_its_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let t = token("1");
        guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap()
            .refused("C_Login: CKR_PIN_INCORRECT");
        let mut moved = login("1111");
        moved.source.described = "pin_file \"sub/../hsm.pin\"".into();
        assert!(guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &moved)
            .is_err());
        // Nothing from which the PIN can be found is kept: a keyed digest only.
        let text = std::fs::read_to_string(&records(dir.path())[0]).unwrap();
        assert!(!text.contains("1111"), "{text}");
        let plain = hex::encode(ring::digest::digest(&ring::digest::SHA256, b"1111").as_ref());
        assert!(!text.contains(&plain[..32]), "{text}");
        let key = dir.path().join(FOLDER).join(KEY_FILE);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    /// Issue 21, item 10: one token reached through two modules (p11-kit's proxy and directly)
    /// is one token.
    #[test]
    fn item_10_one_token_through_two_modules_is_one_token() {
        let dir = tempfile::tempdir().unwrap();
        let t = token("1");
        guard(dir.path())
            .begin("direct", Path::new(MODULE), &t, &login("1111"))
            .unwrap()
            .refused("C_Login: CKR_PIN_INCORRECT");
        let mut through_proxy = t.clone();
        through_proxy.slot = cryptoki::slot::Slot::try_from(17u64).unwrap();
        through_proxy.slot_description = "p11-kit".into();
        assert!(guard(dir.path())
            .begin("proxied", Path::new(PROXY), &through_proxy, &login("1111"))
            .is_err());
        // Another model with that label and serial is another token.
        let mut other = t.clone();
        other.model = "other".into();
        guard(dir.path())
            .begin("other", Path::new(MODULE), &other, &login("1111"))
            .unwrap()
            .inconclusive();
        assert_eq!(records(dir.path()).len(), 1);
    }

    #[test]
    fn a_login_cut_short_blocks_until_lifted() {
        let dir = tempfile::tempdir().unwrap();
        let t = token("1");
        let attempt = guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap();
        // The process dies mid-login: the attempt is never settled, its lock released.
        drop(attempt);
        let later = guard(dir.path());
        let err = later
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap_err();
        assert!(err.to_string().contains("stopped during a login"), "{err}");
        let removed = later.lift(&t).unwrap();
        assert!(removed.is_some());
        later
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap()
            .accepted();
    }

    #[test]
    fn two_processes_never_present_a_pin_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = token("1");
        let first = guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap();
        let second = guard(dir.path()).begin("a", Path::new(MODULE), &t, &login("1111"));
        assert!(matches!(second, Err(HsmError::LoginBusy)), "{second:?}");
        first.inconclusive();
        guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap()
            .accepted();
    }

    #[test]
    fn a_damaged_record_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let t = token("1");
        guard(dir.path())
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap()
            .refused("C_Login: CKR_PIN_INCORRECT");
        let record = records(dir.path()).remove(0);
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
            .begin("a", Path::new(MODULE), &t, &login("2222"))
            .unwrap_err();
        assert!(err.to_string().contains("cannot be read"), "{err}");
    }

    /// Issue 21, item 3: when the attempt cannot be recorded, there is no login.
    #[test]
    fn item_03_the_guard_fails_closed() {
        let t = token("1");
        // No state folder.
        let guard_without = PinGuard::new(&StateDir::Memory { why: "test".into() });
        let err = guard_without
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap_err();
        assert!(err.to_string().contains("cannot record"), "{err}");
        assert!(guard_without.describe().is_err());

        // The lock replaced by a link, then by a folder.
        let dir = tempfile::tempdir().unwrap();
        let g = guard(dir.path());
        let lock = dir.path().join(FOLDER).join(TokenKey::new(&t).lock_name());
        std::os::unix::fs::symlink("/dev/null", &lock).unwrap();
        let err = g
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        std::fs::remove_file(&lock).unwrap();
        std::fs::create_dir(&lock).unwrap();
        assert!(g.begin("a", Path::new(MODULE), &t, &login("1111")).is_err());
        std::fs::remove_dir(&lock).unwrap();

        // A FIFO in place of the record: refused at once, not waited on.
        let record = dir
            .path()
            .join(FOLDER)
            .join(TokenKey::new(&t).record_name());
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &record,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let err = g
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
        std::fs::remove_file(&record).unwrap();

        // A folder nobody can write in (as a full disk would fail the write).
        if !rustix::process::geteuid().is_root() {
            use std::os::unix::fs::PermissionsExt;
            let folder = dir.path().join(FOLDER);
            std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o500)).unwrap();
            let err = g
                .begin("a", Path::new(MODULE), &t, &login("1111"))
                .unwrap_err();
            std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o700)).unwrap();
            assert!(err.to_string().contains("cannot record"), "{err}");
        }
    }

    #[test]
    fn a_deleted_record_lifts_the_guard_for_a_running_process_too() {
        let dir = tempfile::tempdir().unwrap();
        let running = guard(dir.path());
        let t = token("1");
        running
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap()
            .refused("C_Login: CKR_PIN_INCORRECT");
        assert!(running
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .is_err());
        // Another process (`doctor --retry-pin`) lifts it.
        assert!(guard(dir.path()).lift(&t).unwrap().is_some());
        running
            .begin("a", Path::new(MODULE), &t, &login("1111"))
            .unwrap()
            .accepted();
    }

    #[test]
    fn an_earlier_versions_record_blocks_until_lifted() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join(FOLDER);
        std::fs::create_dir(&folder).unwrap();
        // As qseed 0.1 wrote it: identity by file metadata, named with a digest of the module.
        std::fs::write(
            folder.join("hsm_one-1-0123456789ab.record"),
            "outcome = \"failed\"\ntarget = \"a\"\nmodule = \"/m.so\"\ntoken_label = \
             \"hsm one\"\ntoken_serial = \"1\"\npin_source = \"pin_file\"\n\
             pin_source_identity = \"/p:ino=1\"\nreason = \"CKR_PIN_INCORRECT\"\n\
             time = \"2026-01-01T00:00:00Z\"\npid = 7\n",
        )
        .unwrap();
        let g = guard(dir.path());
        let t = token("1");
        let err = g
            .begin("a", Path::new(MODULE), &t, &login("2222"))
            .unwrap_err();
        assert!(err.to_string().contains("earlier qseed version"), "{err}");
        assert!(g.lift(&t).unwrap().is_some());
        g.begin("a", Path::new(MODULE), &t, &login("2222"))
            .unwrap()
            .accepted();
    }
}

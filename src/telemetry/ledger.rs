//! The audit ledger: every injection and flush as one JSON line in `<state>/audit/ledger.jsonl`,
//! each line carrying the SHA-256 of the line before it (`prev`), so that an edited, removed
//! or inserted line breaks the chain at that point (`qseed audit verify`). No seed byte is
//! ever written: sizes, target, token identity, request ids, time.
//!
//! The file is bounded: past [`MAX_FILE_BYTES`] it is renamed `ledger.jsonl.1` (older ones
//! shift up to [`KEPT_FILES`]) and the new file's first line carries the hash of the old
//! file's last, so the chain runs on across files. Several qseed processes may share a state
//! folder (`run` and a `once`): appends take the folder's `audit.lock`, and a writer that
//! finds the file grown since it last wrote reads the new last line before chaining on.

use std::io::{BufRead, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use serde::{Deserialize, Serialize};

use crate::folder::StateFolder;

/// The ledger's subfolder of the state folder.
pub const FOLDER: &str = "audit";
const FILE: &str = "ledger.jsonl";
const LOCK: &str = "audit.lock";
/// A file is rotated past this size.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Rotated files kept (`ledger.jsonl.1` .. `.N`); the oldest is removed.
pub const KEPT_FILES: u32 = 8;
/// The `prev` of the very first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Longest line qseed writes, with room; a longer one is not ours.
const MAX_LINE: usize = 16 * 1024;

/// One ledger line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339, UTC, to the millisecond.
    pub time: String,
    /// `injection`, `flush` or `kernel`.
    pub event: String,
    pub target: String,
    pub token_label: String,
    pub token_serial: String,
    pub slot: u64,
    pub bytes: usize,
    pub source: String,
    pub request_ids: String,
    /// The bytes came from qseed's API simulator (`allow_simulated`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub simulated: bool,
    /// The process that wrote it.
    pub pid: u32,
    /// `event = "signature"`: the chain head signed (the `prev` it signs), hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_head: Option<String>,
    /// `event = "signature"`: ECDSA P-256 `r || s` over `signed_head`'s text, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// `event = "signature"`: the signing key's label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_label: Option<String>,
    /// Hex SHA-256 of the previous line (without its newline); [`GENESIS`] for the first.
    pub prev: String,
}

/// The ledger of this process, once the state folder is known (`run`, `once`).
static LEDGER: OnceLock<Ledger> = OnceLock::new();

/// How long the writer gathers records before it writes them: one lock, one stat and one
/// write for every record of that window, instead of each injection paying for its own.
const GATHER: std::time::Duration = std::time::Duration::from_millis(50);

/// Opens the ledger in `state` for this process's audit records, with its writer thread; a
/// second call is ignored.
pub fn install(state: &Path) -> Result<(), String> {
    let ledger = Ledger::open(state)?;
    if LEDGER.set(ledger).is_ok() {
        std::thread::Builder::new()
            .name("qseed-ledger".into())
            .spawn(|| {
                if let Some(ledger) = LEDGER.get() {
                    ledger.write_forever();
                }
            })
            .map_err(|e| format!("cannot start the ledger's writer: {e}"))?;
    }
    Ok(())
}

/// The hash of the ledger's last line now (what a signature covers), pending records
/// written first, if a ledger is installed.
pub fn current_head() -> Option<String> {
    let ledger = LEDGER.get()?;
    ledger.drain();
    ledger.current_head().ok()
}

thread_local! {
    /// Set on threads that write their own records (see [`write_own_records`]).
    static WRITES_OWN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Queues `record` (its `prev` and `pid` are filled in) for this process's ledger, if one is
/// installed; the writer thread appends it within [`GATHER`], or, on a thread that writes its
/// own records, that thread does when it next calls [`flush`].
pub fn append(mut record: Record) {
    if let Some(ledger) = LEDGER.get() {
        ledger.queue(|line| record_body(line, &mut record));
    }
}

/// Queues the record of one injection of `subject`'s, now, with the requests that bought its
/// bytes (as [`append`] does a whole record).
pub fn append_injection(subject: &Subject, request_ids: &str, simulated: bool) {
    if let Some(ledger) = LEDGER.get() {
        let now = std::time::SystemTime::now();
        ledger.queue(|line| {
            injection_body(line, now, subject, request_ids, simulated, own_pid());
            Ok(())
        });
    }
}

/// This process's id, asked of the kernel once: `std::process::id` is a system call each time
/// (glibc keeps no copy), and every injection's record carries it.
fn own_pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// What the records of one target's injections into one token all say: serialized once, so
/// that each injection's record costs its time and request ids, not an escape of every field
/// (the ledger's largest cost per injection, ahead of its SHA-256).
#[derive(Debug, Clone)]
pub struct Subject {
    /// `,"event":...,"request_ids":`, fields as [`Record`] has them.
    middle: Vec<u8>,
}

impl Subject {
    pub fn new(
        event: &str,
        target: &str,
        token: &crate::hsm::TokenIdentity,
        bytes: usize,
        source: &str,
    ) -> Self {
        let field = |middle: &mut Vec<u8>, name: &str, value: &str| {
            middle.extend_from_slice(b",\"");
            middle.extend_from_slice(name.as_bytes());
            middle.extend_from_slice(b"\":");
            json_string(middle, value);
        };
        let mut middle = Vec::with_capacity(160);
        field(&mut middle, "event", event);
        field(&mut middle, "target", target);
        field(&mut middle, "token_label", &token.label);
        field(&mut middle, "token_serial", &token.serial);
        let _ = write!(middle, ",\"slot\":{},\"bytes\":{bytes}", token.slot.id());
        field(&mut middle, "source", source);
        middle.extend_from_slice(b",\"request_ids\":");
        Self { middle }
    }
}

/// `value` as a JSON string, escaped as serde_json escapes it.
fn json_string(out: &mut Vec<u8>, value: &str) {
    // Writing a `str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// Text written into a byte buffer (the timestamp's formatter writes `fmt::Write`).
struct Text<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Text<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// A queued record's line as far as its `prev`'s value, which the writer fills in: the
/// bytes of [`Record`]'s serialization up to `"prev":"`, with this process's `pid`.
fn record_body(out: &mut Vec<u8>, record: &mut Record) -> Result<(), String> {
    record.pid = own_pid();
    record.prev.clear();
    let start = out.len();
    serde_json::to_writer(&mut *out, record).map_err(|e| e.to_string())?;
    // `prev` is the last field, and empty here.
    if !out.ends_with(b"\"prev\":\"\"}") {
        out.truncate(start);
        return Err("a record's prev is not its last field".into());
    }
    out.truncate(out.len() - 2);
    Ok(())
}

/// [`record_body`] of an injection's record of `subject`, made without serializing a
/// [`Record`] (the same bytes: see the tests).
fn injection_body(
    out: &mut Vec<u8>,
    time: std::time::SystemTime,
    subject: &Subject,
    request_ids: &str,
    simulated: bool,
    pid: u32,
) {
    out.extend_from_slice(b"{\"time\":\"");
    // RFC 3339 text: nothing in it to escape.
    let _ = super::clock::write(&mut Text(out), time, super::clock::Fraction::Millis);
    out.push(b'"');
    out.extend_from_slice(&subject.middle);
    json_string(out, request_ids);
    if simulated {
        out.extend_from_slice(b",\"simulated\":true");
    }
    let _ = write!(out, ",\"pid\":{pid},\"prev\":\"");
}

/// How long at most a thread that writes its own records (see [`write_own_records`]) keeps
/// them before it writes them. A record is written after its injection in any case; this bounds
/// how many a crash of the whole process could leave out of the ledger (and out of a text or
/// JSON log, whose routine lines wait as long: see [`super::log_batch`]; the journal gets
/// each record at once).
pub const OWN_RECORDS_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// From now on, the records this thread appends wait for its own [`flush`] instead of waking
/// the writer thread: a PKCS#11 timer thread flushes before a sleep that would keep its oldest
/// record past [`OWN_RECORDS_DELAY`], which saves each injection the writer's two wake-ups and
/// makes the records of staggered targets one write a second, not one each. Any other flush
/// (the writer's, the end of `run`) writes them too: the queue is the process's.
pub fn write_own_records() {
    WRITES_OWN.with(|own| own.set(true));
}

/// Writes what is queued now (at the end of `run` and `once`).
pub fn flush() {
    if let Some(ledger) = LEDGER.get() {
        ledger.drain();
    }
}

#[derive(Debug)]
pub struct Ledger {
    folder: StateFolder,
    /// What this process last saw at the end of the file, and its open descriptors. Taken
    /// before `pending`, so batches are written in the order they were queued.
    tail: Mutex<Tail>,
    /// Records queued and not yet written.
    pending: Mutex<Pending>,
    wake: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct Pending {
    batch: Batch,
    /// The writer thread has been woken for these records.
    writer_called: bool,
}

/// Records queued, each as its line up to its `prev`'s value (see [`record_body`]).
#[derive(Debug, Default)]
struct Batch {
    bodies: Vec<u8>,
    /// Where each body ends in `bodies`.
    ends: Vec<usize>,
}

impl Batch {
    fn with_capacity(records: usize, bytes: usize) -> Self {
        Self {
            bodies: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(records),
        }
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn bodies(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.bodies[start..end])
    }
}

#[derive(Debug, Default)]
struct Tail {
    /// The file's inode and length after this process's last append.
    inode: u64,
    len: u64,
    head: String,
    /// Kept open: an append costs a lock, a stat and a write, not three opens.
    lock: Option<std::fs::File>,
    file: Option<std::fs::File>,
}

impl Ledger {
    pub fn open(state: &Path) -> Result<Self, String> {
        let folder = StateFolder::open(state)?.subfolder(FOLDER)?;
        Ok(Self {
            folder,
            tail: Mutex::new(Tail::default()),
            pending: Mutex::new(Pending::default()),
            wake: std::sync::Condvar::new(),
        })
    }

    /// Queues the record `body` writes (see [`record_body`]); a record it cannot write is
    /// logged and left out.
    fn queue(&self, body: impl FnOnce(&mut Vec<u8>) -> Result<(), String>) {
        let call_writer = !WRITES_OWN.with(std::cell::Cell::get);
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let batch = &mut pending.batch;
        if let Err(e) = body(&mut batch.bodies) {
            drop(pending);
            tracing::error!("an audit record cannot be written to the ledger: {e}");
            return;
        }
        let end = batch.bodies.len();
        batch.ends.push(end);
        if call_writer && !pending.writer_called {
            pending.writer_called = true;
            self.wake.notify_one();
        }
    }

    /// The writer thread: waits for a record, gathers for [`GATHER`], writes the batch.
    fn write_forever(&self) {
        loop {
            {
                let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                while !pending.writer_called {
                    pending = self
                        .wake
                        .wait(pending)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
            std::thread::sleep(GATHER);
            self.drain();
        }
    }

    /// Writes every queued record, in order; a failure is logged loudly (the injections
    /// happened and are in the log's audit records).
    fn drain(&self) {
        let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        let batch = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.writer_called = false;
            // The next second's records fit without growing the buffers.
            let next = Batch::with_capacity(
                pending.batch.ends.capacity(),
                pending.batch.bodies.capacity(),
            );
            std::mem::replace(&mut pending.batch, next)
        };
        if batch.is_empty() {
            return;
        }
        let count = batch.len();
        if let Err(e) = self.write_batch(&mut tail, &batch) {
            tracing::error!(
                "the audit ledger {} cannot be written: {e}; {count} record(s) are in the log only",
                self.folder.file_path(FILE).display()
            );
        }
    }

    /// Appends one record now (tests; the service queues).
    pub fn append(&self, mut record: Record) -> Result<(), String> {
        let mut tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        let mut batch = Batch::default();
        record_body(&mut batch.bodies, &mut record)?;
        batch.ends.push(batch.bodies.len());
        self.write_batch(&mut tail, &batch)
    }

    fn write_batch(&self, tail: &mut Tail, batch: &Batch) -> Result<(), String> {
        if tail.lock.is_none() {
            let lock = self
                .folder
                .open_append(LOCK)
                .map_err(|e| format!("{}: {e}", self.folder.file_path(LOCK).display()))?;
            tail.lock = Some(lock);
        }
        if let Some(lock) = &tail.lock {
            rustix::fs::flock(lock, rustix::fs::FlockOperation::LockExclusive)
                .map_err(|e| format!("cannot lock the ledger: {e}"))?;
        }
        let result = self.append_locked(tail, batch);
        // The descriptor stays open; the lock is released now (and by the kernel, should this
        // process end first).
        if let Some(lock) = &tail.lock {
            let _ = rustix::fs::flock(lock, rustix::fs::FlockOperation::Unlock);
        }
        result
    }

    fn current_head(&self) -> Result<String, String> {
        let tail = self.tail.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.folder.inode_and_len(FILE).map_err(|e| e.to_string())?;
        if now == Some((tail.inode, tail.len)) && !tail.head.is_empty() {
            return Ok(tail.head.clone());
        }
        drop(tail);
        self.last_hash()
    }

    fn append_locked(&self, tail: &mut Tail, batch: &Batch) -> Result<(), String> {
        let shown = || self.folder.file_path(FILE).display().to_string();
        let (inode, len) = self
            .folder
            .inode_and_len(FILE)
            .map_err(|e| format!("{}: {e}", shown()))?
            .unwrap_or((0, 0));
        if inode != tail.inode || len != tail.len || tail.head.is_empty() || tail.file.is_none() {
            // Another process wrote or rotated (or this is our first line): chain on from
            // what is there, through a descriptor of the file now in place.
            tail.head = self.last_hash()?;
            tail.len = len;
            tail.file = None;
        }
        if tail.len >= MAX_FILE_BYTES {
            self.rotate()?;
            tail.len = 0;
            tail.file = None;
        }
        if tail.file.is_none() {
            let file = self
                .folder
                .open_append(FILE)
                .map_err(|e| format!("{}: {e}", shown()))?;
            tail.inode = file.metadata().map_err(|e| e.to_string())?.ino();
            tail.file = Some(file);
        }
        // The batch as one write, each line chained to the one before.
        let mut bytes = Vec::with_capacity(batch.bodies.len() + batch.len() * 67);
        let mut head = tail.head.clone().into_bytes();
        for body in batch.bodies() {
            let start = bytes.len();
            bytes.extend_from_slice(body);
            bytes.extend_from_slice(&head);
            bytes.extend_from_slice(b"\"}");
            head.clear();
            head.extend_from_slice(&hash_hex(&bytes[start..]));
            bytes.push(b'\n');
        }
        if let Some(file) = tail.file.as_mut() {
            file.write_all(&bytes)
                .map_err(|e| format!("{}: {e}", shown()))?;
        }
        // Hex digits: always text.
        tail.head = String::from_utf8_lossy(&head).into_owned();
        tail.len += bytes.len() as u64;
        Ok(())
    }

    /// The hash of the current file's last line; of the newest rotated file's when the
    /// current one is empty or missing; [`GENESIS`] when there is none.
    fn last_hash(&self) -> Result<String, String> {
        for name in std::iter::once(FILE.to_string()).chain((1..=KEPT_FILES).map(rotated)) {
            let file = match self.folder.open_read(&name) {
                Ok(Some(file)) => file,
                Ok(None) => continue,
                Err(e) => return Err(format!("{}: {e}", self.folder.file_path(&name).display())),
            };
            if let Some(line) = last_line(file).map_err(|e| e.to_string())? {
                return Ok(hash_line(&line));
            }
        }
        Ok(GENESIS.to_string())
    }

    fn rotate(&self) -> Result<(), String> {
        let _ = self.folder.remove(&rotated(KEPT_FILES));
        for n in (1..KEPT_FILES).rev() {
            let _ = self.folder.rename(&rotated(n), &rotated(n + 1));
        }
        self.folder
            .rename(FILE, &rotated(1))
            .map(|_| ())
            .map_err(|e| format!("cannot rotate the ledger: {e}"))
    }
}

fn rotated(n: u32) -> String {
    format!("{FILE}.{n}")
}

/// Hex SHA-256 of a line's bytes (without its newline).
pub fn hash_line(line: &[u8]) -> String {
    String::from_utf8_lossy(&hash_hex(line)).into_owned()
}

/// [`hash_line`]'s digits, in place.
fn hash_hex(line: &[u8]) -> [u8; 64] {
    let digest = ring::digest::digest(&ring::digest::SHA256, line);
    // 32 bytes are 64 hex digits, written in place (`hex::encode` collects them one `char` at
    // a time, a cost per record that showed in profiles).
    let mut text = [0u8; 64];
    let _ = hex::encode_to_slice(digest.as_ref(), &mut text);
    text
}

/// The last complete line of `file` (read from its end, at most [`MAX_LINE`] bytes back).
fn last_line(mut file: std::fs::File) -> std::io::Result<Option<Vec<u8>>> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let start = len.saturating_sub(MAX_LINE as u64 + 1);
    file.seek(std::io::SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.take(MAX_LINE as u64 + 1).read_to_end(&mut tail)?;
    // A line cut short by a crash has no newline: it is not part of the chain yet.
    if tail.last() == Some(&b'\n') {
        tail.pop();
    } else if let Some(cut) = tail.iter().rposition(|b| *b == b'\n') {
        tail.truncate(cut);
    } else {
        return Ok(None);
    }
    let line = match tail.iter().rposition(|b| *b == b'\n') {
        Some(newline) => tail[newline + 1..].to_vec(),
        None if start == 0 => tail,
        None => {
            return Err(std::io::Error::other(
                "its last line is longer than any qseed writes",
            ))
        }
    };
    Ok(Some(line))
}

/// What `verify` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every line chains to the one before; `head` is the last line's hash.
    Intact { lines: u64, head: String },
    /// Line `line` (1-based) is not what the chain expects.
    Broken { line: u64, why: String },
}

/// Checks the chain of the ledger files `files`, oldest first (a rotated file's first line
/// is taken as it chains on from the file before it, when that file is given).
pub fn verify(files: &[PathBuf]) -> Result<Verdict, String> {
    let mut expected: Option<String> = None;
    let mut lines = 0u64;
    for path in files {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut reader = std::io::BufReader::new(file);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = reader
                .by_ref()
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            lines += 1;
            if buf.last() != Some(&b'\n') {
                return Ok(Verdict::Broken {
                    line: lines,
                    why: format!(
                        "{}: the line has no end (cut short, or longer than {MAX_LINE} bytes)",
                        path.display()
                    ),
                });
            }
            buf.pop();
            let record: Record = match serde_json::from_slice(&buf) {
                Ok(record) => record,
                Err(e) => {
                    return Ok(Verdict::Broken {
                        line: lines,
                        why: format!("{}: not a ledger record ({e})", path.display()),
                    })
                }
            };
            // The first line given chains on from a file not given (a rotated file checked
            // alone) or from nothing (GENESIS): it is taken as it is.
            if let Some(expected) = &expected {
                if &record.prev != expected {
                    return Ok(Verdict::Broken {
                        line: lines,
                        why: format!(
                            "{}: its prev ({}) is not the hash of the line before ({expected}): \
                             that line, or this one, was changed, removed or inserted",
                            path.display(),
                            record.prev
                        ),
                    });
                }
            }
            expected = Some(hash_line(&buf));
        }
    }
    Ok(match expected {
        Some(head) => Verdict::Intact { lines, head },
        None => Verdict::Intact {
            lines: 0,
            head: GENESIS.to_string(),
        },
    })
}

/// The DER prefix of an EC P-256 public key's SubjectPublicKeyInfo, before its 65-byte point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The point of an EC P-256 public key in PEM (`-----BEGIN PUBLIC KEY-----`, as `openssl ec
/// -pubout` and `pkcs11-tool --read-object --type pubkey` write it).
pub fn p256_point_from_pem(pem: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("not a PEM public key ({e})"))?;
    match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
        Some(point) if point.len() == 65 && point[0] == 4 => Ok(point.to_vec()),
        _ => Err("not an EC P-256 public key (SubjectPublicKeyInfo)".into()),
    }
}

/// Checks every signature record in `files` against the public key `point`: the count of
/// good signatures, or the first bad one's record number and why.
pub fn verify_signatures(
    files: &[PathBuf],
    point: &[u8],
) -> Result<Result<u64, (u64, String)>, String> {
    let key =
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point);
    let mut line_no = 0u64;
    let mut good = 0u64;
    let mut heads: std::collections::HashSet<String> = std::collections::HashSet::new();
    for path in files {
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            line_no += 1;
            let Ok(record) = serde_json::from_slice::<Record>(line) else {
                continue;
            };
            // Every head up to the line before this one (a line's `prev` is its predecessor's
            // hash); the chain itself is `verify`'s to check.
            heads.insert(record.prev.clone());
            if record.event != "signature" {
                continue;
            }
            let (Some(head), Some(signature)) = (&record.signed_head, &record.signature) else {
                return Ok(Err((
                    line_no,
                    "a signature record without its head or signature".into(),
                )));
            };
            // The head when the signature was asked for: this line's `prev`, or an earlier
            // line's hash when other records came in while the HSM signed.
            if !heads.contains(head.as_str()) {
                return Ok(Err((
                    line_no,
                    "it signs a head that is no earlier line's hash".into(),
                )));
            }
            let Some(bytes) = unhex(signature) else {
                return Ok(Err((line_no, "its signature is not hex".into())));
            };
            if key.verify(head.as_bytes(), &bytes).is_err() {
                return Ok(Err((
                    line_no,
                    "the signature does not verify with this public key".into(),
                )));
            }
            good += 1;
        }
    }
    Ok(Ok(good))
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The ledger's files in `state`, oldest first.
pub fn files_in(state: &Path) -> Vec<PathBuf> {
    let folder = state.join(FOLDER);
    let mut files: Vec<PathBuf> = (1..=KEPT_FILES)
        .rev()
        .map(|n| folder.join(rotated(n)))
        .filter(|p| p.is_file())
        .collect();
    let current = folder.join(FILE);
    if current.is_file() {
        files.push(current);
    }
    files
}

/// Now, as the ledger writes times: RFC 3339, UTC, milliseconds.
pub fn now() -> String {
    super::clock::format(std::time::SystemTime::now(), super::clock::Fraction::Millis)
}

/// Writes one record line to `out` (for `audit export`).
pub fn write_line(out: &mut impl Write, line: &[u8]) -> std::io::Result<()> {
    out.write_all(line)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_chained_by_its_sha_256_in_lowercase_hex() {
        // FIPS 180-2's example: what `sha256sum` prints for "abc", as an operator checks it.
        assert_eq!(
            hash_line(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn record(n: usize) -> Record {
        Record {
            time: now(),
            event: "injection".into(),
            target: "hsm-1".into(),
            token_label: "tok".into(),
            token_serial: "abc".into(),
            slot: 1,
            bytes: n,
            source: "sim".into(),
            request_ids: "r1".into(),
            simulated: false,
            pid: 0,
            prev: String::new(),
            signed_head: None,
            signature: None,
            key_label: None,
        }
    }

    /// An injection's line made from its [`Subject`] is the line its [`Record`] serializes to,
    /// byte for byte: names that need escaping, a simulated source, the largest numbers.
    #[test]
    fn an_injection_line_from_its_subject_is_its_records_line() {
        let token = |label: &str, serial: &str, slot: u64| crate::hsm::TokenIdentity {
            label: label.into(),
            serial: serial.into(),
            ..crate::hsm::TokenIdentity::for_tests(slot)
        };
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_733_400_000_123);
        for (target, token, bytes, source, requests, simulated) in [
            (
                "hsm-1",
                token("tok", "abc", 1),
                48,
                "https://x",
                "r1",
                false,
            ),
            (
                "a \"quoted\" \\ name",
                token("l\u{e9}bel\n\t\u{1}", "\u{7f}\u{2028}", u64::MAX),
                usize::MAX,
                "sim\"",
                "r1@h\"x,r2",
                true,
            ),
        ] {
            let subject = Subject::new("injection", target, &token, bytes, source);
            let mut line = Vec::new();
            injection_body(&mut line, time, &subject, requests, simulated, 4242);
            line.extend_from_slice(GENESIS.as_bytes());
            line.extend_from_slice(b"\"}");
            let record = Record {
                time: super::super::clock::format(time, super::super::clock::Fraction::Millis),
                event: "injection".into(),
                target: target.into(),
                token_label: token.label.clone(),
                token_serial: token.serial.clone(),
                slot: token.slot.id(),
                bytes,
                source: source.into(),
                request_ids: requests.into(),
                simulated,
                pid: 4242,
                prev: GENESIS.into(),
                signed_head: None,
                signature: None,
                key_label: None,
            };
            assert_eq!(
                String::from_utf8_lossy(&line),
                serde_json::to_string(&record).unwrap()
            );
        }
    }

    fn private_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        dir
    }

    #[test]
    fn a_chain_verifies_and_one_edited_line_breaks_it_there() {
        let dir = private_dir();
        let ledger = Ledger::open(dir.path()).unwrap();
        for n in 1..=5 {
            ledger.append(record(n)).unwrap();
        }
        // A second writer (another process) chains on from what is in the file.
        let other = Ledger::open(dir.path()).unwrap();
        other.append(record(6)).unwrap();
        ledger.append(record(7)).unwrap();
        let files = files_in(dir.path());
        let Verdict::Intact { lines, .. } = verify(&files).unwrap() else {
            panic!("not intact")
        };
        assert_eq!(lines, 7);
        let path = dir.path().join(FOLDER).join(FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let edited = text.replacen("\"bytes\":3", "\"bytes\":300", 1);
        std::fs::write(&path, edited).unwrap();
        match verify(&files).unwrap() {
            Verdict::Broken { line, .. } => assert_eq!(line, 4, "the line after the edit"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn rotation_keeps_the_chain_across_files() {
        let dir = private_dir();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.append(record(1)).unwrap();
        ledger.append(record(2)).unwrap();
        ledger.rotate().unwrap();
        ledger.append(record(3)).unwrap();
        let files = files_in(dir.path());
        assert_eq!(files.len(), 2);
        assert_eq!(
            verify(&files).unwrap(),
            Verdict::Intact {
                lines: 3,
                head: hash_line(
                    std::fs::read_to_string(dir.path().join(FOLDER).join(FILE))
                        .unwrap()
                        .trim_end()
                        .as_bytes()
                )
            }
        );
    }
}

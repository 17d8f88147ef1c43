//! The replay record: keyed hashes of the blocks accepted recently, so that a block the server
//! sends again is refused, even by the next process (two `qseed once` runs from cron).
//!
//! Only HMAC-SHA-256 values (truncated to 64 bits) under a random key are kept, never the
//! bytes: without the key a hash says nothing about a block, and the key lives beside the
//! record in the private state folder (`<state>/replay/key`, `<state>/replay/seen`). The record
//! is bounded: the last [`super::REPLAY_MEMORY`] blocks are remembered; the file is
//! compacted when it holds twice that many. Writers append under a shared lock, compaction
//! takes it exclusively, so a `run` and a cron `once` can share the folder.
//!
//! 64 bits identify a block well enough: a fresh block matches one of the 65,536 remembered by
//! chance with odds of 2^-48; an agent seeding 256 tokens with 48 bytes every second receives
//! about 2^32 blocks in ten years, so the odds that it ever refuses one by chance are 2^-16 (and
//! a refused block is only a block not used). Full, the record holds 1.7 MiB; with 128-bit
//! values it held 4.4 MiB, more than the rest of an idle agent's heap.
//!
//! On disk a record is 16 bytes, the digest's 8 (little-endian) then 8 that are not read: the
//! files of earlier versions, which wrote 128-bit values, read the same.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::hmac;

/// One remembered block: the first 64 bits of its keyed hash.
type Digest = u64;

/// Bytes per block in the file.
const RECORD_LEN: usize = 16;

/// Hashes a digest to itself. Digests are keyed hashes: uniformly spread, and nobody without
/// the key can choose blocks whose digests collide in the table (no hash flooding).
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the key is a `u64`); this keeps any other use correct.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

type DigestSet = HashSet<Digest, BuildHasherDefault<DigestHasher>>;

const KEY_LEN: usize = 32;

/// Recently accepted blocks, in memory and, with a state folder, on disk.
pub struct ReplayRecord {
    key: hmac::Key,
    seen: DigestSet,
    /// The remembered digests, oldest first: at most `memory`.
    order: VecDeque<Digest>,
    memory: usize,
    /// The folder's files, when the record outlives the process.
    disk: Option<PathBuf>,
    /// Accepted since the last [`ReplayRecord::persist`].
    pending: Vec<Digest>,
}

impl std::fmt::Debug for ReplayRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayRecord")
            .field("remembered", &self.order.len())
            .field("disk", &self.disk)
            .finish_non_exhaustive()
    }
}

impl ReplayRecord {
    /// A record for this process only, under a fresh random key.
    pub fn in_memory(memory: usize) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .unwrap_or_else(|_| hmac::Key::new(hmac::HMAC_SHA256, &random_key()));
        Self {
            key,
            seen: DigestSet::default(),
            order: VecDeque::new(),
            memory,
            disk: None,
            pending: Vec::new(),
        }
    }

    /// The record kept in `folder` (created 0700 if missing), loaded with what earlier
    /// processes accepted.
    pub fn open(folder: &Path, memory: usize) -> Result<Self, String> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(folder)
            .map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
        let lock = lock_file(folder)?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| format!("cannot lock {}: {e}", folder.display()))?;
        let key = load_or_create_key(&folder.join("key"))?;
        let mut record = Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &key[..]),
            seen: DigestSet::default(),
            order: VecDeque::new(),
            memory,
            disk: Some(folder.to_path_buf()),
            pending: Vec::new(),
        };
        let seen_path = folder.join("seen");
        let total = read_digests(&seen_path, memory, |digest| record.remember(digest))?;
        if total > 2 * memory {
            record.compact(&seen_path)?;
        }
        Ok(record)
    }

    /// Whether `block` was accepted before; if not, it is remembered as accepted now.
    pub fn check_and_remember(&mut self, block: &[u8]) -> bool {
        let tag = hmac::sign(&self.key, block);
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag.as_ref()[..8]);
        let digest = Digest::from_le_bytes(first);
        if self.seen.contains(&digest) {
            return true;
        }
        self.remember(digest);
        if self.disk.is_some() {
            self.pending.push(digest);
        }
        false
    }

    fn remember(&mut self, digest: Digest) {
        if self.memory == 0 || self.seen.contains(&digest) {
            return;
        }
        // The oldest goes first, so neither the queue nor the set ever grows past `memory`
        // (a queue at a power-of-two length would double on one push too many).
        if self.order.len() >= self.memory {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(digest);
        self.order.push_back(digest);
    }

    /// What was accepted since the last call, to be appended to the folder's record (by the
    /// caller, outside any lock it holds: the write may wait for another process's
    /// compaction); `None` without a folder or when nothing is new.
    pub fn take_pending(&mut self) -> Option<PendingDigests> {
        let folder = self.disk.clone()?;
        if self.pending.is_empty() {
            return None;
        }
        Some(PendingDigests {
            folder,
            digests: std::mem::take(&mut self.pending),
        })
    }

    /// Appends what was accepted since the last call to the folder's record.
    pub fn persist(&mut self) -> Result<(), String> {
        self.take_pending().map_or(Ok(()), PendingDigests::write)
    }
}

/// Digests of accepted blocks not yet in the folder's record.
#[derive(Debug)]
pub struct PendingDigests {
    folder: PathBuf,
    digests: Vec<Digest>,
}

impl PendingDigests {
    /// Appends them, under the folder's shared lock.
    pub fn write(self) -> Result<(), String> {
        let folder = &self.folder;
        let lock = lock_file(folder)?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockShared)
            .map_err(|e| format!("cannot lock {}: {e}", folder.display()))?;
        let path = folder.join("seen");
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let bytes = records(self.digests.iter());
        // One write of whole records: appends of other processes never split one.
        file.write_all(&bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

impl ReplayRecord {
    /// Rewrites the file with the remembered digests only (caller holds the exclusive lock).
    fn compact(&self, path: &Path) -> Result<(), String> {
        let folder = path.parent().unwrap_or(Path::new("."));
        let mut temp = tempfile::NamedTempFile::new_in(folder)
            .map_err(|e| format!("cannot compact {}: {e}", path.display()))?;
        let bytes = records(self.order.iter());
        temp.write_all(&bytes)
            .and_then(|_| temp.as_file().sync_all())
            .map_err(|e| format!("cannot compact {}: {e}", path.display()))?;
        temp.persist(path)
            .map_err(|e| format!("cannot compact {}: {e}", path.display()))?;
        Ok(())
    }

    /// How many blocks are remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

fn random_key() -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    // Without the OS's randomness the process could not run at all (TLS needs it too).
    let _ = getrandom::fill(&mut key);
    key
}

fn lock_file(folder: &Path) -> Result<File, String> {
    let path = folder.join("lock");
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

fn load_or_create_key(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    match crate::files::read_bounded(path, KEY_LEN as u64) {
        Ok((key, _)) if key.len() == KEY_LEN => return Ok(key),
        Ok(_) => return Err(format!("{} is not a replay key; remove it", path.display())),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let key = zeroize::Zeroizing::new(random_key().to_vec());
    let folder = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(folder)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    temp.write_all(&key)
        .and_then(|_| temp.as_file().sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    temp.persist(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(key)
}

/// The file's records for `digests`.
fn records<'a>(digests: impl ExactSizeIterator<Item = &'a Digest>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(digests.len() * RECORD_LEN);
    for digest in digests {
        bytes.extend_from_slice(&digest.to_le_bytes());
        bytes.extend_from_slice(&[0; RECORD_LEN - 8]);
    }
    bytes
}

/// Hands the last `memory` digests of the file to `remember`, oldest first, and returns how
/// many records the file holds. Read in pieces: a whole file would be a megabyte of transient
/// heap at every start.
fn read_digests(
    path: &Path,
    memory: usize,
    mut remember: impl FnMut(Digest),
) -> Result<usize, String> {
    let (file, meta) = match crate::files::open_regular(path) {
        Ok(opened) => opened,
        Err(e) if e.is_not_found() => return Ok(0),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let total = meta.len() as usize / RECORD_LEN;
    // Only the tail matters; the file is bounded by compaction, but read at most a tail's worth.
    let skip = total.saturating_sub(memory) as u64 * RECORD_LEN as u64;
    let mut file = file;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(skip))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut tail = file.take(memory as u64 * RECORD_LEN as u64);
    let mut piece = vec![0u8; 256 * RECORD_LEN];
    let mut filled = 0;
    loop {
        let n = tail
            .read(&mut piece[filled..])
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        filled += n;
        let whole = filled - filled % RECORD_LEN;
        for record in piece[..whole].chunks_exact(RECORD_LEN) {
            let mut first = [0u8; 8];
            first.copy_from_slice(&record[..8]);
            remember(Digest::from_le_bytes(first));
        }
        piece.copy_within(whole..filled, 0);
        filled -= whole;
        if n == 0 {
            break;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_recognized_by_the_next_process() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("replay");
        let mut first = ReplayRecord::open(&folder, 100).unwrap();
        assert!(!first.check_and_remember(b"block one"));
        assert!(first.check_and_remember(b"block one"));
        first.persist().unwrap();
        drop(first);
        let mut second = ReplayRecord::open(&folder, 100).unwrap();
        assert!(second.check_and_remember(b"block one"), "seen by the first");
        assert!(!second.check_and_remember(b"block two"));
        // Nothing of a block is on disk: 16 bytes per block (8 of keyed hash), a 32-byte key.
        let seen = std::fs::read(folder.join("seen")).unwrap();
        assert_eq!(seen.len(), 16);
        assert!(!seen.windows(5).any(|w| w == b"block"));
        assert_eq!(std::fs::read(folder.join("key")).unwrap().len(), 32);
    }

    #[test]
    fn the_record_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("replay");
        for round in 0..5u32 {
            let mut record = ReplayRecord::open(&folder, 10).unwrap();
            for i in 0..10u32 {
                assert!(!record.check_and_remember(&(round * 100 + i).to_le_bytes()));
            }
            record.persist().unwrap();
        }
        let len = std::fs::metadata(folder.join("seen")).unwrap().len();
        assert!(len <= 3 * 10 * 16, "{len}");
        let mut record = ReplayRecord::open(&folder, 10).unwrap();
        assert_eq!(record.len(), 10);
        assert!(record.check_and_remember(&409u32.to_le_bytes()));
    }

    #[test]
    fn files_of_earlier_versions_read_the_same() {
        // Earlier versions appended the first 16 bytes of the tag.
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("replay");
        std::fs::create_dir(&folder).unwrap();
        let key = [7u8; KEY_LEN];
        std::fs::write(folder.join("key"), key).unwrap();
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), b"old block");
        std::fs::write(folder.join("seen"), &tag.as_ref()[..16]).unwrap();
        let mut record = ReplayRecord::open(&folder, 100).unwrap();
        assert_eq!(record.len(), 1);
        assert!(record.check_and_remember(b"old block"));
        assert!(!record.check_and_remember(b"new block"));
    }

    #[test]
    fn a_full_record_holds_no_more_than_its_memory() {
        let mut record = ReplayRecord::in_memory(64);
        for i in 0..1000u32 {
            assert!(!record.check_and_remember(&i.to_le_bytes()));
        }
        assert_eq!(record.len(), 64);
        // A queue pushed before popping would have doubled to 128.
        assert_eq!(record.order.capacity(), 64);
        assert!(record.seen.len() == 64 && record.check_and_remember(&999u32.to_le_bytes()));
        assert!(!record.check_and_remember(&0u32.to_le_bytes()), "forgotten");
    }
}

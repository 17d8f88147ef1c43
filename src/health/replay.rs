//! The replay record: keyed hashes of the blocks accepted recently, so that a block the server
//! sends again is refused, even by the next process (two `qseed once` runs from cron).
//!
//! Only HMAC-SHA-256 values (truncated to 128 bits) under a random key are kept, never the
//! bytes: without the key a hash says nothing about a block, and the key lives beside the
//! record in the private state folder (`<state>/replay/key`, `<state>/replay/seen`). The record
//! is bounded: the last [`super::REPLAY_MEMORY`] blocks are remembered; the file is
//! compacted when it holds twice that many. Writers append under a shared lock, compaction
//! takes it exclusively, so a `run` and a cron `once` can share the folder.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::hmac;

/// One remembered block.
type Digest = [u8; 16];

const KEY_LEN: usize = 32;

/// Recently accepted blocks, in memory and, with a state folder, on disk.
pub struct ReplayRecord {
    key: hmac::Key,
    seen: HashSet<Digest>,
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
            seen: HashSet::new(),
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
            seen: HashSet::new(),
            order: VecDeque::new(),
            memory,
            disk: Some(folder.to_path_buf()),
            pending: Vec::new(),
        };
        let seen_path = folder.join("seen");
        let digests = read_digests(&seen_path, memory)?;
        let total = digests.total;
        for digest in digests.kept {
            record.remember(digest);
        }
        if total > 2 * memory {
            record.compact(&seen_path)?;
        }
        Ok(record)
    }

    /// Whether `block` was accepted before; if not, it is remembered as accepted now.
    pub fn check_and_remember(&mut self, block: &[u8]) -> bool {
        let tag = hmac::sign(&self.key, block);
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&tag.as_ref()[..16]);
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
        if self.seen.insert(digest) {
            self.order.push_back(digest);
        }
        while self.order.len() > self.memory {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
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
        let bytes: Vec<u8> = self.digests.iter().flatten().copied().collect();
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
        let bytes: Vec<u8> = self.order.iter().flatten().copied().collect();
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

struct Digests {
    /// The last `memory` digests of the file.
    kept: Vec<Digest>,
    /// How many the file holds.
    total: usize,
}

fn read_digests(path: &Path, memory: usize) -> Result<Digests, String> {
    let (file, meta) = match crate::files::open_regular(path) {
        Ok(opened) => opened,
        Err(e) if e.is_not_found() => {
            return Ok(Digests {
                kept: Vec::new(),
                total: 0,
            })
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let total = meta.len() as usize / 16;
    // Only the tail matters; the file is bounded by compaction, but read at most a tail's worth.
    let skip = total.saturating_sub(memory) as u64 * 16;
    let mut file = file;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(skip))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut bytes = Vec::with_capacity(memory.min(total) * 16);
    file.take(memory as u64 * 16)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let kept = bytes
        .chunks_exact(16)
        .map(|c| {
            let mut d = [0u8; 16];
            d.copy_from_slice(c);
            d
        })
        .collect();
    Ok(Digests { kept, total })
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
        // Nothing of a block is on disk: 16 bytes of keyed hash per block, a 32-byte key.
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
}

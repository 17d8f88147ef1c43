//! The replay record: keyed hashes of the blocks accepted recently, so that a block the server
//! sends again is refused, even by another process (a `run` beside a cron `qseed once`).
//!
//! Only HMAC-SHA-256 values (truncated to 64 bits) under a random key are kept, never the
//! bytes: without the key a hash says nothing about a block, and the key lives beside the
//! record in the private state folder (`<state>/replay/key`, `<state>/replay/seen`). The record
//! is bounded: the last [`super::REPLAY_MEMORY`] blocks are remembered; the file is
//! compacted when it holds twice that many.
//!
//! Shared between processes ([`SharedRecord`]): an answer's blocks are checked and appended
//! under the folder's exclusive lock, after reading what other processes appended since, so a
//! block accepted by `once` is refused by a running `run` and the other way round. A record
//! that cannot be read, kept or written is an error, never a silent reset: a stray byte in
//! `seen`, or a lost `key` while `seen` holds digests, stops qseed until an operator removes
//! the folder (`qseed doctor` says so); and an answer whose digests cannot be appended is
//! wiped unused. Every file is opened through [`StateFolder`] (no link followed).
//!
//! 64 bits identify a block well enough: a fresh block matches one of the 65,536 remembered by
//! chance with odds of 2^-48; an agent seeding 256 tokens with 48 bytes every second receives
//! about 2^32 blocks in ten years, so the odds that it ever refuses one by chance are 2^-16 (and
//! a refused block is only a block not used). Full, the record holds 512 KiB (see
//! [`Remembered`]); with 128-bit values in a set and a queue it held 4.4 MiB, more than the rest
//! of an idle agent's heap.
//!
//! On disk a record is 16 bytes, the digest's 8 (little-endian) then 8 that are not read: the
//! files of earlier versions, which wrote 128-bit values, read the same.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use ring::hmac;

use crate::folder::{LockError, StateFolder};

/// One remembered block: the first 64 bits of its keyed hash.
type Digest = u64;

/// Bytes per block in the file.
const RECORD_LEN: usize = 16;

/// Hashes a digest to itself. Digests are keyed hashes: uniformly spread, and nobody without
/// the key can choose blocks whose digests collide in a table (no hash flooding).
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

/// The last `memory` digests, oldest first, in a ring and nothing else: 512 KiB full at
/// 65,536 blocks. Blocks arrive by the answer, so an answer's digests are looked up together
/// in one pass over the ring ([`Remembered::found_among`]), about 0.2 ms per answer on a full
/// record (BENCHMARKS.md); an index for lookups one block at a time (a set beside a queue:
/// 1.7 MiB; a table of ring positions: 1.1 MiB) was most of an agent's own heap.
struct Remembered {
    /// Filled in order up to `memory`, then overwritten oldest first from `next`.
    ring: Vec<Digest>,
    /// Where the next digest goes once the ring is full (the oldest's place).
    next: usize,
    memory: usize,
}

impl Remembered {
    fn new(memory: usize) -> Self {
        Self {
            ring: Vec::new(),
            next: 0,
            memory,
        }
    }

    /// Which of `batch` are remembered: one pass over the ring, whatever the batch's size.
    fn found_among(&self, batch: &[Digest]) -> DigestSet {
        let wanted: DigestSet = batch.iter().copied().collect();
        if wanted.is_empty() {
            return wanted;
        }
        self.ring
            .iter()
            .copied()
            .filter(|d| wanted.contains(d))
            .collect()
    }

    /// Remembers `digest`, forgetting the oldest when full. Callers look a block up before
    /// they remember it; a digest remembered twice (a file written by hand) only takes a place.
    fn push(&mut self, digest: Digest) {
        if self.memory == 0 {
            return;
        }
        if self.ring.len() < self.memory {
            if self.ring.capacity() == self.ring.len() {
                // Doubled, but never past `memory`: a Vec's own doubling would reserve up to
                // twice `memory`, never used.
                let more = self.ring.len().max(64).min(self.memory - self.ring.len());
                self.ring.reserve_exact(more);
            }
            self.ring.push(digest);
        } else {
            self.ring[self.next] = digest;
            self.next = (self.next + 1) % self.memory;
        }
    }

    /// Oldest first.
    fn iter(&self) -> impl Iterator<Item = &Digest> {
        let (newer, older) = self.ring.split_at(self.next);
        older.iter().chain(newer)
    }

    fn len(&self) -> usize {
        self.ring.len()
    }
}

const KEY_LEN: usize = 32;

/// Recently accepted blocks, in this process's memory.
pub struct ReplayRecord {
    key: hmac::Key,
    seen: Remembered,
}

impl std::fmt::Debug for ReplayRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayRecord")
            .field("remembered", &self.seen.len())
            .finish_non_exhaustive()
    }
}

impl ReplayRecord {
    /// A record for this process only, under a fresh random key.
    pub fn in_memory(memory: usize) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .unwrap_or_else(|_| hmac::Key::new(hmac::HMAC_SHA256, &random_key()));
        Self::with_key(key, memory)
    }

    fn with_key(key: hmac::Key, memory: usize) -> Self {
        Self {
            key,
            seen: Remembered::new(memory),
        }
    }

    fn digest(&self, block: &[u8]) -> Digest {
        let tag = hmac::sign(&self.key, block);
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag.as_ref()[..8]);
        Digest::from_le_bytes(first)
    }

    /// Whether `block` was accepted before; if not, it is remembered as accepted now. One
    /// pass over the record: for an answer's blocks, [`ReplayRecord::admit`] makes one pass for
    /// all of them.
    pub fn check_and_remember(&mut self, block: &[u8]) -> bool {
        !self.admit([block])[0]
    }

    /// For each block, in order, whether it is new: neither remembered nor the same as an
    /// earlier block of `blocks`. The new ones are remembered as accepted now.
    pub fn admit<'a>(&mut self, blocks: impl IntoIterator<Item = &'a [u8]>) -> Vec<bool> {
        let digests: Vec<Digest> = blocks.into_iter().map(|b| self.digest(b)).collect();
        let mut known = self.seen.found_among(&digests);
        digests
            .into_iter()
            .map(|digest| {
                let new = known.insert(digest);
                if new {
                    self.seen.push(digest);
                }
                new
            })
            .collect()
    }

    fn remember(&mut self, digest: Digest) {
        self.seen.push(digest);
    }
}

/// The record of a state folder, shared with every qseed process that uses the folder (see the
/// module documentation).
pub struct SharedRecord {
    record: ReplayRecord,
    folder: StateFolder,
    /// How much of `seen` is in `record` already.
    read_up_to: u64,
}

impl std::fmt::Debug for SharedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRecord")
            .field("remembered", &self.record.len())
            .field("folder", &self.folder.path())
            .finish_non_exhaustive()
    }
}

const LOCK: &str = "lock";
const KEY: &str = "key";
const SEEN: &str = "seen";

impl SharedRecord {
    /// The record in `<state>/replay` (made if missing), loaded with what earlier processes
    /// accepted. A damaged record or a lost key is an error naming the fix.
    pub fn open(state: &Path, memory: usize) -> Result<Self, String> {
        let folder = StateFolder::open(state).and_then(|s| s.subfolder("replay"))?;
        let _lock = exclusive(&folder)?;
        let seen = folder
            .open_read(SEEN)
            .map_err(|e| damaged(&folder, SEEN, &e.to_string()))?;
        let holds_digests = match &seen {
            Some(file) => file.metadata().map(|m| m.len() > 0).unwrap_or(true),
            None => false,
        };
        let key = match folder.read_key(KEY, KEY_LEN) {
            Ok(Some(key)) => key,
            Ok(None) if holds_digests => {
                return Err(damaged(
                    &folder,
                    KEY,
                    "it is missing while the record holds digests made with it, so no replay \
                     could be recognized",
                ))
            }
            Ok(None) => folder.create_key(KEY, KEY_LEN)?,
            Err(e) => return Err(damaged(&folder, KEY, &e)),
        };
        let mut shared = Self {
            record: ReplayRecord::with_key(hmac::Key::new(hmac::HMAC_SHA256, &key[..]), memory),
            folder,
            read_up_to: 0,
        };
        let total = shared.catch_up()?;
        if total > 2 * memory as u64 {
            shared.compact()?;
        }
        Ok(shared)
    }

    /// Checks each `block_len` block of `bytes` against every process's record, appends the
    /// new ones' digests, and returns the accepted blocks (moved to the front, the rest wiped)
    /// with the number refused as replays. One exclusive lock covers reading, checking and
    /// appending: two processes never both accept one block. If the digests cannot be
    /// appended, nothing is accepted.
    pub fn screen(
        &mut self,
        mut bytes: crate::secret::EntropyBytes,
        block_len: usize,
    ) -> Result<(crate::secret::EntropyBytes, usize), String> {
        use zeroize::Zeroize;
        let _lock = exclusive(&self.folder)?;
        self.catch_up()?;
        let blocks = bytes.len() / block_len;
        let digests: Vec<Digest> = bytes
            .expose()
            .chunks_exact(block_len)
            .map(|block| self.record.digest(block))
            .collect();
        // Every process's blocks, and this answer's earlier ones.
        let mut known = self.record.seen.found_among(&digests);
        let mut kept = 0;
        let mut new = Vec::with_capacity(blocks);
        for (i, &digest) in digests.iter().enumerate() {
            let range = i * block_len..(i + 1) * block_len;
            if !known.insert(digest) {
                continue;
            }
            new.push(digest);
            if kept != i {
                bytes.expose_mut().copy_within(range, kept * block_len);
            }
            kept += 1;
        }
        if !new.is_empty() {
            if let Err(e) = self.folder.append(SEEN, &records(new.iter())) {
                bytes.expose_mut().zeroize();
                bytes.truncate(0);
                // A full disk may have taken part of a record: cut it off (the lock is still
                // held, and `read_up_to` is the length before this append), so that the file
                // stays whole records and the next answer can be tried.
                let _ = self.folder.truncate(SEEN, self.read_up_to);
                return Err(format!(
                    "cannot append to {}: {e}",
                    self.folder.file_path(SEEN).display()
                ));
            }
            // The lock is still held: nobody appended since the catch-up, so the file now ends
            // with ours, which need not be read back.
            self.read_up_to += (new.len() * RECORD_LEN) as u64;
            for digest in new {
                self.record.remember(digest);
            }
        }
        bytes.expose_mut()[kept * block_len..].zeroize();
        bytes.truncate(kept * block_len);
        Ok((bytes, blocks - kept))
    }

    /// Remembers what other processes appended since the last call (after a compaction by
    /// another process, the whole file); returns the records the file holds. Caller holds the
    /// lock.
    fn catch_up(&mut self) -> Result<u64, String> {
        let Some(mut file) = self
            .folder
            .open_read(SEEN)
            .map_err(|e| damaged(&self.folder, SEEN, &e.to_string()))?
        else {
            self.read_up_to = 0;
            return Ok(0);
        };
        let len = file
            .metadata()
            .map_err(|e| damaged(&self.folder, SEEN, &e.to_string()))?
            .len();
        if len % RECORD_LEN as u64 != 0 {
            return Err(damaged(
                &self.folder,
                SEEN,
                &format!("its length, {len} bytes, is not a whole number of 16-byte records"),
            ));
        }
        if len < self.read_up_to {
            // Compacted by another process: its tail is what every process remembers.
            self.read_up_to = 0;
        }
        let memory = self.record.seen.memory as u64 * RECORD_LEN as u64;
        let from = self.read_up_to.max(len.saturating_sub(memory));
        file.seek(SeekFrom::Start(from))
            .map_err(|e| damaged(&self.folder, SEEN, &e.to_string()))?;
        let record = &mut self.record;
        read_digests(file.take(len - from), |d| record.remember(d))
            .map_err(|e| damaged(&self.folder, SEEN, &e))?;
        self.read_up_to = len;
        Ok(len / RECORD_LEN as u64)
    }

    /// Rewrites `seen` with the remembered digests only (caller holds the exclusive lock).
    fn compact(&mut self) -> Result<(), String> {
        self.folder
            .write_atomic(SEEN, &records(self.record.seen.iter()))
            .map_err(|e| {
                format!(
                    "cannot compact {}: {e}",
                    self.folder.file_path(SEEN).display()
                )
            })?;
        self.read_up_to = (self.record.seen.len() * RECORD_LEN) as u64;
        Ok(())
    }

    /// How many blocks are remembered.
    pub fn len(&self) -> usize {
        self.record.len()
    }

    pub fn is_empty(&self) -> bool {
        self.record.is_empty()
    }
}

fn exclusive(folder: &StateFolder) -> Result<std::fs::File, String> {
    folder.lock(LOCK, true, true).map_err(|e| {
        format!(
            "cannot lock {}: {}",
            folder.file_path(LOCK).display(),
            match e {
                LockError::Busy => "busy".to_string(),
                LockError::Io(e) => e.to_string(),
            }
        )
    })
}

/// A record that cannot be trusted any more: named, with the reset.
fn damaged(folder: &StateFolder, name: &str, why: &str) -> String {
    format!(
        "the replay record {} is damaged ({why}); qseed will not guess which blocks it already \
         used. To start a new record (forgetting the blocks it remembered), stop every qseed \
         process using it and run: rm -r {}",
        folder.file_path(name).display(),
        folder.path().display()
    )
}

impl ReplayRecord {
    /// How many blocks are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.len() == 0
    }
}

fn random_key() -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    // Without the OS's randomness the process could not run at all (TLS needs it too).
    let _ = getrandom::fill(&mut key);
    key
}

/// The file's records for `digests`.
fn records<'a>(digests: impl Iterator<Item = &'a Digest>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(digests.size_hint().0 * RECORD_LEN);
    for digest in digests {
        bytes.extend_from_slice(&digest.to_le_bytes());
        bytes.extend_from_slice(&[0; RECORD_LEN - 8]);
    }
    bytes
}

/// Hands every digest `reader` holds to `remember`, oldest first. Read in pieces: a whole
/// file would be a megabyte of transient heap at every start.
fn read_digests(mut reader: impl Read, mut remember: impl FnMut(Digest)) -> Result<(), String> {
    let mut piece = vec![0u8; 256 * RECORD_LEN];
    let mut filled = 0;
    loop {
        let n = reader
            .read(&mut piece[filled..])
            .map_err(|e| e.to_string())?;
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::EntropyBytes;

    const BLOCK: usize = 32;

    fn blocks(ids: &[u8]) -> EntropyBytes {
        let mut bytes = EntropyBytes::zeroed(ids.len() * BLOCK);
        for (i, id) in ids.iter().enumerate() {
            for (j, b) in bytes.expose_mut()[i * BLOCK..(i + 1) * BLOCK]
                .iter_mut()
                .enumerate()
            {
                *b = id.wrapping_mul(31).wrapping_add(j as u8);
            }
        }
        bytes
    }

    fn screen(record: &mut SharedRecord, ids: &[u8]) -> usize {
        let (kept, replayed) = record.screen(blocks(ids), BLOCK).unwrap();
        assert_eq!(kept.len(), (ids.len() - replayed) * BLOCK);
        replayed
    }

    #[test]
    fn a_block_is_recognized_by_the_next_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = SharedRecord::open(dir.path(), 100).unwrap();
        assert_eq!(screen(&mut first, &[1]), 0);
        assert_eq!(screen(&mut first, &[1, 2]), 1);
        drop(first);
        let mut second = SharedRecord::open(dir.path(), 100).unwrap();
        assert_eq!(screen(&mut second, &[1]), 1, "seen by the first");
        assert_eq!(screen(&mut second, &[3]), 0);
        // Nothing of a block is on disk: 16 bytes per block (8 of keyed hash), a 32-byte key.
        let folder = dir.path().join("replay");
        let seen = std::fs::read(folder.join("seen")).unwrap();
        assert_eq!(seen.len(), 3 * 16);
        let block = blocks(&[1]);
        assert!(!seen.windows(8).any(|w| w == &block.expose()[..8]));
        assert_eq!(std::fs::read(folder.join("key")).unwrap().len(), 32);
    }

    /// Issue 21, item 7: two processes open at once see each other's blocks (a `run` started
    /// before a `once` accepted a block refuses it), and a block repeated within one answer is
    /// taken once.
    #[test]
    fn item_07_processes_sharing_the_folder_see_each_others_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let mut run = SharedRecord::open(dir.path(), 100).unwrap();
        let mut once = SharedRecord::open(dir.path(), 100).unwrap();
        assert_eq!(screen(&mut once, &[7, 8]), 0);
        assert_eq!(
            screen(&mut run, &[8, 9]),
            1,
            "accepted by the other process"
        );
        assert_eq!(screen(&mut once, &[9]), 1);
        assert_eq!(screen(&mut run, &[10, 10]), 1);
    }

    /// Issue 21, item 7: a damaged record or a lost key is an error that names the reset,
    /// never a silent fresh start.
    #[test]
    fn item_07_a_damaged_record_or_a_lost_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = SharedRecord::open(dir.path(), 100).unwrap();
        screen(&mut record, &[1, 2]);
        drop(record);
        let folder = dir.path().join("replay");
        let seen = folder.join("seen");
        let mut bytes = std::fs::read(&seen).unwrap();
        bytes.push(0);
        std::fs::write(&seen, &bytes).unwrap();
        let e = SharedRecord::open(dir.path(), 100).unwrap_err();
        assert!(
            e.contains("not a whole number of 16-byte records")
                && e.contains(&format!("rm -r {}", folder.display())),
            "{e}"
        );
        bytes.pop();
        std::fs::write(&seen, &bytes).unwrap();
        std::fs::remove_file(folder.join("key")).unwrap();
        let e = SharedRecord::open(dir.path(), 100).unwrap_err();
        assert!(e.contains("missing while the record holds digests"), "{e}");
        // The operator's reset: a new record.
        std::fs::remove_dir_all(&folder).unwrap();
        let mut fresh = SharedRecord::open(dir.path(), 100).unwrap();
        assert_eq!(screen(&mut fresh, &[1]), 0);
    }

    #[test]
    fn the_record_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..5u8 {
            let mut record = SharedRecord::open(dir.path(), 10).unwrap();
            for i in 0..10u8 {
                assert_eq!(screen(&mut record, &[round * 20 + i]), 0);
            }
        }
        let len = std::fs::metadata(dir.path().join("replay/seen"))
            .unwrap()
            .len();
        assert!(len <= 3 * 10 * 16, "{len}");
        let mut record = SharedRecord::open(dir.path(), 10).unwrap();
        assert_eq!(record.len(), 10);
        assert_eq!(screen(&mut record, &[89]), 1);
    }

    #[test]
    fn files_of_earlier_versions_read_the_same() {
        // Earlier versions appended the first 16 bytes of the tag.
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("replay");
        std::fs::create_dir(&folder).unwrap();
        let key = [7u8; KEY_LEN];
        std::fs::write(folder.join("key"), key).unwrap();
        let old = blocks(&[42]);
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), old.expose());
        std::fs::write(folder.join("seen"), &tag.as_ref()[..16]).unwrap();
        let mut record = SharedRecord::open(dir.path(), 100).unwrap();
        assert_eq!(record.len(), 1);
        assert_eq!(screen(&mut record, &[42]), 1);
        assert_eq!(screen(&mut record, &[43]), 0);
    }

    #[test]
    fn a_full_record_holds_no_more_than_its_memory() {
        let mut record = ReplayRecord::in_memory(64);
        for i in 0..1000u32 {
            assert!(!record.check_and_remember(&i.to_le_bytes()));
        }
        assert_eq!(record.len(), 64);
        // A ring grown by doubling would have reserved 128.
        assert_eq!(record.seen.ring.capacity(), 64);
        assert!(record.check_and_remember(&999u32.to_le_bytes()));
        assert!(!record.check_and_remember(&0u32.to_le_bytes()), "forgotten");
    }

    proptest::proptest! {
        /// Answer after answer, a record admits exactly the blocks that a queue of the last
        /// `memory` accepted blocks, as it was when the answer came, does not hold (each
        /// once), remembers them oldest first, and never holds more.
        #[test]
        fn admits_what_a_queue_of_the_last_blocks_would(
            memory in 0usize..12,
            answers in proptest::collection::vec(proptest::collection::vec(0u8..24, 0..6), 0..40),
        ) {
            let mut record = ReplayRecord::in_memory(memory);
            let mut queue = std::collections::VecDeque::new();
            for answer in answers {
                let blocks: Vec<[u8; 1]> = answer.iter().map(|&id| [id]).collect();
                let admitted = record.admit(blocks.iter().map(|b| &b[..]));
                let mut expected = Vec::new();
                let mut this_answer = Vec::new();
                // What was remembered when the answer came: a block forgotten to make room for
                // an earlier block of the same answer is still a replay.
                let before = queue.clone();
                for id in answer {
                    let new = !before.contains(&id) && !this_answer.contains(&id);
                    this_answer.push(id);
                    expected.push(new);
                    if new && memory > 0 {
                        if queue.len() == memory {
                            queue.pop_front();
                        }
                        queue.push_back(id);
                    }
                }
                proptest::prop_assert_eq!(admitted, expected);
                let remembered: Vec<Digest> = record.seen.iter().copied().collect();
                let modelled: Vec<Digest> = queue.iter().map(|&id| record.digest(&[id])).collect();
                proptest::prop_assert_eq!(remembered, modelled);
                proptest::prop_assert!(record.seen.ring.capacity() <= memory);
            }
        }
    }
}

//! A buffer of entropy bytes: never printed, kept out of swap and core dumps where the system
//! allows, wiped when dropped.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memmap2::{Advice, MmapMut, MmapOptions};
use zeroize::{Zeroize, Zeroizing};

/// Entropy bytes in memory. `Debug` shows only the length.
///
/// Each buffer lives in its own anonymous memory mapping, allocated at its final size (so no
/// reallocation leaves a copy behind), locked in RAM with `mlock` and marked `MADV_DONTDUMP`.
/// On drop every byte it could have held is zeroized before the mapping is unmapped or kept for
/// reuse. When the system refuses the lock (`RLIMIT_MEMLOCK` too low), qseed warns once and
/// carries on unlocked.
pub struct EntropyBytes {
    storage: Storage,
    len: usize,
    /// Its length when made: no byte past it was ever exposed (`truncate` only shortens `len`),
    /// and the rest of the mapping is still zero. A round's 48 bytes wipe 48 bytes, not a page
    /// (64 cache lines written on every injection).
    written: usize,
}

enum Storage {
    Empty,
    Mapped(MmapMut),
    /// Used only if the system refuses an anonymous mapping: still wiped on drop.
    Heap(Zeroizing<Vec<u8>>),
}

/// Buffers of at most this many bytes live in one page each, and their pages are kept for
/// reuse (wiped, still locked) instead of being unmapped: a round's 48 bytes then cost no
/// `mmap`, `mlock`, `madvise` and `munmap` of their own.
const PAGE: usize = 4096;
/// Most spare pages kept (1 MiB of locked memory at most).
const SPARE_LIMIT: usize = 256;
static SPARE_PAGES: std::sync::Mutex<Vec<MmapMut>> = std::sync::Mutex::new(Vec::new());

static LOCK_WARNED: AtomicBool = AtomicBool::new(false);
static MAP_WARNED: AtomicBool = AtomicBool::new(false);
static LOCK_FAILURES: AtomicU64 = AtomicU64::new(0);

impl EntropyBytes {
    /// A zero-filled buffer of `len` bytes, to be written in place.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self {
                storage: Storage::Empty,
                len,
                written: len,
            };
        }
        if len <= PAGE {
            let spare = SPARE_PAGES
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop();
            if let Some(map) = spare {
                return Self {
                    storage: Storage::Mapped(map),
                    len,
                    written: len,
                };
            }
        }
        let storage = match MmapOptions::new().len(len.max(PAGE)).map_anon() {
            Ok(map) => {
                if let Err(e) = map.lock() {
                    LOCK_FAILURES.fetch_add(1, Ordering::Relaxed);
                    if !LOCK_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "cannot lock entropy buffers in RAM ({e}); they could be swapped to \
                             disk. {}",
                            super::memory::lock_failure_hint(&e)
                        );
                    }
                }
                #[cfg(target_os = "linux")]
                let _ = map.advise(Advice::DontDump);
                Storage::Mapped(map)
            }
            Err(e) => {
                if !MAP_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!("cannot map memory for entropy buffers ({e}); using the heap");
                }
                Storage::Heap(Zeroizing::new(vec![0u8; len]))
            }
        };
        Self {
            storage,
            len,
            written: len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shortens the buffer in place; the cut-off bytes stay in the mapping until it is wiped.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The bytes themselves: for `C_SeedRandom`, writing a fetched file, and tests.
    pub fn expose(&self) -> &[u8] {
        match &self.storage {
            Storage::Empty => &[],
            Storage::Mapped(map) => &map[..self.len],
            Storage::Heap(vec) => &vec[..self.len],
        }
    }

    pub fn expose_mut(&mut self) -> &mut [u8] {
        match &mut self.storage {
            Storage::Empty => &mut [],
            Storage::Mapped(map) => &mut map[..self.len],
            Storage::Heap(vec) => &mut vec[..self.len],
        }
    }

    /// Whether this buffer's pages are locked in RAM.
    pub fn is_locked(&self) -> bool {
        matches!(self.storage, Storage::Mapped(_)) && LOCK_FAILURES.load(Ordering::Relaxed) == 0
    }
}

/// How many entropy buffers could not be locked in RAM since start.
pub fn lock_failures() -> u64 {
    LOCK_FAILURES.load(Ordering::Relaxed)
}

impl EntropyBytes {
    /// Zeroizes every byte ever exposed, including those cut off by `truncate`: the whole
    /// mapping is zero again (a spare page goes back clean).
    fn wipe(&mut self) {
        match &mut self.storage {
            Storage::Empty => {}
            Storage::Mapped(map) => map[..self.written].zeroize(),
            Storage::Heap(vec) => vec.zeroize(),
        }
    }
}

impl Drop for EntropyBytes {
    fn drop(&mut self) {
        // Before the mapping is unmapped (or the heap buffer freed, or the page kept).
        self.wipe();
        if let Storage::Mapped(map) = std::mem::replace(&mut self.storage, Storage::Empty) {
            if map.len() == PAGE {
                let mut spare = SPARE_PAGES
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if spare.len() < SPARE_LIMIT {
                    spare.push(map);
                }
            }
        }
    }
}

impl fmt::Debug for EntropyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntropyBytes({} bytes, redacted)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_bytes() {
        let mut bytes = EntropyBytes::zeroed(4);
        bytes
            .expose_mut()
            .copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(format!("{bytes:?}"), "EntropyBytes(4 bytes, redacted)");
    }

    #[test]
    fn truncate_keeps_the_front_and_sizes_are_exact() {
        let mut bytes = EntropyBytes::zeroed(10);
        bytes
            .expose_mut()
            .copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        bytes.truncate(3);
        assert_eq!(bytes.expose(), &[1, 2, 3]);
        assert_eq!(EntropyBytes::zeroed(0).expose(), &[] as &[u8]);
    }

    #[test]
    fn wiping_clears_the_whole_allocation_even_after_truncate() {
        let mut bytes = EntropyBytes::zeroed(100);
        bytes.expose_mut().fill(0x5a);
        bytes.truncate(10);
        bytes.wipe();
        let Storage::Mapped(map) = &bytes.storage else {
            panic!("mapped");
        };
        assert!(map[..].iter().all(|&b| b == 0));
        // Small buffers take a whole page (kept for reuse).
        assert_eq!(map.len(), PAGE);
    }

    #[test]
    fn a_reused_page_comes_back_wiped() {
        for _ in 0..50 {
            let mut bytes = EntropyBytes::zeroed(PAGE);
            assert!(
                bytes.expose().iter().all(|&b| b == 0),
                "a reused page is clean"
            );
            bytes.expose_mut().fill(0xa5);
            bytes.truncate(1);
        }
        // Buffers of a round's size, their bytes cut off in part, leave clean pages too.
        for _ in 0..50 {
            let mut round = EntropyBytes::zeroed(48);
            round.expose_mut().fill(0xa5);
            round.truncate(16);
            drop(round);
            assert!(EntropyBytes::zeroed(PAGE).expose().iter().all(|&b| b == 0));
        }
        let mut large = EntropyBytes::zeroed(3 * PAGE);
        large.expose_mut().fill(0xa5);
        drop(large);
        assert!(EntropyBytes::zeroed(3 * PAGE)
            .expose()
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn buffers_are_mapped_apart_from_the_heap() {
        let bytes = EntropyBytes::zeroed(48);
        assert!(matches!(bytes.storage, Storage::Mapped(_)));
    }
}

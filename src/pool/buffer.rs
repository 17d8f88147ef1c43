//! The in-memory buffer of downloaded entropy: bytes go in as whole blocks and come out
//! exactly once, in the sizes asked for.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use zeroize::Zeroize;

use super::EntropyBytes;

/// Downloaded blocks in arrival order, each with a read cursor.
///
/// Invariant: every byte before a block's cursor has been handed out and already wiped; every
/// byte after it has never been handed out. [`Buffer::take`] copies bytes out and wipes the
/// source range in the same step, so no byte can be returned twice.
#[derive(Debug, Default)]
pub struct Buffer {
    blocks: VecDeque<Block>,
    available: usize,
}

#[derive(Debug)]
struct Block {
    bytes: EntropyBytes,
    cursor: usize,
    received: Instant,
    /// The number of the request that bought these bytes, for audit records.
    request: u64,
}

impl Buffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held and not yet handed out.
    pub fn available(&self) -> usize {
        self.available
    }

    /// Adds fresh bytes, received at `received`, at the back.
    pub fn push(&mut self, bytes: EntropyBytes, received: Instant) {
        self.push_from(bytes, received, 0);
    }

    /// [`Buffer::push`] for bytes bought by request number `request`.
    pub fn push_from(&mut self, bytes: EntropyBytes, received: Instant, request: u64) {
        if bytes.is_empty() {
            return;
        }
        self.available += bytes.len();
        self.blocks.push_back(Block {
            bytes,
            cursor: 0,
            received,
            request,
        });
    }

    /// Drops (and so wipes) every block received more than `max_age` before `now`; returns
    /// how many never-used bytes went with them.
    pub fn expire(&mut self, now: Instant, max_age: Duration) -> usize {
        let mut dropped = 0;
        while let Some(block) = self.blocks.front() {
            if now.saturating_duration_since(block.received) <= max_age {
                break;
            }
            dropped += block.bytes.len() - block.cursor;
            self.blocks.pop_front();
        }
        self.available -= dropped;
        dropped
    }

    /// Hands out exactly `len` bytes, oldest first, or `None` (and nothing changes) when fewer
    /// than `len` are held.
    pub fn take(&mut self, len: usize) -> Option<EntropyBytes> {
        self.take_traced(len, &mut Vec::new())
    }

    /// [`Buffer::take`], with the numbers of the requests that bought the bytes put in
    /// `requests` (cleared first; the caller's, so that a take allocates nothing for them).
    pub fn take_traced(&mut self, len: usize, requests: &mut Vec<u64>) -> Option<EntropyBytes> {
        requests.clear();
        if len > self.available {
            return None;
        }
        let mut out = EntropyBytes::zeroed(len);
        let mut filled = 0;
        // `available` counts exactly the unread bytes of `blocks`, so the blocks run out only
        // when `filled == len`.
        while filled < len {
            let Some(block) = self.blocks.front_mut() else {
                break;
            };
            if requests.last() != Some(&block.request) {
                requests.push(block.request);
            }
            let unread = &mut block.bytes.expose_mut()[block.cursor..];
            let n = unread.len().min(len - filled);
            out.expose_mut()[filled..filled + n].copy_from_slice(&unread[..n]);
            unread[..n].zeroize();
            block.cursor += n;
            filled += n;
            if block.cursor == block.bytes.len() {
                self.blocks.pop_front();
            }
        }
        debug_assert_eq!(filled, len);
        self.available -= filled;
        Some(out)
    }

    /// Drops (and so wipes) every byte held; returns how many were never handed out.
    pub fn clear(&mut self) -> usize {
        let dropped = self.available;
        self.blocks.clear();
        self.available = 0;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Instant {
        Instant::now()
    }

    fn block(start: u8, len: usize) -> EntropyBytes {
        let mut b = EntropyBytes::zeroed(len);
        for (i, byte) in b.expose_mut().iter_mut().enumerate() {
            *byte = start.wrapping_add(i as u8);
        }
        b
    }

    #[test]
    fn takes_exact_sizes_across_block_boundaries_in_order() {
        let mut buf = Buffer::new();
        buf.push(block(0, 10), now());
        buf.push(block(10, 10), now());
        let a = buf.take(7).unwrap();
        let b = buf.take(7).unwrap();
        assert_eq!(a.expose(), &[0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(b.expose(), &[7, 8, 9, 10, 11, 12, 13]);
        assert_eq!(buf.available(), 6);
    }

    #[test]
    fn refuses_without_consuming_when_short() {
        let mut buf = Buffer::new();
        buf.push(block(0, 5), now());
        assert!(buf.take(6).is_none());
        assert_eq!(buf.available(), 5);
        assert_eq!(buf.take(5).unwrap().expose(), &[0, 1, 2, 3, 4]);
        assert!(buf.take(1).is_none());
    }

    #[test]
    fn handed_out_bytes_are_wiped_in_the_buffer() {
        let mut buf = Buffer::new();
        buf.push(block(1, 8), now());
        let _ = buf.take(3).unwrap();
        let front = buf.blocks.front().unwrap();
        assert_eq!(&front.bytes.expose()[..3], &[0, 0, 0]);
        assert_eq!(&front.bytes.expose()[3..], &[4, 5, 6, 7, 8]);
    }

    proptest::proptest! {
        /// Whatever the block sizes and take sizes, the bytes handed out are exactly the
        /// bytes pushed, in order, each once: no byte skipped, repeated or invented.
        #[test]
        fn handed_out_bytes_are_a_prefix_of_pushed_bytes(
            blocks in proptest::collection::vec(1usize..3000, 1..20),
            takes in proptest::collection::vec(1usize..2000, 1..60),
        ) {
            let mut buf = Buffer::new();
            let mut pushed = Vec::new();
            let mut counter = 0u32;
            for len in blocks {
                let mut b = EntropyBytes::zeroed(len);
                for byte in b.expose_mut() {
                    // A running counter's bytes: any repeat or skip shows up as a mismatch.
                    *byte = (counter % 251) as u8;
                    counter += 1;
                }
                pushed.extend_from_slice(b.expose());
                buf.push(b, now());
            }
            let mut out = Vec::new();
            for len in takes {
                let before = buf.available();
                match buf.take(len) {
                    Some(t) => {
                        proptest::prop_assert_eq!(t.len(), len);
                        out.extend_from_slice(t.expose());
                        proptest::prop_assert_eq!(buf.available(), before - len);
                    }
                    None => proptest::prop_assert!(len > before),
                }
            }
            proptest::prop_assert_eq!(&pushed[..out.len()], &out[..]);
            proptest::prop_assert_eq!(buf.available(), pushed.len() - out.len());
        }
    }

    #[test]
    fn old_blocks_expire_whole_and_count_only_unused_bytes() {
        let start = now();
        let mut buf = Buffer::new();
        buf.push(block(0, 100), start);
        buf.push(block(0, 100), start + Duration::from_secs(50));
        let _ = buf.take(30).unwrap();
        assert_eq!(
            buf.expire(start + Duration::from_secs(60), Duration::from_secs(60)),
            0
        );
        assert_eq!(
            buf.expire(start + Duration::from_secs(61), Duration::from_secs(60)),
            70
        );
        assert_eq!(buf.available(), 100);
        assert_eq!(
            buf.expire(start + Duration::from_secs(200), Duration::from_secs(60)),
            100
        );
        assert_eq!(buf.available(), 0);
    }

    #[test]
    fn clear_reports_unused_bytes() {
        let mut buf = Buffer::new();
        buf.push(block(0, 1024), now());
        let _ = buf.take(48).unwrap();
        assert_eq!(buf.clear(), 976);
        assert_eq!(buf.available(), 0);
    }
}

//! The pool: downloaded entropy waiting to be injected.
//!
//! Bytes are bought in whole KiB blocks and handed out in exactly the sizes targets ask for,
//! each byte once, to one target, oldest first. What is handed out or dropped is wiped.

mod buffer;
mod bytes;

use std::sync::atomic::{AtomicU64, Ordering};

pub use buffer::Buffer;
pub use bytes::EntropyBytes;

use crate::source::{EntropySource, SourceError, BLOCK_LEN, MAX_BLOCKS_PER_REQUEST};

/// A buffer shared by all targets, refilled from one source on demand.
#[derive(Debug)]
pub struct Pool<S> {
    source: S,
    /// Held across a refill, so concurrent takers wait for one request instead of each
    /// buying their own.
    buffer: tokio::sync::Mutex<Buffer>,
    stats: Stats,
}

/// Byte and request counters since start.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub failed_requests: AtomicU64,
    pub bytes_downloaded: AtomicU64,
    pub bytes_handed_out: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub failed_requests: u64,
    pub bytes_downloaded: u64,
    pub bytes_handed_out: u64,
}

impl<S: EntropySource> Pool<S> {
    pub fn new(source: S) -> Self {
        Self {
            source,
            buffer: tokio::sync::Mutex::new(Buffer::new()),
            stats: Stats::default(),
        }
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    /// Exactly `len` never-used bytes (1..=64 KiB), buying whole blocks when too few are held.
    pub async fn take(&self, len: usize) -> Result<EntropyBytes, SourceError> {
        let mut buffer = self.buffer.lock().await;
        if buffer.available() < len {
            let missing = len - buffer.available();
            let blocks = missing.div_ceil(BLOCK_LEN).clamp(1, MAX_BLOCKS_PER_REQUEST);
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            match self.source.fetch(blocks).await {
                Ok(fetched) => {
                    for block in fetched {
                        self.stats
                            .bytes_downloaded
                            .fetch_add(block.len() as u64, Ordering::Relaxed);
                        buffer.push(block);
                    }
                }
                Err(e) => {
                    self.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        // A source delivers whole blocks, enough for `missing`; this only fails if it did not.
        let taken = buffer
            .take(len)
            .ok_or(SourceError::ShortDelivery { needed: len })?;
        self.stats
            .bytes_handed_out
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(taken)
    }

    /// Wipes every byte still held and returns how many there were.
    pub async fn drain(&self) -> usize {
        self.buffer.lock().await.clear()
    }

    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.stats.requests.load(Ordering::Relaxed),
            failed_requests: self.stats.failed_requests.load(Ordering::Relaxed),
            bytes_downloaded: self.stats.bytes_downloaded.load(Ordering::Relaxed),
            bytes_handed_out: self.stats.bytes_handed_out.load(Ordering::Relaxed),
        }
    }
}

//! The flush at a stop: the bytes left in the pool were paid for, so when the service stops
//! (SIGTERM, the end of `once`) they are injected into the targets still seeding instead of
//! being wiped unused — within `[pool] flush_timeout`, in calls of at most [`FLUSH_CHUNK`]
//! (or the target's seed limit, if smaller) so that concurrent targets share them.
//!
//! Every loop that flushes first waits until no loop is still doing its rounds (a fast `once`
//! target must not take the bytes a slow one still needs for its round); then the pool stops
//! buying, lets a purchase already in flight land, and hands out what it holds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::worker::Worker;
use super::TargetOutcome;
use crate::pool::Pool;
use crate::source::EntropySource;
use crate::telemetry::metrics::Metrics;

/// Most bytes one flush call injects, unless the target's rounds are larger: small enough
/// that several targets share what is left, large enough that a few calls empty the pool.
pub const FLUSH_CHUNK: usize = 1024;

/// Counts the loops still doing their rounds.
#[derive(Debug, Default)]
pub struct RoundsGate {
    in_rounds: AtomicUsize,
    changed: tokio::sync::Notify,
}

impl RoundsGate {
    /// A loop starts its rounds (counted from when it is spawned).
    pub fn enter(&self) {
        self.in_rounds.fetch_add(1, Ordering::SeqCst);
    }

    /// A loop is done with its rounds.
    pub fn leave(&self) {
        self.in_rounds.fetch_sub(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Waits until no loop does rounds; `false` if `deadline` came first.
    async fn all_done(&self, deadline: Instant) -> bool {
        loop {
            let changed = self.changed.notified();
            if self.in_rounds.load(Ordering::SeqCst) == 0 {
                return true;
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}

/// Injects what is left in the pool into this loop's target until the pool is empty, a call
/// fails, or `pool.flush_timeout` has passed. The bytes of a failed call are wiped, as in a
/// round.
pub async fn flush_leftover<S: EntropySource>(
    worker: &mut Worker,
    pool: &Arc<Pool<S>>,
    gate: &RoundsGate,
    size: usize,
    metrics: &Metrics,
    outcome: &mut TargetOutcome,
) {
    let budget = pool.flush_timeout();
    if budget.is_zero() {
        return;
    }
    let deadline = Instant::now() + budget;
    if !gate.all_done(deadline).await {
        return;
    }
    pool.close();
    pool.settle_purchases(deadline).await;
    let name = outcome.name.clone();
    // The stop is already cancelled; the deadline bounds these calls instead.
    let unstoppable = CancellationToken::new();
    let limit = match worker
        .call("max_seed", budget, &unstoppable, |t| Ok(t.max_seed()))
        .await
    {
        Ok(limit) => limit,
        Err(_) => return,
    };
    let chunk = size
        .max(FLUSH_CHUNK)
        .min(limit.unwrap_or(usize::MAX))
        .max(1);
    let source = pool.source().describe();
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let Some((bytes, requests)) = pool.take_leftover(chunk) else {
            break;
        };
        let len = bytes.len();
        let seeded = worker
            .call("C_SeedRandom", deadline - now, &unstoppable, move |t| {
                t.connect()?;
                t.seed(&bytes)
            })
            .await;
        match seeded {
            Ok(token) => {
                outcome.bytes_flushed += len as u64;
                metrics.flushed(&name, len as u64);
                super::audit(
                    super::Injected::Flush,
                    &name,
                    &token,
                    len,
                    &source,
                    &requests,
                );
            }
            Err(e) => {
                tracing::warn!("{name}: the flush at the stop ended: {e}");
                break;
            }
        }
    }
}

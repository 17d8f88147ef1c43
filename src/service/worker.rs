//! Runs a target's PKCS#11 calls on a blocking thread with a bounded wait.
//!
//! A PKCS#11 call can hang (a network HSM that stops answering). The target's loop must not
//! hang with it: after the target's `timeout` the call is reported as hung and left running on
//! its thread; the target skips its rounds until the call returns, then carries on with its
//! session. Shutdown waits for a running call only for a grace period.
//!
//! Calls are queued ([`lanes`]) for the runtime's blocking threads, at most
//! [`BLOCKING_THREADS`] of them (so hundreds of targets do not hold hundreds of threads), and a
//! thread takes queued calls one after another. A hung call keeps its thread; a caller waiting
//! behind a stalled call has it taken by another thread; once half of them are held by hung
//! calls, new threads are threads of their own, so that hung calls never hold up the other
//! targets.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::lanes;
use crate::hsm::{HsmError, Target};

/// Why a call gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Hsm(#[from] HsmError),
    #[error(
        "{call} has not returned after {}s; the HSM or its client is not answering. \
         This target skips its rounds until the call returns",
        .waited.as_secs()
    )]
    Hung {
        call: &'static str,
        waited: Duration,
    },
    #[error("the PKCS#11 thread failed")]
    Lost,
    #[error("stopping")]
    Cancelled,
}

/// Most blocking threads of the runtime (see the module documentation).
pub const BLOCKING_THREADS: usize = 32;

/// Calls declared hung whose threads have not come back.
static HUNG_CALLS: AtomicUsize = AtomicUsize::new(0);

const RUNNING: u8 = 0;
const HUNG: u8 = 1;
const DONE: u8 = 2;

/// Queues `job` for a blocking thread (see [`lanes`]).
fn run_blocking(job: impl FnOnce() + Send + 'static) {
    lanes::LANES.submit(Box::new(job), start_drainer);
}

/// Starts a drainer on a blocking thread of the runtime, or on a thread of its own while hung
/// calls hold half of those.
fn start_drainer(drain: Box<dyn FnOnce() + Send + 'static>) {
    let drain = Arc::new(std::sync::Mutex::new(Some(drain)));
    let take = |drain: &std::sync::Mutex<Option<_>>| {
        drain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    };
    if HUNG_CALLS.load(Ordering::Relaxed) >= BLOCKING_THREADS / 2 {
        let own = drain.clone();
        let spawned = std::thread::Builder::new()
            .name("qseed-pkcs11".into())
            .spawn(move || {
                if let Some(drain) = take(&own) {
                    drain();
                }
            });
        if spawned.is_ok() {
            return;
        }
        tracing::warn!("cannot start a thread for PKCS#11 calls; they wait for a free one");
    }
    tokio::task::spawn_blocking(move || {
        if let Some(drain) = take(&drain) {
            drain();
        }
    });
}

/// Owns a target, or, while a call runs, the thread that has it.
#[derive(Debug)]
pub struct Worker {
    target: Option<Target>,
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    call: &'static str,
    since: Instant,
    /// The target, handed back when the call returns.
    target: oneshot::Receiver<Target>,
    /// RUNNING, HUNG (counted in [`HUNG_CALLS`]) or DONE.
    state: Arc<AtomicU8>,
}

impl Running {
    fn is_finished(&self) -> bool {
        self.state.load(Ordering::SeqCst) == DONE
    }

    /// Counts the call as hung (once) until its thread comes back.
    fn mark_hung(&self) {
        if self
            .state
            .compare_exchange(RUNNING, HUNG, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            HUNG_CALLS.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Worker {
    pub fn new(target: Target) -> Self {
        Self {
            target: Some(target),
            running: None,
        }
    }

    /// Runs `f` on a blocking thread; waits at most `timeout`, or until `stop` is cancelled.
    pub async fn call<T: Send + 'static>(
        &mut self,
        name: &'static str,
        timeout: Duration,
        stop: &tokio_util::sync::CancellationToken,
        f: impl FnOnce(&mut Target) -> Result<T, HsmError> + Send + 'static,
    ) -> Result<T, CallError> {
        self.reclaim().await?;
        let Some(mut target) = self.target.take() else {
            return Err(CallError::Lost);
        };
        let (tx, mut rx) = oneshot::channel();
        let (target_tx, target_rx) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(RUNNING));
        let job_state = state.clone();
        run_blocking(move || {
            let result = f(&mut target);
            if job_state.swap(DONE, Ordering::SeqCst) == HUNG {
                HUNG_CALLS.fetch_sub(1, Ordering::SeqCst);
            }
            let _ = tx.send(result);
            let _ = target_tx.send(target);
        });
        let since = Instant::now();
        self.running = Some(Running {
            call: name,
            since,
            target: target_rx,
            state,
        });
        let deadline = since + timeout;
        // One timer for both the kicks and the deadline: a call costs one timer-wheel entry.
        let tick = tokio::time::sleep_until((since + lanes::STALL).min(deadline));
        tokio::pin!(tick);
        let result = loop {
            tokio::select! {
                biased;
                r = &mut rx => break r.ok(),
                _ = stop.cancelled() => break None,
                _ = &mut tick => {
                    let now = Instant::now();
                    if now >= deadline {
                        break None;
                    }
                    // Queued behind a call that stalled: another thread takes this one.
                    lanes::LANES.kick(start_drainer);
                    tick.as_mut().reset((now + lanes::STALL).min(deadline));
                }
            }
        };
        match result {
            Some(r) => {
                // The thread hands the target back right after the result.
                let running = self.running.take().ok_or(CallError::Lost)?;
                self.target = Some(running.target.await.map_err(|_| CallError::Lost)?);
                r.map_err(CallError::Hsm)
            }
            None if stop.is_cancelled() => Err(CallError::Cancelled),
            None => {
                if let Some(running) = &self.running {
                    running.mark_hung();
                }
                Err(CallError::Hung {
                    call: name,
                    waited: since.elapsed(),
                })
            }
        }
    }

    /// Whether the target is here (no call running) with a session open.
    pub fn is_connected(&self) -> bool {
        self.running.is_none() && self.target.as_ref().is_some_and(Target::is_connected)
    }

    /// Takes the target back from a finished call; `Hung` while the call still runs.
    async fn reclaim(&mut self) -> Result<(), CallError> {
        let Some(running) = &mut self.running else {
            return Ok(());
        };
        if !running.is_finished() {
            return Err(CallError::Hung {
                call: running.call,
                waited: running.since.elapsed(),
            });
        }
        let running = self.running.take().ok_or(CallError::Lost)?;
        match running.target.await {
            Ok(target) => {
                self.target = Some(target);
                Ok(())
            }
            Err(_) => Err(CallError::Lost),
        }
    }

    /// Waits up to `grace` for a running call to end; returns the target when it is free.
    pub async fn finish(mut self, grace: Duration) -> Option<Target> {
        if let Some(running) = self.running.take() {
            match tokio::time::timeout(grace, running.target).await {
                Ok(Ok(target)) => self.target = Some(target),
                _ => return None,
            }
        }
        self.target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn with_half_the_threads_held_by_hung_calls_a_drainer_gets_a_thread_of_its_own() {
        let thread_name = || std::thread::current().name().map(str::to_string);
        let (tx, rx) = oneshot::channel();
        start_drainer(Box::new(move || {
            let _ = tx.send(thread_name());
        }));
        assert_ne!(rx.await.unwrap().as_deref(), Some("qseed-pkcs11"));
        HUNG_CALLS.fetch_add(BLOCKING_THREADS / 2, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        start_drainer(Box::new(move || {
            let _ = tx.send(thread_name());
        }));
        let name = rx.await.unwrap();
        HUNG_CALLS.fetch_sub(BLOCKING_THREADS / 2, Ordering::SeqCst);
        assert_eq!(name.as_deref(), Some("qseed-pkcs11"));
    }
}

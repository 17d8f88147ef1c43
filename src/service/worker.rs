//! Runs a target's PKCS#11 calls on a blocking thread with a bounded wait.
//!
//! A PKCS#11 call can hang (a network HSM that stops answering). The target's loop must not
//! hang with it: after the target's `timeout` the call is reported as hung and left running on
//! its thread; the target skips its rounds until the call returns, then carries on with its
//! session. Shutdown waits for a running call only for a grace period.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

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
    thread: JoinHandle<Target>,
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
        let thread = tokio::task::spawn_blocking(move || {
            let _ = tx.send(f(&mut target));
            target
        });
        let since = Instant::now();
        self.running = Some(Running {
            call: name,
            since,
            thread,
        });
        let result = tokio::select! {
            biased;
            r = &mut rx => r.ok(),
            _ = tokio::time::sleep(timeout) => None,
            _ = stop.cancelled() => None,
        };
        match result {
            Some(r) => {
                // The thread hands the target back right after the result.
                let running = self.running.take().ok_or(CallError::Lost)?;
                self.target = Some(running.thread.await.map_err(|_| CallError::Lost)?);
                r.map_err(CallError::Hsm)
            }
            None if stop.is_cancelled() => Err(CallError::Cancelled),
            None => Err(CallError::Hung {
                call: name,
                waited: since.elapsed(),
            }),
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
        if !running.thread.is_finished() {
            return Err(CallError::Hung {
                call: running.call,
                waited: running.since.elapsed(),
            });
        }
        let running = self.running.take().ok_or(CallError::Lost)?;
        match running.thread.await {
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
            match tokio::time::timeout(grace, running.thread).await {
                Ok(Ok(target)) => self.target = Some(target),
                _ => return None,
            }
        }
        self.target
    }
}

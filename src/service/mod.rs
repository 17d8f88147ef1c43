//! The service: one loop per target that seeds it at start and then once per period, all
//! drawing from one shared pool, until the rounds are done or shutdown is signalled.
//!
//! A target's failure is its own: it is logged, and the target tries again next period,
//! except for failures that cannot heal (wrong PIN, a token that refuses seeds), which stop
//! that target for good. Other targets carry on either way.

pub mod shutdown;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::TargetConfig;
use crate::pool::{DemandId, EntropyBytes, Pool, StatsSnapshot};
use crate::source::{EntropySource, SourceError};
use crate::target::{HsmError, Modules, Target, TokenIdentity};
use crate::telemetry::AUDIT;

/// How many rounds each target runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounds {
    /// Until shutdown (`qseed run`).
    Forever,
    /// This many, then stop (`qseed once` is 1).
    Limit(u32),
}

/// What happened to one target.
#[derive(Debug, Clone, Default)]
pub struct TargetOutcome {
    pub name: String,
    pub injections: u64,
    pub bytes_injected: u64,
    pub failures: u64,
    /// Why the target stopped for good, if it did.
    pub stopped: Option<String>,
    pub last_error: Option<String>,
}

/// What a whole service run did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub targets: Vec<TargetOutcome>,
    pub pool: StatsSnapshot,
    /// Bytes bought but not injected, wiped at the end.
    pub bytes_left_unused: u64,
}

impl Outcome {
    pub fn all_seeded_every_round(&self) -> bool {
        self.targets
            .iter()
            .all(|t| t.failures == 0 && t.stopped.is_none() && t.injections > 0)
    }
}

/// Loads every target's module once, before the first round, so that a wrong path is
/// reported as a configuration error at start and not as a failing round later.
pub async fn load_modules(targets: &[TargetConfig], modules: &Modules) -> Result<(), HsmError> {
    let paths: Vec<_> = targets.iter().map(|t| t.module.clone()).collect();
    let modules = modules.clone();
    tokio::task::spawn_blocking(move || {
        for path in paths {
            modules.get(&path)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| HsmError::Unexpected(format!("module loading thread failed: {e}")))?
}

/// Runs the targets until `rounds` are done or `shutdown` is cancelled, then closes every
/// session, finalizes the modules and wipes what is left in the pool.
pub async fn run<S: EntropySource + 'static>(
    targets: Vec<TargetConfig>,
    pool: Arc<Pool<S>>,
    modules: Modules,
    rounds: Rounds,
    shutdown: CancellationToken,
) -> Outcome {
    let mut tasks = Vec::with_capacity(targets.len());
    for config in targets {
        let target = Target::new(config, modules.clone());
        tasks.push(tokio::spawn(target_loop(
            target,
            pool.clone(),
            rounds,
            shutdown.clone(),
        )));
    }
    let refill_stop = shutdown.child_token();
    let refiller = tokio::spawn({
        let pool = pool.clone();
        let stop = refill_stop.clone();
        async move { pool.refill_in_background(stop).await }
    });
    let mut outcome = Outcome::default();
    for task in tasks {
        match task.await {
            Ok(t) => outcome.targets.push(t),
            Err(e) => tracing::error!("a target loop ended abnormally: {e}"),
        }
    }
    refill_stop.cancel();
    let _ = refiller.await;
    let finalize = modules.clone();
    let _ = tokio::task::spawn_blocking(move || finalize.finalize_all()).await;
    outcome.pool = pool.stats();
    outcome.bytes_left_unused = pool.drain() as u64;
    outcome
}

async fn target_loop<S: EntropySource + 'static>(
    mut target: Target,
    pool: Arc<Pool<S>>,
    rounds: Rounds,
    shutdown: CancellationToken,
) -> TargetOutcome {
    let name = target.config().name.clone();
    let period = target.config().period;
    let offset = target.config().offset;
    let demand = pool.register(
        target.config().size,
        period,
        match rounds {
            Rounds::Forever => None,
            Rounds::Limit(n) => Some(u64::from(n)),
        },
    );
    let mut outcome = TargetOutcome {
        name: name.clone(),
        ..TargetOutcome::default()
    };
    let mut next = Instant::now() + offset;
    let mut done = 0u32;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
        }
        let (back, result) = round(target, &pool, demand, &shutdown).await;
        let Some(back) = back else {
            outcome.stopped = Some("its PKCS#11 thread failed".into());
            tracing::error!("{name}: target stopped: its PKCS#11 thread failed");
            pool.unregister(demand);
            return outcome;
        };
        target = back;
        match result {
            Ok((token, bytes)) => {
                outcome.injections += 1;
                outcome.bytes_injected += bytes as u64;
                tracing::info!(
                    target: AUDIT,
                    "seeded {name}: {bytes} bytes into token {:?} (serial {}, slot {})",
                    token.label,
                    token.serial,
                    token.slot
                );
            }
            Err(RoundError::Cancelled) => break,
            Err(RoundError::Source(e)) => {
                outcome.failures += 1;
                outcome.last_error = Some(e.to_string());
                tracing::warn!("{name}: round skipped, no entropy: {e}");
            }
            Err(RoundError::Hsm(e)) if e.is_permanent() => {
                outcome.failures += 1;
                outcome.last_error = Some(e.to_string());
                outcome.stopped = Some(e.to_string());
                tracing::error!("{name}: target stopped: {e}");
                break;
            }
            Err(RoundError::Hsm(e)) => {
                outcome.failures += 1;
                outcome.last_error = Some(e.to_string());
                tracing::warn!(
                    "{name}: round failed, trying again in {}: {e}",
                    human(period)
                );
            }
        }
        done += 1;
        if matches!(rounds, Rounds::Limit(n) if done >= n) {
            break;
        }
        next += period;
        // After a stall (a slow HSM, a suspended machine), skip the missed rounds.
        let now = Instant::now();
        if next < now {
            next = now + period;
        }
    }
    pool.unregister(demand);
    let _ = tokio::task::spawn_blocking(move || target.close()).await;
    outcome
}

enum RoundError {
    Source(SourceError),
    Hsm(HsmError),
    Cancelled,
}

/// One injection: connect first (so no bytes are taken for an unreachable token), then take
/// fresh bytes, then seed. The bytes are wiped when the blocking call returns, whatever it
/// returned: bytes that failed to go in are never offered to anyone else.
async fn round<S: EntropySource>(
    target: Target,
    pool: &Pool<S>,
    demand: DemandId,
    shutdown: &CancellationToken,
) -> (Option<Target>, Result<(TokenIdentity, usize), RoundError>) {
    let target = match blocking(target, |t| t.connect()).await {
        (Some(target), Ok(_)) => target,
        (target, Err(e)) => return (target, Err(RoundError::Hsm(e))),
        (None, Ok(_)) => return (None, Err(RoundError::Cancelled)),
    };
    let size = target.config().size;
    let bytes: EntropyBytes = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return (Some(target), Err(RoundError::Cancelled)),
        taken = pool.take(demand, size) => match taken {
            Ok(b) => b,
            Err(e) => return (Some(target), Err(RoundError::Source(e))),
        },
    };
    let (target, seeded) = blocking(target, move |t| t.seed(&bytes)).await;
    (
        target,
        seeded.map(|token| (token, size)).map_err(RoundError::Hsm),
    )
}

/// Runs `f` on a blocking thread with the target moved there and back. `None` if the thread
/// panicked (the target and its session are then gone).
async fn blocking<T: Send + 'static>(
    mut target: Target,
    f: impl FnOnce(&mut Target) -> Result<T, HsmError> + Send + 'static,
) -> (Option<Target>, Result<T, HsmError>) {
    match tokio::task::spawn_blocking(move || {
        let r = f(&mut target);
        (target, r)
    })
    .await
    {
        Ok((target, r)) => (Some(target), r),
        Err(e) => (
            None,
            Err(HsmError::Unexpected(format!("PKCS#11 thread failed: {e}"))),
        ),
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

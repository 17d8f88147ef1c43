//! The service: one loop per target that seeds it at start (after its `offset`) and then once
//! per period, all drawing from one shared pool, until the rounds are done or shutdown.
//!
//! A target's failure is its own: it is logged, and the target tries again next period,
//! except for failures that cannot heal (wrong PIN, a token that refuses seeds), which stop
//! that target for good. Other targets carry on either way. A PKCS#11 call that hangs is left
//! on its thread after the target's timeout (see [`worker`]).

pub mod flush;
mod lanes;
pub mod reload_report;
pub mod seeded;
pub mod shutdown;
mod standing;
pub mod worker;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::TargetConfig;
use crate::hsm::{HsmError, Modules, PinGuard, Target, TokenIdentity};
use crate::pool::{DemandId, EntropyBytes, Pool, StatsSnapshot};
use crate::repeat::{self, FailureRun, Report};
use crate::source::{EntropySource, SourceError};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::AUDIT;
use standing::{Ended, Step};
use worker::{CallError, Worker};

/// The first look for a token that went away (see `target_loop`), doubling up to
/// [`TOKEN_AWAY_MAX`] (never more than the target's period).
const TOKEN_AWAY_FIRST: Duration = Duration::from_secs(1);
const TOKEN_AWAY_MAX: Duration = Duration::from_secs(60);

/// How long shutdown waits for an in-flight PKCS#11 call before leaving it behind.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);
/// How long the teardown waits for a call still inside a module before it leaves that module
/// unfinalized.
const FINALIZE_GRACE: Duration = Duration::from_millis(250);

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
    /// Bytes left in the pool at the stop and injected then (see [`flush`]).
    pub bytes_flushed: u64,
    pub failures: u64,
    /// Of `failures`, rounds skipped for want of entropy.
    pub source_failures: u64,
    /// Why the target stopped for good, if it did.
    pub stopped: Option<String>,
    pub last_error: Option<String>,
    /// The loop was ended by a reload that changed or removed its target.
    pub superseded: bool,
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
/// reported as a configuration error at start and not as a failing round later. A module that
/// loads but cannot initialize now (`C_Initialize` refused: its server or device is down) is
/// no configuration error: it is said, and its targets are down and look for it again on
/// their own schedule (see `target_loop`) while the other targets seed.
pub async fn load_modules(targets: &[TargetConfig], modules: &Modules) -> Result<(), HsmError> {
    let mut paths: Vec<_> = targets
        .iter()
        .filter(|t| t.kind == crate::config::TargetKind::Pkcs11)
        .map(|t| (t.module.clone(), t.init_args.clone()))
        .collect();
    paths.dedup();
    let modules = modules.clone();
    tokio::task::spawn_blocking(move || {
        for (path, init_args) in paths {
            match modules.get(&path, init_args.as_deref()) {
                Ok(_) => {}
                // Refused arguments are the configuration's (init_args), not a server down.
                Err(e @ HsmError::InitializeRefused { .. })
                    if !matches!(&e, HsmError::InitializeRefused { code, .. } if code == "CKR_ARGUMENTS_BAD") =>
                {
                    tracing::warn!(
                        "{e}; its targets are down until it initializes (tried again from 1 s \
                         on, then on a backoff up to a minute); the other targets seed"
                    )
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| HsmError::Unexpected(format!("module loading thread failed: {e}")))?
}

/// Runs `targets` until `rounds` are done or `stop` is cancelled; sessions are closed at the
/// end, but modules and pool stay for [`teardown`].
pub async fn run<S: EntropySource + 'static>(
    targets: Vec<TargetConfig>,
    pool: Arc<Pool<S>>,
    modules: Modules,
    guard: PinGuard,
    rounds: Rounds,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) -> Vec<TargetOutcome> {
    let mut service = Service::start(pool, modules, guard, rounds, stop, metrics);
    service.apply(targets).await;
    service.finish().await
}

/// The running target loops, changed in place by reloads.
///
/// Each target's loop is keyed by its name. [`Service::apply`] compares a new set of targets
/// with the running one: a target whose settings did not change keeps its loop, its session
/// and its schedule (a reload never re-seeds it ahead of its period, nor logs in again);
/// changed and removed targets are stopped, and their loops awaited, before changed and new
/// ones start, so no token is ever seeded from two loops at once.
#[derive(Debug)]
pub struct Service<S: EntropySource + 'static> {
    pool: Arc<Pool<S>>,
    modules: Modules,
    guard: PinGuard,
    metrics: Arc<Metrics>,
    rounds: Rounds,
    /// Cancelled at shutdown; every loop watches a child of it.
    stop: CancellationToken,
    refill_stop: CancellationToken,
    refiller: Option<tokio::task::JoinHandle<()>>,
    running: HashMap<String, Running>,
    next_id: u64,
    /// Loops report here when they end, with the id they were started with.
    finished_tx: mpsc::UnboundedSender<(u64, TargetOutcome)>,
    finished_rx: mpsc::UnboundedReceiver<(u64, TargetOutcome)>,
    /// Every loop that has ended, this run (reloads included), in the order they ended.
    ended: Vec<TargetOutcome>,
    /// Targets whose loop ended on its own (stopped for good, or its rounds done).
    ended_names: HashSet<String>,
    /// Loops still doing rounds; the flush at the stop waits for them.
    gate: Arc<flush::RoundsGate>,
    /// `[audit] sign_with`: the target whose loop signs the ledger's head.
    signing: Option<crate::config::AuditSigning>,
}

#[derive(Debug)]
struct Running {
    id: u64,
    config: TargetConfig,
    cancel: CancellationToken,
}

/// What [`Service::apply`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub kept: Vec<String>,
    pub restarted: Vec<String>,
    pub started: Vec<String>,
    /// Targets that had stopped for good and are tried again (a PIN still goes through the
    /// PIN guard, so a refused PIN is not presented again).
    pub retried: Vec<String>,
    pub removed: Vec<String>,
}

impl<S: EntropySource + 'static> Service<S> {
    /// A service with no target yet; the pool's background refill starts now.
    pub fn start(
        pool: Arc<Pool<S>>,
        modules: Modules,
        guard: PinGuard,
        rounds: Rounds,
        stop: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Self {
        let refill_stop = stop.child_token();
        let refiller = tokio::spawn({
            let pool = pool.clone();
            let stop = refill_stop.clone();
            async move { pool.refill_in_background(stop).await }
        });
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        Self {
            pool,
            modules,
            guard,
            metrics,
            rounds,
            stop,
            refill_stop,
            refiller: Some(refiller),
            running: HashMap::new(),
            next_id: 0,
            finished_tx,
            finished_rx,
            ended: Vec::new(),
            ended_names: HashSet::new(),
            gate: Arc::default(),
            signing: None,
        }
    }

    /// Which target signs the audit ledger's head, for loops started from now on (a reload
    /// that changes it restarts nothing by itself).
    pub fn set_signing(&mut self, signing: Option<crate::config::AuditSigning>) {
        self.signing = signing;
    }

    /// Makes `targets` the running set (see [`Service`]).
    pub async fn apply(&mut self, targets: Vec<TargetConfig>) -> Applied {
        let mut applied = Applied::default();
        // Loops that ended since last asked are not running: a reload tries them again.
        while let Ok((id, outcome)) = self.finished_rx.try_recv() {
            self.settle(id, outcome);
        }
        let wanted: HashSet<String> = targets.iter().map(|t| t.name.clone()).collect();
        // Stop what goes away or changes, and wait for those loops to end.
        let mut stopping = HashSet::new();
        self.ended_names.retain(|name| wanted.contains(name));
        for (name, running) in &self.running {
            let unchanged = targets
                .iter()
                .any(|t| &t.name == name && t.same_settings(&running.config));
            if !unchanged {
                running.cancel.cancel();
                stopping.insert(running.id);
                if wanted.contains(name) {
                    applied.restarted.push(name.clone());
                } else {
                    applied.removed.push(name.clone());
                    self.metrics.forget_target(name);
                    self.modules.release(name);
                }
            }
        }
        while !stopping.is_empty() {
            let Some((id, mut outcome)) = self.finished_rx.recv().await else {
                break;
            };
            stopping.remove(&id);
            outcome.superseded = true;
            self.settle(id, outcome);
        }
        for config in targets {
            if self.running.contains_key(&config.name) {
                applied.kept.push(config.name.clone());
                continue;
            }
            if self.ended_names.remove(&config.name) {
                applied.retried.push(config.name.clone());
            } else if !applied.restarted.contains(&config.name) {
                applied.started.push(config.name.clone());
            }
            self.spawn(config);
        }
        applied
    }

    /// Loops still running.
    pub fn live(&self) -> usize {
        self.running.len()
    }

    /// Waits for the next loop to end on its own (its rounds are done, or it stopped for
    /// good); pending forever while none is running.
    pub async fn next_finished(&mut self) -> TargetOutcome {
        if self.running.is_empty() {
            return std::future::pending().await;
        }
        loop {
            let Some((id, outcome)) = self.finished_rx.recv().await else {
                return std::future::pending().await;
            };
            let settled = outcome.clone();
            if self.settle(id, outcome) {
                return settled;
            }
        }
    }

    /// Waits for every loop to end (cancel the service's `stop` first for an open-ended run),
    /// stops the refill, and returns every loop's outcome.
    pub async fn finish(mut self) -> Vec<TargetOutcome> {
        while !self.running.is_empty() {
            let Some((id, outcome)) = self.finished_rx.recv().await else {
                break;
            };
            self.settle(id, outcome);
        }
        self.refill_stop.cancel();
        if let Some(refiller) = self.refiller.take() {
            let _ = refiller.await;
        }
        self.ended
    }

    fn spawn(&mut self, config: TargetConfig) {
        self.next_id += 1;
        let id = self.next_id;
        let cancel = self.stop.child_token();
        let target = Target::new(config.clone(), self.modules.clone(), self.guard.clone());
        self.gate.enter();
        let signing = self
            .signing
            .clone()
            .filter(|s| s.target == config.name && self.rounds == Rounds::Forever);
        let loop_task = target_loop(
            target,
            signing,
            self.pool.clone(),
            self.rounds,
            Stops {
                target: cancel.clone(),
                service: self.stop.clone(),
                gate: self.gate.clone(),
            },
            self.metrics.clone(),
        );
        let finished = self.finished_tx.clone();
        let name = config.name.clone();
        tokio::spawn(async move {
            // A loop that panicked still reports, so that nobody waits for it forever.
            let outcome = tokio::spawn(loop_task).await.unwrap_or_else(|e| {
                tracing::error!("{name}: the target loop ended abnormally: {e}");
                TargetOutcome {
                    name,
                    stopped: Some("its loop failed".into()),
                    ..TargetOutcome::default()
                }
            });
            let _ = finished.send((id, outcome));
        });
        self.running
            .insert(config.name.clone(), Running { id, config, cancel });
    }

    /// Files a finished loop's outcome; `true` if it was a running loop.
    fn settle(&mut self, id: u64, outcome: TargetOutcome) -> bool {
        let current = self
            .running
            .get(&outcome.name)
            .is_some_and(|running| running.id == id);
        if current {
            self.running.remove(&outcome.name);
            // A loop a reload ended is restarted by that reload, not "tried again".
            if !outcome.superseded {
                self.ended_names.insert(outcome.name.clone());
            }
        }
        self.ended.push(outcome);
        current
    }
}

/// Finalizes the modules (except one with a call still inside after a short grace:
/// `C_Finalize` must not run while another thread is inside the module) and wipes what is left
/// in the pool.
pub async fn teardown<S: EntropySource>(
    targets: Vec<TargetOutcome>,
    pool: &Pool<S>,
    modules: &Modules,
) -> Outcome {
    let finalize = modules.clone();
    // The loops waited their grace for their calls already: this only covers a call that is
    // returning right now.
    let _ = tokio::task::spawn_blocking(move || finalize.finalize_all(FINALIZE_GRACE)).await;
    let pool_stats = pool.stats();
    Outcome {
        targets,
        pool: pool_stats,
        bytes_left_unused: pool.drain() as u64,
    }
}

/// How a target loop learns that it must end, and whether the whole service ends with it.
struct Stops {
    /// This loop's own stop (a child of `service`: a reload cancels it alone).
    target: CancellationToken,
    service: CancellationToken,
    gate: Arc<flush::RoundsGate>,
}

async fn target_loop<S: EntropySource + 'static>(
    target: Target,
    signing: Option<crate::config::AuditSigning>,
    pool: Arc<Pool<S>>,
    rounds: Rounds,
    stops: Stops,
    metrics: Arc<Metrics>,
) -> TargetOutcome {
    let stop = stops.target.clone();
    let config = target.config();
    let (name, period, offset, size) = (
        config.name.clone(),
        config.period,
        config.offset,
        config.size,
    );
    let timeout = config.timeout;
    let demand = pool.register_after(
        size,
        period,
        match rounds {
            Rounds::Forever => None,
            Rounds::Limit(n) => Some(u64::from(n)),
        },
        offset,
    );
    let source = pool.source().describe();
    metrics.target_started(&name, period);
    let mut worker = Worker::new(target);
    let mut outcome = TargetOutcome {
        name: name.clone(),
        ..TargetOutcome::default()
    };
    let late = LateSeeds {
        name: name.clone(),
        source: source.clone(),
        metrics: metrics.clone(),
        injections: Arc::default(),
        bytes: Arc::default(),
        audit_line: Arc::default(),
    };
    let mut next = Instant::now() + offset;
    let mut done = 0u32;
    let mut failing = FailureRun::default();
    // After a round that found no entropy, the next purchase (the background refill retries
    // on the backoff schedule) is a reason to try again before the period is up; such a
    // round leaves the schedule as it was.
    // The period a failed round is tried again after; none when this round is the last.
    let again = match rounds {
        Rounds::Forever => Some(period),
        Rounds::Limit(n) if n > 1 => Some(period),
        Rounds::Limit(_) => None,
    };
    let mut refills = pool.watch_refills();
    let mut starved = false;
    // While the token is away (its session lost: a device removed, a server restarted), it is
    // looked for again on a backoff of its own, so that it is seeded as soon as it is back,
    // not a whole period later. Looking costs no entropy: a round that has no session opens
    // one before it takes bytes.
    let mut away: Option<(Duration, Instant)> = None;
    let mut last_signed: Option<Instant> = None;
    // The rounds of a target that seeds steadily are run by its module's timer thread (see
    // `standing`); the loop takes over for any round that is not a plain success.
    let standing_round = steady_round(pool.clone(), demand, size, late.clone());
    let mut steady = false;
    loop {
        let stand = steady
            && rounds == Rounds::Forever
            && away.is_none()
            && worker.can_stand()
            && worker.is_connected();
        let (result, early) = if stand {
            // A signing target's order hands back the round after which the head is due to be
            // signed: the loop runs that round and signs (a call of its own on the token).
            let sign_after = signing
                .as_ref()
                .map(|signing| last_signed.map_or(next, |at| at + signing.every));
            let ended = worker
                .standing(
                    next,
                    period,
                    sign_after,
                    timeout,
                    &stop,
                    standing_round.clone(),
                )
                .await;
            let call = "C_SeedRandom";
            match ended {
                Err(CallError::Cancelled) | Ok(Ended::Cancelled) => break,
                Ok(Ended::Due { at }) => {
                    // No bytes at hand, or the head is due to be signed after this round: it
                    // is the loop's, now.
                    next = Instant::from_std(at);
                    steady = false;
                    continue;
                }
                Ok(Ended::Failed { at, error }) => {
                    next = Instant::from_std(at);
                    (Err(RoundError::Call(CallError::Hsm(error))), false)
                }
                Ok(Ended::Hung { at, waited }) => {
                    next = Instant::from_std(at);
                    (
                        Err(RoundError::Call(CallError::Hung { call, waited })),
                        false,
                    )
                }
                Ok(Ended::Panicked { at }) => {
                    next = Instant::from_std(at);
                    (Err(RoundError::Call(CallError::Panicked { call })), false)
                }
                Err(e) => (Err(RoundError::Call(e)), false),
            }
        } else {
            let early = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(next) => false,
                Ok(()) = refills.changed(), if starved => true,
                _ = tokio::time::sleep_until(away.map_or(next, |(_, at)| at)), if away.is_some() => true,
            };
            refills.mark_unchanged();
            let result = round(&mut worker, &pool, demand, size, timeout, &stop, &late).await;
            (result, early)
        };
        steady = result.is_ok();
        starved = matches!(result, Err(RoundError::Source(_)));
        let away_wait = match (&result, again) {
            (Err(RoundError::Call(CallError::Hsm(e))), Some(period))
                if !e.is_permanent() && !worker.is_connected() =>
            {
                Some(
                    away.map_or(TOKEN_AWAY_FIRST, |(wait, _)| (wait * 2).min(TOKEN_AWAY_MAX))
                        .min(period),
                )
            }
            _ => None,
        };
        match result {
            Ok((token, requests)) => {
                if let Some(recovery) = failing.succeeded(Instant::now()) {
                    tracing::info!(
                        target_name = %name,
                        "{name}: seeding again after {} of failures ({} round(s) failed)",
                        crate::units::short_duration(Duration::from_secs(
                            recovery.lasted.as_secs().max(1)
                        )),
                        recovery.failures
                    );
                }
                if outcome.injections == 0 {
                    pool.seed_accepted(demand);
                }
                outcome.injections += 1;
                outcome.bytes_injected += size as u64;
                metrics.injected(&name, size as u64);
                late.audit(Injected::Round, &token, size, &requests);
                if let Some(signing) = &signing {
                    if last_signed.is_none_or(|at: Instant| at.elapsed() >= signing.every) {
                        last_signed = Some(Instant::now());
                        sign_ledger_head(&mut worker, signing, &name, &token, timeout, &stop).await;
                    }
                }
            }
            Err(RoundError::Call(CallError::Cancelled)) => break,
            Err(RoundError::Source(e)) => {
                // The pool reports the outage itself, once; here only the count.
                outcome.failures += 1;
                outcome.source_failures += 1;
                outcome.last_error = Some(e.to_string());
                metrics.failed(&name, "source_error");
                pool.note_skipped_round();
                tracing::debug!("{name}: round skipped, no entropy: {e}");
            }
            Err(RoundError::Call(CallError::Hsm(e))) if e.is_permanent() => {
                outcome.failures += 1;
                outcome.last_error = Some(e.to_string());
                outcome.stopped = Some(e.to_string());
                // Stopped before counted: whoever waits for the first round (READY=1) sees
                // the stop with it.
                metrics.target_stopped(&name, e.reason(), &e.to_string());
                metrics.failed(&name, "hsm_error");
                tracing::error!(target_name = %name, reason = e.reason(), "{name}: target stopped: {e}");
                break;
            }
            Err(RoundError::Call(e @ (CallError::Lost | CallError::Panicked { .. }))) => {
                outcome.failures += 1;
                outcome.stopped = Some(e.to_string());
                metrics.target_stopped(&name, "thread_failed", &e.to_string());
                metrics.failed(&name, "hsm_error");
                tracing::error!(target_name = %name, "{name}: target stopped: {e}");
                break;
            }
            Err(RoundError::Call(e @ CallError::Hung { .. })) => {
                outcome.failures += 1;
                outcome.last_error = Some(e.to_string());
                metrics.failed(&name, "hsm_error");
                report_failure(&mut failing, &name, "hung", &e.to_string(), again, true);
            }
            Err(RoundError::Call(CallError::Hsm(e))) => {
                outcome.failures += 1;
                outcome.last_error = Some(e.to_string());
                metrics.failed(&name, "hsm_error");
                report_failure(
                    &mut failing,
                    &name,
                    e.reason(),
                    &e.to_string(),
                    again,
                    false,
                );
            }
        }
        done += 1;
        if matches!(rounds, Rounds::Limit(n) if done >= n) {
            break;
        }
        // A round out of schedule (bytes arrived, a look for a token that was away) leaves the
        // schedule as it was.
        if !early {
            next += period;
            // After a stall (a slow HSM, a suspended machine), skip the missed rounds.
            let now = Instant::now();
            if next < now {
                next = now + period;
            }
        }
        away = away_wait
            .map(|wait| (wait, Instant::now() + wait))
            .filter(|(_, at)| *at < next);
    }
    // The service ends (not only this loop): what the pool holds goes into the targets.
    let service_ends =
        stops.service.is_cancelled() || matches!(rounds, Rounds::Limit(n) if done >= n);
    stops.gate.leave();
    if service_ends && outcome.stopped.is_none() {
        flush::flush_leftover(
            &mut worker,
            &pool,
            &stops.gate,
            size,
            &metrics,
            &mut outcome,
        )
        .await;
    }
    pool.unregister(demand);
    // A call still inside the module keeps the target; the module knows, and is not
    // finalized under it.
    if let Some(mut target) = worker.finish(SHUTDOWN_GRACE).await {
        let _ = tokio::time::timeout(
            SHUTDOWN_GRACE,
            tokio::task::spawn_blocking(move || target.close()),
        )
        .await;
    }
    // Seeds booked off the loop: standing orders' rounds, and seeds given up on that went in
    // after all (one still running reports to the audit log and the metrics when it returns,
    // too late for this count).
    outcome.injections += late.injections.load(Ordering::SeqCst);
    outcome.bytes_injected += late.bytes.load(Ordering::SeqCst);
    outcome
}

/// Signs the audit ledger's head with the key in this target's token and appends the
/// signature to the ledger (see [`crate::telemetry::ledger`]); a failure is a warning and is
/// tried again at the next interval.
async fn sign_ledger_head(
    worker: &mut Worker,
    signing: &crate::config::AuditSigning,
    name: &str,
    token: &TokenIdentity,
    timeout: Duration,
    stop: &CancellationToken,
) {
    use crate::telemetry::ledger;
    let Some(head) = ledger::current_head() else {
        return;
    };
    let label = signing.key_label.clone();
    let message = head.clone();
    let signed = worker
        .call("C_Sign", timeout, stop, move |t| {
            t.sign_ecdsa(&label, message.as_bytes())
        })
        .await;
    match signed {
        Ok(signature) => {
            ledger::append(ledger::Record {
                time: ledger::now(),
                event: "signature".into(),
                target: name.to_string(),
                token_label: token.label.clone(),
                token_serial: token.serial.clone(),
                slot: token.slot.id(),
                bytes: 0,
                source: String::new(),
                request_ids: String::new(),
                simulated: false,
                pid: 0,
                prev: String::new(),
                signed_head: Some(head),
                signature: Some(hex::encode(signature)),
                key_label: Some(signing.key_label.clone()),
            });
            tracing::info!(
                target_name = %name,
                "signed the audit ledger's head with key {:?} on token {:?}",
                signing.key_label,
                token.label
            );
        }
        Err(e) => tracing::warn!(
            target_name = %name,
            "cannot sign the audit ledger's head with key {:?}: {e}; trying again in {}",
            signing.key_label,
            crate::units::short_duration(signing.every)
        ),
    }
}

/// Why bytes went into a token, for its audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// A round on the target's period.
    Round,
    /// The flush at a stop (see [`flush`]).
    Flush,
}

/// Logs a failed round as the failure run it belongs to (see [`FailureRun`]): a warning when
/// the failures start or change reason, again every `[service] log_repeat` while they go on
/// (the count is in `qseed_target_failures_total` meanwhile), debug lines in between.
fn report_failure(
    run: &mut FailureRun,
    name: &str,
    reason: &str,
    error: &str,
    period: Option<Duration>,
    hung: bool,
) {
    let every = repeat::log_repeat();
    // A bounded run (`once`) does not try again: it says only what happened.
    let Some(period) = period else {
        tracing::warn!(target_name = %name, reason, "{name}: round failed: {error}");
        return;
    };
    let next = crate::units::short_duration(period);
    match run.failed(reason, Instant::now(), every) {
        Report::Started | Report::Changed if hung => {
            tracing::error!(target_name = %name, reason, "{name}: {error}")
        }
        Report::Started => tracing::warn!(
            target_name = %name,
            reason,
            "{name}: round failed, trying again every {next}: {error}"
        ),
        Report::Changed => tracing::warn!(
            target_name = %name,
            reason,
            "{name}: still failing, now: {error}"
        ),
        Report::Repeated { since, failures } => tracing::warn!(
            target_name = %name,
            reason,
            "{name}: still failing after {} ({failures} rounds; next report in {}): {error}",
            crate::units::short_duration(Duration::from_secs(since.as_secs().max(1))),
            crate::units::short_duration(every)
        ),
        Report::Quiet => {
            tracing::debug!(target_name = %name, reason, "{name}: round failed: {error}")
        }
    }
}

/// The audit record of one injection: where the bytes went and which requests bought them,
/// never the bytes.
pub fn audit(
    why: Injected,
    name: &str,
    token: &Arc<TokenIdentity>,
    len: usize,
    source: &str,
    requests: &str,
) {
    AuditLine::new(why, name, token, len, source).record(requests);
}

/// What the audit records of one target's injections into one token say alike, formatted
/// once: each record then costs its time and request ids (see [`LateSeeds::audit`]).
struct AuditLine {
    why: Injected,
    name: String,
    token: Arc<TokenIdentity>,
    len: usize,
    source: String,
    event: &'static str,
    ledger: crate::telemetry::ledger::Subject,
    /// The log line's message up to the request ids.
    message: String,
}

impl AuditLine {
    fn new(
        why: Injected,
        name: &str,
        token: &Arc<TokenIdentity>,
        len: usize,
        source: &str,
    ) -> Self {
        let kernel = crate::hsm::is_kernel(token);
        let event = match why {
            Injected::Round if kernel => "kernel",
            Injected::Round => "injection",
            Injected::Flush => "flush",
        };
        let what = match why {
            Injected::Round => format!("seeded {name}: {len} bytes"),
            Injected::Flush => format!("flushed into {name}: {len} bytes left at the stop"),
        };
        let into = if kernel {
            "into the host kernel (RNDADDENTROPY)".to_string()
        } else {
            format!(
                "into token {:?} (serial {}, slot {})",
                token.label, token.serial, token.slot
            )
        };
        Self {
            why,
            name: name.to_string(),
            token: token.clone(),
            len,
            source: source.to_string(),
            event,
            ledger: crate::telemetry::ledger::Subject::new(event, name, token, len, source),
            message: format!("{what} {into} from "),
        }
    }

    /// Whether this line is the one of an injection `why` of `len` bytes into `token`.
    fn fits(&self, why: Injected, token: &Arc<TokenIdentity>, len: usize) -> bool {
        self.why == why
            && self.len == len
            && (Arc::ptr_eq(&self.token, token) || self.token == *token)
    }

    /// The ledger record and the log line of one injection, whose bytes `requests` bought.
    fn record(&self, requests: &str) {
        let simulated = crate::source::simulated_accepted();
        crate::telemetry::ledger::append_injection(&self.ledger, requests, simulated);
        self.with_message(requests, simulated, |message| {
            if !crate::telemetry::log_batch::audit_text(message) {
                self.trace(requests, simulated, message);
            }
        });
    }

    /// The log line's message, for `line`.
    fn with_message(
        &self,
        requests: &str,
        simulated: bool,
        line: impl FnOnce(std::fmt::Arguments<'_>),
    ) {
        let mark = if simulated {
            " (SIMULATED entropy: source.allow_simulated)"
        } else {
            ""
        };
        line(format_args!("{}{requests}{mark}", self.message))
    }

    /// The log line as a `tracing` event with its fields, for JSON lines and the journal (and
    /// text lines in colour).
    fn trace(&self, requests: &str, simulated: bool, message: std::fmt::Arguments<'_>) {
        let token = &self.token;
        tracing::info!(
            target: AUDIT,
            event = self.event,
            simulated,
            target_name = %self.name,
            token_label = %token.label,
            token_serial = %token.serial,
            slot = token.slot.id(),
            bytes = self.len,
            source = %self.source,
            request_ids = %requests,
            "{message}"
        );
    }
}

enum RoundError {
    Source(SourceError),
    Call(CallError),
}

/// Books seeds that went in off the target's loop: a standing order's rounds (see
/// `standing`), and seeds given up on (declared hung, or the service stopping) that returned
/// after all. Their bytes are audited and counted like any round's, never called wiped.
#[derive(Clone)]
struct LateSeeds {
    name: String,
    source: String,
    metrics: Arc<Metrics>,
    injections: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    /// The audit line of the target's last injection, for the next one into the same token.
    audit_line: Arc<Mutex<Option<Arc<AuditLine>>>>,
}

/// The round a standing order runs on the module's timer thread: a session check, bytes the
/// pool holds now (never a wait for a purchase: that round goes back to the loop), the seed
/// (the three in one pass through the module's gate), and its audit record. The bytes are
/// wiped when the round ends, whatever it did.
fn steady_round<S: EntropySource + 'static>(
    pool: Arc<Pool<S>>,
    demand: DemandId,
    size: usize,
    book: LateSeeds,
) -> standing::Round {
    Arc::new(move |target: &mut Target| {
        let failed = |e: HsmError| {
            pool.set_reachable(demand, !e.is_token_missing());
            Step::Failed(e)
        };
        let mut bought_by: Option<Arc<str>> = None;
        let take = || {
            let (bytes, requests) = pool.try_take(demand, size)?;
            bought_by = Some(requests);
            Some(bytes)
        };
        match target.seed_taken(take) {
            Ok(Some(token)) => {
                book.book(size, &token, bought_by.as_deref().unwrap_or_default());
                Step::Seeded
            }
            Ok(None) => Step::NoBytes,
            Err(e) => failed(e),
        }
    })
}

impl LateSeeds {
    /// One seed of `size` bytes, bought by `requests`, that went into `token`.
    fn book(&self, size: usize, token: &Arc<TokenIdentity>, requests: &str) {
        self.injections.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(size as u64, Ordering::SeqCst);
        self.metrics.injected(&self.name, size as u64);
        self.audit(Injected::Round, token, size, requests);
    }

    /// The audit record of one injection (as [`audit`]), its line formatted once for as long
    /// as the target seeds the same token with the same size.
    fn audit(&self, why: Injected, token: &Arc<TokenIdentity>, len: usize, requests: &str) {
        let line = {
            let mut last = self
                .audit_line
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match &*last {
                Some(line) if line.fits(why, token, len) => line.clone(),
                _ => last
                    .insert(Arc::new(AuditLine::new(
                        why,
                        &self.name,
                        token,
                        len,
                        &self.source,
                    )))
                    .clone(),
            }
        };
        line.record(requests);
    }

    /// The handler for one seed of `size` bytes bought by `requests`.
    fn handler(
        &self,
        size: usize,
        requests: Arc<str>,
    ) -> impl FnOnce(Result<Arc<TokenIdentity>, HsmError>) + Send + 'static {
        let late = self.clone();
        let called = Instant::now();
        move |result| {
            let name = &late.name;
            let after = called.elapsed().as_secs();
            match result {
                Ok(token) => {
                    tracing::warn!(
                        target_name = %name,
                        "{name}: the C_SeedRandom given up on returned after {after}s and \
                         succeeded: its {size} bytes are in the token"
                    );
                    late.book(size, &token, &requests);
                }
                Err(e) => tracing::warn!(
                    target_name = %name,
                    "{name}: the C_SeedRandom given up on returned after {after}s: {e}; its \
                     bytes were wiped"
                ),
            }
        }
    }
}

/// One injection: connect first (so no bytes are taken for an unreachable token), then take
/// fresh bytes, then seed. The bytes are wiped when the call returns, whatever it returned:
/// bytes that failed to go in are never offered to anyone else.
async fn round<S: EntropySource>(
    worker: &mut Worker,
    pool: &Arc<Pool<S>>,
    demand: DemandId,
    size: usize,
    timeout: Duration,
    stop: &CancellationToken,
    late: &LateSeeds,
) -> Result<(Arc<TokenIdentity>, Arc<str>), RoundError> {
    // The usual round: a session is open, so one hand-off to the blocking thread does it all
    // (`connect` is then a check). Should the session turn out dead, the bytes are wiped with
    // the failed call, as any failed call's are.
    if worker.is_connected() {
        let (bytes, requests): (EntropyBytes, Arc<str>) = tokio::select! {
            biased;
            _ = stop.cancelled() => return Err(RoundError::Call(CallError::Cancelled)),
            taken = pool.take_traced(demand, size) => taken.map_err(RoundError::Source)?,
        };
        let on_late = late.handler(size, requests.clone());
        let seeded = worker
            .call_with_late(
                "C_SeedRandom",
                timeout,
                stop,
                move |t| {
                    t.connect()?;
                    t.seed(&bytes)
                },
                on_late,
            )
            .await;
        pool.set_reachable(
            demand,
            !matches!(&seeded, Err(CallError::Hsm(e)) if e.is_token_missing()),
        );
        return seeded
            .map(|token| (token, requests))
            .map_err(RoundError::Call);
    }
    let connected = worker
        .call("C_OpenSession/C_Login", timeout, stop, |t| t.connect())
        .await;
    // A target that cannot reach its token must not drive purchases: its demand counts again
    // once it connects.
    pool.set_reachable(demand, connected.is_ok());
    connected.map_err(RoundError::Call)?;
    let (bytes, requests): (EntropyBytes, Arc<str>) = tokio::select! {
        biased;
        _ = stop.cancelled() => return Err(RoundError::Call(CallError::Cancelled)),
        taken = pool.take_traced(demand, size) => taken.map_err(RoundError::Source)?,
    };
    let on_late = late.handler(size, requests.clone());
    let token = worker
        .call_with_late(
            "C_SeedRandom",
            timeout,
            stop,
            move |t| t.seed(&bytes),
            on_late,
        )
        .await
        .map_err(RoundError::Call)?;
    Ok((token, requests))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// What a subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// `LogTimer` at a fixed instant.
    struct At(SystemTime);

    impl tracing_subscriber::fmt::time::FormatTime for At {
        fn format_time(
            &self,
            w: &mut tracing_subscriber::fmt::format::Writer<'_>,
        ) -> std::fmt::Result {
            crate::telemetry::clock::write(w, self.0, crate::telemetry::clock::Fraction::Micros)
        }
    }

    /// The audit line written without `tracing` is the text subscriber's line, byte for byte:
    /// plain names and ones with quotes, control characters and non-ASCII, a simulated source,
    /// a flush.
    #[test]
    fn an_audit_lines_direct_text_is_the_text_subscribers_line() {
        let time = UNIX_EPOCH + Duration::new(1_796_570_000, 123_456_789);
        let token = |label: &str, serial: &str, slot: u64| {
            Arc::new(TokenIdentity {
                label: label.into(),
                serial: serial.into(),
                ..TokenIdentity::for_tests(slot)
            })
        };
        let cases = [
            (
                Injected::Round,
                "hsm-1",
                token("tok", "abc", 1),
                "r7@cloud",
                false,
            ),
            (
                Injected::Round,
                "a \"quoted\" \\ name\u{1b}[31m",
                token("l\u{e9}bel\n\t\u{1}", "\u{7f}\u{2028}", u64::MAX),
                "r1@h\"x,r2",
                true,
            ),
            (
                Injected::Flush,
                "t9",
                token("tok", "abc", 3),
                "r1,r2",
                false,
            ),
        ];
        for (why, name, token, requests, simulated) in cases {
            let line = AuditLine::new(why, name, &token, 48, "https://x");
            let captured = Captured::default();
            let mut direct = String::new();
            line.with_message(requests, simulated, |message| {
                let subscriber =
                    crate::telemetry::logs::text_subscriber(captured.clone(), At(time), false);
                tracing::subscriber::with_default(subscriber, || {
                    line.trace(requests, simulated, message)
                });
                crate::telemetry::log_batch::plain_info_line(&mut direct, time, message);
            });
            let through_tracing = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
            assert!(
                through_tracing.contains(" INFO ") && through_tracing.contains(requests),
                "{through_tracing:?}"
            );
            assert_eq!(direct, through_tracing);
        }
    }
}

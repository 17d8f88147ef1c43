//! Runs a target's PKCS#11 calls on blocking threads with a bounded wait.
//!
//! A PKCS#11 call can hang (a network HSM that stops answering). The target's loop must not
//! hang with it: after the target's `timeout` the call is reported as hung and left running on
//! its thread; the target skips its rounds until the call returns, then carries on with its
//! session. A call given up on still reports when it returns: its result goes to the caller's
//! `late` handler (a seed that went in after all is audited and counted). A call that panics
//! is reported as such, never as hung. Shutdown waits for a running call only for a grace
//! period.
//!
//! Each module has threads of its own ([`ModuleThreads`]): calls are queued ([`lanes`]) for
//! that module's blocking threads, at most [`BLOCKING_THREADS`] of them (so hundreds of
//! targets do not hold hundreds of threads), and a thread takes queued calls one after
//! another. A slow or hung module holds only its own threads, never another module's, and
//! never the runtime's blocking threads that DNS lookups and device reads use. A hung call
//! keeps its thread; a caller waiting behind a stalled call has it taken by another thread;
//! once half of a module's threads are held by hung calls, new threads are threads of their
//! own, so that hung calls never hold up that module's other targets.
//!
//! A target that seeds steadily hands its rounds to the module's timer thread instead
//! ([`Worker::standing`], see `standing.rs`): no queue, no hand-off, one wake-up per
//! injection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::lanes::{self, Lanes};
use super::standing::{Ended, Order, OrderId, Round, Scheduler};
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
    #[error("{call} panicked inside qseed or the module (a bug: please report it)")]
    Panicked { call: &'static str },
    #[error("stopping")]
    Cancelled,
}

/// Most blocking threads of one module (see the module documentation).
pub const BLOCKING_THREADS: usize = 32;

/// How long an idle PKCS#11 thread waits for the next call before it ends.
const THREAD_KEEP_ALIVE: Duration = Duration::from_secs(10);

use super::standing::{DONE, HUNG, RUNNING};

/// A module's queue of calls and the threads that serve it.
pub struct ModuleThreads {
    lanes: Lanes,
    /// A runtime used only for its blocking pool (no driver, no tasks): the module's threads.
    pool: Option<tokio::runtime::Runtime>,
    /// Calls declared hung whose threads have not come back.
    hung: Arc<AtomicUsize>,
    /// Standing orders: steady rounds run by the module's timer thread (see `standing.rs`).
    scheduler: Scheduler,
}

impl std::fmt::Debug for ModuleThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleThreads")
            .field("hung", &self.hung)
            .finish_non_exhaustive()
    }
}

impl ModuleThreads {
    /// The threads of the module at `path` (one set per path, for the process's life).
    pub fn of(path: &Path) -> &'static ModuleThreads {
        static BY_MODULE: Mutex<Option<HashMap<PathBuf, &'static ModuleThreads>>> =
            Mutex::new(None);
        let mut by_module = BY_MODULE.lock().unwrap_or_else(PoisonError::into_inner);
        by_module
            .get_or_insert_with(HashMap::new)
            .entry(path.to_path_buf())
            .or_insert_with(|| {
                let pool = tokio::runtime::Builder::new_current_thread()
                    .thread_name("qseed-pkcs11")
                    .max_blocking_threads(BLOCKING_THREADS)
                    .thread_keep_alive(THREAD_KEEP_ALIVE)
                    .build()
                    .inspect_err(|e| {
                        tracing::warn!(
                            "cannot make a thread pool for {}: {e}; its calls get threads of \
                             their own",
                            path.display()
                        )
                    })
                    .ok();
                let hung = Arc::new(AtomicUsize::new(0));
                Box::leak(Box::new(ModuleThreads {
                    lanes: Lanes::new(),
                    pool,
                    scheduler: Scheduler::new(hung.clone()),
                    hung,
                }))
            })
    }

    /// Queues `job` (see [`lanes`]).
    fn submit(&'static self, job: impl FnOnce() + Send + 'static) {
        self.lanes
            .submit(Box::new(job), &|drain| self.start_drainer(drain));
    }

    fn kick(&'static self) {
        self.lanes.kick(&|drain| self.start_drainer(drain));
    }

    /// Starts a drainer on one of the module's pooled threads, or on a thread of its own
    /// while hung calls hold half of those.
    fn start_drainer(&self, drain: Box<dyn FnOnce() + Send + 'static>) {
        let drain = Arc::new(Mutex::new(Some(drain)));
        let take = |drain: &Mutex<Option<Box<dyn FnOnce() + Send + 'static>>>| {
            drain.lock().unwrap_or_else(PoisonError::into_inner).take()
        };
        if let Some(pool) = &self.pool {
            if self.hung.load(Ordering::Relaxed) < BLOCKING_THREADS / 2 {
                let pooled = drain.clone();
                pool.spawn_blocking(move || {
                    if let Some(drain) = take(&pooled) {
                        drain();
                    }
                });
                return;
            }
        }
        let own = drain.clone();
        let spawned = std::thread::Builder::new()
            .name("qseed-pkcs11-extra".into())
            .spawn(move || {
                if let Some(drain) = take(&own) {
                    drain();
                }
            });
        if spawned.is_err() {
            tracing::warn!("cannot start a thread for PKCS#11 calls; running this one here");
            if let Some(drain) = take(&drain) {
                drain();
            }
        }
    }
}

/// What a call's thread hands back.
enum Returned<T> {
    Value(Result<T, HsmError>),
    Panicked,
}

/// Owns a target, or, while a call runs, the thread that has it.
#[derive(Debug)]
pub struct Worker {
    target: Option<Target>,
    running: Option<Running>,
    threads: &'static ModuleThreads,
    /// The standing order that has the target, if any: cancelled should the worker go.
    order: Option<OrderId>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(order) = self.order.take() {
            self.threads.scheduler.cancel(order);
        }
    }
}

#[derive(Debug)]
struct Running {
    call: &'static str,
    since: Instant,
    /// The target, handed back when the call returns.
    target: oneshot::Receiver<Target>,
    /// RUNNING, HUNG (counted in its module's [`ModuleThreads`]) or DONE.
    state: Arc<AtomicU8>,
}

impl Running {
    fn is_finished(&self) -> bool {
        self.state.load(Ordering::SeqCst) == DONE
    }

    /// Counts the call as hung (once) until its thread comes back.
    fn mark_hung(&self, threads: &ModuleThreads) {
        if self
            .state
            .compare_exchange(RUNNING, HUNG, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            threads.hung.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Worker {
    pub fn new(target: Target) -> Self {
        let threads = ModuleThreads::of(&target.config().module);
        Self {
            target: Some(target),
            running: None,
            threads,
            order: None,
        }
    }

    /// Whether this target's module takes standing orders (see `standing.rs`).
    pub fn can_stand(&self) -> bool {
        self.threads.scheduler.available()
    }

    /// Hands the target to its module's timer thread, which runs `round` at `first` and then
    /// once per `period` until a round does anything but seed or is due at or after `until`
    /// (see `standing.rs`); returns why the order ended. `Err(Cancelled)` when `stop` ends it
    /// (the target comes back at once, or when its call returns).
    pub async fn standing(
        &mut self,
        first: Instant,
        period: Duration,
        until: Option<Instant>,
        timeout: Duration,
        stop: &tokio_util::sync::CancellationToken,
        round: Round,
    ) -> Result<Ended, CallError> {
        self.reclaim().await?;
        let Some(target) = self.target.take() else {
            return Err(CallError::Lost);
        };
        let (tell, mut told) = oneshot::channel();
        let (give_back, target_rx) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(RUNNING));
        let order = Order {
            first: first.into_std(),
            period,
            timeout,
            until: until.map(Instant::into_std),
            target,
            round,
            tell: Some(tell),
            give_back,
            state: state.clone(),
        };
        let id = match self.threads.scheduler.place(order) {
            Ok(id) => id,
            Err(order) => {
                self.target = Some(order.target);
                return Err(CallError::Hsm(HsmError::Unexpected(
                    "standing orders are not available here".into(),
                )));
            }
        };
        self.order = Some(id);
        self.running = Some(Running {
            call: "C_SeedRandom",
            since: Instant::now(),
            target: target_rx,
            state,
        });
        let ended = tokio::select! {
            biased;
            ended = &mut told => ended,
            _ = stop.cancelled() => {
                self.threads.scheduler.cancel(id);
                self.order = None;
                return Err(CallError::Cancelled);
            }
        };
        self.order = None;
        match ended {
            Ok(Ended::Hung { at, waited }) => {
                // The target stays with its call; `reclaim` takes it back when it returns.
                if let Some(running) = &mut self.running {
                    running.since = Instant::now().checked_sub(waited).unwrap_or(running.since);
                }
                Ok(Ended::Hung { at, waited })
            }
            Ok(ended) => {
                let running = self.running.take().ok_or(CallError::Lost)?;
                self.target = Some(running.target.await.map_err(|_| CallError::Lost)?);
                Ok(ended)
            }
            Err(_) => Err(CallError::Lost),
        }
    }

    /// Runs `f` on one of the module's threads; waits at most `timeout`, or until `stop` is
    /// cancelled. Should the call return after that, its result is only logged.
    pub async fn call<T: Send + 'static>(
        &mut self,
        name: &'static str,
        timeout: Duration,
        stop: &tokio_util::sync::CancellationToken,
        f: impl FnOnce(&mut Target) -> Result<T, HsmError> + Send + 'static,
    ) -> Result<T, CallError> {
        self.call_with_late(name, timeout, stop, f, move |late: Result<T, HsmError>| {
            if let Err(e) = late {
                tracing::debug!("{name}, given up on, returned: {e}");
            }
        })
        .await
    }

    /// [`Worker::call`], with `late` given the result of a call that returns after its caller
    /// gave up on it (hung, or the service stopping): on the call's thread, once.
    pub async fn call_with_late<T: Send + 'static>(
        &mut self,
        name: &'static str,
        timeout: Duration,
        stop: &tokio_util::sync::CancellationToken,
        f: impl FnOnce(&mut Target) -> Result<T, HsmError> + Send + 'static,
        late: impl FnOnce(Result<T, HsmError>) + Send + 'static,
    ) -> Result<T, CallError> {
        self.reclaim().await?;
        let Some(mut target) = self.target.take() else {
            return Err(CallError::Lost);
        };
        let (tx, mut rx) = oneshot::channel();
        let (target_tx, target_rx) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(RUNNING));
        let job_state = state.clone();
        let threads = self.threads;
        threads.submit(move || {
            let returned =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut target)));
            // Counted back before anything else: a call that panicked is not hung either.
            if job_state.swap(DONE, Ordering::SeqCst) == HUNG {
                threads.hung.fetch_sub(1, Ordering::SeqCst);
            }
            let returned = match returned {
                Ok(result) => Returned::Value(result),
                Err(_) => Returned::Panicked,
            };
            if let Err(Returned::Value(result)) = tx.send(returned) {
                // The caller gave up on it: the result still has to be told.
                late(result);
            }
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
        let mut result = loop {
            tokio::select! {
                biased;
                r = &mut rx => break Some(r),
                _ = stop.cancelled() => break None,
                _ = &mut tick => {
                    let now = Instant::now();
                    if now >= deadline {
                        break None;
                    }
                    // Queued behind a call that stalled: another thread takes this one.
                    threads.kick();
                    tick.as_mut().reset((now + lanes::STALL).min(deadline));
                }
            }
        };
        if result.is_none() {
            // Given up on. Closed first, then looked at once more: a result sent before the
            // close is this caller's; one sent after goes to `late`. None is lost between.
            rx.close();
            result = rx.try_recv().ok().map(Ok);
        }
        match result {
            Some(returned) => {
                // The thread hands the target back right after the result.
                let running = self.running.take().ok_or(CallError::Lost)?;
                self.target = Some(running.target.await.map_err(|_| CallError::Lost)?);
                match returned {
                    Ok(Returned::Value(r)) => r.map_err(CallError::Hsm),
                    Ok(Returned::Panicked) => Err(CallError::Panicked { call: name }),
                    Err(_) => Err(CallError::Lost),
                }
            }
            None if stop.is_cancelled() => Err(CallError::Cancelled),
            None => {
                if let Some(running) = &self.running {
                    running.mark_hung(threads);
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
        self.target.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TargetConfig, TargetKind, TokenSelector};
    use crate::service::standing;
    use tokio_util::sync::CancellationToken;

    /// A target whose calls here never reach a module (the jobs below do not touch it), with
    /// threads of its own (`module` names no file: only the thread set is keyed by it).
    fn worker(module: &str) -> Worker {
        let config = TargetConfig {
            name: "t".into(),
            kind: TargetKind::Kernel {
                credit: crate::kernel::Credit::None,
            },
            module: PathBuf::from(module),
            token: TokenSelector::Label("t".into()),
            login: None,
            size: 48,
            period: Duration::from_secs(1),
            offset: Duration::ZERO,
            timeout: Duration::from_secs(1),
            max_seed: None,
            init_args: None,
            check_output: false,
        };
        let guard =
            crate::hsm::PinGuard::new(&crate::state::StateDir::Memory { why: "test".into() });
        Worker::new(Target::new(config, crate::hsm::Modules::new(), guard))
    }

    #[tokio::test]
    async fn a_call_that_panics_is_a_panic_not_a_hang_and_the_worker_goes_on() {
        let mut worker = worker("/test/panics");
        let stop = CancellationToken::new();
        let r: Result<(), _> = worker
            .call("C_SeedRandom", Duration::from_secs(5), &stop, |_| {
                panic!("a module bug")
            })
            .await;
        assert!(matches!(r, Err(CallError::Panicked { .. })), "{r:?}");
        assert_eq!(worker.threads.hung.load(Ordering::SeqCst), 0);
        // The target came back with the answer: the next call runs.
        let r = worker
            .call("C_SeedRandom", Duration::from_secs(5), &stop, |_| Ok(7))
            .await;
        assert_eq!(r.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_hung_call_that_then_panics_is_no_longer_counted_hung() {
        let mut worker = worker("/test/hangs-then-panics");
        let stop = CancellationToken::new();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let r: Result<(), _> = worker
            .call(
                "C_SeedRandom",
                Duration::from_millis(100),
                &stop,
                move |_| {
                    let _ = wait.recv();
                    panic!("a module bug after a hang")
                },
            )
            .await;
        assert!(matches!(r, Err(CallError::Hung { .. })), "{r:?}");
        assert_eq!(worker.threads.hung.load(Ordering::SeqCst), 1);
        release.send(()).unwrap();
        let back = wait_for(|| worker.threads.hung.load(Ordering::SeqCst) == 0).await;
        assert!(back, "the hung-call count leaked after the panic");
    }

    #[tokio::test]
    async fn a_call_that_returns_after_it_was_given_up_reaches_the_late_handler() {
        let mut worker = worker("/test/late");
        let stop = CancellationToken::new();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (late_tx, late_rx) = std::sync::mpsc::channel();
        let r = worker
            .call_with_late(
                "C_SeedRandom",
                Duration::from_millis(100),
                &stop,
                move |_| {
                    let _ = wait.recv();
                    Ok(48usize)
                },
                move |late| late_tx.send(late).unwrap(),
            )
            .await;
        assert!(matches!(r, Err(CallError::Hung { .. })), "{r:?}");
        release.send(()).unwrap();
        let late =
            tokio::task::spawn_blocking(move || late_rx.recv_timeout(Duration::from_secs(5)))
                .await
                .unwrap();
        assert_eq!(late.unwrap().unwrap(), 48, "the late success was told");
        // And the worker has its target back for the next round.
        assert!(wait_for(|| worker.running.as_ref().is_some_and(Running::is_finished)).await);
        let r = worker
            .call("C_SeedRandom", Duration::from_secs(5), &stop, |_| Ok(1))
            .await;
        assert_eq!(r.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_call_that_returns_in_time_never_reaches_the_late_handler() {
        let mut worker = worker("/test/in-time");
        let stop = CancellationToken::new();
        let told = Arc::new(AtomicUsize::new(0));
        let counted = told.clone();
        for _ in 0..50 {
            let counted = counted.clone();
            let r = worker
                .call_with_late(
                    "C_SeedRandom",
                    Duration::from_secs(5),
                    &stop,
                    |_| Ok(()),
                    move |_| {
                        counted.fetch_add(1, Ordering::SeqCst);
                    },
                )
                .await;
            assert!(r.is_ok());
        }
        assert_eq!(told.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn two_modules_have_threads_of_their_own() {
        let (slow, fast) = (
            ModuleThreads::of(Path::new("/test/slow")),
            ModuleThreads::of(Path::new("/test/fast")),
        );
        assert!(!std::ptr::eq(slow, fast));
        assert!(std::ptr::eq(
            slow,
            ModuleThreads::of(Path::new("/test/slow"))
        ));
        // Every thread of the slow module held: the fast module's call still runs at once.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = Arc::new(Mutex::new(wait));
        for _ in 0..BLOCKING_THREADS {
            let wait = wait.clone();
            slow.pool.as_ref().unwrap().spawn_blocking(move || {
                let _ = wait.lock().unwrap().recv_timeout(Duration::from_secs(10));
            });
        }
        let (done_tx, done) = std::sync::mpsc::channel();
        fast.submit(move || {
            done_tx
                .send(std::thread::current().name().map(str::to_string))
                .unwrap()
        });
        let name = tokio::task::spawn_blocking(move || done.recv_timeout(Duration::from_secs(5)))
            .await
            .unwrap();
        drop(release);
        assert_eq!(name.unwrap().as_deref(), Some("qseed-pkcs11"));
    }

    #[tokio::test]
    async fn with_half_the_threads_held_by_hung_calls_a_drainer_gets_a_thread_of_its_own() {
        let threads = ModuleThreads::of(Path::new("/test/half-hung"));
        threads
            .hung
            .fetch_add(BLOCKING_THREADS / 2, Ordering::SeqCst);
        let (tx, rx) = std::sync::mpsc::channel();
        threads.start_drainer(Box::new(move || {
            let _ = tx.send(std::thread::current().name().map(str::to_string));
        }));
        let name = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        threads
            .hung
            .fetch_sub(BLOCKING_THREADS / 2, Ordering::SeqCst);
        assert_eq!(name.as_deref(), Some("qseed-pkcs11-extra"));
    }

    /// A standing order's round that counts its calls and answers `step(n)` on call `n`.
    fn counting_round(
        calls: Arc<AtomicUsize>,
        step: impl Fn(usize) -> standing::Step + Send + Sync + 'static,
    ) -> Round {
        Arc::new(move |_: &mut Target| step(calls.fetch_add(1, Ordering::SeqCst) + 1))
    }

    #[tokio::test]
    async fn a_standing_order_runs_on_schedule_off_the_loop_until_a_round_fails() {
        let mut worker = worker("/test/standing");
        assert!(worker.can_stand());
        let stop = CancellationToken::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let seen = threads.clone();
        let counted = calls.clone();
        let round: Round = Arc::new(move |_: &mut Target| {
            seen.lock()
                .unwrap()
                .push(std::thread::current().name().map(str::to_string));
            match counted.fetch_add(1, Ordering::SeqCst) + 1 {
                n if n < 5 => standing::Step::Seeded,
                _ => standing::Step::Failed(HsmError::Unexpected("the fifth round".into())),
            }
        });
        let first = Instant::now() + Duration::from_millis(20);
        let period = Duration::from_millis(40);
        let ended = worker
            .standing(first, period, None, Duration::from_secs(5), &stop, round)
            .await
            .unwrap();
        // Four rounds seeded, the fifth failed and came back with its due instant.
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        match ended {
            Ended::Failed { at, error } => {
                assert_eq!(at, (first + period * 4).into_std());
                assert!(error.to_string().contains("the fifth round"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert!(threads
            .lock()
            .unwrap()
            .iter()
            .all(|name| name.as_deref() == Some("qseed-p11-timer")));
        // The target is back: the loop's own calls run again.
        let r = worker
            .call("C_SeedRandom", Duration::from_secs(5), &stop, |_| Ok(3))
            .await;
        assert_eq!(r.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_standing_order_hands_a_round_without_bytes_back_and_cancels_at_once() {
        let mut worker = worker("/test/standing-due");
        let stop = CancellationToken::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let first = Instant::now();
        let ended = worker
            .standing(
                first,
                Duration::from_millis(10),
                None,
                Duration::from_secs(5),
                &stop,
                counting_round(calls.clone(), |_| standing::Step::NoBytes),
            )
            .await
            .unwrap();
        assert!(
            matches!(ended, Ended::Due { at } if at == first.into_std()),
            "{ended:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // A panic in a round is a panic, and the target comes back.
        let ended = worker
            .standing(
                Instant::now(),
                Duration::from_millis(10),
                None,
                Duration::from_secs(5),
                &stop,
                Arc::new(|_: &mut Target| panic!("a module bug")),
            )
            .await
            .unwrap();
        assert!(matches!(ended, Ended::Panicked { .. }), "{ended:?}");
        // Stopped while the order waits for a round an hour away: the target is back at once.
        let stopping = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stopping.cancel();
        });
        let r = worker
            .standing(
                Instant::now() + Duration::from_secs(3600),
                Duration::from_secs(3600),
                None,
                Duration::from_secs(5),
                &stop,
                counting_round(calls.clone(), |_| standing::Step::Seeded),
            )
            .await;
        assert!(matches!(r, Err(CallError::Cancelled)), "{r:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no round ran");
        assert!(worker.finish(Duration::from_millis(100)).await.is_some());
    }

    /// A standing order of seeding rounds every 20 ms from `first` until `until`: how it ended.
    async fn stand_until(
        worker: &mut Worker,
        stop: &CancellationToken,
        calls: &Arc<AtomicUsize>,
        first: Instant,
        until: Instant,
    ) -> Ended {
        let round = counting_round(calls.clone(), |_| standing::Step::Seeded);
        let period = Duration::from_millis(20);
        let standing = worker.standing(
            first,
            period,
            Some(until),
            Duration::from_secs(5),
            stop,
            round,
        );
        tokio::time::timeout(Duration::from_secs(5), standing)
            .await
            .expect("the order ended at its until")
            .unwrap()
    }

    #[tokio::test]
    async fn a_standing_order_hands_back_the_first_round_due_at_or_after_its_until() {
        let mut worker = worker("/test/standing-until");
        let stop = CancellationToken::new();
        let calls = Arc::new(AtomicUsize::new(0));
        // Due at once: the first round is the loop's, and none runs here.
        let first = Instant::now();
        let ended = stand_until(&mut worker, &stop, &calls, first, first).await;
        assert!(
            matches!(ended, Ended::Due { at } if at == first.into_std()),
            "{ended:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // Due at first, +20, +40, +60 ms (later if the machine is slow): the rounds before
        // +50 ms run here, the first one after is handed back.
        let first = Instant::now();
        let until = first + Duration::from_millis(50);
        match stand_until(&mut worker, &stop, &calls, first, until).await {
            Ended::Due { at } => assert!(at >= until.into_std(), "{at:?}"),
            other => panic!("{other:?}"),
        }
        assert!((1..=3).contains(&calls.load(Ordering::SeqCst)), "{calls:?}");
        // The target is back: the loop's own calls run again.
        let r = worker
            .call("C_Sign", Duration::from_secs(5), &stop, |_| Ok(7))
            .await;
        assert_eq!(r.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_hung_standing_round_holds_up_no_other_order_and_is_told_hung_then_given_back() {
        let module = "/test/standing-hung";
        let (mut stuck, mut healthy) = (worker(module), worker(module));
        let stop = CancellationToken::new();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = Arc::new(Mutex::new(wait));
        let stuck_calls = Arc::new(AtomicUsize::new(0));
        let hang = {
            let calls = stuck_calls.clone();
            Arc::new(move |_: &mut Target| {
                if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                    let _ = wait.lock().unwrap().recv();
                    return standing::Step::Failed(HsmError::Unexpected("late".into()));
                }
                standing::Step::Seeded
            }) as Round
        };
        let healthy_calls = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        let period = Duration::from_millis(100);
        let hung = stuck.standing(now, period, None, Duration::from_millis(600), &stop, hang);
        // The healthy order is due 10 ms after each of the stuck one's rounds.
        let steady = healthy.standing(
            now + Duration::from_millis(10),
            period,
            None,
            Duration::from_secs(5),
            &stop,
            counting_round(healthy_calls.clone(), |n| {
                if n < 8 {
                    standing::Step::Seeded
                } else {
                    standing::Step::NoBytes
                }
            }),
        );
        // Without the watchdog, both would wait for the stuck call, which returns only below.
        let (hung, steady) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(hung, steady)
        })
        .await
        .expect("the healthy order waited for the hung call");
        // The healthy order ran its eight rounds while the other call hung.
        assert!(matches!(steady, Ok(Ended::Due { .. })), "{steady:?}");
        assert_eq!(healthy_calls.load(Ordering::SeqCst), 8);
        match hung {
            Ok(Ended::Hung { at, waited }) => {
                assert_eq!(at, (now + period).into_std());
                assert!(waited >= Duration::from_millis(600), "{waited:?}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(stuck.threads.hung.load(Ordering::SeqCst), 1);
        // Until the call returns, the target is not here.
        let r = stuck
            .call("C_SeedRandom", Duration::from_secs(1), &stop, |_| Ok(()))
            .await;
        assert!(matches!(r, Err(CallError::Hung { .. })), "{r:?}");
        release.send(()).unwrap();
        assert!(wait_for(|| stuck.threads.hung.load(Ordering::SeqCst) == 0).await);
        let r = stuck
            .call("C_SeedRandom", Duration::from_secs(1), &stop, |_| Ok(9))
            .await;
        assert_eq!(r.unwrap(), 9);
    }

    async fn wait_for(mut done: impl FnMut() -> bool) -> bool {
        for _ in 0..100 {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

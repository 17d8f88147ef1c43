//! The pool: downloaded entropy waiting to be injected.
//!
//! Bytes are bought in whole KiB blocks, health-tested block by block before any byte is used,
//! and handed out in exactly the sizes targets ask for, each byte once, to one target, oldest
//! first. What is handed out, expires or is dropped is wiped.
//!
//! Request sizes follow demand: each target registers its size, period and (for bounded runs)
//! how many rounds it has left. A request buys what the targets will consume over
//! [`PoolConfig::horizon`] (1..512 KiB), never more than a bounded run still needs, than fits
//! under [`PoolConfig::max_bytes`], or than would be used before [`PoolConfig::max_age`]. A
//! background refill tops the pool up when it falls below the low-water mark (one round of
//! every target plus [`LOW_WATER_LEAD`] of consumption), so injections rarely wait for the
//! network; a stop throws away at most about one request's worth.

mod buffer;

// The health tests sit below the sources (each of several sources is tested on its own); the
// pool applies them to everything it receives.
pub use crate::health;
pub use crate::health::replay;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use crate::secret::EntropyBytes;
pub use buffer::Buffer;
pub use health::{HealthConfig, HealthFailure, HealthTests};

use crate::source::backoff::{self, Backoff};
use crate::source::{EntropySource, SourceError, BLOCK_LEN, MAX_BLOCKS_PER_REQUEST};

/// How far ahead of need the background refill starts: consumption over this long.
pub const LOW_WATER_LEAD: Duration = Duration::from_secs(30);

/// The pool's limits and the health tests' parameters (`[pool]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolConfig {
    /// Most bytes held at once.
    pub max_bytes: usize,
    /// Bytes held longer than this are wiped unused (and counted).
    pub max_age: Duration,
    /// A request buys what the targets consume over this long.
    pub horizon: Duration,
    pub health: HealthConfig,
    /// At a stop, the bytes left are injected into the targets for at most this long (`0`:
    /// not at all) instead of being wiped unused.
    pub flush_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_bytes: 1024 * 1024,
            max_age: Duration::from_secs(3600),
            horizon: Duration::from_secs(600),
            health: HealthConfig::default(),
            flush_timeout: Duration::from_secs(2),
        }
    }
}

/// Told about every request to the source (telemetry implements it).
pub trait RequestObserver: Send + Sync + std::fmt::Debug {
    /// `outcome`: the HTTP status, or the kind of failure; `seconds`: request to checked answer.
    fn request(&self, outcome: &str, seconds: f64);
}

/// A registered consumer of the pool (one per target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DemandId(usize);

#[derive(Debug, Clone, Copy)]
struct Demand {
    size: usize,
    period: Duration,
    /// Rounds left in a bounded run; `None` runs until stopped.
    rounds_left: Option<u64>,
    /// Whether the consumer reached its token in its last round; `None` before its first.
    /// Only consumers that reached it count toward purchases (a target whose token is missing
    /// must not drive them), and those whose first round is due but who have not finished
    /// trying yet (see [`SETTLE`]).
    reachable: Option<bool>,
    /// Its token has accepted a seed. Until then only its next round is bought for, never
    /// its share of the horizon: a token that refuses seeds costs at most its first seed.
    accepted: bool,
    /// When its first round is due.
    first_round: Instant,
}

/// How long a request waits for consumers whose first round is due but who have not yet
/// reached their token: long enough for a local HSM's login, short enough not to matter.
const SETTLE: Duration = Duration::from_secs(1);

/// Whether `d` counts toward purchases.
fn counts(d: &&Demand) -> bool {
    match d.reachable {
        Some(reachable) => reachable,
        None => d.first_round <= Instant::now(),
    }
}

/// Byte and request counters since start.
#[derive(Debug, Default)]
struct Stats {
    requests: AtomicU64,
    failed_requests: AtomicU64,
    bytes_downloaded: AtomicU64,
    bytes_handed_out: AtomicU64,
    blocks_rejected: AtomicU64,
    bytes_rejected: AtomicU64,
    bytes_expired: AtomicU64,
    takes_waited: AtomicU64,
    rounds_skipped: AtomicU64,
    bytes_flushed: AtomicU64,
}

/// A copy of the pool's counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub failed_requests: u64,
    pub bytes_downloaded: u64,
    pub bytes_handed_out: u64,
    /// Blocks (and their bytes) refused by the health tests.
    pub blocks_rejected: u64,
    pub bytes_rejected: u64,
    /// Bytes wiped unused because they were older than `max_age`.
    pub bytes_expired: u64,
    /// Takes that found too few bytes and waited for a request.
    pub takes_waited: u64,
    /// Rounds targets skipped for want of entropy.
    pub rounds_skipped: u64,
    /// Bytes handed out for the flush at a stop (not counted in `bytes_handed_out`).
    pub bytes_flushed: u64,
    /// Bytes held right now.
    pub bytes_held: u64,
}

#[derive(Debug)]
struct State {
    config: PoolConfig,
    buffer: Buffer,
    /// By consumer: a B-tree, since every take looks its consumer up (no hashing).
    demand: BTreeMap<DemandId, Demand>,
    /// [`low_water`] as last computed, with the demand it was computed for: every take asks
    /// for it, and summing hundreds of consumers on each take costs more than the take.
    low_water: Option<usize>,
    next_id: usize,
    health: HealthTests,
    backoff: Backoff,
    outage: Option<Outage>,
    traces: Traces,
}

/// Which requests bought the bytes of a take, as audit records name them (`r3@origin,r4`).
#[derive(Debug, Default)]
struct Traces {
    /// Which of several sources served each recent request.
    origins: BTreeMap<u64, String>,
    /// The requests of the take being traced: kept, so that a take allocates nothing for them.
    requests: Vec<u64>,
    /// The trace of the last take that came from one request: a purchase serves hundreds of
    /// rounds, and each one after the first shares the text instead of formatting it again.
    last: Option<(u64, Arc<str>)>,
}

impl Traces {
    fn note_origin(&mut self, request: u64, origin: String) {
        self.origins.insert(request, origin);
        while self.origins.len() > ORIGINS_KEPT {
            self.origins.pop_first();
        }
    }

    /// The trace of the take whose requests are in `self.requests`.
    fn of_take(&mut self) -> Arc<str> {
        if let ([request], Some((last, trace))) = (self.requests.as_slice(), &self.last) {
            if request == last {
                return trace.clone();
            }
        }
        let mut text = String::with_capacity(16 * self.requests.len());
        for (i, r) in self.requests.iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            let _ = match self.origins.get(r) {
                Some(origin) => write!(text, "{comma}r{r}@{origin}"),
                None => write!(text, "{comma}r{r}"),
            };
        }
        let trace: Arc<str> = text.into();
        if let [request] = self.requests.as_slice() {
            self.last = Some((*request, trace.clone()));
        }
        trace
    }
}

impl State {
    /// [`low_water`], computed again only when the demand changed. A consumer that has not yet
    /// reached its token counts from its first round on, a moment in time, so the figure is kept
    /// only once every consumer's state is known.
    fn low_water(&mut self) -> usize {
        if let Some(low) = self.low_water {
            return low;
        }
        let low = low_water(&self.demand, self.config.max_bytes);
        if self.demand.values().all(|d| d.reachable.is_some()) {
            self.low_water = Some(low);
        }
        low
    }
}

/// How many requests' origins are remembered: far more than the pool ever holds bytes of.
const ORIGINS_KEPT: usize = 1024;

/// A run of failed requests, reported once when it starts and once when it ends.
#[derive(Debug)]
struct Outage {
    since: Instant,
    failed_requests: u64,
    skipped_rounds: u64,
    kind: &'static str,
    /// When the outage was last logged as a warning (see `[service] log_repeat`).
    logged: Instant,
}

/// A buffer shared by all targets, refilled from one source.
#[derive(Debug)]
pub struct Pool<S> {
    /// Replaced on reload; a request in flight keeps the one it started with.
    source: std::sync::RwLock<Arc<S>>,
    /// Held only for quick bookkeeping, never across a request.
    state: Mutex<State>,
    /// Held across a request: one request in flight, so concurrent takers share it.
    fetching: tokio::sync::Mutex<()>,
    refill_wanted: tokio::sync::Notify,
    /// Bumped whenever bytes were bought: a consumer whose round found none tries again then,
    /// not a whole period later (see [`Pool::watch_refills`]).
    refills: tokio::sync::watch::Sender<u64>,
    /// Set when the flush at a stop begins: nothing more is bought.
    closing: std::sync::atomic::AtomicBool,
    /// A consumer finished its first try to reach its token (see [`SETTLE`]).
    first_tries: tokio::sync::Notify,
    stats: Stats,
    observer: std::sync::RwLock<Option<Arc<dyn RequestObserver>>>,
    /// The replay record shared with other processes, once the state folder is known.
    replay: Arc<Mutex<Option<replay::SharedRecord>>>,
}

impl<S: EntropySource> Pool<S> {
    pub fn new(source: S, config: PoolConfig) -> Self {
        Self {
            source: std::sync::RwLock::new(Arc::new(source)),
            state: Mutex::new(State {
                config,
                buffer: Buffer::new(),
                demand: BTreeMap::new(),
                low_water: None,
                next_id: 0,
                health: HealthTests::new(config.health),
                backoff: Backoff::default(),
                outage: None,
                traces: Traces::default(),
            }),
            fetching: tokio::sync::Mutex::new(()),
            refill_wanted: tokio::sync::Notify::new(),
            refills: tokio::sync::watch::Sender::new(0),
            closing: std::sync::atomic::AtomicBool::new(false),
            first_tries: tokio::sync::Notify::new(),
            stats: Stats::default(),
            observer: std::sync::RwLock::new(None),
            replay: Arc::new(Mutex::new(None)),
        }
    }

    pub fn source(&self) -> Arc<S> {
        self.source
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Takes a new source and limits (a reload). Bytes already held stay and are used first;
    /// the replay memory is kept; the backoff starts afresh.
    pub fn reconfigure(&self, source: S, config: PoolConfig) {
        *self.source.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(source);
        let mut state = self.lock();
        if state.config.health != config.health {
            state.health.set_config(config.health);
        }
        state.config = config;
        state.low_water = None;
        state.backoff.succeeded();
    }

    /// Checks replays against `record` (the state folder's, shared with other processes and
    /// outliving this one) instead of this process's memory.
    pub fn use_replay_record(&self, record: replay::SharedRecord) {
        self.lock().health.leave_replays_to_shared_record();
        *self.replay.lock().unwrap_or_else(PoisonError::into_inner) = Some(record);
    }

    /// Refuses the blocks of `fetched` that this or another process accepted before, through
    /// the shared record (on a blocking thread: it reads and appends a file under a lock
    /// another process may hold). Without a shared record, the health tests' own memory does
    /// it. The record that cannot be kept refuses the whole answer.
    async fn screen_replays(
        &self,
        fetched: EntropyBytes,
        blocks: usize,
        from: &str,
    ) -> Result<EntropyBytes, SourceError> {
        let shared = Arc::clone(&self.replay);
        let screened = tokio::task::spawn_blocking(move || {
            let mut record = shared.lock().unwrap_or_else(PoisonError::into_inner);
            match record.as_mut() {
                Some(record) => record.screen(fetched, BLOCK_LEN),
                None => Ok((fetched, 0)),
            }
        });
        let (kept, replayed) = screened
            .await
            .map_err(|e| SourceError::ReplayRecord(format!("its thread failed: {e}")))?
            .map_err(SourceError::ReplayRecord)?;
        if replayed > 0 {
            self.stats
                .blocks_rejected
                .fetch_add(replayed as u64, Ordering::Relaxed);
            self.stats
                .bytes_rejected
                .fetch_add((replayed * BLOCK_LEN) as u64, Ordering::Relaxed);
            tracing::warn!(
                "health tests refused {replayed} of {blocks} block(s) from {from} and wiped \
                 them: {} (by this or another qseed process sharing the state folder)",
                health::HealthFailure::Replayed
            );
        }
        if kept.is_empty() {
            return Err(SourceError::Unhealthy {
                blocks,
                first: health::HealthFailure::Replayed.to_string(),
            });
        }
        Ok(kept)
    }

    /// Waits (at most [`SETTLE`] past their first round) for consumers that are due but have
    /// not yet tried to reach their token: whether they can decides whether their demand is
    /// bought for. In the usual case every target connects within milliseconds of the first.
    async fn settle_first_tries(&self) {
        loop {
            let notified = self.first_tries.notified();
            let until = {
                let state = self.lock();
                let now = Instant::now();
                state
                    .demand
                    .values()
                    .filter(|d| d.reachable.is_none() && d.first_round <= now)
                    .map(|d| d.first_round + SETTLE)
                    .filter(|&until| until > now)
                    .max()
            };
            let Some(until) = until else {
                return;
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Reports every request to `observer` from now on.
    pub fn set_observer(&self, observer: Arc<dyn RequestObserver>) {
        *self
            .observer
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(observer);
    }

    fn observe(&self, outcome: &str, started: std::time::Instant) {
        if let Some(o) = &*self.observer.read().unwrap_or_else(PoisonError::into_inner) {
            o.request(outcome, started.elapsed().as_secs_f64());
        }
    }

    /// Declares a consumer taking `size` bytes every `period`, for `rounds` rounds (`None`:
    /// until stopped). Its demand shapes request sizes until it is unregistered.
    pub fn register(&self, size: usize, period: Duration, rounds: Option<u64>) -> DemandId {
        self.register_after(size, period, rounds, Duration::ZERO)
    }

    /// [`Pool::register`] for a consumer whose first round is `offset` from now.
    pub fn register_after(
        &self,
        size: usize,
        period: Duration,
        rounds: Option<u64>,
        offset: Duration,
    ) -> DemandId {
        let mut state = self.lock();
        let id = DemandId(state.next_id);
        state.next_id += 1;
        state.low_water = None;
        state.demand.insert(
            id,
            Demand {
                size,
                period,
                rounds_left: rounds,
                reachable: None,
                accepted: false,
                first_round: Instant::now() + offset,
            },
        );
        id
    }

    /// Whether consumer `id` reached its token in its last round (see [`Demand`]).
    pub fn set_reachable(&self, id: DemandId, reachable: bool) {
        let mut state = self.lock();
        if let Some(d) = state.demand.get_mut(&id) {
            let first = d.reachable.is_none();
            if d.reachable != Some(reachable) {
                d.reachable = Some(reachable);
                state.low_water = None;
            }
            if first {
                self.first_tries.notify_waiters();
            }
        }
    }

    /// Consumer `id`'s token accepted a seed: its rate counts toward purchases from now on.
    pub fn seed_accepted(&self, id: DemandId) {
        let mut state = self.lock();
        if let Some(d) = state.demand.get_mut(&id) {
            if !d.accepted {
                d.accepted = true;
                state.low_water = None;
            }
        }
    }

    /// The consumer stopped: its demand no longer counts.
    pub fn unregister(&self, id: DemandId) {
        let mut state = self.lock();
        state.demand.remove(&id);
        state.low_water = None;
    }

    /// Exactly `len` never-used bytes for consumer `id`, buying whole blocks when too few are
    /// held.
    pub async fn take(
        self: &Arc<Self>,
        id: DemandId,
        len: usize,
    ) -> Result<EntropyBytes, SourceError> {
        self.take_traced(id, len).await.map(|(bytes, _)| bytes)
    }

    /// [`Pool::take`], with the numbers of the requests that bought the bytes (`r3,r4`), for
    /// the audit record.
    ///
    /// A taker dropped while it waits (a round at a stop) leaves its purchase running: the
    /// request is paid for once sent, so it lands in the pool for the flush
    /// ([`Pool::settle_purchases`]) rather than being cut off mid-answer.
    pub async fn take_traced(
        self: &Arc<Self>,
        id: DemandId,
        len: usize,
    ) -> Result<(EntropyBytes, Arc<str>), SourceError> {
        // A consumer that takes is ready for its bytes, whether or not it said so.
        if self
            .lock()
            .demand
            .get(&id)
            .is_some_and(|d| d.reachable.is_none())
        {
            self.set_reachable(id, true);
        }
        if let Some(bytes) = self.try_take(id, len) {
            return Ok(bytes);
        }
        self.stats.takes_waited.fetch_add(1, Ordering::Relaxed);
        // A few tries: a refill may be used up by other takers before this one gets its turn.
        for _ in 0..3 {
            let pool = Arc::clone(self);
            let purchase = tokio::spawn(async move { pool.refill(len).await });
            let bought = match purchase.await {
                Ok(bought) => bought,
                // As it would have inline: a panic stays a panic.
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Only when the runtime itself is going away.
                Err(_) => Err(SourceError::ShortDelivery { needed: len }),
            };
            if let Err(e) = bought {
                // The background refill keeps trying on the backoff schedule, so that the
                // bytes are there as soon as the source is back (see `watch_refills`).
                self.refill_wanted.notify_one();
                return Err(e);
            }
            if let Some(bytes) = self.try_take(id, len) {
                return Ok(bytes);
            }
        }
        self.try_take(id, len)
            .ok_or(SourceError::ShortDelivery { needed: len })
    }

    /// Bytes for `id` if the pool holds them now (never waits for a purchase), with the
    /// requests that bought them.
    pub fn try_take(&self, id: DemandId, len: usize) -> Option<(EntropyBytes, Arc<str>)> {
        let mut guard = self.lock();
        self.expire(&mut guard);
        let state = &mut *guard;
        let bytes = state.buffer.take_traced(len, &mut state.traces.requests)?;
        let trace = state.traces.of_take();
        if let Some(rounds_left) = state
            .demand
            .get_mut(&id)
            .and_then(|d| d.rounds_left.as_mut())
        {
            *rounds_left = rounds_left.saturating_sub(1);
            state.low_water = None;
        }
        self.stats
            .bytes_handed_out
            .fetch_add(len as u64, Ordering::Relaxed);
        if state.buffer.available() < state.low_water() {
            self.refill_wanted.notify_one();
        }
        Some((bytes, trace))
    }

    /// Buys one request's worth when fewer than `needed` bytes are held (or, with `needed` 0,
    /// when the pool is below its low-water mark). While the source is failing, requests wait
    /// for the backoff schedule (`source::backoff`) and this fails at once with
    /// [`SourceError::Waiting`].
    async fn refill(&self, needed: usize) -> Result<(), SourceError> {
        let _one_request = self.fetching.lock().await;
        if self.closing.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.settle_first_tries().await;
        let blocks = {
            let mut state = self.lock();
            self.expire(&mut state);
            let available = state.buffer.available();
            let low = state.low_water();
            if available >= needed && (needed > 0 || available >= low) {
                return Ok(());
            }
            if let Err(retry_in) = state.backoff.ready(Instant::now()) {
                return Err(SourceError::Waiting {
                    retry_in,
                    reason: state.outage.as_ref().map_or("", |o| o.kind).to_string(),
                });
            }
            plan_blocks(&state.demand, &state.config, available, needed)
        };
        if blocks == 0 {
            return Ok(());
        }
        let request = self.stats.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let source = self.source();
        let started = std::time::Instant::now();
        let fetched = source.fetch_from(blocks).await;
        let fetched = match fetched {
            Ok((bytes, origin)) => {
                self.observe("200", started);
                self.recovered();
                if let Some(origin) = origin {
                    self.lock().traces.note_origin(request, origin);
                }
                bytes
            }
            Err(e) => {
                self.observe(&e.outcome_label(), started);
                self.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
                self.failed(&e);
                return Err(e);
            }
        };
        self.stats
            .bytes_downloaded
            .fetch_add(fetched.len() as u64, Ordering::Relaxed);
        // Before the pool's lock is taken: takers never wait for the disk.
        let fetched = match self
            .screen_replays(fetched, blocks, &source.describe())
            .await
        {
            Ok(kept) => kept,
            Err(e) => {
                self.failed(&e);
                return Err(e);
            }
        };
        self.accept(fetched, blocks, request, &*source)
    }

    /// Screens an answer and keeps what passes.
    fn accept(
        &self,
        fetched: EntropyBytes,
        blocks: usize,
        request: u64,
        source: &S,
    ) -> Result<(), SourceError> {
        let mut state = self.lock();
        let (kept, failures) = health::screen(&mut state.health, fetched, BLOCK_LEN);
        if let Some(first) = failures.first() {
            self.stats
                .blocks_rejected
                .fetch_add(failures.len() as u64, Ordering::Relaxed);
            self.stats
                .bytes_rejected
                .fetch_add((failures.len() * BLOCK_LEN) as u64, Ordering::Relaxed);
            tracing::warn!(
                "health tests refused {} of {blocks} block(s) from {} and wiped them: {first}",
                failures.len(),
                source.describe()
            );
        }
        tracing::debug!(
            "bought {blocks} KiB from {}; {} bytes held",
            source.describe(),
            state.buffer.available() + kept.len()
        );
        if kept.is_empty() {
            drop(state);
            let e = SourceError::Unhealthy {
                blocks,
                first: failures.first().map(|f| f.to_string()).unwrap_or_default(),
            };
            self.failed(&e);
            return Err(e);
        }
        state.buffer.push_from(kept, Instant::now(), request);
        drop(state);
        self.refills.send_modify(|n| *n += 1);
        Ok(())
    }

    /// A receiver that sees every purchase: a consumer whose round found no entropy waits on
    /// it (and on its next period, whichever comes first) to try again.
    pub fn watch_refills(&self) -> tokio::sync::watch::Receiver<u64> {
        self.refills.subscribe()
    }

    /// Backs off and reports the outage: loudly when it starts or changes kind, quietly after.
    fn failed(&self, error: &SourceError) {
        let mut state = self.lock();
        let now = Instant::now();
        let cap = shortest_period(&state.demand) / 2;
        let wait = state.backoff.failed(error, cap, now);
        let held = state.buffer.available();
        // A bounded run (`once`, `doctor`) will not try again: say only what happened.
        let next_try = if state.demand.values().any(|d| d.rounds_left.is_none()) {
            format!(
                "; next try in {}",
                crate::units::short_duration(Duration::from_secs(wait.as_secs().max(1)))
            )
        } else {
            String::new()
        };
        match &mut state.outage {
            None => {
                state.outage = Some(Outage {
                    since: now,
                    failed_requests: 1,
                    skipped_rounds: 0,
                    kind: error.kind(),
                    logged: now,
                });
                if next_try.is_empty() {
                    tracing::warn!("entropy source failing: {error}");
                } else {
                    tracing::warn!(
                        "entropy source failing: {error}. Targets are served from the {held} \
                         bytes buffered{next_try}"
                    );
                }
            }
            Some(outage) => {
                outage.failed_requests += 1;
                let every = crate::repeat::log_repeat();
                if outage.kind != error.kind() {
                    outage.kind = error.kind();
                    outage.logged = now;
                    tracing::warn!("entropy source still failing, now: {error}{next_try}");
                } else if now.duration_since(outage.logged) >= every {
                    outage.logged = now;
                    tracing::warn!(
                        "entropy source still failing after {} ({} failed request(s), {} \
                         round(s) skipped; next report in {}): {error}{next_try}",
                        crate::units::short_duration(Duration::from_secs(
                            now.duration_since(outage.since).as_secs().max(1)
                        )),
                        outage.failed_requests,
                        outage.skipped_rounds,
                        crate::units::short_duration(every)
                    );
                } else {
                    tracing::debug!("entropy source still failing: {error}{next_try}");
                }
            }
        }
    }

    fn recovered(&self) {
        let mut state = self.lock();
        state.backoff.succeeded();
        if let Some(outage) = state.outage.take() {
            tracing::info!(
                "entropy source back after {}: {} failed request(s), {} round(s) skipped",
                crate::units::short_duration(Duration::from_secs(
                    outage.since.elapsed().as_secs().max(1)
                )),
                outage.failed_requests,
                outage.skipped_rounds
            );
        }
    }

    /// A target skipped its round for want of entropy (counted in the outage report).
    pub fn note_skipped_round(&self) {
        self.stats.rounds_skipped.fetch_add(1, Ordering::Relaxed);
        if let Some(outage) = &mut self.lock().outage {
            outage.skipped_rounds += 1;
        }
    }

    /// Keeps the pool above its low-water mark in the background until `shutdown`. While the
    /// source fails it keeps trying on the backoff schedule, so the pool refills as soon as
    /// the source is back, before the next round needs it.
    pub async fn refill_in_background(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.refill_wanted.notified() => {}
            }
            while let Err(e) = self.refill(0).await {
                let wait = match e {
                    SourceError::Waiting { retry_in, .. } => retry_in,
                    _ => self
                        .lock()
                        .backoff
                        .ready(Instant::now())
                        .err()
                        .unwrap_or(backoff::FIRST_DELAY),
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
                }
            }
        }
    }

    /// How long the flush at a stop may take (see [`PoolConfig::flush_timeout`]).
    pub fn flush_timeout(&self) -> Duration {
        self.lock().config.flush_timeout
    }

    /// The service is stopping: nothing more is bought, and [`Pool::take_leftover`] hands out
    /// what is left.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// Waits until no purchase is in flight, or until `deadline`. After [`Pool::close`] none
    /// starts; one already under way was paid for, and its bytes land in the pool for the
    /// flush to hand out instead of after it, to be wiped.
    pub async fn settle_purchases(&self, deadline: tokio::time::Instant) {
        let _ = tokio::time::timeout_at(deadline, self.fetching.lock()).await;
    }

    /// Up to `len` of the bytes left (fewer when fewer are held), for the flush at a stop;
    /// never buys. `None` when nothing is left.
    pub fn take_leftover(&self, len: usize) -> Option<(EntropyBytes, Arc<str>)> {
        let mut guard = self.lock();
        self.expire(&mut guard);
        let state = &mut *guard;
        let n = len.min(state.buffer.available());
        if n == 0 {
            return None;
        }
        let bytes = state.buffer.take_traced(n, &mut state.traces.requests)?;
        self.stats
            .bytes_flushed
            .fetch_add(n as u64, Ordering::Relaxed);
        Some((bytes, state.traces.of_take()))
    }

    /// Wipes every byte still held and returns how many there were.
    pub fn drain(&self) -> usize {
        self.lock().buffer.clear()
    }

    pub fn stats(&self) -> StatsSnapshot {
        let held = self.lock().buffer.available() as u64;
        StatsSnapshot {
            requests: self.stats.requests.load(Ordering::Relaxed),
            failed_requests: self.stats.failed_requests.load(Ordering::Relaxed),
            bytes_downloaded: self.stats.bytes_downloaded.load(Ordering::Relaxed),
            bytes_handed_out: self.stats.bytes_handed_out.load(Ordering::Relaxed),
            blocks_rejected: self.stats.blocks_rejected.load(Ordering::Relaxed),
            bytes_rejected: self.stats.bytes_rejected.load(Ordering::Relaxed),
            bytes_expired: self.stats.bytes_expired.load(Ordering::Relaxed),
            takes_waited: self.stats.takes_waited.load(Ordering::Relaxed),
            rounds_skipped: self.stats.rounds_skipped.load(Ordering::Relaxed),
            bytes_flushed: self.stats.bytes_flushed.load(Ordering::Relaxed),
            bytes_held: held,
        }
    }

    fn expire(&self, state: &mut State) {
        let max_age = state.config.max_age;
        let expired = state.buffer.expire(Instant::now(), max_age);
        if expired > 0 {
            self.stats
                .bytes_expired
                .fetch_add(expired as u64, Ordering::Relaxed);
            tracing::info!(
                "wiped {expired} unused bytes older than pool.max_age ({})",
                crate::units::short_duration(max_age)
            );
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The shortest period among consumers: the backoff waits at most half of it, so service
/// resumes within one period of the source recovering.
fn shortest_period(demand: &BTreeMap<DemandId, Demand>) -> Duration {
    demand
        .values()
        .filter(counts)
        .map(|d| d.period)
        .min()
        .unwrap_or(backoff::MAX_CAP)
}

/// Bytes per second the registered consumers whose tokens accept seeds take.
fn rate(demand: &BTreeMap<DemandId, Demand>) -> f64 {
    demand
        .values()
        .filter(counts)
        .filter(|d| d.accepted)
        .filter(|d| d.rounds_left != Some(0))
        .map(|d| d.size as f64 / d.period.as_secs_f64().max(1e-3))
        .sum()
}

/// What bounded consumers still need in all; `None` when any runs until stopped.
fn remaining(demand: &BTreeMap<DemandId, Demand>) -> Option<u64> {
    demand
        .values()
        .filter(counts)
        .map(|d| d.rounds_left.map(|r| r * d.size as u64))
        .sum()
}

/// Refill when fewer bytes than this are held: one round of every consumer plus
/// [`LOW_WATER_LEAD`] of consumption, but never more than a bounded run still needs.
fn low_water(demand: &BTreeMap<DemandId, Demand>, max_bytes: usize) -> usize {
    let one_round: usize = demand
        .values()
        .filter(counts)
        .filter(|d| d.rounds_left != Some(0))
        .map(|d| d.size)
        .sum();
    let lead = (rate(demand) * LOW_WATER_LEAD.as_secs_f64()) as usize;
    let mut low = (one_round + lead).min(max_bytes / 2);
    if let Some(left) = remaining(demand) {
        low = low.min(left as usize);
    }
    low
}

/// How many blocks the next request buys, given `available` bytes held and `needed` now.
fn plan_blocks(
    demand: &BTreeMap<DemandId, Demand>,
    config: &PoolConfig,
    available: usize,
    needed: usize,
) -> usize {
    let deficit = needed.saturating_sub(available);
    let rate = rate(demand);
    let mut want = (rate * config.horizon.as_secs_f64()) as usize;
    want = want.max(low_water(demand, config.max_bytes).saturating_sub(available));
    // Never more than will be used before it expires, fits under the cap, or a bounded run
    // still needs; but always what is needed right now.
    if rate > 0.0 {
        want = want.min((rate * config.max_age.as_secs_f64()) as usize);
    }
    want = want.min(config.max_bytes.saturating_sub(available));
    if let Some(left) = remaining(demand) {
        want = want.min((left as usize).saturating_sub(available));
    }
    want = want.max(deficit);
    if want == 0 {
        return 0;
    }
    want.div_ceil(BLOCK_LEN).clamp(1, MAX_BLOCKS_PER_REQUEST)
}

#[cfg(test)]
mod tests;

//! Prometheus metrics and readiness. Names follow Prometheus conventions: prefix `qseed_`, base
//! units (bytes, seconds), `_total` on counters. No metric ever carries a secret or entropy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::pool::{RequestObserver, StatsSnapshot};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BlockUnitLabels {
    source: String,
    unit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InjectionLabels {
    target: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    target: String,
    state: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What readiness needs to know of a target.
#[derive(Debug, Clone)]
struct TargetStatus {
    period: Duration,
    started: Instant,
    last_ok: Option<Instant>,
    stopped: Option<String>,
    stop_message: Option<String>,
    rounds: u64,
    /// How its last round went: STATUS= says which targets are short of entropy or failing.
    last_round: LastRound,
    /// When it was first seeded since it started (`qseed wait`).
    first_seeded: Option<std::time::SystemTime>,
    /// The target's injection series, looked up on its first injection and kept: a round then
    /// costs no label allocation or hashing.
    injected: Option<InjectedMeters>,
}

/// How a target's last round went, as far as systemd's STATUS= line tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LastRound {
    NotYet,
    Seeded,
    NoEntropy,
    HsmError,
}

/// Handles on one target's series in their families (a handle shares the series' value).
#[derive(Debug, Clone)]
struct InjectedMeters {
    ok: Counter,
    bytes: Counter,
    last: Gauge<f64, std::sync::atomic::AtomicU64>,
}

pub type PoolStats = Arc<dyn Fn() -> StatsSnapshot + Send + Sync>;

/// All of qseed's metrics; shared by the service, the pool and the HTTP endpoint.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    injections: Family<InjectionLabels, Counter>,
    injected_bytes: Family<TargetLabels, Counter>,
    flushed_bytes: Family<TargetLabels, Counter>,
    last_injection: Family<TargetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    target_state: Family<StateLabels, Gauge>,
    /// Each target's period and the start of its loop: with the last injection's time, the
    /// alerting rules find a target not seeded within twice its period (never seeded too).
    target_period: Family<TargetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    target_started: Family<TargetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    requests: Family<StatusLabels, Counter>,
    request_seconds: Histogram,
    /// 1 when the last request to the entropy source succeeded, else 0.
    source_up: Gauge,
    last_source_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    targets: Mutex<HashMap<String, TargetStatus>>,
    round_done: tokio::sync::Notify,
    /// Bumped whenever a target starts, stops or goes away: watchers refresh systemd's STATUS=.
    states: tokio::sync::watch::Sender<u64>,
    /// The reason label each stopped target's state metric carries, to remove it again.
    stopped_reasons: Mutex<HashMap<String, String>>,
    /// Why the telemetry endpoint is not serving, while it is not (see `set_telemetry_problem`).
    telemetry_problem: Mutex<Option<String>>,
}

impl Metrics {
    /// `pool` gives the pool's counters (bytes downloaded, held, refused, ...) at each scrape.
    pub fn new(pool: Option<PoolStats>) -> Arc<Self> {
        Self::watching(pool, None)
    }

    /// [`Metrics::new`], also reporting the PKCS#11 modules' re-initializations.
    pub fn watching(pool: Option<PoolStats>, modules: Option<crate::hsm::Modules>) -> Arc<Self> {
        Self::watching_sources(pool, modules, None)
    }

    /// [`Metrics::watching`], also reporting each of several entropy sources.
    pub fn watching_sources(
        pool: Option<PoolStats>,
        modules: Option<crate::hsm::Modules>,
        sources: Option<SourceStats>,
    ) -> Arc<Self> {
        let mut registry = Registry::with_prefix("qseed");
        if let Some(sources) = sources {
            registry.register_collector(Box::new(SourcesCollector(sources)));
        }
        if let Some(stats) = pool {
            registry.register_collector(Box::new(PoolCollector(stats)));
        }
        if let Some(modules) = modules {
            registry.register_collector(Box::new(ModuleCollector(modules)));
        }
        registry.register_collector(Box::new(GeneratorAlerts));
        let injections = Family::<InjectionLabels, Counter>::default();
        registry.register(
            "injections",
            "C_SeedRandom rounds per target and result (ok, source_error, hsm_error)",
            injections.clone(),
        );
        let injected_bytes = Family::<TargetLabels, Counter>::default();
        registry.register(
            "injected_bytes",
            "Bytes injected with C_SeedRandom per target",
            injected_bytes.clone(),
        );
        let flushed_bytes = Family::<TargetLabels, Counter>::default();
        registry.register(
            "flushed_bytes",
            "Bytes left in the pool at a stop and injected then, per target (pool.flush_timeout)",
            flushed_bytes.clone(),
        );
        let last_injection = Family::<TargetLabels, Gauge<f64, _>>::default();
        registry.register(
            "last_injection_timestamp_seconds",
            "Unix time of the last successful injection per target",
            last_injection.clone(),
        );
        let target_state = Family::<StateLabels, Gauge>::default();
        registry.register(
            "target_state",
            "1 for the target's current state (active or stopped, with the reason)",
            target_state.clone(),
        );
        let target_period = Family::<TargetLabels, Gauge<f64, _>>::default();
        registry.register(
            "target_period_seconds",
            "Each target's period: time between injections",
            target_period.clone(),
        );
        let target_started = Family::<TargetLabels, Gauge<f64, _>>::default();
        registry.register(
            "target_started_timestamp_seconds",
            "Unix time the target's loop started (at the start, or when a reload changed it)",
            target_started.clone(),
        );
        let requests = Family::<StatusLabels, Counter>::default();
        registry.register(
            "source_requests",
            "Requests to the entropy source by outcome (HTTP status or failure kind)",
            requests.clone(),
        );
        let request_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "source_request_duration_seconds",
            "Time from sending a request to the entropy source to its checked answer",
            request_seconds.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        registry.register(
            "build_info",
            "Always 1; the version of qseed running",
            build_info.clone(),
        );
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        let source_up = Gauge::default();
        registry.register(
            "source_up",
            "1 when the last request to the entropy source succeeded, 0 when it failed or none \
             was made yet",
            source_up.clone(),
        );
        let last_source_success = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "source_last_success_timestamp_seconds",
            "When the last request to the entropy source succeeded (Unix time; 0: never)",
            last_source_success.clone(),
        );
        Arc::new(Self {
            registry,
            source_up,
            last_source_success,
            injections,
            injected_bytes,
            flushed_bytes,
            last_injection,
            target_state,
            target_period,
            target_started,
            requests,
            request_seconds,
            targets: Mutex::new(HashMap::new()),
            round_done: tokio::sync::Notify::new(),
            states: tokio::sync::watch::Sender::new(0),
            stopped_reasons: Mutex::new(HashMap::new()),
            telemetry_problem: Mutex::new(None),
        })
    }

    /// Forgets a target a reload removed.
    pub fn forget_target(&self, target: &str) {
        self.targets_lock().remove(target);
        let labels = TargetLabels {
            target: target.into(),
        };
        self.target_period.remove(&labels);
        self.target_started.remove(&labels);
        self.last_injection.remove(&labels);
        self.clear_state(target);
        self.changed();
    }

    /// A receiver that sees every change of a target's state.
    pub fn watch_states(&self) -> tokio::sync::watch::Receiver<u64> {
        self.states.subscribe()
    }

    /// One line for systemd's STATUS=, saying what is wrong first:
    /// `seeding 1 of 4 targets; no entropy for hsm-1, hsm-3 (the source is failing);
    /// failing: hsm-4; stopped: hsm-2 (pin)`. A target counts as seeding until a round
    /// fails; one whose last round found no entropy is not called seeded.
    pub fn status_line(&self) -> String {
        let targets = self.targets_lock();
        let mut names: Vec<&String> = targets.keys().collect();
        names.sort();
        let (mut starving, mut failing, mut stopped) = (Vec::new(), Vec::new(), Vec::new());
        for name in names {
            let t = &targets[name];
            if let Some(reason) = &t.stopped {
                stopped.push(format!("{name} ({reason})"));
                continue;
            }
            match t.last_round {
                LastRound::NoEntropy => starving.push(name.as_str()),
                LastRound::HsmError => failing.push(name.as_str()),
                LastRound::NotYet | LastRound::Seeded => {}
            }
        }
        let seeding = targets.len() - starving.len() - failing.len() - stopped.len();
        let mut line = format!(
            "seeding {seeding} of {} target{}",
            targets.len(),
            if targets.len() == 1 { "" } else { "s" }
        );
        if !starving.is_empty() {
            line.push_str(&format!(
                "; no entropy for {} (the entropy source is failing: rounds skipped)",
                starving.join(", ")
            ));
        }
        if !failing.is_empty() {
            line.push_str(&format!("; failing: {}", failing.join(", ")));
        }
        if !stopped.is_empty() {
            line.push_str(&format!("; stopped: {}", stopped.join(", ")));
        }
        if let Some(note) = self.telemetry_note() {
            line.push_str("; ");
            line.push_str(&note);
        }
        line
    }

    /// Each target: when it was first seeded since it started, and why it stopped, if it
    /// did (for `qseed wait`, through [`crate::service::seeded`]).
    pub fn seeded_report(&self) -> Vec<(String, Option<std::time::SystemTime>, Option<String>)> {
        let targets = self.targets_lock();
        let mut report: Vec<_> = targets
            .iter()
            .map(|(name, t)| {
                let why = t
                    .stopped
                    .as_ref()
                    .map(|reason| format!("{reason}: {}", t.stop_message.as_deref().unwrap_or("")));
                (name.clone(), t.first_seeded, why)
            })
            .collect();
        report.sort_by(|a, b| a.0.cmp(&b.0));
        report
    }

    /// Whether every registered target has stopped for good (none left to seed).
    pub fn all_stopped(&self) -> bool {
        let targets = self.targets_lock();
        !targets.is_empty() && targets.values().all(|t| t.stopped.is_some())
    }

    /// A problem of the telemetry endpoint (it could not bind its address), or none: shown
    /// in STATUS= and /readyz cannot say it, so the status line does.
    pub fn set_telemetry_problem(&self, problem: Option<String>) {
        *self
            .telemetry_problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = problem;
        self.changed();
    }

    fn telemetry_note(&self) -> Option<String> {
        self.telemetry_problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records how a target's round went; a change of kind refreshes STATUS=.
    fn note_round(&self, target: &str, how: LastRound) {
        let changed = match self.targets_lock().get_mut(target) {
            Some(t) => {
                t.rounds += 1;
                std::mem::replace(&mut t.last_round, how) != how
            }
            None => false,
        };
        if changed {
            self.changed();
        }
    }

    fn changed(&self) {
        self.states.send_modify(|n| *n += 1);
    }

    pub fn target_started(&self, target: &str, period: Duration) {
        self.targets_lock().insert(
            target.to_string(),
            TargetStatus {
                period,
                started: Instant::now(),
                last_ok: None,
                stopped: None,
                stop_message: None,
                rounds: 0,
                last_round: LastRound::NotYet,
                first_seeded: None,
                injected: None,
            },
        );
        let labels = TargetLabels {
            target: target.into(),
        };
        self.target_period
            .get_or_create(&labels)
            .set(period.as_secs_f64());
        self.target_started.get_or_create(&labels).set(unix_now());
        // Counters exist from the start (at 0), so rate() and the dashboard see them before
        // the first injection, and the flush's bytes, which come at the stop, have a baseline.
        let _ = self.injected_bytes.get_or_create(&labels);
        let _ = self.flushed_bytes.get_or_create(&labels);
        self.set_state(target, "active", "");
        self.changed();
    }

    /// `bytes` of the pool's leftovers went into `target` at a stop.
    pub fn flushed(&self, target: &str, bytes: u64) {
        self.flushed_bytes
            .get_or_create(&TargetLabels {
                target: target.into(),
            })
            .inc_by(bytes);
    }

    pub fn injected(&self, target: &str, bytes: u64) {
        let record = |meters: &InjectedMeters| {
            meters.ok.inc();
            meters.bytes.inc_by(bytes);
            meters.last.set(unix_now());
        };
        let mut changed = false;
        let mut targets = self.targets_lock();
        match targets.get_mut(target) {
            Some(t) => {
                let meters = match &t.injected {
                    Some(meters) => meters,
                    None => t.injected.insert(self.injected_meters(target)),
                };
                record(meters);
                t.rounds += 1;
                t.last_ok = Some(Instant::now());
                let was = std::mem::replace(&mut t.last_round, LastRound::Seeded);
                // From failing to seeded is news for STATUS=, and the first seed for
                // `qseed wait`; a seed like the one before is not.
                changed = was != LastRound::Seeded || t.first_seeded.is_none();
                t.first_seeded
                    .get_or_insert_with(std::time::SystemTime::now);
            }
            None => record(&self.injected_meters(target)),
        }
        drop(targets);
        if changed {
            self.changed();
        }
        self.round_done.notify_waiters();
    }

    fn injected_meters(&self, target: &str) -> InjectedMeters {
        let labels = TargetLabels {
            target: target.into(),
        };
        InjectedMeters {
            ok: self
                .injections
                .get_or_create(&InjectionLabels {
                    target: target.into(),
                    result: "ok".into(),
                })
                .clone(),
            bytes: self.injected_bytes.get_or_create(&labels).clone(),
            last: self.last_injection.get_or_create(&labels).clone(),
        }
    }

    /// A failed round: `kind` is `source_error` or `hsm_error`.
    pub fn failed(&self, target: &str, kind: &str) {
        self.count(target, kind);
    }

    /// A target stopped for good: `reason` is the short label (`pin`), `message` the
    /// operator's explanation, shown by `/readyz`.
    pub fn target_stopped(&self, target: &str, reason: &str, message: &str) {
        if let Some(t) = self.targets_lock().get_mut(target) {
            t.stopped = Some(reason.to_string());
            t.stop_message = Some(message.to_string());
        }
        self.set_state(target, "stopped", reason);
        self.changed();
    }

    /// Waits until every registered target has finished its first round (seeded or not).
    pub async fn first_round_done(&self) {
        loop {
            let notified = self.round_done.notified();
            {
                let targets = self.targets_lock();
                if !targets.is_empty() && targets.values().all(|t| t.rounds > 0) {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Ready when no configured target has stopped and every one was seeded within twice its
    /// period (a target still in its first two periods counts as ready); otherwise the
    /// reasons.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let targets = self.targets_lock();
        let mut problems = Vec::new();
        let mut active = 0;
        for (name, t) in targets.iter() {
            if let Some(reason) = &t.stopped {
                problems.push(format!(
                    "{name}: stopped ({reason}): {}",
                    t.stop_message.as_deref().unwrap_or("")
                ));
                continue;
            }
            active += 1;
            let since = t.last_ok.unwrap_or(t.started);
            if since.elapsed() > 2 * t.period {
                problems.push(match t.last_ok {
                    Some(_) => format!("{name}: not seeded for {}s", since.elapsed().as_secs()),
                    None => format!("{name}: not seeded since start"),
                });
            }
        }
        for (target, why) in crate::hsm::clone_watch::alerts() {
            if targets.contains_key(&target) {
                problems.push(format!("{target}: cloned generator: {why}"));
            }
        }
        if active == 0 && problems.is_empty() {
            problems.push("no active target".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            problems.sort();
            Err(problems)
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    fn count(&self, target: &str, result: &str) {
        let how = if result == "source_error" {
            LastRound::NoEntropy
        } else {
            LastRound::HsmError
        };
        self.note_round(target, how);
        self.round_done.notify_waiters();
        self.injections
            .get_or_create(&InjectionLabels {
                target: target.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Sets the target's one state series, removing the one it had.
    fn set_state(&self, target: &str, state: &str, reason: &str) {
        self.clear_state(target);
        if state == "stopped" {
            self.stopped_reasons
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(target.to_string(), reason.to_string());
        }
        self.target_state
            .get_or_create(&StateLabels {
                target: target.into(),
                state: state.into(),
                reason: reason.into(),
            })
            .set(1);
    }

    fn clear_state(&self, target: &str) {
        let stopped_reason = self
            .stopped_reasons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(target)
            .unwrap_or_default();
        for (state, reason) in [("active", String::new()), ("stopped", stopped_reason)] {
            self.target_state.remove(&StateLabels {
                target: target.into(),
                state: state.into(),
                reason,
            });
        }
    }

    fn targets_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TargetStatus>> {
        self.targets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl RequestObserver for Metrics {
    fn request(&self, outcome: &str, seconds: f64) {
        self.requests
            .get_or_create(&StatusLabels {
                status: outcome.into(),
            })
            .inc();
        self.request_seconds.observe(seconds);
        if outcome == "200" {
            self.source_up.set(1);
            self.last_source_success.set(unix_now());
        } else {
            self.source_up.set(0);
        }
    }
}

/// Each of several entropy sources' figures (see `source::set`).
pub type SourceStats = Arc<dyn Fn() -> Vec<crate::source::set::MemberSnapshot> + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

/// `qseed_entropy_source_*{source}`: present when several sources are configured, but for
/// `qseed_entropy_source_block_unit{source,unit}`, present for every source that has one.
struct SourcesCollector(SourceStats);

impl std::fmt::Debug for SourcesCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourcesCollector")
    }
}

impl Collector for SourcesCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use crate::source::set::MemberSnapshot;
        let members = (self.0)();
        let units: Vec<_> = members
            .iter()
            .filter_map(|m| Some((m.name.clone(), m.block_unit?)))
            .collect();
        if !units.is_empty() {
            let mut family = encoder.encode_descriptor(
                "entropy_source_block_unit",
                "1 for the unit the source's server reads block_size in (bytes or kib; \
                 POST /api/v1/entropy only; see source.block_unit)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (source, unit) in units {
                let labels = BlockUnitLabels {
                    source,
                    unit: unit.to_string(),
                };
                ConstGauge::new(1i64).encode(family.encode_family(&labels)?)?;
            }
        }
        // What a paid source allows (issue 23, item 3): the token's expiry, the month.
        let expiries: Vec<_> = members
            .iter()
            .filter_map(|m| Some((m.name.clone(), m.token_expiry?)))
            .collect();
        if !expiries.is_empty() {
            let mut family = encoder.encode_descriptor(
                "source_token_expiry_timestamp_seconds",
                "Unix time the source's API token expires (tokens that are JWTs only)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (source, expiry) in expiries {
                let secs = expiry
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                ConstGauge::new(secs).encode(family.encode_family(&SourceLabels { source })?)?;
            }
        }
        type MonthField = fn(&crate::source::quota::MonthFigures) -> Option<u64>;
        let month: [(&str, &str, MonthField); 3] = [
            (
                "source_month_bytes",
                "Bytes bought from the source this calendar month (UTC), all qseed processes of \
                 the state folder",
                |m| Some(m.bytes),
            ),
            (
                "source_month_forecast_bytes",
                "Bytes the source will have sold by the month's end at this month's pace",
                |m| Some(m.forecast),
            ),
            (
                "source_monthly_budget_bytes",
                "source.monthly_budget: bytes the source may sell per month",
                |m| m.budget,
            ),
        ];
        for (name, help, field) in month {
            let values: Vec<_> = members
                .iter()
                .filter_map(|m| Some((m.name.clone(), field(m.month.as_ref()?)?)))
                .collect();
            if values.is_empty() {
                continue;
            }
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (source, value) in values {
                ConstGauge::new(value as i64)
                    .encode(family.encode_family(&SourceLabels { source })?)?;
            }
        }
        // The per-source figures repeat the pool's when there is one source.
        if members.len() < 2 {
            return Ok(());
        }
        type Field = fn(&MemberSnapshot) -> u64;
        type Flag = fn(&MemberSnapshot) -> bool;
        let counters: [(&str, &str, Field); 4] = [
            ("entropy_source_requests", "Requests to each source", |m| {
                m.requests
            }),
            (
                "entropy_source_failures",
                "Failed requests to each source",
                |m| m.failures,
            ),
            (
                "entropy_source_bytes",
                "Bytes each source delivered that passed its own health tests",
                |m| m.bytes,
            ),
            (
                "entropy_source_health_rejected_blocks",
                "Blocks of each source refused by its own health tests",
                |m| m.rejected_blocks,
            ),
        ];
        for (name, help, field) in counters {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for m in &members {
                let labels = SourceLabels {
                    source: m.name.clone(),
                };
                ConstCounter::new(field(m)).encode(family.encode_family(&labels)?)?;
            }
        }
        let gauges: [(&str, &str, Flag); 2] = [
            (
                "entropy_source_up",
                "1 when the source's last request succeeded (or none was made yet)",
                |m| m.up,
            ),
            (
                "entropy_source_in_use",
                "1 for the source that served the last request (with mixing: each one mixed)",
                |m| m.in_use,
            ),
        ];
        for (name, help, field) in gauges {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for m in &members {
                let labels = SourceLabels {
                    source: m.name.clone(),
                };
                ConstGauge::new(i64::from(field(m))).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModuleLabels {
    module: String,
}

/// `qseed_module_resets_total{module}` and `qseed_module_down{module}`.
#[derive(Debug)]
struct ModuleCollector(crate::hsm::Modules);

impl Collector for ModuleCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.stats();
        let mut resets = encoder.encode_descriptor(
            "module_resets",
            "Re-initializations (C_Finalize + C_Initialize) of a PKCS#11 module after its device \
             or connection was lost",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for s in &stats {
            let labels = ModuleLabels {
                module: s.path.clone(),
            };
            ConstCounter::new(s.resets).encode(resets.encode_family(&labels)?)?;
        }
        let mut down = encoder.encode_descriptor(
            "module_down",
            "1 while a PKCS#11 module is being recovered after its device or connection was lost",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for s in &stats {
            let labels = ModuleLabels {
                module: s.path.clone(),
            };
            ConstGauge::new(i64::from(s.down)).encode(down.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// `qseed_generator_output_alert{target}`: 1 for each target whose token's output repeated
/// or matched another's (`check_output`; see `hsm::clone_watch`).
#[derive(Debug)]
struct GeneratorAlerts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    target: String,
}

impl Collector for GeneratorAlerts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let alerts = crate::hsm::clone_watch::alerts();
        if alerts.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "generator_output_alert",
            "1 when the token's generator output repeated, or matched another token's, after \
             seeding (check_output): cloned generator state",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for target in alerts.into_keys() {
            ConstGauge::new(1i64).encode(family.encode_family(&AlertLabels { target })?)?;
        }
        Ok(())
    }
}

struct PoolCollector(PoolStats);

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolCollector")
    }
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = (self.0)();
        let counters: [(&str, &str, u64); 6] = [
            (
                "downloaded_bytes",
                "Bytes of entropy downloaded",
                s.bytes_downloaded,
            ),
            (
                "health_rejected_blocks",
                "Blocks refused by the health tests (SP 800-90B RCT, APT, replay)",
                s.blocks_rejected,
            ),
            (
                "health_rejected_bytes",
                "Bytes refused by the health tests",
                s.bytes_rejected,
            ),
            (
                "expired_bytes",
                "Bytes wiped unused after pool.max_age",
                s.bytes_expired,
            ),
            (
                "handed_out_bytes",
                "Bytes taken from the pool for injections (injected or wiped after a failed call)",
                s.bytes_handed_out,
            ),
            (
                "skipped_rounds",
                "Rounds skipped for want of entropy",
                s.rounds_skipped,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        let locks = ConstCounter::new(crate::secret::lock_failures());
        let metric = encoder.encode_descriptor(
            "memory_lock_failures",
            "Entropy buffers that could not be locked in RAM (raise RLIMIT_MEMLOCK)",
            None,
            locks.metric_type(),
        )?;
        locks.encode(metric)?;
        let gauge = ConstGauge::new(i64::from(crate::source::simulated_accepted()));
        let metric = encoder.encode_descriptor(
            "entropy_simulated",
            "1 once an answer of qseed's API simulator was accepted (source.allow_simulated): \
             the entropy is simulated, not quantum; 0 otherwise",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)?;
        let gauge = ConstGauge::new(s.bytes_held as i64);
        let metric = encoder.encode_descriptor(
            "pool_bytes",
            "Bytes held in the pool, not yet injected",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_and_source_health() {
        let metrics = Metrics::new(None);
        let text = metrics.render();
        assert!(
            text.contains(&format!(
                "qseed_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(text.contains("qseed_source_up 0"), "{text}");
        assert!(
            text.contains("qseed_source_last_success_timestamp_seconds 0"),
            "{text}"
        );
        metrics.request("200", 0.02);
        let text = metrics.render();
        assert!(text.contains("qseed_source_up 1"), "{text}");
        let last_success = |text: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix("qseed_source_last_success_timestamp_seconds "))
                .unwrap()
                .parse()
                .unwrap()
        };
        let stamp = last_success(&text);
        assert!(stamp > 1.7e9, "{stamp}");
        metrics.request("503", 0.02);
        let text = metrics.render();
        assert!(text.contains("qseed_source_up 0"), "{text}");
        // The last success stays when a request fails.
        assert_eq!(last_success(&text), stamp);
    }

    #[test]
    fn renders_prometheus_names_and_readiness() {
        let metrics = Metrics::new(None);
        metrics.target_started("a", Duration::from_secs(10));
        metrics.injected("a", 48);
        metrics.failed("a", "source_error");
        metrics.request("200", 0.02);
        let text = metrics.render();
        assert!(
            text.contains(r#"qseed_injections_total{target="a",result="ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"qseed_injected_bytes_total{target="a"} 48"#),
            "{text}"
        );
        assert!(
            text.contains(r#"qseed_source_requests_total{status="200"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("qseed_source_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains(r#"qseed_target_state{target="a",state="active",reason=""} 1"#));
        assert!(metrics.readiness().is_ok());
        metrics.target_started("b", Duration::from_secs(10));
        metrics.injected("a", 48);
        assert_eq!(metrics.status_line(), "seeding 2 of 2 targets");
        metrics.target_stopped("a", "pin", "C_Login: CKR_PIN_INCORRECT");
        let text = metrics.render();
        assert!(text.contains(r#"qseed_target_state{target="a",state="stopped",reason="pin"} 1"#));
        assert!(!text.contains(r#"target="a",state="active""#), "{text}");
        // One stopped target is enough to be unready, with the reason.
        assert_eq!(
            metrics.readiness(),
            Err(vec![
                "a: stopped (pin): C_Login: CKR_PIN_INCORRECT".to_string()
            ])
        );
        assert_eq!(
            metrics.status_line(),
            "seeding 1 of 2 targets; stopped: a (pin)"
        );
        assert!(!metrics.all_stopped());
        metrics.target_stopped("b", "pin", "C_Login: CKR_PIN_INCORRECT");
        assert!(metrics.all_stopped());
        metrics.forget_target("a");
        metrics.target_started("b", Duration::from_secs(10));
        assert!(metrics.readiness().is_ok());
        assert!(!metrics.render().contains(r#"target="a",state"#));
        metrics.forget_target("b");
        assert_eq!(
            metrics.readiness(),
            Err(vec!["no active target".to_string()])
        );
    }

    #[test]
    fn a_target_late_by_two_periods_is_unready() {
        let metrics = Metrics::new(None);
        metrics.target_started("slow", Duration::from_millis(10));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            metrics.readiness(),
            Err(vec!["slow: not seeded since start".to_string()])
        );
        metrics.injected("slow", 1);
        assert!(metrics.readiness().is_ok());
    }

    /// Issue 22, item 3: rounds skipped for want of entropy show in STATUS=, and the line
    /// comes back when the source does; each change of kind wakes the STATUS= watcher.
    #[test]
    fn the_status_line_tells_a_failing_source_and_failing_targets() {
        let metrics = Metrics::new(None);
        let mut watch = metrics.watch_states();
        metrics.target_started("hsm-1", Duration::from_secs(1));
        metrics.target_started("hsm-2", Duration::from_secs(1));
        metrics.injected("hsm-1", 48);
        metrics.injected("hsm-2", 48);
        watch.mark_unchanged();
        assert_eq!(metrics.status_line(), "seeding 2 of 2 targets");
        for _ in 0..20 {
            metrics.failed("hsm-1", "source_error");
            metrics.failed("hsm-2", "source_error");
        }
        assert!(watch.has_changed().unwrap());
        watch.mark_unchanged();
        assert_eq!(
            metrics.status_line(),
            "seeding 0 of 2 targets; no entropy for hsm-1, hsm-2 (the entropy source is \
             failing: rounds skipped)"
        );
        metrics.injected("hsm-1", 48);
        metrics.failed("hsm-2", "hsm_error");
        assert!(watch.has_changed().unwrap());
        assert_eq!(
            metrics.status_line(),
            "seeding 1 of 2 targets; failing: hsm-2"
        );
        metrics.set_telemetry_problem(Some("telemetry: 127.0.0.1:9750 is in use".into()));
        assert_eq!(
            metrics.status_line(),
            "seeding 1 of 2 targets; failing: hsm-2; telemetry: 127.0.0.1:9750 is in use"
        );
        // A round that goes as the last one did wakes nobody.
        watch.mark_unchanged();
        metrics.injected("hsm-1", 48);
        metrics.failed("hsm-2", "hsm_error");
        assert!(!watch.has_changed().unwrap());
    }
}

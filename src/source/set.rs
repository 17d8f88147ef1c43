//! Several entropy sources behind one: failover between them, or mixing (XOR) so that no
//! single source must be trusted.
//!
//! - **failover** (default): the first healthy source in the order written serves; a failed
//!   request (or an answer the source's health tests refuse entirely) passes the request on to
//!   the next source at once. The failed source is then tried in the background, by a probe of
//!   one block after 5 s, doubling to at most 60 s; requests do not wait for it meanwhile. When
//!   a probe succeeds, the source is healthy again and, being earlier in the order, takes back
//!   over at the next request, which also uses the probe's block (no byte bought is lost).
//! - **mix**: every request goes to every source at once; each source's answer passes that
//!   source's own health tests, and the bytes handed on are the XOR of at least two sources'
//!   fresh bytes (each source's bytes used once, in one XOR). With fewer than two answers the
//!   request fails (targets skip their round and the outage is logged), unless
//!   `mix_fallback = "failover"` lets one source serve alone.
//!
//! With several sources each one's blocks pass health tests of their own (SP 800-90B tests a
//! noise source, not a blend); the pool then tests what it receives, and keeps the replay
//! record, as for a single source. A set of one source is that source, unchanged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::device::DeviceSource;
use super::proxy::Route;
use super::qrypt::QryptClient;
use super::{EntropySource, SourceError, BLOCK_LEN};
use crate::health::{self, HealthConfig, HealthTests};
use crate::secret::EntropyBytes;

/// `[pool] sources`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Failover,
    /// `fallback`: with one healthy source left, serve from it alone instead of failing.
    Mix { fallback: bool },
}

/// First wait after a source failed before it is tried first again; doubles per failure.
const RETRY_FIRST: Duration = Duration::from_secs(5);
/// Longest such wait: a recovered preferred source takes over within a minute.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// One configured source.
#[derive(Debug, Clone)]
pub enum AnySource {
    Qrypt(Box<QryptClient>),
    Device(DeviceSource),
}

impl AnySource {
    pub async fn fetch(&self, blocks: usize) -> Result<EntropyBytes, SourceError> {
        match self {
            AnySource::Qrypt(s) => s.fetch(blocks).await,
            AnySource::Device(s) => s.fetch(blocks).await,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            AnySource::Qrypt(s) => s.describe(),
            AnySource::Device(s) => s.describe(),
        }
    }

    pub fn route(&self) -> Option<&Route> {
        match self {
            AnySource::Qrypt(s) => s.route(),
            AnySource::Device(_) => None,
        }
    }
}

impl EntropySource for AnySource {
    async fn fetch(&self, blocks: usize) -> Result<EntropyBytes, SourceError> {
        AnySource::fetch(self, blocks).await
    }

    fn describe(&self) -> String {
        AnySource::describe(self)
    }

    fn route(&self) -> Option<&Route> {
        AnySource::route(self)
    }
}

/// A source of the set, its health tests and its record.
#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub source: AnySource,
    health: Mutex<HealthTests>,
    requests: AtomicU64,
    failures: AtomicU64,
    bytes: AtomicU64,
    rejected_blocks: AtomicU64,
    up: AtomicBool,
    in_use: AtomicBool,
    retry: Mutex<Retry>,
    /// A block a background probe fetched, handed out with the member's next answer.
    spare: Mutex<Option<EntropyBytes>>,
}

#[derive(Debug, Default)]
struct Retry {
    failures_in_row: u32,
    next_try: Option<Instant>,
    /// A background probe is on its way (failover).
    probing: bool,
}

/// A member's figures for the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSnapshot {
    pub name: String,
    pub requests: u64,
    pub failures: u64,
    pub bytes: u64,
    pub rejected_blocks: u64,
    /// The last request succeeded (or none was made yet).
    pub up: bool,
    /// It served the last request (failover), or took part in the last mix.
    pub in_use: bool,
    /// How the source reads `block_size` now (`POST /api/v1/entropy` only).
    pub block_unit: Option<&'static str>,
    /// The API token's expiry, when it is a JWT.
    pub token_expiry: Option<std::time::SystemTime>,
    /// This month's bytes bought, forecast and budget (API sources).
    pub month: Option<super::quota::MonthFigures>,
}

impl Member {
    pub fn new(name: String, source: AnySource, health: HealthConfig) -> Self {
        Self {
            name,
            source,
            health: Mutex::new(HealthTests::new(health)),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            rejected_blocks: AtomicU64::new(0),
            up: AtomicBool::new(true),
            in_use: AtomicBool::new(false),
            retry: Mutex::new(Retry::default()),
            spare: Mutex::new(None),
        }
    }

    /// Not failing: no failure since its last success.
    fn healthy(&self) -> bool {
        self.retry_lock().failures_in_row == 0
    }

    /// The probe's block, if any, in front of `bytes`.
    fn with_spare(&self, bytes: EntropyBytes) -> EntropyBytes {
        let Some(spare) = self
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return bytes;
        };
        let mut joined = EntropyBytes::zeroed(spare.len() + bytes.len());
        joined.expose_mut()[..spare.len()].copy_from_slice(spare.expose());
        joined.expose_mut()[spare.len()..].copy_from_slice(bytes.expose());
        joined
    }

    fn ready(&self, now: Instant) -> bool {
        self.retry_lock().next_try.is_none_or(|t| t <= now)
    }

    fn retry_lock(&self) -> std::sync::MutexGuard<'_, Retry> {
        self.retry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One request, its answer screened by this source's own health tests (`screen`).
    async fn fetch(&self, blocks: usize, screen: bool) -> Result<EntropyBytes, SourceError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let result = match self.source.fetch(blocks).await {
            Ok(bytes) if screen => {
                let (kept, failures) = {
                    let mut tests = self.health.lock().unwrap_or_else(PoisonError::into_inner);
                    health::screen(&mut tests, bytes, BLOCK_LEN)
                };
                self.rejected_blocks
                    .fetch_add(failures.len() as u64, Ordering::Relaxed);
                if let Some(first) = failures.first() {
                    tracing::warn!(
                        source = %self.name,
                        "source {}: health tests refused {} of {blocks} block(s): {first}",
                        self.name,
                        failures.len()
                    );
                }
                if kept.is_empty() {
                    Err(SourceError::Unhealthy {
                        blocks,
                        first: failures.first().map(|f| f.to_string()).unwrap_or_default(),
                    })
                } else {
                    Ok(kept)
                }
            }
            other => other,
        };
        match &result {
            Ok(bytes) => {
                self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.up.store(true, Ordering::Relaxed);
                *self.retry_lock() = Retry::default();
            }
            Err(_) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.up.store(false, Ordering::Relaxed);
                let mut retry = self.retry_lock();
                let wait = RETRY_FIRST
                    .saturating_mul(1 << retry.failures_in_row.min(8))
                    .min(RETRY_MAX);
                retry.failures_in_row += 1;
                retry.next_try = Some(Instant::now() + wait);
            }
        }
        result
    }

    /// When the retry time has come, one block from this failing source, in the background;
    /// again later while it fails, until it answers (then its block waits in `spare`) or the
    /// set is dropped (a reload).
    fn start_probe(set: std::sync::Weak<Inner>, index: usize) {
        tokio::spawn(async move {
            loop {
                let next_try = {
                    let Some(inner) = set.upgrade() else { return };
                    let member = &inner.members[index];
                    let retry = member.retry_lock();
                    if retry.failures_in_row == 0 {
                        drop(retry);
                        return member.stop_probing();
                    }
                    retry.next_try
                };
                if let Some(at) = next_try {
                    tokio::time::sleep_until(at).await;
                }
                let Some(inner) = set.upgrade() else { return };
                let member = &inner.members[index];
                if let Ok(block) = member.fetch(1, true).await {
                    *member.spare.lock().unwrap_or_else(PoisonError::into_inner) = Some(block);
                    tracing::info!(
                        source = %member.name,
                        "entropy source {} answers again", member.name
                    );
                    return member.stop_probing();
                }
            }
        });
    }

    fn stop_probing(&self) {
        self.retry_lock().probing = false;
    }

    pub fn snapshot(&self) -> MemberSnapshot {
        MemberSnapshot {
            name: self.name.clone(),
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            rejected_blocks: self.rejected_blocks.load(Ordering::Relaxed),
            up: self.up.load(Ordering::Relaxed),
            in_use: self.in_use.load(Ordering::Relaxed),
            block_unit: match &self.source {
                AnySource::Qrypt(client) => client.block_unit(),
                AnySource::Device(_) => None,
            },
            token_expiry: match &self.source {
                AnySource::Qrypt(client) => client.token_expiry(),
                AnySource::Device(_) => None,
            },
            month: match &self.source {
                AnySource::Qrypt(client) => Some(client.month_figures()),
                AnySource::Device(_) => None,
            },
        }
    }
}

/// The configured sources, as one [`EntropySource`]. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct SourceSet {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    members: Vec<Member>,
    mode: Mode,
    /// What served last: a member's index (failover), or how many took part (mix), to log
    /// each change once.
    last: Mutex<Option<Served>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Served {
    One(usize),
    Mixed(Vec<usize>),
}

impl SourceSet {
    pub fn new(members: Vec<Member>, mode: Mode) -> Self {
        Self {
            inner: Arc::new(Inner {
                members,
                mode,
                last: Mutex::new(None),
            }),
        }
    }

    pub fn members(&self) -> &[Member] {
        &self.inner.members
    }

    pub fn mode(&self) -> Mode {
        self.inner.mode
    }

    pub fn member(&self, name: &str) -> Option<&Member> {
        self.inner.members.iter().find(|m| m.name == name)
    }

    /// The sources that served the last request, by name (`cloud`, or `cloud+appliance`).
    pub fn in_use(&self) -> Option<String> {
        let names: Vec<&str> = self
            .inner
            .members
            .iter()
            .filter(|m| m.in_use.load(Ordering::Relaxed))
            .map(|m| m.name.as_str())
            .collect();
        (!names.is_empty()).then(|| names.join("+"))
    }

    fn several(&self) -> bool {
        self.inner.members.len() > 1
    }

    async fn failover(&self, blocks: usize) -> Result<(EntropyBytes, String), SourceError> {
        let members = &self.inner.members;
        // Healthy sources in the order written; failing ones are probed in the background
        // and asked here only when no healthy one is left (the soonest due first).
        let mut order: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].healthy())
            .collect();
        let mut failing: Vec<usize> = (0..members.len())
            .filter(|&i| !members[i].healthy())
            .collect();
        failing.sort_by_key(|&i| members[i].retry_lock().next_try);
        order.extend(failing);
        let mut errors = Vec::new();
        for i in order {
            match members[i].fetch(blocks, self.several()).await {
                Ok(bytes) => {
                    self.served(Served::One(i), &errors);
                    return Ok((members[i].with_spare(bytes), members[i].name.clone()));
                }
                Err(e) => {
                    if self.several() {
                        let mut retry = members[i].retry_lock();
                        if !retry.probing {
                            retry.probing = true;
                            drop(retry);
                            Member::start_probe(Arc::downgrade(&self.inner), i);
                        }
                    }
                    errors.push((i, e));
                }
            }
        }
        if !self.several() {
            if let Some((_, e)) = errors.pop() {
                return Err(e);
            }
        }
        Err(SourceError::Sources(format!(
            "every entropy source failed: {}",
            describe_errors(members, &errors)
        )))
    }

    async fn mix(
        &self,
        blocks: usize,
        fallback: bool,
    ) -> Result<(EntropyBytes, String), SourceError> {
        let members = &self.inner.members;
        // Sources backing off after a failure sit out until their retry time: one that hangs
        // must not make every request wait for its timeout.
        let now = Instant::now();
        let asked: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].ready(now))
            .collect();
        let answers =
            futures_util::future::join_all(asked.iter().map(|&i| members[i].fetch(blocks, true)))
                .await;
        let mut fresh = Vec::new();
        let mut errors = Vec::new();
        for (&i, answer) in asked.iter().zip(answers) {
            match answer {
                Ok(bytes) => fresh.push((i, bytes)),
                Err(e) => errors.push((i, e)),
            }
        }
        for (i, member) in members.iter().enumerate() {
            if !asked.contains(&i) {
                errors.push((
                    i,
                    SourceError::Sources(format!(
                        "backing off after a failure, tried again in {}s",
                        member
                            .retry_lock()
                            .next_try
                            .map_or(0, |t| t.saturating_duration_since(now).as_secs().max(1))
                    )),
                ));
            }
        }
        if fresh.len() < 2 {
            if fallback {
                if let Some((i, bytes)) = fresh.pop() {
                    self.served(Served::One(i), &errors);
                    return Ok((bytes, members[i].name.clone()));
                }
            }
            self.served(Served::Mixed(Vec::new()), &errors);
            return Err(SourceError::Sources(format!(
                "mixing needs fresh bytes from two sources, and {} answered ({}); the round is \
                 skipped rather than seeded from one source (set pool.mix_fallback = \
                 \"failover\" to allow that)",
                match fresh.first() {
                    Some((i, _)) => format!("only {}", members[*i].name),
                    None => "none".into(),
                },
                describe_errors(members, &errors)
            )));
        }
        // Blocks a source's tests refused shorten its answer: mix over the shortest.
        let len = fresh.iter().map(|(_, b)| b.len()).min().unwrap_or(0);
        let used: Vec<usize> = fresh.iter().map(|(i, _)| *i).collect();
        let mut parts = fresh.into_iter().map(|(_, b)| b);
        let mut mixed = parts.next().unwrap_or_else(|| EntropyBytes::zeroed(0));
        mixed.truncate(len);
        for part in parts {
            for (out, byte) in mixed.expose_mut().iter_mut().zip(part.expose()) {
                *out ^= byte;
            }
            // `part` is wiped as it drops: each source's bytes are in one XOR only.
        }
        let names = used
            .iter()
            .map(|&i| members[i].name.as_str())
            .collect::<Vec<_>>()
            .join("+");
        self.served(Served::Mixed(used), &errors);
        Ok((mixed, names))
    }

    /// Marks what served, and logs a change of it once.
    fn served(&self, now: Served, errors: &[(usize, SourceError)]) {
        let members = &self.inner.members;
        for (i, m) in members.iter().enumerate() {
            let using = match &now {
                Served::One(j) => i == *j,
                Served::Mixed(used) => used.contains(&i),
            };
            m.in_use.store(using, Ordering::Relaxed);
        }
        if !self.several() {
            return;
        }
        let mut last = self
            .inner
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.as_ref() == Some(&now) {
            return;
        }
        let why = if errors.is_empty() {
            String::new()
        } else {
            format!(" ({})", describe_errors(members, errors))
        };
        match &now {
            Served::One(i) if last.is_none() && errors.is_empty() => tracing::info!(
                source = %members[*i].name,
                "entropy source in use: {}", members[*i].name
            ),
            Served::One(i) if matches!(self.inner.mode, Mode::Mix { .. }) => tracing::warn!(
                source = %members[*i].name,
                "mixing fell back to one source, {}: mix_fallback = \"failover\"{why}",
                members[*i].name
            ),
            Served::One(i) if errors.is_empty() => tracing::info!(
                source = %members[*i].name,
                "entropy source: back to {} (preferred)", members[*i].name
            ),
            Served::One(i) => tracing::warn!(
                source = %members[*i].name,
                "entropy source: switched to {}{why}", members[*i].name
            ),
            Served::Mixed(used) if used.is_empty() => {
                tracing::warn!("mixing stopped: fewer than two sources answer{why}")
            }
            Served::Mixed(used) => tracing::info!(
                "mixing {}{why}",
                used.iter()
                    .map(|&i| members[i].name.as_str())
                    .collect::<Vec<_>>()
                    .join(" + ")
            ),
        }
        *last = Some(now);
    }
}

fn describe_errors(members: &[Member], errors: &[(usize, SourceError)]) -> String {
    errors
        .iter()
        .map(|(i, e)| format!("{}: {e}", members[*i].name))
        .collect::<Vec<_>>()
        .join("; ")
}

impl EntropySource for SourceSet {
    async fn fetch(&self, blocks: usize) -> Result<EntropyBytes, SourceError> {
        self.fetch_from(blocks).await.map(|(bytes, _)| bytes)
    }

    async fn fetch_from(
        &self,
        blocks: usize,
    ) -> Result<(EntropyBytes, Option<String>), SourceError> {
        let (bytes, origin) = match self.inner.mode {
            Mode::Failover => self.failover(blocks).await?,
            Mode::Mix { fallback } => self.mix(blocks, fallback).await?,
        };
        Ok((bytes, self.several().then_some(origin)))
    }

    fn describe(&self) -> String {
        match &self.inner.members[..] {
            [one] => one.source.describe(),
            many => format!(
                "{} ({})",
                many.iter()
                    .map(|m| format!("{}: {}", m.name, m.source.describe()))
                    .collect::<Vec<_>>()
                    .join(", "),
                match self.inner.mode {
                    Mode::Failover => "failover, in this order",
                    Mode::Mix { .. } => "mixed",
                }
            ),
        }
    }

    fn route(&self) -> Option<&Route> {
        self.inner.members.first().and_then(|m| m.source.route())
    }

    fn sources(&self) -> Vec<MemberSnapshot> {
        self.inner.members.iter().map(Member::snapshot).collect()
    }
}

/// How long the host check waits for one name to resolve.
const RESOLVE_LIMIT: Duration = Duration::from_secs(5);

/// `mix` XORs sources so that no one server chooses the seed; two sources on one host (the
/// same name, or names that resolve to a shared address) hand that choice back to it. Checked
/// at start and at every reload. A name that does not resolve is compared by name only: the
/// source itself reports that it cannot be reached.
pub async fn refuse_mixing_one_host(
    specs: &[crate::config::SourceSpec],
    mode: Mode,
) -> Result<(), String> {
    if !matches!(mode, Mode::Mix { .. }) {
        return Ok(());
    }
    let mut seen: Vec<(&str, String, Vec<std::net::IpAddr>)> = Vec::new();
    for spec in specs {
        let crate::config::SourceSpecKind::Qrypt(api) = &spec.kind else {
            continue;
        };
        let Some(host) = api.url.host_str() else {
            continue;
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let port = api.url.port_or_known_default().unwrap_or(443);
        let addresses: Vec<std::net::IpAddr> = match tokio::time::timeout(
            RESOLVE_LIMIT,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(found)) => found.map(|a| a.ip()).collect(),
            _ => Vec::new(),
        };
        for (other, other_host, other_addresses) in &seen {
            let shared = addresses.iter().find(|a| other_addresses.contains(a));
            if *other_host == host || shared.is_some() {
                return Err(format!(
                    "pool.sources = \"mix\" XORs sources so that no one server chooses the \
                     seed, but sources {other:?} and {:?} reach one host ({}): that server \
                     would choose the \"mixed\" seed. Mix sources on different hosts, or use \
                     pool.sources = \"failover\"",
                    spec.name,
                    match shared {
                        Some(address) if *other_host != host => {
                            format!("{other_host} and {host} both resolve to {address}")
                        }
                        _ => host.clone(),
                    }
                ));
            }
        }
        seen.push((spec.name.as_str(), host, addresses));
    }
    Ok(())
}

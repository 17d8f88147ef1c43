//! `qseed run` (the service, with reload on SIGHUP) and `qseed once` (one round).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::error::Error;
use crate::hsm::{Modules, PinGuard};
use crate::pool::Pool;
use crate::service::reload_report::{self, ReloadStatus};
use crate::service::{self, shutdown, Outcome, Rounds, Service, TargetOutcome};
use crate::source::proxy::Route;
use crate::source::set::SourceSet;
use crate::source::EntropySource;
use crate::state::StateDir;
use crate::telemetry::{metrics::Metrics, server, systemd};

/// At most one reload per this interval: a burst of SIGHUPs becomes one reload (or two, the
/// second at the end of the interval), so signals cannot be used to hammer the HSMs.
pub const RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// The service: runs until SIGINT/SIGTERM. SIGHUP re-reads the configuration file; a new
/// configuration that fails its checks is reported and the running one stays.
pub async fn run(config_path: &Path) -> Result<(), Error> {
    let config = load(config_path)?;
    check_sources(&config).await?;
    crate::repeat::set_log_repeat(config.log_repeat);
    let client = make_client(&config)?;
    let guard = pin_guard(&config);
    open_ledger(&config);
    let modules = Modules::new();
    service::load_modules(&config.targets, &modules)
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    let stop = CancellationToken::new();
    shutdown::on_signals(stop.clone());
    let mut reloads = shutdown::reloads();
    announce(&config, &client);
    let pool = Arc::new(Pool::new(client, config.pool));
    if let Some(record) = replay_record(&config)? {
        pool.use_replay_record(record);
    }
    let metrics = metrics_for(&pool, &modules);
    let endpoint = config
        .telemetry_listen
        .map(|addr| tokio::spawn(serve_telemetry(addr, metrics.clone(), stop.clone())));
    systemd::spawn_watchdog(stop.clone());
    spawn_status_reports(metrics.clone());
    spawn_token_watch(pool.clone(), stop.clone());
    if let Some(folder) = StateDir::resolve(config.state_dir.as_deref())
        .folder()
        .and_then(|dir| crate::folder::StateFolder::open(dir).ok())
    {
        spawn_seeded_reports(metrics.clone(), folder);
    }
    let mut service = Service::start(
        pool.clone(),
        modules.clone(),
        guard,
        Rounds::Forever,
        stop.clone(),
        metrics.clone(),
    );
    service.set_signing(config.audit_signing.clone());
    service.apply(config.targets).await;
    // Where `qseed reload` (ExecReload=) learns each reload's outcome.
    let reports = StateDir::resolve(config.state_dir.as_deref())
        .folder()
        .and_then(|dir| crate::folder::StateFolder::open(dir).ok());
    let mut reload_request = String::new();
    let mut reload_due: Option<Instant> = None;
    let mut last_reload: Option<Instant> = None;
    let mut pending_reload: Option<tokio::task::JoinHandle<Result<(Config, SourceSet), Error>>> =
        None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = service.next_finished() => {
                if service.live() == 0 {
                    break;
                }
            }
            _ = reloads.recv() => {
                if reload_due.is_none() {
                    let now = Instant::now();
                    let due = last_reload.map_or(now, |last| (last + RELOAD_INTERVAL).max(now));
                    if due > now {
                        tracing::info!(
                            "SIGHUP: reloading in {} ms (at most one reload every {}s)",
                            (due - now).as_millis(),
                            RELOAD_INTERVAL.as_secs()
                        );
                    }
                    reload_due = Some(due);
                }
            }
            _ = tokio::time::sleep_until(reload_due.unwrap_or_else(Instant::now)),
                if reload_due.is_some() && pending_reload.is_none() =>
            {
                reload_due = None;
                last_reload = Some(Instant::now());
                systemd::reloading();
                if let Some(folder) = &reports {
                    reload_request = reload_report::take_request(folder);
                }
                tracing::info!("SIGHUP: reading {}", config_path.display());
                // On a task of its own: reading a file on a hung network mount, or a module
                // that does not return, must not keep this loop from SIGTERM.
                let (path, modules) = (config_path.to_path_buf(), modules.clone());
                pending_reload = Some(tokio::spawn(async move { reload(&path, &modules).await }));
            }
            reloaded = async {
                match pending_reload.as_mut() {
                    Some(reload) => reload.await,
                    None => std::future::pending().await,
                }
            },
                if pending_reload.is_some() =>
            {
                pending_reload = None;
                let reloaded = reloaded.unwrap_or_else(|e| {
                    Err(Error::Failed(format!("the reload failed: {e}")))
                });
                match reloaded {
                    Ok((new, new_client)) => {
                        announce(&new, &new_client);
                        if new.telemetry_listen != config.telemetry_listen {
                            tracing::warn!("telemetry.listen changes take effect at the next start");
                        }
                        if new.state_dir != config.state_dir {
                            tracing::warn!("service.state_dir changes take effect at the next start");
                        }
                        crate::repeat::set_log_repeat(new.log_repeat);
                        pool.reconfigure(new_client, new.pool);
                        service.set_signing(new.audit_signing.clone());
                        let applied = service.apply(new.targets).await;
                        let summary = format!(
                            "configuration reloaded from {}: {} target(s) unchanged (not \
                             re-seeded), {} changed and restarted, {} stopped before and tried \
                             again, {} added, {} removed",
                            config_path.display(),
                            applied.kept.len(),
                            applied.restarted.len(),
                            applied.retried.len(),
                            applied.started.len(),
                            applied.removed.len()
                        );
                        tracing::info!("SIGHUP: {summary}");
                        if let Some(folder) = &reports {
                            reload_report::report(folder, &ReloadStatus {
                                request: std::mem::take(&mut reload_request),
                                applied: true,
                                message: summary,
                            });
                        }
                        systemd::ready(&metrics.status_line());
                    }
                    Err(e) => {
                        tracing::error!(
                            "SIGHUP: the new configuration is refused, the running one stays: {e}"
                        );
                        if let Some(folder) = &reports {
                            reload_report::report(folder, &ReloadStatus {
                                request: std::mem::take(&mut reload_request),
                                applied: false,
                                message: format!(
                                    "the new configuration is refused, the running one stays: {e}"
                                ),
                            });
                        }
                        systemd::ready(&metrics.status_line());
                    }
                }
            }
        }
    }
    stop.cancel();
    let outcomes = service.finish().await;
    if let Some(endpoint) = endpoint {
        let _ = endpoint.await;
    }
    let outcome = service::teardown(outcomes, &pool, &modules).await;
    crate::telemetry::flush_held();
    summarize(&outcome);
    let current: Vec<&TargetOutcome> = outcome.targets.iter().filter(|t| !t.superseded).collect();
    if !current.is_empty() && current.iter().all(|t| t.stopped.is_some()) {
        return Err(Error::Target(
            "every target has stopped; fix the errors above and start qseed again".into(),
        ));
    }
    Ok(())
}

/// How long between tries to bind a telemetry address that was taken.
const TELEMETRY_RETRY: Duration = Duration::from_secs(10);

/// Serves the telemetry endpoint on `addr` until `stop`. Seeding never depends on it: an
/// address that cannot be bound (another process has the port) is a warning, said in STATUS=,
/// and tried again every [`TELEMETRY_RETRY`] until it can be bound (issue 22, item 10).
async fn serve_telemetry(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut warned = false;
    let listener = loop {
        match server::bind(addr).await {
            Ok(listener) => break listener,
            Err(e) => {
                if !warned {
                    tracing::warn!(
                        "cannot serve telemetry on {addr} ({e}): seeding goes on without \
                         /metrics and /readyz, and the address is tried again every {}s. Free \
                         the port, or set telemetry.listen to a free address or to \"off\"",
                        TELEMETRY_RETRY.as_secs()
                    );
                    warned = true;
                }
                metrics.set_telemetry_problem(Some(format!("telemetry not served: {addr}: {e}")));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(TELEMETRY_RETRY) => {}
                }
            }
        }
    };
    if warned {
        metrics.set_telemetry_problem(None);
    }
    if let Some(bound) = server::local_addr(&listener) {
        tracing::info!("telemetry on http://{bound}/metrics, /healthz and /readyz");
        if !bound.ip().is_loopback() {
            tracing::warn!(
                "telemetry listens on {bound}, which other machines can reach: it shows target \
                 names, token labels and serials, request counts and readiness (no secret). Set \
                 telemetry.listen to 127.0.0.1:9750 unless a monitoring network needs it"
            );
        }
    }
    let _ = server::serve(listener, metrics, stop).await;
}

/// READY=1 once every target ran its first round and at least one is still seeding, then
/// STATUS= whenever a target starts, stops, goes away or its rounds start or stop failing, so
/// `systemctl status qseed` says what is seeded and what is not. When every target stopped
/// in its first round (every PIN refused), READY=1 is never sent: qseed exits 4 and
/// `systemctl start` fails, as it should.
fn spawn_status_reports(metrics: Arc<Metrics>) {
    tokio::spawn(async move {
        let mut states = metrics.watch_states();
        metrics.first_round_done().await;
        states.mark_unchanged();
        if metrics.all_stopped() {
            systemd::status(&metrics.status_line());
            return;
        }
        systemd::ready(&metrics.status_line());
        while states.changed().await.is_ok() {
            systemd::status(&metrics.status_line());
        }
    });
}

/// How often a running service looks at its API tokens' expiry.
const TOKEN_WATCH: Duration = Duration::from_secs(3600);

/// Warns again, while the service runs, when an API token that is a JWT comes within 30, 7
/// and 1 day(s) of its expiry, and when it has expired (at the start, `announce` says it).
fn spawn_token_watch<S: EntropySource + 'static>(pool: Arc<Pool<S>>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut told: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        let now = std::time::SystemTime::now();
        for member in pool.source().sources() {
            if let Some(stage) = member
                .token_expiry
                .and_then(|e| crate::source::quota::expiry_stage(e, now))
            {
                told.insert(member.name, stage);
            }
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(TOKEN_WATCH) => {}
            }
            let now = std::time::SystemTime::now();
            for member in pool.source().sources() {
                let Some(expiry) = member.token_expiry else {
                    continue;
                };
                let Some(stage) = crate::source::quota::expiry_stage(expiry, now) else {
                    continue;
                };
                if told.get(&member.name) != Some(&stage) {
                    if let Some(warning) = crate::source::quota::expiry_warning(expiry, now) {
                        tracing::warn!("source {:?}: {warning}", member.name);
                    }
                    told.insert(member.name, stage);
                }
            }
        }
    });
}

/// Keeps `<state>/seeded` current for `qseed wait` (see [`crate::service::seeded`]): written
/// at the start (nothing seeded yet) and at every change of a target's state.
fn spawn_seeded_reports(metrics: Arc<Metrics>, folder: crate::folder::StateFolder) {
    tokio::spawn(async move {
        let mut states = metrics.watch_states();
        loop {
            let report = metrics.seeded_report();
            let write = {
                let folder = &folder;
                tokio::task::block_in_place(|| crate::service::seeded::write(folder, &report))
            };
            if let Err(e) = write {
                tracing::warn!(
                    "cannot write {}: {e}; `qseed wait` will not see this run's seeds",
                    folder.file_path("seeded").display()
                );
            }
            if states.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The replay record of the state folder (see [`crate::pool::replay`]), shared with every
/// qseed process that uses the folder; none (this process's memory) when there is no usable
/// state folder. A damaged record is an error: qseed does not start until it is reset.
pub fn replay_record(config: &Config) -> Result<Option<crate::pool::replay::SharedRecord>, Error> {
    let state = StateDir::resolve(config.state_dir.as_deref());
    let Some(folder) = state.folder() else {
        tracing::warn!(
            "the replay check remembers blocks for this process only: {}",
            match &state {
                StateDir::Memory { why } => why.as_str(),
                StateDir::Folder(_) => "",
            }
        );
        return Ok(None);
    };
    crate::pool::replay::SharedRecord::open(folder, crate::pool::health::REPLAY_MEMORY)
        .map(Some)
        .map_err(Error::Config)
}

/// Opens the audit ledger in the state folder (see [`crate::telemetry::ledger`]); without
/// a usable state folder the audit records are in the log only, which is said once.
pub fn open_ledger(config: &Config) {
    match StateDir::resolve(config.state_dir.as_deref()) {
        StateDir::Folder(dir) => {
            if let Err(e) = crate::telemetry::ledger::install(&dir) {
                tracing::warn!(
                    "the audit ledger cannot be opened ({e}); audit records go to the log only"
                );
            }
        }
        StateDir::Memory { why } => {
            tracing::warn!("no audit ledger ({why}); audit records go to the log only")
        }
    }
}

/// The PIN guard, keeping its records in the state folder (see [`crate::state`]).
pub fn pin_guard(config: &Config) -> PinGuard {
    let state = StateDir::resolve(config.state_dir.as_deref());
    if let Some(dir) = state.folder() {
        tracing::debug!("state folder: {}", dir.display());
    }
    PinGuard::new(&state)
}

pub async fn once(config_path: &Path) -> Result<(), Error> {
    let config = load(config_path)?;
    check_sources(&config).await?;
    crate::repeat::set_log_repeat(config.log_repeat);
    let client = make_client(&config)?;
    let guard = pin_guard(&config);
    open_ledger(&config);
    let replay = replay_record(&config)?;
    let outcome = serve_with(
        config,
        client,
        Modules::new(),
        guard,
        Rounds::Limit(1),
        None,
        replay,
    )
    .await?;
    if outcome.all_seeded_every_round() {
        return Ok(());
    }
    let failed: Vec<&TargetOutcome> = outcome
        .targets
        .iter()
        .filter(|t| t.injections == 0)
        .collect();
    let lines: Vec<String> = failed
        .iter()
        .map(|t| {
            format!(
                "{}: {}",
                t.name,
                t.last_error.as_deref().unwrap_or("not seeded")
            )
        })
        .collect();
    let message = format!(
        "{} of {} targets not seeded:\n  {}",
        failed.len(),
        outcome.targets.len(),
        lines.join("\n  ")
    );
    // A target that failed on its own side outweighs one that had no entropy.
    if failed.iter().any(|t| t.source_failures < t.failures) {
        Err(Error::Target(message))
    } else {
        Err(Error::Source(message))
    }
}

/// The checks of a configuration that need the network: sources mixed on one host are
/// refused (see [`crate::source::set::refuse_mixing_one_host`]).
pub async fn check_sources(config: &Config) -> Result<(), Error> {
    crate::source::set::refuse_mixing_one_host(&config.sources, config.source_mode)
        .await
        .map_err(Error::Config)
}

/// Reads the configuration for a seeding command: it must name at least one target.
pub fn load(config_path: &Path) -> Result<Config, Error> {
    let config = config::load(config_path)?;
    if let Some(legacy) = config::unread_legacy_beside(config_path) {
        tracing::warn!("{}", config::unread_legacy_advice(&legacy, config_path));
    }
    if config.targets.is_empty() {
        return Err(Error::Config(format!(
            "configuration {}: no [[target]] table; add one per HSM token to seed \
             (see examples/qseed.toml)",
            config_path.display()
        )));
    }
    Ok(config)
}

/// How long a reload may take to read its files before it is given up (the running
/// configuration stays; the stuck read is left to its thread).
const RELOAD_READ_LIMIT: Duration = Duration::from_secs(10);

/// How long a reload may take to load and initialize new modules.
const RELOAD_MODULE_LIMIT: Duration = Duration::from_secs(30);

/// A reload: the new file must pass every check a start does, modules included.
async fn reload(config_path: &Path, modules: &Modules) -> Result<(Config, SourceSet), Error> {
    let path = config_path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || {
        let config = load(&path)?;
        let client = make_client(&config)?;
        Ok::<_, Error>((config, client))
    });
    let (config, client) = match tokio::time::timeout(RELOAD_READ_LIMIT, read).await {
        Ok(Ok(read)) => read?,
        Ok(Err(e)) => {
            return Err(Error::Failed(format!(
                "reading the configuration failed: {e}"
            )))
        }
        Err(_) => {
            return Err(Error::Config(format!(
                "reading {} and the files it names took more than {}s (a hung network mount?)",
                config_path.display(),
                RELOAD_READ_LIMIT.as_secs()
            )))
        }
    };
    check_sources(&config).await?;
    // A new module whose C_Initialize never returns: given up, named, and left to its thread
    // (the running configuration stays, and SIGTERM is still heard: see `run`).
    match tokio::time::timeout(
        RELOAD_MODULE_LIMIT,
        service::load_modules(&config.targets, modules),
    )
    .await
    {
        Ok(loaded) => loaded.map_err(|e| Error::Config(e.to_string()))?,
        Err(_) => {
            return Err(Error::Config(format!(
                "loading the modules took more than {}s (a C_Initialize that does not return? \
                 modules: {})",
                RELOAD_MODULE_LIMIT.as_secs(),
                config
                    .targets
                    .iter()
                    .map(|t| t.module.display().to_string())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
    Ok((config, client))
}

fn make_client(config: &Config) -> Result<SourceSet, Error> {
    make_sources(config, false)
}

/// The configured sources as one (see [`crate::source::set`]); `bulk` keeps HTTP connections
/// open between requests (`qseed fetch`), which the service does not (see `QryptClient`).
pub fn make_sources(config: &Config, bulk: bool) -> Result<SourceSet, Error> {
    use crate::config::SourceSpecKind;
    use crate::source::qrypt::QryptClient;
    use crate::source::set::{AnySource, Member};
    let state = StateDir::resolve(config.state_dir.as_deref());
    let several = config.sources.len() > 1;
    let mut members = Vec::with_capacity(config.sources.len());
    for spec in &config.sources {
        let source = match &spec.kind {
            SourceSpecKind::Qrypt(api) => {
                let client = if bulk {
                    QryptClient::for_bulk(api)
                } else {
                    QryptClient::new(api)
                };
                let client = client.map_err(|e| {
                    Error::Config(if several {
                        format!("source {:?}: {e}", spec.name)
                    } else {
                        e.to_string()
                    })
                })?;
                AnySource::Qrypt(Box::new(client.remembering_in(state.folder())))
            }
            SourceSpecKind::Device(device) => {
                AnySource::Device(crate::source::device::DeviceSource::new(
                    device.clone(),
                    &spec.name,
                    state.folder(),
                ))
            }
        };
        members.push(Member::new(spec.name.clone(), source, config.pool.health));
    }
    Ok(SourceSet::new(members, config.source_mode))
}

fn announce(config: &Config, source: &impl EntropySource) {
    for spec in &config.sources {
        if let crate::config::SourceSpecKind::Qrypt(api) = &spec.kind {
            let expiry = api
                .token
                .as_ref()
                .and_then(crate::source::quota::token_expiry);
            if let Some(warning) = expiry
                .and_then(|e| crate::source::quota::expiry_warning(e, std::time::SystemTime::now()))
            {
                tracing::warn!("source {:?}: {warning}", spec.name);
            }
            if api.allow_simulated {
                tracing::warn!(
                    "source {:?}: allow_simulated = true: answers of qseed's API simulator are \
                     accepted, and they are not quantum entropy (for tests and demos only)",
                    spec.name
                );
            }
        }
    }
    // A proxy is worth a word at start; the direct route only with -v.
    let via = match source.route() {
        Some(route @ Route::Proxy { .. }) => format!(" {route}"),
        Some(route) => {
            tracing::debug!("entropy API route: {route}");
            String::new()
        }
        None => String::new(),
    };
    tracing::info!(
        "qseed {} seeding {} target(s) from {}{via}",
        env!("CARGO_PKG_VERSION"),
        config.targets.len(),
        source.describe()
    );
}

/// Runs a bounded number of rounds on `config` with the caller's source and modules, then
/// tears down. `stop` lets a caller (the demo) share its cancellation; otherwise SIGINT and
/// SIGTERM stop it. `replay` is the replay check's record (see [`replay_record`]); `None`
/// keeps it in this process's memory.
pub async fn serve_with<S: EntropySource + 'static>(
    config: Config,
    source: S,
    modules: Modules,
    guard: PinGuard,
    rounds: Rounds,
    stop: Option<CancellationToken>,
    replay: Option<crate::pool::replay::SharedRecord>,
) -> Result<Outcome, Error> {
    service::load_modules(&config.targets, &modules)
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    let stop = stop.unwrap_or_else(|| {
        let token = CancellationToken::new();
        shutdown::on_signals(token.clone());
        token
    });
    announce(&config, &source);
    let pool = Arc::new(Pool::new(source, config.pool));
    if let Some(record) = replay {
        pool.use_replay_record(record);
    }
    let metrics = metrics_for(&pool, &modules);
    let targets = service::run(
        config.targets,
        pool.clone(),
        modules.clone(),
        guard,
        rounds,
        stop,
        metrics,
    )
    .await;
    let outcome = service::teardown(targets, &pool, &modules).await;
    crate::telemetry::flush_held();
    summarize(&outcome);
    Ok(outcome)
}

/// Metrics that watch `pool` (held weakly: the pool's observer is these metrics).
fn metrics_for<S: EntropySource + 'static>(pool: &Arc<Pool<S>>, modules: &Modules) -> Arc<Metrics> {
    let weak = Arc::downgrade(pool);
    let sources = weak.clone();
    // The pool's current source, so a reload's new sources are reported.
    let metrics = Metrics::watching_sources(
        Some(Arc::new(move || {
            weak.upgrade().map(|p| p.stats()).unwrap_or_default()
        })),
        Some(modules.clone()),
        Some(Arc::new(move || {
            sources
                .upgrade()
                .map(|p| p.source().sources())
                .unwrap_or_default()
        })),
    );
    pool.set_observer(metrics.clone());
    metrics
}

fn summarize(outcome: &Outcome) {
    let injected: u64 = outcome.targets.iter().map(|t| t.bytes_injected).sum();
    let flushed: u64 = outcome.targets.iter().map(|t| t.bytes_flushed).sum();
    let p = &outcome.pool;
    tracing::info!(
        "done: {} requests ({} failed), {} bytes downloaded, {} injected in rounds, {} flushed \
         into the targets at the stop, {} handed out but not injected (wiped), {} refused by \
         health tests, {} expired, {} rounds skipped for want of entropy, {} left at shutdown \
         (wiped)",
        p.requests,
        p.failed_requests,
        p.bytes_downloaded,
        injected,
        flushed,
        p.bytes_handed_out.saturating_sub(injected),
        p.bytes_rejected,
        p.bytes_expired,
        p.rounds_skipped,
        outcome.bytes_left_unused
    );
}

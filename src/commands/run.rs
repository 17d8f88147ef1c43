//! `qseed run` (the service, with reload on SIGHUP) and `qseed once` (one round).

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::error::Error;
use crate::pool::Pool;
use crate::service::{self, shutdown, Outcome, Rounds, TargetOutcome};
use crate::source::qrypt::QryptClient;
use crate::source::EntropySource;
use crate::target::Modules;
use crate::telemetry::{metrics::Metrics, server, systemd};

/// The service: runs until SIGINT/SIGTERM. SIGHUP re-reads the configuration file; a new
/// configuration that fails its checks is reported and the running one stays.
pub async fn run(config_path: &Path) -> Result<(), Error> {
    let config = load(config_path)?;
    let client = make_client(&config)?;
    let modules = Modules::new();
    service::load_modules(&config.targets, &modules)
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    let stop = CancellationToken::new();
    shutdown::on_signals(stop.clone());
    let mut reloads = shutdown::reloads();
    announce(&config, &client);
    let pool = Arc::new(Pool::new(client, config.pool));
    let metrics = metrics_for(&pool);
    let endpoint = match config.telemetry_listen {
        Some(addr) => {
            let listener = server::bind(addr).await.map_err(|e| {
                Error::Config(format!(
                    "cannot serve telemetry on {addr} ({e}); set telemetry.listen to a free \
                     address, or to \"off\""
                ))
            })?;
            if let Some(bound) = server::local_addr(&listener) {
                tracing::info!("telemetry on http://{bound}/metrics, /healthz and /readyz");
            }
            Some(server::serve(listener, metrics.clone(), stop.clone()))
        }
        None => None,
    };
    systemd::spawn_watchdog(stop.clone());
    {
        let metrics = metrics.clone();
        let count = config.targets.len();
        tokio::spawn(async move {
            metrics.first_round_done().await;
            systemd::ready(&format!("seeding {count} target(s)"));
        });
    }
    let mut targets = Some(config.targets);
    let outcomes = loop {
        let generation = stop.child_token();
        let mut running = tokio::spawn(service::run(
            targets.take().unwrap_or_default(),
            pool.clone(),
            modules.clone(),
            Rounds::Forever,
            generation.clone(),
            metrics.clone(),
        ));
        let outcomes = loop {
            tokio::select! {
                finished = &mut running => break Some(finished),
                _ = reloads.recv() => {
                    systemd::reloading();
                    match reload(config_path, &modules).await {
                        Ok((new, new_client)) => {
                            tracing::info!("SIGHUP: configuration reloaded from {}", config_path.display());
                            generation.cancel();
                            let _ = (&mut running).await;
                            announce(&new, &new_client);
                            if new.telemetry_listen != config.telemetry_listen {
                                tracing::warn!("telemetry.listen changes take effect at the next start");
                            }
                            pool.reconfigure(new_client, new.pool);
                            systemd::ready(&format!("seeding {} target(s)", new.targets.len()));
                            targets = Some(new.targets);
                            break None;
                        }
                        Err(e) => {
                            tracing::error!(
                                "SIGHUP: the new configuration is refused, the running one stays: {e}"
                            );
                            systemd::ready("reload refused; running the previous configuration");
                        }
                    }
                }
            }
        };
        if let Some(finished) = outcomes {
            break finished.unwrap_or_default();
        }
    };
    stop.cancel();
    if let Some(endpoint) = endpoint {
        let _ = endpoint.await;
    }
    let outcome = service::teardown(outcomes, &pool, &modules).await;
    summarize(&outcome);
    if !outcome.targets.is_empty() && outcome.targets.iter().all(|t| t.stopped.is_some()) {
        return Err(Error::Target(
            "every target has stopped; fix the errors above and start qseed again".into(),
        ));
    }
    Ok(())
}

pub async fn once(config_path: &Path) -> Result<(), Error> {
    let config = load(config_path)?;
    let client = make_client(&config)?;
    let outcome = serve_with(config, client, Modules::new(), Rounds::Limit(1), None).await?;
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

/// Reads the configuration for a seeding command: it must name at least one target.
pub fn load(config_path: &Path) -> Result<Config, Error> {
    let config = config::load(config_path)?;
    if config.targets.is_empty() {
        return Err(Error::Config(format!(
            "configuration {}: no [[target]] table; add one per HSM token to seed \
             (see examples/qseed.toml)",
            config_path.display()
        )));
    }
    Ok(config)
}

/// A reload: the new file must pass every check a start does, modules included.
async fn reload(config_path: &Path, modules: &Modules) -> Result<(Config, QryptClient), Error> {
    let config = load(config_path)?;
    let client = make_client(&config)?;
    service::load_modules(&config.targets, modules)
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    Ok((config, client))
}

fn make_client(config: &Config) -> Result<QryptClient, Error> {
    QryptClient::new(&config.source).map_err(|e| Error::Config(e.to_string()))
}

fn announce(config: &Config, source: &impl EntropySource) {
    tracing::info!(
        "qseed {} seeding {} target(s) from {}",
        env!("CARGO_PKG_VERSION"),
        config.targets.len(),
        source.describe()
    );
}

/// Runs a bounded number of rounds on `config` with the caller's source and modules, then
/// tears down. `stop` lets a caller (the demo) share its cancellation; otherwise SIGINT and
/// SIGTERM stop it.
pub async fn serve_with<S: EntropySource + 'static>(
    config: Config,
    source: S,
    modules: Modules,
    rounds: Rounds,
    stop: Option<CancellationToken>,
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
    let metrics = metrics_for(&pool);
    let targets = service::run(
        config.targets,
        pool.clone(),
        modules.clone(),
        rounds,
        stop,
        metrics,
    )
    .await;
    let outcome = service::teardown(targets, &pool, &modules).await;
    summarize(&outcome);
    Ok(outcome)
}

/// Metrics that watch `pool` (held weakly: the pool's observer is these metrics).
fn metrics_for<S: EntropySource + 'static>(pool: &Arc<Pool<S>>) -> Arc<Metrics> {
    let weak = Arc::downgrade(pool);
    let metrics = Metrics::new(Some(Arc::new(move || {
        weak.upgrade().map(|p| p.stats()).unwrap_or_default()
    })));
    pool.set_observer(metrics.clone());
    metrics
}

fn summarize(outcome: &Outcome) {
    let injected: u64 = outcome.targets.iter().map(|t| t.bytes_injected).sum();
    let p = &outcome.pool;
    tracing::info!(
        "done: {} requests ({} failed), {} bytes downloaded, {} injected, {} handed out but not \
         injected (wiped), {} refused by health tests, {} expired, {} rounds skipped for want of \
         entropy, {} left at shutdown (wiped)",
        p.requests,
        p.failed_requests,
        p.bytes_downloaded,
        injected,
        p.bytes_handed_out.saturating_sub(injected),
        p.bytes_rejected,
        p.bytes_expired,
        p.rounds_skipped,
        outcome.bytes_left_unused
    );
}

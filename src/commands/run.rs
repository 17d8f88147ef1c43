//! `qseed run` (the service) and `qseed once` (one round).

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::error::Error;
use crate::pool::Pool;
use crate::service::{self, shutdown, Outcome, Rounds};
use crate::source::qrypt::QryptClient;
use crate::source::EntropySource;
use crate::target::Modules;

pub async fn run(config_path: &Path) -> Result<(), Error> {
    let outcome = serve(load(config_path)?, Rounds::Forever, None).await?;
    if !outcome.targets.is_empty() && outcome.targets.iter().all(|t| t.stopped.is_some()) {
        return Err(Error::Failed(
            "every target has stopped; fix the errors above and start qseed again".into(),
        ));
    }
    Ok(())
}

pub async fn once(config_path: &Path) -> Result<(), Error> {
    let outcome = serve(load(config_path)?, Rounds::Limit(1), None).await?;
    if outcome.all_seeded_every_round() {
        return Ok(());
    }
    let failed: Vec<String> = outcome
        .targets
        .iter()
        .filter(|t| t.injections == 0)
        .map(|t| {
            format!(
                "{}: {}",
                t.name,
                t.last_error.as_deref().unwrap_or("not seeded")
            )
        })
        .collect();
    Err(Error::Failed(format!(
        "{} of {} targets not seeded:\n  {}",
        failed.len(),
        outcome.targets.len(),
        failed.join("\n  ")
    )))
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

/// Starts the service on `config` and waits for it to end. `stop` lets a caller (the demo)
/// share its cancellation; otherwise SIGINT/SIGTERM stop it.
pub async fn serve(
    config: Config,
    rounds: Rounds,
    stop: Option<CancellationToken>,
) -> Result<Outcome, Error> {
    let client = QryptClient::new(&config.source).map_err(|e| Error::Config(e.to_string()))?;
    let modules = Modules::new();
    serve_with(config, client, modules, rounds, stop).await
}

/// [`serve`] with the client and modules made by the caller.
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
    let shutdown = stop.unwrap_or_else(|| {
        let token = CancellationToken::new();
        shutdown::on_signals(token.clone());
        token
    });
    tracing::info!(
        "qseed {} seeding {} target(s) from {}",
        env!("CARGO_PKG_VERSION"),
        config.targets.len(),
        source.describe()
    );
    let pool = Arc::new(Pool::new(source, config.pool));
    let outcome = service::run(config.targets, pool, modules, rounds, shutdown).await;
    let injected: u64 = outcome.targets.iter().map(|t| t.bytes_injected).sum();
    let p = &outcome.pool;
    tracing::info!(
        "done: {} requests ({} failed), {} bytes downloaded, {} injected, {} handed out but not \
         injected (wiped), {} refused by health tests, {} expired, {} left at shutdown (wiped)",
        p.requests,
        p.failed_requests,
        p.bytes_downloaded,
        injected,
        p.bytes_handed_out.saturating_sub(injected),
        p.bytes_rejected,
        p.bytes_expired,
        outcome.bytes_left_unused
    );
    Ok(outcome)
}

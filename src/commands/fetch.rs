//! `qseed fetch --bytes N [--output FILE]`: entropy to a file or standard output.

use std::io::{IsTerminal, Write};
use std::path::Path;

use crate::config::{self, SourceConfig};
use crate::error::Error;
use crate::pool::{health, HealthTests, PoolConfig};
use crate::source::qrypt::QryptClient;
use crate::source::{EntropySource, BLOCK_LEN, MAX_BLOCKS_PER_REQUEST};

/// Above this size a progress bar is shown (when stderr is a terminal).
const PROGRESS_FROM: u64 = 256 * 1024;
/// Requests in flight at once: the next answer travels while this one is checked and written.
const IN_FLIGHT: usize = 2;

pub async fn fetch(
    config_path: &Path,
    explicit: bool,
    bytes: u64,
    output: Option<&Path>,
) -> Result<(), Error> {
    let (source, pool_config) = source_config(config_path, explicit)?;
    let client = QryptClient::for_bulk(&source).map_err(|e| Error::Config(e.to_string()))?;
    let mut sink = open_output(output)?;
    let progress = (bytes >= PROGRESS_FROM && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut health = HealthTests::new(pool_config.health);
    let mut remaining = bytes;
    let mut refused_in_a_row = 0;
    // Bytes asked for and not yet received or refused: what is in flight.
    let mut requested: u64 = 0;
    let mut in_flight = std::collections::VecDeque::new();
    while remaining > 0 {
        while in_flight.len() < IN_FLIGHT && requested < remaining {
            let blocks = ((remaining - requested).div_ceil(BLOCK_LEN as u64) as usize)
                .min(MAX_BLOCKS_PER_REQUEST);
            requested += (blocks * BLOCK_LEN) as u64;
            let client = client.clone();
            in_flight.push_back((
                blocks,
                tokio::spawn(async move { client.fetch(blocks).await }),
            ));
        }
        let Some((blocks, answer)) = in_flight.pop_front() else {
            break;
        };
        let fetched = answer
            .await
            .map_err(|e| Error::Failed(format!("the request failed: {e}")))?
            .map_err(|e| Error::Failed(e.to_string()))?;
        requested -= (blocks * BLOCK_LEN) as u64;
        let (fetched, failures) = health::screen(&mut health, fetched, BLOCK_LEN);
        if let Some(first) = failures.first() {
            tracing::warn!(
                "health tests refused {} of {blocks} block(s); fetching more: {first}",
                failures.len()
            );
            refused_in_a_row = if fetched.is_empty() {
                refused_in_a_row + 1
            } else {
                0
            };
            if refused_in_a_row == 3 {
                return Err(Error::Failed(format!(
                    "three answers in a row failed the health tests; the source looks broken: \
                     {first}"
                )));
            }
        }
        let n = (fetched.len() as u64).min(remaining) as usize;
        sink.write_all(&fetched.expose()[..n])
            .map_err(|e| Error::Failed(format!("cannot write the entropy: {e}")))?;
        remaining -= n as u64;
        if let Some(bar) = &progress {
            bar.inc(n as u64);
        }
    }
    sink.flush()
        .map_err(|e| Error::Failed(format!("cannot write the entropy: {e}")))?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    tracing::info!("fetched {bytes} bytes from {}", client.describe());
    Ok(())
}

/// The file's `[source]` and `[pool]` when the file exists; else the cloud defaults with
/// `QRYPT_TOKEN`. A file named with --config or QSEED_CONFIG_FILE must exist: a typo must not
/// fall back to the cloud.
fn source_config(config_path: &Path, explicit: bool) -> Result<(SourceConfig, PoolConfig), Error> {
    if config_path.exists() || explicit {
        let config = config::load(config_path)?;
        return Ok((config.source, config.pool));
    }
    tracing::debug!(
        "{} does not exist; using the Qrypt cloud defaults",
        config_path.display()
    );
    config::parse("", Path::new("."))
        .map(|c| (c.source, c.pool))
        .map_err(Error::Config)
}

fn open_output(output: Option<&Path>) -> Result<Box<dyn Write>, Error> {
    match output {
        Some(path) => {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let file = options.open(path).map_err(|e| {
                Error::Config(format!("cannot create --output {}: {e}", path.display()))
            })?;
            Ok(Box::new(std::io::BufWriter::new(file)))
        }
        None => {
            if std::io::stdout().is_terminal() {
                return Err(Error::Config(
                    "refusing to write binary entropy to a terminal; use --output FILE or a pipe"
                        .into(),
                ));
            }
            Ok(Box::new(std::io::BufWriter::new(std::io::stdout().lock())))
        }
    }
}

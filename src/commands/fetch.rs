//! `qseed fetch --bytes N [--output FILE]`: entropy to a file or standard output.

use std::io::{IsTerminal, Write};
use std::path::Path;

use crate::config;
use crate::error::Error;
use crate::pool::{health, HealthTests};
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
    source: Option<&str>,
) -> Result<(), Error> {
    let config = load_config(config_path, explicit)?;
    let set = super::run::make_sources(&config, true)?;
    match source {
        None => fetch_from(set, config.pool.health, bytes, output).await,
        Some(name) => {
            let member = set.member(name).ok_or_else(|| {
                Error::Config(format!(
                    "--source {name:?}: no such source; the configuration has {}",
                    set.members()
                        .iter()
                        .map(|m| format!("{:?}", m.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            let one = member.source.clone();
            fetch_from(one, config.pool.health, bytes, output).await
        }
    }
}

async fn fetch_from<S: EntropySource + Clone + 'static>(
    client: S,
    health: crate::pool::HealthConfig,
    bytes: u64,
    output: Option<&Path>,
) -> Result<(), Error> {
    // SIGINT/SIGTERM end the transfer through the normal path, so the temporary file is
    // removed and `--output` keeps its old content: the handlers are in place before it
    // exists.
    let interrupted = crate::service::shutdown::interrupted();
    let mut sink = Output::open(output)?;
    tokio::select! {
        done = transfer(&client, health, bytes, &mut sink) => done?,
        _ = interrupted => {
            return Err(Error::Failed(match output {
                Some(path) => format!("interrupted; {} is left as it was", path.display()),
                None => "interrupted".into(),
            }));
        }
    }
    sink.finish()?;
    tracing::info!("fetched {bytes} bytes from {}", client.describe());
    Ok(())
}

/// Downloads `bytes` health-tested bytes into `sink`, [`IN_FLIGHT`] requests at a time.
async fn transfer<S: EntropySource + Clone + 'static>(
    client: &S,
    health: crate::pool::HealthConfig,
    bytes: u64,
    sink: &mut Output,
) -> Result<(), Error> {
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
    let mut health = HealthTests::new(health);
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
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(())
}

/// The file's `[source]` and `[pool]` when the file exists; else the cloud defaults with
/// `QRYPT_TOKEN`. A file named with --config or QSEED_CONFIG_FILE must exist: a typo must not
/// fall back to the cloud.
fn load_config(config_path: &Path, explicit: bool) -> Result<config::Config, Error> {
    if config_path.exists() || explicit {
        return Ok(config::load(config_path)?);
    }
    tracing::debug!(
        "{} does not exist; using the Qrypt cloud defaults",
        config_path.display()
    );
    config::parse("", Path::new(".")).map_err(Error::Config)
}

/// Where the entropy goes: standard output, or a temporary file beside `--output` that
/// [`Output::finish`] renames over it once every byte is written (dropping it unfinished
/// removes it, so a failed fetch leaves the old file as it was).
enum Output {
    Stdout(std::io::BufWriter<std::io::StdoutLock<'static>>),
    File {
        file: std::io::BufWriter<tempfile::NamedTempFile>,
        path: std::path::PathBuf,
    },
}

impl Output {
    fn open(output: Option<&Path>) -> Result<Self, Error> {
        let Some(path) = output else {
            if std::io::stdout().is_terminal() {
                return Err(Error::Config(
                    "refusing to write binary entropy to a terminal; use --output FILE or a pipe"
                        .into(),
                ));
            }
            return Ok(Output::Stdout(std::io::BufWriter::new(
                std::io::stdout().lock(),
            )));
        };
        // Renaming over a link replaces the link, never its target; still, a link where the
        // entropy should go is a mistake or a trap, and a device (`/dev/sda`) must never be
        // replaced by a file: only a regular file, or nothing, is replaced.
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(Error::Config(format!(
                    "--output {} is a symbolic link; qseed does not write through links: name                      the file itself, or remove the link",
                    path.display()
                )))
            }
            Ok(meta) if !meta.is_file() => {
                return Err(Error::Config(format!(
                    "--output {} is {}, not a regular file; name a file (it is replaced when                      the fetch completes), or leave out --output for standard output",
                    path.display(),
                    crate::files::kind_of(meta.file_type())
                )))
            }
            _ => {}
        }
        let name = path
            .file_name()
            .ok_or_else(|| Error::Config(format!("--output {} names no file", path.display())))?;
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // NamedTempFile is created 0600 (O_EXCL, never an existing file), whatever umask
        // says; the rename keeps that mode, whatever the old file had.
        let file = tempfile::Builder::new()
            .prefix(&format!(".{}.", name.to_string_lossy()))
            .suffix(".part")
            .tempfile_in(folder)
            .map_err(|e| {
                Error::Config(format!(
                    "cannot create a file in {} for --output ({e}); check that the folder                      exists and that you may write to it",
                    folder.display()
                ))
            })?;
        Ok(Output::File {
            file: std::io::BufWriter::new(file),
            path: path.to_path_buf(),
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Stdout(out) => out.write_all(bytes),
            Output::File { file, .. } => file.write_all(bytes),
        }
    }

    /// Flushes, and for a file: syncs it and renames it over `--output`.
    fn finish(self) -> Result<(), Error> {
        let failed =
            |e: &dyn std::fmt::Display| Error::Failed(format!("cannot write the entropy: {e}"));
        match self {
            Output::Stdout(mut out) => out.flush().map_err(|e| failed(&e)),
            Output::File { file, path } => {
                let file = file
                    .into_inner()
                    .map_err(|e| failed(&e.error().to_string()))?;
                file.as_file().sync_all().map_err(|e| failed(&e))?;
                file.persist(&path).map_err(|e| {
                    Error::Failed(format!(
                        "cannot put the entropy in place as {} ({}); the old file, if any, is \
                         unchanged",
                        path.display(),
                        e.error
                    ))
                })?;
                Ok(())
            }
        }
    }
}

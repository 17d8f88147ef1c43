//! `kind = "device"`: entropy read from a file, a character device (a hardware QRNG's device
//! node) or a FIFO, in whole blocks.
//!
//! Every read is bounded (the blocks asked for, within `timeout`) and never blocks a thread: the
//! file is opened without blocking, and a device or FIFO with nothing to give is polled until
//! the deadline. A regular file is not a stream: how far it has been read is kept in the state
//! folder (written and synced before the bytes are handed out), so a restart never reads the
//! same bytes again; a file without such a record is refused.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{EntropySource, SourceError, BLOCK_LEN};
use crate::secret::EntropyBytes;

/// `[[source]] kind = "device"` as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub path: PathBuf,
    pub timeout: Duration,
}

/// A device source: see the module's documentation.
#[derive(Debug, Clone)]
pub struct DeviceSource {
    config: DeviceConfig,
    /// Where a regular file's read position is kept; `None` for streams, or when no state
    /// folder is usable (then a regular file is refused at its first read).
    position_record: Option<PathBuf>,
}

/// How often a device or FIFO with nothing to give is asked again.
const POLL: Duration = Duration::from_millis(5);

impl DeviceSource {
    /// `state` is the state folder, for a regular file's read position.
    pub fn new(config: DeviceConfig, name: &str, state: Option<&Path>) -> Self {
        let position_record = state.map(|s| s.join("sources").join(format!("{name}.position")));
        Self {
            config,
            position_record,
        }
    }

    /// Checks the path names something qseed can read blocks from (at start and in `doctor`).
    pub fn check(path: &Path) -> Result<&'static str, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        kind(&meta).map_err(|what| unusable(path, what))
    }

    fn read(&self, len: usize) -> Result<EntropyBytes, String> {
        let path = &self.config.path;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc_flags())
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot inspect {}: {e}", path.display()))?;
        let what = kind(&meta).map_err(|what| unusable(path, what))?;
        let position = if what == "a regular file" {
            let record = self.position_record.as_deref().ok_or_else(|| {
                format!(
                    "{} is a regular file, and there is no state folder to remember how far it \
                     was read: its bytes would be used again after a restart. Set [service] \
                     state_dir, or read from a device",
                    path.display()
                )
            })?;
            // One reader at a time (a `run` and a cron `once` may share the file): the lock
            // covers reading the position, the bytes, and writing the new position.
            let lock = lock_positions(record)?;
            let start = read_position(record, &meta)?;
            file.seek(SeekFrom::Start(start))
                .map_err(|e| format!("cannot seek in {}: {e}", path.display()))?;
            Some((record, start, lock))
        } else {
            None
        };
        let mut bytes = EntropyBytes::zeroed(len);
        let deadline = Instant::now() + self.config.timeout;
        let mut filled = 0;
        while filled < len {
            match file.read(&mut bytes.expose_mut()[filled..]) {
                Ok(0) => {
                    return Err(match position {
                        Some(_) => format!(
                            "{} has no unused bytes left ({} of the {len} asked for were there)",
                            path.display(),
                            filled
                        ),
                        None => format!(
                            "{} ended after {filled} of {len} bytes (a FIFO without a writer?)",
                            path.display()
                        ),
                    })
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "{} gave {filled} of {len} bytes within {}s (source timeout)",
                            path.display(),
                            self.config.timeout.as_secs()
                        ));
                    }
                    std::thread::sleep(POLL);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            }
        }
        // The position is on disk before any byte is handed out: a crash after this loses
        // the bytes, never uses them twice.
        if let Some((record, start, _lock)) = position {
            write_position(record, &meta, start + len as u64)?;
        }
        Ok(bytes)
    }
}

fn libc_flags() -> i32 {
    (rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32
}

/// What a path is, when qseed can read entropy from it.
fn kind(meta: &std::fs::Metadata) -> Result<&'static str, &'static str> {
    let file_type = meta.file_type();
    if file_type.is_file() {
        Ok("a regular file")
    } else if file_type.is_char_device() {
        Ok("a character device")
    } else if file_type.is_fifo() {
        Ok("a FIFO")
    } else {
        Err(crate::files::kind_of(file_type))
    }
}

fn unusable(path: &Path, what: &str) -> String {
    format!(
        "{} is {what}; a device source reads a character device (a QRNG's device node), a FIFO \
         or a regular file",
        path.display()
    )
}

/// An exclusive lock beside the position record, held until the returned file is dropped.
fn lock_positions(record: &Path) -> Result<std::fs::File, String> {
    let lock_path = record.with_extension("lock");
    let fail = |e: &dyn std::fmt::Display| format!("cannot lock {}: {e}", lock_path.display());
    if let Some(folder) = lock_path.parent() {
        std::fs::create_dir_all(folder).map_err(|e| fail(&e))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| fail(&e))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(|e| fail(&e))?;
    Ok(file)
}

/// The position recorded for this file (same device and inode), else 0.
fn read_position(record: &Path, meta: &std::fs::Metadata) -> Result<u64, String> {
    // Three numbers on a line; read through a cap like every file qseed opens.
    let text = match crate::files::read_text(record, 4096) {
        Ok((text, _)) => text,
        Err(e) if e.is_not_found() => return Ok(0),
        Err(e) => return Err(format!("cannot read {}: {e}", record.display())),
    };
    let fields: Vec<u64> = text
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    match fields[..] {
        [dev, ino, position] if dev == meta.dev() && ino == meta.ino() => Ok(position),
        // Another file at that path now: it has not been read.
        [_, _, _] => Ok(0),
        _ => Err(format!(
            "{} is damaged; remove it only if the file it tracks was replaced",
            record.display()
        )),
    }
}

fn write_position(record: &Path, meta: &std::fs::Metadata, position: u64) -> Result<(), String> {
    let fail = |e: std::io::Error| {
        format!(
            "cannot record the read position in {}: {e}",
            record.display()
        )
    };
    let folder = record.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder).map_err(fail)?;
    let mut file = tempfile::NamedTempFile::new_in(folder).map_err(fail)?;
    writeln!(file, "{} {} {position}", meta.dev(), meta.ino()).map_err(fail)?;
    file.as_file().sync_all().map_err(fail)?;
    file.persist(record).map_err(|e| fail(e.error))?;
    Ok(())
}

impl EntropySource for DeviceSource {
    async fn fetch(&self, blocks: usize) -> Result<EntropyBytes, SourceError> {
        let source = self.clone();
        let path = self.config.path.display().to_string();
        tokio::task::spawn_blocking(move || source.read(blocks * BLOCK_LEN))
            .await
            .map_err(|e| SourceError::Device {
                path: path.clone(),
                reason: format!("the reading thread failed: {e}"),
            })?
            .map_err(|reason| SourceError::Device { path, reason })
    }

    fn describe(&self) -> String {
        format!("device {}", self.config.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(path: &Path, state: &Path) -> DeviceSource {
        DeviceSource::new(
            DeviceConfig {
                path: path.to_path_buf(),
                timeout: Duration::from_millis(300),
            },
            "qrng",
            Some(state),
        )
    }

    #[tokio::test]
    async fn a_regular_file_is_read_once_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.bin");
        let content: Vec<u8> = (0..3 * BLOCK_LEN).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let first = source(&path, dir.path()).fetch(2).await.unwrap();
        assert_eq!(first.expose(), &content[..2 * BLOCK_LEN]);
        // A new process (a new source) goes on where the last stopped.
        let second = source(&path, dir.path()).fetch(1).await.unwrap();
        assert_eq!(second.expose(), &content[2 * BLOCK_LEN..]);
        let e = source(&path, dir.path()).fetch(1).await.unwrap_err();
        assert!(e.to_string().contains("has no unused bytes left"), "{e}");
        // Without a state folder a regular file would be read again after a restart.
        let e = DeviceSource::new(
            DeviceConfig {
                path: path.clone(),
                timeout: Duration::from_secs(1),
            },
            "qrng",
            None,
        )
        .fetch(1)
        .await
        .unwrap_err();
        assert!(e.to_string().contains("no state folder"), "{e}");
    }

    #[tokio::test]
    async fn a_fifo_without_enough_bytes_times_out_and_a_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let e = source(&fifo, dir.path()).fetch(1).await.unwrap_err();
        assert!(
            e.to_string().contains("a FIFO without a writer"),
            "no writer: {e}"
        );
        let e = source(dir.path(), dir.path()).fetch(1).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("is a directory; a device source reads"),
            "{e}"
        );
        assert!(DeviceSource::check(Path::new("/dev/urandom")).is_ok());
        assert!(DeviceSource::check(dir.path()).is_err());
    }
}

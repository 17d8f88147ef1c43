//! `kind = "device"`: entropy read from a file, a character device (a hardware QRNG's device
//! node) or a FIFO, in whole blocks.
//!
//! Every read is bounded (the blocks asked for, within `timeout`) and never blocks a thread: the
//! file is opened without blocking, and a device or FIFO with nothing to give is polled until
//! the deadline. A regular file is not a stream: how far it has been read is kept in the state
//! folder (written and synced before the bytes are handed out), so a restart never reads the
//! same bytes again; a file without such a record is refused.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{EntropySource, SourceError, BLOCK_LEN};
use crate::folder::{LockError, StateFolder};
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
    /// The source's name: its read position is `<state>/sources/<name>.position`.
    name: String,
    /// The state folder, for a regular file's read position; `None` when no state folder is
    /// usable (then a regular file is refused at its first read).
    state: Option<PathBuf>,
}

/// How often a device or FIFO with nothing to give is asked again.
const POLL: Duration = Duration::from_millis(5);

impl DeviceSource {
    /// `state` is the state folder, for a regular file's read position.
    pub fn new(config: DeviceConfig, name: &str, state: Option<&Path>) -> Self {
        Self {
            config,
            name: name.to_string(),
            state: state.map(Path::to_path_buf),
        }
    }

    /// Checks the path names something qseed can read blocks from, that nobody but root or
    /// qseed's user could have put there or could write into (at start and in `doctor`). The
    /// kernel's own generators are accepted with a loud warning: they are not quantum.
    pub fn check(path: &Path) -> Result<&'static str, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let what = kind(&meta).map_err(|what| unusable(path, what))?;
        crate::trust::check_device(path, "device source")?;
        trusted_stream(path, &meta)?;
        if is_kernel_generator(&meta) {
            tracing::warn!(
                "device source {} is the kernel's own random generator, not a quantum source: \
                 seeding an HSM from it adds nothing the HSM's generator lacks. Name the QRNG's \
                 device node (or a Qrypt source) for quantum entropy",
                path.display()
            );
        }
        Ok(what)
    }

    /// Whether `path` is the kernel's own generator (`/dev/random`, `/dev/urandom`), which
    /// the doctor's checklist names as not quantum.
    pub fn is_kernel_generator_path(path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|meta| is_kernel_generator(&meta))
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
        // Checked again on what was opened: the path may name another file than at start.
        owner_trusted(path, &meta)?;
        trusted_stream(path, &meta)?;
        let position = if what == "a regular file" {
            let state = self.state.as_deref().ok_or_else(|| {
                format!(
                    "{} is a regular file, and there is no state folder to remember how far it \
                     was read: its bytes would be used again after a restart. Set [service] \
                     state_dir, or read from a device",
                    path.display()
                )
            })?;
            let positions = Positions::open(state, &self.name)?;
            // One reader at a time (a `run` and a cron `once` may share the file): the lock
            // covers reading the position, the bytes, and writing the new position.
            let lock = positions.lock()?;
            let fingerprint = positions.fingerprint(&mut file, path, FINGERPRINT_LEN)?;
            let start = positions.read(&meta, &mut file, path, &fingerprint)?;
            file.seek(SeekFrom::Start(start))
                .map_err(|e| format!("cannot seek in {}: {e}", path.display()))?;
            Some((positions, fingerprint, start, lock))
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
        if let Some((positions, fingerprint, start, _lock)) = position {
            positions.write(&meta, &fingerprint, start + len as u64)?;
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

/// The device's owner must be root or qseed's user (see [`crate::trust`]).
fn owner_trusted(path: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() == 0 || meta.uid() == me || crate::trust::checks_disabled() {
        return Ok(());
    }
    Err(format!(
        "{} belongs to {}, who could then choose every seed qseed hands out; only files of \
         root or of {} are read. Run: chown root {}",
        path.display(),
        crate::trust::user_name(meta.uid()),
        crate::trust::user_name(me),
        path.display()
    ))
}

/// A FIFO anyone but its owner may write lets them choose every seed (the health tests pass a
/// stream chosen to pass them): it must be writable by its owner only.
fn trusted_stream(path: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    let mode = meta.mode() & 0o7777;
    if meta.file_type().is_fifo() && mode & 0o022 != 0 && !crate::trust::checks_disabled() {
        return Err(format!(
            "{} is a FIFO that users other than its owner may write (mode {mode:04o}): they \
             could choose every seed. Run: chmod go-w {}",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// `/dev/random` and `/dev/urandom` (character devices 1:8 and 1:9, whatever their name).
fn is_kernel_generator(meta: &std::fs::Metadata) -> bool {
    let rdev = meta.rdev();
    meta.file_type().is_char_device()
        && rustix::fs::major(rdev) == 1
        && matches!(rustix::fs::minor(rdev), 8 | 9)
}

/// Bytes of a file's beginning that identify it: the same content copied back in place (a
/// new inode) is the same file, already read so far.
const FINGERPRINT_LEN: usize = 4096;

/// A regular file's read positions in `<state>/sources/`: `<name>.position` holds the file's
/// device, inode, position and a keyed fingerprint of its first bytes (HMAC-SHA-256 under
/// `sources/key`, so the record says nothing of the bytes); `<name>.lock` serializes readers.
/// Opened through [`StateFolder`]: no link in the state folder is followed.
struct Positions {
    folder: StateFolder,
    name: String,
}

impl Positions {
    fn open(state: &Path, name: &str) -> Result<Self, String> {
        let folder = StateFolder::open(state).and_then(|s| s.subfolder("sources"))?;
        Ok(Self {
            folder,
            name: name.to_string(),
        })
    }

    fn record(&self) -> String {
        format!("{}.position", self.name)
    }

    fn lock(&self) -> Result<std::fs::File, String> {
        let name = format!("{}.lock", self.name);
        self.folder.lock(&name, true, true).map_err(|e| {
            let e = match e {
                LockError::Busy => "busy".to_string(),
                LockError::Io(e) => e.to_string(),
            };
            format!(
                "cannot lock {}: {e}",
                self.folder.file_path(&name).display()
            )
        })
    }

    /// The keyed fingerprint of `file`'s first `len` bytes (fewer if it is shorter), as
    /// `BYTES:HEX`; the file's position is left at 0.
    fn fingerprint(
        &self,
        file: &mut std::fs::File,
        path: &Path,
        len: usize,
    ) -> Result<String, String> {
        let key = self.key()?;
        let len = len.min(FINGERPRINT_LEN);
        let mut head = zeroize::Zeroizing::new(vec![0u8; len]);
        file.seek(SeekFrom::Start(0))
            .map_err(|e| format!("cannot seek in {}: {e}", path.display()))?;
        let mut filled = 0;
        while filled < len {
            match file.read(&mut head[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            }
        }
        file.seek(SeekFrom::Start(0))
            .map_err(|e| format!("cannot seek in {}: {e}", path.display()))?;
        let tag = ring::hmac::sign(&key, &head[..filled]);
        Ok(format!("{filled}:{}", hex::encode(&tag.as_ref()[..16])))
    }

    fn key(&self) -> Result<ring::hmac::Key, String> {
        let key = match self.folder.read_key("key", 32)? {
            Some(key) => key,
            None => self.folder.create_key("key", 32)?,
        };
        Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key))
    }

    /// The position recorded for this file, else 0. The file is known by its first bytes (as
    /// many as were fingerprinted when the record was written: a file that grew since is the
    /// same file), whatever its inode: a copy put back in place goes on where it was, and a
    /// new file that happens to get the old inode number starts at 0. Records of earlier
    /// versions, without a fingerprint, are matched by device and inode. `current` is the
    /// file's fingerprint over [`FINGERPRINT_LEN`] bytes; the file is read again only when the
    /// record's covers fewer.
    fn read(
        &self,
        meta: &std::fs::Metadata,
        file: &mut std::fs::File,
        path: &Path,
        current: &str,
    ) -> Result<u64, String> {
        let name = self.record();
        let shown = self.folder.file_path(&name);
        // A few numbers on a line; read through a cap like every file qseed opens.
        let text = match self.folder.read(&name, 4096) {
            Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Ok(None) => return Ok(0),
            Err(e) => return Err(format!("cannot read {}: {e}", shown.display())),
        };
        let fields: Vec<&str> = text.split_whitespace().collect();
        let numbers: Vec<u64> = fields
            .iter()
            .take(3)
            .filter_map(|f| f.parse().ok())
            .collect();
        let damaged = || {
            format!(
                "{} is damaged; remove it only if the file it tracks was replaced",
                shown.display()
            )
        };
        let [dev, ino, position] = numbers[..] else {
            return Err(damaged());
        };
        let same_inode = dev == meta.dev() && ino == meta.ino();
        match fields[..] {
            [_, _, _] => Ok(if same_inode { position } else { 0 }),
            [_, _, _, recorded] => {
                let fingerprinted: usize = recorded
                    .split_once(':')
                    .and_then(|(n, _)| n.parse().ok())
                    .filter(|n| *n <= FINGERPRINT_LEN)
                    .ok_or_else(damaged)?;
                let same_length = current
                    .split_once(':')
                    .is_some_and(|(n, _)| n.parse() == Ok(fingerprinted));
                let now = if same_length {
                    current.to_string()
                } else {
                    self.fingerprint(file, path, fingerprinted)?
                };
                if now != recorded {
                    // Another file at that path now: it has not been read.
                    return Ok(0);
                }
                if !same_inode {
                    tracing::info!(
                        "source {:?}: the file is new, but its content is the one already read \
                         up to byte {position}: going on from there",
                        self.name
                    );
                }
                Ok(position)
            }
            _ => Err(damaged()),
        }
    }

    fn write(
        &self,
        meta: &std::fs::Metadata,
        fingerprint: &str,
        position: u64,
    ) -> Result<(), String> {
        let name = self.record();
        let line = format!("{} {} {position} {fingerprint}\n", meta.dev(), meta.ino());
        self.folder
            .write_atomic(&name, line.as_bytes())
            .map_err(|e| {
                format!(
                    "cannot record the read position in {}: {e}",
                    self.folder.file_path(&name).display()
                )
            })
    }
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

    /// Issue 21, item 5: a FIFO others may write is refused; the kernel's generator is known.
    #[test]
    fn item_05_a_fifo_others_may_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        assert!(DeviceSource::check(&fifo).is_ok());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o622)).unwrap();
        let e = DeviceSource::check(&fifo).unwrap_err();
        assert!(e.contains("chmod o-w") && e.contains("0622"), "{e}");
        // Group-writable: a file's group write bit may be fine, a FIFO's is not.
        std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o620)).unwrap();
        let e = DeviceSource::check(&fifo).unwrap_err();
        assert!(e.contains("chmod go-w") && e.contains("0620"), "{e}");
        let urandom = std::fs::metadata("/dev/urandom").unwrap();
        assert!(is_kernel_generator(&urandom));
        assert!(!is_kernel_generator(
            &std::fs::metadata("/dev/null").unwrap()
        ));
    }

    /// A file that grows (appended to) is the same file: read on, not from the start.
    #[tokio::test]
    async fn a_file_that_grows_is_read_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.bin");
        let content: Vec<u8> = (0..3 * BLOCK_LEN).map(|i| (i * 29 % 251) as u8).collect();
        std::fs::write(&path, &content[..BLOCK_LEN]).unwrap();
        let first = source(&path, dir.path()).fetch(1).await.unwrap();
        assert_eq!(first.expose(), &content[..BLOCK_LEN]);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, &content[BLOCK_LEN..]).unwrap();
        let second = source(&path, dir.path()).fetch(2).await.unwrap();
        assert_eq!(second.expose(), &content[BLOCK_LEN..]);
    }

    /// Issue 21, item 6: a file copied back in place (a new inode, the same bytes) is not read
    /// again from the start, and a link in place of the lock is not followed.
    #[tokio::test]
    async fn item_06_a_file_copied_back_is_not_read_again_and_links_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let path = dir.path().join("pool.bin");
        let content: Vec<u8> = (0..3 * BLOCK_LEN).map(|i| (i * 13 % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let first = source(&path, &state).fetch(1).await.unwrap();
        assert_eq!(first.expose(), &content[..BLOCK_LEN]);
        let copy = dir.path().join("copy.bin");
        std::fs::copy(&path, &copy).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::rename(&copy, &path).unwrap();
        let second = source(&path, &state).fetch(1).await.unwrap();
        assert_eq!(second.expose(), &content[BLOCK_LEN..2 * BLOCK_LEN]);
        // Another file at the path is read from its start.
        let other: Vec<u8> = (0..BLOCK_LEN).map(|i| (i * 17 % 253) as u8).collect();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &other).unwrap();
        assert_eq!(
            source(&path, &state).fetch(1).await.unwrap().expose(),
            &other[..]
        );
        // A link where the lock goes is an error, and nothing is created where it points.
        let lock = state.join("sources").join("qrng.lock");
        std::fs::remove_file(&lock).unwrap();
        let pointed = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&pointed, &lock).unwrap();
        std::fs::write(&path, &content).unwrap();
        let e = source(&path, &state).fetch(1).await.unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!pointed.exists());
    }
}

//! A folder qseed keeps its own state in (the PIN guard's records, the replay record, device
//! read positions), opened once and checked on its descriptor: owned by qseed's user and
//! written by nobody else, on a path nobody else controls (see [`crate::trust`]). Every file
//! in it is opened relative to that descriptor, never through a symbolic link (`O_NOFOLLOW`),
//! never blocking on a FIFO, and checked to be a regular file; writes are whole or nothing.
//! Below the sources, the pool and the HSM layer, which all keep state through it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use zeroize::Zeroizing;

/// A state folder, opened once (see the module documentation). Every operation names a file
/// of this folder by a plain name: no `/`, no `..`, and a link in its place is an error, never
/// followed.
#[derive(Debug)]
pub struct StateFolder {
    fd: OwnedFd,
    path: PathBuf,
}

/// Flags of every open in a state folder: a link is an error, a FIFO never blocks us, a
/// terminal never becomes ours, and no child process inherits the file.
fn base_flags() -> OFlags {
    OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC
}

impl StateFolder {
    /// Opens the folder at `path` (which must exist), checked as [`crate::trust`] checks a
    /// folder qseed writes to: owned by this user, on a path nobody else controls.
    pub fn open(path: &Path) -> Result<Self, String> {
        crate::trust::check_own_folder(path, "the state folder")?;
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("cannot open the state folder {}: {e}", path.display()))?;
        Self::verified(fd, path.to_path_buf())
    }

    /// The subfolder `name`, made (0700) if missing.
    pub fn subfolder(&self, name: &str) -> Result<Self, String> {
        let path = self.path.join(name);
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
        }
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => format!(
                "{} is not a folder (a link or a file in its place?); qseed follows no link in \
                 its state folder. Remove it",
                path.display()
            ),
            e => format!("cannot open {}: {e}", path.display()),
        })?;
        Self::verified(fd, path)
    }

    fn verified(fd: OwnedFd, path: PathBuf) -> Result<Self, String> {
        let stat = rustix::fs::fstat(&fd)
            .map_err(|e| format!("cannot inspect {}: {e}", path.display()))?;
        let me = rustix::process::geteuid().as_raw();
        if stat.st_uid != me && !crate::trust::checks_disabled() {
            return Err(format!(
                "{} belongs to {}, not to {}, the user qseed runs as: whoever owns it can \
                 remove or forge qseed's records. Run: chown -R {} {}",
                path.display(),
                crate::trust::user_name(stat.st_uid),
                crate::trust::user_name(me),
                crate::trust::login_name(me),
                path.display()
            ));
        }
        if stat.st_mode & 0o022 != 0 && !crate::trust::checks_disabled() {
            return Err(format!(
                "{} may be written by other users (mode {:04o}); run: chmod 0700 {}",
                path.display(),
                stat.st_mode & 0o7777,
                path.display()
            ));
        }
        Ok(Self { fd, path })
    }

    /// Where the folder is, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of the file `name` in this folder, for messages.
    pub fn file_path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Opens `name` with `flags` (plus the folder's own, see [`base_flags`]) and checks on the
    /// descriptor that it is a regular file.
    fn open_file(&self, name: &str, flags: OFlags) -> std::io::Result<File> {
        debug_assert!(!name.contains('/') && name != "..");
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            flags | base_flags(),
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| match e {
            rustix::io::Errno::LOOP => std::io::Error::other(
                "a symbolic link is in its place, and qseed follows none in its state folder; \
                 remove the link",
            ),
            e => std::io::Error::from(e),
        })?;
        let stat = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(std::io::Error::other(format!(
                "it is {}, not a regular file; remove it",
                kind_of_mode(stat.st_mode)
            )));
        }
        Ok(File::from(fd))
    }

    /// The whole of `name`, if it exists and holds at most `limit` bytes.
    pub fn read(&self, name: &str, limit: u64) -> std::io::Result<Option<Zeroizing<Vec<u8>>>> {
        let file = match self.open_file(name, OFlags::RDONLY) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Zeroizing::new(Vec::new());
        file.take(limit + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > limit {
            return Err(std::io::Error::other(format!(
                "it holds more than {limit} bytes, more than qseed ever writes there"
            )));
        }
        Ok(Some(bytes))
    }

    /// `name` opened for reading, if it exists.
    pub fn open_read(&self, name: &str) -> std::io::Result<Option<File>> {
        match self.open_file(name, OFlags::RDONLY) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `name` (made 0600 if missing) with an exclusive or shared `flock`, waiting for it when
    /// `wait`; held until the file is dropped.
    pub fn lock(&self, name: &str, exclusive: bool, wait: bool) -> Result<File, LockError> {
        let file = self
            .open_file(name, OFlags::CREATE | OFlags::RDWR)
            .map_err(LockError::Io)?;
        use rustix::fs::FlockOperation as Op;
        let how = match (exclusive, wait) {
            (true, true) => Op::LockExclusive,
            (true, false) => Op::NonBlockingLockExclusive,
            (false, true) => Op::LockShared,
            (false, false) => Op::NonBlockingLockShared,
        };
        match rustix::fs::flock(&file, how) {
            Ok(()) => Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(LockError::Busy),
            Err(e) => Err(LockError::Io(e.into())),
        }
    }

    /// Replaces `name` with `bytes`, whole or not at all: a temporary file (0600) written and
    /// synced, renamed over `name`, and the folder synced.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let temp = format!(".{name}.{}.tmp", std::process::id());
        let result = (|| {
            let _ = rustix::fs::unlinkat(&self.fd, temp.as_str(), AtFlags::empty());
            let mut file = self.open_file(&temp, OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            rustix::fs::renameat(&self.fd, temp.as_str(), &self.fd, name)?;
            self.sync()
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&self.fd, temp.as_str(), AtFlags::empty());
        }
        result
    }

    /// `name` (made 0600 if missing) opened for appending, to be kept open by a writer that
    /// appends often (the audit ledger, on every injection).
    pub fn open_append(&self, name: &str) -> std::io::Result<File> {
        self.open_file(name, OFlags::CREATE | OFlags::WRONLY | OFlags::APPEND)
    }

    /// `name`'s inode number and length, without following a link; `None` if it is missing.
    pub fn inode_and_len(&self, name: &str) -> std::io::Result<Option<(u64, u64)>> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some((stat.st_ino, stat.st_size as u64))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames `from` to `to` within the folder (replacing `to`); `Ok(false)` if `from` does
    /// not exist.
    pub fn rename(&self, from: &str, to: &str) -> std::io::Result<bool> {
        match rustix::fs::renameat(&self.fd, from, &self.fd, to) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Appends `bytes` to `name` (made 0600 if missing) in one write, then syncs the file.
    pub fn append(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let mut file = self.open_file(name, OFlags::CREATE | OFlags::WRONLY | OFlags::APPEND)?;
        file.write_all(bytes)?;
        file.sync_data()
    }

    /// The random key of `len` bytes in `name`: `None` when there is none yet, an error when
    /// the file is not such a key.
    pub fn read_key(&self, name: &str, len: usize) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
        match self.read(name, len as u64) {
            Ok(Some(key)) if key.len() == len => Ok(Some(key)),
            Ok(Some(_)) => Err(format!(
                "{} is damaged (not a {len}-byte key)",
                self.file_path(name).display()
            )),
            Ok(None) => Ok(None),
            Err(e) => Err(format!(
                "cannot read {}: {e}",
                self.file_path(name).display()
            )),
        }
    }

    /// A new random key of `len` bytes, written to `name` (0600) before it is returned.
    pub fn create_key(&self, name: &str, len: usize) -> Result<Zeroizing<Vec<u8>>, String> {
        let mut key = Zeroizing::new(vec![0u8; len]);
        getrandom::fill(&mut key).map_err(|e| format!("no randomness for a key: {e}"))?;
        self.write_atomic(name, &key)
            .map_err(|e| format!("cannot write {}: {e}", self.file_path(name).display()))?;
        Ok(key)
    }

    /// Cuts `name` back to `len` bytes (a failed append's partial record).
    pub fn truncate(&self, name: &str, len: u64) -> std::io::Result<()> {
        let file = self.open_file(name, OFlags::WRONLY)?;
        file.set_len(len)?;
        file.sync_data()
    }

    /// Removes `name`; whether it was there.
    pub fn remove(&self, name: &str) -> std::io::Result<bool> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) => {
                self.sync()?;
                Ok(true)
            }
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes renames and removals in the folder durable.
    pub fn sync(&self) -> std::io::Result<()> {
        rustix::fs::fsync(&self.fd).map_err(Into::into)
    }

    /// The names of the folder's entries.
    pub fn names(&self) -> std::io::Result<Vec<String>> {
        let dir = rustix::fs::Dir::read_from(&self.fd)?;
        let mut names = Vec::new();
        for entry in dir {
            let entry = entry?;
            if let Ok(name) = entry.file_name().to_str() {
                if name != "." && name != ".." {
                    names.push(name.to_string());
                }
            }
        }
        Ok(names)
    }
}

/// Why a lock could not be had.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it (only when not waiting).
    Busy,
    Io(std::io::Error),
}

fn kind_of_mode(mode: u32) -> &'static str {
    match FileType::from_raw_mode(mode) {
        FileType::Directory => "a directory",
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Socket => "a socket",
        FileType::Symlink => "a symbolic link",
        _ => "not a regular file",
    }
}

//! Reading the files an operator names (configuration, secrets, CA bundles, module
//! registrations): regular files only, never more than a cap that fits their kind.
//!
//! Why not `std::fs::read`: `/dev/zero` as a CA file reads forever, a FIFO blocks at `open`, and
//! a 1 GiB token file would be sent as a 1 GiB header. Here the file is opened without blocking,
//! checked to be a regular file on the open descriptor (no race with a rename), and read through
//! a cap; the bytes are wiped when dropped, since they may be secrets.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use zeroize::Zeroizing;

/// The configuration file: a few hundred targets fit in far less.
pub const CONFIG_LIMIT: u64 = 1024 * 1024;
/// A token or PIN file holds one line.
pub const SECRET_LIMIT: u64 = 64 * 1024;
/// A PEM bundle (Debian's whole `ca-certificates.crt` is about 220 KiB).
pub const CA_LIMIT: u64 = 4 * 1024 * 1024;
/// A p11-kit module registration file.
pub const REGISTRATION_LIMIT: u64 = 64 * 1024;

/// Why a file could not be read; names the file, never its content.
#[derive(Debug)]
pub enum FileError {
    Io(std::io::Error),
    /// Not a regular file: what it is instead.
    NotRegular(&'static str),
    TooLarge {
        limit: u64,
    },
}

impl FileError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileError::Io(e) => write!(f, "{e}"),
            FileError::NotRegular(kind) => {
                write!(f, "it is {kind}, not a regular file; name a regular file")
            }
            FileError::TooLarge { limit } => write!(
                f,
                "it is larger than {}, more than such a file ever holds; is it the right file?",
                shown_size(*limit)
            ),
        }
    }
}

fn shown_size(bytes: u64) -> String {
    if bytes >= 1024 * 1024 {
        format!("{} MiB", bytes / (1024 * 1024))
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

/// What a file that is not a regular file is, in words.
pub fn kind_of(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens `path` (following symlinks) without blocking, and checks on the open descriptor that
/// it is a regular file.
fn open_regular(path: &Path) -> Result<(std::fs::File, std::fs::Metadata), FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        // A FIFO's open would wait for a writer; a terminal would become ours.
        .custom_flags((rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32)
        .open(path)
        .map_err(FileError::Io)?;
    let meta = file.metadata().map_err(FileError::Io)?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular(kind_of(meta.file_type())));
    }
    Ok((file, meta))
}

/// Reads the regular file at `path` whole, if it is at most `limit` bytes.
pub fn read_bounded(
    path: &Path,
    limit: u64,
) -> Result<(Zeroizing<Vec<u8>>, std::fs::Metadata), FileError> {
    let (file, meta) = open_regular(path)?;
    if meta.len() > limit {
        return Err(FileError::TooLarge { limit });
    }
    // Grown as read (the size can change under us), never past the cap: reallocation would
    // leave copies of a secret behind, so the capacity is reserved once.
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(FileError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge { limit });
    }
    Ok((bytes, meta))
}

/// The first `len` bytes (fewer when the file is shorter) of the regular file at `path`:
/// enough to tell a file's kind without reading it all.
pub fn read_bounded_head(path: &Path, len: u64) -> Result<(Vec<u8>, std::fs::Metadata), FileError> {
    let (file, meta) = open_regular(path)?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(len)
        .read_to_end(&mut bytes)
        .map_err(FileError::Io)?;
    Ok((bytes, meta))
}

/// [`read_bounded`] for UTF-8 text.
pub fn read_text(
    path: &Path,
    limit: u64,
) -> Result<(Zeroizing<String>, std::fs::Metadata), FileError> {
    let (mut bytes, meta) = read_bounded(path, limit)?;
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(text) => Ok((Zeroizing::new(text), meta)),
        Err(e) => {
            let _wiped = Zeroizing::new(e.into_bytes());
            Err(FileError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "it is not UTF-8 text",
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "hello\n").unwrap();
        let (text, _) = read_text(&path, 64).unwrap();
        assert_eq!(text.as_str(), "hello\n");
    }

    #[test]
    fn devices_fifos_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        for (path, kind) in [
            (fifo.as_path(), "a FIFO"),
            (Path::new("/dev/zero"), "a character device"),
            (dir.path(), "a directory"),
        ] {
            let error = read_bounded(path, 1024).unwrap_err();
            assert!(
                error.to_string().starts_with(&format!("it is {kind}")),
                "{path:?}: {error}"
            );
        }
    }

    #[test]
    fn files_over_the_cap_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'a'; 2049]).unwrap();
        let error = read_bounded(&path, 2048).unwrap_err();
        assert!(error.to_string().contains("larger than 2 KiB"), "{error}");
        assert!(read_bounded(&path, 2049).is_ok());
    }
}

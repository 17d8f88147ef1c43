//! The state folder: where qseed keeps what must outlive one process: the PIN guard's records
//! (`hsm::pin_guard`) and the replay record (`pool::replay`).
//!
//! Which folder, first match wins:
//! 1. `$STATE_DIRECTORY` (systemd's `StateDirectory=qseed`; the first entry if it lists several);
//! 2. `[service] state_dir` in the configuration;
//! 3. `/var/lib/qseed`, when this user may write there (root creates it);
//! 4. for other users, `$XDG_STATE_HOME/qseed`, else `~/.local/state/qseed`.
//!
//! A folder qseed creates is private to its user (0700). A folder that another user owns, or
//! that others may write, is refused (whoever controls it could delete a record or plant a
//! link). When none can be used, the caller decides: the PIN guard then refuses every login,
//! the replay check lasts for the process.
//!
//! [`crate::folder::StateFolder`] is the only way in: a folder opened once and checked on its
//! descriptor, every file in it opened relative to that descriptor without following links,
//! written whole or not at all.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The system-wide default, as in the Debian package (`StateDirectory=qseed`).
pub const DEFAULT_DIR: &str = "/var/lib/qseed";

/// Where state is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateDir {
    /// A folder this process can write.
    Folder(PathBuf),
    /// Nothing writable was found: state lasts as long as this process. `why` says what was
    /// tried, for the one warning.
    Memory { why: String },
}

impl StateDir {
    /// Finds the state folder (see the module documentation). `configured` is `[service]
    /// state_dir`.
    pub fn resolve(configured: Option<&Path>) -> StateDir {
        Self::resolve_with(std::env::var_os("STATE_DIRECTORY"), configured)
    }

    /// [`StateDir::resolve`] with systemd's `$STATE_DIRECTORY` given.
    fn resolve_with(
        state_directory: Option<std::ffi::OsString>,
        configured: Option<&Path>,
    ) -> StateDir {
        let mut tried = Vec::new();
        let mut attempt = |dir: PathBuf, create_parents: bool| match usable(&dir, create_parents) {
            Ok(()) => Some(dir),
            Err(e) => {
                tried.push(format!("{} ({e})", dir.display()));
                None
            }
        };
        if let Some(dir) = state_directory.filter(|d| !d.is_empty()) {
            let first = dir.to_string_lossy().split(':').next().map(PathBuf::from);
            if let Some(dir) = first.and_then(|d| attempt(d, false)) {
                return StateDir::Folder(dir);
            }
        } else if let Some(dir) = configured {
            if let Some(dir) = attempt(dir.to_path_buf(), true) {
                return StateDir::Folder(dir);
            }
        } else {
            let root = rustix::process::geteuid().is_root();
            let system = PathBuf::from(DEFAULT_DIR);
            // Root creates the system folder; another user uses it only where it exists and
            // is theirs to write (the packaged service's user running `doctor` by hand).
            if root || system.is_dir() {
                if let Some(dir) = attempt(system, false) {
                    return StateDir::Folder(dir);
                }
            }
            if !root {
                if let Some(dir) = user_state_home().and_then(|d| attempt(d.join("qseed"), true)) {
                    return StateDir::Folder(dir);
                }
            }
        }
        StateDir::Memory {
            why: if tried.is_empty() {
                "no state folder could be found (set [service] state_dir)".into()
            } else {
                format!("cannot write to {}", tried.join(", "))
            },
        }
    }

    pub fn folder(&self) -> Option<&Path> {
        match self {
            StateDir::Folder(dir) => Some(dir),
            StateDir::Memory { .. } => None,
        }
    }
}

/// `$XDG_STATE_HOME`, else `~/.local/state` (the XDG base directory defaults).
fn user_state_home() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        // The specification says to ignore relative values.
        if dir.is_absolute() {
            return Some(dir);
        }
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".local/state"))
}

/// Creates `dir` (0700) if needed and checks that this process can create files in it.
fn usable(dir: &Path, create_parents: bool) -> std::io::Result<()> {
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(create_parents)
            .mode(0o700)
            .create(dir)?;
    }
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o002 != 0 {
        return Err(std::io::Error::other(
            "anyone may write there; use a folder private to qseed's user",
        ));
    }
    // Before anything is written there: another user's folder is not ours to use.
    crate::trust::check_own_folder(dir, "the state folder").map_err(std::io::Error::other)?;
    // Writing is what counts (root passes any permission check, a read-only mount does not).
    let probe = tempfile::Builder::new()
        .prefix(".qseed-probe")
        .tempfile_in(dir)?;
    drop(probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_folder_is_created_private() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b/state");
        assert_eq!(
            StateDir::resolve_with(None, Some(&dir)),
            StateDir::Folder(dir.clone())
        );
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_folder_anyone_may_write_is_refused() {
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = usable(base.path(), false).unwrap_err();
        assert!(err.to_string().contains("anyone may write"), "{err}");
    }

    #[test]
    fn systemd_state_directory_comes_first() {
        let systemd = tempfile::tempdir().unwrap();
        let configured = tempfile::tempdir().unwrap();
        let listed = format!("{}:/elsewhere", systemd.path().display());
        assert_eq!(
            StateDir::resolve_with(Some(listed.into()), Some(configured.path())),
            StateDir::Folder(systemd.path().to_path_buf())
        );
    }

    #[test]
    fn a_folder_that_cannot_be_made_is_reported() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let inside = file.path().join("state");
        match StateDir::resolve_with(None, Some(&inside)) {
            StateDir::Memory { why } => {
                assert!(why.contains(&inside.display().to_string()), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }
}

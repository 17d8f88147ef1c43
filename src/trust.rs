//! Who could have changed a file before qseed trusts it.
//!
//! qseed runs code (PKCS#11 modules) and reads secrets, trust anchors, entropy and its own state
//! from files an operator names. Each of those is only as safe as the least protected folder on
//! the way to it: a module in a folder another user may write can be swapped for hers, and
//! root's next `qseed once` runs her code. So, as sshd's StrictModes and sudo do, the whole
//! path is walked the way the kernel resolves it (each symbolic link followed, and the folder
//! holding it checked too) and every step must be owned by root or by qseed's own user and
//! writable by nobody else:
//!
//! - owner: uid 0 or the effective uid;
//! - no write bit for others; a group write bit only for group 0 or qseed's own group;
//! - a world-writable folder is passed through only when it is sticky and root's (`/tmp`):
//!   there nobody may rename or delete what another user made, and what comes next is checked
//!   in its turn.
//!
//! `QSEED_ALLOW_WRITABLE_FILES=1` in the environment (never the configuration: whoever could
//! write that file could set it) turns the check off, for an operator who accepts the risk.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// The documented opt-out, read from the environment only.
pub const ALLOW_ENV: &str = "QSEED_ALLOW_WRITABLE_FILES";

/// Symbolic links followed at most, as the kernel's own limit (ELOOP).
const MAX_LINKS: usize = 40;

/// Whether the operator turned the checks off.
pub fn checks_disabled() -> bool {
    std::env::var(ALLOW_ENV).is_ok_and(|v| v == "1")
}

/// Checks that `path` and every folder and link on the way to it are owned by root or by this
/// process's user and writable by nobody else (see the module documentation). `what` names
/// the file in the error (`"module"`, `"pin_file"`). A path that does not exist passes: the
/// caller's open says so in its own words.
pub fn check(path: &Path, what: &str) -> Result<(), String> {
    if checks_disabled() {
        return Ok(());
    }
    check_with(path, what, &Me::current(), false)
}

/// [`check`] for an entropy source: a character device at the end of the path is only
/// checked for its owner (device nodes such as `/dev/urandom` are writable by all, and what is
/// written to a device is not what it reads back); everything else as [`check`].
pub fn check_device(path: &Path, what: &str) -> Result<(), String> {
    if checks_disabled() {
        return Ok(());
    }
    check_with(path, what, &Me::current(), true)
}

/// Checks a folder qseed writes its own state into: as [`check`], and the folder itself must
/// be this user's (root's is accepted for root only).
pub fn check_own_folder(path: &Path, what: &str) -> Result<(), String> {
    if checks_disabled() {
        return Ok(());
    }
    let me = Me::current();
    check_with(path, what, &me, false)?;
    let meta = std::fs::metadata(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if meta.uid() != me.uid {
        return Err(format!(
            "{what} {} belongs to {} and not to {}, the user qseed runs as: whoever owns it \
             can remove or forge what qseed keeps there. Run: chown -R {} {}",
            path.display(),
            user_name(meta.uid()),
            user_name(me.uid),
            login_name(me.uid),
            path.display()
        ));
    }
    Ok(())
}

/// The user and group the checks trust besides root.
struct Me {
    uid: u32,
    gid: u32,
}

impl Me {
    fn current() -> Self {
        Self {
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        }
    }
}

fn check_with(path: &Path, what: &str, me: &Me, device: bool) -> Result<(), String> {
    let start = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("{what} {}: {e}", path.display()))?
            .join(path)
    };
    let mut pending: VecDeque<OsString> = VecDeque::new();
    push_front(&mut pending, &start);
    let mut current = PathBuf::from("/");
    let root =
        std::fs::metadata(&current).map_err(|e| format!("{what} {}: /: {e}", path.display()))?;
    inspect(&current, &root, what, path, me, Step::Folder)?;
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        match name.to_str() {
            Some(".") => continue,
            Some("..") => {
                current.pop();
                continue;
            }
            _ => {}
        }
        let next = current.join(&name);
        let meta = match std::fs::symlink_metadata(&next) {
            Ok(meta) => meta,
            // Missing: nothing to trust or distrust; the caller's open reports it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(format!(
                    "{what} {}: {}: {e}",
                    path.display(),
                    next.display()
                ))
            }
        };
        if meta.file_type().is_symlink() {
            // The link's owner could point it elsewhere (its folder was checked already).
            owner_trusted(&next, &meta, what, path, me)?;
            links += 1;
            if links > MAX_LINKS {
                return Err(format!(
                    "{what} {}: too many symbolic links on the way",
                    path.display()
                ));
            }
            let target = std::fs::read_link(&next)
                .map_err(|e| format!("{what} {}: {}: {e}", path.display(), next.display()))?;
            if target.is_absolute() {
                current = PathBuf::from("/");
            }
            push_front(&mut pending, &target);
            continue;
        }
        let step = if !pending.is_empty() {
            Step::Folder
        } else if device && meta.file_type().is_char_device() {
            Step::Device
        } else {
            Step::Last
        };
        inspect(&next, &meta, what, path, me, step)?;
        current = next;
    }
    Ok(())
}

/// `path`'s components, put before the ones still to walk.
fn push_front(pending: &mut VecDeque<OsString>, path: &Path) {
    for component in path.components().rev() {
        match component {
            Component::Normal(name) => pending.push_front(name.to_os_string()),
            Component::ParentDir => pending.push_front("..".into()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Step {
    /// A folder on the way.
    Folder,
    /// What the path names.
    Last,
    /// What the path names, a character device: its owner counts, not its mode.
    Device,
}

fn inspect(
    at: &Path,
    meta: &std::fs::Metadata,
    what: &str,
    path: &Path,
    me: &Me,
    step: Step,
) -> Result<(), String> {
    owner_trusted(at, meta, what, path, me)?;
    if step == Step::Device {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    let sticky_root_folder = meta.is_dir() && mode & 0o1000 != 0 && meta.uid() == 0;
    let others_write = mode & 0o002 != 0 && !(step == Step::Folder && sticky_root_folder);
    let group_write = mode & 0o020 != 0 && meta.gid() != 0 && meta.gid() != me.gid;
    if others_write || group_write {
        let (who, fix) = if others_write {
            ("every user on this machine", "o-w")
        } else {
            ("the members of its group", "g-w")
        };
        return Err(format!(
            "{what} {}: {} (owner {}, group {}, mode {:04o}) can be changed by {who}, who could \
             then make qseed {}. Run: chmod {fix} {}{}",
            path.display(),
            describe(at, path, meta),
            user_name(meta.uid()),
            group_name(meta.gid()),
            mode & 0o7777,
            if meta.is_dir() {
                "load their files instead"
            } else {
                "use their content"
            },
            at.display(),
            opt_out_hint()
        ));
    }
    Ok(())
}

fn owner_trusted(
    at: &Path,
    meta: &std::fs::Metadata,
    what: &str,
    path: &Path,
    me: &Me,
) -> Result<(), String> {
    let owner = meta.uid();
    if owner == 0 || owner == me.uid {
        return Ok(());
    }
    let trusted = if me.uid == 0 {
        "root".to_string()
    } else {
        format!("root or of {}", user_name(me.uid))
    };
    Err(format!(
        "{what} {}: {} belongs to {} (mode {:04o}), who could change it and so make qseed \
         {}. Only files and folders of {trusted} are trusted. Run: chown root {} (or move it \
         somewhere root owns){}",
        path.display(),
        describe(at, path, meta),
        user_name(owner),
        meta.permissions().mode() & 0o7777,
        if meta.is_dir() {
            "load their files instead"
        } else {
            "use their content"
        },
        at.display(),
        opt_out_hint()
    ))
}

fn describe(at: &Path, path: &Path, meta: &std::fs::Metadata) -> String {
    if at == path && meta.is_dir() {
        "the folder".to_string()
    } else if at == path {
        "the file".to_string()
    } else {
        format!("{} on the way", at.display())
    }
}

fn opt_out_hint() -> String {
    format!(" (or set {ALLOW_ENV}=1 in the environment to accept the risk)")
}

/// The user's name as `chown` takes it (its number when it has none).
pub fn login_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => user.name,
        _ => uid.to_string(),
    }
}

/// `name (uid N)`, or `uid N` for a user without a name.
pub fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("{} (uid {uid})", user.name),
        _ => format!("uid {uid}"),
    }
}

fn group_name(gid: u32) -> String {
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(group)) => group.name,
        _ => format!("gid {gid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn me() -> Me {
        Me::current()
    }

    #[test]
    fn a_private_file_passes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        check_with(&file, "module", &me(), false).unwrap();
    }

    #[test]
    fn a_world_writable_file_or_folder_on_the_way_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let file = sub.join("f");
        std::fs::write(&file, "x").unwrap();
        chmod(&file, 0o666);
        let err = check_with(&file, "module", &me(), false).unwrap_err();
        assert!(
            err.contains("the file") && err.contains("chmod o-w") && err.contains("0666"),
            "{err}"
        );
        chmod(&file, 0o644);
        chmod(&sub, 0o777);
        let err = check_with(&file, "module", &me(), false).unwrap_err();
        assert!(
            err.contains(&format!("{} on the way", sub.display())) && err.contains("0777"),
            "{err}"
        );
        // Sticky and root's, like /tmp: passed through (when root runs the test).
        if rustix::process::geteuid().is_root() {
            chmod(&sub, 0o1777);
            check_with(&file, "module", &me(), false).unwrap();
        }
    }

    #[test]
    fn a_link_is_followed_and_its_target_checked() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let file = open.join("f");
        std::fs::write(&file, "x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("open/../open/f", &link).unwrap();
        let err = check_with(&link, "pin_file", &me(), false).unwrap_err();
        assert!(err.contains(&open.display().to_string()), "{err}");
        chmod(&open, 0o755);
        check_with(&link, "pin_file", &me(), false).unwrap();
    }

    #[test]
    fn a_group_write_bit_of_another_group_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        chmod(&file, 0o664);
        let mine = Me {
            uid: me().uid,
            gid: std::fs::metadata(&file).unwrap().gid(),
        };
        check_with(&file, "module", &mine, false).unwrap();
        let other = Me {
            uid: mine.uid,
            gid: mine.gid + 1,
        };
        if mine.gid != 0 {
            let err = check_with(&file, "module", &other, false).unwrap_err();
            assert!(err.contains("chmod g-w"), "{err}");
        }
    }

    #[test]
    fn a_file_of_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let stranger = Me {
            uid: 4_000_123,
            gid: 4_000_123,
        };
        // Owned by root or by the test's user: trusted for them, not for a stranger unless root.
        let owner = std::fs::metadata(&file).unwrap().uid();
        let result = check_with(&file, "module", &stranger, false);
        if owner == 0 {
            result.unwrap();
        } else {
            assert!(result.unwrap_err().contains("belongs to"));
        }
    }

    #[test]
    fn a_missing_file_is_left_to_the_caller() {
        check_with(Path::new("/nonexistent/qseed/x"), "module", &me(), false).unwrap();
    }
}

//! What qseed knows about vendors' PKCS#11 modules, in one table: the files and groups their
//! clients need. Used to explain a `C_Initialize` that fails because qseed's user may not
//! reach them (the module itself only says `CKR_GENERAL_ERROR`).
//!
//! Facts for modules we cannot run here (Luna, nShield, Utimaco, CloudHSM, YubiHSM) come from
//! their vendors' installation guides; those are only used to word advice. What changes what
//! qseed does (`max_seed`, `reload_library`) was seen on a module that runs here.

use std::path::{Path, PathBuf};

/// One vendor module.
#[derive(Debug)]
pub struct ModuleProfile {
    pub vendor: &'static str,
    /// File names of the module (the path's last component).
    pub file_names: &'static [&'static str],
    /// The module's `C_GetInfo` manufacturer: finds it behind a proxy or spy module.
    pub library_manufacturer: Option<&'static str>,
    /// The group whose members may use the module's client or token store.
    pub group: Option<&'static str>,
    /// The environment variable naming the client's configuration file, and its default.
    pub config_env: Option<&'static str>,
    pub config_default: Option<&'static str>,
    /// Folders the client reads or writes at start, when its configuration says nothing.
    pub folders: &'static [&'static str],
    /// Most bytes one `C_SeedRandom` takes (a larger seed is split), where known.
    pub max_seed: Option<usize>,
    /// `init_args` that make the module start without any database, where it needs some.
    pub init_args: Option<&'static str>,
    /// `C_Finalize` + `C_Initialize` do not bring it back once its connection is lost: only
    /// unloading the library and loading it again does (see [`super::module`]).
    pub reload_library: bool,
    /// The server a client module connects to, where it is one (then `config_env` names the
    /// server's address, not a file): a failed `C_Initialize` is first a server not running.
    pub server: Option<&'static str>,
}

/// Known modules. The last component of a module's path picks the row.
pub const PROFILES: &[ModuleProfile] = &[
    ModuleProfile {
        vendor: "NSS softoken",
        file_names: &["libsoftokn3.so"],
        library_manufacturer: Some("Mozilla Foundation"),
        group: None,
        config_env: None,
        config_default: None,
        folders: &[],
        max_seed: None,
        // Its C_Initialize without parameters is CKR_ARGUMENTS_BAD; these open no database.
        init_args: Some("configdir='' certPrefix='' keyPrefix='' secmod='' flags=noCertDB,noModDB"),
        reload_library: false,
        server: None,
    },
    ModuleProfile {
        vendor: "SoftHSM",
        file_names: &["libsofthsm2.so"],
        library_manufacturer: Some("SoftHSM"),
        group: Some("softhsm"),
        config_env: Some("SOFTHSM2_CONF"),
        config_default: Some("/etc/softhsm/softhsm2.conf"),
        folders: &["/var/lib/softhsm/tokens"],
        max_seed: None,
        init_args: None,
        reload_library: false,
        server: None,
    },
    ModuleProfile {
        vendor: "openCryptoki",
        file_names: &["libopencryptoki.so", "libopencryptoki.so.0"],
        library_manufacturer: None,
        group: Some("pkcs11"),
        config_env: None,
        config_default: Some("/etc/opencryptoki/opencryptoki.conf"),
        folders: &["/var/lib/opencryptoki", "/run/opencryptoki"],
        max_seed: None,
        init_args: None,
        reload_library: false,
        server: None,
    },
    ModuleProfile {
        vendor: "tpm2-pkcs11",
        file_names: &["libtpm2_pkcs11.so", "libtpm2_pkcs11.so.0"],
        library_manufacturer: Some("tpm2-software.github.io"),
        group: Some("tss"),
        config_env: None,
        config_default: None,
        folders: &[],
        // One TPM2_StirRandom carries at most 128 bytes; 129 fails with CKR_GENERAL_ERROR.
        max_seed: Some(128),
        init_args: None,
        reload_library: false,
        server: None,
    },
    ModuleProfile {
        vendor: "Thales Luna",
        file_names: &["libCryptoki2_64.so", "libCryptoki2.so"],
        library_manufacturer: None,
        group: Some("hsmusers"),
        config_env: Some("ChrystokiConfigurationPath"),
        config_default: Some("/etc/Chrystoki.conf"),
        folders: &[],
        max_seed: None,
        init_args: None,
        reload_library: false,
        server: None,
    },
    ModuleProfile {
        vendor: "Entrust nShield",
        file_names: &["libcknfast.so"],
        library_manufacturer: None,
        group: Some("nfast"),
        config_env: None,
        config_default: None,
        folders: &["/opt/nfast/kmdata/local"],
        max_seed: None,
        init_args: None,
        reload_library: false,
        server: None,
    },
    ModuleProfile {
        vendor: "Utimaco CryptoServer",
        file_names: &["libcs_pkcs11_R3.so", "libcs_pkcs11_R2.so"],
        library_manufacturer: None,
        group: None,
        config_env: Some("CS_PKCS11_R3_CFG"),
        config_default: Some("/etc/utimaco/cs_pkcs11_R3.cfg"),
        folders: &[],
        max_seed: None,
        init_args: None,
        reload_library: false,
        server: None,
    },
    ModuleProfile {
        vendor: "AWS CloudHSM",
        file_names: &["libcloudhsm_pkcs11.so"],
        library_manufacturer: None,
        group: None,
        config_env: None,
        config_default: Some("/opt/cloudhsm/etc/cloudhsm-pkcs11.cfg"),
        folders: &[],
        max_seed: None,
        init_args: None,
        reload_library: false,
        server: None,
    },
    ModuleProfile {
        // Debian's caml-crush-clients. Once its pkcs11proxyd is gone, every call answers
        // (CK_RV)-1, and C_Finalize + C_Initialize keep the dead connection: the client
        // connects when the library is loaded.
        vendor: "Caml Crush",
        file_names: &[
            "libp11clientunix.so",
            "libp11clienttcp.so",
            "libp11clienttcpssl.so",
            "libp11client.so",
        ],
        library_manufacturer: None,
        group: None,
        config_env: Some("PKCS11PROXY_SOCKET_PATH"),
        config_default: Some("/var/run/pkcs11proxyd.socket"),
        folders: &[],
        max_seed: None,
        init_args: None,
        reload_library: true,
        server: Some("pkcs11proxyd"),
    },
    ModuleProfile {
        vendor: "YubiHSM 2",
        file_names: &["yubihsm_pkcs11.so"],
        library_manufacturer: None,
        group: None,
        config_env: Some("YUBIHSM_PKCS11_CONF"),
        config_default: None,
        folders: &[],
        max_seed: None,
        init_args: None,
        reload_library: false,
        server: None,
    },
];

/// The row for `module`, if qseed knows it by its file name.
pub fn profile(module: &Path) -> Option<&'static ModuleProfile> {
    let name = module.file_name()?.to_str()?;
    PROFILES.iter().find(|p| p.file_names.contains(&name))
}

/// The row for a loaded module: by file name, else by the manufacturer its `C_GetInfo`
/// reports (a spy or proxy module forwards that).
pub fn profile_of(module: &Path, library_manufacturer: &str) -> Option<&'static ModuleProfile> {
    profile(module).or_else(|| {
        PROFILES
            .iter()
            .find(|p| p.library_manufacturer == Some(library_manufacturer.trim()))
    })
}

/// The packaged service's drop-in for HSM access, shared with `qseed-doctor.service`.
const SERVICE_DROP_IN: &str = "/etc/systemd/system/qseed.service.d/hsm-access.conf";

/// Who qseed runs as, for messages: `user qseed (uid 998)`.
pub fn running_user() -> String {
    let uid = nix::unistd::Uid::current();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => format!("user {} (uid {uid})", user.name),
        _ => format!("uid {uid}"),
    }
}

fn user_name() -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::current())
        .ok()
        .flatten()
        .map_or_else(|| "$(id -un)".to_string(), |u| u.name)
}

/// Explains a failed `C_Initialize` of `module`: the first file or folder the module needs
/// that qseed's user may not use, and how to grant it; otherwise what is known.
pub fn diagnose_initialize(module: &Path, rv: cryptoki::error::RvError, had_args: bool) -> String {
    let who = running_user();
    if rv == cryptoki::error::RvError::ArgumentsBad {
        return match (profile(module).and_then(|p| p.init_args), had_args) {
            (Some(example), false) => format!(
                "the module wants initialization parameters: set init_args in the target (for \
                 `qseed slots`, --init-args), e.g. init_args = {example:?}"
            ),
            (_, false) => "the module refused C_Initialize's arguments; if it needs \
                           initialization parameters, set init_args (see its documentation)"
                .into(),
            (_, true) => "the module refused its init_args; check them against the module's \
                          documentation"
                .into(),
        };
    }
    let Some(profile) = profile(module) else {
        return format!(
            "the module failed to start. qseed runs as {who}: check that this user may read the \
             HSM client's configuration and state (vendor clients often want their users in a \
             group), and see the module's own log"
        );
    };
    if let Some(server) = profile.server {
        let address = profile
            .config_env
            .and_then(|var| std::env::var(var).ok().map(|v| format!("{v} (from {var})")))
            .or_else(|| profile.config_default.map(|d| format!("{d} (its default)")))
            .unwrap_or_else(|| "its configured address".into());
        return format!(
            "{}'s client could not reach its server: is {server} running and listening on \
             {address}? qseed tries again on its own",
            profile.vendor
        );
    }
    let needed = needed_paths(profile);
    for (path, wants_write) in &needed {
        if let Some(refusal) = refused(path, *wants_write) {
            let user = user_name();
            let grant = match &refusal.group {
                // The path is open to a group: joining it is the fix.
                Some(group) => format!(
                    "add {user} to group {group}: for the systemd service, \
                     `SupplementaryGroups={group}` in {SERVICE_DROP_IN}, then `systemctl \
                     daemon-reload`; by hand, `usermod -aG {group} {user}` (then log in again)"
                ),
                None => {
                    let group = profile.group.unwrap_or("GROUP");
                    format!(
                        "{} is open to no group {user} could join: open it to one (e.g. `chgrp \
                         -R {group} {shown} && chmod -R g+rwX {shown}`), then add {user} to it \
                         (for the systemd service: `SupplementaryGroups={group}` in \
                         {SERVICE_DROP_IN})",
                        refusal.path.display(),
                        shown = refusal.path.display()
                    )
                }
            };
            return format!(
                "{} could not start: qseed runs as {who}, which {}. Fix: {grant}",
                profile.vendor, refusal.text
            );
        }
    }
    format!(
        "{} could not start (qseed runs as {who}; the files it needs that qseed knows of are \
         usable: {}); see the module's own log",
        profile.vendor,
        if needed.is_empty() {
            "none known".to_string()
        } else {
            needed
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    )
}

/// The configuration file the module reads, then its folders (SoftHSM's token folder comes
/// from its configuration); `true` where the module also writes.
fn needed_paths(profile: &ModuleProfile) -> Vec<(PathBuf, bool)> {
    let mut paths = Vec::new();
    let config = profile
        .config_env
        .and_then(std::env::var_os)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| profile.config_default.map(PathBuf::from));
    let mut folders: Vec<PathBuf> = profile.folders.iter().map(PathBuf::from).collect();
    if let Some(config) = config {
        if profile.vendor == "SoftHSM" {
            if let Some(dir) = softhsm_token_dir(&config) {
                folders = vec![dir];
            }
        }
        paths.push((config, false));
    }
    paths.extend(folders.into_iter().map(|f| (f, true)));
    paths
}

/// `directories.tokendir` of a SoftHSM configuration file (read bounded; `None` when it
/// cannot be read, which [`refused`] then reports).
fn softhsm_token_dir(config: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(config)
        .ok()?
        .take(64 * 1024)
        .read_to_string(&mut text)
        .ok()?;
    text.lines()
        .filter_map(|line| line.split_once('='))
        .find(|(key, _)| key.trim() == "directories.tokendir")
        .map(|(_, value)| PathBuf::from(value.trim()))
}

/// A file or folder this process may not use.
#[derive(Debug)]
struct Refusal {
    path: PathBuf,
    /// `may not enter /x (root:root, mode 700)`.
    text: String,
    /// The path's group, when its group bits grant what was refused: joining it would do.
    group: Option<String>,
}

/// Why this process may not use `path` (read it, enter and, with `write`, change it as a
/// folder), or `None` when it may (or when it does not exist: that is the module's business).
fn refused(path: &Path, write: bool) -> Option<Refusal> {
    use rustix::fs::Access;
    use std::os::unix::fs::MetadataExt;
    let refusal = |at: &Path, verb: &str, group_bits: u32| {
        let meta = std::fs::metadata(at).ok();
        let group = meta
            .filter(|m| m.mode() & group_bits == group_bits)
            .and_then(|m| nix::unistd::Group::from_gid(m.gid().into()).ok().flatten())
            .map(|g| g.name);
        Refusal {
            path: at.to_path_buf(),
            text: format!("may not {verb} {}", describe(at)),
            group,
        }
    };
    // The first parent that stops us is the one to name.
    let mut prefix = PathBuf::new();
    for part in path.components() {
        prefix.push(part);
        if prefix == path {
            break;
        }
        if prefix.is_dir() && rustix::fs::access(&prefix, Access::EXEC_OK).is_err() {
            return Some(refusal(&prefix, "enter", 0o010));
        }
    }
    let meta = std::fs::metadata(path).ok()?;
    let (wanted, verb, bits) = match (meta.is_dir(), write) {
        (true, true) => (
            Access::READ_OK | Access::WRITE_OK | Access::EXEC_OK,
            "read and write",
            0o070,
        ),
        (true, false) => (Access::READ_OK | Access::EXEC_OK, "read", 0o050),
        (false, _) => (Access::READ_OK, "read", 0o040),
    };
    match rustix::fs::access(path, wanted) {
        Ok(()) => None,
        Err(_) => Some(refusal(path, verb, bits)),
    }
}

/// `/var/lib/softhsm/tokens (root:softhsm, mode 2770)`.
fn describe(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return path.display().to_string();
    };
    let owner = nix::unistd::User::from_uid(meta.uid().into())
        .ok()
        .flatten()
        .map_or_else(|| meta.uid().to_string(), |u| u.name);
    let group = nix::unistd::Group::from_gid(meta.gid().into())
        .ok()
        .flatten()
        .map_or_else(|| meta.gid().to_string(), |g| g.name);
    format!(
        "{} ({owner}:{group}, mode {:o})",
        path.display(),
        meta.mode() & 0o7777
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 24: a Caml Crush client whose server is down was told "could not start" with a
    /// list of files; the cause is the server.
    #[test]
    fn a_client_module_whose_server_is_down_is_told_to_check_the_server() {
        let said = diagnose_initialize(
            Path::new("/usr/lib/x86_64-linux-gnu/caml-crush/libp11clientunix.so"),
            cryptoki::error::RvError::DeviceError,
            false,
        );
        assert!(said.contains("is pkcs11proxyd running"), "{said}");
        assert!(
            said.contains("PKCS11PROXY_SOCKET_PATH") || said.contains("its default"),
            "{said}"
        );
        assert!(!said.contains("group"), "no permissions advice: {said}");
    }

    #[test]
    fn modules_are_known_by_file_name() {
        let softhsm = profile(Path::new("/usr/lib/softhsm/libsofthsm2.so")).unwrap();
        assert_eq!(softhsm.group, Some("softhsm"));
        let luna = profile(Path::new("/usr/safenet/lunaclient/lib/libCryptoki2_64.so")).unwrap();
        assert_eq!(luna.vendor, "Thales Luna");
        assert!(profile(Path::new("/opt/vendor/libunknown.so")).is_none());
    }

    #[test]
    fn softhsm_token_folder_comes_from_its_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            "# comment\ndirectories.tokendir = /srv/tokens/\nobjectstore.backend = file\n",
        )
        .unwrap();
        assert_eq!(
            softhsm_token_dir(&conf),
            Some(PathBuf::from("/srv/tokens/"))
        );
    }

    #[test]
    fn an_unknown_module_gets_general_advice_naming_the_user() {
        let text = diagnose_initialize(
            Path::new("/opt/x/libx.so"),
            cryptoki::error::RvError::GeneralError,
            false,
        );
        assert!(text.contains("qseed runs as"), "{text}");
        assert!(
            text.contains(&nix::unistd::Uid::current().to_string()),
            "{text}"
        );
    }
}

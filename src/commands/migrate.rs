//! `qseed migrate [FILE] [--write DIR]`: Qrypt's qseed YAML configuration as qseed's TOML.
//!
//! Printed, the TOML names `qrypt.token` and `hsm.pin` files for the secrets and says how to
//! fill them; with `--write DIR` it writes those files (0600) beside `qseed.toml`. The token and
//! the PIN are never printed. Where the module loads, the token now in the configured slot is
//! named in comments, with its serial suggested in place of the slot id.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use secrecy::ExposeSecret;

use crate::config::legacy::{self, LegacyConfig};
use crate::config::{DEFAULT_PERIOD, DEFAULT_SIZE, DEFAULT_URL};
use crate::error::Error;
use crate::hsm::{module, token};

const TOKEN_FILE: &str = "qrypt.token";
const PIN_FILE: &str = "hsm.pin";

pub async fn migrate(file: &Path, write: Option<&Path>) -> Result<(), Error> {
    let shown = file.display();
    // A regular file of a configuration's size: /dev/zero or a FIFO is refused, not read.
    let (text, _) = crate::files::read_text(file, crate::files::CONFIG_LIMIT)
        .map_err(|e| Error::Config(format!("cannot read {shown}: {e}")))?;
    if !legacy::looks_like_yaml(&text) {
        return Err(Error::Config(format!(
            "{shown} is not Qrypt's qseed YAML configuration (`key: value` lines); if it is \
             qseed's TOML already, there is nothing to migrate"
        )));
    }
    let old = legacy::parse(&text).map_err(|e| Error::Config(format!("{shown}: {e}")))?;
    let module = old.module.clone();
    let slot = old.slot_id;
    // The module named in a file another user could have written is hers to choose: looking
    // up the slot would run her code, as root when root migrates.
    let found = match crate::trust::check(file, "the YAML configuration") {
        Ok(()) => tokio::task::spawn_blocking(move || describe_slot(&module, slot))
            .await
            .unwrap_or_else(|e| Err(e.to_string())),
        Err(why) => {
            tracing::warn!("the module it names is not loaded: {why}");
            Err(format!("not loaded: {why}"))
        }
    };
    let layout = write.map(Layout::for_folder);
    let toml = render(&old, file, &found, write.is_some(), layout.as_ref());
    // What we print must read back as the configuration it claims to be.
    if let Err(e) = toml::from_str::<toml::Table>(&toml) {
        return Err(Error::Failed(format!(
            "the migrated configuration does not parse ({e}); please report this"
        )));
    }
    match write {
        None => {
            say!("{toml}");
            Ok(())
        }
        Some(dir) => write_all(
            dir,
            &toml,
            &old,
            layout.as_ref().unwrap_or(&Layout::plain()),
        ),
    }
}

/// The Debian package's folder, where its unit reads the configuration and loads the
/// secrets as systemd credentials.
const PACKAGE_FOLDER: &str = "/etc/qseed";
/// The configuration the package ships (a migration may replace it while it is untouched).
const PACKAGED_CONFIG: &str = include_str!("../../packaging/qseed.toml");

/// How the files written by `--write` are named and owned.
#[derive(Debug)]
struct Layout {
    /// The gid of the package's `qseed` group, when the package is installed and root
    /// migrates: qseed.toml is then root:qseed 0640, which the service's user can read.
    service_group: Option<u32>,
    /// Writing into the package's folder: the secrets are named as the packaged unit passes
    /// them (`credential:qrypt.token`, `credential:hsm.pin`, loaded by systemd as root from
    /// the 0600 files).
    credentials: bool,
}

impl Layout {
    fn plain() -> Self {
        Self {
            service_group: None,
            credentials: false,
        }
    }

    fn for_folder(dir: &Path) -> Self {
        let root = rustix::process::geteuid().is_root();
        let service_group = nix::unistd::Group::from_name("qseed")
            .ok()
            .flatten()
            .filter(|_| root)
            .map(|g| g.gid.as_raw());
        let packaged =
            service_group.is_some() && Path::new("/usr/lib/systemd/system/qseed.service").exists();
        Self {
            service_group,
            credentials: packaged && dir == Path::new(PACKAGE_FOLDER),
        }
    }

    fn secret_ref(&self, file: &str) -> String {
        if self.credentials {
            format!("credential:{file}")
        } else {
            file.to_string()
        }
    }
}

/// The token in `slot` of `module`, as (label, serial), if the module can tell.
fn describe_slot(module: &Path, slot: u64) -> Result<Option<(String, String)>, String> {
    let pkcs11 = module::load(module, None).map_err(|e| e.to_string())?;
    let listing = token::list(&pkcs11, module).map_err(|e| e.to_string());
    let _ = pkcs11.finalize();
    Ok(listing?
        .into_iter()
        .find(|s| s.slot_id == slot)
        .and_then(|s| s.token)
        .map(|t| (t.label, t.serial)))
}

fn render(
    old: &LegacyConfig,
    file: &Path,
    found: &Result<Option<(String, String)>, String>,
    writing: bool,
    layout: Option<&Layout>,
) -> String {
    let plain = Layout::plain();
    let layout = layout.unwrap_or(&plain);
    let token_ref = layout.secret_ref(TOKEN_FILE);
    let pin_ref = layout.secret_ref(PIN_FILE);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# qseed configuration, migrated by qseed {} from {} (Qrypt's qseed).\n\
         # Same meaning: one target, Qrypt's cloud with POST /api/v1/entropy{}.",
        env!("CARGO_PKG_VERSION"),
        file.display(),
        if old.pin.is_some() {
            ", a user login"
        } else {
            ""
        }
    );
    if !writing {
        let _ = writeln!(
            t,
            "# The token and PIN are not printed. Put qrypt_token's value in {TOKEN_FILE}{} \
             (one line, chmod 0600),\n# or run `qseed migrate {} --write DIR`, which does it.",
            if old.pin.is_some() {
                format!(" and cryptoki_user_pin's in {PIN_FILE}")
            } else {
                String::new()
            },
            file.display()
        );
    }
    let _ = writeln!(
        t,
        "\n[source]\n# Qrypt's qseed always used Qrypt's cloud (East US).\nurl = \"{DEFAULT_URL}\"\n\
         # Qrypt's qseed sends POST /api/v1/entropy.\ndialect = \"entropy\"\n\
         # It sent block_size 1 per KiB; \"auto\" asks in bytes, then in KiB if the server reads\n\
         # KiB (one failed request, once). \"kib\" asks as Qrypt's qseed did.\n\
         block_unit = \"auto\"\n\
         # qrypt_token, moved out of the configuration into a file of its own{}:\n\
         token_file = \"{token_ref}\"\n",
        if layout.credentials {
            " (/etc/qseed/qrypt.token,\n# which the packaged unit passes as a systemd credential)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        t,
        "[[target]]\nname = \"{}\"\n# cryptoki_lib\nmodule = {}",
        legacy::TARGET_NAME,
        toml_string(&old.module.display().to_string())
    );
    match found {
        Ok(Some((label, serial))) => {
            let _ = writeln!(
                t,
                "# cryptoki_slot_id {}: the token there now is {} (serial {}).\n\
                 # Slot ids can change when tokens come and go (SoftHSM's do); a serial does \
                 not.\n# To follow the token instead of the slot, replace slot_id with:\n\
                 # serial = {}",
                old.slot_id,
                toml_string(label),
                toml_string(serial),
                toml_string(serial)
            );
        }
        Ok(None) => {
            let _ = writeln!(
                t,
                "# cryptoki_slot_id {}: the module shows no token in that slot now \
                 (`qseed slots --module ...` lists them).",
                old.slot_id
            );
        }
        Err(e) => {
            let _ = writeln!(
                t,
                "# cryptoki_slot_id {}: the module could not be asked which token is there \
                 ({}).",
                old.slot_id,
                e.replace('\n', " ")
            );
        }
    }
    let _ = writeln!(t, "slot_id = {}", old.slot_id);
    if old.pin.is_some() {
        let _ = writeln!(
            t,
            "# cryptoki_user_pin, moved into a file of its own:\nlogin = \"user\"\n\
             pin_file = \"{pin_ref}\""
        );
    } else {
        let _ = writeln!(
            t,
            "# No cryptoki_user_pin: seeding without a login.\nlogin = \"none\""
        );
    }
    let size = old.size.unwrap_or(DEFAULT_SIZE as u64);
    let period = old.period.unwrap_or(DEFAULT_PERIOD.as_secs());
    let _ = writeln!(
        t,
        "# size: bytes per injection{}\nsize = {size}\n# period: seconds between injections{}\n\
         period = \"{period}s\"",
        if old.size.is_none() {
            " (not set: Qrypt's default)"
        } else {
            ""
        },
        if old.period.is_none() {
            " (not set: Qrypt's default)"
        } else {
            ""
        }
    );
    t
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

fn write_all(dir: &Path, toml: &str, old: &LegacyConfig, layout: &Layout) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(|e| Error::Failed(format!("cannot create {}: {e}", dir.display())))?;
    // Another user's folder (or one others may write) could have its files swapped between
    // our writes, and our cleanup made to delete hers, or the operator's.
    crate::trust::check(dir, "--write folder").map_err(Error::Failed)?;
    let mut written: Vec<PathBuf> = Vec::new();
    let mut files: Vec<(&str, &[u8], u32)> = vec![
        ("qseed.toml", toml.as_bytes(), 0o640),
        (TOKEN_FILE, old.token.0.expose_secret().as_bytes(), 0o600),
    ];
    if let Some(pin) = &old.pin {
        files.push((PIN_FILE, pin.0.expose_secret().as_bytes(), 0o600));
    }
    // Nothing is overwritten, but for the package's own qseed.toml while it is as shipped
    // (so that `migrate --write /etc/qseed` works under the package): refuse before writing
    // anything.
    let mut replace_packaged = false;
    for (name, _, _) in &files {
        let path = dir.join(name);
        if *name == "qseed.toml" && layout.credentials && is_packaged_config(&path) {
            replace_packaged = true;
            continue;
        }
        if path.exists() || path.is_symlink() {
            return Err(Error::Failed(format!(
                "{} exists; qseed migrate does not overwrite files. Choose another --write \
                 folder, or move it away",
                path.display()
            )));
        }
    }
    if replace_packaged {
        let path = dir.join("qseed.toml");
        let kept = dir.join("qseed.toml.packaged");
        std::fs::rename(&path, &kept)
            .map_err(|e| Error::Failed(format!("cannot move {} aside: {e}", path.display())))?;
        say!(
            "moved the packaged (untouched) {} to {}",
            path.display(),
            kept.display()
        );
    }
    for (name, content, mode) in files {
        let path = dir.join(name);
        // The configuration is read by the service's user; the secrets only by root (under
        // the package, systemd's LoadCredential= hands them over).
        let group = match (name, layout.service_group) {
            ("qseed.toml", Some(gid)) => Some(gid),
            _ => None,
        };
        let mode = if group.is_some() { 0o640 } else { mode };
        let result = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(content)?;
                if name != "qseed.toml" {
                    f.write_all(b"\n")?;
                }
                if let Some(gid) = group {
                    rustix::fs::fchown(&f, None, Some(rustix::fs::Gid::from_raw(gid)))?;
                }
                f.sync_all()
            });
        if let Err(e) = result {
            for done in &written {
                let _ = std::fs::remove_file(done);
            }
            return Err(Error::Failed(format!(
                "cannot write {}: {e}",
                path.display()
            )));
        }
        written.push(path);
    }
    let secrets_mode = "0600";
    say!(
        "wrote {} ({}), {} ({secrets_mode}){}. Check it with: {}",
        dir.join("qseed.toml").display(),
        if layout.service_group.is_some() {
            "0640, group qseed"
        } else {
            "0640"
        },
        dir.join(TOKEN_FILE).display(),
        if old.pin.is_some() {
            format!(" and {} ({secrets_mode})", dir.join(PIN_FILE).display())
        } else {
            String::new()
        },
        if layout.credentials {
            "sudo systemctl start qseed-doctor; journalctl -u qseed-doctor -o cat (then: sudo \
             systemctl restart qseed)"
                .to_string()
        } else {
            format!("qseed --config {} doctor", dir.join("qseed.toml").display())
        }
    );
    Ok(())
}

/// Whether `path` is the package's qseed.toml as shipped.
fn is_packaged_config(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.len() < 64 * 1024)
        && std::fs::read(path).is_ok_and(|bytes| bytes == PACKAGED_CONFIG.as_bytes())
}

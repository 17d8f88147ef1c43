//! `qseed check`: the configuration checked without side effects, like `nginx -t`, for
//! configuration management and CI. Everything a start checks before it touches the network
//! or an HSM: the file parses and resolves, the files it names (token, PINs, CA, devices)
//! are readable and trusted, every module is a trusted shared library (not loaded: loading
//! runs the vendor's code and C_Initialize), the state folder is usable. No API request, no
//! DNS lookup, no login, no seed. Exit 0 when usable, 2 when not.

use std::path::Path;

use crate::config;
use crate::error::Error;
use crate::state::StateDir;

pub fn check(config_path: &Path) -> Result<(), Error> {
    let config = super::run::load(config_path)?;
    let mut problems = Vec::new();
    let mut modules = std::collections::BTreeSet::new();
    for target in &config.targets {
        if target.kind != crate::config::TargetKind::Pkcs11 {
            continue;
        }
        if modules.insert(target.module.clone()) {
            if let Err(why) = check_module(&target.module) {
                problems.push(format!(
                    "target {:?}: module {}: {why}",
                    target.name,
                    target.module.display()
                ));
            }
        }
    }
    let state = StateDir::resolve(config.state_dir.as_deref());
    let state_line = match &state {
        StateDir::Folder(dir) => format!("state folder {}", dir.display()),
        StateDir::Memory { why } => {
            if config.targets.iter().any(|t| t.login.is_some()) {
                problems.push(format!(
                    "no usable state folder ({why}): the PIN guard would refuse every login; set \
                     [service] state_dir to a folder of qseed's own user"
                ));
            }
            format!("no state folder ({why})")
        }
    };
    if !problems.is_empty() {
        return Err(Error::Config(format!(
            "configuration {}: {}",
            config_path.display(),
            problems.join("; ")
        )));
    }
    say!(
        "configuration {} is valid: {} source(s), {} target(s), modules {}; {}{}",
        config_path.display(),
        config.sources.len(),
        config.targets.len(),
        modules
            .iter()
            .map(|m| m.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        state_line,
        if config::unread_legacy_beside(config_path).is_some() {
            "; warning: Qrypt's qseed_config.yml beside it is not read (see the log)"
        } else {
            ""
        }
    );
    Ok(())
}

/// A module qseed could load: a trusted regular file that is an ELF shared object.
fn check_module(path: &Path) -> Result<(), String> {
    crate::trust::check(path, "the PKCS#11 module")?;
    let (head, _) =
        crate::files::read_bounded_head(path, 64).map_err(|e| format!("cannot be read: {e}"))?;
    if head.len() < 18 || &head[..4] != b"\x7fELF" {
        return Err("is not an ELF shared library (the vendor's PKCS#11 .so)".into());
    }
    // e_type (2 bytes after the 16-byte ident): 3 is ET_DYN, a shared object.
    let e_type = if head[5] == 2 {
        u16::from_be_bytes([head[16], head[17]])
    } else {
        u16::from_le_bytes([head[16], head[17]])
    };
    if e_type != 3 {
        return Err("is an ELF file but not a shared library".into());
    }
    Ok(())
}

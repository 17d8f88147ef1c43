//! `qseed slots [--module PATH] [--json]`: what modules show, to fill in or check targets.
//!
//! With `--module`, that module; without, every module the configuration's targets use, with
//! the token each target finds. Text for people, `--json` for scripts.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::config::{TargetConfig, TokenSelector};
use crate::error::Error;
use crate::hsm::{module, token};

/// One module to list, and the configured targets that use it.
struct Wanted {
    path: PathBuf,
    init_args: Option<String>,
    targets: Vec<(String, TokenSelector)>,
}

/// What one module showed.
struct Listing {
    path: PathBuf,
    manufacturer: String,
    max_seed: Option<usize>,
    slots: Vec<token::SlotReport>,
    /// Each target of this module, and the slot of the token it finds (or why none).
    targets: Vec<(String, Result<u64, String>)>,
}

pub async fn slots(
    module_path: Option<&Path>,
    init_args: Option<&str>,
    config_path: &Path,
    as_json: bool,
) -> Result<(), Error> {
    let wanted = match module_path {
        // As a target's `module` is read: a p11-kit module name (`softhsm2`) or a path,
        // relative to the current folder.
        Some(path) => vec![Wanted {
            path: crate::config::resolve_module(Path::new("."), path)
                .map_err(|e| Error::Config(format!("--module: {e}")))?,
            init_args: init_args.map(str::to_string),
            targets: Vec::new(),
        }],
        None => from_config(config_path)?,
    };
    let mut listings = Vec::new();
    let mut failures = Vec::new();
    for wanted in wanted {
        let path = wanted.path.clone();
        match tokio::task::spawn_blocking(move || list(wanted))
            .await
            .map_err(|e| Error::Failed(format!("PKCS#11 thread failed: {e}")))?
        {
            Ok(listing) => listings.push(listing),
            // One module given on the command line: its error is the command's.
            Err(e) if module_path.is_some() => return Err(e),
            Err(e) => failures.push((path, e.to_string())),
        }
    }
    if as_json {
        print_json(&listings, &failures);
    } else {
        for (i, listing) in listings.iter().enumerate() {
            if module_path.is_none() {
                say!(
                    "{}{}:",
                    if i > 0 { "\n" } else { "" },
                    listing.path.display()
                );
            }
            print_text(listing);
        }
        for (path, e) in &failures {
            say!("\n{}: cannot list it: {e}", path.display());
        }
    }
    let unreadable: Vec<String> = listings
        .iter()
        .flat_map(|l| {
            l.slots
                .iter()
                .filter(|s| s.unreadable.is_some())
                .map(|s| format!("{} slot {}", l.path.display(), s.slot_id))
        })
        .collect();
    if !unreadable.is_empty() && failures.is_empty() {
        return Err(Error::Failed(format!(
            "{} could not be read (the other slots are listed above)",
            unreadable.join(", ")
        )));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::Failed(format!(
            "{} of the configuration's modules could not be listed",
            failures.len()
        )))
    }
}

/// The modules of the configuration's targets, each once, in the order first named.
fn from_config(config_path: &Path) -> Result<Vec<Wanted>, Error> {
    if !config_path.exists() {
        return Err(Error::Config(format!(
            "no --module and no configuration at {}; name a module, like \
             `qseed slots --module /usr/lib/softhsm/libsofthsm2.so`, or pass --config",
            config_path.display()
        )));
    }
    let config = crate::config::load(config_path)?;
    if config.targets.is_empty() {
        return Err(Error::Config(format!(
            "{} has no [[target]], so no module to list; name one with --module PATH",
            config_path.display()
        )));
    }
    let mut wanted: Vec<Wanted> = Vec::new();
    for TargetConfig {
        name,
        module,
        token,
        init_args,
        ..
    } in config
        .targets
        .into_iter()
        .filter(|t| t.kind == crate::config::TargetKind::Pkcs11)
    {
        match wanted.iter_mut().find(|w| w.path == module) {
            Some(w) => w.targets.push((name, token)),
            None => wanted.push(Wanted {
                path: module,
                init_args,
                targets: vec![(name, token)],
            }),
        }
    }
    Ok(wanted)
}

fn list(wanted: Wanted) -> Result<Listing, Error> {
    let init_args = wanted
        .init_args
        .map(std::ffi::CString::new)
        .transpose()
        .map_err(|_| Error::Config("init_args holds a NUL character".into()))?;
    let module = module::load(&wanted.path, init_args.as_deref())
        .map_err(|e| Error::Config(e.to_string()))?;
    let listed = token::list(&module, &wanted.path).map_err(|e| Error::Failed(e.to_string()));
    let manufacturer = module
        .get_library_info()
        .map(|i| i.manufacturer_id().to_string())
        .unwrap_or_default();
    let shown = wanted.path.display().to_string();
    let targets = match &listed {
        Ok(slots) => {
            let tokens: Vec<_> = slots.iter().filter_map(|s| s.token.clone()).collect();
            wanted
                .targets
                .into_iter()
                .map(|(name, selector)| {
                    let found = token::select(&module, &shown, &tokens, &selector)
                        .map(|t| t.slot.id())
                        .map_err(|e| e.to_string());
                    (name, found)
                })
                .collect()
        }
        Err(_) => Vec::new(),
    };
    let _ = module.finalize();
    let max_seed =
        crate::hsm::quirks::profile_of(&wanted.path, &manufacturer).and_then(|p| p.max_seed);
    Ok(Listing {
        path: wanted.path,
        manufacturer,
        max_seed,
        slots: listed?,
        targets,
    })
}

fn print_text(listing: &Listing) {
    let max_seed = listing
        .max_seed
        .map_or_else(|| "-".to_string(), |m| m.to_string());
    let row = |cells: [&str; 10]| {
        say!(
            "{:<12} {:<7} {:<32} {:<16} {:<16} {:<4} {:<8} {:<8} {:<9} {}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8],
            cells[9]
        )
    };
    row([
        "SLOT", "TOKEN", "LABEL", "SERIAL", "MODEL", "RNG", "MAX-SEED", "LOGIN", "USER-PIN",
        "TARGET",
    ]);
    for slot in &listing.slots {
        let id = slot.slot_id.to_string();
        let targets: Vec<&str> = listing
            .targets
            .iter()
            .filter(|(_, found)| found.as_ref().is_ok_and(|s| *s == slot.slot_id))
            .map(|(name, _)| name.as_str())
            .collect();
        let targets = if targets.is_empty() {
            "-".to_string()
        } else {
            targets.join(",")
        };
        match &slot.token {
            Some(t) => {
                let (label, serial, model) = (
                    printable(&t.label),
                    printable(&t.serial),
                    printable(&t.model),
                );
                row([
                    &id,
                    if t.initialized { "yes" } else { "uninit" },
                    if t.initialized { &label } else { "-" },
                    &serial,
                    &model,
                    if t.has_rng { "yes" } else { "no" },
                    &max_seed,
                    match (t.initialized, t.login_required) {
                        (false, _) => "-",
                        (true, true) => "required",
                        (true, false) => "no",
                    },
                    if t.initialized {
                        t.user_pin_state()
                    } else {
                        "-"
                    },
                    &targets,
                ])
            }
            None if slot.unreadable.is_some() => {
                row([&id, "UNREADABLE", "-", "-", "-", "-", "-", "-", "-", "-"])
            }
            None => row([&id, "no", "-", "-", "-", "-", "-", "-", "-", "-"]),
        }
    }
    for slot in &listing.slots {
        if let Some(why) = &slot.unreadable {
            say!("slot {}: cannot be read: {why}", slot.slot_id);
        }
    }
    if listing.slots.is_empty() {
        say!("(the module shows no slots)");
    }
    for (name, found) in &listing.targets {
        if let Err(e) = found {
            say!("target {name}: {e}");
        }
    }
    let uris: Vec<(u64, String)> = listing
        .slots
        .iter()
        .filter_map(|s| {
            s.token
                .as_ref()
                .filter(|t| t.initialized)
                .map(|t| (s.slot_id, t.uri()))
        })
        .collect();
    if !uris.is_empty() {
        say!("\nPKCS#11 URIs, for token = \"...\" in a [[target]]:");
        for (slot, uri) in uris {
            say!("{slot:<12} {uri}");
        }
    }
    for slot in &listing.slots {
        if let Some(why) = slot.token.as_ref().and_then(|t| t.partly_unknown.as_ref()) {
            say!(
                "slot {}: the token's info was read as the module wrote it (cryptoki could not \
                 convert it: {why}); its label, serial, model and flags are known, its clock is not",
                slot.slot_id
            );
        }
    }
    if let Some(max) = listing.max_seed {
        say!(
            "MAX-SEED: this module takes at most {max} bytes per C_SeedRandom; a larger size is \
             injected in several calls (override with max_seed)"
        );
    }
    if listing.slots.iter().any(|s| {
        s.token
            .as_ref()
            .is_some_and(|t| t.user_pin_locked || t.user_pin_final_try || t.user_pin_count_low)
    }) {
        say!(
            "USER-PIN: locked = the token refuses every login until its security officer \
             unlocks it; final-try = one more wrong PIN locks it; low = wrong PINs were given"
        );
    }
}

fn print_json(listings: &[Listing], failures: &[(PathBuf, String)]) {
    let modules: Vec<serde_json::Value> = listings
        .iter()
        .map(|l| {
            json!({
                "module": l.path.display().to_string(),
                "manufacturer": l.manufacturer,
                "max_seed": l.max_seed,
                "slots": l.slots.iter().map(|s| json!({
                    "slot_id": s.slot_id,
                    "description": s.description,
                    "unreadable": s.unreadable,
                    "token": s.token.as_ref().map(|t| json!({
                        "initialized": t.initialized,
                        "label": t.label,
                        "serial": t.serial,
                        "model": t.model,
                        "manufacturer": t.manufacturer,
                        "rng": t.has_rng,
                        "uri": t.initialized.then(|| t.uri()),
                        "login_required": t.login_required,
                        "user_pin": t.user_pin_state(),
                        "user_pin_initialized": t.user_pin_initialized,
                        "user_pin_count_low": t.user_pin_count_low,
                        "user_pin_final_try": t.user_pin_final_try,
                        "user_pin_locked": t.user_pin_locked,
                        "user_pin_to_be_changed": t.user_pin_to_be_changed,
                        "protected_authentication_path": t.protected_authentication_path,
                    })),
                })).collect::<Vec<_>>(),
                "targets": l.targets.iter().map(|(name, found)| match found {
                    Ok(slot) => json!({"name": name, "slot_id": slot}),
                    Err(e) => json!({"name": name, "slot_id": null, "error": e}),
                }).collect::<Vec<_>>(),
            })
        })
        .chain(
            failures
                .iter()
                .map(|(path, e)| json!({"module": path.display().to_string(), "error": e})),
        )
        .collect();
    say!(
        "{}",
        serde_json::to_string_pretty(&json!({ "modules": modules })).unwrap_or_default()
    );
}

/// A token's text as it may go to a terminal: control characters escaped, so a label cannot
/// move the cursor or rewrite the listing.
pub(super) fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(super::printable("ok label"), "ok label");
        assert_eq!(super::printable("evil\x1b[2J\r"), "evil\\u{1b}[2J\\r");
    }
}

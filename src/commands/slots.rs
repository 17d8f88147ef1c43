//! `qseed slots --module PATH`: what a module shows, to fill in a target.

use std::path::Path;

use crate::error::Error;
use crate::hsm::{module, token};

pub async fn slots(module_path: &Path, init_args: Option<&str>) -> Result<(), Error> {
    let path = module_path.to_path_buf();
    let init_args = init_args
        .map(std::ffi::CString::new)
        .transpose()
        .map_err(|_| Error::Config("--init-args holds a NUL character".into()))?;
    let listing = tokio::task::spawn_blocking(move || {
        let module =
            module::load(&path, init_args.as_deref()).map_err(|e| Error::Config(e.to_string()))?;
        let listed = token::list(&module, &path).map_err(|e| Error::Failed(e.to_string()));
        let manufacturer = module
            .get_library_info()
            .map(|i| i.manufacturer_id().to_string())
            .unwrap_or_default();
        let _ = module.finalize();
        listed.map(|l| (l, manufacturer))
    })
    .await
    .map_err(|e| Error::Failed(format!("PKCS#11 thread failed: {e}")))??;

    let (listing, manufacturer) = listing;
    let max_seed = crate::hsm::quirks::profile_of(module_path, &manufacturer)
        .and_then(|p| p.max_seed)
        .map_or_else(|| "-".to_string(), |m| m.to_string());
    say!(
        "{:<12} {:<7} {:<32} {:<16} {:<16} {:<4} {:<8}",
        "SLOT",
        "TOKEN",
        "LABEL",
        "SERIAL",
        "MODEL",
        "RNG",
        "MAX-SEED"
    );
    for slot in &listing {
        match &slot.token {
            Some(t) => say!(
                "{:<12} {:<7} {:<32} {:<16} {:<16} {:<4} {:<8}",
                slot.slot_id,
                if t.initialized { "yes" } else { "uninit" },
                if t.initialized {
                    printable(&t.label)
                } else {
                    "-".into()
                },
                printable(&t.serial),
                printable(&t.model),
                if t.has_rng { "yes" } else { "no" },
                max_seed
            ),
            None => say!(
                "{:<12} {:<7} {:<32} {:<16} {:<16} {:<4}",
                slot.slot_id,
                "no",
                "-",
                "-",
                "-",
                "-"
            ),
        }
    }
    if listing.is_empty() {
        say!("(the module shows no slots)");
    }
    let uris: Vec<(u64, String)> = listing
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
    for slot in &listing {
        if let Some(why) = slot.token.as_ref().and_then(|t| t.partly_unknown.as_ref()) {
            say!(
                "slot {}: the token's info was read as the module wrote it (cryptoki could not \
                 convert it: {why}); its label, serial, model and flags are known, its clock is not",
                slot.slot_id
            );
        }
    }
    if max_seed != "-" {
        say!(
            "MAX-SEED: this module takes at most {max_seed} bytes per C_SeedRandom; a larger \
             size is injected in several calls (override with max_seed)"
        );
    }
    Ok(())
}

/// A token's text as it may go to a terminal: control characters escaped, so a label cannot
/// move the cursor or rewrite the listing.
fn printable(text: &str) -> String {
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

//! `qseed demo`: the quick start. Two throwaway SoftHSM tokens in a temporary folder, the local
//! API simulator (or the real service when `QRYPT_TOKEN` is set), a few rounds of the real
//! service code, a summary, and everything removed afterwards.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use cryptoki::context::Pkcs11;
use cryptoki::session::UserType;
use secrecy::{ExposeSecret, SecretString};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use crate::commands::run::serve_with;
use crate::config::{self, TokenSelector, TOKEN_ENV};
use crate::error::Error;
use crate::hsm::error::from_cryptoki;
use crate::hsm::{token, HsmError, Modules, PinGuard};
use crate::service::{shutdown, Rounds};
use crate::simulator::{Options, Simulator, LABEL};
use crate::state::StateDir;

/// Where Debian and Ubuntu install SoftHSMv2's module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

const TOKENS: [(&str, u32, &str); 2] = [("qseed-demo-a", 48, "1s"), ("qseed-demo-b", 64, "2s")];

/// Makes the throwaway folder and points SoftHSM at it. Must run before any thread starts:
/// changing the environment is only sound while the process has one thread.
pub fn prepare_environment() -> Result<TempDir, Error> {
    let dir = tempfile::Builder::new()
        .prefix("qseed-demo-")
        .tempdir()
        .map_err(|e| Error::Failed(format!("cannot make a temporary folder: {e}")))?;
    let conf = write_softhsm_config(dir.path())
        .map_err(|e| Error::Failed(format!("cannot write a SoftHSM configuration: {e}")))?;
    std::env::set_var("SOFTHSM2_CONF", &conf);
    Ok(dir)
}

/// A private SoftHSM configuration in `dir` (`softhsm2.conf`, tokens in `dir/tokens`), for the
/// demo, tests and benchmarks: point `SOFTHSM2_CONF` at the returned path.
pub fn write_softhsm_config(dir: &Path) -> std::io::Result<PathBuf> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )?;
    Ok(conf)
}

pub async fn demo(dir: TempDir, rounds: u32, module: &Path) -> Result<(), Error> {
    if !module.exists() {
        return Err(Error::Config(format!(
            "SoftHSM is not installed ({} is missing): run `sudo apt-get install softhsm2`, \
             or scripts/demo, which installs what the demo needs",
            module.display()
        )));
    }
    let real_token = std::env::var(TOKEN_ENV)
        .ok()
        .filter(|t| !t.trim().is_empty());
    say!("qseed demo — in {}", dir.path().display());

    let modules = Modules::new();
    let pin_file = dir.path().join("demo-a.pin");
    make_tokens(&modules, module, &pin_file).await?;
    say!(
        "  made SoftHSM tokens {:?} and {:?} (throwaway, in the folder above)",
        TOKENS[0].0,
        TOKENS[1].0
    );

    let stop = CancellationToken::new();
    shutdown::on_signals(stop.clone());
    let (source_toml, simulator) = match real_token {
        Some(_) => {
            say!(
                "  entropy source: Qrypt's service at {} (QRYPT_TOKEN is set)",
                config::DEFAULT_URL
            );
            (String::new(), None)
        }
        None => {
            let sim = start_simulator(dir.path()).await?;
            say!(
                "  entropy source: the local API simulator at {} — SIMULATED entropy ({LABEL}): \
                 OS randomness, not quantum. Set QRYPT_TOKEN to use Qrypt's service.",
                sim.url()
            );
            (
                format!(
                    "[source]\nurl = \"{}\"\ndialect = \"entropy\"\ntoken_file = \"qrypt.token\"\n\
                     ca_file = \"simulator-ca.pem\"\nallow_simulated = true\n\n",
                    sim.url()
                ),
                Some(sim),
            )
        }
    };
    let config_path = dir.path().join("qseed.toml");
    let mut text = source_toml;
    for (i, (label, size, period)) in TOKENS.iter().enumerate() {
        let _ = write!(
            text,
            "[[target]]\nname = \"demo-{}\"\nmodule = \"{}\"\ntoken_label = \"{label}\"\n{}size = {size}\nperiod = \"{period}\"\n\n",
            (b'a' + i as u8) as char,
            module.display(),
            if i == 0 { "login = \"user\"\npin_file = \"demo-a.pin\"\n" } else { "login = \"none\"\n" },
        );
    }
    write_private(&config_path, &text)?;
    say!("  configuration: {}\n", config_path.display());
    let config = config::load(&config_path)?;
    let client = super::run::make_sources(&config, false)?;

    // The throwaway tokens' PIN guard lives and goes with the demo's folder.
    let guard = PinGuard::new(&StateDir::Folder(dir.path().to_path_buf()));
    let outcome = serve_with(
        config,
        client,
        modules,
        guard,
        Rounds::Limit(rounds),
        Some(stop),
        None,
    )
    .await?;

    say!("\nWhat went where:");
    for t in &outcome.targets {
        say!(
            "  {:<8} {} injections, {} bytes, then {} bytes left in the pool flushed in{}",
            t.name,
            t.injections,
            t.bytes_injected,
            t.bytes_flushed,
            t.last_error
                .as_deref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        );
    }
    say!(
        "  source   {} request(s), {} bytes downloaded, {} unused at the end (wiped)",
        outcome.pool.requests,
        outcome.pool.bytes_downloaded,
        outcome.bytes_left_unused
    );
    if simulator.is_some() {
        say!("\nThe entropy was SIMULATED (the local simulator serves OS randomness).");
    }
    say!(
        "SoftHSM is a software token: seeding it reaches only the generator inside this qseed \
         process. In production, qseed seeds the generator inside your HSM."
    );
    drop(simulator);
    let path = dir.path().to_path_buf();
    dir.close()
        .map_err(|e| Error::Failed(format!("cannot remove {}: {e}", path.display())))?;
    say!("Removed {}.", path.display());
    if outcome.all_seeded_every_round() {
        Ok(())
    } else {
        Err(Error::Failed(
            "some demo rounds failed; see the log above".into(),
        ))
    }
}

async fn start_simulator(dir: &Path) -> Result<Simulator, Error> {
    let token = random_hex(16)?;
    let sim = Simulator::start(Options {
        token: Some(token.expose_secret().to_string()),
        ..Options::default()
    })
    .await
    .map_err(|e| Error::Failed(format!("cannot start the API simulator: {e}")))?;
    write_private(&dir.join("qrypt.token"), token.expose_secret())?;
    let pem = sim.ca_pem().unwrap_or_default();
    write_private(&dir.join("simulator-ca.pem"), pem)?;
    Ok(sim)
}

/// Initializes the demo tokens in SoftHSM's free slot; the first gets a user PIN, written to
/// `pin_file` for its target.
async fn make_tokens(modules: &Modules, module: &Path, pin_file: &Path) -> Result<(), Error> {
    let so_pin = random_hex(8)?;
    let user_pin = random_hex(8)?;
    write_private(pin_file, user_pin.expose_secret())?;
    let modules = modules.clone();
    let module: PathBuf = module.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<(), HsmError> {
        let pkcs11 = modules.get(&module, None)?;
        for (label, _, _) in TOKENS {
            init_token(&pkcs11, &module, label, &so_pin, &user_pin)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::Failed(format!("PKCS#11 thread failed: {e}")))?
    .map_err(|e| Error::Failed(format!("cannot make the demo tokens: {e}")))
}

fn init_token(
    pkcs11: &Pkcs11,
    module: &Path,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<(), HsmError> {
    let free = pkcs11
        .get_slots_with_token()
        .map_err(from_cryptoki)?
        .into_iter()
        .find(|slot| {
            pkcs11
                .get_token_info(*slot)
                .is_ok_and(|info| !info.token_initialized())
        })
        .ok_or_else(|| HsmError::Unexpected("SoftHSM shows no free slot".into()))?;
    pkcs11
        .init_token(free, so_pin, label)
        .map_err(from_cryptoki)?;
    // SoftHSM gives the new token a new slot id: find it again by its label.
    let path = module.display().to_string();
    let made = token::find(pkcs11, &path, &TokenSelector::Label(label.into()))?;
    let session = pkcs11.open_rw_session(made.slot).map_err(from_cryptoki)?;
    session
        .login(UserType::So, Some(so_pin))
        .map_err(from_cryptoki)?;
    session.init_pin(user_pin).map_err(from_cryptoki)?;
    session.logout().map_err(from_cryptoki)?;
    Ok(())
}

fn random_hex(len: usize) -> Result<SecretString, Error> {
    let mut bytes = zeroize::Zeroizing::new(vec![0u8; len]);
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Failed(format!("no OS randomness for the demo secrets: {e}")))?;
    Ok(SecretString::from(hex::encode(&bytes[..])))
}

fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| Error::Failed(format!("cannot write {}: {e}", path.display())))
}

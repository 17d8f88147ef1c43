//! The PKCS#11 side: modules, tokens, sessions, login and `C_SeedRandom`.
//!
//! Every call here blocks (a network HSM may take its time), so the service runs them on
//! blocking threads. A [`Target`] owns its session; it is moved to the thread that uses it
//! and never shared, as PKCS#11 forbids two threads in one session at once.

pub mod error;
pub mod module;
pub mod token;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};

pub use error::HsmError;
pub use module::Modules;
pub use token::TokenIdentity;

use crate::config::TargetConfig;
use crate::pool::EntropyBytes;

/// One configured token and, while it is usable, an open session on it.
#[derive(Debug)]
pub struct Target {
    config: TargetConfig,
    modules: Modules,
    open: Option<OpenSession>,
    /// Set by the first PIN error; from then on this target never calls `C_Login` again.
    pin_failed: bool,
}

#[derive(Debug)]
struct OpenSession {
    session: Session,
    token: TokenIdentity,
}

impl Target {
    pub fn new(config: TargetConfig, modules: Modules) -> Self {
        Self {
            config,
            modules,
            open: None,
            pin_failed: false,
        }
    }

    pub fn config(&self) -> &TargetConfig {
        &self.config
    }

    /// Finds the token, opens a session and logs in if configured; a no-op while a session
    /// is open.
    pub fn connect(&mut self) -> Result<TokenIdentity, HsmError> {
        if let Some(open) = &self.open {
            return Ok(open.token.clone());
        }
        let module = self.modules.get(&self.config.module)?;
        let path = self.config.module.display().to_string();
        let token = token::find(&module, &path, &self.config.token)?;
        if !token.has_rng {
            return Err(HsmError::NoRng);
        }
        let session = module
            .open_ro_session(token.slot)
            .map_err(error::from_cryptoki)?;
        if let Some(pin) = &self.config.login {
            if self.pin_failed {
                return Err(HsmError::LoginRefused);
            }
            if token.user_pin_locked {
                self.pin_failed = true;
                return Err(HsmError::PinLocked);
            }
            if token.user_pin_final_try {
                self.pin_failed = true;
                return Err(HsmError::PinFinalTry);
            }
            match session.login(UserType::User, Some(pin)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(e) => {
                    let e = error::from_cryptoki(e);
                    if e.is_pin_error() {
                        self.pin_failed = true;
                    }
                    return Err(e);
                }
            }
        }
        self.open = Some(OpenSession {
            session,
            token: token.clone(),
        });
        Ok(token)
    }

    /// Mixes `seed` into the token's generator with `C_SeedRandom`.
    pub fn seed(&mut self, seed: &EntropyBytes) -> Result<TokenIdentity, HsmError> {
        let token = self.connect()?;
        let Some(open) = &self.open else {
            return Err(HsmError::Unexpected("no session after connect".into()));
        };
        match open.session.seed_random(seed.expose()) {
            Ok(()) => Ok(token),
            Err(e) => {
                let e = error::from_cryptoki(e);
                if e.loses_session() {
                    self.drop_session();
                }
                if matches!(
                    e,
                    HsmError::Call {
                        rv: RvError::CryptokiNotInitialized,
                        ..
                    }
                ) {
                    self.modules.reset(&self.config.module);
                }
                Err(e)
            }
        }
    }

    /// Closes the session (which also logs out if it was the last one on the token).
    pub fn close(&mut self) {
        if let Some(open) = self.open.take() {
            if let Err(e) = open.session.close() {
                tracing::debug!(target = %self.config.name, "C_CloseSession: {}", error::from_cryptoki(e));
            }
        }
    }

    fn drop_session(&mut self) {
        // The handle is already dead; closing it would only fail again.
        self.open = None;
    }
}

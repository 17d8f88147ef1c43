//! The PKCS#11 side: modules, tokens, sessions, login and `C_SeedRandom`.
//!
//! Every call here blocks (a network HSM may take its time), so the service runs them on
//! blocking threads. A [`Target`] owns its session; it is moved to the thread that uses it
//! and never shared, as PKCS#11 forbids two threads in one session at once.

pub mod error;
pub mod module;
pub mod pin_guard;
pub mod quirks;
pub mod token;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};

pub use error::HsmError;
pub use module::Modules;
pub use pin_guard::PinGuard;
pub use token::TokenIdentity;

use crate::config::TargetConfig;
use crate::pool::EntropyBytes;

/// One configured token and, while it is usable, an open session on it.
#[derive(Debug)]
pub struct Target {
    config: TargetConfig,
    modules: Modules,
    /// Decides whether a PIN may be presented; shared by the process, kept across processes.
    guard: PinGuard,
    open: Option<OpenSession>,
}

#[derive(Debug)]
struct OpenSession {
    session: Session,
    token: TokenIdentity,
}

impl Target {
    pub fn new(config: TargetConfig, modules: Modules, guard: PinGuard) -> Self {
        Self {
            config,
            modules,
            guard,
            open: None,
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
        if let Some(login) = &self.config.login {
            let (name, module) = (&self.config.name, &self.config.module);
            let flagged = if token.user_pin_locked {
                Some((HsmError::PinLocked, "CKF_USER_PIN_LOCKED"))
            } else if token.user_pin_final_try {
                Some((HsmError::PinFinalTry, "CKF_USER_PIN_FINAL_TRY"))
            } else {
                None
            };
            if let Some((e, flag)) = flagged {
                self.guard
                    .record_flag(name, module, &token, &login.source, flag);
                return Err(e);
            }
            let attempt = self.guard.begin(name, module, &token, &login.source)?;
            match session.login(UserType::User, Some(&login.pin)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                    attempt.accepted()
                }
                Err(e) => {
                    let e = error::from_cryptoki(e);
                    if e.is_pin_error() {
                        attempt.refused(&short_reason(&e));
                    } else {
                        attempt.inconclusive();
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

    /// The PIN guard's record for this target's token is lifted (`doctor --retry-pin`).
    pub fn lift_pin_guard(
        &self,
        token: &TokenIdentity,
    ) -> Result<Option<std::path::PathBuf>, String> {
        self.guard.lift(&self.config.module, token)
    }

    fn drop_session(&mut self) {
        // The handle is already dead; closing it would only fail again.
        self.open = None;
    }
}

/// `C_Login: CKR_PIN_INCORRECT`: the call and code of a PIN error, for the guard's record.
fn short_reason(e: &HsmError) -> String {
    match e {
        HsmError::Call { call, code, .. } => format!("{call}: {code}"),
        other => other.reason().to_string(),
    }
}

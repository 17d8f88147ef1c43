//! The PKCS#11 side: modules, tokens, sessions, login and `C_SeedRandom`.
//!
//! Every call here blocks (a network HSM may take its time), so the service runs them on
//! blocking threads. A [`Target`] is moved to the thread that uses it and never shared; its
//! session is kept by its module ([`module::HeldSession`]) and only this target instance
//! takes it out, for one call at a time, as PKCS#11 forbids two threads in one session at
//! once.

pub mod clone_watch;
pub mod error;
pub mod ffi;
pub mod module;
pub mod pin_guard;
pub mod quirks;
pub mod token;

use std::sync::Arc;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};

pub use error::HsmError;
pub use module::Modules;
pub use pin_guard::PinGuard;
pub use token::TokenIdentity;

use crate::config::TargetConfig;
use crate::secret::EntropyBytes;

/// One configured token and, while it is usable, an open session on it.
#[derive(Debug)]
pub struct Target {
    config: TargetConfig,
    modules: Modules,
    /// Decides whether a PIN may be presented; shared by the process, kept across processes.
    guard: PinGuard,
    /// The module generation of this instance's open session, if it has one (the session
    /// itself is kept by the module): a hint that spares a round the connect step.
    session_generation: Option<u64>,
    /// The loaded module, once looked up: a module stays loaded for the process's life (a
    /// re-initialization keeps it and bumps its generation), and the lookup by path (a lock
    /// and a hash of the path) showed in profiles when made for every call.
    module: Option<Arc<module::Module>>,
    /// Tells this instance from an earlier one of the same target (see [`module::TokenLease`]).
    instance: u64,
}

/// The kernel's lack of RNDRESEEDCRNG is said once per process.
static KERNEL_RESEED_TOLD: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether `token` is the host kernel's stand-in identity (a kernel target's).
pub fn is_kernel(token: &TokenIdentity) -> bool {
    std::ptr::eq(token, &*kernel_identity())
}

/// How the host kernel appears where a token's identity goes (audit records, logs).
fn kernel_identity() -> Arc<TokenIdentity> {
    static IDENTITY: std::sync::OnceLock<Arc<TokenIdentity>> = std::sync::OnceLock::new();
    IDENTITY
        .get_or_init(|| {
            Arc::new(TokenIdentity {
                // Cannot fail: Slot::try_from fails only for an id wider than CK_SLOT_ID,
                // and 0 fits every width.
                slot: cryptoki::slot::Slot::try_from(0u64).expect("slot 0 converts"),
                label: "kernel".into(),
                serial: String::new(),
                model: "Linux random".into(),
                manufacturer: "Linux".into(),
                slot_description: String::new(),
                slot_manufacturer: String::new(),
                initialized: true,
                has_rng: true,
                user_pin_final_try: false,
                user_pin_locked: false,
                login_required: false,
                user_pin_initialized: false,
                user_pin_count_low: false,
                user_pin_to_be_changed: false,
                protected_authentication_path: false,
                partly_unknown: None,
            })
        })
        .clone()
}

/// Instance numbers of [`Target`]s, unique in the process.
static NEXT_INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Target {
    pub fn new(config: TargetConfig, modules: Modules, guard: PinGuard) -> Self {
        Self {
            config,
            modules,
            guard,
            session_generation: None,
            module: None,
            instance: NEXT_INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    pub fn config(&self) -> &TargetConfig {
        &self.config
    }

    /// Finds the token, opens a session and logs in if configured; a no-op while a session
    /// of the module's current generation is open.
    pub fn connect(&mut self) -> Result<Arc<TokenIdentity>, HsmError> {
        if let crate::config::TargetKind::Kernel { .. } = self.config.kind {
            return Ok(kernel_identity());
        }
        let module = self.module()?;
        let call = module.enter(self.config.period)?;
        let generation = call.generation;
        let result = self.connect_in(&call);
        drop(call);
        match result {
            Ok(token) => Ok(token),
            Err(e) => {
                module.failed(&e, generation, self.config.period);
                Err(e)
            }
        }
    }

    fn connect_in(&mut self, call: &module::ModuleCall) -> Result<Arc<TokenIdentity>, HsmError> {
        if let Some(token) = call.session_token(self.instance) {
            self.session_generation = Some(call.generation);
            return Ok(token);
        }
        self.session_generation = None;
        let pkcs11 = &call.pkcs11;
        let path = self.config.module.display().to_string();
        let token = self.find_token(call, &path)?;
        let lease = self.modules.claim(
            &self.config.module,
            &token,
            &self.config.name,
            self.instance,
        )?;
        if !token.has_rng {
            return Err(HsmError::NoRng);
        }
        // Never closed by a drop: only `ModuleCall::close_session` closes it, inside the gate.
        let session = pkcs11
            .open_ro_session_no_drop(token.slot)
            .map_err(error::from_cryptoki)?;
        let held = module::HeldSession {
            session,
            token: Arc::new(token),
            lease,
        };
        if let Some(login) = &self.config.login {
            let (name, module) = (&self.config.name, &self.config.module);
            let token = &held.token;
            let flagged = if token.user_pin_locked {
                Some((HsmError::PinLocked, "CKF_USER_PIN_LOCKED"))
            } else if token.user_pin_final_try {
                Some((HsmError::PinFinalTry, "CKF_USER_PIN_FINAL_TRY"))
            } else {
                None
            };
            let close = |held: module::HeldSession| {
                if let Err(e) = held.session.close() {
                    tracing::debug!(target = %name, "C_CloseSession: {}", error::from_cryptoki(e));
                }
            };
            if let Some((e, flag)) = flagged {
                self.guard.record_flag(name, module, token, login, flag);
                close(held);
                return Err(e);
            }
            let attempt = match self.guard.begin(name, module, token, login) {
                Ok(attempt) => attempt,
                Err(e) => {
                    close(held);
                    return Err(e);
                }
            };
            match held.session.login(UserType::User, Some(&login.pin)) {
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
                    close(held);
                    return Err(e);
                }
            }
        }
        let token = held.token.clone();
        call.keep_session(self.instance, held);
        self.session_generation = Some(call.generation);
        Ok(token)
    }

    /// Finds the target's token through the module's shared discovery, then reads that token's
    /// info afresh (its PIN flags decide whether a login is tried). A token missing from a
    /// shared discovery is looked for once more in a fresh one.
    fn find_token(&self, call: &module::ModuleCall, path: &str) -> Result<TokenIdentity, HsmError> {
        let selector = &self.config.token;
        let details = token::needs_slot_details(selector);
        let mut fresh = false;
        loop {
            let tokens = call.tokens(details, fresh)?;
            let found = token::select(&call.pkcs11, path, &tokens, selector);
            let retry = !fresh;
            match found {
                Ok(found) => match token::refresh(&call.pkcs11, path, &found, details) {
                    Some(current) => return Ok(current),
                    // Its slot changed hands since the discovery.
                    None if retry => fresh = true,
                    None => return Ok(found),
                },
                Err(HsmError::TokenNotFound { .. }) if retry => fresh = true,
                Err(e) => return Err(e),
            }
        }
    }

    /// Most bytes per `C_SeedRandom` call: the target's `max_seed`, else the module's known
    /// limit (see [`quirks`]), else none.
    pub fn max_seed(&self) -> Option<usize> {
        self.config.max_seed.or_else(|| {
            let module = match &self.module {
                Some(module) => Some(module.clone()),
                None => self
                    .modules
                    .module(&self.config.module, self.config.init_args.as_deref())
                    .ok(),
            };
            module.and_then(|m| m.profile()).and_then(|p| p.max_seed)
        })
    }

    /// Mixes `seed` into the token's generator with `C_SeedRandom`, in calls of at most
    /// [`Target::max_seed`] bytes, each byte once. A failed call ends the round (the bytes not
    /// yet injected are wiped with the buffer, never offered again).
    pub fn seed(&mut self, seed: &EntropyBytes) -> Result<Arc<TokenIdentity>, HsmError> {
        self.seed_taken(|| Some(seed))?.ok_or_else(|| {
            // Not expected: the bytes were given.
            HsmError::Unexpected("no bytes to seed".into())
        })
    }

    /// [`Target::seed`] with the bytes `take` gives once the session is checked, in one pass
    /// through the module's gate: a token that cannot be reached costs no bytes. `Ok(None)`
    /// when `take` has none.
    pub fn seed_taken<B: std::borrow::Borrow<EntropyBytes>>(
        &mut self,
        take: impl FnOnce() -> Option<B>,
    ) -> Result<Option<Arc<TokenIdentity>>, HsmError> {
        if let crate::config::TargetKind::Kernel { credit } = self.config.kind {
            let Some(seed) = take() else {
                return Ok(None);
            };
            return match crate::kernel::inject(seed.borrow().expose(), credit) {
                Ok(reseeded) => {
                    if reseeded == crate::kernel::Reseeded::AtNextReseed
                        && !KERNEL_RESEED_TOLD.swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(
                            "this kernel has no RNDRESEEDCRNG (Linux before 4.17): the bytes are \
                             mixed into its input pool and used at its next scheduled reseed, \
                             not at once"
                        );
                    }
                    Ok(Some(kernel_identity()))
                }
                Err(e) => Err(HsmError::Kernel {
                    permanent: e == crate::kernel::KernelError::NotPermitted,
                    message: e.to_string(),
                }),
            };
        }
        // One pass through the module's gate for the session check and the seed.
        let module = self.module()?;
        let call = module.enter(self.config.period)?;
        let generation = call.generation;
        let token = match self.connect_in(&call) {
            Ok(token) => token,
            Err(e) => {
                drop(call);
                module.failed(&e, generation, self.config.period);
                return Err(e);
            }
        };
        let Some(seed) = take() else {
            return Ok(None);
        };
        let Some(held) = call.take_session(self.instance) else {
            // Not expected: a successful connect leaves a session open.
            return Err(HsmError::Unexpected(
                "the module was re-initialized; the session is gone".into(),
            ));
        };
        let bytes = seed.borrow().expose();
        let chunk = self.max_seed().unwrap_or(bytes.len()).max(1);
        let mut result = Ok(());
        for part in bytes.chunks(chunk) {
            result = held
                .session
                .seed_random(part)
                .map_err(|e| (error::from_cryptoki(e), part.len()));
            if result.is_err() {
                break;
            }
        }
        // Cloned generator detection: a few bytes of the token's own output, while the
        // module's gate is still held (see `clone_watch`).
        let output = match (&result, self.config.check_output) {
            (Ok(()), true) => Some(
                held.session
                    .generate_random_vec(clone_watch::OUTPUT_LEN as u32)
                    .map(zeroize::Zeroizing::new),
            ),
            _ => None,
        };
        let session_lost = matches!(&result, Err((e, _)) if e.loses_session());
        if session_lost {
            // Its handle is dead: forgotten, not closed (closing would only fail again).
            drop(held);
            self.session_generation = None;
        } else {
            call.keep_session(self.instance, held);
        }
        drop(call);
        match output {
            Some(Ok(output)) => clone_watch::check(&self.config.name, &output),
            Some(Err(e)) => tracing::warn!(
                target_name = %self.config.name,
                "check_output: C_GenerateRandom failed after the seed ({}); the generator's \
                 output could not be checked this round",
                error::from_cryptoki(e)
            ),
            None => {}
        }
        match result {
            Ok(()) => {
                module.succeeded(generation);
                Ok(Some(token))
            }
            Err((e, len)) => {
                module.failed(&e, generation, self.config.period);
                // Split already: the length was not the problem.
                Err(error::with_seed_length(e, len, chunk < bytes.len()))
            }
        }
    }

    /// Signs `message` with the EC P-256 private key labelled `key_label` on this target's
    /// token (`CKM_ECDSA` over its SHA-256): the audit ledger's chain head (see
    /// [`crate::telemetry::ledger`]). The signature is `r || s`, 64 bytes.
    pub fn sign_ecdsa(&mut self, key_label: &str, message: &[u8]) -> Result<Vec<u8>, HsmError> {
        let module = self.module()?;
        let call = module.enter(self.config.period)?;
        self.connect_in(&call)?;
        let Some(held) = call.take_session(self.instance) else {
            return Err(HsmError::Unexpected("no session to sign with".into()));
        };
        let signed = sign_in(&held.session, key_label, message);
        call.keep_session(self.instance, held);
        drop(call);
        signed
    }

    /// The target's module, loaded on first use.
    fn module(&mut self) -> Result<Arc<module::Module>, HsmError> {
        if let Some(module) = &self.module {
            return Ok(module.clone());
        }
        let module = self
            .modules
            .module(&self.config.module, self.config.init_args.as_deref())?;
        self.module = Some(module.clone());
        Ok(module)
    }

    /// Whether a session is open (it may still have died with its module; `connect` checks).
    pub fn is_connected(&self) -> bool {
        self.session_generation.is_some()
            || matches!(self.config.kind, crate::config::TargetKind::Kernel { .. })
    }

    /// Closes the session (which also logs out if it was the last one on the token).
    pub fn close(&mut self) {
        if let crate::config::TargetKind::Kernel { .. } = self.config.kind {
            return;
        }
        self.session_generation = None;
        if let Some(module) = &self.module {
            module.end_session(self.instance, &self.config.name);
        }
    }

    /// The PIN guard's record for this target's token is lifted (`doctor --retry-pin`).
    pub fn lift_pin_guard(
        &self,
        token: &TokenIdentity,
    ) -> Result<Option<std::path::PathBuf>, String> {
        self.guard.lift(token)
    }
}

impl Drop for Target {
    /// A target dropped with its session open (abandoned after a hung call, ended by a reload)
    /// has it closed inside the module's gate, or forgotten if the module is being
    /// re-initialized; never closed outside the gate.
    fn drop(&mut self) {
        self.close();
    }
}

/// `C_Login: CKR_PIN_INCORRECT`: the call and code of a PIN error, for the guard's record.
fn short_reason(e: &HsmError) -> String {
    match e {
        HsmError::Call { call, code, .. } => format!("{call}: {code}"),
        other => other.reason().to_string(),
    }
}

/// Signs `message` with the private key labelled `key_label` (see [`Target::sign_ecdsa`]).
fn sign_in(session: &Session, key_label: &str, message: &[u8]) -> Result<Vec<u8>, HsmError> {
    use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(key_label.as_bytes().to_vec()),
        ])
        .map_err(error::from_cryptoki)?;
    let key = match keys.as_slice() {
        [key] => *key,
        [] => {
            return Err(HsmError::Unexpected(format!(
                "no private key labelled {key_label:?} on the token (audit.key_label); \
                 create an EC P-256 key pair with that label"
            )))
        }
        _ => {
            return Err(HsmError::Unexpected(format!(
                "{} private keys are labelled {key_label:?}; give the signing key a label of \
                 its own",
                keys.len()
            )))
        }
    };
    let kind = session
        .get_attributes(key, &[AttributeType::KeyType])
        .map_err(error::from_cryptoki)?;
    if !kind
        .iter()
        .any(|a| matches!(a, Attribute::KeyType(k) if *k == KeyType::EC))
    {
        return Err(HsmError::Unexpected(format!(
            "the key labelled {key_label:?} is not an EC key; qseed signs the ledger with \
             EC P-256 (CKM_ECDSA)"
        )));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, message);
    let signature = session
        .sign(&cryptoki::mechanism::Mechanism::Ecdsa, key, digest.as_ref())
        .map_err(error::from_cryptoki)?;
    Ok(signature)
}

//! Loaded PKCS#11 modules: each library loaded and `C_Initialize`d once per process, shared by
//! every target that uses it, and `C_Finalize`d once at the end — or re-initialized when its
//! device is lost.
//!
//! Every call into a module passes its *gate* ([`Module::enter`]), which counts the calls
//! inside. A re-initialization (`C_Finalize` + `C_Initialize`, the only cure real clients know
//! for a lost device: tpm2-pkcs11 after a TPM restart, p11-kit's client after its server's child
//! died) closes the gate, waits until no call is inside, and bumps the module's *generation*:
//! sessions of an older generation are dead, and their targets open new ones and log in again.
//! Nothing ever calls `C_Finalize` while another thread is inside the module.
//!
//! Recovery is on a written schedule: the first re-initialization right away, later attempts
//! after 1 s, 2 s, 4 s, ... capped at the period of the target that asks (so seeding resumes
//! within about one period of the device being back). One log line when a recovery starts,
//! one when it heals.
//!
//! The module also owns every open session, by target instance ([`HeldSession`]): sessions are
//! opened so that they never close themselves when dropped, so no `C_CloseSession` ever runs
//! outside the gate, and a re-initialization drops them all at once. Nothing else then holds
//! the library, so where `C_Finalize` + `C_Initialize` is not enough (a client that connects
//! when it is loaded, like Caml Crush's), the library is unloaded and loaded again.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use super::error::{from_cryptoki, HsmError};

/// How long a re-initialization waits for calls still inside the module before it gives up
/// (and tries again later): a hung call must not hold the others.
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// The backoff cap for calls that belong to no target's schedule (loading, `doctor`).
const ONE_OFF_PERIOD: Duration = Duration::from_secs(10);
/// Consecutive failures the specification does not define (`CKR_GENERAL_ERROR`, a
/// vendor-defined or negative code) after which a module counts as lost: one can be anything,
/// the same again is a client that lost its connection.
const UNDEFINED_ERRORS_TO_RESET: u32 = 2;

/// The process's loaded modules, by path. Cloning shares the same set.
#[derive(Debug, Clone, Default)]
pub struct Modules {
    /// Taken only for lookups and inserts, never across a call into a module: /metrics reads
    /// it, and a module whose `C_Initialize` never returns must not freeze a scrape or a stop.
    loaded: Arc<Mutex<HashMap<PathBuf, Arc<Module>>>>,
    /// Held across `dlopen` and `C_Initialize`, so that one module is loaded once.
    loading: Arc<Mutex<()>>,
    /// Which target seeds which token (by module file and token), so that one token named
    /// twice (by label and by serial, or through two paths to one module) is seeded once.
    claims: Arc<Mutex<HashMap<TokenClaim, Holder>>>,
}

/// Who holds a token: the configured target's name, and the target instance whose session is
/// open on it, if any. A reload replaces a changed target with a new instance of the same
/// name; while the old instance's session is still open (a call into it has not returned), the
/// new one waits rather than seed the token from a second session.
#[derive(Debug, Clone)]
struct Holder {
    target: String,
    session: Option<u64>,
    /// A reload removed or renamed the target while its session was still open (a call into
    /// it had not returned): the token is free once that session is gone, not before.
    released: bool,
}

/// A target instance's use of a token, from its claim until its session is closed or
/// abandoned; dropping it lets the next instance of the target open a session.
#[derive(Debug)]
pub struct TokenLease {
    claims: Arc<Mutex<HashMap<TokenClaim, Holder>>>,
    claim: TokenClaim,
    instance: u64,
}

impl Drop for TokenLease {
    fn drop(&mut self) {
        let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(holder) = claims.get_mut(&self.claim) {
            if holder.session == Some(self.instance) {
                holder.session = None;
                if holder.released {
                    claims.remove(&self.claim);
                }
            }
        }
    }
}

/// A token as the claims know it: the module file (device and inode: symlinks and hard links
/// are one file), the token's serial and label.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenClaim {
    module: (u64, u64),
    serial: String,
    label: String,
}

/// One loaded module and its gate.
#[derive(Debug)]
pub struct Module {
    path: PathBuf,
    /// `init_args` it was initialized with (and is re-initialized with).
    init_args: Option<std::ffi::CString>,
    /// What qseed knows of it (see [`super::quirks`]), by file name or `C_GetInfo`.
    profile: Option<&'static super::quirks::ModuleProfile>,
    state: Mutex<State>,
    changed: Condvar,
    /// The last look at the module's tokens, shared by its targets (see [`ModuleCall::tokens`]).
    discovered: Mutex<Option<Discovery>>,
}

/// The module's tokens as one discovery saw them.
#[derive(Debug)]
struct Discovery {
    at: Instant,
    generation: u64,
    slot_details: bool,
    tokens: Arc<Vec<super::TokenIdentity>>,
}

/// How long a discovery serves other targets: long enough that targets starting together
/// share one (start-up linear in the number of tokens, not quadratic), short enough that a
/// token that comes or goes is seen within the next round.
const DISCOVERY_REUSE: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct State {
    /// `None` after a re-initialization failed: the module is down until the next attempt.
    pkcs11: Option<Pkcs11>,
    generation: u64,
    in_flight: usize,
    /// Threads waiting for `in_flight` to reach 0 (see [`Module::drain_calls`]): only then
    /// does a call that ends wake anyone, so a call costs no wake-up system call.
    awaiting_drain: usize,
    resetting: bool,
    undefined_errors: u32,
    recovery: Option<Recovery>,
    resets: u64,
    /// Open sessions of the current generation, by target instance. Looked up three times a
    /// round: a B-tree of small integers costs no hashing, and keeps its node when a round
    /// takes the session out and puts it back.
    sessions: BTreeMap<u64, HeldSession>,
}

/// A target instance's open session, kept by its module. Opened with cryptoki's `_no_drop`
/// variant: dropping it never calls `C_CloseSession` (only [`ModuleCall::close_session`] does,
/// inside the gate), it only lets go of the library.
#[derive(Debug)]
pub struct HeldSession {
    pub session: cryptoki::session::Session,
    /// Shared with every round's audit record: a round clones the pointer, not the strings.
    pub token: Arc<super::TokenIdentity>,
    /// Marks the token as used by this target instance while the session is open.
    pub lease: Option<TokenLease>,
}

#[derive(Debug)]
struct Recovery {
    since: Instant,
    attempts: u32,
    next_attempt: Instant,
    last_error: String,
    /// Libraries unloaded and loaded again in this recovery.
    reloads: u32,
}

/// A call inside a module: holds the gate open until dropped.
#[derive(Debug)]
pub struct ModuleCall {
    module: Arc<Module>,
    pub pkcs11: Pkcs11,
    pub generation: u64,
}

impl ModuleCall {
    /// The module's tokens: a recent discovery of this generation if there is one (and
    /// `fresh` is not asked), else a new one, which the module's other targets then share.
    /// Concurrent callers wait for one discovery instead of each making their own.
    pub fn tokens(
        &self,
        slot_details: bool,
        fresh: bool,
    ) -> Result<Arc<Vec<super::TokenIdentity>>, HsmError> {
        let mut discovered = self
            .module
            .discovered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = discovered.as_ref() {
            let usable = !fresh
                && d.generation == self.generation
                && (d.slot_details || !slot_details)
                && d.at.elapsed() < DISCOVERY_REUSE;
            if usable {
                return Ok(d.tokens.clone());
            }
        }
        let path = self.module.path.display().to_string();
        let tokens = Arc::new(super::token::discover(&self.pkcs11, &path, slot_details)?);
        *discovered = Some(Discovery {
            at: Instant::now(),
            generation: self.generation,
            slot_details,
            tokens: tokens.clone(),
        });
        Ok(tokens)
    }
}

impl ModuleCall {
    /// The token of `instance`'s open session, if it has one.
    pub fn session_token(&self, instance: u64) -> Option<Arc<super::TokenIdentity>> {
        self.module
            .lock()
            .sessions
            .get(&instance)
            .map(|held| held.token.clone())
    }

    /// Takes `instance`'s session out for the length of a call ([`ModuleCall::keep_session`]
    /// puts it back; a session not put back is forgotten: its handle was dead).
    pub fn take_session(&self, instance: u64) -> Option<HeldSession> {
        self.module.lock().sessions.remove(&instance)
    }

    /// Keeps `held` as `instance`'s session.
    pub fn keep_session(&self, instance: u64, held: HeldSession) {
        self.module.lock().sessions.insert(instance, held);
    }

    /// Closes `instance`'s session, if it has one (which also logs out if it was the last on
    /// its token).
    pub fn close_session(&self, instance: u64, target: &str) {
        if let Some(held) = self.take_session(instance) {
            if let Err(e) = held.session.close() {
                tracing::debug!(target = %target, "C_CloseSession: {}", from_cryptoki(e));
            }
        }
    }
}

impl Drop for ModuleCall {
    fn drop(&mut self) {
        let mut state = self.module.lock();
        state.in_flight -= 1;
        let drained = state.in_flight == 0 && state.awaiting_drain > 0;
        drop(state);
        if drained {
            self.module.changed.notify_all();
        }
    }
}

/// A module's counters, for metrics.
#[derive(Debug, Clone)]
pub struct ModuleStats {
    pub path: String,
    pub resets: u64,
    pub down: bool,
}

impl Modules {
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims `token` of the module at `path` for `target` (instance `instance`); refused when
    /// another target has it, and, for now, while an earlier instance of the same target still
    /// has a session on it. Claims last as long as the target is configured (a reload that
    /// removes it calls [`Modules::release`]), not only while its loop runs: `once` runs its
    /// loops one round each, and must not seed one token twice either. The lease marks the
    /// session; keep it as long as the session is open.
    pub fn claim(
        &self,
        path: &Path,
        token: &super::TokenIdentity,
        target: &str,
        instance: u64,
    ) -> Result<Option<TokenLease>, HsmError> {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(path) else {
            return Ok(None);
        };
        let claim = TokenClaim {
            module: (meta.dev(), meta.ino()),
            serial: token.serial.clone(),
            label: token.label.clone(),
        };
        let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        match claims.get(&claim) {
            // A session of an earlier instance is still open on the token (a call into it has
            // not returned), whether the target kept its name or a reload renamed it: wait.
            Some(Holder {
                session: Some(other),
                released,
                target: holder,
            }) if *other != instance && (*released || holder == target) => {
                Err(HsmError::TokenBusy {
                    label: token.label.clone(),
                })
            }
            Some(holder) if holder.target != target && !holder.released => {
                Err(HsmError::TokenTaken {
                    label: token.label.clone(),
                    serial: token.serial.clone(),
                    holder: holder.target.clone(),
                })
            }
            _ => {
                claims.insert(
                    claim.clone(),
                    Holder {
                        target: target.to_string(),
                        session: Some(instance),
                        released: false,
                    },
                );
                Ok(Some(TokenLease {
                    claims: self.claims.clone(),
                    claim,
                    instance,
                }))
            }
        }
    }

    /// Ends `target`'s claims (a reload removed or renamed it). A claim whose session is still
    /// open stays until that session is gone, so that no other target opens a second session
    /// on the token meanwhile.
    pub fn release(&self, target: &str) {
        self.claims
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, holder| {
                if holder.target != target {
                    return true;
                }
                holder.released = true;
                holder.session.is_some()
            });
    }

    /// The module at `path`, loaded and initialized (with `init_args`, if given) on first use.
    pub fn module(&self, path: &Path, init_args: Option<&str>) -> Result<Arc<Module>, HsmError> {
        let init_args = init_args
            .map(std::ffi::CString::new)
            .transpose()
            .map_err(|_| HsmError::Unexpected("init_args holds a NUL character".into()))?;
        if let Some(module) = self.loaded_with(path, &init_args)? {
            return Ok(module);
        }
        let _loading = self.loading.lock().unwrap_or_else(PoisonError::into_inner);
        // Another thread may have loaded it while this one waited.
        if let Some(module) = self.loaded_with(path, &init_args)? {
            return Ok(module);
        }
        let pkcs11 = load(path, init_args.as_deref())?;
        let manufacturer = pkcs11
            .get_library_info()
            .map(|i| i.manufacturer_id().to_string())
            .unwrap_or_default();
        let module = Arc::new(Module {
            path: path.to_path_buf(),
            init_args,
            profile: super::quirks::profile_of(path, &manufacturer),
            state: Mutex::new(State {
                pkcs11: Some(pkcs11),
                generation: 1,
                in_flight: 0,
                awaiting_drain: 0,
                resetting: false,
                undefined_errors: 0,
                recovery: None,
                resets: 0,
                sessions: BTreeMap::new(),
            }),
            discovered: Mutex::new(None),
            changed: Condvar::new(),
        });
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.to_path_buf(), module.clone());
        Ok(module)
    }

    /// The module at `path` if it is loaded (with the same `init_args`).
    fn loaded_with(
        &self,
        path: &Path,
        init_args: &Option<std::ffi::CString>,
    ) -> Result<Option<Arc<Module>>, HsmError> {
        let loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        match loaded.get(path) {
            Some(module) if module.init_args != *init_args => Err(HsmError::Unexpected(format!(
                "{} was initialized with other init_args; a change takes effect at the next \
                 start",
                path.display()
            ))),
            Some(module) => Ok(Some(module.clone())),
            None => Ok(None),
        }
    }

    /// The module's context, for one-off checks (`doctor`, the demo) that make no session.
    pub fn get(&self, path: &Path, init_args: Option<&str>) -> Result<Pkcs11, HsmError> {
        Ok(self
            .module(path, init_args)?
            .enter(ONE_OFF_PERIOD)?
            .pkcs11
            .clone())
    }

    /// Counters of every module, for metrics.
    pub fn stats(&self) -> Vec<ModuleStats> {
        let loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let mut stats: Vec<ModuleStats> = loaded
            .values()
            .map(|m| {
                let state = m.lock();
                ModuleStats {
                    path: m.path.display().to_string(),
                    resets: state.resets,
                    down: state.pkcs11.is_none() || state.recovery.is_some(),
                }
            })
            .collect();
        stats.sort_by(|a, b| a.path.cmp(&b.path));
        stats
    }

    /// `C_Finalize` on every module, once no call is inside it. A module with a call still
    /// inside after `grace` (a thread is stuck there: finalizing under it is undefined
    /// behaviour) is left as it is, with a warning. What counts is the module's own count of
    /// calls inside it at that moment, not which targets once had a call declared hung.
    pub fn finalize_all(&self, grace: Duration) {
        let modules: Vec<_> = self
            .loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, module)| module)
            .collect();
        let deadline = Instant::now() + grace;
        for module in modules {
            let (taken, sessions) = {
                let mut state = module.drain_calls(module.idle(), deadline);
                if state.in_flight > 0 {
                    tracing::warn!(
                        "not finalizing {}: a call into it has not returned",
                        module.path.display()
                    );
                    (None, BTreeMap::new())
                } else {
                    (state.pkcs11.take(), std::mem::take(&mut state.sessions))
                }
            };
            // C_Finalize closes the sessions; their handles are only forgotten.
            drop(sessions);
            if let Some(pkcs11) = taken {
                if let Err(e) = pkcs11.finalize() {
                    tracing::warn!(
                        "C_Finalize on {} failed: {}",
                        module.path.display(),
                        from_cryptoki(e)
                    );
                }
            }
        }
    }
}

impl Module {
    pub fn profile(&self) -> Option<&'static super::quirks::ModuleProfile> {
        self.profile
    }

    /// Opens the gate for one call (or a few, like finding a token and logging in). Waits while
    /// the module is being re-initialized; a module that is down is tried again when its next
    /// attempt is due (attempts back off up to `period`, the caller's), otherwise the call
    /// fails at once.
    pub fn enter(self: &Arc<Self>, period: Duration) -> Result<ModuleCall, HsmError> {
        let mut state = self.idle();
        if state.pkcs11.is_none() {
            let due = state
                .recovery
                .as_ref()
                .is_none_or(|r| Instant::now() >= r.next_attempt);
            if !due {
                return Err(self.down(&state));
            }
            drop(state);
            self.reinitialize(None, period);
            state = self.idle();
        }
        let Some(pkcs11) = state.pkcs11.clone() else {
            return Err(self.down(&state));
        };
        state.in_flight += 1;
        Ok(ModuleCall {
            module: self.clone(),
            pkcs11,
            generation: state.generation,
        })
    }

    /// A call of `generation` succeeded: the module works (a recovery, if any, is over).
    pub fn succeeded(&self, generation: u64) {
        let mut state = self.lock();
        state.undefined_errors = 0;
        if state.generation == generation {
            if let Some(recovery) = state.recovery.take() {
                tracing::info!(
                    "{}: working again after {} ({} re-initialization(s)); its targets logged in \
                     again",
                    self.path.display(),
                    crate::config::short_duration(Duration::from_secs(
                        recovery.since.elapsed().as_secs().max(1)
                    )),
                    recovery.attempts
                );
            }
        }
    }

    /// A call of `generation` failed with `error`. A lost device (or the same failure the
    /// specification does not define, again) re-initializes the module, for every target that
    /// uses it; `period` caps the wait between attempts. Call with no [`ModuleCall`] of this
    /// thread open.
    pub fn failed(&self, error: &HsmError, generation: u64, period: Duration) {
        let device_lost = {
            let mut state = self.lock();
            if state.generation != generation {
                // Already re-initialized since that call began.
                return;
            }
            match error {
                HsmError::Call { rv, .. } if is_device_loss(*rv) => true,
                HsmError::Call { rv, .. } if is_undefined(*rv) => {
                    state.undefined_errors += 1;
                    state.undefined_errors >= UNDEFINED_ERRORS_TO_RESET
                }
                _ => false,
            }
        };
        if device_lost {
            self.reinitialize(Some((error, generation)), period);
        }
    }

    /// `instance`'s session is no longer wanted (its target was dropped): closed inside the
    /// gate when the module is up, else only forgotten (a re-initialization under way, or a
    /// module that is down, has ended it already). Never waits for a re-initialization.
    pub fn end_session(self: &Arc<Self>, instance: u64, target: &str) {
        let call = {
            let mut state = self.lock();
            match (&state.pkcs11, state.resetting) {
                (Some(pkcs11), false) if state.sessions.contains_key(&instance) => {
                    let pkcs11 = pkcs11.clone();
                    state.in_flight += 1;
                    ModuleCall {
                        module: self.clone(),
                        pkcs11,
                        generation: state.generation,
                    }
                }
                _ => {
                    state.sessions.remove(&instance);
                    return;
                }
            }
        };
        call.close_session(instance, target);
    }

    /// `C_Finalize` + `C_Initialize`, once no call is inside; for a module whose client
    /// `C_Initialize` does not reconnect (its profile says so, or a re-initialization in this
    /// recovery did not help), the library is unloaded and loaded again. `cause` is the failure
    /// that asked for it and the generation it was seen in (`None`: a due retry of a module
    /// that is down).
    fn reinitialize(&self, cause: Option<(&HsmError, u64)>, period: Duration) {
        let mut state = self.idle();
        if let Some((_, seen)) = cause {
            if state.generation != seen {
                return;
            }
        }
        let now = Instant::now();
        if let Some(r) = &state.recovery {
            if now < r.next_attempt {
                return;
            }
        }
        state.resetting = true;
        let mut state = self.drain_calls(state, now + DRAIN_WAIT);
        if state.in_flight > 0 {
            tracing::warn!(
                "{}: not re-initializing it yet: a call inside it has not returned",
                self.path.display()
            );
            self.schedule_next(&mut state, now, period, "a call inside it has not returned");
            state.resetting = false;
            drop(state);
            self.changed.notify_all();
            return;
        }
        let reload = self.profile.is_some_and(|p| p.reload_library)
            || state.recovery.as_ref().is_some_and(|r| r.attempts > 0);
        if state.recovery.is_none() {
            let why = cause.map_or_else(|| "it is down".to_string(), |(e, _)| e.to_string());
            tracing::warn!(
                "{}: the device or its connection is lost ({why}); re-initializing the module \
                 (C_Finalize + C_Initialize) for every target that uses it",
                self.path.display()
            );
            state.recovery = Some(Recovery {
                since: now,
                attempts: 0,
                next_attempt: now,
                last_error: why,
                reloads: 0,
            });
        }
        let old = state.pkcs11.take();
        // The sessions died with the device (or die with C_Finalize); their targets open new
        // ones. Dropping them closes nothing and lets go of the library.
        let sessions = std::mem::take(&mut state.sessions);
        let first_reload = reload && state.recovery.as_ref().is_some_and(|r| r.reloads == 0);
        drop(state);
        drop(sessions);
        if reload && first_reload {
            tracing::warn!(
                "{}: C_Finalize + C_Initialize do not reconnect this module; unloading the \
                 library and loading it again",
                self.path.display()
            );
        }
        let fresh = match old {
            Some(old) if !reload => {
                // Keep the library loaded: some clients do not survive being unloaded.
                let kept = old.clone();
                let _ = old.finalize();
                initialize(&kept, &self.path, self.init_args.as_deref()).map(|()| kept)
            }
            old => {
                if let Some(old) = old {
                    let _ = old.finalize();
                }
                // The last reference is gone: the library is unloaded (dlclose) before
                // `load` opens it again.
                load(&self.path, self.init_args.as_deref())
            }
        };
        let mut guard = self.lock();
        let state = &mut *guard;
        state.resets += 1;
        state.generation += 1;
        state.undefined_errors = 0;
        let recovery = state.recovery.get_or_insert(Recovery {
            since: now,
            attempts: 0,
            next_attempt: now,
            last_error: String::new(),
            reloads: 0,
        });
        recovery.attempts += 1;
        if reload {
            recovery.reloads += 1;
        }
        recovery.next_attempt = Instant::now() + backoff(recovery.attempts, period);
        match fresh {
            Ok(pkcs11) => state.pkcs11 = Some(pkcs11),
            Err(e) => {
                tracing::debug!("{}: re-initialization failed: {e}", self.path.display());
                recovery.last_error = e.to_string();
            }
        }
        state.resetting = false;
        drop(guard);
        self.changed.notify_all();
    }

    fn schedule_next(&self, state: &mut State, now: Instant, period: Duration, why: &str) {
        let recovery = state.recovery.get_or_insert(Recovery {
            since: now,
            attempts: 0,
            next_attempt: now,
            last_error: String::new(),
            reloads: 0,
        });
        recovery.last_error = why.to_string();
        recovery.next_attempt = now + backoff(recovery.attempts.max(1), period);
    }

    fn down(&self, state: &State) -> HsmError {
        HsmError::ModuleDown {
            path: self.path.display().to_string(),
            reason: state
                .recovery
                .as_ref()
                .map(|r| r.last_error.clone())
                .unwrap_or_default(),
        }
    }

    /// Waits until no call is inside the module, or `deadline`; the caller sees which.
    fn drain_calls<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        deadline: Instant,
    ) -> MutexGuard<'a, State> {
        state.awaiting_drain += 1;
        while state.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.awaiting_drain -= 1;
        state
    }

    /// The state, once no re-initialization is under way.
    fn idle(&self) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        while state.resetting {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// 1 s, 2 s, 4 s, ... after the `attempts`-th attempt, at most `period` (at least 1 s).
fn backoff(attempts: u32, period: Duration) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(16))
        .min(period.max(Duration::from_secs(1)))
}

/// Return codes after which only a re-initialization helps (seen on real clients: a TPM
/// restarted under tpm2-pkcs11, p11-kit's remote child killed).
fn is_device_loss(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::DeviceError
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::CryptokiNotInitialized
    )
}

/// Failures the specification does not define: a client that lost its server answers with
/// these (Caml Crush: `(CK_RV)-1` for every call).
fn is_undefined(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::GeneralError | RvError::VendorDefined(_) | RvError::UnknownErrorCode(_)
    )
}

/// Loads the library and initializes it for a threaded caller, with `init_args` as
/// `C_Initialize`'s reserved parameter if given (see [`super::ffi`]).
pub fn load(path: &Path, init_args: Option<&std::ffi::CStr>) -> Result<Pkcs11, HsmError> {
    let fail = |reason: String| HsmError::ModuleLoad {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(fail("the file does not exist".into()))
        }
        // dlopen of a FIFO would block for ever; of a directory, fail obscurely.
        Ok(meta) if !meta.is_file() => {
            return Err(fail(format!(
                "it is {}, not a regular file; name the module's shared library",
                crate::files::kind_of(meta.file_type())
            )))
        }
        _ => {}
    }
    // Loading a library runs its code as qseed's user (root, for `qseed once` by hand): only
    // from a file nobody else could have swapped (the one place code is loaded).
    crate::trust::check(path, "module").map_err(|reason| HsmError::ModuleLoad {
        path: path.display().to_string(),
        reason: format!("refused: {reason}"),
    })?;
    let module = Pkcs11::new(path).map_err(|e| match e {
        CkError::LibraryLoading(e) => fail(e.to_string()),
        CkError::MissingSymbol(name) => {
            fail(format!("it is not a PKCS#11 library (no {name} function)"))
        }
        other => fail(other.to_string()),
    })?;
    initialize(&module, path, init_args)?;
    Ok(module)
}

/// `C_Initialize` for a threaded caller (again, after a `C_Finalize`, for a re-initialization).
fn initialize(
    module: &Pkcs11,
    path: &Path,
    init_args: Option<&std::ffi::CStr>,
) -> Result<(), HsmError> {
    // qseed calls the module from several threads: let it use the OS's locks.
    let initialized = match init_args {
        Some(args) => super::ffi::initialize_with(module, args),
        None => module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)),
    };
    match initialized {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        // The module says only that it failed; the usual cause on a new host is a user that
        // may not read the client's files.
        Err(CkError::Pkcs11(rv, _)) => Err(HsmError::InitializeRefused {
            path: path.display().to_string(),
            code: super::error::rv_name(rv),
            diagnosis: super::quirks::diagnose_initialize(path, rv, init_args.is_some()),
        }),
        Err(e) => Err(from_cryptoki(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> super::super::TokenIdentity {
        super::super::TokenIdentity {
            label: "tok".into(),
            model: String::new(),
            manufacturer: String::new(),
            login_required: false,
            ..super::super::TokenIdentity::for_tests(3)
        }
    }

    /// Issue 24: renaming a target while its call hung opened a second session on the token.
    #[test]
    fn a_renamed_target_waits_until_the_old_session_is_gone() {
        let modules = Modules::new();
        // Any file: a claim knows the module by device and inode.
        let module = std::env::current_exe().unwrap();
        let old = modules.claim(&module, &token(), "old", 1).unwrap().unwrap();
        // A reload renames "old" to "new" while old's call is still inside the module.
        modules.release("old");
        let busy = modules.claim(&module, &token(), "new", 2);
        assert!(matches!(busy, Err(HsmError::TokenBusy { .. })), "{busy:?}");
        // The call returned and the old instance's session is gone: the token is new's.
        drop(old);
        let new = modules.claim(&module, &token(), "new", 2).unwrap();
        assert!(new.is_some());
        let other = modules.claim(&module, &token(), "third", 3);
        assert!(
            matches!(other, Err(HsmError::TokenTaken { .. })),
            "{other:?}"
        );
    }

    #[test]
    fn a_removed_target_without_a_session_frees_its_token_at_once() {
        let modules = Modules::new();
        let module = std::env::current_exe().unwrap();
        drop(modules.claim(&module, &token(), "old", 1).unwrap());
        modules.release("old");
        assert!(modules
            .claim(&module, &token(), "new", 2)
            .unwrap()
            .is_some());
    }
}

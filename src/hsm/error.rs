//! PKCS#11 failures, each worded with the call, the CKR code and what to do about it.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

/// What went wrong with a target. `Display` is the operator's message.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    #[error(
        "cannot load PKCS#11 module {path}: {reason}. Set module to the HSM vendor's PKCS#11 \
         library (for SoftHSM: /usr/lib/softhsm/libsofthsm2.so)"
    )]
    ModuleLoad { path: String, reason: String },
    #[error("{call}: {code}: {advice}")]
    Call {
        call: String,
        code: String,
        rv: RvError,
        advice: &'static str,
    },
    #[error(
        "the module does not provide a PKCS#11 function qseed needs (C_SeedRandom); this HSM \
         cannot be seeded through PKCS#11"
    )]
    MissingFunction,
    #[error("unexpected answer from the PKCS#11 module: {0}")]
    Unexpected(String),
    /// The token refused a seed of this size by argument (`CKR_ARGUMENTS_BAD`,
    /// `CKR_DATA_LEN_RANGE`): the same size would be refused every period, so the target stops
    /// with the fix.
    #[error("{call} ({len} bytes): {code}: the token refuses a seed of this size; {fix}")]
    SeedSizeRefused {
        call: String,
        code: String,
        len: usize,
        fix: String,
    },
    /// A kernel target's ioctl failed (see [`crate::kernel`]); `permanent` when it lacks the
    /// capability, which restarting will not give it.
    #[error("{message}")]
    Kernel { message: String, permanent: bool },
    #[error("no token with {selector} in module {module}; {found}")]
    TokenNotFound {
        selector: String,
        module: String,
        found: String,
    },
    #[error(
        "{count} tokens match {selector} in module {module} (slots {slots}); name the token by \
         serial instead"
    )]
    Ambiguous {
        selector: String,
        module: String,
        count: usize,
        slots: String,
    },
    #[error(
        "the token says the next wrong user PIN locks it (CKF_USER_PIN_FINAL_TRY); qseed will not \
         risk a login. Check the PIN, reset the counter with a successful login by hand (e.g. \
         pkcs11-tool --login --test), then start qseed again"
    )]
    PinFinalTry,
    #[error(
        "the token's user PIN is locked (CKF_USER_PIN_LOCKED); an HSM administrator must unlock it"
    )]
    PinLocked,
    #[error(
        "the token has no random number generator (CKF_RNG is not set), so it cannot be seeded; \
         remove this target"
    )]
    NoRng,
    /// The PIN guard refuses a login; the message says why and how to lift it.
    #[error("{0}")]
    PinGuarded(String),
    #[error(
        "another qseed process is logging in to this token right now; qseed presents a PIN from \
         one process at a time"
    )]
    LoginBusy,
    #[error("module {path}: C_Initialize: {code}: {diagnosis}")]
    InitializeRefused {
        path: String,
        code: String,
        diagnosis: String,
    },
    #[error(
        "module {path} is down: its device or connection was lost and re-initializing it has not \
         worked yet ({reason})"
    )]
    ModuleDown { path: String, reason: String },
    #[error(
        "token {label:?} (serial {serial}) is already seeded by target {holder:?}: the two targets \
         name one token (by label and by serial, or through two paths to one module). Seed each \
         token from one target"
    )]
    TokenTaken {
        label: String,
        serial: String,
        holder: String,
    },
    #[error(
        "token {label:?} still has this target's session from before the reload, inside a call \
         that has not returned; the new settings take over when it returns (no second session \
         seeds the token meanwhile)"
    )]
    TokenBusy { label: String },
}

impl HsmError {
    /// The token could not be found or used as configured (its demand should not count).
    pub fn is_token_missing(&self) -> bool {
        matches!(
            self,
            HsmError::TokenNotFound { .. }
                | HsmError::Ambiguous { .. }
                | HsmError::TokenBusy { .. }
        )
    }

    /// Failures that will not go away by trying again: the target must stop, and for PIN
    /// errors trying again could lock the user out of the HSM.
    pub fn is_permanent(&self) -> bool {
        match self {
            HsmError::ModuleLoad { .. }
            | HsmError::PinFinalTry
            | HsmError::PinLocked
            | HsmError::NoRng
            | HsmError::PinGuarded(_)
            | HsmError::TokenTaken { .. }
            | HsmError::MissingFunction
            | HsmError::SeedSizeRefused { .. } => true,
            HsmError::Kernel { permanent, .. } => *permanent,
            HsmError::TokenNotFound { .. }
            | HsmError::Ambiguous { .. }
            | HsmError::LoginBusy
            | HsmError::TokenBusy { .. }
            | HsmError::InitializeRefused { .. }
            | HsmError::ModuleDown { .. }
            | HsmError::Unexpected(_) => false,
            HsmError::Call { rv, .. } => is_permanent_rv(*rv),
        }
    }

    /// Why a target stopped, as a short metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            _ if self.is_pin_error() => "pin",
            HsmError::ModuleLoad { .. } => "module",
            HsmError::TokenTaken { .. } => "duplicate_token",
            HsmError::NoRng => "no_rng",
            HsmError::MissingFunction => "function_missing",
            HsmError::SeedSizeRefused { .. } => "seed_size",
            HsmError::Kernel {
                permanent: true, ..
            } => "not_permitted",
            HsmError::Call { rv, .. } => match rv {
                RvError::RandomSeedNotSupported | RvError::FunctionNotSupported => {
                    "seed_not_supported"
                }
                RvError::RandomNoRng => "no_rng",
                _ => "hsm_error",
            },
            _ => "hsm_error",
        }
    }

    /// A PIN error: the target stops and the PIN is never tried again.
    pub fn is_pin_error(&self) -> bool {
        matches!(
            self,
            HsmError::PinFinalTry | HsmError::PinLocked | HsmError::PinGuarded(_)
        ) || matches!(self, HsmError::Call { rv, .. } if is_pin_rv(*rv))
    }

    /// The session is gone (token removed, device reset): drop it and open a new one next time.
    pub fn loses_session(&self) -> bool {
        matches!(
            self,
            HsmError::Call {
                rv: RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::DeviceRemoved
                    | RvError::TokenNotPresent
                    | RvError::DeviceError
                    | RvError::CryptokiNotInitialized
                    | RvError::UserNotLoggedIn,
                ..
            }
        )
    }
}

fn is_pin_rv(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::PinIncorrect
            | RvError::PinLocked
            | RvError::PinExpired
            | RvError::PinInvalid
            | RvError::PinLenRange
            | RvError::UserPinNotInitialized
    )
}

fn is_permanent_rv(rv: RvError) -> bool {
    is_pin_rv(rv)
        || matches!(
            rv,
            RvError::RandomSeedNotSupported
                | RvError::RandomNoRng
                | RvError::FunctionNotSupported
                | RvError::UserTypeInvalid
        )
}

/// A failed `C_SeedRandom` of `len` bytes whose code may mean "too long": says so, with the
/// fix. (tpm2-pkcs11 answers 129 bytes and more with `CKR_GENERAL_ERROR`.)
pub fn with_seed_length(e: HsmError, len: usize, max_seed_set: bool) -> HsmError {
    match e {
        // Refused by argument: a size the token will refuse every time (Kryoptic wants at
        // least 32 bytes; some tokens take at most so many per call).
        HsmError::Call {
            call,
            code,
            rv: RvError::ArgumentsBad | RvError::DataLenRange,
            ..
        } => HsmError::SeedSizeRefused {
            call,
            code,
            len,
            fix: if len < 32 {
                format!(
                    "some tokens take no seed shorter than 32 bytes (Kryoptic): set size to 32 \
                     or more (it is {len})"
                )
            } else if max_seed_set {
                format!("set max_seed below {len} (bytes per C_SeedRandom call), or a smaller size")
            } else {
                "the token may take fewer bytes per call: set max_seed (tpm2-pkcs11 takes at \
                 most 128), and a larger size is injected in several calls"
                    .to_string()
            },
        },
        HsmError::Call {
            call,
            code,
            rv: rv @ RvError::GeneralError,
            ..
        } if len > 32 && !max_seed_set => HsmError::Call {
            call: format!("{call} ({len} bytes)"),
            code,
            rv,
            advice: "the token may take fewer bytes per call: set max_seed (tpm2-pkcs11 takes \
                     at most 128); a larger size is then injected in several calls",
        },
        other => other,
    }
}

/// Converts a cryptoki error from `call` into an operator's message.
pub fn from_cryptoki(e: CkError) -> HsmError {
    match e {
        CkError::Pkcs11(rv, function) => HsmError::Call {
            call: function_name(function),
            code: rv_name(rv),
            rv,
            advice: advice(rv),
        },
        CkError::NullFunctionPointer => HsmError::MissingFunction,
        CkError::LibraryLoading(e) => HsmError::ModuleLoad {
            path: String::new(),
            reason: e.to_string(),
        },
        other => HsmError::Unexpected(other.to_string()),
    }
}

/// `Function::SeedRandom` → `C_SeedRandom`.
pub fn function_name(function: Function) -> String {
    format!("C_{function:?}")
}

/// `RvError::RandomSeedNotSupported` → `CKR_RANDOM_SEED_NOT_SUPPORTED`.
pub fn rv_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(code) => format!("CKR_VENDOR_DEFINED({code:#x})"),
        RvError::UnknownErrorCode(code) => format!("unknown return code {code:#x}"),
        other => {
            let camel = format!("{other:?}");
            let mut name = String::from("CKR");
            for (i, c) in camel.char_indices() {
                if c.is_ascii_uppercase() || i == 0 {
                    name.push('_');
                }
                name.push(c.to_ascii_uppercase());
            }
            name
        }
    }
}

fn advice(rv: RvError) -> &'static str {
    match rv {
        RvError::PinIncorrect => {
            "the PIN is wrong. qseed will not present this PIN to this token again, in this or \
             any later run (HSMs lock users after a few wrong PINs); correct the PIN source"
        }
        RvError::PinLocked => "the user PIN is locked; an HSM administrator must unlock it",
        RvError::PinExpired => "the PIN has expired; set a new one with the vendor's tools",
        RvError::PinInvalid | RvError::PinLenRange => {
            "the token rejects the PIN's form; check the PIN source"
        }
        RvError::UserPinNotInitialized => {
            "the token's user PIN was never set; initialize it with the vendor's tools"
        }
        RvError::UserNotLoggedIn => {
            "this token wants a login before it takes seed material: set login = \"user\" and a \
             PIN source"
        }
        RvError::RandomSeedNotSupported => {
            "this token does not accept seed material, so qseed cannot seed it; remove this target"
        }
        RvError::RandomNoRng => "this token has no random number generator; remove this target",
        RvError::FunctionNotSupported => {
            "this module does not implement the call, so qseed cannot seed this token; remove \
             this target"
        }
        RvError::ArgumentsBad => {
            "the token refused the seed's arguments; some tokens want at least 32 bytes per seed \
             (raise size), some take at most so many per call (set max_seed)"
        }
        RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::DeviceRemoved
        | RvError::TokenNotPresent
        | RvError::DeviceError => "the session or device was lost; a new session is needed",
        RvError::CryptokiNotInitialized => {
            "the module lost its initialization and must be initialized again"
        }
        RvError::SlotIdInvalid => {
            "the slot does not exist; `qseed slots --module ...` lists the slots"
        }
        RvError::TokenNotRecognized => "the module does not recognize the token in this slot",
        RvError::SessionCount => {
            "the token has no free session; close other applications' sessions or raise the limit"
        }
        RvError::UserTypeInvalid => "the token does not know the user type CKU_USER",
        _ => "the module reported a failure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_codes_like_the_specification() {
        assert_eq!(
            rv_name(RvError::RandomSeedNotSupported),
            "CKR_RANDOM_SEED_NOT_SUPPORTED"
        );
        assert_eq!(rv_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(rv_name(RvError::RandomNoRng), "CKR_RANDOM_NO_RNG");
        assert_eq!(
            rv_name(RvError::SessionHandleInvalid),
            "CKR_SESSION_HANDLE_INVALID"
        );
        assert_eq!(
            rv_name(RvError::CryptokiNotInitialized),
            "CKR_CRYPTOKI_NOT_INITIALIZED"
        );
        assert_eq!(
            rv_name(RvError::VendorDefined(0x8000_0001)),
            "CKR_VENDOR_DEFINED(0x80000001)"
        );
        assert_eq!(function_name(Function::SeedRandom), "C_SeedRandom");
        assert_eq!(function_name(Function::Login), "C_Login");
    }

    #[test]
    fn message_names_call_code_and_fix() {
        let e = from_cryptoki(CkError::Pkcs11(
            RvError::RandomSeedNotSupported,
            Function::SeedRandom,
        ));
        assert_eq!(
            e.to_string(),
            "C_SeedRandom: CKR_RANDOM_SEED_NOT_SUPPORTED: this token does not accept seed \
             material, so qseed cannot seed it; remove this target"
        );
        assert!(e.is_permanent());
    }

    #[test]
    fn a_seed_that_may_be_too_long_says_so() {
        let e = from_cryptoki(CkError::Pkcs11(RvError::GeneralError, Function::SeedRandom));
        let text = with_seed_length(e, 200, false).to_string();
        assert!(
            text.starts_with("C_SeedRandom (200 bytes): CKR_GENERAL_ERROR")
                && text.contains("max_seed"),
            "{text}"
        );
        // Short seeds, or a max_seed already set, keep the plain message.
        let e = from_cryptoki(CkError::Pkcs11(RvError::GeneralError, Function::SeedRandom));
        assert!(!with_seed_length(e, 16, false)
            .to_string()
            .contains("max_seed"));
    }

    /// Issue 24: a size the token refuses by argument stops the target with the fix.
    #[test]
    fn a_seed_size_refused_by_argument_stops_the_target_with_the_fix() {
        let short = from_cryptoki(CkError::Pkcs11(RvError::ArgumentsBad, Function::SeedRandom));
        let short = with_seed_length(short, 16, false);
        assert!(short.is_permanent() && short.reason() == "seed_size");
        assert!(
            short.to_string().contains("set size to 32 or more"),
            "{short}"
        );
        let long = from_cryptoki(CkError::Pkcs11(RvError::DataLenRange, Function::SeedRandom));
        let long = with_seed_length(long, 1000, false);
        assert!(
            long.is_permanent() && long.to_string().contains("set max_seed"),
            "{long}"
        );
    }

    #[test]
    fn pin_errors_are_permanent_and_session_losses_are_not() {
        let pin = from_cryptoki(CkError::Pkcs11(RvError::PinIncorrect, Function::Login));
        assert!(pin.is_permanent() && pin.is_pin_error());
        let lost = from_cryptoki(CkError::Pkcs11(
            RvError::SessionHandleInvalid,
            Function::SeedRandom,
        ));
        assert!(!lost.is_permanent() && lost.loses_session());
        let missing = from_cryptoki(CkError::NullFunctionPointer);
        assert!(missing.is_permanent());
    }
}

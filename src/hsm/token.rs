//! Finding a token among a module's slots, and describing slots for `qseed slots`.

use cryptoki::context::Pkcs11;
use cryptoki::error::Error as CkError;
use cryptoki::slot::Slot;

use super::error::{from_cryptoki, HsmError};
use crate::config::uri::{Pkcs11Uri, UriAttributes};
use crate::config::TokenSelector;

/// What identifies a token in logs and audit records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    pub slot: Slot,
    pub label: String,
    pub serial: String,
    pub model: String,
    pub manufacturer: String,
    pub slot_description: String,
    pub slot_manufacturer: String,
    pub initialized: bool,
    pub has_rng: bool,
    pub user_pin_final_try: bool,
    pub user_pin_locked: bool,
    /// The token's flags an operator needs to plan logins (`qseed slots`).
    pub login_required: bool,
    pub user_pin_initialized: bool,
    pub user_pin_count_low: bool,
    pub user_pin_to_be_changed: bool,
    /// The PIN is entered on the device (a PIN pad), not given by the caller.
    pub protected_authentication_path: bool,
    /// Set when cryptoki could not convert the token's info and it was read raw: what failed
    /// (the fields above are known; the rest, such as the clock, is not).
    pub partly_unknown: Option<String>,
}

/// One row of `qseed slots`.
#[derive(Debug, Clone)]
pub struct SlotReport {
    pub slot_id: u64,
    pub description: String,
    pub token: Option<TokenIdentity>,
    /// Why the slot or its token could not be read (a card the module cannot read): the
    /// other slots are listed all the same.
    pub unreadable: Option<String>,
}

/// Finds the one token `selector` names. Slot ids can change when tokens come and go
/// (SoftHSM reassigns them), so labels and serials are looked up afresh each time.
pub fn find(
    module: &Pkcs11,
    module_path: &str,
    selector: &TokenSelector,
) -> Result<TokenIdentity, HsmError> {
    let tokens = discover(module, module_path, needs_slot_details(selector))?;
    select(module, module_path, &tokens, selector)
}

/// Whether finding a token by `selector` needs the slots' descriptions (only a URI's
/// `slot-*` attributes do).
pub fn needs_slot_details(selector: &TokenSelector) -> bool {
    matches!(selector, TokenSelector::Uri(_))
}

/// Every token the module shows: one `C_GetTokenInfo` per slot with a token (and one
/// `C_GetSlotInfo` with `slot_details`).
pub fn discover(
    module: &Pkcs11,
    module_path: &str,
    slot_details: bool,
) -> Result<Vec<TokenIdentity>, HsmError> {
    let slots = module.get_slots_with_token().map_err(from_cryptoki)?;
    let mut tokens = Vec::with_capacity(slots.len());
    for slot in slots {
        match identify(
            module,
            std::path::Path::new(module_path),
            slot,
            slot_details,
        ) {
            Ok(token) => tokens.push(token),
            // A slot that empties between the two calls is simply not a match.
            Err(e) => tracing::debug!("skipping slot {slot}: {e}"),
        }
    }
    Ok(tokens)
}

/// Reads `token`'s info afresh (its flags, such as a PIN about to lock, may have changed since
/// a shared discovery); `None` when its slot now holds another token or none.
pub fn refresh(
    module: &Pkcs11,
    module_path: &str,
    token: &TokenIdentity,
    slot_details: bool,
) -> Option<TokenIdentity> {
    let fresh = identify(
        module,
        std::path::Path::new(module_path),
        token.slot,
        slot_details,
    )
    .ok()?;
    (fresh.label == token.label && fresh.serial == token.serial).then_some(fresh)
}

/// The one token of `tokens` that `selector` names.
pub fn select(
    module: &Pkcs11,
    module_path: &str,
    tokens: &[TokenIdentity],
    selector: &TokenSelector,
) -> Result<TokenIdentity, HsmError> {
    let library = match selector {
        TokenSelector::Uri(_) => Library::of(module),
        _ => Library::default(),
    };
    let matches: Vec<&TokenIdentity> = tokens
        .iter()
        .filter(|t| match selector {
            TokenSelector::Label(label) => &t.label == label,
            TokenSelector::Serial(serial) => &t.serial == serial,
            TokenSelector::SlotId(id) => t.slot.id() == *id,
            TokenSelector::Uri(uri) => uri.matches(&WithLibrary(t, &library)),
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(HsmError::TokenNotFound {
            selector: selector.to_string(),
            module: module_path.to_string(),
            found: if tokens.is_empty() {
                "the module shows no token at all".to_string()
            } else {
                format!(
                    "tokens present: {}",
                    tokens
                        .iter()
                        .map(|t| {
                            if t.initialized {
                                format!("{:?} (serial {:?}, slot {})", t.label, t.serial, t.slot)
                            } else {
                                format!("an uninitialized token (slot {})", t.slot)
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        }),
        many => Err(HsmError::Ambiguous {
            selector: selector.to_string(),
            module: module_path.to_string(),
            count: many.len(),
            slots: many
                .iter()
                .map(|t| t.slot.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The token in `slot`. A token whose info cryptoki cannot convert (openCryptoki's odd clock
/// field) is read as the module wrote it instead, and marked so: it must not vanish.
/// `slot_details` also reads the slot's description and manufacturer (one more call per slot,
/// which only a URI's `slot-*` attributes need).
fn identify(
    module: &Pkcs11,
    path: &std::path::Path,
    slot: Slot,
    slot_details: bool,
) -> Result<TokenIdentity, HsmError> {
    let slot_info = if slot_details {
        module.get_slot_info(slot).ok()
    } else {
        None
    };
    let (slot_description, slot_manufacturer) = slot_info
        .as_ref()
        .map(|i| {
            (
                i.slot_description().to_string(),
                i.manufacturer_id().to_string(),
            )
        })
        .unwrap_or_default();
    let info = match module.get_token_info(slot) {
        Ok(info) => info,
        Err(CkError::Pkcs11(rv, function)) => {
            return Err(from_cryptoki(CkError::Pkcs11(rv, function)))
        }
        Err(conversion) => {
            let raw = super::ffi::raw_token_info(path, slot.id()).map_err(|e| {
                HsmError::Unexpected(format!(
                    "the token info of slot {slot} cannot be read ({conversion}; raw: {e})"
                ))
            })?;
            tracing::debug!("slot {slot}: token info read raw ({conversion})");
            use cryptoki_sys::{
                CKF_LOGIN_REQUIRED, CKF_PROTECTED_AUTHENTICATION_PATH, CKF_RNG,
                CKF_TOKEN_INITIALIZED, CKF_USER_PIN_COUNT_LOW, CKF_USER_PIN_FINAL_TRY,
                CKF_USER_PIN_INITIALIZED, CKF_USER_PIN_LOCKED, CKF_USER_PIN_TO_BE_CHANGED,
            };
            let has = |flag: cryptoki_sys::CK_FLAGS| raw.flags & flag != 0;
            return Ok(TokenIdentity {
                slot,
                label: raw.label,
                serial: raw.serial,
                model: raw.model,
                manufacturer: raw.manufacturer,
                slot_description,
                slot_manufacturer,
                initialized: has(CKF_TOKEN_INITIALIZED),
                has_rng: has(CKF_RNG),
                user_pin_final_try: has(CKF_USER_PIN_FINAL_TRY),
                user_pin_locked: has(CKF_USER_PIN_LOCKED),
                login_required: has(CKF_LOGIN_REQUIRED),
                user_pin_initialized: has(CKF_USER_PIN_INITIALIZED),
                user_pin_count_low: has(CKF_USER_PIN_COUNT_LOW),
                user_pin_to_be_changed: has(CKF_USER_PIN_TO_BE_CHANGED),
                protected_authentication_path: has(CKF_PROTECTED_AUTHENTICATION_PATH),
                partly_unknown: Some(conversion.to_string()),
            });
        }
    };
    Ok(TokenIdentity {
        slot,
        label: info.label().to_string(),
        serial: info.serial_number().to_string(),
        model: info.model().to_string(),
        manufacturer: info.manufacturer_id().to_string(),
        slot_description,
        slot_manufacturer,
        initialized: info.token_initialized(),
        has_rng: info.rng(),
        user_pin_final_try: info.user_pin_final_try(),
        user_pin_locked: info.user_pin_locked(),
        login_required: info.login_required(),
        user_pin_initialized: info.user_pin_initialized(),
        user_pin_count_low: info.user_pin_count_low(),
        user_pin_to_be_changed: info.user_pin_to_be_changed(),
        protected_authentication_path: info.protected_authentication_path(),
        partly_unknown: None,
    })
}

/// Every slot of the module at `path`, with its token if one is present.
pub fn list(module: &Pkcs11, path: &std::path::Path) -> Result<Vec<SlotReport>, HsmError> {
    let slots = module.get_all_slots().map_err(from_cryptoki)?;
    let mut reports = Vec::with_capacity(slots.len());
    for slot in slots {
        let info = match module.get_slot_info(slot) {
            Ok(info) => info,
            Err(e) => {
                reports.push(SlotReport {
                    slot_id: slot.id(),
                    description: String::new(),
                    token: None,
                    unreadable: Some(format!("C_GetSlotInfo: {}", from_cryptoki(e))),
                });
                continue;
            }
        };
        let (token, unreadable) = if info.token_present() {
            match identify(module, path, slot, true) {
                Ok(token) => (Some(token), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, None)
        };
        reports.push(SlotReport {
            slot_id: slot.id(),
            description: info.slot_description().to_string(),
            token,
            unreadable,
        });
    }
    Ok(reports)
}

impl UriAttributes for TokenIdentity {
    fn attribute(&self, name: &str) -> Option<String> {
        Some(match name {
            "token" => self.label.clone(),
            "serial" => self.serial.clone(),
            "model" => self.model.clone(),
            "manufacturer" => self.manufacturer.clone(),
            "slot-id" => self.slot.id().to_string(),
            "slot-description" => self.slot_description.clone(),
            "slot-manufacturer" => self.slot_manufacturer.clone(),
            _ => return None,
        })
    }
}

impl TokenIdentity {
    /// An initialized token with an RNG in `slot`, logging in, for unit tests.
    #[cfg(test)]
    pub fn for_tests(slot: u64) -> Self {
        Self {
            slot: cryptoki::slot::Slot::try_from(slot).expect("a test's slot id fits"),
            label: "hsm one".into(),
            serial: "0001".into(),
            model: "m".into(),
            manufacturer: "x".into(),
            slot_description: String::new(),
            slot_manufacturer: String::new(),
            initialized: true,
            has_rng: true,
            user_pin_final_try: false,
            user_pin_locked: false,
            login_required: true,
            user_pin_initialized: true,
            user_pin_count_low: false,
            user_pin_to_be_changed: false,
            protected_authentication_path: false,
            partly_unknown: None,
        }
    }

    /// The RFC 7512 URI of this token, for `token = "..."`.
    pub fn uri(&self) -> String {
        Pkcs11Uri::for_token(self)
    }

    /// The user PIN's state in one word, the most urgent first: `locked`, `final-try`
    /// (one more wrong PIN locks it), `low` (wrong PINs were given), `not-set`, `change` (the
    /// token asks for a new one), `pin-pad` (entered on the device), `ok`.
    pub fn user_pin_state(&self) -> &'static str {
        if self.user_pin_locked {
            "locked"
        } else if self.user_pin_final_try {
            "final-try"
        } else if self.user_pin_count_low {
            "low"
        } else if !self.user_pin_initialized {
            "not-set"
        } else if self.user_pin_to_be_changed {
            "change"
        } else if self.protected_authentication_path {
            "pin-pad"
        } else {
            "ok"
        }
    }
}

/// The module's own description, for a URI's `library-*` attributes.
#[derive(Debug, Default)]
struct Library {
    description: String,
    manufacturer: String,
    version: String,
}

impl Library {
    fn of(module: &Pkcs11) -> Self {
        module
            .get_library_info()
            .map(|i| Library {
                description: i.library_description().to_string(),
                manufacturer: i.manufacturer_id().to_string(),
                version: format!(
                    "{}.{}",
                    i.library_version().major(),
                    i.library_version().minor()
                ),
            })
            .unwrap_or_default()
    }
}

struct WithLibrary<'a>(&'a TokenIdentity, &'a Library);

impl UriAttributes for WithLibrary<'_> {
    fn attribute(&self, name: &str) -> Option<String> {
        match name {
            "library-description" => Some(self.1.description.clone()),
            "library-manufacturer" => Some(self.1.manufacturer.clone()),
            "library-version" => Some(self.1.version.clone()),
            _ => self.0.attribute(name),
        }
    }
}

//! Finding a token among a module's slots, and describing slots for `qseed slots`.

use cryptoki::context::Pkcs11;
use cryptoki::slot::Slot;

use super::error::{from_cryptoki, HsmError};
use crate::config::TokenSelector;

/// What identifies a token in logs and audit records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    pub slot: Slot,
    pub label: String,
    pub serial: String,
    pub model: String,
    pub initialized: bool,
    pub has_rng: bool,
    pub user_pin_final_try: bool,
    pub user_pin_locked: bool,
}

/// One row of `qseed slots`.
#[derive(Debug, Clone)]
pub struct SlotReport {
    pub slot_id: u64,
    pub description: String,
    pub token: Option<TokenIdentity>,
}

/// Finds the one token `selector` names. Slot ids can change when tokens come and go
/// (SoftHSM reassigns them), so labels and serials are looked up afresh each time.
pub fn find(
    module: &Pkcs11,
    module_path: &str,
    selector: &TokenSelector,
) -> Result<TokenIdentity, HsmError> {
    let slots = module.get_slots_with_token().map_err(from_cryptoki)?;
    let mut tokens = Vec::with_capacity(slots.len());
    for slot in slots {
        match identify(module, slot) {
            Ok(token) => tokens.push(token),
            // A slot that empties between the two calls is simply not a match.
            Err(e) => tracing::debug!("skipping slot {slot}: {e}"),
        }
    }
    let matches: Vec<&TokenIdentity> = tokens
        .iter()
        .filter(|t| match selector {
            TokenSelector::Label(label) => &t.label == label,
            TokenSelector::Serial(serial) => &t.serial == serial,
            TokenSelector::SlotId(id) => t.slot.id() == *id,
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
                        .map(|t| format!("{:?} (serial {}, slot {})", t.label, t.serial, t.slot))
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

fn identify(module: &Pkcs11, slot: Slot) -> Result<TokenIdentity, HsmError> {
    let info = module.get_token_info(slot).map_err(from_cryptoki)?;
    Ok(TokenIdentity {
        slot,
        label: info.label().to_string(),
        serial: info.serial_number().to_string(),
        model: info.model().to_string(),
        initialized: info.token_initialized(),
        has_rng: info.rng(),
        user_pin_final_try: info.user_pin_final_try(),
        user_pin_locked: info.user_pin_locked(),
    })
}

/// Every slot of the module, with its token if one is present.
pub fn list(module: &Pkcs11) -> Result<Vec<SlotReport>, HsmError> {
    let slots = module.get_all_slots().map_err(from_cryptoki)?;
    let mut reports = Vec::with_capacity(slots.len());
    for slot in slots {
        let info = module.get_slot_info(slot).map_err(from_cryptoki)?;
        let token = if info.token_present() {
            Some(identify(module, slot)?)
        } else {
            None
        };
        reports.push(SlotReport {
            slot_id: slot.id(),
            description: info.slot_description().to_string(),
            token,
        });
    }
    Ok(reports)
}

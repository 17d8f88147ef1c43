//! The two things qseed needs from a PKCS#11 module that cryptoki offers only through
//! `unsafe`, and the only `unsafe` blocks in qseed's own code (the crate denies it elsewhere):
//!
//! - [`initialize_with`]: module initialization parameters, a string handed to `C_Initialize`
//!   as `CK_C_INITIALIZE_ARGS.pReserved`, as NSS's softoken wants (`configdir='' ...
//!   flags=noCertDB`; without it, `C_Initialize` answers `CKR_ARGUMENTS_BAD`).
//! - [`raw_token_info`]: a token's info as the module wrote it, for tokens whose info cryptoki
//!   cannot convert (openCryptoki's soft token sets `CKF_CLOCK_ON_TOKEN` with a time of spaces
//!   and digits, which cryptoki 0.12 rejects, hiding the token).

use std::ffi::{c_void, CStr};
use std::path::Path;
use std::ptr::NonNull;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};

/// `C_Initialize` with OS locking and `args` as the reserved parameter.
#[allow(unsafe_code)]
pub fn initialize_with(pkcs11: &Pkcs11, args: &CStr) -> cryptoki::error::Result<()> {
    let reserved = NonNull::from(args.to_bytes_with_nul()).cast::<c_void>();
    // SAFETY: the pointer is to `args`, a NUL-terminated string that the caller keeps alive
    // for this whole function, so it is valid for the duration of the `C_Initialize` call that
    // `initialize` makes with it; cryptoki stores it nowhere else. PKCS#11 modules that use
    // the reserved parameter (NSS's softoken) read the string during `C_Initialize` and copy
    // what they keep; none writes through it.
    let init =
        unsafe { CInitializeArgs::new_with_reserved(CInitializeFlags::OS_LOCKING_OK, reserved) };
    pkcs11.initialize(init)
}

/// What a module wrote into `CK_TOKEN_INFO`, the text fields without their blank padding.
#[derive(Debug, Clone)]
pub struct RawTokenInfo {
    pub label: String,
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub flags: cryptoki_sys::CK_FLAGS,
}

/// `C_GetTokenInfo` on `slot` of the (already loaded and initialized) module at `path`.
#[allow(unsafe_code)]
pub fn raw_token_info(path: &Path, slot: u64) -> Result<RawTokenInfo, String> {
    // SAFETY: cryptoki loaded and initialized this library in this process already, so opening
    // it again returns the same instance (its reference count goes up; its initializers do not
    // run again), and it stays loaded while cryptoki holds it; this handle is dropped at the
    // end of this function, which only lowers the count.
    let library = unsafe { cryptoki_sys::Pkcs11::new(path) }.map_err(|e| e.to_string())?;
    let get_token_info = library
        .C_GetTokenInfo
        .as_ref()
        .map_err(|e| format!("no C_GetTokenInfo: {e}"))?;
    let mut info = cryptoki_sys::CK_TOKEN_INFO::default();
    // SAFETY: `info` is a valid, writable, properly aligned CK_TOKEN_INFO that lives across the
    // call; C_GetTokenInfo writes only into it; the module is initialized (see above).
    let rv = unsafe { get_token_info(slot as cryptoki_sys::CK_SLOT_ID, &mut info) };
    if rv != cryptoki_sys::CKR_OK {
        return Err(format!("C_GetTokenInfo returned {rv:#x}"));
    }
    Ok(RawTokenInfo {
        label: padded(&info.label),
        manufacturer: padded(&info.manufacturerID),
        model: padded(&info.model),
        serial: padded(&info.serialNumber),
        flags: info.flags,
    })
}

/// A blank-padded PKCS#11 text field, as text (invalid UTF-8 replaced, padding removed).
fn padded(field: &[u8]) -> String {
    String::from_utf8_lossy(field)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

//! Module initialization parameters: a string handed to `C_Initialize` as
//! `CK_C_INITIALIZE_ARGS.pReserved`, as NSS's softoken wants (`configdir='' ... flags=noCertDB`;
//! without it, `C_Initialize` answers `CKR_ARGUMENTS_BAD`). cryptoki passes such a pointer only
//! through an `unsafe` constructor: this is the one `unsafe` block in qseed's own code.

use std::ffi::{c_void, CStr};
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

//! A test-only PKCS#11 module that sits in front of a real one (SoftHSM by default) and
//! injects the faults SoftHSM cannot produce on its own, so that qseed's recovery can be
//! tested against a real token.
//!
//! Environment: `QSEED_FAULT_REAL_MODULE` (the module to forward to, default SoftHSM's) and
//! `QSEED_FAULT_FILE` (a file whose content selects the fault, read on every call):
//!
//! | content | effect |
//! |---|---|
//! | (empty or missing) | forward everything |
//! | `session-lost` | `C_SeedRandom` returns `CKR_SESSION_HANDLE_INVALID` |
//! | `device-removed` | `C_SeedRandom` returns `CKR_DEVICE_REMOVED` |
//! | `not-initialized` | `C_SeedRandom` returns `CKR_CRYPTOKI_NOT_INITIALIZED` |
//! | `seed-not-supported` | `C_SeedRandom` returns `CKR_RANDOM_SEED_NOT_SUPPORTED` |
//! | `hang` | `C_SeedRandom` blocks while the file says `hang` (at most 60 s) |
//! | `no-rng` | `C_GetTokenInfo` clears `CKF_RNG` |
//! | `token-info-fails:N` | `C_GetTokenInfo` of slot N returns `CKR_DEVICE_ERROR` (a card the module cannot read) |
//! | `init-fails` | `C_Initialize` returns `CKR_DEVICE_ERROR` (a network HSM's server down) |
//! | `init-hang` | `C_Initialize` blocks while the file says `init-hang` (at most 120 s) |
//! | `min-seed-32` | `C_SeedRandom` of fewer than 32 bytes returns `CKR_ARGUMENTS_BAD` (as Kryoptic does) |
//! | `cloned-rng` | `C_GenerateRandom` returns the same bytes on every token, every call (as two tokens with cloned generator state would) |
//!
//! With `QSEED_FAULT_SEED_LOG` set, every successful `C_SeedRandom` appends one line to that
//! file: the seed in hex. Unlike pkcs11-spy's log, lines of concurrent calls never interleave.
//! With `QSEED_FAULT_THREAD_LOG` set, every successful `C_SeedRandom` appends the name of the
//! thread that made it (its `comm`), so that a test can tell which of qseed's threads seeds.
//!
//! This is the only code of the project with `unsafe`: a PKCS#11 module is a C ABI, and there
//! is no other way to stand between qseed and a real module. It is never shipped.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cryptoki_sys::{
    CKF_RNG, CKR_CRYPTOKI_NOT_INITIALIZED, CKR_DEVICE_REMOVED, CKR_FUNCTION_FAILED, CKR_OK,
    CKR_RANDOM_SEED_NOT_SUPPORTED, CKR_SESSION_HANDLE_INVALID, CK_BYTE, CK_FUNCTION_LIST, CK_RV,
    CK_SESSION_HANDLE, CK_SLOT_ID, CK_TOKEN_INFO, CK_ULONG,
};

const DEFAULT_REAL: &str = "/usr/lib/softhsm/libsofthsm2.so";

struct Real {
    _library: libloading::Library,
    /// The real module's list; ours is a copy with a few entries replaced.
    functions: CK_FUNCTION_LIST,
    ours: &'static mut CK_FUNCTION_LIST,
}

// SAFETY: the function list is plain data (function pointers and a version) that is never
// written after it is built; PKCS#11 modules are called from many threads by design.
unsafe impl Send for Real {}
// SAFETY: as above: shared read-only after construction.
unsafe impl Sync for Real {}

static REAL: OnceLock<Result<Real, String>> = OnceLock::new();

fn real() -> Result<&'static Real, CK_RV> {
    REAL.get_or_init(load).as_ref().map_err(|e| {
        eprintln!("qseed-fault-module: {e}");
        CKR_FUNCTION_FAILED
    })
}

fn load() -> Result<Real, String> {
    let path = std::env::var("QSEED_FAULT_REAL_MODULE").unwrap_or_else(|_| DEFAULT_REAL.into());
    // SAFETY: loading a PKCS#11 module runs its initializers; the path names a real module
    // chosen by the test.
    let library = unsafe { libloading::Library::new(&path) }.map_err(|e| e.to_string())?;
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: C_GetFunctionList has this signature in every PKCS#11 module, and `list` is a
    // valid place for the module to write its pointer.
    let rv = unsafe {
        let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
            library
                .get(b"C_GetFunctionList\0")
                .map_err(|e| e.to_string())?;
        get(&mut list)
    };
    if rv != CKR_OK || list.is_null() {
        return Err(format!("{path}: C_GetFunctionList returned {rv:#x}"));
    }
    // SAFETY: the module returned CKR_OK and a non-null pointer to its static function list.
    let functions = unsafe { *list };
    let mut ours = functions;
    ours.C_GetFunctionList = Some(C_GetFunctionList);
    ours.C_SeedRandom = Some(seed_random);
    ours.C_GetTokenInfo = Some(get_token_info);
    ours.C_Initialize = Some(initialize);
    ours.C_GenerateRandom = Some(generate_random);
    Ok(Real {
        _library: library,
        functions,
        ours: Box::leak(Box::new(ours)),
    })
}

fn fault() -> String {
    std::env::var("QSEED_FAULT_FILE")
        .ok()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The module's entry point.
///
/// # Safety
/// `list` must be a valid pointer to write a function-list pointer to (PKCS#11's contract).
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    if list.is_null() {
        return cryptoki_sys::CKR_ARGUMENTS_BAD;
    }
    match real() {
        Ok(real) => {
            // SAFETY: `list` is non-null and, per the caller's contract, writable; the list we
            // hand out is leaked, so it lives as long as the process.
            unsafe { *list = std::ptr::from_ref::<CK_FUNCTION_LIST>(real.ours).cast_mut() };
            CKR_OK
        }
        Err(rv) => rv,
    }
}

unsafe extern "C" fn seed_random(
    session: CK_SESSION_HANDLE,
    seed: *mut CK_BYTE,
    len: CK_ULONG,
) -> CK_RV {
    match fault().as_str() {
        "session-lost" => return CKR_SESSION_HANDLE_INVALID,
        "device-removed" => return CKR_DEVICE_REMOVED,
        "not-initialized" => return CKR_CRYPTOKI_NOT_INITIALIZED,
        "seed-not-supported" => return CKR_RANDOM_SEED_NOT_SUPPORTED,
        "min-seed-32" if len < 32 => return cryptoki_sys::CKR_ARGUMENTS_BAD,
        "hang" => {
            let start = Instant::now();
            while fault() == "hang" && start.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        _ => {}
    }
    let Ok(real) = real() else {
        return CKR_FUNCTION_FAILED;
    };
    let rv = match real.functions.C_SeedRandom {
        // SAFETY: forwarding the caller's arguments unchanged to the real module's function.
        Some(f) => unsafe { f(session, seed, len) },
        None => cryptoki_sys::CKR_FUNCTION_NOT_SUPPORTED,
    };
    if rv == CKR_OK && !seed.is_null() {
        // SAFETY: the caller passed `len` readable bytes at `seed` (PKCS#11's contract), and
        // the real module accepted them.
        let bytes = unsafe { std::slice::from_raw_parts(seed, len as usize) };
        log_seed(bytes);
        log_thread();
    }
    rv
}

fn log_thread() {
    // The caller's threads were named by its own runtime, which this library's `std` does not
    // know: the kernel's name for the thread (with its newline) is the one both agree on.
    append_to("QSEED_FAULT_THREAD_LOG", || {
        std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_default()
    });
}

fn log_seed(bytes: &[u8]) {
    append_to("QSEED_FAULT_SEED_LOG", || {
        let mut line: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        line.push('\n');
        line
    });
}

/// Appends `line()` to the file the environment variable `var` names, if it is set; one
/// writer at a time, so that lines of concurrent calls never interleave.
fn append_to(var: &str, line: impl FnOnce() -> String) {
    static LOG: Mutex<()> = Mutex::new(());
    let Ok(path) = std::env::var(var) else {
        return;
    };
    let line = line();
    let _one_writer = LOG.lock();
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = file.write_all(line.as_bytes());
    }
}

/// `cloned-rng`: the output of a generator whose state was cloned (an HA clone, a restored
/// backup, a VM snapshot): the same bytes from every token, every time.
unsafe extern "C" fn generate_random(
    session: CK_SESSION_HANDLE,
    out: *mut CK_BYTE,
    len: CK_ULONG,
) -> CK_RV {
    if fault() == "cloned-rng" {
        if out.is_null() {
            return cryptoki_sys::CKR_ARGUMENTS_BAD;
        }
        // SAFETY: the caller passed `len` writable bytes at `out` (PKCS#11's contract).
        let bytes = unsafe { std::slice::from_raw_parts_mut(out, len as usize) };
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        return CKR_OK;
    }
    let Ok(real) = real() else {
        return CKR_FUNCTION_FAILED;
    };
    match real.functions.C_GenerateRandom {
        // SAFETY: forwarding the caller's arguments unchanged to the real module's function.
        Some(f) => unsafe { f(session, out, len) },
        None => cryptoki_sys::CKR_FUNCTION_NOT_SUPPORTED,
    }
}

/// `init-hang`: C_Initialize does not return while the fault stays (at most two minutes), as a
/// network module whose server never answers.
unsafe extern "C" fn initialize(args: cryptoki_sys::CK_VOID_PTR) -> CK_RV {
    if fault() == "init-fails" {
        return cryptoki_sys::CKR_DEVICE_ERROR;
    }
    let start = Instant::now();
    while fault() == "init-hang" && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let Ok(real) = real() else {
        return CKR_FUNCTION_FAILED;
    };
    match real.functions.C_Initialize {
        // SAFETY: forwarding the caller's argument unchanged to the real module's function.
        Some(f) => unsafe { f(args) },
        None => cryptoki_sys::CKR_FUNCTION_NOT_SUPPORTED,
    }
}

unsafe extern "C" fn get_token_info(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    let Ok(real) = real() else {
        return CKR_FUNCTION_FAILED;
    };
    let Some(f) = real.functions.C_GetTokenInfo else {
        return cryptoki_sys::CKR_FUNCTION_NOT_SUPPORTED;
    };
    let fault = fault();
    if fault
        .strip_prefix("token-info-fails:")
        .and_then(|n| n.parse::<CK_SLOT_ID>().ok())
        == Some(slot)
    {
        return cryptoki_sys::CKR_DEVICE_ERROR;
    }
    // SAFETY: forwarding the caller's arguments unchanged to the real module's function.
    let rv = unsafe { f(slot, info) };
    if rv == CKR_OK && !info.is_null() && fault == "no-rng" {
        // SAFETY: the real module filled `*info` (CKR_OK) and the pointer is non-null.
        unsafe { (*info).flags &= !CKF_RNG };
    }
    rv
}

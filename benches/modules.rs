//! Time per `C_SeedRandom` on one PKCS#11 module: a tight loop of 48-byte seeds on one session,
//! through qseed's own module loading (so `init_args` work). Driven by `scripts/bench-modules`,
//! which sets up each module (SoftHSM, NSS softoken, tpm2-pkcs11 on swtpm, p11-kit's client).
//!
//! Environment: QSEED_BENCH_MODULE (path), QSEED_BENCH_TOKEN (label), QSEED_BENCH_INIT_ARGS,
//! QSEED_BENCH_CALLS (default 2000). Prints one line: module, calls, microseconds per call.

use std::path::PathBuf;
use std::time::Instant;

use qseed::config::TokenSelector;
use qseed::hsm::{module, token};

fn main() {
    let Some(path) = std::env::var_os("QSEED_BENCH_MODULE").map(PathBuf::from) else {
        println!("modules: set QSEED_BENCH_MODULE (scripts/bench-modules does); nothing measured");
        return;
    };
    let label = std::env::var("QSEED_BENCH_TOKEN").unwrap_or_default();
    let calls: usize = std::env::var("QSEED_BENCH_CALLS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(2000);
    let init_args = std::env::var("QSEED_BENCH_INIT_ARGS")
        .ok()
        .map(|a| std::ffi::CString::new(a).unwrap());
    let pkcs11 = module::load(&path, init_args.as_deref()).unwrap();
    let found = token::find(
        &pkcs11,
        &path.display().to_string(),
        &TokenSelector::Label(label),
    )
    .unwrap();
    let session = pkcs11.open_ro_session(found.slot).unwrap();
    let seed = [0x5au8; 48];
    // Warm-up, then the measured loop.
    for _ in 0..50 {
        session.seed_random(&seed).unwrap();
    }
    let start = Instant::now();
    for _ in 0..calls {
        session.seed_random(&seed).unwrap();
    }
    let per_call = start.elapsed().as_secs_f64() * 1e6 / calls as f64;
    println!(
        "module {} ({}): {calls} x C_SeedRandom(48 B): {per_call:.2} us per call",
        path.display(),
        found.model.trim_end_matches('\0').trim()
    );
    drop(session);
    let _ = pkcs11.finalize();
}

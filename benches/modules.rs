//! Time per `C_SeedRandom` on one PKCS#11 module: a tight loop of 48-byte seeds on one session,
//! through qseed's own module loading (so `init_args` work). Driven by `scripts/bench-modules`,
//! which sets up each module (SoftHSM, NSS softoken, tpm2-pkcs11 on swtpm, p11-kit's client).
//!
//! Environment: QSEED_BENCH_MODULE (path), QSEED_BENCH_TOKEN (label), QSEED_BENCH_INIT_ARGS,
//! QSEED_BENCH_CALLS (default 2000). Prints one line: module, calls, microseconds per call.
//!
//! Two more limits for `scripts/bench-injection`, each the least a client could spend:
//! - QSEED_BENCH_PACED=S: S more calls, one per second with the thread asleep in between (as a
//!   target with a 1 s period makes them), and the thread's CPU time per call. A call after a
//!   second's sleep runs with cold caches and pays for its wake-up, which the tight loop does not.
//! - QSEED_BENCH_ONCE=N: the calls `qseed once` needs to seed N of the module's tokens (load
//!   and `C_Initialize`, the slot list, every token's info, and for N tokens a session and one
//!   `C_SeedRandom`, then `C_Finalize`), timed from start to end.
//! - QSEED_BENCH_SPREAD=N:S: the calls of N targets at a 1 s period with their offsets spread
//!   over the period (target k at k × 1000/N ms), made by one thread that sleeps until each
//!   call's instant, for S seconds, on tokens t1..tN: the process's CPU time (every thread)
//!   per call. Each call pays its own wake-up, as each injection of spread targets does.
//! - QSEED_BENCH_PHASE=T (with PACED or SPREAD): the calls fall at unix time T (in ns) plus
//!   whole steps (1 s paced, 1 s/N spread) instead of at steps from 100 ms after the start:
//!   `scripts/bench-injection` puts them halfway between qseed's injections, run meanwhile, so
//!   that neither process runs right after the other (the one that does finds SoftHSM's and
//!   OpenSSL's code in the cache, and their shared pages make that the other one's doing).

use std::path::PathBuf;
use std::time::{Duration, Instant};

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
    if let Some(seconds) = std::env::var("QSEED_BENCH_PACED")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
    {
        // Wake-ups included, as in qseed's figure: all CPU time over the loop, per call.
        let before = thread_cpu();
        let start = first_call(Duration::from_secs(1));
        for second in 0..seconds {
            sleep_until(start + Duration::from_secs(u64::from(second)));
            session.seed_random(&seed).unwrap();
        }
        let cpu = thread_cpu() - before;
        println!(
            "paced: {seconds} x C_SeedRandom(48 B), one per second: {:.2} us CPU per call",
            cpu.as_secs_f64() * 1e6 / f64::from(seconds.max(1))
        );
    }
    drop(session);
    let _ = pkcs11.finalize();
    if let Some((targets, seconds)) = std::env::var("QSEED_BENCH_SPREAD").ok().and_then(|v| {
        let (n, s) = v.split_once(':')?;
        Some((n.parse::<usize>().ok()?, s.parse::<u32>().ok()?))
    }) {
        spread(&path, init_args.as_deref(), targets, seconds, &seed);
    }
    if let Some(wanted) = std::env::var("QSEED_BENCH_ONCE")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        let start = Instant::now();
        let pkcs11 = module::load(&path, init_args.as_deref()).unwrap();
        let mut seeded = 0;
        for slot in pkcs11.get_slots_with_token().unwrap() {
            // SoftHSM always offers one free slot whose token is not initialized.
            if !pkcs11.get_token_info(slot).unwrap().token_initialized() || seeded == wanted {
                continue;
            }
            let session = pkcs11.open_ro_session(slot).unwrap();
            session.seed_random(&seed).unwrap();
            seeded += 1;
        }
        let _ = pkcs11.finalize();
        println!(
            "once: the raw calls over {seeded} tokens: {:.3} s",
            start.elapsed().as_secs_f64()
        );
    }
}

/// See QSEED_BENCH_SPREAD in the module documentation.
fn spread(
    path: &std::path::Path,
    init_args: Option<&std::ffi::CStr>,
    targets: usize,
    seconds: u32,
    seed: &[u8],
) {
    let pkcs11 = module::load(path, init_args).unwrap();
    let where_ = path.display().to_string();
    let sessions: Vec<_> = (1..=targets)
        .map(|k| {
            let found =
                token::find(&pkcs11, &where_, &TokenSelector::Label(format!("t{k}"))).unwrap();
            pkcs11.open_ro_session(found.slot).unwrap()
        })
        .collect();
    let period = Duration::from_secs(1);
    let start = first_call(period / targets.max(1) as u32);
    let before = process_cpu();
    let mut calls = 0u64;
    for second in 0..seconds {
        for (k, session) in sessions.iter().enumerate() {
            sleep_until(start + period * second + period * k as u32 / targets as u32);
            session.seed_random(seed).unwrap();
            calls += 1;
        }
    }
    let cpu = process_cpu() - before;
    println!(
        "spread: {calls} x C_SeedRandom(48 B), {targets} tokens at offsets spread over 1 s: \
         {:.2} us CPU per call",
        cpu.as_secs_f64() * 1e6 / calls.max(1) as f64
    );
    drop(sessions);
    let _ = pkcs11.finalize();
}

/// When a paced or spread loop makes its first call: 100 ms from now, or with QSEED_BENCH_PHASE
/// the first instant at least 200 ms from now that falls on its phase plus whole `step`s.
fn first_call(step: Duration) -> Instant {
    let now = Instant::now();
    let phase = std::env::var("QSEED_BENCH_PHASE")
        .ok()
        .and_then(|t| t.parse::<u128>().ok());
    let (Some(phase), Ok(wall)) = (
        phase,
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH),
    ) else {
        return now + Duration::from_millis(100);
    };
    let step = step.as_nanos().max(1);
    let earliest = wall.as_nanos() + 200_000_000;
    let to_phase = (phase % step + step - earliest % step) % step;
    now + Duration::from_nanos((earliest + to_phase - wall.as_nanos()) as u64)
}

fn sleep_until(at: Instant) {
    if let Some(wait) = at.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
}

/// The process's CPU time: every thread's run time (the module's own threads too).
fn process_cpu() -> Duration {
    let mut nanos = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
            nanos += stat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(nanos)
}

/// This thread's CPU time (user and system), from the kernel's scheduler statistics: the
/// wake-up's cost lands in the thread's own run time, which `Instant` between calls would miss.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    let nanos: u64 = stat.split_whitespace().next().unwrap().parse().unwrap();
    Duration::from_nanos(nanos)
}

//! Soak benchmark (not in CI): hours of service compressed into minutes. Six SoftHSM tokens
//! behind the test fault module are seeded every 100–400 ms (instead of every ~10 s) from the
//! API simulator, while random faults hit the source (HTTP 500, 503, bad JSON, short blocks,
//! hangs) and the HSMs (lost sessions, removed devices). It samples the resident memory and,
//! at the end, checks from the fault module's seed log that every injected byte was served by
//! the simulator in a good answer, and none twice; and that the byte accounting balances.
//!
//! `cargo bench --bench soak` (3 minutes) or `cargo bench --bench soak -- --minutes N`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qseed::config::{parse, TargetConfig, TokenSelector};
use qseed::hsm::Modules;
use qseed::pool::{Pool, PoolConfig};
use qseed::service::{self, Rounds};
use qseed::simulator::{Fault, Options, Simulator};
use qseed::source::qrypt::QryptClient;
use tokio_util::sync::CancellationToken;

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("soak benchmark: run it with `cargo bench --bench soak`");
        return;
    }
    let minutes: u64 = args
        .iter()
        .position(|a| a == "--minutes")
        .and_then(|i| args.get(i + 1))
        .and_then(|m| m.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let module = build_fault_module();
    let conf = qseed::commands::demo::write_softhsm_config(dir.path()).unwrap();
    // Still one thread: the environment may change.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    std::env::set_var("QSEED_FAULT_REAL_MODULE", SOFTHSM);
    std::env::set_var("QSEED_FAULT_FILE", dir.path().join("fault"));
    std::env::set_var("QSEED_FAULT_SEED_LOG", dir.path().join("seeds.log"));
    std::fs::write(dir.path().join("fault"), "").unwrap();
    let sizes = [32usize, 48, 64, 100, 128, 256];
    for i in 0..sizes.len() {
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", &format!("soak-{i}")])
            .args(["--so-pin", "12345678", "--pin", "1234"])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    tokio::runtime::Runtime::new().unwrap().block_on(soak(
        dir.path(),
        &module,
        &sizes,
        Duration::from_secs(60 * minutes),
    ));
}

async fn soak(dir: &Path, module: &Path, sizes: &[usize], length: Duration) {
    let sim = Simulator::start(Options {
        token: Some("soak".into()),
        record: true,
        ..Options::default()
    })
    .await
    .unwrap();
    std::fs::write(dir.join("ca.pem"), sim.ca_pem().unwrap()).unwrap();
    std::fs::write(dir.join("token"), "soak").unwrap();
    let text = format!(
        "[source]\nurl = \"{}\"\ntoken_file = \"token\"\nca_file = \"ca.pem\"\ntimeout = \"1s\"\nallow_simulated = true\n",
        sim.url()
    );
    let source = parse(&text, dir).unwrap().qrypt().unwrap().clone();
    let targets: Vec<TargetConfig> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| TargetConfig {
            kind: qseed::config::TargetKind::Pkcs11,
            check_output: false,
            name: format!("soak-{i}"),
            module: module.to_path_buf(),
            token: TokenSelector::Label(format!("soak-{i}")),
            login: None,
            size,
            period: Duration::from_millis(100 + 60 * i as u64),
            offset: Duration::from_millis(13 * i as u64),
            timeout: Duration::from_secs(2),
            max_seed: None,
            init_args: None,
        })
        .collect();
    let periods: f64 = targets.iter().map(|t| t.period.as_secs_f64()).sum::<f64>() / 6.0;
    let client = QryptClient::new(&source).unwrap();
    let pool = Arc::new(Pool::new(
        client,
        PoolConfig {
            horizon: Duration::from_secs(20),
            ..PoolConfig::default()
        },
    ));
    let modules = Modules::new();
    service::load_modules(&targets, &modules).await.unwrap();
    let stop = CancellationToken::new();
    let metrics = qseed::telemetry::metrics::Metrics::new(None);
    let running = tokio::spawn(service::run(
        targets,
        pool.clone(),
        modules.clone(),
        // The soak's targets log in with no PIN: the guard is never consulted.
        qseed::hsm::PinGuard::new(&qseed::state::StateDir::Memory {
            why: "soak benchmark".into(),
        }),
        Rounds::Forever,
        stop.clone(),
        metrics,
    ));

    let start = Instant::now();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ start.elapsed().as_nanos() as u64;
    let mut rss = vec![(0u64, rss_kib())];
    let mut faults = 0;
    while start.elapsed() < length {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let (source_fault, hsm_fault) = match rng % 10 {
            0 => (Fault::Status(500), ""),
            1 => (Fault::Unavailable { retry_after: 1 }, ""),
            2 => (Fault::BadJson, ""),
            3 => (Fault::ShortBlock, ""),
            4 => (Fault::Hang, ""),
            5 => (Fault::None, "session-lost"),
            6 => (Fault::None, "device-removed"),
            _ => (Fault::None, ""),
        };
        if source_fault != Fault::None || !hsm_fault.is_empty() {
            faults += 1;
        }
        sim.set_fault(source_fault);
        std::fs::write(dir.join("fault"), hsm_fault).unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        sim.set_fault(Fault::None);
        std::fs::write(dir.join("fault"), "").unwrap();
        tokio::time::sleep(Duration::from_millis(1300)).await;
        if rss
            .last()
            .is_some_and(|(t, _)| start.elapsed().as_secs() >= t + 15)
        {
            rss.push((start.elapsed().as_secs(), rss_kib()));
        }
    }
    stop.cancel();
    let outcomes = running.await.unwrap();
    let outcome = service::teardown(outcomes, &pool, &modules).await;
    rss.push((start.elapsed().as_secs(), rss_kib()));

    // Every logged seed: bytes of a good answer, no byte twice.
    let log = std::fs::read_to_string(dir.join("seeds.log")).unwrap_or_default();
    let seeds: Vec<Vec<u8>> = log.lines().map(hex).collect();
    let served = sim.served();
    let mut used = HashSet::new();
    for seed in &seeds {
        let at = served
            .windows(seed.len())
            .position(|w| w == &seed[..])
            .expect("every injected seed was served in a good answer");
        for offset in at..at + seed.len() {
            assert!(used.insert(offset), "served byte {offset} injected twice");
        }
    }
    let injected: u64 = outcome.targets.iter().map(|t| t.bytes_injected).sum();
    let p = outcome.pool;
    assert_eq!(injected, seeds.iter().map(|s| s.len() as u64).sum::<u64>());
    // Bought = refused by health tests + handed out + expired + left at shutdown.
    assert_eq!(
        p.bytes_downloaded,
        p.bytes_rejected + p.bytes_handed_out + p.bytes_expired + outcome.bytes_left_unused,
        "every downloaded byte is accounted for"
    );
    let secs = start.elapsed().as_secs_f64();
    println!(
        "## Soak: {:.0} s, 6 targets, mean period {:.0} ms, {faults} fault windows of 0.7 s",
        secs,
        periods * 1000.0
    );
    println!();
    println!("| injections | bytes injected | handed out, not injected (failed calls, wiped) | requests (failed) | downloaded | left at stop | seeds checked against served bytes | duplicates |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {injected} | {} | {} ({}) | {} | {} | {} | 0 |",
        outcome.targets.iter().map(|t| t.injections).sum::<u64>(),
        p.bytes_handed_out - injected,
        p.requests,
        p.failed_requests,
        p.bytes_downloaded,
        outcome.bytes_left_unused,
        seeds.len(),
    );
    println!();
    println!(
        "Resident memory (KiB) over time (s): {}",
        rss.iter()
            .map(|(t, k)| format!("{t}s {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "Equivalent service time at a 10 s period: {:.1} hours per target",
        secs / periods * 10.0 / 3600.0
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn hex(line: &str) -> Vec<u8> {
    (0..line.len() / 2)
        .map(|i| u8::from_str_radix(&line[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn build_fault_module() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "-p", "qseed-fault-module"])
        .current_dir(root)
        .status()
        .unwrap();
    assert!(status.success());
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    target.join("debug/libqseed_fault_module.so")
}

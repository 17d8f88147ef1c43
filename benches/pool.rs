//! Pool benchmark (`cargo bench --bench pool`): utilization of bought entropy, requests made,
//! the cost of a take, and the health tests' false-reject rate on good random data. It reports
//! figures; it asserts nothing about time. Results go in BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use qseed::config::{parse, SourceConfig};
use qseed::pool::{health, HealthConfig, HealthTests, Pool, PoolConfig};
use qseed::simulator::{Options, Simulator};
use qseed::source::qrypt::QryptClient;
use qseed::source::BLOCK_LEN;

const INJECTIONS: u64 = 10_000;
const SIZE: usize = 48;

fn main() {
    // `cargo test --all-targets` builds and starts this too; only `cargo bench` runs it.
    if !std::env::args().any(|a| a == "--bench") {
        println!("pool benchmark: run it with `cargo bench --bench pool`");
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(utilization());
    false_rejects();
}

async fn utilization() {
    let sim = Simulator::start(Options {
        token: Some("bench".into()),
        ..Options::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), sim.ca_pem().unwrap()).unwrap();
    std::fs::write(dir.path().join("token"), "bench").unwrap();
    let source = |dialect: &str| -> SourceConfig {
        let text = format!(
            "[source]\nurl = \"{}\"\ndialect = \"{dialect}\"\ntoken_file = \"token\"\nca_file = \"ca.pem\"\nallow_simulated = true\n",
            sim.url()
        );
        parse(&text, dir.path()).unwrap().qrypt().unwrap().clone()
    };

    println!("## Utilization: {INJECTIONS} injections of {SIZE} bytes against the simulator (TLS)");
    println!();
    println!("| demand | dialect | requests | downloaded | injected | utilization | takes that waited | µs per take |");
    println!("|---|---|---|---|---|---|---|---|");
    for (label, rounds, period) in [
        (
            "bounded (`once`-style, 10,000 rounds known)",
            Some(INJECTIONS),
            Duration::from_millis(1),
        ),
        (
            "open-ended service, 48 B every 10 s",
            None,
            Duration::from_secs(10),
        ),
        (
            "open-ended service, 48 B every 1 s",
            None,
            Duration::from_secs(1),
        ),
    ] {
        for dialect in ["quantum-entropy", "entropy"] {
            let requests_before = sim.requests();
            let client = QryptClient::new(&source(dialect)).unwrap();
            let pool = Arc::new(Pool::new(client, PoolConfig::default()));
            let id = pool.register(SIZE, period, rounds);
            let start = Instant::now();
            for _ in 0..INJECTIONS {
                let bytes = pool.take(id, SIZE).await.unwrap();
                assert_eq!(bytes.len(), SIZE);
            }
            let per_take = start.elapsed().as_secs_f64() * 1e6 / INJECTIONS as f64;
            let stats = pool.stats();
            let injected = INJECTIONS * SIZE as u64;
            println!(
                "| {label} | {dialect} | {} | {} | {} | {:.5} | {} | {:.1} |",
                sim.requests() - requests_before,
                stats.bytes_downloaded,
                injected,
                injected as f64 / stats.bytes_downloaded as f64,
                stats.takes_waited,
                per_take
            );
        }
    }
    println!();
    println!(
        "Qrypt's qseed: one 1,024-byte request per 48-byte injection: {} requests, utilization {:.4}",
        INJECTIONS,
        SIZE as f64 / BLOCK_LEN as f64
    );
    println!();
}

fn false_rejects() {
    const BLOCKS: usize = 1_000_000;
    let config = HealthConfig::default();
    let mut tests = HealthTests::new(config);
    let (rct, apt) = tests.cutoffs();
    let mut rejected = 0usize;
    let mut buffer = qseed::secret::EntropyBytes::zeroed(256 * BLOCK_LEN);
    let start = Instant::now();
    for _ in 0..BLOCKS / 256 {
        getrandom::fill(buffer.expose_mut()).unwrap();
        let mut copy = qseed::secret::EntropyBytes::zeroed(buffer.len());
        copy.expose_mut().copy_from_slice(buffer.expose());
        let (_, failures) = health::screen(&mut tests, copy, BLOCK_LEN);
        rejected += failures.len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!("## Health tests on good random data (OS randomness)");
    println!();
    println!(
        "min_entropy = {} bits/byte, false_alarm = 2^{:.0}: RCT cutoff {rct}, APT cutoff {apt} (window 512)",
        config.min_entropy,
        config.false_alarm.log2()
    );
    println!(
        "{BLOCKS} blocks of 1 KiB ({} MiB): {rejected} rejected (false-reject rate {:.2e}); \
         {:.0} MiB/s including the OS random generator",
        BLOCKS / 1024,
        rejected as f64 / BLOCKS as f64,
        (BLOCKS / 1024) as f64 / secs
    );
}

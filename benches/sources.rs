//! Several sources (`cargo bench --bench sources`): how long a failover takes when the
//! preferred source is down (refusing connections, or not answering until its timeout), and
//! what mixing two sources costs per KiB next to one source, measured in the same run against
//! simulators on 127.0.0.1. It reports figures and asserts nothing about time; results go in
//! BENCHMARKS.md.

use std::time::{Duration, Instant};

use qseed::config::parse;
use qseed::simulator::{Fault, Options, Simulator};
use qseed::source::set::SourceSet;
use qseed::source::EntropySource;

const ROUNDS: usize = 200;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("sources benchmark: run it with `cargo bench --bench sources`");
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run());
}

async fn appliance() -> Simulator {
    Simulator::start(Options {
        tls: false,
        ..Options::default()
    })
    .await
    .unwrap()
}

fn table(name: &str, url: &str) -> String {
    format!(
        "[[source]]\nname = \"{name}\"\nurl = \"{url}\"\nauth = \"none\"\nallow_http = true\n\
         allow_simulated = true\ntimeout = \"2s\"\n\n"
    )
}

fn set(pool: &str, tables: &[String]) -> SourceSet {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("[pool]\n{pool}\n{}", tables.concat());
    let config = parse(&text, dir.path()).unwrap();
    qseed::commands::run::make_sources(&config, true).unwrap()
}

/// Mean wall time and process CPU time per fetch of `blocks` blocks.
async fn measure(source: &SourceSet, blocks: usize, rounds: usize) -> (Duration, Duration) {
    let cpu = || rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    let (wall, cpu_start) = (Instant::now(), cpu());
    for _ in 0..rounds {
        let bytes = source.fetch(blocks).await.unwrap();
        assert_eq!(bytes.len(), blocks * 1024);
    }
    let cpu_end = cpu();
    let cpu_used = Duration::new((cpu_end.tv_sec - cpu_start.tv_sec) as u64, 0)
        + Duration::from_nanos(cpu_end.tv_nsec as u64)
        - Duration::from_nanos(cpu_start.tv_nsec as u64);
    (wall.elapsed() / rounds as u32, cpu_used / rounds as u32)
}

async fn run() {
    let (a, b) = (appliance().await, appliance().await);
    println!(
        "## Several sources (simulators over plain HTTP on 127.0.0.1, {ROUNDS} requests each)"
    );
    println!();
    println!("| setup | blocks per request | wall per request | process CPU per request | CPU per KiB delivered |");
    println!("|---|---|---|---|---|");
    for blocks in [1usize, 64] {
        let one = set("", &[table("a", &a.url())]);
        let mixed = set(
            "sources = \"mix\"",
            &[table("a", &a.url()), table("b", &b.url())],
        );
        for (label, source) in [("one source", &one), ("mix of two", &mixed)] {
            measure(source, blocks, 5).await;
            let (wall, cpu) = measure(source, blocks, ROUNDS).await;
            println!(
                "| {label} | {blocks} | {:.0} µs | {:.0} µs | {:.1} µs |",
                wall.as_secs_f64() * 1e6,
                cpu.as_secs_f64() * 1e6,
                cpu.as_secs_f64() * 1e6 / blocks as f64
            );
        }
    }

    println!();
    println!("| failover: the preferred source is | first request after it fails (to the backup) | next requests (preferred backing off) |");
    println!("|---|---|---|");
    // Down: connections refused (a stopped appliance).
    let down = appliance().await;
    let url = down.url();
    down.stop();
    drop(down);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let failover = set("", &[table("down", &url), table("b", &b.url())]);
    let direct = set("", &[table("b", &b.url())]);
    measure(&direct, 1, 5).await;
    let (baseline, _) = measure(&direct, 1, ROUNDS).await;
    let started = Instant::now();
    failover.fetch(1).await.unwrap();
    let first = started.elapsed();
    let (next, _) = measure(&failover, 1, ROUNDS).await;
    println!(
        "| refusing connections | {:.2} ms | {:.2} ms (the backup alone: {:.2} ms) |",
        first.as_secs_f64() * 1e3,
        next.as_secs_f64() * 1e3,
        baseline.as_secs_f64() * 1e3
    );
    // Hung: accepts, never answers; bounded by its timeout (2 s here).
    let hung = appliance().await;
    hung.set_fault(Fault::Hang);
    let failover = set("", &[table("hung", &hung.url()), table("b", &b.url())]);
    let started = Instant::now();
    failover.fetch(1).await.unwrap();
    let first = started.elapsed();
    let (next, _) = measure(&failover, 1, 20).await;
    println!(
        "| not answering (timeout = \"2s\") | {:.2} ms | {:.2} ms |",
        first.as_secs_f64() * 1e3,
        next.as_secs_f64() * 1e3
    );
}

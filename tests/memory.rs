//! After seeding, no served block is left in the process's memory as base64 (the form it
//! travelled in), and no block already injected is left in any form outside the pool.
//!
//! Reads `/proc/PID/mem` of the non-dumpable qseed process: needs root (CAP_SYS_PTRACE); CI
//! runs as root, elsewhere the test says it was skipped.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use base64::Engine;
use common::*;

/// The readable, private memory of `pid` (heap, anonymous maps, stacks), region by region.
fn memory_of(pid: u32) -> Option<Vec<Vec<u8>>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut regions = Vec::new();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (range, perms) = (fields[0], fields[1]);
        let path = fields.get(5).copied().unwrap_or("");
        // Writable memory only: code and read-only data cannot hold what was received.
        if !perms.starts_with("rw") || path.starts_with("[v") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut bytes = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_ok() && mem.read_exact(&mut bytes).is_ok() {
            regions.push(bytes);
        }
    }
    Some(regions)
}

fn contains(regions: &[Vec<u8>], needle: &[u8]) -> bool {
    regions
        .iter()
        .any(|r| r.windows(needle.len()).any(|w| w == needle))
}

#[test]
fn no_served_block_is_left_as_base64_in_memory() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: reading another process's memory needs root (CI runs as root)");
        return;
    }
    let world = World::one_target("entropy", 256, "1s", false);
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    // Answers of many blocks, a new one every few rounds.
    world.write_config(&config.replace("[pool]\n", "[pool]\nhorizon = \"16s\"\n"));
    let service = world.start_service();
    assert!(
        world.wait_for_seeds(12, Duration::from_secs(20)),
        "{}",
        service.log()
    );
    let pid = service.pid();
    // Frozen while it is read: the seeds the spy logged are then all the bytes that left the
    // pool (bytes still in the pool are in its locked buffer, and would count).
    service.signal("STOP");
    std::thread::sleep(Duration::from_millis(200));
    let seeds = world.spy().seeds();
    let regions = memory_of(pid).expect("/proc/PID/mem is readable by root");
    let served = world.sim.served();
    let blocks: Vec<&[u8]> = served.chunks_exact(1024).collect();
    let engine = base64::engine::general_purpose::STANDARD;
    let mut as_base64 = 0;
    for block in &blocks {
        let text = engine.encode(block);
        // 48 characters from the middle: no accident matches them.
        if contains(&regions, &text.as_bytes()[600..648]) {
            as_base64 += 1;
        }
    }
    let mut injected_left = 0;
    for seed in &seeds {
        if contains(&regions, &seed[100..132]) {
            injected_left += 1;
        }
    }
    eprintln!(
        "{} blocks served, {as_base64} found as base64; {} seeds injected, {injected_left} \
         found raw",
        blocks.len(),
        seeds.len()
    );
    service.signal("CONT");
    let _ = service.stop();
    assert_eq!(as_base64, 0, "served blocks left as base64 in memory");
    assert_eq!(injected_left, 0, "injected bytes left in memory");
}

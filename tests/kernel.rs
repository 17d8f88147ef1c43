//! Issue 23, item 1: the host kernel as a target. Under strace, RNDADDENTROPY carries exactly
//! bytes the simulator served (none also given to the HSM beside it) and RNDRESEEDCRNG follows;
//! without CAP_SYS_ADMIN the target stops with the fix. Needs root (CAP_SYS_ADMIN), as CI has.

mod common;

use std::process::Command;

use common::*;

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "tests/kernel.rs seeds the host kernel: run the suite as root (CI does)"
    );
}

/// The kernel target's table.
fn kernel_target(credit: &str) -> String {
    format!(
        "[[target]]\nname = \"host\"\nkind = \"kernel\"\ncredit = \"{credit}\"\nsize = 48\n\
         period = \"10s\"\n"
    )
}

/// The buffers of every RNDADDENTROPY in an strace log (`-xx`), with the credit claimed, in
/// order, and whether each was followed by RNDRESEEDCRNG.
fn added_entropy(log: &str) -> Vec<(u32, Vec<u8>, bool)> {
    let lines: Vec<&str> = log.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(start) = line.find("RNDADDENTROPY, {entropy_count=") else {
            continue;
        };
        let rest = &line[start + "RNDADDENTROPY, {entropy_count=".len()..];
        let count: u32 = rest[..rest.find(',').unwrap()].parse().unwrap();
        let hex = &rest[rest.find("buf=\"").unwrap() + 5..];
        let hex = &hex[..hex.find('"').unwrap()];
        let bytes = hex
            .split("\\x")
            .filter(|h| !h.is_empty())
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        let reseeded = lines[i + 1..]
            .iter()
            .take(3)
            .any(|l| l.contains("RNDRESEEDCRNG") && l.contains("= 0"));
        found.push((count, bytes, reseeded));
    }
    found
}

/// The world's command as the test runs it, for other programs to run.
fn with_world_env(cmd: &mut Command, world: &World) {
    for (k, v) in world.qseed().get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
}

/// `qseed once` under strace, tracing ioctls with their buffers; its output and strace's log.
fn strace_once(world: &World) -> (std::process::Output, String) {
    let strace_log = world.path("strace.log");
    let mut cmd = Command::new("strace");
    cmd.args([
        "-f",
        "-e",
        "trace=ioctl",
        "-e",
        "verbose=ioctl",
        "-xx",
        "-s",
        "65536",
    ])
    .arg("-o")
    .arg(&strace_log)
    .arg(env!("CARGO_BIN_EXE_qseed"))
    .arg("once")
    .stdin(std::process::Stdio::null());
    with_world_env(&mut cmd, world);
    let out = cmd.output().expect("strace runs (apt-get install strace)");
    let log = std::fs::read_to_string(&strace_log).unwrap_or_default();
    (out, log)
}

#[test]
fn the_kernel_gets_served_bytes_no_hsm_gets_and_reseeds() {
    require_root();
    let world = World::new();
    world.add_token("tok");
    world.write_config(&format!(
        "{}{}{}",
        world.source("entropy"),
        kernel_target("none"),
        world.target("tok", "tok", 48, "10s", false)
    ));
    let (out, log) = strace_once(&world);
    assert!(out.status.success(), "{}", stderr(&out));
    let added = added_entropy(&log);
    assert!(!added.is_empty(), "no RNDADDENTROPY: {log}");
    let served = world.sim.served();
    let kernel_rounds: Vec<&Vec<u8>> = added
        .iter()
        .filter(|(_, bytes, _)| bytes.len() == 48)
        .map(|(_, bytes, _)| bytes)
        .collect();
    assert!(!kernel_rounds.is_empty(), "{added:?}");
    for (count, _, reseeded) in &added {
        assert_eq!(*count, 0, "credit = \"none\" claims no entropy");
        assert!(reseeded, "RNDRESEEDCRNG after each RNDADDENTROPY: {log}");
    }
    // Every kernel seed is served bytes, none shared with the HSM's seeds, none reused.
    let mut all: Vec<Vec<u8>> = world.spy().seeds();
    assert_eq!(
        all.len(),
        1,
        "the HSM's round (the test world has no flush at the stop)"
    );
    assert_eq!(added.len(), 1, "the kernel's round: {added:?}");
    all.extend(added.iter().map(|(_, b, _)| b.clone()));
    assert_seeds_are_distinct_served_bytes(&all, &served);
    assert!(
        stderr(&out).contains("seeded host: 48 bytes into the host kernel (RNDADDENTROPY)"),
        "{}",
        stderr(&out)
    );
    // The ledger names the kernel seeding as such.
    let ledger =
        std::fs::read_to_string(world.path("state").join("audit").join("ledger.jsonl")).unwrap();
    assert!(ledger.contains("\"event\":\"kernel\""), "{ledger}");
}

#[test]
fn full_credit_is_claimed_only_when_asked_and_no_capability_stops_the_target() {
    require_root();
    let world = World::new();
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        kernel_target("full")
    ));
    let (out, log) = strace_once(&world);
    assert!(out.status.success(), "{}", stderr(&out));
    let added = added_entropy(&log);
    assert!(added
        .iter()
        .any(|(count, bytes, _)| *count == 48 * 8 && bytes.len() == 48));

    // Without CAP_SYS_ADMIN: stopped, with the fix, exit 4.
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--"])
        .arg(env!("CARGO_BIN_EXE_qseed"))
        .arg("once");
    with_world_env(&mut cmd, &world);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("CAP_SYS_ADMIN") && stderr(&out).contains("AmbientCapabilities"),
        "{}",
        stderr(&out)
    );
}

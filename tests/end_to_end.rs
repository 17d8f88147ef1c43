//! The real binary against real SoftHSM (behind pkcs11-spy) and the simulator over TLS.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn once_injects_exactly_the_served_bytes_in_both_dialects() {
    for dialect in ["quantum-entropy", "entropy"] {
        let world = World::new();
        world.add_token("alpha");
        world.write_config(&format!(
            "{}{}",
            world.source(dialect),
            world.target("alpha", "alpha", 40, "10s", true)
        ));
        let out = world.run(&["once"]);
        let log = stderr(&out);
        assert!(out.status.success(), "{dialect}: {log}");
        assert!(
            log.contains("seeded alpha: 40 bytes into token \"alpha\""),
            "{log}"
        );

        let spy = world.spy();
        let seeds = spy.seeds();
        assert_eq!(seeds.len(), 1, "{dialect}");
        assert_eq!(seeds[0].len(), 40);
        let served = world.sim.served();
        assert_eq!(served.len(), 1024, "one KiB bought for a 40-byte seed");
        assert_eq!(
            &seeds[0][..],
            &served[..40],
            "the first 40 served bytes went in"
        );
        assert_eq!(spy.count("C_Login"), 1);
        assert_eq!(spy.count("C_Initialize"), 1);
        assert_eq!(spy.count("C_Finalize"), 1);
    }
}

#[test]
fn run_seeds_two_tokens_at_their_own_periods_and_never_reuses_a_byte() {
    let world = World::new();
    world.add_token("left");
    world.add_token("right");
    world.write_config(&format!(
        "{}{}{}",
        world.source("entropy"),
        world.target("left", "left", 48, "1s", true),
        world.target_at("right", "right", 100, "2s", false, "500ms"),
    ));
    let out = world.run_service(Duration::from_millis(4800));
    let log = stderr(&out);
    assert!(
        out.status.success(),
        "SIGTERM ends the service cleanly: {log}"
    );

    let spy = world.spy();
    let seeds = spy.seeds();
    let left = seeds.iter().filter(|s| s.len() == 48).count();
    let right = seeds.iter().filter(|s| s.len() == 100).count();
    // Rounds at 0,1,2,3,4 s and at 0.5,2.5,4.5 s; allow one either way for a loaded machine.
    assert!((4..=6).contains(&left), "left seeded {left} times: {log}");
    assert!(
        (2..=4).contains(&right),
        "right seeded {right} times: {log}"
    );
    assert_eq!(left + right, seeds.len(), "no seed of another size");

    let served = world.sim.served();
    let used = assert_seeds_tile_served(&seeds, &served);
    assert_eq!(used, left * 48 + right * 100);
    // Nothing is bought for a token's share of the horizon until it has accepted a seed: the
    // first request buys one block, for "left"'s first round; once that seed is in, the next
    // buys "left"'s rate (48 B/s) over the pool's 10-minute horizon, and "right" (offset
    // 0.5 s, its first seed from the first block) counts from its first accepted seed on. On
    // a loaded machine the second request can leave after "right"'s first seed, and then buys
    // both rates (98 B/s): either is right, anything else is not. Two requests serve the whole
    // run; what is left is wiped at shutdown.
    let blocks = world.sim.blocks_served();
    eprintln!(
        "{} requests, {blocks} blocks, {} bytes",
        world.sim.requests(),
        served.len()
    );
    assert_eq!(
        world.sim.requests(),
        2,
        "two requests for the whole run: {log}"
    );
    let left_only = 29 * 1024..=31 * 1024;
    let both = 58 * 1024..=61 * 1024;
    assert!(
        left_only.contains(&served.len()) || both.contains(&served.len()),
        "one block, then the horizon of the tokens that had accepted a seed: {} bytes: {log}",
        served.len()
    );
    assert!(
        log.contains(&format!("{} left at shutdown (wiped)", served.len() - used)),
        "{log}"
    );
    assert_eq!(
        spy.count("C_Login"),
        1,
        "one login for the one target with a PIN"
    );
    assert_eq!(
        spy.count("C_Finalize"),
        1,
        "modules are finalized at shutdown"
    );
    assert_eq!(log.matches("seeded left:").count(), left, "{log}");
    assert_eq!(log.matches("seeded right:").count(), right, "{log}");
}

#[test]
fn fetch_writes_exactly_the_bytes_served() {
    let world = World::new();
    world.write_config(&world.source("quantum-entropy"));
    let file = world.path("out.bin");
    let out = world.run(&[
        "fetch",
        "--bytes",
        "3000",
        "--output",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let written = std::fs::read(&file).unwrap();
    let served = world.sim.served();
    assert_eq!(written.len(), 3000);
    assert_eq!(served.len(), 3072, "three whole blocks");
    assert_eq!(&written[..], &served[..3000]);
    let shown = format!("{:?}", world.sim);
    assert!(shown.contains("3072 bytes, redacted"), "{shown}");
    assert!(!shown.contains(
        &format!("{:?}", &served[..4])
            .trim_end_matches(']')
            .to_string()
    ));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "entropy files are private");
    }

    // Two requests (512 + 74 blocks) in flight at once: the server may answer the second
    // first, so the output is the served blocks in request order, not in serving order.
    let out = world.run(&["fetch", "--bytes", "600000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout.len(), 600000);
    let served = world.sim.served();
    assert_eq!(served.len(), 3072 + 586 * 1024);
    let blocks: Vec<&[u8]> = served[3072..].chunks(1024).collect();
    let mut used = std::collections::HashSet::new();
    for chunk in out.stdout.chunks(1024) {
        let at = blocks
            .iter()
            .position(|b| b.starts_with(chunk))
            .expect("every written block was served");
        assert!(used.insert(at), "and written once");
    }
}

#[test]
fn slots_lists_tokens_with_label_serial_and_rng() {
    let world = World::new();
    world.add_token("listed-token");
    let out = world.run(&["slots", "--module", SOFTHSM]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    let row = text
        .lines()
        .find(|l| l.contains("listed-token"))
        .unwrap_or_else(|| panic!("{text}"));
    // ... SoftHSM v2, RNG yes, no known per-call seed limit, login required, user PIN set
    // and not counting failures, no target (no configuration names it).
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert!(
        row.contains("SoftHSM v2") && columns.ends_with(&["yes", "-", "required", "ok", "-"]),
        "{row}"
    );
    assert!(
        text.lines().any(|l| l.contains("uninit")),
        "the free slot: {text}"
    );
}

#[test]
fn slots_without_a_module_lists_the_configurations_modules_and_targets() {
    let world = World::new();
    world.add_token("tok");
    world.add_token("spare");
    world.write_config(&format!(
        "{}{}{}",
        world.source("entropy"),
        world.target("seeder", "tok", 48, "10s", true),
        world.target("lost", "no-such-token", 48, "10s", false)
    ));
    let out = world.run(&["slots"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.starts_with(&format!("{SPY}:\n")), "{text}");
    let row = |label: &str| {
        text.lines()
            .find(|l| l.split_whitespace().nth(2) == Some(label))
            .unwrap_or_else(|| panic!("{text}"))
            .split_whitespace()
            .last()
            .unwrap()
            .to_string()
    };
    assert_eq!(row("tok"), "seeder", "the TARGET column");
    assert_eq!(row("spare"), "-");
    assert!(
        text.contains("target lost: no token with token_label \"no-such-token\""),
        "{text}"
    );

    let out = world.run(&["slots", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let module = &doc["modules"][0];
    assert_eq!(module["module"], SPY);
    let tok = module["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["token"]["label"] == "tok")
        .unwrap();
    assert_eq!(tok["token"]["login_required"], true);
    assert_eq!(tok["token"]["user_pin"], "ok");
    assert_eq!(tok["token"]["user_pin_locked"], false);
    assert!(tok["token"]["uri"].as_str().unwrap().starts_with("pkcs11:"));
    assert_eq!(module["targets"][0]["name"], "seeder");
    assert_eq!(module["targets"][0]["slot_id"], tok["slot_id"]);
    assert_eq!(module["targets"][1]["slot_id"], serde_json::Value::Null);

    std::fs::remove_file(world.path("qseed.toml")).unwrap();
    let out = world.run(&["slots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no --module and no configuration at"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn demo_seeds_a_throwaway_token_and_says_the_entropy_is_simulated() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qseed"))
        .args(["demo", "--rounds", "2"])
        .env_remove("QRYPT_TOKEN")
        .env_remove("SOFTHSM2_CONF")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let log = stderr(&out);
    assert!(out.status.success(), "{text}\n{log}");
    assert!(text.contains("SIMULATED"), "{text}");
    assert!(text.contains("software token"), "{text}");
    assert!(text.contains("demo-a   2 injections, 96 bytes"), "{text}");
    assert!(text.contains("demo-b   2 injections, 128 bytes"), "{text}");
    let folder = text
        .lines()
        .find_map(|l| l.strip_prefix("Removed "))
        .map(|p| p.trim_end_matches('.').to_string())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        !std::path::Path::new(&folder).exists(),
        "demo folder removed"
    );
}

#[test]
fn a_size_above_max_seed_goes_in_several_calls_each_byte_once() {
    let world = World::new();
    world.add_token("tok");
    world.write_config(&format!(
        "{}{}max_seed = 64\n",
        world.source("entropy"),
        world.target("tok", "tok", 200, "10s", false)
    ));
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let seeds = world.spy().seeds();
    let lengths: Vec<usize> = seeds.iter().map(Vec::len).collect();
    assert_eq!(lengths, [64, 64, 64, 8], "one round, four calls");
    // Together they are the first 200 served bytes, in order.
    assert_eq!(seeds.concat(), world.sim.served()[..200].to_vec());

    let out = world.run(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("accepted a 200-byte seed (in 4 call(s) of at most 64 bytes: max_seed)"),
        "{text}"
    );
}

#[test]
fn a_large_fetch_keeps_requests_in_flight_and_writes_each_served_block_once() {
    let world = World::new();
    world.write_config(&world.source("entropy"));
    let file = world.path("big.bin");
    let out = world.run(&[
        "fetch",
        "--bytes",
        "1100000",
        "--output",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let written = std::fs::read(&file).unwrap();
    assert_eq!(written.len(), 1_100_000);
    // 1,075 blocks in requests of at most 512, two in flight at a time.
    assert_eq!(world.sim.requests(), 3);
    let served = world.sim.served();
    let blocks: std::collections::HashSet<&[u8]> = served.chunks(1024).collect();
    assert_eq!(blocks.len(), 1075, "every served block is distinct");
    let mut seen = std::collections::HashSet::new();
    for chunk in written.chunks_exact(1024) {
        assert!(blocks.contains(chunk), "a written block was served");
        assert!(seen.insert(chunk), "and written once");
    }
}

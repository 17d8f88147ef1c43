//! The flush at a stop: the bytes left in the pool were paid for, so `once` and SIGTERM inject
//! them into the targets (within `[pool] flush_timeout`) instead of wiping them. Checked byte
//! for byte against what the simulator served.

mod common;

use std::time::Duration;

use common::*;
use qseed::simulator::Fault;

/// This world's configuration with the flush on (`World::source` turns it off).
fn with_flush(world: &World, timeout: &str) {
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace(
        "flush_timeout = \"0s\"",
        &format!("flush_timeout = \"{timeout}\""),
    ));
}

#[test]
fn once_uses_the_whole_kib_it_bought() {
    let world = World::one_target("entropy", 48, "1s", false);
    with_flush(&world, "2s");
    let out = world.run(&["once"]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    let served = world.sim.served();
    assert_eq!(served.len(), 1024, "one block bought");
    let seeds = world.spy().seeds();
    // The round's 48 bytes, then the 976 left, in one call (at most 1 KiB a call).
    assert_eq!(
        seeds.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![48, 976]
    );
    assert_eq!(assert_seeds_tile_served(&seeds, &served), 1024);
    assert!(
        log.contains("48 injected in rounds, 976 flushed into the targets at the stop")
            && log.contains("0 left at shutdown (wiped)"),
        "{log}"
    );
    assert!(log.contains("flushed into tok: 976 bytes"), "{log}");
}

#[test]
fn sigterm_spreads_what_is_left_over_the_targets_and_uses_every_byte() {
    let world = World::new();
    world.use_fault_module();
    world.add_token("a");
    world.add_token("b");
    world.write_config(&format!(
        "{}{}{}",
        world.source("entropy"),
        world.target("a", "a", 48, "1s", false),
        world.target_at("b", "b", 64, "1s", false, "500ms"),
    ));
    with_flush(&world, "5s");
    let seed_log = world.path("seeds.log");
    let service = world.start_service_with(&[("QSEED_FAULT_SEED_LOG", seed_log.to_str().unwrap())]);
    assert!(
        wait_until(Duration::from_secs(10), || service
            .log()
            .contains("seeded b:")),
        "{}",
        service.log()
    );
    // The horizon's purchase follows the first accepted seed; stop once it has landed (bytes
    // that arrive after the flush are wiped, and this test counts every byte).
    assert!(wait_until(Duration::from_secs(5), || world.sim.requests() == 2));
    std::thread::sleep(Duration::from_millis(300));
    let (status, _) = service.stop();
    let log = std::fs::read_to_string(world.path("service.log")).unwrap();
    assert!(status.success(), "{log}");
    // The fault module's seed log: one whole line per call, even when calls overlap.
    let seeds: Vec<Vec<u8>> = std::fs::read_to_string(&seed_log)
        .unwrap()
        .lines()
        .map(|l| {
            (0..l.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect();
    let served = world.sim.served();
    // Every byte bought went into a token, once.
    assert_eq!(
        assert_seeds_tile_served(&seeds, &served),
        served.len(),
        "{log}"
    );
    assert!(log.contains("0 left at shutdown (wiped)"), "{log}");
    // Both targets took part, in calls of at most 1 KiB.
    assert!(
        log.contains("flushed into a:") && log.contains("flushed into b:"),
        "{log}"
    );
    assert!(seeds.iter().all(|s| s.len() <= 1024));
    let flushed: usize = seeds
        .iter()
        .filter(|s| s.len() != 48 && s.len() != 64)
        .map(Vec::len)
        .sum();
    assert!(flushed > 20_000, "{flushed}");
}

/// A purchase still in flight when the service stops was paid for: the flush waits for it
/// (within its budget) and injects its bytes too, instead of wiping them when they land.
#[test]
fn a_purchase_in_flight_at_the_stop_lands_and_is_flushed() {
    let world = World::one_target("entropy", 48, "1s", false);
    with_flush(&world, "5s");
    // Every answer takes 1.5 s: the purchase that follows the first seed is still on its way
    // when the stop comes.
    world.set_fault(Fault::Slow(Duration::from_millis(1500)));
    let service = world.start_service();
    assert!(
        world.wait_for_seeds(1, Duration::from_secs(10)),
        "{}",
        service.log()
    );
    assert!(
        wait_until(Duration::from_secs(5), || world.sim.requests() == 2),
        "{}",
        service.log()
    );
    let (status, _) = service.stop();
    let log = std::fs::read_to_string(world.path("service.log")).unwrap();
    assert!(status.success(), "{log}");
    let served = world.sim.served();
    assert!(served.len() > 1024, "the second purchase was served: {log}");
    let seeds = world.spy().seeds();
    assert_eq!(
        assert_seeds_tile_served(&seeds, &served),
        served.len(),
        "every byte bought went into the token, once: {log}"
    );
    assert!(log.contains("0 left at shutdown (wiped)"), "{log}");
}

/// The same for the purchase a target's own round makes when the pool is empty (the first
/// round's): the round gives up at the stop, but the purchase it started runs on, lands, and
/// is flushed. Before, the stop dropped the request mid-answer: a block paid for and never had.
#[test]
fn a_rounds_own_purchase_in_flight_at_the_stop_lands_and_is_flushed() {
    let world = World::one_target("entropy", 48, "1s", false);
    with_flush(&world, "5s");
    world.set_fault(Fault::Slow(Duration::from_millis(1500)));
    let service = world.start_service();
    assert!(
        wait_until(Duration::from_secs(10), || world.sim.requests() == 1),
        "{}",
        service.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        world.spy().seeds().is_empty(),
        "the stop comes before any seed"
    );
    let (status, _) = service.stop();
    let log = std::fs::read_to_string(world.path("service.log")).unwrap();
    assert!(status.success(), "{log}");
    let served = world.sim.served();
    assert_eq!(
        served.len(),
        1024,
        "the first purchase was completed: {log}"
    );
    let seeds = world.spy().seeds();
    assert_eq!(
        assert_seeds_tile_served(&seeds, &served),
        1024,
        "the block bought went into the token, once: {log}"
    );
    assert!(log.contains("0 left at shutdown (wiped)"), "{log}");
}

#[test]
fn a_flush_past_its_budget_stops_and_wipes_the_rest() {
    let world = World::new();
    world.use_fault_module();
    world.add_token("tok");
    world.write_config(&format!(
        "{}{}\ntimeout = \"10s\"\n",
        world.source("entropy"),
        world.target("tok", "tok", 48, "1s", false).trim_end()
    ));
    with_flush(&world, "1s");
    let service = world.start_service();
    assert!(
        world.wait_for_seeds(2, Duration::from_secs(5)),
        "{}",
        service.log()
    );
    // Right after a round: every C_SeedRandom from now on hangs, the flush's first call too.
    world.set_hsm_fault("hang");
    let rounds = world.spy().seeds().len() as u64;
    let (status, took) = service.stop();
    world.set_hsm_fault("");
    let log = std::fs::read_to_string(world.path("service.log")).unwrap();
    assert!(status.success(), "{log}");
    // The flush budget (1 s) and the shutdown grace (1.5 s) bound the stop.
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert!(log.contains("the flush at the stop ended"), "{log}");
    assert!(
        log.contains("0 flushed into the targets at the stop"),
        "{log}"
    );
    // The hung call's chunk (at most 1 KiB: the first purchase's block was partly used by the
    // rounds) is lost with it; the rest is wiped and counted.
    let served = world.sim.served().len() as u64;
    let left: u64 = log
        .lines()
        .find(|l| l.contains(" done: "))
        .unwrap_or_else(|| panic!("{log}"))
        .split(", ")
        .find_map(|part| part.strip_suffix(" left at shutdown (wiped)"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    let lost = served - 48 * rounds - left;
    assert!(
        (1..=1024).contains(&lost),
        "{lost} bytes unaccounted for: {log}"
    );
}

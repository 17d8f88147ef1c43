//! HSM faults against the real `qseed run`: pkcs11-spy -> the test fault module -> SoftHSM.
//! The fault module (tests/fault-module) makes SoftHSM's token misbehave on demand.

mod common;

use std::time::Duration;

use common::*;

/// `faulty` goes through the fault module and the spy; `healthy` straight to SoftHSM.
fn two_targets(faulty_timeout: &str) -> World {
    let world = World::new();
    world.use_fault_module();
    world.add_token("faulty");
    world.add_token("healthy");
    world.write_config(&format!(
        "{}{}\ntimeout = \"{faulty_timeout}\"\n\n[[target]]\nname = \"healthy\"\nmodule = \"{SOFTHSM}\"\n\
         token_label = \"healthy\"\nperiod = \"1s\"\noffset = \"500ms\"\n",
        world.source("entropy"),
        world.target("faulty", "faulty", 48, "1s", true).trim_end(),
    ));
    world
}

#[test]
fn a_lost_session_is_reopened_and_its_bytes_never_reused() {
    for (fault, code) in [
        ("session-lost", "CKR_SESSION_HANDLE_INVALID"),
        ("device-removed", "CKR_DEVICE_REMOVED"),
    ] {
        let world = two_targets("30s");
        let service = world.start_service();
        assert!(world.wait_for_seeds(1, Duration::from_secs(5)));
        world.set_hsm_fault(fault);
        assert!(
            service.wait_for_log(code, Duration::from_secs(5)),
            "{}",
            service.log()
        );
        world.set_hsm_fault("");
        let before = world.spy().seeds().len();
        assert!(
            wait_until(Duration::from_secs(4), || world.spy().seeds().len()
                > before),
            "{}",
            service.log()
        );
        // A lost device re-initializes the module under every target that shares it (here
        // SoftHSM itself, under the spy): the healthy target may lose a round, then goes on.
        let healthy_before = service.log().matches("seeded healthy:").count();
        assert!(
            wait_until(Duration::from_secs(4), || service
                .log()
                .matches("seeded healthy:")
                .count()
                >= healthy_before + 2),
            "{}",
            service.log()
        );
        let log = service.log();
        let (status, _) = service.stop();
        assert!(status.success(), "{log}");
        assert!(
            log.contains("round failed, trying again every 1s: C_SeedRandom")
                && log.contains("seeding again after")
                && log.contains("the session or device was lost; a new session is needed"),
            "{log}"
        );
        let spy = world.spy();
        assert!(spy.count("C_OpenSession") >= 2, "a new session was opened");
        // Issue 24: a lost session is forgotten, never closed (and never outside the module's
        // gate, where it could race a C_Finalize): the one C_CloseSession is the live
        // session's, at the stop.
        assert_eq!(
            spy.count("C_CloseSession"),
            1,
            "{fault}: only the live session is closed"
        );
        assert_eq!(
            spy.count("C_Login"),
            spy.count("C_OpenSession"),
            "one login per session"
        );
        assert!(spy.failed_seed_calls() >= 1);
        // The failed calls' bytes are in no successful seed: seeds still tile the served
        // stream only with gaps where failed calls took bytes, so check distinctness.
        assert_seeds_are_distinct_served_bytes(&spy.seeds(), &world.sim.served());
        assert!(
            log.matches("seeded healthy:").count() >= 2,
            "the other target went on: {log}"
        );
    }
}

#[test]
fn a_module_that_lost_its_initialization_is_initialized_again() {
    let world = two_targets("30s");
    let service = world.start_service();
    assert!(world.wait_for_seeds(1, Duration::from_secs(5)));
    world.set_hsm_fault("not-initialized");
    assert!(service.wait_for_log("CKR_CRYPTOKI_NOT_INITIALIZED", Duration::from_secs(5)));
    world.set_hsm_fault("");
    let before = world.spy().seeds().len();
    assert!(wait_until(Duration::from_secs(4), || world
        .spy()
        .seeds()
        .len()
        > before));
    let (status, _) = service.stop();
    assert!(status.success());
    let spy = world.spy();
    assert_eq!(
        spy.count("C_Initialize"),
        2,
        "the module was initialized again"
    );
    assert_eq!(
        spy.count("C_Finalize"),
        2,
        "once on reset, once at shutdown"
    );
}

#[test]
fn a_token_that_refuses_seeds_or_has_no_rng_stops_only_its_target() {
    for (fault, message) in [
        (
            "seed-not-supported",
            "C_SeedRandom: CKR_RANDOM_SEED_NOT_SUPPORTED: this token does not accept seed material",
        ),
        (
            "no-rng",
            "the token has no random number generator (CKF_RNG is not set)",
        ),
    ] {
        let world = two_targets("30s");
        world.set_hsm_fault(fault);
        let service = world.start_service();
        assert!(service.wait_for_log("faulty: target stopped", Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(2500));
        let log = service.log();
        let (status, _) = service.stop();
        assert!(status.success(), "{log}");
        assert!(log.contains(message), "{log}");
        assert_eq!(
            log.matches("target stopped").count(),
            1,
            "reported once, never retried: {log}"
        );
        assert!(log.matches("seeded healthy:").count() >= 2, "{log}");
        assert_eq!(world.spy().seeds().len(), 0);
    }
}

/// Starts the service, lets "faulty" seed once, then hangs its next C_SeedRandom.
fn start_and_hang(world: &World) -> Service {
    let service = world.start_service();
    assert!(world.wait_for_seeds(1, Duration::from_secs(5)));
    world.set_hsm_fault("hang");
    assert!(
        service.wait_for_log(
            "C_SeedRandom has not returned after 1s",
            Duration::from_secs(5)
        ),
        "{}",
        service.log()
    );
    service
}

#[test]
fn a_hung_call_does_not_stop_other_targets_or_the_shutdown() {
    let world = two_targets("1s");
    let service = start_and_hang(&world);
    let healthy_before = service.log().matches("seeded healthy:").count();
    std::thread::sleep(Duration::from_millis(2500));
    let log = service.log();
    assert!(
        log.matches("seeded healthy:").count() >= healthy_before + 2,
        "{log}"
    );
    // Shutdown while the call still hangs: bounded wait, then exit 0.
    let (status, took) = service.stop();
    assert!(status.success(), "{log}");
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
    world.set_hsm_fault("");
}

/// Review: a reload during a hung call finalized the module under the call, and seeded the
/// token from a second session meanwhile. Now the changed target waits for the old session's
/// call to return, and the module is never finalized with a call inside.
#[test]
fn a_reload_during_a_hung_call_neither_finalizes_nor_opens_a_second_session() {
    let world = two_targets("1s");
    let service = start_and_hang(&world);
    assert_eq!(world.spy().count("C_OpenSession"), 1);
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replacen("size = 48", "size = 64", 1));
    service.signal("HUP");
    assert!(
        service.wait_for_log(
            "still has this target's session from before the reload",
            Duration::from_secs(8)
        ),
        "{}",
        service.log()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let spy = world.spy();
    assert_eq!(spy.count("C_OpenSession"), 1, "no second session meanwhile");
    assert_eq!(spy.count("C_Finalize"), 0, "never finalized under the call");
    assert!(service.log().matches("seeded healthy:").count() >= 2);

    // The call returns: the new settings take over with a session of their own.
    world.set_hsm_fault("");
    assert!(
        service.wait_for_log("seeded faulty: 64 bytes", Duration::from_secs(8)),
        "{}",
        service.log()
    );
    assert_eq!(world.spy().count("C_OpenSession"), 2);
    let log = service.log();
    let (status, _) = service.stop();
    assert!(status.success(), "{log}");
    // Issue 24: the call returned long before the exit, so the module is finalized, and
    // nothing claims otherwise.
    assert_eq!(world.spy().count("C_Finalize"), 1, "{log}");
    assert!(!log.contains("not finalizing"), "{log}");
}

/// Issue 24: renaming a target while its call hangs opened a second session on its token. Now
/// the renamed target waits for the old session's call to return.
#[test]
fn a_target_renamed_during_a_hung_call_waits_for_the_old_session() {
    let world = two_targets("1s");
    let service = start_and_hang(&world);
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replacen("name = \"faulty\"", "name = \"renamed\"", 1));
    service.signal("HUP");
    assert!(
        service.wait_for_log("reload", Duration::from_secs(5)),
        "{}",
        service.log()
    );
    std::thread::sleep(Duration::from_millis(2500));
    let spy = world.spy();
    assert_eq!(
        spy.count("C_OpenSession"),
        1,
        "no second session while the call hangs: {}",
        service.log()
    );
    world.set_hsm_fault("");
    assert!(
        service.wait_for_log("seeded renamed:", Duration::from_secs(8)),
        "{}",
        service.log()
    );
    let log = service.log();
    let (status, _) = service.stop();
    assert!(status.success(), "{log}");
    assert_eq!(world.spy().count("C_Finalize"), 1, "{log}");
}

/// Issue 24: a call declared hung that returns CKR_OK was thrown away: its bytes were in the
/// token with no audit record, and the summary called them wiped. Now it is audited and
/// counted like any round.
#[test]
fn a_hung_seed_that_succeeds_later_is_audited_and_counted() {
    let world = two_targets("1s");
    let service = start_and_hang(&world);
    std::thread::sleep(Duration::from_millis(500));
    world.set_hsm_fault("");
    assert!(
        service.wait_for_log("given up on returned after", Duration::from_secs(5)),
        "{}",
        service.log()
    );
    assert!(world.wait_for_seeds(3, Duration::from_secs(5)));
    let (status, _) = service.stop();
    let log = service_log_of(&world);
    assert!(status.success(), "{log}");
    let seeds = world.spy().seeds().len();
    assert_eq!(
        log.matches("seeded faulty:").count(),
        seeds,
        "one audit record per seed that reached the token: {log}"
    );
    assert!(
        log.contains(" 0 handed out but not injected (wiped)"),
        "{log}"
    );
}

fn service_log_of(world: &World) -> String {
    std::fs::read_to_string(world.path("service.log")).unwrap_or_default()
}

/// Issue 23, item 2: a token that comes back after a device loss is seeded as soon as it is
/// back (looked for again on a backoff from 1 s), not a whole period later.
#[test]
fn a_token_back_after_a_device_loss_is_seeded_at_once() {
    let world = World::new();
    world.use_fault_module();
    world.add_token("faulty");
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        world.target("faulty", "faulty", 48, "30s", true)
    ));
    world.set_hsm_fault("device-removed");
    let service = world.start_service();
    assert!(
        service.wait_for_log("CKR_DEVICE_REMOVED", Duration::from_secs(5)),
        "{}",
        service.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    world.set_hsm_fault("");
    let back = std::time::Instant::now();
    assert!(
        world.wait_for_seeds(1, Duration::from_secs(15)),
        "not seeded within 15 s of the token coming back (period 30 s): {}",
        service.log()
    );
    eprintln!("seeded {:?} after the token came back", back.elapsed());
    let (status, _) = service.stop();
    assert!(status.success());
    // The looks while it was away cost at most one seed's bytes each.
    assert_seeds_are_distinct_served_bytes(&world.spy().seeds(), &world.sim.served());
}

/// Issue 24: a size the token refuses by argument (CKR_ARGUMENTS_BAD for a 16-byte seed, as
/// Kryoptic answers) is tried once and stops the target with the fix, not every period.
#[test]
fn a_seed_size_the_token_refuses_stops_the_target_once() {
    let world = World::new();
    world.use_fault_module();
    world.set_hsm_fault("min-seed-32");
    world.add_token("short");
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        world.target("short", "short", 16, "1s", true)
    ));
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the token refuses a seed of this size")
            && stderr(&out).contains("set size to 32 or more"),
        "{}",
        stderr(&out)
    );
    let before = world.spy().failed_seed_calls();
    let out = world.run_service(Duration::from_secs(4));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(4), "every target stopped: {log}");
    assert_eq!(
        world.spy().failed_seed_calls() - before,
        1,
        "tried once, not every period: {log}"
    );
    assert!(log.contains("target stopped"), "{log}");
}

/// Issue 24: a module that cannot initialize at the start (its server down) is a target that
/// is down, not a configuration error: the other target seeds, `run` keeps running and seeds
/// the first one once its module initializes; `once` exits 4 naming the module and the cause.
#[test]
fn a_module_that_cannot_initialize_at_the_start_is_a_target_that_is_down() {
    let world = two_targets("30s");
    world.set_hsm_fault("init-fails");
    let out = world.run(&["once"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains(&format!("module {SPY}: C_Initialize: CKR_DEVICE_ERROR")),
        "{text}"
    );
    assert!(text.contains("seeded healthy: 48 bytes"), "{text}");

    let mut service = world.start_service();
    assert!(
        service.wait_for_log("seeded healthy:", Duration::from_secs(10)),
        "{}",
        service.log()
    );
    assert!(service.alive(), "{}", service.log());
    assert!(!service.log().contains("seeded faulty:"));
    world.set_hsm_fault("");
    assert!(
        service.wait_for_log("seeded faulty:", Duration::from_secs(15)),
        "{}",
        service.log()
    );
    let (status, _) = service.stop();
    assert!(status.success());
}

/// Issue 24: `qseed slots` lists every slot it can read and names the one it cannot (a card
/// the module cannot read), instead of hiding them all.
#[test]
fn slots_lists_the_readable_slots_and_names_the_unreadable_one() {
    let world = World::new();
    world.use_fault_module();
    world.add_token("readable");
    world.add_token("broken");
    let out = world.run(&["slots", "--module", SPY, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let broken = listing["modules"][0]["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["token"]["label"] == "broken")
        .map(|s| s["slot_id"].as_u64().unwrap())
        .expect("the broken token's slot");
    world.set_hsm_fault(&format!("token-info-fails:{broken}"));
    let out = world.run(&["slots", "--module", SPY]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{said}{}", stderr(&out));
    assert!(
        said.contains("readable"),
        "the readable token is listed: {said}"
    );
    assert!(said.contains("UNREADABLE"), "{said}");
    assert!(
        said.contains(&format!("slot {broken}: cannot be read:"))
            && said.contains("CKR_DEVICE_ERROR"),
        "{said}"
    );
    assert!(
        stderr(&out).contains(&format!("slot {broken} could not be read")),
        "{}",
        stderr(&out)
    );
}

/// Issue 24: a module whose C_Initialize blocks during a reload froze the service. Now the
/// running targets seed, /metrics answers at once, and SIGTERM ends the service, while the
/// reload waits for the new module.
#[test]
fn a_c_initialize_that_blocks_during_a_reload_freezes_nothing() {
    let world = World::new();
    world.use_fault_module();
    world.add_token("a");
    world.add_token("b");
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        world.target("a", "a", 48, "1s", false)
    ));
    let service = world.start_service();
    let base = service.endpoint();
    assert!(world.wait_for_seeds(1, Duration::from_secs(5)));
    // A second path to the spy is a module qseed has not loaded: the reload initializes it, and
    // the fault module (behind the spy) does not return from C_Initialize.
    let other_path = world.path("spy-again.so");
    std::os::unix::fs::symlink(SPY, &other_path).unwrap();
    world.write_config(&format!(
        "{}{}{}",
        world.source("entropy"),
        world.target("a", "a", 48, "1s", false),
        world
            .target_at("b", "b", 48, "1s", false, "500ms")
            .replace(SPY, &other_path.display().to_string())
    ));
    world.set_hsm_fault("init-hang");
    service.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    let before = world.spy().seeds().len();
    for _ in 0..4 {
        let asked = std::time::Instant::now();
        let (status, text) = http_get(&format!("{base}/metrics"));
        assert_eq!(status, 200);
        assert!(text.contains("qseed_injections_total"), "{text}");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "/metrics waited {:?} on the module",
            asked.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        world.spy().seeds().len() > before,
        "target a kept seeding: {}",
        service.log()
    );
    let log = service.log();
    let (status, took) = service.stop();
    world.set_hsm_fault("");
    assert!(status.success(), "{log}");
    assert!(
        took < Duration::from_secs(5),
        "the stop took {took:?}: {log}"
    );
}

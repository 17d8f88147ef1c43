//! `qseed doctor` against real SoftHSM (behind pkcs11-spy) and the simulator: a good
//! configuration passes, and each broken item fails with its fix.

mod common;

use common::*;
use qseed::simulator::Fault;

fn world() -> World {
    let world = World::one_target("entropy", 48, "10s", true);
    private(&world.path("qseed.toml"));
    world
}

fn doctor(world: &World) -> (Option<i32>, String) {
    let out = world.run(&["doctor"]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_good_configuration_passes_and_its_bytes_are_used() {
    let world = world();
    let (code, text) = doctor(&world);
    assert_eq!(code, Some(0), "{text}");
    for line in [
        "[ ok ] configuration",
        "[ ok ] permissions of",
        "[ ok ] entropy API https://localhost:",
        "[ ok ] module /usr/lib/x86_64-linux-gnu/pkcs11-spy.so loads",
        "[ ok ] target tok: token \"tok\" found",
        "[ ok ] target tok: login as user",
        "[ ok ] target tok: the token has an RNG and accepted a 48-byte seed",
        "All checks passed (1 warning(s) above).",
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    assert_eq!(world.sim.requests(), 1, "one minimal request");
    let seeds = world.spy().seeds();
    assert_eq!(seeds.len(), 1);
    assert_eq!(
        &seeds[0][..],
        &world.sim.served()[..48],
        "the bought bytes were used"
    );
}

#[test]
fn each_broken_item_fails_with_its_fix() {
    // A rejected API token.
    let w = world();
    w.set_fault(Fault::Status(401));
    let (code, text) = doctor(&w);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("[FAIL] entropy API") && text.contains("Create a new token"),
        "{text}"
    );
    assert!(
        text.contains("[FAIL] target tok: C_SeedRandom\n       not tried"),
        "{text}"
    );

    // A module that is not there.
    let w = world();
    let config = std::fs::read_to_string(w.path("qseed.toml")).unwrap();
    w.write_config(&config.replace(SPY, "/nonexistent/libhsm.so"));
    let (code, text) = doctor(&w);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("[FAIL] module /nonexistent/libhsm.so"),
        "{text}"
    );
    assert!(text.contains("the file does not exist"), "{text}");

    // A token label that is not there.
    let w = world();
    let config = std::fs::read_to_string(w.path("qseed.toml")).unwrap();
    w.write_config(&config.replace("token_label = \"tok\"", "token_label = \"other\""));
    let (code, text) = doctor(&w);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("[FAIL] target tok: token"), "{text}");
    assert!(text.contains("tokens present: \"tok\""), "{text}");

    // A wrong PIN: tried once.
    let w = world();
    std::fs::write(w.path("user.pin"), "000000").unwrap();
    let (code, text) = doctor(&w);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("[FAIL] target tok: session and login"),
        "{text}"
    );
    assert!(text.contains("CKR_PIN_INCORRECT"), "{text}");
    assert_eq!(w.spy().count("C_Login"), 1);

    // A token that refuses seed material.
    let w = world();
    w.use_fault_module();
    w.set_hsm_fault("seed-not-supported");
    let (code, text) = doctor(&w);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("[FAIL] target tok: C_SeedRandom"), "{text}");
    assert!(text.contains("CKR_RANDOM_SEED_NOT_SUPPORTED"), "{text}");

    // A configuration anyone may change.
    let w = world();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(w.path("qseed.toml"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, text) = doctor(&w);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("mode 0666) can be changed by every user on this machine")
            && text.contains("chmod o-w"),
        "{text}"
    );

    // An invalid configuration.
    let w = world();
    w.write_config("[source]\nurll = 1\n");
    let (code, text) = doctor(&w);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("[FAIL] configuration") && text.contains("unknown field `urll`"),
        "{text}"
    );
}

/// Issue 24: doctor checks the modules before it buys: when no target's module loads,
/// nothing is bought.
#[test]
fn nothing_is_bought_when_no_module_loads() {
    let world = World::one_target("entropy", 48, "10s", false);
    world.use_fault_module();
    world.set_hsm_fault("init-fails");
    let out = world.run(&["doctor"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("[warn] entropy source: not asked"), "{said}");
    assert!(said.contains("C_Initialize: CKR_DEVICE_ERROR"), "{said}");
    assert_eq!(world.sim.requests(), 0, "nothing bought: {said}");
}

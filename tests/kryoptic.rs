//! Kryoptic, the Rust PKCS#11 soft token (crate `kryoptic`, built by `scripts/kryoptic`): a
//! PKCS#11 3.x module with `C_GetInterface`, configured through `C_Initialize`'s reserved
//! parameter (`init_args`). It refuses a seed shorter than 32 bytes with CKR_ARGUMENTS_BAD:
//! such a size must stop its target once, with the fix, and not be tried every period.

mod common;

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

/// The module `scripts/kryoptic` builds (scripts/test runs it first).
fn kryoptic() -> PathBuf {
    let module = std::env::var_os("QSEED_KRYOPTIC").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kryoptic/libkryoptic_pkcs11.so"),
        PathBuf::from,
    );
    assert!(
        module.exists(),
        "{} is missing: run scripts/kryoptic (scripts/test does)",
        module.display()
    );
    module
}

/// A Kryoptic token "kry" in this world (SQLite storage), with user PIN [`PIN`]; returns the
/// `init_args` that point Kryoptic at it.
fn kryoptic_token(world: &World) -> String {
    let conf = world.path("kryoptic.conf");
    std::fs::write(
        &conf,
        format!(
            "[[slots]]\nslot = 7\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n",
            world.path("kryoptic.sql").display()
        ),
    )
    .unwrap();
    let init_args = format!("kryoptic_conf={}", conf.display());
    // Kryoptic is initialized once per process: the tests here make their tokens in turn.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let args = CString::new(init_args.clone()).unwrap();
    let pkcs11 = qseed::hsm::module::load(&kryoptic(), Some(&args)).unwrap();
    let slot = pkcs11.get_all_slots().unwrap()[0];
    let so = AuthPin::new("12345678".into());
    pkcs11.init_token(slot, &so, "kry").unwrap();
    let session = pkcs11.open_rw_session(slot).unwrap();
    session.login(UserType::So, Some(&so)).unwrap();
    session.init_pin(&AuthPin::new(PIN.into())).unwrap();
    session.logout().unwrap();
    drop(session);
    pkcs11.finalize().unwrap();
    init_args
}

/// The world's configuration: target "kry" of `size` bytes every second through Kryoptic,
/// behind pkcs11-spy, logging in.
fn config(world: &World, size: usize) {
    world.write_config(&format!(
        "{}{}\ninit_args = \"{}\"\n",
        world.source("entropy"),
        world.target("kry", "kry", size, "1s", true).trim_end(),
        kryoptic_token(world)
    ));
}

/// qseed -> pkcs11-spy -> the fault module (no fault set) -> Kryoptic. The spy passes a
/// PKCS#11 3.x module's own function list through `C_GetInterface` and then logs nothing; the
/// fault module offers only `C_GetFunctionList`, so the spy wraps it and logs every call, and
/// it forwards each call to Kryoptic unchanged.
fn qseed(world: &World) -> std::process::Command {
    world.use_fault_module();
    let mut cmd = world.qseed();
    cmd.env("QSEED_FAULT_REAL_MODULE", kryoptic());
    cmd
}

#[test]
fn kryoptic_is_seeded_with_served_bytes() {
    let world = World::new();
    config(&world, 48);
    let out = qseed(&world).arg("once").output().unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("seeded kry: 48 bytes"), "{log}");
    let seeds = world.spy().seeds();
    assert_eq!(seeds.len(), 1, "{log}");
    assert_seeds_are_distinct_served_bytes(&seeds, &world.sim.served());
}

#[test]
fn a_size_kryoptic_refuses_is_tried_once_and_named_with_the_fix() {
    let world = World::new();
    config(&world, 16);
    let mut child = qseed(&world)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(world.path("run.log")).unwrap())
        .spawn()
        .unwrap();
    // Three periods.
    std::thread::sleep(Duration::from_secs(3));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let log = std::fs::read_to_string(world.path("run.log")).unwrap();
    assert!(log.contains("CKR_ARGUMENTS_BAD"), "{log}");
    assert!(log.contains("kry: target stopped"), "{log}");
    assert!(
        log.contains("size"),
        "the message names the setting to change: {log}"
    );
    assert_eq!(
        world.spy().count("C_SeedRandom"),
        1,
        "tried once, not every period: {log}"
    );
}

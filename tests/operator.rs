//! What the operator is told, issue 22 items 11 to 13 and 16: `qseed check` has no side
//! effects; simulated entropy is never silent; once and doctor speak as one-shot commands;
//! `slots --module` takes the p11-kit names a configuration takes.

mod common;

use std::time::Duration;

use common::*;

/// Item 11: `qseed check` validates without touching the API or the HSM, and fails with the
/// reason on a module that is not a shared library.
#[test]
fn check_validates_without_an_api_request_or_a_pkcs11_call() {
    let world = World::one_target("entropy", 48, "10s", true);
    let out = world.run(&["check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("is valid: 1 source(s), 1 target(s)"),
        "{said}"
    );
    assert_eq!(world.sim.requests(), 0, "no API request");
    assert!(
        !world.path("spy.log").exists() || world.spy().count("C_Initialize") == 0,
        "no module was loaded"
    );

    let fake = world.path("fake-module.so");
    std::fs::write(&fake, "not a library").unwrap();
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    let module_line = config
        .lines()
        .find(|l| l.starts_with("module = "))
        .unwrap()
        .to_string();
    world.write_config(&config.replace(
        &module_line,
        &format!("module = {:?}", fake.display().to_string()),
    ));
    let out = world.run(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is not an ELF shared library"),
        "{}",
        stderr(&out)
    );

    world.write_config("[source]\nurl = 3\n");
    let out = world.run(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(world.sim.requests(), 0);
}

/// Item 12: with allow_simulated, doctor, the start, the audit records and a metric all say
/// that the entropy is simulated.
#[test]
fn simulated_entropy_is_said_everywhere() {
    let world = World::one_target("entropy", 48, "1s", false);
    let out = world.run(&["doctor"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("[warn] entropy source: the answers are SIMULATED"),
        "{said}"
    );
    assert!(
        said.contains("All checks passed (1 warning(s) above)"),
        "{said}"
    );

    let service = world.start_service();
    let endpoint = service.endpoint();
    // The spy logs the seed inside C_SeedRandom, before qseed logs its audit line.
    assert!(service.wait_for_log("seeded tok: 48 bytes", Duration::from_secs(10)));
    let (_, metrics) = http_get(&format!("{endpoint}/metrics"));
    assert!(metrics.contains("qseed_entropy_simulated 1"), "{metrics}");
    let log = service.log();
    assert!(
        log.contains("allow_simulated = true: answers of qseed's API simulator"),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("seeded tok: 48 bytes") && l.contains("SIMULATED entropy")),
        "{log}"
    );
    let (status, _) = service.stop();
    assert!(status.success());
}

/// Item 13: `once` does not promise to try again, and doctor's checklist is not interleaved
/// with log lines.
#[test]
fn once_and_doctor_speak_as_one_shot_commands() {
    let world = World::one_target("entropy", 48, "5s", false);
    world.set_fault(qseed::simulator::Fault::Status(500));
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(!text.contains("trying again every"), "{text}");
    assert!(!text.contains("next try in"), "{text}");
    assert!(!text.contains("Targets are served from"), "{text}");

    world.set_fault(qseed::simulator::Fault::None);
    // An HSM failure in `once`: exit 4, told as what happened, not as a promise.
    world.use_fault_module();
    world.set_hsm_fault("device-removed");
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains("round failed: "), "{text}");
    assert!(!text.contains("trying again every"), "{text}");
    world.set_hsm_fault("");

    let out = world.run(&["doctor"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let logged = stderr(&out);
    assert!(
        !logged.contains(" INFO ") && !logged.contains(" WARN ") && !logged.contains("ERROR"),
        "doctor's stderr holds log lines: {logged}"
    );
}

/// Item 16: `slots --module softhsm2` takes the p11-kit name a target's `module` takes.
#[test]
fn slots_takes_a_p11_kit_module_name() {
    if !std::path::Path::new("/usr/share/p11-kit/modules/softhsm2.module").exists() {
        panic!("softhsm2's p11-kit registration is missing (apt-get install softhsm2)");
    }
    let world = World::one_target("entropy", 48, "5s", false);
    let out = world.run(&["slots", "--module", "softhsm2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("tok"), "{said}");
}

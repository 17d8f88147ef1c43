//! Issue 23, item 4: the tamper-evident audit ledger of a real `qseed run` and `once`.

mod common;

use std::time::Duration;

use common::*;

fn ledger_path(world: &World) -> std::path::PathBuf {
    world.path("state").join("audit").join("ledger.jsonl")
}

#[test]
fn every_injection_is_chained_in_the_ledger_and_an_edit_is_found() {
    let world = World::one_target("entropy", 48, "1s", false);
    let service = world.start_service();
    assert!(
        world.wait_for_seeds(3, Duration::from_secs(15)),
        "{}",
        service.log()
    );
    let (status, _) = service.stop();
    assert!(status.success());
    // A second process appends to the same chain.
    let out = world.run(&["once"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let seeds = world.spy().seeds();
    let text = std::fs::read_to_string(ledger_path(&world)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), seeds.len(), "one record per seed: {text}");
    for line in &lines {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(record["event"], "injection");
        assert_eq!(record["target"], "tok");
        assert_eq!(record["token_label"], "tok");
        assert_eq!(record["bytes"], 48);
        assert!(record["request_ids"].as_str().unwrap().starts_with('r'));
        assert_eq!(record["prev"].as_str().unwrap().len(), 64);
    }
    // No seed byte is in the ledger, in hex or otherwise.
    for seed in &seeds {
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!text.contains(&hex[..32]));
    }

    let out = world.run(&["audit", "verify"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains(&format!(
            "{} record(s) in 1 file(s): the chain is intact",
            lines.len()
        )),
        "{said}"
    );

    let out = world.run(&["audit", "export", "--since", "2000-01-01T00:00:00Z"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
    let out = world.run(&["audit", "export", "--until", "2000-01-01T00:00:00Z"]);
    assert!(out.stdout.is_empty());

    // One edited line: the chain breaks at the line after it.
    let edited = text.replacen("\"bytes\":48", "\"bytes\":4800", 1);
    std::fs::write(ledger_path(&world), edited).unwrap();
    let out = world.run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the chain breaks at record 2"),
        "{}",
        stderr(&out)
    );
}

/// EC P-256 keys `audit` and `other` made with openssl in the world's folder
/// (`<name>-key.pem`, `<name>-pub.pem`); `audit`'s private key imported into token `tok` as
/// `qseed-audit`.
fn import_audit_key(world: &World) {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(world.path(""))
            .output()
            .expect("openssl runs (apt-get install openssl)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for name in ["audit", "other"] {
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &format!("{name}-key.pem"),
        ]);
        openssl(&[
            "pkey",
            "-in",
            &format!("{name}-key.pem"),
            "-pubout",
            "-out",
            &format!("{name}-pub.pem"),
        ]);
    }
    let import = std::process::Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", world.path("softhsm2.conf"))
        .args(["--import"])
        .arg(world.path("audit-key.pem"))
        .args([
            "--token",
            "tok",
            "--label",
            "qseed-audit",
            "--id",
            "a1",
            "--pin",
            PIN,
        ])
        .output()
        .unwrap();
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
}

/// A world with token `tok` holding the audit key and one target on it that signs the
/// ledger's head every `sign_every`.
fn signing_world(sign_every: &str) -> World {
    let world = World::new();
    world.add_token("tok");
    import_audit_key(&world);
    world.write_config(&format!(
        "{}{}\n[audit]\nsign_with = \"tok\"\nsign_every = \"{sign_every}\"\n",
        world.source("entropy"),
        world.target("tok", "tok", 48, "1s", true)
    ));
    world
}

/// `qseed audit verify --public-key <key>-pub.pem`.
fn verify_with(world: &World, key: &str) -> std::process::Output {
    let public = world.path(&format!("{key}-pub.pem"));
    world.run(&["audit", "verify", "--public-key", public.to_str().unwrap()])
}

/// `[audit] sign_with`: the chain head is signed with an EC P-256 key in the token, and the
/// signatures verify offline against its public key (and not against another key).
#[test]
fn the_signed_head_verifies_against_the_hsm_key() {
    let world = signing_world("1s");
    let service = world.start_service();
    assert!(
        service.wait_for_log("signed the audit ledger's head", Duration::from_secs(10)),
        "{}",
        service.log()
    );
    assert!(world.wait_for_seeds(3, Duration::from_secs(10)));
    let (status, _) = service.stop();
    assert!(status.success());

    let out = verify_with(&world, "audit");
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("signature(s) verify with the public key"),
        "{said}"
    );
    let out = verify_with(&world, "other");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("does not verify with this public key"),
        "{}",
        stderr(&out)
    );
}

/// The signing target seeds on standing orders like any steady target: between signatures its
/// rounds run on its module's timer thread (one wake-up each); the round after which the head
/// is due to be signed comes back to the target's loop, which seeds and signs.
#[test]
fn a_signing_targets_rounds_between_signatures_run_on_the_timer_thread() {
    let world = signing_world("3s");
    world.use_fault_module();
    let service = world.start_service();
    let signed = wait_until(Duration::from_secs(30), || {
        service
            .log()
            .matches("signed the audit ledger's head")
            .count()
            >= 3
    });
    assert!(signed, "{}", service.log());
    let (status, _) = service.stop();
    assert!(status.success());

    let threads = world.seeding_threads();
    let on_timer = threads.iter().filter(|t| *t == "qseed-p11-timer").count();
    let on_loop = threads
        .iter()
        .filter(|t| t.starts_with("qseed-pkcs11"))
        .count();
    assert_eq!(on_timer + on_loop, threads.len(), "{threads:?}");
    // Three signatures: the first round and two more came back to the loop; at one round a
    // second and a signature every three, most rounds between them ran on the timer thread.
    assert!(on_loop >= 3, "{threads:?}");
    assert!(on_timer >= 3, "{threads:?}");
    assert!(on_timer >= on_loop, "{threads:?}");

    let text = std::fs::read_to_string(ledger_path(&world)).unwrap();
    let signatures = text.matches("\"event\":\"signature\"").count();
    let injections = text.matches("\"event\":\"injection\"").count();
    assert!(signatures >= 3, "{text}");
    assert_eq!(injections, threads.len(), "{text}");
    let out = verify_with(&world, "audit");
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A steady target's rounds run on its module's timer thread, whose audit records and log lines
/// wait for a flush made before any sleep that would keep them past a second
/// (`ledger::OWN_RECORDS_DELAY`). With a 3 s period each round's ledger record and log line
/// are out before the next round, not held until it or until the stop.
#[test]
fn a_steady_rounds_record_and_line_are_out_before_the_next_round() {
    let world = World::one_target("entropy", 48, "3s", false);
    let service = world.start_service();
    let records = || {
        std::fs::read_to_string(ledger_path(&world))
            .unwrap_or_default()
            .lines()
            .count()
    };
    // The first round is the target loop's; from the second on, the timer thread's.
    for n in 2..=3 {
        let mut seeds_when_written = 0;
        let written = wait_until(Duration::from_secs(20), || {
            let out = records() >= n && service.log().matches("seeded tok: 48 bytes").count() >= n;
            // Counted after the ledger and the log were read: a record held until the next
            // round would be seen only with that round's seed in the spy log.
            seeds_when_written = world.spy().seeds().len();
            out
        });
        assert!(written, "record {n} never written: {}", service.log());
        assert_eq!(
            seeds_when_written,
            n,
            "record and line {n} were held until a later round: {}",
            service.log()
        );
    }
    let (status, _) = service.stop();
    assert!(status.success());
}

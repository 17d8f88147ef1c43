//! The PIN guard against real SoftHSM behind pkcs11-spy: a PIN a token refused is presented
//! to it once, ever — across reloads, restarts, `once` and `doctor` — while other targets go
//! on; a corrected PIN file, or `doctor --retry-pin`, allows one more login.

mod common;

use std::time::Duration;

use common::*;

const WRONG: &str = "999999";

/// `good` logs in with the right PIN; `bad` with `bad.pin`, which holds [`WRONG`].
fn world() -> World {
    let world = World::new();
    world.good_and_wrong_pin(WRONG, "1s", true, "500ms");
    private(&world.path("qseed.toml"));
    world
}

fn seeded(log: &str, target: &str) -> usize {
    log.matches(&format!("seeded {target}:")).count()
}

#[test]
fn a_refused_pin_is_presented_once_across_reloads_restarts_once_and_doctor() {
    let world = world();

    // `run`: the wrong PIN fails once; /readyz says so; the good target is seeded.
    let service = world.start_service();
    let base = service.endpoint();
    assert!(
        service.wait_for_log("bad: target stopped", Duration::from_secs(5)),
        "{}",
        service.log()
    );
    assert!(wait_until(Duration::from_secs(3), || seeded(
        &service.log(),
        "good"
    ) >= 2));
    let (status, body) = http_get(&format!("{base}/readyz"));
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("bad: stopped (pin): C_Login: CKR_PIN_INCORRECT"),
        "{body}"
    );

    // Two SIGHUPs: two reloads (rate-limited), neither logs in again.
    service.signal("HUP");
    assert!(service.wait_for_log("configuration reloaded", Duration::from_secs(5)));
    service.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(6), || service
            .log()
            .matches("configuration reloaded")
            .count()
            == 2),
        "{}",
        service.log()
    );
    let before = seeded(&service.log(), "good");
    assert!(wait_until(Duration::from_secs(4), || seeded(
        &service.log(),
        "good"
    ) >= before + 2));
    let log = service.log();
    assert!(
        log.contains("1 target(s) unchanged (not re-seeded), 0 changed and restarted, 1 stopped before and tried again"),
        "the good target keeps running, the stopped one is tried under the guard: {log}"
    );
    let (status, _) = service.stop();
    assert!(status.success(), "{log}");
    assert_eq!(
        world.spy().logins_with(PIN),
        1,
        "reloads did not log the good target in again"
    );

    // `run` again: the guard's record holds; the good target is seeded.
    let service = world.start_service();
    assert!(
        service.wait_for_log(
            "bad: target stopped: not logging in",
            Duration::from_secs(5)
        ),
        "{}",
        service.log()
    );
    assert!(wait_until(Duration::from_secs(4), || seeded(
        &service.log(),
        "good"
    ) >= 2));
    let log = service.log();
    assert!(log.contains("--retry-pin bad"), "{log}");
    assert!(!log.contains(WRONG), "the PIN is never printed: {log}");
    service.stop();

    // `once`: exits 4 at once for the stopped target, seeds the good one.
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("bad: not logging in"),
        "{}",
        stderr(&out)
    );

    // `doctor`: fails the login check without trying it, and says how to retry.
    let out = world.run(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("[FAIL] target bad: session and login") && text.contains("--retry-pin bad"),
        "{text}"
    );
    assert!(text.contains("[ ok ] target good: login as user"), "{text}");

    assert_eq!(
        world.spy().logins_with(WRONG),
        1,
        "one C_Login with the wrong PIN in the whole spy log"
    );
    assert!(
        world.spy().seeds().len() >= 8,
        "the good target was seeded throughout"
    );

    // The operator corrects the PIN file: the next start presents it once, and seeds.
    std::fs::write(world.path("bad.pin"), PIN).unwrap();
    let service = world.start_service();
    assert!(
        wait_until(Duration::from_secs(5), || seeded(&service.log(), "bad")
            >= 2),
        "{}",
        service.log()
    );
    let log = service.log();
    assert!(
        log.contains("bad: the PIN of pin_file \"bad.pin\" changed since the login that failed"),
        "{log}"
    );
    service.stop();
    assert_eq!(world.spy().logins_with(WRONG), 1);
}

#[test]
fn doctor_retry_pin_presents_the_pin_once_more() {
    let world = world();
    // A cron-style `once` records the refusal.
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("CKR_PIN_INCORRECT"),
        "{}",
        stderr(&out)
    );
    let records: Vec<_> = std::fs::read_dir(world.path("state/pin-guard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "record"))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = std::fs::read_to_string(&records[0]).unwrap();
    assert!(!record.contains(WRONG), "no PIN in the record: {record}");
    assert!(record.contains("outcome = \"failed\""), "{record}");

    // A second `once` does not present it.
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(world.spy().logins_with(WRONG), 1);

    // An unknown target name is a command-line mistake.
    let out = world.run(&["doctor", "--retry-pin", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("targets: good, bad"),
        "{}",
        stderr(&out)
    );

    // --retry-pin lifts the record and tries once: still wrong, so recorded again.
    let out = world.run(&["doctor", "--retry-pin", "bad"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[ ok ] target bad: PIN guard lifted"),
        "{text}"
    );
    assert!(text.contains("CKR_PIN_INCORRECT"), "{text}");
    assert_eq!(world.spy().logins_with(WRONG), 2);
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(world.spy().logins_with(WRONG), 2, "recorded again");

    // Corrected, the PIN file is presented by the next `once`, which seeds both tokens.
    std::fs::write(world.path("bad.pin"), PIN).unwrap();
    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(world.spy().logins_with(WRONG), 2);
    assert!(
        std::fs::read_dir(world.path("state/pin-guard"))
            .unwrap()
            .all(|e| e.unwrap().path().extension().is_none_or(|x| x != "record")),
        "an accepted PIN leaves no record"
    );
}

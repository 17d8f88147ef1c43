//! Issue 23, item 2: `qseed wait` returns 0 only once every target was seeded since the
//! service started, and times out with the reason otherwise.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn wait_returns_after_the_first_seed_and_times_out_with_the_reason() {
    let world = World::new();
    world.good_and_wrong_pin("999999", "10s", false, "0s");
    // No service yet: it says so at the timeout.
    let out = world.run(&["wait", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("qseed is not running"),
        "{}",
        stderr(&out)
    );

    // "good" seeds after its 3 s offset; wait must not return before.
    let config = std::fs::read_to_string(world.path("qseed.toml"))
        .unwrap()
        .replacen("offset = \"0s\"", "offset = \"3s\"", 1);
    world.write_config(&config);
    let service = world.start_service();
    let started = Instant::now();
    let out = world.run(&["wait", "--target", "good", "--timeout", "20s"]);
    assert!(out.status.success(), "{} {}", stderr(&out), service.log());
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "returned before the first seed could be made ({:?})",
        started.elapsed()
    );
    assert!(
        !world.spy().seeds().is_empty(),
        "returned with no seed made"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("seeded since the service started: good"));

    // Every target: "bad" stopped on its PIN, so the wait fails naming it.
    let out = world.run(&["wait", "--timeout", "2s"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        stderr(&out).contains("bad: stopped (pin"),
        "{}",
        stderr(&out)
    );
    let (status, _) = service.stop();
    assert!(status.success());
}

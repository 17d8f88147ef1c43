//! Signals to the real `qseed run`: SIGTERM stops it cleanly and promptly; SIGHUP reloads the
//! configuration, or keeps the running one when the new file is broken.

mod common;

use std::time::Duration;

use common::*;

fn world(size: usize, period: &str) -> World {
    World::one_target("entropy", size, period, true)
}

#[test]
fn sigterm_exits_0_promptly_with_c_finalize() {
    let world = world(48, "1s");
    let service = world.start_service();
    assert!(world.wait_for_seeds(2, Duration::from_secs(5)));
    let (status, took) = service.stop();
    assert!(status.success());
    // The bound; the exit itself takes a few milliseconds.
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    let spy = world.spy();
    assert_eq!(spy.count("C_CloseSession"), 1);
    assert_eq!(spy.count("C_Finalize"), 1);
    let last = spy.calls.last().map(|c| c.name.as_str());
    assert_eq!(last, Some("C_Finalize"), "nothing after C_Finalize");
}

#[test]
fn sighup_applies_a_changed_size_and_period() {
    let world = world(48, "1s");
    let mut service = world.start_service();
    assert!(world.wait_for_seeds(2, Duration::from_secs(5)));
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        world.target("tok", "tok", 100, "2s", true)
    ));
    service.signal("HUP");
    assert!(service.wait_for_log("configuration reloaded", Duration::from_secs(5)));
    assert!(wait_until(Duration::from_secs(6), || {
        world
            .spy()
            .seeds()
            .iter()
            .filter(|s| s.len() == 100)
            .count()
            >= 2
    }));
    assert!(service.alive());
    let log_file = world.path("service.log");
    let (status, _) = service.stop();
    let log = std::fs::read_to_string(log_file).unwrap();
    assert!(status.success(), "{log}");
    let seeds = world.spy().seeds();
    // The exit summary counts the bytes injected under the first configuration too.
    let injected: usize = seeds.iter().map(Vec::len).sum();
    assert!(
        log.contains(&format!(
            "{injected} injected in rounds, 0 flushed into the targets at the stop, 0 handed \
             out but not injected"
        )),
        "{log}"
    );
    // After the reload only 100-byte seeds, and the bytes bought before it served both
    // configurations: one block for the first round, then (the token accepted that seed) the
    // horizon, and nothing more.
    let first_new = seeds.iter().position(|s| s.len() == 100).unwrap();
    assert!(seeds[first_new..].iter().all(|s| s.len() == 100));
    assert_seeds_tile_served(&seeds, &world.sim.served());
    assert_eq!(
        world.sim.requests(),
        2,
        "bytes bought before the reload were used after it"
    );
    // The reload logged in once more: the session was reopened.
    assert_eq!(world.spy().count("C_Login"), 2);
}

#[test]
fn sighup_with_a_broken_file_keeps_the_running_configuration() {
    let world = world(48, "1s");
    let mut service = world.start_service();
    assert!(wait_until(Duration::from_secs(5), || !world
        .spy()
        .seeds()
        .is_empty()));
    let good = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&good.replace("size = 48", "size = 0"));
    service.signal("HUP");
    assert!(service.wait_for_log("the new configuration is refused", Duration::from_secs(5)));
    assert!(service.log().contains("size = 0 is out of range"));
    let before = world.spy().seeds().len();
    assert!(world.wait_for_seeds(before + 2, Duration::from_secs(4)));
    assert!(service.alive());
    let (status, _) = service.stop();
    assert!(status.success());
    assert!(world.spy().seeds().iter().all(|s| s.len() == 48));
    assert_eq!(
        world.spy().count("C_Login"),
        1,
        "the running target was never restarted"
    );
}

#[test]
fn a_closed_stderr_neither_stops_seeding_nor_the_shutdown() {
    // As in `qseed run 2>&1 | head -1`: the reader of the log goes away.
    let world = world(48, "1s");
    let mut child = world
        .qseed()
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    assert!(world.wait_for_seeds(2, Duration::from_secs(5)));
    assert!(child.try_wait().unwrap().is_none(), "still running");
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(world.spy().count("C_Finalize"), 1);
}

#[test]
fn a_burst_of_sighups_is_coalesced_and_does_not_reseed_unchanged_targets() {
    let world = world(48, "1s");
    let mut service = world.start_service();
    assert!(world.wait_for_seeds(1, Duration::from_secs(5)));
    let start = std::time::Instant::now();
    let seeds_before = world.spy().seeds().len();
    for _ in 0..200 {
        service.signal("HUP");
    }
    // The burst ends within one reload interval: at most two reloads come of it.
    std::thread::sleep(Duration::from_secs(4));
    let log = service.log();
    let reloads = log.matches("configuration reloaded").count();
    assert!((1..=2).contains(&reloads), "{reloads} reloads: {log}");
    assert!(
        log.contains("1 target(s) unchanged (not re-seeded)"),
        "{log}"
    );
    assert!(service.alive());
    let (status, _) = service.stop();
    assert!(status.success(), "{log}");
    // Seeding kept its period: no extra rounds for the reloads, no new login.
    let elapsed = start.elapsed().as_secs_f64();
    let seeded = world.spy().seeds().len() - seeds_before;
    assert!(
        (seeded as f64) <= elapsed.ceil() + 1.0,
        "{seeded} seeds in {elapsed:.1}s at a 1s period"
    );
    assert_eq!(world.spy().count("C_Login"), 1, "the session was kept");
}

/// Review: a reload that blocked reading a FIFO made SIGTERM ineffective (alive 30 s after two
/// SIGTERMs). A FIFO is now refused without being opened for a blocking read, and reloads run
/// beside the signal handling.
#[test]
fn a_reload_that_meets_a_fifo_neither_hangs_nor_delays_sigterm() {
    let world = world(48, "1s");
    let mut service = world.start_service();
    assert!(world.wait_for_seeds(1, Duration::from_secs(5)));
    let config = world.path("qseed.toml");
    std::fs::remove_file(&config).unwrap();
    assert!(std::process::Command::new("mkfifo")
        .arg(&config)
        .status()
        .unwrap()
        .success());
    service.signal("HUP");
    assert!(
        service.wait_for_log("the new configuration is refused", Duration::from_secs(5)),
        "{}",
        service.log()
    );
    assert!(service
        .log()
        .contains("FIFO (named pipe), not a regular file"));
    let before = world.spy().seeds().len();
    assert!(world.wait_for_seeds(before + 1, Duration::from_secs(4)));
    assert!(service.alive());
    let (status, took) = service.stop();
    assert!(status.success());
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
}

//! The fault matrix: each misbehaviour of the entropy API against the real `qseed run` with
//! SoftHSM behind pkcs11-spy. The service stays up, nothing from a bad answer is injected, the
//! log names the problem, and injections resume once the fault clears.

mod common;

use std::time::{Duration, Instant};

use common::*;
use qseed::simulator::Fault;

/// The service is started with the fault on; every round is skipped until it clears.
fn fault_case(fault: Fault, expect: &str) -> (World, Service) {
    let world = World::one_target("quantum-entropy", 48, "1s", false);
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace("timeout = \"5s\"", "timeout = \"2s\""));
    world.set_fault(fault);
    let mut service = world.start_service();
    assert!(
        service.wait_for_log(expect, Duration::from_secs(10)),
        "{fault:?}: the log names the problem ({expect}):\n{}",
        service.log()
    );
    // Several rounds go by while the fault lasts.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(service.alive(), "{fault:?}: still running");
    assert_eq!(world.spy().seeds().len(), 0, "{fault:?}: nothing injected");
    (world, service)
}

/// Clears the fault and checks that seeding resumes, then stops the service cleanly.
fn recover(world: &World, service: Service, fault: Fault) {
    world.set_fault(Fault::None);
    let cleared = Instant::now();
    assert!(
        wait_until(Duration::from_secs(8), || !world.spy().seeds().is_empty()),
        "{fault:?}: seeding resumed:\n{}",
        service.log()
    );
    let resumed = cleared.elapsed();
    let log = service.log();
    let (status, _) = service.stop();
    assert!(status.success(), "{fault:?}: {log}");
    assert_seeds_are_distinct_served_bytes(&world.spy().seeds(), &world.sim.served());
    // One warning for the whole outage, and one line when it ends.
    assert_eq!(
        log.matches("entropy source failing").count(),
        1,
        "{fault:?}: {log}"
    );
    assert!(
        log.contains("entropy source back after"),
        "{fault:?}: {log}"
    );
    eprintln!("{fault:?}: seeding resumed {resumed:?} after the fault cleared");
}

macro_rules! fault_tests {
    ($($name:ident: $fault:expr => $expect:expr;)*) => {$(
        #[test]
        fn $name() {
            let (world, service) = fault_case($fault, $expect);
            recover(&world, service, $fault);
        }
    )*};
}

fault_tests! {
    http_500: Fault::Status(500) => "answered HTTP 500";
    http_503_with_retry_after: Fault::Unavailable { retry_after: 1 } => "has not enough entropy right now (HTTP 503); it asks to retry after 1s";
    http_429_with_retry_after: Fault::RateLimited { retry_after: 1 } => "rate limiting this token (HTTP 429); it asks to retry after 1s";
    slow_answer: Fault::Slow(Duration::from_secs(3)) => "did not answer within 2s";
    hung_server: Fault::Hang => "did not answer within 2s";
    truncated_body: Fault::TruncatedBody => "broke off before its end";
    bad_json: Fault::BadJson => "not valid JSON";
    missing_field: Fault::MissingField => "has no `random` field";
    short_block: Fault::ShortBlock => "decoded to 1000 bytes where 1024 were asked for";
    bad_base64: Fault::BadBase64 => "is not valid base64";
    oversized_body: Fault::Oversized => "is larger than";
    wrong_content_type: Fault::WrongContentType => "is not JSON (Content-Type \"text/html\")";
}

#[test]
fn a_redirect_is_not_followed_and_the_token_goes_nowhere() {
    let other = World::with_options(qseed::simulator::Options {
        record: true,
        ..Default::default()
    });
    let location: &'static str =
        Box::leak(format!("{}/api/v1/quantum-entropy?size=1", other.sim.url()).into_boxed_str());
    let (world, service) = fault_case(Fault::Redirect(location), "does not follow redirects");
    assert_eq!(other.sim.requests(), 0, "nothing reached the other origin");
    recover(&world, service, Fault::Redirect(location));
}

#[test]
fn a_rejected_token_retries_slowly_and_a_reload_retries_at_once() {
    let (world, service) = fault_case(Fault::Status(401), "rejected the access token");
    let requests = world.sim.requests();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        world.sim.requests(),
        requests,
        "no hammering with a rejected token"
    );
    world.set_fault(Fault::None);
    // The operator fixes the token and reloads.
    service.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(5), || !world.spy().seeds().is_empty()),
        "{}",
        service.log()
    );
    let (status, _) = service.stop();
    assert!(status.success());
}

#[test]
fn unhealthy_blocks_in_a_large_answer_are_dropped_and_the_rest_used() {
    for (fault, expect) in [
        (Fault::AllZeroBlock, "repetition count test"),
        (Fault::ReplayedBlock, "identical to one received earlier"),
    ] {
        let world = World::one_target("entropy", 48, "1s", false);
        let service = world.start_service();
        // The first answer is one block (nothing is bought for a token's horizon before it
        // accepted a seed); the large one follows the first seed.
        assert!(world.wait_for_seeds(1, Duration::from_secs(5)));
        world.set_fault(fault);
        assert!(wait_until(Duration::from_secs(5), || world.sim.requests() >= 2));
        assert!(world.wait_for_seeds(3, Duration::from_secs(5)));
        let log = service.log();
        let (status, _) = service.stop();
        assert!(status.success());
        assert!(
            log.contains("health tests refused 1 of 29 block(s)"),
            "{log}"
        );
        assert!(log.contains(expect), "{log}");
        // `served` holds only the good blocks: every seed comes from them.
        assert_seeds_are_distinct_served_bytes(&world.spy().seeds(), &world.sim.served());
    }
}

#[test]
fn buffered_bytes_keep_targets_served_while_the_source_is_down() {
    let world = World::one_target("quantum-entropy", 48, "1s", false);
    let mut service = world.start_service();
    assert!(world.wait_for_seeds(1, Duration::from_secs(5)));
    // One block for the first round, then (the token accepted it) the horizon.
    assert!(wait_until(Duration::from_secs(5), || world.sim.requests() == 2));
    let bought = world.sim.served().len();
    world.set_fault(Fault::Status(500));
    let before = world.spy().seeds().len();
    assert!(world.wait_for_seeds(before + 3, Duration::from_secs(6)));
    assert!(service.alive());
    assert_eq!(
        world.sim.served().len(),
        bought,
        "the bytes bought before the outage were enough"
    );
    let (status, _) = service.stop();
    assert!(status.success());
}

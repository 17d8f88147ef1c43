//! Issue 23, item 5: cloned generator detection. Two SoftHSM tokens behind the test fault
//! module, made to return the same output (`cloned-rng`), raise the alert in the log, the
//! metric and /readyz; the same tokens with their own generators raise nothing.

mod common;

use std::time::Duration;

use common::*;

fn two_checked_targets(world: &World) {
    world.add_token("a");
    world.add_token("b");
    world.write_config(&format!(
        "{}{}{}",
        world.source("entropy"),
        world.target_at("a", "a", 48, "1s", false, "0s") + "check_output = true\n",
        world.target_at("b", "b", 48, "1s", false, "500ms") + "check_output = true\n",
    ));
}

#[test]
fn honest_generators_raise_no_alert() {
    let world = World::new();
    world.use_fault_module();
    two_checked_targets(&world);
    let service = world.start_service();
    let endpoint = service.endpoint();
    assert!(
        world.wait_for_seeds(6, Duration::from_secs(15)),
        "{}",
        service.log()
    );
    let (code, body) = http_get(&format!("{endpoint}/readyz"));
    assert_eq!(code, 200, "{body}");
    let (_, metrics) = http_get(&format!("{endpoint}/metrics"));
    assert!(
        !metrics.contains("qseed_generator_output_alert"),
        "{metrics}"
    );
    assert!(
        !service.log().contains("cloned generator"),
        "{}",
        service.log()
    );
    // The check read the tokens' output: C_GenerateRandom after each seed.
    assert!(world.spy().count("C_GenerateRandom") >= 6);
    let (status, _) = service.stop();
    assert!(status.success());
}

#[test]
fn two_tokens_with_the_same_output_raise_the_alert() {
    let world = World::new();
    world.use_fault_module();
    world.set_hsm_fault("cloned-rng");
    two_checked_targets(&world);
    let service = world.start_service();
    let endpoint = service.endpoint();
    assert!(
        service.wait_for_log("cloned generator", Duration::from_secs(15)),
        "{}",
        service.log()
    );
    let log = service.log();
    assert!(
        log.contains("b: the token's generator returned the same 16 bytes as a's"),
        "{log}"
    );
    let (code, body) = http_get(&format!("{endpoint}/readyz"));
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("b: cloned generator"), "{body}");
    let (_, metrics) = http_get(&format!("{endpoint}/metrics"));
    assert!(
        metrics.contains("qseed_generator_output_alert{target=\"b\"} 1"),
        "{metrics}"
    );
    // Seeding goes on: the alert is for the operator, the seeds still strengthen the tokens.
    assert!(world.wait_for_seeds(4, Duration::from_secs(10)));
    let (status, _) = service.stop();
    assert!(status.success());
}

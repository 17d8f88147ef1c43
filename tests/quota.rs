//! Issue 23, item 3: an API token that is a JWT is read for its expiry (doctor, start, a
//! metric), and the bytes bought this month are counted against `monthly_budget`.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;
use qseed::simulator::Options;

fn jwt_expiring_in(left: Duration) -> (String, u64) {
    let exp = (SystemTime::now() + left)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let token = format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256","typ":"JWT"}"#),
        b64(&format!(r#"{{"sub":"qseed-test","exp":{exp}}}"#)),
        b64("not-a-real-signature")
    );
    (token, exp)
}

#[test]
fn a_jwt_expiring_in_3_days_is_warned_about_and_its_expiry_is_a_metric() {
    let (token, exp) = jwt_expiring_in(Duration::from_secs(3 * 86_400 + 600));
    let world = World::with_options(Options {
        token: Some(token.clone()),
        record: true,
        ..Options::default()
    });
    std::fs::write(world.path("api.token"), format!("{token}\n")).unwrap();
    world.add_token("tok");
    world.write_config(
        &format!(
            "{}{}",
            world.source("entropy"),
            world.target("tok", "tok", 48, "1s", false)
        )
        .replace(
            "allow_simulated = true",
            "allow_simulated = true\nmonthly_budget = \"4KiB\"",
        ),
    );
    let out = world.run(&["doctor"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("[warn] source \"localhost\": API token expires on")
            && said.contains("(in 3 day(s))"),
        "{said}"
    );
    assert!(
        !said.contains("qseed-test"),
        "nothing of the token's payload is shown: {said}"
    );

    let service = world.start_service();
    let endpoint = service.endpoint();
    assert!(world.wait_for_seeds(1, Duration::from_secs(10)));
    // The purchase that follows the first accepted seed is in flight for a moment: read the
    // metrics once what the simulator served is counted.
    let month = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("qseed_source_month_bytes{source=\"localhost\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    assert!(wait_until(Duration::from_secs(5), || {
        let (_, metrics) = http_get(&format!("{endpoint}/metrics"));
        month(&metrics) == Some(world.sim.blocks_served() * 1024)
    }));
    let (_, metrics) = http_get(&format!("{endpoint}/metrics"));
    assert!(
        metrics.contains(&format!(
            "qseed_source_token_expiry_timestamp_seconds{{source=\"localhost\"}} {exp}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("qseed_source_monthly_budget_bytes{source=\"localhost\"} 4096"),
        "{metrics}"
    );
    let month_line = metrics
        .lines()
        .find(|l| l.starts_with("qseed_source_month_bytes{source=\"localhost\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let bought: u64 = month_line.rsplit(' ').next().unwrap().parse().unwrap();
    // The doctor's request and the service's, counted together through the state folder.
    assert_eq!(bought, world.sim.blocks_served() * 1024, "{month_line}");
    let log = service.log();
    assert!(log.contains("the API token expires on"), "{log}");
    assert!(!log.contains(&token), "the token is never logged");
    let (status, _) = service.stop();
    assert!(status.success());
}

//! The telemetry endpoint and JSON logs of a real `qseed run`, checked against the spy log and
//! the simulator.

mod common;

use std::time::Duration;

use common::*;
use qseed::simulator::Fault;

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(line_start)
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}")) as u64
}

#[test]
fn metrics_match_the_spy_log_and_the_simulator() {
    let world = World::one_target("entropy", 48, "1s", false);
    let service = world.start_service();
    let base = service.endpoint();
    assert!(world.wait_for_seeds(3, Duration::from_secs(6)));
    // Between two rounds: the counters cannot move while they are read.
    std::thread::sleep(Duration::from_millis(300));
    let (status, text) = http_get(&format!("{base}/metrics"));
    let seeds = world.spy().seeds().len() as u64;
    assert_eq!(status, 200);
    assert_eq!(
        metric(
            &text,
            r#"qseed_injections_total{target="tok",result="ok"} "#
        ),
        seeds
    );
    assert_eq!(
        metric(&text, r#"qseed_injected_bytes_total{target="tok"} "#),
        seeds * 48
    );
    assert_eq!(
        metric(&text, "qseed_downloaded_bytes_total "),
        world.sim.served().len() as u64
    );
    assert_eq!(
        metric(&text, r#"qseed_source_requests_total{status="200"} "#),
        world.sim.requests()
    );
    assert!(text.contains(r#"qseed_target_state{target="tok",state="active",reason=""} 1"#));
    assert!(text.contains("qseed_last_injection_timestamp_seconds{target=\"tok\"}"));
    // One block for the first round, then (the token accepted that seed) the horizon.
    assert!(
        text.contains("qseed_source_request_duration_seconds_count 2"),
        "{text}"
    );
    assert!(text.contains("qseed_pool_bytes "));
    assert!(text.contains("qseed_source_up 1"), "{text}");
    assert!(text.contains(&format!(
        "qseed_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(metric(&text, "qseed_source_last_success_timestamp_seconds ") > 1_700_000_000);
    assert!(!text.contains(API_TOKEN));
    assert_eq!(
        http_get(&format!("{base}/healthz")),
        (200, "ok\n".to_string())
    );
    assert_eq!(http_get(&format!("{base}/readyz")).0, 200);
    let (status, _) = service.stop();
    assert!(status.success());
}

#[test]
fn readyz_turns_unready_when_the_source_is_broken_past_two_periods() {
    let world = World::one_target("quantum-entropy", 48, "1s", false);
    world.set_fault(Fault::Status(500));
    let service = world.start_service();
    let base = service.endpoint();
    assert!(wait_until(Duration::from_secs(5), || {
        http_get(&format!("{base}/readyz")).0 == 503
    }));
    let (_, body) = http_get(&format!("{base}/readyz"));
    assert!(body.contains("tok: not seeded since start"), "{body}");
    assert_eq!(
        http_get(&format!("{base}/healthz")).0,
        200,
        "alive all the same"
    );
    let (_, text) = http_get(&format!("{base}/metrics"));
    assert!(metric(&text, r#"qseed_source_requests_total{status="500"} "#) >= 1);
    assert!(
        metric(
            &text,
            r#"qseed_injections_total{target="tok",result="source_error"} "#
        ) >= 1
    );
    world.set_fault(Fault::None);
    assert!(wait_until(Duration::from_secs(5), || {
        http_get(&format!("{base}/readyz")).0 == 200
    }));
    let (status, _) = service.stop();
    assert!(status.success());
}

#[test]
fn json_logs_parse_and_carry_the_audit_fields_but_no_secret() {
    let world = World::one_target("entropy", 48, "10s", true);
    let out = world.run(&["--log-format", "json", "once"]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let audit: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["target"] == "qseed::audit")
        .collect();
    assert_eq!(audit.len(), 1, "{log}");
    let a = audit[0];
    assert_eq!(a["event"], "injection");
    assert_eq!(a["target_name"], "tok");
    assert_eq!(a["token_label"], "tok");
    assert_eq!(a["bytes"], 48);
    assert!(a["token_serial"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(a["source"]
        .as_str()
        .unwrap()
        .starts_with("https://localhost:"));
    assert_eq!(a["request_ids"], "r1");
    assert!(a["timestamp"].as_str().is_some());
    assert!(!log.contains(API_TOKEN) && !log.contains(PIN), "{log}");
    let seed = &world.spy().seeds()[0];
    let hex: String = seed[..8].iter().map(|b| format!("{b:02x}")).collect();
    assert!(!log.to_lowercase().contains(&hex));
}

/// Review: 1,019 idle connections to the telemetry port at 1,024 file descriptors made the
/// entropy requests fail ("Too many open files") and skipped rounds. Now idle connections are
/// closed after the header timeout and at most 32 are served at once: seeding goes on under a
/// flood of them, with a file descriptor limit far below the flood's size.
#[test]
fn idle_telemetry_connections_cannot_starve_the_seeding() {
    use std::io::Read;
    let world = World::one_target("entropy", 1024, "1s", false);
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    // Every round needs a fresh request (and so a socket) from the source.
    world.write_config(&config.replace("[pool]\n", "[pool]\nhorizon = \"1s\"\n"));
    let log = world.path("service.log");
    let mut child = std::process::Command::new("prlimit")
        .args(["--nofile=64:64", "--"])
        .arg(env!("CARGO_BIN_EXE_qseed"))
        .arg("run")
        .envs(world.qseed().get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let service_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), || service_log()
            .contains("telemetry on http://")),
        "{}",
        service_log()
    );
    let text = service_log();
    let start = text.find("telemetry on http://").unwrap() + "telemetry on http://".len();
    let addr = text[start..][..text[start..].find('/').unwrap()].to_string();
    assert!(world.wait_for_seeds(1, Duration::from_secs(10)));

    // Three times the process's whole file descriptor allowance, sending nothing.
    let target: std::net::SocketAddr = addr.parse().unwrap();
    let flood: Vec<std::net::TcpStream> = (0..192)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)).ok())
        .collect();
    assert!(flood.len() > 64, "only {} connections opened", flood.len());
    let (seeds_before, requests_before) = (world.spy().seeds().len(), world.sim.requests());
    std::thread::sleep(Duration::from_secs(8));
    let (seeds_after, requests_after) = (world.spy().seeds().len(), world.sim.requests());
    assert!(
        seeds_after >= seeds_before + 5,
        "seeding went on: {seeds_before} -> {seeds_after}\n{}",
        service_log()
    );
    assert!(
        requests_after >= requests_before + 5,
        "and so did the requests"
    );
    assert!(
        !service_log().contains("Too many open files"),
        "{}",
        service_log()
    );

    // The server closed every idle connection (at once past 32, after 5 s otherwise).
    for mut stream in flood {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle connection was left open: {other:?}"),
        }
    }
    let (status, body) = http_get(&format!("http://{addr}/healthz"));
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_telemetry_address_other_machines_can_reach_is_warned_about() {
    let world = World::one_target("entropy", 48, "1s", false);
    let config = std::fs::read_to_string(world.path("qseed.toml")).unwrap();
    world.write_config(&config.replace("listen = \"127.0.0.1:0\"", "listen = \":0\""));
    let service = world.start_service();
    assert!(
        service.wait_for_log("which other machines can reach", Duration::from_secs(5)),
        "{}",
        service.log()
    );
    assert!(service
        .log()
        .contains("Set telemetry.listen to 127.0.0.1:9750"));
    let _ = service.stop();
    // Loopback draws no warning.
    let world = World::one_target("entropy", 48, "1s", false);
    let service = world.start_service();
    assert!(world.wait_for_seeds(1, Duration::from_secs(5)));
    assert!(!service.log().contains("other machines can reach"));
}

//! systemd integration of a real `qseed run`: the notify protocol over a socket of the test's
//! own (as systemd would give with Type=notify and WatchdogSec=), and credentials passed with
//! LoadCredential= (a CREDENTIALS_DIRECTORY of the test's own).

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

fn receive_until(socket: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(deadline - Instant::now() + Duration::from_millis(1)))
            .unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = message.lines().any(|l| l == want);
                seen.push(message);
                if done {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    seen
}

#[test]
fn ready_after_the_first_round_watchdog_pings_and_stopping() {
    let world = World::new();
    world.add_token("tok");
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        world.target_at("tok", "tok", 48, "10s", false, "1s")
    ));
    let socket_path = world.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let service = world.start_service_with(&[
        ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ]);
    let before_ready = receive_until(&socket, "READY=1", Duration::from_secs(5));
    assert!(
        before_ready.last().is_some_and(|m| m.contains("READY=1")),
        "{before_ready:?}"
    );
    // The first round (after the 1 s offset) came before READY.
    assert_eq!(
        world.spy().seeds().len(),
        1,
        "READY=1 only after the first round"
    );
    assert!(
        before_ready.iter().any(|m| m.trim() == "WATCHDOG=1"),
        "{before_ready:?}"
    );
    let pings = receive_until(&socket, "never", Duration::from_millis(1100));
    assert!(
        pings.iter().filter(|m| m.trim() == "WATCHDOG=1").count() >= 3,
        "{pings:?}"
    );
    let (status, _) = service.stop();
    assert!(status.success());
    let rest = receive_until(&socket, "STOPPING=1", Duration::from_secs(2));
    assert!(rest.iter().any(|m| m.contains("STOPPING=1")), "{rest:?}");
}

#[test]
fn secrets_come_from_systemd_credentials() {
    let world = World::new();
    world.add_token("tok");
    let credentials = world.path("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("qrypt.token"), format!("{API_TOKEN}\n")).unwrap();
    std::fs::write(credentials.join("tok.pin"), PIN).unwrap();
    private(&credentials.join("qrypt.token"));
    private(&credentials.join("tok.pin"));
    let config = format!(
        "{}{}",
        world.source("entropy"),
        world.target("tok", "tok", 48, "10s", true)
    )
    .replace(
        "token_file = \"api.token\"",
        "token_file = \"credential:qrypt.token\"",
    )
    .replace(
        "pin_file = \"user.pin\"",
        "pin_file = \"credential:tok.pin\"",
    );
    world.write_config(&config);
    std::fs::remove_file(world.path("api.token")).unwrap();
    std::fs::remove_file(world.path("user.pin")).unwrap();
    let out = world
        .qseed()
        .env("CREDENTIALS_DIRECTORY", &credentials)
        .arg("once")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(world.spy().count("C_Login"), 1);

    let out = world.run(&["once"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("CREDENTIALS_DIRECTORY is not set"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_missing_credential_file_is_named_not_fatal_to_the_unit() {
    // With `LoadCredential=hsm.pin:/etc/qseed/hsm.pin` and `SetCredential=hsm.pin:\n`, a
    // missing file reaches qseed as a credential holding one empty line.
    let world = World::one_target("entropy", 48, "10s", true);
    let credentials = world.path("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("hsm.pin"), "\n").unwrap();
    let config = std::fs::read_to_string(world.path("qseed.toml"))
        .unwrap()
        .replace(
            "pin_file = \"user.pin\"",
            "pin_file = \"credential:hsm.pin\"",
        );
    world.write_config(&config);
    let out = world
        .qseed()
        .env("CREDENTIALS_DIRECTORY", &credentials)
        .arg("once")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("systemd passed an empty credential") && text.contains("LoadCredential="),
        "{text}"
    );
    // Issue 22, item 7: the file to create is named.
    assert!(text.contains("Create /etc/qseed/hsm.pin"), "{text}");
    assert_eq!(
        world.spy().count("C_Login"),
        0,
        "no empty PIN was presented"
    );
}

#[test]
fn status_names_a_stopped_target() {
    let world = World::new();
    world.good_and_wrong_pin("999999", "10s", false, "300ms");
    let socket_path = world.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let service = world.start_service_with(&[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);
    let messages = receive_until(&socket, "READY=1", Duration::from_secs(5));
    let ready = messages.last().cloned().unwrap_or_default();
    assert!(
        ready.contains("READY=1")
            && ready.contains("STATUS=seeding 1 of 2 targets; stopped: bad (pin)"),
        "{messages:?}"
    );
    let (status, _) = service.stop();
    assert!(status.success());
}

/// Issue 22, item 1: when every target stops in its first round (every PIN refused), READY=1
/// is never sent, so `systemctl start` fails instead of reporting a started service that
/// exits 4 a moment later.
#[test]
fn no_ready_when_every_pin_is_refused() {
    let world = World::one_target("entropy", 48, "10s", true);
    std::fs::write(world.path("user.pin"), "999999").unwrap();
    let socket_path = world.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut service = world.start_service_with(&[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);
    assert!(wait_until(Duration::from_secs(10), || !service.alive()));
    let messages = receive_until(&socket, "never", Duration::from_millis(300));
    assert!(
        !messages.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("STATUS=seeding 0 of 1 target; stopped: tok (pin)")),
        "{messages:?}"
    );
    let log = service.log();
    assert_eq!(service.wait().code(), Some(4), "{log}");
}

/// Issue 22, items 3 and 9: rounds skipped for want of entropy show in STATUS=; a source that
/// is down at the start is retried on the backoff schedule, and the target is seeded as soon
/// as it is back, not a whole period later.
#[test]
fn a_source_down_at_the_start_shows_in_status_and_is_retried_on_backoff() {
    let world = World::new();
    world.add_token("tok");
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        world.target("tok", "tok", 48, "60s", false)
    ));
    world.set_fault(qseed::simulator::Fault::Status(500));
    let socket_path = world.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let service = world.start_service_with(&[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);
    let messages = receive_until(&socket, "READY=1", Duration::from_secs(10));
    let ready = messages.last().cloned().unwrap_or_default();
    assert!(
        ready.contains("READY=1")
            && ready.contains(
                "STATUS=seeding 0 of 1 target; no entropy for tok (the entropy source is failing"
            ),
        "{messages:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    world.set_fault(qseed::simulator::Fault::None);
    let back = std::time::Instant::now();
    assert!(
        world.wait_for_seeds(1, Duration::from_secs(25)),
        "not seeded within 25 s of the source coming back (period 60 s): {}",
        service.log()
    );
    eprintln!("seeded {:?} after the source came back", back.elapsed());
    let later = receive_until(
        &socket,
        "STATUS=seeding 1 of 1 target",
        Duration::from_secs(5),
    );
    assert!(
        later
            .iter()
            .any(|m| m.contains("STATUS=seeding 1 of 1 target")),
        "{later:?}"
    );
    let (status, _) = service.stop();
    assert!(status.success());
}

/// Issue 22, items 2, 4 and 5: `qseed reload --pid` (the unit's ExecReload=) returns when
/// the new file is applied and fails with the reason when it is refused; with a PIN from a
/// systemd credential, an edit elsewhere in the file keeps the target's session (no new
/// login, no unscheduled seed); a changed target is counted once.
#[test]
fn reload_waits_for_the_outcome_and_keeps_credential_pin_targets() {
    let world = World::new();
    world.add_token("tok");
    let credentials = world.path("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("hsm.pin"), format!("{PIN}\n")).unwrap();
    private(&credentials.join("hsm.pin"));
    let config = format!(
        "{}{}",
        world.source("entropy"),
        world.target("tok", "tok", 48, "30s", true)
    )
    .replace(
        "pin_file = \"user.pin\"",
        "pin_file = \"credential:hsm.pin\"",
    );
    world.write_config(&config);
    let credentials_env = [("CREDENTIALS_DIRECTORY", credentials.to_str().unwrap())];
    let service = world.start_service_with(&credentials_env);
    assert!(
        world.wait_for_seeds(1, Duration::from_secs(10)),
        "{}",
        service.log()
    );
    let reload = || {
        world
            .qseed()
            .env("CREDENTIALS_DIRECTORY", &credentials)
            .args(["reload", "--pid", &service.pid().to_string()])
            .output()
            .unwrap()
    };

    // An edit that does not touch the target: kept, no second login, no second seed.
    world.write_config(&config.replace("timeout = \"5s\"", "timeout = \"6s\""));
    let out = reload();
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("1 target(s) unchanged (not re-seeded), 0 changed"),
        "{said}"
    );
    assert_eq!(world.spy().count("C_Login"), 1, "no new login");
    assert_eq!(world.spy().seeds().len(), 1, "no unscheduled seed");

    // A changed target: restarted, and counted once.
    world.write_config(&config.replace("size = 48", "size = 64"));
    let out = reload();
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("0 target(s) unchanged (not re-seeded), 1 changed and restarted, 0 stopped before and tried again, 0 added, 0 removed"),
        "{said}"
    );

    // A refused file: reload fails (exit 2) with the reason; the service runs on.
    world.write_config("[source\nurl = ");
    let out = reload();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the new configuration is refused, the running one stays"),
        "{}",
        stderr(&out)
    );
    let (status, _) = service.stop();
    assert!(status.success());
}

/// Issue 22, item 10: a telemetry port another program holds does not stop the seeding: a
/// warning, STATUS= says so, the bind is retried and succeeds once the port is free; doctor
/// fails while another program holds it.
#[test]
fn a_taken_telemetry_port_is_retried_and_seeding_goes_on() {
    let world = World::new();
    world.add_token("tok");
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    world.write_config(
        &format!(
            "{}{}",
            world.source("entropy"),
            world.target("tok", "tok", 48, "1s", false)
        )
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        ),
    );
    let doctor = world.run(&["doctor"]);
    assert!(!doctor.status.success());
    let said = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert!(
        said.contains(&format!("[FAIL] telemetry address 127.0.0.1:{port}"))
            && said.contains("another program listens there"),
        "{said}"
    );

    let socket_path = world.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut service = world.start_service_with(&[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);
    let messages = receive_until(&socket, "READY=1", Duration::from_secs(10));
    assert!(
        messages
            .iter()
            .any(|m| m.contains("READY=1") && m.contains("telemetry not served: 127.0.0.1")),
        "{messages:?}"
    );
    assert!(world.wait_for_seeds(2, Duration::from_secs(10)));
    assert!(service.alive());
    assert!(
        service
            .log()
            .contains("cannot serve telemetry on 127.0.0.1"),
        "{}",
        service.log()
    );
    drop(holder);
    assert!(
        service.wait_for_log("telemetry on http://", Duration::from_secs(15)),
        "{}",
        service.log()
    );
    let (code, body) = http_get(&format!("http://127.0.0.1:{port}/metrics"));
    assert_eq!(code, 200);
    assert!(body.contains("qseed_build_info"));
    // Now served by qseed: doctor says so and passes that check.
    let doctor = world.run(&["doctor"]);
    let said = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert!(
        said.contains(&format!(
            "[ ok ] telemetry address 127.0.0.1:{port}: served by a running qseed"
        )),
        "{said}"
    );
    let (status, _) = service.stop();
    assert!(status.success());
}

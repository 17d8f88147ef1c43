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
            && ready.contains("STATUS=seeding 1 of 2 targets; bad stopped: pin"),
        "{messages:?}"
    );
    let (status, _) = service.stop();
    assert!(status.success());
}

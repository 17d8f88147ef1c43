//! The shipped systemd units, read as files: the doctor unit runs with everything the service
//! unit sets up (user, groups, credentials, state, sandbox), and the service does not restart
//! into a wrong PIN. `scripts/package-check` runs them for real as the qseed user.

use std::collections::BTreeSet;

fn service_lines(path: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut in_service = false;
    let mut lines = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.is_empty() && !line.starts_with('#') {
            lines.insert(line.to_string());
        }
    }
    lines
}

/// Settings that make the service a long-running daemon; the doctor runs once.
const DAEMON_ONLY: &[&str] = &[
    "Type=",
    "ExecStart=",
    "ExecReload=",
    "WatchdogSec=",
    "Restart=",
    "RestartSec=",
    "RestartPreventExitStatus=",
    "TimeoutStopSec=",
];

#[test]
fn the_doctor_unit_runs_as_the_service_does() {
    let service = service_lines("packaging/qseed.service");
    let doctor = service_lines("packaging/qseed-doctor.service");
    let missing: Vec<&String> = service
        .iter()
        .filter(|l| !DAEMON_ONLY.iter().any(|d| l.starts_with(d)))
        .filter(|l| !doctor.contains(*l))
        .collect();
    assert!(missing.is_empty(), "qseed-doctor.service lacks {missing:?}");
    assert!(doctor.contains("Type=oneshot"));
    assert!(doctor.contains("ExecStart=/usr/bin/qseed --config /etc/qseed/qseed.toml doctor"));
}

/// Issue 22, item 6: the retry-pin template runs as the service does too, so the PIN it
/// presents is the service's credential and its record the service's state folder.
#[test]
fn the_retry_pin_unit_runs_as_the_service_does() {
    let service = service_lines("packaging/qseed.service");
    let retry = service_lines("packaging/qseed-retry-pin@.service");
    let missing: Vec<&String> = service
        .iter()
        .filter(|l| !DAEMON_ONLY.iter().any(|d| l.starts_with(d)))
        .filter(|l| !retry.contains(*l))
        .collect();
    assert!(
        missing.is_empty(),
        "qseed-retry-pin@.service lacks {missing:?}"
    );
    assert!(retry
        .contains("ExecStart=/usr/bin/qseed --config /etc/qseed/qseed.toml doctor --retry-pin %i"));
}

/// Issue 22, item 2: `systemctl reload` waits for the outcome.
#[test]
fn reload_waits_for_the_service() {
    let service = service_lines("packaging/qseed.service");
    assert!(
        service.contains("ExecReload=/usr/bin/qseed reload --pid $MAINPID"),
        "{service:?}"
    );
}

#[test]
fn the_service_neither_restarts_into_a_stopped_target_nor_needs_secret_files() {
    let service = service_lines("packaging/qseed.service");
    assert!(
        service.contains("RestartPreventExitStatus=2 4"),
        "{service:?}"
    );
    assert!(service.contains("StateDirectory=qseed"));
    // Every loaded credential has a default, so a missing file does not stop the unit
    // before qseed can say which one is missing.
    for load in service.iter().filter(|l| l.starts_with("LoadCredential=")) {
        let id = load["LoadCredential=".len()..].split(':').next().unwrap();
        assert!(
            service.contains(&format!("SetCredential={id}:\\n")),
            "no SetCredential= default for {id}"
        );
    }
}

#[test]
fn the_packaged_configuration_says_how_to_run_the_doctor_as_the_service() {
    let text = std::fs::read_to_string(format!(
        "{}/packaging/qseed.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    assert!(text.contains("sudo systemctl start qseed-doctor"), "{text}");
    assert!(
        !text.contains("sudo -u qseed"),
        "that way has no credentials: {text}"
    );
}

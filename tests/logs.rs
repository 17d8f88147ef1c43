//! Where the real binary's logs go: the journal under systemd (its native protocol, read here
//! from a socket of the test's own), one JSON object per line with `--log-format json`.
//!
//! journald's socket has a fixed path (`/run/systemd/journal/socket`): the journal test runs
//! qseed in a mount namespace of its own (`unshare --mount`, needs root; CI has it) with the
//! test's folder mounted there. Elsewhere it says it was skipped.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};

use common::*;

/// One journal entry: its fields (the last value of a field given twice).
type Entry = HashMap<String, String>;

/// Parses journald's native protocol: `KEY=value\n`, or `KEY\n` + 64-bit little-endian
/// length + value + `\n` for values that hold a newline.
fn parse_entry(mut datagram: &[u8]) -> Entry {
    let mut entry = Entry::new();
    while !datagram.is_empty() {
        let end = datagram
            .iter()
            .position(|&b| b == b'\n')
            .expect("a field ends");
        let line = &datagram[..end];
        datagram = &datagram[end + 1..];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            entry.insert(
                String::from_utf8_lossy(&line[..eq]).into(),
                String::from_utf8_lossy(&line[eq + 1..]).into(),
            );
        } else {
            let len = u64::from_le_bytes(datagram[..8].try_into().unwrap()) as usize;
            let value = &datagram[8..8 + len];
            assert_eq!(datagram[8 + len], b'\n');
            entry.insert(
                String::from_utf8_lossy(line).into(),
                String::from_utf8_lossy(value).into(),
            );
            datagram = &datagram[8 + len + 1..];
        }
    }
    entry
}

/// Targets "tok" (seeded) and "lost" (its token does not exist): `once` exits 4.
fn good_and_lost() -> World {
    let world = World::new();
    world.add_token("tok");
    world.write_config(&format!(
        "{}{}{}",
        world.source("entropy"),
        world.target("tok", "tok", 48, "10s", true),
        world.target("lost", "no-such-token", 48, "10s", false)
    ));
    world
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

#[test]
fn under_systemd_the_journal_gets_priorities_and_fields_and_stderr_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root for a mount namespace with a journal socket of its own");
        return;
    }
    let world = good_and_lost();
    let journal = world.path("journal");
    std::fs::create_dir(&journal).unwrap();
    let socket = UnixDatagram::bind(journal.join("socket")).unwrap();
    socket.set_nonblocking(true).unwrap();
    // systemd names the stream it connected to stderr; qseed writes to the journal only when
    // its stderr is still that stream.
    let stderr_path = world.path("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let qseed = world.qseed();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(
            "mount -t tmpfs qseed-test /run && mkdir -p /run/systemd/journal && \
             mount --bind \"$1\" /run/systemd/journal && shift && exec \"$@\"",
        )
        .arg("sh")
        .arg(&journal)
        .arg(qseed.get_program())
        .arg("once");
    for (key, value) in qseed.get_envs() {
        match value {
            Some(value) => cmd.env(key, value),
            None => cmd.env_remove(key),
        };
    }
    let status = cmd
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .status()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(4),
        "a target without its token fails `once`"
    );

    let mut entries = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    while let Ok(n) = socket.recv(&mut buf) {
        if n > 0 {
            entries.push(parse_entry(&buf[..n]));
        }
    }
    let written = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(written, "", "nothing on stderr: the journal has it all");
    let all = format!("{entries:#?}");
    assert!(
        entries
            .iter()
            .all(|e| e.get("SYSLOG_IDENTIFIER").map(String::as_str) == Some("qseed")),
        "{all}"
    );
    let audit = entries
        .iter()
        .find(|e| e.get("EVENT").map(String::as_str) == Some("injection"))
        .unwrap_or_else(|| panic!("an audit record: {all}"));
    assert_eq!(audit["PRIORITY"], "5", "info is notice (5)");
    assert_eq!(audit["TARGET_NAME"], "tok");
    assert_eq!(audit["TOKEN_LABEL"], "tok");
    assert_eq!(audit["BYTES"], "48");
    assert_eq!(audit["TARGET"], "qseed::audit");
    assert!(!audit["REQUEST_IDS"].is_empty());
    assert!(
        audit["MESSAGE"].starts_with("seeded tok: 48 bytes"),
        "{all}"
    );
    // The journal stamps entries itself: no timestamp or level in the message.
    assert!(entries
        .iter()
        .all(|e| !e["MESSAGE"].contains("INFO") && !e["MESSAGE"].starts_with("20")));
    let failed = entries
        .iter()
        .find(|e| e.get("TARGET_NAME").map(String::as_str) == Some("lost"))
        .unwrap_or_else(|| panic!("the failing target's record: {all}"));
    assert_eq!(
        failed["PRIORITY"], "4",
        "a failed round is a warning: {all}"
    );
    let last = entries.last().unwrap();
    assert_eq!(last["PRIORITY"], "3", "the final error is an error: {all}");
    assert!(last["MESSAGE"].starts_with("qseed: error: 1 of 2 targets not seeded"));
    assert_eq!(last["EXIT_STATUS"], "4");
}

#[test]
fn json_logs_are_json_to_the_last_line() {
    let world = good_and_lost();
    let out = world.run(&["--log-format", "json", "once"]);
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?} in {stderr}"))
        })
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["event"] == "injection" && l["target_name"] == "tok"));
    assert!(lines
        .iter()
        .any(|l| l["level"] == "WARN" && l["target_name"] == "lost"));
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR", "{stderr}");
    assert_eq!(last["exit_status"], 4);
    assert!(last["message"]
        .as_str()
        .unwrap()
        .starts_with("qseed: error: 1 of 2 targets not seeded"));
}

/// A journal stream that is not stderr's (stderr was redirected after systemd started the
/// process's parent) is not the journal: text on stderr.
#[test]
fn a_stale_journal_stream_means_text_on_stderr() {
    let world = World::one_target("entropy", 48, "10s", true);
    let out = world
        .qseed()
        .env("JOURNAL_STREAM", "8:12345")
        .arg("once")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("seeded tok: 48 bytes"), "{stderr}");
}

/// `QSEED_LOG` decides what the real binary logs; a value that does not parse is named and the
/// default kept (the audit line is an INFO record of `qseed::audit`).
#[test]
fn qseed_log_filters_and_a_bad_one_is_named() {
    let world = World::one_target("entropy", 48, "10s", true);
    let once = |filter: &str| {
        let out = world
            .qseed()
            .env("QSEED_LOG", filter)
            .arg("once")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stderr(&out)
    };
    let quiet = once("warn");
    assert!(!quiet.contains("seeded tok"), "{quiet}");
    let bad = once("qseed=loud");
    assert!(
        bad.contains("QSEED_LOG is not a log filter") && bad.contains("using the default"),
        "{bad}"
    );
    assert!(bad.contains("seeded tok: 48 bytes"), "{bad}");
}

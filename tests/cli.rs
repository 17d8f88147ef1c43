//! The command line as a user meets it: help with examples, version, the shipped example.

use std::process::Command;

fn qseed(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qseed"))
        .args(args)
        .env_remove("QSEED_CONFIG_FILE")
        .env_remove("QRYPT_TOKEN")
        .output()
        .unwrap()
}

#[test]
fn every_command_has_help_with_an_example() {
    for command in [
        "run",
        "once",
        "doctor",
        "slots",
        "fetch",
        "demo",
        "migrate",
        "simulator",
        "completions",
    ] {
        let out = qseed(&[command, "--help"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{command}");
        assert!(
            text.contains("Example"),
            "{command} --help has an example:\n{text}"
        );
        assert!(text.contains("qseed "), "{command}");
        // Global options under their own heading, after the command's own.
        let global = text
            .find("Global options:")
            .unwrap_or_else(|| panic!("{text}"));
        assert!(text[global..].contains("--config <PATH>"), "{text}");
        assert!(!text[..global].contains("--config <PATH>"), "{text}");
    }
    let out = qseed(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Exit status:") && text.contains("Examples:"),
        "{text}"
    );
}

#[test]
fn version_and_usage_errors() {
    let out = qseed(&["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("qseed "));
    let out = qseed(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = qseed(&["fetch", "--bytes", "0"]);
    assert_eq!(out.status.code(), Some(2), "zero bytes is a usage error");
}

#[test]
fn the_shipped_example_configuration_parses() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/qseed.toml"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = text
        .replace("/etc/qseed/qrypt.token", "qrypt.token")
        .replace("/etc/qseed/luna.pin", "luna.pin");
    std::fs::write(dir.path().join("qrypt.token"), "t\n").unwrap();
    std::fs::write(dir.path().join("luna.pin"), "1234\n").unwrap();
    let config = qseed::config::parse(&text, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.targets.len(), 1);
    assert_eq!(config.targets[0].size, 48);
}

#[test]
fn fetch_with_a_named_config_file_that_is_missing_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = qseed(&[
        "--config",
        dir.path().join("absent.toml").to_str().unwrap(),
        "fetch",
        "--bytes",
        "16",
        "--output",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("absent.toml") && err.contains("the file does not exist"),
        "never a silent fall-back to the cloud: {err}"
    );
}

#[test]
fn the_man_pages_and_completions_follow_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let out = qseed(&["generate-assets", "--out", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A daemon's page: section 8, with the sections a daemon's page has.
    let man = std::fs::read_to_string(dir.path().join("qseed.8")).unwrap();
    assert!(man.contains(".TH qseed 8"), "{man}");
    for text in [
        ".SH ENVIRONMENT",
        ".SH FILES",
        ".SH \"EXIT STATUS\"",
        ".SH SIGNALS",
        "QSEED_CONFIG_FILE",
        "CREDENTIALS_DIRECTORY",
        "STATE_DIRECTORY",
        "HTTPS_PROXY",
        "PINs a token refused",
    ] {
        assert!(man.contains(text), "{text} in qseed(8)");
    }
    // One page per command the help lists, and qseed.toml(5).
    let help = String::from_utf8(qseed(&["--help"]).stdout).unwrap();
    let commands: Vec<&str> = help
        .split_once("Commands:\n")
        .unwrap()
        .1
        .lines()
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(
        commands.contains(&"completions") && commands.contains(&"run"),
        "{help}"
    );
    let mut pages = vec!["qseed.8".to_string(), "qseed.toml.5".to_string()];
    pages.extend(commands.iter().map(|c| format!("qseed-{c}.8")));
    // A command group (`qseed audit`) has a page per command of its own.
    for c in &commands {
        let help = String::from_utf8(qseed(&[c, "--help"]).stdout).unwrap();
        if let Some((_, list)) = help.split_once("Commands:\n") {
            pages.extend(
                list.lines()
                    .take_while(|l| !l.is_empty())
                    .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|n| *n != "help")
                    .map(|n| format!("qseed-{c}-{n}.8")),
            );
        }
    }
    for page in &pages {
        let path = dir.path().join(page);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{page} exists"));
        // Every page it refers to is one of them: no dangling references.
        let plain = text
            .replace("\\fB", "")
            .replace("\\fR", "")
            .replace("\\-", "-");
        for (at, _) in plain.match_indices("qseed") {
            let rest = &plain[at..];
            let name_end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
                .unwrap_or(rest.len());
            let (name, after) = rest.split_at(name_end);
            if let Some(section) = after.strip_prefix('(').and_then(|s| s.get(..1)) {
                if section.chars().all(|c| c.is_ascii_digit()) {
                    let target = format!("{}.{section}", name.trim_end_matches('.'));
                    assert!(
                        pages.contains(&target),
                        "{page} refers to {name}({section})"
                    );
                }
            }
        }
        // man renders it without complaint (beyond a line too long to justify: a URI).
        if let Ok(out) = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&path)
            .env("MANWIDTH", "100")
            .output()
        {
            let warnings = String::from_utf8_lossy(&out.stderr);
            let real: Vec<&str> = warnings
                .lines()
                .filter(|l| !l.contains("cannot adjust line"))
                .collect();
            assert!(
                out.status.success() && real.is_empty(),
                "{page}: {warnings}"
            );
        }
        // lexgrog finds the NAME line that whatis and apropos index.
        if let Ok(out) = Command::new("lexgrog").arg(&path).output() {
            assert!(
                out.status.success(),
                "{page}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    let configuration = std::fs::read_to_string(dir.path().join("qseed.toml.5")).unwrap();
    for key in [
        "flush_timeout",
        "log_repeat",
        "proxy",
        "false_alarm",
        "max_seed",
    ] {
        assert!(configuration.contains(&format!("\\fB{key}\\fR")), "{key}");
    }
    let bash = std::fs::read_to_string(dir.path().join("qseed.bash")).unwrap();
    assert!(bash.contains("doctor") && bash.contains("--log-format"));
    assert!(dir.path().join("_qseed").exists() && dir.path().join("qseed.fish").exists());
}

#[test]
fn the_simulator_command_serves_the_walk_through() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let mut sim = Command::new(env!("CARGO_BIN_EXE_qseed"))
        .args([
            "simulator",
            "--listen",
            "127.0.0.1:0",
            "--ca-out",
            ca.to_str().unwrap(),
        ])
        .env("QRYPT_TOKEN", "walk-through")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sim.stderr.take().unwrap()).lines();
    let banner = lines.next().unwrap().unwrap();
    assert!(
        banner.contains("TEST AND DEMO TOOL") && banner.contains("NOT quantum"),
        "{banner}"
    );
    let url = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find_map(|l| l.trim().strip_prefix("url:").map(|u| u.trim().to_string()))
        .unwrap();
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    std::fs::write(dir.path().join("token"), "walk-through\n").unwrap();
    std::fs::write(
        dir.path().join("qseed.toml"),
        format!("[source]\nurl = \"{url}\"\ntoken_file = \"token\"\nca_file = \"ca.pem\"\nallow_simulated = true\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qseed"))
        .args(["--config", dir.path().join("qseed.toml").to_str().unwrap()])
        .args(["fetch", "--bytes", "100"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), 100);
    Command::new("kill")
        .args(["-TERM", &sim.id().to_string()])
        .status()
        .unwrap();
    assert!(sim.wait().unwrap().success());
    let rest = rest.join().unwrap();
    assert!(
        rest.iter()
            .any(|l| l.contains("simulator stopped after 1 requests")),
        "{rest:?}"
    );
}

#[test]
fn the_simulator_refuses_other_machines_without_a_token() {
    let out = qseed(&["simulator", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reaches other machines") && err.contains("QRYPT_TOKEN"),
        "{err}"
    );
}

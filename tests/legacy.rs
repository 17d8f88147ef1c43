//! Coming from Qrypt's C++ qseed: its YAML file, its environment variable and default path,
//! a bare `qseed`, `QSEED_<TABLE>_<KEY>` overrides and `qseed migrate`, against real SoftHSM
//! behind pkcs11-spy and the simulator.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The slot id SoftHSM gave the token `label`, as `qseed slots` shows it.
fn slot_id(world: &World, label: &str) -> String {
    let out = world.run(&["slots", "--module", SOFTHSM]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.split_whitespace().nth(2) == Some(label))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no token {label} in {text}"))
        .to_string()
}

/// A world with token "tok" and Qrypt's qseed file for it, written as that program's example
/// file is (comments and all), through the spy.
fn world() -> (World, std::path::PathBuf) {
    let world = World::new();
    world.add_token("tok");
    let yaml = world.path("qseed_config.yml");
    std::fs::write(
        &yaml,
        format!(
            "qrypt_token: {API_TOKEN}\nsize: 48      # In bytes\nperiod: 1    # In seconds\n\
             cryptoki_lib: {SPY}\ncryptoki_slot_id: {}\ncryptoki_user_pin: {PIN}\n",
            slot_id(&world, "tok")
        ),
    )
    .unwrap();
    private(&yaml);
    (world, yaml)
}

/// `qseed ARGS` with the old file named by `QSEED_CONFIG_FILE`, and the simulator and a free
/// telemetry port given through the environment (the old file has no keys for them).
fn qseed(world: &World, yaml: &std::path::Path) -> Command {
    let mut cmd = world.qseed();
    cmd.env("QSEED_CONFIG_FILE", yaml)
        .env("QSEED_SOURCE_URL", world.sim.url())
        .env("QSEED_SOURCE_ALLOW_SIMULATED", "true")
        // Rounds are counted here; tests/flush.rs tests the flush at the stop.
        .env("QSEED_POOL_FLUSH_TIMEOUT", "0s")
        .env("QSEED_SOURCE_CA_FILE", world.path("ca.pem"))
        .env("QSEED_TELEMETRY_LISTEN", "127.0.0.1:0");
    cmd
}

#[test]
fn a_bare_qseed_runs_the_old_file_from_qseed_config_file() {
    let (world, yaml) = world();
    let log = world.path("bare.log");
    let mut child = qseed(&world, &yaml)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let seeded = world.wait_for_seeds(3, Duration::from_secs(6));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(seeded, "{text}");
    assert!(status.success(), "{text}");
    let seeds = world.spy().seeds();
    assert!(seeds.iter().all(|s| s.len() == 48));
    // Every injected byte is a served byte, each once.
    assert_seeds_tile_served(&seeds, &world.sim.served());
    assert!(
        world.spy().logins_with(PIN) == 1,
        "one login for the service"
    );
    assert!(
        text.contains("Qrypt's qseed's YAML format") && text.contains("qseed migrate"),
        "one warning about the inline secrets: {text}"
    );
    assert!(
        !text.contains(API_TOKEN) && !text.contains(&format!(": {PIN}")),
        "{text}"
    );
}

#[test]
fn the_old_file_by_config_and_at_the_old_default_path() {
    let (world, yaml) = world();
    let out = qseed(&world, &yaml)
        .env_remove("QSEED_CONFIG_FILE")
        .args(["--config", yaml.to_str().unwrap(), "once"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(world.spy().seeds().len(), 1);

    // /etc/qseed/qseed_config.yml, with no /etc/qseed/qseed.toml: in a private mount namespace
    // whose /etc is an overlay, so the machine's /etc is not touched.
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped the default-path part: needs root for a mount namespace");
        return;
    }
    let upper = world.path("etc-overlay");
    std::fs::create_dir(&upper).unwrap();
    let script = format!(
        "set -e; mount -t tmpfs tmpfs {u}; mkdir {u}/up {u}/work; \
         mount -t overlay overlay -o lowerdir=/etc,upperdir={u}/up,workdir={u}/work /etc; \
         mkdir -p /etc/qseed; rm -f /etc/qseed/qseed.toml; cp {y} /etc/qseed/qseed_config.yml; \
         exec {q} once",
        u = upper.display(),
        y = yaml.display(),
        q = env!("CARGO_BIN_EXE_qseed")
    );
    let mut cmd = qseed(&world, &yaml);
    cmd.env_remove("QSEED_CONFIG_FILE");
    let envs: Vec<(String, String)> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_str()?.to_string(), v?.to_str()?.to_string())))
        .collect();
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .envs(envs)
        .env_remove("QSEED_CONFIG_FILE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if !out.status.success() && stderr(&out).contains("mount:") {
        eprintln!("skipped the default-path part: {}", stderr(&out));
        return;
    }
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/etc/qseed/qseed_config.yml is Qrypt's qseed's YAML format"),
        "{}",
        stderr(&out)
    );
    // Two processes, two requests: each seed is served bytes, none used twice.
    assert_eq!(world.spy().seeds().len(), 2);
    assert_seeds_are_distinct_served_bytes(&world.spy().seeds(), &world.sim.served());
}

#[test]
fn invalid_old_values_name_the_key() {
    let (world, yaml) = world();
    let good = std::fs::read_to_string(&yaml).unwrap();
    for (from, to, expected) in [
        (
            "size: 48",
            "size: -1",
            "line 2: size: \"-1\" is not a whole number",
        ),
        (
            &format!("qrypt_token: {API_TOKEN}"),
            "qrypt_token: \"\"",
            "line 1: qrypt_token is empty",
        ),
        (
            "period: 1",
            "period: 0",
            "line 3: period: 0 is out of range",
        ),
        (
            "cryptoki_lib",
            "cryptoki_library",
            "unknown key \"cryptoki_library\"",
        ),
    ] {
        std::fs::write(&yaml, good.replace(from, to)).unwrap();
        let out = qseed(&world, &yaml).arg("once").output().unwrap();
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(
            text.contains(&yaml.display().to_string()) && text.contains(expected),
            "{expected}: {text}"
        );
        assert!(!text.contains(API_TOKEN) && !text.contains(PIN), "{text}");
    }
    assert!(world.spy().seeds().is_empty());
}

#[test]
fn environment_overrides_are_checked_and_named() {
    let world = World::one_target("entropy", 48, "10s", false);
    for (name, value, expected) in [
        (
            "QSEED_POOL_MAX_BYTES",
            "5",
            "QSEED_POOL_MAX_BYTES = 5 is out of range",
        ),
        (
            "QSEED_SOURCE_URLL",
            "x",
            "QSEED_SOURCE_URLL names no key of [source]",
        ),
        (
            "QSEED_SOURCE_URL",
            "http://localhost:1",
            "QSEED_SOURCE_URL = \"http://localhost:1\" is plain HTTP",
        ),
    ] {
        let out = world.qseed().env(name, value).arg("once").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{name}: {}", stderr(&out));
    }
    // `doctor` lists what the environment set.
    let out = world
        .qseed()
        .env("QSEED_POOL_HORIZON", "2m")
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[ ok ] environment: QSEED_POOL_HORIZON sets pool.horizon = \"2m\""),
        "{text}"
    );
}

#[test]
fn migrate_prints_and_writes_an_equivalent_toml_without_secrets() {
    let (world, yaml) = world();
    let out = world
        .qseed()
        .args(["migrate", yaml.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let table: toml::Table = toml::from_str(&text).expect("migrate prints TOML");
    assert_eq!(table["source"]["dialect"].as_str(), Some("entropy"));
    assert!(!text.contains(API_TOKEN) && !text.contains(PIN), "{text}");
    assert!(!stderr(&out).contains(API_TOKEN) && !stderr(&out).contains(PIN));
    // The module was asked which token is in the slot, and its serial suggested.
    assert!(text.contains("the token there now is \"tok\""), "{text}");
    assert!(text.contains("# serial = \""), "{text}");

    let dir = world.path("migrated");
    let out = world
        .qseed()
        .args(["migrate", yaml.to_str().unwrap(), "--write"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(API_TOKEN));
    use std::os::unix::fs::PermissionsExt;
    for (file, mode) in [
        ("qrypt.token", 0o600),
        ("hsm.pin", 0o600),
        ("qseed.toml", 0o640),
    ] {
        let meta = std::fs::metadata(dir.join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("hsm.pin")).unwrap(),
        format!("{PIN}\n")
    );
    // A second run does not overwrite.
    let again = world
        .qseed()
        .args(["migrate", yaml.to_str().unwrap(), "--write"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!again.status.success() && stderr(&again).contains("does not overwrite"));

    // The migrated configuration seeds the same token.
    let out = world
        .qseed()
        .env("QSEED_CONFIG_FILE", dir.join("qseed.toml"))
        .env("QSEED_SOURCE_URL", world.sim.url())
        .env("QSEED_SOURCE_ALLOW_SIMULATED", "true")
        // Rounds are counted here; tests/flush.rs tests the flush at the stop.
        .env("QSEED_POOL_FLUSH_TIMEOUT", "0s")
        .env("QSEED_SOURCE_CA_FILE", world.path("ca.pem"))
        .arg("once")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("YAML format"), "{}", stderr(&out));
    assert_eq!(world.spy().seeds().len(), 1);
    assert_eq!(world.spy().logins_with(PIN), 1);
}

//! qseed run by an unprivileged user (`setpriv` to `nobody`, as a service user would be)
//! against a SoftHSM token folder that user may not use: the error names the user, the folder
//! and the fix, instead of a bare CKR_GENERAL_ERROR.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `qseed ARGS` as user and group `nobody` with no supplementary group, from a copy of the
/// binary the user may execute.
fn as_nobody(world: &World, args: &[&str]) -> std::process::Output {
    as_nobody_with(world, args, &[("STATE_DIRECTORY", world.path("state"))])
}

fn as_nobody_with(
    world: &World,
    args: &[&str],
    env: &[(&str, std::path::PathBuf)],
) -> std::process::Output {
    let binary = world.path("qseed");
    if !binary.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_qseed"), &binary).unwrap();
        chmod(&binary, 0o755);
    }
    let run = || {
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(&binary)
            .args(args)
            .env("SOFTHSM2_CONF", world.path("softhsm2.conf"))
            .env("QSEED_CONFIG_FILE", world.path("qseed.toml"))
            .env_remove("STATE_DIRECTORY")
            .env_remove("XDG_STATE_HOME")
            .env_remove("HOME")
            .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
            .env_remove("QRYPT_TOKEN")
            .output()
            .expect("setpriv runs (util-linux)")
    };
    // A child that another test's thread forked while the copy above was being written holds
    // the copy open for writing until it execs: exec then fails with ETXTBSY for a moment.
    for _ in 0..50 {
        let out = run();
        if !String::from_utf8_lossy(&out.stderr).contains("Text file busy") {
            return out;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    run()
}

#[test]
fn a_token_folder_the_user_may_not_use_is_named_with_the_fix() {
    if !rustix::process::geteuid().is_root() {
        // setpriv needs root to change users; CI runs as root.
        eprintln!("skipped: needs root to run qseed as another user");
        return;
    }
    let world = World::new();
    world.add_token("tok");
    // The world is readable (the configuration, SoftHSM's configuration), but its token
    // folder is root's alone, as on a host where qseed's user is not in group softhsm.
    chmod(world.dir.path(), 0o755);
    chmod(&world.path("softhsm2.conf"), 0o644);
    let tokens = world.path("tokens");
    assert!(tokens.is_dir(), "the SoftHSM configuration's token folder");
    chmod(&tokens, 0o700);
    std::fs::create_dir(world.path("state")).unwrap();
    std::process::Command::new("chown")
        .args(["nobody", &world.path("state").display().to_string()])
        .status()
        .unwrap();

    let out = as_nobody(&world, &["slots", "--module", SOFTHSM]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    for part in [
        "C_Initialize: CKR_GENERAL_ERROR",
        "qseed runs as user nobody",
        &format!("may not read and write {}", tokens.display()),
        "(root:root, mode 700)",
        "SupplementaryGroups=softhsm",
    ] {
        assert!(text.contains(part), "{part:?} in {text}");
    }
    assert!(!text.contains("next period"), "{text}");

    // Opened to group softhsm, the fix is to join it.
    Command::new("chgrp")
        .args(["softhsm", &tokens.display().to_string()])
        .status()
        .unwrap();
    chmod(&tokens, 0o2770);
    world.write_config(&format!(
        "{}{}",
        world.source("entropy"),
        world
            .target("tok", "tok", 48, "10s", false)
            .replace(SPY, SOFTHSM)
    ));
    chmod(&world.path("qseed.toml"), 0o644);
    chmod(&world.path("api.token"), 0o644);
    chmod(&world.path("ca.pem"), 0o644);
    let out = as_nobody(&world, &["once"]);
    let text = stderr(&out);
    // A module that cannot initialize is a target that is down (issue 24), not a
    // configuration error: `once` exits 4, naming the module, the cause and the fix.
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains("add nobody to group softhsm")
            && text.contains("usermod -aG softhsm nobody")
            && text.contains(&format!(
                "module {SOFTHSM}: C_Initialize: CKR_GENERAL_ERROR"
            )),
        "{text}"
    );
}

#[test]
fn a_user_without_the_system_state_folder_keeps_state_in_its_own() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run qseed as another user");
        return;
    }
    let world = World::one_target("entropy", 48, "10s", true);
    chmod(world.dir.path(), 0o755);
    for file in [
        "qseed.toml",
        "api.token",
        "ca.pem",
        "user.pin",
        "softhsm2.conf",
    ] {
        chmod(&world.path(file), 0o644);
    }
    let home = world.path("home");
    std::fs::create_dir(&home).unwrap();
    Command::new("chown")
        .args(["nobody", &home.display().to_string()])
        .status()
        .unwrap();
    // No $STATE_DIRECTORY, no [service] state_dir, and /var/lib/qseed not nobody's: the XDG
    // default under $HOME.
    let out = as_nobody_with(&world, &["doctor"], &[("HOME", home.clone())]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(
        text.contains(&format!(
            "PIN guard: refused PINs are recorded in {}/.local/state/qseed/pin-guard; qseed \
             runs as user nobody",
            home.display()
        )),
        "{text}"
    );
    // A state folder whose pin-guard/ another user made (root, by hand): said, with the fix,
    // and no login is risked.
    let state = world.path("state-of-nobody");
    std::fs::create_dir(&state).unwrap();
    std::fs::create_dir(state.join("pin-guard")).unwrap();
    chmod(&state.join("pin-guard"), 0o700);
    Command::new("chown")
        .args(["nobody", &state.display().to_string()])
        .status()
        .unwrap();
    let out = as_nobody_with(&world, &["doctor"], &[("STATE_DIRECTORY", state.clone())]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(
        text.contains("[FAIL] PIN guard")
            && text.contains(&state.join("pin-guard").display().to_string())
            && text.contains(&format!("chown -R nobody {}", state.display()))
            && text.contains("every login is refused"),
        "{text}"
    );
    // Nowhere to write: every login is refused, said with the fix.
    let out = as_nobody_with(&world, &["doctor"], &[]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(
        text.contains("[FAIL] PIN guard") && text.contains("[service] state_dir"),
        "{text}"
    );
}

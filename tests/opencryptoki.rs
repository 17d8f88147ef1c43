//! openCryptoki's soft token: its token info has a clock field cryptoki cannot convert, which
//! used to hide the token ("the module shows no token at all"). It must be listed and found,
//! and its real answer to a seed (`CKR_RANDOM_SEED_NOT_SUPPORTED`) must reach the operator.
//!
//! openCryptoki is system-wide (its slot daemon, one soft token per machine, in slot 3). The
//! test runs as root, starts `pkcsslotd` if needed and (re)initializes that token; where the
//! daemon cannot start it says so and checks nothing.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so";
const LABEL: &str = "qseed-ock";

/// Stops the slot daemon at the end if this test started it.
struct Daemon(bool);

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.0 {
            let _ = Command::new("pkill").arg("pkcsslotd").status();
        }
    }
}

/// Starts the slot daemon (if it is not running) and labels the soft token; `Err` says why it
/// cannot be had here.
fn soft_token() -> Result<Daemon, String> {
    if !Path::new(MODULE).exists() {
        return Err(format!(
            "{MODULE} is missing (apt-get install opencryptoki)"
        ));
    }
    if !rustix::process::geteuid().is_root() {
        return Err("openCryptoki's daemon and token set-up need root".into());
    }
    let running = Command::new("pgrep")
        .arg("pkcsslotd")
        .output()
        .is_ok_and(|o| o.status.success());
    let daemon = Daemon(!running);
    if !running {
        let _ = std::fs::create_dir_all("/var/lock/opencryptoki/swtok");
        let status = Command::new("/usr/sbin/pkcsslotd").status();
        if !matches!(status, Ok(s) if s.success()) {
            return Err(format!("pkcsslotd did not start: {status:?}"));
        }
    }
    // The daemon takes a moment to answer after it starts.
    let mut last = String::new();
    for _ in 0..50 {
        let mut init = Command::new("pkcsconf")
            .args(["-I", "-c", "3", "-S", "87654321"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        use std::io::Write;
        writeln!(init.stdin.take().unwrap(), "{LABEL}").map_err(|e| e.to_string())?;
        let out = init.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            return Ok(daemon);
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(format!("pkcsconf -I failed: {last}"))
}

#[test]
fn a_token_with_odd_info_is_listed_found_and_its_refusal_reported() {
    let _daemon = match soft_token() {
        Ok(daemon) => daemon,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let world = World::new();
    let out = world.run(&["slots", "--module", MODULE]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains(LABEL) && text.contains("IBM SoftTok"),
        "{text}"
    );
    assert!(text.contains("its clock is not"), "{text}");

    world.write_config(&format!(
        "{}[[target]]\nname = \"ock\"\nmodule = \"{MODULE}\"\ntoken_label = \"{LABEL}\"\n\
         login = \"none\"\n",
        world.source("entropy")
    ));
    let out = world.run(&["once"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains(
            "C_SeedRandom: CKR_RANDOM_SEED_NOT_SUPPORTED: this token does not accept seed material"
        ),
        "{text}"
    );
    assert!(!text.contains("no token"), "{text}");
}

//! `qseed reload --pid PID`: asks the running service to re-read its configuration and waits
//! for the outcome (see [`crate::service::reload_report`]). The packaged unit's
//! `ExecReload=`, so that `systemctl reload qseed` returns when the new configuration is in
//! force and fails, with the reason, when it was refused.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::folder::StateFolder;
use crate::service::reload_report;
use crate::state::StateDir;

/// Longer than a reload may take: the 2 s spacing of reloads, 10 s of reading files, 5 s of
/// DNS for the source check, 30 s of loading modules; shorter than systemd's default 90 s.
const WAIT: Duration = Duration::from_secs(75);

pub fn reload(config_path: &Path, pid: i32) -> Result<(), Error> {
    let Some(pid) = rustix::process::Pid::from_raw(pid).filter(|p| p.as_raw_nonzero().get() > 1)
    else {
        return Err(Error::Config(format!(
            "--pid {pid}: not a service's process id (under systemd: --pid $MAINPID)"
        )));
    };
    let state = super::service_state_dir(config_path);
    let Some(path) = state.folder() else {
        return Err(Error::Failed(format!(
            "no state folder to exchange the reload's outcome through ({}); send SIGHUP \
             instead (kill -HUP {pid}) and read the outcome in the log",
            match &state {
                StateDir::Memory { why } => why.as_str(),
                StateDir::Folder(_) => "",
            },
            pid = pid.as_raw_nonzero()
        )));
    };
    let folder = StateFolder::open(path).map_err(Error::Failed)?;
    let id = request_id()?;
    reload_report::request(&folder, &id).map_err(|e| {
        Error::Failed(format!(
            "cannot write the reload request in {}: {e}",
            folder.path().display()
        ))
    })?;
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).map_err(|e| {
        Error::Failed(format!(
            "cannot signal qseed (pid {}): {e}",
            pid.as_raw_nonzero()
        ))
    })?;
    let deadline = Instant::now() + WAIT;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        match reload_report::read_status(&folder) {
            Ok(Some(status)) if status.request == id => {
                return if status.applied {
                    println!("{}", status.message);
                    Ok(())
                } else {
                    Err(Error::Config(status.message))
                };
            }
            Ok(_) => {}
            Err(e) => {
                return Err(Error::Failed(format!(
                    "cannot read the reload's outcome in {}: {e}",
                    folder.path().display()
                )))
            }
        }
        if rustix::process::test_kill_process(pid).is_err() {
            return Err(Error::Failed(format!(
                "qseed (pid {}) exited before it answered the reload; see its log",
                pid.as_raw_nonzero()
            )));
        }
        if Instant::now() >= deadline {
            return Err(Error::Failed(format!(
                "qseed (pid {}) did not answer the reload within {}s; see its log (a module \
                 or the configuration's files may be hanging)",
                pid.as_raw_nonzero(),
                WAIT.as_secs()
            )));
        }
    }
}

/// 16 random bytes in hex: no earlier answer can carry it.
fn request_id() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| Error::Failed("the system's random generator failed".into()))?;
    Ok(hex::encode(bytes))
}

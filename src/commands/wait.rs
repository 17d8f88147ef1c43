//! `qseed wait [--target NAME]... [--timeout D]`: exits 0 once every named target (default:
//! every target of the running service) has been seeded since the service started; non-zero
//! with the reason at the timeout. Services that generate keys order themselves after it (the
//! packaged `qseed-seeded.service`).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::folder::StateFolder;
use crate::service::seeded;
use crate::state::StateDir;

pub fn wait(config_path: &Path, targets: &[String], timeout: Duration) -> Result<(), Error> {
    let state = super::service_state_dir(config_path);
    let Some(dir) = state.folder() else {
        return Err(Error::Config(format!(
            "no state folder to read the service's seeds from ({}); run qseed wait as the \
             service's user (the packaged qseed-seeded.service does)",
            match &state {
                StateDir::Memory { why } => why.as_str(),
                StateDir::Folder(_) => "",
            }
        )));
    };
    let folder = StateFolder::open(dir).map_err(Error::Config)?;
    let deadline = Instant::now() + timeout;
    loop {
        let why_not = match seeded::read(&folder) {
            Err(e) => format!("cannot read {}: {e}", folder.file_path("seeded").display()),
            Ok(None) => "qseed is not running (no report in the state folder yet)".to_string(),
            Ok(Some(report)) if !seeded::is_running_qseed(report.pid) => {
                format!(
                    "qseed is not running (its last process, pid {}, has ended)",
                    report.pid
                )
            }
            Ok(Some(report)) => match missing(&report, targets) {
                None => {
                    say!(
                        "seeded since the service started: {}",
                        report
                            .targets
                            .iter()
                            .filter(|t| targets.is_empty() || targets.contains(&t.name))
                            .map(|t| t.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    return Ok(());
                }
                Some(why) => why,
            },
        };
        if Instant::now() >= deadline {
            return Err(Error::Target(format!(
                "not every target was seeded within {}: {why_not}",
                crate::units::short_duration(timeout)
            )));
        }
        std::thread::sleep(seeded::POLL);
    }
}

/// Why `report` does not yet show every wanted target seeded; `None` when it does.
fn missing(report: &seeded::Seeded, wanted: &[String]) -> Option<String> {
    if report.targets.is_empty() {
        return Some("the service has not started its targets yet".into());
    }
    let mut reasons = Vec::new();
    for name in wanted {
        if !report.targets.iter().any(|t| &t.name == name) {
            reasons.push(format!(
                "{name}: no such target in the running configuration"
            ));
        }
    }
    for t in &report.targets {
        if !wanted.is_empty() && !wanted.contains(&t.name) {
            continue;
        }
        if t.first_seeded.is_none() {
            reasons.push(match &t.stopped {
                Some(why) => format!("{}: stopped ({why})", t.name),
                None => format!("{}: not seeded yet", t.name),
            });
        }
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

//! The "seeded" gate: `qseed run` keeps `<state>/seeded` current (its pid, and for each
//! target when it was first seeded since the service started, or why it stopped), and
//! `qseed wait` reads it, so that services that generate keys can wait until every token has
//! been seeded (the packaged `qseed-seeded.service`). Rewritten whole at each change, and
//! afresh at each start: a seed of an earlier run never counts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::folder::StateFolder;

const FILE: &str = "seeded";
const LIMIT: u64 = 1024 * 1024;

/// One target's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSeeded {
    pub name: String,
    /// Unix seconds of its first seed since the service started.
    pub first_seeded: Option<u64>,
    /// Why it stopped for good, if it did.
    pub stopped: Option<String>,
}

/// What the service wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seeded {
    pub pid: u32,
    pub targets: Vec<TargetSeeded>,
}

/// Writes the service's report (one line per target, values without line breaks).
pub fn write(
    folder: &StateFolder,
    report: &[(String, Option<SystemTime>, Option<String>)],
) -> std::io::Result<()> {
    let mut text = format!("pid={}\n", std::process::id());
    for (name, first, stopped) in report {
        let first = first
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or("-".to_string(), |d| d.as_secs().to_string());
        let stopped = stopped
            .as_deref()
            .map_or(String::new(), |s| s.replace(['\n', '\r', '\t'], " "));
        text.push_str(&format!("target\t{name}\t{first}\t{stopped}\n"));
    }
    folder.write_atomic(FILE, text.as_bytes())
}

/// Reads what the service wrote, if anything.
pub fn read(folder: &StateFolder) -> std::io::Result<Option<Seeded>> {
    let Some(bytes) = folder.read(FILE, LIMIT)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut pid = 0;
    let mut targets = Vec::new();
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("pid=") {
            pid = p.trim().parse().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("target\t") {
            let mut fields = rest.splitn(3, '\t');
            let name = fields.next().unwrap_or_default().to_string();
            let first_seeded = fields.next().and_then(|f| f.parse().ok());
            let stopped = fields.next().filter(|s| !s.is_empty()).map(str::to_string);
            targets.push(TargetSeeded {
                name,
                first_seeded,
                stopped,
            });
        }
    }
    Ok(Some(Seeded { pid, targets }))
}

/// Whether `pid` is a running qseed (a pid reused by another program is not).
pub fn is_running_qseed(pid: u32) -> bool {
    pid > 1
        && std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim_end().starts_with("qseed"))
}

/// How long `qseed wait` sleeps between looks.
pub const POLL: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let folder = StateFolder::open(dir.path()).unwrap();
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        write(
            &folder,
            &[
                ("a".into(), Some(at), None),
                ("b".into(), None, Some("pin: C_Login:\nrefused".into())),
            ],
        )
        .unwrap();
        let read = read(&folder).unwrap().unwrap();
        assert_eq!(read.pid, std::process::id());
        assert_eq!(read.targets[0].first_seeded, Some(1_800_000_000));
        assert_eq!(read.targets[1].first_seeded, None);
        assert_eq!(
            read.targets[1].stopped.as_deref(),
            Some("pin: C_Login: refused")
        );
        // init is not qseed, and 0 is no process.
        assert!(!is_running_qseed(1) && !is_running_qseed(0));
    }
}

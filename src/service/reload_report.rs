//! How a reload's outcome reaches whoever asked for it: `qseed reload` (the unit's
//! `ExecReload=`) writes a fresh request id to `reload-request` in the state folder and sends
//! SIGHUP; the service reads that file when the reload begins, so the id names a reload that
//! read the configuration after the request, and writes `reload-status` (the id, `ok` or
//! `refused`, the one-line summary) when the reload is applied or refused. `systemctl reload`
//! then returns only when the new configuration is in force, and fails when it was refused.
//!
//! systemd 252 (Debian 12) has no `Type=notify-reload`: an `ExecReload=` that returns at once
//! would let systemd log "Reloaded" before the file was even read.

use crate::folder::StateFolder;

const REQUEST: &str = "reload-request";
const STATUS: &str = "reload-status";
/// A request id and a summary line, with room to spare; anything larger is not ours.
const LIMIT: u64 = 16 * 1024;

/// A finished reload, as written to `reload-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadStatus {
    /// The request the reload answered (empty: a SIGHUP sent by hand).
    pub request: String,
    pub applied: bool,
    pub message: String,
}

/// The request id waiting in `folder`, read as a reload begins.
pub fn take_request(folder: &StateFolder) -> String {
    match folder.read(REQUEST, LIMIT) {
        Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Ok(None) => String::new(),
        Err(e) => {
            tracing::debug!("reload request unreadable: {e}");
            String::new()
        }
    }
}

/// Writes a finished reload's outcome; a failure to write is logged (the reload itself
/// stands, `qseed reload` then says it got no answer).
pub fn report(folder: &StateFolder, status: &ReloadStatus) {
    // One line per field; the message is flattened to one line.
    let text = format!(
        "request={}\nresult={}\nmessage={}\n",
        status.request,
        if status.applied { "ok" } else { "refused" },
        status.message.replace(['\n', '\r'], " ")
    );
    if let Err(e) = folder.write_atomic(STATUS, text.as_bytes()) {
        tracing::warn!(
            "cannot write {}: {e}; `qseed reload` will not learn this reload's outcome",
            folder.file_path(STATUS).display()
        );
    }
}

/// Records a new request id (for [`take_request`]).
pub fn request(folder: &StateFolder, id: &str) -> std::io::Result<()> {
    folder.write_atomic(REQUEST, id.as_bytes())
}

/// The last finished reload's outcome, if any.
pub fn read_status(folder: &StateFolder) -> std::io::Result<Option<ReloadStatus>> {
    let Some(bytes) = folder.read(STATUS, LIMIT)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_default()
            .to_string()
    };
    Ok(Some(ReloadStatus {
        request: field("request"),
        applied: field("result") == "ok",
        message: field("message"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_its_answer_round_trip_through_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let folder = StateFolder::open(dir.path()).unwrap();
        assert_eq!(take_request(&folder), "");
        assert_eq!(read_status(&folder).unwrap(), None);
        request(&folder, "abc123").unwrap();
        assert_eq!(take_request(&folder), "abc123");
        let status = ReloadStatus {
            request: "abc123".into(),
            applied: false,
            message: "configuration x:\nline 3: bad".into(),
        };
        report(&folder, &status);
        let read = read_status(&folder).unwrap().unwrap();
        assert_eq!(read.request, "abc123");
        assert!(!read.applied);
        assert_eq!(read.message, "configuration x: line 3: bad");
    }
}

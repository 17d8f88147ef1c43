//! Process-wide protections for the secrets qseed holds.

/// Makes the process non-dumpable: no core dump (which would hold entropy, the API token and
/// PINs), and no `ptrace` attach by other processes of the same user.
pub fn protect_process() {
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!("cannot make the process non-dumpable (prctl PR_SET_DUMPABLE: {e})");
    }
}

/// The soft `RLIMIT_MEMLOCK`, for messages.
pub fn memlock_limit_text() -> String {
    #[cfg(target_os = "linux")]
    {
        match rustix::process::getrlimit(rustix::process::Resource::Memlock).current {
            Some(bytes) => format!("{bytes} bytes"),
            None => "unlimited".into(),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        "unknown".into()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::secret::EntropyBytes;

    #[test]
    fn the_process_becomes_non_dumpable() {
        protect_process();
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
    }

    fn locked_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn entropy_pages_are_locked_when_the_limit_allows() {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock).current;
        if limit.is_some_and(|l| l < 1024 * 1024) {
            eprintln!("RLIMIT_MEMLOCK below 1 MiB here: the lock is not checked");
            return;
        }
        let before = locked_kib();
        let bytes = EntropyBytes::zeroed(64 * 1024);
        assert!(bytes.is_locked());
        assert!(
            locked_kib() >= before + 64,
            "VmLck grew by the buffer's 64 KiB"
        );
        drop(bytes);
    }
}

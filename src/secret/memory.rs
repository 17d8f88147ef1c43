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

/// What to do about a refused `mlock`, by its cause: over the limit (ENOMEM, EAGAIN) is
/// fixed by raising the limit; EPERM means a limit of 0 without CAP_IPC_LOCK, or a policy
/// that forbids the call, which a higher limit alone may not fix.
pub fn lock_failure_hint(e: &std::io::Error) -> String {
    let limit = memlock_limit_text();
    if e.raw_os_error() == Some(libc_eperm()) {
        format!(
            "mlock was refused outright (EPERM), not for want of room: either the locked-memory \
             limit is 0 (RLIMIT_MEMLOCK is {limit}: set LimitMEMLOCK=64M in the unit or \
             `ulimit -l 65536`), or a security policy forbids mlock (a container started \
             without CAP_IPC_LOCK, such as systemd-nspawn without --capability=CAP_IPC_LOCK or \
             a Kubernetes pod without IPC_LOCK; a SystemCallFilter= without @memlock)"
        )
    } else {
        format!(
            "The locked-memory limit is too small (RLIMIT_MEMLOCK, now {limit}): raise it with \
             LimitMEMLOCK= in the systemd unit (pool.max_bytes plus slack) or `ulimit -l`"
        )
    }
}

/// EPERM's number (1 on every Linux architecture).
fn libc_eperm() -> i32 {
    rustix::io::Errno::PERM.raw_os_error()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::secret::EntropyBytes;

    /// Issue 22, item 7: EPERM is not told to raise the limit alone.
    #[test]
    fn an_mlock_refused_with_eperm_names_the_policy_not_only_the_limit() {
        let eperm = std::io::Error::from_raw_os_error(1);
        let hint = lock_failure_hint(&eperm);
        assert!(
            hint.contains("EPERM") && hint.contains("CAP_IPC_LOCK"),
            "{hint}"
        );
        let enomem = std::io::Error::from_raw_os_error(12);
        let hint = lock_failure_hint(&enomem);
        assert!(
            hint.contains("too small") && !hint.contains("EPERM"),
            "{hint}"
        );
    }

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

//! The host kernel as a target (`[[target]] kind = "kernel"`): bytes from the same pool as the
//! HSMs go into the kernel's input pool with `ioctl(RNDADDENTROPY)` on `/dev/urandom`, then
//! `ioctl(RNDRESEEDCRNG)` makes the kernel's generator reseed from it at once, so the next
//! `getrandom()` output depends on them.
//!
//! - `credit`: RNDADDENTROPY's entropy count. `none` (the default) mixes the bytes in without
//!   claiming any entropy for them; `full` claims 8 bits per byte, which only an operator who
//!   trusts the source may say.
//! - Both calls need CAP_SYS_ADMIN (the unit grants it only where a kernel target is
//!   configured: see the README). Without it the kernel answers EPERM, which is a target
//!   stopped with the fix, not retried.
//! - RNDRESEEDCRNG exists from Linux 4.17; since 5.18 it reseeds the generator immediately
//!   (crng_reseed). On older kernels (ENOTTY/EINVAL) the bytes are mixed in and take effect at
//!   the kernel's next scheduled reseed, which is said once.
//!
//! The only `unsafe` outside `hsm::ffi`: the two ioctls, each with its SAFETY argument.

use std::os::fd::AsRawFd;

/// `_IOW('R', 0x03, int[2])`: the request number carries the size of the fixed header.
mod ioctls {
    nix::ioctl_write_ptr!(rnd_add_entropy, b'R', 0x03, [libc_int; 2]);
    nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);
    #[allow(non_camel_case_types)]
    pub type libc_int = std::ffi::c_int;
}

/// How much entropy the kernel is told the bytes carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Credit {
    /// Mixed in, no entropy claimed.
    #[default]
    None,
    /// 8 bits per byte: the operator says the source is trusted.
    Full,
}

/// What happened after the bytes were added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reseeded {
    /// RNDRESEEDCRNG: the generator reseeded now.
    Now,
    /// This kernel has no RNDRESEEDCRNG (before 4.17): at its next scheduled reseed.
    AtNextReseed,
}

/// Why the kernel refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// EPERM: no CAP_SYS_ADMIN.
    NotPermitted,
    Other(String),
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelError::NotPermitted => write!(
                f,
                "the kernel refused RNDADDENTROPY (EPERM): qseed needs CAP_SYS_ADMIN for a kernel \
                 target. Under systemd add a drop-in with CapabilityBoundingSet=CAP_SYS_ADMIN and \
                 AmbientCapabilities=CAP_SYS_ADMIN (see the README, \"The host kernel as a \
                 target\"); elsewhere run qseed as root"
            ),
            KernelError::Other(e) => write!(f, "{e}"),
        }
    }
}

const DEVICE: &str = "/dev/urandom";

/// Adds `bytes` to the kernel's input pool and asks for a reseed.
pub fn inject(bytes: &[u8], credit: Credit) -> Result<Reseeded, KernelError> {
    let device = std::fs::OpenOptions::new()
        .write(true)
        .open(DEVICE)
        .map_err(|e| KernelError::Other(format!("cannot open {DEVICE}: {e}")))?;
    let words = bytes.len().div_ceil(4);
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, in u32 words
    // so that the header and the buffer are aligned as the kernel reads them.
    let mut info = zeroize::Zeroizing::new(vec![0u32; 2 + words]);
    let count = match credit {
        Credit::None => 0,
        Credit::Full => bytes.len() * 8,
    };
    let to_int = |n: usize| {
        ioctls::libc_int::try_from(n).map_err(|_| KernelError::Other("seed too large".into()))
    };
    info[0] = to_int(count)? as u32;
    info[1] = to_int(bytes.len())? as u32;
    // Native-endian words hold the bytes in memory order: the buffer reads as `bytes`.
    for (word, chunk) in info[2..].iter_mut().zip(bytes.chunks(4)) {
        let mut four = [0u8; 4];
        four[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_ne_bytes(four);
        zeroize::Zeroize::zeroize(&mut four);
    }
    let fd = device.as_raw_fd();
    #[allow(unsafe_code)]
    // SAFETY: `fd` is an open descriptor of /dev/urandom that lives across the call; `info`
    // points to 8 + 4 * words bytes laid out as struct rand_pool_info (two ints, then
    // buf_size = bytes.len() <= 4 * words bytes), and the kernel reads at most
    // 8 + buf_size bytes from it and writes nothing.
    let added = unsafe { ioctls::rnd_add_entropy(fd, info.as_ptr().cast()) };
    match added {
        Ok(_) => {}
        Err(nix::errno::Errno::EPERM) => return Err(KernelError::NotPermitted),
        Err(e) => return Err(KernelError::Other(format!("RNDADDENTROPY: {e}"))),
    }
    #[allow(unsafe_code)]
    // SAFETY: RNDRESEEDCRNG takes no argument; `fd` is open for the call.
    let reseeded = unsafe { ioctls::rnd_reseed_crng(fd) };
    match reseeded {
        Ok(_) => Ok(Reseeded::Now),
        Err(nix::errno::Errno::ENOTTY | nix::errno::Errno::EINVAL) => Ok(Reseeded::AtNextReseed),
        Err(nix::errno::Errno::EPERM) => Err(KernelError::NotPermitted),
        Err(e) => Err(KernelError::Other(format!("RNDRESEEDCRNG: {e}"))),
    }
}

/// Whether this process may seed the kernel: RNDADDENTROPY of nothing, which the kernel
/// checks for CAP_SYS_ADMIN like any other (doctor).
pub fn check_permission() -> Result<(), KernelError> {
    inject(&[], Credit::None).map(|_| ())
}

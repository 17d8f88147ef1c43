//! qseed downloads quantum entropy and injects it into PKCS#11 HSMs with `C_SeedRandom`.
//!
//! The data path, one module per stage:
//!
//! ```text
//!   source ──KiB blocks──▶ pool ──exactly `size` bytes, once──▶ target (C_SeedRandom)
//!      ▲                     ▲                                      ▲
//!      └──────────── service: one loop per target, on its period ───┘
//! ```
//!
//! - [`source`]: the Qrypt entropy API client (both dialects) and the strict answer parser.
//! - [`pool`]: the local buffer; hands every downloaded byte out once, wipes what it drops.
//! - [`hsm`]: PKCS#11 modules (their gates and recovery), finding tokens, sessions, the PIN
//!   guard, login and seeding; the table of known vendor modules.
//! - [`kernel`]: the host kernel as a target (`RNDADDENTROPY`, `RNDRESEEDCRNG`).
//! - [`service`]: the period loops, rounds, shutdown.
//! - [`config`]: the TOML file, checked in two stages (shape, then resolved secrets and paths).
//! - [`simulator`]: a local stand-in for the entropy API, for tests and the demo only.
//! - [`files`]: bounded reads of the files an operator names (regular files only).
//! - [`commands`]: what each CLI subcommand does; [`cli`] parses the command line.
// Two functions of `hsm::ffi` and the two ioctls of `kernel` may use `unsafe`, each block with
// its SAFETY argument; everything else is denied it.
#![deny(unsafe_code)]
#![warn(missing_debug_implementations)]

/// `println!` that never panics: a closed standard output (`qseed slots | head -1`) is no
/// reason to crash.
macro_rules! say {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that never panics on a closed standard error.
macro_rules! tell {
    ($($arg:tt)*) => {{
        $crate::telemetry::log_batch::write_now(format_args!("{}\n", format_args!($($arg)*)));
    }};
}

pub mod cli;
pub mod commands;
pub mod config;
pub mod error;
pub mod files;
pub mod folder;
pub mod health;
pub mod hsm;
pub mod kernel;
pub mod pool;
pub mod repeat;
pub mod secret;
pub mod service;
pub mod simulator;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod trust;
pub mod units;

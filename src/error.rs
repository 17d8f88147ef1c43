//! The top-level error of a command, and the exit codes it maps to.

use std::process::ExitCode;

/// Exit codes, documented in the README and `qseed --help`.
pub mod exit {
    /// Everything asked for was done.
    pub const OK: u8 = 0;
    /// Something went wrong at run time (a target or the source failed).
    pub const FAILURE: u8 = 1;
    /// The command line or the configuration is wrong; nothing was attempted.
    pub const CONFIG: u8 = 2;
    /// A target was not seeded because no entropy could be had from the source.
    pub const SOURCE: u8 = 3;
    /// A target failed on the HSM side (PKCS#11), or every target has stopped.
    pub const TARGET: u8 = 4;
}

/// What ended a command early, already worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Source(String),
    #[error("{0}")]
    Target(String),
}

impl Error {
    pub fn exit_status(&self) -> u8 {
        match self {
            Error::Config(_) => exit::CONFIG,
            Error::Failed(_) => exit::FAILURE,
            Error::Source(_) => exit::SOURCE,
            Error::Target(_) => exit::TARGET,
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.exit_status())
    }
}

impl From<crate::config::ConfigError> for Error {
    fn from(e: crate::config::ConfigError) -> Self {
        Error::Config(e.to_string())
    }
}

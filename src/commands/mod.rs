//! One module per subcommand. Each returns `Err` with an operator-ready message; `cli` turns it
//! into an exit code.

pub mod assets;
pub mod audit;
pub mod check;
pub mod demo;
pub mod doctor;
pub mod fetch;
pub mod manual;
pub mod migrate;
pub mod reload;
pub mod run;
pub mod simulator;
pub mod slots;
pub mod wait;

/// The state folder of the service a helper command talks to (`reload`, `wait`, `audit`):
/// under systemd the unit's `$STATE_DIRECTORY`, which the service has too; by hand the
/// configuration's `[service] state_dir` when the file still parses (a file being fixed need
/// not parse for these commands to work).
pub fn service_state_dir(config_path: &std::path::Path) -> crate::state::StateDir {
    let configured = if std::env::var_os("STATE_DIRECTORY").is_some() {
        None
    } else {
        crate::config::load(config_path)
            .ok()
            .and_then(|c| c.state_dir.clone())
    };
    crate::state::StateDir::resolve(configured.as_deref())
}

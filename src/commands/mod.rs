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

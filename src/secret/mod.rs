//! Memory for secrets, below every stage that handles entropy (source, pool, hsm): buffers in
//! their own anonymous mappings, locked in RAM, kept out of core dumps and wiped before they are
//! unmapped ([`EntropyBytes`]); and the process-wide protections ([`memory`]).

mod bytes;
pub mod memory;

pub use bytes::{lock_failures, EntropyBytes};

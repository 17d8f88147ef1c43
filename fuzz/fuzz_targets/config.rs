//! The configuration file (TOML, or the old YAML when it looks like it) through both stages:
//! shape, then resolution. Paths resolve against a folder that does not exist, so no file
//! outside the input is ever read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = qseed::config::parse_from(text, Path::new("/nonexistent/qseed-fuzz"), Vec::new());
});

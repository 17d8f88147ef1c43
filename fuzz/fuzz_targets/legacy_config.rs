//! Qrypt's qseed YAML configuration, read at the event level.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = qseed::config::legacy::parse(text) {
        let _ = config.into_raw();
    }
});

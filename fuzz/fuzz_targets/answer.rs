//! The entropy API's answer parser, both dialects: any body must give blocks of exactly the
//! asked size or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qseed::source::{answer, Dialect};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the dialect and the asked shape; the rest is the body.
    let Some((&shape, body)) = data.split_first() else {
        return;
    };
    let dialect = if shape & 1 == 0 {
        Dialect::QuantumEntropy
    } else {
        Dialect::Entropy
    };
    let blocks = usize::from((shape >> 1) & 0x3) + 1;
    let block_len = if shape & 0x80 == 0 { 1024 } else { 3 };
    if let Ok(bytes) = answer::parse(dialect, body, blocks, block_len) {
        assert_eq!(bytes.len(), blocks * block_len);
    }
});

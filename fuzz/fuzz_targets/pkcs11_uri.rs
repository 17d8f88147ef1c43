//! RFC 7512 PKCS#11 URIs: any text parses or is refused, and a parsed URI printed back parses
//! to the same URI.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qseed::config::uri::Pkcs11Uri;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(uri) = Pkcs11Uri::parse(text) {
        let shown = uri.to_string();
        let again = Pkcs11Uri::parse(&shown).expect("a printed URI parses again");
        assert_eq!(again.to_string(), shown);
    }
});

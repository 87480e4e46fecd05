//! Arbitrary text as a domain file: loading must give a domain or errors,
//! never a panic (DESIGN.md: bad input is an error, never a crash).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = cqrsd::domain::Domain::from_toml_str(text);
    }
});

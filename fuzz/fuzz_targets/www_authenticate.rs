//! A registry's `WWW-Authenticate` header (any registry may send any bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    let _ = berth::fuzzing::www_authenticate(input);
});

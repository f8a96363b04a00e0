//! A manifest or index body as a registry serves it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let _ = berth::fuzzing::manifest(input);
});

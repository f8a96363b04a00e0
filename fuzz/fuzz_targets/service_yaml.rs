//! A service file given to `berth service create --file`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    let _ = berth::fuzzing::service_yaml(input);
});

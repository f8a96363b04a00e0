//! OpenBao's `created_time` in a KV v2 answer (the secret store may send any string).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    let _ = berth::fuzzing::openbao_created_time(input);
});

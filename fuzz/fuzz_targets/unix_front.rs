//! The unix socket's HTTP/2 front (`api/front.rs`) on a client's byte stream: the preface,
//! frame headers, header blocks (HPACK with the client's dynamic table) and payloads.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if let Some(output) = berth::fuzzing::unix_front(input) {
        // What the server reads starts with the preface whenever anything came through.
        assert!(output.is_empty() || output.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
    }
});

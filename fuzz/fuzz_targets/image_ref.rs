//! An order's image reference (`container.image`, PullImage's `image`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    if let Some(name) = berth::fuzzing::image_ref(input) {
        // What parses goes into containerd image names, labels and URLs.
        assert!(
            !name.chars().any(|c| c.is_whitespace() || c.is_control()),
            "{name:?}"
        );
    }
});

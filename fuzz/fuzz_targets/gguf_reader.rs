//! Arbitrary bytes into the GGUF reader: it must return `Ok` or `Err`, never panic, read out of
//! bounds or allocate without bound (string lengths and array counts are capped by the input's
//! length).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = convert::gguf::validate_bytes(data);
});

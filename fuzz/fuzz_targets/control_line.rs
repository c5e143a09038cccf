//! cargo-fuzz target `control_line`: the harness and its invariants are `vmq_fuzzing::control_line`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmq_fuzzing::control_line(data));

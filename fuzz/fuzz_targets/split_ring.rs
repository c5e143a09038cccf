//! cargo-fuzz target `split_ring`: the harness and its invariants are `vmq_fuzzing::split_ring`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmq_fuzzing::split_ring(data));

//! cargo-fuzz target `packed_ring`: the harness and its invariants are `vmq_fuzzing::packed_ring`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmq_fuzzing::packed_ring(data));

//! cargo-fuzz target `xsk_ring`: the harness and its invariants are `vmq_fuzzing::xsk_ring`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmq_fuzzing::xsk_ring(data));

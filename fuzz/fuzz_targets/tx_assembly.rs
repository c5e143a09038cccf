//! cargo-fuzz target `tx_assembly`: the harness and its invariants are `vmq_fuzzing::tx_assembly`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmq_fuzzing::tx_assembly(data));

//! cargo-fuzz target `rx_writer`: the harness and its invariants are `vmq_fuzzing::rx_writer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmq_fuzzing::rx_writer(data));

//! cargo-fuzz target `config_file`: the harness and its invariants are `vmq_fuzzing::config_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmq_fuzzing::config_file(data));

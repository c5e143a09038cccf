//! cargo-fuzz target `qmp_session`: the harness and its invariants are `vmq_fuzzing::qmp_session`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmq_fuzzing::qmp_session(data));

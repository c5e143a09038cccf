//! cargo-fuzz target `vhost_messages`: the harness and its invariants are `vmq_fuzzing::vhost_messages`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmq_fuzzing::vhost_messages(data));

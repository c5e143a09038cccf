//! cargo-fuzz target `vnet_offload`: the harness and its invariants are `vmq_fuzzing::vnet_offload`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmq_fuzzing::vnet_offload(data));

//! Shared by the property tests: the case count (10,000 unless PROPTEST_CASES says otherwise).
#![allow(dead_code)] // each test file uses a different part

use proptest::prelude::*;

pub fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 10_000;
    }
    config
}

/// Overwrites a few bytes of `data` (positions taken modulo its length).
pub fn mutate(data: &mut [u8], edits: &[(usize, u8)]) {
    if data.is_empty() {
        return;
    }
    let len = data.len();
    for &(at, byte) in edits {
        data[at % len] = byte;
    }
}

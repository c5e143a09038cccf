//! `packed_ring` as a property test: plausible descriptor rings (flags around the AVAIL/USED
//! bits, chains, indirect tables) with bytes overwritten, and raw memory images.

mod common;

use proptest::prelude::*;
use vmq_fuzzing::packed_ring::{encode, packed_ring};
use vmq_fuzzing::seeds;

fn desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    (
        prop_oneof![0x3000u64..0x4000, any::<u64>()],
        prop_oneof![0u32..64, Just(16u32), Just(32), 0u32..4096, any::<u32>()],
        prop_oneof![0u16..8, any::<u16>()],
        prop_oneof![Just(0x80u16), Just(0x81), Just(0x84), Just(0x82), Just(0x8000), any::<u16>()],
    )
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn packed_ring_structured(
        size in prop_oneof![1u16..=8, 1u16..=64],
        base in any::<u16>(),
        event_idx in any::<bool>(),
        descs in proptest::collection::vec(desc(), 0..16),
        table in proptest::collection::vec(desc(), 0..8),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
    ) {
        let table: Vec<u8> = table.iter().flat_map(|&(a, l, i, f)| {
            let mut d = a.to_le_bytes().to_vec();
            d.extend_from_slice(&l.to_le_bytes());
            d.extend_from_slice(&i.to_le_bytes());
            d.extend_from_slice(&f.to_le_bytes());
            d
        }).collect();
        let mut input = encode(size, base, event_idx, &descs, &[(0x3000, table)]);
        common::mutate(&mut input, &edits);
        packed_ring(&input);
    }

    #[test]
    fn packed_ring_raw(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
        packed_ring(&input);
    }
}

#[test]
fn seeds_run() {
    for (_, seed) in seeds::packed_ring() {
        packed_ring(&seed);
    }
}

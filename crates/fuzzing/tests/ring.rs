//! `split_ring` as a property test: descriptor tables of plausible descriptors (addresses in
//! guest memory or not, chains, loops, indirect tables), and raw memory images.

mod common;

use proptest::prelude::*;
use vmq_fuzzing::ring::{Desc, RingOutcome, encode, run_split_ring};
use vmq_fuzzing::seeds;

fn desc() -> impl Strategy<Value = Desc> {
    (
        prop_oneof![0x3000u64..0x4000, 0u64..0x4000, any::<u64>()],
        prop_oneof![0u32..64, Just(16u32), Just(32), Just(64), 0u32..4096, any::<u32>()],
        prop_oneof![0u16..8, any::<u16>()],
        prop_oneof![0u16..8, any::<u16>()],
    )
        .prop_map(|(addr, len, flags, next)| Desc { addr, len, flags, next })
}

fn structured() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..9,
        prop_oneof![Just(0u16), any::<u16>()],
        proptest::collection::vec(desc(), 0..16),
        proptest::collection::vec(prop_oneof![0u16..8, any::<u16>()], 0..12),
        proptest::collection::vec(
            (prop_oneof![0x3000u64..0x4000, 0u64..0x4000], proptest::collection::vec(desc(), 0..8)),
            0..3,
        ),
    )
        .prop_map(|(log2, start, descs, heads, tables)| encode(log2, start, &descs, &heads, &tables))
}

proptest! {
    #![proptest_config(common::config())]

    /// Plausible rings, a third of them with a few bytes overwritten.
    #[test]
    fn split_ring(mut input in structured(), edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..12)) {
        common::mutate(&mut input, &edits[..edits.len().saturating_sub(8)]);
        run_split_ring(&input);
    }
}

#[test]
fn seeds_reach_each_outcome() {
    let outcome = |name: &str| {
        let (_, input) = seeds::split_ring().into_iter().find(|(n, _)| *n == name).expect("seed");
        run_split_ring(&input)
    };
    assert_eq!(outcome("direct-chains"), RingOutcome { chains: 2, bad_chains: 0, bad_index: false });
    assert_eq!(outcome("indirect"), RingOutcome { chains: 2, bad_chains: 0, bad_index: false });
    assert_eq!(outcome("loop"), RingOutcome { chains: 0, bad_chains: 1, bad_index: false });
    assert_eq!(outcome("wrapped-start"), RingOutcome { chains: 2, bad_chains: 0, bad_index: false });
    assert_eq!(outcome("bad-avail-index"), RingOutcome { chains: 0, bad_chains: 0, bad_index: true });
}

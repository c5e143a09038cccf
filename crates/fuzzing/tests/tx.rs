//! `tx_assembly` as a property test: TX chains of plausible descriptors (mostly readable
//! buffers in the frame area, small and big, direct and indirect), over one or two memory
//! regions, popped into buffers of every size.

mod common;

use proptest::prelude::*;
use vmq_fuzzing::ring::{Desc, encode as ring};
use vmq_fuzzing::seeds;
use vmq_fuzzing::tx::{TxOutcome, encode, run_tx_assembly};

fn desc() -> impl Strategy<Value = Desc> {
    (
        prop_oneof![4 => 0x3000u64..0x4000, 1 => 0u64..0x4000, 1 => any::<u64>()],
        prop_oneof![2 => 0u32..64, 2 => 400u32..1600, 1 => Just(12u32), 1 => Just(16u32), 1 => any::<u32>()],
        prop_oneof![4 => 0u16..2, 1 => 0u16..8, 1 => any::<u16>()],
        prop_oneof![0u16..8, any::<u16>()],
    )
        .prop_map(|(addr, len, flags, next)| Desc { addr, len, flags, next })
}

fn structured() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        0u8..9,
        prop_oneof![Just(0u16), any::<u16>()],
        proptest::collection::vec(desc(), 0..16),
        proptest::collection::vec(prop_oneof![0u16..8, any::<u16>()], 0..12),
        proptest::collection::vec(
            (prop_oneof![0x2800u64..0x3000, 0u64..0x4000], proptest::collection::vec(desc(), 0..8)),
            0..3,
        ),
    )
        .prop_map(|(mode, log2, start, descs, heads, tables)| {
            let frame: Vec<u8> = (0..0x1000u32).map(|i| (i * 13 + 5) as u8).collect();
            encode(mode, &ring(log2, start, &descs, &heads, &tables), &[(0x3000, &frame)])
        })
}

proptest! {
    #![proptest_config(common::config())]

    /// Plausible TX rings, some with a few bytes overwritten.
    #[test]
    fn tx_assembly(mut input in structured(), edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..12)) {
        common::mutate(&mut input, &edits[..edits.len().saturating_sub(8)]);
        run_tx_assembly(&input);
    }
}

#[test]
fn seeds_reach_each_outcome() {
    let outcome = |name: &str| {
        let (_, input) = seeds::tx_assembly().into_iter().find(|(n, _)| *n == name).expect("seed");
        run_tx_assembly(&input)
    };
    let none = TxOutcome::default();
    assert_eq!(outcome("small-and-split"), TxOutcome { whole: 1, split: 1, ..none });
    assert_eq!(outcome("indirect-split"), TxOutcome { split: 1, ..none });
    assert_eq!(outcome("straddles-regions"), TxOutcome { whole: 1, ..none });
    assert_eq!(outcome("errors"), TxOutcome { bad_descriptor: 1, too_long: 2, bad_header: 1, ..none });
}

/// Found by `bench/fuzz.sh tx_assembly` (fuzz/artifacts/tx_assembly/crash-492165b5...).
#[test]
fn fuzz_crash_492165b5() {
    let input: &[u8] = &[
        255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 0, 0, 44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 137, 137,
        0, 51, 0, 0, 0, 0, 0, 0, 220, 5, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
        255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
        255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 0, 16, 0, 0, 248, 255,
        255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0,
    ];
    run_tx_assembly(input);
}

/// Found by `bench/fuzz.sh tx_assembly` (fuzz/artifacts/tx_assembly/crash-de75d3fe...).
#[test]
fn fuzz_crash_de75d3fe() {
    let input: &[u8] = &[
        55, 71, 240, 255, 0, 0, 0, 0, 0, 0, 0, 0, 12, 56, 0, 0, 1, 0, 1, 0, 244, 0, 92, 0, 1, 64, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 16, 35,
    ];
    run_tx_assembly(input);
}

//! `rx_writer` as a property test: RX rings of plausible descriptors (mostly device-writable
//! buffers in the buffer area, direct and indirect), frames of every size, with and without
//! MRG_RXBUF, a sender's tail and two memory regions.

mod common;

use proptest::prelude::*;
use vmq_fuzzing::ring::{Desc, encode as ring};
use vmq_fuzzing::rx::{Frame, MAX_FRAME, RxOutcome, encode, run_rx_writer};
use vmq_fuzzing::seeds;

fn desc() -> impl Strategy<Value = Desc> {
    (
        prop_oneof![4 => 0x2800u64..0x4000, 1 => 0u64..0x4000, 1 => any::<u64>()],
        prop_oneof![2 => 0u32..64, 3 => 64u32..2048, 1 => any::<u32>()],
        prop_oneof![4 => 2u16..4, 1 => 0u16..8, 1 => any::<u16>()],
        prop_oneof![0u16..8, any::<u16>()],
    )
        .prop_map(|(addr, len, flags, next)| Desc { addr, len, flags, next })
}

fn frame() -> impl Strategy<Value = Frame> {
    (prop_oneof![0u16..128, 0u16..MAX_FRAME as u16], any::<u16>(), any::<u8>(), any::<u8>(), any::<u16>())
        .prop_map(|(len, cut, flags, gso_type, gso_size)| Frame { len, cut, flags, gso_type, gso_size })
}

fn structured() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        proptest::collection::vec(frame(), 0..6),
        0u8..9,
        prop_oneof![Just(0u16), any::<u16>()],
        proptest::collection::vec(desc(), 0..16),
        proptest::collection::vec(prop_oneof![0u16..8, any::<u16>()], 0..12),
        proptest::collection::vec(
            (prop_oneof![0x2800u64..0x3000, 0u64..0x4000], proptest::collection::vec(desc(), 0..8)),
            0..3,
        ),
    )
        .prop_map(|(mode, frames, log2, start, descs, heads, tables)| {
            encode(mode, &frames, &ring(log2, start, &descs, &heads, &tables))
        })
}

proptest! {
    #![proptest_config(common::config())]

    /// Plausible RX rings and frames, some with a few bytes overwritten.
    #[test]
    fn rx_writer(mut input in structured(), edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..12)) {
        common::mutate(&mut input, &edits[..edits.len().saturating_sub(8)]);
        run_rx_writer(&input);
    }
}

#[test]
fn seeds_reach_each_outcome() {
    let outcome = |name: &str| {
        let (_, input) = seeds::rx_writer().into_iter().find(|(n, _)| *n == name).expect("seed");
        run_rx_writer(&input)
    };
    let none = RxOutcome::default();
    assert_eq!(outcome("mrg-two-chains"), RxOutcome { delivered: 1, chains: 2, ..none });
    assert_eq!(outcome("too-long-without-mrg"), RxOutcome { delivered: 1, chains: 1, too_long: 1, ..none });
    assert_eq!(outcome("no-buffer"), RxOutcome { delivered: 1, chains: 1, no_buffer: 2, ..none });
    assert_eq!(outcome("readable-chain"), RxOutcome { bad_descriptor: 1, ..none });
    assert_eq!(outcome("tail-indirect"), RxOutcome { delivered: 1, chains: 1, ..none });
    assert_eq!(outcome("straddles-regions"), RxOutcome { delivered: 1, chains: 1, ..none });
    assert_eq!(outcome("overwrites-own-avail-index"), RxOutcome { delivered: 1, chains: 1, ring_broken: 2, ..none });
}

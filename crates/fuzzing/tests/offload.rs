//! `vnet_offload` as a property test: real GSO/checksum/UDP frames with a few bytes changed,
//! and raw bytes.

mod common;

use proptest::prelude::*;
use vmq_fuzzing::offload::{OffloadOutcome, decode_caps, encode, run_vnet_offload};
use vmq_fuzzing::seeds;
use vmq_offload::OffloadError;
use vmq_wire::VnetHdr;

fn structured() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        0usize..3000,
        prop_oneof![1u16..64, 64u16..2000, Just(1448)],
        any::<u8>(),
        prop_oneof![Just(68u16), Just(1500), Just(9000), any::<u16>()],
        0u8..3,
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    )
        .prop_map(|(v6, len, mss, caps, mtu, kind, edits)| {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let (hdr, frame) = match kind {
                0 => seeds::gso_frame(v6, &payload, mss),
                1 => seeds::partial_csum_frame(v6, &payload),
                _ => (VnetHdr::default(), seeds::tcp_frame(v6, 7, &payload, false)),
            };
            let mut input = encode(decode_caps(caps), mtu, &hdr, &frame);
            common::mutate(&mut input, &edits);
            input
        })
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn vnet_offload_structured(input in structured()) {
        run_vnet_offload(&input);
    }

    #[test]
    fn vnet_offload_raw(input in proptest::collection::vec(any::<u8>(), 0..256)) {
        run_vnet_offload(&input);
    }
}

/// The harness reaches every outcome from its seeds (a harness that stops early fails here).
#[test]
fn seeds_reach_each_outcome() {
    let outcome = |name: &str| {
        let (_, input) = seeds::vnet_offload().into_iter().find(|(n, _)| *n == name).expect("seed");
        run_vnet_offload(&input)
    };
    assert_eq!(outcome("gso-v4-to-no-tso"), OffloadOutcome::Segmented(3));
    assert_eq!(outcome("gso-v4-to-csum-only"), OffloadOutcome::Segmented(3));
    assert_eq!(outcome("gso-v6-to-tso"), OffloadOutcome::Passed);
    assert_eq!(outcome("gso-v6-min-mss"), OffloadOutcome::Segmented(35));
    assert_eq!(outcome("gso-v6-below-min-mss"), OffloadOutcome::Refused(vmq_offload::OffloadError::GsoSizeTooSmall));
    assert_eq!(outcome("partial-csum-to-no-csum"), OffloadOutcome::CsumFinished);
    assert_eq!(outcome("udp-data-valid"), OffloadOutcome::Passed);
    assert_eq!(outcome("tcp-oversize"), OffloadOutcome::Oversize);
    assert_eq!(run_vnet_offload(&[0; 20]), OffloadOutcome::Passed);
    let (g, f) = seeds::gso_frame(false, &[1; 100], 10);
    let refused = run_vnet_offload(&encode(
        vmq_offload::OffloadCaps::NONE,
        1500,
        &VnetHdr { gso_type: vmq_wire::vnet::GsoType::Udp.to_raw(), ..g },
        &f,
    ));
    assert_eq!(refused, OffloadOutcome::Refused(OffloadError::NotTcp));
}

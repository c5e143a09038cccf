//! `xsk_ring` as a property test: ring sizes up to 4096, indices near the wrap and far off,
//! descriptors in, at the edge of and outside the UMEM.

use proptest::prelude::*;

fn step() -> impl Strategy<Value = (u8, u32, u64, u32)> {
    (
        any::<u8>(),
        prop_oneof![0u32..16, u32::MAX - 16..=u32::MAX, any::<u32>()],
        prop_oneof![0u64..0x4000, any::<u64>()],
        prop_oneof![0u32..32, 200u32..300, any::<u32>()],
    )
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    (any::<u8>(), any::<u8>(), any::<u32>(), any::<u32>(), proptest::collection::vec(step(), 0..24)).prop_map(
        |(size, chunks, cons, prod, steps)| {
            let mut b = vmq_fuzzing::InputBuilder::default();
            b.u8(size).u8(chunks).u32(cons).u32(prod);
            for (kind, index, addr, len) in steps {
                b.u8(kind).u32(index).u64(addr).u32(len);
            }
            b.bytes
        },
    )
}

proptest! {
    #[test]
    fn xsk_ring_indices_and_descriptors(data in input()) {
        vmq_fuzzing::xsk_ring(&data);
    }

    #[test]
    fn xsk_ring_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        vmq_fuzzing::xsk_ring(&data);
    }
}

#[test]
fn seeds_hold() {
    for (_, seed) in vmq_fuzzing::seeds::xsk_ring() {
        vmq_fuzzing::xsk_ring(&seed);
    }
}

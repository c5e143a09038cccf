//! The packed-ring device side (`packed_ring`) against the in-process packed driver: chains,
//! indirect tables, out-of-order completion across many wraps, hostile descriptors, event
//! suppression, the vhost-user position encoding, and the RX writer / TX pop on a packed ring.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use proptest::prelude::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmq_datapath::driver::BufferSpec;
use vmq_datapath::packed_driver::{PackedRingDriver, RawDesc};
use vmq_datapath::port::GuestTail;
use vmq_datapath::ring::{Memory, Ring, RingError, RingState};
use vmq_datapath::virtio::{RxWriter, VirtioError, pop_tx_split};
use vmq_wire::VnetHdr;

const BUFS: u64 = 0x1_0000;
const TABLES: u64 = 0x8000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

fn setup(size: u16) -> (Memory, PackedRingDriver, RingState) {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
    let (mut driver, _) = PackedRingDriver::new(size, GuestAddress(0));
    driver.init(&mem).unwrap();
    let state = driver.device_state(false);
    (mem, driver, state)
}

fn buf(i: u64, len: u32, device_writes: bool) -> BufferSpec {
    BufferSpec { addr: GuestAddress(BUFS + i * 0x100), len, device_writes }
}

#[test]
fn chains_and_indirect_tables_round_trip() {
    let (mem, mut driver, mut state) = setup(8);
    let a = driver.add_chain(&mem, &[buf(0, 10, false), buf(1, 20, false)]).unwrap();
    let b = driver.add_indirect(&mem, GuestAddress(TABLES), &[buf(2, 30, true), buf(3, 40, true)]).unwrap();
    let mut ring = Ring::open(&mem, &mut state).unwrap();
    assert_eq!(ring.pending(), Ok(1));
    let mut segs = Vec::new();
    assert_eq!(ring.pop(&mut segs), Ok(Some(a)));
    assert_eq!(
        segs.iter().map(|s| (s.addr.0, s.len, s.write)).collect::<Vec<_>>(),
        vec![(BUFS, 10, false), (BUFS + 0x100, 20, false)]
    );
    assert_eq!(ring.pop(&mut segs), Ok(Some(b)));
    assert_eq!(segs.iter().map(|s| (s.len, s.write)).collect::<Vec<_>>(), vec![(30, true), (40, true)]);
    assert_eq!(ring.pop(&mut segs), Ok(None));
    // Out of order: b first.
    ring.add_used(b, 70);
    ring.add_used(a, 0);
    assert_eq!(driver.pop_used(&mem), None, "nothing visible before publish");
    ring.publish();
    assert_eq!(driver.pop_used(&mem), Some((b, 70)));
    assert_eq!(driver.pop_used(&mem), Some((a, 0)));
    assert_eq!(driver.pop_used(&mem), None);
    // The device used 3 descriptors (2 + the indirect one).
    assert_eq!(ring.position(), (3, 3));
}

#[test]
fn many_wraps_with_out_of_order_completion() {
    let (mem, mut driver, mut state) = setup(4);
    let mut segs = Vec::new();
    for round in 0..50u64 {
        // A 3-descriptor chain and a 1-descriptor chain: positions wrap at odd places.
        let x = driver.add_chain(&mem, &[buf(0, 1, false), buf(1, 2, false), buf(2, 3, false)]).unwrap();
        let y = driver.add_chain(&mem, &[buf(3, 4 + round as u32, true)]);
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        assert_eq!(ring.pop(&mut segs), Ok(Some(x)), "round {round}");
        assert_eq!(segs.len(), 3);
        // The ring has 4 slots: the single chain only fits once the first is returned.
        let y = match y {
            Some(y) => {
                assert_eq!(ring.pop(&mut segs), Ok(Some(y)));
                ring.add_used(y, 9);
                Some(y)
            }
            None => None,
        };
        ring.add_used(x, 6);
        drop(ring);
        if let Some(y) = y {
            assert_eq!(driver.pop_used(&mem), Some((y, 9)), "round {round}");
        }
        assert_eq!(driver.pop_used(&mem), Some((x, 6)), "round {round}");
        assert_eq!(driver.pop_used(&mem), None);
    }
}

#[test]
fn unpop_gives_chains_back_across_a_wrap() {
    let (mem, mut driver, mut state) = setup(4);
    let mut segs = Vec::new();
    // Move the ring to index 3 first.
    let a = driver.add_chain(&mem, &[buf(0, 1, true), buf(1, 1, true), buf(2, 1, true)]).unwrap();
    {
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        assert_eq!(ring.pop(&mut segs), Ok(Some(a)));
        ring.add_used(a, 0);
    }
    assert_eq!(driver.pop_used(&mem), Some((a, 0)));
    let b = driver.add_chain(&mem, &[buf(0, 1, true), buf(1, 1, true)]).unwrap();
    let mut ring = Ring::open(&mem, &mut state).unwrap();
    assert_eq!(ring.pop(&mut segs), Ok(Some(b)));
    assert_eq!(ring.position(), (1, 3));
    ring.unpop(1);
    assert_eq!(ring.position(), (3, 3));
    assert_eq!(ring.pop(&mut segs), Ok(Some(b)), "the same chain again after unpop");
    assert_eq!(segs.len(), 2);
}

#[test]
fn hostile_chains_are_consumed_and_reported_with_their_id() {
    let (mem, mut driver, mut state) = setup(16);
    let raw = |addr: u64, len: u32, id: u16, flags: u16| RawDesc { addr, len, id, flags };
    // Nested indirect table at TABLES+0x100.
    mem.write_slice(&[0u8; 16], GuestAddress(TABLES + 0x100)).unwrap();
    mem.store(F_INDIRECT.to_le(), GuestAddress(TABLES + 0x100 + 14), Ordering::Relaxed).unwrap();
    let posts: Vec<Vec<RawDesc>> = vec![
        vec![raw(TABLES, 16, 1, F_INDIRECT | F_NEXT), raw(BUFS, 8, 1, 0)], // indirect with next
        vec![raw(1 << 40, 32, 2, F_INDIRECT)],                             // table outside memory
        vec![raw(TABLES, 24, 3, F_INDIRECT)],                              // not whole descriptors
        vec![raw(TABLES + 0x100, 16, 4, F_INDIRECT)],                      // nested indirect
        vec![raw(BUFS, 8, 5, F_NEXT), raw(TABLES, 16, 5, F_INDIRECT)],     // indirect after direct
        vec![raw(TABLES, 16 * 17, 6, F_INDIRECT)],                         // table beyond queue size
    ];
    for p in &posts {
        driver.post_raw(&mem, p).unwrap();
    }
    let good = driver.add_chain(&mem, &[buf(0, 10, false)]).unwrap();
    let mut ring = Ring::open(&mem, &mut state).unwrap();
    let mut segs = Vec::new();
    for id in 1..=6 {
        assert_eq!(ring.pop(&mut segs), Err(RingError::BadChain { head: id }), "chain {id}");
        ring.add_used(id, 0);
    }
    assert_eq!(ring.pop(&mut segs), Ok(Some(good)), "the ring stays in step past bad chains");
    ring.add_used(good, 0);
    drop(ring);
    let mut ids: Vec<u16> = std::iter::from_fn(|| driver.pop_used(&mem).map(|(id, _)| id)).collect();
    ids.sort_unstable();
    let mut want = vec![1, 2, 3, 4, 5, 6, good];
    want.sort_unstable();
    assert_eq!(ids, want);
}

#[test]
fn a_chain_as_long_as_the_ring_with_next_set_everywhere_is_refused() {
    let (mem, mut driver, mut state) = setup(8);
    let descs: Vec<RawDesc> = (0..8).map(|_| RawDesc { addr: BUFS, len: 8, id: 3, flags: F_NEXT }).collect();
    driver.post_raw(&mem, &descs).unwrap();
    let mut ring = Ring::open(&mem, &mut state).unwrap();
    let mut segs = Vec::new();
    assert_eq!(ring.pop(&mut segs), Err(RingError::BadChain { head: 3 }));
    assert!(segs.len() <= 8);
    assert_eq!(ring.pop(&mut segs), Ok(None), "every descriptor is with the device now");
}

#[test]
fn bad_geometry_breaks_the_ring_once() {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let mut outside =
        RingState::new_packed(8, GuestAddress(1 << 40), GuestAddress(0x100), GuestAddress(0x104), 0x8000, 0x8000);
    assert!(matches!(Ring::open(&mem, &mut outside), Err(RingError::BadRing)));
    assert!(matches!(Ring::open(&mem, &mut outside), Err(RingError::Broken)));
    // A base index beyond the ring (bits 0..15 of SET_VRING_BASE).
    let mut beyond = RingState::new_packed(8, GuestAddress(0), GuestAddress(0x100), GuestAddress(0x104), 9, 0);
    assert!(matches!(Ring::open(&mem, &mut beyond), Err(RingError::BadRing)));
    let mut misaligned =
        RingState::new_packed(8, GuestAddress(0), GuestAddress(0x102), GuestAddress(0x104), 0x8000, 0x8000);
    assert!(matches!(Ring::open(&mem, &mut misaligned), Err(RingError::BadRing)));
    // Packed rings need not be a power of two.
    let mut odd = RingState::new_packed(6, GuestAddress(0), GuestAddress(0x100), GuestAddress(0x104), 0x8000, 0x8000);
    assert!(Ring::open(&mem, &mut odd).is_ok());
}

#[test]
fn positions_carry_the_wrap_counter_in_bit_15() {
    let (mem, mut driver, mut state) = setup(4);
    let mut segs = Vec::new();
    for _ in 0..5 {
        let id = driver.add_chain(&mem, &[buf(0, 1, false)]).unwrap();
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        assert_eq!(ring.pop(&mut segs), Ok(Some(id)));
        ring.add_used(id, 0);
        drop(ring);
        driver.pop_used(&mem).unwrap();
    }
    // 5 descriptors on a ring of 4: index 1, wrap counter flipped to 0.
    let mut queue = Queue::new(4).unwrap();
    driver.configure(&mut queue);
    state.store_position(&mut queue);
    assert_eq!((queue.next_avail(), queue.next_used()), (1, 1));
    // A device restarted from that base (SET_VRING_BASE) continues where this one stopped.
    let features = 1u64 << vmq_datapath::packed_ring::VIRTIO_F_RING_PACKED;
    let mut resumed = RingState::from_device_queue(&queue, features);
    let id = driver.add_chain(&mem, &[buf(0, 7, false)]).unwrap();
    let mut ring = Ring::open(&mem, &mut resumed).unwrap();
    assert_eq!(ring.pop(&mut segs), Ok(Some(id)));
    ring.add_used(id, 0);
    drop(ring);
    assert_eq!(driver.pop_used(&mem), Some((id, 0)));
    // Split rings keep their plain 16-bit positions.
    assert!(RingState::from_device_queue(&queue, 0).packed.is_none());
}

#[test]
fn event_suppression_both_ways() {
    let (mem, mut driver, _) = setup(8);
    let mut state = driver.device_state(true);
    let mut segs = Vec::new();
    let mut used_one = |state: &mut RingState, driver: &mut PackedRingDriver| {
        let id = driver.add_chain(&mem, &[buf(0, 1, false)]).unwrap();
        let mut ring = Ring::open(&mem, state).unwrap();
        assert_eq!(ring.pop(&mut segs), Ok(Some(id)));
        ring.add_used(id, 0);
        ring.publish();
        let notify = ring.needs_notification();
        drop(ring);
        driver.pop_used(&mem).unwrap();
        notify
    };
    // The driver polls (flags DISABLE from init).
    assert!(!used_one(&mut state, &mut driver));
    // Always interrupt.
    driver.request_interrupts(&mem, None);
    assert!(used_one(&mut state, &mut driver));
    // EVENT_IDX: interrupt once the used position passes index 4 (wrap 1). Used is at 2 now.
    driver.request_interrupts(&mem, Some((4, true)));
    assert!(!used_one(&mut state, &mut driver), "used 3 does not pass 4");
    assert!(!used_one(&mut state, &mut driver), "used 4 does not pass 4");
    assert!(used_one(&mut state, &mut driver), "used 5 passed 4");
    assert!(!used_one(&mut state, &mut driver), "already signalled for this event");
    // Kicks: with EVENT_IDX the device asks for one at its avail position.
    let mut ring = Ring::open(&mem, &mut state).unwrap();
    assert!(!ring.enable_notification());
    assert_eq!(driver.device_event_area(&mem), (6 | 0x8000, 2));
    ring.disable_notification();
    assert_eq!(driver.device_event_area(&mem).1, 1);
    drop(ring);
    driver.add_chain(&mem, &[buf(0, 1, false)]).unwrap();
    let mut ring = Ring::open(&mem, &mut state).unwrap();
    assert!(ring.enable_notification(), "a chain arrived: don't sleep");
}

#[test]
fn rx_writer_and_tx_pop_work_on_a_packed_ring() {
    let (mem, mut driver, mut state) = setup(8);
    let mem = Arc::new(mem);
    // RX: a 100-byte frame into two mergeable 64-byte buffers (two chains).
    let r0 = driver.add_chain(&*mem, &[buf(0, 64, true)]).unwrap();
    let r1 = driver.add_chain(&*mem, &[buf(1, 64, true)]).unwrap();
    let frame: Vec<u8> = (0..100u8).collect();
    let mut writer = RxWriter::new(true);
    let mut ring = Ring::open(&mem, &mut state).unwrap();
    writer.push(&mut ring, &VnetHdr::default(), &[&frame]).unwrap();
    assert_eq!(writer.push(&mut ring, &VnetHdr::default(), &[&frame]), Err(VirtioError::NoBuffer));
    drop(ring);
    assert_eq!(driver.pop_used(&*mem), Some((r0, 64)));
    assert_eq!(driver.pop_used(&*mem), Some((r1, (VnetHdr::LEN + 100 - 64) as u32)));
    let mut got = vec![0u8; 64];
    mem.read_slice(&mut got, GuestAddress(BUFS + 0x100)).unwrap();
    assert_eq!(&got[..VnetHdr::LEN + 100 - 64], &frame[64 - VnetHdr::LEN..]);
    // TX: header + payload in two descriptors.
    let mut payload = vec![0u8; VnetHdr::LEN];
    payload.extend_from_slice(b"hello packed ring");
    mem.write_slice(&payload, GuestAddress(BUFS + 0x400)).unwrap();
    let t = driver
        .add_chain(
            &*mem,
            &[
                BufferSpec { addr: GuestAddress(BUFS + 0x400), len: VnetHdr::LEN as u32, device_writes: false },
                BufferSpec { addr: GuestAddress(BUFS + 0x400 + VnetHdr::LEN as u64), len: 17, device_writes: false },
            ],
        )
        .unwrap();
    let mut ring = Ring::open(&mem, &mut state).unwrap();
    let mut segs = Vec::new();
    let mut out = vec![0u8; 2048];
    let mut tail = GuestTail::default();
    let f = pop_tx_split(&mut ring, &mem, &mut segs, &mut out, &mut tail).unwrap().unwrap();
    assert_eq!(f.deferred, None);
    assert_eq!(&out[..f.head_len], &payload[..]);
    drop(ring);
    assert_eq!(driver.pop_used(&*mem), Some((t, 0)));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the driver writes into the descriptor ring and event areas, the device never
    /// panics, each pop walks at most the queue size, and the ring keeps making progress or
    /// stops (no hang).
    #[test]
    fn arbitrary_descriptor_rings_never_panic(
        size in 1u16..32,
        bytes in proptest::collection::vec(any::<u8>(), 16 * 32 + 8),
        table in proptest::collection::vec(any::<u8>(), 256),
        base in any::<u16>(),
        event_idx in any::<bool>(),
    ) {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x2_0000)]).unwrap();
        mem.write_slice(&bytes, GuestAddress(0)).unwrap();
        mem.write_slice(&table, GuestAddress(TABLES)).unwrap();
        let n = u64::from(size);
        let base = (base % size) | (base & 0x8000);
        let mut state = RingState::new_packed(size, GuestAddress(0), GuestAddress(16 * n), GuestAddress(16 * n + 4), base, base);
        state.event_idx = event_idx;
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        let mut segs = Vec::new();
        let mut taken = Vec::new();
        for _ in 0..(2 * usize::from(size) + 2) {
            match ring.pop(&mut segs) {
                Ok(Some(id)) | Err(RingError::BadChain { head: id }) => {
                    prop_assert!(segs.len() <= usize::from(size));
                    taken.push(id);
                }
                Ok(None) => break,
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }
        prop_assert!(taken.len() <= usize::from(size), "at most a ring's worth outstanding");
        for (i, id) in taken.iter().enumerate() {
            ring.add_used(*id, i as u32);
        }
        ring.publish();
        let _ = ring.needs_notification();
        let _ = ring.enable_notification();
        ring.disable_notification();
        let _ = F_WRITE;
    }
}

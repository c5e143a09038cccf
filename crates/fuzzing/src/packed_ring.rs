//! `packed_ring`: a packed virtqueue (VIRTIO_F_RING_PACKED) in guest memory built from the
//! input (descriptor ring, driver event area, indirect tables anywhere), walked by the data
//! path's `Ring` until it runs dry, every chain returned (in an order the input picks), then
//! walked again after the input rewrote part of the ring (a driver that races the device).
//!
//! Invariants: no panic; every pop's chain is at most queue-size buffers; the device never holds
//! more than queue-size chains; positions stay below the ring size; every chain taken is
//! returned (none left outstanding).

use vm_memory::{Bytes, GuestAddress};
use vmq_datapath::ring::{Memory, Ring, RingError, RingState, Segment};

use crate::Input;

/// The guest memory the ring lives in (descriptor ring at 0, event areas after it).
pub const MEM_SIZE: usize = 0x4000;

/// Input: size (1..=64), base (index and wrap, bit 15), flags (bit 0: EVENT_IDX), a seed for the
/// order chains are returned in, a length-prefixed rewrite of the ring for the second round, and
/// the memory image.
pub fn packed_ring(data: &[u8]) {
    let mut input = Input::new(data);
    let size = 1 + u16::from(input.u8() % 64);
    let base = input.u16();
    let base = ((base & 0x7fff) % size) | (base & 0x8000);
    let event_idx = input.u8() & 1 != 0;
    let order = input.u8();
    let rewrite = input.chunk(1024).to_vec();
    let mut image = input.rest().to_vec();
    image.resize(MEM_SIZE, 0);
    let mem = Memory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    mem.write_slice(&image, GuestAddress(0)).expect("image fits");
    let n = u64::from(size);
    let mut state =
        RingState::new_packed(size, GuestAddress(0), GuestAddress(16 * n), GuestAddress(16 * n + 4), base, base);
    state.event_idx = event_idx;
    let mut segments = Vec::new();
    for round in 0..2 {
        if round == 1 {
            let _ = mem.write_slice(&rewrite[..rewrite.len().min(16 * usize::from(size))], GuestAddress(0));
        }
        let mut ring = Ring::open(&mem, &mut state).expect("a ring inside guest memory opens");
        let mut taken = Vec::new();
        for _ in 0..=2 * usize::from(size) {
            match ring.pop(&mut segments) {
                Ok(None) => break,
                Ok(Some(id)) | Err(RingError::BadChain { head: id }) => {
                    check_chain(&segments, size);
                    let (after, _) = ring.position();
                    assert!(after < size, "avail position {after} beyond the ring of {size}");
                    taken.push(id);
                }
                Err(e) => panic!("unexpected {e:?} from pop"),
            }
            assert!(taken.len() <= usize::from(size), "{} chains out of a ring of {size}", taken.len());
        }
        // Return them in an order the input picks (rotated), with lengths.
        let k = if taken.is_empty() { 0 } else { usize::from(order) % taken.len() };
        taken.rotate_left(k);
        for (i, id) in taken.iter().enumerate() {
            ring.add_used(*id, i as u32);
        }
        ring.publish();
        let (avail, used) = ring.position();
        assert!(avail < size && used < size, "positions ({avail}, {used}) beyond the ring of {size}");
        let _ = ring.needs_notification();
        let _ = ring.enable_notification();
        ring.disable_notification();
    }
    assert!(state.packed.as_ref().is_some_and(|p| p.outstanding() == 0), "chains left outstanding");
}

fn check_chain(segments: &[Segment], size: u16) {
    assert!(segments.len() <= usize::from(size), "a chain of {} buffers in a ring of {size}", segments.len());
}

/// Builds a `packed_ring` input: ring `size`, `base`, EVENT_IDX, and descriptors
/// (addr, len, id, flags) written from slot 0, plus extra memory (address, bytes).
pub fn encode(
    size: u16,
    base: u16,
    event_idx: bool,
    descs: &[(u64, u32, u16, u16)],
    extra: &[(usize, Vec<u8>)],
) -> Vec<u8> {
    let mut out = vec![(size - 1) as u8];
    out.extend_from_slice(&base.to_le_bytes());
    out.push(u8::from(event_idx));
    out.push(0);
    out.extend_from_slice(&0u16.to_le_bytes());
    let mut image = vec![0u8; MEM_SIZE];
    for (i, &(addr, len, id, flags)) in descs.iter().enumerate() {
        let at = 16 * i;
        image[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        image[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        image[at + 12..at + 14].copy_from_slice(&id.to_le_bytes());
        image[at + 14..at + 16].copy_from_slice(&flags.to_le_bytes());
    }
    for (at, bytes) in extra {
        image[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    // Trailing zeros read as zeros anyway: keep seeds short.
    let end = image.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    out.extend_from_slice(&image[..end]);
    out
}

//! `rx_writer`: a guest's RX virtqueue built from the input (the `split_ring` image), filled by
//! the data path's [`RxWriter`] with a few frames, with and without mergeable RX buffers, from
//! vmq's buffers or with the frame's end in another guest's memory ([`GuestTail`]), over guest
//! memory in one region or two.
//!
//! Input: a mode byte (bit 0: MRG_RXBUF; bit 1: two memory regions; bit 2: frames end in a
//! sender's memory), a frame count (at most [`MAX_FRAMES`]), per frame its length, where it is
//! cut into two parts, and the header's flags, GSO type and size; then a `split_ring` input.
//!
//! Invariants, per frame, against a snapshot of guest memory before the write: no panic; the
//! writer changes guest memory only inside the device-writable buffers of the chains it took
//! and in the used ring; every chain taken is returned exactly once (consumed avail entries and
//! new used entries are the same heads); a delivered frame's used lengths add up to the frame
//! (header included) and, where the buffers do not overlap, the buffers hold the header (with
//! `num_buffers` = chains used) and the frame byte for byte; the outcome (delivered, or which
//! error) is the one a model of the writer predicts; frames delivered + dropped = frames offered.

use std::num::Wrapping;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};
use vmq_datapath::port::GuestTail;
use vmq_datapath::ring::{Memory, Ring, RingState, Segment};
use vmq_datapath::virtio::{RxWriter, VirtioError};
use vmq_wire::VnetHdr;

use crate::Input;
use crate::ring::{
    AVAIL_RING, DESC_TABLE, Limits, MEM_SIZE, REGION_SPLIT, USED_RING, avail_idx, avail_slot, decode, guest_memory_in,
    reference_walk, snapshot, used_area,
};

/// Most frames offered per input.
pub const MAX_FRAMES: usize = 8;
/// Longest frame offered (guest memory is 16 KiB).
pub const MAX_FRAME: usize = 0x1800;
/// Where a sender's memory holds the tails of frames (`mode` bit 2).
const TAIL_AT: u64 = 0x100;

/// What became of the frames offered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxOutcome {
    pub delivered: u32,
    /// Chains used by delivered frames.
    pub chains: u32,
    pub no_buffer: u32,
    pub too_long: u32,
    pub bad_descriptor: u32,
}

/// One frame as the input describes it.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub len: u16,
    pub cut: u16,
    pub flags: u8,
    pub gso_type: u8,
    pub gso_size: u16,
}

/// The fuzz target.
pub fn rx_writer(data: &[u8]) {
    let _ = run_rx_writer(data);
}

fn frame_bytes(index: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(index as u8 * 17 + 1)).collect()
}

fn in_one_region(s: &Segment, split: bool) -> bool {
    let Some(end) = s.addr.0.checked_add(u64::from(s.len)) else { return false };
    end <= MEM_SIZE as u64 && (!split || end <= REGION_SPLIT || s.addr.0 >= REGION_SPLIT)
}

/// What the model expects for one frame of `total` bytes from avail position `from`.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    /// Delivered into these chains (head, buffers).
    Delivered(Vec<(u16, Vec<Segment>)>),
    Error(VirtioError),
}

struct Model<'a> {
    image: &'a [u8],
    size: u16,
    split: bool,
}

impl Model<'_> {
    /// Collects chains as the writer does; `lenient` is set when the ring may refuse a chain
    /// the model accepts (the spec's tighter bound on chain length).
    fn expect(&self, from: u16, total: usize, mrg: bool, lenient: &mut bool) -> Expect {
        let available = avail_idx(self.image).wrapping_sub(from);
        if available > self.size {
            return Expect::Error(VirtioError::BadDescriptor);
        }
        let mut chains = Vec::new();
        let mut room = 0usize;
        while room < total {
            if chains.len() == usize::from(available) {
                return Expect::Error(VirtioError::NoBuffer);
            }
            let head = avail_slot(self.image, self.size, from.wrapping_add(chains.len() as u16));
            let Some(segments) = reference_walk(self.image, self.size, head, Limits::Permissive) else {
                return Expect::Error(VirtioError::BadDescriptor);
            };
            *lenient |= reference_walk(self.image, self.size, head, Limits::Spec).is_none();
            let chain_room = segments.iter().fold(0u32, |r, s| r.saturating_add(s.len));
            if segments.iter().any(|s| !s.write) || chain_room == 0 {
                return Expect::Error(VirtioError::BadDescriptor);
            }
            room += chain_room as usize;
            chains.push((head, segments));
            if !mrg && room < total {
                return Expect::Error(VirtioError::TooLong);
            }
        }
        Expect::Delivered(chains)
    }

    /// Are the bytes the frame needs from these buffers all in guest memory, each buffer in one
    /// region (else the writer may take its slow path or refuse)?
    fn clean(&self, chains: &[(u16, Vec<Segment>)], total: usize) -> bool {
        let mut left = total;
        for s in chains.iter().flat_map(|(_, segs)| segs) {
            if left == 0 {
                break;
            }
            if s.len > 0 && !in_one_region(s, self.split) {
                return false;
            }
            left = left.saturating_sub(s.len as usize);
        }
        true
    }
}

/// Guest addresses the frame's bytes go to, in order, and whether any buffer byte they cover
/// overlaps another or the used ring (then the content check is skipped).
fn destinations(chains: &[(u16, Vec<Segment>)], total: usize, size: u16) -> (Vec<u64>, bool) {
    let used = used_area(size);
    let mut out = Vec::with_capacity(total);
    for s in chains.iter().flat_map(|(_, segs)| segs) {
        for a in s.addr.0..s.addr.0 + u64::from(s.len).min((total - out.len()) as u64) {
            out.push(a);
        }
        if out.len() == total {
            break;
        }
    }
    let mut sorted = out.clone();
    sorted.sort_unstable();
    let overlap = sorted.windows(2).any(|w| w[0] == w[1]) || out.iter().any(|a| used.contains(a));
    (out, overlap)
}

pub fn run_rx_writer(data: &[u8]) -> RxOutcome {
    let mut input = Input::new(data);
    let mode = input.u8();
    let mrg = mode & 1 != 0;
    let split_mem = mode & 2 != 0;
    let with_tail = mode & 4 != 0;
    let count = usize::from(input.u8()) % (MAX_FRAMES + 1);
    let frames: Vec<Frame> = (0..count)
        .map(|_| Frame {
            len: input.u16() % MAX_FRAME as u16,
            cut: input.u16(),
            flags: input.u8(),
            gso_type: input.u8(),
            gso_size: input.u16(),
        })
        .collect();
    let (size, start, image) = decode(input.rest());
    let mem = guest_memory_in(&image, split_mem);
    let sender = Arc::new(Memory::from_ranges(&[(GuestAddress(0), MAX_FRAME * 2)]).expect("sender memory"));
    let mut state = RingState::new(size, GuestAddress(DESC_TABLE), GuestAddress(AVAIL_RING), GuestAddress(USED_RING));
    state.next_avail = Wrapping(start);
    state.next_used = Wrapping(start);
    let mut writer = RxWriter::new(mrg);
    let mut outcome = RxOutcome::default();
    let used = used_area(size);
    for (index, f) in frames.iter().enumerate() {
        let bytes = frame_bytes(index, usize::from(f.len));
        let cut = usize::from(f.cut) % (bytes.len() + 1);
        let hdr = VnetHdr {
            flags: f.flags,
            gso_type: f.gso_type,
            gso_size: f.gso_size,
            hdr_len: 54,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        };
        // Parts from vmq's buffers; with a tail, the frame's end from the sender's memory.
        let mut tail = GuestTail::default();
        let parts: Vec<&[u8]> = if with_tail {
            sender.write_slice(&bytes[cut..], GuestAddress(TAIL_AT)).expect("fill sender memory");
            tail.reset(sender.clone());
            assert!(tail.push(GuestAddress(TAIL_AT), (bytes.len() - cut) as u32), "tail in sender memory");
            vec![&bytes[..cut]]
        } else {
            vec![&bytes[..cut], &bytes[cut..]]
        };
        let total = VnetHdr::LEN + bytes.len();
        let before = snapshot(&mem);
        let (a0, u0) = (state.next_avail, state.next_used);
        let result = {
            let mut ring = Ring::open(&mem, &mut state).expect("a ring inside guest memory opens");
            let r = writer.push_with_tail(&mut ring, &hdr, &parts, with_tail.then_some(&tail));
            ring.publish();
            r
        };
        let after = snapshot(&mem);
        let consumed = (state.next_avail - a0).0;
        let returned = (state.next_used - u0).0;

        // Every chain taken is returned exactly once.
        assert_eq!(consumed, returned, "frame {index}: chains taken and chains returned");
        let taken: Vec<u16> = (0..consumed).map(|i| avail_slot(&before, size, a0.0.wrapping_add(i))).collect();
        let mut entries = Vec::new();
        for i in 0..returned {
            let slot = u64::from(u0.0.wrapping_add(i) % size);
            let id = mem.read_obj::<u32>(GuestAddress(USED_RING + 4 + 8 * slot)).expect("used id");
            let len = mem.read_obj::<u32>(GuestAddress(USED_RING + 8 + 8 * slot)).expect("used len");
            entries.push((id, len));
        }
        let mut ids: Vec<u32> = entries.iter().map(|&(id, _)| id).collect();
        let mut heads: Vec<u32> = taken.iter().map(|&h| u32::from(h)).collect();
        ids.sort_unstable();
        heads.sort_unstable();
        assert_eq!(ids, heads, "frame {index}: used entries are not the chains taken");

        // Writes only inside the device-writable buffers of the chains taken, or the used ring.
        let mut allowed: Vec<(u64, u64)> = taken
            .iter()
            .filter_map(|&h| reference_walk(&before, size, h, Limits::Permissive))
            .flatten()
            .filter(|s| s.write)
            .map(|s| (s.addr.0, s.addr.0.saturating_add(u64::from(s.len))))
            .collect();
        allowed.push((used.start, used.end));
        for (a, (b, c)) in before.iter().zip(&after).enumerate() {
            if b != c {
                let a = a as u64;
                assert!(
                    allowed.iter().any(|&(lo, hi)| (lo..hi).contains(&a)),
                    "frame {index}: wrote guest address {a:#x}, outside the chains it took"
                );
            }
        }

        let model = Model { image: &before, size, split: split_mem };
        let mut lenient = false;
        let expected = model.expect(a0.0, total, mrg, &mut lenient);
        match (&expected, result) {
            (Expect::Delivered(chains), Ok(())) => {
                assert_eq!(taken, chains.iter().map(|(h, _)| *h).collect::<Vec<_>>(), "frame {index}: chains");
                let lens: u64 = entries.iter().map(|&(_, len)| u64::from(len)).sum();
                assert_eq!(lens, total as u64, "frame {index}: used lengths");
                let (dest, overlap) = destinations(chains, total, size);
                if !overlap {
                    let header = VnetHdr { num_buffers: chains.len() as u16, ..hdr }.to_bytes();
                    let expected_bytes = header.iter().chain(&bytes);
                    for (i, (&a, &want)) in dest.iter().zip(expected_bytes).enumerate() {
                        assert_eq!(after[a as usize], want, "frame {index}: byte {i} at {a:#x}");
                    }
                }
                outcome.delivered += 1;
                outcome.chains += chains.len() as u32;
            }
            (Expect::Delivered(chains), Err(VirtioError::BadDescriptor)) if lenient || !model.clean(chains, total) => {
                outcome.bad_descriptor += 1;
            }
            (Expect::Error(VirtioError::NoBuffer), Err(VirtioError::NoBuffer)) => {
                assert_eq!(consumed, 0, "frame {index}: NoBuffer consumed chains");
                assert!(before == after, "frame {index}: NoBuffer changed guest memory");
                outcome.no_buffer += 1;
            }
            (Expect::Error(e), Err(got)) if *e == got || (lenient && got == VirtioError::BadDescriptor) => {
                assert!(entries.iter().all(|&(_, len)| len == 0), "frame {index}: dropped, yet used lengths");
                match got {
                    VirtioError::TooLong => outcome.too_long += 1,
                    VirtioError::NoBuffer => outcome.no_buffer += 1,
                    _ => outcome.bad_descriptor += 1,
                }
            }
            (expected, got) => panic!("frame {index} ({total} bytes): model {expected:?}, writer {got:?}"),
        }
    }
    let dropped = outcome.no_buffer + outcome.too_long + outcome.bad_descriptor;
    assert_eq!(outcome.delivered + dropped, frames.len() as u32, "frames delivered + dropped = offered");
    outcome
}

/// An `rx_writer` input: `mode`, `frames`, then a `split_ring` input (from [`crate::ring::encode`]).
pub fn encode(mode: u8, frames: &[Frame], ring_input: &[u8]) -> Vec<u8> {
    let mut b = crate::InputBuilder::default();
    b.u8(mode).u8(frames.len() as u8);
    for f in frames {
        b.u16(f.len).u16(f.cut).u8(f.flags).u8(f.gso_type).u16(f.gso_size);
    }
    b.raw(ring_input);
    b.bytes
}

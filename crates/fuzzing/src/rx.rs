//! `rx_writer`: a guest's RX virtqueue built from the input (the `split_ring` image), filled by
//! the data path's [`RxWriter`] with a few frames, with and without mergeable RX buffers, from
//! vmq's buffers or with the frame's end in another guest's memory ([`GuestTail`]), over guest
//! memory in one region or two.
//!
//! Input: a mode byte (bit 0: MRG_RXBUF; bit 1: two memory regions; bit 2: frames end in a
//! sender's memory), a frame count (at most [`MAX_FRAMES`]), per frame its length, where it is
//! cut into two parts, and the header's flags, GSO type and size; then a `split_ring` input.
//!
//! The frames are one batch, as vmq's RX sinks write them: the ring is opened once, so a frame
//! written over the guest's own avail ring changes what later frames read (the avail index is
//! re-read only when the device has caught up with it).
//!
//! The ring reads up to 8 one-descriptor chains ahead (a burst, as DPDK's vhost library does),
//! so once a frame lands on avail entries or descriptors the driver had already made available
//! (which the spec forbids a driver to change before the device has used them), later frames
//! may take the chains as they were read, not as they are now. From that frame on, the model
//! is no longer exact and only what must hold for any driver is checked: every chain taken is
//! returned once, writes stay inside buffers the driver offered as device-writable at some
//! point of the batch, dropped frames have no used length, frames are all accounted for.
//!
//! Invariants, per frame, against a snapshot of guest memory before the write: no panic; the
//! writer changes guest memory only inside the device-writable buffers of the chains it took
//! and in the used ring; every chain taken is returned exactly once (consumed avail entries and
//! new used entries are the same heads); the chains taken and the outcome (delivered, or which
//! error) are exactly those of a model of the writer (chains walked as the virtio spec bounds
//! them, an avail index more than a ring ahead breaks the ring: that frame and every later one
//! are refused, with no chain taken and guest memory untouched); a delivered frame's used
//! lengths add up to the frame (header included) and, where the buffers do not overlap, the
//! buffers hold the header (with `num_buffers` = chains used) and the frame byte for byte;
//! frames delivered + dropped = frames offered.

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
    /// Frames refused because the guest broke the ring (a bogus avail index), that frame on.
    pub ring_broken: u32,
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

/// Is the buffer in guest memory, in one region?
fn in_one_region(s: &Segment, split: bool) -> bool {
    let Some(end) = s.addr.0.checked_add(u64::from(s.len)) else { return false };
    end <= MEM_SIZE as u64 && (!split || end <= REGION_SPLIT || s.addr.0 >= REGION_SPLIT)
}

/// What the model expects for one frame: the chains taken (head, buffers), and the result.
#[derive(Debug, PartialEq, Eq)]
struct Expect {
    chains: Vec<(u16, Vec<Segment>)>,
    result: Result<(), VirtioError>,
}

/// The ring as the model sees it across a batch: the device's avail position, the avail index
/// as last read (re-read only when the device has caught up with it, as the ring does), and
/// whether the driver broke the ring.
struct Model {
    size: u16,
    split: bool,
    next_avail: u16,
    seen: u16,
    broken: bool,
}

impl Model {
    /// The spec's walk, with an indirect table in one memory region (the ring reads it as one
    /// slice); None: the ring refuses the chain.
    fn walk(&self, image: &[u8], head: u16) -> Option<Vec<Segment>> {
        let chain = reference_walk(image, self.size, head, Limits::Spec)?;
        indirect_table(image, self.size, head).is_none_or(|t| in_one_region(&t, self.split)).then_some(chain)
    }

    /// One frame of `total` bytes (its last `tail_len` from another guest's memory), taken as
    /// the writer takes chains, from the guest memory `image` before the write.
    fn expect(&mut self, image: &[u8], total: usize, tail_len: usize, mrg: bool) -> Expect {
        let expect = self.collect(image, total, mrg);
        // Chains the writer keeps (delivered or handed back) move the device on; on NoBuffer
        // and a broken ring it takes none.
        self.next_avail = self.next_avail.wrapping_add(expect.chains.len() as u16);
        if expect.result.is_ok() && writes_fail(&expect.chains, total, tail_len, self.split) {
            return Expect { result: Err(VirtioError::BadDescriptor), ..expect };
        }
        expect
    }

    fn collect(&mut self, image: &[u8], total: usize, mrg: bool) -> Expect {
        let error = |chains, e| Expect { chains, result: Err(e) };
        if self.broken {
            return error(Vec::new(), VirtioError::RingBroken);
        }
        let mut chains: Vec<(u16, Vec<Segment>)> = Vec::new();
        let mut room = 0usize;
        while room < total {
            let position = self.next_avail.wrapping_add(chains.len() as u16);
            if self.seen == position {
                self.seen = avail_idx(image);
            }
            let available = self.seen.wrapping_sub(position);
            if available > self.size {
                // Broken: the chains taken for this frame are given back untaken.
                self.broken = true;
                return error(Vec::new(), VirtioError::RingBroken);
            }
            if available == 0 {
                return error(Vec::new(), VirtioError::NoBuffer);
            }
            let head = avail_slot(image, self.size, position);
            let Some(segments) = self.walk(image, head) else {
                chains.push((head, Vec::new()));
                return error(chains, VirtioError::BadDescriptor);
            };
            let chain_room = segments.iter().fold(0u32, |r, s| r.saturating_add(s.len));
            let readable = segments.iter().any(|s| !s.write);
            chains.push((head, segments));
            if readable || chain_room == 0 {
                return error(chains, VirtioError::BadDescriptor);
            }
            room += chain_room as usize;
            if !mrg && room < total {
                return error(chains, VirtioError::TooLong);
            }
        }
        Expect { chains, result: Ok(()) }
    }
}

/// Does writing the frame fail: do the bytes vmq writes leave guest memory, or does a buffer
/// that receives bytes of the tail (copied guest to guest through one slice) straddle regions?
fn writes_fail(chains: &[(u16, Vec<Segment>)], total: usize, tail_len: usize, split: bool) -> bool {
    let head_len = (total - tail_len) as u64;
    let mut at = 0u64;
    for s in chains.iter().flat_map(|(_, segs)| segs) {
        if at == total as u64 {
            break;
        }
        let n = u64::from(s.len).min(total as u64 - at);
        if n == 0 {
            continue;
        }
        let from_vmq = head_len.saturating_sub(at).min(n);
        if from_vmq > 0 && s.addr.0.checked_add(from_vmq).is_none_or(|end| end > MEM_SIZE as u64) {
            return true;
        }
        if from_vmq < n && !in_one_region(s, split) {
            return true;
        }
        at += n;
    }
    false
}

/// The indirect table chain `head` leads to (as a buffer), if any.
fn indirect_table(image: &[u8], size: u16, head: u16) -> Option<Segment> {
    let mut index = head;
    for _ in 0..size {
        let at = (DESC_TABLE + 16 * u64::from(index)) as usize;
        let d = image.get(at..at + 16)?;
        let addr = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes([d[12], d[13]]);
        if flags & 4 != 0 {
            return Some(Segment { addr: GuestAddress(addr), len, write: false });
        }
        if flags & 1 == 0 {
            return None;
        }
        index = u16::from_le_bytes([d[14], d[15]]);
        if index >= size {
            return None;
        }
    }
    None
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
    let mut model = Model { size, split: split_mem, next_avail: start, seen: start, broken: false };
    // Ring metadata a burst may have read ahead: descriptors and avail entries (not the index).
    let desc_area = DESC_TABLE..DESC_TABLE + 16 * u64::from(size);
    let avail_entries = AVAIL_RING + 4..AVAIL_RING + 4 + 2 * u64::from(size);
    // Whether a frame has rewritten chains the driver had made available (see the module doc).
    let mut exact = true;
    // Device-writable buffers of every chain within a ring of the device's position, as each
    // frame found guest memory: where writes may go once the model is not exact.
    let mut offered: Vec<(u64, u64)> = Vec::new();
    // One batch, as the vhost and mem RX sinks write them: the ring opened once for all frames
    // (a frame written over the guest's own avail ring changes what later frames read).
    let mut ring = Ring::open(&mem, &mut state).expect("a ring inside guest memory opens");
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
        let tail_len = if with_tail { bytes.len() - cut } else { 0 };
        let total = VnetHdr::LEN + bytes.len();
        let before = snapshot(&mem);
        let (a0, u0) = ring.position();
        let result = writer.push_with_tail(&mut ring, &hdr, &parts, with_tail.then_some(&tail));
        let after = snapshot(&mem);
        let (a1, u1) = ring.position();
        let consumed = a1.wrapping_sub(a0);
        let returned = u1.wrapping_sub(u0);

        // Every chain taken is returned exactly once.
        assert_eq!(consumed, returned, "frame {index}: chains taken and chains returned");
        let taken: Vec<u16> = (0..consumed).map(|i| avail_slot(&before, size, a0.wrapping_add(i))).collect();
        let mut entries = Vec::new();
        for i in 0..returned {
            let slot = u64::from(u0.wrapping_add(i) % size);
            let id = mem.read_obj::<u32>(GuestAddress(USED_RING + 4 + 8 * slot)).expect("used id");
            let len = mem.read_obj::<u32>(GuestAddress(USED_RING + 8 + 8 * slot)).expect("used len");
            entries.push((id, len));
        }
        let mut ids: Vec<u32> = entries.iter().map(|&(id, _)| id).collect();
        let mut heads: Vec<u32> = taken.iter().map(|&h| u32::from(h)).collect();
        ids.sort_unstable();
        heads.sort_unstable();
        if exact {
            assert_eq!(ids, heads, "frame {index}: used entries are not the chains taken");
        }

        // Writes only inside the device-writable buffers of the chains taken, or the used ring.
        let writable = |heads: &mut dyn Iterator<Item = u16>| -> Vec<(u64, u64)> {
            heads
                .filter_map(|h| model.walk(&before, h))
                .flatten()
                .filter(|s| s.write)
                .map(|s| (s.addr.0, s.addr.0.saturating_add(u64::from(s.len))))
                .collect()
        };
        offered.extend(writable(&mut (0..size).map(|i| avail_slot(&before, size, a0.wrapping_add(i)))));
        let mut allowed = if exact { writable(&mut taken.iter().copied()) } else { offered.clone() };
        allowed.push((used.start, used.end));
        // Chunk by chunk (memcmp) first: most of guest memory is untouched.
        let changed = before.chunks(64).zip(after.chunks(64)).enumerate().filter(|(_, (b, c))| b != c);
        let bytes_changed =
            changed.flat_map(|(k, (b, c))| (0..b.len()).filter(move |&i| b[i] != c[i]).map(move |i| 64 * k + i));
        let mut rewrote_rings = false;
        for a in bytes_changed {
            let a = a as u64;
            rewrote_rings |= desc_area.contains(&a) || avail_entries.contains(&a);
            assert!(
                allowed.iter().any(|&(lo, hi)| (lo..hi).contains(&a)),
                "frame {index}: wrote guest address {a:#x}, outside the chains it took"
            );
        }

        // The outcome, and the chains taken, are exactly the model's.
        let expected = model.expect(&before, total, tail_len, mrg);
        if exact {
            assert_eq!(
                (&taken, result),
                (&expected.chains.iter().map(|(h, _)| *h).collect::<Vec<_>>(), expected.result),
                "frame {index} ({total} bytes): chains taken and result, writer vs model"
            );
            assert_eq!(ring.position(), (model.next_avail, u1), "frame {index}: device position");
        }
        match result {
            Ok(()) => {
                let lens: u64 = entries.iter().map(|&(_, len)| u64::from(len)).sum();
                assert_eq!(lens, total as u64, "frame {index}: used lengths");
                let (dest, overlap) = destinations(&expected.chains, total, size);
                if exact && !overlap {
                    let header = VnetHdr { num_buffers: expected.chains.len() as u16, ..hdr }.to_bytes();
                    let expected_bytes = header.iter().chain(&bytes);
                    for (i, (&a, &want)) in dest.iter().zip(expected_bytes).enumerate() {
                        assert_eq!(after[a as usize], want, "frame {index}: byte {i} at {a:#x}");
                    }
                }
                outcome.delivered += 1;
                outcome.chains += taken.len() as u32;
            }
            Err(e) => {
                assert!(entries.iter().all(|&(_, len)| len == 0), "frame {index}: dropped, yet used lengths");
                if matches!(e, VirtioError::NoBuffer | VirtioError::RingBroken) {
                    assert!(before == after, "frame {index}: {e:?} changed guest memory");
                }
                match e {
                    VirtioError::TooLong => outcome.too_long += 1,
                    VirtioError::NoBuffer => outcome.no_buffer += 1,
                    VirtioError::RingBroken => outcome.ring_broken += 1,
                    _ => outcome.bad_descriptor += 1,
                }
            }
        }
        exact &= !rewrote_rings;
    }
    ring.publish();
    drop(ring);
    if exact {
        assert_eq!(state.is_broken(), model.broken, "ring broken");
    }
    let dropped = outcome.no_buffer + outcome.too_long + outcome.bad_descriptor + outcome.ring_broken;
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

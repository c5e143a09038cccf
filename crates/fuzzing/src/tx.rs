//! `tx_assembly`: a guest's TX virtqueue built from the input (the `split_ring` image), drained
//! with the data path's [`pop_tx_split`] into a buffer of one of four sizes, over guest memory in
//! one region or two (so that buffers can straddle regions).
//!
//! Input: a mode byte (bits 0-1: buffer size from [`BUF_SIZES`]; bit 2: two memory regions),
//! then a `split_ring` input.
//!
//! Invariants, per chain, against an independent model over a snapshot of guest memory taken
//! before the call: no panic; a frame is taken only from a chain the reference walk accepts,
//! whose buffers are all device-readable, inside guest memory, at least a virtio-net header
//! and at most the buffer long; the bytes copied into the buffer and the bytes the tail
//! describes are exactly the chain's readable bytes (a frame up to [`SPLIT_MIN`] whole, a
//! longer one as a [`SPLIT_HEAD`]-byte head plus a tail, or whole when a buffer straddles
//! regions); every other chain is a typed error the model predicts; TX writes nothing but the
//! used ring; every chain taken goes back exactly once (now, or after "delivery" for split
//! frames), with used length 0; an avail index more than a ring ahead takes nothing, is
//! reported once ([`VirtioError::RingBroken`]) and leaves the ring broken (it then reads as
//! empty). Chains are walked as vmq must (virtio 2.7.5.3.1): at most queue-size descriptors in
//! all, an indirect table of at most queue-size entries, in one memory region.

use std::num::Wrapping;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};
use vmq_datapath::port::GuestTail;
use vmq_datapath::ring::{Ring, RingState, Segment};
use vmq_datapath::virtio::{SPLIT_HEAD, SPLIT_MIN, VirtioError, pop_tx_split};
use vmq_wire::VnetHdr;

use crate::Input;
use crate::ring::{
    AVAIL_RING, DESC_TABLE, Limits, MEM_SIZE, REGION_SPLIT, USED_RING, avail_idx, avail_slot, decode, guest_memory_in,
    reference_walk, snapshot, used_area,
};

/// Buffer sizes the harness pops into: smaller than a header plus a frame, just over
/// [`SPLIT_MIN`], a standard frame's, vmq's TX buffer (64 KiB GSO frame and header).
pub const BUF_SIZES: [usize; 4] = [64, SPLIT_MIN + 88, 2048, 65_536 + VnetHdr::LEN];

/// What became of the chains the guest made available.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxOutcome {
    /// Frames copied whole (chain returned at once).
    pub whole: u32,
    /// Frames split into head and guest tail (chain returned after delivery).
    pub split: u32,
    pub bad_descriptor: u32,
    pub too_long: u32,
    pub bad_header: u32,
    /// The avail index was more than a ring ahead: nothing taken.
    pub bad_index: bool,
}

/// The fuzz target.
pub fn tx_assembly(data: &[u8]) {
    let _ = run_tx_assembly(data);
}

/// What the model expects `pop_tx_split` to do with one chain.
enum Expect {
    Frame(u64),
    Error(VirtioError),
}

/// The model: the chain's buffers decide the outcome, in `pop_tx_split`'s order of checks.
fn expect(segments: &[Segment], buf_len: usize) -> Expect {
    if segments.iter().any(|s| s.write) {
        return Expect::Error(VirtioError::BadDescriptor);
    }
    let total: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
    if total > buf_len as u64 {
        return Expect::Error(VirtioError::TooLong);
    }
    if total < VnetHdr::LEN as u64 {
        return Expect::Error(VirtioError::BadHeader);
    }
    if segments.iter().any(|s| s.len > 0 && !in_memory(s)) {
        return Expect::Error(VirtioError::BadDescriptor);
    }
    Expect::Frame(total)
}

fn in_memory(s: &Segment) -> bool {
    s.addr.0.checked_add(u64::from(s.len)).is_some_and(|end| end <= MEM_SIZE as u64)
}

/// Is the buffer inside one memory region (`split`: two regions meeting at REGION_SPLIT)?
fn in_one_region(s: &Segment, split: bool) -> bool {
    let end = s.addr.0.saturating_add(u64::from(s.len));
    !split || end <= REGION_SPLIT || s.addr.0 >= REGION_SPLIT
}

fn seg(addr: u64, len: u32) -> Segment {
    Segment { addr: GuestAddress(addr), len, write: false }
}

/// Does a frame longer than [`SPLIT_MIN`] fall back to a whole copy: is the part of some buffer
/// past the [`SPLIT_HEAD`]-byte head not in one memory region?
fn copies_whole(segments: &[Segment], split: bool) -> bool {
    let mut copied = 0u64;
    for s in segments {
        let n = u64::from(s.len).min(SPLIT_HEAD as u64 - copied);
        copied += n;
        // Saturating: a buffer near the top of the address space is refused before this matters.
        if n < u64::from(s.len) && !in_one_region(&seg(s.addr.0.saturating_add(n), s.len - n as u32), split) {
            return true;
        }
    }
    false
}

/// The indirect table (address, length) chain `head` leads to, if any.
fn indirect_table(image: &[u8], size: u16, head: u16) -> Option<(u64, u32)> {
    let mut index = head;
    for _ in 0..size {
        let at = (DESC_TABLE + 16 * u64::from(index)) as usize;
        let d = image.get(at..at + 16)?;
        let addr = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes([d[12], d[13]]);
        if flags & 4 != 0 {
            return Some((addr, len));
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

/// The guest addresses of a chain's bytes, in frame order.
fn frame_addresses(segments: &[Segment]) -> impl Iterator<Item = u64> + '_ {
    segments.iter().flat_map(|s| s.addr.0..s.addr.0 + u64::from(s.len))
}

/// `got` holds the chain's next `got.len()` bytes from `skip` on: each as the guest left it before the call, or
/// (for bytes in the used ring, which the call may have written first) as after it.
fn assert_frame(got: &[u8], segments: &[Segment], skip: usize, before: &[u8], after: &[u8], size: u16, what: &str) {
    let used = used_area(size);
    let mut n = 0;
    for (i, a) in frame_addresses(segments).skip(skip).take(got.len()).enumerate() {
        let a_usize = a as usize;
        let ok = got[i] == before[a_usize] || (used.contains(&a) && got[i] == after[a_usize]);
        assert!(
            ok,
            "{what}: byte {} (guest address {a:#x}) is {:#x}, the guest wrote {:#x}",
            skip + i,
            got[i],
            before[a_usize]
        );
        n += 1;
    }
    assert_eq!(n, got.len(), "{what}: length");
}

pub fn run_tx_assembly(data: &[u8]) -> TxOutcome {
    let mut input = Input::new(data);
    let mode = input.u8();
    let buf_len = BUF_SIZES[usize::from(mode & 3)];
    let split_mem = mode & 4 != 0;
    let (size, start, image) = decode(input.rest());
    let mem = Arc::new(guest_memory_in(&image, split_mem));
    let mut state = RingState::new(size, GuestAddress(DESC_TABLE), GuestAddress(AVAIL_RING), GuestAddress(USED_RING));
    state.next_avail = Wrapping(start);
    state.next_used = Wrapping(start);
    let announced = avail_idx(&image).wrapping_sub(start);
    let used = used_area(size);
    let mut outcome = TxOutcome::default();
    let mut buf = vec![0u8; buf_len];
    let mut segments = Vec::new();
    // Heads in the order they must appear in the used ring.
    let mut returned: Vec<u16> = Vec::new();
    let mut deferred: Vec<u16> = Vec::new();
    let mut tails = Vec::new();
    {
        let mut ring = Ring::open(&mem, &mut state).expect("a ring inside guest memory opens");
        for n in 0..=u32::from(size) {
            let before = snapshot(&mem);
            let head = avail_slot(&before, size, start.wrapping_add(n as u16));
            let mut tail = GuestTail::default();
            let result = pop_tx_split(&mut ring, &mem, &mut segments, &mut buf, &mut tail);
            let after = snapshot(&mem);
            let (u0, u1) = (used.start as usize, used.end as usize);
            assert!(before[..u0] == after[..u0] && before[u1..] == after[u1..], "TX wrote guest memory");
            if announced > size {
                assert_eq!(result, Err(VirtioError::RingBroken), "avail index {announced} ahead of the device");
                // Reported once: the broken ring reads as empty, whatever it holds.
                let again = pop_tx_split(&mut ring, &mem, &mut segments, &mut buf, &mut tail);
                assert_eq!(again, Ok(None), "a broken ring served again");
                outcome.bad_index = true;
                break;
            }
            if n == u32::from(announced) {
                assert_eq!(result, Ok(None), "pop went past the avail index");
                break;
            }
            // The spec's walk, and an indirect table must lie in one memory region (the ring
            // reads it as one slice): anything else is refused, and nothing more is.
            let chain = reference_walk(&before, size, head, Limits::Spec).filter(|_| {
                indirect_table(&before, size, head).is_none_or(|(a, l)| in_one_region(&seg(a, l), split_mem))
            });
            let Some(chain) = chain else {
                assert_eq!(result, Err(VirtioError::BadDescriptor), "chain {head}: the reference walk refuses it");
                outcome.bad_descriptor += 1;
                returned.push(head);
                continue;
            };
            assert_eq!(segments, chain, "chain {head}: the ring walked other buffers than the reference");
            // A buffer across two regions past the head cannot be a tail: the frame is copied
            // whole (every buffer read again; reading an empty one succeeds wherever it points).
            let copied_whole = copies_whole(&chain, split_mem);
            match (expect(&chain, buf_len), result) {
                (Expect::Error(e), Err(got)) => {
                    assert_eq!(got, e, "chain {head}");
                    match e {
                        VirtioError::TooLong => outcome.too_long += 1,
                        VirtioError::BadHeader => outcome.bad_header += 1,
                        _ => outcome.bad_descriptor += 1,
                    }
                    returned.push(head);
                }
                (Expect::Frame(total), Ok(Some(tx))) => {
                    let total = total as usize;
                    if total <= SPLIT_MIN || copied_whole {
                        assert_eq!(tx.head_len, total, "chain {head}: copied length");
                        assert_eq!(tx.deferred, None);
                        assert_frame(&buf[..total], &chain, 0, &before, &after, size, "whole frame");
                        outcome.whole += 1;
                        returned.push(head);
                    } else {
                        assert_eq!(tx.deferred, Some(head), "split frame keeps its own chain");
                        assert_eq!(tx.head_len, SPLIT_HEAD, "chain {head}: head length");
                        assert_eq!(tail.len(), total - SPLIT_HEAD, "chain {head}: tail length");
                        assert_frame(&buf[..SPLIT_HEAD], &chain, 0, &before, &after, size, "split head");
                        let mut bytes = Vec::new();
                        assert!(tail.append_to(&mut bytes), "chain {head}: the tail is not readable");
                        assert_frame(&bytes, &chain, SPLIT_HEAD, &before, &after, size, "tail");
                        outcome.split += 1;
                        deferred.push(head);
                        tails.push(tail);
                    }
                }
                (Expect::Frame(total), other) => panic!("chain {head} ({total} bytes, fits): {other:?}"),
                (Expect::Error(e), other) => panic!("chain {head}: expected {e:?}, got {other:?}"),
            }
        }
        // The split frames are "delivered": their chains go back now.
        for &head in &deferred {
            ring.add_used(head, 0);
            returned.push(head);
        }
        ring.publish();
    }
    drop(tails);
    let taken = outcome.whole + outcome.split + outcome.bad_descriptor + outcome.too_long + outcome.bad_header;
    assert_eq!(taken as usize, returned.len(), "every chain taken is a frame or a counted drop");
    let used_idx = mem.read_obj::<u16>(GuestAddress(USED_RING + 2)).expect("used idx");
    if returned.is_empty() {
        let untouched = u16::from_le_bytes([image[USED_RING as usize + 2], image[USED_RING as usize + 3]]);
        assert_eq!(used_idx, untouched, "nothing taken, yet the used index moved");
    } else {
        assert_eq!(used_idx, start.wrapping_add(returned.len() as u16), "used index");
    }
    for (i, &head) in returned.iter().enumerate() {
        let slot = u64::from(start.wrapping_add(i as u16) % size);
        let id = mem.read_obj::<u32>(GuestAddress(USED_RING + 4 + 8 * slot)).expect("used id");
        let len = mem.read_obj::<u32>(GuestAddress(USED_RING + 8 + 8 * slot)).expect("used len");
        assert_eq!((id, len), (u32::from(head), 0), "used entry {i}");
    }
    outcome
}

/// A `tx_assembly` input: `mode`, a `split_ring` input (from [`crate::ring::encode`]), and
/// bytes written into guest memory at the given addresses (frame contents).
pub fn encode(mode: u8, ring_input: &[u8], fill: &[(u64, &[u8])]) -> Vec<u8> {
    let mut ring_input = ring_input.to_vec();
    for &(at, bytes) in fill {
        // The image starts after the ring size byte and the start position.
        let from = 3 + at as usize;
        let to = (from + bytes.len()).min(3 + MEM_SIZE);
        if ring_input.len() < to {
            ring_input.resize(to, 0);
        }
        ring_input[from..to].copy_from_slice(&bytes[..to - from]);
    }
    let mut out = vec![mode];
    out.extend_from_slice(&ring_input);
    out
}

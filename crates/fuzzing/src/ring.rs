//! `split_ring`: a split virtqueue in guest memory built from the input (descriptor table,
//! avail ring, indirect tables anywhere), walked by the data path's [`Ring::pop`] until it is
//! empty or reports an error.
//!
//! Layout of the 16 KiB guest memory: the input's bytes from address 0 (descriptor table at 0,
//! avail ring at 0x1000, used ring at 0x2000, buffers and indirect tables anywhere), zeros past
//! the input. The first two input bytes choose the ring size (a power of two up to 256) and
//! where the device starts in the avail ring.
//!
//! Invariants: no panic; a chain `pop` returns starts at the head the avail ring holds and has
//! exactly the buffers a reference walk finds (today's limits: a direct chain of at most
//! queue-size descriptors, an indirect table of at most len/16 entries, no nesting); a chain
//! `pop` refuses is refused by the spec's stricter walk too (at most queue-size descriptors in
//! all); `pop` never returns more chains than the avail index announces; every chain taken goes
//! back exactly once through the used ring, in order.

use std::num::Wrapping;

use vm_memory::{Bytes, GuestAddress};
use vmq_datapath::ring::{Memory, Ring, RingError, RingState, Segment};

use crate::Input;

pub const MEM_SIZE: usize = 0x4000;
pub const DESC_TABLE: u64 = 0;
pub const AVAIL_RING: u64 = 0x1000;
pub const USED_RING: u64 = 0x2000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Guest memory holding `image` from address 0.
pub fn guest_memory(image: &[u8]) -> Memory {
    let mem = Memory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let image = &image[..image.len().min(MEM_SIZE)];
    mem.write_slice(image, GuestAddress(0)).expect("fill guest memory");
    mem
}

/// Where [`guest_memory_in`] splits guest memory into two adjacent regions: a buffer across
/// this address is not in one region (the data path's slow paths).
pub const REGION_SPLIT: u64 = 0x3800;

/// Guest memory holding `image` from address 0, in one region or (`split`) two adjacent ones
/// meeting at [`REGION_SPLIT`].
pub fn guest_memory_in(image: &[u8], split: bool) -> Memory {
    if !split {
        return guest_memory(image);
    }
    let low = REGION_SPLIT as usize;
    let mem = Memory::from_ranges(&[(GuestAddress(0), low), (GuestAddress(REGION_SPLIT), MEM_SIZE - low)])
        .expect("guest memory");
    let image = &image[..image.len().min(MEM_SIZE)];
    mem.write_slice(image, GuestAddress(0)).expect("fill guest memory");
    mem
}

/// All of guest memory, as bytes.
pub fn snapshot(mem: &Memory) -> Vec<u8> {
    let mut bytes = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut bytes, GuestAddress(0)).expect("read guest memory");
    bytes
}

/// The used ring's bytes (flags, index, entries, avail_event) for a ring of `size`.
pub fn used_area(size: u16) -> std::ops::Range<u64> {
    USED_RING..USED_RING + 6 + 8 * u64::from(size)
}

/// The avail ring slot the device reads for its `n`-th chain from `start`.
pub fn avail_slot(image: &[u8], size: u16, position: u16) -> u16 {
    let slot = AVAIL_RING as usize + 4 + 2 * usize::from(position % size);
    u16::from_le_bytes([image[slot], image[slot + 1]])
}

/// The avail index the guest published.
pub fn avail_idx(image: &[u8]) -> u16 {
    u16::from_le_bytes([image[AVAIL_RING as usize + 2], image[AVAIL_RING as usize + 3]])
}

/// How long chains may be: today's rule, or the spec's (queue size in all).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Limits {
    /// Direct chain ≤ queue size, an indirect table ≤ its own len/16 entries.
    Permissive,
    /// At most queue-size descriptors in all, indirect ones included, and an indirect table of
    /// at most queue-size entries (what vmq enforces, after virtio 2.7.5.3.1).
    Spec,
}

fn desc(image: &[u8], at: u64) -> Option<(u64, u32, u16, u16)> {
    let at = usize::try_from(at).ok()?;
    let d = image.get(at..at.checked_add(16)?)?;
    let u64_at = |i: usize| u64::from_le_bytes(d[i..i + 8].try_into().expect("8 bytes"));
    let rest = u64_at(8);
    Some((u64_at(0), rest as u32, (rest >> 32) as u16, (rest >> 48) as u16))
}

/// The virtio spec's chain walk over a memory image (`image` is all of guest memory).
pub fn reference_walk(image: &[u8], size: u16, head: u16, limits: Limits) -> Option<Vec<Segment>> {
    let size = usize::from(size);
    let mut segments = Vec::new();
    let mut index = usize::from(head);
    if index >= size {
        return None;
    }
    for _ in 0..size {
        let (addr, len, flags, next) = desc(image, DESC_TABLE + 16 * index as u64)?;
        if flags & F_INDIRECT != 0 {
            if flags & F_NEXT != 0 || len == 0 || len % 16 != 0 {
                return None;
            }
            let entries = len as usize / 16;
            if limits == Limits::Spec && entries > size {
                return None;
            }
            if addr.checked_add(u64::from(len))? > image.len() as u64 {
                return None;
            }
            let mut i = 0usize;
            for _ in 0..entries {
                let (a, l, f, n) = desc(image, addr + 16 * i as u64)?;
                if f & F_INDIRECT != 0 {
                    return None;
                }
                segments.push(Segment { addr: GuestAddress(a), len: l, write: f & F_WRITE != 0 });
                if limits == Limits::Spec && segments.len() > size {
                    return None;
                }
                if f & F_NEXT == 0 {
                    return Some(segments);
                }
                i = usize::from(n);
                if i >= entries {
                    return None;
                }
            }
            return None;
        }
        segments.push(Segment { addr: GuestAddress(addr), len, write: flags & F_WRITE != 0 });
        if flags & F_NEXT == 0 {
            return Some(segments);
        }
        index = usize::from(next);
        if index >= size {
            return None;
        }
    }
    None
}

/// Ring size and start position from the input's first bytes, memory image from the rest.
pub fn decode(data: &[u8]) -> (u16, u16, Vec<u8>) {
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let start = input.u16();
    let mut image = input.rest().to_vec();
    image.resize(MEM_SIZE, 0);
    (size, start, image)
}

/// How the walk ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingOutcome {
    pub chains: u32,
    pub bad_chains: u32,
    pub bad_index: bool,
}

/// The fuzz target.
pub fn split_ring(data: &[u8]) {
    let _ = run_split_ring(data);
}

pub fn run_split_ring(data: &[u8]) -> RingOutcome {
    let (size, start, image) = decode(data);
    let mem = guest_memory(&image);
    let mut state = RingState::new(size, GuestAddress(DESC_TABLE), GuestAddress(AVAIL_RING), GuestAddress(USED_RING));
    state.next_avail = Wrapping(start);
    state.next_used = Wrapping(start);
    let avail_idx = u16::from_le_bytes([image[AVAIL_RING as usize + 2], image[AVAIL_RING as usize + 3]]);
    let announced = avail_idx.wrapping_sub(start);
    let mut outcome = RingOutcome::default();
    let mut heads = Vec::new();
    {
        let mut ring = Ring::open(&mem, &mut state).expect("a ring inside guest memory opens");
        let mut segments = Vec::new();
        // More pops than the ring holds means the device lost track of the avail index.
        for n in 0..=u32::from(size) {
            let slot = AVAIL_RING as usize + 4 + 2 * usize::from(start.wrapping_add(n as u16) % size);
            let expected_head = u16::from_le_bytes([image[slot], image[slot + 1]]);
            match ring.pop(&mut segments) {
                Ok(None) => {
                    assert_eq!(n, u32::from(announced), "pop stopped before the avail index");
                    break;
                }
                Ok(Some(head)) => {
                    assert!(n < u32::from(size), "more chains than the ring holds");
                    assert_eq!(head, expected_head, "pop returned another head than the avail ring's");
                    assert!(segments.len() <= usize::from(size), "a chain longer than the queue size");
                    let reference = reference_walk(&image, size, head, Limits::Permissive);
                    assert_eq!(
                        reference.as_deref(),
                        Some(&segments[..]),
                        "chain {head} differs from the reference walk"
                    );
                    outcome.chains += 1;
                    heads.push(head);
                }
                Err(RingError::BadChain { head }) => {
                    assert_eq!(head, expected_head, "bad chain reported with another head");
                    assert!(
                        reference_walk(&image, size, head, Limits::Spec).is_none(),
                        "pop refused chain {head}, which the spec allows"
                    );
                    outcome.bad_chains += 1;
                    heads.push(head);
                }
                Err(RingError::BadAvailIndex) => {
                    assert!(announced > size, "avail index {avail_idx} refused, {announced} ahead of {start}");
                    outcome.bad_index = true;
                    break;
                }
                Err(RingError::BadRing) => panic!("BadRing from pop"),
                Err(RingError::Broken) => panic!("the ring reported broken before any bad index"),
            }
        }
        for &head in &heads {
            ring.add_used(head, 0);
        }
        ring.publish();
    }
    // Every chain taken is in the used ring exactly once, in order.
    let used_idx = mem.read_obj::<u16>(GuestAddress(USED_RING + 2)).expect("used idx");
    // Nothing taken, nothing published: the used index stays what the guest left there.
    let untouched = u16::from_le_bytes([image[USED_RING as usize + 2], image[USED_RING as usize + 3]]);
    let expected = if heads.is_empty() { untouched } else { start.wrapping_add(heads.len() as u16) };
    assert_eq!(used_idx, expected, "used index");
    for (i, &head) in heads.iter().enumerate() {
        let slot = u64::from(start.wrapping_add(i as u16) % size);
        let id = mem.read_obj::<u32>(GuestAddress(USED_RING + 4 + 8 * slot)).expect("used id");
        if heads.len() <= usize::from(size) {
            assert_eq!(id, u32::from(head), "used entry {i}");
        }
    }
    outcome
}

/// A descriptor as a guest writes it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Builds a `split_ring` input: ring of 2^`log2_size` entries, device starting at `start`, the
/// descriptor table `descs`, `heads` made available, and extra `tables` (address, descriptors)
/// for indirect tables.
pub fn encode(log2_size: u8, start: u16, descs: &[Desc], heads: &[u16], tables: &[(u64, Vec<Desc>)]) -> Vec<u8> {
    let size = 1u16 << log2_size;
    let mut image = vec![0u8; MEM_SIZE];
    let mut put = |at: u64, d: &Desc| {
        let at = at as usize;
        if at + 16 <= MEM_SIZE {
            image[at..at + 8].copy_from_slice(&d.addr.to_le_bytes());
            image[at + 8..at + 12].copy_from_slice(&d.len.to_le_bytes());
            image[at + 12..at + 14].copy_from_slice(&d.flags.to_le_bytes());
            image[at + 14..at + 16].copy_from_slice(&d.next.to_le_bytes());
        }
    };
    for (i, d) in descs.iter().take(usize::from(size)).enumerate() {
        put(DESC_TABLE + 16 * i as u64, d);
    }
    for (at, table) in tables {
        for (i, d) in table.iter().enumerate() {
            put(at + 16 * i as u64, d);
        }
    }
    let avail = AVAIL_RING as usize;
    let idx = start.wrapping_add(heads.len() as u16);
    image[avail + 2..avail + 4].copy_from_slice(&idx.to_le_bytes());
    for (i, h) in heads.iter().enumerate() {
        let slot = avail + 4 + 2 * usize::from(start.wrapping_add(i as u16) % size);
        image[slot..slot + 2].copy_from_slice(&h.to_le_bytes());
    }
    // Trailing zeros read back as zeros: keep the input short.
    let used = image.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    image.truncate(used);
    let mut out = vec![log2_size];
    out.extend_from_slice(&start.to_le_bytes());
    out.extend_from_slice(&image);
    out
}

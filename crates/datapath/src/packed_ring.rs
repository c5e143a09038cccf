//! The device side of a packed virtqueue (VIRTIO_F_RING_PACKED, virtio 1.1 §2.7), behind the
//! same [`Ring`] the split ring offers to `virtio.rs`: [`Ring`] hands every operation here when
//! its [`RingState`] carries a [`PackedState`].
//!
//! One descriptor ring, read and written in place: the driver makes a descriptor available by
//! setting its AVAIL flag bit to its wrap counter (and USED to the inverse); the device returns a
//! chain by writing one used descriptor (buffer id, length, AVAIL = USED = the device's wrap
//! counter) at its own used position, which then moves on by the chain's descriptor count. The
//! `avail_ring` and `used_ring` addresses of the protocol carry the driver's and the device's
//! event suppression areas (`{le16 off_wrap; le16 flags}`).
//!
//! Everything read from the ring is guest input: a chain is at most queue-size descriptors
//! (direct and indirect together), indirect tables may not nest nor follow a direct descriptor,
//! and a bad chain is still consumed to its end (so the two sides stay in step) and reported with
//! its buffer id for the caller to hand back and count.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use vmq_sys::ring_words::RingWords;

use crate::ring::{DESC_LEN, Memory, Ring, RingError, RingState, Segment, Slice};

/// Feature bit of packed virtqueues (virtio 1.1), not in `virtio-bindings`' ring module.
pub const VIRTIO_F_RING_PACKED: u32 = 34;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

/// Event suppression flags (driver and device areas alike).
const EVENT_ENABLE: u16 = 0;
const EVENT_DISABLE: u16 = 1;
const EVENT_DESC: u16 = 2;

/// Bit 15 of a vhost-user ring base and of an event `off_wrap`: the wrap counter.
const WRAP_BIT: u16 = 1 << 15;

/// The largest packed ring (indices are 15 bits, the 16th is the wrap counter).
pub const MAX_PACKED_SIZE: u16 = 1 << 15;

/// A packed ring's device-side state kept between batches (the indices themselves are
/// [`RingState::next_avail`] and [`RingState::next_used`], both below the ring size).
#[derive(Debug, Clone, Default)]
pub struct PackedState {
    avail_wrap: bool,
    used_wrap: bool,
    /// Chains taken and not used yet, oldest first: (buffer id, descriptors in the ring). The
    /// device's used position moves on by a chain's descriptor count when it is returned.
    outstanding: VecDeque<(u16, u16)>,
    /// Chains used and not yet written back (`publish` writes them all at once).
    pending_used: Vec<(u16, u32, u16)>,
    /// The used position (index, wrap) at the last interrupt decision (EVENT_IDX).
    signalled: Option<(u16, bool)>,
}

impl PackedState {
    /// Chains the device holds (taken, not returned).
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Writes the device's position back as vhost-user encodes it for packed rings: the index
    /// in bits 0..15 and the wrap counter in bit 15.
    pub(crate) fn store_position(&self, state: &RingState, queue: &mut Queue) {
        queue.set_next_avail(encode(state.next_avail.0, self.avail_wrap));
        queue.set_next_used(encode(state.next_used.0, self.used_wrap));
    }
}

fn encode(index: u16, wrap: bool) -> u16 {
    (index & !WRAP_BIT) | if wrap { WRAP_BIT } else { 0 }
}

fn decode(base: u16) -> (u16, bool) {
    (base & !WRAP_BIT, base & WRAP_BIT != 0)
}

impl RingState {
    /// A packed ring: descriptor ring, driver and device event areas, and the positions as
    /// vhost-user encodes them (wrap counter in bit 15; a fresh ring starts at `0x8000`).
    pub fn new_packed(
        size: u16,
        desc_ring: GuestAddress,
        driver_event: GuestAddress,
        device_event: GuestAddress,
        avail_base: u16,
        used_base: u16,
    ) -> RingState {
        let mut state = RingState::new(size, desc_ring, driver_event, device_event);
        let (avail, avail_wrap) = decode(avail_base);
        let (used, used_wrap) = decode(used_base);
        state.next_avail = Wrapping(avail);
        state.next_used = Wrapping(used);
        state.packed = Some(PackedState { avail_wrap, used_wrap, ..PackedState::default() });
        state
    }

    /// The ring a `virtio-queue` `Queue` describes, packed if the driver acked
    /// VIRTIO_F_RING_PACKED in `features`.
    pub fn from_device_queue(queue: &Queue, features: u64) -> RingState {
        let mut state = RingState::from_queue(queue);
        if features & (1 << VIRTIO_F_RING_PACKED) != 0 {
            let mut packed = RingState::new_packed(
                state.size,
                state.desc_table,
                state.avail_ring,
                state.used_ring,
                queue.next_avail(),
                queue.next_used(),
            );
            packed.event_idx = state.event_idx;
            state = packed;
        }
        state
    }

    /// The guest memory the device writes for this ring, for the live-migration dirty log:
    /// the used ring of a split ring; the descriptor ring (used descriptors are written in
    /// place) and the device event area of a packed one.
    pub fn device_written_areas(&self) -> [(u64, u64); 2] {
        let size = u64::from(self.size);
        if self.packed.is_some() {
            [(self.desc_table.0, DESC_LEN as u64 * size), (self.used_ring.0, 4)]
        } else {
            [(self.used_ring.0, 6 + 8 * size), (self.used_ring.0, 0)]
        }
    }
}

/// The three areas of a packed ring, checked against guest memory: descriptor ring, driver
/// event area (in [`Ring`]'s `avail`), device event area (in `used`).
pub(crate) fn open_areas<'m>(
    mem: &'m Memory,
    state: &RingState,
) -> Result<(Slice<'m>, Slice<'m>, Slice<'m>), RingError> {
    let size = state.size;
    if size == 0 || size > MAX_PACKED_SIZE || state.next_avail.0 >= size || state.next_used.0 >= size {
        return Err(RingError::BadRing);
    }
    if !state.desc_table.0.is_multiple_of(16)
        || !state.avail_ring.0.is_multiple_of(4)
        || !state.used_ring.0.is_multiple_of(4)
    {
        return Err(RingError::BadRing);
    }
    let area = |addr: GuestAddress, len: usize| mem.get_slice(addr, len).map_err(|_| RingError::BadRing);
    Ok((area(state.desc_table, DESC_LEN * usize::from(size))?, area(state.avail_ring, 4)?, area(state.used_ring, 4)?))
}

fn load16(words: &RingWords<'_>, offset: usize, order: Ordering) -> u16 {
    // In bounds by construction of the areas; a failure reads as 0.
    words.load_u16(offset, order).unwrap_or(0)
}

fn store16(words: &RingWords<'_>, offset: usize, value: u16, order: Ordering) {
    let _ = words.store_u16(offset, value, order);
}

/// A packed descriptor: (addr, len, id, flags). The ring is 16-byte aligned (virtio 1.1
/// 2.7.10.2); a driver that placed it otherwise gets every chain back as bad.
fn read_desc(table: &RingWords<'_>, index: usize) -> Option<(u64, u32, u16, u16)> {
    let at = index * DESC_LEN;
    let addr = table.load_u64(at, Ordering::Relaxed)?;
    let rest = table.load_u64(at + 8, Ordering::Relaxed)?;
    Some((addr, rest as u32, (rest >> 32) as u16, (rest >> 48) as u16))
}

fn is_available(flags: u16, wrap: bool) -> bool {
    (flags & F_AVAIL != 0) == wrap && (flags & F_USED != 0) != wrap
}

fn packed_state<'s>(ring: &'s mut Ring<'_, '_>) -> &'s mut PackedState {
    // `Ring` sends only packed rings here, so the state is always there.
    ring.state.packed.get_or_insert_with(PackedState::default)
}

/// Whether the descriptor at the device's avail position is available (the ring holds no
/// count of available chains: 1 or 0).
fn head_available(ring: &mut Ring<'_, '_>) -> bool {
    let at = usize::from(ring.state.next_avail.0) * DESC_LEN + 14;
    let flags = load16(&ring.desc, at, Ordering::Acquire);
    let wrap = packed_state(ring).avail_wrap;
    is_available(flags, wrap)
}

pub(crate) fn pending(ring: &mut Ring<'_, '_>) -> Result<u16, RingError> {
    if ring.state.broken {
        return Err(RingError::Broken);
    }
    Ok(u16::from(head_available(ring)))
}

pub(crate) fn pop(ring: &mut Ring<'_, '_>, segments: &mut Vec<Segment>) -> Result<Option<u16>, RingError> {
    if ring.state.broken {
        return Err(RingError::Broken);
    }
    let size = ring.state.size;
    // Every descriptor is with the device already: whatever the flags say, the driver cannot
    // have made more available (a driver rewriting them is not followed further).
    if packed_state(ring).outstanding.len() >= usize::from(size) || !head_available(ring) {
        return Ok(None);
    }
    // The head's flags were read with acquire: the rest of the chain, written before, is visible.
    segments.clear();
    if segments.capacity() > 2 * usize::from(size) {
        segments.shrink_to(usize::from(size));
    }
    let mut slot = ring.state.next_avail.0;
    let mut wrap = packed_state(ring).avail_wrap;
    let mut count: u16 = 0;
    let mut id: u16 = 0;
    let mut bad = false;
    // Guest descriptors walked so far, direct and indirect (bounded by the queue size).
    let mut budget = usize::from(size);
    loop {
        let desc = read_desc(&ring.desc, usize::from(slot));
        count += 1;
        slot += 1;
        if slot == size {
            slot = 0;
            wrap = !wrap;
        }
        let Some((addr, len, desc_id, flags)) = desc else {
            bad = true;
            break;
        };
        id = desc_id;
        let next = flags & F_NEXT != 0;
        if !bad {
            if flags & F_INDIRECT != 0 {
                // Only alone in its chain: no F_NEXT, no direct descriptor before it.
                if next || count != 1 || !walk_indirect(ring.mem, addr, len, &mut budget, segments) {
                    bad = true;
                }
            } else if budget == 0 {
                bad = true;
            } else {
                budget -= 1;
                segments.push(Segment { addr: GuestAddress(addr), len, write: flags & F_WRITE != 0 });
            }
        }
        if !next {
            break;
        }
        if count >= size {
            // A chain longer than the ring: consumed whole ring, reported.
            bad = true;
            break;
        }
    }
    ring.state.next_avail = Wrapping(slot);
    let state = packed_state(ring);
    state.avail_wrap = wrap;
    state.outstanding.push_back((id, count));
    if bad { Err(RingError::BadChain { head: id }) } else { Ok(Some(id)) }
}

/// An indirect table's entries (laid out in order, no `next`) into `segments`; false if the
/// table is malformed, outside memory, nested or over the chain budget.
fn walk_indirect(mem: &Memory, addr: u64, len: u32, budget: &mut usize, segments: &mut Vec<Segment>) -> bool {
    let len = len as usize;
    if len == 0 || !len.is_multiple_of(DESC_LEN) || len / DESC_LEN > *budget {
        return false;
    }
    let Ok(table) = mem.get_slice(GuestAddress(addr), len) else { return false };
    for i in 0..len / DESC_LEN {
        let Some((addr, len, _, flags)) = Ring::read_desc_unaligned(&table, i) else { return false };
        if flags & F_INDIRECT != 0 {
            return false;
        }
        segments.push(Segment { addr: GuestAddress(addr), len, write: flags & F_WRITE != 0 });
    }
    *budget -= len / DESC_LEN;
    true
}

pub(crate) fn unpop(ring: &mut Ring<'_, '_>, count: u16) {
    let size = ring.state.size;
    for _ in 0..count {
        let state = packed_state(ring);
        let Some((_, slots)) = state.outstanding.pop_back() else { return };
        let mut wrap = state.avail_wrap;
        let mut index = ring.state.next_avail.0;
        if slots > index {
            index += size;
            wrap = !wrap;
        }
        ring.state.next_avail = Wrapping(index - slots);
        packed_state(ring).avail_wrap = wrap;
    }
}

pub(crate) fn add_used(ring: &mut Ring<'_, '_>, id: u16, len: u32) {
    let state = packed_state(ring);
    // Usually the oldest (chains mostly complete in order).
    let Some(at) = state.outstanding.iter().position(|&(i, _)| i == id) else { return };
    let Some((_, slots)) = state.outstanding.remove(at) else { return };
    state.pending_used.push((id, len, slots));
    ring.unpublished = true;
}

/// Writes the used descriptors: all but the first, then the first's flags with release, so the
/// driver (which reads the flags at its used position first) sees the whole batch at once.
pub(crate) fn publish(ring: &mut Ring<'_, '_>) {
    if !std::mem::take(&mut ring.unpublished) {
        return;
    }
    let size = ring.state.size;
    let mut index = ring.state.next_used.0;
    let state = ring.state.packed.get_or_insert_with(PackedState::default);
    let mut wrap = state.used_wrap;
    let mut first = None;
    for &(id, len, slots) in &state.pending_used {
        let at = usize::from(index) * DESC_LEN;
        let _ = ring.desc.store_u32(at + 8, len, Ordering::Relaxed);
        store16(&ring.desc, at + 12, id, Ordering::Relaxed);
        let flags = if wrap { F_AVAIL | F_USED } else { 0 };
        if first.is_none() {
            first = Some((at, flags));
        } else {
            store16(&ring.desc, at + 14, flags, Ordering::Release);
        }
        // `slots` is at most the ring size (a chain is cut there).
        index += slots;
        if index >= size {
            index -= size;
            wrap = !wrap;
        }
    }
    state.pending_used.clear();
    state.used_wrap = wrap;
    ring.state.next_used = Wrapping(index);
    if let Some((at, flags)) = first {
        fence(Ordering::Release);
        store16(&ring.desc, at + 14, flags, Ordering::Release);
    }
}

/// After [`publish`]: does the driver want an interrupt (its event suppression area)?
pub(crate) fn needs_notification(ring: &mut Ring<'_, '_>) -> bool {
    // The driver's flags must be read after our used descriptors are visible.
    fence(Ordering::SeqCst);
    let flags = load16(&ring.avail, 2, Ordering::Acquire);
    let size = Wrapping(ring.state.size);
    let new = ring.state.next_used;
    let event_idx = ring.state.event_idx;
    let off_wrap = load16(&ring.avail, 0, Ordering::Relaxed);
    let state = packed_state(ring);
    let now = (new.0, state.used_wrap);
    let Some(old) = state.signalled.replace(now) else {
        return flags != EVENT_DISABLE;
    };
    if old == now {
        return false;
    }
    if flags != EVENT_DESC || !event_idx {
        return flags != EVENT_DISABLE;
    }
    let mut old = Wrapping(old.0);
    if new <= old {
        old -= size;
    }
    let mut off = Wrapping(off_wrap & !WRAP_BIT);
    if (off_wrap & WRAP_BIT != 0) != state.used_wrap {
        off -= size;
    }
    // virtio's vring_need_event: the event offset lies in (old, new].
    (new - off - Wrapping(1)) < (new - old)
}

/// Asks the driver to kick on new buffers (at the device's avail position with EVENT_IDX).
/// True if some arrived meanwhile; never for a broken ring.
pub(crate) fn enable_notification(ring: &mut Ring<'_, '_>) -> bool {
    if ring.state.broken {
        return false;
    }
    if ring.state.event_idx {
        let off_wrap = encode(ring.state.next_avail.0, packed_state(ring).avail_wrap);
        store16(&ring.used, 0, off_wrap, Ordering::Relaxed);
        store16(&ring.used, 2, EVENT_DESC, Ordering::Relaxed);
    } else {
        store16(&ring.used, 2, EVENT_ENABLE, Ordering::Relaxed);
    }
    // Our request must be visible before we look at the ring again.
    fence(Ordering::SeqCst);
    head_available(ring)
}

pub(crate) fn disable_notification(ring: &mut Ring<'_, '_>) {
    store16(&ring.used, 2, EVENT_DISABLE, Ordering::Relaxed);
}

//! The device side of a split virtqueue, hand-written for the per-frame hot path.
//!
//! `virtio-queue`'s `Queue` resolves a guest address for every ring field it touches (several
//! region lookups per frame: the profile showed a third of a worker's time in vm-memory's
//! address translation) and publishes the used index once per frame. Here the three ring areas
//! are resolved once per batch into `VolatileSlice`s, each buffer once per descriptor, and the
//! used index is published once per batch. `virtio-queue` still holds the ring configuration
//! the vhost-user protocol sets up and checks it ([`RingState::from_queue`]).
//!
//! Everything read from the ring is guest input: every index is bounds-checked, chains are
//! limited in length (no loops), indirect tables are checked and may not nest; a bad chain is
//! reported with its head so that the caller can hand it back and count it.

use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use virtio_queue::{Queue, QueueT};

use crate::packed_ring::{self, PackedState};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::guest_view::GuestView;
use vmq_sys::ring_words::RingWords;

pub(crate) const DESC_LEN: usize = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// avail.flags: the driver needs no interrupt (without EVENT_IDX).
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// used.flags: the device needs no kick (without EVENT_IDX).
const USED_F_NO_NOTIFY: u16 = 1;

/// How many chains ahead [`Ring::pop`] warms the descriptor, and the first buffer. The driver
/// wrote both on another core just before: fetched on first touch, each would stall the copy of
/// its frame in turn; started early, the misses of a burst overlap.
const PREFETCH_DESC_AHEAD: u16 = 8;
const PREFETCH_BUF_AHEAD: u16 = 4;

/// Guest memory as vmq maps it (no dirty-page bitmap).
pub type Memory = GuestMemoryMmap<()>;
pub(crate) type Slice<'m> = VolatileSlice<'m, ()>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("ring areas are not in guest memory")]
    BadRing,
    #[error("descriptor chain {head} is invalid (out of memory, looping, too long or nested)")]
    BadChain { head: u16 },
    #[error("available ring index jumped by more than the ring size")]
    BadAvailIndex,
    /// Reported after [`RingError::BadRing`] or [`RingError::BadAvailIndex`]: the ring is not
    /// served again until the driver resets it (a fresh [`RingState`]).
    #[error("ring is broken until the driver resets it")]
    Broken,
}

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (an RX buffer).
    pub write: bool,
}

/// Where a split ring lives and how far the device has got, kept between batches.
#[derive(Debug, Clone)]
pub struct RingState {
    pub size: u16,
    pub desc_table: GuestAddress,
    pub avail_ring: GuestAddress,
    pub used_ring: GuestAddress,
    pub next_avail: Wrapping<u16>,
    pub next_used: Wrapping<u16>,
    pub event_idx: bool,
    /// The used index at the last interrupt decision (EVENT_IDX), None before the first.
    signalled_used: Option<Wrapping<u16>>,
    /// The driver broke the ring (bad index, areas outside memory). Nothing it writes can be
    /// trusted until it resets the queue, so the ring is left alone: otherwise every poll
    /// reports the same error again and the worker never sleeps.
    pub(crate) broken: bool,
    /// A packed ring (VIRTIO_F_RING_PACKED): `desc_table` is its descriptor ring, `avail_ring`
    /// the driver's and `used_ring` the device's event suppression area; see [`crate::packed_ring`].
    pub packed: Option<PackedState>,
}

impl RingState {
    pub fn new(size: u16, desc_table: GuestAddress, avail_ring: GuestAddress, used_ring: GuestAddress) -> RingState {
        RingState {
            size,
            desc_table,
            avail_ring,
            used_ring,
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
            event_idx: false,
            signalled_used: None,
            broken: false,
            packed: None,
        }
    }

    /// The ring a `virtio-queue` `Queue` describes (set up by the vhost-user protocol).
    pub fn from_queue(queue: &Queue) -> RingState {
        RingState {
            size: queue.size(),
            desc_table: GuestAddress(queue.desc_table()),
            avail_ring: GuestAddress(queue.avail_ring()),
            used_ring: GuestAddress(queue.used_ring()),
            next_avail: Wrapping(queue.next_avail()),
            next_used: Wrapping(queue.next_used()),
            event_idx: queue.event_idx_enabled(),
            signalled_used: None,
            broken: false,
            packed: None,
        }
    }

    /// See [`RingError::Broken`].
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Writes the device's position back (GET_VRING_BASE reads it there).
    pub fn store_position(&self, queue: &mut Queue) {
        if let Some(packed) = &self.packed {
            return packed.store_position(self, queue);
        }
        queue.set_next_avail(self.next_avail.0);
        queue.set_next_used(self.next_used.0);
    }
}

/// A ring opened on guest memory for one batch.
pub struct Ring<'a, 'm> {
    pub(crate) mem: &'m Memory,
    /// Buffer addresses resolved with the region of the last hit kept (see [`GuestView`]).
    view: GuestView<'m>,
    pub(crate) state: &'a mut RingState,
    /// The three ring areas, resolved once per batch; accessed word by word with one bounds
    /// and alignment check each (vm-memory's volatile accessors cost several times that).
    pub(crate) desc: RingWords<'m>,
    pub(crate) avail: RingWords<'m>,
    pub(crate) used: RingWords<'m>,
    /// `size - 1`: ring positions are taken modulo the (power-of-two) size with a mask, not
    /// a division.
    mask: u16,
    /// Used entries written but not yet published.
    pub(crate) unpublished: bool,
    /// A packed ring: every operation goes to [`crate::packed_ring`].
    packed: bool,
    /// The driver's available index as last read: re-read only when the device has caught up
    /// with it (one acquire load per burst, not per chain).
    avail_seen: Wrapping<u16>,
}

impl<'a, 'm> Ring<'a, 'm> {
    /// Opens the ring for a batch. The first failure is [`RingError::BadRing`] and marks the
    /// ring broken; later attempts are [`RingError::Broken`] until the state is replaced.
    pub fn open(mem: &'m Memory, state: &'a mut RingState) -> Result<Ring<'a, 'm>, RingError> {
        if state.broken {
            return Err(RingError::Broken);
        }
        let packed = state.packed.is_some();
        let result = if packed { packed_ring::open_areas(mem, state) } else { Self::open_areas(mem, state) };
        if result.is_err() {
            state.broken = true;
        }
        let (desc, avail, used) = result?;
        Ok(Ring {
            desc: RingWords::new(desc),
            avail: RingWords::new(avail),
            used: RingWords::new(used),
            mask: state.size - 1,
            avail_seen: state.next_avail,
            mem,
            view: GuestView::new(mem),
            state,
            unpublished: false,
            packed,
        })
    }

    fn open_areas(mem: &'m Memory, state: &RingState) -> Result<(Slice<'m>, Slice<'m>, Slice<'m>), RingError> {
        let size = usize::from(state.size);
        if size == 0 || !size.is_power_of_two() {
            return Err(RingError::BadRing);
        }
        // The alignments the virtio spec requires (and the aligned loads and stores here rely on).
        if !state.desc_table.0.is_multiple_of(16)
            || !state.avail_ring.0.is_multiple_of(2)
            || !state.used_ring.0.is_multiple_of(4)
        {
            return Err(RingError::BadRing);
        }
        let area = |addr: GuestAddress, len: usize| mem.get_slice(addr, len).map_err(|_| RingError::BadRing);
        Ok((
            area(state.desc_table, DESC_LEN * size)?,
            area(state.avail_ring, 6 + 2 * size)?,
            area(state.used_ring, 6 + 8 * size)?,
        ))
    }

    /// Where the device is: its next avail and next used positions.
    pub fn position(&self) -> (u16, u16) {
        (self.state.next_avail.0, self.state.next_used.0)
    }

    pub fn memory(&self) -> &'m Memory {
        self.mem
    }

    /// The ring's guest memory for buffer accesses, translation cached (see [`GuestView`]).
    pub fn guest(&self) -> &GuestView<'m> {
        &self.view
    }

    #[inline(always)]
    fn load16(area: &RingWords<'m>, offset: usize, order: Ordering) -> u16 {
        // In bounds by construction of the areas; a failure reads as 0 (an empty ring).
        area.load_u16(offset, order).unwrap_or(0)
    }

    #[inline(always)]
    fn store16(area: &RingWords<'m>, offset: usize, value: u16, order: Ordering) {
        let _ = area.store_u16(offset, value, order);
    }

    fn avail_idx(&self) -> Wrapping<u16> {
        Wrapping(Self::load16(&self.avail, 2, Ordering::Acquire))
    }

    /// Frames the driver has made available and the device has not taken yet. An index more
    /// than a ring ahead is reported once ([`RingError::BadAvailIndex`]) and breaks the ring.
    pub fn pending(&mut self) -> Result<u16, RingError> {
        if self.packed {
            return packed_ring::pending(self);
        }
        if self.state.broken {
            return Err(RingError::Broken);
        }
        if self.avail_seen == self.state.next_avail {
            self.avail_seen = self.avail_idx();
        }
        let n = (self.avail_seen - self.state.next_avail).0;
        if n > self.state.size {
            self.state.broken = true;
            return Err(RingError::BadAvailIndex);
        }
        Ok(n)
    }

    /// Takes the next available chain: its buffers go to `segments` (cleared first). `Ok(None)`:
    /// nothing available. A bad chain is consumed and reported; hand it back with `add_used`.
    pub fn pop(&mut self, segments: &mut Vec<Segment>) -> Result<Option<u16>, RingError> {
        if self.packed {
            return packed_ring::pop(self, segments);
        }
        let available = self.pending()?;
        if available == 0 {
            return Ok(None);
        }
        self.prefetch_ahead(available);
        // The ring entries the index covers are visible after the acquire load of the index.
        let size = self.state.size;
        let slot = usize::from(self.state.next_avail.0 & self.mask);
        let head = Self::load16(&self.avail, 4 + 2 * slot, Ordering::Relaxed);
        self.state.next_avail += Wrapping(1);
        segments.clear();
        // A walk adds at most `size` segments; more room than that is left over from a larger
        // ring (before a reconnect) and is given back rather than kept for the port's life.
        if segments.capacity() > 2 * usize::from(size) {
            segments.shrink_to(usize::from(size));
        }
        match self.walk(head, segments) {
            Ok(()) => Ok(Some(head)),
            Err(()) => Err(RingError::BadChain { head }),
        }
    }

    /// Starts the cache misses of chains to come (see [`PREFETCH_DESC_AHEAD`]): only hints, so
    /// a bogus index or address the driver wrote here is simply skipped (`pop` checks it later).
    fn prefetch_ahead(&self, available: u16) {
        let size = self.state.size;
        let head_at = |ahead: u16| {
            let slot = usize::from((self.state.next_avail + Wrapping(ahead)).0 & self.mask);
            usize::from(Self::load16(&self.avail, 4 + 2 * slot, Ordering::Relaxed))
        };
        if available > PREFETCH_DESC_AHEAD {
            let head = head_at(PREFETCH_DESC_AHEAD);
            if head < usize::from(size) {
                vmq_sys::cpu::prefetch(self.desc.hint_address(head * DESC_LEN));
            }
        }
        if available > PREFETCH_BUF_AHEAD {
            let head = head_at(PREFETCH_BUF_AHEAD);
            if head >= usize::from(size) {
                return;
            }
            let Some((addr, len, flags, _)) = Self::read_desc(&self.desc, head) else { return };
            if flags & F_INDIRECT != 0 || len == 0 {
                return;
            }
            if let Some(buffer) = self.view.slice(GuestAddress(addr), 1) {
                let host = buffer.ptr_guard().as_ptr();
                vmq_sys::cpu::prefetch(host);
                // A small frame with its 12-byte header often straddles two lines.
                vmq_sys::cpu::prefetch(host.wrapping_add(64));
            }
        }
    }

    /// Gives back the last `count` chains taken (a frame that found too little room).
    pub fn unpop(&mut self, count: u16) {
        if self.packed {
            return packed_ring::unpop(self, count);
        }
        self.state.next_avail -= Wrapping(count);
        // Whatever was seen is still available (the driver never takes chains back).
    }

    /// Descriptor `index` of a table: two aligned 8-byte loads.
    #[inline(always)]
    fn read_desc(table: &RingWords<'m>, index: usize) -> Option<(u64, u32, u16, u16)> {
        let at = index * DESC_LEN;
        let addr = table.load_u64(at, Ordering::Relaxed)?;
        let rest = table.load_u64(at + 8, Ordering::Relaxed)?;
        Some((addr, rest as u32, (rest >> 32) as u16, (rest >> 48) as u16))
    }

    /// Descriptor `index` of an indirect table the driver did not align: read bytewise. The
    /// (addr, len, u16 at 12, u16 at 14) layout is a split descriptor's (flags, next) and a
    /// packed one's (id, flags) alike.
    pub(crate) fn read_desc_unaligned(table: &Slice<'m>, index: usize) -> Option<(u64, u32, u16, u16)> {
        let mut d = [0u8; DESC_LEN];
        table.read_slice(&mut d, index * DESC_LEN).ok()?;
        let word =
            |i: usize| u64::from_le_bytes([d[i], d[i + 1], d[i + 2], d[i + 3], d[i + 4], d[i + 5], d[i + 6], d[i + 7]]);
        let (addr, rest) = (word(0), word(8));
        Some((addr, rest as u32, (rest >> 32) as u16, (rest >> 48) as u16))
    }

    /// Follows chain `head` into `segments`. The virtio spec (2.7.5.3.1) bounds the work a
    /// guest can ask for: a chain has at most queue-size descriptors in total, direct and
    /// indirect together, and an indirect table at most queue-size entries. Every step here
    /// spends one of those `size` descriptors, so a looping or oversized chain costs at most
    /// `size` reads and `size` segments, never the length the guest wrote into a descriptor.
    fn walk(&self, head: u16, segments: &mut Vec<Segment>) -> Result<(), ()> {
        let size = usize::from(self.state.size);
        let mut index = usize::from(head);
        if index >= size {
            return Err(());
        }
        let mut budget = size;
        while budget > 0 {
            budget -= 1;
            let (addr, len, flags, next) = Self::read_desc(&self.desc, index).ok_or(())?;
            if flags & F_INDIRECT != 0 {
                let len = len as usize;
                if flags & F_NEXT != 0 || len == 0 || !len.is_multiple_of(DESC_LEN) || len / DESC_LEN > size {
                    return Err(());
                }
                let entries = len / DESC_LEN;
                let table = self.view.slice(GuestAddress(addr), len).ok_or(())?;
                let table_words = RingWords::new(table);
                let mut i = 0usize;
                // The indirect descriptor itself counted as one step; its entries replace it.
                budget += 1;
                while budget > 0 {
                    budget -= 1;
                    let (addr, len, flags, next) =
                        Self::read_desc(&table_words, i).or_else(|| Self::read_desc_unaligned(&table, i)).ok_or(())?;
                    if flags & F_INDIRECT != 0 {
                        return Err(()); // nested indirect tables are forbidden
                    }
                    segments.push(Segment { addr: GuestAddress(addr), len, write: flags & F_WRITE != 0 });
                    if flags & F_NEXT == 0 {
                        return Ok(());
                    }
                    i = usize::from(next);
                    if i >= entries {
                        return Err(());
                    }
                }
                return Err(());
            }
            segments.push(Segment { addr: GuestAddress(addr), len, write: flags & F_WRITE != 0 });
            if flags & F_NEXT == 0 {
                return Ok(());
            }
            index = usize::from(next);
            if index >= size {
                return Err(());
            }
        }
        Err(())
    }

    /// Returns chain `head` to the driver with `len` bytes written. Published by [`Ring::publish`].
    pub fn add_used(&mut self, head: u16, len: u32) {
        if self.packed {
            return packed_ring::add_used(self, head, len);
        }
        let slot = usize::from(self.state.next_used.0 & self.mask);
        // Two aligned 4-byte stores ({u32 id, u32 len}); visible with the index's release store.
        let _ = self.used.store_u32(4 + 8 * slot, u32::from(head), Ordering::Relaxed);
        let _ = self.used.store_u32(8 + 8 * slot, len, Ordering::Relaxed);
        self.state.next_used += Wrapping(1);
        self.unpublished = true;
    }

    /// Makes the used entries visible to the driver (one index store per batch).
    pub fn publish(&mut self) {
        if self.packed {
            return packed_ring::publish(self);
        }
        if std::mem::take(&mut self.unpublished) {
            Self::store16(&self.used, 2, self.state.next_used.0, Ordering::Release);
        }
    }

    /// Leaves the used entries added so far unpublished, also when this ring is dropped: the
    /// next [`Ring::publish`] (of a later `open`, after at least one more [`Ring::add_used`])
    /// makes them visible together with its own.
    pub fn hold_back_used(&mut self) {
        self.unpublished = false;
    }

    /// After [`Ring::publish`]: does the driver want an interrupt now?
    pub fn needs_notification(&mut self) -> bool {
        if self.packed {
            return packed_ring::needs_notification(self);
        }
        if !self.state.event_idx {
            return Self::load16(&self.avail, 0, Ordering::Acquire) & AVAIL_F_NO_INTERRUPT == 0;
        }
        // The driver's used_event must be read after our used index store is visible.
        fence(Ordering::SeqCst);
        let used_event = Wrapping(Self::load16(&self.avail, 4 + 2 * usize::from(self.state.size), Ordering::Relaxed));
        let new = self.state.next_used;
        let Some(old) = self.state.signalled_used.replace(new) else {
            return true;
        };
        // virtio spec "vring_need_event": notify if used_event lies in (old, new].
        (new - used_event - Wrapping(1)) < (new - old)
    }

    /// Asks the driver to kick on new buffers. True if some arrived meanwhile (don't sleep);
    /// never for a broken ring, whatever its index says.
    pub fn enable_notification(&mut self) -> bool {
        if self.packed {
            return packed_ring::enable_notification(self);
        }
        if self.state.broken {
            return false;
        }
        if self.state.event_idx {
            let offset = 4 + 8 * usize::from(self.state.size);
            Self::store16(&self.used, offset, self.state.next_avail.0, Ordering::Relaxed);
        } else {
            let flags = Self::load16(&self.used, 0, Ordering::Relaxed);
            Self::store16(&self.used, 0, flags & !USED_F_NO_NOTIFY, Ordering::Relaxed);
        }
        // Our request must be visible before we look at the index again.
        fence(Ordering::SeqCst);
        self.avail_seen = self.avail_idx();
        self.avail_seen != self.state.next_avail
    }

    /// The device is polling: kicks are not needed.
    pub fn disable_notification(&mut self) {
        if self.packed {
            return packed_ring::disable_notification(self);
        }
        if !self.state.event_idx {
            let flags = Self::load16(&self.used, 0, Ordering::Relaxed);
            Self::store16(&self.used, 0, flags | USED_F_NO_NOTIFY, Ordering::Relaxed);
        }
    }
}

impl Drop for Ring<'_, '_> {
    fn drop(&mut self) {
        self.publish();
    }
}

/// Copies `buf.len()` bytes from guest memory at `addr` (possibly across regions).
pub fn read_guest(mem: &Memory, addr: GuestAddress, buf: &mut [u8]) -> bool {
    match mem.get_slice(addr, buf.len()) {
        Ok(s) => s.copy_to(buf) == buf.len(),
        // Across a region boundary (rare): the general path.
        Err(_) => mem.read_slice(buf, addr).is_ok(),
    }
}

/// Copies `data` into guest memory at `addr` (possibly across regions).
pub fn write_guest(mem: &Memory, addr: GuestAddress, data: &[u8]) -> bool {
    match mem.get_slice(addr, data.len()) {
        Ok(s) => {
            s.copy_from(data);
            true
        }
        Err(_) => mem.write_slice(data, addr).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{BufferSpec, SplitRingDriver};

    const SIZE: u16 = 8;
    const BUFS: u64 = 0x1_0000;

    fn setup() -> (Memory, SplitRingDriver, RingState) {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x2_0000)]).unwrap();
        let (mut driver, _) = SplitRingDriver::new(SIZE, GuestAddress(0));
        driver.init(&mem).unwrap();
        let mut queue = Queue::new(SIZE).unwrap();
        driver.configure(&mut queue);
        let state = RingState::from_queue(&queue);
        (mem, driver, state)
    }

    fn write_desc(mem: &Memory, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

    #[test]
    fn plain_and_indirect_chains() {
        let (mem, mut driver, mut state) = setup();
        let buf =
            |i: u64, len: u32, w: bool| BufferSpec { addr: GuestAddress(BUFS + i * 0x100), len, device_writes: w };
        driver.add_chain(&mem, &[buf(0, 10, false), buf(1, 20, false)]);
        // An indirect table of two writable buffers at 0x8000, referenced by descriptor 5.
        write_desc(&mem, 0x8000, BUFS + 0x800, 30, F_NEXT | F_WRITE, 1);
        write_desc(&mem, 0x8010, BUFS + 0x900, 40, F_WRITE, 0);
        driver.write_raw_desc(&mem, 5, 0x8000, 32, F_INDIRECT, 0);
        driver.post_raw(&mem, 5);
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        assert_eq!(ring.pending(), Ok(2));
        let mut segs = Vec::new();
        let head = ring.pop(&mut segs).unwrap().unwrap();
        assert_eq!(segs.iter().map(|s| (s.len, s.write)).collect::<Vec<_>>(), vec![(10, false), (20, false)]);
        ring.add_used(head, 0);
        assert_eq!(ring.pop(&mut segs), Ok(Some(5)));
        assert_eq!(
            segs.iter().map(|s| (s.addr.0, s.len, s.write)).collect::<Vec<_>>(),
            vec![(BUFS + 0x800, 30, true), (BUFS + 0x900, 40, true)]
        );
        ring.add_used(5, 70);
        assert_eq!(ring.pop(&mut segs), Ok(None));
        drop(ring);
        // The driver sees both used entries once the ring is closed (published).
        assert_eq!(driver.pop_used(&mem), Some((head, 0)));
        assert_eq!(driver.pop_used(&mem), Some((5, 70)));
        assert_eq!(driver.pop_used(&mem), None);
    }

    #[test]
    fn hostile_chains_are_reported_with_their_head() {
        let (mem, mut driver, mut state) = setup();
        // 0: loops on itself. 1: indirect + next. 2: indirect table outside memory.
        // 3: nested indirect. 4: next index beyond the ring. 6: indirect table whose chain loops.
        driver.write_raw_desc(&mem, 0, BUFS, 10, F_NEXT, 0);
        driver.write_raw_desc(&mem, 1, 0x8000, 16, F_INDIRECT | F_NEXT, 2);
        driver.write_raw_desc(&mem, 2, 1 << 40, 32, F_INDIRECT, 0);
        write_desc(&mem, 0x8100, 0x8000, 16, F_INDIRECT, 0);
        driver.write_raw_desc(&mem, 3, 0x8100, 16, F_INDIRECT, 0);
        driver.write_raw_desc(&mem, 4, BUFS, 10, F_NEXT, 200);
        write_desc(&mem, 0x8200, BUFS, 10, F_NEXT, 1);
        write_desc(&mem, 0x8210, BUFS, 10, F_NEXT, 0);
        driver.write_raw_desc(&mem, 6, 0x8200, 32, F_INDIRECT, 0);
        for head in [0, 1, 2, 3, 4, 6] {
            driver.post_raw(&mem, head);
        }
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        let mut segs = Vec::new();
        for head in [0, 1, 2, 3, 4, 6] {
            assert_eq!(ring.pop(&mut segs), Err(RingError::BadChain { head }), "chain {head}");
            ring.add_used(head, 0);
        }
        assert_eq!(ring.pop(&mut segs), Ok(None), "bad chains are consumed, the ring moves on");
    }

    #[test]
    fn huge_looping_indirect_table_is_refused_with_bounded_work() {
        // A guest's worst case: an indirect table as large as memory allows (here 8 MiB, 512 Ki
        // entries) whose first entry loops on itself. The spec bounds an indirect table by the
        // queue size: the chain is refused without walking it, and the reused segment vector
        // stays small.
        const TABLE: u64 = 0x10_0000;
        const TABLE_LEN: u32 = 8 << 20;
        let mem = Memory::from_ranges(&[(GuestAddress(0), TABLE as usize + TABLE_LEN as usize)]).unwrap();
        let (mut driver, _) = SplitRingDriver::new(SIZE, GuestAddress(0));
        driver.init(&mem).unwrap();
        let mut queue = Queue::new(SIZE).unwrap();
        driver.configure(&mut queue);
        let mut state = RingState::from_queue(&queue);
        write_desc(&mem, TABLE, BUFS, 64, F_NEXT, 0);
        driver.write_raw_desc(&mem, 0, TABLE, TABLE_LEN, F_INDIRECT, 0);
        driver.post_raw(&mem, 0);
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        let mut segs = Vec::new();
        assert_eq!(ring.pop(&mut segs), Err(RingError::BadChain { head: 0 }));
        assert!(segs.len() <= usize::from(SIZE), "walked {} entries of a {SIZE}-entry queue", segs.len());
        assert!(segs.capacity() <= 2 * usize::from(SIZE), "segment vector grew to {}", segs.capacity());
    }

    #[test]
    fn chains_are_bounded_by_the_queue_size_direct_and_indirect_together() {
        let (mem, mut driver, mut state) = setup();
        // A table of exactly SIZE entries is allowed, if its chain is SIZE long in total.
        for i in 0..u64::from(SIZE) {
            let last = i + 1 == u64::from(SIZE);
            write_desc(&mem, 0x8000 + 16 * i, BUFS, 8, if last { 0 } else { F_NEXT }, i as u16 + 1);
        }
        driver.write_raw_desc(&mem, 1, 0x8000, 16 * u32::from(SIZE), F_INDIRECT, 0);
        driver.post_raw(&mem, 1);
        // One table entry more than the queue size: refused.
        driver.write_raw_desc(&mem, 2, 0x8000, 16 * (u32::from(SIZE) + 1), F_INDIRECT, 0);
        driver.post_raw(&mem, 2);
        // Two direct descriptors then a full-size table: SIZE + 2 descriptors in the chain.
        driver.write_raw_desc(&mem, 3, BUFS, 8, F_NEXT, 4);
        driver.write_raw_desc(&mem, 4, BUFS, 8, F_NEXT, 5);
        driver.write_raw_desc(&mem, 5, 0x8000, 16 * u32::from(SIZE), F_INDIRECT, 0);
        driver.post_raw(&mem, 3);
        // A table length that is not a whole number of descriptors.
        driver.write_raw_desc(&mem, 6, 0x8000, 24, F_INDIRECT, 0);
        driver.post_raw(&mem, 6);
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        let mut segs = Vec::new();
        assert_eq!(ring.pop(&mut segs), Ok(Some(1)));
        assert_eq!(segs.len(), usize::from(SIZE));
        for head in [2, 3, 6] {
            assert_eq!(ring.pop(&mut segs), Err(RingError::BadChain { head }), "chain {head}");
        }
    }

    #[test]
    fn an_oversized_segment_vector_is_shrunk() {
        let (mem, mut driver, mut state) = setup();
        driver.add_chain(&mem, &[BufferSpec { addr: GuestAddress(BUFS), len: 10, device_writes: false }]);
        driver.publish(&mem);
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        // Left over from a ring that was larger before a reconnect.
        let mut segs = Vec::with_capacity(4096);
        assert_eq!(ring.pop(&mut segs), Ok(Some(0)));
        assert!(segs.capacity() <= 2 * usize::from(SIZE), "capacity {}", segs.capacity());
    }

    #[test]
    fn prefetching_ahead_survives_hostile_entries() {
        // Heads beyond the ring and buffers outside guest memory, more of them than the
        // prefetch distances: the hints skip them, each chain is still reported as bad.
        const BIG: u16 = 32;
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x2_0000)]).unwrap();
        let (mut driver, _) = SplitRingDriver::new(BIG, GuestAddress(0));
        driver.init(&mem).unwrap();
        let mut queue = Queue::new(BIG).unwrap();
        driver.configure(&mut queue);
        let mut state = RingState::from_queue(&queue);
        driver.write_raw_desc(&mem, 1, 1 << 40, 64, 0, 0);
        driver.write_raw_desc(&mem, 2, u64::MAX - 8, 64, F_WRITE, 0);
        let heads = [BIG + 3, 1, 2, u16::MAX, 1, 2, BIG, 1, 2, 1, 2, u16::MAX, 2, 1];
        for &head in &heads {
            driver.post_raw(&mem, head);
        }
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        let mut segs = Vec::new();
        for &head in &heads {
            match ring.pop(&mut segs) {
                Err(RingError::BadChain { head: h }) => assert_eq!(h, head),
                // In-range descriptors pointing outside memory are the copy's to refuse.
                Ok(Some(h)) => assert!(h == 1 || h == 2, "head {h}"),
                other => panic!("head {head}: {other:?}"),
            }
        }
        assert_eq!(ring.pop(&mut segs), Ok(None));
    }

    #[test]
    fn bogus_indexes_are_refused() {
        let (mem, _driver, mut state) = setup();
        // A head beyond the ring.
        mem.store(300u16.to_le(), GuestAddress(state.avail_ring.0 + 4), Ordering::Relaxed).unwrap();
        mem.store(1u16.to_le(), GuestAddress(state.avail_ring.0 + 2), Ordering::Release).unwrap();
        let mut segs = Vec::new();
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        assert_eq!(ring.pop(&mut segs), Err(RingError::BadChain { head: 300 }));
        drop(ring);
        // An available index more than a ring ahead of the device.
        mem.store(100u16.to_le(), GuestAddress(state.avail_ring.0 + 2), Ordering::Release).unwrap();
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        assert_eq!(ring.pending(), Err(RingError::BadAvailIndex));
        // Reported once: the ring is broken now, and stays so whatever the driver writes.
        assert_eq!(ring.pop(&mut segs), Err(RingError::Broken));
        assert!(!ring.enable_notification(), "a broken ring does not keep the worker awake");
        drop(ring);
        assert!(state.is_broken());
        mem.store(2u16.to_le(), GuestAddress(state.avail_ring.0 + 2), Ordering::Release).unwrap();
        assert!(matches!(Ring::open(&mem, &mut state), Err(RingError::Broken)));
        // Rings outside memory, and sizes that are not a power of two.
        let mut outside = RingState::new(8, GuestAddress(1 << 40), GuestAddress(0), GuestAddress(0x400));
        assert!(matches!(Ring::open(&mem, &mut outside), Err(RingError::BadRing)));
        assert!(matches!(Ring::open(&mem, &mut outside), Err(RingError::Broken)), "reported once");
        let mut odd = RingState::new(6, GuestAddress(0), GuestAddress(0x100), GuestAddress(0x400));
        assert!(matches!(Ring::open(&mem, &mut odd), Err(RingError::BadRing)));
        let mut misaligned = RingState::new(8, GuestAddress(0), GuestAddress(0x100), GuestAddress(0x402));
        assert!(matches!(Ring::open(&mem, &mut misaligned), Err(RingError::BadRing)));
    }

    #[test]
    fn event_idx_interrupts_only_when_the_driver_asked() {
        let (mem, _driver, mut state) = setup();
        state.event_idx = true;
        let used_event_at = GuestAddress(state.avail_ring.0 + 4 + 2 * u64::from(SIZE));
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        // First decision: always notify.
        ring.add_used(0, 0);
        ring.publish();
        assert!(ring.needs_notification());
        // The driver wants an interrupt once used index 3 has been passed (used_event = 2).
        mem.store(2u16.to_le(), used_event_at, Ordering::Relaxed).unwrap();
        ring.add_used(1, 0);
        ring.publish();
        assert!(!ring.needs_notification(), "used idx 2 does not pass used_event 2");
        ring.add_used(2, 0);
        ring.add_used(3, 0);
        ring.publish();
        assert!(ring.needs_notification(), "used idx 4 passed used_event 2");
        ring.add_used(4, 0);
        ring.publish();
        assert!(!ring.needs_notification(), "already notified for this event");
        // Kick suppression: the device asks to be kicked at its next avail index.
        assert!(!ring.enable_notification());
        let avail_event: u16 =
            mem.load(GuestAddress(state_used_ring(&ring) + 4 + 8 * u64::from(SIZE)), Ordering::Relaxed).unwrap();
        assert_eq!(u16::from_le(avail_event), 0);
    }

    fn state_used_ring(ring: &Ring<'_, '_>) -> u64 {
        ring.state.used_ring.0
    }
}

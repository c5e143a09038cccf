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

/// How many single-descriptor chains [`Ring::pop`] reads ahead at once (a burst): their avail
/// entries and descriptors are read in one pass, then handed out one a call without touching
/// the rings again (DPDK's vhost library reads its split rings the same way).
const BURST: u16 = 8;

/// A chain read ahead: its head and its one buffer.
#[derive(Debug, Clone, Copy)]
struct Ahead {
    head: u16,
    segment: Segment,
}

const NO_CHAIN: Ahead = Ahead { head: 0, segment: Segment { addr: GuestAddress(0), len: 0, write: false } };

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

    /// Has the driver made chains available that the device has not taken? One load of the
    /// avail index, so that a poll finding nothing costs little: a worker polls every VM's TX
    /// ring each round, and with many VMs most are idle (opening a ring resolves its three
    /// areas). Errs on "yes" (a packed ring, a broken ring, an index outside memory): the full
    /// open then decides, and reports what is wrong.
    pub fn avail_pending(&self, mem: &Memory) -> bool {
        if self.packed.is_some() || self.broken {
            return true;
        }
        let Some(index_at) = self.avail_ring.0.checked_add(2).map(GuestAddress) else { return true };
        match mem.load::<u16>(index_at, Ordering::Acquire) {
            Ok(index) => Wrapping(u16::from_le(index)) != self.next_avail,
            Err(_) => true,
        }
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
    /// Chains read ahead (see [`BURST`]): `ahead[i]` is the chain at avail position
    /// `ahead_at + i`, for `i < ahead_len`. Keyed by position, so [`Ring::unpop`] needs no
    /// bookkeeping: chains given back are found here again.
    ahead: [Ahead; BURST as usize],
    ahead_at: Wrapping<u16>,
    ahead_len: u16,
    /// How far a burst reads ahead: [`BURST`], or fewer when the caller said it takes fewer
    /// chains ([`Ring::expect_chains`]).
    burst: u16,
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
            ahead: [NO_CHAIN; BURST as usize],
            ahead_at: state.next_avail,
            ahead_len: 0,
            burst: BURST,
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

    /// The caller takes about `chains` chains in this batch: bursts read no further ahead than
    /// that. A worker delivering one frame to each of many VMs would otherwise read eight
    /// descriptors of each VM's RX ring and prefetch seven buffers it does not write (with
    /// many VMs, evicted again before their turn comes).
    pub fn expect_chains(&mut self, chains: usize) {
        self.burst = chains.clamp(1, usize::from(BURST)) as u16;
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
            self.ahead_len = 0;
            return Err(RingError::BadAvailIndex);
        }
        Ok(n)
    }

    /// Takes the next available chain: its buffers go to `segments` (cleared first). `Ok(None)`:
    /// nothing available. A bad chain is consumed and reported; hand it back with `add_used`.
    ///
    /// The common case, a chain of one direct descriptor, is served from a burst read ahead
    /// ([`BURST`]): no ring access, index check or chain walk per chain. Everything else
    /// (chains, indirect tables, bad indexes) goes through the per-chain walk, which checks it.
    #[inline]
    pub fn pop(&mut self, segments: &mut Vec<Segment>) -> Result<Option<u16>, RingError> {
        if self.packed {
            return packed_ring::pop(self, segments);
        }
        let k = (self.state.next_avail - self.ahead_at).0;
        if k < self.ahead_len
            && let Some(chain) = self.ahead.get(usize::from(k))
        {
            self.state.next_avail += Wrapping(1);
            segments.clear();
            segments.push(chain.segment);
            return Ok(Some(chain.head));
        }
        self.pop_burst(segments)
    }

    /// Reads the next burst: the avail entries up to [`BURST`] ahead (as many as the driver made
    /// available, under one acquire load of its index), and their descriptors as long as each
    /// is a valid head of a one-descriptor chain. The first chain is taken at once; if it is
    /// not such a chain, it is walked by [`Ring::pop_one`].
    fn pop_burst(&mut self, segments: &mut Vec<Segment>) -> Result<Option<u16>, RingError> {
        let available = self.pending()?;
        if available == 0 {
            return Ok(None);
        }
        let size = self.state.size;
        // A walk adds at most `size` segments; more room than that is left over from a larger
        // ring (before a reconnect) and is given back rather than kept for the port's life.
        if segments.capacity() > 2 * usize::from(size) {
            segments.shrink_to(usize::from(size));
        }
        // The ring entries the index covers are visible after the acquire load of the index.
        let start = self.state.next_avail.0;
        let burst = usize::from(available.min(self.burst));
        let mut len = 0usize;
        while len < burst {
            let slot = usize::from(start.wrapping_add(len as u16) & self.mask);
            let head = Self::load16(&self.avail, 4 + 2 * slot, Ordering::Relaxed);
            if head >= size {
                break;
            }
            let Some((addr, seg_len, flags, _)) = Self::read_desc(&self.desc, usize::from(head)) else { break };
            if flags & (F_NEXT | F_INDIRECT) != 0 {
                break;
            }
            self.ahead[len] = Ahead {
                head,
                segment: Segment { addr: GuestAddress(addr), len: seg_len, write: flags & F_WRITE != 0 },
            };
            len += 1;
        }
        let len = len as u16;
        self.ahead_at = Wrapping(start);
        self.ahead_len = len;
        self.prefetch_burst(len);
        if len == 0 {
            return self.pop_one(segments);
        }
        self.state.next_avail += Wrapping(1);
        segments.clear();
        segments.push(self.ahead[0].segment);
        Ok(Some(self.ahead[0].head))
    }

    /// Takes the next available chain by walking it, whatever its shape: the general path
    /// behind [`Ring::pop`] (and the reference its bursts are tested against).
    fn pop_one(&mut self, segments: &mut Vec<Segment>) -> Result<Option<u16>, RingError> {
        let available = self.pending()?;
        if available == 0 {
            return Ok(None);
        }
        let size = self.state.size;
        let slot = usize::from(self.state.next_avail.0 & self.mask);
        let head = Self::load16(&self.avail, 4 + 2 * slot, Ordering::Relaxed);
        self.state.next_avail += Wrapping(1);
        segments.clear();
        if segments.capacity() > 2 * usize::from(size) {
            segments.shrink_to(usize::from(size));
        }
        match self.walk(head, segments) {
            Ok(()) => Ok(Some(head)),
            Err(()) => Err(RingError::BadChain { head }),
        }
    }

    /// Starts the cache misses of the buffers of the burst just read (copied one by one as
    /// their chains are taken). The driver wrote them on another core just before: fetched on
    /// first touch, each would stall the copy of its frame in turn; started early, the misses
    /// overlap. Only hints, from the region of the last hit: an address elsewhere is skipped.
    /// (The descriptors need no hint: the burst reads them back to back, their misses overlap.)
    fn prefetch_burst(&self, len: u16) {
        for i in 1..usize::from(len).min(self.ahead.len()) {
            if let Some(host) = self.view.hint(self.ahead[i].segment.addr) {
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
        let (addr, rest) = table.load_u64_pair(index * DESC_LEN, Ordering::Relaxed)?;
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
        let _ = self.used.store_u32_pair(4 + 8 * slot, u32::from(head), len, Ordering::Relaxed);
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
    fn an_idle_ring_is_seen_idle_without_opening_it() {
        let (mem, mut driver, mut state) = setup();
        assert!(!state.avail_pending(&mem), "nothing posted yet");
        let buf = |i: u64| BufferSpec { addr: GuestAddress(BUFS + i * 0x100), len: 64, device_writes: false };
        driver.add_chain(&mem, &[buf(0)]);
        assert!(!state.avail_pending(&mem), "added, not yet published");
        driver.publish(&mem);
        assert!(state.avail_pending(&mem));
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        let mut segs = Vec::new();
        let head = ring.pop(&mut segs).unwrap().unwrap();
        ring.add_used(head, 0);
        drop(ring);
        assert!(!state.avail_pending(&mem), "all taken");
        // Whatever is wrong is for the full open to find and report.
        let mut broken = state.clone();
        broken.avail_ring = GuestAddress(0x10_0000);
        assert!(broken.avail_pending(&mem), "an avail ring outside memory");
        broken.broken = true;
        assert!(broken.avail_pending(&mem));
    }

    #[test]
    fn a_burst_reads_no_further_ahead_than_the_caller_takes() {
        let (mem, mut driver, mut state) = setup();
        for i in 0..6 {
            driver
                .add_chain(&mem, &[BufferSpec { addr: GuestAddress(BUFS + i * 0x100), len: 64, device_writes: true }]);
        }
        driver.publish(&mem);
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        ring.expect_chains(2);
        let mut segs = Vec::new();
        let first = ring.pop(&mut segs).unwrap().unwrap();
        assert_eq!(ring.ahead_len, 2, "read ahead past the two chains expected");
        // Taking more than expected still works: the next burst reads on.
        let mut heads = vec![first];
        while let Some(head) = ring.pop(&mut segs).unwrap() {
            heads.push(head);
        }
        assert_eq!(heads, vec![0, 1, 2, 3, 4, 5]);
        drop(ring);
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        ring.expect_chains(0);
        assert_eq!(ring.burst, 1);
        ring.expect_chains(1000);
        assert_eq!(ring.burst, BURST);
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

    mod burst {
        use super::*;
        use proptest::prelude::*;

        const DESC: u64 = 0;
        const AVAIL: u64 = 0x1000;
        const USED: u64 = 0x2000;
        const TABLE: u64 = 0x3000;
        const TABLE_ENTRIES: u64 = 8;

        /// What the driver (or the device) does next.
        #[derive(Debug, Clone)]
        enum Op {
            Pop,
            /// Gives back up to this many of the chains taken since the ring was opened.
            Unpop(u16),
            /// Makes these heads available (as far as the ring has room).
            Post(Vec<u16>),
            /// Moves the available index more than a ring ahead (the ring breaks).
            Jump(u16),
            Pending,
            /// Closes the ring (publishing) and opens it again.
            Reopen,
            /// The caller says it takes about this many chains (bursts read no further).
            Expect(usize),
        }

        fn op(size: u16) -> impl Strategy<Value = Op> {
            prop_oneof![
                8 => Just(Op::Pop),
                2 => (1u16..6).prop_map(Op::Unpop),
                3 => prop::collection::vec(prop_oneof![8 => 0..size, 1 => size..size + 4, 1 => Just(u16::MAX)], 1..12).prop_map(Op::Post),
                1 => (1u16..100).prop_map(Op::Jump),
                1 => Just(Op::Pending),
                2 => Just(Op::Reopen),
                2 => (0usize..12).prop_map(Op::Expect),
            ]
        }

        /// A descriptor: mostly one plain buffer, some chained, indirect or with any flags, some
        /// pointing outside memory or at the next descriptor out of range.
        fn desc(size: u16) -> impl Strategy<Value = (u64, u32, u16, u16)> {
            let flags = prop_oneof![6 => Just(0), 3 => Just(F_WRITE), 2 => Just(F_NEXT), 1 => Just(F_NEXT | F_WRITE), 2 => Just(F_INDIRECT), 1 => any::<u16>()];
            let addr =
                prop_oneof![8 => (0u64..0x100).prop_map(|i| BUFS + i * 0x40), 1 => Just(1u64 << 40), 2 => Just(TABLE)];
            let len = prop_oneof![4 => 0u32..2048, 2 => (1u32..=TABLE_ENTRIES as u32 + 1).prop_map(|n| n * 16), 1 => any::<u32>()];
            (addr, len, flags, 0..size + 2)
        }

        fn write_avail(mem: &Memory, size: u16, position: u16, head: u16) {
            let at = AVAIL + 4 + 2 * u64::from(position & (size - 1));
            mem.store(head.to_le(), GuestAddress(at), Ordering::Relaxed).unwrap();
        }

        fn write_avail_idx(mem: &Memory, idx: u16) {
            mem.store(idx.to_le(), GuestAddress(AVAIL + 2), Ordering::Release).unwrap();
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            /// `pop` (bursts of one-descriptor chains read ahead, the walk for the rest) answers
            /// exactly as the per-chain walk alone, chain by chain: same heads, same buffers,
            /// same errors, same positions, whatever the driver wrote (chains, indirect tables,
            /// heads and next indexes out of range, bogus index jumps), across the 16-bit wrap
            /// of the ring index, with chains given back (`unpop`) and the ring reopened.
            #[test]
            fn pop_answers_as_the_per_chain_walk(
                (size, ops) in prop_oneof![Just(4u16), Just(8), Just(16), Just(32)]
                    .prop_flat_map(|size| (Just(size), prop::collection::vec(op(size), 1..120))),
                start in prop_oneof![any::<u16>(), 0xffe0u16..=0xffff],
                descs in prop::collection::vec(desc(32), 32),
                table in prop::collection::vec(desc(TABLE_ENTRIES as u16), TABLE_ENTRIES as usize),
            ) {
                let mem = Memory::from_ranges(&[(GuestAddress(0), 0x2_0000)]).unwrap();
                for (i, &(addr, len, flags, next)) in descs.iter().take(usize::from(size)).enumerate() {
                    write_desc(&mem, DESC + 16 * i as u64, addr, len, flags, next.min(size + 1));
                }
                for (i, &(addr, len, flags, next)) in table.iter().enumerate() {
                    // Table entries do not nest, mostly.
                    let flags = if flags == F_INDIRECT { 0 } else { flags };
                    write_desc(&mem, TABLE + 16 * i as u64, addr, len, flags, next);
                }
                write_avail_idx(&mem, start);
                let state = || {
                    let mut s = RingState::new(size, GuestAddress(DESC), GuestAddress(AVAIL), GuestAddress(USED));
                    s.next_avail = Wrapping(start);
                    s.next_used = Wrapping(start);
                    s
                };
                let (mut state_a, mut state_b) = (state(), state());
                let mut avail_idx = start;
                let (mut segs_a, mut segs_b) = (Vec::new(), Vec::new());
                let mut ops = ops.into_iter().peekable();
                'open: while ops.peek().is_some() {
                    // The idle check never says "nothing" while there is something to take.
                    let idle = !state_a.avail_pending(&mem);
                    let (a, b) = (Ring::open(&mem, &mut state_a), Ring::open(&mem, &mut state_b));
                    let (mut a, mut b) = match (a, b) {
                        (Ok(a), Ok(b)) => (a, b),
                        (Err(ea), Err(eb)) => { prop_assert_eq!(ea, eb); break; }
                        _ => { prop_assert!(false, "one ring opened, the other did not"); unreachable!() }
                    };
                    if idle {
                        prop_assert_eq!(a.pending(), Ok(0));
                        prop_assert_eq!(b.pending(), Ok(0));
                    }
                    let mut taken = 0u16;
                    for op in ops.by_ref() {
                        match op {
                            Op::Pop => {
                                let (ra, rb) = (a.pop(&mut segs_a), b.pop_one(&mut segs_b));
                                prop_assert_eq!(ra, rb);
                                match ra {
                                    Ok(Some(head)) => {
                                        prop_assert_eq!(&segs_a, &segs_b, "chain {}", head);
                                        taken += 1;
                                    }
                                    Err(RingError::BadChain { head }) => {
                                        a.add_used(head, 0);
                                        b.add_used(head, 0);
                                    }
                                    _ => {}
                                }
                            }
                            Op::Unpop(n) => {
                                let n = n.min(taken);
                                a.unpop(n);
                                b.unpop(n);
                                taken -= n;
                            }
                            Op::Post(heads) => {
                                // Chains taken in this opening may still be given back.
                                let device = a.position().0.wrapping_sub(taken);
                                for head in heads {
                                    // A driver never overwrites entries the device has not taken
                                    // and returned (it has only `size` descriptors).
                                    if avail_idx.wrapping_sub(device) >= size {
                                        break;
                                    }
                                    write_avail(&mem, size, avail_idx, head);
                                    avail_idx = avail_idx.wrapping_add(1);
                                }
                                write_avail_idx(&mem, avail_idx);
                            }
                            Op::Jump(n) => {
                                avail_idx = a.position().0.wrapping_add(size).wrapping_add(n);
                                write_avail_idx(&mem, avail_idx);
                            }
                            Op::Pending => prop_assert_eq!(a.pending(), b.pending()),
                            Op::Reopen => continue 'open,
                            Op::Expect(n) => a.expect_chains(n),
                        }
                        prop_assert_eq!(a.position(), b.position());
                    }
                }
                prop_assert_eq!(state_a.next_avail, state_b.next_avail);
                prop_assert_eq!(state_a.broken, state_b.broken);
            }
        }

        #[test]
        fn a_burst_stops_at_the_first_chain_it_cannot_take_whole() {
            // Plain, plain, chained (1 -> 2), plain, indirect: the burst takes the first two,
            // the walk the chain, a new burst the plain one, the walk the indirect table.
            let mem = Memory::from_ranges(&[(GuestAddress(0), 0x2_0000)]).unwrap();
            write_desc(&mem, DESC, BUFS, 60, 0, 0);
            write_desc(&mem, DESC + 16 * 3, BUFS + 0x100, 70, F_WRITE, 0);
            write_desc(&mem, DESC + 16, BUFS + 0x200, 10, F_NEXT, 2);
            write_desc(&mem, DESC + 32, BUFS + 0x300, 20, 0, 0);
            write_desc(&mem, DESC + 16 * 4, BUFS + 0x400, 30, 0, 0);
            write_desc(&mem, TABLE, BUFS + 0x500, 40, 0, 0);
            write_desc(&mem, DESC + 16 * 5, TABLE, 16, F_INDIRECT, 0);
            let heads = [0u16, 3, 1, 4, 5];
            let start = 0xfffeu16;
            for (i, &head) in heads.iter().enumerate() {
                write_avail(&mem, SIZE, start.wrapping_add(i as u16), head);
            }
            write_avail_idx(&mem, start.wrapping_add(heads.len() as u16));
            let mut state = RingState::new(SIZE, GuestAddress(DESC), GuestAddress(AVAIL), GuestAddress(USED));
            state.next_avail = Wrapping(start);
            let mut ring = Ring::open(&mem, &mut state).unwrap();
            let mut segs = Vec::new();
            let mut got = Vec::new();
            let mut given_back = false;
            while let Some(head) = ring.pop(&mut segs).unwrap() {
                got.push((head, segs.iter().map(|s| s.len).collect::<Vec<_>>()));
                if got.len() == 2 && !given_back {
                    // Given back and taken again: served from the burst as before.
                    ring.unpop(2);
                    got.clear();
                    given_back = true;
                }
                if got.len() > heads.len() {
                    break;
                }
            }
            assert_eq!(got, vec![(0, vec![60]), (3, vec![70]), (1, vec![10, 20]), (4, vec![30]), (5, vec![40])]);
            assert_eq!(ring.position().0, start.wrapping_add(heads.len() as u16));
        }
    }
}

//! The driver side of a split virtqueue, as a guest's virtio driver would run it: descriptor
//! table, available ring and used ring in guest memory, written with the ordering the virtio spec
//! requires. Used by in-process `mem` ports (tests and `vmq bench`) to play the guest, so that the
//! device code under test walks real rings in real guest memory.
//!
//! Hand-written: it is the mirror image of the device-side ring handling, and no rust-vmm crate
//! offers a driver outside its test-only mocks.

use std::sync::atomic::{Ordering, fence};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One buffer of a chain to post.
#[derive(Debug, Clone, Copy)]
pub struct BufferSpec {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device writes it (RX) rather than reads it (TX).
    pub device_writes: bool,
}

#[derive(Debug)]
pub struct SplitRingDriver {
    size: u16,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    next_avail: u16,
    last_used: u16,
    free: Vec<u16>,
    /// Length of the chain starting at each head, to return its descriptors to `free`.
    chain_len: Vec<u16>,
}

impl SplitRingDriver {
    /// Lays the rings out at `base`; returns the driver and the first address after them.
    pub fn new(size: u16, base: GuestAddress) -> (SplitRingDriver, GuestAddress) {
        assert!(size.is_power_of_two() && size > 0, "queue size must be a power of two");
        let n = u64::from(size);
        let desc_table = base;
        let avail_ring = GuestAddress(desc_table.0 + 16 * n);
        let used_ring = GuestAddress((avail_ring.0 + 6 + 2 * n + 3) & !3);
        let end = GuestAddress((used_ring.0 + 6 + 8 * n + 4095) & !4095);
        let driver = SplitRingDriver {
            size,
            desc_table,
            avail_ring,
            used_ring,
            next_avail: 0,
            last_used: 0,
            free: (0..size).rev().collect(),
            chain_len: vec![0; size as usize],
        };
        (driver, end)
    }

    /// Zeroes the rings and sets "no interrupts" (this driver polls). Call once before use.
    pub fn init<M: GuestMemory>(&mut self, mem: &M) -> Result<(), vm_memory::GuestMemoryError> {
        let n = self.size as usize;
        mem.write_slice(&vec![0u8; 16 * n], self.desc_table)?;
        mem.write_slice(&vec![0u8; 6 + 2 * n], self.avail_ring)?;
        mem.write_slice(&vec![0u8; 6 + 8 * n], self.used_ring)?;
        mem.store(AVAIL_F_NO_INTERRUPT, self.avail_ring, Ordering::Relaxed)
    }

    /// Programs a device-side queue with this ring's geometry (what a VMM does on the driver's
    /// behalf: SET_VRING_NUM/ADDR in vhost-user terms).
    pub fn configure(&self, queue: &mut Queue) {
        queue.set_size(self.size);
        queue.set_desc_table_address(Some(self.desc_table.0 as u32), Some((self.desc_table.0 >> 32) as u32));
        queue.set_avail_ring_address(Some(self.avail_ring.0 as u32), Some((self.avail_ring.0 >> 32) as u32));
        queue.set_used_ring_address(Some(self.used_ring.0 as u32), Some((self.used_ring.0 >> 32) as u32));
        queue.set_ready(true);
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Writes a chain into the descriptor table and the avail ring (not yet visible to the
    /// device: call [`SplitRingDriver::publish`]). None if not enough free descriptors.
    pub fn add_chain<M: GuestMemory>(&mut self, mem: &M, bufs: &[BufferSpec]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (i, (b, &id)) in bufs.iter().zip(&ids).enumerate() {
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < ids.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(mem, id, Descriptor::new(b.addr.0, b.len, flags, next));
        }
        let head = ids[0];
        self.chain_len[head as usize] = ids.len() as u16;
        self.push_avail(mem, head);
        Some(head)
    }

    /// Re-posts a chain the device returned, unchanged (its descriptors still describe the same
    /// buffers): what a driver does when it recycles a buffer.
    pub fn repost<M: GuestMemory>(&mut self, mem: &M, head: u16) {
        self.push_avail(mem, head);
    }

    fn write_desc<M: GuestMemory>(&self, mem: &M, id: u16, d: Descriptor) {
        let addr = GuestAddress(self.desc_table.0 + 16 * u64::from(id));
        // The ring lives in memory this driver allocated; a failure is a programming error
        // caught by tests, not outside input.
        mem.write_obj(d, addr).expect("descriptor table in guest memory");
    }

    fn push_avail<M: GuestMemory>(&mut self, mem: &M, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        mem.store(head, GuestAddress(self.avail_ring.0 + 4 + 2 * slot), Ordering::Relaxed)
            .expect("avail ring in guest memory");
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Makes every chain added so far visible to the device (release store of avail.idx).
    pub fn publish<M: GuestMemory>(&self, mem: &M) {
        mem.store(self.next_avail, GuestAddress(self.avail_ring.0 + 2), Ordering::Release)
            .expect("avail ring in guest memory");
    }

    /// Next chain the device has finished with: (head, bytes written).
    pub fn pop_used<M: GuestMemory>(&mut self, mem: &M) -> Option<(u16, u32)> {
        let used_idx: u16 = mem.load(GuestAddress(self.used_ring.0 + 2), Ordering::Acquire).ok()?;
        if used_idx == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.size);
        let elem = GuestAddress(self.used_ring.0 + 4 + 8 * slot);
        let id: u32 = mem.read_obj(elem).ok()?;
        let len: u32 = mem.read_obj(GuestAddress(elem.0 + 4)).ok()?;
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Returns a used chain's descriptors to the free list.
    pub fn release<M: GuestMemory>(&mut self, mem: &M, head: u16) {
        let mut id = head;
        for _ in 0..self.chain_len.get(head as usize).copied().unwrap_or(0) {
            self.free.push(id);
            let d: Descriptor = mem
                .read_obj(GuestAddress(self.desc_table.0 + 16 * u64::from(id)))
                .expect("descriptor table in guest memory");
            id = d.next();
        }
    }

    /// Writes a raw descriptor, for tests that build hostile chains.
    pub fn write_raw_desc<M: GuestMemory>(&mut self, mem: &M, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_desc(mem, id, Descriptor::new(addr, len, flags, next));
    }

    /// Writes the available index as is (a driver gone wrong), for hostile-ring tests.
    pub fn write_raw_avail_idx<M: GuestMemory>(&mut self, mem: &M, idx: u16) {
        mem.store(idx, GuestAddress(self.avail_ring.0 + 2), Ordering::Release).expect("avail ring in guest memory");
    }

    /// Starts over as a freshly reset device would find the ring: empty, indexes at 0.
    pub fn reset<M: GuestMemory>(&mut self, mem: &M) -> Result<(), vm_memory::GuestMemoryError> {
        self.next_avail = 0;
        self.last_used = 0;
        self.free = (0..self.size).rev().collect();
        self.chain_len.iter_mut().for_each(|n| *n = 0);
        self.init(mem)
    }

    /// Posts `head` as an available chain without bookkeeping, for hostile-chain tests.
    pub fn post_raw<M: GuestMemory>(&mut self, mem: &M, head: u16) {
        self.free.retain(|&d| d != head);
        self.push_avail(mem, head);
        self.publish(mem);
    }
}

/// The driver's rings opened on guest memory for one round of work: each ring area is resolved
/// once, as a guest driver that has its rings mapped would touch them (the per-field address
/// lookups of `GuestMemory` would otherwise dominate what the in-process guest costs the bench).
pub struct DriverView<'a, 'm> {
    driver: &'a mut SplitRingDriver,
    avail: VolatileSlice<'m, ()>,
    used: VolatileSlice<'m, ()>,
    dirty: bool,
}

impl SplitRingDriver {
    /// Opens the rings for a round of `pop_used`/`repost`; publishes on drop.
    pub fn open<'a, 'm>(&'a mut self, mem: &'m GuestMemoryMmap<()>) -> Option<DriverView<'a, 'm>> {
        let n = usize::from(self.size);
        let avail = mem.get_slice(self.avail_ring, 6 + 2 * n).ok()?;
        let used = mem.get_slice(self.used_ring, 6 + 8 * n).ok()?;
        Some(DriverView { driver: self, avail, used, dirty: false })
    }
}

impl DriverView<'_, '_> {
    /// Next chain the device has finished with: (head, bytes written).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let used_idx = u16::from_le(self.used.load::<u16>(2, Ordering::Acquire).ok()?);
        let d = &mut *self.driver;
        if used_idx == d.last_used {
            return None;
        }
        // Used elements are {u32 id, u32 len} at 4-byte alignment.
        let at = 4 + 8 * usize::from(d.last_used % d.size);
        let id = u32::from_le(self.used.load::<u32>(at, Ordering::Relaxed).ok()?);
        let len = u32::from_le(self.used.load::<u32>(at + 4, Ordering::Relaxed).ok()?);
        d.last_used = d.last_used.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Re-posts a used chain unchanged (visible to the device when the view is dropped).
    pub fn repost(&mut self, head: u16) {
        let d = &mut *self.driver;
        let at = 4 + 2 * usize::from(d.next_avail % d.size);
        let _ = self.avail.store(head.to_le(), at, Ordering::Relaxed);
        d.next_avail = d.next_avail.wrapping_add(1);
        self.dirty = true;
    }
}

impl Drop for DriverView<'_, '_> {
    fn drop(&mut self) {
        if self.dirty {
            // The ring entries must be visible before the index that covers them.
            fence(Ordering::Release);
            let _ = self.avail.store(self.driver.next_avail.to_le(), 2, Ordering::Release);
        }
    }
}

//! The driver side of a packed virtqueue (virtio 1.1 §2.7), as a guest's driver runs it: one
//! descriptor ring plus the two event suppression areas in guest memory, written with the
//! ordering the spec requires (a chain's head flags last, with release). For tests of the
//! device side ([`crate::packed_ring`]) and fuzz targets.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::driver::BufferSpec;
use crate::ring::RingState;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;
const EVENT_DISABLE: u16 = 1;

/// One raw descriptor to post as is (hostile-ring tests): flags without AVAIL/USED, which
/// the driver sets.
#[derive(Debug, Clone, Copy)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

#[derive(Debug)]
pub struct PackedRingDriver {
    size: u16,
    desc_ring: GuestAddress,
    driver_event: GuestAddress,
    device_event: GuestAddress,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    /// Descriptors not with the device.
    free_slots: u16,
    free_ids: Vec<u16>,
    /// Descriptors of the chain with each buffer id (returned to `free_slots` when used).
    chain_slots: Vec<u16>,
}

impl PackedRingDriver {
    /// Lays the ring out at `base`; returns the driver and the first address after it.
    pub fn new(size: u16, base: GuestAddress) -> (PackedRingDriver, GuestAddress) {
        assert!(size > 0 && size <= crate::packed_ring::MAX_PACKED_SIZE, "queue size");
        let desc_ring = base;
        let driver_event = GuestAddress(base.0 + 16 * u64::from(size));
        let device_event = GuestAddress(driver_event.0 + 4);
        let end = GuestAddress((device_event.0 + 4 + 4095) & !4095);
        let driver = PackedRingDriver {
            size,
            desc_ring,
            driver_event,
            device_event,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            free_slots: size,
            free_ids: (0..size).rev().collect(),
            chain_slots: vec![0; usize::from(size)],
        };
        (driver, end)
    }

    /// Zeroes the ring and asks for no interrupts (this driver polls). Call once before use.
    pub fn init<M: GuestMemory>(&mut self, mem: &M) -> Result<(), vm_memory::GuestMemoryError> {
        mem.write_slice(&vec![0u8; 16 * usize::from(self.size) + 8], self.desc_ring)?;
        mem.store(EVENT_DISABLE.to_le(), GuestAddress(self.driver_event.0 + 2), Ordering::Relaxed)
    }

    /// Programs a device-side queue with this ring's geometry, as a VMM does (SET_VRING_ADDR
    /// carries the event areas in the avail and used addresses).
    pub fn configure(&self, queue: &mut Queue) {
        queue.set_size(self.size);
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        let (lo, hi) = split(self.desc_ring);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.driver_event);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.device_event);
        queue.set_used_ring_address(lo, hi);
        // A fresh packed ring: index 0, wrap counters 1 (vhost-user's base 0x8000).
        queue.set_next_avail(0x8000);
        queue.set_next_used(0x8000);
        queue.set_ready(true);
    }

    /// The device's state for this ring, fresh.
    pub fn device_state(&self, event_idx: bool) -> RingState {
        let mut state =
            RingState::new_packed(self.size, self.desc_ring, self.driver_event, self.device_event, 0x8000, 0x8000);
        state.event_idx = event_idx;
        state
    }

    pub fn driver_event(&self) -> GuestAddress {
        self.driver_event
    }

    pub fn device_event(&self) -> GuestAddress {
        self.device_event
    }

    pub fn desc_ring(&self) -> GuestAddress {
        self.desc_ring
    }

    /// Posts a chain of buffers; its buffer id, or None without room.
    pub fn add_chain<M: GuestMemory>(&mut self, mem: &M, bufs: &[BufferSpec]) -> Option<u16> {
        let id = *self.free_ids.last()?;
        let descs: Vec<RawDesc> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| RawDesc {
                addr: b.addr.0,
                len: b.len,
                id,
                flags: if b.device_writes { F_WRITE } else { 0 } | if i + 1 < bufs.len() { F_NEXT } else { 0 },
            })
            .collect();
        self.post_raw(mem, &descs)
    }

    /// Posts one indirect descriptor whose table (written at `table`) holds `bufs`.
    pub fn add_indirect<M: GuestMemory>(&mut self, mem: &M, table: GuestAddress, bufs: &[BufferSpec]) -> Option<u16> {
        let id = *self.free_ids.last()?;
        for (i, b) in bufs.iter().enumerate() {
            let flags = if b.device_writes { F_WRITE } else { 0 };
            write_desc(mem, GuestAddress(table.0 + 16 * i as u64), b.addr.0, b.len, 0, flags);
        }
        let len = 16 * bufs.len() as u32;
        self.post_raw(mem, &[RawDesc { addr: table.0, len, id, flags: F_INDIRECT }])
    }

    /// Posts `descs` as one chain as they are (flags, ids; AVAIL/USED added), head last. The
    /// chain's buffer id is the last descriptor's; None without room.
    pub fn post_raw<M: GuestMemory>(&mut self, mem: &M, descs: &[RawDesc]) -> Option<u16> {
        let count = u16::try_from(descs.len()).ok()?;
        if descs.is_empty() || count > self.free_slots {
            return None;
        }
        let id = descs[descs.len() - 1].id;
        if let Some(at) = self.free_ids.iter().position(|&i| i == id) {
            self.free_ids.remove(at);
        }
        if let Some(n) = self.chain_slots.get_mut(usize::from(id)) {
            *n = count;
        }
        let head = (self.next_avail, self.avail_wrap);
        let mut head_flags = 0;
        for (i, d) in descs.iter().enumerate() {
            let flags = d.flags | if self.avail_wrap { F_AVAIL } else { F_USED };
            let at = GuestAddress(self.desc_ring.0 + 16 * u64::from(self.next_avail));
            if i == 0 {
                write_desc(mem, at, d.addr, d.len, d.id, 0);
                // Not available yet (flags = !wrap both): the head goes last.
                let hidden = if self.avail_wrap { F_USED } else { F_AVAIL };
                mem.store(hidden.to_le(), GuestAddress(at.0 + 14), Ordering::Relaxed).ok()?;
                head_flags = flags;
            } else {
                write_desc(mem, at, d.addr, d.len, d.id, flags);
            }
            self.next_avail += 1;
            if self.next_avail == self.size {
                self.next_avail = 0;
                self.avail_wrap = !self.avail_wrap;
            }
        }
        self.free_slots -= count;
        let at = GuestAddress(self.desc_ring.0 + 16 * u64::from(head.0) + 14);
        mem.store(head_flags.to_le(), at, Ordering::Release).ok()?;
        Some(id)
    }

    /// Next chain the device has finished with: (buffer id, bytes written).
    pub fn pop_used<M: GuestMemory>(&mut self, mem: &M) -> Option<(u16, u32)> {
        let at = self.desc_ring.0 + 16 * u64::from(self.next_used);
        let flags = u16::from_le(mem.load(GuestAddress(at + 14), Ordering::Acquire).ok()?);
        let used = (flags & F_AVAIL != 0) == self.used_wrap && (flags & F_USED != 0) == self.used_wrap;
        if !used {
            return None;
        }
        let len: u32 = mem.read_obj(GuestAddress(at + 8)).ok()?;
        let id: u16 = mem.read_obj(GuestAddress(at + 12)).ok()?;
        let slots = self.chain_slots.get(usize::from(id)).copied().unwrap_or(1).max(1);
        self.next_used += slots;
        if self.next_used >= self.size {
            self.next_used -= self.size;
            self.used_wrap = !self.used_wrap;
        }
        self.free_slots += slots;
        if usize::from(id) < self.chain_slots.len() && !self.free_ids.contains(&id) {
            self.free_ids.push(id);
        }
        Some((id, len))
    }

    /// Asks for interrupts: always, or (`at` = Some, EVENT_IDX) once the device's used
    /// position passes `at` (index, wrap).
    pub fn request_interrupts<M: GuestMemory>(&self, mem: &M, at: Option<(u16, bool)>) {
        let (off_wrap, flags) = match at {
            Some((index, wrap)) => (index | if wrap { 0x8000 } else { 0 }, 2u16),
            None => (0, 0),
        };
        let _ = mem.store(off_wrap.to_le(), self.driver_event, Ordering::Relaxed);
        let _ = mem.store(flags.to_le(), GuestAddress(self.driver_event.0 + 2), Ordering::Release);
    }

    /// The device's event suppression area: (off_wrap, flags).
    pub fn device_event_area<M: GuestMemory>(&self, mem: &M) -> (u16, u16) {
        let off_wrap: u16 = mem.load(self.device_event, Ordering::Acquire).unwrap_or(0);
        let flags: u16 = mem.load(GuestAddress(self.device_event.0 + 2), Ordering::Acquire).unwrap_or(0);
        (u16::from_le(off_wrap), u16::from_le(flags))
    }
}

fn write_desc<M: GuestMemory>(mem: &M, at: GuestAddress, addr: u64, len: u32, id: u16, flags: u16) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&id.to_le_bytes());
    d[14..].copy_from_slice(&flags.to_le_bytes());
    // The ring lives in memory the test allocated; a failure is a test bug, caught there.
    let _ = mem.write_slice(&d, at);
}

//! The `mem` port: an in-process virtio-net device. Guest memory is a real `GuestMemoryMmap`,
//! the RX and TX queues are real split virtqueues in it, and a [`SplitRingDriver`] plays the
//! guest driver. The device side is the same [`crate::virtio`] code a vhost-user VM uses.
//!
//! The guest's work (recycling RX buffers, re-posting TX frames) runs inline when the device
//! finishes a batch: on this 2-core class of machine there is no spare core to give a "guest",
//! and counting its (small, ring-only) cost against vmq keeps bench figures conservative.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmq_core::{DropReason, OffloadCaps};
use vmq_wire::VnetHdr;

use crate::driver::{BufferSpec, SplitRingDriver};
use crate::port::{FrameSink, FrameSource, FrameWriter, GuestRxWriter, GuestTail, RecvError, Refuse, Scratch, Wake};
use crate::ring::{Ring, RingError, RingState, Segment};
use crate::virtio::{RxWriter, VirtioError, pop_tx_split};

pub const QUEUE_SIZE: u16 = 256;
/// RX buffers are page sized, as Linux posts them with mergeable RX buffers: a 9018-byte frame
/// spans three, exercising the merge path.
pub const RX_BUF_LEN: u32 = 4096;
/// TX slots hold the largest GSO frame plus header.
pub const TX_SLOT_LEN: u32 = 65_536 + 64;

const RX_RING_BASE: u64 = 0;
const TX_RING_BASE: u64 = 0x10_0000;
const RX_BUFS_BASE: u64 = 0x20_0000;
const TX_BUFS_BASE: u64 = RX_BUFS_BASE + QUEUE_SIZE as u64 * RX_BUF_LEN as u64;
const MEM_SIZE: usize = (TX_BUFS_BASE + QUEUE_SIZE as u64 * TX_SLOT_LEN as u64) as usize;

/// A frame as the guest received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFrame {
    pub hdr: VnetHdr,
    pub frame: Vec<u8>,
}

/// Guest-side RX state: posted buffers, and what came back.
struct RxGuest {
    ring: SplitRingDriver,
    /// Keep received frames for inspection (tests) or only count them (bench).
    capture: Option<VecDeque<GuestFrame>>,
    received_frames: u64,
    received_bytes: u64,
    pending: Vec<u8>,
    pending_bufs: u16,
    malformed: u64,
}

/// Guest-side TX state.
struct TxGuest {
    ring: SplitRingDriver,
    /// Replay mode: every used chain is posted again unchanged (bench traffic source).
    replay: bool,
    /// Free TX slots by descriptor-independent index.
    free_slots: Vec<u32>,
    slot_of_head: Vec<u32>,
}

pub struct MemShared {
    mem: Arc<GuestMemoryMmap>,
    /// The guest's TX kick, as a virtio-net driver notifies the device.
    kick: EventFd,
    rx: Mutex<RxGuest>,
    tx: Mutex<TxGuest>,
    /// Bumped by [`MemGuest::reset_tx`] (a device reset): the device side starts over.
    tx_generation: AtomicU64,
    /// Where the TX ring lives, for the device side to start over from.
    tx_ring: RingState,
    pub caps: OffloadCaps,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a guest lock would be a vmq bug; keep serving the data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Test/bench handle on the guest side of a mem port.
#[derive(Clone)]
pub struct MemGuest {
    shared: Arc<MemShared>,
}

/// Builds a mem port: the guest handle plus the device-side source (guest TX) and sink
/// (guest RX) for the data path.
pub fn mem_port(caps: OffloadCaps, capture: bool) -> (MemGuest, MemTxSource, MemRxSink) {
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("anonymous mapping for a mem port");
    let (mut rx_ring, _) = SplitRingDriver::new(QUEUE_SIZE, GuestAddress(RX_RING_BASE));
    let (mut tx_ring, _) = SplitRingDriver::new(QUEUE_SIZE, GuestAddress(TX_RING_BASE));
    rx_ring.init(&mem).expect("rings inside guest memory");
    tx_ring.init(&mem).expect("rings inside guest memory");
    let mut rx_queue = Queue::new(QUEUE_SIZE).expect("valid queue size");
    let mut tx_queue = Queue::new(QUEUE_SIZE).expect("valid queue size");
    rx_ring.configure(&mut rx_queue);
    tx_ring.configure(&mut tx_queue);
    debug_assert!(rx_queue.size() == QUEUE_SIZE && tx_queue.size() == QUEUE_SIZE);
    for i in 0..QUEUE_SIZE as u64 {
        let buf = BufferSpec {
            addr: GuestAddress(RX_BUFS_BASE + i * RX_BUF_LEN as u64),
            len: RX_BUF_LEN,
            device_writes: true,
        };
        rx_ring.add_chain(&mem, &[buf]);
    }
    rx_ring.publish(&mem);
    let shared = Arc::new(MemShared {
        mem: Arc::new(mem),
        kick: EventFd::new(EFD_NONBLOCK).expect("eventfd for a mem port"),
        rx: Mutex::new(RxGuest {
            ring: rx_ring,
            capture: capture.then(VecDeque::new),
            received_frames: 0,
            received_bytes: 0,
            pending: Vec::new(),
            pending_bufs: 0,
            malformed: 0,
        }),
        tx: Mutex::new(TxGuest {
            ring: tx_ring,
            replay: false,
            free_slots: (0..QUEUE_SIZE as u32).rev().collect(),
            slot_of_head: vec![0; QUEUE_SIZE as usize],
        }),
        tx_generation: AtomicU64::new(0),
        tx_ring: RingState::from_queue(&tx_queue),
        caps,
    });
    let guest = MemGuest { shared: shared.clone() };
    let source = MemTxSource {
        ring: RingState::from_queue(&tx_queue),
        generation: 0,
        segments: Vec::new(),
        deferred: Vec::new(),
        shared: shared.clone(),
        was_idle: false,
    };
    let sink =
        MemRxSink { ring: RingState::from_queue(&rx_queue), writer: RxWriter::new(true), shared, batch_frames: 1 };
    (guest, source, sink)
}

impl MemGuest {
    /// Queues one frame on the guest's TX ring. False if the ring is full.
    pub fn send(&self, hdr: &VnetHdr, frame: &[u8]) -> bool {
        let mem = &*self.shared.mem;
        let mut tx = lock(&self.shared.tx);
        tx.reclaim(mem);
        let ok = tx.post(mem, hdr, frame);
        tx.ring.publish(mem);
        let _ = self.shared.kick.write(1);
        ok
    }

    /// Fills the TX ring with `frames` (cycled) and switches to replay: the device side sees an
    /// endless stream of them, as from a guest that transmits as fast as it can.
    pub fn start_replay(&self, frames: &[(VnetHdr, Vec<u8>)]) {
        let mem = &*self.shared.mem;
        let mut tx = lock(&self.shared.tx);
        tx.reclaim(mem);
        tx.replay = true;
        let mut i = 0;
        while !frames.is_empty() && tx.post(mem, &frames[i % frames.len()].0, &frames[i % frames.len()].1) {
            i += 1;
        }
        tx.ring.publish(mem);
        let _ = self.shared.kick.write(1);
    }

    /// Frames received so far (capture mode), oldest first.
    pub fn take_received(&self) -> Vec<GuestFrame> {
        let mut rx = lock(&self.shared.rx);
        let mem = &self.shared.mem;
        rx.reclaim(mem);
        rx.capture.as_mut().map(|c| c.drain(..).collect()).unwrap_or_default()
    }

    /// (frames, bytes incl. virtio-net header) the guest has received.
    pub fn received(&self) -> (u64, u64) {
        let mut rx = lock(&self.shared.rx);
        rx.reclaim(&self.shared.mem);
        (rx.received_frames, rx.received_bytes)
    }

    /// Chains the guest got back that it could not make sense of (should stay 0).
    pub fn malformed(&self) -> u64 {
        lock(&self.shared.rx).malformed
    }

    /// Kicks the device (as after posting buffers), for tests that post raw chains.
    pub fn kick(&self) {
        let _ = self.shared.kick.write(1);
    }

    /// Resets the TX queue as a virtio driver does after a device error: the ring is emptied,
    /// both sides start over at index 0.
    pub fn reset_tx(&self) {
        let mem = &*self.shared.mem;
        let mut tx = lock(&self.shared.tx);
        tx.ring.reset(mem).expect("rings inside guest memory");
        tx.replay = false;
        tx.free_slots = (0..QUEUE_SIZE as u32).rev().collect();
        self.shared.tx_generation.fetch_add(1, Ordering::Release);
        drop(tx);
        self.kick();
    }

    /// Direct ring access for hostile-descriptor tests: (guest memory, TX ring driver).
    pub fn with_tx_ring<R>(&self, f: impl FnOnce(&GuestMemoryMmap, &mut SplitRingDriver) -> R) -> R {
        let mut tx = lock(&self.shared.tx);
        f(&self.shared.mem, &mut tx.ring)
    }

    pub fn with_rx_ring<R>(&self, f: impl FnOnce(&GuestMemoryMmap, &mut SplitRingDriver) -> R) -> R {
        let mut rx = lock(&self.shared.rx);
        f(&self.shared.mem, &mut rx.ring)
    }
}

impl TxGuest {
    fn post(&mut self, mem: &GuestMemoryMmap, hdr: &VnetHdr, frame: &[u8]) -> bool {
        if VnetHdr::LEN + frame.len() > TX_SLOT_LEN as usize || self.ring.free_descriptors() == 0 {
            return false;
        }
        let Some(slot) = self.free_slots.pop() else {
            return false;
        };
        let addr = GuestAddress(TX_BUFS_BASE + u64::from(slot) * u64::from(TX_SLOT_LEN));
        if mem.write_slice(&hdr.to_bytes(), addr).is_err()
            || mem.write_slice(frame, GuestAddress(addr.0 + VnetHdr::LEN as u64)).is_err()
        {
            self.free_slots.push(slot);
            return false;
        }
        let len = (VnetHdr::LEN + frame.len()) as u32;
        match self.ring.add_chain(mem, &[BufferSpec { addr, len, device_writes: false }]) {
            Some(head) => {
                self.slot_of_head[head as usize] = slot;
                true
            }
            None => {
                self.free_slots.push(slot);
                false
            }
        }
    }

    fn reclaim(&mut self, mem: &GuestMemoryMmap) {
        if self.replay {
            // The replayed frames stay in place: re-post every used chain as it is.
            if let Some(mut view) = self.ring.open(mem) {
                while let Some((head, _)) = view.pop_used() {
                    view.repost(head);
                }
            }
            return;
        }
        while let Some((head, _)) = self.ring.pop_used(mem) {
            if let Some(&slot) = self.slot_of_head.get(head as usize) {
                self.free_slots.push(slot);
            }
            self.ring.release(mem, head);
        }
    }
}

impl RxGuest {
    /// Takes used buffers back, assembles merged frames, and re-posts the buffers.
    fn reclaim(&mut self, mem: &GuestMemoryMmap) {
        let Ok(bufs) = mem.get_slice(GuestAddress(RX_BUFS_BASE), QUEUE_SIZE as usize * RX_BUF_LEN as usize) else {
            self.malformed += 1;
            return;
        };
        let Some(mut view) = self.ring.open(mem) else {
            self.malformed += 1;
            return;
        };
        while let Some((head, len)) = view.pop_used() {
            let offset = usize::from(head % QUEUE_SIZE) * RX_BUF_LEN as usize;
            let len = len.min(RX_BUF_LEN);
            if self.capture.is_some() {
                let start = self.pending.len();
                self.pending.resize(start + len as usize, 0);
                if bufs.read_slice(&mut self.pending[start..], offset).is_err() {
                    self.malformed += 1;
                }
            } else if self.pending_bufs == 0 {
                self.pending.resize(VnetHdr::LEN, 0);
                if bufs.read_slice(&mut self.pending[..VnetHdr::LEN], offset).is_err() {
                    self.malformed += 1;
                }
            }
            self.received_bytes += u64::from(len);
            self.pending_bufs += 1;
            view.repost(head);
            let wanted = VnetHdr::parse(&self.pending).map(|h| h.num_buffers.max(1)).unwrap_or(1);
            if self.pending_bufs >= wanted {
                self.received_frames += 1;
                if let Some(capture) = self.capture.as_mut() {
                    match VnetHdr::parse(&self.pending) {
                        Ok(hdr) => capture.push_back(GuestFrame { hdr, frame: self.pending[VnetHdr::LEN..].to_vec() }),
                        Err(_) => self.malformed += 1,
                    }
                }
                self.pending.clear();
                self.pending_bufs = 0;
            }
        }
    }
}

/// Device side of the guest's TX queue.
pub struct MemTxSource {
    ring: RingState,
    /// The [`MemShared::tx_generation`] `ring` was set up for.
    generation: u64,
    segments: Vec<Segment>,
    /// Chains whose frames are still being delivered from guest memory.
    deferred: Vec<u16>,
    shared: Arc<MemShared>,
    /// The last poll took nothing (see the vhost-user source's `was_idle`).
    was_idle: bool,
}

impl FrameSource for MemTxSource {
    fn recv(&mut self, scratch: &mut Scratch, max: usize, errors: &mut Vec<RecvError>) -> usize {
        let mem = &self.shared.mem;
        let generation = self.shared.tx_generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.generation = generation;
            self.ring = self.shared.tx_ring.clone();
            self.deferred.clear();
        }
        // An idle ring costs one load (as the vhost-user source's).
        if self.was_idle && !self.ring.avail_pending(mem) {
            return 0;
        }
        let mut ring = match Ring::open(mem, &mut self.ring) {
            Ok(ring) => ring,
            Err(RingError::Broken) => return 0,
            Err(_) => {
                errors.push(RecvError::RingBroken);
                return 0;
            }
        };
        let mut n = 0;
        while n < max {
            let Some((buf, tail)) = scratch.next_split() else { break };
            match pop_tx_split(&mut ring, mem, &mut self.segments, buf, tail) {
                Ok(Some(f)) => {
                    match f.deferred {
                        Some(head) => {
                            self.deferred.push(head);
                            scratch.commit_split(f.head_len);
                        }
                        None => scratch.commit(f.head_len),
                    }
                    n += 1;
                }
                Ok(None) => break,
                Err(VirtioError::RingBroken) => {
                    errors.push(RecvError::RingBroken);
                    break;
                }
                Err(e) => errors.push(RecvError::Drop(e.drop_reason())),
            }
        }
        drop(ring);
        // The guest recycles what was consumed (inline; see the module comment).
        lock(&self.shared.tx).reclaim(mem);
        self.was_idle = n == 0;
        n
    }

    fn complete(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let mem = &self.shared.mem;
        if let Ok(mut ring) = Ring::open(mem, &mut self.ring) {
            for head in self.deferred.drain(..) {
                ring.add_used(head, 0);
            }
        }
        self.deferred.clear();
        lock(&self.shared.tx).reclaim(mem);
    }

    fn wake(&mut self) -> Wake {
        Wake::Fd(self.shared.kick.as_raw_fd())
    }

    fn on_wake(&mut self) {
        let _ = self.shared.kick.read();
    }

    /// As a vhost-user ring: re-arm kicks, and stay awake if the driver added chains meanwhile
    /// (the same `enable_notification` a VM's ring goes through, broken rings included).
    fn prepare_sleep(&mut self) -> bool {
        Ring::open(&self.shared.mem, &mut self.ring).is_ok_and(|mut ring| ring.enable_notification())
    }

    fn wake_up(&mut self) {
        if let Ok(mut ring) = Ring::open(&self.shared.mem, &mut self.ring) {
            ring.disable_notification();
        }
    }
}

/// Device side of the guest's RX queue.
pub struct MemRxSink {
    ring: RingState,
    writer: RxWriter,
    shared: Arc<MemShared>,
    /// Frames the next batch carries (see [`FrameSink::expect_frames`]).
    batch_frames: usize,
}

/// The RX ring kept open for one batch.
struct MemRxBatch<'a, 'm> {
    ring: Ring<'a, 'm>,
    writer: &'a mut RxWriter,
    shared: &'m MemShared,
}

impl GuestRxWriter for MemRxBatch<'_, '_> {
    fn push(&mut self, hdr: &VnetHdr, parts: &[&[u8]], tail: Option<&GuestTail>) -> Result<(), DropReason> {
        let mut result = self.writer.push_with_tail(&mut self.ring, hdr, parts, tail);
        if result == Err(VirtioError::NoBuffer) {
            // The in-process guest only recycles when asked; a real guest drains its ring on
            // its own vCPU while vmq fills it. Let it catch up once before calling it full.
            self.ring.publish();
            lock(&self.shared.rx).reclaim(&self.shared.mem);
            result = self.writer.push_with_tail(&mut self.ring, hdr, parts, tail);
        }
        result.map_err(VirtioError::drop_reason)
    }
}

impl FrameSink for MemRxSink {
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason> {
        let mut result = Err(DropReason::BadDescriptor);
        self.batch_frames = 1;
        self.batch(&mut |w| result = w.send(hdr, parts));
        result
    }

    fn flush(&mut self) {}

    fn expect_frames(&mut self, frames: usize) {
        self.batch_frames = frames;
    }

    fn batch(&mut self, write: &mut dyn FnMut(&mut dyn FrameWriter)) {
        let shared = &*self.shared;
        let frames = std::mem::replace(&mut self.batch_frames, 1);
        match Ring::open(&shared.mem, &mut self.ring) {
            Ok(mut ring) => {
                ring.expect_chains(frames);
                let mut batch = MemRxBatch { ring, writer: &mut self.writer, shared };
                write(&mut batch);
                batch.ring.publish();
                // Interrupt suppression is honoured even though this guest polls.
                let _ = batch.ring.needs_notification();
            }
            Err(_) => write(&mut Refuse(DropReason::RingBroken)),
        }
        lock(&shared.rx).reclaim(&shared.mem);
    }

    fn caps(&self) -> OffloadCaps {
        self.shared.caps
    }
}

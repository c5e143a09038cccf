//! State one vhost-user-net device shares between the control thread (which speaks the
//! vhost-user protocol) and the data-path worker that serves its rings.
//!
//! The worker takes a ring's mutex once per batch, never per frame; the control thread takes it
//! only for protocol messages (ring setup, GET_VRING_BASE), so the lock is uncontended on the
//! frame path.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::fs::File;
use std::io::Write;

use crate::migration::{DirtyLog, MigrationStatus};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as vmq maps it: no vm-memory dirty bitmap (the live-migration log is
/// [`crate::migration::DirtyLog`], marked by the data path per write).
pub type GuestMem = GuestMemoryMmap<()>;

/// Index of the receive queue (device -> guest) and the transmit queue (guest -> device) of the
/// first queue pair; pair `p` has its RX ring at `2p` and its TX ring at `2p + 1` (virtio-net).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Most queue pairs a port may have (VIRTIO_NET_F_MQ's `max_virtqueue_pairs`; vmq's limit).
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Largest ring vmq accepts; QEMU's default is 256, up to 1024 with rx/tx_queue_size.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// One virtqueue and its notifiers.
#[derive(Debug)]
pub struct Vring {
    pub queue: Queue,
    /// The guest kicks this when it adds buffers; workers wait on it.
    pub kick: Option<File>,
    /// vmq signals this to interrupt the guest.
    pub call: Option<File>,
    /// SET_VRING_ENABLE state (rings start disabled when protocol features are negotiated).
    pub enabled: bool,
    /// The ring is configured and may be processed.
    pub started: bool,
    /// While a live migration logs dirty pages: mark every page written for this ring (RX
    /// buffers, used ring) after the write, before the ring lock is released.
    pub dirty_log: Option<Arc<DirtyLog>>,
    /// Times this ring was stopped (GET_VRING_BASE, a new kick fd, lost memory, a reset). A
    /// chain a worker took before a stop was handed back by the stop (the ring resumes at the
    /// used index); one taken since is still the worker's to return, even when the device as a
    /// whole stopped meanwhile (the other ring of the pair stops first in a migration).
    pub stops: u64,
}

impl Vring {
    fn new() -> Vring {
        Vring {
            queue: Queue::new(MAX_QUEUE_SIZE).expect("MAX_QUEUE_SIZE is a valid power of two"),
            kick: None,
            call: None,
            enabled: false,
            started: false,
            dirty_log: None,
            stops: 0,
        }
    }

    /// Marks the ring stopped (see [`Vring::stops`]); the caller clears `started`.
    pub(crate) fn count_stop(&mut self) {
        self.stops = self.stops.wrapping_add(1);
    }

    /// The ring may be served by a worker now.
    pub fn is_live(&self) -> bool {
        self.started && self.enabled && self.queue.ready()
    }

    /// Interrupt the guest; a failed write only means the guest is going away.
    pub fn signal_guest(&self) {
        if let Some(mut call) = self.call.as_ref() {
            let _ = call.write(&1u64.to_ne_bytes());
        }
    }
}

/// The device as the data path sees it.
#[derive(Debug)]
pub struct NetDevice {
    pub mem: GuestMemoryAtomic<GuestMem>,
    /// Two rings per queue pair, at least one pair.
    vrings: Vec<Mutex<Vring>>,
    /// Virtio features the guest acknowledged.
    acked_features: AtomicU64,
    /// Bumped every time the device (re)starts or stops, so a worker notices a reconnect and
    /// re-reads its setup instead of serving stale rings.
    generation: AtomicU64,
    /// The MTU the frontend told the guest (VHOST_USER_NET_SET_MTU); 0 when it did not say.
    frontend_mtu: AtomicU16,
    /// Dirty logging and migration counters.
    pub migration: MigrationStatus,
    /// Bumped whenever the set of live rings changes (a further queue pair started, enabled or
    /// disabled while the device runs): a worker serving such a ring re-reads its kick fd.
    /// Unlike `generation`, ring positions stay valid across it.
    ring_layout: AtomicU64,
}

impl NetDevice {
    /// A single-queue device.
    pub fn new() -> Arc<NetDevice> {
        NetDevice::with_queue_pairs(1)
    }

    /// A device with `pairs` queue pairs, clamped to 1..=[`MAX_QUEUE_PAIRS`] (the port
    /// configuration rejects other values before this). With more than one pair the port offers
    /// VIRTIO_NET_F_MQ and answers GET_QUEUE_NUM with `pairs`.
    pub fn with_queue_pairs(pairs: u16) -> Arc<NetDevice> {
        let rings = 2 * usize::from(pairs.clamp(1, MAX_QUEUE_PAIRS));
        Arc::new(NetDevice {
            mem: GuestMemoryAtomic::new(GuestMem::default()),
            vrings: (0..rings).map(|_| Mutex::new(Vring::new())).collect(),
            acked_features: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            frontend_mtu: AtomicU16::new(0),
            migration: MigrationStatus::default(),
            ring_layout: AtomicU64::new(0),
        })
    }

    /// Locks a ring. A poisoned lock (a worker panicked) is recovered: the ring state is plain
    /// data and stays consistent at every await-free point.
    pub fn vring(&self, index: usize) -> MutexGuard<'_, Vring> {
        let ring = &self.vrings[index.min(self.vrings.len() - 1)];
        ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features.load(Ordering::Acquire)
    }

    pub(crate) fn set_acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    /// The MTU the VM's frontend advertises to the guest (QEMU's `host_mtu`), if it sent one.
    /// Never above the port MTU: larger values are refused.
    pub fn frontend_mtu(&self) -> Option<u16> {
        Some(self.frontend_mtu.load(Ordering::Acquire)).filter(|&m| m != 0)
    }

    pub(crate) fn set_frontend_mtu(&self, mtu: u16) {
        self.frontend_mtu.store(mtu, Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Changes whenever a ring starts, stops, is enabled or disabled (see `ring_layout`).
    pub fn ring_layout(&self) -> u64 {
        self.ring_layout.load(Ordering::Acquire)
    }

    pub(crate) fn bump_ring_layout(&self) {
        self.ring_layout.fetch_add(1, Ordering::AcqRel);
    }

    /// Bit `i` set: ring `i` is live (may be served now).
    pub fn live_rings(&self) -> u32 {
        (0..self.vrings.len()).filter(|&i| self.vring(i).is_live()).fold(0, |mask, i| mask | (1 << i))
    }

    /// Queue pairs the device has (the frontend may enable fewer).
    pub fn queue_pairs(&self) -> u16 {
        (self.vrings.len() / 2) as u16
    }

    /// Rings the device has: twice [`NetDevice::queue_pairs`].
    pub fn num_rings(&self) -> usize {
        self.vrings.len()
    }

    /// Both rings of the first pair are live: the device can move frames. (Further pairs come
    /// and go with SET_VRING_ENABLE while the device runs: a guest's `ethtool -L`.)
    pub fn is_running(&self) -> bool {
        (0..2).all(|i| self.vring(i).is_live())
    }

    /// Forget everything about the previous connection.
    pub(crate) fn reset(&self) {
        for i in 0..self.vrings.len() {
            let mut ring = self.vring(i);
            let stops = ring.stops.wrapping_add(1);
            *ring = Vring::new();
            ring.stops = stops;
        }
        self.mem.lock().unwrap_or_else(|p| p.into_inner()).replace(GuestMem::default());
        self.acked_features.store(0, Ordering::Release);
        self.frontend_mtu.store(0, Ordering::Release);
        self.migration.set_logging(false);
        self.bump_ring_layout();
        self.bump_generation();
    }
}

//! The vhost-user-net protocol, backend side: what vmq answers to QEMU or cloud-hypervisor.
//!
//! Message framing, fd passing and validation of message sizes is the `vhost` crate's
//! (`BackendReqHandler`); this module holds the device semantics: features, memory table,
//! ring setup, config space, MTU. Anything the frontend gets wrong is an error reply (and
//! usually the end of the connection), never a panic.
//!
//! Everything the frontend hands over is checked before the data path can touch it: memory
//! regions must be regular files (memfd, hugetlbfs, tmpfs) at least as large as the region,
//! sealed against shrinking (unless the port trusts its frontend's memory), must not overlap or
//! wrap and must stay within [`MAX_GUEST_MEMORY`](crate::limits::MAX_GUEST_MEMORY); ring addresses must lie in the
//! memory table, be aligned, and the whole ring must be inside guest memory; kick and call fds
//! must be eventfds and are made non-blocking, so that a worker can neither block on them nor be
//! handed a pipe that never drains; a ring that runs cannot be resized, moved or rewound.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::stat::{SFlag, fstat};
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as ProtoError, GpuBackend, Result as ProtoResult, VhostUserBackendReqHandlerMut,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap, GuestRegionMmap};
use vmq_wire::MacAddr;

use crate::device::{MAX_QUEUE_SIZE, NetDevice};
use crate::limits::MAX_GUEST_MEMORY;
use crate::migration::{DirtyLog, effective_log};

/// Most memory regions a frontend may hand over (QEMU uses one to a few, at most 8 without
/// CONFIGURE_MEM_SLOTS; this is also the `vhost` crate's limit of fds per message).
pub const MAX_MEM_REGIONS: usize = 32;
/// Smallest MTU a frontend may set (the IPv4 minimum, as virtio-net's).
pub const MIN_MTU: u16 = 68;

/// What the port offers the guest. The guest's acknowledged subset decides what vmq delivers.
#[derive(Debug, Clone)]
pub struct NetDeviceConfig {
    pub mac: MacAddr,
    /// The port MTU, advertised with VIRTIO_NET_F_MTU; `NET_SET_MTU` above it is refused.
    pub mtu: u16,
    /// Offer checksum and TSO offloads (both directions).
    pub offloads: bool,
    /// Accept guest memory that can shrink under vmq's mapping (files without `F_SEAL_SHRINK`:
    /// unsealed memfds, hugetlbfs or tmpfs files, as DPDK's virtio-user or a file-backed QEMU
    /// hands over). Such a frontend can kill vmq with SIGBUS by truncating the file, so this is
    /// for frontends as trusted as vmq itself. Off by default: QEMU's `memory-backend-memfd`
    /// seals its memory (`seal=on` is its default).
    pub trust_unsealed_memory: bool,
}

impl NetDeviceConfig {
    pub fn offered_features(&self) -> u64 {
        let mut bits = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_MTU
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            // Live migration: dirty logging, and the guest announces itself after a move
            // (QEMU then skips SEND_RARP). See `migration.rs`.
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE
            // Packed virtqueues: used when the frontend acks them (QEMU `packed=on`, DPDK
            // virtio-user `packed_vq=1`); see `packed.rs`.
            | 1 << crate::packed::VIRTIO_F_RING_PACKED;
        if self.offloads {
            bits |= 1 << VIRTIO_NET_F_CSUM
                | 1 << VIRTIO_NET_F_GUEST_CSUM
                | 1 << VIRTIO_NET_F_HOST_TSO4
                | 1 << VIRTIO_NET_F_HOST_TSO6
                | 1 << VIRTIO_NET_F_HOST_ECN
                | 1 << VIRTIO_NET_F_GUEST_TSO4
                | 1 << VIRTIO_NET_F_GUEST_TSO6
                | 1 << VIRTIO_NET_F_GUEST_ECN;
        }
        bits
    }
}

/// Protocol features vmq offers. What QEMU 7.2 (Debian 12) does with each, tried with real
/// guests (crates/vhost/tests/qemu.rs):
/// - REPLY_ACK: used for every request that may fail.
/// - NET_MTU: with `host_mtu=N` on the virtio-net device QEMU sends NET_SET_MTU(N) before it
///   starts the device. vmq accepts N up to the port MTU; above it the failed REPLY_ACK makes
///   QEMU print "NBytes MTU not supported by the backend" and leave the device stopped (the
///   guest still sees MTU N but no frame ever moves). The `vhost` crate does not parse this
///   request; `server.rs` intercepts it.
/// - MQ: QEMU asks GET_QUEUE_NUM and compares it with its `queues=` (queue *pairs*); vmq
///   answers the port's pairs (`mq.rs`), so `queues=2` on a one-pair port fails at QEMU start
///   with "you are asking more queues than supported: 1". With one pair nothing changes: QEMU 7.2 sends SET_VRING_ENABLE as early
///   (before SET_FEATURES) with or without MQ; `server.rs` intercepts it.
/// - CONFIG: QEMU 7.2's vhost-user-net does not use GET_CONFIG (its config space comes from the
///   -device options) and prints one warning per start: "vhost-user backend supports
///   VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not". Offered for frontends that read MAC and MTU
///   from the backend.
/// - LOG_SHMFD (with VHOST_F_LOG_ALL in the virtio features): QEMU's live migration hands over
///   its dirty bitmap (SET_LOG_BASE) and switches logging on and off with SET_FEATURES on running
///   rings (then repeats SET_VRING_ADDR with the log flag). Without both, QEMU refuses to migrate
///   the VM ("vhost lacks VHOST_F_LOG_ALL feature"). See `migration.rs`.
/// - RARP: after a migration, when the guest did not ack VIRTIO_NET_F_GUEST_ANNOUNCE, the
///   destination QEMU sends SEND_RARP once per announce round (5 by default) and vmq injects a
///   RARP from the guest's MAC; `server.rs` intercepts it.
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MTU
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::RARP
}

/// Maps frontend (VMM) virtual addresses, which vring addresses are given in, to guest
/// physical addresses.
#[derive(Debug, Clone, Copy)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

/// Events the control thread passes on to the data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// Both rings are live: attach the device to its worker.
    Started,
    /// A ring was stopped (GET_VRING_BASE), reset, lost its memory or its kick fd changed, or
    /// the frontend went away: the worker must stop serving the device.
    Stopped,
    /// While the device runs, a ring of a further queue pair started, stopped, was enabled or
    /// disabled (multiqueue; a guest's `ethtool -L`): workers re-read their kick fds.
    RingsChanged,
}

/// Why an intercepted request (see `server.rs`) was refused, and what happens to the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Tell the frontend (failed REPLY_ACK) and keep serving it.
    Reply(String),
    /// A protocol violation: drop the connection.
    Disconnect(String),
}

/// Per-connection protocol state of one vhost-user-net port.
pub struct NetBackend {
    config: NetDeviceConfig,
    device: Arc<NetDevice>,
    owned: bool,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    mappings: Vec<AddrMapping>,
    on_event: Box<dyn FnMut(DeviceEvent) + Send>,
    was_running: bool,
    /// Live rings (bit per ring) as of the last `update_running`.
    live_rings: u32,
    /// The dirty log of the last SET_LOG_BASE; the rings use it while LOG_ALL is acked.
    dirty_log: Option<Arc<DirtyLog>>,
}

fn invalid(reason: &'static str) -> ProtoError {
    tracing::warn!(reason, "vhost-user request refused");
    ProtoError::InvalidOperation(reason)
}

/// A memory region's fd must be a regular file (memfd, hugetlbfs or tmpfs file) that covers
/// the region: mapping a device could have side effects, and touching a mapping beyond the end
/// of its file kills the process (SIGBUS). The file must also stay that large: a frontend
/// that truncates it later causes the same SIGBUS, so it must be sealed with `F_SEAL_SHRINK`
/// (a memfd; checking the size again before each access would still race the truncation),
/// unless `trust_unsealed` (see [`NetDeviceConfig::trust_unsealed_memory`]).
fn check_region_file(file: &File, offset: u64, size: u64, trust_unsealed: bool) -> ProtoResult<()> {
    let stat = fstat(file).map_err(|_| invalid("cannot stat a memory region fd"))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(invalid("memory region fd is not a regular file (memfd, hugetlbfs or tmpfs)"));
    }
    let end = offset.checked_add(size).ok_or_else(|| invalid("memory region offset overflows"))?;
    if end > u64::try_from(stat.st_size).unwrap_or(0) {
        return Err(invalid("memory region extends beyond the end of its file"));
    }
    let sealed = matches!(vmq_sys::memfd::seals(file), Ok(Some(s)) if s & vmq_sys::memfd::SEAL_SHRINK != 0);
    if !sealed && !trust_unsealed {
        return Err(invalid(
            "memory region file can shrink (no F_SEAL_SHRINK): use a sealed memfd (QEMU memory-backend-memfd, \
             seal=on is its default) or trust this port's frontend memory",
        ));
    }
    Ok(())
}

/// Kick and call fds must be eventfds: workers wait on kicks and write calls, and any other kind
/// of fd (a pipe nobody drains, a socket) could block them or never wake them. They are made
/// non-blocking: a frontend that drives the counter to its maximum must not block a worker's
/// write. (O_NONBLOCK is shared with the frontend's copy; QEMU, cloud-hypervisor and DPDK create
/// theirs non-blocking anyway.)
fn check_eventfd(file: &File) -> ProtoResult<()> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let is_eventfd = match link {
        Ok(target) => target.as_os_str() == "anon_inode:[eventfd]",
        // Without /proc: an anonymous inode at least (no file type bits), never a pipe, socket
        // or file.
        Err(_) => fstat(file).is_ok_and(|s| SFlag::from_bits_truncate(s.st_mode) & SFlag::S_IFMT == SFlag::empty()),
    };
    if !is_eventfd {
        return Err(invalid("ring notifier fd is not an eventfd"));
    }
    let flags = fcntl(file, FcntlArg::F_GETFL).map_err(|_| invalid("cannot read ring notifier fd flags"))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(file, FcntlArg::F_SETFL(flags)).map_err(|_| invalid("cannot make ring notifier fd non-blocking"))?;
    Ok(())
}

impl NetBackend {
    pub fn new(config: NetDeviceConfig, device: Arc<NetDevice>, on_event: Box<dyn FnMut(DeviceEvent) + Send>) -> Self {
        NetBackend {
            config,
            device,
            owned: false,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            mappings: Vec::new(),
            on_event,
            was_running: false,
            live_rings: 0,
            dirty_log: None,
        }
    }

    pub fn device(&self) -> &Arc<NetDevice> {
        &self.device
    }

    /// Called when the connection ends: the port goes down and forgets the guest.
    pub fn disconnected(&mut self) {
        self.device.reset();
        self.mappings.clear();
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol = VhostUserProtocolFeatures::empty();
        self.dirty_log = None;
        self.live_rings = 0;
        if self.was_running {
            self.was_running = false;
            (self.on_event)(DeviceEvent::Stopped);
        }
    }

    fn vmm_to_gpa(&self, vmm_addr: u64) -> ProtoResult<u64> {
        self.mappings
            .iter()
            .find(|m| vmm_addr >= m.vmm_addr && vmm_addr - m.vmm_addr < m.size)
            .map(|m| m.gpa_base + (vmm_addr - m.vmm_addr))
            .ok_or_else(|| invalid("ring address outside the memory table"))
    }

    fn check_index(&self, index: u32) -> ProtoResult<usize> {
        let i = index as usize;
        if i < self.device.num_rings() { Ok(i) } else { Err(invalid("queue index beyond the port's queue pairs")) }
    }

    /// Ring setup (size, addresses, base) is only allowed while the ring is stopped: the worker
    /// serving it would otherwise index a ring of another size or at another place than the
    /// guest's. The frontend stops a ring with GET_VRING_BASE first.
    fn check_stopped(&self, i: usize) -> ProtoResult<()> {
        if self.device.vring(i).started {
            return Err(invalid("ring reconfigured while it runs (GET_VRING_BASE first)"));
        }
        Ok(())
    }

    fn packed(&self) -> bool {
        crate::packed::is_packed(self.acked_features)
    }

    fn any_ring_started(&self) -> bool {
        (0..self.device.num_rings()).any(|i| self.device.vring(i).started)
    }

    /// VHOST_USER_F_PROTOCOL_FEATURES counts as negotiated once the backend offers it (it is a
    /// vhost-user feature, not a virtio one, and is never acked by SET_FEATURES): vmq always
    /// offers it, so rings start disabled until SET_VRING_ENABLE.
    fn protocol_features_negotiated(&self) -> bool {
        self.config.offered_features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Was REPLY_ACK negotiated (so a request flagged NEED_REPLY gets an ack)?
    pub fn reply_ack(&self) -> bool {
        self.acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK)
    }

    /// Start rings that are now complete, stop rings that no longer fit guest memory, and tell
    /// the data path when the device runs or stops.
    fn update_running(&mut self) {
        let mem = self.device.mem.memory();
        for i in 0..self.device.num_rings() {
            let mut ring = self.device.vring(i);
            if ring.kick.is_some() && !ring.started {
                // `is_valid` checks the whole descriptor table and both rings against guest
                // memory, and only for a queue marked ready.
                ring.queue.set_ready(true);
                ring.started = crate::packed::ring_fits(&ring.queue, &*mem, self.packed());
                if !ring.started {
                    ring.queue.set_ready(false);
                    tracing::warn!(queue = i, "ring not inside guest memory; ring not started");
                }
            } else if ring.started && !crate::packed::ring_fits(&ring.queue, &*mem, self.packed()) {
                // A new memory table no longer holds the ring: stopped until the frontend sets
                // it up again (down to a new kick fd).
                ring.started = false;
                ring.count_stop();
                ring.queue.set_ready(false);
                ring.kick = None;
                tracing::warn!(queue = i, "ring no longer inside guest memory; ring stopped");
            }
        }
        drop(mem);
        let live = self.device.live_rings();
        let layout_changed = live != self.live_rings;
        if layout_changed {
            self.live_rings = live;
            self.device.bump_ring_layout();
        }
        let running = self.device.is_running();
        if running != self.was_running {
            self.was_running = running;
            self.device.bump_generation();
            (self.on_event)(if running { DeviceEvent::Started } else { DeviceEvent::Stopped });
        } else if running && layout_changed {
            (self.on_event)(DeviceEvent::RingsChanged);
        }
    }

    /// Tells the data path the device stopped (if it ran), e.g. before its kick fd changes.
    fn stop_if_running(&mut self) {
        if self.was_running {
            self.was_running = false;
            self.device.bump_generation();
            (self.on_event)(DeviceEvent::Stopped);
        }
    }

    /// Gives every ring the dirty log while LOG_ALL is acked, none otherwise (under each
    /// ring's lock: a worker's batch logs all its writes or none).
    fn install_dirty_log(&mut self) {
        let log_all = self.acked_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        let log = effective_log(&self.dirty_log, log_all);
        for i in 0..self.device.num_rings() {
            self.device.vring(i).dirty_log = log.clone();
        }
        self.device.migration.set_logging(log.is_some());
    }

    /// The used index the guest sees (in guest memory), for GET_VRING_BASE: everything before
    /// it was used, nothing after it was. A TX chain vmq took but has not returned yet (its
    /// frame was still in flight) is given back untaken: the ring resumes there, the VMM takes
    /// the frame again (sent twice rather than lost, and the guest gets its buffer back). The
    /// device's own position is rewound to it too. None if the ring is not in guest memory.
    fn published_used_index(queue: &mut virtio_queue::Queue, device: &NetDevice) -> Option<u16> {
        if crate::packed::is_packed(device.acked_features()) {
            return Some(crate::packed::published_position(queue));
        }
        let mem = device.mem.memory();
        let used = queue.used_idx(&*mem, std::sync::atomic::Ordering::Acquire).ok()?.0;
        queue.set_next_avail(used);
        queue.set_next_used(used);
        Some(used)
    }

    /// VHOST_USER_SEND_RARP (intercepted by `server.rs`: the `vhost` crate does not parse it):
    /// after a live migration, announce the guest's MAC into the switch and the uplink. The TX
    /// source injects the frame on its next batch; the kick wakes its worker.
    pub fn send_rarp(&mut self, mac: MacAddr) -> Result<(), Refusal> {
        if !self.acked_protocol.contains(VhostUserProtocolFeatures::RARP) {
            return Err(Refusal::Disconnect("the RARP protocol feature was not negotiated".into()));
        }
        if mac.0[0] & 1 != 0 {
            return Err(Refusal::Reply(format!("SEND_RARP with a multicast MAC {mac:?}")));
        }
        self.device.migration.request_announce(mac);
        let ring = self.device.vring(crate::device::TX_QUEUE);
        if let Some(mut kick) = ring.kick.as_ref() {
            use std::io::Write;
            let _ = kick.write(&1u64.to_ne_bytes());
        }
        tracing::info!(?mac, "announcing the migrated guest (RARP)");
        Ok(())
    }

    /// SET_VRING_ENABLE (intercepted by `server.rs`, see there for why).
    pub fn enable_vring(&mut self, index: u32, enable: bool) -> ProtoResult<()> {
        let i = self.check_index(index)?;
        self.device.vring(i).enabled = enable;
        self.update_running();
        Ok(())
    }

    /// VHOST_USER_NET_SET_MTU (intercepted by `server.rs`: the `vhost` crate does not parse it).
    /// The frontend tells the guest this MTU; vmq accepts it up to the port MTU.
    pub fn set_mtu(&mut self, mtu: u64) -> Result<(), Refusal> {
        if !self.acked_protocol.contains(VhostUserProtocolFeatures::MTU) {
            return Err(Refusal::Disconnect("the NET_MTU protocol feature was not negotiated".into()));
        }
        let port_mtu = self.config.mtu;
        match u16::try_from(mtu) {
            Ok(mtu) if (MIN_MTU..=port_mtu).contains(&mtu) => {
                self.device.set_frontend_mtu(mtu);
                tracing::info!(mtu, "frontend advertises this MTU to the guest");
                Ok(())
            }
            _ => Err(Refusal::Reply(format!(
                "MTU {mtu} requested by the frontend is outside {MIN_MTU}..={port_mtu} (the port MTU)"
            ))),
        }
    }

    fn config_space(&self) -> [u8; 12] {
        // struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu; }
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.config.mac.0);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&self.device.queue_pairs().to_le_bytes());
        c[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
        c
    }
}

impl VhostUserBackendReqHandlerMut for NetBackend {
    fn set_owner(&mut self) -> ProtoResult<()> {
        if self.owned {
            return Err(invalid("SET_OWNER twice"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> ProtoResult<()> {
        self.disconnected();
        Ok(())
    }

    fn reset_device(&mut self) -> ProtoResult<()> {
        self.disconnected();
        Ok(())
    }

    fn get_features(&mut self) -> ProtoResult<u64> {
        Ok(crate::mq::offered_features(self.config.offered_features(), &self.device))
    }

    fn set_features(&mut self, features: u64) -> ProtoResult<()> {
        let offered = crate::mq::offered_features(self.config.offered_features(), &self.device);
        if features & !offered != 0 {
            return Err(invalid("frontend acknowledged features vmq did not offer"));
        }
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(invalid("VIRTIO_F_VERSION_1 is required"));
        }
        // EVENT_IDX changes how a running ring is read: only while everything is stopped.
        // LOG_ALL is the exception: QEMU switches dirty logging on and off on running rings.
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        if self.any_ring_started() && features & !log_all != self.acked_features & !log_all {
            return Err(invalid("features changed while rings run"));
        }
        self.acked_features = features;
        self.install_dirty_log();
        self.device.set_acked_features(features);
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for i in 0..self.device.num_rings() {
            let mut ring = self.device.vring(i);
            ring.queue.set_event_idx(event_idx);
            // Without protocol features, rings are enabled as soon as they are kicked.
            if !self.protocol_features_negotiated() {
                ring.enabled = true;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> ProtoResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(invalid("postcopy is not supported"));
        }
        if ctx.is_empty() || ctx.len() > MAX_MEM_REGIONS || files.len() != ctx.len() {
            return Err(invalid("memory table with no regions, too many, or fds missing"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        let mut total: u64 = 0;
        for (region, file) in ctx.iter().zip(files) {
            if region.memory_size == 0 {
                return Err(invalid("empty memory region"));
            }
            total = total.saturating_add(region.memory_size);
            if total > MAX_GUEST_MEMORY {
                return Err(invalid("memory table larger than MAX_GUEST_MEMORY"));
            }
            if region.user_addr.checked_add(region.memory_size).is_none() {
                return Err(invalid("memory region wraps the frontend's address space"));
            }
            check_region_file(&file, region.mmap_offset, region.memory_size, self.config.trust_unsealed_memory)?;
            let mmap = region.mmap_region::<()>(file)?;
            let guest_region = GuestRegionMmap::new(mmap, GuestAddress(region.guest_phys_addr))
                .ok_or_else(|| invalid("memory region wraps the guest address space"))?;
            regions.push(guest_region);
            mappings.push(AddrMapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
        }
        // Sorts by guest address and refuses overlaps.
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|_| invalid("overlapping memory regions"))?;
        // Workers that are mid-batch keep the old mapping alive (GuestMemoryAtomic hands out
        // snapshots); the next batch sees the new one.
        self.device.mem.lock().unwrap_or_else(|p| p.into_inner()).replace(mem);
        self.mappings = mappings;
        // QEMU sends a new table while rings run when the guest's memory map changes
        // (hotplug); rings it no longer holds are stopped.
        self.update_running();
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> ProtoResult<()> {
        let i = self.check_index(index)?;
        self.check_stopped(i)?;
        let size = u16::try_from(num).map_err(|_| invalid("ring size beyond 16 bits"))?;
        if size > MAX_QUEUE_SIZE {
            return Err(invalid("ring size above 1024"));
        }
        self.device.vring(i).queue.try_set_size(size).map_err(|_| invalid("ring size must be a power of two"))
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> ProtoResult<()> {
        let i = self.check_index(index)?;
        let desc = self.vmm_to_gpa(descriptor)?;
        let avail = self.vmm_to_gpa(available)?;
        let used = self.vmm_to_gpa(used)?;
        {
            // QEMU repeats the addresses of running rings when it switches dirty logging on or
            // off (only the log flag changes): fine as long as the ring stays where it is.
            let ring = self.device.vring(i);
            let q = &ring.queue;
            if ring.started && (q.desc_table(), q.avail_ring(), q.used_ring()) == (desc, avail, used) {
                return Ok(());
            }
        }
        self.check_stopped(i)?;
        let mut ring = self.device.vring(i);
        let q = &mut ring.queue;
        // Alignment as the virtio spec requires (16, 2, 4); the ring's extent is checked
        // against guest memory when it starts.
        q.try_set_desc_table_address(GuestAddress(desc))
            .map_err(|_| invalid("descriptor table not aligned to 16 bytes"))?;
        q.try_set_avail_ring_address(GuestAddress(avail))
            .map_err(|_| invalid("available ring not aligned to 2 bytes"))?;
        q.try_set_used_ring_address(GuestAddress(used)).map_err(|_| invalid("used ring not aligned to 4 bytes"))?;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> ProtoResult<()> {
        let i = self.check_index(index)?;
        self.check_stopped(i)?;
        // Ring indices are free-running 16-bit counters: any 16-bit value is a valid position.
        // Packed rings: QEMU adds its used position in bits 16..32 (see `packed.rs`).
        let base = if self.packed() { crate::packed::avail_base(base) } else { base };
        let base = u16::try_from(base).map_err(|_| invalid("ring base beyond 16 bits"))?;
        let mut ring = self.device.vring(i);
        ring.queue.set_next_avail(base);
        ring.queue.set_next_used(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> ProtoResult<VhostUserVringState> {
        let i = self.check_index(index)?;
        let base = {
            // Taking the lock waits for a worker's batch on this ring to end; once `started` is
            // false no worker writes into guest memory for the ring again (they check
            // `is_live` under this lock). Only then may the frontend read the dirty log for the
            // last time (live migration) or hand the ring to someone else.
            let mut ring = self.device.vring(i);
            let was_started = ring.started;
            ring.started = false;
            ring.count_stop();
            ring.queue.set_ready(false);
            ring.kick = None;
            ring.call = None;
            if self.protocol_features_negotiated() {
                ring.enabled = false;
            }
            let had_log = ring.dirty_log.take().is_some();
            let base = if was_started { Self::published_used_index(&mut ring.queue, &self.device) } else { None };
            (base.unwrap_or_else(|| ring.queue.next_avail()), had_log)
        };
        let (base, had_log) = base;
        // The last ring stopped while logging: the VM was handed over (the source's final
        // stop in a live migration).
        if had_log && (0..self.device.num_rings()).all(|j| self.device.vring(j).dirty_log.is_none()) {
            self.device.migration.count_migrated_out();
        }
        self.update_running();
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> ProtoResult<()> {
        let i = self.check_index(index as u32)?;
        // Polling mode (no kick fd) is not offered: vmq's workers sleep on kicks.
        let fd = fd.ok_or_else(|| invalid("ring without a kick fd (polling mode) is not supported"))?;
        check_eventfd(&fd)?;
        // A new kick fd on a running ring: the worker waits on the old one, so it must let go of
        // the device and pick it up again (Stopped, then Started).
        if self.device.vring(i).started {
            self.stop_if_running();
            // Not a stop in the sense of `Vring::stops`: the ring keeps its position, and
            // chains a worker holds are still its to return.
            let mut ring = self.device.vring(i);
            ring.started = false;
            ring.queue.set_ready(false);
        }
        {
            // The ring starts with its kick fd: it must lie inside guest memory by now (QEMU
            // sends the memory table and the ring's size and addresses first).
            let mem = self.device.mem.memory();
            let mut ring = self.device.vring(i);
            ring.queue.set_ready(true);
            let fits = crate::packed::ring_fits(&ring.queue, &*mem, self.packed());
            ring.queue.set_ready(false);
            if !fits {
                return Err(invalid("ring (size and addresses) not inside guest memory"));
            }
            ring.kick = Some(fd);
        }
        self.update_running();
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> ProtoResult<()> {
        let i = self.check_index(index as u32)?;
        // QEMU replaces the call fd of running rings (interrupt masking), and sends the final
        // one of a starting device only after its kick, i.e. after `Started`. Workers read it
        // from the ring under its lock for every signal, so the next one goes to the new fd;
        // a signal that went to the old fd meanwhile is made up for by one on the new fd
        // (a spurious interrupt only makes the driver look at the used ring).
        if let Some(fd) = &fd {
            check_eventfd(fd)?;
        }
        let mut ring = self.device.vring(i);
        ring.call = fd;
        if ring.started {
            ring.signal_guest();
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> ProtoResult<()> {
        // vmq never reports ring errors this way; the fd is closed.
        self.check_index(index as u32)?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> ProtoResult<VhostUserProtocolFeatures> {
        Ok(offered_protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> ProtoResult<()> {
        let features =
            VhostUserProtocolFeatures::from_bits(features).ok_or_else(|| invalid("unknown protocol feature bits"))?;
        if !offered_protocol_features().contains(features) {
            return Err(invalid("protocol features vmq did not offer"));
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> ProtoResult<u64> {
        // For vhost-user-net, QEMU (and DPDK) read this as queue *pairs*.
        Ok(u64::from(self.device.queue_pairs()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> ProtoResult<()> {
        self.enable_vring(index, enable)
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> ProtoResult<Vec<u8>> {
        let space = self.config_space();
        let start = offset as usize;
        let end = start.checked_add(size as usize).ok_or_else(|| invalid("config range overflows"))?;
        // Reads past our config space return zeros (fields of features we do not offer). The
        // `vhost` crate bounds `size` by its message size.
        let mut out = vec![0u8; size as usize];
        if start < space.len() {
            let avail = &space[start..end.min(space.len())];
            out[..avail.len()].copy_from_slice(avail);
        }
        Ok(out)
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> ProtoResult<()> {
        // virtio-net config space is read-only for the driver (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered).
        Err(invalid("config space is read-only"))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> ProtoResult<()> {
        Err(invalid("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> ProtoResult<File> {
        Err(invalid("shared objects are not supported"))
    }

    fn get_inflight_fd(&mut self, _inflight: &VhostUserInflight) -> ProtoResult<(VhostUserInflight, File)> {
        Err(invalid("inflight tracking is not supported"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> ProtoResult<()> {
        Err(invalid("inflight tracking is not supported"))
    }

    fn get_max_mem_slots(&mut self) -> ProtoResult<u64> {
        Ok(MAX_MEM_REGIONS as u64)
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> ProtoResult<Option<VhostUserMemoryRegionBase>> {
        Err(invalid("CONFIGURE_MEM_SLOTS was not offered"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> ProtoResult<()> {
        Err(invalid("CONFIGURE_MEM_SLOTS was not offered"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> ProtoResult<Option<File>> {
        Err(invalid("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> ProtoResult<()> {
        Err(invalid("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> ProtoResult<VhostUserShMemConfig> {
        Err(invalid("no shared memory regions"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> ProtoResult<()> {
        // The `vhost` crate refuses this without LOG_SHMFD, and replies once we return.
        // Same rules as guest memory: a log file that shrinks under the mapping is a SIGBUS.
        check_region_file(&file, log.mmap_offset, log.mmap_size, self.config.trust_unsealed_memory)?;
        let map = DirtyLog::map(&file, log.mmap_offset, log.mmap_size).map_err(|e| {
            tracing::warn!(error = %e, "dirty log refused");
            ProtoError::InvalidOperation("dirty log size or offset refused")
        })?;
        tracing::info!(size = log.mmap_size, "dirty log mapped (live migration)");
        // A new log (QEMU resizes it when guest memory grows) replaces the old one in the rings.
        self.dirty_log = Some(Arc::new(map));
        self.install_dirty_log();
        Ok(())
    }
}

/// A notifier fd the frontend passed (an eventfd). Kept as a `File`: eventfd semantics are
/// plain 8-byte reads and writes, which `File` does without any unsafe conversion.
pub type Notifier = File;

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(mtu: u16) -> NetBackend {
        let config = NetDeviceConfig {
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            mtu,
            offloads: true,
            trust_unsealed_memory: false,
        };
        NetBackend::new(config, NetDevice::new(), Box::new(|_| {}))
    }

    #[test]
    fn set_mtu_accepts_up_to_the_port_mtu() {
        let mut b = backend(9000);
        assert!(matches!(b.set_mtu(1500), Err(Refusal::Disconnect(_))), "NET_MTU not negotiated yet");
        b.set_protocol_features(offered_protocol_features().bits()).unwrap();
        assert_eq!(b.set_mtu(9000), Ok(()));
        assert_eq!(b.device().frontend_mtu(), Some(9000));
        assert_eq!(b.set_mtu(68), Ok(()));
        for bad in [67, 9001, 65536, u64::MAX] {
            assert!(matches!(b.set_mtu(bad), Err(Refusal::Reply(_))), "{bad}");
        }
        assert_eq!(b.device().frontend_mtu(), Some(68), "refused values leave the last good one");
        b.disconnected();
        assert_eq!(b.device().frontend_mtu(), None);
    }

    #[test]
    fn config_space_reads_mac_status_pairs_mtu() {
        let mut b = backend(9000);
        let c = b.get_config(0, 12, VhostUserConfigFlags::empty()).unwrap();
        assert_eq!(&c[..6], &[0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), VIRTIO_NET_S_LINK_UP as u16);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
        // Partial and out-of-range reads.
        assert_eq!(b.get_config(10, 2, VhostUserConfigFlags::empty()).unwrap(), 9000u16.to_le_bytes());
        assert_eq!(b.get_config(100, 4, VhostUserConfigFlags::empty()).unwrap(), vec![0; 4]);
        assert!(b.get_config(u32::MAX, 2, VhostUserConfigFlags::empty()).is_ok_and(|v| v == vec![0; 2]));
    }

    #[test]
    fn notifier_must_be_an_eventfd() {
        let evt = nix::sys::eventfd::EventFd::new().unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(evt));
        assert!(check_eventfd(&file).is_ok());
        let flags = OFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GETFL).unwrap());
        assert!(flags.contains(OFlag::O_NONBLOCK), "made non-blocking");
        let (pipe_read, _pipe_write) = nix::unistd::pipe().unwrap();
        assert!(check_eventfd(&File::from(pipe_read)).is_err());
        assert!(check_eventfd(&File::open("/proc/self/status").unwrap()).is_err());
    }

    /// SET_LOG_BASE maps QEMU's log; SET_FEATURES with LOG_ALL hands it to the rings, without
    /// it takes it away, also while they run; bad logs are refused with an error.
    #[test]
    fn dirty_log_follows_log_all_and_bad_logs_are_refused() {
        use vmq_sys::memfd::{SEAL_SHRINK, create};
        let mut b = backend(1500);
        b.set_protocol_features(offered_protocol_features().bits()).unwrap();
        let base = 1u64 << VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        assert_ne!(b.get_features().unwrap() & log_all, 0, "LOG_ALL offered");
        b.set_features(base).unwrap();
        for (size, offset, why) in [(0, 0, "empty"), (8192, 0, "beyond the file"), (4096, 100, "unaligned")] {
            let file = create("log", 4096, SEAL_SHRINK).unwrap();
            assert!(b.set_log_base(&VhostUserLog::new(size, offset), file).is_err(), "{why}");
        }
        let unsealed = create("log", 4096, 0).unwrap();
        assert!(b.set_log_base(&VhostUserLog::new(4096, 0), unsealed).is_err(), "unsealed log file");
        assert!(
            b.set_log_base(&VhostUserLog::new(u64::MAX, u64::MAX), create("log", 4096, SEAL_SHRINK).unwrap()).is_err()
        );
        b.set_log_base(&VhostUserLog::new(4096, 0), create("log", 4096, SEAL_SHRINK).unwrap()).unwrap();
        assert!(b.device().vring(0).dirty_log.is_none(), "not before LOG_ALL");
        // Rings running: only LOG_ALL may change.
        b.device().vring(0).started = true;
        assert!(b.set_features(base | 1 << VIRTIO_RING_F_EVENT_IDX).is_err());
        b.set_features(base | log_all).unwrap();
        assert!(b.device().vring(0).dirty_log.is_some() && b.device().vring(1).dirty_log.is_some());
        assert!(b.device().migration.logging());
        assert_eq!(b.device().migration.log_starts(), 1);
        b.set_features(base).unwrap();
        assert!(b.device().vring(0).dirty_log.is_none() && !b.device().migration.logging());
        b.set_features(base | log_all).unwrap();
        assert_eq!(b.device().migration.log_starts(), 2);
        // The final stop while logging counts as a migration out; the ring forgets the log.
        b.get_vring_base(0).unwrap();
        assert!(b.device().vring(0).dirty_log.is_none());
        assert_eq!(b.device().migration.migrated_out(), 0, "one ring still runs");
        b.get_vring_base(1).unwrap();
        assert_eq!(b.device().migration.migrated_out(), 1);
        b.disconnected();
        assert!(!b.device().migration.logging());
    }

    #[test]
    fn region_file_must_cover_the_region() {
        let dir = std::env::temp_dir().join(format!("vqv-region-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        // A plain file can be truncated: only for a trusted frontend.
        assert!(check_region_file(&file, 0, 1 << 20, true).is_ok());
        assert!(check_region_file(&file, 0, 1 << 20, false).is_err(), "unsealed");
        assert!(check_region_file(&file, 4096, 1 << 20, true).is_err(), "beyond the end of the file");
        assert!(check_region_file(&file, u64::MAX, 2, true).is_err(), "offset overflow");
        assert!(check_region_file(&File::open(&dir).unwrap(), 0, 1, true).is_err(), "a directory");
        assert!(check_region_file(&File::open("/dev/zero").unwrap(), 0, 1, true).is_err(), "a device");
        use vmq_sys::memfd::{SEAL_GROW, SEAL_SHRINK, create};
        assert!(check_region_file(&create("m", 1 << 20, SEAL_SHRINK).unwrap(), 0, 1 << 20, false).is_ok());
        assert!(check_region_file(&create("m", 1 << 20, SEAL_GROW).unwrap(), 0, 1 << 20, false).is_err());
        assert!(check_region_file(&create("m", 1 << 20, 0).unwrap(), 0, 1 << 20, false).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

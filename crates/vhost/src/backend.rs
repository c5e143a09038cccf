//! The vhost-user-net protocol, backend side: what vmq answers to QEMU or cloud-hypervisor.
//!
//! Message framing, fd passing and validation of message sizes is the `vhost` crate's
//! (`BackendReqHandler`); this module holds the device semantics: features, memory table,
//! ring setup, config space. Anything the frontend gets wrong is an error reply (and usually
//! the end of the connection), never a panic.

use std::fs::File;
use std::sync::Arc;

use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as ProtoError, GpuBackend, Result as ProtoResult, VhostUserBackendReqHandlerMut,
};
use virtio_bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap, GuestRegionMmap};
use vmq_wire::MacAddr;

use crate::device::{MAX_QUEUE_SIZE, NUM_QUEUES, NetDevice};

/// Most memory regions a frontend may hand over (QEMU uses one to a few).
pub const MAX_MEM_REGIONS: usize = 32;

/// What the port offers the guest. The guest's acknowledged subset decides what vmq delivers.
#[derive(Debug, Clone)]
pub struct NetDeviceConfig {
    pub mac: MacAddr,
    /// The port MTU, advertised with VIRTIO_NET_F_MTU; `SET_MTU` above it is refused.
    pub mtu: u16,
    /// Offer checksum and TSO offloads (both directions).
    pub offloads: bool,
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
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
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

/// Protocol features vmq offers: REPLY_ACK only.
/// - NET_MTU is not offered: the `vhost` crate (0.18) does not parse VHOST_USER_NET_SET_MTU and
///   would drop the connection on it; without the feature QEMU skips that message and still
///   advertises `host_mtu` to the guest through VIRTIO_NET_F_MTU, which is what matters. The
///   port MTU is enforced by vmq either way.
/// - MQ is not offered while vmq serves one queue pair: with MQ, QEMU 7.2 sends
///   SET_VRING_ENABLE before SET_FEATURES, which the `vhost` crate rejects.
/// - CONFIG is not offered: QEMU's vhost-user-net does not use it (and warns when offered).
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::REPLY_ACK
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
    /// A ring was stopped (GET_VRING_BASE) or reset: the worker must stop serving it.
    Stopped,
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
}

fn invalid(reason: &'static str) -> ProtoError {
    tracing::warn!(reason, "vhost-user request refused");
    ProtoError::InvalidOperation(reason)
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

    fn check_index(index: u32) -> ProtoResult<usize> {
        let i = index as usize;
        if i < NUM_QUEUES { Ok(i) } else { Err(invalid("queue index beyond the single queue pair")) }
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

    /// Start rings that are now complete, and tell the data path when the device runs or stops.
    fn update_running(&mut self) {
        let mem = self.device.mem.memory();
        for i in 0..NUM_QUEUES {
            let mut ring = self.device.vring(i);
            if ring.kick.is_some() && !ring.started {
                // `is_valid` checks addresses, alignment and size against guest memory, and
                // only for a queue marked ready.
                ring.queue.set_ready(true);
                ring.started = ring.queue.is_valid(&*mem);
                if !ring.started {
                    ring.queue.set_ready(false);
                    tracing::warn!(queue = i, "ring addresses invalid for guest memory; ring not started");
                }
            }
        }
        drop(mem);
        let running = self.device.is_running();
        if running != self.was_running {
            self.was_running = running;
            self.device.bump_generation();
            (self.on_event)(if running { DeviceEvent::Started } else { DeviceEvent::Stopped });
        }
    }

    /// SET_VRING_ENABLE (see `server::Connection::set_vring_enable` for why it is routed here).
    pub fn enable_vring(&mut self, index: u32, enable: bool) -> ProtoResult<()> {
        let i = Self::check_index(index)?;
        self.device.vring(i).enabled = enable;
        self.update_running();
        Ok(())
    }

    fn config_space(&self) -> [u8; 12] {
        // struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu; }
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.config.mac.0);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
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
        Ok(self.config.offered_features())
    }

    fn set_features(&mut self, features: u64) -> ProtoResult<()> {
        let offered = self.config.offered_features();
        if features & !offered != 0 {
            return Err(invalid("frontend acknowledged features vmq did not offer"));
        }
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(invalid("VIRTIO_F_VERSION_1 is required"));
        }
        self.acked_features = features;
        self.device.set_acked_features(features);
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for i in 0..NUM_QUEUES {
            let mut ring = self.device.vring(i);
            ring.queue.set_event_idx(event_idx);
            // Without protocol features, rings are enabled as soon as they are kicked.
            if !self.protocol_features_negotiated() {
                ring.enabled = true;
            }
        }
        let _ = VIRTIO_F_NOTIFY_ON_EMPTY; // deliberately not offered
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
        for (region, file) in ctx.iter().zip(files) {
            if region.memory_size == 0 {
                return Err(invalid("empty memory region"));
            }
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
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|_| invalid("overlapping memory regions"))?;
        self.device.mem.lock().unwrap_or_else(|p| p.into_inner()).replace(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> ProtoResult<()> {
        let i = Self::check_index(index)?;
        if num == 0 || num > MAX_QUEUE_SIZE as u32 || !num.is_power_of_two() {
            return Err(invalid("ring size must be a power of two up to 1024"));
        }
        self.device.vring(i).queue.set_size(num as u16);
        Ok(())
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
        let i = Self::check_index(index)?;
        let desc = self.vmm_to_gpa(descriptor)?;
        let avail = self.vmm_to_gpa(available)?;
        let used = self.vmm_to_gpa(used)?;
        let mut ring = self.device.vring(i);
        let q = &mut ring.queue;
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> ProtoResult<()> {
        let i = Self::check_index(index)?;
        let base = u16::try_from(base).map_err(|_| invalid("ring base beyond 16 bits"))?;
        let mut ring = self.device.vring(i);
        ring.queue.set_next_avail(base);
        ring.queue.set_next_used(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> ProtoResult<VhostUserVringState> {
        let i = Self::check_index(index)?;
        let next_avail = {
            let mut ring = self.device.vring(i);
            // The frontend stops the ring with this message: stop serving it, forget the fds.
            ring.started = false;
            ring.queue.set_ready(false);
            ring.kick = None;
            ring.call = None;
            if self.protocol_features_negotiated() {
                ring.enabled = false;
            }
            ring.queue.next_avail()
        };
        self.update_running();
        Ok(VhostUserVringState::new(index, next_avail as u32))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> ProtoResult<()> {
        let i = Self::check_index(index as u32)?;
        // Polling mode (no kick fd) is not offered: vmq's workers sleep on kicks.
        let fd = fd.ok_or_else(|| invalid("ring without a kick fd (polling mode) is not supported"))?;
        {
            let mut ring = self.device.vring(i);
            ring.kick = Some(fd);
        }
        self.update_running();
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> ProtoResult<()> {
        let i = Self::check_index(index as u32)?;
        self.device.vring(i).call = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> ProtoResult<()> {
        Self::check_index(index as u32)?;
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
        // One RX/TX pair; MQ is acknowledged so that QEMU asks instead of assuming.
        Ok(NUM_QUEUES as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> ProtoResult<()> {
        self.enable_vring(index, enable)
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> ProtoResult<Vec<u8>> {
        let space = self.config_space();
        let start = offset as usize;
        let end = start.checked_add(size as usize).ok_or_else(|| invalid("config range overflows"))?;
        // Reads past our config space return zeros (fields of features we do not offer).
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

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> ProtoResult<()> {
        Err(invalid("dirty logging (live migration) is not supported"))
    }
}

/// A notifier fd the frontend passed (an eventfd). Kept as a `File`: eventfd semantics are
/// plain 8-byte reads and writes, which `File` does without any unsafe conversion.
pub type Notifier = File;

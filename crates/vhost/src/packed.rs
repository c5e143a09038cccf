//! Packed virtqueues (VIRTIO_F_RING_PACKED, virtio 1.1 §2.7) on the protocol side. The frontend
//! sends the same messages as for a split ring, with other meanings (vhost-user spec, "Ring
//! states" and VHOST_USER_SET_VRING_ADDR/BASE):
//! - SET_VRING_ADDR: the descriptor ring, the driver event suppression area (in place of the
//!   available ring) and the device event suppression area (in place of the used ring);
//! - SET_VRING_BASE / GET_VRING_BASE: bits 0..15 the ring index, bit 15 its wrap counter (a
//!   fresh ring is 0x8000); the device side decodes it (`vmq_datapath::packed_ring`). QEMU's
//!   SET_VRING_BASE also carries its used position in bits 16..32 (index, wrap in bit 31); as
//!   DPDK's vhost library does, vmq resumes both positions at the avail one (every chain the
//!   previous backend took was returned: GET_VRING_BASE reports a position where that holds).
//!
//! `virtio-queue`'s `Queue` only holds this configuration: its `is_valid` checks the areas of
//! a split ring, so a packed ring's extent is checked here instead.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend};

/// The feature bit (not in `virtio-bindings`' ring constants).
pub const VIRTIO_F_RING_PACKED: u32 = 34;

/// Whether the driver acked packed rings.
pub fn is_packed(features: u64) -> bool {
    features & (1 << VIRTIO_F_RING_PACKED) != 0
}

/// The avail position (index and wrap counter) of a packed ring's SET_VRING_BASE payload.
pub fn avail_base(payload: u32) -> u32 {
    payload & 0xffff
}

/// Whether the ring `queue` describes lies inside guest memory: a split ring's three areas
/// (`Queue::is_valid`), or a packed ring's descriptor ring and two 4-byte event areas.
pub fn ring_fits<M: GuestMemory + GuestMemoryBackend>(queue: &Queue, mem: &M, packed: bool) -> bool {
    if !packed {
        return queue.is_valid(mem);
    }
    let size = u64::from(queue.size());
    // In one memory region each, as the data path maps them.
    let area = |addr: u64, len: u64| mem.get_slice(GuestAddress(addr), len as usize).is_ok();
    queue.ready()
        && size > 0
        && area(queue.desc_table(), 16 * size)
        && area(queue.avail_ring(), 4)
        && area(queue.used_ring(), 4)
}

/// The position GET_VRING_BASE reports for a packed ring: the device's used position (wrap
/// counter in bit 15), where everything before was returned. Chains taken but not returned
/// yet are given back untaken (as for split rings, see `published_used_index`).
pub fn published_position(queue: &mut Queue) -> u16 {
    let used = queue.next_used();
    queue.set_next_avail(used);
    used
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{NetBackend, NetDeviceConfig};
    use crate::device::NetDevice;
    use vhost::vhost_user::VhostUserBackendReqHandlerMut;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use vm_memory::GuestMemoryMmap;
    use vmq_wire::MacAddr;

    fn backend() -> NetBackend {
        let config = NetDeviceConfig {
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            mtu: 1500,
            offloads: true,
            trust_unsealed_memory: false,
        };
        NetBackend::new(config, NetDevice::with_queue_pairs(1), Box::new(|_| {}))
    }

    #[test]
    fn packed_rings_are_offered_and_their_base_carries_wrap_counters() {
        let mut b = backend();
        let offered = b.get_features().unwrap();
        assert!(is_packed(offered));
        // Split rings: a base is 16 bits.
        b.set_features(1 << VIRTIO_F_VERSION_1).unwrap();
        assert!(b.set_vring_base(0, 0x8000_8000).is_err());
        // Packed rings: QEMU's base has its used position in the high half; vmq resumes at the
        // avail position (index 3, wrap counter 1) and reports it back.
        b.set_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_RING_PACKED).unwrap();
        b.set_vring_num(0, 256).unwrap();
        b.set_vring_base(0, 0x8001_8003).unwrap();
        let state = b.get_vring_base(0).unwrap();
        let num = state.num;
        assert_eq!(num, 0x8003);
    }

    #[test]
    fn a_packed_ring_fits_with_4_byte_event_areas() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(0), Some(0));
        // The event areas at the very end of memory: no room for split rings there.
        q.set_avail_ring_address(Some(0xff8), Some(0));
        q.set_used_ring_address(Some(0xffc), Some(0));
        q.set_ready(true);
        assert!(ring_fits(&q, &mem, true));
        assert!(!ring_fits(&q, &mem, false));
        q.set_used_ring_address(Some(0x1000), Some(0));
        assert!(!ring_fits(&q, &mem, true), "device event area outside memory");
    }
}

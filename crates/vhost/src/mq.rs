//! Multiqueue (VIRTIO_NET_F_MQ) for vhost-user-net ports: what a port with several queue pairs
//! offers. The ring storage lives in [`NetDevice`] (two rings per pair, see
//! [`NetDevice::with_queue_pairs`]); the backend answers GET_QUEUE_NUM and the config space's
//! `max_virtqueue_pairs` from it.
//!
//! VIRTIO_NET_F_MQ is offered only with more than one pair: a single-queue port offers exactly
//! what it did before. RSS and HASH_REPORT are not offered: with vhost-user, QEMU keeps the
//! control virtqueue to itself (the backend never sees VIRTIO_NET_CTRL_MQ_RSS_CONFIG), so a guest
//! could not program an indirection table or key through vmq; vmq spreads flows over the
//! enabled RX rings with its own symmetric 5-tuple hash (`vmq_wire::flow`) instead.

use virtio_bindings::virtio_net::VIRTIO_NET_F_MQ;

use crate::device::NetDevice;

/// The virtio features the port offers: the configuration's (`configured`), plus MQ when the
/// device has more than one queue pair.
pub fn offered_features(configured: u64, device: &NetDevice) -> u64 {
    let mut bits = configured;
    if device.queue_pairs() > 1 {
        bits |= 1 << VIRTIO_NET_F_MQ;
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{NetBackend, NetDeviceConfig};
    use crate::device::MAX_QUEUE_PAIRS;
    use vhost::vhost_user::VhostUserBackendReqHandlerMut;
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vmq_wire::MacAddr;

    fn backend(pairs: u16) -> NetBackend {
        let config = NetDeviceConfig {
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            mtu: 1500,
            offloads: true,
            trust_unsealed_memory: false,
        };
        NetBackend::new(config, NetDevice::with_queue_pairs(pairs), Box::new(|_| {}))
    }

    #[test]
    fn one_pair_offers_no_mq() {
        let mut b = backend(1);
        assert_eq!(b.get_features().unwrap() & (1 << VIRTIO_NET_F_MQ), 0);
        assert_eq!(b.get_queue_num().unwrap(), 1);
        assert!(b.set_vring_num(2, 256).is_err(), "ring 2 belongs to a second pair");
    }

    #[test]
    fn four_pairs_offer_mq_and_eight_rings() {
        let mut b = backend(4);
        let features = b.get_features().unwrap();
        assert_ne!(features & (1 << VIRTIO_NET_F_MQ), 0);
        assert_eq!(b.get_queue_num().unwrap(), 4);
        let c = b.get_config(8, 2, VhostUserConfigFlags::empty()).unwrap();
        assert_eq!(u16::from_le_bytes([c[0], c[1]]), 4, "max_virtqueue_pairs");
        for ring in 0..8 {
            assert!(b.set_vring_num(ring, 256).is_ok(), "ring {ring}");
        }
        assert!(b.set_vring_num(8, 256).is_err());
        assert!(b.set_vring_enable(7, true).is_ok());
        assert!(b.set_vring_enable(8, true).is_err());
        // The frontend may ack MQ (it was offered).
        b.set_features(features).unwrap();
    }

    #[test]
    fn pairs_are_clamped_to_the_supported_range() {
        assert_eq!(NetDevice::with_queue_pairs(0).queue_pairs(), 1);
        assert_eq!(NetDevice::with_queue_pairs(99).queue_pairs(), MAX_QUEUE_PAIRS);
        assert_eq!(NetDevice::with_queue_pairs(16).num_rings(), 32);
    }
}

#[cfg(test)]
mod ring_events {
    use std::fs::File;
    use std::sync::{Arc, Mutex};

    use vhost::vhost_user::VhostUserBackendReqHandlerMut;
    use virtio_queue::QueueT;
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmq_wire::MacAddr;

    use crate::backend::{DeviceEvent, NetBackend, NetDeviceConfig, offered_protocol_features};
    use crate::device::NetDevice;

    /// A further pair's rings start after the first pair runs (QEMU starts pair by pair) and
    /// come and go with the guest's `ethtool -L`: the data path hears of each change (its TX
    /// task must pick up the ring's kick fd), and a one-pair device's events stay as they were.
    #[test]
    fn a_further_pair_coming_and_going_while_the_device_runs_is_reported() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let device = NetDevice::with_queue_pairs(2);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        device.mem.lock().unwrap().replace(mem);
        let config = NetDeviceConfig {
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            mtu: 1500,
            offloads: false,
            trust_unsealed_memory: false,
        };
        let mut b = NetBackend::new(config, device.clone(), Box::new(move |e| seen.lock().unwrap().push(e)));
        b.set_protocol_features(offered_protocol_features().bits()).unwrap();
        for ring in 0..4u64 {
            let base = ring * 0x1000;
            let mut v = device.vring(ring as usize);
            v.queue.set_size(16);
            v.queue.set_desc_table_address(Some(base as u32), Some(0));
            v.queue.set_avail_ring_address(Some((base + 0x200) as u32), Some(0));
            v.queue.set_used_ring_address(Some((base + 0x400) as u32), Some(0));
            let kick = File::from(std::os::fd::OwnedFd::from(nix::sys::eventfd::EventFd::new().unwrap()));
            v.kick = Some(kick);
        }
        let take = || std::mem::take(&mut *events.lock().unwrap());
        let layout = device.ring_layout();
        b.set_vring_enable(0, true).unwrap();
        b.set_vring_enable(1, true).unwrap();
        assert_eq!(take(), vec![DeviceEvent::Started]);
        assert_ne!(device.ring_layout(), layout);
        b.set_vring_enable(2, true).unwrap();
        b.set_vring_enable(3, true).unwrap();
        assert_eq!(take(), vec![DeviceEvent::RingsChanged, DeviceEvent::RingsChanged]);
        assert_eq!(device.live_rings(), 0b1111);
        let layout = device.ring_layout();
        b.set_vring_enable(3, false).unwrap();
        assert_eq!(take(), vec![DeviceEvent::RingsChanged]);
        assert_ne!(device.ring_layout(), layout);
        b.set_vring_enable(3, false).unwrap();
        assert_eq!(take(), vec![], "nothing changed");
        b.set_vring_enable(0, false).unwrap();
        assert_eq!(take(), vec![DeviceEvent::Stopped]);
    }
}

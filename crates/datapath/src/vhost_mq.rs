//! Multiqueue (VIRTIO_NET_F_MQ) vhost-user-net ports on the data path: the RX side.
//!
//! A port with `queues = N` has N queue pairs. Each pair's TX ring is a
//! [`crate::vhost::VhostTxSource`] of its own, i.e. a task of its own that the workers share out
//! (the TX rings of one VM are served by different workers). Frames *to* the VM go through one
//! sink per RX ring, a lane of the port ([`crate::port::PortSinks`]) with a lock of its own: the
//! worker picks the lane a frame's flow hashes to ([`crate::port::lane_pick`], the uplink's
//! flow pick) among the live ones ([`VhostLiveLanes`]), so all frames of one flow land on one
//! guest RX queue, in order, and two workers fill two RX queues of one VM side by side. Rings
//! the guest has not enabled (fewer combined channels than pairs, `ethtool -L`) are left out of
//! the pick. [`VhostMqRxSink::new`] (every ring in one sink, hashing itself) stays for tests.
//!
//! One-pair ports keep [`crate::vhost::VhostRxSink`] unchanged.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vm_memory::GuestAddressSpace;
use vmq_core::{DropReason, OffloadCaps};
use vmq_vhost::{DirtyLog, NetDevice, RX_QUEUE};
use vmq_wire::VnetHdr;

use crate::attach::QueueCounters;
use crate::guest_ring::{DeviceRing, guest_caps, push_logged};
use crate::port::{FrameSink, FrameWriter, GuestRxWriter, GuestTail, Refuse};
use crate::ring::{Ring, RingError, RingState};
use crate::virtio::{RxWriter, VirtioError};

/// The guest's RX rings of a multiqueue port.
pub struct VhostMqRxSink {
    device: Arc<NetDevice>,
    /// Pair `p`'s RX ring is `rings[p]` (virtqueue `2p`).
    rings: Vec<DeviceRing>,
    writer: RxWriter,
    counters: Arc<QueueCounters>,
}

impl VhostMqRxSink {
    pub fn new(device: Arc<NetDevice>, counters: Arc<QueueCounters>) -> VhostMqRxSink {
        let pairs: Vec<u16> = (0..device.queue_pairs()).collect();
        VhostMqRxSink::for_pairs(device, counters, &pairs)
    }

    /// The sink of pair `pair`'s RX ring alone: one lane of the port.
    pub fn lane(device: Arc<NetDevice>, counters: Arc<QueueCounters>, pair: u16) -> VhostMqRxSink {
        VhostMqRxSink::for_pairs(device, counters, &[pair])
    }

    fn for_pairs(device: Arc<NetDevice>, counters: Arc<QueueCounters>, pairs: &[u16]) -> VhostMqRxSink {
        let rings = pairs.iter().map(|&p| DeviceRing::new(RX_QUEUE + 2 * usize::from(p))).collect();
        VhostMqRxSink { device, rings, writer: RxWriter::new(false), counters }
    }
}

/// Which RX rings of a multiqueue device are live, as a lane mask: re-read from the device
/// (one ring lock each) only when its ring layout changed, else two atomic loads.
pub struct VhostLiveLanes {
    device: Arc<NetDevice>,
    /// The ring layout the mask was read at, plus one (0: never read).
    seen: std::sync::atomic::AtomicU64,
    mask: std::sync::atomic::AtomicU32,
}

impl VhostLiveLanes {
    pub fn new(device: Arc<NetDevice>) -> VhostLiveLanes {
        VhostLiveLanes { device, seen: Default::default(), mask: Default::default() }
    }
}

impl crate::port::LiveLanes for VhostLiveLanes {
    fn live(&self) -> u32 {
        let layout = self.device.ring_layout().wrapping_add(1);
        if self.seen.load(Ordering::Acquire) == layout {
            return self.mask.load(Ordering::Relaxed);
        }
        let rings = self.device.live_rings();
        // RX ring of pair p is ring 2p.
        let mask = (0..u32::from(self.device.queue_pairs()))
            .filter(|p| rings & (1 << (2 * p + RX_QUEUE as u32)) != 0)
            .fold(0u32, |m, p| m | (1 << p));
        self.mask.store(mask, Ordering::Relaxed);
        self.seen.store(layout, Ordering::Release);
        mask
    }
}

/// One RX ring opened for the batch.
struct OpenRing<'r, 'm> {
    /// Index into the sink's rings.
    pair: usize,
    /// The queue pair the ring belongs to.
    queue_pair: usize,
    ring: Ring<'r, 'm>,
    log: Option<Arc<DirtyLog>>,
    used: bool,
    frames: u64,
}

struct MqBatch<'a, 'r, 'm> {
    rings: &'a mut [OpenRing<'r, 'm>],
    /// 0..rings.len(): the pick's choices.
    choices: &'a [usize],
    writer: &'a mut RxWriter,
}

/// The first bytes of a frame given in parts (the headers the flow hash reads): `parts[0]`
/// when it holds them, else a copy of up to 128 bytes into `buf` (a VLAN edit splits the head).
fn frame_head<'b>(parts: &[&'b [u8]], buf: &'b mut [u8; 128]) -> &'b [u8] {
    match parts.first() {
        Some(first) if first.len() >= buf.len() || parts.len() == 1 => first,
        _ => {
            let mut n = 0;
            for part in parts {
                let take = part.len().min(buf.len() - n);
                buf[n..n + take].copy_from_slice(&part[..take]);
                n += take;
                if n == buf.len() {
                    break;
                }
            }
            &buf[..n]
        }
    }
}

impl GuestRxWriter for MqBatch<'_, '_, '_> {
    fn push(&mut self, hdr: &VnetHdr, parts: &[&[u8]], tail: Option<&GuestTail>) -> Result<(), DropReason> {
        let mut buf = [0u8; 128];
        let head = frame_head(parts, &mut buf);
        let k = *self.choices.get(crate::port::lane_pick(head, self.choices.len())).ok_or(DropReason::PortDown)?;
        let open = self.rings.get_mut(k).ok_or(DropReason::PortDown)?;
        let result = push_logged(self.writer, &mut open.ring, open.log.as_deref(), &mut open.used, (hdr, parts, tail));
        if result.is_ok() {
            open.frames += 1;
        }
        result.map_err(VirtioError::drop_reason)
    }
}

impl FrameSink for VhostMqRxSink {
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason> {
        let mut result = Err(DropReason::PortDown);
        self.batch(&mut |w| result = w.send(hdr, parts));
        result
    }

    fn flush(&mut self) {}

    /// Every live RX ring stays open and locked for the whole batch (the protocol thread takes
    /// one ring lock at a time, so holding several cannot deadlock); one interrupt per ring at
    /// most.
    fn batch(&mut self, write: &mut dyn FnMut(&mut dyn FrameWriter)) {
        self.writer.mrg_rxbuf = vmq_vhost_has(self.device.acked_features(), VIRTIO_NET_F_MRG_RXBUF);
        let device = &*self.device;
        let generation = device.generation();
        let mem = device.mem.memory().into_inner();
        // Lock the live rings, in ring order.
        let mut live = Vec::with_capacity(self.rings.len());
        let mut any_broken = false;
        for (pair, dr) in self.rings.iter_mut().enumerate() {
            let vring = device.vring(dr.index);
            if !vring.is_live() {
                continue;
            }
            if generation != dr.generation || vring.stops != dr.stops || dr.state.is_none() {
                dr.generation = generation;
                dr.stops = vring.stops;
                dr.state = Some(RingState::from_device_queue(&vring.queue, device.acked_features()));
            }
            let Some(state) = dr.state.as_mut() else { continue };
            if state.is_broken() {
                any_broken = true;
                continue;
            }
            live.push((pair, dr.index / 2, vring, state));
        }
        let mut signal = Vec::new();
        {
            let mut open = Vec::with_capacity(live.len());
            for (pair, queue_pair, vring, state) in live.iter_mut() {
                let log = vring.dirty_log.clone();
                match Ring::open(&mem, state) {
                    Ok(ring) => {
                        open.push(OpenRing { pair: *pair, queue_pair: *queue_pair, ring, log, used: false, frames: 0 })
                    }
                    Err(RingError::Broken) => any_broken = true,
                    Err(_) => {
                        any_broken = true;
                        tracing::warn!(
                            queue = *queue_pair * 2,
                            "guest broke an RX ring; not served until it resets it"
                        );
                    }
                }
            }
            if open.is_empty() {
                let reason = if any_broken { DropReason::RingBroken } else { DropReason::PortDown };
                write(&mut Refuse(reason));
            } else {
                let choices: Vec<usize> = (0..open.len()).collect();
                let mut batch = MqBatch { rings: &mut open, choices: &choices, writer: &mut self.writer };
                write(&mut batch);
                for o in open.iter_mut() {
                    o.ring.publish();
                    if o.used && o.ring.needs_notification() {
                        signal.push(o.pair);
                    }
                    if o.frames > 0
                        && let Some(c) = self.counters.rx_frames.get(o.queue_pair)
                    {
                        c.fetch_add(o.frames, Ordering::Relaxed);
                    }
                }
            }
        }
        for (_, _, vring, state) in live.iter_mut() {
            if let Some(log) = &vring.dirty_log {
                // The whole used ring, as the single-queue sink does.
                for (addr, len) in state.device_written_areas() {
                    log.mark(addr, len);
                }
            }
            state.store_position(&mut vring.queue);
        }
        // Interrupts after the ring locks are released, as the single-queue sink does.
        drop(live);
        for pair in signal {
            device.vring(self.rings[pair].index).signal_guest();
        }
    }

    fn caps(&self) -> OffloadCaps {
        guest_caps(self.device.acked_features())
    }
}

fn vmq_vhost_has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{BufferSpec, SplitRingDriver};
    use crate::ring::Memory;
    use vm_memory::GuestAddress;

    /// A UDP/IPv4 frame of flow `sport -> 53`.
    fn udp_frame(sport: u16) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
        f.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&53u16.to_be_bytes());
        f.extend_from_slice(&[0, 8, 0, 0]);
        f.resize(60, 0);
        f
    }

    /// A two-pair device whose RX rings (0 and 2) a driver set up and filled with buffers.
    fn two_pair_device() -> (Arc<NetDevice>, Arc<Memory>, Vec<SplitRingDriver>) {
        let device = NetDevice::with_queue_pairs(2);
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let mut drivers = Vec::new();
        for (pair, base) in [(0usize, 0u64), (1, 0x1_0000)] {
            let (mut driver, _) = SplitRingDriver::new(64, GuestAddress(base));
            driver.init(&mem).unwrap();
            for i in 0..64u64 {
                let addr = GuestAddress(0x10_0000 + (pair as u64 * 64 + i) * 0x800);
                driver.add_chain(&mem, &[BufferSpec { addr, len: 0x800, device_writes: true }]).unwrap();
            }
            driver.publish(&mem);
            let mut vring = device.vring(RX_QUEUE + 2 * pair);
            driver.configure(&mut vring.queue);
            vring.started = true;
            vring.enabled = true;
            drivers.push(driver);
        }
        device.mem.lock().unwrap().replace(mem);
        let mem = device.mem.memory().into_inner();
        (device, mem, drivers)
    }

    fn ring_of_each(drivers: &mut [SplitRingDriver], mem: &Memory) -> Vec<usize> {
        drivers.iter_mut().map(|d| std::iter::from_fn(|| d.pop_used(mem)).count()).collect()
    }

    #[test]
    fn flows_spread_over_the_enabled_rx_rings_and_a_flow_keeps_its_ring() {
        let (device, mem, mut drivers) = two_pair_device();
        let counters = QueueCounters::new(2);
        let mut sink = VhostMqRxSink::new(device.clone(), counters.clone());
        let mut expected = [0usize; 2];
        for sport in 1000..1032u16 {
            let frame = udp_frame(sport);
            assert_eq!(sink.send(&VnetHdr::default(), &[&frame]), Ok(()));
            expected[crate::port::lane_pick(&frame, 2)] += 1;
        }
        assert!(expected[0] > 0 && expected[1] > 0, "32 flows all hash to one ring: {expected:?}");
        assert_eq!(ring_of_each(&mut drivers, &mem), expected.to_vec(), "frames not on their flow's ring");
        assert_eq!(counters.rx(), vec![expected[0] as u64, expected[1] as u64]);
        // One flow, many frames, in one batch: all on its ring.
        let frame = udp_frame(1000);
        let ring = crate::port::lane_pick(&frame, 2);
        sink.batch(&mut |w| {
            for _ in 0..10 {
                w.send(&VnetHdr::default(), &[&frame[..20], &frame[20..]]).unwrap();
            }
        });
        let mut got = ring_of_each(&mut drivers, &mem);
        assert_eq!(got.remove(ring), 10, "a flow split over rings (head given in two parts)");
        assert_eq!(got, vec![0]);
    }

    #[test]
    fn a_disabled_pair_gets_nothing_and_no_live_ring_drops_as_port_down() {
        let (device, mem, mut drivers) = two_pair_device();
        let mut sink = VhostMqRxSink::new(device.clone(), QueueCounters::new(2));
        device.vring(2).enabled = false; // the guest runs one combined channel
        for sport in 1000..1016u16 {
            assert_eq!(sink.send(&VnetHdr::default(), &[&udp_frame(sport)]), Ok(()));
        }
        assert_eq!(ring_of_each(&mut drivers, &mem), vec![16, 0]);
        device.vring(0).enabled = false;
        assert_eq!(sink.send(&VnetHdr::default(), &[&udp_frame(1)]), Err(DropReason::PortDown));
    }
}

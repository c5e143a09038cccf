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
//! the pick.
//!
//! One-pair ports keep [`crate::vhost::VhostRxSink`] unchanged.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vmq_core::{DropReason, OffloadCaps};
use vmq_vhost::{DirtyLog, NetDevice, RX_QUEUE};
use vmq_wire::VnetHdr;

use crate::attach::QueueCounters;
use crate::guest_ring::{DeviceRing, Unserved, guest_caps, has, push_logged};
use crate::port::{FrameSink, FrameWriter, GuestRxWriter, GuestTail, Refuse};
use crate::ring::Ring;
use crate::virtio::{RxWriter, VirtioError};

/// One guest RX ring of a multiqueue port: a lane of the port.
pub struct VhostMqRxSink {
    device: Arc<NetDevice>,
    /// Pair `pair`'s RX ring (virtqueue `2 * pair`).
    ring: DeviceRing,
    pair: usize,
    writer: RxWriter,
    counters: Arc<QueueCounters>,
    /// Frames the next batch carries (see [`FrameSink::expect_frames`]).
    batch_frames: usize,
}

impl VhostMqRxSink {
    /// The sink of pair `pair`'s RX ring alone: one lane of the port.
    pub fn lane(device: Arc<NetDevice>, counters: Arc<QueueCounters>, pair: u16) -> VhostMqRxSink {
        let pair = usize::from(pair);
        let ring = DeviceRing::new(RX_QUEUE + 2 * pair);
        VhostMqRxSink { device, ring, pair, writer: RxWriter::new(false), counters, batch_frames: 1 }
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

/// The lane's RX ring opened for one batch.
struct LaneBatch<'a, 'r, 'm> {
    ring: &'a mut Ring<'r, 'm>,
    writer: &'a mut RxWriter,
    /// While a live migration runs: the buffers of every frame written are marked.
    log: Option<&'a DirtyLog>,
    /// Chains were used (frames written, or bad chains handed back): the guest needs to know.
    used: bool,
    /// Frames written, for the pair's counter.
    frames: u64,
}

impl GuestRxWriter for LaneBatch<'_, '_, '_> {
    fn push(&mut self, hdr: &VnetHdr, parts: &[&[u8]], tail: Option<&GuestTail>) -> Result<(), DropReason> {
        let result = push_logged(self.writer, self.ring, self.log, &mut self.used, (hdr, parts, tail));
        if result.is_ok() {
            self.frames += 1;
        }
        result.map_err(VirtioError::drop_reason)
    }
}

impl FrameSink for VhostMqRxSink {
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason> {
        let mut result = Err(DropReason::PortDown);
        self.batch_frames = 1;
        self.batch(&mut |w| result = w.send(hdr, parts));
        result
    }

    fn flush(&mut self) {}

    fn expect_frames(&mut self, frames: usize) {
        self.batch_frames = frames;
    }

    /// The RX ring stays open and locked for the whole batch; one interrupt at most.
    fn batch(&mut self, write: &mut dyn FnMut(&mut dyn FrameWriter)) {
        self.writer.mrg_rxbuf = has(self.device.acked_features(), VIRTIO_NET_F_MRG_RXBUF);
        let writer = &mut self.writer;
        let counter = self.counters.rx_frames.get(self.pair);
        let was_broken = self.ring.is_broken();
        let frames = std::mem::replace(&mut self.batch_frames, 1);
        let notify = self.ring.with_memory(&self.device, |ring, _, log| {
            ring.expect_chains(frames);
            let mut batch = LaneBatch { ring, writer, log, used: false, frames: 0 };
            write(&mut batch);
            let (used, frames) = (batch.used, batch.frames);
            ring.publish();
            if frames > 0
                && let Some(c) = counter
            {
                c.fetch_add(frames, Ordering::Relaxed);
            }
            used && ring.needs_notification()
        });
        match notify {
            // Not enabled or not running: the frames are dropped and counted.
            Err(Unserved::NotLive) => write(&mut Refuse(DropReason::PortDown)),
            Err(Unserved::Broken { .. }) => write(&mut Refuse(DropReason::RingBroken)),
            Ok(_) => {}
        }
        if !was_broken && self.ring.is_broken() {
            tracing::warn!(queue = self.ring.index, "guest broke an RX ring; not served until it resets it");
        }
        // After the ring lock is released, as the single-queue sink does.
        if notify == Ok(true) {
            self.ring.signal(&self.device);
        }
    }

    fn caps(&self) -> OffloadCaps {
        guest_caps(self.device.acked_features())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::driver::{BufferSpec, SplitRingDriver};
    use crate::port::{LiveLanes, PortSinks, lane_pick};
    use crate::ring::Memory;
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    use vmq_vhost::{NetBackend, NetDeviceConfig};

    /// A UDP/IPv4 frame of flow `sport -> 53`, `seq` in its payload.
    fn udp_frame(sport: u16, seq: u8) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
        f.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&53u16.to_be_bytes());
        f.extend_from_slice(&[0, 8, 0, 0, seq]);
        f.resize(60, 0);
        f
    }

    /// A guest driver's RX ring: the frames the device wrote are read back from its buffers.
    struct GuestRxRing {
        driver: SplitRingDriver,
        buf_of_chain: HashMap<u16, GuestAddress>,
    }

    impl GuestRxRing {
        /// The frames written since the last call, in ring order.
        fn received(&mut self, mem: &Memory) -> Vec<Vec<u8>> {
            let used: Vec<(u16, u32)> = std::iter::from_fn(|| self.driver.pop_used(mem)).collect();
            used.into_iter()
                .map(|(head, len)| {
                    let mut buf = vec![0u8; len as usize];
                    mem.read_slice(&mut buf, self.buf_of_chain[&head]).unwrap();
                    buf.split_off(VnetHdr::LEN)
                })
                .collect()
        }
    }

    /// A two-pair device whose RX rings (0 and 2) a driver set up, pair `p` with `buffers[p]`
    /// buffers posted; its lane sinks gathered as the attachment does, and its backend, through
    /// which the guest enables and disables rings.
    struct TwoPairPort {
        device: Arc<NetDevice>,
        mem: Arc<Memory>,
        rx: Vec<GuestRxRing>,
        sinks: PortSinks,
        counters: Arc<QueueCounters>,
        backend: NetBackend,
    }

    fn two_pair_port(buffers: [u64; 2]) -> TwoPairPort {
        let device = NetDevice::with_queue_pairs(2);
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let mut rx = Vec::new();
        for (pair, base) in [(0usize, 0u64), (1, 0x1_0000)] {
            let (mut driver, _) = SplitRingDriver::new(64, GuestAddress(base));
            driver.init(&mem).unwrap();
            let mut buf_of_chain = HashMap::new();
            for i in 0..buffers[pair] {
                let addr = GuestAddress(0x10_0000 + (pair as u64 * 64 + i) * 0x800);
                let head = driver.add_chain(&mem, &[BufferSpec { addr, len: 0x800, device_writes: true }]).unwrap();
                buf_of_chain.insert(head, addr);
            }
            driver.publish(&mem);
            let mut vring = device.vring(RX_QUEUE + 2 * pair);
            driver.configure(&mut vring.queue);
            vring.started = true;
            vring.enabled = true;
            rx.push(GuestRxRing { driver, buf_of_chain });
        }
        device.mem.lock().unwrap().replace(mem);
        let mem = device.mem.memory().into_inner();
        let counters = QueueCounters::new(2);
        let lanes: Vec<Box<dyn FrameSink>> =
            (0..2).map(|pair| Box::new(VhostMqRxSink::lane(device.clone(), counters.clone(), pair)) as _).collect();
        let live: Arc<dyn LiveLanes> = Arc::new(VhostLiveLanes::new(device.clone()));
        let sinks = PortSinks::lanes(lanes, Some(live));
        let config = NetDeviceConfig {
            mac: vmq_wire::MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            mtu: 1500,
            offloads: false,
            trust_unsealed_memory: false,
        };
        let backend = NetBackend::new(config, device.clone(), Box::new(|_| {}));
        TwoPairPort { device, mem, rx, sinks, counters, backend }
    }

    /// Delivers `frames` as the engine's worker does (`deliver_to_lanes`): each to the lane its
    /// flow picks among the live ones, one batch per lane. Returns the drops.
    fn deliver(sinks: &PortSinks, frames: &[Vec<u8>]) -> Vec<DropReason> {
        let mut live = Vec::new();
        sinks.live_lanes(&mut live);
        if live.is_empty() {
            return vec![DropReason::PortDown; frames.len()];
        }
        let mut drops = Vec::new();
        for &lane in &live {
            let mut sink = sinks.lane(usize::from(lane)).unwrap().lock().unwrap();
            sink.batch(&mut |w| {
                for frame in frames.iter().filter(|f| live[lane_pick(f, live.len())] == lane) {
                    if let Err(reason) = w.send(&VnetHdr::default(), &[frame]) {
                        drops.push(reason);
                    }
                }
            });
        }
        drops
    }

    #[test]
    fn flows_spread_over_the_lanes_and_each_frame_reaches_its_lanes_rx_ring() {
        let mut port = two_pair_port([64, 64]);
        let frames: Vec<Vec<u8>> = (1000..1032u16).map(|sport| udp_frame(sport, 0)).collect();
        assert_eq!(deliver(&port.sinks, &frames), vec![]);
        let got: Vec<Vec<Vec<u8>>> = port.rx.iter_mut().map(|r| r.received(&port.mem)).collect();
        // Read back, not counted: a lane writing its neighbour's ring would fail here.
        for (ring, frames) in got.iter().enumerate() {
            assert!(!frames.is_empty(), "32 flows, none on ring {ring}");
            for f in frames {
                assert_eq!(lane_pick(f, 2), ring, "a frame on another lane's RX ring");
            }
        }
        assert_eq!(got[0].len() + got[1].len(), frames.len());
        assert_eq!(port.counters.rx(), vec![got[0].len() as u64, got[1].len() as u64]);
        // One flow, many frames, in one delivery: all on its ring, in order.
        let flow: Vec<Vec<u8>> = (0..10u8).map(|seq| udp_frame(1000, seq)).collect();
        assert_eq!(deliver(&port.sinks, &flow), vec![]);
        let ring = lane_pick(&flow[0], 2);
        assert_eq!(port.rx[ring].received(&port.mem), flow, "a flow's frames lost, reordered or split");
        assert_eq!(port.rx[1 - ring].received(&port.mem), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn a_disabled_pair_is_left_out_of_the_pick_and_no_live_lane_drops_as_port_down() {
        let mut port = two_pair_port([64, 64]);
        let frames: Vec<Vec<u8>> = (1000..1016u16).map(|sport| udp_frame(sport, 0)).collect();
        assert_eq!(deliver(&port.sinks, &frames), vec![]);
        assert!(!port.rx[1].received(&port.mem).is_empty(), "16 flows, none on ring 1");
        port.rx[0].received(&port.mem);
        // The guest runs one combined channel now: the live lanes follow.
        port.backend.enable_vring(2, false).unwrap();
        assert_eq!(deliver(&port.sinks, &frames), vec![]);
        assert_eq!(port.rx[0].received(&port.mem).len(), 16);
        assert_eq!(port.rx[1].received(&port.mem).len(), 0);
        port.backend.enable_vring(0, false).unwrap();
        let mut live = Vec::new();
        port.sinks.live_lanes(&mut live);
        assert_eq!(live, Vec::<u8>::new(), "a disabled ring still in the pick");
        assert_eq!(deliver(&port.sinks, &frames), vec![DropReason::PortDown; 16]);
        assert_eq!(port.rx[0].received(&port.mem).len(), 0);
    }

    #[test]
    fn a_lane_whose_ring_stopped_after_the_pick_drops_as_port_down() {
        let mut port = two_pair_port([64, 64]);
        let frames: Vec<Vec<u8>> = (1000..1032u16).map(|sport| udp_frame(sport, 0)).collect();
        let to_lane_0 = frames.iter().filter(|f| lane_pick(f, 2) == 0).count();
        assert!(to_lane_0 > 0, "32 flows, none on lane 0");
        assert_eq!(deliver(&port.sinks, &frames), vec![]);
        assert_eq!(port.rx[0].received(&port.mem).len(), to_lane_0);
        assert_eq!(port.rx[1].received(&port.mem).len(), frames.len() - to_lane_0);
        // Disabled without a layout change yet: the live lanes (read before the lane's lock)
        // still show ring 0, and its sink finds the ring not live.
        port.device.vring(RX_QUEUE).enabled = false;
        assert_eq!(deliver(&port.sinks, &frames), vec![DropReason::PortDown; to_lane_0]);
        assert_eq!(port.rx[0].received(&port.mem).len(), 0);
        assert_eq!(port.rx[1].received(&port.mem).len(), frames.len() - to_lane_0);
        let to_lane_1 = (frames.len() - to_lane_0) as u64;
        assert_eq!(port.counters.rx(), vec![to_lane_0 as u64, 2 * to_lane_1]);
    }

    #[test]
    fn a_full_rx_ring_drops_its_lanes_frames_as_no_buffer_and_the_other_lane_still_delivers() {
        // Pair 1's guest posted 4 buffers only.
        let mut port = two_pair_port([64, 4]);
        let frames: Vec<Vec<u8>> = (1000..1032u16).map(|sport| udp_frame(sport, 0)).collect();
        let to_lane_1 = frames.iter().filter(|f| lane_pick(f, 2) == 1).count();
        assert!(to_lane_1 > 4, "too few flows on lane 1 to fill its ring: {to_lane_1}");
        assert_eq!(deliver(&port.sinks, &frames), vec![DropReason::NoBuffer; to_lane_1 - 4]);
        assert_eq!(port.rx[0].received(&port.mem).len(), frames.len() - to_lane_1);
        assert_eq!(port.rx[1].received(&port.mem).len(), 4);
        assert_eq!(port.counters.rx(), vec![(frames.len() - to_lane_1) as u64, 4]);
    }
}

//! An in-process stand-in for a NIC, for tests and `vmq bench`. Its RX queues replay frames that
//! "arrived from the wire" from host memory, handing buffers over without a copy (as a NIC DMAs
//! into host buffers); in `vmq` mode each VM queue holds only its VM's frames, as a NIC with VMQ
//! filters would sort them, and in `switch` mode everything comes on the default queue. Its TX
//! side discards (the wire), after vmq has counted the frames.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmq_core::vmq::{FilterKey, QueueId};
use vmq_core::{DropReason, OffloadCaps};
use vmq_wire::VnetHdr;

use crate::port::{FrameSink, FrameSource, NicSteering, RecvError, Scratch};

/// A UDP/IPv4 frame of `len` bytes (no FCS; at least the headers), tagged if `tag`; `flow`
/// picks the source port. What the stand-in's wire and the tests send.
pub fn udp_frame(dst: vmq_wire::MacAddr, src: vmq_wire::MacAddr, tag: Option<u16>, len: usize, flow: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    if let Some(t) = tag {
        f.extend_from_slice(&vmq_wire::ethernet::ETHERTYPE_VLAN.to_be_bytes());
        f.extend_from_slice(&t.to_be_bytes());
    }
    // The IP header starts after the EtherType.
    let l3 = f.len() + 2;
    let ip_len = len.saturating_sub(l3).max(28);
    let b = etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(1000 + flow, 5201);
    let payload = vec![0x5a; ip_len - 28];
    f.extend_from_slice(&vmq_wire::ethernet::ETHERTYPE_IPV4.to_be_bytes());
    let mut ip = Vec::new();
    if b.write(&mut ip, &payload).is_ok() {
        f.extend_from_slice(&ip);
    }
    f.truncate(len.max(l3));
    f
}

fn with_zero_hdr(f: &[u8]) -> Arc<[u8]> {
    let mut v = Vec::with_capacity(VnetHdr::LEN + f.len());
    v.extend_from_slice(&VnetHdr::default().to_bytes());
    v.extend_from_slice(f);
    Arc::from(v.into_boxed_slice())
}

/// A NIC whose RX queues replay the traffic of a set of flows, sorted by VMQ filters it is
/// given at run time ([`NicSteering`]): frames whose (dst MAC, VLAN) matches a queue's filter
/// arrive on that queue, the rest on the default queue, interleaved as on the wire.
#[derive(Clone)]
pub struct StandInNic {
    shared: Arc<NicShared>,
}

struct NicShared {
    flows: Vec<(FilterKey, Vec<Arc<[u8]>>)>,
    filters: Mutex<HashMap<QueueId, FilterKey>>,
    generation: AtomicU64,
}

impl StandInNic {
    /// `flows`: for each destination (MAC, VLAN), the Ethernet frames addressed to it.
    pub fn new(flows: Vec<(FilterKey, Vec<Vec<u8>>)>) -> StandInNic {
        let flows = flows.into_iter().map(|(k, fs)| (k, fs.iter().map(|f| with_zero_hdr(f)).collect())).collect();
        StandInNic {
            shared: Arc::new(NicShared { flows, filters: Mutex::new(HashMap::new()), generation: AtomicU64::new(1) }),
        }
    }

    /// RX queue `queue` (`QueueId::DEFAULT` for the default queue).
    pub fn queue(&self, queue: QueueId) -> StandInQueue {
        StandInQueue { shared: self.shared.clone(), queue, seen: 0, frames: Vec::new(), next: 0 }
    }

    pub fn steering(&self) -> StandInNic {
        self.clone()
    }
}

impl NicSteering for StandInNic {
    fn set_filter(&mut self, queue: QueueId, filter: Option<FilterKey>) {
        let mut filters = self.shared.filters.lock().unwrap_or_else(|e| e.into_inner());
        match filter {
            Some(f) => filters.insert(queue, f),
            None => filters.remove(&queue),
        };
        self.shared.generation.fetch_add(1, Ordering::Release);
    }

    fn spreads_flows(&self) -> bool {
        true
    }
}

/// One RX queue of a [`StandInNic`].
pub struct StandInQueue {
    shared: Arc<NicShared>,
    queue: QueueId,
    seen: u64,
    frames: Vec<Arc<[u8]>>,
    next: usize,
}

impl StandInQueue {
    /// Re-reads the filters: which frames this queue now receives.
    fn refresh(&mut self) {
        let filters = self.shared.filters.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.frames.clear();
        self.next = 0;
        if self.queue == QueueId::DEFAULT {
            let unfiltered: Vec<&Vec<Arc<[u8]>>> =
                self.shared.flows.iter().filter(|(k, _)| !filters.values().any(|f| f == k)).map(|(_, fs)| fs).collect();
            let longest = unfiltered.iter().map(|fs| fs.len()).max().unwrap_or(0);
            for i in 0..longest {
                for fs in &unfiltered {
                    if let Some(f) = fs.get(i) {
                        self.frames.push(f.clone());
                    }
                }
            }
        } else if let Some(key) = filters.get(&self.queue)
            && let Some((_, fs)) = self.shared.flows.iter().find(|(k, _)| k == key)
        {
            // Queues sharing a filter share its flows (VMQ with several queues per VM, as a
            // NIC's RSS within a VMMQ vPort): each flow on one of them, by its hash.
            let mut members: Vec<QueueId> = filters.iter().filter(|(_, k)| *k == key).map(|(q, _)| *q).collect();
            members.sort_unstable();
            let me = members.iter().position(|q| *q == self.queue).unwrap_or(0);
            self.frames.extend(
                fs.iter()
                    .filter(|f| spread_index(f.get(VnetHdr::LEN..).unwrap_or_default(), members.len()) == me)
                    .cloned(),
            );
        }
    }
}

impl FrameSource for StandInQueue {
    fn recv(&mut self, scratch: &mut Scratch, max: usize, _errors: &mut Vec<RecvError>) -> usize {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation != self.seen {
            self.seen = generation;
            self.refresh();
        }
        if self.frames.is_empty() {
            return 0;
        }
        let mut n = 0;
        while n < max && scratch.push_shared(self.frames[self.next].clone()) {
            self.next = (self.next + 1) % self.frames.len();
            n += 1;
        }
        n
    }
}

/// Which of `members` queues sharing a filter gets `frame` (Ethernet): the pick of an
/// AF_PACKET uplink's fanout program ([`vmq_sys::steering::flow_index`]).
pub fn spread_index(frame: &[u8], members: usize) -> usize {
    match vmq_wire::ethernet::parse_l2(frame) {
        Ok(l2) => vmq_sys::steering::flow_index(frame.get(l2.header_len..).unwrap_or_default(), l2.ethertype, members),
        Err(_) => 0,
    }
}

/// A source that yields frames given once (tests), then nothing.
pub struct OnceQueue {
    frames: std::collections::VecDeque<Arc<[u8]>>,
}

impl OnceQueue {
    /// `frames`: virtio-net header + Ethernet frame each.
    pub fn new(frames: Vec<Vec<u8>>) -> OnceQueue {
        OnceQueue { frames: frames.into_iter().map(|f| Arc::from(f.into_boxed_slice())).collect() }
    }
}

impl FrameSource for OnceQueue {
    fn recv(&mut self, scratch: &mut Scratch, max: usize, _errors: &mut Vec<RecvError>) -> usize {
        let mut n = 0;
        while n < max {
            let Some(f) = self.frames.pop_front() else {
                break;
            };
            if !scratch.push_shared(f.clone()) {
                self.frames.push_front(f);
                break;
            }
            n += 1;
        }
        n
    }
}

/// Frames a [`WireSink`] kept, for tests to inspect.
pub type KeptFrames = Arc<std::sync::Mutex<Vec<(VnetHdr, Vec<u8>)>>>;

/// The NIC's transmit side: frames leave for the wire. Optionally keeps them (tests).
pub struct WireSink {
    caps: OffloadCaps,
    kept: Option<KeptFrames>,
}

impl WireSink {
    pub fn discard(caps: OffloadCaps) -> WireSink {
        WireSink { caps, kept: None }
    }

    pub fn keeping(caps: OffloadCaps) -> (WireSink, KeptFrames) {
        let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
        (WireSink { caps, kept: Some(kept.clone()) }, kept)
    }
}

impl FrameSink for WireSink {
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason> {
        if let Some(kept) = &self.kept {
            let frame = parts.concat();
            kept.lock().unwrap_or_else(|e| e.into_inner()).push((*hdr, frame));
        }
        Ok(())
    }

    fn flush(&mut self) {}

    fn caps(&self) -> OffloadCaps {
        self.caps
    }
}

#[cfg(test)]
mod spread_tests {
    use super::*;

    #[test]
    fn queues_sharing_a_filter_share_its_flows() {
        let mac = vmq_wire::MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let src = vmq_wire::MacAddr([2, 0, 0, 0, 0, 9]);
        let frames: Vec<Vec<u8>> = (0..64).map(|f| udp_frame(mac, src, Some(10), 60, f)).collect();
        let key = FilterKey { mac, vlan: 10 };
        let nic = StandInNic::new(vec![(key, frames)]);
        let mut steering = nic.steering();
        for q in 1..=3 {
            steering.set_filter(QueueId(q), Some(key));
        }
        let mut got = Vec::new();
        for q in 0..=3 {
            let mut queue = nic.queue(QueueId(q));
            let mut scratch = Scratch::new();
            got.push(queue.recv(&mut scratch, 16, &mut Vec::new()));
        }
        assert_eq!(got[0], 0, "nothing unfiltered");
        assert!(got[1..].iter().all(|&n| n > 0), "each queue sharing the filter gets flows: {got:?}");
    }
}

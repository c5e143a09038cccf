//! Uplink ports over AF_PACKET: the host NIC (or a veth) as vmq's "network adapter" with VM
//! queues. One receive socket per queue in a `PACKET_FANOUT_CBPF` group — socket 0 the default
//! queue, socket k VM queue k — steered in the kernel by the classic-BPF program
//! [`UplinkSteering`] rebuilds whenever the VMQ filters change; one transmit socket.
//!
//! Receive copies each frame once, from the ring into the worker's [`Scratch`] buffer. Linux
//! removes the 802.1Q tag of received frames into metadata; it is put back in the frame here (and
//! the virtio-net header's `csum_start`/`hdr_len` shifted by the 4 tag bytes), since vmq carries
//! VLANs in band.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmq_core::vmq::{FilterKey, QueueId};
use vmq_core::{DropReason, OffloadCaps};
use vmq_sys::packet::{FanoutGroup, PacketError, PacketSocket, RingConfig, TxError};
use vmq_sys::steering::SteeringRule;
use vmq_wire::VnetHdr;
use vmq_wire::vlan::{TAG_LEN, insert_tag_into};
use vmq_wire::vnet::FLAG_NEEDS_CSUM;

use crate::port::{FrameSink, FrameSource, KernelCounters, NicSteering, RecvError, Scratch, Wake};

/// Writes vmq's form of a received frame into `out`: the 12-byte header, then the frame with
/// the removed VLAN tag (`(tpid, tci)`) put back after the MAC addresses. Returns the length, or
/// None when the frame does not fit `out`, is too short to hold MAC addresses, or its header
/// offsets overflow when shifted.
pub fn write_rx_frame(out: &mut [u8], vnet_hdr: &[u8; 12], data: &[u8], vlan: Option<(u16, u16)>) -> Option<usize> {
    let Some((tpid, tci)) = vlan else {
        let len = VnetHdr::LEN + data.len();
        out.get_mut(..VnetHdr::LEN)?.copy_from_slice(vnet_hdr);
        out.get_mut(VnetHdr::LEN..len)?.copy_from_slice(data);
        return Some(len);
    };
    let mut hdr = VnetHdr::parse(vnet_hdr).ok()?;
    // Offsets count from the start of the frame: everything after the MACs moves by the tag.
    if hdr.flags & FLAG_NEEDS_CSUM != 0 {
        hdr.csum_start = hdr.csum_start.checked_add(TAG_LEN as u16)?;
    }
    if hdr.hdr_len != 0 {
        hdr.hdr_len = hdr.hdr_len.checked_add(TAG_LEN as u16)?;
    }
    let (head, frame) = out.split_at_mut_checked(VnetHdr::LEN)?;
    let frame_len = insert_tag_into(data, frame, tpid, tci)?;
    head.copy_from_slice(&hdr.to_bytes());
    Some(VnetHdr::LEN + frame_len)
}

/// One receive queue of an uplink (a fanout member, or a lone socket).
pub struct UplinkQueue {
    socket: PacketSocket,
    queue: QueueId,
    /// When the kernel's counters are read next (a syscall; they reset on each read).
    next_stats: Instant,
    /// Calls of `kernel_counters` so far.
    calls: u32,
    /// Corrupt blocks already reported.
    corrupt_reported: u64,
}

/// How often a queue reads its socket's kernel counters.
const KERNEL_STATS_INTERVAL: Duration = Duration::from_millis(100);
/// Every how many batches a queue checks whether [`KERNEL_STATS_INTERVAL`] has passed.
const KERNEL_STATS_CALLS: u32 = 16;

impl UplinkQueue {
    /// A lone receive socket as the default queue: the fallback when the kernel refuses fanout
    /// (everything then goes through the software switch).
    pub fn open_single(ifname: &str, netns: Option<&str>, ring: RingConfig) -> Result<UplinkQueue, PacketError> {
        Ok(UplinkQueue::new(PacketSocket::open_rx(ifname, netns, ring)?, QueueId::DEFAULT))
    }

    fn new(socket: PacketSocket, queue: QueueId) -> UplinkQueue {
        UplinkQueue { socket, queue, next_stats: Instant::now(), corrupt_reported: 0, calls: 0 }
    }

    pub fn queue(&self) -> QueueId {
        self.queue
    }

    /// The socket's fd, for the worker's epoll (readable when a ring block is ready).
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl FrameSource for UplinkQueue {
    fn recv(&mut self, scratch: &mut Scratch, max: usize, errors: &mut Vec<RecvError>) -> usize {
        let room = batch_room(scratch);
        let mut n = 0;
        self.socket.recv_batch(max.min(room), |f| {
            if f.truncated() {
                // Longer than a ring block: the kernel cut it. Never pass a cut frame on.
                errors.push(RecvError::Drop(DropReason::Oversize));
                return;
            }
            let Some(buf) = scratch.next_buf() else {
                errors.push(RecvError::Drop(DropReason::NoBuffer));
                return;
            };
            match write_rx_frame(buf, &f.vnet_hdr, f.data, f.vlan.map(|v| (v.tpid, v.tci))) {
                Some(len) => {
                    scratch.commit(len);
                    n += 1;
                }
                None => errors.push(RecvError::Drop(DropReason::Malformed)),
            }
        });
        n
    }

    fn wake(&mut self) -> Wake {
        // The socket is readable once a ring block is retired to vmq: when it fills, or when
        // its retire timeout expires with frames in it. An empty block never wakes anyone.
        Wake::Fd(self.raw_fd())
    }

    fn kernel_counters(&mut self) -> KernelCounters {
        // Asked after every batch: look at the clock only every few calls.
        self.calls = self.calls.wrapping_add(1);
        if !self.calls.is_multiple_of(KERNEL_STATS_CALLS) {
            return KernelCounters::default();
        }
        let now = Instant::now();
        if now < self.next_stats {
            return KernelCounters::default();
        }
        self.next_stats = now + KERNEL_STATS_INTERVAL;
        let drops = match self.socket.stats() {
            Ok(stats) => u64::from(stats.drops),
            Err(e) => {
                tracing::debug!(error = %e, "uplink: cannot read the ring's kernel counters");
                0
            }
        };
        let corrupt = self.socket.corrupt_blocks();
        let corrupt_blocks = corrupt.saturating_sub(self.corrupt_reported);
        self.corrupt_reported = corrupt;
        KernelCounters { drops, corrupt_blocks }
    }
}

/// Free slots in a batch.
fn batch_room(scratch: &Scratch) -> usize {
    crate::port::BATCH.saturating_sub(scratch.len())
}

/// The uplink's transmit side.
pub struct UplinkSink {
    socket: PacketSocket,
    caps: OffloadCaps,
}

impl UplinkSink {
    /// `offloads`: hand GSO frames and partial checksums to the kernel, which segments and
    /// finishes them for the device as needed; else vmq resolves them first.
    pub fn open(ifname: &str, netns: Option<&str>, offloads: bool) -> Result<UplinkSink, PacketError> {
        let caps = if offloads { OffloadCaps::ALL } else { OffloadCaps::NONE };
        Ok(UplinkSink { socket: PacketSocket::open_tx(ifname, netns)?, caps })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl FrameSink for UplinkSink {
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason> {
        let hdr = hdr.to_bytes();
        let sent = if parts.len() < vmq_sys::packet::MAX_PARTS {
            self.socket.send(&hdr, parts)
        } else {
            // More parts than one sendmsg takes here: rare, so one copy is fine.
            self.socket.send(&hdr, &[&parts.concat()])
        };
        sent.map(|_| ()).map_err(tx_drop)
    }

    fn flush(&mut self) {}

    fn caps(&self) -> OffloadCaps {
        self.caps
    }
}

fn tx_drop(e: TxError) -> DropReason {
    match e {
        TxError::Busy(_) => DropReason::NoBuffer,
        TxError::TooBig(_) => DropReason::Oversize,
        TxError::Invalid(_) | TxError::BadParts => DropReason::Malformed,
        TxError::Down(_) => DropReason::PortDown,
        TxError::Os(e) => {
            tracing::debug!("uplink transmit: {e}");
            DropReason::NoBuffer
        }
    }
}

/// The VMQ filters of an uplink, as its fanout group's steering program.
pub struct UplinkSteering {
    group: FanoutGroup,
    filters: BTreeMap<QueueId, FilterKey>,
    last_error: Option<PacketError>,
}

impl UplinkSteering {
    pub fn new(group: FanoutGroup) -> UplinkSteering {
        UplinkSteering { group, filters: BTreeMap::new(), last_error: None }
    }

    /// Why the last filter change did not take effect, if it did not.
    pub fn last_error(&self) -> Option<&PacketError> {
        self.last_error.as_ref()
    }

    pub fn group(&self) -> &FanoutGroup {
        &self.group
    }

    /// The steering rules, in ascending queue order: queues with the same filter key form one
    /// group (its members in queue order) that shares the key's flows.
    fn rules(&self) -> Vec<SteeringRule> {
        self.filters
            .iter()
            .map(|(q, k)| SteeringRule { mac: k.mac.0, vlan: (k.vlan != 0).then_some(k.vlan), index: u32::from(q.0) })
            .collect()
    }
}

impl NicSteering for UplinkSteering {
    fn set_filter(&mut self, queue: QueueId, filter: Option<FilterKey>) {
        if usize::from(queue.0) >= self.group.members() || queue == QueueId::DEFAULT {
            tracing::warn!(
                "uplink {}: no VM queue {} (the group has {} members); filter ignored",
                self.group.interface(),
                queue.0,
                self.group.members()
            );
            return;
        }
        match filter {
            Some(f) => self.filters.insert(queue, f),
            None => self.filters.remove(&queue),
        };
        // Queues that share a MAC and VLAN (one multiqueue VM, VMMQ) share that key's flows:
        // each flow stays on one of them.
        self.last_error = self.group.steer(&self.rules()).err();
        if let Some(e) = &self.last_error {
            tracing::warn!("uplink steering not updated: {e}");
        }
    }

    /// The fanout program splits a key's flows over the queues sharing it (`fanout_program`).
    fn spreads_flows(&self) -> bool {
        true
    }
}

/// An uplink opened with VM queues: the queues (default first), the transmit side and the
/// steering.
pub struct Uplink {
    pub queues: Vec<UplinkQueue>,
    pub sink: UplinkSink,
    pub steering: UplinkSteering,
}

impl Uplink {
    /// Opens `ifname` (in `netns`) with `vm_queues` VM queues plus the default queue. An error
    /// [`PacketError::FanoutRefused`] means the kernel has no fanout: fall back to
    /// [`UplinkQueue::open_single`].
    pub fn open(
        ifname: &str,
        netns: Option<&str>,
        vm_queues: u16,
        offloads: bool,
        ring: RingConfig,
    ) -> Result<Uplink, PacketError> {
        let (group, sockets) = FanoutGroup::open(ifname, netns, usize::from(vm_queues) + 1, ring)?;
        let queues =
            sockets.into_iter().enumerate().map(|(k, socket)| UplinkQueue::new(socket, QueueId(k as u16))).collect();
        Ok(Uplink { queues, sink: UplinkSink::open(ifname, netns, offloads)?, steering: UplinkSteering::new(group) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmq_wire::ethernet::{ETHERTYPE_QINQ, ETHERTYPE_VLAN};

    fn frame() -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 1, 0x52, 0x54, 0, 0, 0, 2, 0x08, 0x00];
        f.extend_from_slice(&[0x45; 60]);
        f
    }

    #[test]
    fn untagged_frames_pass_as_they_are() {
        let hdr = VnetHdr { flags: FLAG_NEEDS_CSUM, csum_start: 34, csum_offset: 16, ..Default::default() };
        let f = frame();
        let mut out = vec![0u8; 256];
        let len = write_rx_frame(&mut out, &hdr.to_bytes(), &f, None).unwrap();
        assert_eq!(len, 12 + f.len());
        assert_eq!(VnetHdr::parse(&out).unwrap(), hdr);
        assert_eq!(&out[12..len], &f[..]);
    }

    #[test]
    fn tag_goes_back_and_offsets_shift() {
        let hdr = VnetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: 1,
            gso_size: 1448,
            hdr_len: 66,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        };
        let f = frame();
        let mut out = vec![0u8; 256];
        let len = write_rx_frame(&mut out, &hdr.to_bytes(), &f, Some((ETHERTYPE_VLAN, 0x2064))).unwrap();
        assert_eq!(len, 12 + f.len() + 4);
        let h = VnetHdr::parse(&out).unwrap();
        assert_eq!((h.csum_start, h.csum_offset, h.hdr_len, h.gso_size), (38, 16, 70, 1448));
        let t = &out[12..len];
        assert_eq!(&t[..12], &f[..12]);
        assert_eq!(&t[12..16], &[0x81, 0x00, 0x20, 0x64]);
        assert_eq!(&t[16..], &f[12..]);
        // Without NEEDS_CSUM the checksum offsets are not offsets: left alone.
        let plain = VnetHdr::default();
        write_rx_frame(&mut out, &plain.to_bytes(), &f, Some((ETHERTYPE_QINQ[0], 5))).unwrap();
        assert_eq!(VnetHdr::parse(&out).unwrap(), plain);
        assert_eq!(&out[24..28], &[0x88, 0xa8, 0, 5]);
    }

    #[test]
    fn bad_inputs_are_refused_not_panics() {
        let mut small = vec![0u8; 20];
        assert_eq!(write_rx_frame(&mut small, &[0; 12], &frame(), None), None);
        assert_eq!(write_rx_frame(&mut small, &[0; 12], &frame(), Some((ETHERTYPE_VLAN, 1))), None);
        let mut out = vec![0u8; 256];
        assert_eq!(write_rx_frame(&mut out, &[0; 12], &[1, 2, 3], Some((ETHERTYPE_VLAN, 1))), None);
        let hdr = VnetHdr { flags: FLAG_NEEDS_CSUM, csum_start: u16::MAX - 1, ..Default::default() };
        assert_eq!(write_rx_frame(&mut out, &hdr.to_bytes(), &frame(), Some((ETHERTYPE_VLAN, 1))), None);
    }
}

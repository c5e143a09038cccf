//! Uplink ports over AF_XDP (the second uplink driver, beside AF_PACKET in [`crate::uplink`]).
//!
//! An XDP program on the interface (see [`vmq_sys::xdp`]) sorts received frames by destination
//! MAC + VLAN into one AF_XDP socket per VM queue (XSKMAP index k = VM queue k) and sends
//! everything else to socket 0, the default queue; frames to the interface's own MAC and the
//! IEEE link-local group go to the kernel. Each receive queue of the interface has such a socket
//! set (a socket only gets frames of the queue it is bound to), sharing one UMEM per queue (see
//! [`vmq_sys::xsk`]); a separate socket on queue 0 transmits.
//!
//! Offloads: AF_XDP carries no checksum or GSO metadata. Frames of more than one UMEM chunk
//! (jumbo MTUs) come and go as several descriptors (multi-buffer), up to the port's MTU; no GSO
//! frame arrives (native XDP on a veth makes the peer segment); the transmit side takes only whole frames
//! (vmq segments and checksums before, [`OffloadCaps::NONE`]). A frame sent by a local stack
//! (a veth peer, another namespace) still holds a *partial* checksum — the pseudo-header sum the
//! kernel would have completed later. [`mark_partial_checksum`] recognises it and marks the
//! frame `NEEDS_CSUM` for the receiver (as the kernel's packet sockets do), so it comes out
//! right whether the receiver finishes checksums itself or vmq does.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};

use vmq_core::vmq::{FilterKey, QueueId};
use vmq_core::{DropReason, OffloadCaps};
use vmq_sys::xdp::{PASS_TO_KERNEL, XdpError, XdpMode, XdpSteering};
use vmq_sys::xsk::{XskConfig, XskError, XskQueue, XskRx, XskTx, XskTxError, ZeroCopy};
use vmq_wire::VnetHdr;
use vmq_wire::checksum::fold;
use vmq_wire::vnet::FLAG_NEEDS_CSUM;

use crate::port::{FrameSink, FrameSource, KernelCounters, NicSteering, RecvError, Scratch, Wake};

/// Why an AF_XDP uplink could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AfXdpError {
    #[error(transparent)]
    Xsk(#[from] XskError),
    #[error(transparent)]
    Xdp(#[from] XdpError),
    #[error(
        "an MTU of {mtu} needs frames of {frame} bytes; this AF_XDP uplink carries at most {max} (one UMEM chunk: the kernel or driver refused multi-buffer, XDP_USE_SG, which needs Linux 6.6): use driver = \"af_packet\" (or \"auto\", which falls back)"
    )]
    MtuTooLarge { mtu: u16, frame: usize, max: usize },
    #[error(
        "{rx_queues} receive queues x {sockets} sockets exceed the XSKMAP's {max} entries: give the interface fewer queues (ethtool -L), list fewer or lower ones in xdp_queues, or give vmq a smaller queue budget"
    )]
    TooManySockets { rx_queues: u32, sockets: usize, max: u32 },
    #[error("xdp_queues lists receive queue {queue}, but {ifname} has {rx_queues} (0 to {last}; ethtool -l)", last = rx_queues.saturating_sub(1))]
    NoSuchRxQueue { ifname: String, queue: u32, rx_queues: u32 },
    /// Queue 0's socket set comes with the transmit socket; not seeing it is a bug.
    #[error("no AF_XDP transmit socket was opened")]
    NoTransmitSocket,
}

/// The virtio-net header for a received frame: `NEEDS_CSUM` when its TCP/UDP checksum field holds
/// exactly the pseudo-header sum, i.e. a local sender left the checksum for the device to finish
/// (CHECKSUM_PARTIAL). A complete checksum that happens to equal that sum is finished to the same
/// value, so a wrong guess changes nothing.
pub fn mark_partial_checksum(frame: &[u8]) -> VnetHdr {
    let mut hdr = VnetHdr::default();
    let Ok(layers) = vmq_wire::ip::locate(frame) else {
        return hdr;
    };
    let Some(csum_offset) = layers.l4_csum_offset() else {
        return hdr;
    };
    let l4_len = layers.l4_len(frame);
    let Some(field) = frame.get(layers.l4 + csum_offset..layers.l4 + csum_offset + 2) else {
        return hdr;
    };
    let field = u16::from_be_bytes([field[0], field[1]]);
    let pseudo = fold(layers.pseudo_header(frame, l4_len));
    if field != 0 && field == pseudo && l4_len >= csum_offset + 2 {
        hdr.flags = FLAG_NEEDS_CSUM;
        hdr.csum_start = layers.l4 as u16;
        hdr.csum_offset = csum_offset as u16;
    }
    hdr
}

/// One receive queue: an AF_XDP socket the XDP program redirects to.
pub struct XdpQueue {
    socket: XskRx,
    queue: QueueId,
    /// The interface's receive queue the socket is bound to.
    rx_queue: u16,
    drops_reported: u64,
    stats_countdown: u32,
}

impl XdpQueue {
    pub fn queue(&self) -> QueueId {
        self.queue
    }

    pub fn rx_queue(&self) -> u16 {
        self.rx_queue
    }
}

impl FrameSource for XdpQueue {
    fn recv(&mut self, scratch: &mut Scratch, max: usize, errors: &mut Vec<RecvError>) -> usize {
        let room = crate::port::BATCH.saturating_sub(scratch.len());
        let mut n = 0;
        let counts = self.socket.recv_batch(max.min(room), |parts| {
            let Some(buf) = scratch.next_buf() else {
                errors.push(RecvError::Drop(DropReason::NoBuffer));
                return;
            };
            let frame_len: usize = parts.iter().map(|p| p.len()).sum();
            let len = VnetHdr::LEN + frame_len;
            let Some(out) = buf.get_mut(..len) else {
                errors.push(RecvError::Drop(DropReason::Oversize));
                return;
            };
            let (head, frame) = out.split_at_mut(VnetHdr::LEN);
            let mut at = 0;
            for p in parts {
                frame[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            head.copy_from_slice(&mark_partial_checksum(frame).to_bytes());
            scratch.commit(len);
            n += 1;
        });
        for _ in 0..counts.bad {
            errors.push(RecvError::Drop(DropReason::Malformed));
        }
        for _ in 0..counts.oversize {
            errors.push(RecvError::Drop(DropReason::Oversize));
        }
        n
    }

    fn nic_rx_queue(&self) -> Option<u16> {
        Some(self.rx_queue)
    }

    fn wake(&mut self) -> Wake {
        // The socket is readable while its RX ring holds frames.
        Wake::Fd(self.socket.as_raw_fd())
    }

    fn kernel_counters(&mut self) -> KernelCounters {
        // A syscall: only every 64th batch.
        self.stats_countdown = self.stats_countdown.wrapping_sub(1);
        if !self.stats_countdown.is_multiple_of(64) {
            return KernelCounters::default();
        }
        let total = self.socket.drops();
        let drops = total.saturating_sub(self.drops_reported);
        self.drops_reported = total;
        KernelCounters { drops, corrupt_blocks: 0 }
    }
}

/// The transmit side: frames are copied into the TX socket's UMEM chunks.
pub struct XdpSink {
    socket: XskTx,
}

impl XdpSink {
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl FrameSink for XdpSink {
    fn send(&mut self, _hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason> {
        // caps() is NONE: the header asks for nothing, the frame is complete.
        match self.socket.send(parts) {
            Ok(()) => Ok(()),
            Err(XskTxError::Busy) => {
                // Completions may be waiting: take them and try once more.
                self.socket.flush();
                self.socket.send(parts).map_err(tx_drop)
            }
            Err(e) => Err(tx_drop(e)),
        }
    }

    fn flush(&mut self) {
        self.socket.flush();
    }

    fn caps(&self) -> OffloadCaps {
        OffloadCaps::NONE
    }
}

fn tx_drop(e: XskTxError) -> DropReason {
    match e {
        XskTxError::Busy => DropReason::NoBuffer,
        XskTxError::TooBig { .. } => DropReason::Oversize,
        XskTxError::Corrupt(_) => DropReason::RingBroken,
    }
}

/// The VMQ filters of an AF_XDP uplink, as entries of its XDP program's steering map.
pub struct XdpUplinkSteering {
    program: XdpSteering,
    sockets: usize,
    filters: BTreeMap<QueueId, FilterKey>,
    last_error: Option<XdpError>,
}

impl XdpUplinkSteering {
    /// Why the last filter change did not take effect, if it did not.
    pub fn last_error(&self) -> Option<&XdpError> {
        self.last_error.as_ref()
    }

    /// Points the map entry of `key` at the lowest queue holding it (a transient duplicate while
    /// a filter moves between queues), or removes it.
    fn sync(&self, key: FilterKey) -> Result<(), XdpError> {
        let holder = self.filters.iter().find(|(_, k)| **k == key).map(|(q, _)| q.0);
        match holder {
            Some(q) => self.program.set_rule(key.mac.0, key.vlan, u32::from(q)),
            None => self.program.remove_rule(key.mac.0, key.vlan),
        }
    }
}

impl NicSteering for XdpUplinkSteering {
    fn set_filter(&mut self, queue: QueueId, filter: Option<FilterKey>) {
        if usize::from(queue.0) >= self.sockets || queue == QueueId::DEFAULT {
            tracing::warn!(
                "AF_XDP uplink {}: no VM queue {} ({} sockets); filter ignored",
                self.program.interface(),
                queue.0,
                self.sockets
            );
            return;
        }
        let old = match filter {
            Some(f) => self.filters.insert(queue, f),
            None => self.filters.remove(&queue),
        };
        let mut result = Ok(());
        if let Some(o) = old.filter(|o| Some(*o) != filter) {
            result = self.sync(o);
        }
        if let Some(f) = filter {
            result = result.and(self.sync(f));
        }
        self.last_error = result.err();
        if let Some(e) = &self.last_error {
            tracing::warn!("AF_XDP uplink steering not updated: {e}");
        }
    }
}

/// How to open an AF_XDP uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfXdpOptions {
    pub mode: XdpMode,
    pub zero_copy: ZeroCopy,
    /// The receive queues to take over (ascending); `None`: every queue the interface has.
    pub rx_queues: Option<Vec<u16>>,
}

/// An uplink opened over AF_XDP: the queues (default first), the transmit side, the steering.
pub struct AfXdpUplink {
    pub queues: Vec<XdpQueue>,
    pub sink: XdpSink,
    pub steering: XdpUplinkSteering,
    /// The driver moves frames without a copy.
    pub zero_copy: bool,
    /// Frames may span several UMEM chunks (multi-buffer).
    pub multi_buffer: bool,
    /// The receive queues with a socket set (ascending); the interface's others stay with the
    /// kernel.
    pub rx_queues: Vec<u32>,
}

impl AfXdpUplink {
    /// Opens `ifname` (in `netns`) with `vm_queues` VM queues plus the default queue on every
    /// receive queue of the interface, for frames of the port's `mtu` (plus Ethernet header and
    /// a VLAN tag).
    pub fn open(
        ifname: &str,
        netns: Option<&str>,
        vm_queues: u16,
        mtu: u16,
        opts: AfXdpOptions,
    ) -> Result<AfXdpUplink, AfXdpError> {
        let frame = usize::from(mtu) + vmq_wire::ethernet::HEADER_LEN + vmq_wire::vlan::TAG_LEN;
        let sockets = usize::from(vm_queues) + 1;
        let present = vmq_sys::link::LinkCtl::new(netns).and_then(|l| l.rx_queues(ifname)).map_err(XskError::from)?;
        let rx_queues: Vec<u32> = match &opts.rx_queues {
            None => (0..present).collect(),
            Some(ids) => ids.iter().map(|&q| u32::from(q)).collect(),
        };
        if let Some(&queue) = rx_queues.iter().find(|&&q| q >= present) {
            return Err(AfXdpError::NoSuchRxQueue { ifname: ifname.to_string(), queue, rx_queues: present });
        }
        // The program finds a queue's set at `rx_queue_index * sockets`: the map spans up to the
        // highest queue taken.
        let span = rx_queues.last().map_or(0, |&q| q + 1);
        let max = vmq_sys::xdp::MAX_ENTRIES;
        if span as usize * sockets > max as usize || span > u32::from(u16::MAX) {
            return Err(AfXdpError::TooManySockets { rx_queues: span, sockets, max });
        }
        let mut sets = Vec::with_capacity(rx_queues.len());
        for (i, &q) in rx_queues.iter().enumerate() {
            // One transmit socket (the first queue's) serves the whole interface.
            let tx_frames = if i == 0 { XskConfig::default().tx_frames } else { 0 };
            let cfg = XskConfig { zero_copy: opts.zero_copy, tx_frames, ..XskConfig::default() };
            sets.push((q, XskQueue::open(ifname, netns, q, sockets, cfg)?));
        }
        let multi_buffer = sets.iter().all(|(_, s)| s.multi_buffer);
        let zero_copy = sets.iter().all(|(_, s)| s.zero_copy);
        let max_frame = sets.iter().map(|(_, s)| s.max_frame_len()).min().unwrap_or(0);
        if frame > max_frame {
            return Err(AfXdpError::MtuTooLarge { mtu, frame, max: max_frame });
        }
        // A multi-buffer program on a single-buffer socket would have frames of several pages
        // dropped in the kernel; without multi-buffer the driver keeps frames to one page.
        let program = XdpSteering::attach(ifname, netns, opts.mode, multi_buffer, sockets as u32)?;
        for (q, set) in &sets {
            for (k, s) in set.rx.iter().enumerate() {
                program.set_socket(*q * sockets as u32 + k as u32, s.as_raw_fd())?;
            }
        }
        // What the host itself needs (see vmq_sys::xdp): its own MAC, the link-local group.
        let own = vmq_sys::link::LinkCtl::new(netns).and_then(|l| l.mac(ifname));
        match own {
            Ok(mac) => program.set_rule(mac, 0, PASS_TO_KERNEL)?,
            Err(e) => tracing::warn!(ifname, "AF_XDP uplink: own MAC unknown ({e}); the host gets no unicast"),
        }
        for last in 0..16u8 {
            program.set_rule([0x01, 0x80, 0xc2, 0, 0, last], 0, PASS_TO_KERNEL)?;
        }
        let mut queues = Vec::with_capacity(sets.len() * sockets);
        let mut tx = None;
        for (q, set) in sets {
            tx = tx.or(set.tx);
            queues.extend(set.rx.into_iter().enumerate().map(|(k, socket)| XdpQueue {
                socket,
                queue: QueueId(k as u16),
                rx_queue: q as u16,
                drops_reported: 0,
                stats_countdown: 0,
            }));
        }
        let tx = tx.ok_or(AfXdpError::NoTransmitSocket)?;
        Ok(AfXdpUplink {
            queues,
            sink: XdpSink { socket: tx },
            steering: XdpUplinkSteering { program, sockets, filters: BTreeMap::new(), last_error: None },
            zero_copy,
            multi_buffer,
            rx_queues,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_frame(full_checksum: bool) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1000, 2000, 1, 100);
        let mut f = Vec::new();
        b.write(&mut f, b"some payload bytes").unwrap();
        if !full_checksum {
            // What a local sender leaves: the pseudo-header sum, not complemented.
            let l = vmq_wire::ip::locate(&f).unwrap();
            let p = fold(l.pseudo_header(&f, l.l4_len(&f)));
            f[l.l4 + 16..l.l4 + 18].copy_from_slice(&p.to_be_bytes());
        }
        f
    }

    #[test]
    fn partial_checksums_are_marked_for_completion() {
        let f = tcp_frame(false);
        let h = mark_partial_checksum(&f);
        assert_eq!((h.flags, h.csum_start, h.csum_offset), (FLAG_NEEDS_CSUM, 34, 16));
        // Completing it as the receiver would gives the real checksum.
        let mut done = f.clone();
        let c = !fold(vmq_wire::checksum::sum(&done[34..], 0));
        done[50..52].copy_from_slice(&c.to_be_bytes());
        assert_eq!(done, tcp_frame(true));
    }

    #[test]
    fn complete_checksums_and_other_frames_pass_as_they_are() {
        assert_eq!(mark_partial_checksum(&tcp_frame(true)), VnetHdr::default());
        assert_eq!(mark_partial_checksum(&[0xff; 60]), VnetHdr::default());
        assert_eq!(mark_partial_checksum(&[]), VnetHdr::default());
    }
}

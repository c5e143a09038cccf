//! AF_PACKET uplink sockets.
//!
//! Receive: `SOCK_RAW`/`ETH_P_ALL` sockets bound to one interface, with `PACKET_VNET_HDR` (GSO
//! frames cross uncut, with a virtio-net header) and a TPACKET_V3 ring the frames are read from
//! in place. Frames the host itself sends are filtered out. Several sockets can form a
//! `PACKET_FANOUT_CBPF` group ([`FanoutGroup`]) whose classic-BPF program (see
//! [`crate::steering`]) picks the socket — the queue — for each frame: in-kernel VMQ steering.
//!
//! Transmit: one frame = virtio-net header + parts, one `sendmsg`, bypassing the qdisc.
//!
//! The kernel's header is the 10-byte `virtio_net_hdr`; vmq's is the 12-byte
//! `virtio_net_hdr_v1` (with `num_buffers`): receive widens it, transmit sends the first 10 bytes.
//! Linux removes the 802.1Q tag of every received frame into metadata before packet sockets see
//! it; [`RxFrame::vlan`] reports it so the caller can put it back.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::cvt;
use crate::link::{IfRef, LinkCtl, LinkError};
use crate::netns::{self, NetnsError};
use crate::steering;

/// Size of the kernel's `virtio_net_hdr` on packet sockets.
pub const KERNEL_VNET_HDR_LEN: usize = 10;
/// Size of vmq's `virtio_net_hdr_v1`.
pub const VNET_HDR_LEN: usize = 12;
/// Most iovec parts one frame takes (header included).
pub const MAX_PARTS: usize = 16;
/// The kernel's limit on fanout group members (PACKET_FANOUT_MAX).
pub const MAX_FANOUT_MEMBERS: usize = 256;

/// Geometry of a TPACKET_V3 receive ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    /// Bytes per block; a multiple of the page size, large enough for a 64 KiB GSO frame plus
    /// headers (a frame that does not fit a block is cut by the kernel and reported truncated).
    pub block_size: u32,
    pub block_count: u32,
    /// A block that is not full is handed over after this many milliseconds.
    pub retire_timeout_ms: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig { block_size: 256 * 1024, block_count: 16, retire_timeout_ms: 2 }
    }
}

/// Largest frame (with headers) the ring takes per block: a 64 KiB GSO frame, a VLAN tag, the
/// virtio-net header and the TPACKET_V3 block and frame headers.
pub const MIN_BLOCK_SIZE: u32 = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("{at}: {op}: {source}")]
    Os { at: IfRef, op: &'static str, source: io::Error },
    #[error("{at}: ring block size {block_size} must be a multiple of the page size and at least {MIN_BLOCK_SIZE}")]
    BadRing { at: IfRef, block_size: u32 },
    #[error("{at}: a fanout group has 1 to {MAX_FANOUT_MEMBERS} members, not {members}")]
    BadMembers { at: IfRef, members: usize },
    /// The kernel refused to form the fanout group; the caller can fall back to one socket and
    /// steering in userspace.
    #[error("{at}: PACKET_FANOUT (CBPF): the kernel refuses fanout: {source}")]
    FanoutRefused { at: IfRef, source: io::Error },
    #[error("{at}: PACKET_FANOUT_DATA: the kernel refuses the steering program: {source}")]
    ProgramRefused { at: IfRef, source: io::Error },
    #[error("{at}: {source}")]
    Steering { at: IfRef, source: steering::SteeringError },
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// A failed transmit.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// Socket buffer or device queue full (EAGAIN/ENOBUFS): a counted drop, not a retry loop.
    #[error("uplink transmit queue full: {0}")]
    Busy(io::Error),
    /// Longer than the device MTU allows and not a GSO frame.
    #[error("frame longer than the uplink accepts: {0}")]
    TooBig(io::Error),
    /// The kernel refused the frame or its virtio-net header.
    #[error("uplink refused the frame: {0}")]
    Invalid(io::Error),
    /// The interface is down or gone.
    #[error("uplink is down: {0}")]
    Down(io::Error),
    #[error("uplink transmit: {0}")]
    Os(io::Error),
    #[error("a frame of more than {MAX_PARTS} parts, or without a virtio-net header")]
    BadParts,
}

impl TxError {
    fn from_io(e: io::Error) -> TxError {
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) => TxError::Busy(e),
            Some(libc::EMSGSIZE) => TxError::TooBig(e),
            Some(libc::EINVAL) => TxError::Invalid(e),
            Some(libc::ENETDOWN) | Some(libc::ENXIO) | Some(libc::ENODEV) => TxError::Down(e),
            _ => TxError::Os(e),
        }
    }
}

/// The 802.1Q (or 802.1ad) tag the kernel removed from a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanTag {
    pub tpid: u16,
    pub tci: u16,
}

impl VlanTag {
    pub fn vid(&self) -> u16 {
        self.tci & 0x0fff
    }
}

/// A received frame, borrowed from the ring.
#[derive(Debug)]
pub struct RxFrame<'a> {
    /// vmq's 12-byte virtio-net header (the kernel's 10 bytes, `num_buffers` 0).
    pub vnet_hdr: [u8; VNET_HDR_LEN],
    /// The Ethernet frame, without the VLAN tag the kernel removed (see `vlan`).
    pub data: &'a [u8],
    pub vlan: Option<VlanTag>,
    /// Length on the wire; longer than `data` when the ring cut the frame.
    pub wire_len: u32,
}

impl RxFrame<'_> {
    pub fn truncated(&self) -> bool {
        self.data.len() < self.wire_len as usize
    }
}

/// Kernel counters of a socket since the previous call (reading resets them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketStats {
    pub packets: u32,
    pub drops: u32,
    pub freeze_count: u32,
}

struct Ring {
    base: *mut u8,
    len: usize,
    block_size: usize,
    block_count: usize,
    /// The block to look at next.
    block: usize,
    /// Frames left in the current block (0: not inside a block).
    remaining: u32,
    /// Offset of the next frame header in the current block.
    offset: usize,
    /// Blocks whose layout made no sense (never seen; counted rather than trusted).
    corrupt_blocks: u64,
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: base/len are the mapping made in `setup_ring`, unmapped once here.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// An AF_PACKET socket bound to one interface: a receiver (with a ring) or a transmitter.
pub struct PacketSocket {
    // Field order: the ring is unmapped before the socket closes.
    ring: Option<Ring>,
    fd: OwnedFd,
    at: IfRef,
    ifindex: u32,
}

// SAFETY: the ring mapping is owned by this socket alone and only touched through `&mut self`
// (receive) or on drop; the kernel side synchronises through the block status words.
unsafe impl Send for PacketSocket {}

impl std::fmt::Debug for PacketSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketSocket")
            .field("at", &self.at)
            .field("fd", &self.fd.as_raw_fd())
            .field("ring", &self.ring.is_some())
            .finish()
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: value points at a live T of size_of::<T>() bytes the kernel only reads.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, (value as *const T).cast(), size_of::<T>() as libc::socklen_t)
    };
    cvt(r).map(|_| ())
}

fn attach_filter(fd: &OwnedFd, prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut libc::sock_filter };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
}

fn packet_socket() -> io::Result<OwnedFd> {
    // Protocol 0: nothing is received until bind names a protocol.
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    // SAFETY: a fresh descriptor we own.
    cvt(fd).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: &OwnedFd, ifindex: u32, protocol: u16) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the given size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    cvt(r).map(|_| ())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

impl PacketSocket {
    /// Opens a receive socket on `ifname` (in `netns`): ring, virtio-net header, promiscuous,
    /// host-sent frames filtered out.
    pub fn open_rx(ifname: &str, netns: Option<&str>, ring: RingConfig) -> Result<PacketSocket, PacketError> {
        let at = IfRef { name: ifname.to_string(), netns: netns.map(str::to_string) };
        let ifindex = LinkCtl::new(netns)?.ifindex(ifname)?;
        let mut s = Self::open_rx_at(at, ifindex, netns, ring, true)?;
        s.set_filter(&steering::drop_outgoing(), "SO_ATTACH_FILTER")?;
        Ok(s)
    }

    /// The receive socket before it starts taking frames (a drop-all filter is attached).
    fn open_rx_at(
        at: IfRef,
        ifindex: u32,
        netns: Option<&str>,
        ring: RingConfig,
        promisc: bool,
    ) -> Result<PacketSocket, PacketError> {
        if ring.block_size < MIN_BLOCK_SIZE || !(ring.block_size as usize).is_multiple_of(page_size()) {
            return Err(PacketError::BadRing { at, block_size: ring.block_size });
        }
        let os = |op| {
            let at = at.clone();
            move |source| PacketError::Os { at, op, source }
        };
        let fd = netns::run_in_opt(netns, packet_socket)?.map_err(os("socket(AF_PACKET)"))?;
        attach_filter(&fd, &steering::drop_all()).map_err(os("SO_ATTACH_FILTER"))?;
        let version = libc::tpacket_versions::TPACKET_V3 as libc::c_int;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VERSION, &version).map_err(os("PACKET_VERSION"))?;
        // Before the ring: the kernel refuses PACKET_VNET_HDR once a ring exists.
        let one: libc::c_int = 1;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one).map_err(os("PACKET_VNET_HDR"))?;
        let req = libc::tpacket_req3 {
            tp_block_size: ring.block_size,
            tp_block_nr: ring.block_count,
            // V3 packs frames of any size into blocks; frame_size/nr only have to be consistent.
            tp_frame_size: ring.block_size,
            tp_frame_nr: ring.block_count,
            tp_retire_blk_tov: ring.retire_timeout_ms,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req).map_err(os("PACKET_RX_RING"))?;
        let len = ring.block_size as usize * ring.block_count as usize;
        // SAFETY: maps the ring the kernel just allocated for this socket; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(os("mmap ring")(io::Error::last_os_error()));
        }
        let ring = Ring {
            base: base.cast(),
            len,
            block_size: ring.block_size as usize,
            block_count: ring.block_count as usize,
            block: 0,
            remaining: 0,
            offset: 0,
            corrupt_blocks: 0,
        };
        let s = PacketSocket { ring: Some(ring), fd, at: at.clone(), ifindex };
        // The qdisc bypass only affects transmit; harmless here, and lets one socket do both.
        setsockopt(&s.fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &one).map_err(os("PACKET_QDISC_BYPASS"))?;
        bind(&s.fd, ifindex, libc::ETH_P_ALL as u16).map_err(os("bind"))?;
        if promisc {
            let mreq = libc::packet_mreq {
                mr_ifindex: ifindex as i32,
                mr_type: libc::PACKET_MR_PROMISC as u16,
                mr_alen: 0,
                mr_address: [0; 8],
            };
            setsockopt(&s.fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
                .map_err(os("PACKET_ADD_MEMBERSHIP promisc"))?;
        }
        Ok(s)
    }

    /// Opens a transmit-only socket on `ifname` (in `netns`): it receives nothing (bound with
    /// protocol 0), takes a virtio-net header and bypasses the qdisc.
    pub fn open_tx(ifname: &str, netns: Option<&str>) -> Result<PacketSocket, PacketError> {
        let at = IfRef { name: ifname.to_string(), netns: netns.map(str::to_string) };
        let ifindex = LinkCtl::new(netns)?.ifindex(ifname)?;
        let os = |op| {
            let at = at.clone();
            move |source| PacketError::Os { at, op, source }
        };
        let fd = netns::run_in_opt(netns, packet_socket)?.map_err(os("socket(AF_PACKET)"))?;
        let one: libc::c_int = 1;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &one).map_err(os("PACKET_VNET_HDR"))?;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &one).map_err(os("PACKET_QDISC_BYPASS"))?;
        bind(&fd, ifindex, 0).map_err(os("bind"))?;
        Ok(PacketSocket { ring: None, fd, at, ifindex })
    }

    fn set_filter(&mut self, prog: &[libc::sock_filter], op: &'static str) -> Result<(), PacketError> {
        attach_filter(&self.fd, prog).map_err(|source| PacketError::Os { at: self.at.clone(), op, source })
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn interface(&self) -> &IfRef {
        &self.at
    }

    /// Visits up to `max` received frames in place, in arrival order; returns how many. Each
    /// frame's bytes live in the ring and are valid during its visit only: a block goes back to
    /// the kernel once all its frames were visited. Non-blocking; a socket without a ring
    /// receives nothing.
    pub fn recv_batch(&mut self, max: usize, mut visit: impl FnMut(RxFrame<'_>)) -> usize {
        let Some(ring) = self.ring.as_mut() else {
            return 0;
        };
        let hdr_len = size_of::<libc::tpacket3_hdr>();
        let mut n = 0;
        while n < max {
            let block = ring.block_ptr();
            if ring.remaining == 0 {
                if ring.status(block).load(Ordering::Acquire) & libc::TP_STATUS_USER == 0 {
                    break;
                }
                // SAFETY: the block belongs to us (TP_STATUS_USER) and starts with its
                // descriptor; unaligned reads avoid assuming the layout's alignment.
                let desc = unsafe { std::ptr::read_unaligned(block.cast::<libc::tpacket_block_desc>()) };
                // SAFETY: the V3 ring's descriptor union holds the v1 block header.
                let bh = unsafe { desc.hdr.bh1 };
                if bh.num_pkts == 0 {
                    ring.release(block);
                    continue;
                }
                ring.remaining = bh.num_pkts;
                ring.offset = bh.offset_to_first_pkt as usize;
            }
            let off = ring.offset;
            if off.checked_add(hdr_len).is_none_or(|end| end > ring.block_size) {
                ring.corrupt(block);
                continue;
            }
            // SAFETY: off + hdr_len is inside the block (checked), which we own.
            let h = unsafe { std::ptr::read_unaligned(block.add(off).cast::<libc::tpacket3_hdr>()) };
            let mac = off + h.tp_mac as usize;
            let end = mac + h.tp_snaplen as usize;
            if (h.tp_mac as usize) < hdr_len + KERNEL_VNET_HDR_LEN || end > ring.block_size {
                ring.corrupt(block);
                continue;
            }
            let mut vnet_hdr = [0u8; VNET_HDR_LEN];
            // SAFETY: the kernel wrote the 10-byte header right before the frame, inside the
            // frame slot (mac - 10 >= off + hdr_len, checked above).
            let kernel_hdr =
                unsafe { std::slice::from_raw_parts(block.add(mac - KERNEL_VNET_HDR_LEN), KERNEL_VNET_HDR_LEN) };
            vnet_hdr[..KERNEL_VNET_HDR_LEN].copy_from_slice(kernel_hdr);
            // SAFETY: mac..end is inside the block (checked) and stays ours until release.
            let data = unsafe { std::slice::from_raw_parts(block.add(mac), h.tp_snaplen as usize) };
            let vlan = (h.tp_status & libc::TP_STATUS_VLAN_VALID != 0).then_some(VlanTag {
                tpid: if h.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                    h.hv1.tp_vlan_tpid
                } else {
                    libc::ETH_P_8021Q as u16
                },
                tci: h.hv1.tp_vlan_tci as u16,
            });
            visit(RxFrame { vnet_hdr, data, vlan, wire_len: h.tp_len });
            n += 1;
            ring.remaining -= 1;
            if ring.remaining == 0 {
                ring.release(block);
            } else if h.tp_next_offset == 0 {
                ring.corrupt(block);
            } else {
                ring.offset = off + h.tp_next_offset as usize;
            }
        }
        n
    }

    /// Blocks whose layout was inconsistent and were skipped (should stay 0).
    pub fn corrupt_blocks(&self) -> u64 {
        self.ring.as_ref().map_or(0, |r| r.corrupt_blocks)
    }

    /// Sends one frame: `vnet_hdr` (vmq's 12 bytes; the kernel takes the first 10) then the
    /// concatenation of `parts`. Non-blocking.
    pub fn send(&self, vnet_hdr: &[u8; VNET_HDR_LEN], parts: &[&[u8]]) -> Result<usize, TxError> {
        if parts.len() + 1 > MAX_PARTS {
            return Err(TxError::BadParts);
        }
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_PARTS];
        iov[0] = libc::iovec { iov_base: vnet_hdr.as_ptr() as *mut libc::c_void, iov_len: KERNEL_VNET_HDR_LEN };
        for (v, p) in iov[1..].iter_mut().zip(parts) {
            *v = libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() };
        }
        // SAFETY: msghdr is plain old data; all-zero is valid (no name: the bound interface).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = parts.len() + 1;
        // SAFETY: msg points at iovecs over live slices the kernel only reads.
        let r = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
        cvt(r).map(|n| (n as usize).saturating_sub(KERNEL_VNET_HDR_LEN)).map_err(TxError::from_io)
    }

    /// Kernel counters since the previous call.
    pub fn stats(&self) -> Result<PacketStats, PacketError> {
        // SAFETY: plain old data; all-zero is valid.
        let mut st: libc::tpacket_stats_v3 = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
        // SAFETY: st/len describe a writable buffer of the right size.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats_v3).cast(),
                &mut len,
            )
        };
        cvt(r).map_err(|source| PacketError::Os { at: self.at.clone(), op: "PACKET_STATISTICS", source })?;
        Ok(PacketStats { packets: st.tp_packets, drops: st.tp_drops, freeze_count: st.tp_freeze_q_cnt })
    }

    fn fanout_value(&self) -> io::Result<u32> {
        let mut val: u32 = 0;
        let mut len = size_of::<u32>() as libc::socklen_t;
        // SAFETY: val/len describe a writable u32.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_FANOUT,
                (&mut val as *mut u32).cast(),
                &mut len,
            )
        };
        cvt(r).map(|_| val)
    }
}

impl Ring {
    fn block_ptr(&self) -> *mut u8 {
        // SAFETY: block < block_count, so the offset stays inside the mapping.
        unsafe { self.base.add(self.block * self.block_size) }
    }

    fn status(&self, block: *mut u8) -> &AtomicU32 {
        // SAFETY: block_status is the first u32 of the block header (offset 8: version and
        // offset_to_priv come first), 4-byte aligned in a page-aligned block, and shared with
        // the kernel, hence accessed atomically.
        unsafe { &*block.add(8).cast::<AtomicU32>() }
    }

    /// Hands the block back to the kernel and moves on.
    fn release(&mut self, block: *mut u8) {
        self.status(block).store(libc::TP_STATUS_KERNEL, Ordering::Release);
        self.remaining = 0;
        self.block = (self.block + 1) % self.block_count;
    }

    fn corrupt(&mut self, block: *mut u8) {
        self.corrupt_blocks += 1;
        self.release(block);
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A `PACKET_FANOUT_CBPF` group on one uplink: member k receives the frames the group's program
/// returns k for. Members are indexed in join order and the kernel fills a gap left by a
/// closed member with the last one, so the group keeps every member open (duplicated fds)
/// for its whole life: indices never move.
#[derive(Debug)]
pub struct FanoutGroup {
    members: Vec<OwnedFd>,
    id: u16,
    at: IfRef,
}

impl FanoutGroup {
    /// Opens `members` receive sockets on `ifname` (in `netns`) joined in one fanout group with a
    /// group id unique in the namespace (`PACKET_FANOUT_FLAG_UNIQUEID`). The program starts as
    /// "everything to member 0". Returns the group and the sockets, member 0 first.
    pub fn open(
        ifname: &str,
        netns: Option<&str>,
        members: usize,
        ring: RingConfig,
    ) -> Result<(FanoutGroup, Vec<PacketSocket>), PacketError> {
        let at = IfRef { name: ifname.to_string(), netns: netns.map(str::to_string) };
        if members == 0 || members > MAX_FANOUT_MEMBERS {
            return Err(PacketError::BadMembers { at, members });
        }
        let ifindex = LinkCtl::new(netns)?.ifindex(ifname)?;
        let mut sockets: Vec<PacketSocket> = Vec::with_capacity(members);
        let mut id = 0u16;
        // The kernel skips host-sent frames for the whole group with IGNORE_OUTGOING (5.x+);
        // each socket's filter drops them as well, for kernels without it.
        let mut flags = libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING;
        for k in 0..members {
            // Promiscuous mode once for the group (member 0 holds it).
            let s = PacketSocket::open_rx_at(at.clone(), ifindex, netns, ring, k == 0)?;
            let join = |type_flags: u32, id: u16| -> io::Result<()> {
                let value: u32 = u32::from(id) | (type_flags << 16);
                setsockopt(&s.fd, libc::SOL_PACKET, libc::PACKET_FANOUT, &value)
            };
            let base = libc::PACKET_FANOUT_CBPF | flags;
            let joined = if k == 0 {
                match join(base | libc::PACKET_FANOUT_FLAG_UNIQUEID, 0) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        flags = 0;
                        join(libc::PACKET_FANOUT_CBPF | libc::PACKET_FANOUT_FLAG_UNIQUEID, 0)
                    }
                    other => other,
                }
                .and_then(|()| s.fanout_value())
                .map(|v| id = (v & 0xffff) as u16)
            } else {
                join(base, id)
            };
            joined.map_err(|source| PacketError::FanoutRefused { at: at.clone(), source })?;
            sockets.push(s);
        }
        let mut kept = Vec::with_capacity(members);
        for s in &sockets {
            kept.push(s.fd.try_clone().map_err(|source| PacketError::Os { at: at.clone(), op: "dup", source })?);
        }
        let group = FanoutGroup { members: kept, id, at };
        group.set_program(&steering::fanout_program(&[]).unwrap_or_default())?;
        for s in &mut sockets {
            s.set_filter(&steering::drop_outgoing(), "SO_ATTACH_FILTER")?;
        }
        Ok((group, sockets))
    }

    /// The group id the kernel assigned.
    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Installs a steering program (see [`crate::steering::fanout_program`]); atomic for the
    /// whole group.
    pub fn set_program(&self, prog: &[libc::sock_filter]) -> Result<(), PacketError> {
        let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut libc::sock_filter };
        let Some(fd) = self.members.first() else {
            return Ok(());
        };
        setsockopt(fd, libc::SOL_PACKET, libc::PACKET_FANOUT_DATA, &fprog)
            .map_err(|source| PacketError::ProgramRefused { at: self.at.clone(), source })
    }

    /// Builds and installs the program for `rules`.
    pub fn steer(&self, rules: &[steering::SteeringRule]) -> Result<(), PacketError> {
        let prog =
            steering::fanout_program(rules).map_err(|source| PacketError::Steering { at: self.at.clone(), source })?;
        self.set_program(&prog)
    }

    pub fn interface(&self) -> &IfRef {
        &self.at
    }
}

//! AF_XDP sockets (XSK) on one queue of an interface, hand-written over the kernel interface
//! (`linux/if_xdp.h`): no AF_XDP crate fits (the pure-Rust ones seen were EUPL-licensed or
//! unmaintained, `aya` needs a newer Rust than vmq's 1.95, `libbpf-sys` would add a C build).
//!
//! One UMEM (an anonymous mapping cut into page-sized chunks) is registered on the first socket,
//! with its fill and completion rings. Every further socket on the same interface queue shares
//! it (`XDP_SHARED_UMEM`): the kernel only delivers to an XSK frames of the queue it is bound
//! to, and sockets of one queue share one buffer pool. Layout of the chunks: the first
//! `rx_frames` feed the fill ring (any receive socket's frames come from them and go back after
//! the copy out), the rest are transmit buffers, recycled through the completion ring.
//!
//! The fill and completion rings are shared by all the sockets' users (workers), so they sit
//! behind a mutex; each socket's own RX or TX ring belongs to one user.
//!
//! Frames larger than a chunk (jumbo MTUs) travel as several descriptors, one chunk each, all
//! but the last marked `XDP_PKT_CONTD` (multi-buffer, `XDP_USE_SG`, Linux 6.6 and later). The
//! sockets ask for it at bind; a kernel or driver that refuses it leaves them single-buffer,
//! which [`XskQueue::max_frame_len`] reports.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::cvt;
use crate::link::{IfRef, LinkCtl, LinkError};
use crate::netns::{self, NetnsError};
use crate::xsk_ring::{self, RingCorrupt};

/// Bytes per UMEM chunk: one page, the largest frame one descriptor carries in copy mode
/// without multi-buffer.
pub const FRAME_SIZE: u32 = 4096;
/// Where the kernel puts a received frame in its chunk (XDP_PACKET_HEADROOM, copy mode): the
/// largest frame a chunk holds is `FRAME_SIZE - RX_HEADROOM`.
pub const RX_HEADROOM: u32 = 256;
/// The largest Ethernet frame an AF_XDP uplink carries without multi-buffer: with a VLAN tag
/// and the kernel's skb_shared_info reserve (320 bytes) it must fit one chunk.
pub const MAX_FRAME_LEN: usize = (FRAME_SIZE - RX_HEADROOM - 320) as usize;
/// The most descriptors (chunks) one frame may have with multi-buffer: enough for a 9000-byte
/// MTU with a VLAN tag (3 chunks), with room to spare. A frame with more is dropped and counted.
pub const MAX_PARTS: u32 = 4;
/// The largest Ethernet frame with multi-buffer.
pub const MAX_FRAME_LEN_MULTI_BUFFER: usize = MAX_FRAME_LEN * MAX_PARTS as usize;

const XDP_SHARED_UMEM: u16 = 1 << 0;
const XDP_COPY: u16 = 1 << 1;
const XDP_ZEROCOPY: u16 = 1 << 2;
/// Multi-buffer frames (since Linux 6.6; older kernels refuse the flag with EINVAL).
const XDP_USE_SG: u16 = 1 << 4;
/// Completion ring size (and transmit chunks) of a UMEM without a transmit socket: the kernel
/// wants the ring, nothing uses it.
const MIN_COMPLETION_RING: u32 = 64;
/// Most `sendto` kicks per flush (each sends up to the kernel's copy-mode budget of 32).
const MAX_KICKS: usize = 64;

/// How the socket moves frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Zero-copy if the driver supports it, else copy mode.
    Auto,
    On,
    Off,
}

/// Sizes of the rings and the UMEM (all powers of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XskConfig {
    pub rx_frames: u32,
    /// Transmit chunks; 0: no transmit socket.
    pub tx_frames: u32,
    pub zero_copy: ZeroCopy,
    /// Ask for multi-buffer frames (`XDP_USE_SG`); without them a frame is one chunk at most.
    pub multi_buffer: bool,
}

impl Default for XskConfig {
    fn default() -> Self {
        XskConfig { rx_frames: 4096, tx_frames: 1024, zero_copy: ZeroCopy::Auto, multi_buffer: true }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("{at}: {op}: {source}")]
    Os { at: IfRef, op: &'static str, source: io::Error },
    #[error("{at}: the driver refuses zero-copy AF_XDP (zero_copy = \"on\"): {source}")]
    NoZeroCopy { at: IfRef, source: io::Error },
    #[error("{at}: ring sizes must be powers of two (rx {rx}, tx {tx})")]
    BadSizes { at: IfRef, rx: u32, tx: u32 },
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// A failed AF_XDP transmit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XskTxError {
    #[error("no free transmit buffer or ring slot")]
    Busy,
    #[error("frame of {len} bytes is larger than the socket carries ({max})")]
    TooBig { len: usize, max: usize },
    #[error(transparent)]
    Corrupt(#[from] RingCorrupt),
}

/// One mmap'd ring: producer and consumer words and the entries (the flags word is unused:
/// vmq binds without XDP_USE_NEED_WAKEUP and kicks on every transmit).
struct Ring {
    map: *mut u8,
    map_len: usize,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    entries: *mut u8,
    size: u32,
    entry_size: usize,
}

// SAFETY: the mapping is owned by its Ring and only touched through &mut self or the atomics.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: map/map_len are the mapping made in `Ring::map`, unmapped once here.
        unsafe { libc::munmap(self.map.cast(), self.map_len) };
    }
}

impl Ring {
    fn map(fd: &OwnedFd, off: &libc::xdp_ring_offset, size: u32, entry_size: usize, pgoff: u64) -> io::Result<Ring> {
        let map_len = off.desc as usize + size as usize * entry_size;
        // SAFETY: maps the ring the kernel allocated for this socket at its documented page
        // offset; the result is checked.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                pgoff as libc::off_t,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map: *mut u8 = map.cast();
        // SAFETY: the kernel's offsets lie inside the mapping of map_len bytes; the words are
        // 4-byte aligned u32s the kernel updates concurrently (hence atomics).
        unsafe {
            Ok(Ring {
                map,
                map_len,
                producer: map.add(off.producer as usize).cast(),
                consumer: map.add(off.consumer as usize).cast(),
                entries: map.add(off.desc as usize),
                size,
                entry_size,
            })
        }
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into the live mapping (see `map`).
        unsafe { &*self.producer }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: points into the live mapping (see `map`).
        unsafe { &*self.consumer }
    }

    /// Entries ready for this consumer (the kernel produces).
    fn ready(&self) -> Result<u32, RingCorrupt> {
        let prod = self.producer().load(Ordering::Acquire);
        let cons = self.consumer().load(Ordering::Relaxed);
        xsk_ring::consumer_ready(prod, cons, self.size)
    }

    /// Slots free for this producer (the kernel consumes).
    fn free(&self) -> Result<u32, RingCorrupt> {
        let prod = self.producer().load(Ordering::Relaxed);
        let cons = self.consumer().load(Ordering::Acquire);
        xsk_ring::producer_free(prod, cons, self.size)
    }

    fn entry(&self, index: u32) -> *mut u8 {
        let at = xsk_ring::slot(index, self.size) * self.entry_size;
        // SAFETY: slot() < size, so the entry lies inside the entries array.
        unsafe { self.entries.add(at) }
    }

    /// Reads entry `k` after the consumer index.
    fn read_u64(&self, k: u32) -> u64 {
        let cons = self.consumer().load(Ordering::Relaxed);
        // SAFETY: an 8-byte aligned entry inside the ring (entry()).
        unsafe { std::ptr::read_volatile(self.entry(cons.wrapping_add(k)).cast::<u64>()) }
    }

    fn read_desc(&self, k: u32) -> libc::xdp_desc {
        let cons = self.consumer().load(Ordering::Relaxed);
        // SAFETY: a 16-byte descriptor inside the ring (entry()).
        unsafe { std::ptr::read_volatile(self.entry(cons.wrapping_add(k)).cast::<libc::xdp_desc>()) }
    }

    fn release(&self, n: u32) {
        let cons = self.consumer().load(Ordering::Relaxed);
        self.consumer().store(cons.wrapping_add(n), Ordering::Release);
    }

    fn write_u64(&self, k: u32, v: u64) {
        let prod = self.producer().load(Ordering::Relaxed);
        // SAFETY: an 8-byte aligned entry inside the ring (entry()).
        unsafe { std::ptr::write_volatile(self.entry(prod.wrapping_add(k)).cast::<u64>(), v) }
    }

    fn write_desc(&self, k: u32, d: libc::xdp_desc) {
        let prod = self.producer().load(Ordering::Relaxed);
        // SAFETY: a 16-byte descriptor inside the ring (entry()).
        unsafe { std::ptr::write_volatile(self.entry(prod.wrapping_add(k)).cast::<libc::xdp_desc>(), d) }
    }

    fn submit(&self, n: u32) {
        let prod = self.producer().load(Ordering::Relaxed);
        self.producer().store(prod.wrapping_add(n), Ordering::Release);
    }
}

/// The UMEM area.
struct Area {
    base: *mut u8,
    len: usize,
}

// SAFETY: the area is plain memory shared with the kernel; chunks are owned by exactly one party
// at a time (the ring protocol), and vmq touches a chunk only while it owns it.
unsafe impl Send for Area {}
// SAFETY: as above; concurrent users touch disjoint chunks.
unsafe impl Sync for Area {}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: base/len are the mapping made in `Umem::new`, unmapped once here.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// The state the sockets of one queue share: fill and completion rings, free TX chunks.
struct Shared {
    fill: Ring,
    completion: Ring,
    free_tx: Vec<u64>,
    /// Descriptors or ring indices that made no sense (never seen; counted, not trusted).
    corrupt: u64,
}

/// A UMEM shared by the sockets of one queue. Field order: rings unmap before the socket
/// that owns them closes, the area last.
struct Umem {
    shared: Mutex<Shared>,
    first: OwnedFd,
    area: Area,
}

impl Umem {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns RX chunks to the fill ring.
    fn refill(&self, chunks: &[u64]) {
        let mut s = self.lock();
        let free = match s.fill.free() {
            Ok(n) => n as usize,
            Err(_) => {
                s.corrupt += 1;
                return;
            }
        };
        // The fill ring holds every RX chunk, so there is always room; a chunk that does not
        // fit is lost (counted), never overwritten.
        let n = chunks.len().min(free);
        for (k, &c) in chunks[..n].iter().enumerate() {
            s.fill.write_u64(k as u32, c);
        }
        s.fill.submit(n as u32);
        s.corrupt += (chunks.len() - n) as u64;
    }
}

fn setsockopt<T>(fd: &OwnedFd, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: value points at a live T of size_of::<T>() bytes the kernel only reads.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_XDP, name, (value as *const T).cast(), size_of::<T>() as u32)
    };
    cvt(r).map(|_| ())
}

fn mmap_offsets(fd: &OwnedFd) -> io::Result<libc::xdp_mmap_offsets> {
    // SAFETY: plain old data; all-zero is valid.
    let mut off: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
    // SAFETY: off is writable for len bytes; the kernel writes at most that.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            libc::XDP_MMAP_OFFSETS,
            (&mut off as *mut libc::xdp_mmap_offsets).cast(),
            &mut len,
        )
    };
    cvt(r).map(|_| off)
}

fn xsk_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    // SAFETY: a fresh descriptor we own.
    cvt(fd).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: &OwnedFd, ifindex: u32, queue: u32, flags: u16, shared_fd: Option<RawFd>) -> io::Result<()> {
    let sxdp = libc::sockaddr_xdp {
        sxdp_family: libc::AF_XDP as u16,
        sxdp_flags: flags,
        sxdp_ifindex: ifindex,
        sxdp_queue_id: queue,
        sxdp_shared_umem_fd: shared_fd.unwrap_or(0) as u32,
    };
    // SAFETY: sxdp is a valid sockaddr_xdp of the given size.
    let r = unsafe {
        libc::bind(fd.as_raw_fd(), (&sxdp as *const libc::sockaddr_xdp).cast(), size_of::<libc::sockaddr_xdp>() as u32)
    };
    cvt(r).map(|_| ())
}

/// The AF_XDP sockets of one interface queue: `rx` receive sockets (the XSKMAP's entries) and
/// a transmit socket where asked for (one per interface is enough), on one shared UMEM.
pub struct XskQueue {
    pub rx: Vec<XskRx>,
    pub tx: Option<XskTx>,
    /// The driver moves frames without a copy.
    pub zero_copy: bool,
    /// Frames may span several chunks (`XDP_USE_SG` was accepted).
    pub multi_buffer: bool,
}

impl XskQueue {
    /// The largest Ethernet frame the sockets carry.
    pub fn max_frame_len(&self) -> usize {
        if self.multi_buffer { MAX_FRAME_LEN_MULTI_BUFFER } else { MAX_FRAME_LEN }
    }
}

/// What one [`XskRx::recv_batch`] took from the ring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecvCounts {
    /// Frames handed over.
    pub frames: usize,
    /// Frames dropped for a descriptor outside the UMEM or its chunk.
    pub bad: u64,
    /// Frames dropped for having more than [`MAX_PARTS`] parts.
    pub oversize: u64,
}

/// A receive socket.
pub struct XskRx {
    ring: Ring,
    fd: OwnedFd,
    umem: Arc<Umem>,
    /// Chunks read in the current batch, returned to the fill ring together.
    done: Vec<u64>,
    /// Most descriptors per frame (1 without multi-buffer).
    max_parts: u32,
    /// Inside a frame with too many parts: its remaining descriptors are skipped.
    discarding: bool,
}

/// The transmit socket.
pub struct XskTx {
    ring: Ring,
    fd: OwnedFd,
    umem: Arc<Umem>,
    /// Descriptors written but not yet submitted.
    pending: u32,
    /// Most descriptors per frame (1 without multi-buffer).
    max_parts: u32,
}

impl std::fmt::Debug for XskRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XskRx").field("fd", &self.fd.as_raw_fd()).finish()
    }
}

impl XskQueue {
    /// Opens `rx_sockets` receive sockets on queue `queue` of `ifname` (in `netns`), and a
    /// transmit socket if `cfg.tx_frames` is not 0.
    pub fn open(
        ifname: &str,
        netns: Option<&str>,
        queue: u32,
        rx_sockets: usize,
        cfg: XskConfig,
    ) -> Result<XskQueue, XskError> {
        let with_tx = cfg.tx_frames > 0;
        // The completion ring must exist even without a transmit socket.
        let cfg = XskConfig { tx_frames: cfg.tx_frames.max(MIN_COMPLETION_RING), ..cfg };
        let at = IfRef { name: ifname.to_string(), netns: netns.map(str::to_string) };
        if !cfg.rx_frames.is_power_of_two() || !cfg.tx_frames.is_power_of_two() {
            return Err(XskError::BadSizes { at, rx: cfg.rx_frames, tx: cfg.tx_frames });
        }
        let ifindex = LinkCtl::new(netns)?.ifindex(ifname)?;
        let os = |op| {
            let at = at.clone();
            move |source| XskError::Os { at, op, source }
        };
        let open = || netns::run_in_opt(netns, xsk_socket);
        let first = open()?.map_err(os("socket(AF_XDP)"))?;
        let frames = cfg.rx_frames + cfg.tx_frames;
        let len = frames as usize * FRAME_SIZE as usize;
        // SAFETY: a fresh anonymous mapping; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(os("mmap UMEM")(io::Error::last_os_error()));
        }
        let area = Area { base: base.cast(), len };
        let reg = libc::xdp_umem_reg {
            addr: base as u64,
            len: len as u64,
            chunk_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(&first, libc::XDP_UMEM_REG, &reg).map_err(os("XDP_UMEM_REG"))?;
        setsockopt(&first, libc::XDP_UMEM_FILL_RING, &cfg.rx_frames).map_err(os("XDP_UMEM_FILL_RING"))?;
        setsockopt(&first, libc::XDP_UMEM_COMPLETION_RING, &cfg.tx_frames).map_err(os("XDP_UMEM_COMPLETION_RING"))?;
        setsockopt(&first, libc::XDP_RX_RING, &cfg.rx_frames).map_err(os("XDP_RX_RING"))?;
        let off = mmap_offsets(&first).map_err(os("XDP_MMAP_OFFSETS"))?;
        let fill = Ring::map(&first, &off.fr, cfg.rx_frames, 8, libc::XDP_UMEM_PGOFF_FILL_RING)
            .map_err(os("mmap fill ring"))?;
        let completion = Ring::map(&first, &off.cr, cfg.tx_frames, 8, libc::XDP_UMEM_PGOFF_COMPLETION_RING)
            .map_err(os("mmap completion ring"))?;
        let rx0 =
            Ring::map(&first, &off.rx, cfg.rx_frames, size_of::<libc::xdp_desc>(), libc::XDP_PGOFF_RX_RING as u64)
                .map_err(os("mmap RX ring"))?;
        // Every RX chunk starts on the fill ring.
        for k in 0..cfg.rx_frames {
            fill.write_u64(k, u64::from(k) * u64::from(FRAME_SIZE));
        }
        fill.submit(cfg.rx_frames);
        let free_tx = (cfg.rx_frames..frames).map(|k| u64::from(k) * u64::from(FRAME_SIZE)).collect();
        // Multi-buffer first where asked for; a kernel (before 6.6) or zero-copy driver without
        // it refuses the flag, and the socket is bound again without it.
        let bind_mode = |mode: u16| -> io::Result<bool> {
            if cfg.multi_buffer && bind(&first, ifindex, queue, mode | XDP_USE_SG, None).is_ok() {
                return Ok(true);
            }
            bind(&first, ifindex, queue, mode, None).map(|()| false)
        };
        let (zero_copy, multi_buffer) = match cfg.zero_copy {
            ZeroCopy::Off => (false, bind_mode(XDP_COPY).map_err(os("bind (copy mode)"))?),
            ZeroCopy::On => {
                (true, bind_mode(XDP_ZEROCOPY).map_err(|source| XskError::NoZeroCopy { at: at.clone(), source })?)
            }
            ZeroCopy::Auto => match bind_mode(XDP_ZEROCOPY) {
                Ok(sg) => (true, sg),
                Err(_) => (false, bind_mode(XDP_COPY).map_err(os("bind (copy mode)"))?),
            },
        };
        let max_parts = if multi_buffer { MAX_PARTS } else { 1 };
        let first_raw = first.as_raw_fd();
        let umem = Arc::new(Umem { shared: Mutex::new(Shared { fill, completion, free_tx, corrupt: 0 }), first, area });
        let first_dup = umem.first.try_clone().map_err(os("dup"))?;
        let new_rx = |ring, fd, umem| XskRx { ring, fd, umem, done: Vec::new(), max_parts, discarding: false };
        let mut rx = vec![new_rx(rx0, first_dup, umem.clone())];
        let shared_socket = |ring_opt: libc::c_int, size: u32| -> Result<(OwnedFd, Ring), XskError> {
            let fd = open()?.map_err(os("socket(AF_XDP)"))?;
            setsockopt(&fd, ring_opt, &size).map_err(os("XDP_RX_RING/XDP_TX_RING"))?;
            let off = mmap_offsets(&fd).map_err(os("XDP_MMAP_OFFSETS"))?;
            let (o, pgoff) = if ring_opt == libc::XDP_RX_RING {
                (&off.rx, libc::XDP_PGOFF_RX_RING as u64)
            } else {
                (&off.tx, libc::XDP_PGOFF_TX_RING as u64)
            };
            let ring = Ring::map(&fd, o, size, size_of::<libc::xdp_desc>(), pgoff).map_err(os("mmap ring"))?;
            bind(&fd, ifindex, queue, XDP_SHARED_UMEM, Some(first_raw)).map_err(os("bind (XDP_SHARED_UMEM)"))?;
            Ok((fd, ring))
        };
        for _ in 1..rx_sockets.max(1) {
            let (fd, ring) = shared_socket(libc::XDP_RX_RING, cfg.rx_frames)?;
            rx.push(new_rx(ring, fd, umem.clone()));
        }
        let tx = if with_tx {
            let (fd, ring) = shared_socket(libc::XDP_TX_RING, cfg.tx_frames)?;
            Some(XskTx { ring, fd, umem, pending: 0, max_parts })
        } else {
            None
        };
        Ok(XskQueue { rx, tx, zero_copy, multi_buffer })
    }
}

impl XskRx {
    /// Hands up to `max` received frames to `each` (a frame as its parts, one per chunk), then
    /// returns their chunks to the fill ring.
    pub fn recv_batch(&mut self, max: usize, mut each: impl FnMut(&[&[u8]])) -> RecvCounts {
        let mut counts = RecvCounts::default();
        let ready = match self.ring.ready() {
            Ok(n) => n,
            Err(_) => {
                counts.bad = 1;
                return counts;
            }
        };
        if ready == 0 {
            return counts;
        }
        let umem_len = self.umem.area.len as u64;
        let base = self.umem.area.base;
        self.done.clear();
        let mut taken = 0u32;
        while taken < ready && counts.frames < max {
            let span = xsk_ring::next_frame(|i| self.ring.read_desc(taken + i).options, ready - taken, self.max_parts);
            let (n, whole) = match span {
                xsk_ring::FrameSpan::Whole(n) => (n, true),
                xsk_ring::FrameSpan::TooLong(n) => (n, false),
                xsk_ring::FrameSpan::Partial => break,
            };
            let mut parts: [&[u8]; MAX_PARTS as usize] = [&[]; MAX_PARTS as usize];
            let mut in_umem = true;
            for k in 0..n {
                let d = self.ring.read_desc(taken + k);
                match (xsk_ring::desc_range(d.addr, d.len, umem_len, FRAME_SIZE), parts.get_mut(k as usize)) {
                    (Some(range), Some(part)) => {
                        // SAFETY: the range lies inside the UMEM (desc_range), in a chunk the
                        // kernel handed to vmq and does not touch until it is on the fill ring
                        // again, which happens after `each` returns.
                        *part = unsafe { std::slice::from_raw_parts(base.add(range.start), range.end - range.start) };
                    }
                    (None, _) => in_umem = false,
                    (Some(_), None) => {}
                }
                if let Some(c) = xsk_ring::chunk_base(d.addr, umem_len, FRAME_SIZE) {
                    self.done.push(c);
                }
            }
            taken += n;
            if !whole {
                // Counted once, at its first descriptors; the rest is skipped as it comes.
                if !self.discarding {
                    counts.oversize += 1;
                }
                self.discarding = true;
            } else if std::mem::take(&mut self.discarding) {
                // The tail of a frame with too many parts.
            } else if in_umem {
                each(&parts[..n as usize]);
                counts.frames += 1;
            } else {
                counts.bad += 1;
            }
        }
        self.ring.release(taken);
        self.umem.refill(&self.done);
        counts
    }

    /// The socket's kernel drop counter (`XDP_STATISTICS` rx_dropped + rx_ring_full), running total.
    pub fn drops(&self) -> u64 {
        #[repr(C)]
        #[derive(Default)]
        struct XdpStatistics {
            rx_dropped: u64,
            rx_invalid_descs: u64,
            tx_invalid_descs: u64,
            rx_ring_full: u64,
            rx_fill_ring_empty_descs: u64,
            tx_ring_empty_descs: u64,
        }
        let mut st = XdpStatistics::default();
        let mut len = size_of::<XdpStatistics>() as libc::socklen_t;
        // SAFETY: st is writable for len bytes; the kernel writes at most that.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_STATISTICS,
                (&mut st as *mut XdpStatistics).cast(),
                &mut len,
            )
        };
        if r == 0 { st.rx_dropped + st.rx_ring_full } else { 0 }
    }
}

impl AsRawFd for XskRx {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl XskTx {
    /// Takes back transmit chunks the kernel has finished with.
    fn complete(&self, s: &mut Shared) {
        let ready = match s.completion.ready() {
            Ok(n) => n,
            Err(_) => {
                s.corrupt += 1;
                return;
            }
        };
        let umem_len = self.umem.area.len as u64;
        for k in 0..ready {
            let addr = s.completion.read_u64(k);
            match xsk_ring::chunk_base(addr, umem_len, FRAME_SIZE) {
                Some(c) => s.free_tx.push(c),
                None => s.corrupt += 1,
            }
        }
        s.completion.release(ready);
    }

    /// Copies one frame (the concatenation of `parts`) into transmit chunks (one, or several
    /// with multi-buffer) and queues it; [`XskTx::flush`] starts the transmission.
    pub fn send(&mut self, parts: &[&[u8]]) -> Result<(), XskTxError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let max = self.max_parts as usize * FRAME_SIZE as usize;
        if len > max || len == 0 {
            return Err(XskTxError::TooBig { len, max });
        }
        let chunks_needed = len.div_ceil(FRAME_SIZE as usize);
        if (self.ring.free()? as usize) < self.pending as usize + chunks_needed {
            return Err(XskTxError::Busy);
        }
        let mut chunks = [0u64; MAX_PARTS as usize];
        let mut s = self.umem.lock();
        if s.free_tx.len() < chunks_needed {
            self.complete(&mut s);
            if s.free_tx.len() < chunks_needed {
                return Err(XskTxError::Busy);
            }
        }
        for c in chunks.iter_mut().take(chunks_needed) {
            *c = s.free_tx.pop().unwrap_or_default();
        }
        drop(s);
        // Fill the chunks in order, each up to FRAME_SIZE bytes.
        let mut chunk = 0usize;
        let mut used = 0usize;
        for p in parts {
            let mut rest: &[u8] = p;
            while !rest.is_empty() {
                if used == FRAME_SIZE as usize {
                    chunk += 1;
                    used = 0;
                }
                let n = rest.len().min(FRAME_SIZE as usize - used);
                let at = chunks[chunk] as usize + used;
                // SAFETY: chunks[chunk] is a transmit chunk vmq owns (off every ring), inside
                // the UMEM; used + n <= FRAME_SIZE keeps the copy inside it, and chunk stays
                // below chunks_needed since len bytes fill exactly that many chunks.
                unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), self.umem.area.base.add(at), n) };
                used += n;
                rest = &rest[n..];
            }
        }
        for (k, &addr) in chunks[..chunks_needed].iter().enumerate() {
            let last = k + 1 == chunks_needed;
            let part_len = if last { len - k * FRAME_SIZE as usize } else { FRAME_SIZE as usize };
            let options = if last { 0 } else { xsk_ring::PKT_CONTD };
            self.ring.write_desc(self.pending, libc::xdp_desc { addr, len: part_len as u32, options });
            self.pending += 1;
        }
        Ok(())
    }

    /// Submits the queued frames and wakes the kernel to send them; takes back completed chunks.
    /// Copy mode transmits in the `sendto` itself, at most a small budget (32) of descriptors
    /// per call: the kick repeats while descriptors are left, since nothing else would send
    /// them (a TCP peer waiting for the ACKs among them would stall).
    pub fn flush(&mut self) {
        if self.pending > 0 {
            self.ring.submit(self.pending);
            self.pending = 0;
        }
        for _ in 0..MAX_KICKS {
            if self.outstanding() == 0 {
                break;
            }
            // SAFETY: sendto with no buffer and no address, the documented AF_XDP kick.
            let r = unsafe {
                libc::sendto(self.fd.as_raw_fd(), std::ptr::null(), 0, libc::MSG_DONTWAIT, std::ptr::null(), 0)
            };
            if r < 0 {
                let e = io::Error::last_os_error().raw_os_error();
                // EAGAIN: budget used, more to send; EBUSY/ENOBUFS: the device is full, the next
                // flush tries again.
                if e != Some(libc::EAGAIN) {
                    break;
                }
            }
        }
        let mut s = self.umem.lock();
        self.complete(&mut s);
    }

    /// Descriptors submitted that the kernel has not taken yet.
    fn outstanding(&self) -> u32 {
        let prod = self.ring.producer().load(Ordering::Relaxed);
        let cons = self.ring.consumer().load(Ordering::Acquire);
        prod.wrapping_sub(cons).min(self.ring.size)
    }

    /// Descriptors or ring indices that made no sense so far.
    pub fn corrupt(&self) -> u64 {
        self.umem.lock().corrupt
    }
}

impl AsRawFd for XskTx {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

//! Device side of a virtio-net port: pull frames the guest transmitted out of its TX virtqueue
//! and write frames into the buffers it posted on its RX virtqueue (with mergeable RX buffers).
//! The same code serves in-process `mem` ports and vhost-user VMs: both are a split ring
//! ([`crate::ring`]) over a `GuestMemoryMmap`.
//!
//! Hand-written because it is the per-frame hot path and has to count every bad guest input
//! instead of stopping the queue.

use vm_memory::{Bytes, GuestAddress, VolatileSlice};
use vmq_core::DropReason;
use vmq_wire::VnetHdr;

use std::sync::Arc;

use crate::guest_view::GuestView;
use crate::port::GuestTail;
use crate::ring::{Memory, Ring, RingError, Segment, write_guest};

/// Why a frame could not be taken from or given to a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VirtioError {
    #[error("descriptor chain points outside guest memory, loops, or has the wrong direction")]
    BadDescriptor,
    #[error("frame longer than the buffer allows")]
    TooLong,
    #[error("guest posted no (or not enough) receive buffers")]
    NoBuffer,
    #[error("virtio-net header missing or invalid")]
    BadHeader,
    /// The ring itself is unusable (see [`RingError::Broken`]); reported once when it breaks.
    #[error("the ring is broken until the driver resets it")]
    RingBroken,
}

impl VirtioError {
    /// The drop reason a frame this error hit is counted under.
    pub fn drop_reason(self) -> DropReason {
        match self {
            VirtioError::NoBuffer => DropReason::NoBuffer,
            VirtioError::TooLong => DropReason::Oversize,
            VirtioError::BadHeader => DropReason::Malformed,
            VirtioError::BadDescriptor => DropReason::BadDescriptor,
            VirtioError::RingBroken => DropReason::RingBroken,
        }
    }
}

/// Frames longer than this (virtio-net header included) stay in the sender's memory past their
/// head; shorter ones are copied whole (a copy that small costs little, and a split frame keeps
/// the sender's chain out until delivery). 512 rather than 2048: 1518-byte frames then take the
/// one-copy path too, 4 to 8% more PVP frames/s and 5 to 20% more in-process (measured A/B).
pub const SPLIT_MIN: usize = 512;
/// Bytes of a split frame copied to vmq's buffer: the virtio-net header and every header vmq
/// reads (Ethernet, VLAN, IPv4/IPv6 with extension headers, TCP with options).
pub const SPLIT_HEAD: usize = 256;

/// A TX frame taken with [`pop_tx_split`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitTx {
    /// Bytes copied into the caller's buffer (the whole frame, or its head).
    pub head_len: usize,
    /// The chain is still the device's: return it with `add_used` once the tail is delivered.
    /// None: it was returned already (the frame was copied whole).
    pub deferred: Option<u16>,
}

/// Pops the next TX chain and copies its readable descriptors into `buf`: the whole frame, which
/// goes back to the guest at once (used length 0), or for a frame longer than [`SPLIT_MIN`] only
/// its first [`SPLIT_HEAD`] bytes, the rest described in `tail` (in `mem`, the ring's memory)
/// and the chain kept until delivery. `Ok(None)`: nothing available. A bad chain is returned to
/// the guest too (so the ring keeps moving) and reported as an error for the caller to count.
/// A ring that breaks is reported once ([`VirtioError::RingBroken`]), then reads as empty.
pub fn pop_tx_split(
    ring: &mut Ring<'_, '_>,
    mem: &Arc<Memory>,
    segments: &mut Vec<Segment>,
    buf: &mut [u8],
    tail: &mut GuestTail,
) -> Result<Option<SplitTx>, VirtioError> {
    let head = match ring.pop(segments) {
        Ok(Some(head)) => head,
        Ok(None) => return Ok(None),
        Err(RingError::BadChain { head }) => {
            // Always hand the chain back: a stuck descriptor would wedge the guest's TX queue.
            ring.add_used(head, 0);
            return Err(VirtioError::BadDescriptor);
        }
        Err(RingError::Broken) => return Ok(None),
        Err(RingError::BadAvailIndex | RingError::BadRing) => return Err(VirtioError::RingBroken),
    };
    let total: usize = segments.iter().map(|s| s.len as usize).sum();
    let fail = |ring: &mut Ring<'_, '_>, e: VirtioError| {
        ring.add_used(head, 0);
        Err(e)
    };
    if segments.iter().any(|s| s.write) {
        return fail(ring, VirtioError::BadDescriptor);
    }
    if total > buf.len() {
        return fail(ring, VirtioError::TooLong);
    }
    if total < VnetHdr::LEN {
        return fail(ring, VirtioError::BadHeader);
    }
    let split = total > SPLIT_MIN;
    let want = if split { SPLIT_HEAD } else { total };
    if split {
        // Only a split frame uses its tail: no reference count taken and dropped per frame.
        tail.reset(mem.clone());
    }
    let mut copied = 0usize;
    for seg in segments.iter() {
        let seg_len = seg.len as usize;
        let n = seg_len.min(want - copied);
        if n > 0 && !ring.guest().read(seg.addr, &mut buf[copied..copied + n]) {
            return fail(ring, VirtioError::BadDescriptor);
        }
        copied += n;
        if n < seg_len {
            let rest = GuestAddress(seg.addr.0 + n as u64);
            if !tail.push(rest, (seg_len - n) as u32) {
                // Not in one memory region (rare): give up splitting, copy it all.
                return copy_whole(ring, head, segments, buf, total);
            }
        }
    }
    if !split {
        ring.add_used(head, 0);
        return Ok(Some(SplitTx { head_len: total, deferred: None }));
    }
    Ok(Some(SplitTx { head_len: copied, deferred: Some(head) }))
}

fn copy_whole(
    ring: &mut Ring<'_, '_>,
    head: u16,
    segments: &[Segment],
    buf: &mut [u8],
    total: usize,
) -> Result<Option<SplitTx>, VirtioError> {
    ring.add_used(head, 0);
    let mut at = 0;
    for seg in segments {
        let n = seg.len as usize;
        if !ring.guest().read(seg.addr, &mut buf[at..at + n]) {
            return Err(VirtioError::BadDescriptor);
        }
        at += n;
    }
    Ok(Some(SplitTx { head_len: total, deferred: None }))
}

/// Frames up to this size (with header) are assembled before they are written to the guest.
const SMALL_FRAME: usize = 256;

/// Writes frames into a guest's RX virtqueue. Keeps no state between batches except the queue
/// position; `mrg_rxbuf` says whether one frame may span several chains (VIRTIO_NET_F_MRG_RXBUF).
pub struct RxWriter {
    pub mrg_rxbuf: bool,
    segments: Vec<Segment>,
    regions: Vec<Segment>,
    heads: Vec<(u16, u32)>,
    /// Bytes the last push wrote (or meant to) into `regions`, header included.
    last_total: usize,
    /// Where a small frame is assembled: kept, so that it is not zeroed for every frame.
    small: Box<[u8; SMALL_FRAME]>,
}

impl RxWriter {
    pub fn new(mrg_rxbuf: bool) -> RxWriter {
        RxWriter {
            mrg_rxbuf,
            segments: Vec::with_capacity(8),
            regions: Vec::with_capacity(8),
            heads: Vec::with_capacity(8),
            last_total: 0,
            small: Box::new([0u8; SMALL_FRAME]),
        }
    }

    /// The guest memory the last push wrote, or may have written part of (a push that failed
    /// midway), as (address, length) ranges: for the live-migration dirty log.
    pub fn for_each_written(&self, mut f: impl FnMut(GuestAddress, u64)) {
        let mut left = self.last_total as u64;
        for r in &self.regions {
            if left == 0 {
                break;
            }
            let n = left.min(u64::from(r.len));
            f(r.addr, n);
            left -= n;
        }
    }

    /// Writes `hdr` (num_buffers filled in here) followed by the concatenation of `parts` into
    /// the guest's next RX buffers. On `NoBuffer` nothing is consumed (the ring position is
    /// restored), so the frame is cleanly dropped and the guest sees nothing.
    pub fn push(&mut self, ring: &mut Ring<'_, '_>, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), VirtioError> {
        self.push_with_tail(ring, hdr, parts, None)
    }

    /// [`RxWriter::push`] with the frame's end copied from another guest's memory.
    pub fn push_with_tail(
        &mut self,
        ring: &mut Ring<'_, '_>,
        hdr: &VnetHdr,
        parts: &[&[u8]],
        tail: Option<&GuestTail>,
    ) -> Result<(), VirtioError> {
        let total = VnetHdr::LEN + parts.iter().map(|p| p.len()).sum::<usize>() + tail.map_or(0, GuestTail::len);
        self.heads.clear();
        self.regions.clear();
        self.last_total = total;
        // Collect enough writable buffer space: one chain, or several with MRG_RXBUF.
        let mut room = 0usize;
        while room < total {
            let head = match ring.pop(&mut self.segments) {
                Ok(Some(head)) => head,
                Ok(None) => {
                    ring.unpop(self.heads.len() as u16);
                    return Err(VirtioError::NoBuffer);
                }
                Err(RingError::BadChain { head }) => {
                    // Give a broken chain back empty so the guest can reuse the slot; drop the frame.
                    ring.add_used(head, 0);
                    for &(h, _) in &self.heads {
                        ring.add_used(h, 0);
                    }
                    return Err(VirtioError::BadDescriptor);
                }
                Err(RingError::BadAvailIndex | RingError::BadRing | RingError::Broken) => {
                    // Nothing taken from a broken ring can be trusted: publish nothing for it. The
                    // chains this frame took before the index went bogus (seen earlier in the
                    // batch, with MRG_RXBUF) are given back untaken, as on NoBuffer: else the
                    // device's position (GET_VRING_BASE) would count chains never returned.
                    ring.unpop(self.heads.len() as u16);
                    return Err(VirtioError::RingBroken);
                }
            };
            let mut chain_room = 0u32;
            let mut bad = false;
            for seg in &self.segments {
                if !seg.write {
                    bad = true;
                    break;
                }
                self.regions.push(*seg);
                chain_room = chain_room.saturating_add(seg.len);
            }
            if bad || chain_room == 0 {
                ring.add_used(head, 0);
                for &(h, _) in &self.heads {
                    ring.add_used(h, 0);
                }
                return Err(VirtioError::BadDescriptor);
            }
            let used = (total - room).min(chain_room as usize) as u32;
            self.heads.push((head, used));
            room += chain_room as usize;
            if !self.mrg_rxbuf && room < total {
                // Without mergeable buffers a frame must fit one chain: the guest posted buffers
                // too small for this frame (e.g. no big-packet buffers). Hand the chain back.
                ring.add_used(head, 0);
                return Err(VirtioError::TooLong);
            }
        }
        let mut header = *hdr;
        header.num_buffers = self.heads.len() as u16;
        let header_bytes = header.to_bytes();
        let mut cursor = RegionCursor::new(&self.regions, ring.guest());
        let ok = if let Some(tail) = tail {
            let mut ok = cursor.write(&header_bytes);
            for part in parts {
                ok &= cursor.write(part);
            }
            for slice in tail.slices() {
                ok &= slice.is_some_and(|s| cursor.write_from_guest(&s));
            }
            ok
        } else if total <= SMALL_FRAME {
            // Small frames: header and frame in one guest-memory write (each write has a fixed
            // cost that dominates at 64 bytes).
            let small = &mut *self.small;
            small[..VnetHdr::LEN].copy_from_slice(&header_bytes);
            let mut at = VnetHdr::LEN;
            for part in parts {
                small[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            cursor.write(&small[..total])
        } else {
            let mut ok = cursor.write(&header_bytes);
            for part in parts {
                ok &= cursor.write(part);
            }
            ok
        };
        if !ok {
            for &(h, _) in &self.heads {
                ring.add_used(h, 0);
            }
            return Err(VirtioError::BadDescriptor);
        }
        for &(h, len) in &self.heads {
            ring.add_used(h, len);
        }
        Ok(())
    }
}

/// Writes a byte stream across a chain's buffers, translating each buffer once.
struct RegionCursor<'a, 'm> {
    regions: &'a [Segment],
    view: &'a GuestView<'m>,
    index: usize,
    /// The current buffer, resolved in guest memory, and how much of it is written.
    current: Option<VolatileSlice<'m, ()>>,
    offset: usize,
}

impl<'a, 'm> RegionCursor<'a, 'm> {
    /// Room left in the current buffer and where in guest memory the write goes, moving on to
    /// the next buffer when one is full and resolving each buffer once (`current`, None when it
    /// straddles two memory regions); None when the chain is used up.
    #[inline]
    fn room(&mut self) -> Option<(usize, Option<GuestAddress>)> {
        loop {
            let r = self.regions.get(self.index)?;
            let avail = r.len as usize - self.offset;
            if avail == 0 {
                self.index += 1;
                self.offset = 0;
                self.current = None;
                continue;
            }
            if self.current.is_none() {
                self.current = self.view.slice(r.addr, r.len as usize);
            }
            return Some((avail, r.addr.0.checked_add(self.offset as u64).map(GuestAddress)));
        }
    }

    /// Copies `src` (another guest's memory) across regions, guest to guest.
    fn write_from_guest(&mut self, src: &VolatileSlice<'_, ()>) -> bool {
        let mut done = 0usize;
        while done < src.len() {
            let Some((avail, _)) = self.room() else {
                return false;
            };
            let n = avail.min(src.len() - done);
            let (Some(dst), Ok(piece)) = (&self.current, src.subslice(done, n)) else {
                return false;
            };
            let Ok(dst) = dst.subslice(self.offset, n) else { return false };
            piece.copy_to_volatile_slice(dst);
            self.offset += n;
            done += n;
        }
        true
    }

    fn new(regions: &'a [Segment], view: &'a GuestView<'m>) -> Self {
        RegionCursor { regions, view, index: 0, current: None, offset: 0 }
    }

    /// Writes `data` across regions; false if guest memory rejected a write.
    fn write(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let Some((avail, at)) = self.room() else {
                return false;
            };
            let n = avail.min(data.len());
            match &self.current {
                Some(slice) => {
                    if slice.write_slice(&data[..n], self.offset).is_err() {
                        return false;
                    }
                }
                // The buffer straddles two memory regions (rare): the general path.
                None => {
                    let Some(addr) = at else {
                        return false;
                    };
                    if !write_guest(self.view.memory(), addr, &data[..n]) {
                        return false;
                    }
                }
            }
            self.offset += n;
            data = &data[n..];
        }
        true
    }
}

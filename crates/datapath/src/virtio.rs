//! Device side of a virtio-net port: pull frames the guest transmitted out of its TX virtqueue
//! and write frames into the buffers it posted on its RX virtqueue (with mergeable RX buffers).
//! The same code serves in-process `mem` ports and vhost-user VMs: both are a `virtio_queue::Queue`
//! over a `GuestMemoryMmap`.
//!
//! Hand-written (on top of `virtio-queue`'s descriptor walking) because it is the per-frame hot
//! path and has to count every bad guest input instead of stopping the queue.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmq_wire::VnetHdr;

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
}

/// One frame taken from a TX virtqueue: `len` bytes (virtio-net header included) copied into
/// the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxFrame {
    pub len: usize,
}

/// Pops the next TX chain, copies its readable descriptors into `buf` and returns it to the
/// guest (used length 0). `Ok(None)`: nothing available. A bad chain is returned to the guest
/// too (so the ring keeps moving) and reported as an error for the caller to count.
pub fn pop_tx<M: GuestMemory>(queue: &mut Queue, mem: &M, buf: &mut [u8]) -> Result<Option<TxFrame>, VirtioError> {
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return Ok(None);
    };
    let head = chain.head_index();
    let mut len = 0usize;
    let mut result = Ok(());
    for desc in chain {
        if desc.is_write_only() {
            result = Err(VirtioError::BadDescriptor);
            break;
        }
        let dlen = desc.len() as usize;
        let Some(dst) = buf.get_mut(len..len + dlen) else {
            result = Err(VirtioError::TooLong);
            break;
        };
        if mem.read_slice(dst, desc.addr()).is_err() {
            result = Err(VirtioError::BadDescriptor);
            break;
        }
        len += dlen;
    }
    // Always hand the chain back: a stuck descriptor would wedge the guest's TX queue.
    if queue.add_used(mem, head, 0).is_err() {
        return Err(VirtioError::BadDescriptor);
    }
    result?;
    if len < VnetHdr::LEN {
        return Err(VirtioError::BadHeader);
    }
    Ok(Some(TxFrame { len }))
}

/// A writable region of a posted RX chain.
#[derive(Debug, Clone, Copy)]
struct Region {
    addr: GuestAddress,
    len: u32,
}

/// Writes frames into a guest's RX virtqueue. Keeps no state between batches except the queue
/// position; `mrg_rxbuf` says whether one frame may span several chains (VIRTIO_NET_F_MRG_RXBUF).
pub struct RxWriter {
    pub mrg_rxbuf: bool,
    regions: Vec<Region>,
    heads: Vec<(u16, u32)>,
}

impl RxWriter {
    pub fn new(mrg_rxbuf: bool) -> RxWriter {
        RxWriter { mrg_rxbuf, regions: Vec::with_capacity(8), heads: Vec::with_capacity(8) }
    }

    /// Writes `hdr` (num_buffers filled in here) followed by the concatenation of `parts` into
    /// the guest's next RX buffers. On `NoBuffer` nothing is consumed (the queue position is
    /// restored), so the frame is cleanly dropped and the guest sees nothing.
    pub fn push<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        hdr: &VnetHdr,
        parts: &[&[u8]],
    ) -> Result<(), VirtioError> {
        let total = VnetHdr::LEN + parts.iter().map(|p| p.len()).sum::<usize>();
        let start = queue.next_avail();
        self.heads.clear();
        self.regions.clear();
        // Collect enough writable buffer space: one chain, or several with MRG_RXBUF.
        let mut room = 0usize;
        while room < total {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                queue.set_next_avail(start);
                return Err(VirtioError::NoBuffer);
            };
            let head = chain.head_index();
            let mut chain_room = 0u32;
            let mut bad = false;
            for desc in chain {
                if !desc.is_write_only() {
                    bad = true;
                    break;
                }
                self.regions.push(Region { addr: desc.addr(), len: desc.len() });
                chain_room = chain_room.saturating_add(desc.len());
            }
            if bad || chain_room == 0 {
                // Give a broken chain back empty so the guest can reuse the slot; drop the frame.
                let _ = queue.add_used(mem, head, 0);
                for (h, _) in self.heads.drain(..) {
                    let _ = queue.add_used(mem, h, 0);
                }
                return Err(VirtioError::BadDescriptor);
            }
            let used = (total - room).min(chain_room as usize) as u32;
            self.heads.push((head, used));
            room += chain_room as usize;
            if !self.mrg_rxbuf && room < total {
                // Without mergeable buffers a frame must fit one chain: the guest posted buffers
                // too small for this frame (e.g. no big-packet buffers). Hand the chain back.
                let _ = queue.add_used(mem, head, 0);
                return Err(VirtioError::TooLong);
            }
        }
        let mut header = *hdr;
        header.num_buffers = self.heads.len() as u16;
        let header_bytes = header.to_bytes();
        let mut cursor = RegionCursor { regions: &self.regions, index: 0, offset: 0 };
        let mut ok = cursor.write(mem, &header_bytes);
        for part in parts {
            ok &= cursor.write(mem, part);
        }
        if !ok {
            for &(h, _) in &self.heads {
                let _ = queue.add_used(mem, h, 0);
            }
            return Err(VirtioError::BadDescriptor);
        }
        for &(h, len) in &self.heads {
            if queue.add_used(mem, h, len).is_err() {
                return Err(VirtioError::BadDescriptor);
            }
        }
        Ok(())
    }
}

struct RegionCursor<'a> {
    regions: &'a [Region],
    index: usize,
    offset: u32,
}

impl RegionCursor<'_> {
    /// Writes `data` across regions; false if guest memory rejected a write.
    fn write<M: GuestMemory>(&mut self, mem: &M, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let Some(r) = self.regions.get(self.index) else {
                return false;
            };
            let avail = (r.len - self.offset) as usize;
            if avail == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let n = avail.min(data.len());
            let Some(addr) = r.addr.0.checked_add(u64::from(self.offset)) else {
                return false;
            };
            if mem.write_slice(&data[..n], GuestAddress(addr)).is_err() {
                return false;
            }
            self.offset += n as u32;
            data = &data[n..];
        }
        true
    }
}

/// After a batch: does the guest want an interrupt (EVENT_IDX / NO_INTERRUPT aware)?
pub fn needs_notification<M: GuestMemory>(queue: &mut Queue, mem: &M) -> bool {
    // An error means the rings are unreadable: notify, the guest will find out.
    queue.needs_notification(mem).unwrap_or(true)
}

//! The port abstraction every attachment plugs into. A port has two independent halves:
//! a [`FrameSource`] (frames the port sends into vmq: guest TX, TAP read, NIC RX queue), polled
//! by exactly one worker, and a [`FrameSink`] (frames vmq delivers: guest RX, TAP write, NIC TX),
//! which any worker may feed under the sink's lock, taken once per batch and destination.
//!
//! Frames travel as a 12-byte virtio-net header followed by the Ethernet frame, the layout
//! vhost-user, TAP (IFF_VNET_HDR) and AF_PACKET (PACKET_VNET_HDR) all share.

use std::os::fd::RawFd;
use std::sync::Arc;

use vmq_core::{DropReason, OffloadCaps};
use vmq_wire::VnetHdr;

/// Largest frame handled: a 64 KiB GSO frame plus header and a VLAN tag.
pub const MAX_FRAME: usize = 65_536 + 64;
/// Frames per batch.
pub const BATCH: usize = 32;

/// A source-side problem, to be counted against the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// One frame could not be taken.
    Drop(DropReason),
    /// The attachment is gone (TAP deleted, socket error): the port goes down.
    Gone,
}

pub trait FrameSource: Send {
    /// Moves up to `max` frames (header + frame each) into `scratch`; returns how many.
    /// Frames that could not be taken are reported in `errors`.
    fn recv(&mut self, scratch: &mut Scratch, max: usize, errors: &mut Vec<RecvError>) -> usize;

    /// An fd that becomes readable when frames may be waiting (TAP fd, packet socket, virtio
    /// kick eventfd). The worker sleeps on it; None means "poll me" (bounded sleep instead).
    /// Asked again whenever the worker's task list or a port's state changes.
    fn wake_fd(&mut self) -> Option<RawFd> {
        None
    }

    /// Is a poll that finds nothing cheap (a ring in memory), or a syscall (a TAP read)? Costly
    /// sources are only polled when their wake fd reports something.
    fn polls_cheaply(&self) -> bool {
        true
    }

    /// The wake fd fired: consume the event (an eventfd must be read, or it stays readable).
    fn on_wake(&mut self) {}

    /// The worker is about to sleep: re-arm notifications (virtio: enable kicks). Returns true
    /// if work arrived meanwhile, so the worker must not sleep.
    fn prepare_sleep(&mut self) -> bool {
        false
    }

    /// The worker is polling again: notifications may be suppressed (virtio: no kicks needed).
    fn wake_up(&mut self) {}
}

/// Writes frames during one batch toward a sink.
pub trait FrameWriter {
    /// Delivers one frame: `hdr` then the concatenation of `parts` (an Ethernet frame).
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason>;
}

pub trait FrameSink: Send {
    /// Delivers one frame: `hdr` then the concatenation of `parts` (an Ethernet frame).
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason>;
    /// End of a batch toward this sink: notify the receiver, recycle buffers.
    fn flush(&mut self);
    /// What the receiver accepts in the virtio-net header (negotiated).
    fn caps(&self) -> OffloadCaps;

    /// One batch toward this sink: `write` sends its frames through the writer it is given,
    /// then the receiver is notified once. Sinks that can keep their ring open (and locked)
    /// for a whole batch override this; by default every frame goes through [`FrameSink::send`].
    fn batch(&mut self, write: &mut dyn FnMut(&mut dyn FrameWriter)) {
        write(&mut EachFrame(self));
        self.flush();
    }
}

/// A writer that drops every frame for one reason (a receiver that can't take any now).
pub struct Refuse(pub DropReason);

impl FrameWriter for Refuse {
    fn send(&mut self, _hdr: &VnetHdr, _parts: &[&[u8]]) -> Result<(), DropReason> {
        Err(self.0)
    }
}

/// [`FrameWriter`] over a sink's per-frame [`FrameSink::send`].
struct EachFrame<'s, S: ?Sized>(&'s mut S);

impl<S: FrameSink + ?Sized> FrameWriter for EachFrame<'_, S> {
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason> {
        self.0.send(hdr, parts)
    }
}

enum Slot {
    Owned { buf: usize, len: usize },
    Shared(Arc<[u8]>),
}

/// A worker's batch of received frames. Owned buffers are allocated once per worker; NIC
/// stand-in queues hand over shared buffers instead, so that no copy happens before the one
/// into the VM (as with a NIC that DMAs into host memory).
pub struct Scratch {
    bufs: Vec<Box<[u8]>>,
    slots: Vec<Slot>,
    next_owned: usize,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            bufs: (0..BATCH).map(|_| vec![0u8; MAX_FRAME].into_boxed_slice()).collect(),
            slots: Vec::with_capacity(BATCH),
            next_owned: 0,
        }
    }

    pub fn clear(&mut self) {
        self.slots.clear();
        self.next_owned = 0;
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The next free owned buffer to receive into; None when the batch is full.
    pub fn next_buf(&mut self) -> Option<&mut [u8]> {
        if self.slots.len() >= BATCH {
            return None;
        }
        self.bufs.get_mut(self.next_owned).map(|b| &mut b[..])
    }

    /// Records `len` bytes received into the buffer [`Scratch::next_buf`] returned.
    pub fn commit(&mut self, len: usize) {
        self.slots.push(Slot::Owned { buf: self.next_owned, len: len.min(MAX_FRAME) });
        self.next_owned += 1;
    }

    /// Adds a frame held elsewhere (NIC stand-in buffers). False when the batch is full.
    pub fn push_shared(&mut self, frame: Arc<[u8]>) -> bool {
        if self.slots.len() >= BATCH {
            return false;
        }
        self.slots.push(Slot::Shared(frame));
        true
    }

    /// Frame `i` (virtio-net header + Ethernet frame).
    pub fn get(&self, i: usize) -> &[u8] {
        match &self.slots[i] {
            Slot::Owned { buf, len } => &self.bufs[*buf][..*len],
            Slot::Shared(f) => f,
        }
    }
}

/// The filter side of a NIC with VM queues (VMQ): which (MAC, VLAN) each VM queue receives.
/// Everything unfiltered lands on the default queue. Implemented by the NIC stand-in here and
/// by the AF_PACKET uplink (fanout program) in the OS glue.
pub trait NicSteering: Send {
    /// Points `queue` at `filter`, or clears it (its traffic goes to the default queue).
    fn set_filter(&mut self, queue: vmq_core::vmq::QueueId, filter: Option<vmq_core::vmq::FilterKey>);
}

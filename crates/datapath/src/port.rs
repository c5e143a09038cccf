//! The port abstraction every attachment plugs into. A port has two independent halves:
//! a [`FrameSource`] (frames the port sends into vmq: guest TX, TAP read, NIC RX queue), polled
//! by exactly one worker, and a [`FrameSink`] (frames vmq delivers: guest RX, TAP write, NIC TX),
//! which any worker may feed under the sink's lock, taken once per batch and destination.
//!
//! Frames travel as a 12-byte virtio-net header followed by the Ethernet frame, the layout
//! vhost-user, TAP (IFF_VNET_HDR) and AF_PACKET (PACKET_VNET_HDR) all share.

use std::os::fd::RawFd;
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};
use vmq_core::{DropReason, OffloadCaps};

use crate::ring::Memory;
use vmq_wire::VnetHdr;

/// Largest frame handled: a 64 KiB GSO frame plus header and a VLAN tag.
pub const MAX_FRAME: usize = 65_536 + 64;
/// Frames per batch.
pub const BATCH: usize = 32;

/// A source-side problem, to be counted against the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// One frame could not be taken (a chain was consumed: it counts as a frame received).
    Drop(DropReason),
    /// The source's ring broke (reported once per breakage, no frame taken): counted under
    /// [`DropReason::RingBroken`], not in `rx_packets`; the source stays quiet until reset.
    RingBroken,
    /// The attachment is gone (TAP deleted, socket error): the port goes down.
    Gone,
}

/// What the kernel lost on a source's behalf, since the previous [`FrameSource::kernel_counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Frames dropped before vmq could read them (a full AF_PACKET ring).
    pub drops: u64,
    /// Ring blocks skipped as corrupt.
    pub corrupt_blocks: u64,
}

/// How a sleeping worker learns that a [`FrameSource`] may have frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// This fd becomes readable (TAP fd, packet socket, virtio kick eventfd).
    Fd(RawFd),
    /// Nothing tells: the worker polls the source (a 1 ms sleep instead of an unbounded one).
    Poll,
    /// Nothing can arrive until the port's state changes (no VM connected, TAP deleted for
    /// good), and every state change refreshes the workers, which ask again.
    Never,
}

pub trait FrameSource: Send {
    /// Moves up to `max` frames (header + frame each) into `scratch`; returns how many.
    /// Frames that could not be taken are reported in `errors`.
    fn recv(&mut self, scratch: &mut Scratch, max: usize, errors: &mut Vec<RecvError>) -> usize;

    /// How the worker learns that frames may be waiting, so that it can sleep. Asked again
    /// whenever the worker's task list or a port's state changes.
    fn wake(&mut self) -> Wake {
        Wake::Poll
    }

    /// The interface receive queue this source reads (NIC queue sources of a multi-queue
    /// uplink), for the queue counters.
    fn nic_rx_queue(&self) -> Option<u16> {
        None
    }

    /// Is a poll that finds nothing cheap (a ring in memory), or a syscall (a TAP read)? Costly
    /// sources are only polled when their wake fd reports something.
    fn polls_cheaply(&self) -> bool {
        true
    }

    /// The kernel's losses since the last call (deltas). Called after every batch, so a
    /// source whose counters cost a syscall reads them only now and then.
    fn kernel_counters(&mut self) -> KernelCounters {
        KernelCounters::default()
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

    /// The batch [`FrameSource::recv`] returned has been delivered: buffers whose frames stayed
    /// in place ([`GuestTail`]) may go back to their owner now.
    fn complete(&mut self) {}
}

/// Writes frames during one batch toward a sink.
pub trait FrameWriter {
    /// Delivers one frame: `hdr` then the concatenation of `parts` (an Ethernet frame).
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason>;

    /// Can this writer take a frame whose end is still in a guest's memory
    /// ([`FrameWriter::send_with_tail`])? Guest RX rings can (one copy, guest to guest).
    fn takes_guest_tail(&self) -> bool {
        false
    }

    /// Delivers `hdr`, `parts` and then `tail`, copied from the sending guest's memory.
    /// Only called when [`FrameWriter::takes_guest_tail`] says so.
    fn send_with_tail(&mut self, _hdr: &VnetHdr, _parts: &[&[u8]], _tail: &GuestTail) -> Result<(), DropReason> {
        Err(DropReason::Offload)
    }
}

/// A guest's RX ring opened for one batch (in-process or vhost-user): writes one frame, whose
/// end may still be in the sending guest's memory. Each is a [`FrameWriter`] that takes guest
/// tails, through the one impl below.
pub(crate) trait GuestRxWriter {
    fn push(&mut self, hdr: &VnetHdr, parts: &[&[u8]], tail: Option<&GuestTail>) -> Result<(), DropReason>;
}

impl<W: GuestRxWriter> FrameWriter for W {
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason> {
        self.push(hdr, parts, None)
    }

    fn takes_guest_tail(&self) -> bool {
        true
    }

    fn send_with_tail(&mut self, hdr: &VnetHdr, parts: &[&[u8]], tail: &GuestTail) -> Result<(), DropReason> {
        self.push(hdr, parts, Some(tail))
    }
}

pub trait FrameSink: Send {
    /// Delivers one frame: `hdr` then the concatenation of `parts` (an Ethernet frame).
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason>;
    /// End of a batch toward this sink: notify the receiver, recycle buffers.
    fn flush(&mut self);
    /// What the receiver accepts in the virtio-net header (negotiated).
    fn caps(&self) -> OffloadCaps;

    /// The next [`FrameSink::batch`] carries about `frames` frames: a ring sink reads no more
    /// of the guest's buffers ahead than that (see [`crate::ring::Ring::expect_chains`]).
    fn expect_frames(&mut self, _frames: usize) {}

    /// One batch toward this sink: `write` sends its frames through the writer it is given,
    /// then the receiver is notified once. Sinks that can keep their ring open (and locked)
    /// for a whole batch override this; by default every frame goes through [`FrameSink::send`].
    fn batch(&mut self, write: &mut dyn FnMut(&mut dyn FrameWriter)) {
        write(&mut EachFrame(self));
        self.flush();
    }
}

/// Which of `lanes` live lanes (guest RX queues) of a multiqueue port `frame` (Ethernet) goes
/// to: the uplink's own flow pick ([`vmq_sys::steering::flow_index`], what its fanout program
/// and the NIC stand-in compute). A VM holding as many VM queues as it has live RX queues thus
/// gets each VM queue's frames on one RX queue, written by one worker; every other path (the
/// switch, other VMs, TAPs) picks alike, so a flow keeps its RX queue whichever way it comes.
#[inline]
pub fn lane_pick(frame: &[u8], lanes: usize) -> usize {
    match vmq_wire::ethernet::parse_l2(frame) {
        Ok(l2) => vmq_sys::steering::flow_index(frame.get(l2.header_len..).unwrap_or_default(), l2.ethertype, lanes),
        Err(_) => 0,
    }
}

/// A sink any worker may feed, under its lock (taken once per batch).
pub type SharedSink = Arc<std::sync::Mutex<Box<dyn FrameSink>>>;

/// Which lanes of a multiqueue port may take frames now: bit `i` set = lane `i` (the guest's
/// RX queue `i`) is live. Read once per batch and destination, so it must be cheap.
pub trait LiveLanes: Send + Sync {
    fn live(&self) -> u32;
}

/// The ways into a port: one sink, or one per guest RX queue ("lanes") of a multiqueue VM
/// port. Each lane has its own lock, so workers delivering to different RX queues of one VM
/// run side by side (receive scales within a VM, as with Hyper-V's VMMQ). Which lane a frame
/// takes is a flow pick over the live lanes ([`lane_pick`]): one flow, one
/// guest RX queue, in order.
#[derive(Clone)]
pub struct PortSinks {
    lanes: Arc<[SharedSink]>,
    live: Option<Arc<dyn LiveLanes>>,
}

impl PortSinks {
    pub fn one(sink: Box<dyn FrameSink>) -> PortSinks {
        PortSinks { lanes: Arc::from(vec![Arc::new(std::sync::Mutex::new(sink))]), live: None }
    }

    /// Lane `i` is `sinks[i]`; `live` says which may take frames (None: all of them).
    pub fn lanes(sinks: Vec<Box<dyn FrameSink>>, live: Option<Arc<dyn LiveLanes>>) -> PortSinks {
        let lanes: Vec<SharedSink> = sinks.into_iter().map(|s| Arc::new(std::sync::Mutex::new(s))).collect();
        assert!(!lanes.is_empty() && lanes.len() <= 32, "a port has 1..=32 lanes");
        PortSinks { lanes: Arc::from(lanes), live }
    }

    /// Lane 0: the only one of a single-queue port (its offload caps stand for all lanes).
    pub fn first(&self) -> &SharedSink {
        &self.lanes[0]
    }

    pub fn lane(&self, i: usize) -> Option<&SharedSink> {
        self.lanes.get(i)
    }

    pub fn count(&self) -> usize {
        self.lanes.len()
    }

    /// The live lanes' indices, ascending, into `out` (cleared first).
    pub fn live_lanes(&self, out: &mut Vec<u8>) {
        out.clear();
        let mask = self.live.as_ref().map_or(u32::MAX, |l| l.live());
        out.extend((0..self.lanes.len() as u8).filter(|&i| mask & (1 << i) != 0));
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
    Owned {
        buf: usize,
        len: usize,
    },
    Shared(Arc<[u8]>),
    /// The head (headers) copied into an owned buffer, the rest still in a guest's memory.
    Split {
        buf: usize,
        head: usize,
        tail: usize,
    },
}

/// The part of a frame that stays in the sending guest's memory until it is delivered: a big
/// frame from one VM to another crosses vmq with one copy, from the sender's buffers straight
/// into the receiver's. The sender's chain is returned to it only after the batch is delivered
/// ([`FrameSource::complete`]), and the memory stays mapped while this holds it.
#[derive(Default)]
pub struct GuestTail {
    mem: Option<Arc<Memory>>,
    segments: Vec<(GuestAddress, u32)>,
    len: usize,
}

impl GuestTail {
    /// Starts a tail in `mem` (the previous one is forgotten).
    pub fn reset(&mut self, mem: Arc<Memory>) {
        self.mem = Some(mem);
        self.segments.clear();
        self.len = 0;
    }

    /// Appends guest buffer [addr, addr + len); false if it is not in one memory region (the
    /// caller then copies the frame instead).
    pub fn push(&mut self, addr: GuestAddress, len: u32) -> bool {
        let Some(mem) = &self.mem else { return false };
        if len == 0 {
            return true;
        }
        if mem.get_slice(addr, len as usize).is_err() {
            return false;
        }
        self.segments.push((addr, len));
        self.len += len as usize;
        true
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tail's pieces as slices of the sender's memory.
    pub fn slices(&self) -> impl Iterator<Item = Option<VolatileSlice<'_, ()>>> {
        let mem = self.mem.as_deref();
        self.segments.iter().map(move |&(addr, len)| mem.and_then(|m| m.get_slice(addr, len as usize).ok()))
    }

    /// Copies the tail to the end of `out` (for receivers and offload work that need the frame
    /// in one piece). False if guest memory refused a read.
    pub fn append_to(&self, out: &mut Vec<u8>) -> bool {
        let start = out.len();
        out.resize(start + self.len, 0);
        let mut at = start;
        for slice in self.slices() {
            let Some(slice) = slice else { return false };
            let n = slice.len();
            if slice.copy_to(&mut out[at..at + n]) != n {
                return false;
            }
            at += n;
        }
        true
    }

    fn release(&mut self) {
        self.mem = None;
        self.segments.clear();
        self.len = 0;
    }
}

/// A worker's batch of received frames. Owned buffers are allocated once per worker; NIC
/// stand-in queues hand over shared buffers instead, so that no copy happens before the one
/// into the VM (as with a NIC that DMAs into host memory).
pub struct Scratch {
    bufs: Vec<Box<[u8]>>,
    slots: Vec<Slot>,
    next_owned: usize,
    tails: Vec<GuestTail>,
    next_tail: usize,
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
            tails: (0..BATCH).map(|_| GuestTail::default()).collect(),
            next_tail: 0,
        }
    }

    pub fn clear(&mut self) {
        self.slots.clear();
        self.next_owned = 0;
        // Guest memory is not held past the batch: neither by the committed tails nor by the
        // one `next_split` handed out last, which a frame copied whole leaves set but uncommitted
        // (it would keep a departed guest's memory mapped until the worker's next frame).
        let handed_out = (self.next_tail + 1).min(self.tails.len());
        for t in &mut self.tails[..handed_out] {
            t.release();
        }
        self.next_tail = 0;
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

    /// The next free owned buffer and guest tail, to receive a frame that stays partly in guest
    /// memory; None when the batch is full.
    pub fn next_split(&mut self) -> Option<(&mut [u8], &mut GuestTail)> {
        if self.slots.len() >= BATCH {
            return None;
        }
        let buf = self.bufs.get_mut(self.next_owned)?;
        let tail = self.tails.get_mut(self.next_tail)?;
        Some((&mut buf[..], tail))
    }

    /// Records `len` bytes received into the buffer [`Scratch::next_buf`] returned.
    pub fn commit(&mut self, len: usize) {
        self.slots.push(Slot::Owned { buf: self.next_owned, len: len.min(MAX_FRAME) });
        self.next_owned += 1;
    }

    /// Records a frame received with [`Scratch::next_split`]: `head` bytes in the buffer, the
    /// rest in the tail.
    pub fn commit_split(&mut self, head: usize) {
        self.slots.push(Slot::Split { buf: self.next_owned, head: head.min(MAX_FRAME), tail: self.next_tail });
        self.next_owned += 1;
        self.next_tail += 1;
    }

    /// Adds a frame held elsewhere (NIC stand-in buffers). False when the batch is full.
    pub fn push_shared(&mut self, frame: Arc<[u8]>) -> bool {
        if self.slots.len() >= BATCH {
            return false;
        }
        self.slots.push(Slot::Shared(frame));
        true
    }

    /// Frame `i` (virtio-net header + Ethernet frame), or its head when the rest is still in a
    /// guest's memory ([`Scratch::tail`]). The head holds every header vmq looks at.
    #[inline]
    pub fn get(&self, i: usize) -> &[u8] {
        match &self.slots[i] {
            Slot::Owned { buf, len } => &self.bufs[*buf][..*len],
            Slot::Shared(f) => f,
            Slot::Split { buf, head, .. } => &self.bufs[*buf][..*head],
        }
    }

    /// The part of frame `i` still in guest memory.
    #[inline]
    pub fn tail(&self, i: usize) -> Option<&GuestTail> {
        match &self.slots[i] {
            Slot::Split { tail, .. } => self.tails.get(*tail),
            _ => None,
        }
    }

    /// Does this batch hold frames that are partly in a guest's memory?
    pub fn has_tails(&self) -> bool {
        self.next_tail > 0
    }

    /// Whole length of frame `i` (virtio-net header included).
    #[inline]
    pub fn frame_len(&self, i: usize) -> usize {
        self.get(i).len() + self.tail(i).map_or(0, GuestTail::len)
    }
}

/// The filter side of a NIC with VM queues (VMQ): which (MAC, VLAN) each VM queue receives.
/// Everything unfiltered lands on the default queue. Implemented by the NIC stand-in here and
/// by the AF_PACKET uplink (fanout program) in the OS glue.
pub trait NicSteering: Send {
    /// Points `queue` at `filter`, or clears it (its traffic goes to the default queue).
    fn set_filter(&mut self, queue: vmq_core::vmq::QueueId, filter: Option<vmq_core::vmq::FilterKey>);

    /// Can several queues share one filter, the NIC spreading its flows over them (VMMQ)?
    fn spreads_flows(&self) -> bool {
        false
    }
}

//! A guest's ring as the data path's workers see it, shared by every vhost-user port's sources
//! and sinks (one queue pair or several): opened in the guest's memory for one batch, its
//! position kept across batches, its writes marked in the dirty log while a live migration runs.

use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
};
use vm_memory::GuestAddressSpace;
use vmq_core::OffloadCaps;
use vmq_vhost::{DirtyLog, NetDevice};
use vmq_wire::VnetHdr;

use crate::port::GuestTail;
use crate::ring::{Memory, Ring, RingError, RingState};
use crate::virtio::{RxWriter, VirtioError};

pub(crate) fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// What the guest's driver accepts in the virtio-net header, from its acknowledged features.
pub fn guest_caps(features: u64) -> OffloadCaps {
    OffloadCaps {
        csum: has(features, VIRTIO_NET_F_GUEST_CSUM),
        tso4: has(features, VIRTIO_NET_F_GUEST_TSO4),
        tso6: has(features, VIRTIO_NET_F_GUEST_TSO6),
        ecn: has(features, VIRTIO_NET_F_GUEST_ECN),
    }
}

/// Why a ring could not be served this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unserved {
    /// Not started (VM not connected, or stopping).
    NotLive,
    /// Broken by the driver (see [`RingError::Broken`]); `now`: it broke on this attempt.
    Broken { now: bool },
}

/// The device's view of one of the guest's rings, rebuilt from the protocol's `Queue` whenever
/// the device (re)starts: that is also how a broken ring recovers, when the frontend stops and
/// restarts it (GET_VRING_BASE, then SET_VRING_BASE/ADDR/KICK) or reconnects.
pub(crate) struct DeviceRing {
    pub(crate) index: usize,
    pub(crate) state: Option<RingState>,
    pub(crate) generation: u64,
    /// The ring's [`vmq_vhost::Vring::stops`] at the last batch: chains taken then are only
    /// returned while it is unchanged ([`DeviceRing::with_unless_stopped_since`]).
    pub(crate) stops: u64,
}

impl DeviceRing {
    pub(crate) fn new(index: usize) -> DeviceRing {
        DeviceRing { index, state: None, generation: u64::MAX, stops: 0 }
    }

    /// [`DeviceRing::with`], but only if the ring was not stopped since `stops` (a value of
    /// [`DeviceRing::stops`]): chains taken before a stop were handed back by it (GET_VRING_BASE
    /// resumes the ring at the used index), so they must not be returned again. A stop of the
    /// device alone (the pair's other ring) leaves them this ring's to return.
    pub(crate) fn with_unless_stopped_since<R>(
        &mut self,
        device: &NetDevice,
        stops: u64,
        f: impl FnOnce(&mut Ring<'_, '_>) -> R,
    ) -> Result<R, Unserved> {
        self.open_with(device, Some(stops), |ring, _, _| f(ring))
    }

    /// Runs `f` on the ring if it is live, then stores the position back into the `Queue`
    /// (GET_VRING_BASE reads it there).
    pub(crate) fn with<R>(
        &mut self,
        device: &NetDevice,
        f: impl FnOnce(&mut Ring<'_, '_>) -> R,
    ) -> Result<R, Unserved> {
        self.with_memory(device, |ring, _, _| f(ring))
    }

    /// [`DeviceRing::with`], also handing over the guest memory the ring was opened in and the
    /// dirty log while a live migration runs (`f` marks the buffers it writes; the ring's own
    /// writes, used entries and index, are marked here).
    pub(crate) fn with_memory<R>(
        &mut self,
        device: &NetDevice,
        f: impl FnOnce(&mut Ring<'_, '_>, &Arc<Memory>, Option<&DirtyLog>) -> R,
    ) -> Result<R, Unserved> {
        self.open_with(device, None, f)
    }

    fn open_with<R>(
        &mut self,
        device: &NetDevice,
        unless_stopped_since: Option<u64>,
        f: impl FnOnce(&mut Ring<'_, '_>, &Arc<Memory>, Option<&DirtyLog>) -> R,
    ) -> Result<R, Unserved> {
        let mut vring = device.vring(self.index);
        if !vring.is_live() || unless_stopped_since.is_some_and(|stops| stops != vring.stops) {
            return Err(Unserved::NotLive);
        }
        let generation = device.generation();
        // A ring stopped and set up again while the other ring of its pair was down needs a
        // fresh position too: the device's generation does not change then.
        if generation != self.generation || vring.stops != self.stops || self.state.is_none() {
            self.generation = generation;
            self.stops = vring.stops;
            self.state = Some(RingState::from_device_queue(&vring.queue, device.acked_features()));
        }
        let Some(state) = self.state.as_mut() else { return Err(Unserved::NotLive) };
        let mem = device.mem.memory().into_inner();
        let log = vring.dirty_log.clone();
        let result = match Ring::open(&mem, state) {
            Ok(mut ring) => {
                let result = f(&mut ring, &mem, log.as_deref());
                // Publishes: the used index is written before its page is marked below.
                drop(ring);
                Ok(result)
            }
            Err(RingError::Broken) => Err(Unserved::Broken { now: false }),
            Err(_) => Err(Unserved::Broken { now: true }),
        };
        if let (Some(log), Ok(_)) = (&log, &result) {
            // Used entries, used index, flags and avail_event: the whole used ring (a few pages
            // at most) rather than tracking each store. Still under the ring lock, so before
            // GET_VRING_BASE can reply.
            // A packed ring's used descriptors are in its descriptor ring.
            for (addr, len) in state.device_written_areas() {
                log.mark(addr, len);
            }
        }
        state.store_position(&mut vring.queue);
        result
    }

    /// Has the guest made chains available that were not taken yet? Cheap (the ring lock and
    /// one load of the avail index), for the poll of an idle TX ring. "Yes" whenever the ring
    /// is not in the state the last batch saw (not live, restarted, reconnected): the full
    /// open then sets it up again and decides.
    pub(crate) fn avail_pending(&self, device: &NetDevice) -> bool {
        let vring = device.vring(self.index);
        if !vring.is_live() || vring.stops != self.stops || device.generation() != self.generation {
            return true;
        }
        let Some(state) = self.state.as_ref() else { return true };
        state.avail_pending(&device.mem.memory())
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.state.as_ref().is_some_and(RingState::is_broken)
    }

    pub(crate) fn signal(&self, device: &NetDevice) {
        device.vring(self.index).signal_guest();
    }
}

/// One frame into a guest RX ring (one queue pair's or one of several), its buffers marked in
/// the dirty log while a live migration runs. `used` becomes true once chains were used (frames
/// written, or bad chains handed back): the guest needs to know.
pub(crate) fn push_logged(
    writer: &mut RxWriter,
    ring: &mut Ring<'_, '_>,
    log: Option<&DirtyLog>,
    used: &mut bool,
    frame: (&VnetHdr, &[&[u8]], Option<&GuestTail>),
) -> Result<(), VirtioError> {
    let (hdr, parts, tail) = frame;
    let result = writer.push_with_tail(ring, hdr, parts, tail);
    if let Some(log) = log {
        // After the write; also after a failed one, which may have written part of it.
        writer.for_each_written(|addr, len| log.mark(addr.0, len));
    }
    *used |= !matches!(result, Err(VirtioError::NoBuffer));
    result
}

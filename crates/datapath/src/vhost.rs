//! vhost-user-net ports on the data path: a worker serves the guest's TX ring (a
//! [`FrameSource`]) and any worker writes into its RX ring (a [`FrameSink`]), with the same
//! device-side virtio code as the in-process `mem` port. The protocol side (QEMU's socket) is
//! the `vmq-vhost` crate, served by one control-plane thread for all VMs.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
};
use vm_memory::GuestAddressSpace;
use vmq_core::{DropReason, OffloadCaps};
use vmq_vhost::server::{ServerError, SocketPolicy, VhostUserServer};
use vmq_vhost::{DeviceEvent, NetDevice, NetDeviceConfig, RX_QUEUE, TX_QUEUE};
use vmq_wire::VnetHdr;

use crate::attach::{Attachment, PortHandle};
use crate::error::{BackendError, DatapathError};
use crate::port::{FrameSink, FrameSource, FrameWriter, GuestRxWriter, GuestTail, RecvError, Refuse, Scratch};
use crate::ring::{Memory, Ring, RingError, RingState, Segment};
use crate::virtio::{RxWriter, VirtioError, pop_tx_split};

fn has(features: u64, bit: u32) -> bool {
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
enum Unserved {
    /// Not started (VM not connected, or stopping).
    NotLive,
    /// Broken by the driver (see [`RingError::Broken`]); `now`: it broke on this attempt.
    Broken { now: bool },
}

/// The device's view of one of the guest's rings, rebuilt from the protocol's `Queue` whenever
/// the device (re)starts: that is also how a broken ring recovers, when the frontend stops and
/// restarts it (GET_VRING_BASE, then SET_VRING_BASE/ADDR/KICK) or reconnects.
struct DeviceRing {
    index: usize,
    state: Option<RingState>,
    generation: u64,
}

impl DeviceRing {
    fn new(index: usize) -> DeviceRing {
        DeviceRing { index, state: None, generation: u64::MAX }
    }

    /// Runs `f` on the ring if it is live, then stores the position back into the `Queue`
    /// (GET_VRING_BASE reads it there).
    fn with<R>(&mut self, device: &NetDevice, f: impl FnOnce(&mut Ring<'_, '_>) -> R) -> Result<R, Unserved> {
        self.with_memory(device, |ring, _| f(ring))
    }

    /// [`DeviceRing::with`], also handing over the guest memory the ring was opened in.
    fn with_memory<R>(
        &mut self,
        device: &NetDevice,
        f: impl FnOnce(&mut Ring<'_, '_>, &Arc<Memory>) -> R,
    ) -> Result<R, Unserved> {
        let mut vring = device.vring(self.index);
        if !vring.is_live() {
            return Err(Unserved::NotLive);
        }
        let generation = device.generation();
        if generation != self.generation || self.state.is_none() {
            self.generation = generation;
            self.state = Some(RingState::from_queue(&vring.queue));
        }
        let Some(state) = self.state.as_mut() else { return Err(Unserved::NotLive) };
        let mem = device.mem.memory().into_inner();
        let result = match Ring::open(&mem, state) {
            Ok(mut ring) => Ok(f(&mut ring, &mem)),
            Err(RingError::Broken) => Err(Unserved::Broken { now: false }),
            Err(_) => Err(Unserved::Broken { now: true }),
        };
        state.store_position(&mut vring.queue);
        result
    }

    fn is_broken(&self) -> bool {
        self.state.as_ref().is_some_and(RingState::is_broken)
    }

    fn signal(&self, device: &NetDevice) {
        device.vring(self.index).signal_guest();
    }
}

/// The guest's TX queue.
pub struct VhostTxSource {
    device: Arc<NetDevice>,
    ring: DeviceRing,
    segments: Vec<Segment>,
    /// Chains whose frames are still being delivered from guest memory, and the device
    /// generation they belong to (a restarted device must not get them back).
    deferred: Vec<u16>,
    deferred_generation: u64,
    /// Our own handle on the current kick eventfd: the worker's epoll holds this fd number, and
    /// the frontend may replace its kick fd on reconnect.
    kick: Option<File>,
    kick_generation: u64,
}

impl VhostTxSource {
    pub fn new(device: Arc<NetDevice>) -> VhostTxSource {
        VhostTxSource {
            device,
            ring: DeviceRing::new(TX_QUEUE),
            segments: Vec::new(),
            deferred: Vec::new(),
            deferred_generation: 0,
            kick: None,
            kick_generation: u64::MAX,
        }
    }
}

impl FrameSource for VhostTxSource {
    fn recv(&mut self, scratch: &mut Scratch, max: usize, errors: &mut Vec<RecvError>) -> usize {
        let segments = &mut self.segments;
        let deferred = &mut self.deferred;
        self.deferred_generation = self.device.generation();
        let result = self.ring.with_memory(&self.device, |ring, mem| {
            let mut n = 0;
            let mut used = false;
            while n < max {
                let Some((buf, tail)) = scratch.next_split() else { break };
                match pop_tx_split(ring, mem, segments, buf, tail) {
                    Ok(Some(f)) => {
                        match f.deferred {
                            Some(head) => {
                                deferred.push(head);
                                scratch.commit_split(f.head_len);
                            }
                            None => {
                                scratch.commit(f.head_len);
                                used = true;
                            }
                        }
                        n += 1;
                    }
                    Ok(None) => break,
                    Err(VirtioError::RingBroken) => {
                        errors.push(RecvError::RingBroken);
                        break;
                    }
                    Err(e) => {
                        used = true;
                        errors.push(RecvError::Drop(e.drop_reason()));
                        if errors.len() >= max {
                            break;
                        }
                    }
                }
            }
            // The guest frees its TX buffers when told they are used (or when it next sends).
            ring.publish();
            (n, used && ring.needs_notification())
        });
        let (n, notify) = match result {
            Ok(r) => r,
            Err(Unserved::Broken { now: true }) => {
                errors.push(RecvError::RingBroken);
                return 0;
            }
            Err(_) => return 0,
        };
        if notify {
            self.ring.signal(&self.device);
        }
        n
    }

    fn complete(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        if self.device.generation() != self.deferred_generation {
            // The device restarted meanwhile: these chains belong to a ring that is gone.
            self.deferred.clear();
            return;
        }
        let deferred = &mut self.deferred;
        let notify = self.ring.with(&self.device, |ring| {
            for head in deferred.drain(..) {
                ring.add_used(head, 0);
            }
            ring.publish();
            ring.needs_notification()
        });
        self.deferred.clear();
        if notify == Ok(true) {
            self.ring.signal(&self.device);
        }
    }

    fn wake_fd(&mut self) -> Option<RawFd> {
        // Asked again after every state change: take a handle on the current kick fd.
        let generation = self.device.generation();
        if generation != self.kick_generation {
            self.kick_generation = generation;
            let ring = self.device.vring(TX_QUEUE);
            self.kick = ring.kick.as_ref().and_then(|k| k.try_clone().ok());
        }
        self.kick.as_ref().map(|k| k.as_raw_fd())
    }

    fn on_wake(&mut self) {
        // Epoll said readable, so this read does not block even on a blocking eventfd.
        if let Some(kick) = self.kick.as_mut() {
            let mut count = [0u8; 8];
            let _ = kick.read(&mut count);
        }
    }

    fn prepare_sleep(&mut self) -> bool {
        // True if the guest added buffers after our last look: don't sleep then.
        self.ring.with(&self.device, |ring| ring.enable_notification()).unwrap_or(false)
    }

    fn wake_up(&mut self) {
        let _ = self.ring.with(&self.device, |ring| ring.disable_notification());
    }
}

/// The guest's RX queue.
pub struct VhostRxSink {
    device: Arc<NetDevice>,
    ring: DeviceRing,
    writer: RxWriter,
}

impl VhostRxSink {
    pub fn new(device: Arc<NetDevice>) -> VhostRxSink {
        VhostRxSink { device, ring: DeviceRing::new(RX_QUEUE), writer: RxWriter::new(false) }
    }
}

struct VhostRxBatch<'a, 'r, 'm> {
    ring: &'a mut Ring<'r, 'm>,
    writer: &'a mut RxWriter,
    /// Chains were used (frames written, or bad chains handed back): the guest needs to know.
    used: bool,
}

impl GuestRxWriter for VhostRxBatch<'_, '_, '_> {
    fn push(&mut self, hdr: &VnetHdr, parts: &[&[u8]], tail: Option<&GuestTail>) -> Result<(), DropReason> {
        let result = self.writer.push_with_tail(self.ring, hdr, parts, tail);
        self.used |= !matches!(result, Err(VirtioError::NoBuffer));
        result.map_err(VirtioError::drop_reason)
    }
}

impl FrameSink for VhostRxSink {
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason> {
        let mut result = Err(DropReason::PortDown);
        self.batch(&mut |w| result = w.send(hdr, parts));
        result
    }

    fn flush(&mut self) {}

    /// The guest's RX ring stays open and locked for the whole batch; one interrupt at most.
    fn batch(&mut self, write: &mut dyn FnMut(&mut dyn FrameWriter)) {
        self.writer.mrg_rxbuf = has(self.device.acked_features(), VIRTIO_NET_F_MRG_RXBUF);
        let writer = &mut self.writer;
        let was_broken = self.ring.is_broken();
        let notify = self.ring.with(&self.device, |ring| {
            let mut batch = VhostRxBatch { ring, writer, used: false };
            write(&mut batch);
            let used = batch.used;
            ring.publish();
            used && ring.needs_notification()
        });
        match notify {
            // Not running (VM not connected or stopping): the frames are dropped and counted.
            Err(Unserved::NotLive) => write(&mut Refuse(DropReason::PortDown)),
            Err(Unserved::Broken { .. }) => write(&mut Refuse(DropReason::RingBroken)),
            Ok(_) => {}
        }
        if !was_broken && self.ring.is_broken() {
            tracing::warn!(queue = RX_QUEUE, "guest broke its RX ring; not served until it resets it");
        }
        if notify == Ok(true) {
            self.ring.signal(&self.device);
        }
    }

    fn caps(&self) -> OffloadCaps {
        guest_caps(self.device.acked_features())
    }
}

enum Command {
    Add {
        name: String,
        socket: PathBuf,
        policy: SocketPolicy,
        config: NetDeviceConfig,
        device: Arc<NetDevice>,
        handle: PortHandle,
        reply: Sender<Result<(), ServerError>>,
    },
    Remove {
        name: String,
    },
}

/// The thread that speaks vhost-user on every VM socket (never touches frames).
pub struct VhostService {
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

/// How often the service thread looks at its command queue while no socket is busy.
const COMMAND_POLL: Duration = Duration::from_millis(20);

impl VhostService {
    pub fn start() -> Result<VhostService, DatapathError> {
        let mut server = VhostUserServer::new()
            .map_err(|e| DatapathError::Backend { port: "vhost-user".into(), source: BackendError::Vhost(e) })?;
        let (commands, rx): (Sender<Command>, Receiver<Command>) = channel();
        let thread = std::thread::Builder::new()
            .name("vmq-vhost".into())
            .spawn(move || {
                loop {
                    if let Err(e) = server.poll(COMMAND_POLL.as_millis() as i32) {
                        tracing::error!(error = %e, "vhost-user server");
                    }
                    loop {
                        match rx.try_recv() {
                            Ok(Command::Add { name, socket, policy, config, device, handle, reply }) => {
                                let on_event = Box::new(move |event| match event {
                                    DeviceEvent::Started => handle.set_up(true),
                                    DeviceEvent::Stopped => handle.set_up(false),
                                });
                                let result = server.add_port_with(&name, &socket, &policy, config, device, on_event);
                                let _ = reply.send(result);
                            }
                            Ok(Command::Remove { name }) => {
                                let _ = server.remove_port(&name);
                            }
                            Err(std::sync::mpsc::TryRecvError::Empty) => break,
                            // The data path is gone: close every socket.
                            Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                        }
                    }
                }
            })
            .map_err(DatapathError::Thread)?;
        Ok(VhostService { commands, thread: Some(thread) })
    }

    /// Listens on `socket` for the VM of port `name`; the port comes up when the guest's
    /// driver has started both rings.
    pub fn attach(
        &self,
        name: &str,
        socket: PathBuf,
        policy: SocketPolicy,
        config: NetDeviceConfig,
        handle: PortHandle,
    ) -> Result<Attachment, DatapathError> {
        let device = NetDevice::new();
        let (reply, result) = channel();
        let backend_err = |source: BackendError| DatapathError::Backend { port: name.to_string(), source };
        self.commands
            .send(Command::Add {
                name: name.to_string(),
                socket,
                policy,
                config,
                device: device.clone(),
                handle,
                reply,
            })
            .map_err(|_| backend_err(BackendError::VhostServiceGone))?;
        result
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| backend_err(BackendError::VhostServiceTimeout))?
            .map_err(|e| backend_err(BackendError::Vhost(e)))?;
        let mut att =
            Attachment::new(Box::new(VhostRxSink::new(device.clone())), Some(Box::new(VhostTxSource::new(device))));
        att.up = false;
        att.keepalive = Some(Box::new(Registration { name: name.to_string(), commands: self.commands.clone() }));
        Ok(att)
    }
}

impl Drop for VhostService {
    fn drop(&mut self) {
        // Closing the channel ends the thread (after its current poll).
        let (dead, _) = channel();
        self.commands = dead;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Unregisters the port's socket when the port is removed.
struct Registration {
    name: String,
    commands: Sender<Command>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Remove { name: std::mem::take(&mut self.name) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{BufferSpec, SplitRingDriver};
    use vm_memory::GuestAddress;

    /// A device whose TX ring a driver (this test) set up in guest memory, as after a
    /// vhost-user frontend started it.
    fn running_tx(size: u16) -> (Arc<NetDevice>, Arc<Memory>, SplitRingDriver) {
        let device = NetDevice::new();
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (mut driver, _) = SplitRingDriver::new(size, GuestAddress(0));
        driver.init(&mem).unwrap();
        {
            let mut vring = device.vring(TX_QUEUE);
            driver.configure(&mut vring.queue);
            vring.started = true;
            vring.enabled = true;
        }
        device.mem.lock().unwrap().replace(mem);
        let mem = device.mem.memory().into_inner();
        (device, mem, driver)
    }

    /// A small frame is copied whole; the worker's batch must not keep the guest's memory
    /// mapped after the batch (found by the soak: a killed VM's hugepages stayed mapped by vmq
    /// until another frame passed through the same worker).
    #[test]
    fn a_copied_frame_leaves_no_hold_on_guest_memory_after_the_batch() {
        let (device, mem, mut driver) = running_tx(16);
        let mut source = VhostTxSource::new(device.clone());
        let mut scratch = Scratch::new();
        let mut errors = Vec::new();
        driver.add_chain(&*mem, &[BufferSpec { addr: GuestAddress(0x8_0000), len: 100, device_writes: false }]);
        driver.publish(&*mem);
        assert_eq!(source.recv(&mut scratch, 32, &mut errors), 1);
        source.complete();
        scratch.clear();
        // The frontend goes: the device forgets its memory. Only this test's handle is left.
        device.mem.lock().unwrap().replace(Memory::default());
        assert_eq!(Arc::strong_count(&mem), 1, "the batch still holds the departed guest's memory");
    }

    #[test]
    fn a_bogus_avail_index_is_reported_once_and_lets_the_worker_sleep() {
        let (device, mem, mut driver) = running_tx(16);
        let mut source = VhostTxSource::new(device);
        let mut scratch = Scratch::new();
        let mut errors = Vec::new();
        let frame = BufferSpec { addr: GuestAddress(0x8_0000), len: 100, device_writes: false };
        driver.add_chain(&*mem, &[frame]);
        driver.publish(&*mem);
        assert_eq!(source.recv(&mut scratch, 32, &mut errors), 1);
        assert!(errors.is_empty());
        driver.write_raw_avail_idx(&*mem, 1 + 16 + 5);
        for round in 0..100 {
            scratch.clear();
            errors.clear();
            assert_eq!(source.recv(&mut scratch, 32, &mut errors), 0);
            let expected: &[RecvError] = if round == 0 { &[RecvError::RingBroken] } else { &[] };
            assert_eq!(errors, expected, "round {round}");
            assert!(!source.prepare_sleep(), "round {round}: a broken ring keeps the worker awake");
        }
    }
}

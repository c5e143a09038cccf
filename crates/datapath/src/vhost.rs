//! vhost-user-net ports on the data path: a worker serves the guest's TX ring (a
//! [`FrameSource`]) and any worker writes into its RX ring (a [`FrameSink`]), with the same
//! device-side virtio code as the in-process `mem` port. The protocol side (QEMU's socket) is
//! the `vmq-vhost` crate, served by one control-plane thread for all VMs.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmq_core::{DropReason, OffloadCaps};
use vmq_vhost::server::{ConnectionStatus, PortStatus, ServerError, SocketPolicy, VhostMode, VhostUserServer};
use vmq_vhost::{DeviceEvent, DirtyLog, NetDevice, NetDeviceConfig, RX_QUEUE, TX_QUEUE};
use vmq_wire::VnetHdr;

use crate::attach::{Attachment, PortHandle};
use crate::error::{BackendError, DatapathError};
pub use crate::guest_ring::guest_caps;
use crate::guest_ring::{DeviceRing, Unserved, has, push_logged};
use crate::port::{FrameSink, FrameSource, FrameWriter, GuestRxWriter, GuestTail, RecvError, Refuse, Scratch, Wake};
use crate::ring::{Ring, Segment};
use crate::virtio::{RxWriter, VirtioError, pop_tx_split};

/// The guest's TX queue.
pub struct VhostTxSource {
    device: Arc<NetDevice>,
    ring: DeviceRing,
    segments: Vec<Segment>,
    /// Chains whose frames are still being delivered from guest memory, and the ring's stop
    /// count they were taken at (a ring stopped since must not get them back: the stop handed
    /// them back already).
    deferred: Vec<u16>,
    deferred_stops: u64,
    /// Our own handle on the current kick eventfd: the worker's epoll holds this fd number, and
    /// the frontend may replace its kick fd on reconnect.
    kick: Option<File>,
    /// The device generation and ring layout the kick fd was taken at.
    kick_generation: (u64, u64),
    /// The last poll took nothing: the next one first checks cheaply (a busy ring skips the
    /// check, which would only add a ring lock).
    was_idle: bool,
}

impl VhostTxSource {
    /// The TX ring of the first queue pair.
    pub fn new(device: Arc<NetDevice>) -> VhostTxSource {
        VhostTxSource::for_pair(device, 0)
    }

    /// The TX ring of queue pair `pair` (ring `2 * pair + 1`); each is a task of its own, so
    /// the TX rings of one multiqueue VM are served by different workers.
    pub fn for_pair(device: Arc<NetDevice>, pair: u16) -> VhostTxSource {
        VhostTxSource {
            device,
            ring: DeviceRing::new(TX_QUEUE + 2 * usize::from(pair)),
            segments: Vec::new(),
            deferred: Vec::new(),
            deferred_stops: 0,
            kick: None,
            kick_generation: (u64::MAX, u64::MAX),
            was_idle: false,
        }
    }
}

impl FrameSource for VhostTxSource {
    fn recv(&mut self, scratch: &mut Scratch, max: usize, errors: &mut Vec<RecvError>) -> usize {
        let segments = &mut self.segments;
        let deferred = &mut self.deferred;
        // After a live migration (SEND_RARP): the guest's announce enters the switch as if the
        // guest had sent it, ahead of its own frames.
        let mut announced = 0;
        if self.ring.index == TX_QUEUE
            && self.device.migration.announce_pending()
            && let Some(mac) = self.device.migration.take_announce()
        {
            let mut frame = vec![0u8; VnetHdr::LEN];
            frame.extend_from_slice(&vmq_wire::rarp::announce(mac));
            if scratch.push_shared(Arc::from(frame)) {
                announced = 1;
            }
        }
        let max = max.saturating_sub(announced);
        if announced == 0 && self.was_idle && !self.ring.avail_pending(&self.device) {
            return 0;
        }
        let result = self.ring.with_memory(&self.device, |ring, mem, _| {
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
            // While chains of this batch are deferred, `complete` publishes the whole batch:
            // the published used index must always count a prefix of the avail ring, because
            // that is where QEMU resumes the ring if vmq dies (it takes its last_avail_idx
            // from the used index). Short chains published ahead of a deferred long one would
            // be handed out again after a crash, and the long one never.
            if !deferred.is_empty() {
                ring.hold_back_used();
                return (n, false);
            }
            ring.publish();
            (n, used && ring.needs_notification())
        });
        // Read under the ring lock of the batch that took the chains.
        self.deferred_stops = self.ring.stops;
        let (n, notify) = match result {
            Ok(r) => {
                self.was_idle = r.0 == 0;
                r
            }
            Err(Unserved::Broken { now: true }) => {
                errors.push(RecvError::RingBroken);
                return announced;
            }
            Err(_) => return announced,
        };
        if notify {
            self.ring.signal(&self.device);
        }
        n + announced
    }

    fn complete(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        // Not the device's generation: it also changes when only the RX ring stops (QEMU stops
        // RX first), and chains of a TX ring still running that were never returned would
        // leave the used index short of them: GET_VRING_BASE would then hand a later chain out
        // twice. If this ring stopped, the stop gave them back and they are dropped here.
        let deferred = &mut self.deferred;
        let notify = self.ring.with_unless_stopped_since(&self.device, self.deferred_stops, |ring| {
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

    fn wake(&mut self) -> Wake {
        // Asked again after every state change: take a handle on the current kick fd. The ring
        // layout changes when a further queue pair's ring starts (after the device started).
        let generation = (self.device.generation(), self.device.ring_layout());
        if generation != self.kick_generation {
            self.kick_generation = generation;
            let ring = self.device.vring(self.ring.index);
            self.kick = ring.kick.as_ref().and_then(|k| k.try_clone().ok());
        }
        match &self.kick {
            Some(kick) => Wake::Fd(kick.as_raw_fd()),
            // A device that does not run has no frames to give; when it starts, the port comes
            // up, which refreshes the workers (after the generation changed). A further pair's
            // ring without a kick fd has not started: its start refreshes the workers too.
            None if !self.device.is_running() || self.ring.index != TX_QUEUE => Wake::Never,
            // Running without a kick fd (the frontend asked for a polled ring).
            None => Wake::Poll,
        }
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
    /// Frames the next batch carries (see [`FrameSink::expect_frames`]).
    batch_frames: usize,
}

impl VhostRxSink {
    pub fn new(device: Arc<NetDevice>) -> VhostRxSink {
        VhostRxSink { device, ring: DeviceRing::new(RX_QUEUE), writer: RxWriter::new(false), batch_frames: 1 }
    }
}

pub(crate) struct VhostRxBatch<'a, 'r, 'm> {
    ring: &'a mut Ring<'r, 'm>,
    writer: &'a mut RxWriter,
    /// While a live migration runs: the buffers of every frame written are marked.
    log: Option<&'a DirtyLog>,
    /// Chains were used (frames written, or bad chains handed back): the guest needs to know.
    used: bool,
}

impl GuestRxWriter for VhostRxBatch<'_, '_, '_> {
    fn push(&mut self, hdr: &VnetHdr, parts: &[&[u8]], tail: Option<&GuestTail>) -> Result<(), DropReason> {
        push_logged(self.writer, self.ring, self.log, &mut self.used, (hdr, parts, tail))
            .map_err(VirtioError::drop_reason)
    }
}

impl FrameSink for VhostRxSink {
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason> {
        let mut result = Err(DropReason::PortDown);
        self.batch_frames = 1;
        self.batch(&mut |w| result = w.send(hdr, parts));
        result
    }

    fn flush(&mut self) {}

    fn expect_frames(&mut self, frames: usize) {
        self.batch_frames = frames;
    }

    /// The guest's RX ring stays open and locked for the whole batch; one interrupt at most.
    fn batch(&mut self, write: &mut dyn FnMut(&mut dyn FrameWriter)) {
        self.writer.mrg_rxbuf = has(self.device.acked_features(), VIRTIO_NET_F_MRG_RXBUF);
        let writer = &mut self.writer;
        let was_broken = self.ring.is_broken();
        let frames = std::mem::replace(&mut self.batch_frames, 1);
        let notify = self.ring.with_memory(&self.device, |ring, _, log| {
            ring.expect_chains(frames);
            let mut batch = VhostRxBatch { ring, writer, log, used: false };
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
        mode: VhostMode,
        policy: SocketPolicy,
        config: NetDeviceConfig,
        device: Arc<NetDevice>,
        handle: PortHandle,
        reply: Sender<Result<Arc<ConnectionStatus>, ServerError>>,
    },
    Remove {
        name: String,
    },
}

/// The thread that speaks vhost-user on every VM socket (never touches frames).
pub struct VhostService {
    commands: Commands,
    thread: Option<JoinHandle<()>>,
    /// Connection state of every socket, as of the service thread's last turn (for metrics:
    /// read without waiting on the thread).
    status: Arc<Mutex<Vec<PortStatus>>>,
}

/// The service thread's command queue, and the eventfd that wakes the thread for each command:
/// it sleeps on its sockets and this fd, without a timeout.
#[derive(Clone)]
struct Commands {
    queue: Sender<Command>,
    wake: Arc<EventFd>,
}

impl Commands {
    /// Queues `command` and wakes the thread; false if the thread is gone.
    fn send(&self, command: Command) -> bool {
        let sent = self.queue.send(command).is_ok();
        let _ = self.wake.write(1);
        sent
    }
}

impl VhostService {
    pub fn start() -> Result<VhostService, DatapathError> {
        let mut server = VhostUserServer::new()
            .map_err(|e| DatapathError::Backend { port: "vhost-user".into(), source: BackendError::Vhost(e) })?;
        let service_err = |e| DatapathError::Backend { port: "vhost-user".into(), source: BackendError::Vhost(e) };
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| service_err(ServerError::Epoll(e)))?);
        server.add_wake_fd(wake.as_raw_fd()).map_err(service_err)?;
        let (queue, rx): (Sender<Command>, Receiver<Command>) = channel();
        let commands = Commands { queue, wake: wake.clone() };
        let status = Arc::new(Mutex::new(Vec::new()));
        let published = status.clone();
        let thread = std::thread::Builder::new()
            .name("vmq-vhost".into())
            .spawn(move || {
                loop {
                    // Sockets and commands wake this thread; the server adds its own deadlines
                    // (stalled connections).
                    if let Err(e) = server.poll(-1) {
                        tracing::error!(error = %e, "vhost-user server");
                    }
                    let _ = wake.read();
                    publish_status(&server, &published);
                    loop {
                        match rx.try_recv() {
                            Ok(Command::Add { name, socket, mode, policy, config, device, handle, reply }) => {
                                let on_event = Box::new(move |event| match event {
                                    DeviceEvent::Started => handle.set_up(true),
                                    DeviceEvent::Stopped => handle.set_up(false),
                                    DeviceEvent::RingsChanged => handle.refresh(),
                                });
                                let result = server
                                    .add_port_mode(&name, &socket, mode, &policy, config, device, on_event)
                                    .map(|()| server.connection_status(&name));
                                let result = result.and_then(|s| s.ok_or(ServerError::UnknownPort(name)));
                                // Before the reply: a port that exists has its state shown.
                                publish_status(&server, &published);
                                let _ = reply.send(result);
                            }
                            Ok(Command::Remove { name }) => {
                                let _ = server.remove_port(&name);
                                publish_status(&server, &published);
                            }
                            Err(std::sync::mpsc::TryRecvError::Empty) => break,
                            // The data path is gone: close every socket.
                            Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                        }
                    }
                }
            })
            .map_err(DatapathError::Thread)?;
        Ok(VhostService { commands, thread: Some(thread), status })
    }

    /// Connection state of every vhost-user socket (as of the service thread's last turn).
    pub fn status(&self) -> Vec<PortStatus> {
        crate::engine::lock(&self.status).clone()
    }

    /// Listens on `socket` for the VM of port `name` (server mode), or connects to it (client
    /// mode); the port comes up when the guest's driver has started both rings.
    #[allow(clippy::too_many_arguments)] // the port's configuration, field by field
    pub fn attach(
        &self,
        name: &str,
        socket: PathBuf,
        mode: VhostMode,
        policy: SocketPolicy,
        config: NetDeviceConfig,
        handle: PortHandle,
        queue_pairs: u16,
    ) -> Result<Attachment, DatapathError> {
        let device = NetDevice::with_queue_pairs(queue_pairs);
        let (reply, result) = channel();
        let backend_err = |source: BackendError| DatapathError::Backend { port: name.to_string(), source };
        let sent = self.commands.send(Command::Add {
            name: name.to_string(),
            socket,
            mode,
            policy,
            config,
            device: device.clone(),
            handle,
            reply,
        });
        if !sent {
            return Err(backend_err(BackendError::VhostServiceGone));
        }
        let status = result
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| backend_err(BackendError::VhostServiceTimeout))?
            .map_err(|e| backend_err(BackendError::Vhost(e)))?;
        let pairs = device.queue_pairs();
        let mut att = if pairs == 1 {
            Attachment::new(Box::new(VhostRxSink::new(device.clone())), Some(Box::new(VhostTxSource::new(device))))
        } else {
            // Multiqueue: one sink (lane) per RX ring, one task per TX ring (vhost_mq.rs).
            use crate::vhost_mq::{VhostLiveLanes, VhostMqRxSink};
            let counters = crate::attach::QueueCounters::new(pairs);
            let sink = VhostMqRxSink::lane(device.clone(), counters.clone(), 0);
            let mut att = Attachment::new(Box::new(sink), Some(Box::new(VhostTxSource::new(device.clone()))));
            for pair in 1..pairs {
                att.more_sources.push(Box::new(VhostTxSource::for_pair(device.clone(), pair)));
                att.more_sinks.push(Box::new(VhostMqRxSink::lane(device.clone(), counters.clone(), pair)));
            }
            att.live_lanes = Some(Arc::new(VhostLiveLanes::new(device.clone())));
            att.queue_counters = Some(counters);
            att
        };
        att.up = false;
        att.vhost = Some(status);
        att.keepalive = Some(Box::new(Registration { name: name.to_string(), commands: self.commands.clone() }));
        Ok(att)
    }
}

/// Copies the server's connection state where [`VhostService::status`] reads it.
fn publish_status(server: &VhostUserServer, published: &Mutex<Vec<PortStatus>>) {
    let now = server.status();
    let mut shown = crate::engine::lock(published);
    if *shown != now {
        *shown = now;
    }
}

impl Drop for VhostService {
    fn drop(&mut self) {
        // Closing the channel ends the thread (woken from its current poll).
        let (dead, _) = channel();
        self.commands.queue = dead;
        let _ = self.commands.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Unregisters the port's socket when the port is removed.
struct Registration {
    name: String,
    commands: Commands,
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
    use crate::ring::Memory;
    use proptest::prelude::*;
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;
    use vm_memory::GuestAddressSpace;

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

    /// A device whose ring `index` a driver set up, the protocol state being driven by a real
    /// backend (as QEMU drives it); `log`: dirty logging on.
    fn running_ring(index: usize, log: Option<Arc<DirtyLog>>) -> (Arc<NetDevice>, Arc<Memory>, SplitRingDriver) {
        let device = NetDevice::new();
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (mut driver, _) = SplitRingDriver::new(16, GuestAddress(0));
        driver.init(&mem).unwrap();
        {
            let mut vring = device.vring(index);
            driver.configure(&mut vring.queue);
            vring.started = true;
            vring.enabled = true;
            vring.dirty_log = log;
        }
        device.mem.lock().unwrap().replace(mem);
        let mem = device.mem.memory().into_inner();
        (device, mem, driver)
    }

    fn backend_for(device: &Arc<NetDevice>) -> vmq_vhost::NetBackend {
        let config = NetDeviceConfig {
            mac: vmq_wire::MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            mtu: 1500,
            offloads: false,
            trust_unsealed_memory: false,
        };
        vmq_vhost::NetBackend::new(config, device.clone(), Box::new(|_| {}))
    }

    fn used_idx_in_guest(mem: &Memory, used_ring: u64) -> u16 {
        use vm_memory::Bytes;
        u16::from_le(mem.load(GuestAddress(used_ring + 2), std::sync::atomic::Ordering::Acquire).unwrap())
    }

    /// GET_VRING_BASE hands the ring to the VMM (on the source of a live migration: to the
    /// destination's vmq). Its index must be exactly what the guest sees used: chains vmq took
    /// but had not returned (a long TX frame still in flight) would otherwise never come back
    /// on the destination (the guest's TX buffers leak), and nothing may be written into the
    /// guest after the reply (QEMU has sent the final dirty pages by then).
    #[test]
    fn get_vring_base_is_the_used_index_the_guest_sees_and_nothing_is_written_after_it() {
        use vhost::vhost_user::VhostUserBackendReqHandlerMut;
        let (device, mem, mut driver) = running_ring(TX_QUEUE, None);
        let used_ring = device.vring(TX_QUEUE).queue.used_ring();
        let mut backend = backend_for(&device);
        let mut source = VhostTxSource::new(device.clone());
        let mut scratch = Scratch::new();
        let mut errors = Vec::new();
        let long = BufferSpec { addr: GuestAddress(0x8_0000), len: 2000, device_writes: false };
        let short = BufferSpec { addr: GuestAddress(0x9_0000), len: 100, device_writes: false };
        driver.add_chain(&*mem, &[long]).unwrap();
        driver.add_chain(&*mem, &[short]).unwrap();
        driver.publish(&*mem);
        assert_eq!(source.recv(&mut scratch, 32, &mut errors), 2);
        // The worker delivers the long frame's tail now; meanwhile the VMM stops the ring.
        let base = { backend.get_vring_base(TX_QUEUE as u32).unwrap().num };
        assert_eq!(base, u32::from(used_idx_in_guest(&mem, used_ring)), "index the guest does not see used");
        assert_eq!(base, 0);
        source.complete();
        assert_eq!(used_idx_in_guest(&mem, used_ring), 0, "a worker wrote into the guest after GET_VRING_BASE");
        // Nothing is lost: restarted at the base, the ring hands out both chains again.
        assert_eq!(device.vring(TX_QUEUE).queue.next_avail(), 0);
    }

    /// At the end of a live migration QEMU stops the RX ring first (GET_VRING_BASE 0, then 1):
    /// the device stops while its TX ring still runs. A long TX frame in flight then must still
    /// come back to the guest: dropped, its chain would never be used while the short one after
    /// it is, and the TX ring's GET_VRING_BASE (the used index) would hand a chain vmq already
    /// sent and returned to the destination a second time (a double completion in the guest).
    #[test]
    fn a_tx_chain_in_flight_when_the_rx_ring_stops_first_is_returned_and_counted_once() {
        use vhost::vhost_user::VhostUserBackendReqHandlerMut;
        let (device, mem, mut driver) = running_ring(TX_QUEUE, None);
        let (mut rx_driver, _) = SplitRingDriver::new(16, GuestAddress(0x4_0000));
        rx_driver.init(&*mem).unwrap();
        {
            let mut vring = device.vring(RX_QUEUE);
            rx_driver.configure(&mut vring.queue);
            vring.started = true;
            vring.enabled = true;
        }
        let used_ring = device.vring(TX_QUEUE).queue.used_ring();
        let mut backend = backend_for(&device);
        backend.enable_vring(RX_QUEUE as u32, true).unwrap();
        assert!(device.is_running());
        let mut source = VhostTxSource::new(device.clone());
        let mut scratch = Scratch::new();
        let mut errors = Vec::new();
        let long = BufferSpec { addr: GuestAddress(0x8_0000), len: 2000, device_writes: false };
        let short = BufferSpec { addr: GuestAddress(0x9_0000), len: 100, device_writes: false };
        driver.add_chain(&*mem, &[long]).unwrap();
        driver.add_chain(&*mem, &[short]).unwrap();
        driver.publish(&*mem);
        assert_eq!(source.recv(&mut scratch, 32, &mut errors), 2);
        backend.get_vring_base(RX_QUEUE as u32).unwrap();
        assert!(!device.is_running() && device.vring(TX_QUEUE).is_live(), "the TX ring still runs");
        // The long frame's tail is delivered now.
        source.complete();
        assert_eq!(used_idx_in_guest(&mem, used_ring), 2, "the chain in flight was not returned");
        // A third frame on the still running TX ring, then the TX ring stops too.
        driver.add_chain(&*mem, &[short]).unwrap();
        driver.publish(&*mem);
        scratch.clear();
        assert_eq!(source.recv(&mut scratch, 32, &mut errors), 1);
        source.complete();
        let base = { backend.get_vring_base(TX_QUEUE as u32).unwrap().num };
        assert_eq!(base, 3, "GET_VRING_BASE does not count every chain taken and returned");
        let mut used = Vec::new();
        while let Some((head, _)) = driver.pop_used(&*mem) {
            used.push(head);
        }
        used.sort_unstable();
        used.dedup();
        assert_eq!(used.len(), 3, "each chain used exactly once: {used:?}");
    }

    /// A TX chain in flight when the TX ring itself stops was handed back by GET_VRING_BASE
    /// (the ring resumes at the used index, the frame is sent again): it must not be returned
    /// too, nor may a restarted ring start from the worker's old position.
    #[test]
    fn a_tx_chain_in_flight_when_its_ring_stops_is_not_returned_after_the_stop() {
        use vhost::vhost_user::VhostUserBackendReqHandlerMut;
        let (device, mem, mut driver) = running_ring(TX_QUEUE, None);
        let used_ring = device.vring(TX_QUEUE).queue.used_ring();
        let mut backend = backend_for(&device);
        let mut source = VhostTxSource::new(device.clone());
        let mut scratch = Scratch::new();
        let mut errors = Vec::new();
        let long = BufferSpec { addr: GuestAddress(0x8_0000), len: 2000, device_writes: false };
        driver.add_chain(&*mem, &[long]).unwrap();
        driver.publish(&*mem);
        assert_eq!(source.recv(&mut scratch, 32, &mut errors), 1);
        let base = { backend.get_vring_base(TX_QUEUE as u32).unwrap().num };
        assert_eq!(base, 0);
        // The frontend restarts the ring where vmq said (the device's generation may not move:
        // the RX ring of the pair is down here).
        backend.set_vring_base(TX_QUEUE as u32, 0).unwrap();
        {
            let mut vring = device.vring(TX_QUEUE);
            vring.queue.set_ready(true);
            vring.started = true;
            vring.enabled = true;
        }
        source.complete();
        assert_eq!(used_idx_in_guest(&mem, used_ring), 0, "a chain handed back by the stop was returned too");
        // Served again from the base: the long frame once more, then returned once.
        scratch.clear();
        assert_eq!(source.recv(&mut scratch, 32, &mut errors), 1, "the restarted ring lost the chain");
        source.complete();
        assert_eq!(used_idx_in_guest(&mem, used_ring), 1);
    }

    /// While a live migration logs dirty pages, every page vmq writes is marked: the RX buffer
    /// a frame went to and the used ring; no other page.
    #[test]
    fn a_logged_rx_frame_marks_its_buffer_and_the_used_ring() {
        let file = vmq_sys::memfd::create("log", 4096, 0).unwrap();
        let log = Arc::new(DirtyLog::map(&file, 0, 4096).unwrap());
        let (device, mem, mut driver) = running_ring(RX_QUEUE, Some(log.clone()));
        let used_ring = device.vring(RX_QUEUE).queue.used_ring();
        // A buffer straddling two pages, and one the frame does not reach.
        let buf = BufferSpec { addr: GuestAddress(0x8_0f00), len: 4096, device_writes: true };
        driver.add_chain(&*mem, &[buf]).unwrap();
        driver.add_chain(&*mem, &[BufferSpec { addr: GuestAddress(0xa_0000), len: 4096, device_writes: true }]);
        driver.publish(&*mem);
        let mut sink = VhostRxSink::new(device.clone());
        let frame = vec![0xabu8; 1000];
        assert_eq!(sink.send(&VnetHdr::default(), &[&frame]), Ok(()));
        assert!(log.is_dirty(0x8_0f00) && log.is_dirty(0x8_1000), "RX buffer pages not marked");
        assert!(!log.is_dirty(0x8_2000), "beyond the frame");
        assert!(!log.is_dirty(0xa_0000), "a buffer not written");
        assert!(log.is_dirty(used_ring) && log.is_dirty(used_ring + 2), "used ring not marked");
        // Logging off: nothing more is marked.
        let unlogged = Arc::new(DirtyLog::map(&vmq_sys::memfd::create("log", 4096, 0).unwrap(), 0, 4096).unwrap());
        device.vring(RX_QUEUE).dirty_log = None;
        assert_eq!(sink.send(&VnetHdr::default(), &[&frame]), Ok(()));
        assert!(!unlogged.is_dirty(0xa_0000));
        assert_eq!(driver.pop_used(&*mem).map(|(_, len)| len), Some(1000 + VnetHdr::LEN as u32));
    }

    /// After SEND_RARP the TX source hands the switch a RARP announce from the guest's MAC.
    #[test]
    fn a_requested_announce_comes_out_of_the_tx_source_once() {
        let (device, _mem, _driver) = running_ring(TX_QUEUE, None);
        let mut backend = backend_for(&device);
        let mut source = VhostTxSource::new(device.clone());
        let mut scratch = Scratch::new();
        let mut errors = Vec::new();
        let mac = vmq_wire::MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        assert!(backend.send_rarp(mac).is_err(), "RARP protocol feature not negotiated");
        use vhost::vhost_user::VhostUserBackendReqHandlerMut;
        backend.set_protocol_features(vmq_vhost::backend::offered_protocol_features().bits()).unwrap();
        backend.send_rarp(mac).unwrap();
        assert_eq!(source.recv(&mut scratch, 32, &mut errors), 1);
        let frame = &scratch.get(0)[VnetHdr::LEN..];
        assert_eq!(frame, &vmq_wire::rarp::announce(mac)[..]);
        scratch.clear();
        assert_eq!(source.recv(&mut scratch, 32, &mut errors), 0, "announced once");
        assert_eq!(device.migration.announces(), 1);
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

    /// After vmq dies, QEMU resumes the ring at the used index it finds in guest memory (it sets
    /// its last_avail_idx to it). That is only right if the published used index always counts a
    /// prefix of the avail ring: a short chain published before a long one whose tail was still
    /// being delivered would be handed out again (used twice) and the long one never (lost).
    #[test]
    fn the_published_used_index_counts_a_prefix_of_the_avail_ring() {
        let (device, mem, mut driver) = running_tx(16);
        let mut source = VhostTxSource::new(device);
        let mut scratch = Scratch::new();
        let mut errors = Vec::new();
        let long = BufferSpec { addr: GuestAddress(0x8_0000), len: 2000, device_writes: false };
        let short = BufferSpec { addr: GuestAddress(0x9_0000), len: 100, device_writes: false };
        let long_head = driver.add_chain(&*mem, &[long]).unwrap();
        let short_head = driver.add_chain(&*mem, &[short]).unwrap();
        driver.publish(&*mem);
        assert_eq!(source.recv(&mut scratch, 32, &mut errors), 2);
        assert!(errors.is_empty(), "{errors:?}");
        // The long frame's tail is still to be delivered: nothing of the batch is published yet.
        assert_eq!(driver.pop_used(&*mem), None, "a used entry published ahead of an earlier chain in flight");
        source.complete();
        let mut used = Vec::new();
        while let Some((head, _)) = driver.pop_used(&*mem) {
            used.push(head);
        }
        used.sort_unstable();
        let mut expected = vec![long_head, short_head];
        expected.sort_unstable();
        assert_eq!(used, expected, "both chains back once the batch is delivered");
    }

    /// What the test guest does between vmq's turns (its own writes are not vmq's to log).
    #[derive(Debug, Clone)]
    enum GuestStep {
        /// An RX chain of writable buffers `(offset in the buffer area, length)`.
        PostRx(Vec<(u32, u32)>),
        /// A TX frame of this length.
        PostTx(u32),
        /// The guest reaps what vmq used on both rings.
        Reap,
    }

    /// What vmq does: each step is checked on its own.
    #[derive(Debug, Clone)]
    enum VmqStep {
        /// A frame of this length into the guest's RX ring.
        Deliver(usize),
        /// The worker's turn on the TX ring: take what is there, deliver it, return it.
        ServeTx,
        /// The worker goes to sleep on the TX ring (with EVENT_IDX: writes avail_event).
        SleepTx,
    }

    const LOG_GUEST_BYTES: usize = 0x4_0000;
    const LOG_BUFFERS: u64 = 0x1_0000;

    fn guest_step() -> impl Strategy<Value = GuestStep> {
        let buffer = (0u32..(LOG_GUEST_BYTES as u32 - LOG_BUFFERS as u32 - 9000), 1u32..5000);
        prop_oneof![
            3 => prop::collection::vec(buffer, 1..4).prop_map(GuestStep::PostRx),
            2 => (14u32..3000).prop_map(GuestStep::PostTx),
            1 => Just(GuestStep::Reap),
        ]
    }

    fn vmq_step() -> impl Strategy<Value = VmqStep> {
        prop_oneof![
            3 => (1usize..9100).prop_map(VmqStep::Deliver),
            2 => Just(VmqStep::ServeTx),
            1 => Just(VmqStep::SleepTx),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        /// Live migration is only correct if every guest byte vmq changes while QEMU logs is on
        /// a page marked in the dirty log: QEMU resends marked pages and nothing else. Checked
        /// against guest memory itself, not against what the code means to write: a snapshot
        /// before each of vmq's steps, a fresh log per step, and every page that differs after
        /// it must be marked (RX buffers, merged buffers, used rings, avail_event with EVENT_IDX,
        /// chains given back as bad or short).
        #[test]
        fn dirty_log_covers_every_page_vmq_writes(
            mrg_rxbuf in any::<bool>(),
            event_idx in any::<bool>(),
            steps in prop::collection::vec((guest_step(), vmq_step()), 1..40),
        ) {
            use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
            use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
            use vhost::vhost_user::VhostUserBackendReqHandlerMut;
            use vm_memory::Bytes;

            let device = NetDevice::new();
            let mem = Memory::from_ranges(&[(GuestAddress(0), LOG_GUEST_BYTES)]).unwrap();
            let (mut tx, tx_end) = SplitRingDriver::new(16, GuestAddress(0));
            let (mut rx, rx_end) = SplitRingDriver::new(16, tx_end);
            prop_assert!(rx_end.0 <= LOG_BUFFERS);
            tx.init(&mem).unwrap();
            rx.init(&mem).unwrap();
            let mut backend = backend_for(&device);
            let mut features = 1u64 << VIRTIO_F_VERSION_1;
            if mrg_rxbuf {
                features |= 1 << VIRTIO_NET_F_MRG_RXBUF;
            }
            if event_idx {
                features |= 1 << VIRTIO_RING_F_EVENT_IDX;
            }
            backend.set_features(features).unwrap();
            for (index, driver) in [(TX_QUEUE, &tx), (RX_QUEUE, &rx)] {
                let mut vring = device.vring(index);
                driver.configure(&mut vring.queue);
                vring.queue.set_event_idx(event_idx);
                vring.started = true;
                vring.enabled = true;
            }
            device.mem.lock().unwrap().replace(mem);
            let mem = device.mem.memory().into_inner();
            let mut sink = VhostRxSink::new(device.clone());
            let mut source = VhostTxSource::new(device.clone());
            let mut scratch = Scratch::new();
            let mut errors = Vec::new();
            let mut tx_offset = 0u64;

            for (guest, vmq) in steps {
                match guest {
                    GuestStep::PostRx(buffers) => {
                        let specs: Vec<BufferSpec> = buffers
                            .iter()
                            .map(|&(at, len)| BufferSpec { addr: GuestAddress(LOG_BUFFERS + u64::from(at)), len, device_writes: true })
                            .collect();
                        if rx.add_chain(&*mem, &specs).is_some() {
                            rx.publish(&*mem);
                        }
                    }
                    GuestStep::PostTx(len) => {
                        let addr = GuestAddress(LOG_BUFFERS + tx_offset);
                        tx_offset = (tx_offset + 4096) % (LOG_GUEST_BYTES as u64 - LOG_BUFFERS - 4096);
                        let frame = vec![0x5au8; VnetHdr::LEN + len as usize];
                        mem.write_slice(&frame, addr).unwrap();
                        if tx.add_chain(&*mem, &[BufferSpec { addr, len: frame.len() as u32, device_writes: false }]).is_some() {
                            tx.publish(&*mem);
                        }
                    }
                    GuestStep::Reap => {
                        while let Some((head, _)) = rx.pop_used(&*mem) {
                            rx.release(&*mem, head);
                        }
                        while let Some((head, _)) = tx.pop_used(&*mem) {
                            tx.release(&*mem, head);
                        }
                    }
                }
                let mut before = vec![0u8; LOG_GUEST_BYTES];
                mem.read_slice(&mut before, GuestAddress(0)).unwrap();
                let file = vmq_sys::memfd::create("log", 4096, 0).unwrap();
                let log = Arc::new(DirtyLog::map(&file, 0, 4096).unwrap());
                device.vring(TX_QUEUE).dirty_log = Some(log.clone());
                device.vring(RX_QUEUE).dirty_log = Some(log.clone());
                match vmq {
                    VmqStep::Deliver(len) => {
                        let frame: Vec<u8> = (0..len).map(|i| i as u8 | 1).collect();
                        let _ = sink.send(&VnetHdr::default(), &[&frame]);
                    }
                    VmqStep::ServeTx => {
                        source.recv(&mut scratch, 32, &mut errors);
                        source.complete();
                        scratch.clear();
                        errors.clear();
                    }
                    VmqStep::SleepTx => {
                        let _ = source.prepare_sleep();
                    }
                }
                let mut after = vec![0u8; LOG_GUEST_BYTES];
                mem.read_slice(&mut after, GuestAddress(0)).unwrap();
                for (page, (was, is)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
                    let gpa = page as u64 * 4096;
                    prop_assert!(was == is || log.is_dirty(gpa), "{vmq:?} changed page {gpa:#x} without marking it");
                }
            }
        }
    }
}

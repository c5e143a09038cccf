//! The vhost-user protocol against the `vhost` crate's frontend (what QEMU speaks), and against
//! hostile clients that send garbage: the port survives and takes the next connection.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;
use vmq_vhost::server::{PortStatus, VhostUserServer};
use vmq_vhost::{DeviceEvent, NetDevice, NetDeviceConfig};

const TIMEOUT: Duration = Duration::from_secs(10);
const MEM_SIZE: u64 = 1 << 20;
/// Where the "VMM" pretends to have mapped guest memory; vring addresses are given in this space.
const VMM_BASE: u64 = 0x7f00_0000_0000;

struct Harness {
    dir: PathBuf,
    socket: PathBuf,
    events: Receiver<DeviceEvent>,
    status: Arc<Mutex<Vec<PortStatus>>>,
    stop: Arc<AtomicBool>,
    /// Server loop iterations: proves the server thread is not stuck.
    polls: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<JoinHandle<()>>,
    device: Arc<NetDevice>,
}

impl Harness {
    fn new(name: &str) -> Harness {
        let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("debug").try_init();
        let dir = std::env::temp_dir().join(format!("vmq-vhost-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vm.sock");
        let (tx, events): (Sender<DeviceEvent>, _) = channel();
        let device = NetDevice::new();
        let status = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let polls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (ready_tx, ready_rx) = channel();
        let thread = {
            let (socket, device, status, stop) = (socket.clone(), device.clone(), status.clone(), stop.clone());
            let polls = polls.clone();
            std::thread::spawn(move || {
                let mut server = VhostUserServer::new().unwrap();
                let tx = Mutex::new(tx);
                let config = NetDeviceConfig { mac: "52:54:00:00:00:01".parse().unwrap(), mtu: 9000, offloads: true };
                server
                    .add_port(
                        "vm1",
                        &socket,
                        config,
                        device,
                        Box::new(move |e| {
                            let _ = tx.lock().unwrap().send(e);
                        }),
                    )
                    .unwrap();
                ready_tx.send(()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    server.poll(20).unwrap();
                    *status.lock().unwrap() = server.status();
                    polls.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        ready_rx.recv_timeout(TIMEOUT).expect("server started");
        Harness { dir, socket, events, status, stop, polls, thread: Some(thread), device }
    }

    fn wait_status(&self, what: &str, pred: impl Fn(&PortStatus) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if self.status.lock().unwrap().first().is_some_and(&pred) {
                return;
            }
            std::thread::yield_now();
        }
        panic!("timed out waiting for port status: {what}");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn guest_memory_file(dir: &Path) -> std::fs::File {
    let path = dir.join("guest-mem");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    f.set_len(MEM_SIZE).unwrap();
    f
}

/// Does what QEMU does to bring up a vhost-user-net device with one queue pair.
fn bring_up(h: &Harness) -> (Frontend, std::fs::File, Vec<EventFd>) {
    let mut fe = Frontend::connect(&h.socket, 2).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    assert_ne!(features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::REPLY_ACK));
    fe.set_protocol_features(proto).unwrap();
    let mem = guest_memory_file(&h.dir);
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM_SIZE,
        userspace_addr: VMM_BASE,
        mmap_offset: 0,
        mmap_handle: mem.as_raw_fd(),
    };
    fe.set_mem_table(&[region]).unwrap();
    let mut fds = Vec::new();
    for q in 0..2usize {
        let base = VMM_BASE + q as u64 * 0x10000;
        fe.set_vring_num(q, 256).unwrap();
        let cfg = VringConfigData {
            queue_max_size: 256,
            queue_size: 256,
            flags: 0,
            desc_table_addr: base,
            used_ring_addr: base + 0x2000,
            avail_ring_addr: base + 0x1000,
            log_addr: None,
        };
        fe.set_vring_addr(q, &cfg).unwrap();
        fe.set_vring_base(q, 0).unwrap();
        let call = EventFd::new(0).unwrap();
        let kick = EventFd::new(0).unwrap();
        fe.set_vring_call(q, &call).unwrap();
        fe.set_vring_kick(q, &kick).unwrap();
        // Rings start disabled with protocol features; nothing runs before this.
        assert!(!h.device.is_running());
        fe.set_vring_enable(q, true).unwrap();
        fds.push(call);
        fds.push(kick);
    }
    (fe, mem, fds)
}

#[test]
fn frontend_brings_device_up_and_reconnects() {
    let h = Harness::new("up");
    let (fe, _mem, _fds) = bring_up(&h);
    assert_eq!(h.events.recv_timeout(TIMEOUT).unwrap(), DeviceEvent::Started);
    assert!(h.device.is_running());
    // Ring addresses were translated from VMM addresses to guest-physical ones.
    assert_eq!(h.device.vring(1).queue.desc_table(), 0x10000);
    let gen_running = h.device.generation();

    // The VM goes away (kill -9): the port goes down and forgets the rings.
    drop(fe);
    assert_eq!(h.events.recv_timeout(TIMEOUT).unwrap(), DeviceEvent::Stopped);
    h.wait_status("disconnected", |s| !s.connected && !s.running);
    assert!(h.device.generation() > gen_running);

    // The next connection on the same socket works.
    let (_fe, _mem, _fds) = bring_up(&h);
    assert_eq!(h.events.recv_timeout(TIMEOUT).unwrap(), DeviceEvent::Started);
    h.wait_status("running again", |s| s.connected && s.running);
}

#[test]
fn get_vring_base_stops_the_device() {
    let h = Harness::new("stop");
    let (fe, _mem, _fds) = bring_up(&h);
    assert_eq!(h.events.recv_timeout(TIMEOUT).unwrap(), DeviceEvent::Started);
    assert_eq!(fe.get_vring_base(0).unwrap(), 0);
    assert_eq!(h.events.recv_timeout(TIMEOUT).unwrap(), DeviceEvent::Stopped);
    assert!(!h.device.is_running());
}

fn send_raw(socket: &Path, bytes: &[u8]) {
    let mut s = UnixStream::connect(socket).unwrap();
    let _ = s.write_all(bytes);
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // The server answers garbage by closing the connection: read returns 0 (EOF) or an error.
    let mut buf = [0u8; 64];
    let _ = std::io::Read::read(&mut s, &mut buf);
}

#[test]
fn hostile_clients_are_disconnected_and_the_port_survives() {
    let h = Harness::new("hostile");
    // Garbage, a header announcing a huge body, an unknown request, a truncated header.
    send_raw(&h.socket, &[0xff; 64]);
    let mut huge = Vec::new();
    huge.extend_from_slice(&1u32.to_le_bytes()); // GET_FEATURES
    huge.extend_from_slice(&1u32.to_le_bytes()); // flags: version 1
    huge.extend_from_slice(&u32::MAX.to_le_bytes()); // size
    send_raw(&h.socket, &huge);
    let mut unknown = Vec::new();
    unknown.extend_from_slice(&999u32.to_le_bytes());
    unknown.extend_from_slice(&1u32.to_le_bytes());
    unknown.extend_from_slice(&0u32.to_le_bytes());
    send_raw(&h.socket, &unknown);
    // A truncated header must not stall the server thread (which serves every port).
    {
        let mut s = UnixStream::connect(&h.socket).unwrap();
        s.write_all(&[1, 0, 0]).unwrap();
        h.wait_status("partial client connected", |s| s.connected);
        let before = h.polls.load(Ordering::Relaxed);
        let deadline = Instant::now() + TIMEOUT;
        while h.polls.load(Ordering::Relaxed) < before + 3 {
            assert!(Instant::now() < deadline, "a partial message stalled the server");
            std::thread::yield_now();
        }
    }
    h.wait_status("idle after a truncated header", |s| !s.connected);
    // SET_OWNER twice (refused; without REPLY_ACK the frontend only sees the hang-up).
    {
        let fe = Frontend::connect(&h.socket, 2).unwrap();
        fe.set_owner().unwrap();
        let _ = fe.set_owner();
    }
    h.wait_status("idle after SET_OWNER twice", |s| !s.connected);
    // Disconnect mid-handshake.
    {
        let fe = Frontend::connect(&h.socket, 2).unwrap();
        fe.set_owner().unwrap();
        let _ = fe.get_features().unwrap();
    }
    h.wait_status("idle after hostile clients", |s| !s.connected);
    // A well-behaved frontend still gets a working device.
    let (_fe, _mem, _fds) = bring_up(&h);
    assert_eq!(h.events.recv_timeout(TIMEOUT).unwrap(), DeviceEvent::Started);
}

#[test]
fn bad_ring_setup_is_refused() {
    let h = Harness::new("badring");
    let fe = Frontend::connect(&h.socket, 2).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    h.wait_status("connected", |s| s.connected);
    // Ring size not a power of two: refused, and the frontend is disconnected.
    let _ = fe.set_vring_num(0, 300);
    h.wait_status("disconnected after a bad ring size", |s| !s.connected);
    assert!(fe.set_vring_num(0, 256).is_err(), "the connection must be closed");

    let fe = Frontend::connect(&h.socket, 2).unwrap();
    fe.set_owner().unwrap();
    h.wait_status("connected", |s| s.connected);
    // Ring address outside the (empty) memory table.
    let cfg = VringConfigData {
        queue_max_size: 256,
        queue_size: 256,
        flags: 0,
        desc_table_addr: 0xdead_0000,
        used_ring_addr: 0xdead_2000,
        avail_ring_addr: 0xdead_1000,
        log_addr: None,
    };
    let _ = fe.set_vring_addr(0, &cfg);
    h.wait_status("disconnected after a bad ring address", |s| !s.connected);
    assert!(h.events.try_recv().is_err(), "device must not start");
}

//! A vhost-user server on its own thread with any number of ports, as vmq's control thread
//! would run it, for the protocol and QEMU tests.
#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmq_vhost::server::{PortStatus, SocketPolicy, VhostMode, VhostUserServer};
use vmq_vhost::{DeviceEvent, NetDevice, NetDeviceConfig};

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub fn init_tracing() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter(filter).try_init();
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("vqv-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test directory");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct TestPort {
    pub name: String,
    pub socket: PathBuf,
    pub device: Arc<NetDevice>,
    pub events: Receiver<DeviceEvent>,
}

impl TestPort {
    pub fn expect_event(&self, expected: DeviceEvent, within: Duration) {
        match self.events.recv_timeout(within) {
            Ok(event) => assert_eq!(event, expected, "port {}", self.name),
            Err(_) => panic!("port {}: no {expected:?} event within {within:?}", self.name),
        }
    }

    /// No event arrives within `within` (the device neither started nor stopped).
    pub fn expect_no_event(&self, within: Duration) {
        if let Ok(event) = self.events.recv_timeout(within) {
            panic!("port {}: unexpected {event:?}", self.name);
        }
    }
}

pub struct TestServer {
    pub ports: Vec<TestPort>,
    status: Arc<Mutex<Vec<PortStatus>>>,
    /// Server loop iterations: proves the server thread is not stuck.
    polls: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Serves one port per config, with sockets `<dir>/<name>.sock`.
    pub fn start(dir: &Path, ports: &[(&str, NetDeviceConfig)]) -> TestServer {
        TestServer::start_with(dir, ports, None)
    }

    /// Like `start`, with another timeout for stalled connections.
    pub fn start_with(dir: &Path, ports: &[(&str, NetDeviceConfig)], stall_timeout: Option<Duration>) -> TestServer {
        let ports: Vec<_> =
            ports.iter().map(|(name, config)| (*name, config.clone(), SocketPolicy::default())).collect();
        TestServer::start_with_policies(dir, &ports, stall_timeout)
    }

    /// Like `start_with`, each port with its socket policy.
    pub fn start_with_policies(
        dir: &Path,
        ports: &[(&str, NetDeviceConfig, SocketPolicy)],
        stall_timeout: Option<Duration>,
    ) -> TestServer {
        let ports: Vec<_> = ports
            .iter()
            .map(|(name, config, policy)| (*name, config.clone(), policy.clone(), VhostMode::Server))
            .collect();
        TestServer::start_with_modes(dir, &ports, stall_timeout)
    }

    /// Like `start_with_policies`, each port in server or client mode.
    pub fn start_with_modes(
        dir: &Path,
        ports: &[(&str, NetDeviceConfig, SocketPolicy, VhostMode)],
        stall_timeout: Option<Duration>,
    ) -> TestServer {
        let stop = Arc::new(AtomicBool::new(false));
        let polls = Arc::new(AtomicU64::new(0));
        let status = Arc::new(Mutex::new(Vec::new()));
        let mut test_ports = Vec::new();
        let mut setup = Vec::new();
        for (name, config, policy, mode) in ports {
            let (tx, rx) = channel();
            let device = NetDevice::new();
            let socket = dir.join(format!("{name}.sock"));
            test_ports.push(TestPort {
                name: name.to_string(),
                socket: socket.clone(),
                device: device.clone(),
                events: rx,
            });
            setup.push((name.to_string(), socket, *mode, policy.clone(), config.clone(), device, tx));
        }
        let (ready_tx, ready_rx) = channel();
        let thread = {
            let (stop, polls, status) = (stop.clone(), polls.clone(), status.clone());
            std::thread::spawn(move || {
                let mut server = VhostUserServer::new().expect("epoll");
                if let Some(timeout) = stall_timeout {
                    server.set_stall_timeout(timeout);
                }
                for (name, socket, mode, policy, config, device, tx) in setup {
                    let tx = Mutex::new(tx);
                    let on_event = Box::new(move |e| {
                        let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(e);
                    });
                    server.add_port_mode(&name, &socket, mode, &policy, config, device, on_event).expect("add port");
                }
                let _ = ready_tx.send(());
                while !stop.load(Ordering::Relaxed) {
                    server.poll(10).expect("server poll");
                    *status.lock().unwrap_or_else(|p| p.into_inner()) = server.status();
                    polls.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        ready_rx.recv_timeout(TIMEOUT).expect("server thread started");
        TestServer { ports: test_ports, status, polls, stop, thread: Some(thread) }
    }

    pub fn port(&self, index: usize) -> &TestPort {
        &self.ports[index]
    }

    pub fn status(&self, index: usize) -> Option<PortStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).get(index).cloned()
    }

    /// Waits until port `index`'s status satisfies `pred`.
    pub fn wait_status(&self, index: usize, what: &str, pred: impl Fn(&PortStatus) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if self.status(index).as_ref().is_some_and(&pred) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("timed out waiting for port {index}: {what} (status {:?})", self.status(index));
    }

    /// Waits until port `index` has accepted `n` connections in all and none is open.
    pub fn wait_closed(&self, index: usize, n: u64) {
        self.wait_status(index, &format!("connection {n} closed"), |s| s.connections >= n && !s.connected);
        let status = self.status(index);
        assert_eq!(status.as_ref().map(|s| s.connections), Some(n), "unexpected extra connections");
    }

    /// The server thread keeps polling (a few more loop iterations happen).
    pub fn assert_polling(&self) {
        let before = self.polls.load(Ordering::Relaxed);
        let deadline = Instant::now() + TIMEOUT;
        while self.polls.load(Ordering::Relaxed) < before + 3 {
            assert!(Instant::now() < deadline, "the server thread stopped polling");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub fn net_config(mac: &str, mtu: u16) -> NetDeviceConfig {
    NetDeviceConfig { mac: mac.parse().expect("MAC"), mtu, offloads: true, trust_unsealed_memory: false }
}

/// Size of the guest memory the in-process frontends hand over.
pub const MEM_SIZE: u64 = 1 << 20;
/// Where the "VMM" pretends to have mapped guest memory; vring addresses are given in this space.
pub const VMM_BASE: u64 = 0x7f00_0000_0000;
/// Ring q's descriptor table is at guest address q * RING_STRIDE, its avail ring 4 KiB and its
/// used ring 8 KiB further (room for 256 entries each).
pub const RING_STRIDE: u64 = 0x10000;

/// Guest memory as QEMU's `memory-backend-memfd` makes it: a memfd sealed against growing and
/// shrinking (its default, `seal=on`).
pub fn guest_memory_file(_dir: &Path, name: &str) -> std::fs::File {
    use vmq_sys::memfd::{SEAL_GROW, SEAL_SEAL, SEAL_SHRINK, create};
    create(name, MEM_SIZE, SEAL_GROW | SEAL_SHRINK | SEAL_SEAL).expect("sealed memfd")
}

/// A plain file as guest memory (as a file-backed or hugetlbfs backend hands over): it can be
/// truncated under the backend's mapping.
pub fn plain_memory_file(dir: &Path, name: &str) -> std::fs::File {
    let path = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("memory file");
    f.set_len(MEM_SIZE).expect("size memory file");
    let _ = std::fs::remove_file(&path);
    f
}

/// A frontend (the `vhost` crate's, as a VMM would use it) that brought a device up.
pub struct Session {
    pub frontend: vhost::vhost_user::Frontend,
    pub memory: std::fs::File,
    pub notifiers: Vec<vmm_sys_util::eventfd::EventFd>,
}

/// Does what QEMU does to bring up a vhost-user-net device with one queue pair, and checks the
/// device starts.
pub fn bring_up(port: &TestPort, dir: &Path) -> Session {
    bring_up_on(std::os::unix::net::UnixStream::connect(&port.socket).expect("connect"), port, dir)
}

/// [`bring_up`] on a connection made already (accepted from a client-mode port).
pub fn bring_up_on(stream: std::os::unix::net::UnixStream, port: &TestPort, dir: &Path) -> Session {
    use std::os::fd::AsRawFd;
    use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
    use vmm_sys_util::eventfd::EventFd;

    // Bounded: a server that stops answering fails the test instead of hanging it.
    stream.set_nonblocking(false).expect("blocking");
    stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    stream.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
    let mut fe = Frontend::from_stream(stream, 2);
    fe.set_owner().expect("SET_OWNER");
    let features = fe.get_features().expect("GET_FEATURES");
    assert_ne!(features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    // This frontend lays out split rings: it acks everything else offered.
    let features = features & !(1u64 << vmq_vhost::packed::VIRTIO_F_RING_PACKED);
    fe.set_features(features).expect("SET_FEATURES");
    let proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(proto.contains(VhostUserProtocolFeatures::REPLY_ACK));
    fe.set_protocol_features(proto).expect("SET_PROTOCOL_FEATURES");
    // Every request is acknowledged from here on: a refusal shows up as an error.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let memory = guest_memory_file(dir, &format!("{}-mem", port.name));
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM_SIZE,
        userspace_addr: VMM_BASE,
        mmap_offset: 0,
        mmap_handle: memory.as_raw_fd(),
    };
    fe.set_mem_table(&[region]).expect("SET_MEM_TABLE");
    let mut notifiers = Vec::new();
    for q in 0..2usize {
        let base = VMM_BASE + q as u64 * RING_STRIDE;
        fe.set_vring_num(q, 256).expect("SET_VRING_NUM");
        let cfg = VringConfigData {
            queue_max_size: 256,
            queue_size: 256,
            flags: 0,
            desc_table_addr: base,
            used_ring_addr: base + 0x2000,
            avail_ring_addr: base + 0x1000,
            log_addr: None,
        };
        fe.set_vring_addr(q, &cfg).expect("SET_VRING_ADDR");
        fe.set_vring_base(q, 0).expect("SET_VRING_BASE");
        let call = EventFd::new(0).expect("eventfd");
        let kick = EventFd::new(0).expect("eventfd");
        fe.set_vring_call(q, &call).expect("SET_VRING_CALL");
        fe.set_vring_kick(q, &kick).expect("SET_VRING_KICK");
        // Rings start disabled with protocol features; nothing runs before this.
        assert!(!port.device.is_running());
        fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
        notifiers.push(call);
        notifiers.push(kick);
    }
    port.expect_event(DeviceEvent::Started, TIMEOUT);
    assert!(port.device.is_running());
    Session { frontend: fe, memory, notifiers }
}

/// After an attack on port `attacked`: the server thread still polls, every other port
/// completes a full handshake, and the attacked port serves a well-behaved frontend.
pub fn assert_ports_still_work(server: &TestServer, dir: &Path, attacked: usize) {
    server.assert_polling();
    let mut order: Vec<usize> = (0..server.ports.len()).filter(|&i| i != attacked).collect();
    order.push(attacked);
    for index in order {
        let port = server.port(index);
        let before = server.status(index).map_or(0, |s| s.connections);
        let session = bring_up(port, dir);
        server.wait_status(index, "running", |s| s.connected && s.running);
        drop(session);
        port.expect_event(DeviceEvent::Stopped, TIMEOUT);
        server.wait_closed(index, before + 1);
    }
}

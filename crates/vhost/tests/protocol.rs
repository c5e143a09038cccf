//! The vhost-user protocol against the `vhost` crate's frontend (what a VMM speaks) and against
//! hostile clients. For every attack: the connection is closed (or the request refused), the
//! server thread still polls, a second port served by the same server completes a full
//! handshake afterwards, and the attacked port serves a well-behaved frontend next.

mod common;

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    MEM_SIZE, RING_STRIDE, TIMEOUT, TempDir, TestServer, VMM_BASE, assert_ports_still_work, bring_up,
    guest_memory_file, init_tracing, net_config, plain_memory_file,
};
use nix::sys::eventfd::EventFd;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use vhost::VhostBackend;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_queue::QueueT;
use vmq_vhost::DeviceEvent;
use vmq_vhost::backend::offered_protocol_features;

// Request codes (vhost-user spec).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const NET_SET_MTU: u32 = 20;
const SEND_RARP: u32 = 19;
const GET_CONFIG: u32 = 24;

const REPLY_ACK_FEATURE: u64 = 1 << 3;

const VERSION_1: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;
const REPLY: u32 = 0x4;

/// How a request ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The reply body (for an acked request: the u64 ack, 0 = success).
    Reply(Vec<u8>),
    /// The server closed the connection.
    Closed,
}

/// A frontend written byte by byte, to send what no well-behaved VMM would.
struct Raw {
    stream: UnixStream,
    /// REPLY_ACK negotiated: requests without a reply of their own get an ack.
    reply_ack: std::cell::Cell<bool>,
}

impl Raw {
    fn connect(socket: &Path) -> Raw {
        let stream = UnixStream::connect(socket).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
        stream.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
        Raw { stream, reply_ack: std::cell::Cell::new(false) }
    }

    fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        let sent = sendmsg::<()>(self.stream.as_raw_fd(), &[IoSlice::new(bytes)], cmsgs, MsgFlags::empty(), None)?;
        if sent < bytes.len() {
            (&self.stream).write_all(&bytes[sent..])?;
        }
        Ok(())
    }

    /// A message whose header announces `size` bytes of body, whatever follows.
    fn send_sized(&self, request: u32, flags: u32, size: u32, body: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(body);
        self.send_bytes(&msg, fds)
    }

    fn send(&self, request: u32, flags: u32, body: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        self.send_sized(request, flags, body.len() as u32, body, fds)
    }

    /// The next reply, or `Closed` when the server hangs up first.
    fn reply(&self, request: u32) -> Outcome {
        let mut header = [0u8; 12];
        match (&self.stream).read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("no reply to request {request} within {TIMEOUT:?}")
            }
            Err(_) => return Outcome::Closed,
        }
        let code = u32::from_le_bytes(header[..4].try_into().unwrap());
        let flags = u32::from_le_bytes(header[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(header[8..].try_into().unwrap()) as usize;
        assert_eq!(code, request, "reply to another request");
        assert_eq!(flags & REPLY, REPLY, "reply flag");
        let mut body = vec![0u8; size];
        match (&self.stream).read_exact(&mut body) {
            Ok(()) => Outcome::Reply(body),
            Err(_) => Outcome::Closed,
        }
    }

    /// Sends a request that wants a reply (an ack for requests without one) and returns it.
    /// Before REPLY_ACK is negotiated, requests without a reply of their own are just sent.
    fn request(&self, request: u32, body: &[u8], fds: &[RawFd]) -> Outcome {
        if request == SET_PROTOCOL_FEATURES && body.len() == 8 && u64_of(body) & REPLY_ACK_FEATURE != 0 {
            // The backend acks this very request once it knows REPLY_ACK.
            self.reply_ack.set(true);
        }
        if is_ack_request(request) && !self.reply_ack.get() {
            return match self.send(request, VERSION_1, body, fds) {
                Ok(()) => Outcome::Reply(0u64.to_le_bytes().to_vec()),
                Err(_) => Outcome::Closed,
            };
        }
        if self.send(request, VERSION_1 | NEED_REPLY, body, fds).is_err() {
            return Outcome::Closed;
        }
        self.reply(request)
    }

    /// A request that must succeed (ack 0, or a reply).
    fn ok(&self, request: u32, body: &[u8], fds: &[RawFd]) -> Vec<u8> {
        match self.request(request, body, fds) {
            Outcome::Reply(body) => {
                if body.len() == 8 && is_ack_request(request) {
                    assert_eq!(u64_of(&body), 0, "request {request} refused");
                }
                body
            }
            Outcome::Closed => panic!("connection closed on request {request}"),
        }
    }

    /// The server closed the connection: reads end with EOF or a reset, not a timeout. Replies
    /// (like a failed ack) before that are skipped.
    fn assert_closed(&self) {
        let mut buf = [0u8; 256];
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match (&self.stream).read(&mut buf) {
                Ok(0) => return,
                Ok(_) => assert!(Instant::now() < deadline, "the server keeps talking but never closes"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                    panic!("the server did not close the connection within {TIMEOUT:?}")
                }
                Err(_) => return,
            }
        }
    }

    /// SET_OWNER, protocol features and features (all offered ones but packed rings: these
    /// attacks are on split rings, as a QEMU guest without `packed=on` sets them up), in QEMU's
    /// order.
    fn negotiate(&self) {
        self.ok(SET_OWNER, &[], &[]);
        let features = u64_of(&self.ok(GET_FEATURES, &[], &[])) & !(1u64 << vmq_vhost::packed::VIRTIO_F_RING_PACKED);
        let proto = u64_of(&self.ok(GET_PROTOCOL_FEATURES, &[], &[]));
        self.ok(SET_PROTOCOL_FEATURES, &proto.to_le_bytes(), &[]);
        self.ok(SET_FEATURES, &features.to_le_bytes(), &[]);
    }

    /// One memory region of MEM_SIZE at guest address 0, mapped at VMM_BASE.
    fn mem_table(&self, memory: &std::fs::File) {
        let table = mem_table(&[(0, MEM_SIZE, VMM_BASE, 0)]);
        self.ok(SET_MEM_TABLE, &table, &[memory.as_raw_fd()]);
    }

    /// Size, base and addresses of ring `q` (the layout `bring_up` uses).
    fn ring_setup(&self, q: u32) {
        self.ok(SET_VRING_NUM, &vring_state(q, 256), &[]);
        self.ok(SET_VRING_BASE, &vring_state(q, 0), &[]);
        let base = VMM_BASE + u64::from(q) * RING_STRIDE;
        self.ok(SET_VRING_ADDR, &vring_addr(q, base, base + 0x2000, base + 0x1000), &[]);
    }

    /// Call and kick eventfds, then enable: the ring is live.
    fn ring_start(&self, q: u32, notifiers: &mut Vec<EventFd>) {
        let call = EventFd::new().expect("eventfd");
        let kick = EventFd::new().expect("eventfd");
        self.ok(SET_VRING_CALL, &u64::from(q).to_le_bytes(), &[call.as_fd().as_raw_fd()]);
        self.ok(SET_VRING_KICK, &u64::from(q).to_le_bytes(), &[kick.as_fd().as_raw_fd()]);
        self.ok(SET_VRING_ENABLE, &vring_state(q, 1), &[]);
        notifiers.push(call);
        notifiers.push(kick);
    }

    /// The whole bring-up; the device must start.
    fn bring_up(&self, memory: &std::fs::File, notifiers: &mut Vec<EventFd>) {
        self.negotiate();
        self.mem_table(memory);
        for q in 0..2 {
            self.ring_setup(q);
            self.ring_start(q, notifiers);
        }
    }
}

fn is_ack_request(request: u32) -> bool {
    !matches!(request, GET_FEATURES | GET_PROTOCOL_FEATURES | GET_VRING_BASE | GET_QUEUE_NUM | GET_CONFIG)
}

fn u64_of(body: &[u8]) -> u64 {
    u64::from_le_bytes(body[..8].try_into().expect("8-byte body"))
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&index.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // flags
    for a in [desc, used, avail, 0] {
        b.extend_from_slice(&a.to_le_bytes());
    }
    b
}

/// `struct VhostUserMemory` with regions (guest address, size, VMM address, mmap offset).
fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for &(gpa, size, uaddr, offset) in regions {
        for v in [gpa, size, uaddr, offset] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

/// Two ports on one server; the attacks go to port 0 ("vm1"). Stalled connections (half a
/// message, unread replies) are closed after 300 ms here (5 s by default).
fn two_ports(test: &str) -> (TempDir, TestServer) {
    init_tracing();
    let dir = TempDir::new(test);
    let server = TestServer::start_with(
        dir.path(),
        &[("vm1", net_config("52:54:00:00:00:01", 1500)), ("vm2", net_config("52:54:00:00:00:02", 9000))],
        Some(Duration::from_millis(300)),
    );
    (dir, server)
}

/// Runs `attack` against port 0 on its own connection; the server must close it, and then
/// everything must still work.
fn attack_closes_connection(test: &str, attack: impl FnOnce(&Raw, &Path)) {
    let (dir, server) = two_ports(test);
    let raw = Raw::connect(&server.port(0).socket);
    attack(&raw, dir.path());
    raw.assert_closed();
    server.wait_closed(0, 1);
    assert!(!server.port(0).device.is_running());
    assert_ports_still_work(&server, dir.path(), 0);
}

// ---- Well-behaved frontends ----

#[test]
fn frontend_brings_device_up_and_reconnects() {
    let (dir, server) = two_ports("up");
    let port = server.port(0);
    let session = bring_up(port, dir.path());
    // Ring addresses were translated from VMM addresses to guest-physical ones.
    assert_eq!(port.device.vring(1).queue.desc_table(), RING_STRIDE);
    let gen_running = port.device.generation();

    // The VM goes away (kill -9): the port goes down and forgets the rings.
    drop(session);
    port.expect_event(DeviceEvent::Stopped, TIMEOUT);
    server.wait_closed(0, 1);
    assert!(port.device.generation() > gen_running);
    assert!(port.device.vring(0).kick.is_none());

    // The next connection on the same socket works.
    let _session = bring_up(port, dir.path());
    server.wait_status(0, "running again", |s| s.connected && s.running);
}

#[test]
fn get_vring_base_stops_the_device() {
    let (dir, server) = two_ports("stop");
    let port = server.port(0);
    let session = bring_up(port, dir.path());
    assert_eq!(session.frontend.get_vring_base(0).unwrap(), 0);
    port.expect_event(DeviceEvent::Stopped, TIMEOUT);
    assert!(!port.device.is_running());
}

#[test]
fn queue_num_config_and_mtu() {
    let (dir, server) = two_ports("config");
    let port = server.port(1); // MTU 9000
    let raw = Raw::connect(&port.socket);
    raw.negotiate();
    // One queue pair.
    assert_eq!(u64_of(&raw.ok(GET_QUEUE_NUM, &[], &[])), 1);
    // Config space: struct VhostUserConfig { offset, size, flags } + payload.
    let mut get = Vec::new();
    for v in [0u32, 12, 0] {
        get.extend_from_slice(&v.to_le_bytes());
    }
    get.extend_from_slice(&[0u8; 12]);
    let reply = raw.ok(GET_CONFIG, &get, &[]);
    assert_eq!(reply.len(), 24);
    let space = &reply[12..];
    assert_eq!(&space[..6], &[0x52, 0x54, 0, 0, 0, 2], "MAC");
    assert_eq!(u16::from_le_bytes([space[6], space[7]]), 1, "status: link up");
    assert_eq!(u16::from_le_bytes([space[8], space[9]]), 1, "max_virtqueue_pairs");
    assert_eq!(u16::from_le_bytes([space[10], space[11]]), 9000, "MTU");
    // NET_SET_MTU up to the port MTU is accepted and recorded.
    assert_eq!(u64_of(&raw.ok(NET_SET_MTU, &9000u64.to_le_bytes(), &[])), 0);
    assert_eq!(port.device.frontend_mtu(), Some(9000));
    // Above it: refused with a failed ack; the connection stays and the device still starts.
    assert_eq!(raw.request(NET_SET_MTU, &9001u64.to_le_bytes(), &[]), Outcome::Reply(1u64.to_le_bytes().to_vec()));
    assert_eq!(port.device.frontend_mtu(), Some(9000));
    let memory = guest_memory_file(dir.path(), "mem");
    let mut notifiers = Vec::new();
    raw.mem_table(&memory);
    for q in 0..2 {
        raw.ring_setup(q);
        raw.ring_start(q, &mut notifiers);
    }
    port.expect_event(DeviceEvent::Started, TIMEOUT);
    assert!(offered_protocol_features().contains(VhostUserProtocolFeatures::MTU | VhostUserProtocolFeatures::MQ));
}

#[test]
fn memory_table_replaced_while_running() {
    let (dir, server) = two_ports("memswap");
    let port = server.port(0);
    let raw = Raw::connect(&port.socket);
    let memory = guest_memory_file(dir.path(), "mem");
    let mut notifiers = Vec::new();
    raw.bring_up(&memory, &mut notifiers);
    port.expect_event(DeviceEvent::Started, TIMEOUT);
    // The same memory again (QEMU does this on memory hotplug): the device keeps running.
    raw.mem_table(&memory);
    port.expect_no_event(Duration::from_millis(100));
    assert!(port.device.is_running());
    // A table that no longer holds ring 1 (it starts at 64 KiB): the device stops, the
    // connection stays, and the data path's memory never points outside the file.
    let small = mem_table(&[(0, RING_STRIDE, VMM_BASE, 0)]);
    raw.ok(SET_MEM_TABLE, &small, &[memory.as_raw_fd()]);
    port.expect_event(DeviceEvent::Stopped, TIMEOUT);
    assert!(!port.device.is_running());
    server.wait_status(0, "still connected", |s| s.connected && !s.running);
    // Restoring memory and ring 1 brings it back.
    raw.mem_table(&memory);
    raw.ok(GET_VRING_BASE, &vring_state(1, 0), &[]);
    raw.ring_setup(1);
    raw.ring_start(1, &mut notifiers);
    port.expect_event(DeviceEvent::Started, TIMEOUT);
}

#[test]
fn new_kick_fd_on_a_running_ring_restarts_the_device() {
    let (dir, server) = two_ports("rekick");
    let port = server.port(0);
    let raw = Raw::connect(&port.socket);
    let memory = guest_memory_file(dir.path(), "mem");
    let mut notifiers = Vec::new();
    raw.bring_up(&memory, &mut notifiers);
    port.expect_event(DeviceEvent::Started, TIMEOUT);
    let generation = port.device.generation();
    let kick = EventFd::new().unwrap();
    raw.ok(SET_VRING_KICK, &0u64.to_le_bytes(), &[kick.as_fd().as_raw_fd()]);
    // The worker must drop the old kick fd: it is told to stop, then to start again.
    port.expect_event(DeviceEvent::Stopped, TIMEOUT);
    port.expect_event(DeviceEvent::Started, TIMEOUT);
    assert!(port.device.generation() >= generation + 2);
    // A new call fd is simply taken over (QEMU does this for interrupt masking), and signalled
    // once at once, in case a signal went to the old one meanwhile.
    let call = EventFd::new().unwrap();
    raw.ok(SET_VRING_CALL, &0u64.to_le_bytes(), &[call.as_fd().as_raw_fd()]);
    port.expect_no_event(Duration::from_millis(100));
    assert_eq!(call.read().unwrap(), 1, "the new call fd is signalled once");
    port.device.vring(0).signal_guest();
    port.device.vring(0).signal_guest();
    assert_eq!(call.read().unwrap(), 2, "the guest is signalled on the new call fd");
}

#[test]
fn second_connection_is_refused_while_the_first_runs() {
    let (dir, server) = two_ports("second");
    let port = server.port(0);
    let session = bring_up(port, dir.path());
    let intruder = Raw::connect(&port.socket);
    intruder.assert_closed();
    assert!(port.device.is_running());
    assert_eq!(session.frontend.get_vring_base(0).unwrap(), 0, "the first frontend is still served");
    port.expect_event(DeviceEvent::Stopped, TIMEOUT);
}

// ---- Hostile clients: malformed messages ----

#[test]
fn garbage_bytes() {
    attack_closes_connection("garbage", |raw, _| {
        let _ = raw.send_bytes(&[0xff; 64], &[]);
    });
}

#[test]
fn header_announcing_a_huge_body() {
    attack_closes_connection("huge", |raw, _| {
        let _ = raw.send_sized(GET_FEATURES, VERSION_1, u32::MAX, &[], &[]);
    });
}

#[test]
fn body_one_byte_over_the_limit() {
    attack_closes_connection("overlimit", |raw, _| {
        let _ = raw.send(SET_MEM_TABLE, VERSION_1, &vec![0u8; 0x1001], &[]);
    });
}

#[test]
fn unknown_request() {
    attack_closes_connection("unknown", |raw, _| {
        let _ = raw.send(999, VERSION_1, &[], &[]);
    });
}

#[test]
fn invalid_header_flags() {
    attack_closes_connection("flags", |raw, _| {
        // A "reply" sent to the backend.
        let _ = raw.send(GET_FEATURES, VERSION_1 | REPLY, &[], &[]);
    });
    attack_closes_connection("version", |raw, _| {
        let _ = raw.send(GET_FEATURES, 0x2, &[], &[]);
    });
}

#[test]
fn wrong_body_sizes() {
    attack_closes_connection("size-features", |raw, _| {
        raw.ok(SET_OWNER, &[], &[]);
        let _ = raw.send(SET_FEATURES, VERSION_1, &[0u8; 4], &[]);
    });
    attack_closes_connection("size-get", |raw, _| {
        let _ = raw.send(GET_FEATURES, VERSION_1, &[0u8; 8], &[]);
    });
    attack_closes_connection("size-num", |raw, _| {
        let _ = raw.send(SET_VRING_NUM, VERSION_1, &[0u8; 12], &[]);
    });
    attack_closes_connection("size-memtable", |raw, dir| {
        // Says one region, carries two.
        let memory = guest_memory_file(dir, "mem");
        let mut table = mem_table(&[(0, MEM_SIZE, VMM_BASE, 0), (MEM_SIZE, MEM_SIZE, VMM_BASE + MEM_SIZE, 0)]);
        table[..4].copy_from_slice(&1u32.to_le_bytes());
        let _ = raw.send(SET_MEM_TABLE, VERSION_1, &table, &[memory.as_raw_fd()]);
    });
}

#[test]
fn intercepted_requests_are_checked_strictly() {
    // SET_VRING_ENABLE and NET_SET_MTU are parsed by vmq itself, not the `vhost` crate.
    attack_closes_connection("enable-short", |raw, _| {
        let _ = raw.send(SET_VRING_ENABLE, VERSION_1, &[0u8; 4], &[]);
    });
    attack_closes_connection("enable-long", |raw, _| {
        let _ = raw.send(SET_VRING_ENABLE, VERSION_1, &[0u8; 16], &[]);
    });
    attack_closes_connection("enable-value", |raw, _| {
        let _ = raw.send(SET_VRING_ENABLE, VERSION_1, &vring_state(0, 2), &[]);
    });
    attack_closes_connection("enable-index", |raw, _| {
        let _ = raw.send(SET_VRING_ENABLE, VERSION_1 | NEED_REPLY, &vring_state(2, 1), &[]);
    });
    attack_closes_connection("enable-flags", |raw, _| {
        let _ = raw.send(SET_VRING_ENABLE, VERSION_1 | REPLY, &vring_state(0, 1), &[]);
    });
    attack_closes_connection("mtu-short", |raw, _| {
        raw.negotiate();
        let _ = raw.send(NET_SET_MTU, VERSION_1, &[0u8; 2], &[]);
    });
    attack_closes_connection("mtu-not-negotiated", |raw, _| {
        raw.ok(SET_OWNER, &[], &[]);
        let _ = raw.send(NET_SET_MTU, VERSION_1, &1500u64.to_le_bytes(), &[]);
    });
    // SEND_RARP (live migration): same rules.
    attack_closes_connection("rarp-short", |raw, _| {
        raw.negotiate();
        let _ = raw.send(SEND_RARP, VERSION_1, &[0u8; 6], &[]);
    });
    attack_closes_connection("rarp-not-negotiated", |raw, _| {
        raw.ok(SET_OWNER, &[], &[]);
        let _ = raw.send(SEND_RARP, VERSION_1, &0x0102_0000_5452u64.to_le_bytes(), &[]);
    });
}

#[test]
fn feature_negotiation_violations() {
    attack_closes_connection("features-unoffered", |raw, _| {
        raw.ok(SET_OWNER, &[], &[]);
        let features = u64_of(&raw.ok(GET_FEATURES, &[], &[]));
        let _ = raw.request(SET_FEATURES, &(features | 1 << 63).to_le_bytes(), &[]);
    });
    attack_closes_connection("features-no-version1", |raw, _| {
        raw.ok(SET_OWNER, &[], &[]);
        let _ = raw.send(SET_FEATURES, VERSION_1, &0u64.to_le_bytes(), &[]);
    });
    attack_closes_connection("protocol-unoffered", |raw, _| {
        raw.ok(SET_OWNER, &[], &[]);
        let _ = raw.send(SET_PROTOCOL_FEATURES, VERSION_1, &u64::MAX.to_le_bytes(), &[]);
    });
    attack_closes_connection("owner-twice", |raw, _| {
        raw.ok(SET_OWNER, &[], &[]);
        let _ = raw.send(SET_OWNER, VERSION_1, &[], &[]);
    });
}

// ---- Hostile clients: memory tables and fds ----

#[test]
fn too_many_memory_regions() {
    attack_closes_connection("regions-33", |raw, dir| {
        raw.negotiate();
        let memory = guest_memory_file(dir, "mem");
        let regions: Vec<_> = (0..33u64).map(|i| (i * MEM_SIZE, MEM_SIZE, VMM_BASE + i * MEM_SIZE, 0)).collect();
        let fds = vec![memory.as_raw_fd(); 32];
        let _ = raw.send(SET_MEM_TABLE, VERSION_1, &mem_table(&regions), &fds);
    });
    attack_closes_connection("regions-0", |raw, _| {
        raw.negotiate();
        let _ = raw.send(SET_MEM_TABLE, VERSION_1, &mem_table(&[]), &[]);
    });
    attack_closes_connection("regions-fds-missing", |raw, dir| {
        raw.negotiate();
        let memory = guest_memory_file(dir, "mem");
        let table =
            mem_table(&[(0, MEM_SIZE / 2, VMM_BASE, 0), (MEM_SIZE / 2, MEM_SIZE / 2, VMM_BASE + MEM_SIZE / 2, 0)]);
        let _ = raw.send(SET_MEM_TABLE, VERSION_1, &table, &[memory.as_raw_fd()]);
    });
}

#[test]
fn bogus_memory_regions() {
    // A socket, a pipe and a device instead of guest memory.
    attack_closes_connection("region-socket", |raw, _| {
        raw.negotiate();
        let (a, _b) = UnixStream::pair().unwrap();
        let _ = raw.request(SET_MEM_TABLE, &mem_table(&[(0, MEM_SIZE, VMM_BASE, 0)]), &[a.as_raw_fd()]);
    });
    attack_closes_connection("region-pipe", |raw, _| {
        raw.negotiate();
        let (read, _write) = nix::unistd::pipe().unwrap();
        let _ = raw.request(SET_MEM_TABLE, &mem_table(&[(0, MEM_SIZE, VMM_BASE, 0)]), &[read.as_raw_fd()]);
    });
    attack_closes_connection("region-device", |raw, _| {
        raw.negotiate();
        let zero = std::fs::File::open("/dev/zero").unwrap();
        let _ = raw.request(SET_MEM_TABLE, &mem_table(&[(0, MEM_SIZE, VMM_BASE, 0)]), &[zero.as_raw_fd()]);
    });
    // Larger than its file: touching the end would kill vmq with SIGBUS.
    attack_closes_connection("region-beyond-file", |raw, dir| {
        raw.negotiate();
        let memory = guest_memory_file(dir, "mem");
        let _ = raw.request(SET_MEM_TABLE, &mem_table(&[(0, 2 * MEM_SIZE, VMM_BASE, 0)]), &[memory.as_raw_fd()]);
    });
    attack_closes_connection("region-offset-beyond-file", |raw, dir| {
        raw.negotiate();
        let memory = guest_memory_file(dir, "mem");
        let _ = raw.request(SET_MEM_TABLE, &mem_table(&[(0, MEM_SIZE, VMM_BASE, 4096)]), &[memory.as_raw_fd()]);
    });
    attack_closes_connection("region-overlap", |raw, dir| {
        raw.negotiate();
        let memory = guest_memory_file(dir, "mem");
        let half = MEM_SIZE / 2;
        let table = mem_table(&[(0, half, VMM_BASE, 0), (half / 2, half, VMM_BASE + half, half)]);
        let fd = memory.as_raw_fd();
        let _ = raw.request(SET_MEM_TABLE, &table, &[fd, fd]);
    });
    attack_closes_connection("region-wraps", |raw, dir| {
        raw.negotiate();
        let memory = guest_memory_file(dir, "mem");
        let table = mem_table(&[(u64::MAX - 4095, MEM_SIZE, VMM_BASE, 0)]);
        let _ = raw.request(SET_MEM_TABLE, &table, &[memory.as_raw_fd()]);
    });
    attack_closes_connection("region-huge", |raw, dir| {
        raw.negotiate();
        let memory = guest_memory_file(dir, "mem");
        let table = mem_table(&[(0, 1 << 41, VMM_BASE, 0)]);
        let _ = raw.request(SET_MEM_TABLE, &table, &[memory.as_raw_fd()]);
    });
}

#[test]
fn guest_memory_that_can_shrink_is_refused() {
    // A frontend that truncates such a file after SET_MEM_TABLE kills vmq with SIGBUS on its next
    // access to that memory: refused up front.
    let table = || mem_table(&[(0, MEM_SIZE, VMM_BASE, 0)]);
    attack_closes_connection("region-unsealed-memfd", |raw, _| {
        raw.negotiate();
        let memory = vmq_sys::memfd::create("guest", MEM_SIZE, 0).unwrap();
        let _ = raw.request(SET_MEM_TABLE, &table(), &[memory.as_raw_fd()]);
    });
    attack_closes_connection("region-sealed-but-not-shrink", |raw, _| {
        use vmq_sys::memfd::{SEAL_GROW, SEAL_SEAL};
        raw.negotiate();
        let memory = vmq_sys::memfd::create("guest", MEM_SIZE, SEAL_GROW | SEAL_SEAL).unwrap();
        let _ = raw.request(SET_MEM_TABLE, &table(), &[memory.as_raw_fd()]);
    });
    attack_closes_connection("region-plain-file", |raw, dir| {
        raw.negotiate();
        let memory = plain_memory_file(dir, "mem");
        let _ = raw.request(SET_MEM_TABLE, &table(), &[memory.as_raw_fd()]);
    });
}

#[test]
fn sealed_guest_memory_is_accepted_and_cannot_shrink() {
    let (dir, server) = two_ports("sealed");
    let session = bring_up(server.port(0), dir.path());
    assert!(server.port(0).device.is_running());
    // What makes the SIGBUS impossible: the frontend cannot truncate it either.
    let err = session.memory.set_len(4096).expect_err("a shrink-sealed memfd cannot be truncated");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EPERM), "{err}");
}

#[test]
fn a_trusted_frontend_may_hand_over_memory_that_can_shrink() {
    init_tracing();
    let dir = TempDir::new("trusted");
    let mut config = net_config("52:54:00:00:00:01", 1500);
    config.trust_unsealed_memory = true;
    let server = TestServer::start(dir.path(), &[("vm1", config)]);
    let raw = Raw::connect(&server.port(0).socket);
    let mut notifiers = Vec::new();
    raw.bring_up(&plain_memory_file(dir.path(), "mem"), &mut notifiers);
    server.port(0).expect_event(DeviceEvent::Started, TIMEOUT);
}

#[test]
fn bogus_fds() {
    // fds attached to a request that takes none.
    attack_closes_connection("fd-on-get-features", |raw, dir| {
        let memory = guest_memory_file(dir, "mem");
        let _ = raw.send(GET_FEATURES, VERSION_1, &[], &[memory.as_raw_fd()]);
    });
    // A kick "eventfd" that is a pipe: a worker waiting on it would never wake.
    attack_closes_connection("kick-pipe", |raw, dir| {
        let memory = guest_memory_file(dir, "mem");
        raw.negotiate();
        raw.mem_table(&memory);
        raw.ring_setup(0);
        let (read, _write) = nix::unistd::pipe().unwrap();
        let _ = raw.request(SET_VRING_KICK, &0u64.to_le_bytes(), &[read.as_raw_fd()]);
    });
    // A call "eventfd" that is a regular file.
    attack_closes_connection("call-file", |raw, dir| {
        let memory = guest_memory_file(dir, "mem");
        raw.negotiate();
        let _ = raw.request(SET_VRING_CALL, &0u64.to_le_bytes(), &[memory.as_raw_fd()]);
    });
    // The "fd attached" bit clear but no fd sent.
    attack_closes_connection("kick-missing", |raw, _| {
        raw.negotiate();
        let _ = raw.send(SET_VRING_KICK, VERSION_1, &0u64.to_le_bytes(), &[]);
    });
    // Polling mode (no kick fd, flag 0x100): not supported.
    attack_closes_connection("kick-polling", |raw, _| {
        raw.negotiate();
        let _ = raw.request(SET_VRING_KICK, &0x100u64.to_le_bytes(), &[]);
    });
    // More fds than a message may carry: the kernel truncates, the message is refused.
    attack_closes_connection("fds-40", |raw, dir| {
        raw.negotiate();
        let memory = guest_memory_file(dir, "mem");
        let fds: Vec<OwnedFd> = (0..40).map(|_| memory.as_fd().try_clone_to_owned().unwrap()).collect();
        let raw_fds: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let _ = raw.send(SET_MEM_TABLE, VERSION_1, &mem_table(&[(0, MEM_SIZE, VMM_BASE, 0)]), &raw_fds);
    });
}

// ---- Hostile clients: rings ----

#[test]
fn bad_ring_setup() {
    for (name, num) in [("num-300", 300u32), ("num-0", 0), ("num-2048", 2048), ("num-32bit", 1 << 20)] {
        attack_closes_connection(name, |raw, _| {
            raw.negotiate();
            let _ = raw.request(SET_VRING_NUM, &vring_state(0, num), &[]);
        });
    }
    attack_closes_connection("index-2", |raw, _| {
        raw.negotiate();
        let _ = raw.request(SET_VRING_NUM, &vring_state(2, 256), &[]);
    });
    attack_closes_connection("kick-index-9", |raw, _| {
        raw.negotiate();
        let kick = EventFd::new().unwrap();
        let _ = raw.request(SET_VRING_KICK, &9u64.to_le_bytes(), &[kick.as_fd().as_raw_fd()]);
    });
    attack_closes_connection("base-17bit", |raw, _| {
        raw.negotiate();
        let _ = raw.request(SET_VRING_BASE, &vring_state(0, 1 << 16), &[]);
    });
    attack_closes_connection("addr-outside", |raw, dir| {
        let memory = guest_memory_file(dir, "mem");
        raw.negotiate();
        raw.mem_table(&memory);
        let _ = raw.request(SET_VRING_ADDR, &vring_addr(0, 0xdead_0000, 0xdead_2000, 0xdead_1000), &[]);
    });
    attack_closes_connection("addr-misaligned", |raw, dir| {
        let memory = guest_memory_file(dir, "mem");
        raw.negotiate();
        raw.mem_table(&memory);
        let _ = raw.request(SET_VRING_ADDR, &vring_addr(0, VMM_BASE + 8, VMM_BASE + 0x2000, VMM_BASE + 0x1000), &[]);
    });
    // The descriptor table starts inside guest memory and runs past its end: the ring must
    // not start (its kick is refused).
    attack_closes_connection("ring-past-the-end", |raw, dir| {
        let memory = guest_memory_file(dir, "mem");
        raw.negotiate();
        raw.mem_table(&memory);
        raw.ok(SET_VRING_NUM, &vring_state(0, 1024), &[]);
        let end = VMM_BASE + MEM_SIZE;
        raw.ok(SET_VRING_ADDR, &vring_addr(0, end - 0x1000, VMM_BASE + 0x2000, VMM_BASE + 0x1000), &[]);
        let kick = EventFd::new().unwrap();
        let _ = raw.request(SET_VRING_KICK, &0u64.to_le_bytes(), &[kick.as_fd().as_raw_fd()]);
    });
    // A kick before any memory table.
    attack_closes_connection("kick-without-memory", |raw, _| {
        raw.negotiate();
        let kick = EventFd::new().unwrap();
        let _ = raw.request(SET_VRING_KICK, &0u64.to_le_bytes(), &[kick.as_fd().as_raw_fd()]);
    });
}

#[test]
fn running_ring_cannot_be_reconfigured() {
    let base = VMM_BASE + 0x4000;
    let cases: [(&str, u32, Vec<u8>); 4] = [
        ("resize", SET_VRING_NUM, vring_state(0, 128)),
        ("rewind", SET_VRING_BASE, vring_state(0, 77)),
        ("move", SET_VRING_ADDR, vring_addr(0, base, base + 0x2000, base + 0x1000)),
        ("features", SET_FEATURES, (1u64 << 32).to_le_bytes().to_vec()),
    ];
    for (name, request, body) in cases {
        let (dir, server) = two_ports(&format!("running-{name}"));
        let port = server.port(0);
        let raw = Raw::connect(&port.socket);
        let memory = guest_memory_file(dir.path(), "mem");
        let mut notifiers = Vec::new();
        raw.bring_up(&memory, &mut notifiers);
        port.expect_event(DeviceEvent::Started, TIMEOUT);
        assert_eq!(
            raw.request(request, &body, &[]),
            Outcome::Reply(1u64.to_le_bytes().to_vec()),
            "{name}: must be refused while the ring runs"
        );
        raw.assert_closed();
        port.expect_event(DeviceEvent::Stopped, TIMEOUT);
        server.wait_closed(0, 1);
        assert_ports_still_work(&server, dir.path(), 0);
    }
}

// ---- Hostile clients: timing ----

#[test]
fn disconnect_mid_handshake() {
    for stage in 0..4 {
        let (dir, server) = two_ports(&format!("midway-{stage}"));
        let port = server.port(0);
        {
            let raw = Raw::connect(&port.socket);
            let memory = guest_memory_file(dir.path(), "mem");
            let mut notifiers = Vec::new();
            raw.negotiate();
            if stage >= 1 {
                raw.mem_table(&memory);
            }
            if stage >= 2 {
                raw.ring_setup(0);
                raw.ring_start(0, &mut notifiers);
            }
            if stage >= 3 {
                raw.ring_setup(1);
                raw.ring_start(1, &mut notifiers);
                port.expect_event(DeviceEvent::Started, TIMEOUT);
            }
        }
        if stage >= 3 {
            port.expect_event(DeviceEvent::Stopped, TIMEOUT);
        }
        server.wait_closed(0, 1);
        assert!(port.device.vring(0).kick.is_none(), "stage {stage}: the port forgot the guest");
        assert_ports_still_work(&server, dir.path(), 0);
    }
}

#[test]
fn truncated_header_then_silence() {
    // The server thread must not wait for the rest: other ports go on meanwhile, and the
    // connection is closed when the message stays incomplete.
    let (dir, server) = two_ports("trunc-header");
    let raw = Raw::connect(&server.port(0).socket);
    raw.send_bytes(&[1, 0, 0], &[]).unwrap();
    server.wait_status(0, "partial client connected", |s| s.connected);
    let other = bring_up(server.port(1), dir.path());
    drop(other);
    server.port(1).expect_event(DeviceEvent::Stopped, TIMEOUT);
    raw.assert_closed();
    server.wait_closed(0, 1);
    assert_ports_still_work(&server, dir.path(), 0);
}

#[test]
fn truncated_body_then_silence() {
    let (dir, server) = two_ports("trunc-body");
    let raw = Raw::connect(&server.port(0).socket);
    raw.ok(SET_OWNER, &[], &[]);
    raw.send_sized(SET_FEATURES, VERSION_1, 8, &[1, 2, 3], &[]).unwrap();
    server.assert_polling();
    raw.assert_closed();
    server.wait_closed(0, 1);
    assert_ports_still_work(&server, dir.path(), 0);
}

#[test]
fn truncated_header_then_hang_up() {
    attack_closes_connection("trunc-hangup", |raw, _| {
        raw.send_bytes(&[1, 0, 0, 0, 1], &[]).unwrap();
        raw.stream.shutdown(std::net::Shutdown::Write).unwrap();
    });
}

#[test]
fn header_with_fds_and_body_sent_apart() {
    // A peek stops after the chunk that carries fds: the message looks incomplete forever. The
    // stall timeout ends the connection.
    attack_closes_connection("split-fds", |raw, dir| {
        raw.negotiate();
        let memory = guest_memory_file(dir, "mem");
        let table = mem_table(&[(0, MEM_SIZE, VMM_BASE, 0)]);
        raw.send_sized(SET_MEM_TABLE, VERSION_1, table.len() as u32, &[], &[memory.as_raw_fd()]).unwrap();
        raw.send_bytes(&table, &[]).unwrap();
    });
}

#[test]
fn frontend_that_never_reads_its_replies() {
    // Replies pile up in the socket until it is full; the `vhost` crate would then spin on
    // EAGAIN forever. The server stops taking requests from such a frontend and disconnects it
    // when it still has not read after the stall timeout.
    let (dir, server) = two_ports("no-reads");
    let raw = Raw::connect(&server.port(0).socket);
    raw.stream.set_write_timeout(Some(Duration::from_millis(50))).unwrap();
    let request = [GET_FEATURES.to_le_bytes(), VERSION_1.to_le_bytes(), 0u32.to_le_bytes()].concat();
    let burst = request.repeat(1024);
    let deadline = Instant::now() + TIMEOUT;
    // Keep writing until the server stops taking requests (it closed the connection).
    while (&raw.stream).write_all(&burst).is_ok() {
        assert!(Instant::now() < deadline, "the server never stopped the flood");
    }
    server.wait_closed(0, 1);
    assert_ports_still_work(&server, dir.path(), 0);
}

#[test]
fn flooding_frontend_does_not_starve_other_ports() {
    // A frontend that sends requests without replies as fast as it can, each costing the server
    // more than the frontend (SET_MEM_TABLE: an fd, an mmap), keeps its socket full forever;
    // the server takes turns, so another port still completes its handshake meanwhile.
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (dir, server) = two_ports("flood");
    let raw = Raw::connect(&server.port(0).socket);
    raw.negotiate();
    let memory = guest_memory_file(dir.path(), "mem");
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let raw = Raw { stream: raw.stream.try_clone().unwrap(), reply_ack: std::cell::Cell::new(true) };
        let memory = memory.try_clone().unwrap();
        let (stop, written) = (stop.clone(), written.clone());
        std::thread::spawn(move || {
            let table = mem_table(&[(0, MEM_SIZE, VMM_BASE, 0)]);
            while !stop.load(Ordering::Relaxed)
                && raw.send(SET_MEM_TABLE, VERSION_1, &table, &[memory.as_raw_fd()]).is_ok()
            {
                written.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // The flood is on.
    let deadline = Instant::now() + TIMEOUT;
    while written.load(Ordering::Relaxed) < 10_000 {
        assert!(Instant::now() < deadline, "the flood never got going");
        std::thread::sleep(Duration::from_millis(1));
    }
    let started = Instant::now();
    let other = bring_up(server.port(1), dir.path());
    let handshake = started.elapsed();
    // It takes milliseconds (also without the per-turn budget on this host: the server outpaces
    // one flooding client); a server stuck on the flood would not finish at all.
    assert!(handshake < Duration::from_secs(2), "the flood starved the other port for {handshake:?}");
    assert!(server.status(0).is_some_and(|s| s.connected), "the flooding frontend is still served");
    drop(other);
    server.port(1).expect_event(DeviceEvent::Stopped, TIMEOUT);
    stop.store(true, Ordering::Relaxed);
    raw.stream.shutdown(std::net::Shutdown::Both).unwrap();
    writer.join().unwrap();
    server.wait_closed(0, 1);
    assert_ports_still_work(&server, dir.path(), 0);
}

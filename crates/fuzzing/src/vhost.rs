//! `vhost_messages`: a sequence of vhost-user messages against vmq's backend, served in-process
//! by the real [`VhostUserServer`] (its listener on a temporary socket, its poll loop run by
//! the harness between messages, on the harness's own thread).
//!
//! Input: a byte choosing the memfds' sizes and whether one is left unsealed (memfds are
//! sealed against shrinking and growing, as QEMU's memfd backend does), then up to
//! [`MAX_MESSAGES`] messages, each an opcode byte and its fields: one of the requests QEMU sends
//! with a body built from the input (features, memory tables over the harness's memfds, ring
//! sizes, addresses and bases, eventfds or other fds as notifiers, MTU, config reads), a raw
//! request (code, flags, body, fds), or a harness action (shrink a memfd). Flag bits ask for a
//! reply (NEED_REPLY) or make the header lie about the body size.
//!
//! Invariants: no panic; the server's poll never fails; every reply is a well-formed reply;
//! after every message each region the backend maps lies within its file's real size and that
//! file is sealed against shrinking (the port does not trust unsealed memory); device
//! events alternate (Started, Stopped, ...); after the frontend hangs up the port is down, the
//! device stopped and its memory unmapped; then a new frontend connects and gets the offered
//! features from GET_FEATURES.

use std::io::{ErrorKind, IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use nix::sys::stat::fstat;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
use vmq_vhost::server::VhostUserServer;
use vmq_vhost::{DeviceEvent, NetDevice, NetDeviceConfig};

use crate::Input;

/// Most messages per input (each case stays a few milliseconds).
pub const MAX_MESSAGES: usize = 24;
/// Memfds the harness creates per input.
pub const MEMFDS: usize = 3;
/// Where the "VMM" maps memfd `i`: VMM_BASE + i * VMM_STRIDE (vring addresses are given there).
pub const VMM_BASE: u64 = 0x7f00_0000_0000;
pub const VMM_STRIDE: u64 = 0x10_0000;
/// Shrinking an unsealed memfd the backend has mapped was issue 11's SIGBUS finding; the backend
/// now refuses memfds without F_SEAL_SHRINK, so an unsealed memfd is never mapped and the harness
/// shrinks whatever it likes (false would skip shrinking a mapped unsealed memfd).
const SHRINK_MAPPED_UNSEALED: bool = true;

const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const GET_FEATURES: u32 = 1;

/// Requests the structured opcodes send (vhost-user spec codes).
pub mod code {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const NET_SET_MTU: u32 = 20;
    pub const GET_CONFIG: u32 = 24;
}

/// The structured opcodes, in opcode order (`op % 18`); 16 is a raw message, 17 shrinks a memfd.
const OPCODES: [u32; 16] = [
    code::GET_FEATURES,
    code::SET_FEATURES,
    code::SET_OWNER,
    code::RESET_OWNER,
    code::SET_MEM_TABLE,
    code::SET_VRING_NUM,
    code::SET_VRING_ADDR,
    code::SET_VRING_BASE,
    code::GET_VRING_BASE,
    code::SET_VRING_KICK,
    code::SET_VRING_CALL,
    code::GET_PROTOCOL_FEATURES,
    code::SET_PROTOCOL_FEATURES,
    code::SET_VRING_ENABLE,
    code::NET_SET_MTU,
    code::GET_CONFIG,
];
pub const OP_RAW: u8 = 16;
pub const OP_SHRINK: u8 = 17;
/// Opcode flag bits (above `op % 32`).
pub const OP_NEED_REPLY: u8 = 0x20;
pub const OP_LIE_SIZE: u8 = 0x40;
pub const OP_RAW_FLAGS: u8 = 0x80;

/// What happened over the sequence.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VhostOutcome {
    pub sent: u32,
    pub replies: u32,
    /// The server closed the first connection before the harness hung up.
    pub closed_by_server: bool,
    /// Times the device started.
    pub started: u32,
}

/// The fuzz target.
pub fn vhost_messages(data: &[u8]) {
    let _ = run_vhost_messages(data);
}

fn config() -> NetDeviceConfig {
    NetDeviceConfig {
        mac: "52:54:00:00:00:01".parse().expect("MAC"),
        mtu: 9000,
        offloads: true,
        trust_unsealed_memory: false,
    }
}

struct Memfd {
    fd: OwnedFd,
    sealed: bool,
}

fn memfd(size: u64, sealed: bool) -> Memfd {
    let fd = memfd_create(c"vmq-fuzz", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).expect("memfd");
    std::fs::File::from(fd.try_clone().expect("dup memfd")).set_len(size).expect("size memfd");
    if sealed {
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW)).expect("seal memfd");
    }
    Memfd { fd, sealed }
}

fn file_size(fd: impl AsFd) -> u64 {
    fstat(fd).map_or(0, |s| s.st_size as u64)
}

fn inode(fd: impl AsFd) -> (u64, u64) {
    fstat(fd).map_or((0, 0), |s| (s.st_dev, s.st_ino))
}

/// Every region the backend maps lies within its file's real size; returns the mapped files.
fn check_regions(device: &NetDevice) -> Vec<(u64, u64)> {
    let mem = device.mem.memory();
    let mut files = Vec::new();
    for region in mem.iter() {
        let file = region.file_offset().expect("guest memory regions are file-backed");
        let end = file.start().saturating_add(region.len());
        let size = file_size(file.file());
        assert!(
            end <= size,
            "region {:#x}+{:#x} ends at {end:#x} in a file of {size:#x} bytes",
            file.start(),
            region.len()
        );
        // The port does not trust unsealed memory: whatever is mapped cannot shrink under it.
        let seals = fcntl(file.file(), FcntlArg::F_GET_SEALS).unwrap_or(0);
        assert!(
            SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK),
            "a region over a file without F_SEAL_SHRINK is mapped (seals {seals:#x})"
        );
        files.push(inode(file.file()));
    }
    files
}

static SOCKETS: AtomicU64 = AtomicU64::new(0);

/// A vhost-user server with one port on a fresh socket path.
struct Harness {
    server: VhostUserServer,
    socket: PathBuf,
    device: Arc<NetDevice>,
    events: Arc<Mutex<Vec<DeviceEvent>>>,
}

impl Harness {
    fn start() -> Harness {
        let n = SOCKETS.fetch_add(1, Ordering::Relaxed);
        let socket = std::env::temp_dir().join(format!("vmq-fuzz-vhost-{}-{n}.sock", std::process::id()));
        let mut server = VhostUserServer::new().expect("epoll");
        let device = NetDevice::new();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let on_event = Box::new(move |e| sink.lock().unwrap_or_else(|p| p.into_inner()).push(e));
        server.add_port("fuzz", &socket, config(), device.clone(), on_event).expect("add port");
        Harness { server, socket, device, events }
    }

    /// Lets the server handle whatever is there.
    fn pump(&mut self) {
        for _ in 0..16 {
            if self.server.poll(0).expect("server poll") == 0 {
                break;
            }
        }
    }

    fn connected(&self) -> bool {
        self.server.status().first().is_some_and(|s| s.connected)
    }

    fn connect(&mut self) -> UnixStream {
        let stream = UnixStream::connect(&self.socket).expect("connect");
        stream.set_nonblocking(true).expect("non-blocking");
        self.pump();
        stream
    }
}

/// Reads what the server sent; false once it closed the connection.
fn drain(stream: &UnixStream, received: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 8192];
    loop {
        match (&*stream).read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

/// Splits complete replies off `received`, checking each header.
fn take_replies(received: &mut Vec<u8>) -> u32 {
    let mut n = 0;
    while received.len() >= 12 {
        let word = |i: usize| u32::from_le_bytes(received[i..i + 4].try_into().expect("4 bytes"));
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        assert_eq!(flags & (REPLY | 0x3), REPLY | VERSION_1, "reply to request {request} with flags {flags:#x}");
        assert!(size <= 0x1000, "reply to request {request} with a {size}-byte body");
        if received.len() < 12 + size {
            break;
        }
        received.drain(..12 + size);
        n += 1;
    }
    n
}

fn send(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> bool {
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    // MSG_NOSIGNAL: libFuzzer's process does not ignore SIGPIPE.
    let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
    matches!(sendmsg::<()>(stream.as_raw_fd(), &[IoSlice::new(bytes)], cmsgs, flags, None), Ok(n) if n == bytes.len())
}

/// One message decoded from the input: header fields, body, and the fds to pass (kept open by
/// `owned` until sent).
struct Message {
    request: u32,
    flags: u32,
    body: Vec<u8>,
    size: u32,
    fds: Vec<RawFd>,
    owned: Vec<OwnedFd>,
}

fn vring_state(input: &mut Input<'_>) -> Vec<u8> {
    let index = u32::from(input.u8() % 3);
    let num = match input.u8() % 6 {
        0 => 256,
        1 => 8,
        2 => 1024,
        3 => 1,
        4 => 0,
        _ => input.u32(),
    };
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

/// An address the "VMM" could give: inside one of the memfds' mappings mostly.
fn vmm_addr(input: &mut Input<'_>) -> u64 {
    let b = input.u8();
    match b % 8 {
        7 => input.u64(),
        i => VMM_BASE + u64::from(i % MEMFDS as u8) * VMM_STRIDE + u64::from(input.u16()) * 16,
    }
}

/// A notifier fd: an eventfd mostly, else a pipe, a memfd, or none.
fn notifier(input: &mut Input<'_>, memfds: &[Memfd], m: &mut Message) {
    match input.u8() % 8 {
        0 => {}
        1 => {
            let (read, write) = nix::unistd::pipe().expect("pipe");
            m.fds.push(read.as_raw_fd());
            m.owned.extend([read, write]);
        }
        2 => m.fds.push(memfds[0].fd.as_raw_fd()),
        _ => {
            let efd = nix::sys::eventfd::EventFd::new().expect("eventfd");
            let fd = OwnedFd::from(efd);
            m.fds.push(fd.as_raw_fd());
            m.owned.push(fd);
        }
    }
}

fn decode_message(op: u8, input: &mut Input<'_>, memfds: &[Memfd], sizes: &[u64]) -> Message {
    let mut m = Message { request: 0, flags: VERSION_1, body: Vec::new(), size: 0, fds: Vec::new(), owned: Vec::new() };
    if op & OP_NEED_REPLY != 0 {
        m.flags |= NEED_REPLY;
    }
    let kind = op % 32 % 18;
    if kind == OP_RAW {
        m.request = u32::from(input.u8() % 48);
        m.body = input.chunk(64).to_vec();
        for _ in 0..input.u8() % 3 {
            notifier(input, memfds, &mut m);
        }
    } else {
        m.request = OPCODES[usize::from(kind)];
        let offered = config().offered_features();
        let protocol = vmq_vhost::backend::offered_protocol_features().bits();
        m.body = match m.request {
            code::SET_FEATURES => {
                let mask = if input.u8().is_multiple_of(4) { input.u64() } else { offered & input.u64() };
                mask.to_le_bytes().to_vec()
            }
            code::SET_PROTOCOL_FEATURES => {
                let bits = if input.u8().is_multiple_of(4) { input.u64() } else { protocol & input.u64() };
                bits.to_le_bytes().to_vec()
            }
            code::SET_MEM_TABLE => {
                let regions = 1 + usize::from(input.u8() % 3);
                let mut body = Vec::new();
                body.extend_from_slice(&(regions as u32).to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                for r in 0..regions {
                    let k = usize::from(input.u8()) % MEMFDS;
                    let how = input.u8();
                    let gpa = if how & 1 == 0 { r as u64 * VMM_STRIDE } else { u64::from(input.u16()) * 0x1000 };
                    let size = if how & 2 == 0 { sizes[k] } else { u64::from(input.u16()) * 0x100 };
                    let user = if how & 4 == 0 { VMM_BASE + k as u64 * VMM_STRIDE } else { input.u64() };
                    let offset = if how & 8 == 0 { 0 } else { u64::from(input.u16()) * 0x100 };
                    for v in [gpa, size, user, offset] {
                        body.extend_from_slice(&v.to_le_bytes());
                    }
                    m.fds.push(memfds[k].fd.as_raw_fd());
                }
                body
            }
            code::SET_VRING_NUM | code::SET_VRING_BASE | code::SET_VRING_ENABLE => vring_state(input),
            code::GET_VRING_BASE => vring_state(input),
            code::SET_VRING_ADDR => {
                let index = u32::from(input.u8() % 3);
                let mut body = [index.to_le_bytes(), 0u32.to_le_bytes()].concat();
                // desc, used, avail (as the vhost-user struct orders them), log.
                let desc = vmm_addr(input);
                let used = if input.u8().is_multiple_of(4) { vmm_addr(input) } else { desc.wrapping_add(0x2000) };
                let avail = if input.u8().is_multiple_of(4) { vmm_addr(input) } else { desc.wrapping_add(0x1000) };
                for v in [desc, used, avail, 0] {
                    body.extend_from_slice(&v.to_le_bytes());
                }
                body
            }
            code::SET_VRING_KICK | code::SET_VRING_CALL => {
                let index = u64::from(input.u8() % 3);
                notifier(input, memfds, &mut m);
                // Bit 8 says "no fd" (polling mode).
                let nofd = if m.fds.is_empty() { 0x100 } else { 0 };
                (index | nofd).to_le_bytes().to_vec()
            }
            code::NET_SET_MTU => {
                let mtu = match input.u8() % 4 {
                    0 => 1500,
                    1 => 9000,
                    2 => 9001,
                    _ => input.u64(),
                };
                mtu.to_le_bytes().to_vec()
            }
            code::GET_CONFIG => {
                let (offset, size) = (u32::from(input.u8() % 16), u32::from(input.u8() % 16));
                let mut body = [offset.to_le_bytes(), size.to_le_bytes(), 0u32.to_le_bytes()].concat();
                body.resize(12 + size as usize, 0);
                body
            }
            _ => Vec::new(),
        };
    }
    if op & OP_RAW_FLAGS != 0 {
        m.flags = input.u32();
    }
    m.size = m.body.len() as u32;
    if op & OP_LIE_SIZE != 0 {
        m.size = m.size.wrapping_add(u32::from(input.u8())).wrapping_sub(128);
    }
    m
}

pub fn run_vhost_messages(data: &[u8]) -> VhostOutcome {
    let mut input = Input::new(data);
    let setup = input.u8();
    let sizes: Vec<u64> = (0..MEMFDS).map(|i| 0x1000 << ((setup >> (2 * i)) & 3) << 2).collect();
    // Bit 6: memfd 0 unsealed.
    let memfds: Vec<Memfd> = (0..MEMFDS).map(|i| memfd(sizes[i], !(i == 0 && setup & 0x40 != 0))).collect();
    let mut harness = Harness::start();
    let mut outcome = VhostOutcome::default();
    let stream = harness.connect();
    let mut received = Vec::new();
    let mut open = true;
    for _ in 0..MAX_MESSAGES {
        if input.is_empty() || !open {
            break;
        }
        let op = input.u8();
        if op % 32 % 18 == OP_SHRINK {
            let k = usize::from(input.u8()) % MEMFDS;
            let mapped = check_regions(&harness.device).contains(&inode(&memfds[k].fd));
            if memfds[k].sealed || !mapped || SHRINK_MAPPED_UNSEALED {
                // A sealed memfd refuses (EPERM): that is the point of the seal.
                let shrunk = nix::unistd::ftruncate(&memfds[k].fd, (sizes[k] / 2) as i64);
                assert!(shrunk.is_err() || !memfds[k].sealed, "a sealed memfd shrank");
            }
            check_regions(&harness.device);
            continue;
        }
        let m = decode_message(op, &mut input, &memfds, &sizes);
        let mut bytes = Vec::with_capacity(12 + m.body.len());
        for v in [m.request, m.flags, m.size] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(&m.body);
        if !send(&stream, &bytes, &m.fds) {
            open = false;
        }
        drop(m.owned);
        outcome.sent += 1;
        harness.pump();
        open &= drain(&stream, &mut received);
        outcome.replies += take_replies(&mut received);
        check_regions(&harness.device);
    }
    outcome.closed_by_server = !open || !harness.connected();
    // The frontend hangs up: the port goes down and forgets the guest.
    drop(stream);
    harness.pump();
    assert!(!harness.connected(), "the server kept a connection whose frontend hung up");
    assert!(!harness.device.is_running(), "the device runs without a frontend");
    assert_eq!(harness.device.mem.memory().num_regions(), 0, "guest memory still mapped after the hang-up");
    {
        let events = harness.events.lock().unwrap_or_else(|p| p.into_inner());
        for (i, e) in events.iter().enumerate() {
            let expected = if i % 2 == 0 { DeviceEvent::Started } else { DeviceEvent::Stopped };
            assert_eq!(*e, expected, "device event {i} of {events:?}");
        }
        assert!(events.len().is_multiple_of(2), "device left started: {events:?}");
        outcome.started = (events.len() / 2) as u32;
    }
    // A new frontend is served.
    let stream = harness.connect();
    let mut header = Vec::new();
    header.extend_from_slice(&GET_FEATURES.to_le_bytes());
    header.extend_from_slice(&VERSION_1.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    assert!(send(&stream, &header, &[]), "sending GET_FEATURES");
    harness.pump();
    let mut reply = Vec::new();
    assert!(drain(&stream, &mut reply), "the server closed the new connection");
    assert_eq!(reply.len(), 20, "GET_FEATURES reply");
    assert_eq!(&reply[..4], &GET_FEATURES.to_le_bytes());
    assert_eq!(&reply[4..8], &(VERSION_1 | REPLY).to_le_bytes());
    assert_eq!(&reply[12..], &config().offered_features().to_le_bytes(), "offered features");
    drop(stream);
    harness.pump();
    outcome
}

/// Builds a `vhost_messages` input: the setup byte, then messages as (opcode, field bytes).
pub fn encode(setup: u8, messages: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = vec![setup];
    for (op, fields) in messages {
        out.push(*op);
        out.extend_from_slice(fields);
    }
    out
}

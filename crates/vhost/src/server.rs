//! Serves the Unix sockets of all vhost-user ports from one thread (vmq's control thread).
//!
//! A port either listens on its socket (server mode: the VM's QEMU connects, and with
//! `reconnect=N` on its chardev comes back after vmq restarts) or connects to a socket the
//! VM's QEMU listens on (client mode, OVS's `dpdkvhostuserclient`): then this thread connects
//! whenever the port has no connection, at once after adding the port and after a connection
//! ends, and after a failed attempt (no socket file yet, nobody listening) again after a
//! backoff that doubles from [`MIN_BACKOFF`] to [`MAX_BACKOFF`]. Connects never block (a Unix
//! connect completes or fails at once) and retries are deadlines in the epoll timeout, so a
//! VM that is away costs the other ports nothing.
//!
//! One frontend at a time is connected; a VM that stops, crashes or restarts leaves the port
//! down until the next connection on the same socket. A frontend that sends something
//! malformed is disconnected with a logged reason; the other ports are not affected.
//!
//! Who may connect, per server-mode port ([`SocketPolicy`]): the socket file gets its owner, group and
//! mode before the server listens (default mode 0660, never the umask's), and an optional list
//! of peer uids is checked with `SO_PEERCRED` on every accept. A socket file something listens
//! on (another vmq, or another port's) is never replaced; a stale one is.
//!
//! One frontend per socket, as in OVS/DPDK: while a frontend is connected, further connections
//! are accepted and closed at once (counted as refused). A connection that has not sent
//! SET_OWNER — the first request of QEMU, DPDK's virtio-user and cloud-hypervisor — within the
//! port's setup timeout ([`SETUP_TIMEOUT`] by default) is closed, so a process that merely
//! connects cannot hold the port; once the connection ends the port accepts again. A frontend
//! past SET_OWNER keeps the port however long it idles: a VM may sit in its firmware or run
//! without a virtio-net driver for any time before SET_MEM_TABLE, so idling there is legitimate,
//! and keeping strangers from getting that far is the job of the socket's mode and uid list.
//!
//! The `vhost` crate reads and writes messages with retry loops that never give up on EAGAIN, so
//! this thread only lets it run when it cannot loop: it hands over a message only once the whole
//! message has arrived (peeked), and only while the socket can take a reply (otherwise the
//! connection waits until the frontend reads). A connection stalled like that, with half a
//! message or unread replies, for [`STALL_TIMEOUT`] (adjustable) is closed. Each connection
//! gets a bounded number of messages per turn, so a flooding frontend cannot starve the others.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::{BackendReqHandler, Error as ProtoError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
pub use vmq_core::{SocketPolicy, VhostMode};
use vmq_sys::unix_socket::{self, ListenError, SocketFileAccess};

use crate::backend::{DeviceEvent, NetBackend, NetDeviceConfig, Refusal};
use crate::device::NetDevice;

/// How long a frontend may leave a message incomplete or its replies unread (default of
/// [`VhostUserServer::set_stall_timeout`]).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new connection may take to send SET_OWNER, unless its port's policy says.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// First wait before a client-mode port tries to connect again after a failed attempt, or after
/// a connection that lasted less than [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between connect attempts of a client-mode port.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Pending connections the kernel queues per socket.
const LISTEN_BACKLOG: i32 = 16;
/// Messages handled per connection and turn: a frontend that floods requests (and reads the
/// replies) gets its turn again after every other ready port.
const MESSAGES_PER_TURN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("vhost-user socket: {0}")]
    Listen(#[from] ListenError),
    #[error("epoll: {0}")]
    Epoll(io::Error),
    #[error("no vhost-user port named {0:?}")]
    UnknownPort(String),
    #[error(
        "client-mode vhost-user port {0:?}: socket owner, group, mode and allowed_uids apply to listening sockets only"
    )]
    ClientPolicy(String),
}

/// Epoll token of a server event: which port, and whether its listener or its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Listener(usize),
    Connection(usize),
}

impl Token {
    fn encode(self) -> u64 {
        match self {
            Token::Listener(i) => (i as u64) << 1,
            Token::Connection(i) => ((i as u64) << 1) | 1,
        }
    }

    fn decode(raw: u64) -> Token {
        let index = (raw >> 1) as usize;
        if raw & 1 == 0 { Token::Listener(index) } else { Token::Connection(index) }
    }
}

/// Epoll token of the owner's wake fd ([`VhostUserServer::add_wake_fd`]); no port index gets
/// near it.
const WAKE_TOKEN: u64 = u64::MAX;

type Handler = BackendReqHandler<Mutex<NetBackend>>;

/// vhost-user message header: request, flags, body size (u32 each).
const HEADER_LEN: usize = 12;
/// Largest body the `vhost` crate accepts (its MAX_MSG_SIZE); larger ones fail its header check.
const MAX_BODY_LEN: usize = 0x1000;

/// Requests this module handles itself instead of the `vhost` crate (see `Connection::intercept`).
const SET_VRING_ENABLE: u32 = 18;
/// The request that ends the setup timeout.
const SET_OWNER: u32 = 3;
const NET_SET_MTU: u32 = 20;
/// After a live migration: announce the guest's MAC (body: u64, the MAC in its first 6 bytes).
const SEND_RARP: u32 = 19;
const FLAG_VERSION_MASK: u32 = 0x3;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

struct Connection {
    handler: Handler,
    /// A second handle on the same socket, to peek whether a whole message has arrived: the
    /// `vhost` crate reads a message with blocking retries, so a frontend that sent half a
    /// message would otherwise stall this thread and with it every other port.
    peek: UnixStream,
    /// Since when, and why, the connection cannot make progress.
    stalled: Option<(Instant, Stall)>,
    /// Until when the frontend may take to send SET_OWNER; `None` once it has.
    setup_deadline: Option<Instant>,
    /// When it was made (a client-mode port backs off less after a long-lived connection).
    since: Instant,
}

/// Why a connection waits for its frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stall {
    IncompleteMessage,
    RepliesUnread,
}

impl Stall {
    fn reason(self) -> &'static str {
        match self {
            Stall::IncompleteMessage => "message left incomplete",
            Stall::RepliesUnread => "frontend does not read its replies",
        }
    }
}

impl Connection {
    fn stall(&mut self, why: Stall) {
        match self.stalled {
            Some((_, current)) if current == why => {}
            _ => self.stalled = Some((Instant::now(), why)),
        }
    }
}

/// Why handling a message failed.
enum Handled {
    /// Refused by this module (`Connection::intercept`).
    Refused(String),
    Protocol(ProtoError),
}

/// What is waiting on a connection.
enum Pending {
    Closed,
    /// Nothing waiting.
    Empty,
    /// Part of a message.
    Partial,
    /// A whole message: its request code, flags and body size.
    Message {
        request: u32,
        flags: u32,
        size: u32,
    },
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Connection {
    /// Is a complete message (header and body) waiting?
    ///
    /// A peek stops after a chunk that carries fds, so a message whose header came with fds in
    /// one write and whose body came in another looks incomplete forever (no real frontend
    /// sends that way): the stall timeout ends such connections.
    fn pending(&self) -> Pending {
        use nix::sys::socket::{MsgFlags, recv};
        let mut buf = [0u8; HEADER_LEN + MAX_BODY_LEN];
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        match recv(self.peek.as_raw_fd(), &mut buf, flags) {
            Ok(0) => Pending::Closed,
            Ok(n) if n < HEADER_LEN => Pending::Partial,
            Ok(n) => {
                let size = le32(&buf, 8);
                let body = size as usize;
                // An oversized body is rejected by the header check before it is read.
                if body > MAX_BODY_LEN || n >= HEADER_LEN + body {
                    Pending::Message { request: le32(&buf, 0), flags: le32(&buf, 4), size }
                } else {
                    Pending::Partial
                }
            }
            Err(nix::errno::Errno::EAGAIN) => Pending::Empty,
            Err(_) => Pending::Closed,
        }
    }

    /// Can the socket take a reply without blocking? Unix stream sockets report writable while
    /// at least three quarters of the send buffer are free, far more than the largest reply
    /// (4 KiB); if not, the frontend has not read its replies yet (VMMs read each one before
    /// the next request).
    fn can_reply(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.peek.as_fd(), PollFlags::POLLOUT)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
            && fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLOUT))
    }

    /// Handles SET_VRING_ENABLE, NET_SET_MTU and SEND_RARP here instead of in the `vhost` crate.
    /// - SET_VRING_ENABLE: the crate refuses it until SET_FEATURES has acked
    ///   VHOST_USER_F_PROTOCOL_FEATURES. QEMU 7.2 sends it earlier (virtio-net's peer_attach,
    ///   right after GET_FEATURES), as the vhost-user spec allows, and then fails to start the
    ///   device. Body: `struct vhost_vring_state { u32 index; u32 num; }`, num 0 or 1.
    /// - NET_SET_MTU: the crate does not parse it at all. Body: u64 MTU.
    /// - SEND_RARP: neither (live migration, QEMU sends it on the destination when the guest
    ///   cannot announce itself). Body: u64, the guest's MAC in its first 6 bytes.
    ///
    /// Both have an 8-byte body and no fds; anything else ends the connection. Returns the
    /// reason to disconnect, if any.
    fn intercept(&mut self, backend: &Mutex<NetBackend>, request: u32, flags: u32, size: u32) -> Result<(), String> {
        use std::io::{Read, Write};
        let name = match request {
            SET_VRING_ENABLE => "SET_VRING_ENABLE",
            SEND_RARP => "SEND_RARP",
            _ => "NET_SET_MTU",
        };
        if size != 8 {
            return Err(format!("{name} with a {size}-byte body (must be 8)"));
        }
        if flags & FLAG_VERSION_MASK != FLAG_VERSION_1 || flags & !(FLAG_VERSION_MASK | FLAG_NEED_REPLY) != 0 {
            return Err(format!("{name} with invalid header flags {flags:#x}"));
        }
        // Fds sent along are dropped (closed) by this plain read.
        let mut msg = [0u8; HEADER_LEN + 8];
        (&self.peek).read_exact(&mut msg).map_err(|e| format!("reading {name}: {e}"))?;
        let mut backend = backend.lock().unwrap_or_else(|p| p.into_inner());
        let result = if request == SET_VRING_ENABLE {
            match le32(&msg, 16) {
                num @ (0 | 1) => {
                    backend.enable_vring(le32(&msg, 12), num == 1).map_err(|e| Refusal::Disconnect(e.to_string()))
                }
                num => Err(Refusal::Disconnect(format!("enable value {num} is neither 0 nor 1"))),
            }
        } else if request == SEND_RARP {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&msg[12..18]);
            backend.send_rarp(vmq_wire::MacAddr(mac))
        } else {
            let mut mtu = [0u8; 8];
            mtu.copy_from_slice(&msg[12..]);
            backend.set_mtu(u64::from_le_bytes(mtu))
        };
        let acked = flags & FLAG_NEED_REPLY != 0 && backend.reply_ack();
        if acked {
            let mut reply = [0u8; HEADER_LEN + 8];
            reply[..4].copy_from_slice(&request.to_le_bytes());
            reply[4..8].copy_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
            reply[8..12].copy_from_slice(&8u32.to_le_bytes());
            reply[12..].copy_from_slice(&u64::from(result.is_err()).to_le_bytes());
            // Non-blocking: a frontend that does not read its replies is disconnected.
            (&self.peek).write_all(&reply).map_err(|e| format!("replying to {name}: {e}"))?;
        }
        match result {
            Ok(()) => Ok(()),
            // The frontend learns of the refusal from the failed ack and may carry on (QEMU
            // then leaves the device stopped).
            Err(Refusal::Reply(reason)) if acked => {
                tracing::warn!(request = name, reason = %reason, "vhost-user request refused");
                Ok(())
            }
            Err(Refusal::Reply(reason)) => {
                Err(format!("{name} refused ({reason}), and without REPLY_ACK the frontend cannot be told"))
            }
            Err(Refusal::Disconnect(reason)) => Err(format!("{name}: {reason}")),
        }
    }
}

/// How a port gets its connection.
enum Endpoint {
    /// Server mode: accepted on this listener.
    Listen(UnixListener),
    /// Client mode: made by connecting to the port's path; the next attempt is due at
    /// `retry_at` (`None` while connected), after a failure the wait doubles up to
    /// [`MAX_BACKOFF`].
    Connect { retry_at: Option<Instant>, backoff: Duration },
}

/// A port's connection state, readable from any thread (`vmq ctl ports`).
#[derive(Debug)]
pub struct ConnectionStatus {
    mode: VhostMode,
    connected: AtomicBool,
    connections: AtomicU64,
    /// The port's device, for its live-migration state.
    device: Arc<NetDevice>,
}

impl ConnectionStatus {
    fn new(mode: VhostMode, device: Arc<NetDevice>) -> ConnectionStatus {
        ConnectionStatus { mode, connected: AtomicBool::new(false), connections: AtomicU64::new(0), device }
    }

    /// Dirty logging and migration counters of the port (live migration).
    pub fn migration(&self) -> &crate::migration::MigrationStatus {
        &self.device.migration
    }

    pub fn mode(&self) -> VhostMode {
        self.mode
    }

    /// A frontend is connected (it may not have started the device yet).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Connections made (accepted or, in client mode, connected) since the port was added:
    /// every one after the first is a reconnect.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

struct Port {
    name: String,
    path: PathBuf,
    /// Device and inode of the socket file we made, so that we never remove somebody else's.
    file_id: Option<(u64, u64)>,
    endpoint: Endpoint,
    backend: Arc<Mutex<NetBackend>>,
    connection: Option<Connection>,
    /// Connected, and connections made so far.
    status: Arc<ConnectionStatus>,
    /// Connections closed at once: a frontend was connected already, or the peer's uid is not
    /// allowed.
    refused: u64,
    allowed_uids: Option<Vec<u32>>,
    setup_timeout: Duration,
    /// Panics caught while handling this port's messages (each ended its connection).
    panics: u64,
}

/// Connection state of a port, for `vmq ctl` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortStatus {
    pub name: String,
    pub mode: VhostMode,
    pub connected: bool,
    pub running: bool,
    /// Frontend connections made (accepted, or connected in client mode) since the port was added.
    pub connections: u64,
    /// Connections refused: a second frontend, or a peer uid not allowed.
    pub refused: u64,
    /// Panics caught while handling its frontend's messages; each dropped that connection.
    pub panics: u64,
    /// Live migration: dirty logging on now; times it was switched on; times the VM was
    /// handed over (rings stopped while logging); RARP announces injected.
    pub logging: bool,
    pub log_starts: u64,
    pub migrated_out: u64,
    pub announces: u64,
}

pub struct VhostUserServer {
    epoll: Epoll,
    /// Slots are never reused while the server lives, so tokens stay unambiguous.
    ports: Vec<Option<Port>>,
    stall_timeout: Duration,
    /// Connections that used up their turn with messages left (and whether the peer hung up):
    /// edge-triggered epoll will not report them again, so they are served on the next poll.
    backlog: Vec<(usize, bool)>,
}

impl VhostUserServer {
    pub fn new() -> Result<Self, ServerError> {
        Ok(VhostUserServer {
            epoll: Epoll::new().map_err(ServerError::Epoll)?,
            ports: Vec::new(),
            stall_timeout: STALL_TIMEOUT,
            backlog: Vec::new(),
        })
    }

    /// How long a frontend may leave a message incomplete or its replies unread before it is
    /// disconnected.
    pub fn set_stall_timeout(&mut self, timeout: Duration) {
        self.stall_timeout = timeout;
    }

    /// Listens on `path` for the VM of port `name`, with the default [`SocketPolicy`].
    /// `on_event` runs on this thread when the device starts or stops.
    pub fn add_port(
        &mut self,
        name: &str,
        path: &Path,
        config: NetDeviceConfig,
        device: Arc<NetDevice>,
        on_event: Box<dyn FnMut(DeviceEvent) + Send>,
    ) -> Result<(), ServerError> {
        self.add_port_with(name, path, &SocketPolicy::default(), config, device, on_event)
    }

    /// Like [`VhostUserServer::add_port`], with the socket's owner, group, mode, allowed peers
    /// and setup timeout from `policy`.
    pub fn add_port_with(
        &mut self,
        name: &str,
        path: &Path,
        policy: &SocketPolicy,
        config: NetDeviceConfig,
        device: Arc<NetDevice>,
        on_event: Box<dyn FnMut(DeviceEvent) + Send>,
    ) -> Result<(), ServerError> {
        self.add_port_mode(name, path, VhostMode::Server, policy, config, device, on_event)
    }

    /// Adds a port in `mode`: server mode listens on `path` (as [`VhostUserServer::add_port_with`]);
    /// client mode connects to `path` from the next [`VhostUserServer::poll`] on, and again
    /// whenever the connection ends. A client-mode port takes only the setup timeout of `policy`:
    /// the rest is about a socket file vmq does not make ([`ServerError::ClientPolicy`]).
    #[allow(clippy::too_many_arguments)]
    pub fn add_port_mode(
        &mut self,
        name: &str,
        path: &Path,
        mode: VhostMode,
        policy: &SocketPolicy,
        config: NetDeviceConfig,
        device: Arc<NetDevice>,
        on_event: Box<dyn FnMut(DeviceEvent) + Send>,
    ) -> Result<(), ServerError> {
        let index = self.ports.len();
        let (endpoint, file) = match mode {
            VhostMode::Server => {
                let access = SocketFileAccess { owner: policy.owner, group: policy.group, mode: policy.mode };
                // Non-blocking already (the socket is created so).
                let listener = unix_socket::listen(path, &access, LISTEN_BACKLOG)?;
                self.epoll
                    .ctl(
                        ControlOperation::Add,
                        listener.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, Token::Listener(index).encode()),
                    )
                    .map_err(ServerError::Epoll)?;
                (Endpoint::Listen(listener), file_id(path))
            }
            VhostMode::Client => {
                if policy.owner.is_some()
                    || policy.group.is_some()
                    || policy.mode.is_some()
                    || policy.allowed_uids.is_some()
                {
                    return Err(ServerError::ClientPolicy(name.to_string()));
                }
                (Endpoint::Connect { retry_at: Some(Instant::now()), backoff: MIN_BACKOFF }, None)
            }
        };
        let status = Arc::new(ConnectionStatus::new(mode, device.clone()));
        let backend = Arc::new(Mutex::new(NetBackend::new(config, device, on_event)));
        self.ports.push(Some(Port {
            name: name.to_string(),
            path: path.to_path_buf(),
            file_id: file,
            endpoint,
            backend,
            connection: None,
            status,
            refused: 0,
            allowed_uids: policy.allowed_uids.clone(),
            setup_timeout: policy.setup_timeout.unwrap_or(SETUP_TIMEOUT),
            panics: 0,
        }));
        match mode {
            VhostMode::Server => tracing::info!(port = name, socket = %path.display(), "vhost-user port listening"),
            VhostMode::Client => {
                tracing::info!(port = name, socket = %path.display(), "vhost-user port connects to the VM's socket")
            }
        }
        Ok(())
    }

    /// The connection state of port `name`, to read from other threads.
    pub fn connection_status(&self, name: &str) -> Option<Arc<ConnectionStatus>> {
        self.ports.iter().flatten().find(|p| p.name == name).map(|p| p.status.clone())
    }

    /// Stops serving a port: disconnects its VM and removes its socket file.
    pub fn remove_port(&mut self, name: &str) -> Result<(), ServerError> {
        let index = self
            .ports
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.name == name))
            .ok_or_else(|| ServerError::UnknownPort(name.to_string()))?;
        self.disconnect(index, "port removed");
        if let Some(port) = self.ports[index].take() {
            if let Endpoint::Listen(listener) = &port.endpoint {
                let _ = self.epoll.ctl(ControlOperation::Delete, listener.as_raw_fd(), EpollEvent::default());
            }
            port.remove_socket_file();
        }
        Ok(())
    }

    pub fn status(&self) -> Vec<PortStatus> {
        self.ports
            .iter()
            .flatten()
            .map(|p| PortStatus {
                logging: p.status.migration().logging(),
                log_starts: p.status.migration().log_starts(),
                migrated_out: p.status.migration().migrated_out(),
                announces: p.status.migration().announces(),
                name: p.name.clone(),
                mode: p.status.mode,
                connected: p.connection.is_some(),
                running: lock(&p.backend).device().is_running(),
                connections: p.status.connections(),
                refused: p.refused,
                panics: p.panics,
            })
            .collect()
    }

    /// The epoll fd, so that a control loop can wait on it together with other sources.
    pub fn as_raw_fd(&self) -> i32 {
        self.epoll.as_raw_fd()
    }

    /// Makes [`VhostUserServer::poll`] return when `fd` becomes readable (level-triggered; the
    /// caller consumes what made it readable): an owner thread can then wait without a timeout
    /// and still hear its own commands. The fd must outlive the server or be removed first.
    pub fn add_wake_fd(&mut self, fd: RawFd) -> Result<(), ServerError> {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, WAKE_TOKEN)).map_err(ServerError::Epoll)
    }

    /// Handles whatever is ready, waiting at most `timeout_ms` (-1: forever, 0: don't wait).
    /// Returns the number of events handled.
    pub fn poll(&mut self, timeout_ms: i32) -> Result<usize, ServerError> {
        // Wake up in time to end stalled or unset-up connections, and at once if some
        // connection has messages left from its last turn.
        let timeout_ms = match self.next_deadline() {
            _ if !self.backlog.is_empty() => 0,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now()).as_millis();
                let left = i32::try_from(left).unwrap_or(i32::MAX).saturating_add(1);
                if timeout_ms < 0 { left } else { timeout_ms.min(left) }
            }
            None => timeout_ms,
        };
        let mut events = [EpollEvent::default(); 16];
        let n = match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(ServerError::Epoll(e)),
        };
        // The owner's wake fd is the owner's business.
        let events: Vec<EpollEvent> = events[..n].iter().copied().filter(|e| e.data() != WAKE_TOKEN).collect();
        let n = events.len();
        let backlog = std::mem::take(&mut self.backlog);
        // Connections first: a VM that closed and reconnected at once must have its old
        // connection torn down before the new one is accepted.
        for event in &events[..n] {
            if let Token::Connection(i) = Token::decode(event.data()) {
                let peer_closed =
                    event.event_set().intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
                        || backlog.iter().any(|&(b, closed)| b == i && closed);
                self.serve(i, peer_closed);
            }
        }
        for (i, peer_closed) in backlog {
            let served = events[..n].iter().any(|e| Token::decode(e.data()) == Token::Connection(i));
            if !served {
                self.serve(i, peer_closed);
            }
        }
        for event in &events[..n] {
            if let Token::Listener(i) = Token::decode(event.data()) {
                self.accept(i);
            }
        }
        self.end_stalled_connections();
        self.connect_due();
        Ok(n)
    }

    fn next_deadline(&self) -> Option<Instant> {
        let stalls = self
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some(p.connection.as_ref()?.stalled?.0))
            .map(|since| since + self.stall_timeout);
        let setups = self.ports.iter().flatten().filter_map(|p| p.connection.as_ref()?.setup_deadline);
        let retries = self.ports.iter().flatten().filter_map(|p| match p.endpoint {
            Endpoint::Connect { retry_at, .. } => retry_at,
            Endpoint::Listen(_) => None,
        });
        stalls.chain(setups).chain(retries).min()
    }

    /// Client-mode ports whose next attempt is due connect now; a failure schedules the next
    /// attempt after the doubled backoff.
    fn connect_due(&mut self) {
        let now = Instant::now();
        for index in 0..self.ports.len() {
            let Some(port) = self.ports[index].as_mut() else { continue };
            let Endpoint::Connect { retry_at: Some(due), backoff } = &mut port.endpoint else { continue };
            if *due > now {
                continue;
            }
            match unix_socket::connect(&port.path) {
                Ok(stream) => {
                    port.endpoint = Endpoint::Connect { retry_at: None, backoff: MIN_BACKOFF };
                    if !self.attach(index, stream) {
                        self.schedule_reconnect(index);
                    }
                }
                Err(e) => {
                    // No socket yet, nobody listening, or a full backlog: all transient (the
                    // VM may not have started yet, or is restarting).
                    let wait = *backoff;
                    *due = now + wait;
                    *backoff = (wait * 2).min(MAX_BACKOFF);
                    if wait == MIN_BACKOFF {
                        tracing::info!(port = %port.name, socket = %port.path.display(), error = %e,
                            "cannot connect to the VM's vhost-user socket; retrying with backoff");
                    } else {
                        tracing::debug!(port = %port.name, error = %e, retry_in = ?wait, "vhost-user connect failed");
                    }
                }
            }
        }
    }

    /// After a client-mode port's connection ended: the next attempt, soon after a connection
    /// that lasted (the VM restarting, vmq closing a misbehaving one), later after short ones
    /// (a frontend that keeps hanging up must not make this thread spin).
    fn schedule_reconnect(&mut self, index: usize) {
        let Some(port) = self.ports.get_mut(index).and_then(Option::as_mut) else { return };
        let Endpoint::Connect { retry_at, backoff } = &mut port.endpoint else { return };
        let lasted = port.connection.as_ref().map(|c| c.since.elapsed());
        if lasted.is_some_and(|d| d >= MAX_BACKOFF) {
            *backoff = MIN_BACKOFF;
        }
        *retry_at = Some(Instant::now() + *backoff);
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
    }

    fn end_stalled_connections(&mut self) {
        let now = Instant::now();
        for index in 0..self.ports.len() {
            let Some(port) = self.ports[index].as_ref() else { continue };
            let Some(conn) = port.connection.as_ref() else { continue };
            let stalled = conn.stalled.filter(|&(since, _)| now.duration_since(since) >= self.stall_timeout);
            if let Some((_, why)) = stalled {
                self.disconnect(index, why.reason());
            } else if conn.setup_deadline.is_some_and(|deadline| now >= deadline) {
                let reason = format!("no SET_OWNER within {:?} of connecting", port.setup_timeout);
                self.disconnect(index, &reason);
            }
        }
    }

    fn accept(&mut self, index: usize) {
        loop {
            let Some(port) = self.ports.get_mut(index).and_then(Option::as_mut) else {
                return;
            };
            let Endpoint::Listen(listener) = &port.endpoint else { return };
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(port = %port.name, error = %e, "vhost-user accept failed");
                    return;
                }
            };
            if port.connection.is_some() {
                // One frontend per port; a second one is turned away, the first keeps running.
                tracing::warn!(port = %port.name, "second vhost-user connection refused: port already connected");
                port.refused += 1;
                continue;
            }
            if let Some(allowed) = &port.allowed_uids {
                match unix_socket::peer_credentials(&stream) {
                    Ok(peer) if allowed.contains(&peer.uid) => {}
                    Ok(peer) => {
                        tracing::warn!(port = %port.name, uid = peer.uid, pid = peer.pid,
                            "vhost-user connection refused: peer uid not in allowed_uids");
                        port.refused += 1;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(port = %port.name, error = %e,
                            "vhost-user connection refused: cannot read the peer's credentials");
                        port.refused += 1;
                        continue;
                    }
                }
            }
            self.attach(index, stream);
        }
    }

    /// Serves `stream` (accepted or connected) as port `index`'s connection; false if it could
    /// not be set up (logged).
    fn attach(&mut self, index: usize, stream: UnixStream) -> bool {
        let Some(port) = self.ports.get_mut(index).and_then(Option::as_mut) else {
            return false;
        };
        // The peek handle is non-blocking (the flag is shared with the handler's socket,
        // which only reads once a whole message is known to be there).
        let peek = match stream.set_nonblocking(true).and_then(|()| stream.try_clone()) {
            Ok(peek) => peek,
            Err(e) => {
                tracing::warn!(port = %port.name, error = %e, "vhost-user connection setup failed");
                return false;
            }
        };
        let handler = BackendReqHandler::from_stream(stream, port.backend.clone());
        let token = Token::Connection(index).encode();
        // Edge-triggered: a half message waits for the next edge instead of spinning, and
        // a connection whose replies are unread for the edge of the frontend reading them.
        let interest =
            EventSet::IN | EventSet::OUT | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, handler.as_raw_fd(), EpollEvent::new(interest, token)) {
            tracing::warn!(port = %port.name, error = %e, "cannot watch vhost-user connection");
            return false;
        }
        let connections = port.status.connections.fetch_add(1, Ordering::Relaxed) + 1;
        port.status.connected.store(true, Ordering::Relaxed);
        tracing::info!(port = %port.name, mode = port.status.mode.name(), connections, "vhost-user frontend connected");
        let now = Instant::now();
        let setup_deadline = Some(now + port.setup_timeout);
        port.connection = Some(Connection { handler, peek, stalled: None, setup_deadline, since: now });
        true
    }

    fn serve(&mut self, index: usize, peer_closed: bool) {
        // Edge-triggered: handle every complete message that is there now, or a turn's worth
        // and the rest on the next poll.
        for _ in 0..MESSAGES_PER_TURN {
            let Some(port) = self.ports.get_mut(index).and_then(Option::as_mut) else {
                return;
            };
            let Some(conn) = port.connection.as_mut() else {
                return;
            };
            let (request, flags, size) = match conn.pending() {
                Pending::Closed => return self.disconnect(index, "frontend disconnected"),
                Pending::Empty => {
                    conn.stalled = None;
                    return;
                }
                // The peer closed with half a message: it will never be completed.
                Pending::Partial if peer_closed => {
                    return self.disconnect(index, "frontend hung up mid-message");
                }
                Pending::Partial => {
                    conn.stall(Stall::IncompleteMessage);
                    return;
                }
                Pending::Message { request, flags, size } => (request, flags, size),
            };
            if !conn.can_reply() {
                // Resumed by the edge of the frontend reading (EPOLLOUT), or ended by the timeout.
                conn.stall(Stall::RepliesUnread);
                return;
            }
            conn.stalled = None;
            tracing::debug!(port = %port.name, request, flags, size, "vhost-user request");
            // A panic while handling one frontend's message (a bug) ends that connection only:
            // this thread serves every other VM too.
            let backend = port.backend.clone();
            let handled = catch_unwind(AssertUnwindSafe(|| {
                if request == SET_VRING_ENABLE || request == NET_SET_MTU || request == SEND_RARP {
                    conn.intercept(&backend, request, flags, size).map_err(Handled::Refused)
                } else {
                    conn.handler.handle_request().map_err(Handled::Protocol)
                }
            }));
            let handled = match handled {
                Ok(result) => result,
                Err(_) => {
                    port.panics += 1;
                    // The `vhost` crate unwraps the backend's lock: clear the poison so that the
                    // frontend's next connection is served.
                    backend.clear_poison();
                    let reason = format!("panic while handling request {request}");
                    tracing::error!(port = %port.name, request, "vhost-user request handler panicked");
                    return self.disconnect(index, &reason);
                }
            };
            match handled {
                Ok(()) if request == SET_OWNER => conn.setup_deadline = None,
                Ok(()) => {}
                Err(Handled::Refused(reason)) => return self.disconnect(index, &reason),
                Err(Handled::Protocol(ProtoError::Disconnected)) => {
                    return self.disconnect(index, "frontend disconnected");
                }
                Err(Handled::Protocol(e)) => {
                    let reason = format!("protocol error (request {request}): {e}");
                    return self.disconnect(index, &reason);
                }
            }
        }
        self.backlog.push((index, peer_closed));
    }

    fn disconnect(&mut self, index: usize, reason: &str) {
        self.backlog.retain(|&(i, _)| i != index);
        let Some(port) = self.ports.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        let had_connection = port.connection.is_some();
        if let Some(conn) = &port.connection {
            let _ = self.epoll.ctl(ControlOperation::Delete, conn.handler.as_raw_fd(), EpollEvent::default());
            tracing::info!(port = %port.name, reason, "vhost-user frontend disconnected; port down");
        }
        port.status.connected.store(false, Ordering::Relaxed);
        lock(&port.backend).disconnected();
        if had_connection {
            // Reads how long the connection lasted, then drops it.
            self.schedule_reconnect(index);
        }
        if let Some(port) = self.ports.get_mut(index).and_then(Option::as_mut) {
            port.connection = None;
        }
    }
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        for port in self.ports.iter().flatten() {
            port.remove_socket_file();
        }
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Port {
    fn remove_socket_file(&self) {
        if self.file_id.is_some() && file_id(&self.path) == self.file_id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn lock(backend: &Mutex<NetBackend>) -> std::sync::MutexGuard<'_, NetBackend> {
    backend.lock().unwrap_or_else(|p| p.into_inner())
}

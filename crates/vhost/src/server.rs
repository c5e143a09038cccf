//! Serves the Unix sockets of all vhost-user ports from one thread (vmq's control thread).
//!
//! Each port listens on its socket (server mode). One frontend at a time is connected; a VM
//! that stops, crashes or restarts leaves the port down until the next connection on the same
//! socket. A frontend that sends something malformed is disconnected with a logged reason;
//! the other ports are not affected.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{BackendReqHandler, Error as ProtoError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::backend::{DeviceEvent, NetBackend, NetDeviceConfig};
use crate::device::NetDevice;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("vhost-user socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("vhost-user socket {0}: a file that is not a socket is in the way")]
    NotASocket(PathBuf),
    #[error("epoll: {0}")]
    Epoll(io::Error),
    #[error("no vhost-user port named {0:?}")]
    UnknownPort(String),
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

type Handler = BackendReqHandler<Mutex<NetBackend>>;

/// vhost-user message header: request, flags, body size (u32 each).
const HEADER_LEN: usize = 12;
/// Largest body the `vhost` crate accepts (its MAX_MSG_SIZE); larger ones fail its header check.
const MAX_BODY_LEN: usize = 0x1000;

struct Connection {
    handler: Handler,
    /// A second handle on the same socket, to peek whether a whole message has arrived: the
    /// `vhost` crate reads a message with blocking retries, so a frontend that sent half a
    /// message would otherwise stall this thread and with it every other port.
    peek: UnixStream,
}

/// What is waiting on a connection.
enum Pending {
    Closed,
    Partial,
    /// A whole message: its request code and flags.
    Message {
        request: u32,
        flags: u32,
    },
}

/// VHOST_USER_SET_VRING_ENABLE.
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Connection {
    /// Is a complete message (header and body) waiting?
    fn pending(&self) -> Pending {
        use nix::sys::socket::{MsgFlags, recv};
        let mut buf = [0u8; HEADER_LEN + MAX_BODY_LEN];
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        match recv(self.peek.as_raw_fd(), &mut buf, flags) {
            Ok(0) => Pending::Closed,
            Ok(n) if n < HEADER_LEN => Pending::Partial,
            Ok(n) => {
                let body = le32(&buf, 8) as usize;
                // An oversized body is rejected by the header check before it is read.
                if body > MAX_BODY_LEN || n >= HEADER_LEN + body {
                    Pending::Message { request: le32(&buf, 0), flags: le32(&buf, 4) }
                } else {
                    Pending::Partial
                }
            }
            Err(nix::errno::Errno::EAGAIN) => Pending::Partial,
            Err(_) => Pending::Closed,
        }
    }

    /// Handles SET_VRING_ENABLE here instead of in the `vhost` crate, which refuses it until
    /// SET_FEATURES has acked VHOST_USER_F_PROTOCOL_FEATURES. QEMU 7.2 sends it earlier
    /// (virtio-net's peer_attach, right after GET_FEATURES), as the vhost-user spec allows,
    /// and then fails to start the device. Body: `struct vhost_vring_state { u32 index; u32 num; }`.
    fn set_vring_enable(&mut self, backend: &Mutex<NetBackend>, flags: u32) -> Result<(), String> {
        use std::io::{Read, Write};
        let mut msg = [0u8; HEADER_LEN + 8];
        (&self.peek).read_exact(&mut msg).map_err(|e| format!("reading SET_VRING_ENABLE: {e}"))?;
        if le32(&msg, 8) != 8 {
            return Err("SET_VRING_ENABLE with a body that is not 8 bytes".to_string());
        }
        let (index, num) = (le32(&msg, 12), le32(&msg, 16));
        let mut backend = backend.lock().unwrap_or_else(|p| p.into_inner());
        let result = backend.enable_vring(index, num != 0);
        if flags & FLAG_NEED_REPLY != 0 && backend.reply_ack() {
            let mut reply = [0u8; HEADER_LEN + 8];
            reply[..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
            reply[4..8].copy_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
            reply[8..12].copy_from_slice(&8u32.to_le_bytes());
            reply[12..].copy_from_slice(&u64::from(result.is_err()).to_le_bytes());
            (&self.peek).write_all(&reply).map_err(|e| format!("replying to SET_VRING_ENABLE: {e}"))?;
        }
        result.map_err(|e| format!("SET_VRING_ENABLE: {e}"))
    }
}

struct Port {
    name: String,
    path: PathBuf,
    listener: UnixListener,
    backend: Arc<Mutex<NetBackend>>,
    connection: Option<Connection>,
}

/// Connection state of a port, for `vmq ctl` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortStatus {
    pub name: String,
    pub connected: bool,
    pub running: bool,
}

pub struct VhostUserServer {
    epoll: Epoll,
    /// Slots are never reused while the server lives, so tokens stay unambiguous.
    ports: Vec<Option<Port>>,
}

fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let socket_err = |source| ServerError::Socket { path: path.to_path_buf(), source };
    // A socket file left by an earlier run is replaced; anything else is not ours to delete.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(socket_err)?,
        Ok(_) => return Err(ServerError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err(e)),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(socket_err)?;
    }
    let listener = UnixListener::bind(path).map_err(socket_err)?;
    listener.set_nonblocking(true).map_err(socket_err)?;
    Ok(listener)
}

impl VhostUserServer {
    pub fn new() -> Result<Self, ServerError> {
        Ok(VhostUserServer { epoll: Epoll::new().map_err(ServerError::Epoll)?, ports: Vec::new() })
    }

    /// Listens on `path` for the VM of port `name`. `on_event` runs on this thread when the
    /// device starts or stops.
    pub fn add_port(
        &mut self,
        name: &str,
        path: &Path,
        config: NetDeviceConfig,
        device: Arc<NetDevice>,
        on_event: Box<dyn FnMut(DeviceEvent) + Send>,
    ) -> Result<(), ServerError> {
        let listener = bind(path)?;
        let index = self.ports.len();
        self.epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, Token::Listener(index).encode()),
            )
            .map_err(ServerError::Epoll)?;
        let backend = Arc::new(Mutex::new(NetBackend::new(config, device, on_event)));
        self.ports.push(Some(Port {
            name: name.to_string(),
            path: path.to_path_buf(),
            listener,
            backend,
            connection: None,
        }));
        tracing::info!(port = name, socket = %path.display(), "vhost-user port listening");
        Ok(())
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
            let _ = self.epoll.ctl(ControlOperation::Delete, port.listener.as_raw_fd(), EpollEvent::default());
            let _ = std::fs::remove_file(&port.path);
        }
        Ok(())
    }

    pub fn status(&self) -> Vec<PortStatus> {
        self.ports
            .iter()
            .flatten()
            .map(|p| PortStatus {
                name: p.name.clone(),
                connected: p.connection.is_some(),
                running: lock(&p.backend).device().is_running(),
            })
            .collect()
    }

    /// The epoll fd, so that a control loop can wait on it together with other sources.
    pub fn as_raw_fd(&self) -> i32 {
        self.epoll.as_raw_fd()
    }

    /// Handles whatever is ready, waiting at most `timeout_ms` (-1: forever, 0: don't wait).
    /// Returns the number of events handled.
    pub fn poll(&mut self, timeout_ms: i32) -> Result<usize, ServerError> {
        let mut events = [EpollEvent::default(); 16];
        let n = match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(0),
            Err(e) => return Err(ServerError::Epoll(e)),
        };
        // Connections first: a VM that closed and reconnected at once must have its old
        // connection torn down before the new one is accepted.
        for event in &events[..n] {
            if let Token::Connection(i) = Token::decode(event.data()) {
                self.serve(i, event.event_set());
            }
        }
        for event in &events[..n] {
            if let Token::Listener(i) = Token::decode(event.data()) {
                self.accept(i);
            }
        }
        Ok(n)
    }

    fn accept(&mut self, index: usize) {
        let Some(port) = self.ports.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        loop {
            let stream = match port.listener.accept() {
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
                continue;
            }
            // The peek handle is non-blocking (the flag is shared with the handler's socket,
            // which only reads once a whole message is known to be there).
            let peek = match stream.set_nonblocking(true).and_then(|()| stream.try_clone()) {
                Ok(peek) => peek,
                Err(e) => {
                    tracing::warn!(port = %port.name, error = %e, "vhost-user connection setup failed");
                    continue;
                }
            };
            let handler = BackendReqHandler::from_stream(stream, port.backend.clone());
            let token = Token::Connection(index).encode();
            // Edge-triggered: a half message waits for the next edge instead of spinning.
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                handler.as_raw_fd(),
                EpollEvent::new(
                    EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
                    token,
                ),
            ) {
                tracing::warn!(port = %port.name, error = %e, "cannot watch vhost-user connection");
                continue;
            }
            tracing::info!(port = %port.name, "vhost-user frontend connected");
            port.connection = Some(Connection { handler, peek });
        }
    }

    fn serve(&mut self, index: usize, events: EventSet) {
        let peer_closed = events.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR);
        // Edge-triggered: handle every complete message that is there now.
        loop {
            let Some(port) = self.ports.get_mut(index).and_then(Option::as_mut) else {
                return;
            };
            let Some(conn) = port.connection.as_mut() else {
                return;
            };
            match conn.pending() {
                Pending::Closed => return self.disconnect(index, "frontend disconnected"),
                // The peer closed with half a message: it will never be completed.
                Pending::Partial if peer_closed => {
                    return self.disconnect(index, "frontend hung up mid-message");
                }
                Pending::Partial => return,
                Pending::Message { request: SET_VRING_ENABLE, flags } => {
                    let backend = port.backend.clone();
                    if let Err(reason) = conn.set_vring_enable(&backend, flags) {
                        return self.disconnect(index, &reason);
                    }
                    continue;
                }
                Pending::Message { .. } => {}
            }
            match conn.handler.handle_request() {
                Ok(()) => {}
                Err(ProtoError::Disconnected) => {
                    return self.disconnect(index, "frontend disconnected");
                }
                Err(e) => {
                    let reason = format!("protocol error: {e}");
                    return self.disconnect(index, &reason);
                }
            }
        }
    }

    fn disconnect(&mut self, index: usize, reason: &str) {
        let Some(port) = self.ports.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        if let Some(conn) = port.connection.take() {
            let _ = self.epoll.ctl(ControlOperation::Delete, conn.handler.as_raw_fd(), EpollEvent::default());
            tracing::info!(port = %port.name, reason, "vhost-user frontend disconnected; port down");
        }
        lock(&port.backend).disconnected();
    }
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        for port in self.ports.iter().flatten() {
            let _ = std::fs::remove_file(&port.path);
        }
    }
}

fn lock(backend: &Mutex<NetBackend>) -> std::sync::MutexGuard<'_, NetBackend> {
    backend.lock().unwrap_or_else(|p| p.into_inner())
}

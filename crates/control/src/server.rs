//! The control socket server: binds the socket, accepts connections on its own thread, serves
//! each connection on a thread of its own (at most `max_connections` at once), and hands every
//! request to a [`ControlHandler`]. No request, however malformed, stops the server.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::lines::{self, LineError};
use crate::protocol::{ControlError, ErrorCode, MAX_REQUEST_BYTES, Reply, Request, Response};

/// What the switch does with a request. Called concurrently from connection threads, so an
/// implementation takes its own locks; it must not block for long (the client waits for it).
pub trait ControlHandler: Send + Sync {
    fn handle(&self, request: Request) -> Result<Response, ControlError>;
}

impl<F> ControlHandler for F
where
    F: Fn(Request) -> Result<Response, ControlError> + Send + Sync,
{
    fn handle(&self, request: Request) -> Result<Response, ControlError> {
        self(request)
    }
}

/// Where the control socket is: `[control] socket` in the configuration.
pub const DEFAULT_SOCKET: &str = "/run/vmq/vmq.sock";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub socket: PathBuf,
    /// File mode of the socket. 0600: only the owner (and root) can connect; peer credentials
    /// are checked as well, so a wider mode does not let other users in.
    pub socket_mode: u32,
    /// Connections served at once; one more gets `busy` and is closed.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// A peer that does not read its responses for this long is dropped.
    pub write_timeout: Duration,
    /// Longest request line (newline not counted).
    pub max_request_bytes: usize,
    /// How long `shutdown` waits for connections busy in the handler before leaving them.
    pub shutdown_wait: Duration,
}

impl ServerConfig {
    pub fn new(socket: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            socket: socket.into(),
            socket_mode: 0o600,
            max_connections: 16,
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(5),
            max_request_bytes: MAX_REQUEST_BYTES,
            shutdown_wait: Duration::from_secs(2),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig::new(DEFAULT_SOCKET)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another vmq is running on {}", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("{} exists and is not a socket; remove it or set another [control] socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot create the directory {} for the control socket: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot check {}: {source}", path.display())]
    Probe { path: PathBuf, source: io::Error },
    #[error("cannot remove the stale control socket {}: {source}", path.display())]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot bind the control socket {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set the mode of {}: {source}", path.display())]
    Mode { path: PathBuf, source: io::Error },
    #[error("cannot start the control socket thread: {0}")]
    Thread(io::Error),
}

/// A running control socket server. Stop it with [`ControlServer::shutdown`] (or drop it): the
/// socket file is removed and the threads are joined, each wait bounded.
pub struct ControlServer {
    path: PathBuf,
    /// Identity of the socket file we bound, so that we never remove a successor's socket.
    file_id: Option<(u64, u64)>,
    shared: Arc<Shared>,
    wake: UnixStream,
    acceptor: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

struct Shared {
    handler: Arc<dyn ControlHandler>,
    config: ServerConfig,
    euid: u32,
    stopping: AtomicBool,
    connections: Mutex<Connections>,
    changed: Condvar,
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    /// Clones of live connections' streams, to shut them down on `shutdown`.
    live: HashMap<u64, UnixStream>,
}

fn lock(m: &Mutex<Connections>) -> MutexGuard<'_, Connections> {
    // A panic while holding this lock leaves a consistent map; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ControlServer {
    /// Binds the socket and starts serving. Refuses if a server already answers on the path;
    /// replaces a stale socket file; refuses to remove anything that is not a socket.
    pub fn start(config: ServerConfig, handler: Arc<dyn ControlHandler>) -> Result<ControlServer, ServerError> {
        let path = config.socket.clone();
        let listener = bind(&path, config.socket_mode)?;
        let file_id = fs::symlink_metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        listener.set_nonblocking(true).map_err(|source| ServerError::Bind { path: path.clone(), source })?;
        let (wake, wake_rx) = UnixStream::pair().map_err(ServerError::Thread)?;
        let shared = Arc::new(Shared {
            handler,
            config,
            euid: nix::unistd::geteuid().as_raw(),
            stopping: AtomicBool::new(false),
            connections: Mutex::new(Connections::default()),
            changed: Condvar::new(),
        });
        let acceptor_shared = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("vmq-ctl-accept".into())
            .spawn(move || accept_loop(&acceptor_shared, &listener, &wake_rx))
            .map_err(ServerError::Thread)?;
        tracing::info!(socket = %path.display(), "control socket listening");
        Ok(ControlServer { path, file_id, shared, wake, acceptor: Some(acceptor) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        lock(&self.shared.connections).live.len()
    }

    /// Stops accepting, closes every connection, waits (bounded by `shutdown_wait`) for their
    /// threads, and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else { return };
        self.shared.stopping.store(true, Ordering::SeqCst);
        // The acceptor polls this socket; a byte (or its failure, which closes nothing) wakes it.
        let _ = self.wake.write_all(&[1]);
        let handles = acceptor.join().unwrap_or_default();
        // The acceptor is gone, so no connection registers after this point.
        for stream in lock(&self.shared.connections).live.values() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let deadline = Instant::now() + self.shared.config.shutdown_wait;
        let mut connections = lock(&self.shared.connections);
        while !connections.live.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    connections = connections.live.len(),
                    "control connections still busy in the handler at shutdown; leaving them"
                );
                break;
            }
            connections = self.shared.changed.wait_timeout(connections, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(connections);
        for handle in handles {
            // Finished threads only: one still in the handler was reported above.
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
        self.remove_socket_file();
    }

    fn remove_socket_file(&self) {
        let ours = fs::symlink_metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if ours.is_some()
            && ours == self.file_id
            && let Err(e) = fs::remove_file(&self.path)
        {
            tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove the control socket");
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Prepares the path and binds. A socket file nobody answers on is stale (a crashed vmq) and is
/// replaced; one somebody answers on belongs to a running vmq.
fn bind(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|source| ServerError::CreateDir { path: parent.to_path_buf(), source })?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match crate::client::connect_stream(path, Duration::from_millis(500)) {
                // Connected, or its backlog is full: either way a server is alive there.
                Ok(_) => return Err(ServerError::AlreadyRunning(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(ServerError::AlreadyRunning(path.to_path_buf()));
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused || e.kind() == io::ErrorKind::NotFound => {
                    tracing::info!(socket = %path.display(), "replacing a stale control socket");
                    match fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(source) => return Err(ServerError::RemoveStale { path: path.to_path_buf(), source }),
                    }
                }
                Err(source) => return Err(ServerError::Probe { path: path.to_path_buf(), source }),
            }
        }
        Ok(_) => return Err(ServerError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(ServerError::Probe { path: path.to_path_buf(), source }),
    }
    let listener = UnixListener::bind(path).map_err(|source| match source.kind() {
        // Another vmq bound it between our check and our bind.
        io::ErrorKind::AddrInUse => ServerError::AlreadyRunning(path.to_path_buf()),
        _ => ServerError::Bind { path: path.to_path_buf(), source },
    })?;
    // Between bind and chmod the umask decides the mode; the peer credential check covers that
    // window.
    if let Err(source) = fs::set_permissions(path, fs::Permissions::from_mode(mode)) {
        let _ = fs::remove_file(path);
        return Err(ServerError::Mode { path: path.to_path_buf(), source });
    }
    Ok(listener)
}

/// Peers allowed on the control socket: root and the user vmq runs as.
pub fn peer_allowed(peer_uid: u32, server_euid: u32) -> bool {
    peer_uid == 0 || peer_uid == server_euid
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener, wake: &UnixStream) -> Vec<JoinHandle<()>> {
    let mut handles: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let (listener_ready, woken) = match crate::wait::listener_or_wake(listener, wake) {
            Ok(r) => (r.listener, r.woken),
            Err(e) => {
                tracing::error!(error = %e, "control socket poll failed; the control socket stops");
                return handles;
            }
        };
        if woken || shared.stopping.load(Ordering::SeqCst) {
            return handles;
        }
        if !listener_ready {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Some(handle) = admit(shared, stream) {
                    handles.retain(|h| !h.is_finished());
                    handles.push(handle);
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning, still
                // listening for the stop signal.
                tracing::warn!(error = %e, "control socket accept failed");
                let mut fds = [PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(100u16));
            }
        }
    }
}

/// Checks the peer and the connection limit, then serves the connection on a thread of its own.
fn admit(shared: &Arc<Shared>, stream: UnixStream) -> Option<JoinHandle<()>> {
    let config = &shared.config;
    // Accepted sockets do not inherit O_NONBLOCK on Linux; make sure, since we rely on timeouts.
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(config.write_timeout));
    let refuse = |stream: &UnixStream, error: ControlError| {
        let mut s = stream;
        let _ = s.write_all(Reply(Err(error)).to_line().as_bytes());
        let _ = stream.shutdown(std::net::Shutdown::Both);
    };
    match vmq_sys::unix_socket::peer_credentials(&stream) {
        Ok(cred) if peer_allowed(cred.uid, shared.euid) => {}
        Ok(cred) => {
            tracing::warn!(uid = cred.uid, pid = cred.pid, "control socket: peer denied");
            refuse(
                &stream,
                ControlError::new(
                    ErrorCode::Denied,
                    format!("uid {} may not control vmq (only root and uid {})", cred.uid, shared.euid),
                ),
            );
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "control socket: cannot read peer credentials");
            refuse(&stream, ControlError::new(ErrorCode::Denied, "cannot read the peer's credentials"));
            return None;
        }
    }
    let clone = match stream.try_clone() {
        Ok(c) => c,
        Err(e) => {
            refuse(&stream, ControlError::internal(format!("cannot serve the connection: {e}")));
            return None;
        }
    };
    let id = {
        let mut connections = lock(&shared.connections);
        if connections.live.len() >= config.max_connections {
            drop(connections);
            refuse(
                &stream,
                ControlError::new(
                    ErrorCode::Busy,
                    format!("{} control connections are open already; try again", config.max_connections),
                ),
            );
            return None;
        }
        let id = connections.next_id;
        connections.next_id += 1;
        connections.live.insert(id, clone);
        id
    };
    let thread_shared = shared.clone();
    match std::thread::Builder::new().name("vmq-ctl-conn".into()).spawn(move || {
        let _registered = Registered { shared: &thread_shared, id };
        serve(&thread_shared, stream);
    }) {
        Ok(handle) => Some(handle),
        Err(e) => {
            let stream = lock(&shared.connections).live.remove(&id);
            shared.changed.notify_all();
            if let Some(stream) = stream {
                refuse(&stream, ControlError::internal(format!("cannot serve the connection: {e}")));
            }
            None
        }
    }
}

/// Unregisters a connection when its thread ends, panics included.
struct Registered<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(&self.shared.connections).live.remove(&self.id);
        self.shared.changed.notify_all();
    }
}

/// Serves one connection: request lines in, reply lines out, until the peer closes, idles out,
/// or sends a request over the size limit.
fn serve(shared: &Shared, stream: UnixStream) {
    let config = &shared.config;
    if stream.set_read_timeout(Some(config.idle_timeout)).is_err() {
        return;
    }
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::with_capacity(16 * 1024, read_half);
    let mut writer = &stream;
    let mut line = Vec::new();
    loop {
        let reply = match lines::read_line(&mut reader, config.max_request_bytes, &mut line) {
            Ok(false) => return,
            Ok(true) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(true) => dispatch(shared, &line),
            Err(LineError::TooLong) => {
                let error = ControlError::new(
                    ErrorCode::TooLarge,
                    format!("request longer than {} bytes; closing the connection", config.max_request_bytes),
                );
                let _ = writer.write_all(Reply(Err(error)).to_line().as_bytes());
                // The peer reads our answer before it sees the close (a Unix socket delivers
                // queued data before reporting a reset).
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            // Idle timeout, reset, or our own shutdown: nothing to answer.
            Err(LineError::Io(_)) => return,
        };
        if writer.write_all(reply.to_line().as_bytes()).is_err() {
            return;
        }
    }
}

fn dispatch(shared: &Shared, line: &[u8]) -> Reply {
    let request = match Request::from_line(line) {
        Ok(r) => r,
        Err(e) => return Reply(Err(e)),
    };
    let command = request.command();
    tracing::debug!(command, "control request");
    match catch_unwind(AssertUnwindSafe(|| shared.handler.handle(request))) {
        Ok(result) => Reply(result),
        Err(_) => {
            tracing::error!(command, "control handler panicked");
            Reply(Err(ControlError::internal(format!("the switch failed while handling {command:?}"))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_and_our_own_user_are_allowed() {
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(65534, 1000));
        assert!(!peer_allowed(65534, 0));
        assert!(peer_allowed(0, 0));
    }
}

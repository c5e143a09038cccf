//! Listening Unix stream sockets with a fixed owner, group and mode, non-blocking connects, and
//! peer credentials.
//!
//! [`listen`] creates the socket file with `socket` + `bind`, sets its owner, group and mode,
//! and only then calls `listen`: until `listen`, a `connect` is refused, so there is no window
//! in which the umask's mode lets anybody in. A socket file already at the path is probed with
//! a connect first: one nobody listens on (a crashed process's) is replaced, one somebody
//! answers on is left alone ([`ListenError::InUse`]).
//!
//! The owner and mode are set on the path (a socket's fd refers to a different inode than its
//! file), so the directory holding the socket should not be writable by others: a process that
//! can rename entries in it could swap the file between `bind` and `chmod`.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::cvt;

/// Owner, group and mode of a socket file; `None` leaves the owner or group as created (the
/// process's) and gives the mode [`DEFAULT_MODE`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketFileAccess {
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub mode: Option<u32>,
}

/// Mode of a socket file when none is given: owner and group may connect, nobody else; not
/// the umask's.
pub const DEFAULT_MODE: u32 = 0o660;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("socket in use: something is listening on {}", .0.display())]
    InUse(PathBuf),
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("socket path {} is too long (at most 107 bytes)", .0.display())]
    PathTooLong(PathBuf),
    #[error("{} {}: {source}", op, path.display())]
    Os { op: &'static str, path: PathBuf, source: io::Error },
}

/// What is at a socket path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Absent,
    /// A socket file nobody listens on.
    Stale,
    /// A socket somebody listens on (it accepted the probe, or its backlog is full).
    Live,
    NotASocket,
}

/// Looks at `path` without changing it (a live listener sees one connection, closed at once).
pub fn probe(path: &Path) -> io::Result<Probe> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {}
        Ok(_) => return Ok(Probe::NotASocket),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Probe::Absent),
        Err(e) => return Err(e),
    }
    let (addr, len) = sockaddr(path).ok_or_else(|| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
    let fd = stream_socket()?;
    loop {
        // SAFETY: `addr` is an initialized sockaddr_un of `len` bytes; `fd` is a socket we own.
        let ret = unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) };
        match cvt(ret) {
            Ok(_) => return Ok(Probe::Live),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Non-blocking connect to a listener whose backlog is full.
                Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => return Ok(Probe::Live),
                Some(libc::ECONNREFUSED) => return Ok(Probe::Stale),
                Some(libc::ENOENT) => return Ok(Probe::Absent),
                _ => return Err(e),
            },
        }
    }
}

/// Creates the socket file at `path` (and its directory) with `access`, then listens. Replaces
/// a stale socket file; refuses a live one and anything that is not a socket.
pub fn listen(path: &Path, access: &SocketFileAccess, backlog: i32) -> Result<UnixListener, ListenError> {
    let os = |op: &'static str| move |source| ListenError::Os { op, path: path.to_path_buf(), source };
    let (addr, len) = sockaddr(path).ok_or_else(|| ListenError::PathTooLong(path.to_path_buf()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(os("create the directory of"))?;
    }
    match probe(path).map_err(os("probe"))? {
        Probe::Absent => {}
        Probe::Live => return Err(ListenError::InUse(path.to_path_buf())),
        Probe::NotASocket => return Err(ListenError::NotASocket(path.to_path_buf())),
        Probe::Stale => {
            tracing::info!(socket = %path.display(), "replacing a stale socket file");
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(os("remove the stale socket")(e)),
            }
        }
    }
    let fd = stream_socket().map_err(os("create a socket for"))?;
    // SAFETY: as in `probe`.
    let bound = unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) };
    if let Err(e) = cvt(bound) {
        // Another process bound it between our probe and our bind.
        if e.raw_os_error() == Some(libc::EADDRINUSE) {
            return Err(ListenError::InUse(path.to_path_buf()));
        }
        return Err(os("bind")(e));
    }
    // The file is ours from here; on failure it goes.
    let finish = || -> Result<(), ListenError> {
        if access.owner.is_some() || access.group.is_some() {
            std::os::unix::fs::lchown(path, access.owner, access.group).map_err(os("set the owner of"))?;
        }
        let mode = access.mode.unwrap_or(DEFAULT_MODE);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(os("set the mode of"))?;
        // SAFETY: plain syscall on a socket we own.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) }).map_err(os("listen on"))?;
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// Connects to the socket at `path` without blocking (for vhost-user client mode: the thread
/// that connects serves other sockets too). A Unix stream connect completes at once or fails
/// at once: `ENOENT` (no socket file yet), `ECONNREFUSED` (nobody listens), `EAGAIN` (the
/// listener's backlog is full); the caller retries later. The stream is non-blocking.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let (addr, len) = sockaddr(path).ok_or_else(|| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
    let fd = stream_socket()?;
    loop {
        // SAFETY: `addr` is an initialized sockaddr_un of `len` bytes; `fd` is a socket we own.
        let ret = unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) };
        match cvt(ret) {
            Ok(_) => return Ok(UnixStream::from(fd)),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Credentials of the process at the other end of a connected Unix socket, as the kernel
/// recorded them at `connect` (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

pub fn peer_credentials(socket: &impl AsRawFd) -> io::Result<PeerCredentials> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable ucred and `len` its size; the kernel writes at most `len`.
    cvt(unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    if len as usize != size_of::<libc::ucred>() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short SO_PEERCRED answer"));
    }
    Ok(PeerCredentials { pid: cred.pid, uid: cred.uid, gid: cred.gid })
}

fn stream_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is checked and then owned.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) })?;
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `path` as a `sockaddr_un` and its length; `None` if it does not fit (with its NUL).
fn sockaddr(path: &Path) -> Option<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return None;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Some((addr, len as libc::socklen_t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmq-sys-sock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn mode_is_set_before_anyone_can_connect_and_umask_does_not_matter() {
        let dir = scratch("mode");
        let path = dir.join("s.sock");
        let access = SocketFileAccess { owner: None, group: Some(65534), mode: Some(0o640) };
        let listener = listen(&path, &access, 8).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!(meta.gid(), 65534);
        UnixStream::connect(&path).unwrap();
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn live_socket_is_kept_stale_one_replaced_other_files_refused() {
        let dir = scratch("probe");
        let path = dir.join("s.sock");
        let first = listen(&path, &SocketFileAccess::default(), 8).unwrap();
        assert_eq!(probe(&path).unwrap(), Probe::Live);
        assert!(matches!(listen(&path, &SocketFileAccess::default(), 8), Err(ListenError::InUse(_))));
        // The first listener still serves on its file.
        UnixStream::connect(&path).unwrap();
        drop(first);
        assert_eq!(probe(&path).unwrap(), Probe::Stale);
        let second = listen(&path, &SocketFileAccess::default(), 8).unwrap();
        UnixStream::connect(&path).unwrap();
        drop(second);
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(listen(&file, &SocketFileAccess::default(), 8), Err(ListenError::NotASocket(_))));
        let long = dir.join("x".repeat(120));
        assert!(matches!(listen(&long, &SocketFileAccess::default(), 8), Err(ListenError::PathTooLong(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn peer_credentials_name_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = peer_credentials(&a).unwrap();
        assert_eq!(cred.pid, std::process::id() as i32);
        // SAFETY: plain syscall without arguments.
        assert_eq!(cred.uid, unsafe { libc::geteuid() });
    }
}

//! Network namespaces, named or by path. Named ones are made the way `ip netns add` makes them: a
//! new network namespace kept alive by a bind mount of its nsfs file on `/run/netns/NAME`, with
//! `/run/netns` a shared mount point so the mount shows in other mount namespaces too. A
//! namespace can also be given by an absolute path to any nsfs file (a container runtime's
//! `/proc/PID/ns/net`, `/var/run/netns/X`): vmq enters it but never creates or deletes it. Code
//! runs inside a namespace on a short-lived thread that `setns`es into it: sockets and TAPs
//! created there stay bound to that namespace after the thread ends, so the rest of vmq never
//! changes namespace.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::cvt;

/// Where named namespaces live (as in iproute2).
pub const NETNS_RUN_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("netns name {name:?} is invalid: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("netns {0} does not exist")]
    NotFound(String),
    #[error("netns {0} is not a network namespace (setns refused it)")]
    NotANetns(String),
    #[error("netns path {path:?} is invalid: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("netns {0} already exists")]
    AlreadyExists(String),
    #[error("netns {name}: {op}: {source}")]
    Os { name: String, op: &'static str, source: io::Error },
    #[error("netns {name}: cannot start a thread to enter it: {source}")]
    Thread { name: String, source: io::Error },
}

fn os<'a>(name: &'a str, op: &'static str) -> impl FnOnce(io::Error) -> NetnsError + 'a {
    move |source| NetnsError::Os { name: name.to_string(), op, source }
}

fn check_name(name: &str) -> Result<(), NetnsError> {
    let bad = |reason| Err(NetnsError::InvalidName { name: name.to_string(), reason });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 255 {
        return bad("it is longer than 255 bytes");
    }
    if name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return bad("it must be a plain file name");
    }
    Ok(())
}

/// The file that names namespace `name`.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// True when `netns` is a path to a namespace file rather than a name under /run/netns.
pub fn is_path(netns: &str) -> bool {
    netns.starts_with('/')
}

/// The nsfs file of `netns`: the path itself, or `/run/netns/NAME` for a name.
pub fn resolve(netns: &str) -> Result<PathBuf, NetnsError> {
    if is_path(netns) {
        let bad = |reason| Err(NetnsError::InvalidPath { path: netns.to_string(), reason });
        if netns.contains('\0') {
            return bad("it contains a NUL byte");
        }
        if netns.len() >= libc::PATH_MAX as usize {
            return bad("it is longer than PATH_MAX");
        }
        return Ok(PathBuf::from(netns));
    }
    check_name(netns)?;
    Ok(path(netns))
}

fn c_path(p: &Path) -> CString {
    // Names are checked to contain no NUL; NETNS_RUN_DIR has none.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// Does namespace `netns` (a name or a path) exist (is its file there)?
pub fn exists(netns: &str) -> bool {
    resolve(netns).is_ok_and(|p| p.exists())
}

/// Serialises the one-time setup of /run/netns between threads of this process.
static RUN_DIR_SETUP: Mutex<()> = Mutex::new(());

/// Makes /run/netns a shared mount point, bind-mounting it on itself first if it is not a
/// mount point yet (what iproute2 does on every `ip netns add`).
fn prepare_run_dir(name: &str) -> Result<(), NetnsError> {
    let _guard = RUN_DIR_SETUP.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(NETNS_RUN_DIR).map_err(os(name, "mkdir /run/netns"))?;
    let dir = c_path(Path::new(NETNS_RUN_DIR));
    let none = c"none";
    let mut bound = false;
    loop {
        // SAFETY: both strings are valid NUL-terminated C strings; data is null (no options).
        let r = unsafe {
            libc::mount(none.as_ptr(), dir.as_ptr(), std::ptr::null(), libc::MS_SHARED | libc::MS_REC, std::ptr::null())
        };
        match cvt(r) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !bound => {
                // SAFETY: valid C strings; a recursive bind mount of the directory on itself.
                let r = unsafe {
                    libc::mount(
                        dir.as_ptr(),
                        dir.as_ptr(),
                        none.as_ptr(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    )
                };
                cvt(r).map_err(os(name, "bind mount /run/netns"))?;
                bound = true;
            }
            Err(e) => return Err(os(name, "make /run/netns a shared mount")(e)),
        }
    }
}

/// Creates network namespace `name` (like `ip netns add NAME`).
pub fn create(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    prepare_run_dir(name)?;
    let file = path(name);
    let cfile = c_path(&file);
    // SAFETY: valid C string; O_EXCL so an existing namespace is never overmounted.
    let fd = unsafe { libc::open(cfile.as_ptr(), libc::O_RDONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC, 0) };
    match cvt(fd) {
        Ok(fd) => {
            // SAFETY: fd was just opened and is closed once here.
            unsafe { libc::close(fd) };
        }
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Err(NetnsError::AlreadyExists(name.to_string())),
        Err(e) => return Err(os(name, "create /run/netns file")(e)),
    }
    // A fresh thread unshares its network namespace and pins it with a bind mount; only that
    // thread ever lives in the new namespace.
    let result = std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("vmq-netns-add".into())
            .spawn_scoped(s, || -> Result<(), NetnsError> {
                // SAFETY: unshare only changes this thread's namespace membership.
                cvt(unsafe { libc::unshare(libc::CLONE_NEWNET) }).map_err(os(name, "unshare(CLONE_NEWNET)"))?;
                let src = c"/proc/thread-self/ns/net";
                // SAFETY: valid C strings; a plain bind mount of this thread's nsfs file.
                let r = unsafe {
                    libc::mount(src.as_ptr(), cfile.as_ptr(), c"none".as_ptr(), libc::MS_BIND, std::ptr::null())
                };
                cvt(r).map_err(os(name, "bind mount the namespace"))?;
                Ok(())
            })
            .map_err(|source| NetnsError::Thread { name: name.to_string(), source })?;
        handle.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&file);
    }
    result
}

/// Deletes namespace `name` (like `ip netns delete NAME`). The namespace itself goes away when
/// nothing else holds it (interfaces in it, open sockets, processes).
pub fn delete(name: &str) -> Result<(), NetnsError> {
    check_name(name)?;
    let file = path(name);
    let cfile = c_path(&file);
    // SAFETY: valid C string. Failure (not mounted) is fine: the unlink below decides.
    unsafe { libc::umount2(cfile.as_ptr(), libc::MNT_DETACH) };
    match std::fs::remove_file(&file) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(NetnsError::NotFound(name.to_string())),
        Err(e) => Err(os(name, "unlink")(e)),
    }
}

/// Runs `f` inside namespace `name` (a name under /run/netns or a path to an nsfs file) on a
/// short-lived thread and returns its result. File descriptors `f` creates (sockets, TAPs) stay
/// in that namespace. A panic in `f` is re-raised.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let file = File::open(resolve(name)?).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound { NetnsError::NotFound(name.to_string()) } else { os(name, "open")(e) }
    })?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("vmq-netns".into())
            .spawn_scoped(s, || -> Result<T, NetnsError> {
                // SAFETY: setns on a valid fd only changes this thread's network namespace.
                cvt(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }).map_err(|e| {
                    // EINVAL: the file is not a network namespace (another namespace type, a
                    // plain file): the user's mistake, said as such.
                    if e.raw_os_error() == Some(libc::EINVAL) {
                        NetnsError::NotANetns(name.to_string())
                    } else {
                        os(name, "setns")(e)
                    }
                })?;
                Ok(f())
            })
            .map_err(|source| NetnsError::Thread { name: name.to_string(), source })?;
        handle.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Runs `f` in namespace `netns`, or right here when `None` (the caller's namespace).
pub fn run_in_opt<T: Send>(netns: Option<&str>, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    match netns {
        Some(name) => run_in(name, f),
        None => Ok(f()),
    }
}

/// A namespace this process created; deleted on drop (tests, demo).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` and brings its loopback interface up.
    pub fn create(name: &str) -> Result<Netns, NetnsError> {
        create(name)?;
        let ns = Netns { name: name.to_string() };
        run_in(name, || crate::link::LinkCtl::new(None).and_then(|c| c.set_up("lo", true)))?
            .map_err(|e| NetnsError::Os { name: name.to_string(), op: "set lo up", source: io::Error::other(e) })?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` inside this namespace (see [`run_in`]).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        run_in(&self.name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = delete(&self.name) {
            tracing::warn!("cannot delete netns {}: {e}", self.name);
        }
    }
}

//! TAP interfaces carrying a 12-byte virtio-net header (`virtio_net_hdr_v1`, the layout vmq uses
//! everywhere) in front of every frame: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` with
//! `TUNSETVNETHDRSZ 12`. `TUNSETOFFLOAD` decides what the kernel may hand vmq on read: with
//! offloads, GSO frames and partial checksums; without, only MTU-sized frames with complete
//! checksums. The fd is non-blocking; a TAP whose interface was deleted reports
//! [`TapIoError::Gone`] on every read and write, one that is administratively down fails writes
//! with [`TapIoError::Down`] (EIO) until it is up again.
//!
//! The interface lives as long as its fd. A fork elsewhere in the process (e.g. `Command`) holds
//! a copy of the fd until its exec closes it (O_CLOEXEC), so re-creating a TAP of the same name
//! right after dropping one can briefly fail with [`TapError::InUse`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::cvt;
use crate::ifname::{IfNameError, to_ifr_name};
use crate::link::{IfRef, LinkCtl, LinkError};
use crate::netns::{self, NetnsError};

/// Size of the virtio-net header on the TAP (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

/// Most iovec parts one frame write takes (header included).
pub const MAX_PARTS: usize = 16;

/// How to make a TAP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapConfig {
    pub name: String,
    /// Network namespace the TAP lives in (None: the caller's).
    pub netns: Option<String>,
    /// Create `netns` when it does not exist; the TAP then deletes it when dropped.
    pub create_netns: bool,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    /// Let the kernel hand over GSO frames and partial checksums (`TUNSETOFFLOAD`).
    pub offloads: bool,
    /// Bring the interface up.
    pub up: bool,
}

impl TapConfig {
    pub fn new(name: &str) -> TapConfig {
        TapConfig { name: name.to_string(), up: true, ..TapConfig::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TUNSETIFF: {0}")]
    Name(#[from] IfNameError),
    #[error("{at}: open /dev/net/tun: {source}")]
    OpenTun { at: IfRef, source: io::Error },
    #[error("{at}: TUNSETIFF: the interface exists and is in use, or is not a TAP")]
    InUse { at: IfRef },
    #[error("{at}: {op}: {source}")]
    Os { at: IfRef, op: &'static str, source: io::Error },
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// A failed frame read or write.
#[derive(Debug, thiserror::Error)]
pub enum TapIoError {
    /// Nothing to read, or the write would block.
    #[error("TAP would block")]
    WouldBlock,
    /// The interface was deleted (or its queue detached): the port is down for good.
    #[error("TAP interface is gone: {0}")]
    Gone(io::Error),
    /// The interface is administratively down (writes fail with EIO until it is up again).
    #[error("TAP interface is down: {0}")]
    Down(io::Error),
    /// The kernel refused the frame (e.g. a virtio-net header it does not accept).
    #[error("TAP refused the frame: {0}")]
    Invalid(io::Error),
    #[error("TAP I/O: {0}")]
    Os(io::Error),
    #[error("a frame of more than {MAX_PARTS} parts")]
    TooManyParts,
}

impl TapIoError {
    fn from_io(e: io::Error) -> TapIoError {
        match e.raw_os_error() {
            Some(libc::EAGAIN) => TapIoError::WouldBlock,
            Some(libc::EBADFD) | Some(libc::ENODEV) | Some(libc::ENXIO) | Some(libc::EPIPE) => TapIoError::Gone(e),
            Some(libc::EIO) => TapIoError::Down(e),
            Some(libc::EINVAL) | Some(libc::EMSGSIZE) => TapIoError::Invalid(e),
            _ => TapIoError::Os(e),
        }
    }
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    at: IfRef,
    offloads: bool,
    /// The namespace this TAP created and deletes on drop.
    owned_netns: Option<String>,
}

/// The TUN_F_* flags for a port with or without offloads.
pub fn offload_flags(offloads: bool) -> libc::c_uint {
    if offloads { libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN } else { 0 }
}

impl Tap {
    pub fn create(cfg: &TapConfig) -> Result<Tap, TapError> {
        let ifr_name = to_ifr_name(&cfg.name)?;
        let at = IfRef { name: cfg.name.clone(), netns: cfg.netns.clone() };
        let mut owned_netns = None;
        if let Some(ns) = &cfg.netns
            && cfg.create_netns
            && !netns::exists(ns)
        {
            netns::create(ns)?;
            owned_netns = Some(ns.clone());
        }
        let result = Self::open(cfg, &at, ifr_name).and_then(|fd| {
            let tap = Tap { fd, at: at.clone(), offloads: cfg.offloads, owned_netns: owned_netns.clone() };
            tap.configure(cfg)?;
            Ok(tap)
        });
        if result.is_err()
            && let Some(ns) = &owned_netns
        {
            let _ = netns::delete(ns);
        }
        result
    }

    /// Opens /dev/net/tun in the TAP's namespace (the device is created in the namespace of the
    /// opener) and attaches the interface.
    fn open(cfg: &TapConfig, at: &IfRef, ifr_name: [libc::c_char; libc::IFNAMSIZ]) -> Result<OwnedFd, TapError> {
        let os = |op| move |source| TapError::Os { at: at.clone(), op, source };
        netns::run_in_opt(cfg.netns.as_deref(), || -> Result<OwnedFd, TapError> {
            // SAFETY: valid C string; the result is checked and owned below.
            let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
            let fd = cvt(fd).map_err(|source| TapError::OpenTun { at: at.clone(), source })?;
            // SAFETY: fd is a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: ifreq is plain old data; all-zero is valid.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            ifr.ifr_name = ifr_name;
            ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
            // SAFETY: TUNSETIFF reads (and writes back the name into) a valid ifreq.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) };
            cvt(r).map_err(|source| match source.raw_os_error() {
                Some(libc::EBUSY) | Some(libc::EEXIST) => TapError::InUse { at: at.clone() },
                _ => TapError::Os { at: at.clone(), op: "TUNSETIFF", source },
            })?;
            let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) };
            cvt(r).map_err(os("TUNSETVNETHDRSZ"))?;
            let le: libc::c_int = 1;
            // SAFETY: TUNSETVNETLE reads one int. virtio 1.0 headers are little-endian; this is
            // a no-op on little-endian hosts and makes big-endian ones agree.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETLE, &le as *const libc::c_int) };
            cvt(r).map_err(os("TUNSETVNETLE"))?;
            Ok(fd)
        })?
    }

    fn configure(&self, cfg: &TapConfig) -> Result<(), TapError> {
        self.set_offloads(cfg.offloads)?;
        let ctl = LinkCtl::new(cfg.netns.as_deref())?;
        if let Some(mac) = cfg.mac {
            ctl.set_mac(&cfg.name, mac)?;
        }
        if let Some(mtu) = cfg.mtu {
            ctl.set_mtu(&cfg.name, mtu)?;
        }
        if cfg.up {
            ctl.set_up(&cfg.name, true)?;
        }
        Ok(())
    }

    /// Sets what the kernel may hand over on read (`TUNSETOFFLOAD`).
    pub fn set_offloads(&self, offloads: bool) -> Result<(), TapError> {
        // TUNSETOFFLOAD takes the flags as the ioctl argument itself, not a pointer.
        // SAFETY: a plain integer argument.
        let r =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, offload_flags(offloads) as libc::c_ulong) };
        cvt(r).map_err(|source| TapError::Os { at: self.at.clone(), op: "TUNSETOFFLOAD", source })?;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.at.name
    }

    pub fn netns(&self) -> Option<&str> {
        self.at.netns.as_deref()
    }

    pub fn offloads(&self) -> bool {
        self.offloads
    }

    /// Reads one frame (12-byte virtio-net header + Ethernet frame) into `buf`; returns its
    /// length. `buf` should hold 64 KiB + header: a GSO frame longer than `buf` is cut.
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, TapIoError> {
        // The raw syscall, not libc's `read`: that one is a thread-cancellation point whose
        // enable/disable around every call took 5 to 7 % of vmq's samples with TAP ports (vmq
        // never cancels threads).
        // SAFETY: buf is valid writable memory of buf.len() bytes; SYS_read takes (fd, ptr, len).
        let r = unsafe { libc::syscall(libc::SYS_read, self.fd.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
        cvt(r as isize).map(|n| n as usize).map_err(TapIoError::from_io)
    }

    /// Writes one frame: `parts` concatenated (the first must start with the 12-byte header).
    pub fn write(&self, parts: &[&[u8]]) -> Result<usize, TapIoError> {
        if parts.len() > MAX_PARTS {
            return Err(TapIoError::TooManyParts);
        }
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_PARTS];
        for (v, p) in iov.iter_mut().zip(parts) {
            *v = libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() };
        }
        // The raw syscall (see `read`).
        // SAFETY: the first parts.len() iovecs point at live slices; the kernel only reads them;
        // SYS_writev takes (fd, iov, iovcnt).
        let r = unsafe { libc::syscall(libc::SYS_writev, self.fd.as_raw_fd(), iov.as_ptr(), parts.len()) };
        cvt(r as isize).map(|n| n as usize).map_err(TapIoError::from_io)
    }

    /// A control socket in the TAP's namespace (MTU, MAC, up/down).
    pub fn link(&self) -> Result<LinkCtl, LinkError> {
        LinkCtl::new(self.netns())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // Removing the name is enough: the namespace itself goes when its last user (this TAP's
        // fd, closed right after) is gone.
        if let Some(ns) = &self.owned_netns
            && let Err(e) = netns::delete(ns)
        {
            tracing::warn!("TAP {}: cannot delete netns {ns}: {e}", self.at.name);
        }
    }
}

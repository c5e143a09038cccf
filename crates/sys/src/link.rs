//! Interface properties through the classic `SIOC*IF*` ioctls, on a datagram socket created in
//! the interface's network namespace (an ioctl acts on the namespace its socket lives in).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::cvt;
use crate::ifname::{IfNameError, to_ifr_name};
use crate::netns::{self, NetnsError};

/// An interface, and the namespace it is looked up in (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfRef {
    pub name: String,
    pub netns: Option<String>,
}

impl fmt::Display for IfRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.netns {
            Some(ns) => write!(f, "{} (netns {ns})", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{op}: {source}")]
    Name { op: &'static str, source: IfNameError },
    #[error("{at}: {op}: no such interface")]
    NoSuchInterface { at: IfRef, op: &'static str },
    #[error("{at}: SIOCSIFMTU: the kernel refuses MTU {mtu}: {source}")]
    MtuRefused { at: IfRef, mtu: u32, source: io::Error },
    #[error("{at}: {op}: {source}")]
    Os { at: IfRef, op: &'static str, source: io::Error },
    #[error("cannot open a control socket: {0}")]
    Socket(io::Error),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// Interface flags (`IFF_*` from `SIOCGIFFLAGS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFlags(pub u32);

impl LinkFlags {
    pub fn up(self) -> bool {
        self.0 & libc::IFF_UP as u32 != 0
    }
    pub fn running(self) -> bool {
        self.0 & libc::IFF_RUNNING as u32 != 0
    }
    pub fn promisc(self) -> bool {
        self.0 & libc::IFF_PROMISC as u32 != 0
    }
}

/// A control socket bound to one network namespace, for interface ioctls.
#[derive(Debug)]
pub struct LinkCtl {
    sock: OwnedFd,
    netns: Option<String>,
}

impl LinkCtl {
    /// Opens a control socket in `netns` (None: this thread's namespace).
    pub fn new(netns: Option<&str>) -> Result<LinkCtl, LinkError> {
        let sock = netns::run_in_opt(netns, || {
            // SAFETY: plain socket(2); the result is checked and owned below.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            // SAFETY: fd is a fresh, valid descriptor we own.
            cvt(fd).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        })?
        .map_err(LinkError::Socket)?;
        Ok(LinkCtl { sock, netns: netns.map(str::to_string) })
    }

    fn at(&self, name: &str) -> IfRef {
        IfRef { name: name.to_string(), netns: self.netns.clone() }
    }

    fn ioctl(&self, name: &str, op: &'static str, req: libc::c_ulong, ifr: &mut libc::ifreq) -> Result<(), LinkError> {
        // SAFETY: `ifr` is a valid, initialised ifreq the kernel reads/writes for these requests.
        let r = unsafe { libc::ioctl(self.sock.as_raw_fd(), req as _, ifr as *mut libc::ifreq) };
        cvt(r).map(|_| ()).map_err(|source| match source.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::ENXIO) => LinkError::NoSuchInterface { at: self.at(name), op },
            _ => LinkError::Os { at: self.at(name), op, source },
        })
    }

    fn ifreq(name: &str, op: &'static str) -> Result<libc::ifreq, LinkError> {
        let ifr_name = to_ifr_name(name).map_err(|source| LinkError::Name { op, source })?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = ifr_name;
        Ok(ifr)
    }

    pub fn ifindex(&self, name: &str) -> Result<u32, LinkError> {
        let mut ifr = Self::ifreq(name, "SIOCGIFINDEX")?;
        self.ioctl(name, "SIOCGIFINDEX", libc::SIOCGIFINDEX, &mut ifr)?;
        // SAFETY: SIOCGIFINDEX filled the ifindex member.
        Ok(unsafe { ifr.ifr_ifru.ifru_ifindex } as u32)
    }

    pub fn mtu(&self, name: &str) -> Result<u32, LinkError> {
        let mut ifr = Self::ifreq(name, "SIOCGIFMTU")?;
        self.ioctl(name, "SIOCGIFMTU", libc::SIOCGIFMTU, &mut ifr)?;
        // SAFETY: SIOCGIFMTU filled the mtu member.
        Ok(unsafe { ifr.ifr_ifru.ifru_mtu } as u32)
    }

    /// Sets the MTU; one the device refuses (out of its range) is [`LinkError::MtuRefused`].
    pub fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), LinkError> {
        let mut ifr = Self::ifreq(name, "SIOCSIFMTU")?;
        let Ok(value) = i32::try_from(mtu) else {
            return Err(LinkError::MtuRefused {
                at: self.at(name),
                mtu,
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        };
        ifr.ifr_ifru.ifru_mtu = value;
        match self.ioctl(name, "SIOCSIFMTU", libc::SIOCSIFMTU, &mut ifr) {
            Err(LinkError::Os { at, source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                Err(LinkError::MtuRefused { at, mtu, source })
            }
            other => other,
        }
    }

    pub fn mac(&self, name: &str) -> Result<[u8; 6], LinkError> {
        let mut ifr = Self::ifreq(name, "SIOCGIFHWADDR")?;
        self.ioctl(name, "SIOCGIFHWADDR", libc::SIOCGIFHWADDR, &mut ifr)?;
        // SAFETY: SIOCGIFHWADDR filled the hwaddr member.
        let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
        let mut mac = [0u8; 6];
        for (m, d) in mac.iter_mut().zip(data) {
            *m = d as u8;
        }
        Ok(mac)
    }

    pub fn set_mac(&self, name: &str, mac: [u8; 6]) -> Result<(), LinkError> {
        let mut ifr = Self::ifreq(name, "SIOCSIFHWADDR")?;
        // SAFETY: sockaddr is plain old data; all-zero is valid.
        let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
        sa.sa_family = libc::ARPHRD_ETHER;
        for (d, m) in sa.sa_data.iter_mut().zip(mac) {
            *d = m as libc::c_char;
        }
        ifr.ifr_ifru.ifru_hwaddr = sa;
        self.ioctl(name, "SIOCSIFHWADDR", libc::SIOCSIFHWADDR, &mut ifr)
    }

    /// How many receive queues the interface has (ethtool's channels: RX-only plus combined).
    /// A driver without channel information (no `ETHTOOL_GCHANNELS`) counts as one queue.
    pub fn rx_queues(&self, name: &str) -> Result<u32, LinkError> {
        #[repr(C)]
        #[derive(Default)]
        struct EthtoolChannels {
            cmd: u32,
            max_rx: u32,
            max_tx: u32,
            max_other: u32,
            max_combined: u32,
            rx_count: u32,
            tx_count: u32,
            other_count: u32,
            combined_count: u32,
        }
        const ETHTOOL_GCHANNELS: u32 = 0x3c;
        let mut channels = EthtoolChannels { cmd: ETHTOOL_GCHANNELS, ..EthtoolChannels::default() };
        let mut ifr = Self::ifreq(name, "SIOCETHTOOL")?;
        // The kernel reads the command from and writes the counts into `channels`, alive until
        // the call returns.
        ifr.ifr_ifru.ifru_data = (&mut channels as *mut EthtoolChannels).cast();
        match self.ioctl(name, "SIOCETHTOOL (ETHTOOL_GCHANNELS)", libc::SIOCETHTOOL, &mut ifr) {
            Ok(()) => Ok((channels.rx_count + channels.combined_count).max(1)),
            Err(LinkError::Os { source, .. }) if source.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(1),
            Err(e) => Err(e),
        }
    }

    pub fn flags(&self, name: &str) -> Result<LinkFlags, LinkError> {
        let mut ifr = Self::ifreq(name, "SIOCGIFFLAGS")?;
        self.ioctl(name, "SIOCGIFFLAGS", libc::SIOCGIFFLAGS, &mut ifr)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        Ok(LinkFlags(unsafe { ifr.ifr_ifru.ifru_flags } as u16 as u32))
    }

    pub fn set_up(&self, name: &str, up: bool) -> Result<(), LinkError> {
        let mut ifr = Self::ifreq(name, "SIOCGIFFLAGS")?;
        self.ioctl(name, "SIOCGIFFLAGS", libc::SIOCGIFFLAGS, &mut ifr)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member; we modify and write it back.
        unsafe {
            if up {
                ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            } else {
                ifr.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short);
            }
        }
        self.ioctl(name, "SIOCSIFFLAGS", libc::SIOCSIFFLAGS, &mut ifr)
    }
}

impl AsRawFd for LinkCtl {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }
}

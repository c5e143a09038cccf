//! The errors the data path's API returns. Errors of the layers below (TAPs, packet sockets,
//! links, the vhost-user server) are carried as typed sources, never flattened into strings.

use vmq_core::VlanMode;
use vmq_sys::link::LinkError;
use vmq_sys::packet::PacketError;
use vmq_sys::tap::TapError;
use vmq_vhost::server::ServerError;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("port {0:?} is configured twice")]
    DuplicatePort(String),
    #[error("no port named {0:?}")]
    NoSuchPort(String),
    #[error("port {port:?}: {kind} ports are not supported by this build of the data path yet")]
    Unsupported { port: String, kind: &'static str },
    #[error("port {0:?} has no sink attached")]
    NotAttached(String),
    #[error("port {port:?} names uplink {uplink:?}, which is not an uplink port")]
    BadUplink { port: String, uplink: String },
    #[error("port {0} has no VM queue")]
    NoQueue(u16),
    #[error("workers must be at least 1")]
    NoWorkers,
    #[error("too many ports (at most {0})")]
    TooManyPorts(usize),
    #[error("MTU {mtu} is outside {min}..={max}")]
    InvalidMtu { mtu: u16, min: u16, max: u16 },
    #[error("invalid VLAN setting {0:?}")]
    InvalidVlan(VlanMode),
    #[error("queue budget {requested} exceeds the {max} VM queues the uplinks have")]
    QueueBudget { requested: u16, max: u16 },
    #[error("port {port:?}: this data path has no backends for run-time ports")]
    NoBackends { port: String },
    /// A backend could not attach the port or apply a change to it.
    #[error("port {port:?}: {source}")]
    Backend {
        port: String,
        #[source]
        source: BackendError,
    },
    #[error("port {port:?}: guest MAC change to {mac} refused: {reason}")]
    MacChangeRefused { port: String, mac: vmq_wire::MacAddr, reason: vmq_core::guest::MacChangeRefused },
    #[error("port {0:?} is not a VM port: it has no guest receive filter")]
    NotAVmPort(String),
    #[error("cannot start worker thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Why a backend could not attach a port, or apply a run-time change to it.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("a vhost-user port needs a MAC")]
    VhostNeedsMac,
    #[error("vhost-user service unavailable")]
    VhostServiceUnavailable,
    #[error("the vhost-user service thread is gone")]
    VhostServiceGone,
    #[error("the vhost-user service did not answer")]
    VhostServiceTimeout,
    #[error("{0}")]
    Vhost(#[source] ServerError),
    #[error("{0}")]
    Tap(#[source] TapError),
    #[error("{0}")]
    Packet(#[source] PacketError),
    #[error("{0}")]
    Link(#[source] LinkError),
    #[error("AF_XDP uplink: {0}")]
    AfXdp(#[source] crate::afxdp::AfXdpError),
}

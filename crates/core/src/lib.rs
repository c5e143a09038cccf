//! vmq's sans-IO core: every forwarding decision, with no threads, no syscalls and an injected
//! clock, so that all of it is unit-testable without a kernel.
#![forbid(unsafe_code)]

pub mod fdb;
pub mod guest;
pub mod port;
pub mod rxfilter;
pub mod stats;
pub mod switch;
pub mod vmq;

pub use port::GuestPolicy;
pub use port::{
    Mode, OffloadCaps, PortBackend, PortConfig, PortId, PortKind, PortSpec, SocketPolicy, VhostMode, VlanMode,
};
pub use port::{UplinkDriver, UplinkDriverKind, XdpAttachMode, XdpQueues, ZeroCopyMode};
pub use stats::{DropReason, PortStats};

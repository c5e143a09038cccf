//! Zero-copy views over Ethernet frames and the virtio-net header, in the style of smoltcp's
//! `wire` module: `Packet<T: AsRef<[u8]>>` views that check lengths once and then read fields,
//! plus plain `Repr` values for building headers. Pure: no I/O, no allocation on the hot path.
#![forbid(unsafe_code)]

pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ip;
pub mod vlan;
pub mod vnet;

pub use ethernet::{L2Info, MacAddr, parse_l2};
pub use vnet::{GsoType, VnetHdr, VnetHdrError};

/// Errors from parsing outside input. Every parse failure maps to one of these; none panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("buffer too short for the header")]
    Truncated,
    #[error("malformed header field")]
    Malformed,
    #[error("unsupported encapsulation")]
    Unsupported,
}

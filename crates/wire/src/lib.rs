//! Frame bytes, read and edited in one place: the Ethernet header (`parse_l2`, an EtherType
//! probe), 802.1Q tag probes and edits (`vlan`, zero-copy as borrowed slices or by one copy),
//! IP/TCP/UDP header location and field access (`ip`), the Internet checksum, and the
//! virtio-net header (`VnetHdr`, its one parsed value). Functions over plain byte slices at
//! fixed offsets, checking lengths rather than panicking, as the per-frame path needs. Pure: no
//! I/O, no allocation on the hot path.
#![forbid(unsafe_code)]

pub mod checksum;
pub mod ethernet;
pub mod flow;
pub mod ip;
pub mod rarp;
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

//! Offload resolution for frames that carry a virtio-net header: what egress must do for a
//! receiver's capabilities (pass, finish a checksum, segment), software TSO/GSO and receive
//! coalescing (RSC/LRO). Pure functions over byte slices: no I/O, no allocation per frame beyond
//! caller-provided scratch buffers.
#![forbid(unsafe_code)]

/// What a port's receiver can take in the virtio-net header (what the guest/TAP negotiated).
/// Decides how the core resolves a frame's offload state at egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OffloadCaps {
    /// Accepts frames with a partial checksum (`NEEDS_CSUM`) (virtio GUEST_CSUM).
    pub csum: bool,
    /// Accepts TCPv4 GSO frames (GUEST_TSO4).
    pub tso4: bool,
    /// Accepts TCPv6 GSO frames (GUEST_TSO6).
    pub tso6: bool,
    /// Accepts GSO frames with the ECN bit (GUEST_ECN).
    pub ecn: bool,
}

impl OffloadCaps {
    pub const NONE: OffloadCaps = OffloadCaps { csum: false, tso4: false, tso6: false, ecn: false };
    pub const ALL: OffloadCaps = OffloadCaps { csum: true, tso4: true, tso6: true, ecn: true };

    /// Can the receiver take TCP GSO frames at all (and so coalesced ones)?
    pub fn accepts_gso(&self) -> bool {
        self.csum && (self.tso4 || self.tso6)
    }
}

mod coalesce;
mod segment;

pub use coalesce::Coalescer;
pub use segment::{MAX_SEGMENTS, MIN_GSO_SIZE, segment};

/// Is this frame's `gso_size` one vmq accepts at ingress? Non-GSO frames always are; GSO frames
/// need at least [`MIN_GSO_SIZE`], whether they would be segmented or passed on as they are
/// (a receiving guest or kernel would do the same amplified work).
pub fn gso_size_acceptable(hdr: &VnetHdr) -> bool {
    !hdr.is_gso() || hdr.gso_size >= MIN_GSO_SIZE
}

use vmq_wire::VnetHdr;
use vmq_wire::checksum::{fold, sum};
use vmq_wire::vnet::{FLAG_DATA_VALID, FLAG_NEEDS_CSUM, GSO_ECN, GsoType};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("GSO type is not TCP")]
    NotTcp,
    #[error("headers vmq does not segment (IP fragments, IPv6 extension headers it cannot skip, UDP GSO)")]
    Unsupported,
    #[error("headers do not match the virtio-net header or the frame length")]
    Malformed,
    #[error("gso_size too small for the frame: too many segments")]
    TooManySegments,
    #[error("gso_size below the minimum vmq accepts (MIN_GSO_SIZE)")]
    GsoSizeTooSmall,
}

/// What egress must do for a frame with header `hdr` toward a receiver that accepts `caps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressPlan {
    /// Deliver unchanged (also GSO frames to a receiver that takes them).
    AsIs,
    /// Compute the partial checksum in software.
    FinishCsum,
    /// Cut into MSS-sized segments in software.
    Segment,
}

/// Cheap: decides from the header alone.
pub fn plan_egress(hdr: &VnetHdr, caps: OffloadCaps) -> EgressPlan {
    if hdr.is_gso() {
        let ecn_ok = hdr.gso_type & GSO_ECN == 0 || caps.ecn;
        let takes = match hdr.gso() {
            Some(GsoType::TcpV4) => caps.tso4,
            Some(GsoType::TcpV6) => caps.tso6,
            _ => false,
        };
        if takes && caps.csum && ecn_ok { EgressPlan::AsIs } else { EgressPlan::Segment }
    } else if hdr.needs_csum() && !caps.csum {
        EgressPlan::FinishCsum
    } else {
        EgressPlan::AsIs
    }
}

/// Finishes a partial checksum in place: the field at `csum_start + csum_offset` holds the
/// pseudo-header sum (virtio/Linux convention); the one's complement sum from `csum_start` to the
/// end of the frame goes there. Clears NEEDS_CSUM and sets DATA_VALID.
pub fn finish_csum(hdr: &mut VnetHdr, frame: &mut [u8]) -> Result<(), OffloadError> {
    if !hdr.needs_csum() {
        return Ok(());
    }
    let start = hdr.csum_start as usize;
    let field = start + hdr.csum_offset as usize;
    if field + 2 > frame.len() {
        return Err(OffloadError::Malformed);
    }
    let mut c = !fold(sum(&frame[start..], 0));
    // A UDP checksum of 0 means "none": send 0xffff, its equal in one's complement.
    if c == 0 {
        c = 0xffff;
    }
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    hdr.flags = (hdr.flags & !FLAG_NEEDS_CSUM) | FLAG_DATA_VALID;
    hdr.csum_start = 0;
    hdr.csum_offset = 0;
    Ok(())
}

/// Verifies a complete transport checksum (for frames that arrive without DATA_VALID).
pub(crate) fn transport_csum_ok(frame: &[u8], layers: &vmq_wire::ip::Layers) -> bool {
    let end = layers.l4 + layers.l4_len(frame);
    let Some(l4) = frame.get(layers.l4..end) else {
        return false;
    };
    let s = sum(l4, layers.pseudo_header(frame, l4.len()));
    fold(s) == 0xffff
}

/// For a GSO frame, the length of its largest segment on the wire (real headers + gso_size),
/// which is what an MTU limits; None for other frames. Computed from the headers themselves:
/// `hdr_len` from a guest is only a hint (drivers get it wrong). A GSO frame whose headers
/// cannot be parsed counts at its full length.
pub fn gso_segment_len(hdr: &VnetHdr, frame: &[u8]) -> Option<usize> {
    gso_segment_len_in(hdr, frame, frame.len())
}

/// [`gso_segment_len`] for a frame of `frame_len` bytes whose head is `frame`.
pub fn gso_segment_len_in(hdr: &VnetHdr, frame: &[u8], frame_len: usize) -> Option<usize> {
    if !hdr.is_gso() {
        return None;
    }
    Some(match vmq_wire::ip::locate_in(frame, frame_len) {
        Ok(l) => (l.payload + usize::from(hdr.gso_size)).min(frame_len),
        Err(_) => frame_len,
    })
}

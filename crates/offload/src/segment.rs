//! Software TSO/GSO for TCP over IPv4 and IPv6.

use vmq_wire::VnetHdr;
use vmq_wire::checksum::{fold, sum};
use vmq_wire::ip::{PROTO_TCP, TCP_CWR, TCP_FIN, TCP_PSH, locate};
use vmq_wire::vnet::{FLAG_DATA_VALID, FLAG_NEEDS_CSUM, GsoType};

use crate::OffloadError;

/// Smallest `gso_size` (segment payload) vmq accepts. A guest chooses it freely, and each
/// segment costs vmq a header copy and a delivery: at 16 bytes one 64 KiB frame became 4096
/// frames. 88 is Linux's `TCP_MIN_MSS` (include/net/tcp.h), the smallest MSS a Linux socket can
/// be set to; every real path has an MSS of at least 536 (IPv4's 576-byte minimum datagram,
/// RFC 879/1122) or 1220 (IPv6's 1280-byte minimum MTU). Only a peer that advertises an MSS near
/// Linux's own floor for peers (`net.ipv4.tcp_min_snd_mss`, 48, a CVE-2019-11479 defence) makes
/// a guest build smaller segments: such frames are dropped and counted (`offload`).
pub const MIN_GSO_SIZE: u16 = 88;

/// Most segments one GSO frame may produce (64 KiB at [`MIN_GSO_SIZE`]).
pub const MAX_SEGMENTS: usize = 65_536usize.div_ceil(MIN_GSO_SIZE as usize);

/// Cuts a TCP GSO frame into MSS-sized segments: sequence numbers advance by payload, IPv4 ids
/// by one per segment, IP lengths and checksums are rewritten, FIN/PSH stay on the last segment
/// only and CWR on the first only. With `partial_csum_ok` the TCP checksum is left partial
/// (NEEDS_CSUM, pseudo-header sum in the field) for a receiver that accepts that; otherwise it
/// is complete. Each segment is built in `scratch` and passed to `emit`. Returns the count.
pub fn segment(
    hdr: &VnetHdr,
    frame: &[u8],
    partial_csum_ok: bool,
    scratch: &mut Vec<u8>,
    emit: &mut dyn FnMut(&VnetHdr, &[u8]),
) -> Result<usize, OffloadError> {
    let want_v6 = match hdr.gso() {
        Some(GsoType::TcpV4) => false,
        Some(GsoType::TcpV6) => true,
        Some(GsoType::None) | None => return Err(OffloadError::Malformed),
        Some(_) => return Err(OffloadError::NotTcp),
    };
    let layers = locate(frame).map_err(|e| match e {
        vmq_wire::WireError::Unsupported => OffloadError::Unsupported,
        _ => OffloadError::Malformed,
    })?;
    if layers.proto != PROTO_TCP || layers.ipv6 != want_v6 {
        return Err(OffloadError::Malformed);
    }
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(OffloadError::Malformed);
    }
    if hdr.gso_size < MIN_GSO_SIZE {
        return Err(OffloadError::GsoSizeTooSmall);
    }
    let end = layers.l4 + layers.l4_len(frame);
    if end > frame.len() || end < layers.payload {
        return Err(OffloadError::Malformed);
    }
    let headers = &frame[..layers.payload];
    let payload = &frame[layers.payload..end];
    let count = payload.len().div_ceil(mss).max(1);
    if count > MAX_SEGMENTS {
        return Err(OffloadError::TooManySegments);
    }
    let seq0 = layers.tcp_seq(frame);
    let id0 = if layers.ipv6 { 0 } else { layers.ipv4_id(frame) };
    let flags0 = layers.tcp_flags(frame);
    let tcp_hdr_len = layers.payload - layers.l4;
    for i in 0..count {
        let chunk = payload.get(i * mss..((i + 1) * mss).min(payload.len())).unwrap_or(&[]);
        scratch.clear();
        scratch.extend_from_slice(headers);
        scratch.extend_from_slice(chunk);
        let l4_len = tcp_hdr_len + chunk.len();
        if !layers.ipv6 {
            layers.set_ipv4_id(scratch, id0.wrapping_add(i as u16));
        }
        layers.set_ip_len(scratch, l4_len);
        layers.set_tcp_seq(scratch, seq0.wrapping_add((i * mss) as u32));
        let mut flags = flags0;
        if i != 0 {
            flags &= !TCP_CWR;
        }
        if i + 1 != count {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        layers.set_tcp_flags(scratch, flags);
        let csum_at = layers.l4 + 16;
        let pseudo = layers.pseudo_header(scratch, l4_len);
        let mut out = VnetHdr::default();
        if partial_csum_ok {
            scratch[csum_at..csum_at + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
            out.flags = FLAG_NEEDS_CSUM;
            out.csum_start = layers.l4 as u16;
            out.csum_offset = 16;
        } else {
            scratch[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
            let c = !fold(sum(&scratch[layers.l4..], pseudo));
            scratch[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
            out.flags = FLAG_DATA_VALID;
        }
        emit(&out, scratch);
    }
    Ok(count)
}

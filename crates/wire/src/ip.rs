//! IPv4, IPv6 and TCP/UDP header location and field access, enough for checksum offload,
//! segmentation and coalescing. `locate` finds the layers once; the accessors then read and
//! write fields at known offsets.

use crate::WireError;
use crate::ethernet::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, HEADER_LEN, ethertype_and_l3, parse_l2};

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;
pub const TCP_ECE: u8 = 0x40;
pub const TCP_CWR: u8 = 0x80;

/// Where the headers of an IP frame are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layers {
    /// Offset of the IP header.
    pub l3: usize,
    pub ipv6: bool,
    /// Offset of the transport header.
    pub l4: usize,
    /// Transport protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Offset of the payload after the TCP header (TCP only; else `l4`).
    pub payload: usize,
}

fn be16(b: &[u8], at: usize) -> Result<u16, WireError> {
    b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]])).ok_or(WireError::Truncated)
}

/// Shortest frame [`looks_like_tcp`] accepts: Ethernet, IPv4 and TCP headers without options.
pub const MIN_TCP_FRAME_LEN: usize = HEADER_LEN + 20 + 20;

/// Cheap probe: an IPv4 or IPv6 frame (behind at most one 802.1Q tag) of at least
/// [`MIN_TCP_FRAME_LEN`] bytes whose IP header names TCP as its protocol (IPv6: as its first
/// next header). It reads those fields and validates nothing else; [`locate`] does.
#[inline]
pub fn looks_like_tcp(frame: &[u8]) -> bool {
    if frame.len() < MIN_TCP_FRAME_LEN {
        return false;
    }
    match ethertype_and_l3(frame) {
        Some((ETHERTYPE_IPV4, l3)) => frame.get(l3 + 9) == Some(&PROTO_TCP),
        Some((ETHERTYPE_IPV6, l3)) => frame.get(l3 + 6) == Some(&PROTO_TCP),
        _ => false,
    }
}

/// Finds the IP and transport headers of an Ethernet frame. IPv6 hop-by-hop, routing and
/// destination-options headers are skipped; fragments, AH, ESP and unknown headers give
/// `Unsupported` (such frames are passed as is, never offloaded).
pub fn locate(frame: &[u8]) -> Result<Layers, WireError> {
    locate_in(frame, frame.len())
}

/// [`locate`] for a frame of `frame_len` bytes of which `frame` is a prefix (its head): lengths
/// are checked against `frame_len`, headers are read from `frame` (one beyond it is `Truncated`).
pub fn locate_in(frame: &[u8], frame_len: usize) -> Result<Layers, WireError> {
    let l2 = parse_l2(frame)?;
    let l3 = l2.header_len;
    let (ipv6, l4, proto) = match l2.ethertype {
        ETHERTYPE_IPV4 => {
            let vihl = *frame.get(l3).ok_or(WireError::Truncated)?;
            if vihl >> 4 != 4 {
                return Err(WireError::Malformed);
            }
            let ihl = usize::from(vihl & 0xf) * 4;
            if ihl < 20 {
                return Err(WireError::Malformed);
            }
            let total = usize::from(be16(frame, l3 + 2)?);
            if total < ihl || l3 + total > frame_len {
                return Err(WireError::Malformed);
            }
            let frag = be16(frame, l3 + 6)?;
            if frag & 0x3fff != 0 {
                return Err(WireError::Unsupported); // a fragment: no L4 header to work on
            }
            (false, l3 + ihl, frame[l3 + 9])
        }
        ETHERTYPE_IPV6 => {
            if frame.len() < l3 + 40 {
                return Err(WireError::Truncated);
            }
            if frame[l3] >> 4 != 6 {
                return Err(WireError::Malformed);
            }
            let payload_len = usize::from(be16(frame, l3 + 4)?);
            if l3 + 40 + payload_len > frame_len {
                return Err(WireError::Malformed);
            }
            let (proto, l4) = skip_extension_headers(frame, frame[l3 + 6], l3 + 40)?;
            (true, l4, proto)
        }
        _ => return Err(WireError::Unsupported),
    };
    let payload = if proto == PROTO_TCP {
        let off = *frame.get(l4 + 12).ok_or(WireError::Truncated)?;
        let hl = usize::from(off >> 4) * 4;
        if hl < 20 || l4 + hl > frame.len() {
            return Err(WireError::Malformed);
        }
        l4 + hl
    } else if proto == PROTO_UDP {
        if l4 + 8 > frame.len() {
            return Err(WireError::Truncated);
        }
        l4 + 8
    } else {
        l4
    };
    Ok(Layers { l3, ipv6, l4, proto, payload })
}

/// Skips IPv6 extension headers vmq can step over. Returns (protocol, transport offset).
pub fn skip_extension_headers(frame: &[u8], mut next: u8, mut at: usize) -> Result<(u8, usize), WireError> {
    for _ in 0..8 {
        match next {
            0 | 43 | 60 => {
                let nh = *frame.get(at).ok_or(WireError::Truncated)?;
                let len = (usize::from(*frame.get(at + 1).ok_or(WireError::Truncated)?) + 1) * 8;
                next = nh;
                at += len;
                if at > frame.len() {
                    return Err(WireError::Truncated);
                }
            }
            44 | 50 | 51 | 59 => return Err(WireError::Unsupported),
            _ => return Ok((next, at)),
        }
    }
    Err(WireError::Unsupported)
}

impl Layers {
    /// Length of the IP payload as the IP header says (IPv4 total − IHL; IPv6 payload length
    /// minus skipped extension headers).
    pub fn l4_len(&self, frame: &[u8]) -> usize {
        if self.ipv6 {
            let pl = usize::from(u16::from_be_bytes([frame[self.l3 + 4], frame[self.l3 + 5]]));
            (self.l3 + 40 + pl).saturating_sub(self.l4)
        } else {
            let total = usize::from(u16::from_be_bytes([frame[self.l3 + 2], frame[self.l3 + 3]]));
            (self.l3 + total).saturating_sub(self.l4)
        }
    }

    /// Pseudo-header partial sum for the transport checksum with transport length `l4_len`.
    pub fn pseudo_header(&self, frame: &[u8], l4_len: usize) -> u32 {
        let l3 = self.l3;
        if self.ipv6 {
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&frame[l3 + 8..l3 + 24]);
            dst.copy_from_slice(&frame[l3 + 24..l3 + 40]);
            crate::checksum::pseudo_header_v6(src, dst, self.proto, l4_len as u32)
        } else {
            let mut src = [0u8; 4];
            let mut dst = [0u8; 4];
            src.copy_from_slice(&frame[l3 + 12..l3 + 16]);
            dst.copy_from_slice(&frame[l3 + 16..l3 + 20]);
            crate::checksum::pseudo_header_v4(src, dst, self.proto, l4_len as u16)
        }
    }

    /// Sets the IP length fields for an IP packet whose transport part is `l4_len` bytes, and
    /// (IPv4) recomputes the header checksum.
    pub fn set_ip_len(&self, frame: &mut [u8], l4_len: usize) {
        let l3 = self.l3;
        if self.ipv6 {
            let pl = (self.l4 - (l3 + 40) + l4_len) as u16;
            frame[l3 + 4..l3 + 6].copy_from_slice(&pl.to_be_bytes());
        } else {
            let total = (self.l4 - l3 + l4_len) as u16;
            frame[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            self.fill_ipv4_checksum(frame);
        }
    }

    pub fn fill_ipv4_checksum(&self, frame: &mut [u8]) {
        if self.ipv6 {
            return;
        }
        let l3 = self.l3;
        frame[l3 + 10] = 0;
        frame[l3 + 11] = 0;
        let c = crate::checksum::checksum(&frame[l3..self.l4]);
        frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }

    pub fn ipv4_id(&self, frame: &[u8]) -> u16 {
        u16::from_be_bytes([frame[self.l3 + 4], frame[self.l3 + 5]])
    }

    pub fn set_ipv4_id(&self, frame: &mut [u8], id: u16) {
        frame[self.l3 + 4..self.l3 + 6].copy_from_slice(&id.to_be_bytes());
    }

    pub fn tcp_seq(&self, frame: &[u8]) -> u32 {
        u32::from_be_bytes([frame[self.l4 + 4], frame[self.l4 + 5], frame[self.l4 + 6], frame[self.l4 + 7]])
    }

    pub fn set_tcp_seq(&self, frame: &mut [u8], seq: u32) {
        frame[self.l4 + 4..self.l4 + 8].copy_from_slice(&seq.to_be_bytes());
    }

    pub fn tcp_flags(&self, frame: &[u8]) -> u8 {
        frame[self.l4 + 13]
    }

    pub fn set_tcp_flags(&self, frame: &mut [u8], flags: u8) {
        frame[self.l4 + 13] = flags;
    }

    /// Offset of the transport checksum field (TCP 16, UDP 6), if TCP or UDP.
    pub fn l4_csum_offset(&self) -> Option<usize> {
        match self.proto {
            PROTO_TCP => Some(16),
            PROTO_UDP => Some(6),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp4(payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1000, 2000, 77, 4096)
            .ack(5);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn locates_tcp4_and_fields() {
        let f = tcp4(&[1, 2, 3]);
        let l = locate(&f).unwrap();
        assert_eq!((l.l3, l.l4, l.payload, l.proto, l.ipv6), (14, 34, 54, PROTO_TCP, false));
        assert_eq!(l.tcp_seq(&f), 77);
        assert_eq!(l.l4_len(&f), 23);
        assert_eq!(l.tcp_flags(&f) & TCP_ACK, TCP_ACK);
    }

    #[test]
    fn tcp_probe_sees_tcp_over_ipv4_ipv6_and_one_tag() {
        let f = tcp4(&[]);
        assert!(looks_like_tcp(&f));
        assert!(!looks_like_tcp(&f[..MIN_TCP_FRAME_LEN - 1]), "shorter than any TCP frame");
        let tagged = crate::vlan::push_parts(&f, &crate::vlan::tag(5)).unwrap().concat();
        assert!(looks_like_tcp(&tagged));
        let mut udp = f.clone();
        udp[14 + 9] = PROTO_UDP;
        assert!(!looks_like_tcp(&udp));
        let b = etherparse::PacketBuilder::ethernet2([2; 6], [4; 6]).ipv6([1; 16], [2; 16], 64).tcp(1, 2, 3, 4);
        let mut v6 = Vec::new();
        b.write(&mut v6, &[]).unwrap();
        assert!(looks_like_tcp(&v6));
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(!looks_like_tcp(&arp));
    }

    #[test]
    fn ipv6_extension_headers() {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6([1; 16], [2; 16], 64)
            .udp(1, 2);
        let mut f = Vec::new();
        b.write(&mut f, &[9; 10]).unwrap();
        let l = locate(&f).unwrap();
        assert_eq!((l.l4, l.proto, l.payload), (54, PROTO_UDP, 62));
        // Insert a hop-by-hop header (8 bytes) before UDP.
        let mut g = f.clone();
        g[20] = 0; // next header = hop-by-hop
        g.splice(54..54, [PROTO_UDP, 0, 1, 4, 0, 0, 0, 0]);
        let pl = u16::from_be_bytes([g[18], g[19]]) + 8;
        g[18..20].copy_from_slice(&pl.to_be_bytes());
        let l = locate(&g).unwrap();
        assert_eq!((l.l4, l.proto), (62, PROTO_UDP));
        // A fragment header is not offloadable.
        g[54] = 0;
        g[20] = 44;
        assert_eq!(locate(&g), Err(WireError::Unsupported));
    }

    proptest::proptest! {
        #[test]
        fn locate_never_panics(mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..120), v6 in proptest::bool::ANY) {
            if bytes.len() > 14 {
                bytes[12] = if v6 { 0x86 } else { 0x08 };
                bytes[13] = if v6 { 0xdd } else { 0x00 };
                bytes[14] = if v6 { 0x60 } else { 0x45 };
            }
            if let Ok(l) = locate(&bytes) {
                let _ = l.l4_len(&bytes);
                let _ = l.pseudo_header(&bytes, 10);
            }
        }
    }
}

//! Ethernet II: MAC addresses, EtherTypes, and the fixed-offset header reads every frame gets.

use core::fmt;
use core::str::FromStr;

use crate::WireError;

/// A 48-bit Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// Reads a MAC address from the first six bytes of `bytes`, if there are six.
    pub fn from_bytes(bytes: &[u8]) -> Option<MacAddr> {
        bytes.get(..6).map(|b| MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]]))
    }

    pub fn is_broadcast(&self) -> bool {
        self.0 == [0xff; 6]
    }

    /// Group bit set: broadcast or multicast.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    pub fn is_unicast(&self) -> bool {
        !self.is_multicast()
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// The address as a u64 (big-endian in the low 48 bits), handy as a hash key.
    pub fn to_u64(&self) -> u64 {
        let b = self.0;
        u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error for a MAC address string that is not six colon-separated hex octets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex octets like 52:54:00:12:34:56")]
pub struct ParseMacError(pub String);

impl FromStr for MacAddr {
    type Err = ParseMacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// 802.1ad service tag (QinQ) and the legacy pre-standard QinQ TPIDs: not handled by vmq.
pub const ETHERTYPE_QINQ: [u16; 3] = [0x88a8, 0x9100, 0x9200];
pub const HEADER_LEN: usize = 14;
pub const TAGGED_HEADER_LEN: usize = 18;

/// What the switch needs from an Ethernet header, read at fixed offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Info {
    pub dst: MacAddr,
    pub src: MacAddr,
    /// VID of a single 802.1Q tag (0 for a priority tag).
    pub vlan: Option<u16>,
    pub pcp: u8,
    /// EtherType after the tag, if any.
    pub ethertype: u16,
    /// 14, or 18 with a tag.
    pub header_len: usize,
}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parses the Ethernet header (and one 802.1Q tag). Hand-written, fixed offsets, no allocation:
/// it runs for every frame. Stacked tags and service tags are `Unsupported`.
#[inline]
pub fn parse_l2(frame: &[u8]) -> Result<L2Info, WireError> {
    if frame.len() < HEADER_LEN {
        return Err(WireError::Truncated);
    }
    let mut dst = [0u8; 6];
    let mut src = [0u8; 6];
    dst.copy_from_slice(&frame[..6]);
    src.copy_from_slice(&frame[6..12]);
    let outer = be16(frame, 12);
    if ETHERTYPE_QINQ.contains(&outer) {
        return Err(WireError::Unsupported);
    }
    if outer != ETHERTYPE_VLAN {
        return Ok(L2Info {
            dst: MacAddr(dst),
            src: MacAddr(src),
            vlan: None,
            pcp: 0,
            ethertype: outer,
            header_len: HEADER_LEN,
        });
    }
    if frame.len() < TAGGED_HEADER_LEN {
        return Err(WireError::Truncated);
    }
    let tci = be16(frame, 14);
    let inner = be16(frame, 16);
    if inner == ETHERTYPE_VLAN || ETHERTYPE_QINQ.contains(&inner) {
        return Err(WireError::Unsupported);
    }
    Ok(L2Info {
        dst: MacAddr(dst),
        src: MacAddr(src),
        vlan: Some(tci & 0x0fff),
        pcp: (tci >> 13) as u8,
        ethertype: inner,
        header_len: TAGGED_HEADER_LEN,
    })
}

/// The EtherType a frame carries and the offset of what follows it: the outer one, or the one
/// after a single 802.1Q tag. Unlike [`parse_l2`] it reads two fields and judges nothing (a
/// service tag or a second tag comes back as the EtherType); None if the frame is too short.
#[inline]
pub fn ethertype_and_l3(frame: &[u8]) -> Option<(u16, usize)> {
    let outer = u16::from_be_bytes(frame.get(12..HEADER_LEN)?.try_into().ok()?);
    if outer != ETHERTYPE_VLAN {
        return Some((outer, HEADER_LEN));
    }
    let inner = u16::from_be_bytes(frame.get(16..TAGGED_HEADER_LEN)?.try_into().ok()?);
    Some((inner, TAGGED_HEADER_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tpids: &[(u16, u16)], ethertype: u16) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        for (tpid, tci) in tpids {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.resize(f.len() + 46, 0);
        f
    }

    #[test]
    fn parses_untagged_and_tagged_like_etherparse() {
        let f = frame(&[], ETHERTYPE_IPV4);
        let l2 = parse_l2(&f).unwrap();
        assert_eq!((l2.vlan, l2.ethertype, l2.header_len), (None, ETHERTYPE_IPV4, 14));
        let f = frame(&[(ETHERTYPE_VLAN, (5 << 13) | 42)], ETHERTYPE_IPV6);
        let l2 = parse_l2(&f).unwrap();
        assert_eq!((l2.vlan, l2.pcp, l2.ethertype, l2.header_len), (Some(42), 5, ETHERTYPE_IPV6, 18));
        let (eth, rest) = etherparse::Ethernet2Header::from_slice(&f).unwrap();
        assert_eq!(eth.destination, l2.dst.0);
        assert_eq!(eth.source, l2.src.0);
        let (vlan, _) = etherparse::SingleVlanHeader::from_slice(rest).unwrap();
        assert_eq!(u16::from(vlan.vlan_id), 42);
        assert_eq!(u16::from(vlan.ether_type), l2.ethertype);
    }

    #[test]
    fn rejects_qinq_and_truncation() {
        assert_eq!(parse_l2(&frame(&[(0x88a8, 1), (ETHERTYPE_VLAN, 2)], ETHERTYPE_IPV4)), Err(WireError::Unsupported));
        assert_eq!(
            parse_l2(&frame(&[(ETHERTYPE_VLAN, 1), (ETHERTYPE_VLAN, 2)], ETHERTYPE_IPV4)),
            Err(WireError::Unsupported)
        );
        assert_eq!(parse_l2(&frame(&[(0x9100, 1)], ETHERTYPE_IPV4)), Err(WireError::Unsupported));
        assert_eq!(parse_l2(&[0u8; 13]), Err(WireError::Truncated));
        assert_eq!(parse_l2(&frame(&[(ETHERTYPE_VLAN, 1)], 0)[..16]), Err(WireError::Truncated));
    }

    #[test]
    fn ethertype_probe_reads_through_one_tag_only() {
        assert_eq!(ethertype_and_l3(&frame(&[], ETHERTYPE_IPV6)), Some((ETHERTYPE_IPV6, 14)));
        assert_eq!(ethertype_and_l3(&frame(&[(ETHERTYPE_VLAN, 3)], ETHERTYPE_IPV4)), Some((ETHERTYPE_IPV4, 18)));
        let stacked = frame(&[(ETHERTYPE_VLAN, 1), (ETHERTYPE_VLAN, 2)], ETHERTYPE_IPV4);
        assert_eq!(ethertype_and_l3(&stacked), Some((ETHERTYPE_VLAN, 18)));
        assert_eq!(ethertype_and_l3(&frame(&[(0x88a8, 1)], ETHERTYPE_IPV4)), Some((0x88a8, 14)));
        assert_eq!(ethertype_and_l3(&[0u8; 13]), None);
        assert_eq!(ethertype_and_l3(&frame(&[(ETHERTYPE_VLAN, 1)], 0)[..17]), None);
    }

    proptest::proptest! {
        #[test]
        fn parse_l2_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = parse_l2(&bytes);
            if let (Ok(l2), Some((ethertype, l3))) = (parse_l2(&bytes), ethertype_and_l3(&bytes)) {
                proptest::prop_assert_eq!((l2.ethertype, l2.header_len), (ethertype, l3));
            }
        }
    }
}

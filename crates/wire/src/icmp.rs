//! ICMP errors vmq may generate for frames it cannot forward because of their size:
//! IPv4 "fragmentation needed" (RFC 792/1191) and IPv6 "packet too big" (RFC 4443), quoting as
//! much of the offending packet as the RFCs allow (IPv4: 576-byte result; IPv6: 1280).

use crate::checksum::{checksum, fold, pseudo_header_v6, sum};
use crate::ethernet::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, MacAddr, parse_l2};
use crate::ip::{PROTO_ICMP, PROTO_ICMPV6};

const IPV4_MAX_ERROR: usize = 576;
const IPV6_MIN_MTU: usize = 1280;

/// Builds an untagged Ethernet frame carrying ICMPv4 type 3 code 4 back to the sender of
/// `original` (an Ethernet frame with an IPv4 packet), advertising `mtu`. None if `original`
/// is not IPv4, has DF clear, or is itself an ICMP error (never answer errors with errors).
pub fn frag_needed_v4(original: &[u8], mtu: u16, src_mac: MacAddr, src_ip: [u8; 4]) -> Option<Vec<u8>> {
    let l2 = parse_l2(original).ok()?;
    if l2.ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = original.get(l2.header_len..)?;
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let df = ip[6] & 0x40 != 0;
    if !df || ip.len() < ihl || (ip[9] == PROTO_ICMP && ip.get(ihl).is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12))) {
        return None;
    }
    let quote_len = ip.len().min(IPV4_MAX_ERROR - 20 - 8);
    let mut out = Vec::with_capacity(14 + 28 + quote_len);
    out.extend_from_slice(&l2.src.0);
    out.extend_from_slice(&src_mac.0);
    out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let total = (20 + 8 + quote_len) as u16;
    let mut iph = [0u8; 20];
    iph[0] = 0x45;
    iph[2..4].copy_from_slice(&total.to_be_bytes());
    iph[6] = 0x40;
    iph[8] = 64;
    iph[9] = PROTO_ICMP;
    iph[12..16].copy_from_slice(&src_ip);
    iph[16..20].copy_from_slice(&ip[12..16]);
    let c = checksum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&iph);
    let icmp_at = out.len();
    out.extend_from_slice(&[3, 4, 0, 0, 0, 0]);
    out.extend_from_slice(&mtu.to_be_bytes());
    out.extend_from_slice(&ip[..quote_len]);
    let c = checksum(&out[icmp_at..]);
    out[icmp_at + 2..icmp_at + 4].copy_from_slice(&c.to_be_bytes());
    Some(out)
}

/// ICMPv6 "packet too big" (type 2) back to the sender of `original`, advertising `mtu`.
/// None if `original` is not IPv6 or is an ICMPv6 error.
pub fn packet_too_big_v6(original: &[u8], mtu: u32, src_mac: MacAddr, src_ip: [u8; 16]) -> Option<Vec<u8>> {
    let l2 = parse_l2(original).ok()?;
    if l2.ethertype != ETHERTYPE_IPV6 {
        return None;
    }
    let ip = original.get(l2.header_len..)?;
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return None;
    }
    if ip[6] == PROTO_ICMPV6 && ip.get(40).is_some_and(|t| *t < 128) {
        return None;
    }
    let quote_len = ip.len().min(IPV6_MIN_MTU - 40 - 8);
    let mut dst_ip = [0u8; 16];
    dst_ip.copy_from_slice(&ip[8..24]);
    let mut out = Vec::with_capacity(14 + 48 + quote_len);
    out.extend_from_slice(&l2.src.0);
    out.extend_from_slice(&src_mac.0);
    out.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    let payload_len = (8 + quote_len) as u16;
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(&[PROTO_ICMPV6, 64]);
    out.extend_from_slice(&src_ip);
    out.extend_from_slice(&dst_ip);
    let icmp_at = out.len();
    out.extend_from_slice(&[2, 0, 0, 0]);
    out.extend_from_slice(&mtu.to_be_bytes());
    out.extend_from_slice(&ip[..quote_len]);
    let s = sum(&out[icmp_at..], pseudo_header_v6(src_ip, dst_ip, PROTO_ICMPV6, u32::from(payload_len)));
    let c = !fold(s);
    out[icmp_at + 2..icmp_at + 4].copy_from_slice(&c.to_be_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frag_needed_is_valid_icmp_per_etherparse() {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2);
        let mut f = Vec::new();
        b.write(&mut f, &[0u8; 3000]).unwrap();
        f[20] |= 0x40; // DF
        let fix = {
            let c = checksum(&{
                let mut h = f[14..34].to_vec();
                h[10] = 0;
                h[11] = 0;
                h
            });
            c.to_be_bytes()
        };
        f[24..26].copy_from_slice(&fix);
        let out = frag_needed_v4(&f, 1500, MacAddr([2, 0, 0, 0, 0, 9]), [10, 0, 0, 254]).unwrap();
        assert!(out.len() - 14 <= IPV4_MAX_ERROR);
        let p = etherparse::SlicedPacket::from_ethernet(&out).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!() };
        assert_eq!(ip.header().destination(), [10, 0, 0, 1]);
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        let Some(etherparse::TransportSlice::Icmpv4(icmp)) = &p.transport else { panic!() };
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1500 }
            )
        );
        assert_eq!(icmp.checksum(), icmp.icmp_type().calc_checksum(icmp.payload()));
        // DF clear: no error (the sender would fragment).
        f[20] &= !0x40;
        assert!(frag_needed_v4(&f, 1500, MacAddr([2, 0, 0, 0, 0, 9]), [10, 0, 0, 254]).is_none());
    }

    #[test]
    fn packet_too_big_is_valid_icmpv6_per_etherparse() {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6([1; 16], [2; 16], 64)
            .udp(1, 2);
        let mut f = Vec::new();
        b.write(&mut f, &[0u8; 3000]).unwrap();
        let out = packet_too_big_v6(&f, 1500, MacAddr([2, 0, 0, 0, 0, 9]), [9; 16]).unwrap();
        assert!(out.len() - 14 <= IPV6_MIN_MTU);
        let p = etherparse::SlicedPacket::from_ethernet(&out).unwrap();
        let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else { panic!() };
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = &p.transport else { panic!() };
        assert_eq!(icmp.icmp_type(), etherparse::Icmpv6Type::PacketTooBig { mtu: 1500 });
        let want =
            icmp.icmp_type().calc_checksum(ip.header().source(), ip.header().destination(), icmp.payload()).unwrap();
        assert_eq!(icmp.checksum(), want);
        assert!(packet_too_big_v6(&f[..30], 1500, MacAddr([2, 0, 0, 0, 0, 9]), [9; 16]).is_none());
    }
}

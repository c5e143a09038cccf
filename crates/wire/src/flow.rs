//! A symmetric, fixed 5-tuple flow hash and a pick among rings by it. It chose a multiqueue VM
//! port's guest RX queue until VM ports got a VM queue per queue pair (VMMQ, docs/design.md);
//! the data path now picks with the uplink's flow hash (`vmq_sys::steering::flow_index`), so
//! that the queue a flow takes on the uplink and in the guest agree. The hash here is
//! *symmetric* (both directions of a connection hash alike) and fixed (no per-process seed).
//! Frames without a TCP/UDP header it can read (ARP, ICMP, IP fragments) get the first ring.

use crate::ip::{PROTO_TCP, PROTO_UDP, locate};

/// The canonical (direction-free) key of a TCP/UDP flow: the two endpoints in a fixed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// IPv4 addresses are stored as IPv4-mapped IPv6 (::ffff:a.b.c.d) so one type covers both.
    pub low: ([u8; 16], u16),
    pub high: ([u8; 16], u16),
    pub proto: u8,
}

fn mapped_v4(a: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    out[12..].copy_from_slice(&a[..4]);
    out
}

impl FlowKey {
    /// The key of a TCP or UDP frame (behind at most one VLAN tag), or None for anything else.
    /// Reads only headers; never panics on short or malformed frames.
    pub fn of_frame(frame: &[u8]) -> Option<FlowKey> {
        let layers = locate(frame).ok()?;
        if layers.proto != PROTO_TCP && layers.proto != PROTO_UDP {
            return None;
        }
        let (src, dst) = if layers.ipv6 {
            let src: [u8; 16] = frame.get(layers.l3 + 8..layers.l3 + 24)?.try_into().ok()?;
            let dst: [u8; 16] = frame.get(layers.l3 + 24..layers.l3 + 40)?.try_into().ok()?;
            (src, dst)
        } else {
            (
                mapped_v4(frame.get(layers.l3 + 12..layers.l3 + 16)?),
                mapped_v4(frame.get(layers.l3 + 16..layers.l3 + 20)?),
            )
        };
        let ports = frame.get(layers.l4..layers.l4 + 4)?;
        let sport = u16::from_be_bytes([ports[0], ports[1]]);
        let dport = u16::from_be_bytes([ports[2], ports[3]]);
        Some(FlowKey::new((src, sport), (dst, dport), layers.proto))
    }

    /// Builds the key from one direction's endpoints; the other direction gives the same key.
    pub fn new(a: ([u8; 16], u16), b: ([u8; 16], u16), proto: u8) -> FlowKey {
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        FlowKey { low, high, proto }
    }

    /// A well-mixed 32-bit hash of the key: fixed constants, same on every host and run.
    pub fn hash(&self) -> u32 {
        let mut h: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(self.proto);
        for (addr, port) in [self.low, self.high] {
            for half in addr.chunks_exact(8) {
                let word = u64::from_le_bytes(half.try_into().unwrap_or([0; 8]));
                h = (h ^ word).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(29);
            }
            h = (h ^ u64::from(port)).wrapping_mul(0xc4ce_b9fe_1a85_ec53).rotate_left(31);
        }
        // murmur3's 64-bit finaliser: every input bit affects the low bits the pick uses.
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        h as u32
    }
}

/// The symmetric flow hash of a frame, or None when it is not TCP/UDP over IPv4/IPv6.
pub fn flow_hash(frame: &[u8]) -> Option<u32> {
    FlowKey::of_frame(frame).map(|key| key.hash())
}

/// Picks one of `enabled` (the guest RX ring indices the frontend has enabled, in any fixed
/// order) for `frame`: the same flow always gets the same entry while the set is unchanged.
/// Frames without a flow get `enabled[0]`; an empty set gives None (nothing may receive).
pub fn pick_ring<T: Copy>(frame: &[u8], enabled: &[T]) -> Option<T> {
    let first = *enabled.first()?;
    if enabled.len() == 1 {
        return Some(first); // the single-queue path reads no headers
    }
    Some(match flow_hash(frame) {
        // Multiply-shift maps the hash onto 0..len without a division.
        Some(h) => enabled[((u64::from(h) * enabled.len() as u64) >> 32) as usize],
        None => first,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
        let l4_len: u16 = if proto == PROTO_TCP { 20 } else { 8 };
        let total = 20 + l4_len;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        if proto == PROTO_TCP {
            f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            f.extend_from_slice(&[0, 8, 0, 0]);
        }
        f
    }

    fn v6_frame(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, proto: u8) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
        let l4_len: u16 = if proto == PROTO_TCP { 20 } else { 8 };
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&l4_len.to_be_bytes());
        f.extend_from_slice(&[proto, 64]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        if proto == PROTO_TCP {
            f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            f.extend_from_slice(&[0, 8, 0, 0]);
        }
        f
    }

    #[test]
    fn non_flow_frames_go_to_the_first_ring() {
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
        arp.resize(60, 0);
        assert_eq!(flow_hash(&arp), None);
        assert_eq!(pick_ring(&arp, &[3u16, 1, 2]), Some(3));
        let mut icmp = v4_frame([10, 0, 0, 1], [10, 0, 0, 2], 0, 0, PROTO_UDP);
        icmp[14 + 9] = 1;
        assert_eq!(flow_hash(&icmp), None);
        assert_eq!(flow_hash(&[]), None);
        assert_eq!(flow_hash(&[0x45; 20]), None);
        assert_eq!(pick_ring::<u16>(&icmp, &[]), None);
    }

    #[test]
    fn ports_and_protocol_change_the_hash() {
        let a = flow_hash(&v4_frame([10, 0, 0, 1], [10, 0, 0, 2], 1000, 80, PROTO_TCP)).unwrap();
        let b = flow_hash(&v4_frame([10, 0, 0, 1], [10, 0, 0, 2], 1001, 80, PROTO_TCP)).unwrap();
        let c = flow_hash(&v4_frame([10, 0, 0, 1], [10, 0, 0, 2], 1000, 80, PROTO_UDP)).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn a_vlan_tag_does_not_change_the_flow() {
        let plain = v4_frame([10, 0, 0, 1], [10, 0, 0, 2], 5201, 40000, PROTO_TCP);
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
        tagged.extend_from_slice(&plain[12..]);
        assert_eq!(flow_hash(&plain), flow_hash(&tagged));
        assert!(flow_hash(&plain).is_some());
    }

    #[test]
    fn many_flows_spread_over_every_ring() {
        let rings = [0u16, 1, 2, 3];
        let mut counts = [0usize; 4];
        for sport in 0..4000u16 {
            let f = v4_frame([10, 0, 0, 1], [10, 0, 0, 2], 30000 + sport, 5201, PROTO_TCP);
            counts[usize::from(pick_ring(&f, &rings).unwrap())] += 1;
        }
        // A uniform spread gives 1000 each; a broken mix (e.g. low bits only) gives far less.
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }

    proptest! {
        #[test]
        fn both_directions_of_a_v4_flow_pick_the_same_ring(
            a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), sp in any::<u16>(), dp in any::<u16>(),
            tcp in any::<bool>(), n in 1usize..=16,
        ) {
            let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
            let there = v4_frame(a, b, sp, dp, proto);
            let back = v4_frame(b, a, dp, sp, proto);
            prop_assert!(flow_hash(&there).is_some());
            prop_assert_eq!(flow_hash(&there), flow_hash(&back));
            let rings: Vec<usize> = (0..n).collect();
            let pick = pick_ring(&there, &rings);
            prop_assert_eq!(pick, pick_ring(&back, &rings));
            // Stable: asking again gives the same ring.
            prop_assert_eq!(pick, pick_ring(&there, &rings));
        }

        #[test]
        fn both_directions_of_a_v6_flow_pick_the_same_ring(
            a in any::<[u8; 16]>(), b in any::<[u8; 16]>(), sp in any::<u16>(), dp in any::<u16>(),
            tcp in any::<bool>(), n in 2usize..=16,
        ) {
            let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
            let there = v6_frame(a, b, sp, dp, proto);
            let back = v6_frame(b, a, dp, sp, proto);
            prop_assert!(flow_hash(&there).is_some());
            prop_assert_eq!(flow_hash(&there), flow_hash(&back));
            let rings: Vec<usize> = (0..n).collect();
            prop_assert_eq!(pick_ring(&there, &rings), pick_ring(&back, &rings));
        }

        #[test]
        fn arbitrary_bytes_never_panic(frame in proptest::collection::vec(any::<u8>(), 0..128)) {
            let rings = [0u8, 1];
            let pick = pick_ring(&frame, &rings);
            prop_assert!(pick.is_some());
        }
    }
}

//! The Internet checksum (RFC 1071): full, incremental (RFC 1624) and pseudo-headers.
//!
//! Hand-written because it runs over every byte of every frame whose checksum vmq finishes or
//! segments: summing 8 bytes a step into a u64 is several times faster than the 2-byte loop.

/// One's-complement sum of `data` (big-endian 16-bit words, odd tail padded with zero) added to
/// `initial`. Returns an unfolded 32-bit partial sum, suitable to feed back in as `initial`
/// only if the previous chunk had even length.
pub fn sum(data: &[u8], initial: u32) -> u32 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        // Native-endian loads: one's-complement addition commutes with byte swapping, so the
        // folded result is swapped once at the end (RFC 1071 section 2(B)).
        let w = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let (s, carry) = acc.overflowing_add(w);
        acc = s + u64::from(carry);
    }
    let mut folded = (acc & 0xffff_ffff) + (acc >> 32);
    folded = (folded & 0xffff_ffff) + (folded >> 32);
    let mut word = fold(folded as u32);
    if cfg!(target_endian = "little") {
        word = word.swap_bytes();
    }
    let mut total = u64::from(initial) + u64::from(word);
    let rest = chunks.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        total += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        total += u64::from(*last) << 8;
    }
    while total > 0xffff_ffff {
        total = (total & 0xffff_ffff) + (total >> 32);
    }
    total as u32
}

/// Folds a partial sum to 16 bits (not complemented).
pub fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The checksum field value for `data`: complement of the folded sum.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data, 0))
}

/// RFC 1624 eq. 3: the new checksum after one 16-bit word changes from `old_word` to `new_word`.
pub fn incremental_update(old_csum: u16, old_word: u16, new_word: u16) -> u16 {
    let s = u32::from(!old_csum) + u32::from(!old_word) + u32::from(new_word);
    !fold(s)
}

/// Same as [`incremental_update`] for a 32-bit field (two words).
pub fn incremental_update32(old_csum: u16, old: u32, new: u32) -> u16 {
    let c = incremental_update(old_csum, (old >> 16) as u16, (new >> 16) as u16);
    incremental_update(c, old as u16, new as u16)
}

/// Partial sum of the IPv4 pseudo-header.
pub fn pseudo_header_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
    let w = |b: [u8; 4]| u32::from(u16::from_be_bytes([b[0], b[1]])) + u32::from(u16::from_be_bytes([b[2], b[3]]));
    w(src) + w(dst) + u32::from(proto) + u32::from(len)
}

/// Partial sum of the IPv6 pseudo-header.
pub fn pseudo_header_v6(src: [u8; 16], dst: [u8; 16], next_header: u8, len: u32) -> u32 {
    let mut s = u32::from(fold(sum(&src, 0))) + u32::from(fold(sum(&dst, 0)));
    s += (len >> 16) + (len & 0xffff) + u32::from(next_header);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 { u16::from_be_bytes([c[0], c[1]]) } else { u16::from(c[0]) << 8 };
            s += u32::from(w);
        }
        !fold(s)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
    }

    #[test]
    fn ipv4_header_checksum_matches_etherparse() {
        let h = etherparse::Ipv4Header::new(100, 64, etherparse::IpNumber::TCP, [10, 0, 0, 1], [10, 0, 0, 2]).unwrap();
        let mut bytes = h.to_bytes().to_vec();
        let expected = h.calc_header_checksum();
        bytes[10] = 0;
        bytes[11] = 0;
        assert_eq!(checksum(&bytes), expected);
    }

    proptest! {
        #[test]
        fn fast_equals_naive(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            prop_assert_eq!(checksum(&data), naive(&data));
        }

        #[test]
        fn initial_value_chains(a in proptest::collection::vec(any::<u8>(), 0..200), b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut a = a;
            if a.len() % 2 == 1 { a.pop(); }
            let mut both = a.clone();
            both.extend_from_slice(&b);
            prop_assert_eq!(fold(sum(&b, sum(&a, 0))), fold(sum(&both, 0)));
        }

        #[test]
        fn incremental_equals_full(mut data in proptest::collection::vec(any::<u8>(), 2..200), at in 0usize..100, new in any::<u16>()) {
            if data.len() % 2 == 1 { data.pop(); }
            let i = (at % (data.len() / 2)) * 2;
            let old_csum = checksum(&data);
            let old = u16::from_be_bytes([data[i], data[i + 1]]);
            data[i..i + 2].copy_from_slice(&new.to_be_bytes());
            let inc = incremental_update(old_csum, old, new);
            // 0x0000 and 0xffff are the same value in one's complement.
            let full = checksum(&data);
            prop_assert!(inc == full || (inc == 0xffff && full == 0) || (inc == 0 && full == 0xffff), "{inc:#x} vs {full:#x}");
        }
    }
}

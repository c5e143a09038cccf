//! 802.1Q tag insertion and removal.

use crate::ethernet::{ETHERTYPE_VLAN, HEADER_LEN};

/// Inserts a tag with `tci` after the MAC addresses. Frames shorter than 12 bytes are left alone.
pub fn push_tag(frame: &mut Vec<u8>, tci: u16) {
    if frame.len() < 12 {
        return;
    }
    let t = tci.to_be_bytes();
    frame.splice(12..12, [0x81, 0x00, t[0], t[1]]);
}

/// Removes the outer 802.1Q tag and returns its TCI; None (frame unchanged) if untagged.
pub fn pop_tag(frame: &mut Vec<u8>) -> Option<u16> {
    if frame.len() < HEADER_LEN + 4 || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_VLAN {
        return None;
    }
    let tci = u16::from_be_bytes([frame[14], frame[15]]);
    frame.drain(12..16);
    Some(tci)
}

/// Copies `src` into `dst` inserting a tag; returns the bytes written, 0 if `dst` is too small
/// or `src` shorter than 12 bytes.
pub fn insert_tag_into(src: &[u8], dst: &mut [u8], tci: u16) -> usize {
    let n = src.len() + 4;
    if src.len() < 12 || dst.len() < n {
        return 0;
    }
    dst[..12].copy_from_slice(&src[..12]);
    dst[12..14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
    dst[14..16].copy_from_slice(&tci.to_be_bytes());
    dst[16..n].copy_from_slice(&src[12..]);
    n
}

/// Copies `src` into `dst` without its tag; returns the bytes written, 0 if `src` is untagged
/// or `dst` is too small.
pub fn strip_tag_into(src: &[u8], dst: &mut [u8]) -> usize {
    if src.len() < HEADER_LEN + 4 || u16::from_be_bytes([src[12], src[13]]) != ETHERTYPE_VLAN {
        return 0;
    }
    let n = src.len() - 4;
    if dst.len() < n {
        return 0;
    }
    dst[..12].copy_from_slice(&src[..12]);
    dst[12..n].copy_from_slice(&src[16..]);
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ethernet::parse_l2;

    #[test]
    fn push_pop_round_trip() {
        let orig: Vec<u8> = (0..60).collect();
        let mut f = orig.clone();
        push_tag(&mut f, 0x2000 | 10);
        let l2 = parse_l2(&f).unwrap();
        assert_eq!((l2.vlan, l2.pcp, l2.ethertype), (Some(10), 1, u16::from_be_bytes([12, 13])));
        let mut buf = [0u8; 80];
        let n = strip_tag_into(&f, &mut buf);
        assert_eq!(&buf[..n], &orig[..]);
        assert_eq!(pop_tag(&mut f), Some(0x2000 | 10));
        assert_eq!(f, orig);
        assert_eq!(pop_tag(&mut f), None);
        let n = insert_tag_into(&orig, &mut buf, 7);
        assert_eq!(parse_l2(&buf[..n]).unwrap().vlan, Some(7));
        assert_eq!(insert_tag_into(&orig, &mut buf[..10], 7), 0);
        assert_eq!(strip_tag_into(&orig, &mut buf), 0);
    }
}

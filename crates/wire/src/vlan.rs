//! 802.1Q tags: probing for one and editing it, zero-copy where the hot path can take the
//! frame as borrowed slices (egress), by copy where it writes into a buffer (uplink receive).
//! Every function checks lengths and answers `None`/`false` rather than panic.

use crate::ethernet::{ETHERTYPE_VLAN, TAGGED_HEADER_LEN};

/// Bytes a tag adds to a frame: TPID and TCI.
pub const TAG_LEN: usize = 4;

/// Offset of the outer EtherType (or TPID), right after the two MAC addresses.
const TYPE_AT: usize = 12;

/// True when the frame's outer EtherType is 802.1Q (a tag follows the MAC addresses).
#[inline]
pub fn is_tagged(frame: &[u8]) -> bool {
    frame.len() >= TYPE_AT + 2 && frame[TYPE_AT..TYPE_AT + 2] == ETHERTYPE_VLAN.to_be_bytes()
}

/// The four bytes of an 802.1Q tag carrying `tci`.
#[inline]
pub fn tag(tci: u16) -> [u8; TAG_LEN] {
    let t = tci.to_be_bytes();
    let p = ETHERTYPE_VLAN.to_be_bytes();
    [p[0], p[1], t[0], t[1]]
}

/// `frame` with `tag` inserted after the MAC addresses, as three borrowed slices; None if the
/// frame is too short to hold the addresses.
#[inline]
pub fn push_parts<'a>(frame: &'a [u8], tag: &'a [u8; TAG_LEN]) -> Option<[&'a [u8]; 3]> {
    let (macs, rest) = frame.split_at_checked(TYPE_AT)?;
    Some([macs, tag, rest])
}

/// `frame` without its outer 802.1Q tag, as two borrowed slices; None if it has no such tag or
/// is too short to hold one.
#[inline]
pub fn strip_parts(frame: &[u8]) -> Option<[&[u8]; 2]> {
    if frame.len() < TAGGED_HEADER_LEN || !is_tagged(frame) {
        return None;
    }
    Some([&frame[..TYPE_AT], &frame[TYPE_AT + TAG_LEN..]])
}

/// Copies `src` into `dst` with a tag (`tpid`, `tci`) inserted after the MAC addresses, as
/// Linux hands back the tag it removed from a received frame (the TPID may be a service tag's).
/// Returns the bytes written; None if `src` is shorter than the addresses or `dst` too small.
#[inline]
pub fn insert_tag_into(src: &[u8], dst: &mut [u8], tpid: u16, tci: u16) -> Option<usize> {
    let n = src.len() + TAG_LEN;
    if src.len() < TYPE_AT {
        return None;
    }
    let dst = dst.get_mut(..n)?;
    dst[..TYPE_AT].copy_from_slice(&src[..TYPE_AT]);
    dst[TYPE_AT..TYPE_AT + 2].copy_from_slice(&tpid.to_be_bytes());
    dst[TYPE_AT + 2..TYPE_AT + TAG_LEN].copy_from_slice(&tci.to_be_bytes());
    dst[TYPE_AT + TAG_LEN..].copy_from_slice(&src[TYPE_AT..]);
    Some(n)
}

/// Removes the outer 802.1Q tag and returns its TCI; None (frame unchanged) if untagged.
pub fn pop_tag(frame: &mut Vec<u8>) -> Option<u16> {
    if frame.len() < TAGGED_HEADER_LEN || !is_tagged(frame) {
        return None;
    }
    let tci = u16::from_be_bytes([frame[TYPE_AT + 2], frame[TYPE_AT + 3]]);
    frame.drain(TYPE_AT..TYPE_AT + TAG_LEN);
    Some(tci)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ethernet::parse_l2;

    #[test]
    fn push_strip_pop_round_trip() {
        let orig: Vec<u8> = (0..60).collect();
        assert!(!is_tagged(&orig));
        let t = tag(0x2000 | 10);
        let tagged = push_parts(&orig, &t).unwrap().concat();
        assert!(is_tagged(&tagged));
        let l2 = parse_l2(&tagged).unwrap();
        assert_eq!((l2.vlan, l2.pcp, l2.ethertype), (Some(10), 1, u16::from_be_bytes([12, 13])));
        assert_eq!(strip_parts(&tagged).unwrap().concat(), orig);
        let mut buf = [0u8; 80];
        assert_eq!(insert_tag_into(&orig, &mut buf, ETHERTYPE_VLAN, 0x2000 | 10), Some(64));
        assert_eq!(&buf[..64], &tagged[..]);
        let mut f = tagged.clone();
        assert_eq!(pop_tag(&mut f), Some(0x2000 | 10));
        assert_eq!(f, orig);
        assert_eq!(pop_tag(&mut f), None);
    }

    #[test]
    fn short_or_untagged_frames_are_refused() {
        let orig: Vec<u8> = (0..60).collect();
        let mut buf = [0u8; 80];
        assert_eq!(strip_parts(&orig), None, "untagged");
        assert_eq!(strip_parts(&push_parts(&orig, &tag(1)).unwrap().concat()[..17]), None, "cut in the tag");
        assert_eq!(push_parts(&orig[..11], &tag(1)), None);
        assert_eq!(insert_tag_into(&orig, &mut buf[..63], ETHERTYPE_VLAN, 7), None, "dst one byte short");
        assert_eq!(insert_tag_into(&orig[..11], &mut buf, ETHERTYPE_VLAN, 7), None);
        assert!(!is_tagged(&[0x81; 13]));
        let mut short = vec![0u8; 17];
        short[12..14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        assert_eq!(pop_tag(&mut short), None);
    }

    proptest::proptest! {
        #[test]
        fn edits_never_panic_and_agree(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..40), tci: u16) {
            let t = tag(tci);
            if let Some(p) = push_parts(&bytes, &t) {
                let pushed = p.concat();
                proptest::prop_assert_eq!(pushed.len(), bytes.len() + TAG_LEN);
                let mut buf = vec![0u8; pushed.len()];
                proptest::prop_assert_eq!(insert_tag_into(&bytes, &mut buf, ETHERTYPE_VLAN, tci), Some(pushed.len()));
                proptest::prop_assert_eq!(&buf, &pushed);
                // A tag is stripped back off only where it can be whole before an EtherType.
                let back = (bytes.len() >= 14).then(|| bytes.clone());
                proptest::prop_assert_eq!(strip_parts(&pushed).map(|s| s.concat()), back);
            }
            let _ = strip_parts(&bytes);
            let _ = pop_tag(&mut bytes.clone());
        }
    }
}

//! `vnet_offload`: a virtio-net header and a frame resolved toward a receiver with random
//! capabilities and MTU, as egress does it (MTU check, `plan_egress`, checksum finishing,
//! segmentation), then the delivered frames through the receive coalescer.
//!
//! Input: caps bits (u8: csum, tso4, tso6, ecn), MTU (u16, clamped to the port range), the
//! 12-byte virtio-net header, the frame.
//!
//! Invariants: no panic; `locate_in` over a head agrees with `locate` over the whole frame;
//! a frame that passes the MTU check yields segments that each pass it too, at most
//! `headers + gso_size` long, with valid checksums, whose payloads add up to the input payload
//! byte for byte; a finished checksum verifies; the coalescer neither loses nor invents payload
//! bytes and its merged frames segment back into their payload; every input ends in exactly one
//! [`OffloadOutcome`].

use vmq_core::port::{MAX_MTU, MIN_MTU};
use vmq_core::switch::fits_mtu;
use vmq_offload::{Coalescer, EgressPlan, OffloadCaps, OffloadError, finish_csum, plan_egress, segment};
use vmq_wire::VnetHdr;
use vmq_wire::checksum::{fold, sum};
use vmq_wire::ip::{Layers, PROTO_TCP, locate, locate_in};
use vmq_wire::vnet::GSO_ECN;

use crate::Input;

/// What happened to the frame: delivered (in some form) or dropped with a typed reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadOutcome {
    /// Delivered unchanged (`AsIs`).
    Passed,
    /// Delivered with its checksum finished in software.
    CsumFinished,
    /// Delivered as this many segments.
    Segmented(usize),
    /// Dropped: longer than the receiver's MTU.
    Oversize,
    /// Dropped: offload work refused the frame.
    Refused(OffloadError),
}

/// The receiver a fuzz input describes.
pub fn decode_caps(bits: u8) -> OffloadCaps {
    OffloadCaps { csum: bits & 1 != 0, tso4: bits & 2 != 0, tso6: bits & 4 != 0, ecn: bits & 8 != 0 }
}

/// Encodes caps as [`decode_caps`] reads them.
pub fn encode_caps(caps: OffloadCaps) -> u8 {
    u8::from(caps.csum) | u8::from(caps.tso4) << 1 | u8::from(caps.tso6) << 2 | u8::from(caps.ecn) << 3
}

/// Builds a `vnet_offload` input.
pub fn encode(caps: OffloadCaps, mtu: u16, hdr: &VnetHdr, frame: &[u8]) -> Vec<u8> {
    let mut b = crate::InputBuilder::default();
    b.u8(encode_caps(caps)).u16(mtu).raw(&hdr.to_bytes()).raw(frame);
    b.bytes
}

/// The fuzz target.
pub fn vnet_offload(data: &[u8]) {
    let _ = run_vnet_offload(data);
}

/// The fuzz target, telling what happened (the property tests check the mix of outcomes).
pub fn run_vnet_offload(data: &[u8]) -> OffloadOutcome {
    let mut input = Input::new(data);
    let caps = decode_caps(input.u8());
    let mtu = input.u16().clamp(MIN_MTU, MAX_MTU);
    let hdr = VnetHdr::parse(input.bytes(VnetHdr::LEN)).unwrap_or_default();
    let frame = input.rest();

    // Header checks never panic; `validate` is what ingress uses.
    let _ = hdr.validate(frame.len());
    check_locate_in(frame);

    let tagged = frame.len() >= 14 && frame[12..14] == [0x81, 0x00];
    let l2_len = if tagged { 18 } else { 14 };
    let segment_len = vmq_offload::gso_segment_len(&hdr, frame);
    if let Some(len) = segment_len {
        assert!(len <= frame.len(), "segment length {len} beyond the frame ({})", frame.len());
    }
    if !fits_mtu(frame.len(), l2_len, segment_len, mtu) {
        return OffloadOutcome::Oversize;
    }
    let fits = |f: &[u8]| f.len().saturating_sub(l2_len) <= usize::from(mtu);

    let mut delivered: Vec<(VnetHdr, Vec<u8>)> = Vec::new();
    let outcome = match plan_egress(&hdr, caps) {
        EgressPlan::AsIs => {
            delivered.push((hdr, frame.to_vec()));
            OffloadOutcome::Passed
        }
        EgressPlan::FinishCsum => {
            let mut h = hdr;
            let mut work = frame.to_vec();
            match finish_csum(&mut h, &mut work) {
                Ok(()) => {
                    check_finished_csum(&hdr, frame, &work);
                    assert!(!h.needs_csum() && h.data_valid(), "finish_csum leaves {h:?}");
                    delivered.push((h, work));
                    OffloadOutcome::CsumFinished
                }
                Err(e) => OffloadOutcome::Refused(e),
            }
        }
        EgressPlan::Segment => {
            let mut h = hdr;
            if !caps.ecn {
                h.gso_type &= !GSO_ECN;
            }
            let mut scratch = Vec::new();
            let mut segs = Vec::new();
            match segment(&h, frame, caps.csum, &mut scratch, &mut |sh, s| segs.push((*sh, s.to_vec()))) {
                Ok(n) => {
                    assert_eq!(n, segs.len(), "segment count and emitted segments differ");
                    check_segments(&h, frame, caps.csum, &segs, &fits);
                    delivered = segs;
                    OffloadOutcome::Segmented(n)
                }
                Err(e) => {
                    assert!(segs.is_empty(), "segment emitted frames and then failed with {e:?}");
                    OffloadOutcome::Refused(e)
                }
            }
        }
    };
    check_coalescer(&delivered);
    outcome
}

/// `locate_in` over a head of the frame agrees with `locate` over all of it.
fn check_locate_in(frame: &[u8]) {
    let whole = locate(frame);
    if let Ok(l) = whole {
        assert!(l.l3 <= l.l4 && l.l4 <= l.payload && l.payload <= frame.len(), "layers {l:?} outside the frame");
    }
    for head in [14usize, 54, 128, 256] {
        let head = head.min(frame.len());
        if let Ok(l) = locate_in(&frame[..head], frame.len()) {
            assert_eq!(Ok(l), whole, "locate_in over {head} bytes disagrees with locate");
        }
    }
}

/// The TCP payload of a frame (the IP length decides where it ends), if it has one.
fn tcp_payload(frame: &[u8]) -> Option<(Layers, &[u8])> {
    let l = locate(frame).ok()?;
    if l.proto != PROTO_TCP {
        return None;
    }
    let end = l.l4 + l.l4_len(frame);
    Some((l, frame.get(l.payload..end)?))
}

/// Does the frame's transport checksum verify?
fn l4_checksum_ok(frame: &[u8]) -> bool {
    let Ok(l) = locate(frame) else { return false };
    let Some(l4) = frame.get(l.l4..l.l4 + l.l4_len(frame)) else { return false };
    fold(sum(l4, l.pseudo_header(frame, l4.len()))) == 0xffff
}

/// The field finish_csum wrote makes the sum over [csum_start, end) plus the pseudo-header sum
/// the field held before come out as 0xffff (the receiver's check).
fn check_finished_csum(before_hdr: &VnetHdr, before: &[u8], after: &[u8]) {
    let start = usize::from(before_hdr.csum_start);
    let field = start + usize::from(before_hdr.csum_offset);
    assert_eq!(before.len(), after.len());
    assert_eq!(before[..field], after[..field], "finish_csum wrote before its field");
    assert_eq!(before[field + 2..], after[field + 2..], "finish_csum wrote after its field");
    if before_hdr.csum_offset.is_multiple_of(2) {
        let pseudo = u16::from_be_bytes([before[field], before[field + 1]]);
        assert_eq!(fold(sum(&after[start..], u32::from(pseudo))), 0xffff, "finished checksum does not verify");
    }
}

fn check_segments(
    hdr: &VnetHdr,
    frame: &[u8],
    partial: bool,
    segs: &[(VnetHdr, Vec<u8>)],
    fits: &dyn Fn(&[u8]) -> bool,
) {
    let (layers, payload) = tcp_payload(frame).expect("a frame segment() accepts has a TCP payload");
    let mss = usize::from(hdr.gso_size);
    let mut joined = Vec::with_capacity(payload.len());
    for (i, (sh, s)) in segs.iter().enumerate() {
        assert!(fits(s), "segment {i} of {} bytes exceeds the MTU", s.len());
        assert!(s.len() <= layers.payload + mss, "segment {i} longer than headers + gso_size");
        assert!(!sh.is_gso(), "a segment is itself GSO");
        assert_eq!(s[..layers.l3], frame[..layers.l3], "segment {i}: L2 header changed");
        let mut checked = s.clone();
        let mut h = *sh;
        assert_eq!(h.needs_csum(), partial, "segment {i}: partial checksum iff the receiver takes it");
        finish_csum(&mut h, &mut checked).expect("a segment's partial checksum is in the frame");
        assert!(l4_checksum_ok(&checked), "segment {i}: TCP checksum does not verify");
        let (sl, sp) = tcp_payload(s).expect("a segment is a TCP frame");
        assert_eq!(sl, layers, "segment {i}: headers moved");
        if i + 1 < segs.len() {
            assert_eq!(sp.len(), mss, "segment {i}: not the last, yet shorter than gso_size");
        }
        joined.extend_from_slice(sp);
    }
    assert_eq!(joined.len(), payload.len(), "segments carry another number of payload bytes");
    assert!(joined == payload, "segments' payload differs from the frame's");
}

/// What the coalescer emits carries the same bytes as what it was offered: TCP payloads in
/// order (merged or not), other frames whole. Merged frames segment back into their payload.
fn check_coalescer(frames: &[(VnetHdr, Vec<u8>)]) {
    let content = |f: &[u8], out: &mut Vec<u8>| match tcp_payload(f) {
        Some((_, p)) => out.extend_from_slice(p),
        None => out.extend_from_slice(f),
    };
    let mut offered = Vec::new();
    let mut emitted_frames: Vec<(VnetHdr, Vec<u8>)> = Vec::new();
    let mut c = Coalescer::new();
    for (h, f) in frames {
        content(f, &mut offered);
        c.offer(h, f, &mut |eh, ef| emitted_frames.push((*eh, ef.to_vec())));
    }
    c.flush(&mut |eh, ef| emitted_frames.push((*eh, ef.to_vec())));
    assert!(emitted_frames.len() <= frames.len(), "coalescer emitted more frames than offered");
    let mut emitted = Vec::new();
    for (h, f) in &emitted_frames {
        content(f, &mut emitted);
        let was_offered = frames.iter().any(|(oh, _)| oh == h);
        if h.is_gso() && !was_offered {
            let (_, payload) = tcp_payload(f).expect("a merged frame is TCP");
            let mut scratch = Vec::new();
            let mut again = Vec::new();
            let n = segment(h, f, false, &mut scratch, &mut |_, s| {
                again.extend_from_slice(tcp_payload(s).expect("segment of a merged frame").1)
            })
            .expect("a merged frame segments");
            assert_eq!(n, payload.len().div_ceil(usize::from(h.gso_size)), "merged frame's segment count");
            assert!(again == payload, "merged frame does not segment back into its payload");
        }
    }
    assert!(offered == emitted, "coalescer changed the payload stream");
}

//! Egress: one frame toward one port — tag edit, MTU check, offload resolution for what the
//! receiver negotiated — ending in `FrameSink::send`. Counts on the out port.

use vmq_core::stats::PortStats;
use vmq_core::switch::{TagEdit, fits_mtu};
use vmq_core::{DropReason, OffloadCaps, PortSpec};
use vmq_offload::{EgressPlan, finish_csum, plan_egress, segment};
use vmq_wire::VnetHdr;
use vmq_wire::vnet::{FLAG_NEEDS_CSUM, GSO_ECN};

use crate::port::FrameWriter;

/// Per-worker buffers for egress work that needs a private copy (checksum finishing,
/// segmentation).
#[derive(Default)]
pub struct EgressScratch {
    work: Vec<u8>,
    seg: Vec<u8>,
}

/// Tag-edited view of a frame as up to three slices, without copying.
fn edited_parts<'a>(frame: &'a [u8], edit: TagEdit, tag: &'a [u8; 4]) -> ([&'a [u8]; 3], usize) {
    match edit {
        TagEdit::Keep => ([frame, &[], &[]], 1),
        TagEdit::Strip => ([&frame[..12], &frame[16..], &[]], 2),
        TagEdit::Push(_) => ([&frame[..12], tag, &frame[12..]], 3),
    }
}

/// Header offsets move by the tag edit.
fn shift_hdr(hdr: &VnetHdr, edit: TagEdit) -> VnetHdr {
    let mut h = *hdr;
    let delta: i32 = match edit {
        TagEdit::Keep => 0,
        TagEdit::Strip => -4,
        TagEdit::Push(_) => 4,
    };
    if h.flags & FLAG_NEEDS_CSUM != 0 {
        h.csum_start = (i32::from(h.csum_start) + delta).clamp(0, i32::from(u16::MAX)) as u16;
    }
    if h.hdr_len != 0 {
        h.hdr_len = (i32::from(h.hdr_len) + delta).clamp(0, i32::from(u16::MAX)) as u16;
    }
    h.num_buffers = 0;
    h
}

/// The port a frame goes out of, as egress needs it.
pub struct OutPort<'a> {
    pub caps: OffloadCaps,
    pub spec: &'a PortSpec,
    pub stats: &'a PortStats,
}

/// Delivers `frame` (Ethernet, no virtio header) with header `hdr` to `sink`. Returns the number
/// of frames handed to the sink (segments count individually), or the drop reason.
pub fn deliver(
    sink: &mut dyn FrameWriter,
    out: &OutPort<'_>,
    hdr: &VnetHdr,
    frame: &[u8],
    edit: TagEdit,
    scratch: &mut EgressScratch,
) -> Result<(), DropReason> {
    let (caps, stats) = (out.caps, out.stats);
    if matches!(edit, TagEdit::Strip) && frame.len() < 18 {
        return Err(DropReason::Malformed);
    }
    let tag_bytes = match edit {
        TagEdit::Push(tci) => {
            let t = tci.to_be_bytes();
            [0x81, 0x00, t[0], t[1]]
        }
        _ => [0; 4],
    };
    let hdr = shift_hdr(hdr, edit);
    let out_len = edit.len_after(frame.len());
    let tagged_out = match edit {
        TagEdit::Push(_) => true,
        TagEdit::Strip => false,
        TagEdit::Keep => frame.len() >= 14 && frame[12..14] == [0x81, 0x00],
    };
    let l2_len = if tagged_out { 18 } else { 14 };
    let segment_len = vmq_offload::gso_segment_len(&hdr, frame).map(|l| edit.len_after(l));
    if !fits_mtu(out_len, l2_len, segment_len, out.spec.mtu) {
        return Err(DropReason::Oversize);
    }
    let (parts, n) = edited_parts(frame, edit, &tag_bytes);
    match plan_egress(&hdr, caps) {
        EgressPlan::AsIs => {
            sink.send(&hdr, &parts[..n])?;
            if hdr.is_gso() {
                stats.offload_gso_passed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            stats.add_tx(1, out_len as u64);
            Ok(())
        }
        EgressPlan::FinishCsum => {
            let mut h = hdr;
            assemble(&mut scratch.work, &parts[..n]);
            finish_csum(&mut h, &mut scratch.work).map_err(|_| DropReason::Offload)?;
            sink.send(&h, &[&scratch.work])?;
            stats.offload_csum_finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            stats.add_tx(1, out_len as u64);
            Ok(())
        }
        EgressPlan::Segment => {
            assemble(&mut scratch.work, &parts[..n]);
            let mut h = hdr;
            if !caps.ecn {
                h.gso_type &= !GSO_ECN;
            }
            let mut first_err = None;
            let mut sent = 0u64;
            let mut bytes = 0u64;
            let made =
                segment(&h, &scratch.work, caps.csum, &mut scratch.seg, &mut |sh, seg| match sink.send(sh, &[seg]) {
                    Ok(()) => {
                        sent += 1;
                        bytes += seg.len() as u64;
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                })
                .map_err(|_| DropReason::Offload)?;
            stats.offload_segments.fetch_add(made as u64, std::sync::atomic::Ordering::Relaxed);
            stats.add_tx(sent, bytes);
            match first_err {
                // Some segments were lost: the whole frame counts as one drop.
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
    }
}

fn assemble(buf: &mut Vec<u8>, parts: &[&[u8]]) {
    buf.clear();
    for p in parts {
        buf.extend_from_slice(p);
    }
}

/// Copies `frame` with the tag edit applied into `out`.
pub fn apply_edit(frame: &[u8], edit: TagEdit, out: &mut Vec<u8>) {
    let tag = match edit {
        TagEdit::Push(tci) => {
            let t = tci.to_be_bytes();
            [0x81, 0x00, t[0], t[1]]
        }
        _ => [0; 4],
    };
    if matches!(edit, TagEdit::Strip) && frame.len() < 18 {
        out.clear();
        out.extend_from_slice(frame);
        return;
    }
    let (parts, n) = edited_parts(frame, edit, &tag);
    assemble(out, &parts[..n]);
}

/// Cheap pre-check before coalescing: a plain (non-GSO) TCP segment over IPv4/IPv6, possibly
/// tagged. The coalescer checks the rest.
pub fn is_tcp_candidate(frame: &[u8], hdr: &VnetHdr) -> bool {
    if hdr.is_gso() || frame.len() < 54 {
        return false;
    }
    let (ethertype, l3) = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x8100 => (u16::from_be_bytes([frame[16], frame[17]]), 18),
        t => (t, 14),
    };
    match ethertype {
        0x0800 => frame.get(l3 + 9) == Some(&6),
        0x86dd => frame.get(l3 + 6) == Some(&6),
        _ => false,
    }
}

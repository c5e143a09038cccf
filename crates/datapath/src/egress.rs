//! Egress: one frame toward one port — tag edit, MTU check, offload resolution for what the
//! receiver negotiated — ending in `FrameSink::send`. Counts into an [`EgressTally`] that the
//! caller adds to the out port's counters once per batch.

use std::sync::atomic::Ordering::Relaxed;

use vmq_core::stats::PortStats;
use vmq_core::switch::{TagEdit, fits_mtu};
use vmq_core::{DropReason, OffloadCaps, PortSpec};
use vmq_offload::{EgressPlan, finish_csum, plan_egress, segment};
use vmq_wire::ethernet::{HEADER_LEN, TAGGED_HEADER_LEN};
use vmq_wire::vnet::{FLAG_NEEDS_CSUM, GSO_ECN};
use vmq_wire::{VnetHdr, vlan};

use crate::port::{FrameWriter, GuestTail};

/// Per-worker buffers for egress work that needs a private copy (checksum finishing,
/// segmentation).
#[derive(Default)]
pub struct EgressScratch {
    work: Vec<u8>,
    seg: Vec<u8>,
}

/// Tag-edited view of a frame as up to three slices, without copying; None when the frame
/// cannot take the edit (no whole tag to strip, no MAC addresses to push one after).
fn edited_parts<'a>(frame: &'a [u8], edit: TagEdit, tag: &'a [u8; vlan::TAG_LEN]) -> Option<([&'a [u8]; 3], usize)> {
    Some(match edit {
        TagEdit::Keep => ([frame, &[], &[]], 1),
        TagEdit::Strip => {
            let [macs, rest] = vlan::strip_parts(frame)?;
            ([macs, rest, &[]], 2)
        }
        TagEdit::Push(_) => (vlan::push_parts(frame, tag)?, 3),
    })
}

/// The tag a `Push` edit inserts (zeros otherwise, unused).
fn pushed_tag(edit: TagEdit) -> [u8; vlan::TAG_LEN] {
    match edit {
        TagEdit::Push(tci) => vlan::tag(tci),
        _ => [0; vlan::TAG_LEN],
    }
}

/// Header offsets move by the tag edit.
fn shift_hdr(hdr: &VnetHdr, edit: TagEdit) -> VnetHdr {
    let mut h = *hdr;
    const TAG: i32 = vlan::TAG_LEN as i32;
    let delta: i32 = match edit {
        TagEdit::Keep => 0,
        TagEdit::Strip => -TAG,
        TagEdit::Push(_) => TAG,
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
}

/// What one batch delivered toward one port, added to its [`PortStats`] once by
/// [`EgressTally::flush`], as `vmq_core::stats` intends (atomic cost per batch, not per frame):
/// a locked add per frame also waits for that frame's stores into guest memory to complete.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EgressTally {
    pub packets: u64,
    pub bytes: u64,
    pub gso_passed: u64,
    pub csum_finished: u64,
    pub segments: u64,
}

impl EgressTally {
    /// Adds the tally to `stats` (the frame counters in worker `worker`'s shard) and starts over.
    pub fn flush(&mut self, stats: &PortStats, worker: usize) {
        let t = std::mem::take(self);
        stats.add_tx(worker, t.packets, t.bytes);
        for (counter, n) in [
            (&stats.offload_gso_passed, t.gso_passed),
            (&stats.offload_csum_finished, t.csum_finished),
            (&stats.offload_segments, t.segments),
        ] {
            if n != 0 {
                counter.fetch_add(n, Relaxed);
            }
        }
    }
}

/// Delivers `frame` (Ethernet, no virtio header) with header `hdr` to `sink`, counting what was
/// handed to the sink (segments individually) in `tally`. Returns the drop reason if the frame
/// (or any of its segments) was not delivered.
#[inline]
#[allow(clippy::too_many_arguments)] // the egress step's inputs, each used once; a struct would only rename them
pub fn deliver(
    sink: &mut dyn FrameWriter,
    out: &OutPort<'_>,
    hdr: &VnetHdr,
    frame: &[u8],
    tail: Option<&GuestTail>,
    edit: TagEdit,
    scratch: &mut EgressScratch,
    tally: &mut EgressTally,
) -> Result<(), DropReason> {
    let caps = out.caps;
    // `frame` is the whole frame, or its head when `tail` holds the rest in guest memory.
    let frame_len = frame.len() + tail.map_or(0, GuestTail::len);
    let tag_bytes = pushed_tag(edit);
    let (parts, n) = edited_parts(frame, edit, &tag_bytes).ok_or(DropReason::Malformed)?;
    let hdr = shift_hdr(hdr, edit);
    let out_len = edit.len_after(frame_len);
    let tagged_out = match edit {
        TagEdit::Push(_) => true,
        TagEdit::Strip => false,
        TagEdit::Keep => vlan::is_tagged(frame),
    };
    let l2_len = if tagged_out { TAGGED_HEADER_LEN } else { HEADER_LEN };
    let segment_len = vmq_offload::gso_segment_len_in(&hdr, frame, frame_len).map(|l| edit.len_after(l));
    if !fits_mtu(out_len, l2_len, segment_len, out.spec.mtu) {
        return Err(DropReason::Oversize);
    }
    let plan = plan_egress(&hdr, caps);
    if plan == EgressPlan::AsIs {
        match tail {
            None => sink.send(&hdr, &parts[..n])?,
            // Guest to guest: the frame's end is copied once, from sender to receiver.
            Some(t) if sink.takes_guest_tail() => sink.send_with_tail(&hdr, &parts[..n], t)?,
            Some(t) => {
                assemble(&mut scratch.work, &parts[..n]);
                if !t.append_to(&mut scratch.work) {
                    return Err(DropReason::BadDescriptor);
                }
                sink.send(&hdr, &[&scratch.work])?;
            }
        }
        tally.gso_passed += u64::from(hdr.is_gso());
        tally.packets += 1;
        tally.bytes += out_len as u64;
        return Ok(());
    }
    // Offload work needs the frame in one piece.
    assemble(&mut scratch.work, &parts[..n]);
    if tail.is_some_and(|t| !t.append_to(&mut scratch.work)) {
        return Err(DropReason::BadDescriptor);
    }
    match plan {
        EgressPlan::AsIs | EgressPlan::FinishCsum => {
            let mut h = hdr;
            finish_csum(&mut h, &mut scratch.work).map_err(|_| DropReason::Offload)?;
            sink.send(&h, &[&scratch.work])?;
            tally.csum_finished += 1;
            tally.packets += 1;
            tally.bytes += out_len as u64;
            Ok(())
        }
        EgressPlan::Segment => {
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
            tally.segments += made as u64;
            tally.packets += sent;
            tally.bytes += bytes;
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

/// Copies `frame` with the tag edit applied into `out` (as it is when it cannot take the edit).
pub fn apply_edit(frame: &[u8], edit: TagEdit, out: &mut Vec<u8>) {
    let tag = pushed_tag(edit);
    match edited_parts(frame, edit, &tag) {
        Some((parts, n)) => assemble(out, &parts[..n]),
        None => assemble(out, &[frame]),
    }
}

/// Cheap pre-check before coalescing: a plain (non-GSO) TCP segment over IPv4/IPv6, possibly
/// tagged. The coalescer checks the rest.
pub fn is_tcp_candidate(frame: &[u8], hdr: &VnetHdr) -> bool {
    !hdr.is_gso() && vmq_wire::ip::looks_like_tcp(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmq_core::{PortKind, VlanMode};

    struct Collect(Vec<Vec<u8>>);

    impl FrameWriter for Collect {
        fn send(&mut self, _hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason> {
            self.0.push(parts.concat());
            Ok(())
        }
    }

    #[test]
    fn a_batch_is_counted_once_at_flush() {
        let spec = PortSpec {
            name: "p".into(),
            kind: PortKind::Mem,
            mac: None,
            mtu: 1500,
            vlan: VlanMode::Access(0),
            allow_mac_spoofing: false,
            max_learned_macs: vmq_core::fdb::DEFAULT_MAX_LEARNED_MACS,
            guest: Default::default(),
            offloads: OffloadCaps::ALL,
        };
        let out = OutPort { caps: OffloadCaps::ALL, spec: &spec };
        let (mut sink, mut scratch, mut tally) =
            (Collect(Vec::new()), EgressScratch::default(), EgressTally::default());
        let stats = PortStats::default();
        let hdr = VnetHdr::default();
        for len in [60, 1514] {
            deliver(&mut sink, &out, &hdr, &vec![0u8; len], None, TagEdit::Keep, &mut scratch, &mut tally).unwrap();
        }
        // Oversize: dropped, not counted as sent.
        let err = deliver(&mut sink, &out, &hdr, &[0u8; 1515], None, TagEdit::Keep, &mut scratch, &mut tally);
        assert_eq!(err, Err(DropReason::Oversize));
        assert_eq!(sink.0.len(), 2);
        assert_eq!(tally, EgressTally { packets: 2, bytes: 1574, ..EgressTally::default() });
        assert_eq!(stats.snapshot().tx_packets, 0, "nothing reaches the shared counters before flush");
        tally.flush(&stats, 0);
        let snap = stats.snapshot();
        assert_eq!((snap.tx_packets, snap.tx_bytes), (2, 1574));
        assert_eq!(tally, EgressTally::default(), "flush starts over");
        tally.flush(&stats, 0);
        assert_eq!(stats.snapshot().tx_packets, 2);
    }
}

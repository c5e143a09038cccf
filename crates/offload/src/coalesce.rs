//! Receive segment coalescing (RSC/LRO) toward receivers that accept GSO frames: consecutive
//! in-order TCP segments of one flow within a batch become one GSO frame, so the guest's stack
//! handles one large frame instead of dozens.

use vmq_wire::VnetHdr;
use vmq_wire::checksum::fold;
use vmq_wire::ip::{Layers, PROTO_TCP, TCP_ACK, TCP_PSH, locate};
use vmq_wire::vnet::{FLAG_NEEDS_CSUM, GsoType};

use crate::transport_csum_ok;

/// Largest IP packet a merged frame may carry.
const MAX_IP_LEN: usize = 65_535;

struct Pending {
    buf: Vec<u8>,
    hdr: VnetHdr,
    layers: Layers,
    /// Bytes that must match for a segment to join: L2 header, IP addresses/TOS/TTL (v4) or
    /// class/flow/hop limit (v6), ports, ack number and TCP options.
    key: Vec<u8>,
    next_seq: u32,
    mss: usize,
    segments: u32,
    closed: bool,
}

#[derive(Default)]
pub struct Coalescer {
    pending: Option<Pending>,
    merged: u64,
    spare: Vec<u8>,
    spare_key: Vec<u8>,
}

fn flow_key(frame: &[u8], l: &Layers, key: &mut Vec<u8>) {
    key.clear();
    key.extend_from_slice(&frame[..l.l3]);
    if l.ipv6 {
        key.extend_from_slice(&frame[l.l3..l.l3 + 4]); // version, class, flow label
        key.push(frame[l.l3 + 7]); // hop limit
        key.extend_from_slice(&frame[l.l3 + 8..l.l3 + 40]);
    } else {
        key.push(frame[l.l3 + 1]); // TOS
        key.push(frame[l.l3 + 8]); // TTL
        key.extend_from_slice(&frame[l.l3 + 12..l.l3 + 20]);
    }
    key.extend_from_slice(&frame[l.l4..l.l4 + 4]); // ports
    key.extend_from_slice(&frame[l.l4 + 8..l.l4 + 12]); // ack
    key.push(frame[l.l4 + 12]); // data offset
    key.extend_from_slice(&frame[l.l4 + 20..l.payload]); // options
}

impl Coalescer {
    pub fn new() -> Coalescer {
        Coalescer::default()
    }

    /// Segments absorbed into merged frames so far.
    pub fn merged_segments(&self) -> u64 {
        self.merged
    }

    /// Offers the next frame of a batch. Frames that cannot merge flush the pending one first
    /// and are emitted unchanged (or start a new merge).
    pub fn offer(&mut self, hdr: &VnetHdr, frame: &[u8], emit: &mut dyn FnMut(&VnetHdr, &[u8])) {
        let Some(layers) = self.mergeable(hdr, frame) else {
            self.flush(emit);
            emit(hdr, frame);
            return;
        };
        let payload = &frame[layers.payload..layers.l4 + layers.l4_len(frame)];
        let flags = layers.tcp_flags(frame);
        let seq = layers.tcp_seq(frame);
        flow_key(frame, &layers, &mut self.spare_key);
        if let Some(p) = self.pending.as_mut() {
            let fits = p.buf.len() - p.layers.l3 + payload.len() <= MAX_IP_LEN;
            if !p.closed && p.key == self.spare_key && seq == p.next_seq && payload.len() <= p.mss && fits {
                p.buf.extend_from_slice(payload);
                p.next_seq = seq.wrapping_add(payload.len() as u32);
                p.segments += 1;
                // Latest window and PSH win; a short segment or PSH ends the merge.
                let (wa, fa) = (p.layers.l4 + 14, p.layers.l4 + 13);
                p.buf[wa..wa + 2].copy_from_slice(&frame[layers.l4 + 14..layers.l4 + 16]);
                p.buf[fa] |= flags & TCP_PSH;
                p.closed = payload.len() < p.mss || flags & TCP_PSH != 0;
                return;
            }
            self.flush(emit);
        }
        let mut buf = std::mem::take(&mut self.spare);
        buf.clear();
        buf.extend_from_slice(&frame[..layers.l4 + layers.l4_len(frame)]);
        self.pending = Some(Pending {
            buf,
            hdr: *hdr,
            layers,
            key: std::mem::take(&mut self.spare_key),
            next_seq: seq.wrapping_add(payload.len() as u32),
            mss: payload.len(),
            segments: 1,
            closed: flags & TCP_PSH != 0,
        });
    }

    fn mergeable(&self, hdr: &VnetHdr, frame: &[u8]) -> Option<Layers> {
        if hdr.is_gso() {
            return None;
        }
        let l = locate(frame).ok()?;
        if l.proto != PROTO_TCP {
            return None;
        }
        let flags = l.tcp_flags(frame);
        if flags & TCP_ACK == 0 || flags & !(TCP_ACK | TCP_PSH) != 0 {
            return None;
        }
        if l.ipv6 && l.l4 != l.l3 + 40 {
            return None;
        }
        if !l.ipv6 {
            // No IP options, not a fragment (locate refuses those), DF or not is irrelevant.
            if l.l4 != l.l3 + 20 {
                return None;
            }
        }
        let end = l.l4 + l.l4_len(frame);
        if end <= l.payload || end > frame.len() {
            return None;
        }
        // Merging hides individual checksums: only trusted or verified segments join.
        if !(hdr.data_valid() || hdr.needs_csum() || transport_csum_ok(frame, &l)) {
            return None;
        }
        if hdr.needs_csum() && (hdr.csum_start as usize != l.l4 || hdr.csum_offset != 16) {
            return None;
        }
        Some(l)
    }

    /// Emits the pending frame, if any.
    pub fn flush(&mut self, emit: &mut dyn FnMut(&VnetHdr, &[u8])) {
        let Some(mut p) = self.pending.take() else {
            return;
        };
        if p.segments == 1 {
            emit(&p.hdr, &p.buf);
        } else {
            let l4_len = p.buf.len() - p.layers.l4;
            p.layers.set_ip_len(&mut p.buf, l4_len);
            let pseudo = fold(p.layers.pseudo_header(&p.buf, l4_len));
            let at = p.layers.l4 + 16;
            p.buf[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
            let gso = if p.layers.ipv6 { GsoType::TcpV6 } else { GsoType::TcpV4 };
            let hdr = VnetHdr {
                flags: FLAG_NEEDS_CSUM,
                gso_type: gso.to_raw(),
                hdr_len: p.layers.payload as u16,
                gso_size: p.mss as u16,
                csum_start: p.layers.l4 as u16,
                csum_offset: 16,
                num_buffers: 0,
            };
            self.merged += u64::from(p.segments);
            emit(&hdr, &p.buf);
        }
        self.spare = p.buf;
    }
}

//! Segmentation and coalescing checked against etherparse as an independent oracle.

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use proptest::prelude::*;
use vmq_offload::{Coalescer, EgressPlan, OffloadCaps, OffloadError, finish_csum, plan_egress, segment};
use vmq_wire::VnetHdr;
use vmq_wire::checksum::fold;
use vmq_wire::ip::locate;
use vmq_wire::vnet::{FLAG_DATA_VALID, FLAG_NEEDS_CSUM, GSO_ECN, GsoType};

fn tcp_frame(v6: bool, seq: u32, payload: &[u8], psh: bool, fin: bool, cwr: bool) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let b = if v6 { b.ipv6([0xfd; 16], [0xfe; 16], 64) } else { b.ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64) };
    let mut b = b.tcp(40000, 5201, seq, 65000).ack(12345);
    if psh {
        b = b.psh();
    }
    if fin {
        b = b.fin();
    }
    if cwr {
        b = b.cwr();
    }
    let b = b
        .options(&[
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::Timestamp(1, 2),
        ])
        .unwrap();
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// A GSO frame as a guest hands it over: one big TCP packet, partial checksum.
fn gso_frame(v6: bool, payload: &[u8], mss: u16, fin: bool) -> (VnetHdr, Vec<u8>) {
    let mut f = tcp_frame(v6, 1000, payload, true, fin, true);
    let l = locate(&f).unwrap();
    let l4_len = f.len() - l.l4;
    let pseudo = fold(l.pseudo_header(&f, l4_len));
    f[l.l4 + 16..l.l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    let hdr = VnetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 }.to_raw(),
        hdr_len: l.payload as u16,
        gso_size: mss,
        csum_start: l.l4 as u16,
        csum_offset: 16,
        num_buffers: 0,
    };
    (hdr, f)
}

/// Checks a complete frame with etherparse: lengths, IPv4 header checksum, TCP checksum.
fn check_complete(frame: &[u8]) -> (u32, u8, Vec<u8>, Option<u16>) {
    let p = SlicedPacket::from_ethernet(frame).expect("etherparse parses the segment");
    let (id, tcp_sum) = match p.net.as_ref().unwrap() {
        NetSlice::Ipv4(ip) => {
            let h = ip.header().to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 header checksum");
            let Some(TransportSlice::Tcp(t)) = &p.transport else { panic!("tcp") };
            let hdr = t.to_header();
            (Some(h.identification), hdr.calc_checksum_ipv4(&h, t.payload()).unwrap())
        }
        NetSlice::Ipv6(ip) => {
            let h = ip.header().to_header();
            let Some(TransportSlice::Tcp(t)) = &p.transport else { panic!("tcp") };
            (None, t.to_header().calc_checksum_ipv6(&h, t.payload()).unwrap())
        }
        _ => panic!("ip"),
    };
    let Some(TransportSlice::Tcp(t)) = p.transport else { panic!("tcp") };
    // 0 and 0xffff are the same checksum in one's complement; like Linux's
    // skb_checksum_help (CSUM_MANGLED_0), finish_csum writes 0xffff for a computed 0.
    let written = t.checksum();
    assert!(
        written == tcp_sum || (written == 0xffff && tcp_sum == 0),
        "TCP checksum {written:#x}, expected {tcp_sum:#x}"
    );
    let flags = frame[locate(frame).unwrap().l4 + 13];
    (t.sequence_number(), flags, t.payload().to_vec(), id)
}

#[test]
fn plan_follows_caps() {
    let (h, _) = gso_frame(false, &[0; 3000], 1448, false);
    assert_eq!(plan_egress(&h, OffloadCaps::ALL), EgressPlan::AsIs);
    assert_eq!(plan_egress(&h, OffloadCaps::NONE), EgressPlan::Segment);
    assert_eq!(plan_egress(&h, OffloadCaps { tso4: false, ..OffloadCaps::ALL }), EgressPlan::Segment);
    let ecn = VnetHdr { gso_type: h.gso_type | GSO_ECN, ..h };
    assert_eq!(plan_egress(&ecn, OffloadCaps { ecn: false, ..OffloadCaps::ALL }), EgressPlan::Segment);
    let csum_only = VnetHdr { gso_type: 0, gso_size: 0, ..h };
    assert_eq!(plan_egress(&csum_only, OffloadCaps::NONE), EgressPlan::FinishCsum);
    assert_eq!(plan_egress(&csum_only, OffloadCaps::ALL), EgressPlan::AsIs);
    assert_eq!(plan_egress(&VnetHdr::default(), OffloadCaps::NONE), EgressPlan::AsIs);
}

#[test]
fn finish_csum_makes_a_valid_frame() {
    let (mut h, mut f) = gso_frame(true, &[7; 500], 1448, false);
    h.gso_type = 0;
    h.gso_size = 0;
    finish_csum(&mut h, &mut f).unwrap();
    assert_eq!(h.flags & (FLAG_NEEDS_CSUM | FLAG_DATA_VALID), FLAG_DATA_VALID);
    check_complete(&f);
    let mut bad = VnetHdr { flags: FLAG_NEEDS_CSUM, csum_start: 60, csum_offset: 16, ..Default::default() };
    assert_eq!(finish_csum(&mut bad, &mut [0u8; 70]), Err(OffloadError::Malformed));
}

#[test]
fn gso_size_has_a_floor_that_bounds_segments_per_frame() {
    use vmq_offload::{MAX_SEGMENTS, MIN_GSO_SIZE, gso_size_acceptable};
    let mut s = Vec::new();
    let mut made = 0usize;
    let mut sink = |_: &VnetHdr, _: &[u8]| made += 1;
    // 16 bytes: 4096 segments of a 64 KiB frame before the floor.
    let (h, f) = gso_frame(false, &[7; 65_000], 16, false);
    assert!(!gso_size_acceptable(&h));
    assert_eq!(segment(&h, &f, false, &mut s, &mut sink), Err(OffloadError::GsoSizeTooSmall));
    let below = VnetHdr { gso_size: MIN_GSO_SIZE - 1, ..h };
    assert_eq!(segment(&below, &f, false, &mut s, &mut sink), Err(OffloadError::GsoSizeTooSmall));
    // At the floor: accepted, and a maximal frame stays within MAX_SEGMENTS.
    let at = VnetHdr { gso_size: MIN_GSO_SIZE, ..h };
    assert!(gso_size_acceptable(&at));
    assert_eq!(segment(&at, &f, false, &mut s, &mut sink), Ok(65_000usize.div_ceil(usize::from(MIN_GSO_SIZE))));
    assert!(made <= MAX_SEGMENTS && MAX_SEGMENTS <= 745, "{made} segments, bound {MAX_SEGMENTS}");
    assert!(gso_size_acceptable(&VnetHdr::default()), "not GSO");
}

#[test]
fn bogus_gso_frames_are_errors_not_panics() {
    let (h, f) = gso_frame(false, &[1; 3000], 1448, false);
    let mut s = Vec::new();
    let mut sink = |_: &VnetHdr, _: &[u8]| {};
    assert_eq!(segment(&VnetHdr { gso_size: 0, ..h }, &f, false, &mut s, &mut sink), Err(OffloadError::Malformed));
    assert_eq!(
        segment(&VnetHdr { gso_type: GsoType::TcpV6.to_raw(), ..h }, &f, false, &mut s, &mut sink),
        Err(OffloadError::Malformed)
    );
    assert_eq!(
        segment(&VnetHdr { gso_type: GsoType::Udp.to_raw(), ..h }, &f, false, &mut s, &mut sink),
        Err(OffloadError::NotTcp)
    );
    let (hb, fb) = gso_frame(false, &[1; 5000], 1448, false);
    assert_eq!(
        segment(&VnetHdr { gso_size: 1, ..hb }, &fb, false, &mut s, &mut sink),
        Err(OffloadError::GsoSizeTooSmall)
    );
    assert_eq!(segment(&h, &f[..40], false, &mut s, &mut sink), Err(OffloadError::Malformed));
    let mut lying = f.clone();
    lying[16..18].copy_from_slice(&60000u16.to_be_bytes()); // IPv4 total length past the end
    assert_eq!(segment(&h, &lying, false, &mut s, &mut sink), Err(OffloadError::Malformed));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Segments are valid TCP packets (oracle: etherparse), and coalescing them gives back the
    /// original headers and payload.
    #[test]
    fn segment_then_coalesce_restores(v6 in any::<bool>(), len in 1usize..20000, mss in 200u16..9000, fin in any::<bool>(), partial in any::<bool>()) {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let (h, f) = gso_frame(v6, &payload, mss, fin);
        let mut scratch = Vec::new();
        let mut segs: Vec<(VnetHdr, Vec<u8>)> = Vec::new();
        let n = segment(&h, &f, partial, &mut scratch, &mut |sh, s| segs.push((*sh, s.to_vec()))).unwrap();
        prop_assert_eq!(n, len.div_ceil(mss as usize));
        let mut joined = Vec::new();
        for (i, (sh, s)) in segs.iter().enumerate() {
            let mut s = s.clone();
            let mut sh = *sh;
            prop_assert!(!sh.is_gso());
            if partial {
                prop_assert!(sh.needs_csum());
                finish_csum(&mut sh, &mut s).unwrap();
            }
            let (seq, flags, data, id) = check_complete(&s);
            prop_assert_eq!(seq, 1000 + (i * mss as usize) as u32);
            let last = i + 1 == n;
            prop_assert_eq!(flags & 0x08 != 0, last, "PSH only on the last");
            prop_assert_eq!(flags & 0x01 != 0, last && fin, "FIN only on the last");
            prop_assert_eq!(flags & 0x80 != 0, i == 0, "CWR only on the first");
            if let Some(id) = id {
                prop_assert_eq!(id, i as u16, "IPv4 ids count up from the original");
            }
            prop_assert!(data.len() <= mss as usize);
            joined.extend_from_slice(&data);
        }
        prop_assert_eq!(&joined, &payload);

        // Coalesce (without FIN/CWR segments, which never merge) and compare with the original.
        if !fin && n >= 2 {
            let mut c = Coalescer::new();
            let mut out: Vec<(VnetHdr, Vec<u8>)> = Vec::new();
            for (i, (sh, s)) in segs.iter().enumerate().skip(1) {
                let _ = i;
                c.offer(sh, s, &mut |h2, f2| out.push((*h2, f2.to_vec())));
            }
            c.flush(&mut |h2, f2| out.push((*h2, f2.to_vec())));
            // Segments 1.. (CWR-free) merge into one frame when they fit in 64 KiB.
            prop_assert_eq!(out.len(), 1);
            let (mh, mut mf) = out.pop().unwrap();
            if n > 2 {
                prop_assert_eq!(mh.gso(), Some(if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 }));
                prop_assert_eq!(mh.gso_size, mss);
                prop_assert_eq!(c.merged_segments(), (n - 1) as u64);
            }
            let mut mh2 = mh;
            finish_csum(&mut mh2, &mut mf).unwrap();
            let (seq, flags, data, _) = check_complete(&mf);
            prop_assert_eq!(seq, 1000 + u32::from(mss));
            prop_assert_eq!(flags & 0x08 != 0, true, "PSH of the last segment survives");
            prop_assert_eq!(&data[..], &payload[mss as usize..]);
            // Headers other than lengths/ids/checksums/flags equal the original's.
            let l = locate(&f).unwrap();
            prop_assert_eq!(&mf[..l.l3], &f[..l.l3]);
            prop_assert_eq!(&mf[l.l4..l.l4 + 4], &f[l.l4..l.l4 + 4]);
            prop_assert_eq!(&mf[l.l4 + 20..l.payload], &f[l.l4 + 20..l.payload], "TCP options");
        }
    }
}

#[test]
fn coalescer_keeps_flows_and_gaps_apart() {
    let seg = |seq: u32, v6: bool| {
        let f = tcp_frame(v6, seq, &[1; 100], false, false, false);
        (VnetHdr { flags: FLAG_DATA_VALID, ..Default::default() }, f)
    };
    let mut c = Coalescer::new();
    let mut out = Vec::new();
    let frames = [
        seg(0, false),
        seg(100, false),
        seg(300, false), /* gap */
        seg(400, false),
        seg(0, true), /* other flow */
    ];
    for (h, f) in &frames {
        c.offer(h, f, &mut |h2, f2| out.push((*h2, f2.len())));
    }
    c.flush(&mut |h2, f2| out.push((*h2, f2.len())));
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(out[0].0.is_gso() && out[1].0.is_gso() && !out[2].0.is_gso());
    assert_eq!(c.merged_segments(), 4);
    // A corrupt segment without DATA_VALID is not merged (and passes unchanged).
    let (_, mut bad) = seg(500, false);
    let l = locate(&bad).unwrap();
    bad[l.payload] ^= 0xff;
    let mut out = Vec::new();
    let mut c = Coalescer::new();
    c.offer(&VnetHdr::default(), &bad, &mut |h2, f2| out.push((*h2, f2.to_vec())));
    c.flush(&mut |h2, f2| out.push((*h2, f2.to_vec())));
    assert_eq!(out, vec![(VnetHdr::default(), bad)]);
}

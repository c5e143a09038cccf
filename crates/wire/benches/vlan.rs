//! 802.1Q tag edits and probes: the `vlan` helpers against the inline slicing at fixed offsets
//! that the data path used before them, same run. Each case assembles the edited frame into a
//! reused buffer, as egress does when it needs one piece.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use vmq_wire::ethernet::ETHERTYPE_VLAN;
use vmq_wire::vlan::{insert_tag_into, is_tagged, push_parts, strip_parts, tag};

fn assemble(out: &mut Vec<u8>, parts: &[&[u8]]) {
    out.clear();
    for p in parts {
        out.extend_from_slice(p);
    }
}

fn inline_push(frame: &[u8], tci: u16, out: &mut Vec<u8>) {
    let t = tci.to_be_bytes();
    let tag = [0x81, 0x00, t[0], t[1]];
    assemble(out, &[&frame[..12], &tag, &frame[12..]]);
}

fn inline_strip(frame: &[u8], out: &mut Vec<u8>) {
    if frame.len() >= 18 && frame[12..14] == [0x81, 0x00] {
        assemble(out, &[&frame[..12], &frame[16..]]);
    }
}

fn inline_insert(src: &[u8], dst: &mut [u8], tpid: u16, tci: u16) -> Option<usize> {
    if src.len() < 12 {
        return None;
    }
    let n = src.len() + 4;
    let dst = dst.get_mut(..n)?;
    dst[..12].copy_from_slice(&src[..12]);
    dst[12..14].copy_from_slice(&tpid.to_be_bytes());
    dst[14..16].copy_from_slice(&tci.to_be_bytes());
    dst[16..].copy_from_slice(&src[12..]);
    Some(n)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("vlan");
    for len in [64usize, 1514] {
        let plain: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let tagged = push_parts(&plain, &tag(10)).unwrap().concat();
        let mut out = Vec::with_capacity(len + 8);
        let mut dst = vec![0u8; len + 8];
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("push/wire", len), &plain, |b, f| {
            b.iter(|| {
                let t = tag(black_box(10));
                assemble(&mut out, &push_parts(black_box(f), &t).unwrap());
            })
        });
        g.bench_with_input(BenchmarkId::new("push/inline", len), &plain, |b, f| {
            b.iter(|| inline_push(black_box(f), black_box(10), &mut out))
        });
        g.bench_with_input(BenchmarkId::new("strip/wire", len), &tagged, |b, f| {
            b.iter(|| {
                if let Some(p) = strip_parts(black_box(f)) {
                    assemble(&mut out, &p);
                }
            })
        });
        g.bench_with_input(BenchmarkId::new("strip/inline", len), &tagged, |b, f| {
            b.iter(|| inline_strip(black_box(f), &mut out))
        });
        g.bench_with_input(BenchmarkId::new("insert/wire", len), &plain, |b, f| {
            b.iter(|| insert_tag_into(black_box(f), &mut dst, ETHERTYPE_VLAN, black_box(10)))
        });
        g.bench_with_input(BenchmarkId::new("insert/inline", len), &plain, |b, f| {
            b.iter(|| inline_insert(black_box(f), &mut dst, ETHERTYPE_VLAN, black_box(10)))
        });
    }
    let tagged: Vec<u8> = push_parts(&[7u8; 60], &tag(10)).unwrap().concat();
    g.bench_with_input("is_tagged/wire", &tagged, |b, f| b.iter(|| is_tagged(black_box(f))));
    g.bench_with_input("is_tagged/inline", &tagged, |b, f| {
        b.iter(|| {
            let f = black_box(f);
            f.len() >= 14 && f[12..14] == [0x81, 0x00]
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Internet checksum: the 8-bytes-a-step sum against a plain 2-bytes-a-step loop, same run.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use vmq_wire::checksum::{checksum, fold};

fn naive(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 { u16::from_be_bytes([c[0], c[1]]) } else { u16::from(c[0]) << 8 };
        s = s.wrapping_add(u32::from(w));
    }
    !fold(s)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    for len in [64usize, 1500, 9000] {
        let data: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("fast", len), &data, |b, d| b.iter(|| checksum(black_box(d))));
        g.bench_with_input(BenchmarkId::new("naive", len), &data, |b, d| b.iter(|| naive(black_box(d))));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! The switch's write-lock critical section under a MAC flood: one batch (32 frames) of
//! learning new addresses into a full table. Uses only `Fdb::new` and `Fdb::learn`, so the same
//! file measures older trees too (before incremental aging, each learn scanned the table).

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use vmq_core::PortId;
use vmq_core::fdb::Fdb;
use vmq_wire::MacAddr;

fn mac(i: u32, tag: u8) -> MacAddr {
    let x = i.wrapping_mul(0x9e37_79b9).to_be_bytes();
    MacAddr([0x02, tag, x[0], x[1], x[2], x[3]])
}

fn bench(c: &mut Criterion) {
    const CAPACITY: usize = 65_536;
    let mut fdb = Fdb::new(CAPACITY, 300_000_000_000);
    // Full: 16 ports with 4096 addresses each (each port within its default learning limit).
    for i in 0..CAPACITY as u32 {
        fdb.learn(mac(i, 1), 0, PortId((i % 16) as u16), 0);
    }
    assert_eq!(fdb.len(), CAPACITY);
    let mut next = 0u32;
    c.bench_function("fdb_learn_batch_of_32_into_full_table", |b| {
        b.iter_batched(
            || {
                next = next.wrapping_add(32);
                next
            },
            |first| {
                for i in first..first + 32 {
                    std::hint::black_box(fdb.learn(mac(i, 2), 0, PortId(16), 1));
                }
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

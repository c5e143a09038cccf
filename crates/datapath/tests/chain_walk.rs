//! The split-ring chain walk over guest memory a hostile guest wrote: random descriptor tables,
//! indirect tables and available rings. Checked: no panic; a chain is at most queue-size
//! descriptors (direct and indirect together); every pop consumes exactly one available entry
//! or breaks the ring once; every buffer the walk returns is read through the bounds-checked
//! guest memory API (an access outside the mapped regions would crash the test process).
//! 2,000 cases by default; `PROPTEST_CASES` sets another count (the fuzz requirement is 10k).

use proptest::prelude::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmq_datapath::driver::SplitRingDriver;
use vmq_datapath::ring::{Memory, Ring, RingError, RingState, Segment, read_guest};

/// Guest memory: 64 KiB at 0 (rings, buffers, indirect tables) and 4 KiB at 1 MiB, so that
/// buffers and tables also straddle or miss regions.
const LOW: u64 = 0x1_0000;
const HIGH: u64 = 0x10_0000;
const HIGH_LEN: u64 = 0x1000;
const TABLES: u64 = 0x8000;
const TABLE_STRIDE: u64 = 0x1000;

#[derive(Debug, Clone)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..LOW,
        (0u64..4).prop_map(|k| TABLES + k * TABLE_STRIDE),
        HIGH - 64..HIGH + HIGH_LEN + 64,
        Just(LOW - 8),
        any::<u64>(),
        Just(u64::MAX - 15),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..64, (1u32..300).prop_map(|n| n * 16), Just(4096), any::<u32>()]
}

/// Flags biased toward chains (NEXT), so that chains get long enough to hit the bounds.
fn flags() -> impl Strategy<Value = u16> {
    prop_oneof![Just(1u16), Just(3), 0u16..8]
}

fn desc(size: u16) -> impl Strategy<Value = Desc> {
    prop_oneof![
        3 => (addr(), len(), flags(), 0..size.saturating_add(3))
            .prop_map(|(addr, len, flags, next)| Desc { addr, len, flags, next }),
        // A well-formed reference to one of the indirect tables, of any entry count.
        1 => (0u64..4, 1u32..48).prop_map(|(k, n)| Desc { addr: TABLES + k * TABLE_STRIDE, len: 16 * n, flags: 4, next: 0 }),
    ]
}

/// An indirect table entry: `next` within a small table more often than not.
fn entry(size: u16) -> impl Strategy<Value = Desc> {
    (addr(), len(), flags(), prop_oneof![0u16..8, 0..size.saturating_add(48)])
        .prop_map(|(addr, len, flags, next)| Desc { addr, len, flags, next })
}

fn write_desc(mem: &Memory, at: u64, d: &Desc) {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&d.addr.to_le_bytes());
    b[8..12].copy_from_slice(&d.len.to_le_bytes());
    b[12..14].copy_from_slice(&d.flags.to_le_bytes());
    b[14..].copy_from_slice(&d.next.to_le_bytes());
    mem.write_slice(&b, GuestAddress(at)).unwrap();
}

#[derive(Debug, Clone)]
struct Case {
    size: u16,
    table: Vec<Desc>,
    indirect: Vec<Vec<Desc>>,
    heads: Vec<u16>,
    /// The available index the driver publishes (may be more than a ring ahead).
    avail_idx: u16,
}

fn case() -> impl Strategy<Value = Case> {
    (0u32..7).prop_map(|s| 1u16 << s).prop_flat_map(|size| {
        (
            Just(size),
            proptest::collection::vec(desc(size), usize::from(size)),
            proptest::collection::vec(proptest::collection::vec(entry(size), 0..48), 4),
            proptest::collection::vec(0..size.saturating_add(4), usize::from(size)),
            prop_oneof![0..=size, Just(size + 1), any::<u16>()],
        )
            .prop_map(|(size, table, indirect, heads, avail_idx)| Case {
                size,
                table,
                indirect,
                heads,
                avail_idx,
            })
    })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn chain_walk_is_bounded_and_stays_in_guest_memory(c in case()) {
        let mem = Memory::from_ranges(&[(GuestAddress(0), LOW as usize), (GuestAddress(HIGH), HIGH_LEN as usize)]).unwrap();
        let (mut driver, end) = SplitRingDriver::new(c.size, GuestAddress(0));
        prop_assert!(end.0 <= TABLES);
        driver.init(&mem).unwrap();
        let mut queue = Queue::new(c.size).unwrap();
        driver.configure(&mut queue);
        let mut state = RingState::from_queue(&queue);
        for (i, d) in c.table.iter().enumerate() {
            driver.write_raw_desc(&mem, i as u16, d.addr, d.len, d.flags, d.next);
        }
        for (k, t) in c.indirect.iter().enumerate() {
            for (i, d) in t.iter().enumerate() {
                write_desc(&mem, TABLES + k as u64 * TABLE_STRIDE + 16 * i as u64, d);
            }
        }
        for &h in &c.heads {
            driver.post_raw(&mem, h);
        }
        driver.write_raw_avail_idx(&mem, c.avail_idx);

        let size = usize::from(c.size);
        let mut ring = Ring::open(&mem, &mut state).unwrap();
        let mut segments: Vec<Segment> = Vec::new();
        let mut buf = vec![0u8; 4096];
        let mut taken = 0usize;
        let mut broke = 0usize;
        // A ring holds at most `size` chains: one more pop must find it empty or broken.
        for _ in 0..=size {
            match ring.pop(&mut segments) {
                Ok(None) => break,
                Ok(Some(head)) => {
                    taken += 1;
                    prop_assert!(usize::from(head) < size, "head {head} of a {size}-entry ring");
                    prop_assert!(!segments.is_empty() && segments.len() <= size, "{} segments", segments.len());
                    for s in &segments {
                        // What a frame copy does: guest memory says no, never crashes.
                        let n = (s.len as usize).min(buf.len());
                        let _ = read_guest(&mem, s.addr, &mut buf[..n]);
                    }
                    ring.add_used(head, 0);
                }
                Err(RingError::BadChain { head }) => {
                    taken += 1;
                    prop_assert!(segments.len() <= size, "a bad chain walked {} descriptors", segments.len());
                    ring.add_used(head, 0);
                }
                Err(RingError::BadAvailIndex) => broke += 1,
                Err(RingError::Broken) => break,
                Err(RingError::BadRing) => prop_assert!(false, "the ring is inside memory"),
            }
            prop_assert!(segments.capacity() <= 2 * size.max(4), "segment vector capacity {}", segments.capacity());
        }
        let ahead = usize::from(c.avail_idx);
        if ahead > size {
            prop_assert_eq!((taken, broke), (0, 1), "a bogus index breaks the ring once");
        } else {
            prop_assert_eq!((taken, broke), (ahead, 0), "every available chain taken exactly once");
        }
        drop(ring);
        prop_assert_eq!(state.is_broken(), ahead > size);
    }
}

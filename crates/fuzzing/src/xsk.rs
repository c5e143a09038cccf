//! `xsk_ring`: the index arithmetic and descriptor checks of vmq's AF_XDP rings
//! ([`vmq_sys::xsk_ring`]), driven by a hostile "kernel" that writes arbitrary producer and
//! consumer indices and descriptors.
//!
//! Input: a ring size exponent, a UMEM chunk count, then steps of (kind byte, u32 index,
//! u64 address, u32 length). A consumer step: the kernel's producer index is the input's;
//! vmq takes what [`consumer_ready`] allows. A producer step: the kernel's consumer index is the
//! input's; vmq fills what [`producer_free`] allows. Every step also checks a descriptor.
//!
//! Invariants: no panic; a count is never more than the ring, and an error is returned exactly
//! when the kernel's index is more than a ring away from vmq's (wrapping); every slot touched
//! is inside the ring; vmq's own index only moves by what it was allowed; a descriptor range is
//! accepted only inside the UMEM and inside one chunk, with exactly the descriptor's length; a
//! chunk base is a chunk boundary at or below the address, inside the UMEM. The multi-buffer walk
//! ([`next_frame`], options bits taken from the step's index) never looks past what is available
//! nor past one descriptor over the limit, and says Whole only for a frame that really ends
//! within the limit.

use vmq_sys::xsk_ring::{
    FrameSpan, PKT_CONTD, chunk_base, consumer_ready, desc_range, next_frame, producer_free, slot,
};

use crate::Input;

/// Chunk size used (the real one is a page; a small one makes boundaries common).
pub const FRAME: u32 = 256;

/// Runs one input.
pub fn xsk_ring(data: &[u8]) {
    let mut input = Input::new(data);
    let size = 1u32 << (input.u8() % 13);
    let chunks = u64::from(input.u8() % 64);
    let umem_len = chunks * u64::from(FRAME);
    let mut cons: u32 = input.u32();
    let mut prod: u32 = input.u32();
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        let kind = input.u8();
        let index = input.u32();
        let addr = input.u64();
        let len = input.u32() % (2 * FRAME);
        let distance = |a: u32, b: u32| a.wrapping_sub(b);
        if kind & 1 == 0 {
            // The kernel produced up to `index`; vmq consumes.
            match consumer_ready(index, cons, size) {
                Ok(n) => {
                    assert!(n <= size);
                    assert_eq!(n, distance(index, cons));
                    for k in 0..n {
                        assert!(slot(cons.wrapping_add(k), size) < size as usize);
                    }
                    cons = cons.wrapping_add(n);
                }
                Err(e) => {
                    assert!(distance(index, cons) > size, "{e}");
                }
            }
        } else {
            // The kernel consumed up to `index`; vmq produces.
            match producer_free(prod, index, size) {
                Ok(n) => {
                    assert!(n <= size);
                    assert_eq!(n, size - distance(prod, index));
                    prod = prod.wrapping_add(n);
                    assert!(distance(prod, index) <= size);
                }
                Err(_) => assert!(distance(prod, index) > size),
            }
        }
        match desc_range(addr, len, umem_len, FRAME) {
            Some(r) => {
                assert_eq!(r.start as u64, addr);
                assert_eq!(r.end - r.start, len as usize);
                assert!(r.end as u64 <= umem_len);
                if len > 0 {
                    assert_eq!(addr / u64::from(FRAME), (r.end as u64 - 1) / u64::from(FRAME), "crosses a chunk");
                }
            }
            None => {
                let fits = addr.checked_add(u64::from(len)).is_some_and(|end| {
                    end <= umem_len && (len == 0 || addr / u64::from(FRAME) == (end - 1) / u64::from(FRAME))
                });
                assert!(!fits, "a valid descriptor {addr:#x}+{len} refused");
            }
        }
        match chunk_base(addr, umem_len, FRAME) {
            Some(c) => assert!(c <= addr && c % u64::from(FRAME) == 0 && c < umem_len && addr - c < u64::from(FRAME)),
            None => assert!(addr >= umem_len),
        }
        // The multi-buffer walk: descriptor i continues its frame when bit i of the index is set.
        let options = |i: u32| if i < 32 && (index >> i) & 1 == 1 { PKT_CONTD } else { 0 };
        let available = (addr % 40) as u32;
        let max_parts = len % 6;
        let continues = |n: u32| (0..n).all(|i| options(i) & PKT_CONTD != 0);
        match next_frame(
            |i| {
                assert!(i < available && i <= max_parts, "looked at descriptor {i}");
                options(i)
            },
            available,
            max_parts,
        ) {
            FrameSpan::Whole(n) => {
                assert!(n >= 1 && n <= max_parts && n <= available);
                assert!(continues(n - 1) && options(n - 1) & PKT_CONTD == 0);
            }
            FrameSpan::TooLong(n) => assert!(n == max_parts + 1 && n <= available && continues(max_parts)),
            FrameSpan::Partial => assert!(available <= max_parts && continues(available)),
        }
    }
}

//! Aligned loads and stores of virtqueue fields (16-, 32- and 64-bit words) in a guest ring
//! area, for the device side's hot path.
//!
//! vm-memory's `VolatileSlice::load`/`store` checks bounds and alignment through several
//! layers per access (about 40 instructions for a descriptor's two words); a ring access is a
//! few a frame. [`RingWords`] keeps the area's host pointer and length, taken once per batch
//! from the `VolatileSlice`, and checks each access against them with one comparison: in
//! bounds and naturally aligned, or refused (`None`/false), never undefined. The accesses are
//! atomic, as vm-memory's: the guest writes the same memory from its vCPUs at the same time.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};

use vm_memory::VolatileSlice;

/// A guest ring area (descriptor table, available or used ring), valid while the guest memory
/// mapping it comes from is (`'m`).
#[derive(Clone, Copy)]
pub struct RingWords<'m> {
    base: *mut u8,
    len: usize,
    _mapping: PhantomData<&'m [u8]>,
}

impl std::fmt::Debug for RingWords<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingWords").field("len", &self.len).finish()
    }
}

impl<'m> RingWords<'m> {
    /// The area `slice` covers. vmq maps guest memory without a dirty bitmap and without Xen
    /// grants, so the slice's pointer is the mapping itself, valid for `'m`.
    pub fn new(slice: VolatileSlice<'m, ()>) -> RingWords<'m> {
        RingWords { base: slice.ptr_guard_mut().as_ptr(), len: slice.len(), _mapping: PhantomData }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host address of `offset`, for a prefetch hint only (never dereferenced here; any
    /// offset is fine).
    #[inline(always)]
    pub fn hint_address(&self, offset: usize) -> *const u8 {
        self.base.wrapping_add(offset).cast_const()
    }

    /// The host address of `offset` if a `size`-byte word there is inside the area and
    /// naturally aligned (in host memory, which for a mapped guest page is its guest alignment).
    #[inline(always)]
    fn word(&self, offset: usize, size: usize) -> Option<*mut u8> {
        match offset.checked_add(size) {
            Some(end) if end <= self.len => {}
            _ => return None,
        }
        let at = self.base.wrapping_add(offset);
        if (at as usize) & (size - 1) != 0 {
            return None;
        }
        Some(at)
    }

    /// The little-endian u16 at `offset`.
    #[inline(always)]
    pub fn load_u16(&self, offset: usize, order: Ordering) -> Option<u16> {
        let at = self.word(offset, 2)?;
        // SAFETY: `word` checked that [at, at + 2) lies inside the area, which `new` took from a
        // `VolatileSlice` of guest memory mapped for 'm (readable and writable), and that `at`
        // is 2-byte aligned as `AtomicU16` requires. Guest memory may change under us at any
        // time: that is why the access is atomic, never a plain reference to the value.
        let word = unsafe { AtomicU16::from_ptr(at.cast::<u16>()) };
        Some(u16::from_le(word.load(order)))
    }

    /// The little-endian u64 at `offset`.
    #[inline(always)]
    pub fn load_u64(&self, offset: usize, order: Ordering) -> Option<u64> {
        let at = self.word(offset, 8)?;
        // SAFETY: as in `load_u16`, for 8 bytes at an 8-byte aligned address.
        let word = unsafe { AtomicU64::from_ptr(at.cast::<u64>()) };
        Some(u64::from_le(word.load(order)))
    }

    /// The two little-endian u64s at `offset` and `offset + 8` (a split-ring descriptor), with
    /// one bounds and alignment check for both.
    #[inline(always)]
    pub fn load_u64_pair(&self, offset: usize, order: Ordering) -> Option<(u64, u64)> {
        match offset.checked_add(16) {
            Some(end) if end <= self.len => {}
            _ => return None,
        }
        let at = self.base.wrapping_add(offset);
        if (at as usize) & 7 != 0 {
            return None;
        }
        // SAFETY: [at, at + 16) lies inside the area (checked above), which `new` took from a
        // `VolatileSlice` of guest memory mapped for 'm; `at` and `at + 8` are 8-byte aligned
        // as `AtomicU64` requires. Atomic accesses, as in `load_u16`.
        let (first, second) =
            unsafe { (AtomicU64::from_ptr(at.cast::<u64>()), AtomicU64::from_ptr(at.add(8).cast::<u64>())) };
        Some((u64::from_le(first.load(order)), u64::from_le(second.load(order))))
    }

    /// Stores `first` and `second` little-endian at `offset` and `offset + 4` (a split ring's
    /// used entry), with one bounds and alignment check for both; false (nothing stored) if
    /// the pair is outside or misaligned.
    #[inline(always)]
    pub fn store_u32_pair(&self, offset: usize, first: u32, second: u32, order: Ordering) -> bool {
        match offset.checked_add(8) {
            Some(end) if end <= self.len => {}
            _ => return false,
        }
        let at = self.base.wrapping_add(offset);
        if (at as usize) & 3 != 0 {
            return false;
        }
        // SAFETY: [at, at + 8) lies inside the area (checked above), mapped writable for 'm;
        // `at` and `at + 4` are 4-byte aligned as `AtomicU32` requires. Atomic, as in `load_u16`.
        let (a, b) = unsafe { (AtomicU32::from_ptr(at.cast::<u32>()), AtomicU32::from_ptr(at.add(4).cast::<u32>())) };
        a.store(first.to_le(), order);
        b.store(second.to_le(), order);
        true
    }

    /// Stores `value` little-endian at `offset`; false if the word is outside or misaligned.
    #[inline(always)]
    pub fn store_u16(&self, offset: usize, value: u16, order: Ordering) -> bool {
        let Some(at) = self.word(offset, 2) else { return false };
        // SAFETY: as in `load_u16`; the mapping is writable.
        let word = unsafe { AtomicU16::from_ptr(at.cast::<u16>()) };
        word.store(value.to_le(), order);
        true
    }

    /// Stores `value` little-endian at `offset`; false if the word is outside or misaligned.
    #[inline(always)]
    pub fn store_u32(&self, offset: usize, value: u32, order: Ordering) -> bool {
        let Some(at) = self.word(offset, 4) else { return false };
        // SAFETY: as in `load_u16`, for 4 bytes at a 4-byte aligned address; writable.
        let word = unsafe { AtomicU32::from_ptr(at.cast::<u32>()) };
        word.store(value.to_le(), order);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model(bytes: &[u8], offset: usize, size: usize, base_misalign: usize) -> Option<u64> {
        let end = offset.checked_add(size)?;
        if end > bytes.len() || !(base_misalign + offset).is_multiple_of(size) {
            return None;
        }
        let mut le = [0u8; 8];
        le[..size].copy_from_slice(&bytes[offset..end]);
        Some(u64::from_le_bytes(le))
    }

    proptest! {
        /// Every access the guest's values can lead to (any offset, including past the end and
        /// near usize::MAX, any alignment of the area) is either exactly the model's in-bounds,
        /// aligned word or refused.
        #[test]
        fn loads_and_stores_are_bounds_and_alignment_checked(
            len in 0usize..64,
            skew in 0usize..8,
            accesses in prop::collection::vec((prop_oneof![0usize..80, (usize::MAX - 16)..=usize::MAX], 0u8..4, any::<u16>()), 1..64),
        ) {
            let mut bytes: Vec<u8> = (0..len + skew + 8).map(|i| (i as u8).wrapping_mul(37) ^ 0xa5).collect();
            // The area starts `skew` bytes past an 8-byte aligned address.
            let start = (8 - bytes.as_ptr() as usize % 8) % 8 + skew;
            let mut shadow = bytes[start..start + len].to_vec();
            let area = RingWords::new(VolatileSlice::from(&mut bytes[start..start + len]));
            prop_assert_eq!(area.len(), len);
            for (offset, kind, value) in accesses {
                match kind {
                    0 => prop_assert_eq!(area.load_u16(offset, Ordering::Relaxed).map(u64::from), model(&shadow, offset, 2, skew)),
                    1 => {
                        prop_assert_eq!(area.load_u64(offset, Ordering::Relaxed), model(&shadow, offset, 8, skew));
                        // A pair: both words in bounds and aligned, or refused as a whole.
                        let pair = offset.checked_add(8).and_then(|second| {
                            Some((model(&shadow, offset, 8, skew)?, model(&shadow, second, 8, skew)?))
                        });
                        prop_assert_eq!(area.load_u64_pair(offset, Ordering::Relaxed), pair);
                    }
                    2 => {
                        let second = offset.checked_add(4);
                        let expect = model(&shadow, offset, 4, skew).is_some()
                            && second.is_some_and(|s| model(&shadow, s, 4, skew).is_some());
                        let (a, b) = (u32::from(value) | 0x1100_0000, u32::from(value).rotate_left(9));
                        prop_assert_eq!(area.store_u32_pair(offset, a, b, Ordering::Relaxed), expect);
                        if expect {
                            shadow[offset..offset + 4].copy_from_slice(&a.to_le_bytes());
                            shadow[offset + 4..offset + 8].copy_from_slice(&b.to_le_bytes());
                        }
                    }
                    _ => {
                        let expect = model(&shadow, offset, 4, skew).is_some();
                        prop_assert_eq!(area.store_u32(offset, u32::from(value) << 8 | 0x5a, Ordering::Relaxed), expect);
                        if expect {
                            shadow[offset..offset + 4].copy_from_slice(&(u32::from(value) << 8 | 0x5a).to_le_bytes());
                        }
                        let expect16 = model(&shadow, offset, 2, skew).is_some();
                        prop_assert_eq!(area.store_u16(offset, value, Ordering::Relaxed), expect16);
                        if expect16 {
                            shadow[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
                        }
                    }
                }
            }
        }
    }
}

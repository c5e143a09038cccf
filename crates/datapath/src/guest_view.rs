//! Guest memory as the hot path reads and writes it: a buffer address resolved against the
//! region it was last found in, without vm-memory's per-access region search.
//!
//! `GuestMemoryMmap::get_slice` binary-searches the region list and checks the address twice
//! for every access; the hot path made three such translations per 64-byte frame (the TX
//! buffer, the next descriptor's buffer prefetched, the RX buffer), about 150 instructions.
//! Guests put nearly all buffers in one or two regions, so the region of the last hit is kept
//! (as the whole region's `VolatileSlice`) and an access inside it is one subtraction and
//! vm-memory's own bounds check of `subslice`. Everything stays bounds-checked by vm-memory: a
//! guest address outside the cached region falls back to the region search, and one outside
//! guest memory (or spanning two regions) is refused as `get_slice` refuses it.

use std::cell::Cell;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileSlice};

use crate::ring::Memory;

type Slice<'m> = VolatileSlice<'m, ()>;

/// A view of guest memory for one batch: the memory table cannot change under it (the batch
/// holds the table it was opened in), so the cached region stays valid for its life.
pub struct GuestView<'m> {
    mem: &'m Memory,
    /// The region of the last hit: its guest start address and the whole region.
    last: Cell<Option<(u64, Slice<'m>)>>,
}

impl<'m> GuestView<'m> {
    pub fn new(mem: &'m Memory) -> GuestView<'m> {
        GuestView { mem, last: Cell::new(None) }
    }

    pub fn memory(&self) -> &'m Memory {
        self.mem
    }

    /// [addr, addr + len) as one slice, if it lies inside one region (as `get_slice`).
    #[inline]
    pub fn slice(&self, addr: GuestAddress, len: usize) -> Option<Slice<'m>> {
        if let Some((start, region)) = self.last.get() {
            let offset = addr.0.wrapping_sub(start);
            if offset < region.len() as u64 {
                // In the cached region: `subslice` refuses a range running past its end.
                return region.subslice(offset as usize, len).ok();
            }
        }
        self.slice_slow(addr, len)
    }

    /// The host address of `addr` if it lies in the region of the last hit, for a prefetch hint
    /// only (never dereferenced; no region search for a hint).
    #[inline]
    pub fn hint(&self, addr: GuestAddress) -> Option<*const u8> {
        let (start, region) = self.last.get()?;
        let offset = addr.0.wrapping_sub(start);
        (offset < region.len() as u64).then(|| region.ptr_guard().as_ptr().wrapping_add(offset as usize))
    }

    #[cold]
    fn slice_slow(&self, addr: GuestAddress, len: usize) -> Option<Slice<'m>> {
        let region = self.mem.find_region(addr)?;
        let whole = region.as_volatile_slice().ok()?;
        let start = region.start_addr().0;
        self.last.set(Some((start, whole)));
        whole.subslice(usize::try_from(addr.0 - start).ok()?, len).ok()
    }

    /// Copies `buf.len()` bytes from guest memory at `addr` (possibly across regions).
    #[inline]
    pub fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> bool {
        match self.slice(addr, buf.len()) {
            Some(s) => s.copy_to(buf) == buf.len(),
            None => crate::ring::read_guest(self.mem, addr, buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vm_memory::Bytes;

    fn two_regions() -> Memory {
        // A hole between them, as below and above a PCI hole.
        Memory::from_ranges(&[(GuestAddress(0x1000), 0x4000), (GuestAddress(0x10000), 0x2000)]).unwrap()
    }

    proptest! {
        /// The cached translation answers exactly as vm-memory's region search, whatever
        /// address and length a guest writes and whatever region was cached before.
        #[test]
        fn agrees_with_get_slice(accesses in prop::collection::vec((0u64..0x14000, 0usize..0x5000), 1..40)) {
            let mem = two_regions();
            let view = GuestView::new(&mem);
            for (addr, len) in accesses {
                let ours = view.slice(GuestAddress(addr), len).map(|s| (s.ptr_guard().as_ptr() as usize, s.len()));
                let theirs = mem.get_slice(GuestAddress(addr), len).ok().map(|s| (s.ptr_guard().as_ptr() as usize, s.len()));
                prop_assert_eq!(ours, theirs, "addr {:#x} len {:#x}", addr, len);
            }
        }
    }

    #[test]
    fn edges_of_regions_and_the_address_space() {
        let mem = two_regions();
        let view = GuestView::new(&mem);
        assert!(view.slice(GuestAddress(0x1000), 0x4000).is_some(), "a whole region");
        assert!(view.slice(GuestAddress(0x1000), 0x4001).is_none(), "one byte past the end");
        assert!(view.slice(GuestAddress(0x4fff), 2).is_none(), "straddles the end");
        assert!(view.slice(GuestAddress(0x5000), 0).is_none(), "at the end: outside, as get_slice says");
        assert!(view.slice(GuestAddress(0xfff), 1).is_none(), "below the first region");
        assert!(view.slice(GuestAddress(u64::MAX), 1).is_none());
        assert!(view.slice(GuestAddress(0x11000), usize::MAX).is_none());
        assert!(view.slice(GuestAddress(0x11fff), 1).is_some(), "last byte of the second region");
        mem.write_slice(&[1, 2, 3], GuestAddress(0x10010)).unwrap();
        let mut buf = [0u8; 3];
        assert!(view.read(GuestAddress(0x10010), &mut buf));
        assert_eq!(buf, [1, 2, 3]);
        assert!(!view.read(GuestAddress(0x11fff), &mut buf), "runs off guest memory");
    }
}

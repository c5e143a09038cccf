//! A bitmap in a file mapped shared with another process: the vhost-user dirty log. During a
//! live migration QEMU hands vmq a memfd (SET_LOG_BASE) holding one bit per 4 KiB page of guest
//! physical memory; vmq sets the bit of every page it writes, QEMU reads and clears the bits
//! (atomically, on its side) and sends those pages again. Both sides touch the same bytes at
//! the same time, so every access is an atomic read-modify-write on one byte.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum SharedBitmapError {
    #[error("bitmap size must be above 0, got {0}")]
    Empty(u64),
    #[error("bitmap size {size} is above the limit of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error("bitmap offset {0} is not a multiple of the page size")]
    Unaligned(u64),
    #[error("bitmap [{offset}, +{size}) extends beyond its file ({file_len} bytes)")]
    BeyondFile { offset: u64, size: u64, file_len: u64 },
    #[error("cannot map the bitmap: {0}")]
    Map(io::Error),
}

/// A bitmap mapped read-write and shared from a file. Bits are numbered from the start of the
/// mapping, bit `n` being bit `n % 8` of byte `n / 8` (the vhost dirty-log layout).
#[derive(Debug)]
pub struct SharedBitmap {
    base: NonNull<AtomicU8>,
    len: usize,
}

// SAFETY: the mapping is only accessed through `AtomicU8`s, which are Sync; the pointer is owned
// by this value and unmapped only in Drop.
unsafe impl Send for SharedBitmap {}
// SAFETY: as above: all shared access is atomic.
unsafe impl Sync for SharedBitmap {}

impl SharedBitmap {
    /// Maps `size` bytes of `file` from `offset`. `max_size` bounds the address space a peer
    /// can make vmq reserve. The file must be at least `offset + size` bytes long now; that it
    /// stays so (no SIGBUS later) is the caller's check (seals).
    pub fn map(file: &File, offset: u64, size: u64, max_size: u64) -> Result<SharedBitmap, SharedBitmapError> {
        if size == 0 {
            return Err(SharedBitmapError::Empty(size));
        }
        if size > max_size {
            return Err(SharedBitmapError::TooLarge { size, max: max_size });
        }
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        if !offset.is_multiple_of(page) {
            return Err(SharedBitmapError::Unaligned(offset));
        }
        let file_len = file.metadata().map_err(SharedBitmapError::Map)?.len();
        if offset.checked_add(size).is_none_or(|end| end > file_len) {
            return Err(SharedBitmapError::BeyondFile { offset, size, file_len });
        }
        let len = usize::try_from(size).map_err(|_| SharedBitmapError::TooLarge { size, max: max_size })?;
        let off =
            libc::off_t::try_from(offset).map_err(|_| SharedBitmapError::BeyondFile { offset, size, file_len })?;
        // SAFETY: a new shared mapping of a file we hold, at a page-aligned offset, of a length
        // within the file (checked above); the result is checked for MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_fd().as_raw_fd(),
                off,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(SharedBitmapError::Map(io::Error::last_os_error()));
        }
        let base = NonNull::new(base.cast::<AtomicU8>()).ok_or(SharedBitmapError::Map(io::Error::other("null")))?;
        Ok(SharedBitmap { base, len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of bits.
    pub fn bits(&self) -> u64 {
        self.len as u64 * 8
    }

    fn byte(&self, index: usize) -> Option<&AtomicU8> {
        if index >= self.len {
            return None;
        }
        // SAFETY: `index < len`, inside the live mapping; AtomicU8 has the layout of u8 and any
        // byte value is valid; the reference lives no longer than `self` (the mapping).
        Some(unsafe { &*self.base.as_ptr().add(index) })
    }

    /// Sets bit `bit` atomically; false (nothing set) if it lies beyond the bitmap.
    pub fn set(&self, bit: u64) -> bool {
        let Ok(index) = usize::try_from(bit / 8) else { return false };
        match self.byte(index) {
            Some(b) => {
                b.fetch_or(1 << (bit % 8), Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Sets bits `first..=last` (clamped to the bitmap); the number of bits beyond it.
    pub fn set_range(&self, first: u64, last: u64) -> u64 {
        let mut beyond = 0;
        let mut bit = first;
        while bit <= last {
            if bit.is_multiple_of(8) && last - bit >= 7 {
                let Some(b) = usize::try_from(bit / 8).ok().and_then(|i| self.byte(i)) else {
                    return beyond + (last - bit + 1);
                };
                b.store(0xff, Ordering::Relaxed);
                bit += 8;
                continue;
            }
            if !self.set(bit) {
                beyond += 1;
            }
            bit += 1;
        }
        beyond
    }

    /// Reads bit `bit` (false beyond the bitmap).
    pub fn get(&self, bit: u64) -> bool {
        usize::try_from(bit / 8)
            .ok()
            .and_then(|i| self.byte(i))
            .is_some_and(|b| b.load(Ordering::Relaxed) & (1 << (bit % 8)) != 0)
    }
}

impl Drop for SharedBitmap {
    fn drop(&mut self) {
        // SAFETY: base/len are the mapping made in `map`, unmapped once here.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memfd;

    #[test]
    fn bits_set_through_the_mapping_show_in_the_file() {
        use std::os::unix::fs::FileExt;
        let file = memfd::create("log", 8192, 0).unwrap();
        let map = SharedBitmap::map(&file, 4096, 4096, 1 << 20).unwrap();
        assert_eq!(map.bits(), 4096 * 8);
        assert!(map.set(0) && map.set(9) && map.set(4096 * 8 - 1));
        assert!(!map.set(4096 * 8), "beyond the end");
        assert_eq!(map.set_range(16, 40), 0);
        let mut bytes = [0u8; 6];
        file.read_exact_at(&mut bytes, 4096).unwrap();
        assert_eq!(bytes, [0x01, 0x02, 0xff, 0xff, 0xff, 0x01]);
        let mut last = [0u8; 1];
        file.read_exact_at(&mut last, 8191).unwrap();
        assert_eq!(last[0], 0x80);
        assert_eq!(map.set_range(4096 * 8 - 2, 4096 * 8 + 20), 21);
        assert!(map.get(9) && !map.get(10));
    }

    #[test]
    fn nonsense_sizes_and_offsets_are_refused() {
        let file = memfd::create("log", 8192, 0).unwrap();
        assert!(matches!(SharedBitmap::map(&file, 0, 0, 1 << 20), Err(SharedBitmapError::Empty(0))));
        assert!(matches!(SharedBitmap::map(&file, 0, 1 << 21, 1 << 20), Err(SharedBitmapError::TooLarge { .. })));
        assert!(matches!(SharedBitmap::map(&file, 100, 10, 1 << 20), Err(SharedBitmapError::Unaligned(100))));
        assert!(matches!(SharedBitmap::map(&file, 4096, 8192, 1 << 20), Err(SharedBitmapError::BeyondFile { .. })));
        assert!(SharedBitmap::map(&file, u64::MAX - 4095, 8192, u64::MAX).is_err());
    }
}

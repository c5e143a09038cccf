//! The index arithmetic of AF_XDP rings (pure logic, fuzzed).
//!
//! An AF_XDP ring is a power-of-two array shared with the kernel plus two free-running `u32`
//! indices: the producer's and the consumer's. The indices wrap; the number of entries between
//! them is their wrapping difference, which can never exceed the ring size. The kernel writes
//! one of the two indices, so vmq checks every value it reads: a difference larger than the
//! ring is corruption, counted and never trusted (no out-of-bounds access follows from it).
//! Descriptors the kernel hands over (RX and completion) point into the UMEM; they are checked
//! against it before any byte is read.

/// An index difference larger than the ring: the shared indices are corrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("AF_XDP ring indices producer {producer} / consumer {consumer} exceed the ring size {size}")]
pub struct RingCorrupt {
    pub producer: u32,
    pub consumer: u32,
    pub size: u32,
}

/// Entries a consumer may take: `producer - consumer`, at most `size`.
pub fn consumer_ready(producer: u32, consumer: u32, size: u32) -> Result<u32, RingCorrupt> {
    let n = producer.wrapping_sub(consumer);
    if n > size { Err(RingCorrupt { producer, consumer, size }) } else { Ok(n) }
}

/// Free slots a producer may fill: `size - (producer - consumer)`.
pub fn producer_free(producer: u32, consumer: u32, size: u32) -> Result<u32, RingCorrupt> {
    consumer_ready(producer, consumer, size).map(|used| size - used)
}

/// The array slot of free-running index `index` (`size` a power of two).
pub fn slot(index: u32, size: u32) -> usize {
    (index & size.wrapping_sub(1)) as usize
}

/// Where a descriptor's bytes lie in a UMEM of `umem_len` bytes cut into `frame_size` chunks
/// (aligned mode): the byte range, if the descriptor stays inside one chunk.
pub fn desc_range(addr: u64, len: u32, umem_len: u64, frame_size: u32) -> Option<std::ops::Range<usize>> {
    let end = addr.checked_add(u64::from(len))?;
    if end > umem_len || frame_size == 0 {
        return None;
    }
    let chunk = addr / u64::from(frame_size);
    // A frame ends inside its chunk (multi-buffer frames come as several descriptors).
    if len > 0 && (end - 1) / u64::from(frame_size) != chunk {
        return None;
    }
    Some(usize::try_from(addr).ok()?..usize::try_from(end).ok()?)
}

/// Bit of a descriptor's `options`: more descriptors of the same frame follow (multi-buffer,
/// `XDP_PKT_CONTD`).
pub const PKT_CONTD: u32 = 1;

/// Where the frame at the head of a receive ring ends, found by [`next_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameSpan {
    /// The frame is the next `n` descriptors (the last one without [`PKT_CONTD`]).
    Whole(u32),
    /// The next `n` descriptors (one more than the limit) all continue: the frame has more parts
    /// than the caller takes. It is dropped; the caller skips its remaining parts up to and
    /// including the next [`FrameSpan::Whole`].
    TooLong(u32),
    /// The descriptors available end inside a frame: wait for the rest (the kernel publishes a
    /// frame's parts together, so this is seen only when a batch limit cut a frame).
    Partial,
}

/// Finds the end of the frame whose first descriptor is the next one: `options(i)` is the
/// options word of the i-th descriptor from there, `available` how many there are, `max_parts`
/// the most descriptors a frame may have. Looks at no more than `max_parts + 1` descriptors.
pub fn next_frame(options: impl Fn(u32) -> u32, available: u32, max_parts: u32) -> FrameSpan {
    let limit = available.min(max_parts.saturating_add(1));
    for i in 0..limit {
        if options(i) & PKT_CONTD == 0 {
            return if i < max_parts { FrameSpan::Whole(i + 1) } else { FrameSpan::TooLong(i + 1) };
        }
    }
    if limit > max_parts { FrameSpan::TooLong(limit) } else { FrameSpan::Partial }
}

/// The chunk (its base address) a UMEM address lies in; None outside the UMEM.
pub fn chunk_base(addr: u64, umem_len: u64, frame_size: u32) -> Option<u64> {
    if addr >= umem_len || frame_size == 0 {
        return None;
    }
    Some(addr - addr % u64::from(frame_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_wrap() {
        assert_eq!(consumer_ready(5, 3, 8), Ok(2));
        assert_eq!(consumer_ready(2, u32::MAX - 1, 8), Ok(4));
        assert_eq!(producer_free(2, u32::MAX - 1, 8), Ok(4));
        assert_eq!(consumer_ready(3, 3, 8), Ok(0));
        assert_eq!(producer_free(11, 3, 8), Ok(0));
        assert!(consumer_ready(12, 3, 8).is_err());
        assert!(consumer_ready(2, 3, 8).is_err(), "a consumer ahead of its producer is corrupt");
        assert_eq!(slot(9, 8), 1);
        assert_eq!(slot(u32::MAX, 8), 7);
    }

    #[test]
    fn descriptors_stay_in_their_chunk() {
        assert_eq!(desc_range(4096 + 256, 1000, 16384, 4096), Some(4352..5352));
        assert_eq!(desc_range(4096 + 256, 4000, 16384, 4096), None, "crosses into the next chunk");
        assert_eq!(desc_range(16000, 1000, 16384, 4096), None, "past the UMEM");
        assert_eq!(desc_range(u64::MAX, 10, 16384, 4096), None);
        assert_eq!(desc_range(0, 4096, 16384, 4096), Some(0..4096));
        assert_eq!(chunk_base(4096 + 300, 16384, 4096), Some(4096));
        assert_eq!(chunk_base(16384, 16384, 4096), None);
    }

    #[test]
    fn frames_of_several_descriptors_are_found_whole_or_refused() {
        let opts = |v: &'static [u32]| move |i: u32| v[i as usize];
        assert_eq!(next_frame(opts(&[0, 0]), 2, 4), FrameSpan::Whole(1));
        assert_eq!(next_frame(opts(&[1, 1, 0, 0]), 4, 4), FrameSpan::Whole(3));
        assert_eq!(next_frame(opts(&[1, 1, 1, 0]), 4, 4), FrameSpan::Whole(4), "exactly the limit");
        assert_eq!(next_frame(opts(&[1, 1, 1, 1, 0]), 5, 4), FrameSpan::TooLong(5));
        assert_eq!(next_frame(opts(&[1, 1, 1, 1, 1, 1]), 6, 4), FrameSpan::TooLong(5), "stops looking at the limit");
        assert_eq!(next_frame(opts(&[1, 1]), 2, 4), FrameSpan::Partial, "the rest is not there yet");
        assert_eq!(next_frame(opts(&[]), 0, 4), FrameSpan::Partial);
        assert_eq!(
            next_frame(opts(&[1, 0]), 2, 1),
            FrameSpan::TooLong(2),
            "single-buffer: a continued frame is too long"
        );
        assert_eq!(next_frame(opts(&[2, 0]), 2, 1), FrameSpan::Whole(1), "other option bits do not continue");
    }
}

//! CPU hints for the hot path.

/// Asks the CPU to bring the cache line holding `ptr` close (a hint: no fault, no effect on
/// program state). The ring code uses it to start the cache misses of the next chains (memory
/// another core has just written) while it copies the current one. No-op off x86_64.
#[inline(always)]
pub fn prefetch(ptr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` never dereferences its operand architecturally: any address, even an
    // unmapped one, is allowed and cannot fault. SSE is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(ptr.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

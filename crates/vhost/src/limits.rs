//! Bounds on what a frontend may hand vmq, shared by the memory table (`backend.rs`) and the
//! dirty log of a live migration (`migration.rs`).

/// Most guest memory one port maps (sum of all regions): bounds the address space a frontend
/// can make vmq reserve.
pub const MAX_GUEST_MEMORY: u64 = 1 << 40;

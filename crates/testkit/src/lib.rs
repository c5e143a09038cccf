//! Shared harness for vmq's end-to-end tests. Used only as a dev-dependency.
//!
//! - [`qemu`]: boots a Linux guest under QEMU (TCG) attached to a vhost-user socket and drives
//!   its shell over the serial console.
//! - [`qmp`]: a small QMP client (live migration).
//! - [`skip`](mod@skip): the one way a test says it could not run here; counted by `.ci/run` and
//!   fatal when `VMQ_REQUIRE_ALL=1`.
#![forbid(unsafe_code)]

pub mod qemu;
pub mod qmp;
pub mod skip;

pub use skip::skip;

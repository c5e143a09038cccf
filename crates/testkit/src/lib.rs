//! Shared harness for vmq's end-to-end tests. Used only as a dev-dependency.
//!
//! - [`qemu`]: boots a Linux guest under QEMU (TCG) attached to a vhost-user socket and drives
//!   its shell over the serial console.
#![forbid(unsafe_code)]

pub mod qemu;

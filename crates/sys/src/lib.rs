//! vmq's OS glue: the only crate with `unsafe`. Thin wrappers over the Linux interfaces the data
//! path needs, each unsafe block with a `// SAFETY:` comment:
//!
//! - [`cpu`]: cache prefetch hints for the ring code;
//! - [`netns`]: named network namespaces (as `ip netns` makes them) and running code inside one;
//! - [`link`]: interface index, MTU, MAC and up/down through ioctls;
//! - [`memfd`]: memory files and their seals (vhost-user guest memory must not shrink);
//! - [`tap`]: TAP interfaces with a 12-byte virtio-net header and kernel offloads;
//! - [`shared_bitmap`]: a bitmap shared with another process (the vhost-user dirty log);
//! - [`packet`]: AF_PACKET uplink sockets (TPACKET_V3 RX ring, virtio-net header, fanout);
//! - [`socket`]: options std's sockets lack (the IPv4 don't-fragment bit);
//! - [`steering`]: the classic-BPF program that steers uplink frames to VM queues (pure logic).
//! - [`unix_socket`]: listening Unix sockets with a set owner, group and mode; peer credentials.
//! - [`xsk`], [`xsk_ring`], [`xdp`]: AF_XDP uplink sockets (UMEM, rings), their ring index checks,
//!   and the XDP steering program (assembled in Rust) with its maps and BPF link.
//!
//! Every file descriptor is non-blocking and exposes `AsRawFd`, for the workers' epoll.

pub mod cpu;
pub mod ifname;
pub mod link;
pub mod memfd;
pub mod netns;
pub mod packet;
pub mod ring_words;
pub mod shared_bitmap;
pub mod socket;
pub mod steering;
pub mod tap;
pub mod unix_socket;
pub mod xdp;
pub mod xsk;
pub mod xsk_ring;

pub use ifname::IfNameError;

use std::io;

/// Turns a libc return value into an `io::Result`, reading errno on -1.
fn cvt<T: IsMinusOne>(ret: T) -> io::Result<T> {
    if ret.is_minus_one() { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

trait IsMinusOne {
    fn is_minus_one(&self) -> bool;
}

impl IsMinusOne for i32 {
    fn is_minus_one(&self) -> bool {
        *self == -1
    }
}

impl IsMinusOne for isize {
    fn is_minus_one(&self) -> bool {
        *self == -1
    }
}

/// Waits until `fd` is readable (or has an error/hang-up to report) or `timeout` passes; true
/// if it is. For tests and simple blocking tools; the data path uses its workers' epoll.
pub fn wait_readable(fd: &impl std::os::fd::AsRawFd, timeout: std::time::Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    loop {
        // SAFETY: one valid pollfd.
        match cvt(unsafe { libc::poll(&mut pfd, 1, ms) }) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

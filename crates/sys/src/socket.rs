//! Options of ordinary (std) sockets that std does not expose. Here: the IPv4 don't-fragment bit
//! through path-MTU discovery, so that a datagram larger than the route's MTU is refused
//! (EMSGSIZE) instead of being fragmented, as `ping -M do` does.

use std::io;
use std::os::fd::AsRawFd;

use crate::cvt;

/// Sets `IP_MTU_DISCOVER = IP_PMTUDISC_DO` on an IPv4 socket: every datagram leaves with DF
/// set, and one larger than the path MTU fails with EMSGSIZE at send.
pub fn set_dont_fragment(socket: &impl AsRawFd) -> io::Result<()> {
    let value: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: `value` is a live c_int of the size passed; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(r).map(|_| ())
}

/// True when the socket's `IP_MTU_DISCOVER` is `IP_PMTUDISC_DO` (DF on every datagram).
pub fn dont_fragment(socket: &impl AsRawFd) -> io::Result<bool> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and writable; `len` holds the size of `value`.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    cvt(r).map(|_| value == libc::IP_PMTUDISC_DO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dont_fragment_is_set_and_read_back() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(!dont_fragment(&socket).unwrap(), "a fresh UDP socket does not default to IP_PMTUDISC_DO");
        set_dont_fragment(&socket).unwrap();
        assert!(dont_fragment(&socket).unwrap());
    }
}

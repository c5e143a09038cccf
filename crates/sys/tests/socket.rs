//! The don't-fragment bit against a real kernel (root only): in a namespace whose loopback has
//! MTU 1500, a 9000-byte IPv4 datagram is fragmented and arrives whole without DF, and is refused
//! at send (EMSGSIZE) with it, as `ping -M do` is.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;
use vmq_sys::netns::Netns;
use vmq_sys::socket::{dont_fragment, set_dont_fragment};

#[test]
fn a_datagram_above_the_mtu_is_refused_with_dont_fragment_and_fragmented_without() {
    if !can_run() {
        return;
    }
    let name = unique("df");
    let ns = Netns::create(&name).expect("create");
    ip_in(&name, &["link", "set", "lo", "mtu", "1500"]);
    let (receiver, sender) = ns
        .run(|| -> std::io::Result<_> { Ok((UdpSocket::bind("127.0.0.1:0")?, UdpSocket::bind("127.0.0.1:0")?)) })
        .expect("run_in")
        .expect("bind");
    receiver.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let to = receiver.local_addr().unwrap();
    // 8972 bytes of UDP payload + 8 + 20 = a 9000-byte IPv4 packet, what the demo's jumbo probe sends.
    let payload = vec![0x5a; 8972];

    assert!(!dont_fragment(&sender).unwrap());
    assert_eq!(sender.send_to(&payload, to).unwrap(), payload.len());
    let mut buf = vec![0u8; 16_384];
    let (n, _) = receiver.recv_from(&mut buf).expect("the fragmented datagram arrives");
    assert_eq!(&buf[..n], &payload[..]);

    set_dont_fragment(&sender).unwrap();
    assert!(dont_fragment(&sender).unwrap());
    let e = sender.send_to(&payload, to).expect_err("DF and 9000 bytes over MTU 1500");
    assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE), "{e}");
    // Within the MTU it still goes.
    assert_eq!(sender.send_to(&payload[..1472], to).unwrap(), 1472);
    let (n, _) = receiver.recv_from(&mut buf).unwrap();
    assert_eq!(n, 1472);
    drop(ns);
}

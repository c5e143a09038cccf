//! TAP against a real kernel stack in a fresh network namespace (root only).

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use vmq_sys::link::LinkError;
use vmq_sys::netns::{Netns, NetnsError};
use vmq_sys::tap::{Tap, TapConfig, TapError, TapIoError, VNET_HDR_LEN};
use vmq_wire::VnetHdr;
use vmq_wire::vnet::{FLAG_NEEDS_CSUM, GsoType};

const VMQ_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x77, 0x02];

/// Reads frames from `tap` until `want` returns Some or the deadline passes. Answers ARP
/// requests for `my_ip` on the way.
fn read_until<T>(tap: &Tap, my_ip: [u8; 4], secs: u64, mut want: impl FnMut(&VnetHdr, &[u8]) -> Option<T>) -> T {
    let end = deadline(secs);
    let mut buf = vec![0u8; 65_536 + 64];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for a frame from the kernel");
        if !vmq_sys::wait_readable(tap, left).expect("poll") {
            continue;
        }
        let n = match tap.read(&mut buf) {
            Ok(n) => n,
            Err(TapIoError::WouldBlock) => continue,
            Err(e) => panic!("read: {e}"),
        };
        assert!(n >= VNET_HDR_LEN + 14, "short read {n}");
        let hdr = VnetHdr::parse(&buf[..n]).expect("vnet header");
        let frame = &buf[VNET_HDR_LEN..n];
        if let Some((1, smac, sip, tip)) = parse_arp(frame)
            && tip == my_ip
        {
            let reply = arp_reply(VMQ_MAC, my_ip, smac, sip);
            tap.write(&[&VnetHdr::default().to_bytes(), &reply]).expect("write arp reply");
            continue;
        }
        if let Some(t) = want(&hdr, frame) {
            return t;
        }
    }
}

fn tap_in(ns: &Netns, name: &str, offloads: bool, ip_cidr: &str) -> Tap {
    let mut cfg = TapConfig::new(name);
    cfg.netns = Some(ns.name().to_string());
    cfg.offloads = offloads;
    cfg.mtu = Some(1500);
    let tap = Tap::create(&cfg).expect("create tap");
    ip_in(ns.name(), &["addr", "add", ip_cidr, "dev", name]);
    tap
}

#[test]
fn arp_and_ping_through_the_kernel() {
    if !can_run() {
        return;
    }
    let ns = Netns::create(&unique("tp")).expect("netns");
    let tap = tap_in(&ns, "vqs-tap0", false, "10.77.0.1/24");
    assert_eq!(tap.link().unwrap().mtu("vqs-tap0").unwrap(), 1500);
    assert!(tap.link().unwrap().flags("vqs-tap0").unwrap().up());
    let (my_ip, kernel_ip) = ([10, 77, 0, 2], [10, 77, 0, 1]);

    tap.write(&[&VnetHdr::default().to_bytes(), &arp_request(VMQ_MAC, my_ip, kernel_ip)]).expect("write arp");
    let kernel_mac = read_until(&tap, my_ip, 5, |hdr, f| {
        let (op, smac, sip, tip) = parse_arp(f)?;
        (op == 2 && sip == kernel_ip && tip == my_ip && f[..6] == VMQ_MAC).then(|| {
            assert_eq!(*hdr, VnetHdr::default(), "an ARP reply carries an empty header");
            smac
        })
    });
    assert_eq!(kernel_mac, tap.link().unwrap().mac("vqs-tap0").unwrap());

    let req = icmp_echo_request(VMQ_MAC, kernel_mac, my_ip, kernel_ip, 0x4242, 7);
    // Write in two parts to exercise the vectored write.
    let (a, b) = req.split_at(20);
    tap.write(&[&VnetHdr::default().to_bytes(), a, b]).expect("write echo");
    read_until(&tap, my_ip, 5, |hdr, f| {
        let p = etherparse::SlicedPacket::from_ethernet(f).ok()?;
        let Some(etherparse::TransportSlice::Icmpv4(icmp)) = p.transport else { return None };
        let etherparse::Icmpv4Type::EchoReply(e) = icmp.icmp_type() else { return None };
        assert_eq!((e.id, e.seq), (0x4242, 7));
        assert_eq!(f[..6], VMQ_MAC);
        assert_eq!(hdr.gso(), Some(GsoType::None));
        assert!(!hdr.needs_csum(), "offloads off: the kernel finishes checksums");
        assert!(ipv4_checksums_ok(&f[14..]), "echo reply checksums");
        Some(())
    });
}

#[test]
fn configuration_errors_are_clear() {
    if !can_run() {
        return;
    }
    let e = Tap::create(&TapConfig::new("vqs-much-too-long-name")).unwrap_err();
    assert!(matches!(e, TapError::Name(_)), "{e:?}");
    assert!(e.to_string().contains("longer than 15 bytes"), "{e}");
    assert!(matches!(Tap::create(&TapConfig::new("")).unwrap_err(), TapError::Name(_)));

    let missing = unique("nope");
    let mut cfg = TapConfig::new("vqs-t1");
    cfg.netns = Some(missing.clone());
    let e = Tap::create(&cfg).unwrap_err();
    assert!(matches!(&e, TapError::Netns(NetnsError::NotFound(n)) if *n == missing), "{e:?}");
    assert_eq!(e.to_string(), format!("netns {missing} does not exist"));

    let ns = Netns::create(&unique("te")).expect("netns");
    let mut cfg = TapConfig::new("vqs-t1");
    cfg.netns = Some(ns.name().to_string());
    cfg.mtu = Some(70_000);
    let e = Tap::create(&cfg).unwrap_err();
    assert!(matches!(e, TapError::Link(LinkError::MtuRefused { mtu: 70_000, .. })), "{e:?}");
    assert!(e.to_string().contains("refuses MTU 70000"), "{e}");
    // The failed TAP goes with its fd: the name can be used again. (Not necessarily at once:
    // a fork by a parallel test holds a copy of the fd until its exec closes it.)
    cfg.mtu = Some(9000);
    let end = deadline(5);
    let tap = loop {
        match Tap::create(&cfg) {
            Err(TapError::InUse { .. }) if Instant::now() < end => std::thread::yield_now(),
            other => break other.expect("tap after a refused MTU"),
        }
    };
    assert_eq!(tap.link().unwrap().mtu("vqs-t1").unwrap(), 9000);
    let e = tap.link().unwrap().set_mtu("vqs-t1", 70_000).unwrap_err();
    assert!(matches!(e, LinkError::MtuRefused { .. }), "{e:?}");
    // A TAP name that is taken.
    let e = Tap::create(&cfg).unwrap_err();
    assert!(matches!(e, TapError::InUse { .. }), "{e:?}");
}

#[test]
fn create_netns_on_demand_and_delete_with_the_tap() {
    if !can_run() {
        return;
    }
    let name = unique("tn");
    let mut cfg = TapConfig::new("vqs-t2");
    cfg.netns = Some(name.clone());
    cfg.create_netns = true;
    cfg.mac = Some([0x02, 0, 0, 0, 0x12, 0x34]);
    let tap = Tap::create(&cfg).expect("tap in a new netns");
    assert!(vmq_sys::netns::exists(&name));
    assert_eq!(tap.link().unwrap().mac("vqs-t2").unwrap(), [0x02, 0, 0, 0, 0x12, 0x34]);
    drop(tap);
    assert!(!vmq_sys::netns::exists(&name), "the TAP deletes the namespace it created");
}

#[test]
fn interface_down_is_not_gone() {
    if !can_run() {
        return;
    }
    let ns = Netns::create(&unique("td")).expect("netns");
    let mut cfg = TapConfig::new("vqs-tap2");
    cfg.netns = Some(ns.name().to_string());
    cfg.up = false;
    let tap = Tap::create(&cfg).expect("tap");
    let frame = arp_request(VMQ_MAC, [1, 2, 3, 4], [1, 2, 3, 5]);
    let hdr = VnetHdr::default().to_bytes();
    let e = tap.write(&[&hdr, &frame]).unwrap_err();
    assert!(matches!(e, TapIoError::Down(_)), "write while down: {e:?}");
    tap.link().unwrap().set_up("vqs-tap2", true).unwrap();
    assert_eq!(tap.write(&[&hdr, &frame]).expect("write once up"), 12 + frame.len());
}

#[test]
fn deleted_interface_is_reported_gone() {
    if !can_run() {
        return;
    }
    let ns = Netns::create(&unique("tg")).expect("netns");
    let tap = tap_in(&ns, "vqs-tap1", false, "10.76.0.1/24");
    let mut buf = vec![0u8; 2048];
    assert!(matches!(tap.read(&mut buf), Ok(_) | Err(TapIoError::WouldBlock)));
    ip_in(ns.name(), &["link", "del", "vqs-tap1"]);
    // poll reports the detached queue at once.
    assert!(vmq_sys::wait_readable(&tap, Duration::from_secs(2)).unwrap(), "poll wakes on a deleted TAP");
    let e = tap.read(&mut buf).unwrap_err();
    assert!(matches!(e, TapIoError::Gone(_)), "read: {e:?}");
    let e =
        tap.write(&[&VnetHdr::default().to_bytes(), &arp_request(VMQ_MAC, [1, 2, 3, 4], [1, 2, 3, 5])]).unwrap_err();
    assert!(matches!(e, TapIoError::Gone(_)), "write: {e:?}");
}

/// Opens a TCP connection from inside `ns` to `peer` and writes `bytes`, then waits for `done`.
fn tcp_sender(ns: String, peer: SocketAddr, bytes: usize, done: mpsc::Receiver<()>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        vmq_sys::netns::run_in(&ns, move || {
            let mut s = TcpStream::connect_timeout(&peer, Duration::from_secs(5)).expect("connect");
            // The peer never acknowledges data: only the first window leaves. A non-blocking
            // write queues what fits the socket buffer and returns.
            s.set_nonblocking(true).expect("nonblocking");
            let data = vec![0x5a; bytes];
            let _ = s.write(&data);
            let _ = done.recv_timeout(Duration::from_secs(10));
        })
        .expect("netns");
    })
}

/// Has the kernel send a TCP burst through the TAP and returns (header, frame) of each data frame.
fn tcp_burst(offloads: bool, tag: &str, subnet: u8) -> Vec<(VnetHdr, Vec<u8>)> {
    let ns = Netns::create(&unique(tag)).expect("netns");
    let tap = tap_in(&ns, "vqs-tcp0", offloads, &format!("10.{subnet}.0.1/24"));
    let my_ip = [10, subnet, 0, 2];
    ip_in(ns.name(), &["neigh", "add", &format!("10.{subnet}.0.2"), "lladdr", &mac_str(VMQ_MAC), "dev", "vqs-tcp0"]);
    let (done_tx, done_rx) = mpsc::channel();
    let peer: SocketAddr = format!("10.{subnet}.0.2:5001").parse().unwrap();
    let sender = tcp_sender(ns.name().to_string(), peer, 256 * 1024, done_rx);
    read_until(&tap, my_ip, 5, |_, f| {
        let syn_ack = syn_ack_for(f, VMQ_MAC, 1460)?;
        tap.write(&[&VnetHdr::default().to_bytes(), &syn_ack]).expect("write syn-ack");
        Some(())
    });
    // The initial congestion window is 10 segments: collect data until that much arrived.
    let mut frames = Vec::new();
    let mut payload = 0;
    while payload < 10 * 1460 {
        let (h, f) = read_until(&tap, my_ip, 5, |h, f| tcp_payload_len(f).filter(|&n| n > 0).map(|_| (*h, f.to_vec())));
        payload += tcp_payload_len(&f).unwrap_or(0);
        frames.push((h, f));
    }
    let _ = done_tx.send(());
    sender.join().expect("sender thread");
    frames
}

#[test]
fn tcp_with_offloads_arrives_as_gso_frames() {
    if !can_run() {
        return;
    }
    let frames = tcp_burst(true, "to", 75);
    let gso: Vec<_> = frames.iter().filter(|(h, _)| h.is_gso()).collect();
    assert!(!gso.is_empty(), "no GSO frame among {} data frames", frames.len());
    for (h, f) in &gso {
        assert_eq!(h.gso(), Some(GsoType::TcpV4));
        assert_eq!(h.gso_size, 1460);
        assert!(f.len() > 1514, "a GSO frame longer than the MTU: {}", f.len());
        assert_eq!(h.flags & FLAG_NEEDS_CSUM, FLAG_NEEDS_CSUM);
        assert_eq!((h.csum_start, h.csum_offset), (34, 16));
        eprintln!("GSO frame: {} bytes, hdr_len {}", f.len(), h.hdr_len);
    }
}

#[test]
fn tcp_without_offloads_arrives_segmented_with_checksums() {
    if !can_run() {
        return;
    }
    let frames = tcp_burst(false, "tf", 74);
    assert!(frames.len() >= 10);
    for (h, f) in &frames {
        assert!(!h.is_gso(), "GSO frame with offloads off");
        assert!(!h.needs_csum(), "partial checksum with offloads off");
        assert!(f.len() <= 1514, "frame of {} bytes above the MTU", f.len());
        assert!(ipv4_checksums_ok(&f[14..]), "complete, valid checksums");
    }
}

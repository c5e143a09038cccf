//! TAP and uplink ports against real kernels in network namespaces (root only).

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use vmq_core::vmq::{FilterKey, QueueId};
use vmq_core::{DropReason, OffloadCaps};
use vmq_datapath::port::{FrameSink, FrameSource, NicSteering, Scratch};
use vmq_datapath::tap::TapPort;
use vmq_datapath::uplink::Uplink;
use vmq_sys::link::LinkCtl;
use vmq_sys::netns::Netns;
use vmq_sys::packet::{PacketSocket, RingConfig};
use vmq_sys::tap::{Tap, TapConfig};
use vmq_wire::vnet::{FLAG_NEEDS_CSUM, GsoType};
use vmq_wire::{MacAddr, VnetHdr};

/// True when the test can run (root, `ip` present); else the test is recorded as skipped (a
/// failure under `VMQ_REQUIRE_ALL=1`) and returns.
fn can_run() -> bool {
    vmq_testkit::skip::root_with_tools_or_skip(&vmq_testkit::skip::current_test(), &["ip"])
}

fn unique(tag: &str) -> String {
    format!("vqs{tag}{}", std::process::id() % 100_000)
}

fn ip_in(ns: &str, args: &[&str]) {
    let out = Command::new("ip").arg("-n").arg(ns).args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn arp_request(src_mac: [u8; 6], src_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&src_ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target_ip);
    f.resize(60, 0);
    f
}

fn udp_frame(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], dst_mac).ipv4(src, dst, 64).udp(4000, dport);
    let mut out = Vec::new();
    b.write(&mut out, b"uplink queue test").unwrap();
    out
}

/// Polls `sources` until `done` or 5 s; `visit(source index, vnet header, frame)` sees each frame.
fn collect<S: FrameSource>(
    sources: &mut [S],
    fds: &[i32],
    mut visit: impl FnMut(usize, VnetHdr, &[u8]),
    mut done: impl FnMut() -> bool,
) {
    let end = Instant::now() + Duration::from_secs(5);
    let mut scratch = Scratch::new();
    let mut errors = Vec::new();
    while !done() {
        assert!(Instant::now() < end, "timed out");
        let mut got = 0;
        for (i, s) in sources.iter_mut().enumerate() {
            scratch.clear();
            let n = s.recv(&mut scratch, 32, &mut errors);
            assert!(errors.is_empty(), "receive errors: {errors:?}");
            for k in 0..n {
                let raw = scratch.get(k);
                visit(i, VnetHdr::parse(raw).unwrap(), &raw[VnetHdr::LEN..]);
            }
            got += n;
        }
        if got == 0 {
            let fd = Fd(fds[0]);
            vmq_sys::wait_readable(&fd, Duration::from_millis(5)).unwrap();
        }
    }
}

struct Fd(i32);
impl std::os::fd::AsRawFd for Fd {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}

#[test]
fn tap_port_moves_frames_and_goes_down_with_its_interface() {
    if !can_run() {
        return;
    }
    let ns = Netns::create(&unique("dt")).expect("netns");
    let mut cfg = TapConfig::new("vqs-dtap");
    cfg.netns = Some(ns.name().to_string());
    let tap = Tap::create(&cfg).expect("tap");
    ip_in(ns.name(), &["addr", "add", "10.71.0.1/24", "dev", "vqs-dtap"]);
    let port = TapPort::new(tap);
    let (mut sink, mut source) = (port.clone(), port.clone());
    assert_eq!(sink.caps(), OffloadCaps::NONE);

    let me = [0x02, 0, 0, 0, 0x71, 0x02];
    let req = arp_request(me, [10, 71, 0, 2], [10, 71, 0, 1]);
    sink.send(&VnetHdr::default(), &[&req[..20], &req[20..]]).expect("send arp");
    let replied = std::cell::Cell::new(false);
    let fd = port.raw_fd();
    collect(
        std::slice::from_mut(&mut source),
        &[fd],
        |_, _, f| {
            if f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[..6] == me {
                replied.set(true);
            }
        },
        || replied.get(),
    );

    ip_in(ns.name(), &["link", "del", "vqs-dtap"]);
    assert_eq!(sink.send(&VnetHdr::default(), &[&req]), Err(DropReason::PortDown));
    assert!(port.is_gone());
    let mut errors = Vec::new();
    assert_eq!(source.recv(&mut Scratch::new(), 32, &mut errors), 0);
    assert!(errors.is_empty());

    let mut cfg = TapConfig::new("vqs-dtap2");
    cfg.netns = Some(ns.name().to_string());
    cfg.offloads = true;
    assert_eq!(TapPort::new(Tap::create(&cfg).expect("tap")).caps(), OffloadCaps::ALL);
}

#[test]
fn uplink_queues_follow_filters_carry_vlan_tags_and_transmit() {
    if !can_run() {
        return;
    }
    let host = Netns::create(&unique("duh")).expect("netns");
    let sw = Netns::create(&unique("dus")).expect("netns");
    ip_in(host.name(), &["link", "add", "vqs-dh0", "type", "veth", "peer", "name", "vqs-du0", "netns", sw.name()]);
    ip_in(host.name(), &["addr", "add", "10.72.0.1/24", "dev", "vqs-dh0"]);
    ip_in(host.name(), &["link", "set", "vqs-dh0", "up"]);
    ip_in(sw.name(), &["link", "set", "vqs-du0", "up"]);
    let (mac11, mac12, mac50) =
        ([0x52, 0x54, 0, 0x72, 0, 11], [0x52, 0x54, 0, 0x72, 0, 12], [0x52, 0x54, 0, 0x72, 0, 50]);
    ip_in(host.name(), &["neigh", "replace", "10.72.0.11", "lladdr", &mac_str(mac11), "dev", "vqs-dh0"]);
    ip_in(host.name(), &["neigh", "replace", "10.72.0.50", "lladdr", &mac_str(mac50), "dev", "vqs-dh0"]);
    // This kernel has no VLAN devices: tagged frames are sent by a packet socket on the host end.
    let inject = PacketSocket::open_tx("vqs-dh0", Some(host.name())).expect("inject");
    let udp = host.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();

    let ring = RingConfig { block_size: 128 * 1024, block_count: 4, retire_timeout_ms: 2 };
    let Uplink { mut queues, mut sink, mut steering } =
        Uplink::open("vqs-du0", Some(sw.name()), 2, true, ring).expect("uplink");
    assert_eq!(queues.len(), 3);
    assert_eq!(sink.caps(), OffloadCaps::ALL);
    let fds: Vec<i32> = queues.iter().map(|q| q.raw_fd()).collect();
    steering.set_filter(QueueId(1), Some(FilterKey { mac: MacAddr(mac11), vlan: 0 }));
    steering.set_filter(QueueId(2), Some(FilterKey { mac: MacAddr(mac12), vlan: 100 }));
    steering.set_filter(QueueId(9), Some(FilterKey { mac: MacAddr(mac50), vlan: 0 })); // no such queue: ignored
    assert!(steering.last_error().is_none());

    let tagged = {
        let f = udp_frame(mac12, [10, 72, 100, 1], [10, 72, 100, 12], 7100);
        let mut t = f[..12].to_vec();
        t.extend_from_slice(&[0x81, 0x00, 0x00, 100]);
        t.extend_from_slice(&f[12..]);
        t
    };
    let partial = VnetHdr { flags: FLAG_NEEDS_CSUM, csum_start: 38, csum_offset: 6, ..VnetHdr::default() };
    let send_round = || {
        for _ in 0..5 {
            udp.send_to(b"to queue 1", SocketAddr::from(([10, 72, 0, 11], 7100))).unwrap();
            inject.send(&partial.to_bytes(), &[&tagged]).unwrap();
        }
    };
    // (queue, tagged?) of each test datagram.
    let run = |queues: &mut [vmq_datapath::uplink::UplinkQueue]| {
        let mut seen: Vec<(usize, bool)> = Vec::new();
        let count = std::cell::Cell::new(0);
        collect(
            queues,
            &fds,
            |q, hdr, f| {
                let Ok(p) = etherparse::SlicedPacket::from_ethernet(f) else { return };
                let Some(etherparse::TransportSlice::Udp(u)) = &p.transport else { return };
                if u.destination_port() != 7100 {
                    return;
                }
                let is_tagged = f[12..14] == [0x81, 0x00];
                if is_tagged {
                    // The tag is back in the frame, the checksum offset moved with it.
                    assert_eq!(&f[..16], &tagged[..16]);
                    assert_eq!(f.len(), tagged.len());
                    assert!(hdr.needs_csum());
                    assert_eq!((hdr.csum_start, hdr.csum_offset), (38, 6));
                }
                seen.push((q, is_tagged));
                count.set(count.get() + 1);
            },
            || count.get() >= 10,
        );
        seen
    };
    send_round();
    let seen = run(&mut queues);
    assert_eq!(seen.iter().filter(|s| **s == (1, false)).count(), 5, "{seen:?}");
    assert_eq!(seen.iter().filter(|s| **s == (2, true)).count(), 5, "{seen:?}");

    // A tagged TCP GSO frame: whole, tag back in place, checksum start and header length moved.
    let gso_frame = {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], mac12)
            .ipv4([10, 72, 100, 1], [10, 72, 100, 12], 64)
            .tcp(4000, 7101, 1, 65535)
            .ack(1);
        let mut out = Vec::new();
        b.write(&mut out, &[0x5a; 8 * 1460]).unwrap();
        let mut t = out[..12].to_vec();
        t.extend_from_slice(&[0x81, 0x00, 0x00, 100]);
        t.extend_from_slice(&out[12..]);
        t
    };
    let gso_hdr = VnetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GsoType::TcpV4.to_raw(),
        gso_size: 1460,
        hdr_len: 58,
        csum_start: 38,
        csum_offset: 16,
        num_buffers: 0,
    };
    inject.send(&gso_hdr.to_bytes(), &[&gso_frame]).unwrap();
    let got = std::cell::RefCell::new(None);
    collect(
        &mut queues,
        &fds,
        |q, hdr, f| {
            if f.len() > 1514 {
                *got.borrow_mut() = Some((q, hdr, f.to_vec()));
            }
        },
        || got.borrow().is_some(),
    );
    let (q, hdr, f) = got.into_inner().unwrap();
    assert_eq!(q, 2);
    assert_eq!(f, gso_frame, "the frame as sent, tag included");
    assert_eq!((hdr.gso(), hdr.gso_size), (Some(GsoType::TcpV4), 1460));
    assert_eq!((hdr.csum_start, hdr.csum_offset), (38, 16));
    assert!(hdr.hdr_len == 0 || hdr.hdr_len >= 58, "hdr_len {} counts the tag", hdr.hdr_len);

    // Without its filter, queue 2's traffic goes to the default queue.
    steering.set_filter(QueueId(2), None);
    send_round();
    let seen = run(&mut queues);
    assert_eq!(seen.iter().filter(|s| **s == (1, false)).count(), 5, "{seen:?}");
    assert_eq!(seen.iter().filter(|s| **s == (0, true)).count(), 5, "{seen:?}");

    // Transmit: an echo request from "mac50"; the host's reply lands on the default queue.
    let host_mac = LinkCtl::new(Some(host.name())).unwrap().mac("vqs-dh0").unwrap();
    let b =
        PacketBuilder::ethernet2(mac50, host_mac).ipv4([10, 72, 0, 50], [10, 72, 0, 1], 64).icmpv4_echo_request(9, 1);
    let mut echo = Vec::new();
    b.write(&mut echo, b"ping through the uplink sink").unwrap();
    sink.send(&VnetHdr::default(), &[&echo[..14], &echo[14..]]).expect("send echo");
    let replied = std::cell::Cell::new(false);
    collect(
        &mut queues,
        &fds,
        |q, _, f| {
            if f[..6] == mac50 && f[12..14] == [0x08, 0x00] && f.get(34) == Some(&0) {
                assert_eq!(q, 0, "no filter for mac50: default queue");
                replied.set(true);
            }
        },
        || replied.get(),
    );
}

#[test]
fn a_full_uplink_ring_reports_the_kernels_drops() {
    if !can_run() {
        return;
    }
    let host = Netns::create(&unique("dkh")).expect("netns");
    let sw = Netns::create(&unique("dks")).expect("netns");
    ip_in(host.name(), &["link", "add", "vqs-kh0", "type", "veth", "peer", "name", "vqs-ku0", "netns", sw.name()]);
    ip_in(host.name(), &["addr", "add", "10.73.0.1/24", "dev", "vqs-kh0"]);
    // No IPv6 link-local address on either end: its DAD, router and multicast frames would
    // arrive on the uplink too and spoil the count of what was sent.
    ip_in(host.name(), &["link", "set", "vqs-kh0", "addrgenmode", "none"]);
    ip_in(sw.name(), &["link", "set", "vqs-ku0", "addrgenmode", "none"]);
    ip_in(host.name(), &["link", "set", "vqs-kh0", "up"]);
    ip_in(sw.name(), &["link", "set", "vqs-ku0", "up"]);
    ip_in(host.name(), &["neigh", "replace", "10.73.0.2", "lladdr", "52:54:00:73:00:02", "dev", "vqs-kh0"]);
    let udp = host.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    // The smallest ring: two blocks, each holding a few hundred small frames.
    let ring = RingConfig { block_size: 128 * 1024, block_count: 2, retire_timeout_ms: 2 };
    let mut queue = vmq_datapath::uplink::UplinkQueue::open_single("vqs-ku0", Some(sw.name()), ring).expect("uplink");
    // Nothing read yet: the kernel's counters start at zero.
    assert_eq!(queue.kernel_counters().drops, 0);
    // A stalled reader: flood without reading, far more frames than two blocks hold.
    let sent = 20_000u64;
    for _ in 0..sent {
        udp.send_to(&[0u8; 64], SocketAddr::from(([10, 73, 0, 2], 9))).unwrap();
    }
    // The counters are read at most every 100 ms: poll (bounded) until the reading is due.
    let deadline = Instant::now() + Duration::from_secs(5);
    let kernel = loop {
        let k = queue.kernel_counters();
        if k.drops > 0 {
            break k;
        }
        assert!(Instant::now() < deadline, "no kernel drops reported after a flood into a stalled 2-block ring");
        std::thread::sleep(Duration::from_millis(10));
    };
    // Then the reader drains what the ring held: held + dropped never exceeds what was sent.
    let mut scratch = Scratch::new();
    let mut errors = Vec::new();
    let mut received = 0u64;
    loop {
        scratch.clear();
        let n = queue.recv(&mut scratch, 32, &mut errors) as u64;
        if n == 0 && !vmq_sys::wait_readable(&Fd(queue.raw_fd()), Duration::from_millis(50)).unwrap() {
            break;
        }
        received += n;
    }
    assert!(received > 0 && received < sent, "received {received} of {sent}");
    assert!(received + kernel.drops <= sent, "received {received} + dropped {} > sent {sent}", kernel.drops);
    assert_eq!(kernel.corrupt_blocks, 0);
    println!("sent {sent}, kernel dropped {}, received {received}", kernel.drops);
}

//! AF_PACKET uplink sockets over a veth pair between two namespaces (root only): "host" has an
//! IP stack, "sw" holds vmq's sockets on the other end. This kernel has no 802.1Q devices
//! (CONFIG_VLAN_8021Q off), so VLAN-tagged traffic is injected on the host end by a packet
//! socket, tagged in the frame as a NIC without VLAN offload delivers it; the receiving kernel
//! removes the tag into metadata before packet sockets see the frame, as it does for any NIC.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use vmq_sys::link::{LinkCtl, LinkError};
use vmq_sys::netns::{Netns, NetnsError};
use vmq_sys::packet::{FanoutGroup, PacketError, PacketSocket, RingConfig, RxFrame};
use vmq_sys::steering::{SteeringRule, flow_index};
use vmq_wire::VnetHdr;
use vmq_wire::vnet::{FLAG_NEEDS_CSUM, GsoType};

const HOST_IF: &str = "vqs-h0";
const UPLINK: &str = "vqs-u0";

fn vm_mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x79, 0x00, n]
}

fn small_ring() -> RingConfig {
    RingConfig { block_size: 128 * 1024, block_count: 8, retire_timeout_ms: 2 }
}

struct Topo {
    subnet: u8,
    /// Sends hand-made frames (VLAN-tagged ones) out of the host end.
    inject: PacketSocket,
    // Dropped last: sockets opened in `sw` are declared after the topology in each test.
    host: Netns,
    sw: Netns,
}

impl Topo {
    fn new(tag: &str, subnet: u8) -> Topo {
        let host = Netns::create(&unique(&format!("{tag}h"))).expect("host netns");
        let sw = Netns::create(&unique(&format!("{tag}s"))).expect("sw netns");
        ip_in(host.name(), &["link", "add", HOST_IF, "type", "veth", "peer", "name", UPLINK, "netns", sw.name()]);
        ip_in(host.name(), &["addr", "add", &format!("10.{subnet}.0.1/24"), "dev", HOST_IF]);
        ip_in(host.name(), &["link", "set", HOST_IF, "up"]);
        ip_in(sw.name(), &["link", "set", UPLINK, "up"]);
        let inject = PacketSocket::open_tx(HOST_IF, Some(host.name())).expect("inject socket");
        Topo { subnet, inject, host, sw }
    }

    fn ip(&self, vlan: bool, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, if vlan { 100 } else { 0 }, host)
    }

    /// A static neighbour in the host namespace: `ip` is at `mac`.
    fn neigh(&self, host: u8, mac: [u8; 6]) {
        ip_in(
            self.host.name(),
            &["neigh", "replace", &self.ip(false, host).to_string(), "lladdr", &mac_str(mac), "dev", HOST_IF],
        );
    }

    /// Sends a UDP frame tagged with VLAN `vid` to `mac` / 10.S.100.`host` out of the host end.
    fn inject_tagged_udp(&self, host: u8, mac: [u8; 6], vid: u16, port: u16) {
        let f = udp_frame(
            [2, 0, 0, 0, 0, 1],
            mac,
            [10, self.subnet, 100, 1],
            self.ip(true, host).octets(),
            4000,
            port,
            b"steer me",
        );
        self.inject.send(&VnetHdr::default().to_bytes(), &[&tag(&f, vid)]).expect("inject");
    }

    fn host_udp(&self) -> UdpSocket {
        self.host.run(|| UdpSocket::bind("0.0.0.0:0")).expect("netns").expect("udp socket")
    }
}

/// `f` with an 802.1Q tag for `vid` inserted after the MAC addresses.
fn tag(f: &[u8], vid: u16) -> Vec<u8> {
    let mut t = f[..12].to_vec();
    t.extend_from_slice(&[0x81, 0x00]);
    t.extend_from_slice(&vid.to_be_bytes());
    t.extend_from_slice(&f[12..]);
    t
}

/// Polls `sockets` until `done` says so or `secs` pass; `visit(socket index, frame)` sees each frame.
fn drain(
    sockets: &mut [PacketSocket],
    secs: u64,
    mut visit: impl FnMut(usize, &RxFrame),
    mut done: impl FnMut() -> bool,
) {
    let end = deadline(secs);
    while !done() {
        assert!(Instant::now() < end, "timed out");
        let mut got = 0;
        for (i, s) in sockets.iter_mut().enumerate() {
            got += s.recv_batch(64, |f| visit(i, &f));
        }
        if got == 0 {
            // Wait for the first socket with data (bounded by the ring's block retire timeout).
            vmq_sys::wait_readable(&sockets[0], Duration::from_millis(5)).expect("poll");
        }
    }
}

/// (destination IP, UDP destination port) of an untagged-looking IPv4/UDP frame.
fn udp_dst(f: &[u8]) -> Option<(Ipv4Addr, u16)> {
    let p = etherparse::SlicedPacket::from_ethernet(f).ok()?;
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { return None };
    let Some(etherparse::TransportSlice::Udp(udp)) = &p.transport else { return None };
    Some((ip.header().destination_addr(), udp.destination_port()))
}

/// Sends `n` datagrams to each destination and returns, per (socket, destination IP, VLAN id),
/// how many arrived.
fn send_and_tally(
    topo: &Topo,
    sockets: &mut [PacketSocket],
    dests: &[Ipv4Addr],
    tagged: &[(u8, [u8; 6], u16)],
    port: u16,
    n: usize,
) -> HashMap<(usize, Ipv4Addr, u16), usize> {
    let udp = topo.host_udp();
    for _ in 0..n {
        for d in dests {
            udp.send_to(b"steer me", SocketAddr::from((*d, port))).expect("send");
        }
        for (host, mac, vid) in tagged {
            topo.inject_tagged_udp(*host, *mac, *vid, port);
        }
    }
    let mut tally = HashMap::new();
    let seen = std::cell::Cell::new(0);
    let want = n * (dests.len() + tagged.len());
    drain(
        sockets,
        5,
        |i, f| {
            assert!(!f.truncated());
            if let Some((dst, p)) = udp_dst(f.data)
                && p == port
            {
                *tally.entry((i, dst, f.vlan.map_or(0, |v| v.vid()))).or_insert(0) += 1;
                seen.set(seen.get() + 1);
            }
        },
        || seen.get() >= want,
    );
    tally
}

#[test]
fn fanout_steers_by_mac_and_vlan_and_follows_filter_changes() {
    if !can_run() {
        return;
    }
    let topo = Topo::new("fo", 81);
    let (group, mut sockets) = FanoutGroup::open(UPLINK, Some(topo.sw.name()), 4, small_ring()).expect("fanout");
    assert_eq!(sockets.len(), 4);
    assert_eq!(group.members(), 4);
    // A second group on the same uplink gets its own id (UNIQUEID), so uplinks and parallel
    // processes never join each other's groups.
    let (other, _other_sockets) = FanoutGroup::open(UPLINK, Some(topo.sw.name()), 2, small_ring()).expect("fanout 2");
    assert_ne!(group.id(), other.id());

    for n in 11..=14 {
        topo.neigh(n, vm_mac(n));
    }
    group
        .steer(&[
            SteeringRule { mac: vm_mac(11), vlan: None, index: 1 },
            SteeringRule { mac: vm_mac(12), vlan: Some(100), index: 2 },
            SteeringRule { mac: vm_mac(13), vlan: None, index: 3 },
        ])
        .expect("steer");
    let (d11, d12, d13, d14) = (topo.ip(false, 11), topo.ip(false, 12), topo.ip(false, 13), topo.ip(false, 14));
    let (v11, v12) = (topo.ip(true, 11), topo.ip(true, 12));
    let dests = [d11, d12, d13, d14];
    let tagged = [(11, vm_mac(11), 100), (12, vm_mac(12), 100)];
    let n = 20;
    let tally = send_and_tally(&topo, &mut sockets, &dests, &tagged, 7001, n);
    let expect = |tally: &HashMap<(usize, Ipv4Addr, u16), usize>, dst: Ipv4Addr, vlan: u16, socket: usize| {
        for s in 0..4 {
            let got = tally.get(&(s, dst, vlan)).copied().unwrap_or(0);
            let want = if s == socket { n } else { 0 };
            assert_eq!(got, want, "{dst} vlan {vlan}: socket {s} got {got}, expected {want} ({tally:?})");
        }
    };
    expect(&tally, d11, 0, 1);
    expect(&tally, d12, 0, 0); // MAC of a filter, but untagged: not that filter's traffic
    expect(&tally, d13, 0, 3);
    expect(&tally, d14, 0, 0);
    expect(&tally, v11, 100, 0); // MAC of the untagged filter, on VLAN 100
    expect(&tally, v12, 100, 2); // the VLAN tag is reported in metadata

    // New filters move the traffic.
    group
        .steer(&[
            SteeringRule { mac: vm_mac(14), vlan: None, index: 1 },
            SteeringRule { mac: vm_mac(12), vlan: Some(100), index: 2 },
        ])
        .expect("re-steer");
    let tally = send_and_tally(&topo, &mut sockets, &dests, &tagged, 7002, n);
    expect(&tally, d11, 0, 0);
    expect(&tally, d13, 0, 0);
    expect(&tally, d14, 0, 1);
    expect(&tally, v12, 100, 2);
    for s in &sockets {
        assert_eq!(s.corrupt_blocks(), 0);
    }
}

#[test]
fn host_sent_frames_are_not_received() {
    if !can_run() {
        return;
    }
    let topo = Topo::new("og", 82);
    let (_group, mut sockets) = FanoutGroup::open(UPLINK, Some(topo.sw.name()), 2, small_ring()).expect("fanout");
    let mut plain = PacketSocket::open_rx(UPLINK, Some(topo.sw.name()), small_ring()).expect("rx socket");
    // The sw namespace's own stack talks on the uplink: ARP and UDP from the uplink's MAC.
    let uplink_mac = LinkCtl::new(Some(topo.sw.name())).unwrap().mac(UPLINK).unwrap();
    ip_in(topo.sw.name(), &["addr", "add", "10.82.0.99/24", "dev", UPLINK]);
    let udp = topo.sw.run(|| UdpSocket::bind("10.82.0.99:0")).unwrap().unwrap();
    for _ in 0..5 {
        udp.send_to(b"from the host itself", "10.82.0.1:9").unwrap();
    }
    // The host answers ARP toward the uplink's MAC: incoming frames do arrive.
    let mut incoming = 0;
    let mut outgoing = 0;
    let mut check = |f: &RxFrame| {
        if f.data[6..12] == uplink_mac {
            outgoing += 1;
        } else if f.data[..6] == uplink_mac {
            incoming += 1;
        }
    };
    let start = Instant::now();
    drain(&mut sockets, 5, |_, f| check(f), || start.elapsed() >= Duration::from_millis(300));
    plain.recv_batch(1000, |f| check(&f));
    assert_eq!(outgoing, 0, "frames the host sent reached vmq");
    assert!(incoming > 0, "the host's replies should arrive");
}

#[test]
fn transmit_with_vnet_header_reaches_the_other_namespace() {
    if !can_run() {
        return;
    }
    let topo = Topo::new("tx", 83);
    let tx = PacketSocket::open_tx(UPLINK, Some(topo.sw.name())).expect("tx socket");
    let mut rx = [PacketSocket::open_rx(UPLINK, Some(topo.sw.name()), small_ring()).expect("rx socket")];
    let me = vm_mac(50);
    topo.neigh(50, me);
    let host_mac = LinkCtl::new(Some(topo.host.name())).unwrap().mac(HOST_IF).unwrap();
    let (my_ip, host_ip) = ([10, 83, 0, 50], [10, 83, 0, 1]);

    // An echo request, split over two parts; the kernel answers.
    let req = icmp_echo_request(me, host_mac, my_ip, host_ip, 0x77, 3);
    let (a, b) = req.split_at(30);
    let sent = tx.send(&VnetHdr::default().to_bytes(), &[a, b]).expect("send echo");
    assert_eq!(sent, req.len());
    let replied = std::cell::Cell::new(false);
    drain(
        &mut rx,
        5,
        |_, f| {
            let Ok(p) = etherparse::SlicedPacket::from_ethernet(f.data) else { return };
            if let Some(etherparse::TransportSlice::Icmpv4(icmp)) = p.transport
                && let etherparse::Icmpv4Type::EchoReply(e) = icmp.icmp_type()
                && (e.id, e.seq) == (0x77, 3)
            {
                replied.set(true);
            }
        },
        || replied.get(),
    );

    // A UDP datagram whose checksum is left to the device (NEEDS_CSUM, only the pseudo-header
    // sum in the field): the receiving stack accepts it only if the kernel took the header.
    let server = topo.host.run(|| UdpSocket::bind("10.83.0.1:6000")).unwrap().unwrap();
    server.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let payload = b"partial checksum, finished by nobody";
    let mut frame = udp_frame(me, host_mac, my_ip, host_ip, 5555, 6000, payload);
    let udp_len = (8 + payload.len()) as u32;
    let pseudo = fold(sum16(&frame[26..34], 17 + udp_len));
    frame[40..42].copy_from_slice(&pseudo.to_be_bytes());
    let hdr = VnetHdr { flags: FLAG_NEEDS_CSUM, csum_start: 34, csum_offset: 6, ..VnetHdr::default() };
    tx.send(&hdr.to_bytes(), &[&frame]).expect("send udp");
    let mut buf = [0u8; 256];
    let (n, from) = server.recv_from(&mut buf).expect("the datagram arrives");
    assert_eq!(&buf[..n], payload);
    assert_eq!(from, "10.83.0.50:5555".parse().unwrap());

    // A header the kernel rejects is an error, not a hang.
    let bad = VnetHdr { gso_type: 1, gso_size: 0, hdr_len: 54, ..VnetHdr::default() };
    assert!(tx.send(&bad.to_bytes(), &[&frame]).is_err());
}

/// Has the host's stack open a TCP connection to `dst` (at `mac`), answers the SYN through `tx`
/// and returns the data frames that arrive on `rx` (with their VLAN ids).
fn tcp_from_host(
    topo: &Topo,
    rx: &mut [PacketSocket],
    tx: &PacketSocket,
    dst: Ipv4Addr,
    mac: [u8; 6],
) -> Vec<(VnetHdr, Vec<u8>, Option<u16>)> {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let ns = topo.host.name().to_string();
    let sender = std::thread::spawn(move || {
        vmq_sys::netns::run_in(&ns, move || {
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::from((dst, 5001)), Duration::from_secs(5)).expect("connect");
            s.set_nonblocking(true).unwrap();
            let _ = std::io::Write::write(&mut s, &vec![0x5a; 256 * 1024]);
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        })
        .expect("netns");
    });
    let mut frames = Vec::new();
    let payload = std::cell::Cell::new(0);
    drain(
        rx,
        5,
        |_, f| {
            let vid = f.vlan.map(|v| v.vid());
            if let Some(syn_ack) = syn_ack_for(f.data, mac, 1460) {
                // Answer on the same VLAN the SYN came on.
                let frame = match vid {
                    Some(v) => {
                        let mut t = syn_ack[..12].to_vec();
                        t.extend_from_slice(&[0x81, 0x00]);
                        t.extend_from_slice(&v.to_be_bytes());
                        t.extend_from_slice(&syn_ack[12..]);
                        t
                    }
                    None => syn_ack,
                };
                tx.send(&VnetHdr::default().to_bytes(), &[&frame]).expect("send syn-ack");
            } else if let Some(n) = tcp_payload_len(f.data).filter(|&n| n > 0) {
                payload.set(payload.get() + n);
                frames.push((VnetHdr::parse(&f.vnet_hdr).unwrap(), f.data.to_vec(), vid));
            }
        },
        || payload.get() >= 10 * 1460,
    );
    let _ = done_tx.send(());
    sender.join().expect("sender");
    frames
}

#[test]
fn tcp_from_the_stack_arrives_with_gso_headers() {
    if !can_run() {
        return;
    }
    let topo = Topo::new("gs", 84);
    let (group, mut sockets) = FanoutGroup::open(UPLINK, Some(topo.sw.name()), 3, small_ring()).expect("fanout");
    let tx = PacketSocket::open_tx(UPLINK, Some(topo.sw.name())).expect("tx");
    topo.neigh(11, vm_mac(11));
    group
        .steer(&[
            SteeringRule { mac: vm_mac(11), vlan: None, index: 1 },
            SteeringRule { mac: vm_mac(12), vlan: Some(100), index: 2 },
        ])
        .unwrap();
    let frames = tcp_from_host(&topo, &mut sockets[1..=1], &tx, topo.ip(false, 11), vm_mac(11));
    let gso: Vec<_> = frames.iter().filter(|(h, _, _)| h.is_gso()).collect();
    assert!(!gso.is_empty(), "no GSO frame among {} data frames", frames.len());
    for (h, f, vid) in gso {
        assert_eq!(h.gso(), Some(GsoType::TcpV4));
        assert_eq!(h.gso_size, 1460);
        assert!(f.len() > 1514, "GSO frame of {} bytes", f.len());
        assert!(h.needs_csum());
        assert_eq!((h.csum_start, h.csum_offset), (34, 16));
        assert_eq!(*vid, None);
    }

    // Tagged frames: the kernel reports the checksum offsets counted from the frame without its
    // tag (which is what a caller re-inserting the tag must shift). One with a partial checksum,
    // one a TCP GSO frame (AF_PACKET transmit keeps it whole across the veth).
    let f = udp_frame([2, 0, 0, 0, 0, 1], vm_mac(12), [10, 84, 100, 1], [10, 84, 100, 12], 4000, 7000, b"partial");
    let hdr = VnetHdr { flags: FLAG_NEEDS_CSUM, csum_start: 38, csum_offset: 6, ..VnetHdr::default() };
    topo.inject.send(&hdr.to_bytes(), &[&tag(&f, 100)]).expect("inject");
    let gso_frame = {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], vm_mac(12))
            .ipv4([10, 84, 100, 1], [10, 84, 100, 12], 64)
            .tcp(4000, 7000, 1, 65535)
            .ack(1);
        let mut out = Vec::new();
        b.write(&mut out, &[0x5a; 10 * 1460]).unwrap();
        out
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
    topo.inject.send(&gso_hdr.to_bytes(), &[&tag(&gso_frame, 100)]).expect("inject gso");
    let got = std::cell::RefCell::new(Vec::new());
    drain(
        &mut sockets[2..=2],
        5,
        |_, rx| {
            let port = etherparse::SlicedPacket::from_ethernet(rx.data).ok().and_then(|p| match p.transport {
                Some(etherparse::TransportSlice::Udp(u)) => Some(u.destination_port()),
                Some(etherparse::TransportSlice::Tcp(t)) => Some(t.destination_port()),
                _ => None,
            });
            if port == Some(7000) {
                got.borrow_mut().push((VnetHdr::parse(&rx.vnet_hdr).unwrap(), rx.vlan, rx.data.len()));
            }
        },
        || got.borrow().len() >= 2,
    );
    let got = got.into_inner();
    let (h, vlan, len) = got[0];
    assert_eq!(vlan.map(|v| (v.tpid, v.vid())), Some((0x8100, 100)));
    assert_eq!(len, f.len(), "the tag is not in the frame");
    assert!(h.needs_csum());
    assert_eq!((h.csum_start, h.csum_offset), (34, 6));
    let (h, vlan, len) = got[1];
    assert_eq!(vlan.map(|v| v.vid()), Some(100));
    assert_eq!(len, gso_frame.len(), "the GSO frame arrives whole, untagged");
    assert_eq!((h.gso(), h.gso_size), (Some(GsoType::TcpV4), 1460));
    assert_eq!((h.csum_start, h.csum_offset), (34, 16));
}

#[test]
fn open_errors_are_clear() {
    if !can_run() {
        return;
    }
    let topo = Topo::new("er", 85);
    let e = PacketSocket::open_rx("vqs-missing", Some(topo.sw.name()), small_ring()).unwrap_err();
    assert!(matches!(e, PacketError::Link(LinkError::NoSuchInterface { .. })), "{e:?}");
    assert!(e.to_string().contains("vqs-missing"), "{e}");
    let missing = unique("gone");
    let e = PacketSocket::open_tx(UPLINK, Some(&missing)).unwrap_err();
    assert!(matches!(&e, PacketError::Link(LinkError::Netns(NetnsError::NotFound(_)))), "{e:?}");
    let e = FanoutGroup::open(UPLINK, Some(topo.sw.name()), 0, small_ring()).unwrap_err();
    assert!(matches!(e, PacketError::BadMembers { members: 0, .. }), "{e:?}");
    let tiny = RingConfig { block_size: 4096, ..small_ring() };
    let e = PacketSocket::open_rx(UPLINK, Some(topo.sw.name()), tiny).unwrap_err();
    assert!(matches!(e, PacketError::BadRing { .. }), "{e:?}");
}

/// VMMQ: queues sharing a MAC split its flows by the program's flow hash, in the kernel as
/// `flow_index` computes it; a key of one queue on the same program keeps all its flows.
#[test]
fn shared_key_spreads_udp_flows_over_its_members() {
    if !can_run() {
        return;
    }
    let host = Netns::create(&unique("grh")).expect("host netns");
    let sw = Netns::create(&unique("grs")).expect("sw netns");
    ip_in(host.name(), &["link", "add", "vqs-h0", "type", "veth", "peer", "name", "vqs-u0", "netns", sw.name()]);
    ip_in(host.name(), &["link", "set", "vqs-h0", "up"]);
    ip_in(sw.name(), &["link", "set", "vqs-u0", "up"]);
    let inject = PacketSocket::open_tx("vqs-h0", Some(host.name())).expect("inject");
    let ring = RingConfig { block_size: 128 * 1024, block_count: 8, retire_timeout_ms: 2 };
    let (group, mut sockets) = FanoutGroup::open("vqs-u0", Some(sw.name()), 5, ring).expect("fanout");
    let vm = [0x52, 0x54, 0, 0x79, 0, 11];
    let single = [0x52, 0x54, 0, 0x79, 0, 12];
    let rules = [
        SteeringRule { mac: vm, vlan: None, index: 3 },
        SteeringRule { mac: single, vlan: None, index: 4 },
        SteeringRule { mac: vm, vlan: None, index: 1 },
        SteeringRule { mac: vm, vlan: None, index: 2 },
    ];
    group.steer(&rules).expect("kernel takes the program");
    let flows = 48u16;
    let mut want = HashMap::new();
    for sp in 0..flows {
        for dst in [vm, single] {
            let f = udp_frame([2, 0, 0, 0, 0, 1], dst, [10, 9, 0, 1], [10, 9, 0, 2], 30000 + sp, 7000, b"flow");
            let exp = if dst == vm { [1u32, 2, 3][flow_index(&f[14..], 0x0800, 3)] } else { 4 };
            want.insert((dst, 30000 + sp), exp as usize);
            for _ in 0..2 {
                inject.send(&VnetHdr::default().to_bytes(), &[&f]).expect("inject");
            }
        }
    }
    let mut got: HashMap<([u8; 6], u16), Vec<usize>> = HashMap::new();
    let end = deadline(5);
    let mut seen = 0;
    while seen < 4 * flows as usize {
        assert!(std::time::Instant::now() < end, "timed out: {seen}");
        let mut n = 0;
        for (i, s) in sockets.iter_mut().enumerate() {
            n += s.recv_batch(64, |f| {
                let d = f.data;
                if d.len() >= 42 && d[12..14] == [8, 0] && d[23] == 17 && u16::from_be_bytes([d[36], d[37]]) == 7000 {
                    let dst: [u8; 6] = d[..6].try_into().unwrap();
                    got.entry((dst, u16::from_be_bytes([d[34], d[35]]))).or_default().push(i);
                    seen += 1;
                }
            });
        }
        if n == 0 {
            vmq_sys::wait_readable(&sockets[0], Duration::from_millis(5)).expect("poll");
        }
    }
    let mut per_socket = [0usize; 5];
    for (k, v) in &got {
        assert_eq!(v.len(), 2);
        assert!(v.iter().all(|&i| i == want[k]), "{k:?}: {v:?} want {}", want[k]);
        per_socket[v[0]] += 1;
    }
    println!("flows per socket: {per_socket:?}");
    assert_eq!(per_socket[0], 0);
    assert_eq!(per_socket[4], flows as usize);
    assert!(per_socket[1] > 0 && per_socket[2] > 0 && per_socket[3] > 0);
}

/// The kernel's verifier takes the largest programs `fanout_program` builds: pairs of queues per
/// key up to `MAX_FILTERS`, and groups of 16.
#[test]
fn kernel_takes_programs_at_the_maximum_size() {
    if !can_run() {
        return;
    }
    let sw = Netns::create(&unique("grm")).expect("sw netns");
    ip_in(sw.name(), &["link", "add", "vqs-d0", "type", "veth", "peer", "name", "vqs-d1"]);
    ip_in(sw.name(), &["link", "set", "vqs-d0", "up"]);
    let ring = RingConfig { block_size: 128 * 1024, block_count: 2, retire_timeout_ms: 2 };
    let (group, _s) = FanoutGroup::open("vqs-d0", Some(sw.name()), 17, ring).expect("fanout");
    let mac = |i: usize| [0x52, 0x54, 0, 0x12, (i >> 8) as u8, i as u8];
    let pairs: Vec<_> = (0..vmq_sys::steering::MAX_FILTERS)
        .map(|i| SteeringRule { mac: mac(i / 2), vlan: None, index: (i % 2 + 1) as u32 })
        .collect();
    group.steer(&pairs).expect("pairs");
    let big: Vec<_> =
        (0..99 * 16).map(|i| SteeringRule { mac: mac(i / 16), vlan: Some(7), index: (i % 16 + 1) as u32 }).collect();
    group.steer(&big).expect("groups of 16");
}

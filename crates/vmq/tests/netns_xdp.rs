//! End-to-end tests of the AF_XDP uplink driver (root only): `vmq run` with `driver = "af_xdp"`
//! on a veth to an "external" namespace, TAP hosts behind vmq, in native and generic XDP mode.
//! Like `netns.rs` (which covers the AF_PACKET uplink), each test builds its own namespaces and
//! a Drop guard removes them, also when a test fails.

mod support;

use std::time::Duration;

use support::*;

const MIB: usize = 1024 * 1024;

/// Namespace `ext` with 10.0.0.100 on a veth whose peer, in namespace `sw`, is vmq's uplink.
struct External {
    sw: Ns,
    ext: Ns,
    up_if: String,
    ext_if: String,
    ip: String,
    mac: String,
}

impl External {
    fn new(prefix: &str) -> External {
        let sw = Ns::new(&format!("{prefix}s"));
        let ext = Ns::new(&format!("{prefix}x"));
        let (up_if, ext_if) = (format!("{prefix}u"), format!("{prefix}x"));
        veth(&sw, &up_if, &ext, &ext_if);
        let ip = "10.0.0.100".to_string();
        ext.ip(&["addr", "add", &format!("{ip}/24"), "dev", &ext_if]);
        let mac = ext.mac(&ext_if);
        External { sw, ext, up_if, ext_if, ip, mac }
    }

    /// The uplink port with the AF_XDP driver in `xdp_mode`.
    fn port(&self, name: &str, xdp_mode: &str, extra: &str) -> String {
        let keys = format!("driver = \"af_xdp\"\nxdp_mode = \"{xdp_mode}\"\nzero_copy = \"auto\"\n{extra}");
        uplink_port(name, &self.up_if, &self.sw, &keys)
    }

    fn knows(&self, host: &TapHost) {
        self.ext.neigh(&self.ext_if, &host.ip, &host.mac);
        host.ns.neigh(&host.ifname, &self.ip, &self.mac);
    }
}

/// Ping and TCP with verified data between the external host and TAP hosts, and proof that the
/// frames for a VM-queue port arrived on its own AF_XDP socket (vmq mode), not the default one.
fn connectivity(mode: &str, xdp_mode: &str, tag: &str) {
    if !can_run() {
        return;
    }
    let p = unique(tag);
    let a = TapHost::new(&p, "a", 1);
    let b = TapHost::new(&p, "b", 2);
    let x = External::new(&p);
    if xdp_mode == "generic" {
        // Generic XDP sees a local sender's GSO frames whole, larger than a UMEM chunk (native
        // mode on a veth makes the peer segment; a NIC's GRO is off under XDP): the external
        // host segments, as the documentation asks of a veth peer in generic mode.
        let out = x.ext.exec(&["ethtool", "-K", &x.ext_if, "tso", "off", "gso", "off"], WAIT);
        assert!(out.status.success(), "{out:?}");
    }
    let vmq =
        Vmq::start(&p, &[switch_section(mode), x.port("up0", xdp_mode, ""), a.port("a", ""), b.port("b", "")].concat());
    assert!(vmq.log().contains("uplink driver: af_xdp"), "{}", vmq.log());
    let (_, ports, _) = vmq.ctl_raw(&["ports"]);
    assert!(ports.contains(r#""driver":"af_xdp""#), "{ports}");
    a.address();
    b.address();

    assert!(x.ext.ping(&a.ip, 3, &[]), "external -> TAP a (ARP through the default socket)");
    assert!(b.ns.ping(&x.ip, 3, &[]), "TAP b -> external");
    x.knows(&a);
    let data = random_bytes(4 * MIB);
    tcp_transfer(&x.ext, &a.ns, &a.ip, &data).assert_intact();
    tcp_transfer(&b.ns, &x.ext, &x.ip, &data).assert_intact();

    let (sa, su) = (vmq.stats("a"), vmq.stats("up0"));
    assert!(sa.tx_bytes >= data.len() as u64, "{sa:?}");
    assert!(su.tx_bytes >= data.len() as u64 && su.rx_bytes >= data.len() as u64, "{su:?}");
    let queues = vmq.queues();
    let on_up0: Vec<_> = queues.nic_queues.iter().filter(|q| q.uplink == "up0").collect();
    if mode == "vmq" {
        let vm_queue = on_up0.iter().find(|q| q.port.as_deref() == Some("a")).expect("a's NIC queue");
        // The transfer to a is ~3000 frames; the default queue saw only ARP and b's stream.
        assert!(vm_queue.rx_packets > 1000, "a's frames did not come through its own socket: {queues:?}");
    } else {
        assert_eq!(on_up0.len(), 1, "switch mode: the default socket only: {queues:?}");
    }
}

#[test]
fn af_xdp_ping_and_tcp_vmq_mode_native() {
    connectivity("vmq", "native", "xn");
}

#[test]
fn af_xdp_ping_and_tcp_vmq_mode_generic() {
    connectivity("vmq", "generic", "xg");
}

#[test]
fn af_xdp_ping_and_tcp_switch_mode_native() {
    connectivity("switch", "native", "xs");
}

/// Jumbo frames take several UMEM chunks (multi-buffer): at MTU 9000 pings and TCP with
/// verified data pass both ways through the AF_XDP uplink, the frames counted on the uplink
/// are larger than one chunk, and a jumbo frame toward a 1500 port is dropped and counted.
fn jumbo(xdp_mode: &str, tag: &str) {
    if !can_run() {
        return;
    }
    let p = unique(tag);
    let a = TapHost::new(&p, "a", 1);
    let s = TapHost::new(&p, "s", 2);
    let x = External::new(&p);
    x.ext.ip(&["link", "set", &x.ext_if, "mtu", "9000"]);
    if xdp_mode == "generic" {
        // As in `connectivity`: generic XDP would see the peer's GSO frames whole.
        let out = x.ext.exec(&["ethtool", "-K", &x.ext_if, "tso", "off", "gso", "off"], WAIT);
        assert!(out.status.success(), "{out:?}");
    }
    let vmq = Vmq::start(
        &p,
        &[switch_section("vmq"), x.port("up0", xdp_mode, "mtu = 9000"), a.port("a", "mtu = 9000"), s.port("s", "")]
            .concat(),
    );
    assert!(vmq.log().contains("uplink driver: af_xdp"), "{}", vmq.log());
    assert!(vmq.log().contains("multi_buffer=true"), "{}", vmq.log());
    a.address();
    s.address();
    let jumbo_ping = ["-M", "do", "-s", "8972"];
    let up0 = vmq.stats("up0");
    assert!(x.ext.ping(&a.ip, 3, &jumbo_ping), "9000-byte pings external -> a and back");
    assert!(a.ns.ping(&x.ip, 3, &jumbo_ping), "9000-byte pings a -> external and back");
    let up1 = vmq.stats("up0");
    // Six 9014-byte frames each way at least (ARP aside).
    assert!(up1.rx_bytes - up0.rx_bytes >= 6 * 9014, "{up0:?} {up1:?}");
    assert!(up1.tx_bytes - up0.tx_bytes >= 6 * 9014, "{up0:?} {up1:?}");

    x.knows(&a);
    let data = random_bytes(4 * MIB);
    tcp_transfer(&x.ext, &a.ns, &a.ip, &data).assert_intact();
    tcp_transfer(&a.ns, &x.ext, &x.ip, &data).assert_intact();

    // Toward the 1500 port a jumbo frame is dropped and counted, never cut.
    let s0 = vmq.stats("s");
    assert!(x.ext.ping_fails(&s.ip, 2, &jumbo_ping), "a jumbo frame reached the 1500 port");
    vmq.wait_stats("s", |c| drops(c, "oversize") >= drops(&s0, "oversize") + 2);
}

#[test]
fn af_xdp_jumbo_frames_multi_buffer_native() {
    jumbo("native", "xjn");
}

#[test]
fn af_xdp_jumbo_frames_multi_buffer_generic() {
    jumbo("generic", "xjg");
}

/// A TAP host `a`, and a veth with two queues per end from the switch namespace (`up_if`) to an
/// external host (`ext_if`, address `ext_ip`).
struct TwoQueueUplink {
    a: TapHost,
    sw: Ns,
    ext: Ns,
    up_if: String,
    ext_if: String,
    ext_ip: &'static str,
}

impl TwoQueueUplink {
    fn new(p: &str) -> TwoQueueUplink {
        let a = TapHost::new(p, "a", 1);
        let sw = Ns::new(&format!("{p}s"));
        let ext = Ns::new(&format!("{p}x"));
        let (up_if, ext_if) = (format!("{p}u"), format!("{p}x"));
        veth_with_queues(&sw, &up_if, &ext, &ext_if, 2);
        let ext_ip = "10.0.0.100";
        ext.ip(&["addr", "add", &format!("{ext_ip}/24"), "dev", &ext_if]);
        TwoQueueUplink { a, sw, ext, up_if, ext_if, ext_ip }
    }
}

/// An interface with two receive queues gets a socket set on each (an AF_XDP socket only
/// receives the frames of the queue it is bound to): TCP connections the external host spreads
/// over its two transmit queues (one queue per connection, by its hash) arrive on both of the
/// uplink's receive queues, each on VM queue a's socket of that queue, and all data is intact.
#[test]
fn af_xdp_socket_set_per_receive_queue() {
    if !can_run() {
        return;
    }
    let p = unique("xq");
    let TwoQueueUplink { a, sw, ext, up_if, ext_if, ext_ip } = TwoQueueUplink::new(&p);
    let keys = "driver = \"af_xdp\"\nxdp_mode = \"native\"\n";
    let vmq = Vmq::start(&p, &[switch_section("vmq"), uplink_port("up0", &up_if, &sw, keys), a.port("a", "")].concat());
    assert!(vmq.log().contains("rx_queues=[0, 1]"), "{}", vmq.log());
    a.address();
    assert!(ext.ping(&a.ip, 2, &[]), "external -> a");
    ext.neigh(&ext_if, &a.ip, &a.mac);
    a.ns.neigh(&a.ifname, ext_ip, &ext.mac(&ext_if));
    // 16 connections: all on one transmit queue by chance has a probability of 2^-15.
    for _ in 0..16 {
        tcp_transfer(&ext, &a.ns, &a.ip, &random_bytes(MIB / 4)).assert_intact();
    }
    let report = vmq.queues();
    let a_queue: Vec<_> =
        report.nic_queues.iter().filter(|q| q.uplink == "up0" && q.port.as_deref() == Some("a")).collect();
    for rxq in [0, 1] {
        let on = a_queue
            .iter()
            .find(|q| q.rx_queue == Some(rxq))
            .unwrap_or_else(|| panic!("no socket on rx queue {rxq}: {report:?}"));
        assert!(on.rx_packets > 50, "receive queue {rxq} brought a's frames in through its own socket: {report:?}");
    }
}

/// Sends everything `ns` transmits on `ifname` out of transmit queue `queue` (XPS: every CPU
/// mapped to that queue, none to the others). On a veth, the peer receives on the queue of the
/// same number.
fn send_on_queue(ns: &Ns, ifname: &str, queues: u32, queue: u32) {
    for q in 0..queues {
        // Every online CPU, as a hex mask (bits beyond them are refused).
        let cpus = if q == queue { "$(printf %x $(( (1 << $(nproc --all)) - 1 )))" } else { "0" };
        let path = format!("/sys/class/net/{ifname}/queues/tx-{q}/xps_cpus");
        let out = ns.exec(&["sh", "-c", &format!("echo {cpus} > {path}")], Duration::from_secs(5));
        assert!(out.status.success(), "{path}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `xdp_queues = [1]`: vmq takes over receive queue 1 only. Frames arriving there reach the VM
/// (a ping and verified TCP); frames the external host sends on queue 0 stay with the switch
/// namespace's kernel and never reach vmq. A queue the interface does not have is refused at
/// start, with the count.
#[test]
fn af_xdp_takes_only_the_listed_receive_queues() {
    if !can_run() {
        return;
    }
    let p = unique("xl");
    let TwoQueueUplink { a, sw, ext, up_if, ext_if, ext_ip } = TwoQueueUplink::new(&p);

    let keys = |queues: &str| format!("driver = \"af_xdp\"\nxdp_mode = \"native\"\nxdp_queues = {queues}\n");
    let refused = Vmq::expect_failure(
        &p,
        &[switch_section("vmq"), uplink_port("up0", &up_if, &sw, &keys("[2]")), a.port("a", "")].concat(),
    );
    assert!(
        refused.stderr.contains("xdp_queues lists receive queue 2") && refused.stderr.contains("has 2"),
        "{}",
        refused.stderr
    );

    let vmq = Vmq::start(
        &p,
        &[switch_section("vmq"), uplink_port("up0", &up_if, &sw, &keys("[1]")), a.port("a", "")].concat(),
    );
    assert!(vmq.log().contains("rx_queues=[1]"), "{}", vmq.log());
    let report = vmq.queues();
    let sockets: Vec<_> = report.nic_queues.iter().filter(|q| q.uplink == "up0").collect();
    assert!(!sockets.is_empty() && sockets.iter().all(|q| q.rx_queue == Some(1)), "{report:?}");
    a.address();
    ext.neigh(&ext_if, &a.ip, &a.mac);
    a.ns.neigh(&a.ifname, ext_ip, &ext.mac(&ext_if));

    send_on_queue(&ext, &ext_if, 2, 1);
    assert!(ext.ping(&a.ip, 3, &[]), "external -> a on receive queue 1");
    tcp_transfer(&ext, &a.ns, &a.ip, &random_bytes(MIB)).assert_intact();

    send_on_queue(&ext, &ext_if, 2, 0);
    let before = vmq.stats("up0").rx_packets;
    assert!(ext.ping_fails(&a.ip, 3, &[]), "frames on receive queue 0 reached a: vmq took a queue it was not given");
    assert_eq!(vmq.stats("up0").rx_packets, before, "vmq received frames of receive queue 0");
}

/// `auto` picks AF_XDP on a veth with a standard MTU.
#[test]
fn auto_picks_af_xdp_where_it_works() {
    if !can_run() {
        return;
    }
    let p = unique("xa");
    let a = TapHost::new(&p, "a", 1);
    let x = External::new(&p);
    let auto = uplink_port("up0", &x.up_if, &x.sw, "driver = \"auto\"\nxdp_mode = \"generic\"");
    let vmq = Vmq::start(&p, &[switch_section("vmq"), auto, a.port("a", "")].concat());
    assert!(vmq.log().contains("uplink driver: af_xdp"), "{}", vmq.log());
    a.address();
    assert!(x.ext.ping(&a.ip, 3, &[]));
}

/// VLANs through the AF_XDP uplink (a trunk of 10 and 20): tagged frames the external host
/// sends reach the TAP of their VLAN and never one of the other, whether they hit a VM queue's
/// map entry (MAC + VLAN) or fall through to the default queue and the switch.
fn vlans(xdp_mode: &str, tag: &str) {
    if !can_run() {
        return;
    }
    let p = unique(tag);
    let a = TapHost::new(&p, "a", 1);
    let c = TapHost::new(&p, "c", 3);
    let x = External::new(&p);
    let vmq = Vmq::start(
        &p,
        &[
            switch_section("vmq"),
            x.port("up0", xdp_mode, "trunk = [10, 20]"),
            a.port("a", "vlan = 10"),
            c.port("c", "vlan = 20"),
        ]
        .concat(),
    );
    let (a0, c0) = (vmq.stats("a"), vmq.stats("c"));
    let tagged = |dst: &str, vid: u8| ethernet(dst, &x.mac, 0x8100, &[0x00, vid, 0x88, 0xb5, 1, 2, 3, 4]);
    // To a on its VLAN (its VM queue), to a on VLAN 20 (wrong VLAN), to c on VLAN 20.
    let mut frames = vec![tagged(&a.mac, 10); 5];
    frames.extend(vec![tagged(&a.mac, 20); 4]);
    frames.extend(vec![tagged(&c.mac, 20); 3]);
    inject(&x.ext, &x.ext_if, &frames);
    // c gets its 3 and the 4 to a's MAC on VLAN 20: unknown there, so flooded in VLAN 20.
    let c1 = vmq.wait_stats("c", |s| s.tx_packets >= c0.tx_packets + 7);
    let a1 = vmq.wait_stats("a", |s| s.tx_packets >= a0.tx_packets + 5);
    let up = vmq.wait_stats("up0", |s| s.rx_packets >= 12);
    assert_eq!(a1.tx_packets, a0.tx_packets + 5, "a got a frame of VLAN 20: {a1:?} {up:?}");
    assert_eq!(c1.tx_packets, c0.tx_packets + 7, "{c1:?}");
    // a's VLAN 10 frames matched its map entry: they came through a's own socket.
    let queues = vmq.queues();
    let vm_queue = queues.nic_queues.iter().find(|q| q.uplink == "up0" && q.port.as_deref() == Some("a"));
    assert!(vm_queue.is_some_and(|q| q.rx_packets == 5), "{queues:?}");
}
#[test]
fn af_xdp_vlans_stay_apart_native() {
    vlans("native", "xv");
}

#[test]
fn af_xdp_vlans_stay_apart_generic() {
    vlans("generic", "xw");
}

/// Frames read from the uplink's queue that port `port` holds (None: the default queue).
fn queue_frames(vmq: &Vmq, port: Option<&str>) -> u64 {
    let q = vmq.queues();
    q.nic_queues
        .iter()
        .filter(|n| n.uplink == "up0" && if port.is_some() { n.port.as_deref() == port } else { n.queue == 0 })
        .map(|n| n.rx_packets)
        .sum()
}

/// VM queues move at run time (`vmq ctl set queues`): the XDP program's map follows, so b's
/// frames come through the default socket while b has no queue and through b's socket once it
/// has one again.
#[test]
fn af_xdp_map_follows_run_time_queue_moves() {
    if !can_run() {
        return;
    }
    let p = unique("xm");
    let a = TapHost::new(&p, "a", 1);
    let b = TapHost::new(&p, "b", 2);
    let x = External::new(&p);
    let section = "[switch]\nmode = \"vmq\"\nworkers = 2\n\n[vmq]\nqueues = 2\npolicy = \"static\"\n\n";
    let vmq =
        Vmq::start(&p, &[section.to_string(), x.port("up0", "native", ""), a.port("a", ""), b.port("b", "")].concat());
    a.address();
    b.address();
    x.knows(&b);
    let ping_b = |what: &str| assert!(x.ext.ping(&b.ip, 5, &["-i", "0.2"]), "{what}");

    ping_b("b with its queue");
    assert!(queue_frames(&vmq, Some("b")) >= 5, "{:?}", vmq.queues());

    vmq.ctl(&["set", "queues", "1"]);
    let held = vmq.queues().assigned.iter().any(|q| q.port == "b");
    assert!(!held, "b still holds a queue: {:?}", vmq.queues());
    let default0 = queue_frames(&vmq, None);
    ping_b("b through the default queue");
    assert!(queue_frames(&vmq, None) >= default0 + 5, "b's frames did not move to the default socket");

    vmq.ctl(&["set", "queues", "2"]);
    let held = wait_until(WAIT, || vmq.queues().assigned.iter().any(|q| q.port == "b"));
    assert!(held, "b got no queue back: {:?}", vmq.queues());
    let (default1, own1) = (queue_frames(&vmq, None), queue_frames(&vmq, Some("b")));
    ping_b("b with its queue again");
    assert!(queue_frames(&vmq, Some("b")) >= own1 + 5, "{:?}", vmq.queues());
    assert!(queue_frames(&vmq, None) <= default1 + 1, "b's frames still reach the default socket");
}

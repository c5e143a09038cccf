//! End-to-end tests of `vmq run` (root only): the real binary with a generated configuration,
//! real Linux stacks in network namespaces on its TAP ports and behind an AF_PACKET uplink
//! (a veth pair to an "external" namespace), counters read with `vmq ctl --json`.
//!
//! Each test builds its own namespaces (names `vqn<tag><pid>`), so tests run in parallel; every
//! namespace, interface and vmq process is removed by a Drop guard, also when a test fails.
//! The namespaces have IPv6 off, so hosts send only what a test makes them send and counters
//! can be compared exactly.

mod support;

use support::*;
use vmq_control::protocol::{PortState, SharedReason};

const MIB: usize = 1024 * 1024;

/// An external host: namespace `ext` with 10.0.0.100 on a veth whose peer sits in namespace
/// `sw`, where vmq opens it as its uplink.
struct External {
    sw: Ns,
    ext: Ns,
    up_if: String,
    ext_if: String,
    ip: String,
    mac: String,
}

impl External {
    fn new(prefix: &str, mtu: Option<u32>) -> External {
        let sw = Ns::new(&format!("{prefix}s"));
        let ext = Ns::new(&format!("{prefix}x"));
        let (up_if, ext_if) = (format!("{prefix}u"), format!("{prefix}x"));
        veth(&sw, &up_if, &ext, &ext_if);
        if let Some(mtu) = mtu {
            sw.ip(&["link", "set", &up_if, "mtu", &mtu.to_string()]);
            ext.ip(&["link", "set", &ext_if, "mtu", &mtu.to_string()]);
        }
        let ip = "10.0.0.100".to_string();
        ext.ip(&["addr", "add", &format!("{ip}/24"), "dev", &ext_if]);
        let mac = ext.mac(&ext_if);
        External { sw, ext, up_if, ext_if, ip, mac }
    }

    fn port(&self, name: &str, extra: &str) -> String {
        uplink_port(name, &self.up_if, &self.sw, extra)
    }

    /// A permanent neighbour entry on the external host for `host`, and the reverse.
    fn knows(&self, host: &TapHost) {
        self.ext.neigh(&self.ext_if, &host.ip, &host.mac);
        host.ns.neigh(&host.ifname, &self.ip, &self.mac);
    }
}

// ---------------------------------------------------------------------------------------------
// Ping and TCP, TAP <-> TAP and external host <-> TAP, in both modes.

fn connectivity(mode: &str, tag: &str) {
    if !can_run() {
        return;
    }
    let p = unique(tag);
    let a = TapHost::new(&p, "a", 1);
    let b = TapHost::new(&p, "b", 2);
    let x = External::new(&p, None);
    let vmq = Vmq::start(&p, &[switch_section(mode), x.port("up0", ""), a.port("a", ""), b.port("b", "")].concat());
    a.address();
    b.address();

    assert!(a.ns.ping(&b.ip, 3, &[]), "TAP a -> TAP b");
    assert!(x.ext.ping(&a.ip, 3, &[]), "external -> TAP a");
    assert!(b.ns.ping(&x.ip, 3, &[]), "TAP b -> external");

    let data = random_bytes(4 * MIB);
    tcp_transfer(&a.ns, &b.ns, &b.ip, &data).assert_intact();
    tcp_transfer(&x.ext, &b.ns, &b.ip, &data).assert_intact();
    tcp_transfer(&a.ns, &x.ext, &x.ip, &data).assert_intact();

    // The bytes went through vmq (not around it): b received two streams, the uplink carried
    // one each way.
    let (sb, su) = (vmq.stats("b"), vmq.stats("up0"));
    assert!(sb.tx_bytes >= 2 * data.len() as u64, "{sb:?}");
    assert!(su.tx_bytes >= data.len() as u64 && su.rx_bytes >= data.len() as u64, "{su:?}");
}

#[test]
fn ping_and_tcp_between_taps_and_external_host_vmq_mode() {
    connectivity("vmq", "cv");
}

#[test]
fn ping_and_tcp_between_taps_and_external_host_switch_mode() {
    connectivity("switch", "cs");
}

// ---------------------------------------------------------------------------------------------
// In-kernel steering: frames for a port holding a VM queue never reach the default queue.

fn steering(mode: &str, tag: &str) {
    if !can_run() {
        return;
    }
    let p = unique(tag);
    let a = TapHost::new(&p, "a", 1);
    let x = External::new(&p, None);
    let vmq = Vmq::start(&p, &[switch_section(mode), x.port("up0", ""), a.port("a", "")].concat());
    a.address();
    // No ARP: every frame the external host sends is unicast to a's MAC.
    x.knows(&a);

    let data = random_bytes(4 * MIB);
    tcp_transfer(&x.ext, &a.ns, &a.ip, &data).assert_intact();
    tcp_transfer(&a.ns, &x.ext, &x.ip, &data[..MIB]).assert_intact();

    // Once the last frames of the streams are in, every frame the uplink received was read
    // from one of its queues: the queues' counts add up to the port's.
    let (mut queues, mut up) = (vmq.queues(), vmq.stats("up0"));
    let settled = wait_until(WAIT, || {
        queues = vmq.queues();
        up = vmq.stats("up0");
        queues.nic_queues.iter().filter(|q| q.uplink == "up0").map(|q| q.rx_packets).sum::<u64>() == up.rx_packets
    });
    assert!(settled, "queue counts do not add up to the uplink's: {queues:?} {up:?}");
    // The veth hands over GSO frames, so the 5 MiB are a few hundred frames.
    assert!(up.rx_bytes >= data.len() as u64 && up.rx_packets > 50, "{up:?}");
    let on_up0: Vec<_> = queues.nic_queues.iter().filter(|q| q.uplink == "up0").collect();
    let default = on_up0.iter().find(|q| q.queue == 0).expect("the default queue is listed");
    match mode {
        "vmq" => {
            let assigned = queues.assigned.iter().find(|q| q.port == "a").expect("a holds a VM queue");
            let vm_queue = on_up0.iter().find(|q| q.port.as_deref() == Some("a")).expect("a's NIC queue");
            assert_eq!(vm_queue.queue, assigned.queue);
            assert_eq!(default.rx_packets, 0, "a frame for a's VM queue reached the default queue: {queues:?}");
            assert_eq!(vm_queue.rx_packets, up.rx_packets, "{queues:?}");
            // A worker serves that queue.
            let task = format!("up0 queue {}", vm_queue.queue);
            assert!(vmq.workers().iter().any(|w| w.tasks.contains(&task)), "{:?}", vmq.workers());
        }
        _ => {
            assert_eq!(on_up0.len(), 1, "switch mode: the uplink has only its default queue: {queues:?}");
            assert_eq!(default.rx_packets, up.rx_packets, "{queues:?}");
            let shared = queues.shared.iter().find(|s| s.port == "a").expect("a is shared");
            assert_eq!(shared.reason, SharedReason::SwitchMode);
        }
    }
}

#[test]
fn steering_keeps_vm_queue_frames_off_the_default_queue_vmq_mode() {
    steering("vmq", "sv");
}

#[test]
fn steering_sends_everything_through_the_default_queue_switch_mode() {
    steering("switch", "ss");
}

// ---------------------------------------------------------------------------------------------
// VLAN isolation.

fn vlan_isolation(mode: &str, tag: &str) {
    if !can_run() {
        return;
    }
    let p = unique(tag);
    let a = TapHost::new(&p, "a", 1);
    let b = TapHost::new(&p, "b", 2);
    let c = TapHost::new(&p, "c", 3);
    let vmq = Vmq::start(
        &p,
        &[switch_section(mode), a.port("a", "vlan = 10"), b.port("b", "vlan = 10"), c.port("c", "vlan = 20")].concat(),
    );
    for h in [&a, &b, &c] {
        h.address();
    }
    a.knows(&b);
    b.knows(&a);
    assert!(a.ns.ping(&b.ip, 3, &[]), "VLAN 10 to VLAN 10");
    let (a0, b0, c0) = (vmq.stats("a"), vmq.stats("b"), vmq.stats("c"));

    // c asks for a's address (ARP broadcast in VLAN 20): nobody there to hear it.
    assert!(c.ns.ping_fails(&a.ip, 3, &[]), "VLAN 20 reached VLAN 10 by ARP");
    // c knows a's MAC and sends to it straight: still VLAN 20, where that MAC is not.
    c.knows(&a);
    assert!(c.ns.ping_fails(&a.ip, 3, &[]), "VLAN 20 reached a VLAN 10 MAC");
    let c1 = vmq.wait_stats("c", |s| drops(s, "no_destination") > drops(&c0, "no_destination") + 3);
    assert_eq!(c1.tx_packets, c0.tx_packets);

    // VLAN hopping: c sends frames tagged with VLAN 10 itself; an access port refuses tags.
    let hop = ethernet(&a.mac, &c.mac, 0x8100, &[0x00, 0x0a, 0x88, 0xb5, 1, 2, 3, 4]);
    inject(&c.ns, &c.ifname, &vec![hop; 5]);
    let c2 = vmq.wait_stats("c", |s| drops(s, "vlan") >= drops(&c0, "vlan") + 5);
    assert_eq!(drops(&c2, "vlan"), drops(&c0, "vlan") + 5, "{c2:?}");

    // Nothing of all that was delivered to a or b.
    let (a1, b1) = (vmq.stats("a"), vmq.stats("b"));
    assert_eq!((a1.tx_packets, b1.tx_packets), (a0.tx_packets, b0.tx_packets), "{a1:?} {b1:?}");
    assert!(a.ns.ping(&b.ip, 3, &[]), "VLAN 10 still works");
}

#[test]
fn vlan_20_cannot_reach_vlan_10_vmq_mode() {
    vlan_isolation("vmq", "vv");
}

#[test]
fn vlan_20_cannot_reach_vlan_10_switch_mode() {
    vlan_isolation("switch", "vs");
}

// ---------------------------------------------------------------------------------------------
// MAC spoof guard.

fn spoofing(mode: &str, tag: &str) {
    if !can_run() {
        return;
    }
    let p = unique(tag);
    let a = TapHost::new(&p, "a", 1);
    let b = TapHost::new(&p, "b", 2);
    let vmq = Vmq::start(&p, &[switch_section(mode), a.port("a", ""), b.port("b", "")].concat());
    a.address();
    b.address();
    a.knows(&b);
    b.knows(&a);
    assert!(a.ns.ping(&b.ip, 3, &[]));
    let (a0, b0) = (vmq.stats("a"), vmq.stats("b"));

    // The host inside the namespace changes its MAC: everything it sends now is spoofed.
    a.ns.ip(&["link", "set", "dev", &a.ifname, "address", "02:00:00:00:00:99"]);
    assert!(a.ns.ping_fails(&b.ip, 3, &[]), "a spoofed frame got through");
    let a1 = vmq.wait_stats("a", |s| drops(s, "spoofed") >= drops(&a0, "spoofed") + 3);
    assert_eq!(vmq.stats("b").tx_packets, b0.tx_packets, "b received a spoofed frame");
    a.ns.ip(&["link", "set", "dev", &a.ifname, "address", &a.mac]);
    assert!(a.ns.ping(&b.ip, 3, &[]), "the right MAC passes again");

    // Frames with a foreign source MAC from a raw socket: each one counted, none delivered.
    let b1 = vmq.stats("b");
    let a2 = vmq.stats("a");
    let forged = filler_frame(&b.mac, "02:00:00:00:00:66", 60);
    inject(&a.ns, &a.ifname, &vec![forged; 7]);
    let a3 = vmq.wait_stats("a", |s| drops(s, "spoofed") >= drops(&a2, "spoofed") + 7);
    assert_eq!(drops(&a3, "spoofed"), drops(&a2, "spoofed") + 7, "{a3:?}");
    assert_eq!(vmq.stats("b").tx_packets, b1.tx_packets, "b received a forged frame");
    assert!(drops(&a1, "spoofed") > 0);
}

#[test]
fn mac_spoofing_is_dropped_and_counted_vmq_mode() {
    spoofing("vmq", "mv");
}

#[test]
fn mac_spoofing_is_dropped_and_counted_switch_mode() {
    spoofing("switch", "ms");
}

// ---------------------------------------------------------------------------------------------
// Jumbo frames.

fn jumbo(mode: &str, tag: &str) {
    if !can_run() {
        return;
    }
    let p = unique(tag);
    let j1 = TapHost::new(&p, "a", 1);
    let j2 = TapHost::new(&p, "b", 2);
    let s = TapHost::new(&p, "c", 3);
    // The uplink's veth end is left at 1500: vmq raises it to the port's 9000.
    let x = External::new(&p, None);
    x.ext.ip(&["link", "set", &x.ext_if, "mtu", "9000"]);
    let vmq = Vmq::start(
        &p,
        &[
            switch_section(mode),
            x.port("up0", "mtu = 9000"),
            j1.port("j1", "mtu = 9000"),
            j2.port("j2", "mtu = 9000"),
            s.port("s", "mtu = 1500"),
        ]
        .concat(),
    );
    for h in [&j1, &j2, &s] {
        h.address();
    }
    let link = x.sw.ip_output(&["-o", "link", "show", "dev", &x.up_if]);
    assert!(String::from_utf8_lossy(&link.stdout).contains("mtu 9000"), "uplink MTU not raised: {link:?}");

    let jumbo_ping = ["-M", "do", "-s", "8972"];
    assert!(j1.ns.ping(&j2.ip, 3, &jumbo_ping), "9000 -> 9000 between TAPs");
    assert!(x.ext.ping(&j1.ip, 3, &jumbo_ping), "9000 from the external host");

    // Toward the 1500 port the 9014-byte frames are dropped and counted where they would have
    // left (vmq sends no ICMP "fragmentation needed": there is no pmtu_icmp).
    let s0 = vmq.stats("s");
    assert!(j1.ns.ping_fails(&s.ip, 3, &jumbo_ping), "a jumbo frame reached the 1500 port");
    let s1 = vmq.wait_stats("s", |c| drops(c, "oversize") >= drops(&s0, "oversize") + 3);
    // ARP may pass; no echo request did (s never answered).
    assert!(s1.rx_packets - s0.rx_packets <= 2, "{s1:?}");
    assert!(j1.ns.ping(&s.ip, 3, &["-M", "do", "-s", "1472"]), "1500-byte frames pass");
}

#[test]
fn jumbo_frames_pass_between_9000_ports_oversize_counted_vmq_mode() {
    jumbo("vmq", "jv");
}

#[test]
fn jumbo_frames_pass_between_9000_ports_oversize_counted_switch_mode() {
    jumbo("switch", "js");
}

// ---------------------------------------------------------------------------------------------
// TCP offloads: GSO frames pass to a receiver that takes them, are segmented for one that
// does not.

fn gso(mode: &str, tag: &str) {
    if !can_run() {
        return;
    }
    let p = unique(tag);
    let a = TapHost::new(&p, "a", 1);
    let b = TapHost::new(&p, "b", 2);
    let c = TapHost::new(&p, "c", 3);
    let vmq = Vmq::start(
        &p,
        &[switch_section(mode), a.port("a", ""), b.port("b", ""), c.port("c", "offloads = false")].concat(),
    );
    for h in [&a, &b, &c] {
        h.address();
    }
    let data = random_bytes(8 * MIB);

    tcp_transfer(&a.ns, &b.ns, &b.ip, &data).assert_intact();
    let sb = vmq.stats("b");
    assert!(sb.offload.gso_passed > 0, "no GSO frame reached b: {sb:?}");
    assert_eq!(sb.offload.segments, 0, "vmq segmented toward a receiver that takes GSO: {sb:?}");
    // Far fewer frames than MSS-sized segments: they went as GSO frames.
    assert!(sb.tx_packets < (data.len() / 1448 / 2) as u64, "{sb:?}");

    tcp_transfer(&a.ns, &c.ns, &c.ip, &data).assert_intact();
    let sc = vmq.stats("c");
    assert!(sc.offload.segments > 0, "vmq did not segment toward c: {sc:?}");
    assert_eq!(sc.offload.gso_passed, 0, "a GSO frame went to a port without offloads: {sc:?}");
    assert!(sc.tx_packets >= (data.len() / 1448) as u64, "{sc:?}");
    let show = vmq.show();
    let c_info = show.ports.iter().find(|p| p.name == "c").expect("port c");
    assert!(!c_info.offloads.tso4 && !c_info.offloads.csum, "{c_info:?}");
}

#[test]
fn gso_passes_or_is_segmented_by_receiver_vmq_mode() {
    gso("vmq", "gv");
}

#[test]
fn gso_passes_or_is_segmented_by_receiver_switch_mode() {
    gso("switch", "gs");
}

// ---------------------------------------------------------------------------------------------
// Bad input.

#[test]
fn run_refuses_a_too_long_interface_name() {
    if !can_run() {
        return;
    }
    let p = unique("bl");
    let body = format!(
        "{}[[port]]\nname = \"longname\"\nkind = \"tap\"\nifname = \"{p}-much-too-long\"\n",
        switch_section("vmq")
    );
    let failed = Vmq::expect_failure(&p, &body);
    assert_eq!(failed.code, Some(2), "{}", failed.stderr);
    assert!(failed.stderr.contains("port \"longname\""), "{}", failed.stderr);
    assert!(failed.stderr.contains("interface name"), "{}", failed.stderr);
}

#[test]
fn run_refuses_a_namespace_that_does_not_exist() {
    if !can_run() {
        return;
    }
    let p = unique("bn");
    // The first port's namespace is vmq's to create; the second one's does not exist.
    let made = format!("{p}made");
    let missing = format!("{p}missing");
    let body = format!(
        "{}[[port]]\nname = \"first\"\nkind = \"tap\"\nifname = \"{p}a\"\nnetns = \"{made}\"\ncreate_netns = true\n\
         [[port]]\nname = \"ghost\"\nkind = \"tap\"\nifname = \"{p}b\"\nnetns = \"{missing}\"\n",
        switch_section("vmq")
    );
    let failed = Vmq::expect_failure(&p, &body);
    assert_eq!(failed.code, Some(1), "{}", failed.stderr);
    assert!(failed.stderr.contains("port \"ghost\""), "{}", failed.stderr);
    assert!(failed.stderr.contains(&missing), "{}", failed.stderr);
    // What vmq made before it failed is gone again.
    let left_behind = std::path::Path::new("/run/netns").join(&made).exists();
    if left_behind {
        drop(Ns::adopt(&made));
    }
    assert!(!left_behind, "vmq left namespace {made} behind");
}

#[test]
fn run_refuses_an_mtu_the_kernel_refuses() {
    if !can_run() {
        return;
    }
    let p = unique("bm");
    let sw = Ns::new(&format!("{p}s"));
    let other = Ns::new(&format!("{p}o"));
    veth(&sw, &format!("{p}v"), &other, &format!("{p}w"));
    // A VXLAN device over a 1500-byte veth cannot take more than 1450.
    let vx = format!("{p}x");
    sw.ip(&["link", "add", &vx, "type", "vxlan", "id", "42", "dstport", "4789", "dev", &format!("{p}v")]);
    let body = [switch_section("vmq"), uplink_port("up0", &vx, &sw, "mtu = 9000")].concat();
    let failed = Vmq::expect_failure(&p, &body);
    assert_eq!(failed.code, Some(1), "{}", failed.stderr);
    assert!(failed.stderr.contains("port \"up0\""), "{}", failed.stderr);
    assert!(failed.stderr.contains("MTU 9000"), "{}", failed.stderr);

    // At run time: the change is refused, vmq runs on with the MTU it had; one the device takes
    // is made on the interface too.
    let mut vmq = Vmq::start(&p, &[switch_section("vmq"), uplink_port("up0", &vx, &sw, "mtu = 1400")].concat());
    let (code, reply, _) = vmq.ctl_raw(&["set", "port", "up0", "mtu", "9000"]);
    assert_eq!(code, Some(1), "{reply}");
    assert!(reply.contains("invalid_value") && reply.contains("MTU 9000"), "{reply}");
    assert!(vmq.alive());
    assert_eq!(vmq.show().ports[0].mtu, 1400);
    vmq.ctl(&["set", "port", "up0", "mtu", "1450"]);
    let link = sw.ip_output(&["-o", "link", "show", "dev", &vx]);
    assert!(String::from_utf8_lossy(&link.stdout).contains("mtu 1450"), "{link:?}");
}

fn deleted_tap(mode: &str, tag: &str) {
    if !can_run() {
        return;
    }
    let p = unique(tag);
    let a = TapHost::new(&p, "a", 1);
    let b = TapHost::new(&p, "b", 2);
    let c = TapHost::new(&p, "c", 3);
    let mut vmq = Vmq::start(&p, &[switch_section(mode), a.port("a", ""), b.port("b", ""), c.port("c", "")].concat());
    for h in [&a, &b, &c] {
        h.address();
    }
    assert!(c.ns.ping(&a.ip, 2, &[]));

    c.ns.ip(&["link", "del", &c.ifname]);
    assert!(
        wait_until(WAIT, || vmq.port_state("c") == Some(PortState::Down)),
        "the deleted TAP's port is not down: {:?}",
        vmq.show()
    );
    assert!(vmq.alive());
    assert_eq!(vmq.port_state("a"), Some(PortState::Up));
    assert!(a.ns.ping(&b.ip, 3, &[]), "the other ports stopped working");
    tcp_transfer(&a.ns, &b.ns, &b.ip, &random_bytes(MIB)).assert_intact();
    // Traffic for the gone port is refused as such, not a crash: a's ARP for c floods to b
    // only, and unicast to c's MAC is dropped.
    assert!(a.ns.ping_fails(&c.ip, 2, &[]));
    assert!(vmq.alive());
}

#[test]
fn deleted_tap_goes_down_others_keep_serving_vmq_mode() {
    deleted_tap("vmq", "dv");
}

#[test]
fn deleted_tap_goes_down_others_keep_serving_switch_mode() {
    deleted_tap("switch", "ds");
}

fn wire_garbage(mode: &str, tag: &str) {
    if !can_run() {
        return;
    }
    let p = unique(tag);
    let a = TapHost::new(&p, "a", 1);
    // Both veth ends take 9000-byte frames; the uplink port is a 1500 port.
    let x = External::new(&p, Some(9000));
    let mut vmq = Vmq::start(&p, &[switch_section(mode), x.port("up0", "mtu = 1500"), a.port("a", "")].concat());
    a.address();
    let (u0, a0) = (vmq.stats("up0"), vmq.stats("a"));
    let inject_and_wait = |frames: Vec<Vec<u8>>| {
        let before = vmq.stats("up0").rx_packets;
        let n = frames.len() as u64;
        inject(&x.ext, &x.ext_if, &frames);
        vmq.wait_stats("up0", |s| s.rx_packets >= before + n);
    };

    // Oversize for the port: dropped at ingress (switch path) or at egress toward a (VM queue).
    inject_and_wait(vec![filler_frame(&a.mac, &x.mac, 4000); 3]);
    // A multicast source MAC: no station sends that.
    inject_and_wait(vec![filler_frame(&a.mac, "01:00:5e:00:00:01", 60); 3]);
    // Stacked 802.1Q tags: vmq carries one tag, not two.
    let stacked = ethernet(&a.mac, &x.mac, 0x8100, &[0x00, 0x05, 0x81, 0x00, 0x00, 0x06, 0x88, 0xb5, 0, 0]);
    inject_and_wait(vec![stacked; 3]);
    // A tagged frame on an untagged port.
    let tagged = ethernet(&a.mac, &x.mac, 0x8100, &[0x00, 0x05, 0x88, 0xb5, 0, 0, 0, 0]);
    inject_and_wait(vec![tagged; 3]);

    let (u1, a1) = (vmq.stats("up0"), vmq.stats("a"));
    let delta = |reason: &str| drops(&u1, reason) - drops(&u0, reason);
    let oversize = delta("oversize") + drops(&a1, "oversize") - drops(&a0, "oversize");
    assert_eq!(oversize, 3, "{u1:?} {a1:?}");
    assert_eq!(delta("malformed"), 3, "{u1:?}");
    assert_eq!(delta("unsupported"), 3, "{u1:?}");
    assert_eq!(delta("vlan"), 3, "{u1:?}");
    assert_eq!(a1.tx_packets, a0.tx_packets, "garbage was delivered to a: {a1:?}");

    // Runts: the kernel refuses to send less than an Ethernet header on a veth and drops a
    // frame whose 802.1Q tag is cut before any packet socket sees it. The shortest frames that
    // do arrive, a bare 14-byte header, are valid frames and are delivered (as a Linux bridge
    // does).
    inject(&x.ext, &x.ext_if, &vec![ethernet(&a.mac, &x.mac, 0x8100, &[0x00]); 3]);
    inject_and_wait(vec![ethernet(&a.mac, &x.mac, 0x88b5, &[]); 3]);
    let a2 = vmq.wait_stats("a", |s| s.tx_packets >= a1.tx_packets + 3);
    assert_eq!(a2.tx_packets, a1.tx_packets + 3, "{a2:?}");

    assert!(vmq.alive());
    assert!(x.ext.ping(&a.ip, 3, &[]), "vmq stopped serving after the garbage");
}

#[test]
fn garbage_from_the_wire_is_counted_not_delivered_vmq_mode() {
    wire_garbage("vmq", "wv");
}

#[test]
fn garbage_from_the_wire_is_counted_not_delivered_switch_mode() {
    wire_garbage("switch", "ws");
}

// ---------------------------------------------------------------------------------------------
// Ports added and removed at run time under a running stream.

fn add_del_under_stream(mode: &str, tag: &str) {
    if !can_run() {
        return;
    }
    let p = unique(tag);
    let a = TapHost::new(&p, "a", 1);
    let b = TapHost::new(&p, "b", 2);
    let c = TapHost::new(&p, "c", 3);
    let vmq = Vmq::start(&p, &[switch_section(mode), a.port("a", ""), b.port("b", "")].concat());
    a.address();
    b.address();
    // No ARP: nothing is flooded, so no frame of the stream ever goes near the changing port.
    a.knows(&b);
    b.knows(&a);
    let (a0, b0) = (vmq.stats("a"), vmq.stats("b"));

    let stream = Stream::start(&a.ns, &b.ns, &b.ip);
    stream.wait_progress(2 * MIB as u64);
    for round in 0..3 {
        let added = vmq.ctl(&[
            "add-port",
            "--name",
            "c",
            "--kind",
            "tap",
            "--ifname",
            &c.ifname,
            "--netns",
            c.ns.name(),
            "--mac",
            &c.mac,
        ]);
        assert!(matches!(added, vmq_control::protocol::Response::PortAdded { .. }), "{added:?}");
        assert!(wait_until(WAIT, || vmq.port_state("c") == Some(PortState::Up)), "round {round}: c not up");
        stream.wait_progress(MIB as u64);
        vmq.ctl(&["del-port", "c"]);
        assert_eq!(vmq.port_state("c"), None);
        stream.wait_progress(MIB as u64);
    }
    let transfer = stream.finish();
    transfer.assert_intact();
    assert!(transfer.received_bytes >= 8 * MIB as u64);

    for (name, before) in [("a", a0), ("b", b0)] {
        let now = vmq.stats(name);
        assert_eq!(now.drops.values().sum::<u64>(), 0, "drops on {name}: {now:?} (before the stream: {before:?})");
    }
}

#[test]
fn add_and_del_port_under_a_running_stream_vmq_mode() {
    add_del_under_stream("vmq", "av");
}

#[test]
fn add_and_del_port_under_a_running_stream_switch_mode() {
    add_del_under_stream("switch", "as");
}

// ---------------------------------------------------------------------------------------------
// Namespaces by path, as container runtimes hand them over.

/// A "pod": a `sleep` in a network namespace of its own that has no name under /run/netns,
/// reached through `/proc/PID/ns/net`. The process is killed by PID on drop, which ends the
/// namespace (and takes the TAP in it along).
struct Pod {
    child: std::process::Child,
}

impl Pod {
    fn start() -> Pod {
        let child = std::process::Command::new("unshare")
            .args(["--net", "sleep", "300"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("unshare");
        let pod = Pod { child };
        // unshare execs sleep once it is in the new namespace.
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        let entered = wait_until(WAIT, || std::fs::read_link(pod.netns()).is_ok_and(|l| l != own));
        assert!(entered, "unshare never entered a new namespace");
        pod.exec(&["ip", "link", "set", "lo", "up"]);
        pod
    }

    fn netns(&self) -> String {
        format!("/proc/{}/ns/net", self.child.id())
    }

    /// Runs a command in the pod's namespace (nsenter), which must succeed.
    fn exec(&self, args: &[&str]) -> std::process::Output {
        let net = format!("--net={}", self.netns());
        let mut all = vec!["nsenter", &net];
        all.extend_from_slice(args);
        let out = run_bounded(&all, std::time::Duration::from_secs(15));
        assert!(out.status.success(), "{args:?} in the pod: {}", String::from_utf8_lossy(&out.stderr));
        out
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tap_ports_attach_to_namespaces_given_by_path() {
    if !can_run() {
        return;
    }
    let p = unique("np");
    let pod = Pod::start();
    // Host b in a named namespace, given by the path of its bind-mounted file.
    let b = TapHost::new(&p, "b", 2);
    let b_path = format!("/run/netns/{}", b.ns.name());
    let a_if = format!("{p}a");
    let a_mac = "02:00:00:00:00:01";
    let body = format!(
        "{}[[port]]\nname = \"a\"\nkind = \"tap\"\nifname = \"{a_if}\"\nnetns = \"{}\"\nmac = \"{a_mac}\"\n\
         [[port]]\nname = \"b\"\nkind = \"tap\"\nifname = \"{}\"\nnetns = \"{b_path}\"\nmac = \"{}\"\n",
        switch_section("vmq"),
        pod.netns(),
        b.ifname,
        b.mac
    );
    let vmq = Vmq::start(&p, &body);
    // The TAPs are where the paths say: in the pod (not in vmq's namespace) and in b's.
    pod.exec(&["ip", "link", "show", "dev", &a_if]);
    assert!(!std::path::Path::new("/sys/class/net").join(&a_if).exists(), "TAP a is in vmq's own namespace");
    pod.exec(&["ip", "addr", "add", "10.0.0.1/24", "dev", &a_if]);
    b.address();
    let ping = pod.exec(&["ping", "-n", "-q", "-c", "3", "-i", "0.1", "-w", "10", &b.ip]);
    assert!(String::from_utf8_lossy(&ping.stdout).contains(" 3 received"), "{}", String::from_utf8_lossy(&ping.stdout));
    assert!(b.ns.ping("10.0.0.1", 3, &[]), "b -> pod");
    assert!(vmq.stats("a").tx_packets >= 3 && vmq.stats("b").tx_packets >= 3);
    let ports = vmq.show().ports;
    let a_info = ports.iter().find(|i| i.name == "a").unwrap();
    assert_eq!(a_info.netns.as_deref(), Some(pod.netns().as_str()));

    // At run time too: a second pod's TAP added by path through the control socket.
    let pod2 = Pod::start();
    let c_if = format!("{p}c");
    let added = vmq.ctl(&[
        "add-port",
        "--name",
        "c",
        "--kind",
        "tap",
        "--ifname",
        &c_if,
        "--netns",
        &pod2.netns(),
        "--mac",
        "02:00:00:00:00:03",
    ]);
    assert!(matches!(added, vmq_control::protocol::Response::PortAdded { .. }), "{added:?}");
    assert!(wait_until(WAIT, || vmq.port_state("c") == Some(PortState::Up)), "c not up");
    pod2.exec(&["ip", "addr", "add", "10.0.0.3/24", "dev", &c_if]);
    pod2.exec(&["ping", "-n", "-q", "-c", "2", "-i", "0.1", "-w", "10", &b.ip]);
    vmq.ctl(&["del-port", "c"]);
    // create_netns on a path is refused: vmq never makes or deletes a namespace it was handed.
    let (code, out, _) =
        vmq.ctl_raw(&["add-port", "--name", "d", "--kind", "tap", "--netns", &pod2.netns(), "--create-netns"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("create_netns needs a namespace name, not a path"), "{out}");
}

#[test]
fn run_refuses_a_netns_path_that_is_not_a_network_namespace() {
    if !can_run() {
        return;
    }
    let p = unique("nx");
    let body = format!(
        "{}[[port]]\nname = \"wrong\"\nkind = \"tap\"\nifname = \"{p}a\"\nnetns = \"/proc/self/ns/mnt\"\n",
        switch_section("vmq")
    );
    let failed = Vmq::expect_failure(&p, &body);
    assert_eq!(failed.code, Some(1), "{}", failed.stderr);
    assert!(failed.stderr.contains("port \"wrong\""), "{}", failed.stderr);
    assert!(failed.stderr.contains("/proc/self/ns/mnt is not a network namespace"), "{}", failed.stderr);
}

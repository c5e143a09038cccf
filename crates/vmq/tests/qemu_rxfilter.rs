//! Guest-programmed receive filters with real guests: QEMU keeps the virtio-net control queue
//! (see `qemu.rs`), so vmq reads each guest's filter over QEMU's QMP socket
//! (`-qmp unix:PATH,server=on,wait=off`, `qmp_socket` on the port) and applies its policy.
//! Root-only; skipped with a message when QEMU or the guest image is missing.

mod guests;

use std::time::Duration;

use guests::*;
use vmq_control::protocol::{PortInfo, PortState};
use vmq_testkit::qemu::{Guest, guest_image_or_skip};

const BOOT: Duration = Duration::from_secs(60);
const RELAY: Duration = Duration::from_secs(20);
/// Frames sent to an address no port has (flooded by the switch).
const FLOOD: u64 = 20;

fn port(vmq: &Vmq, name: &str) -> Result<PortInfo, String> {
    vmq.ports()?.into_iter().find(|p| p.name == name).ok_or_else(|| format!("no port {name}"))
}

fn guest_rx_packets(vm: &mut Guest) -> u64 {
    let text = vm.run_ok("cat /sys/class/net/eth0/statistics/rx_packets");
    text.trim().parse().unwrap_or_else(|e| panic!("rx_packets {text:?}: {e}"))
}

/// Pings an address whose MAC no port has, from the TAP host: every request is unknown unicast
/// (the neighbour entry is static), flooded by the switch to whoever may have it.
fn flood_unknown_unicast(ns: &Netns) {
    let (_, _) =
        ns.run(Duration::from_secs(20), &["ping", "-c", &FLOOD.to_string(), "-i", "0.05", "-W", "1", "10.125.0.99"]);
}

/// Two guests behind ports with opposite policies, a TAP host as the traffic source. Each
/// guest switches eth0 to promiscuous mode and then to a new MAC; vmq follows vm1 (allowed)
/// and refuses vm2, and traffic shows it: unknown unicast reaches vm1's driver only once it
/// is promiscuous and never vm2's; the TAP host reaches vm1 at its new MAC and not vm2.
#[test]
fn guest_promiscuous_and_mac_changes_follow_port_policy() {
    let test = "guest_promiscuous_and_mac_changes_follow_port_policy";
    let Some(image) = guest_image_or_skip(test) else { return };
    if !root_or_skip(test) {
        return;
    }
    let dir = TestDir::new("rxfilter");
    let tap_ns = Netns::adopt(&unique("r"));
    let (mac1, mac2) = ("52:54:00:7d:00:01", "52:54:00:7d:00:02");
    let qmp = |name: &str| dir.join(&format!("{name}.qmp"));
    let config = switch_header(&dir, 1)
        + &vhost_port(&dir, "vm1", mac1, 1500, 0, true)
        + &format!("qmp_socket = \"{}\"\nallow_mac_change = true\nallow_promiscuous = true\n\n", qmp("vm1").display())
        + &vhost_port(&dir, "vm2", mac2, 1500, 0, true)
        + &format!("qmp_socket = \"{}\"\n\n", qmp("vm2").display())
        + &format!(
            "[[port]]\nname = \"tap1\"\nkind = \"tap\"\nifname = \"eth0\"\nnetns = \"{}\"\ncreate_netns = true\n\
             mac = \"52:54:00:7d:00:10\"\n",
            tap_ns.name()
        );
    let vmq = Vmq::start(&dir, &config);
    let mut vms = boot_all(
        &image,
        vec![
            guest_config(&dir, "vm1", mac1, "10.125.0.1").qmp(qmp("vm1"), "vm1"),
            guest_config(&dir, "vm2", mac2, "10.125.0.2").qmp(qmp("vm2"), "vm2"),
        ],
    );
    tap_ns.ip(&["addr", "add", "10.125.0.100/24", "dev", "eth0"]);
    tap_ns.ip(&["neigh", "replace", "10.125.0.99", "lladdr", "02:00:00:7d:99:99", "dev", "eth0"]);
    vmq.wait_state(&["vm1", "vm2", "tap1"], PortState::Up, BOOT);
    for vm in vms.iter_mut() {
        wait_link_up(vm);
    }
    // Both relays connected and applied the guests' filters (not promiscuous yet).
    for name in ["vm1", "vm2"] {
        wait_for(&format!("{name}'s filter relayed"), RELAY, || {
            let p = port(&vmq, name)?;
            p.rx_filter.as_ref().filter(|f| !f.promiscuous).map(|_| ()).ok_or_else(|| format!("{p:?}"))
        });
    }
    assert_ping(&mut vms[0], "10.125.0.100", 3);
    assert_ping(&mut vms[1], "10.125.0.100", 3);

    // Not promiscuous: the unknown unicast stays out of both guests.
    let before = vmq.stats();
    let rx_before = [guest_rx_packets(&mut vms[0]), guest_rx_packets(&mut vms[1])];
    flood_unknown_unicast(&tap_ns);
    let after = vmq.stats();
    let rx_after = [guest_rx_packets(&mut vms[0]), guest_rx_packets(&mut vms[1])];
    for (i, name) in ["vm1", "vm2"].into_iter().enumerate() {
        let d = Delta::between(&before, &after, name);
        assert!(d.drop_count("rx_filter") >= FLOOD, "{name}: the filter dropped the flood: {d:?}");
        assert!(rx_after[i] - rx_before[i] < FLOOD / 2, "{name}'s driver got the flood: {rx_before:?} {rx_after:?}");
    }

    // Promiscuous: honoured on vm1, refused and counted on vm2. (QEMU reports a NIC as
    // promiscuous from reset until the guest's driver programs its filter, so vm2 may have
    // one refusal from boot already.)
    let refused_at_boot = vmq.stats().get("vm2").map_or(0, |c| c.promiscuous_refused);
    for vm in vms.iter_mut() {
        vm.run_ok("ip link set eth0 promisc on");
    }
    wait_for("vm1 promiscuous", RELAY, || {
        let p = port(&vmq, "vm1")?;
        p.rx_filter.as_ref().filter(|f| f.promiscuous).map(|_| ()).ok_or_else(|| format!("{p:?}"))
    });
    wait_for("vm2's promiscuous mode refused", RELAY, || {
        let c = vmq.stats().get("vm2").cloned().ok_or("no vm2")?;
        (c.promiscuous_refused == refused_at_boot + 1).then_some(()).ok_or_else(|| format!("{c:?}"))
    });
    let before = vmq.stats();
    let rx_before = [guest_rx_packets(&mut vms[0]), guest_rx_packets(&mut vms[1])];
    flood_unknown_unicast(&tap_ns);
    let after = vmq.stats();
    let rx_after = [guest_rx_packets(&mut vms[0]), guest_rx_packets(&mut vms[1])];
    assert!(
        rx_after[0] - rx_before[0] >= FLOOD,
        "vm1 (promiscuous allowed) sees the flood: {rx_before:?} {rx_after:?}"
    );
    assert_eq!(Delta::between(&before, &after, "vm1").drop_count("rx_filter"), 0);
    assert!(rx_after[1] - rx_before[1] < FLOOD / 2, "vm2 (refused) does not: {rx_before:?} {rx_after:?}");
    assert!(Delta::between(&before, &after, "vm2").drop_count("rx_filter") >= FLOOD);
    let vm2 = port(&vmq, "vm2").expect("vm2");
    assert!(vm2.rx_filter.as_ref().is_some_and(|f| f.promiscuous_refused && !f.promiscuous), "{vm2:?}");

    // A new MAC: vm1's port follows it, vm2's is refused (counted) and keeps its address.
    let (new1, new2) = ("52:54:00:7d:11:01", "52:54:00:7d:11:02");
    vms[0].run_ok(&format!("ip link set eth0 address {new1}"));
    vms[1].run_ok(&format!("ip link set eth0 address {new2}"));
    wait_for("vm1's port at its new MAC", RELAY, || {
        let p = port(&vmq, "vm1")?;
        (p.mac.as_deref() == Some(new1)).then_some(()).ok_or_else(|| format!("{p:?}"))
    });
    wait_for("vm2's MAC change refused", RELAY, || {
        let c = vmq.stats().get("vm2").cloned().ok_or("no vm2")?;
        (c.mac_change_refused == 1).then_some(()).ok_or_else(|| format!("{c:?}"))
    });
    assert_eq!(port(&vmq, "vm2").expect("vm2").mac.as_deref(), Some(mac2));
    assert_eq!(vmq.stats().get("vm1").map(|c| c.mac_change_refused), Some(0));
    // The TAP host learns the new addresses by ARP: vm1 answers from its new MAC and is
    // reached there; vm2's answers come from an address its port does not own (spoofed).
    tap_ns.ip(&["neigh", "flush", "dev", "eth0"]);
    tap_ns.run_ok(Duration::from_secs(20), &["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.125.0.1"]);
    let neigh = tap_ns.run_ok(Duration::from_secs(5), &["ip", "neigh", "show", "10.125.0.1"]);
    assert!(neigh.contains(new1), "the TAP host reached vm1 at {new1}: {neigh}");
    let before = vmq.stats();
    let (status, out) = tap_ns.run(Duration::from_secs(20), &["ping", "-c", "3", "-i", "0.2", "-W", "1", "10.125.0.2"]);
    assert!(!status.success(), "vm2 must not be reachable from its refused MAC: {out}");
    let d = Delta::between(&before, &vmq.stats(), "vm2");
    assert!(d.drop_count("spoofed") >= 1, "vm2's frames from {new2} are spoofed: {d:?}");
    for name in ["vm1", "vm2"] {
        assert_eq!(vmq.stats().get(name).map(|c| c.qmp_errors), Some(0), "{name}: QMP relay errors");
    }
}

//! Multiqueue VM ports with a real guest: a port with `queues = 2`, a QEMU guest with two vCPUs
//! and `-netdev vhost-user,queues=2` / `virtio-net-pci,mq=on`. Root-only; skipped with a message
//! when QEMU or the guest image is missing.

mod guests;

use std::time::Duration;

use guests::*;
use vmq_control::protocol::{PortInfo, PortState, Response};
use vmq_testkit::qemu::guest_image_or_skip;

const BOOT: Duration = Duration::from_secs(90);

fn port(vmq: &Vmq, name: &str) -> PortInfo {
    let ports = vmq.ports().unwrap_or_else(|e| panic!("vmq ctl ports: {e}"));
    ports.into_iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no port {name}"))
}

/// `ethtool -S eth0` in the guest: the virtio-net driver's `rx_queue_N_packets`.
fn guest_rx_queue_packets(text: &str, queue: usize) -> u64 {
    let key = format!("rx_queue_{queue}_packets:");
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&key).map(|v| v.trim().parse::<u64>()))
        .unwrap_or_else(|| panic!("no {key} in ethtool -S eth0:\n{text}"))
        .unwrap_or_else(|e| panic!("{key} {e}:\n{text}"))
}

/// The guest's driver sees two combined channels; the two TX rings are served by different
/// workers; twelve TCP flows from a host behind a TAP port reach the guest on both RX queues
/// (the guest's own per-queue counters and vmq's say so), each flow on one queue.
#[test]
fn a_two_queue_guest_receives_flows_on_both_queues_and_its_tx_rings_run_on_two_workers() {
    let test = "a_two_queue_guest_receives_flows_on_both_queues_and_its_tx_rings_run_on_two_workers";
    let Some(image) = guest_image_or_skip(test) else { return };
    if !root_or_skip(test) {
        return;
    }
    let dir = TestDir::new("mq");
    let tap_ns = Netns::adopt(&unique("q"));
    let mac = "52:54:00:7e:00:01";
    let config = switch_header(&dir, 2)
        + &vhost_port(&dir, "vm1", mac, 1500, 0, true)
        + "queues = 2\n\n"
        + &format!(
            "[[port]]\nname = \"tap1\"\nkind = \"tap\"\nifname = \"eth0\"\nnetns = \"{}\"\ncreate_netns = true\n\
             mac = \"52:54:00:7e:00:10\"\n",
            tap_ns.name()
        );
    let vmq = Vmq::start(&dir, &config);
    let mut vms = boot_all(&image, vec![guest_config(&dir, "vm1", mac, "10.126.0.1").cpus(2).queue_pairs(2)]);
    tap_ns.ip(&["addr", "add", "10.126.0.100/24", "dev", "eth0"]);
    vmq.wait_state(&["vm1", "tap1"], PortState::Up, BOOT);
    let vm = &mut vms[0];
    wait_link_up(vm);

    // VIRTIO_NET_F_MQ negotiated: the driver offers two channels and uses both (one per vCPU).
    let channels = vm.run_ok("ethtool -l eth0");
    let current = channels.split("Current hardware settings:").nth(1).unwrap_or_else(|| panic!("{channels}"));
    assert!(
        current.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Combined:", "2"]),
        "ethtool -l eth0:\n{channels}"
    );
    // One TX task per pair, on different workers (placed before any load).
    let p = port(&vmq, "vm1");
    let pairs = p.queue_pairs.as_deref().unwrap_or_default();
    assert_eq!(pairs.len(), 2, "{p:?}");
    let workers: Vec<Option<usize>> = pairs.iter().map(|q| q.worker).collect();
    assert!(workers[0].is_some() && workers[0] != workers[1], "TX rings on workers {workers:?}");

    assert_ping(vm, "10.126.0.100", 2);
    start_iperf3_server(vm);
    let before_vmq = port(&vmq, "vm1");
    let before_guest = vm.run_ok("ethtool -S eth0");
    let before = vmq.stats();
    // Twelve flows (random source ports): all on one queue by chance once in 4096 runs.
    let args = ["iperf3", "-c", "10.126.0.1", "-t", "2", "-P", "12", "-J"];
    let r = parse_iperf3_json(&tap_ns.run_ok(Duration::from_secs(60), &args)).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("TAP host -> VM, 12 flows: {r:?}");
    assert!(r.bytes > 1_000_000, "{r:?}");
    let after_vmq = port(&vmq, "vm1");
    let after_guest = vm.run_ok("ethtool -S eth0");
    let d = Delta::between(&before, &vmq.stats(), "vm1");
    eprintln!("vm1: {d:?}");
    let pairs_of = |p: &PortInfo| p.queue_pairs.as_deref().unwrap_or_default().to_vec();
    let (after_pairs, before_pairs) = (pairs_of(&after_vmq), pairs_of(&before_vmq));
    for q in 0..2 {
        let vmq_frames = after_pairs[q].rx_frames - before_pairs[q].rx_frames;
        let guest_frames = guest_rx_queue_packets(&after_guest, q) - guest_rx_queue_packets(&before_guest, q);
        eprintln!("RX queue {q}: vmq wrote {vmq_frames} frames, the guest took {guest_frames}");
        assert!(vmq_frames > 50, "RX queue {q} got {vmq_frames} frames from vmq: {after_vmq:?}");
        assert!(guest_frames > 50, "RX queue {q}: the guest counted {guest_frames}:\n{after_guest}");
    }
    assert!(after_pairs.iter().all(|q| q.tx_frames > 0), "{after_vmq:?}");
}

/// `vmq ctl queues`: frames each VM queue of `port` took from the uplink, by queue.
fn vm_queue_frames(vmq: &Vmq, port: &str) -> Vec<(u32, u64)> {
    match vmq.try_ctl(&["queues"]) {
        Ok(Response::Queues(report)) => report
            .nic_queues
            .iter()
            .filter(|q| q.port.as_deref() == Some(port))
            .map(|q| (q.queue, q.rx_packets))
            .collect(),
        other => panic!("vmq ctl queues: {other:?}"),
    }
}

/// VMMQ: behind an AF_PACKET uplink, a two-queue guest holds two VM queues (one per RX queue
/// pair, same MAC); the uplink's fanout program spreads twelve TCP flows from an external host
/// over both by their flow hash, each queue a task of its own, and the guest gets frames on both
/// RX queues.
#[test]
fn a_two_queue_guest_holds_a_vm_queue_per_pair_on_the_uplink_and_flows_use_both() {
    let test = "a_two_queue_guest_holds_a_vm_queue_per_pair_on_the_uplink_and_flows_use_both";
    let Some(image) = guest_image_or_skip(test) else { return };
    if !root_or_skip(test) {
        return;
    }
    let dir = TestDir::new("vmmq");
    let net = Netns::create(&unique("u"));
    let ext = Netns::create(&unique("x"));
    net.ip(&["link", "add", "upv", "type", "veth", "peer", "name", "eth0", "netns", ext.name()]);
    net.ip(&["link", "set", "upv", "up"]);
    ext.ip(&["addr", "add", "10.127.0.100/24", "dev", "eth0"]);
    ext.ip(&["link", "set", "eth0", "up"]);
    let mac = "52:54:00:7f:00:01";
    // The uplink first: the VM port's queue count is decided knowing its uplink spreads flows.
    let config = switch_header(&dir, 2)
        + &format!(
            "[[port]]\nname = \"up0\"\nkind = \"uplink\"\nifname = \"upv\"\nnetns = \"{}\"\nmtu = 1500\n\n",
            net.name()
        )
        + &vhost_port(&dir, "vm1", mac, 1500, 0, true)
        + "queues = 2\n\n";
    let vmq = Vmq::start(&dir, &config);
    let mut vms = boot_all(&image, vec![guest_config(&dir, "vm1", mac, "10.127.0.1").cpus(2).queue_pairs(2)]);
    vmq.wait_state(&["vm1", "up0"], PortState::Up, BOOT);
    let vm = &mut vms[0];
    wait_link_up(vm);

    // Two VM queues for one port (the budget is 8), each listed by `vmq ctl queues` and counted
    // by `show`.
    let queues = vm_queue_frames(&vmq, "vm1");
    assert_eq!(queues.len(), 2, "vm1 should hold a VM queue per queue pair: {queues:?}");
    match vmq.try_ctl(&["queues"]) {
        Ok(Response::Queues(report)) => {
            let rows: Vec<u32> = report.assigned.iter().filter(|a| a.port == "vm1").map(|a| a.queue).collect();
            assert_eq!(rows, queues.iter().map(|(q, _)| *q).collect::<Vec<_>>(), "{report:?}");
        }
        other => panic!("vmq ctl queues: {other:?}"),
    }
    assert_eq!(vmq.show().queues_in_use, 2);

    assert_ping(vm, "10.127.0.100", 2);
    start_iperf3_server(vm);
    let before_guest = vm.run_ok("ethtool -S eth0");
    let args = ["iperf3", "-c", "10.127.0.1", "-t", "2", "-P", "12", "-J"];
    let r = parse_iperf3_json(&ext.run_ok(Duration::from_secs(60), &args)).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("external host -> VM over the uplink, 12 flows: {r:?}");
    assert!(r.bytes > 1_000_000, "{r:?}");
    let after = vm_queue_frames(&vmq, "vm1");
    let after_guest = vm.run_ok("ethtool -S eth0");
    for ((q, before), (q_after, after)) in queues.iter().zip(&after) {
        assert_eq!(q, q_after, "vm1's VM queues changed during the stream: {queues:?} -> {after:?}");
        let frames = after - before;
        eprintln!("VM queue {q}: {frames} frames from the uplink");
        assert!(frames > 50, "VM queue {q} took {frames} frames: the fanout program did not spread the flows");
    }
    for q in 0..2 {
        let guest_frames = guest_rx_queue_packets(&after_guest, q) - guest_rx_queue_packets(&before_guest, q);
        eprintln!("guest RX queue {q}: {guest_frames} frames");
        assert!(guest_frames > 50, "RX queue {q}: the guest counted {guest_frames}:\n{after_guest}");
    }
}

//! Packed virtqueues (VIRTIO_F_RING_PACKED) with real guests: one QEMU guest with
//! `virtio-net-pci,packed=on`, one with split rings (QEMU's default), both on vhost-user ports
//! of the real `vmq` binary. Root-only; skipped with a message when QEMU or the guest image is
//! missing.

mod guests;

use std::time::Duration;

use guests::*;
use vmq_control::protocol::PortState;
use vmq_testkit::qemu::{Guest, guest_image_or_skip};

const BOOT: Duration = Duration::from_secs(90);

/// Bit 34 of the virtio features the guest's driver acked (sysfs: one '0'/'1' per bit).
fn guest_acked_packed(vm: &mut Guest) -> bool {
    let features = vm.run_ok("cat /sys/class/net/eth0/device/features");
    let bits = features.trim();
    assert!(bits.len() >= 35 && bits.chars().all(|c| c == '0' || c == '1'), "{}: features {bits:?}", vm.name());
    bits.as_bytes()[34] == b'1'
}

/// A packed-ring guest and a split-ring guest talk through vmq: the packed guest acked packed
/// rings (the split one did not), ping at MTU 9000 (9014-byte frames, crossing vmq whole) and
/// at 1500, and a short TCP stream each way with no drops.
#[test]
fn a_packed_ring_guest_and_a_split_ring_guest_ping_jumbo_and_stream_tcp() {
    let test = "a_packed_ring_guest_and_a_split_ring_guest_ping_jumbo_and_stream_tcp";
    let Some(image) = guest_image_or_skip(test) else { return };
    if !root_or_skip(test) {
        return;
    }
    let dir = TestDir::new("packed");
    let (mac1, mac2) = ("52:54:00:7d:00:01", "52:54:00:7d:00:02");
    let config = switch_header(&dir, 2)
        + &vhost_port(&dir, "vm1", mac1, 9000, 0, true)
        + &vhost_port(&dir, "vm2", mac2, 9000, 0, true);
    let vmq = Vmq::start(&dir, &config);
    let mut vms = boot_all(
        &image,
        vec![
            guest_config(&dir, "vm1", mac1, "10.125.0.1").host_mtu(9000).net_device_option("packed=on"),
            guest_config(&dir, "vm2", mac2, "10.125.0.2").host_mtu(9000),
        ],
    );
    vmq.wait_state(&["vm1", "vm2"], PortState::Up, BOOT);
    let [vm1, vm2] = &mut vms[..] else { unreachable!() };
    wait_link_up(vm1);
    wait_link_up(vm2);
    assert!(guest_acked_packed(vm1), "vm1 (packed=on) did not ack VIRTIO_F_RING_PACKED");
    assert!(!guest_acked_packed(vm2), "vm2 (split) acked packed rings");

    assert_ping(vm1, "10.125.0.2", 3);
    assert_ping(vm2, "10.125.0.1", 3);
    // 9014-byte frames both ways: into the packed guest's RX ring (mergeable buffers) and out
    // of its TX ring.
    let before = vmq.stats();
    assert_ping(vm1, "-s 8972 10.125.0.2", 3);
    assert_ping(vm2, "-s 8972 10.125.0.1", 3);
    let after = vmq.stats();
    let d1 = Delta::between(&before, &after, "vm1");
    assert!(d1.rx_bytes >= 6 * 9014 && d1.tx_bytes >= 6 * 9014, "vm1 jumbo frames: {d1:?}");
    assert!(d1.drops.is_empty(), "drops on vm1: {d1:?}");

    vm1.run_ok("ip link set eth0 mtu 1500");
    vm2.run_ok("ip link set eth0 mtu 1500");
    assert_ping(vm1, "-s 1472 10.125.0.2", 3);

    start_iperf3_server(vm2);
    let before = vmq.stats();
    let forward = guest_iperf3(vm1, "10.125.0.2", 2, false);
    let reverse = guest_iperf3(vm1, "10.125.0.2", 2, true);
    let after = vmq.stats();
    eprintln!("packed vm1 -> split vm2 {forward:?}, back {reverse:?}");
    for (what, r) in [("packed -> split", forward), ("split -> packed", reverse)] {
        assert!(r.bytes > 1_000_000, "{what}: {r:?}");
    }
    for port in ["vm1", "vm2"] {
        let d = Delta::between(&before, &after, port);
        assert!(d.drops.is_empty(), "drops on {port}: {d:?}");
    }
}

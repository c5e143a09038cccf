//! Real QEMU 7.2 guests (TCG) attached to the vhost-user server, driven through the testkit
//! harness: the Linux virtio-net driver negotiates what vmq offers, `host_mtu` reaches the guest
//! through NET_SET_MTU (and is refused above the port MTU), a killed QEMU leaves the port down
//! and the next one attaches. Skipped with a message when qemu-system-x86_64 or the guest image
//! is missing (CI has both).

mod common;

use std::time::{Duration, Instant};

use common::{TempDir, TestServer, init_tracing, net_config};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmq_testkit::qemu::{Guest, GuestConfig, GuestError, guest_image_or_skip};
use vmq_vhost::DeviceEvent;

/// A TCG boot alone takes about 3 s; two at once on two busy cores take longer.
const BOOT: Duration = Duration::from_secs(60);
/// The vhost-user feature bit QEMU adds to SET_FEATURES (not a virtio feature).
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// Waits (in the guest, at most 10 s) for eth0's operational state to be "up".
const OPERSTATE_UP: &str =
    "for i in $(seq 100); do [ \"$(cat /sys/class/net/eth0/operstate)\" = up ] && exit 0; sleep 0.1; done; exit 1";

/// The guest's negotiated virtio features, from sysfs (one character per bit, bit 0 first).
fn guest_features(guest: &mut Guest) -> u64 {
    let bits = guest.run_ok("cat /sys/bus/virtio/devices/virtio0/features");
    bits.trim().chars().take(64).enumerate().filter(|&(_, c)| c == '1').fold(0, |acc, (i, _)| acc | 1 << i)
}

#[test]
fn qemu_guest_negotiates_offloads_is_killed_and_reattaches() {
    init_tracing();
    let Some(image) = guest_image_or_skip("qemu_guest_negotiates_offloads_is_killed_and_reattaches") else {
        return;
    };
    let dir = TempDir::new("qemu-attach");
    let config = net_config("52:54:00:00:00:11", 9000);
    let offered = config.offered_features();
    let server = TestServer::start(dir.path(), &[("vm1", config)]);
    let port = server.port(0);
    let guest_config =
        GuestConfig::new("vm1", &port.socket, "52:54:00:00:00:11").ipv4("10.99.0.1".parse().unwrap(), 24);

    let mut guest = Guest::boot(&image, guest_config.clone()).expect("guest boots");
    port.expect_event(DeviceEvent::Started, BOOT);

    // The harness: exit statuses, quoting, stdout and stderr, a shell that survives a syntax
    // error, per-command timeouts, background commands.
    let out = |status: i32, output: &str| vmq_testkit::qemu::CommandOutput { output: output.into(), status };
    let t = Duration::from_secs(10);
    assert_eq!(guest.run("true", t).unwrap(), out(0, ""));
    assert_eq!(guest.run("false", t).unwrap(), out(1, ""));
    assert_eq!(guest.run("exit 7", t).unwrap(), out(7, ""));
    assert_eq!(guest.run("echo 'it''s'\" a \"$((6*7)); echo err >&2", t).unwrap(), out(0, "its a 42\nerr"));
    assert_eq!(guest.run("if then", t).unwrap().status, 2);
    assert_eq!(guest.run("printf 'a\\nb\\n\\nc'", t).unwrap(), out(0, "a\nb\n\nc"));
    let started = Instant::now();
    match guest.run("sleep 20", Duration::from_secs(1)) {
        Err(GuestError::Timeout { .. }) => {}
        other => panic!("a command over its timeout must fail: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "the guest kills it after 1 s");
    assert_eq!(guest.run("echo still here", t).unwrap(), out(0, "still here"));
    let sleeper = guest.spawn_background("sleep 600").unwrap();
    assert_eq!(guest.run(&format!("kill -0 {}", sleeper.pid), t).unwrap().status, 0, "background command runs");
    guest.run_ok("iperf3 -s -D");
    guest.run_ok("pidof iperf3");

    // What the guest's virtio-net driver negotiated is exactly what vmq was told: for every bit
    // vmq offers, the guest has it if and only if the frontend acked it to vmq. Except MAC and
    // STATUS: QEMU serves the config space itself and never passes these two on to a
    // vhost-user backend (the guest has both, vmq sees neither).
    let acked = port.device.acked_features();
    let in_guest = guest_features(&mut guest);
    for bit in [VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS] {
        assert_ne!(in_guest & (1 << bit), 0, "guest feature bit {bit}");
        assert_eq!(acked & (1 << bit), 0, "QEMU passed feature bit {bit} on after all");
    }
    let passed_on = |b: u32| ![VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS].contains(&b);
    for bit in (0..64).filter(|&b| offered & (1 << b) != 0 && passed_on(b)) {
        assert_eq!(
            in_guest & (1 << bit) != 0,
            acked & (1 << bit) != 0,
            "feature bit {bit}: guest {in_guest:#x}, vmq {acked:#x}"
        );
    }
    for (bit, name) in [
        (VIRTIO_F_VERSION_1, "VERSION_1"),
        (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
        (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
        (VIRTIO_NET_F_CSUM, "CSUM"),
        (VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
        (VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
        (VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"),
        (VIRTIO_NET_F_HOST_ECN, "HOST_ECN"),
        (VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
        (VIRTIO_NET_F_GUEST_TSO6, "GUEST_TSO6"),
    ] {
        assert!(acked & (1 << bit) != 0, "the guest did not negotiate {name}: {acked:#x}");
    }
    // No host_mtu: the guest is not told an MTU and keeps 1500.
    assert_eq!(acked & (1 << VIRTIO_NET_F_MTU), 0);
    assert_eq!(guest.ready_mtu(), Some(1500));
    assert_eq!(port.device.frontend_mtu(), None);
    guest.run_ok(OPERSTATE_UP);

    // The offloads, as the guest's stack sees them.
    let driver = guest.run_ok("ethtool -i eth0");
    assert!(driver.lines().any(|l| l == "driver: virtio_net"), "{driver}");
    let offloads = guest.run_ok("ethtool -k eth0");
    for expected in [
        "tcp-segmentation-offload: on",  // HOST_TSO4/6 (with CSUM): the guest sends TSO frames
        "\ttx-tcp-segmentation: on",     // HOST_TSO4
        "\ttx-tcp6-segmentation: on",    // HOST_TSO6
        "\ttx-tcp-ecn-segmentation: on", // HOST_ECN
        "tx-checksumming: on",           // CSUM
        "rx-checksumming: on [fixed]",   // virtio-net always validates
        "rx-gro-hw: on",                 // GUEST_TSO4/6: vmq may deliver coalesced frames
        "scatter-gather: on",
    ] {
        assert!(offloads.lines().any(|l| l == expected), "ethtool -k lacks {expected:?}:\n{offloads}");
    }

    // The guest resets the device (driver unbound, bound again): QEMU stops the rings
    // (GET_VRING_BASE), and sets everything up again when the driver comes back.
    let generation = port.device.generation();
    guest.run_ok("echo 0000:00:01.0 > /sys/bus/pci/drivers/virtio-pci/unbind");
    port.expect_event(DeviceEvent::Stopped, Duration::from_secs(30));
    assert!(!port.device.is_running());
    guest.run_ok("echo 0000:00:01.0 > /sys/bus/pci/drivers/virtio-pci/bind");
    port.expect_event(DeviceEvent::Started, Duration::from_secs(30));
    assert!(port.device.generation() >= generation + 2);
    server.wait_status(0, "same connection, running again", |s| s.connected && s.running && s.connections == 1);

    // kill -9 QEMU: the port goes down and forgets the guest.
    let status = guest.kill().expect("reap QEMU");
    assert!(!status.success());
    port.expect_event(DeviceEvent::Stopped, Duration::from_secs(30));
    server.wait_closed(0, 1);
    assert!(!port.device.is_running());
    assert!(port.device.vring(0).kick.is_none());
    drop(guest);

    // A new QEMU on the same socket attaches and works.
    let mut guest = Guest::boot(&image, guest_config).expect("second guest boots");
    port.expect_event(DeviceEvent::Started, BOOT);
    server.wait_status(0, "second frontend running", |s| s.connected && s.running && s.connections == 2);
    // The link comes up (the kernel's link watch reports it within a second or so).
    guest.run_ok(OPERSTATE_UP);
}

#[test]
fn host_mtu_reaches_the_guest_and_is_refused_above_the_port_mtu() {
    init_tracing();
    let Some(image) = guest_image_or_skip("host_mtu_reaches_the_guest_and_is_refused_above_the_port_mtu") else {
        return;
    };
    let dir = TempDir::new("qemu-mtu");
    let server = TestServer::start(
        dir.path(),
        &[("jumbo", net_config("52:54:00:00:00:21", 9000)), ("small", net_config("52:54:00:00:00:22", 1500))],
    );
    let (jumbo_port, small_port) = (server.port(0), server.port(1));
    // Both QEMUs ask for 9000 (two guests at once).
    let mut jumbo = Guest::spawn(
        &image,
        GuestConfig::new("jumbo", &jumbo_port.socket, "52:54:00:00:00:21")
            .ipv4("10.99.1.1".parse().unwrap(), 24)
            .host_mtu(9000),
    )
    .expect("start QEMU");
    let mut small = Guest::spawn(
        &image,
        GuestConfig::new("small", &small_port.socket, "52:54:00:00:00:22")
            .ipv4("10.99.2.1".parse().unwrap(), 24)
            .host_mtu(9000),
    )
    .expect("start QEMU");
    jumbo.wait_ready(BOOT).expect("jumbo guest boots");
    small.wait_ready(BOOT).expect("small guest boots");

    // Port MTU 9000: vmq accepts NET_SET_MTU(9000), the device starts, and the guest came up
    // with MTU 9000 although nothing in it set one (VIRTIO_NET_F_MTU).
    jumbo_port.expect_event(DeviceEvent::Started, BOOT);
    assert_eq!(jumbo_port.device.frontend_mtu(), Some(9000));
    assert_ne!(jumbo_port.device.acked_features() & (1 << VIRTIO_NET_F_MTU), 0);
    assert_eq!(jumbo.ready_mtu(), Some(9000));
    assert_eq!(jumbo.run_ok("cat /sys/class/net/eth0/mtu"), "9000");
    assert_ne!(guest_features(&mut jumbo) & (1 << VIRTIO_NET_F_MTU), 0);

    // Port MTU 1500: vmq refuses NET_SET_MTU(9000) with a failed REPLY_ACK. QEMU 7.2 reports it
    // and never starts the vhost-user device; the guest boots and is still told MTU 9000 by
    // QEMU's own config space, but its NIC is dead: no ring ever reaches vmq.
    small.wait_stderr("9000Bytes MTU not supported by the backend", BOOT).expect("QEMU reports the refusal");
    assert_eq!(small.ready_mtu(), Some(9000), "QEMU still advertises host_mtu to the guest");
    small_port.expect_no_event(Duration::from_secs(1));
    assert!(!small_port.device.is_running());
    assert_eq!(small_port.device.frontend_mtu(), None);
    server.wait_status(1, "QEMU stays connected", |s| s.connected && !s.running);
    assert!(small.wait_exit(Duration::ZERO).is_none(), "QEMU keeps running");
}

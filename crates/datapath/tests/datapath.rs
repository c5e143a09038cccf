//! The data path end to end, in process: real virtio rings in guest memory on the VM side,
//! the NIC stand-in on the uplink side, real worker threads in between.

use std::time::{Duration, Instant};

use vmq_core::switch::SwitchConfig;
use vmq_core::vmq::{QueuePolicy, VmqConfig};
use vmq_core::{DropReason, Mode, OffloadCaps, PortBackend, PortConfig, PortKind, PortSpec, VlanMode};
use vmq_datapath::mem::{GuestFrame, MemGuest, mem_port};
use vmq_datapath::nic::{KeptFrames, OnceQueue, WireSink};
use vmq_datapath::{Datapath, DatapathBuilder, DatapathConfig, NicQueueTarget};
use vmq_wire::checksum::fold;
use vmq_wire::ip::locate;
use vmq_wire::vnet::{FLAG_DATA_VALID, FLAG_NEEDS_CSUM, GsoType};
use vmq_wire::{MacAddr, VnetHdr};

const EXT: MacAddr = MacAddr([0x02, 0, 0, 0, 0xee, 1]);

use vmq_datapath::nic::udp_frame;

fn mac(i: u8) -> MacAddr {
    MacAddr([0x52, 0x54, 0, 0, 0, i])
}

struct VmDef {
    vlan: u16,
    mtu: u16,
    caps: OffloadCaps,
}

fn vm(vlan: u16, mtu: u16, caps: OffloadCaps) -> VmDef {
    VmDef { vlan, mtu, caps }
}

struct Rig {
    dp: Datapath,
    guests: Vec<MemGuest>,
    wire: KeptFrames,
}

/// uplink "up0" (trunk 10, 20) + VMs "vm1".. with MACs mac(1)..; `uplink_frames` arrive on
/// the NIC (sorted per VM queue in `vmq` mode, all on the default queue in `switch` mode).
fn rig(mode: Mode, vms: &[VmDef], queues: u16, uplink_frames: Vec<Vec<u8>>) -> Rig {
    let mut ports = vec![PortConfig {
        spec: PortSpec {
            name: "up0".into(),
            kind: PortKind::Uplink,
            mac: None,
            mtu: 9000,
            vlan: VlanMode::Trunk { allowed: vec![10, 20], native: None },
            allow_mac_spoofing: false,
            max_learned_macs: vmq_core::fdb::DEFAULT_MAX_LEARNED_MACS,
            guest: Default::default(),
            offloads: OffloadCaps::NONE,
        },
        backend: PortBackend::Mem,
        uplink: None,
    }];
    for (i, v) in vms.iter().enumerate() {
        ports.push(PortConfig {
            spec: PortSpec {
                name: format!("vm{}", i + 1),
                kind: PortKind::Mem,
                mac: Some(mac(i as u8 + 1)),
                mtu: v.mtu,
                vlan: VlanMode::Access(v.vlan),
                allow_mac_spoofing: false,
                max_learned_macs: vmq_core::fdb::DEFAULT_MAX_LEARNED_MACS,
                guest: Default::default(),
                offloads: v.caps,
            },
            backend: PortBackend::Mem,
            uplink: None,
        });
    }
    let cfg = DatapathConfig {
        mode,
        workers: 2,
        vmq: VmqConfig { queues, policy: QueuePolicy::Static, workers: 2, hysteresis: 1.5 },
        switch: SwitchConfig::default(),
        ports,
        rebalance_interval_ms: 1000,
    };
    let mut b = DatapathBuilder::new(cfg).unwrap();
    let (wire, kept) = WireSink::keeping(OffloadCaps::NONE);
    b.attach("up0", Box::new(wire), None).unwrap();
    let mut guests = Vec::new();
    for (i, v) in vms.iter().enumerate() {
        let (g, source, sink) = mem_port(v.caps, true);
        b.attach(&format!("vm{}", i + 1), Box::new(sink), Some(Box::new(source))).unwrap();
        guests.push(g);
    }
    // The NIC stand-in sorts by (dst MAC, VLAN) like VMQ filters would.
    let with_hdr = |f: &Vec<u8>| [VnetHdr::default().to_bytes().to_vec(), f.clone()].concat();
    let mut default = Vec::new();
    let mut per_vm: Vec<Vec<Vec<u8>>> = vec![Vec::new(); vms.len()];
    for f in &uplink_frames {
        let l2 = vmq_wire::parse_l2(f).ok();
        let target =
            l2.and_then(|l2| (0..vms.len()).find(|&i| l2.dst == mac(i as u8 + 1) && l2.vlan == Some(vms[i].vlan)));
        match target {
            Some(i) if mode == Mode::Vmq && b.vm_queue(b.port_id(&format!("vm{}", i + 1)).unwrap()).is_some() => {
                per_vm[i].push(with_hdr(f))
            }
            _ => default.push(with_hdr(f)),
        }
    }
    for (i, frames) in per_vm.into_iter().enumerate() {
        if !frames.is_empty() {
            let id = b.port_id(&format!("vm{}", i + 1)).unwrap();
            b.attach_nic_queue("up0", NicQueueTarget::Vm(id), Box::new(OnceQueue::new(frames))).unwrap();
        }
    }
    b.attach_nic_queue("up0", NicQueueTarget::Default, Box::new(OnceQueue::new(default))).unwrap();
    Rig { dp: b.start().unwrap(), guests, wire: kept }
}

/// Polls until `done` holds or 10 s pass (workers are asynchronous; this bounds the wait).
fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::yield_now();
    }
    done()
}

fn collect(g: &MemGuest, n: usize) -> Vec<GuestFrame> {
    let mut got = Vec::new();
    wait_until(|| {
        got.extend(g.take_received());
        got.len() >= n
    });
    got
}

/// Sum of per-port counters: every frame taken in is delivered or dropped for one reason.
fn assert_accounted(dp: &Datapath, expected_rx: u64) {
    assert_accounted_with_floods(dp, expected_rx, 0);
}

/// As above; `flood_copies` = extra deliveries made by flooding (one frame, several receivers).
fn assert_accounted_with_floods(dp: &Datapath, expected_rx: u64, flood_copies: u64) {
    let stats = dp.port_stats();
    let rx: u64 = stats.iter().map(|(_, s)| s.rx_packets).sum();
    let tx: u64 = stats.iter().map(|(_, s)| s.tx_packets).sum();
    let drops: u64 = stats.iter().map(|(_, s)| s.total_drops()).sum();
    assert_eq!(rx, expected_rx, "{stats:?}");
    assert_eq!(rx + flood_copies, tx + drops, "every frame sent or dropped once: {stats:?}");
}

#[test]
fn uplink_to_vms_both_modes_strip_tags_and_keep_data() {
    for mode in [Mode::Vmq, Mode::Switch] {
        let frames: Vec<Vec<u8>> = (0..40u16)
            .map(|i| {
                let (dst, vlan) = if i % 2 == 0 { (mac(1), 10) } else { (mac(2), 20) };
                udp_frame(dst, EXT, Some(vlan), 100 + usize::from(i) * 50, i)
            })
            .collect();
        let r = rig(mode, &[vm(10, 9000, OffloadCaps::NONE), vm(20, 9000, OffloadCaps::NONE)], 8, frames.clone());
        let got1 = collect(&r.guests[0], 20);
        let got2 = collect(&r.guests[1], 20);
        assert_eq!(got1.len(), 20, "{mode:?}");
        assert_eq!(got2.len(), 20, "{mode:?}");
        // In order, tag stripped, bytes intact.
        for (k, g) in got1.iter().enumerate() {
            let mut expect = frames[k * 2].clone();
            vmq_wire::vlan::pop_tag(&mut expect);
            assert_eq!(g.frame, expect, "{mode:?} frame {k}");
            assert!(g.hdr.num_buffers >= 1);
        }
        assert_accounted(&r.dp, 40);
        let q = r.dp.queue_stats();
        let vm_queue_frames: u64 = q.iter().filter(|s| s.queue.is_some()).map(|s| s.rx_packets).sum();
        match mode {
            Mode::Vmq => assert_eq!(vm_queue_frames, 40, "VMQ: no frame through the default queue: {q:?}"),
            Mode::Switch => assert_eq!(vm_queue_frames, 0),
        }
    }
}

#[test]
fn multicast_source_frames_from_the_uplink_are_dropped_in_both_modes() {
    for mode in [Mode::Vmq, Mode::Switch] {
        let group_src = MacAddr([0x01, 0, 0x5e, 0, 0, 1]);
        let mut frames: Vec<Vec<u8>> = (0..5u16).map(|i| udp_frame(mac(1), group_src, Some(10), 200, i)).collect();
        frames.push(udp_frame(mac(1), EXT, Some(10), 200, 9));
        let r = rig(mode, &[vm(10, 9000, OffloadCaps::NONE)], 8, frames);
        // The valid frame behind them arrives, alone.
        let got = collect(&r.guests[0], 1);
        assert_eq!(got.len(), 1, "{mode:?}");
        assert!(wait_until(|| r.dp.stats("up0").is_some_and(|s| s.drops(DropReason::Malformed) == 5)), "{mode:?}");
        assert_eq!(r.guests[0].take_received().len(), 0, "{mode:?}");
        assert_accounted(&r.dp, 6);
    }
}

#[test]
fn queue_budget_overflow_uses_the_default_queue() {
    let frames: Vec<Vec<u8>> = (0..30u16).map(|i| udp_frame(mac((i % 3) as u8 + 1), EXT, Some(10), 200, i)).collect();
    let vms = [vm(10, 9000, OffloadCaps::NONE), vm(10, 9000, OffloadCaps::NONE), vm(10, 9000, OffloadCaps::NONE)];
    let r = rig(Mode::Vmq, &vms, 2, frames);
    for g in &r.guests {
        assert_eq!(collect(g, 10).len(), 10, "{:?} {:?}", r.dp.port_stats(), r.dp.queue_stats());
    }
    let q = r.dp.queue_stats();
    let default: u64 = q.iter().filter(|s| s.queue.is_none()).map(|s| s.rx_packets).sum();
    assert_eq!(default, 10, "the VM beyond the 2-queue budget is served by the switch: {q:?}");
    let assigned = r.dp.queue_assignments();
    assert_eq!(assigned.iter().filter(|(_, q)| q.is_some()).count(), 2);
}

#[test]
fn vm_policy_spoof_vlan_mtu_and_uplink_tagging() {
    for mode in [Mode::Vmq, Mode::Switch] {
        let r = rig(
            mode,
            &[vm(10, 9000, OffloadCaps::NONE), vm(10, 1500, OffloadCaps::NONE), vm(20, 9000, OffloadCaps::NONE)],
            8,
            vec![],
        );
        let h = VnetHdr::default();
        // vm1 -> vm2 (same VLAN): delivered untagged.
        assert!(r.guests[0].send(&h, &udp_frame(mac(2), mac(1), None, 200, 1)));
        // vm1 -> vm3 (VLAN 20): isolated. Unknown unicast in VLAN 10 goes to the uplink, tagged.
        assert!(r.guests[0].send(&h, &udp_frame(mac(3), mac(1), None, 200, 2)));
        // vm1 spoofing vm2's MAC: dropped.
        assert!(r.guests[0].send(&h, &udp_frame(mac(9), mac(2), None, 200, 3)));
        // vm1 -> vm2 jumbo: vm2 has MTU 1500, dropped as oversize, never truncated.
        assert!(r.guests[0].send(&h, &udp_frame(mac(2), mac(1), None, 9014, 4)));
        // vm1 sends a tagged frame on an access port: VLAN violation.
        assert!(r.guests[0].send(&h, &udp_frame(mac(2), mac(1), Some(10), 200, 5)));
        // Bogus virtio-net header (GSO with gso_size 0): malformed.
        let bogus = VnetHdr { gso_type: GsoType::TcpV4.to_raw(), gso_size: 0, ..h };
        assert!(r.guests[0].send(&bogus, &udp_frame(mac(2), mac(1), None, 200, 6)));
        // The switch floods unknown unicast within VLAN 10 (vm2 and the uplink); the VMQ fast
        // path sends it straight to the uplink.
        let floods = if mode == Mode::Switch { 1 } else { 0 };
        let got = collect(&r.guests[1], 1 + floods);
        assert_eq!(got.len(), 1 + floods, "{mode:?}");
        assert_eq!(got[0].frame, udp_frame(mac(2), mac(1), None, 200, 1));
        assert!(wait_until(|| r.dp.stats("vm1").unwrap().rx_packets == 6));
        assert!(wait_until(|| r.wire.lock().unwrap().len() == 1));
        let wire = r.wire.lock().unwrap().clone();
        assert_eq!(vmq_wire::parse_l2(&wire[0].1).unwrap().vlan, Some(10), "{mode:?}: tagged toward the trunk");
        assert!(r.guests[2].take_received().is_empty(), "VLAN isolation");
        let s1 = r.dp.stats("vm1").unwrap();
        assert_eq!(s1.drops(DropReason::Spoofed), 1, "{mode:?} {s1:?}");
        assert_eq!(s1.drops(DropReason::Vlan), 1);
        assert_eq!(s1.drops(DropReason::Malformed), 1);
        assert_eq!(r.dp.stats("vm2").unwrap().drops(DropReason::Oversize), 1, "oversize counted at egress");
        assert_accounted_with_floods(&r.dp, 6, floods as u64);
    }
}

/// A guest's TCP GSO frame (partial checksum), as Linux virtio-net sends it.
fn gso_tcp(dst: MacAddr, src: MacAddr, payload_len: usize, mss: u16) -> (VnetHdr, Vec<u8>) {
    let b = etherparse::PacketBuilder::ethernet2(src.0, dst.0)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 5201, 1, 64000)
        .ack(1);
    let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
    let mut f = Vec::new();
    b.write(&mut f, &payload).unwrap();
    let l = locate(&f).unwrap();
    let pseudo = fold(l.pseudo_header(&f, f.len() - l.l4));
    f[l.l4 + 16..l.l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    let h = VnetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GsoType::TcpV4.to_raw(),
        hdr_len: l.payload as u16,
        gso_size: mss,
        csum_start: l.l4 as u16,
        csum_offset: 16,
        num_buffers: 0,
    };
    (h, f)
}

#[test]
fn gso_passes_to_capable_vm_and_is_segmented_for_others() {
    for mode in [Mode::Vmq, Mode::Switch] {
        let r = rig(
            mode,
            &[vm(10, 9000, OffloadCaps::ALL), vm(10, 1500, OffloadCaps::ALL), vm(10, 1500, OffloadCaps::NONE)],
            8,
            vec![],
        );
        let (h, f) = gso_tcp(mac(2), mac(1), 30000, 1448);
        assert!(r.guests[0].send(&h, &f));
        let (h3, f3) = gso_tcp(mac(3), mac(1), 30000, 1448);
        assert!(r.guests[0].send(&h3, &f3));
        let got = collect(&r.guests[1], 1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].frame, f, "{mode:?}: GSO frame delivered whole");
        assert_eq!(got[0].hdr.gso_size, 1448);
        let segs = collect(&r.guests[2], 21);
        assert_eq!(segs.len(), 21, "30000 / 1448 rounds up to 21 segments");
        let mut payload = Vec::new();
        for s in &segs {
            assert!(s.frame.len() <= 1514, "segments fit MTU 1500");
            assert_eq!(s.hdr.flags & FLAG_DATA_VALID, FLAG_DATA_VALID);
            let p = etherparse::SlicedPacket::from_ethernet(&s.frame).unwrap();
            let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else { panic!() };
            let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else { panic!() };
            let want = t.to_header().calc_checksum_ipv4(&ip.header().to_header(), t.payload()).unwrap();
            assert_eq!(t.checksum(), want, "software-finished checksums are right");
            payload.extend_from_slice(t.payload());
        }
        assert_eq!(payload, (0..30000).map(|i| i as u8).collect::<Vec<u8>>());
        assert_eq!(r.dp.stats("vm2").unwrap().offload_segments, 0, "no segmentation toward a GSO receiver");
        assert_eq!(r.dp.stats("vm2").unwrap().offload_gso_passed, 1);
        assert_eq!(r.dp.stats("vm3").unwrap().offload_segments, 21);
    }
}

#[test]
fn rsc_coalesces_uplink_tcp_toward_gso_receivers() {
    // 10 in-order MSS segments of one flow from the wire, DATA_VALID not set: verified, merged.
    let mut frames = Vec::new();
    for k in 0..10u32 {
        let b = etherparse::PacketBuilder::ethernet2(EXT.0, mac(1).0)
            .single_vlan(10.try_into().unwrap())
            .ipv4([10, 0, 0, 9], [10, 0, 0, 1], 64)
            .tcp(5201, 40000, 1 + k * 1448, 64000)
            .ack(1);
        let mut f = Vec::new();
        b.write(&mut f, &vec![k as u8; 1448]).unwrap();
        frames.push(f);
    }
    let r = rig(Mode::Vmq, &[vm(10, 9000, OffloadCaps::ALL)], 8, frames);
    let payload_len = |g: &GuestFrame| locate(&g.frame).map(|l| l.l4 + l.l4_len(&g.frame) - l.payload).unwrap_or(0);
    let mut got = Vec::new();
    wait_until(|| {
        got.extend(r.guests[0].take_received());
        got.iter().map(payload_len).sum::<usize>() >= 14480
    });
    let total: usize = got.iter().map(payload_len).sum();
    assert_eq!(total, 14480, "all payload arrives");
    assert!(got.len() < 10, "segments were coalesced: {} frames", got.len());
    assert!(got.iter().any(|g| g.hdr.gso_size == 1448 && g.hdr.flags & FLAG_NEEDS_CSUM != 0));
    // Counters are updated right after the batch the guest already sees.
    assert!(wait_until(|| r.dp.stats("vm1").unwrap().offload_coalesced >= 2), "{:?}", r.dp.stats("vm1"));
}

#[test]
fn hostile_tx_descriptors_are_counted_and_the_port_keeps_working() {
    let r = rig(Mode::Vmq, &[vm(10, 9000, OffloadCaps::NONE), vm(10, 9000, OffloadCaps::NONE)], 8, vec![]);
    let g = &r.guests[0];
    g.with_tx_ring(|mem, ring| {
        // Descriptor 200: outside guest memory. Descriptor 201: a loop (next = itself).
        // Descriptor 202: device-writable in a TX queue.
        ring.write_raw_desc(mem, 200, 1 << 40, 100, 0, 0);
        ring.post_raw(mem, 200);
        ring.write_raw_desc(mem, 201, 0x30_0000, 64, 1, 201);
        ring.post_raw(mem, 201);
        ring.write_raw_desc(mem, 202, 0x30_0000, 64, 2, 0);
        ring.post_raw(mem, 202);
    });
    assert!(wait_until(|| r.dp.stats("vm1").unwrap().drops(DropReason::BadDescriptor) >= 2));
    // After all that, a good frame still goes through.
    assert!(g.send(&VnetHdr::default(), &udp_frame(mac(2), mac(1), None, 300, 1)));
    assert_eq!(collect(&r.guests[1], 1).len(), 1);
    let s = r.dp.stats("vm1").unwrap();
    assert_eq!(s.rx_packets, 4, "{s:?}");
    assert_eq!(s.total_drops(), 3, "{s:?}");
}

#[test]
fn dynamic_policy_moves_the_queue_to_the_busy_vm_and_reprograms_the_nic() {
    use vmq_core::vmq::{FilterKey, QueueId};
    use vmq_datapath::nic::StandInNic;
    let mut ports = vec![uplink_config(vec![10])];
    for i in 1..=2u8 {
        ports.push(PortConfig {
            spec: PortSpec {
                name: format!("vm{i}"),
                kind: PortKind::Mem,
                mac: Some(mac(i)),
                mtu: 9000,
                vlan: VlanMode::Access(10),
                allow_mac_spoofing: false,
                max_learned_macs: vmq_core::fdb::DEFAULT_MAX_LEARNED_MACS,
                guest: Default::default(),
                offloads: OffloadCaps::NONE,
            },
            backend: PortBackend::Mem,
            uplink: None,
        });
    }
    let cfg = DatapathConfig {
        mode: Mode::Vmq,
        workers: 2,
        vmq: VmqConfig { queues: 1, policy: QueuePolicy::Dynamic, workers: 2, hysteresis: 1.5 },
        switch: SwitchConfig::default(),
        ports,
        rebalance_interval_ms: 50,
    };
    let mut b = DatapathBuilder::new(cfg).unwrap();
    b.attach("up0", Box::new(WireSink::discard(OffloadCaps::NONE)), None).unwrap();
    let mut guests = Vec::new();
    for i in 1..=2 {
        let (g, source, sink) = mem_port(OffloadCaps::NONE, false);
        b.attach(&format!("vm{i}"), Box::new(sink), Some(Box::new(source))).unwrap();
        guests.push(g);
    }
    assert_eq!(b.vm_queue(b.port_id("vm1").unwrap()), Some(QueueId(1)), "first come");
    // Only vm2 has traffic: an endless stream from the wire.
    let frames = (0..64u16).map(|f| udp_frame(mac(2), EXT, Some(10), 300, f)).collect();
    let nic = StandInNic::new(vec![
        (FilterKey { mac: mac(2), vlan: 10 }, frames),
        (FilterKey { mac: mac(1), vlan: 10 }, vec![]),
    ]);
    b.attach_nic_queue_id("up0", QueueId::DEFAULT, Box::new(nic.queue(QueueId::DEFAULT))).unwrap();
    b.attach_nic_queue_id("up0", QueueId(1), Box::new(nic.queue(QueueId(1)))).unwrap();
    b.attach_steering("up0", Box::new(nic.steering())).unwrap();
    let dp = b.start().unwrap();
    let vm2_has_queue = || dp.queue_assignments().iter().any(|(n, q)| n == "vm2" && *q == Some(QueueId(1)));
    assert!(wait_until(vm2_has_queue), "{:?}", dp.queue_assignments());
    // The NIC now sorts vm2's frames into queue 1: that queue's count grows.
    let on_queue = |dp: &Datapath| {
        dp.queue_stats().iter().filter(|q| q.queue == Some(QueueId(1))).map(|q| q.rx_packets).sum::<u64>()
    };
    let before = on_queue(&dp);
    assert!(wait_until(|| on_queue(&dp) > before + 1000), "{:?}", dp.queue_stats());
    assert!(dp.queue_stats().iter().any(|q| q.queue == Some(QueueId(1)) && q.port.as_deref() == Some("vm2")));
    assert!(guests[1].received().0 > 0);
    assert_eq!(guests[0].received().0, 0);
    let drops: u64 = dp.port_stats().iter().map(|(_, s)| s.total_drops()).sum();
    let vm2_no_buffer = dp.stats("vm2").unwrap().drops(DropReason::NoBuffer);
    assert_eq!(drops, vm2_no_buffer, "only RX-ring-full drops under overload");
}

/// Uplink `up0`, a trunk of `allowed` VLANs.
fn uplink_config(allowed: Vec<u16>) -> PortConfig {
    PortConfig {
        spec: PortSpec {
            name: "up0".into(),
            kind: PortKind::Uplink,
            mac: None,
            mtu: 9000,
            vlan: VlanMode::Trunk { allowed, native: None },
            allow_mac_spoofing: false,
            max_learned_macs: vmq_core::fdb::DEFAULT_MAX_LEARNED_MACS,
            guest: Default::default(),
            offloads: OffloadCaps::NONE,
        },
        backend: PortBackend::Mem,
        uplink: None,
    }
}

fn mem_port_config(name: &str, n: u8, vlan: u16) -> PortConfig {
    PortConfig {
        spec: PortSpec {
            name: name.into(),
            kind: PortKind::Mem,
            mac: Some(mac(n)),
            mtu: 9000,
            vlan: VlanMode::Access(vlan),
            allow_mac_spoofing: false,
            max_learned_macs: vmq_core::fdb::DEFAULT_MAX_LEARNED_MACS,
            guest: Default::default(),
            offloads: OffloadCaps::NONE,
        },
        backend: PortBackend::Mem,
        uplink: None,
    }
}

/// vm1 streams to vm2 while ports come and go, MTUs and VLANs of other ports change, the queue
/// budget shrinks and grows and a rebalance is forced: vm2 gets every frame, in order.
#[test]
fn runtime_changes_never_drop_frames_of_other_ports() {
    use vmq_datapath::Attachment;
    for mode in [Mode::Vmq, Mode::Switch] {
        let r = rig(mode, &[vm(10, 9000, OffloadCaps::NONE), vm(10, 9000, OffloadCaps::NONE)], 2, Vec::new());
        const FRAMES: u16 = 3000;
        let dp = &r.dp;
        let sender = r.guests[0].clone();
        let stream = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            for i in 0..FRAMES {
                let frame = udp_frame(mac(2), mac(1), None, 200, i);
                while !sender.send(&VnetHdr::default(), &frame) {
                    assert!(Instant::now() < deadline, "TX ring never drained");
                    std::thread::yield_now();
                }
            }
        });
        let mut received = Vec::new();
        let mut round = 0u8;
        while received.len() < FRAMES as usize && round < 200 {
            round += 1;
            let name = format!("extra{round}");
            let (_g, source, sink) = mem_port(OffloadCaps::NONE, false);
            dp.add_port_with(
                mem_port_config(&name, 100 + round % 50, 10),
                Attachment::new(Box::new(sink), Some(Box::new(source))),
            )
            .unwrap();
            dp.set_port_mtu(&name, 1500).unwrap();
            dp.set_port_vlan(&name, VlanMode::Access(20)).unwrap();
            if mode == Mode::Vmq {
                dp.set_queue_budget(u16::from(round % 3)).unwrap();
                dp.rebalance_now();
            }
            dp.remove_port(&name).unwrap();
            received.extend(r.guests[1].take_received());
        }
        stream.join().unwrap();
        wait_until(|| {
            received.extend(r.guests[1].take_received());
            received.len() >= FRAMES as usize
        });
        assert_eq!(received.len(), FRAMES as usize, "{mode:?}: {:?}", dp.port_stats());
        for (i, g) in received.iter().enumerate() {
            assert_eq!(g.frame, udp_frame(mac(2), mac(1), None, 200, i as u16), "{mode:?}: frame {i} out of order");
        }
        for name in ["vm1", "vm2"] {
            assert_eq!(dp.stats(name).unwrap().total_drops(), 0, "{mode:?} {name}");
        }
        assert!(round > 3, "the changes overlapped the stream ({round} rounds)");
        assert!(dp.stats("extra1").is_none(), "removed ports are gone");
    }
}

#[test]
fn runtime_change_errors_are_clear() {
    let r = rig(Mode::Vmq, &[vm(10, 9000, OffloadCaps::NONE)], 2, Vec::new());
    let dp = &r.dp;
    assert!(dp.remove_port("nope").unwrap_err().to_string().contains("nope"));
    assert!(dp.set_port_mtu("vm1", 9001).unwrap_err().to_string().contains("9001"));
    assert!(dp.set_port_mtu("vm1", 67).is_err());
    assert!(dp.set_port_vlan("vm1", VlanMode::Access(4095)).is_err());
    let dup = mem_port_config("vm1", 9, 10);
    let (_g, source, sink) = mem_port(OffloadCaps::NONE, false);
    let err = dp.add_port_with(dup, vmq_datapath::Attachment::new(Box::new(sink), Some(Box::new(source)))).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    let mut bad_uplink = mem_port_config("vm9", 9, 10);
    bad_uplink.uplink = Some("vm1".into());
    let (_g, source, sink) = mem_port(OffloadCaps::NONE, false);
    let err = dp
        .add_port_with(bad_uplink, vmq_datapath::Attachment::new(Box::new(sink), Some(Box::new(source))))
        .unwrap_err();
    assert!(err.to_string().contains("not an uplink"), "{err}");
    // The stand-in uplink has no NIC queues here: the budget may not exceed the configured 2.
    assert!(dp.set_queue_budget(3).is_err());
    dp.set_queue_budget(1).unwrap();
    assert_eq!(dp.queue_config().queues, 1);
    // MTU change is enforced at once.
    dp.set_port_mtu("vm1", 1500).unwrap();
    assert_eq!(dp.ports().iter().find(|p| p.config.spec.name == "vm1").unwrap().config.spec.mtu, 1500);
}

/// Big frames leave the sender's memory only when delivered: to a VM in one copy (guest to
/// guest), to the uplink through vmq's buffer. More frames than the TX ring holds, so the
/// sender's chains must come back after each batch for the stream to go on.
#[test]
fn big_frames_cross_guest_to_guest_and_to_the_wire_intact() {
    for mode in [Mode::Vmq, Mode::Switch] {
        let r = rig(mode, &[vm(10, 9000, OffloadCaps::NONE), vm(10, 9000, OffloadCaps::NONE)], 8, Vec::new());
        const FRAMES: u16 = 600;
        let frame = |i: u16, dst: MacAddr| {
            // Both sides of the one-copy threshold (`SPLIT_MIN`, 512 B) and up to jumbo.
            let len = [300, 700, 1500, 3000, 5000, 7000][usize::from(i % 6)];
            let mut f = udp_frame(dst, mac(1), None, len, i);
            // A payload pattern that differs per frame and per position.
            let n = f.len();
            for (k, b) in f[60..n].iter_mut().enumerate() {
                *b = (k as u16 ^ i) as u8;
            }
            f
        };
        let sender = r.guests[0].clone();
        let stream = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            for i in 0..FRAMES {
                // Every other frame to vm2, the rest to an address behind the uplink.
                let dst = if i % 2 == 0 { mac(2) } else { EXT };
                while !sender.send(&VnetHdr::default(), &frame(i, dst)) {
                    assert!(Instant::now() < deadline, "the sender's TX chains never came back");
                    std::thread::yield_now();
                }
            }
        });
        // In switch mode the frames for the (never learned) external address are flooded to
        // vm2 as well: keep those addressed to vm2.
        let mut got = Vec::new();
        wait_until(|| {
            got.extend(r.guests[1].take_received().into_iter().filter(|g| g.frame[..6] == mac(2).0));
            got.len() >= usize::from(FRAMES / 2)
        });
        stream.join().unwrap();
        assert_eq!(got.len(), usize::from(FRAMES / 2), "{mode:?}: {:?}", r.dp.port_stats());
        for (k, g) in got.iter().enumerate() {
            let i = (k * 2) as u16;
            assert_eq!(g.frame, frame(i, mac(2)), "{mode:?}: frame {i} to vm2");
        }
        assert!(wait_until(|| r.wire.lock().unwrap().len() >= usize::from(FRAMES / 2)));
        let wire = r.wire.lock().unwrap();
        for (k, (_, f)) in wire.iter().filter(|(_, f)| f[..6] == EXT.0).enumerate() {
            let i = (k * 2 + 1) as u16;
            // The uplink is a trunk: vmq tags the frame with the VM's VLAN on the way out.
            let mut want = frame(i, EXT);
            want.splice(12..12, [0x81, 0x00, 0x00, 10]);
            assert_eq!(f, &want, "{mode:?}: frame {i} on the wire");
        }
        for name in ["vm1", "vm2"] {
            assert_eq!(r.dp.stats(name).unwrap().total_drops(), 0, "{mode:?} {name}");
        }
    }
}

/// Two mem VMs on a switch, nothing else: every task sleeps on a kick fd, so an idle worker
/// makes no rounds.
fn two_vms() -> Rig {
    let ports = (1..=2u8)
        .map(|i| PortConfig {
            spec: PortSpec {
                name: format!("vm{i}"),
                kind: PortKind::Mem,
                mac: Some(mac(i)),
                mtu: 1500,
                vlan: VlanMode::Access(10),
                allow_mac_spoofing: false,
                offloads: OffloadCaps::NONE,
                max_learned_macs: vmq_core::fdb::DEFAULT_MAX_LEARNED_MACS,
                guest: Default::default(),
            },
            backend: PortBackend::Mem,
            uplink: None,
        })
        .collect();
    let cfg = DatapathConfig {
        mode: Mode::Switch,
        workers: 2,
        vmq: VmqConfig { queues: 0, policy: QueuePolicy::Static, workers: 2, hysteresis: 1.5 },
        switch: SwitchConfig::default(),
        ports,
        rebalance_interval_ms: 1000,
    };
    let mut b = DatapathBuilder::new(cfg).unwrap();
    let mut guests = Vec::new();
    for i in 1..=2 {
        let (g, source, sink) = mem_port(OffloadCaps::NONE, true);
        b.attach(&format!("vm{i}"), Box::new(sink), Some(Box::new(source))).unwrap();
        guests.push(g);
    }
    let (_, kept) = WireSink::keeping(OffloadCaps::NONE);
    Rig { dp: b.start().unwrap(), guests, wire: kept }
}

fn total_sleeps(dp: &Datapath) -> u64 {
    dp.workers().iter().map(|w| w.sleeps).sum()
}

#[test]
fn idle_workers_sleep_until_a_frame_wakes_them() {
    let r = two_vms();
    let frame = || udp_frame(mac(2), mac(1), None, 100, 1);
    assert!(r.guests[0].send(&VnetHdr::default(), &frame()));
    assert_eq!(collect(&r.guests[1], 1).len(), 1);
    // Every source has a wake fd: no timer wakes an idle worker. Each worker goes to sleep at
    // most once more in the window (the one that forwarded the frame, after its spin); a
    // backstop timeout would add one per timeout per worker.
    let before = total_sleeps(&r.dp);
    std::thread::sleep(Duration::from_millis(500));
    let sleeps = total_sleeps(&r.dp) - before;
    assert!(sleeps <= 4, "{sleeps} sleeps of 2 idle workers in 500 ms: something wakes them");
    // And a frame still wakes them.
    assert!(r.guests[1].send(&VnetHdr::default(), &udp_frame(mac(1), mac(2), None, 100, 1)));
    assert_eq!(collect(&r.guests[0], 1).len(), 1, "after the idle window");
}

#[test]
fn a_bogus_avail_index_breaks_the_ring_once_and_the_worker_sleeps_until_a_reset() {
    let r = two_vms();
    let g = &r.guests[0];
    let frame = || udp_frame(mac(2), mac(1), None, 100, 1);
    assert!(g.send(&VnetHdr::default(), &frame()));
    assert_eq!(collect(&r.guests[1], 1).len(), 1);
    // The device has taken 1 chain; the driver claims 1 + 256 + 5 are available.
    g.with_tx_ring(|mem, ring| ring.write_raw_avail_idx(mem, 1 + vmq_datapath::mem::QUEUE_SIZE + 5));
    g.kick();
    assert!(wait_until(|| r.dp.stats("vm1").unwrap().drops(DropReason::RingBroken) >= 1), "{:?}", r.dp.stats("vm1"));
    // Idle again: over a window the workers do not wake at all (a worker kept awake by the
    // ring tries to sleep every 50 µs: thousands).
    let before = total_sleeps(&r.dp);
    let window = Instant::now();
    while window.elapsed() < Duration::from_millis(300) {
        std::thread::yield_now();
    }
    let sleeps = total_sleeps(&r.dp) - before;
    assert!(sleeps < 50, "{sleeps} sleep attempts in 300 ms after the ring broke");
    let s = r.dp.stats("vm1").unwrap();
    assert_eq!(s.drops(DropReason::RingBroken), 1, "counted once: {s:?}");
    assert_eq!(s.total_drops(), 1, "{s:?}");
    assert_eq!(s.rx_packets, 1, "errors are not frames: {s:?}");
    // The guest resets its TX queue: frames flow again.
    g.reset_tx();
    assert!(g.send(&VnetHdr::default(), &frame()));
    assert_eq!(collect(&r.guests[1], 1).len(), 1, "after the reset");
    let s = r.dp.stats("vm1").unwrap();
    assert_eq!((s.rx_packets, s.drops(DropReason::RingBroken)), (2, 1), "{s:?}");
}

#[test]
fn a_huge_looping_indirect_table_costs_one_bad_descriptor() {
    let r = two_vms();
    let g = &r.guests[0];
    // 16 MiB of TX buffer space as one indirect table (1 Mi entries), entry 0 looping on itself.
    const TABLE: u64 = 0x30_0000;
    const TABLE_LEN: u32 = 16 << 20;
    g.with_tx_ring(|mem, ring| {
        use vm_memory::Bytes;
        let mut looping = [0u8; 16];
        looping[..8].copy_from_slice(&TABLE.to_le_bytes());
        looping[8..12].copy_from_slice(&64u32.to_le_bytes());
        looping[12..14].copy_from_slice(&1u16.to_le_bytes()); // NEXT, next = 0
        mem.write_slice(&looping, vm_memory::GuestAddress(TABLE)).unwrap();
        ring.write_raw_desc(mem, 200, TABLE, TABLE_LEN, 4, 0); // INDIRECT
        ring.post_raw(mem, 200);
    });
    g.kick();
    assert!(wait_until(|| r.dp.stats("vm1").unwrap().drops(DropReason::BadDescriptor) >= 1));
    assert!(g.send(&VnetHdr::default(), &udp_frame(mac(2), mac(1), None, 100, 1)));
    assert_eq!(collect(&r.guests[1], 1).len(), 1, "the port keeps working");
    let s = r.dp.stats("vm1").unwrap();
    assert_eq!((s.drops(DropReason::BadDescriptor), s.total_drops(), s.rx_packets), (1, 1, 2), "{s:?}");
}

#[test]
fn a_tiny_gso_size_is_dropped_at_ingress_not_amplified() {
    // gso_size 16 would make 500 segments of an 8000-byte frame (4096 of a 64 KiB one).
    let r = rig(Mode::Vmq, &[vm(10, 9000, OffloadCaps::ALL), vm(10, 9000, OffloadCaps::NONE)], 8, vec![]);
    let (tiny, f) = gso_tcp(mac(2), mac(1), 8000, 16);
    assert!(r.guests[0].send(&tiny, &f));
    let (good, f) = gso_tcp(mac(2), mac(1), 3000, 1448);
    assert!(r.guests[0].send(&good, &f));
    let got = collect(&r.guests[1], 3);
    assert!(wait_until(|| r.dp.stats("vm1").unwrap().rx_packets == 2));
    let s = r.dp.stats("vm1").unwrap();
    assert_eq!((s.drops(DropReason::Offload), s.total_drops()), (1, 1), "{s:?}");
    assert_eq!(got.len(), 3, "only the 1448-byte MSS frame's 3 segments arrive");
    assert_eq!(got.iter().filter(|g| g.frame.len() > 1448).count(), 2, "two full 1448-byte segments");
    assert_eq!(r.dp.stats("vm2").unwrap().offload_segments, 3);
}

/// Errors across the data path's API are typed: a caller can tell a bad MTU, VLAN or budget
/// apart by variant, and a backend's own error (here the TAP's) is its `source`, not a string.
#[test]
fn runtime_change_errors_are_typed_with_their_sources() {
    use std::error::Error as _;
    use vmq_datapath::{BackendError, DatapathError};
    let r = rig(Mode::Vmq, &[vm(10, 9000, OffloadCaps::NONE)], 2, Vec::new());
    let dp = &r.dp;
    assert!(matches!(dp.set_port_mtu("vm1", 9001), Err(DatapathError::InvalidMtu { mtu: 9001, min: 68, max: 9000 })));
    assert!(matches!(
        dp.set_port_vlan("vm1", VlanMode::Access(4095)),
        Err(DatapathError::InvalidVlan(VlanMode::Access(4095)))
    ));
    assert!(matches!(dp.set_queue_budget(3), Err(DatapathError::QueueBudget { requested: 3, max: 2 })));
    // The rig's data path was built without backends: a run-time port cannot be attached.
    let err = dp.add_port(mem_port_config("vm7", 7, 10)).unwrap_err();
    assert!(matches!(&err, DatapathError::NoBackends { port } if port == "vm7"), "{err}");
    assert!(dp.stats("vm7").is_none(), "the failed port left nothing behind");

    // The real backends: a TAP name longer than the kernel's 15 bytes is refused by the TAP
    // layer before anything is created (no root needed), and its error is kept as the source.
    let mut tap = mem_port_config("t0", 3, 10);
    tap.spec.kind = PortKind::Tap;
    tap.backend = PortBackend::Tap { ifname: "a-name-far-too-long".into(), netns: None, create_netns: false };
    let cfg = DatapathConfig {
        mode: Mode::Switch,
        workers: 1,
        vmq: VmqConfig::default(),
        switch: SwitchConfig::default(),
        ports: vec![tap],
        rebalance_interval_ms: 1000,
    };
    let err = Datapath::start(cfg).err().expect("an overlong TAP name is refused");
    let DatapathError::Backend { port, source: BackendError::Tap(tap_err) } = &err else {
        panic!("expected a TAP backend error, got {err:?}")
    };
    assert_eq!(port, "t0");
    let source = err.source().expect("the backend error is the source");
    assert_eq!(source.to_string(), tap_err.to_string());
    assert!(source.source().is_some(), "the TAP error keeps its own cause (the name rule): {tap_err:?}");
}

/// A guest's MAC change (as its frontend relays it): refused and counted on a port without
/// `allow_mac_change`, where the port keeps its address and the guest's frames from the new one
/// stay spoofed; on a port with it, the spoof guard, static FDB entry and VM queue filter move
/// before the call returns, and frames to and from the new MAC flow.
#[test]
fn guest_mac_change_follows_policy_and_moves_fdb_and_queue_filter() {
    use vmq_datapath::{Attachment, DatapathError};
    for mode in [Mode::Vmq, Mode::Switch] {
        let r = rig(mode, &[vm(10, 9000, OffloadCaps::NONE), vm(10, 9000, OffloadCaps::NONE)], 4, Vec::new());
        let dp = &r.dp;
        let mut allowed = mem_port_config("vm3", 3, 10);
        allowed.spec.guest.allow_mac_change = true;
        let (g3, source, sink) = mem_port(OffloadCaps::NONE, true);
        dp.add_port_with(allowed, Attachment::new(Box::new(sink), Some(Box::new(source)))).unwrap();
        let static_macs = |port: &str| -> Vec<MacAddr> {
            dp.fdb().into_iter().filter(|r| r.port == port && r.age_secs.is_none()).map(|r| r.mac).collect()
        };
        let new1 = MacAddr([0x52, 0x54, 0, 0, 0x11, 1]);
        let new3 = MacAddr([0x52, 0x54, 0, 0, 0x33, 3]);

        // Refused: error, counted, nothing moves.
        let err = dp.guest_set_mac("vm1", new1).unwrap_err();
        assert!(matches!(err, DatapathError::MacChangeRefused { .. }), "{mode:?}: {err}");
        assert_eq!(dp.stats("vm1").unwrap().mac_change_refused, 1, "{mode:?}");
        assert_eq!(static_macs("vm1"), vec![mac(1)], "{mode:?}");
        assert!(!dp.guest_set_mac("vm1", mac(1)).unwrap(), "{mode:?}: its own MAC is no change");
        assert_eq!(dp.stats("vm1").unwrap().mac_change_refused, 1, "{mode:?}: not counted as refused");
        assert!(r.guests[0].send(&VnetHdr::default(), &udp_frame(mac(2), new1, None, 100, 1)));
        assert!(wait_until(|| dp.stats("vm1").unwrap().drops(DropReason::Spoofed) == 1), "{mode:?}");

        // Allowed: the port moves at once.
        assert!(dp.guest_set_mac("vm3", new3).unwrap(), "{mode:?}");
        assert_eq!(static_macs("vm3"), vec![new3], "{mode:?}: static entry follows, old one gone");
        assert_eq!(dp.stats("vm3").unwrap().mac_change_refused, 0);
        if mode == Mode::Vmq {
            let queue = dp.queue_assignments().into_iter().find(|(n, _)| n == "vm3").and_then(|(_, q)| q);
            assert!(queue.is_some(), "vm3 keeps a VM queue under its new MAC");
        }
        // vm2 -> new MAC arrives at vm3 (a known unicast, not a flood: vm1 sees nothing).
        let to_new = udp_frame(new3, mac(2), None, 120, 2);
        assert!(r.guests[1].send(&VnetHdr::default(), &to_new));
        let got = collect(&g3, 1);
        assert_eq!(got.len(), 1, "{mode:?}: {:?}", dp.port_stats());
        assert_eq!(got[0].frame, to_new);
        // vm3 sends from its new MAC: not spoofed, vm2 gets it.
        let from_new = udp_frame(mac(2), new3, None, 130, 3);
        assert!(g3.send(&VnetHdr::default(), &from_new));
        let got = collect(&r.guests[1], 1);
        assert_eq!(got.len(), 1, "{mode:?}: {:?}", dp.port_stats());
        assert_eq!(got[0].frame, from_new);
        assert_eq!(dp.stats("vm3").unwrap().drops(DropReason::Spoofed), 0, "{mode:?}");
        // ... and from its old MAC it is spoofing now.
        assert!(g3.send(&VnetHdr::default(), &udp_frame(mac(2), mac(3), None, 100, 4)));
        assert!(wait_until(|| dp.stats("vm3").unwrap().drops(DropReason::Spoofed) == 1), "{mode:?}");
        assert!(r.guests[0].take_received().is_empty(), "{mode:?}: vm1 got unicast meant for others");

        // Bad requests are refused whatever the policy.
        assert!(dp.guest_set_mac("vm3", MacAddr([0xff; 6])).is_err());
        assert!(dp.guest_set_mac("up0", new1).is_err(), "an uplink has no guest");
        assert!(matches!(dp.guest_set_mac("nope", new1), Err(DatapathError::NoSuchPort(_))));
    }
}

/// A guest's relayed receive filter decides what the switch floods to it: unknown unicast only
/// with promiscuous mode where the policy allows it (refused, counted once), multicast by its
/// table, broadcast always; what it refuses is counted as `rx_filter` on the VM port.
#[test]
fn guest_rx_filter_decides_floods_by_policy() {
    use vmq_core::rxfilter::{GuestRxFilter, RxMode};
    use vmq_datapath::Attachment;
    let r = rig(Mode::Switch, &[vm(10, 9000, OffloadCaps::NONE), vm(10, 9000, OffloadCaps::NONE)], 4, Vec::new());
    let dp = &r.dp;
    let mut allowed = mem_port_config("vm3", 3, 10);
    allowed.spec.guest.allow_promiscuous = true;
    let (g3, source, sink) = mem_port(OffloadCaps::NONE, true);
    dp.add_port_with(allowed, Attachment::new(Box::new(sink), Some(Box::new(source)))).unwrap();
    let group = MacAddr([0x01, 0, 0x5e, 0, 0, 0x42]);
    let promiscuous = GuestRxFilter {
        promiscuous: true,
        multicast: RxMode::Normal,
        multicast_table: vec![group],
        ..Default::default()
    };
    let f1 = dp.guest_set_rx_filter("vm1", &promiscuous).unwrap();
    assert!(!f1.promiscuous && f1.promiscuous_refused);
    dp.guest_set_rx_filter("vm1", &promiscuous).unwrap();
    assert_eq!(dp.stats("vm1").unwrap().promiscuous_refused, 1, "counted once, not per relay");
    assert!(dp.guest_set_rx_filter("vm3", &promiscuous).unwrap().promiscuous);
    assert!(dp.ports().iter().any(|p| p.config.spec.name == "vm1" && p.rx_filter.is_some()));
    assert!(dp.guest_set_rx_filter("up0", &promiscuous).is_err(), "an uplink has no guest");

    let unknown = udp_frame(MacAddr([0x02, 0, 0, 0, 0, 0x99]), mac(2), None, 100, 1);
    let other_group = udp_frame(MacAddr([0x01, 0, 0x5e, 0, 0, 0x43]), mac(2), None, 100, 2);
    let joined = udp_frame(group, mac(2), None, 100, 3);
    let broadcast = udp_frame(MacAddr([0xff; 6]), mac(2), None, 100, 4);
    for f in [&unknown, &other_group, &joined, &broadcast] {
        assert!(r.guests[1].send(&VnetHdr::default(), f));
    }
    // vm3 (promiscuous allowed) gets all four; vm1 only the group it joined and broadcast.
    let got3 = collect(&g3, 4);
    assert_eq!(got3.len(), 4, "{:?}", dp.port_stats());
    let got1 = collect(&r.guests[0], 2);
    assert_eq!(got1.iter().map(|g| g.frame.clone()).collect::<Vec<_>>(), vec![joined, broadcast]);
    assert!(wait_until(|| dp.stats("vm1").unwrap().drops(DropReason::RxFilter) == 2), "{:?}", dp.stats("vm1"));
    assert_eq!(dp.stats("vm3").unwrap().drops(DropReason::RxFilter), 0);
    assert_eq!(dp.stats("vm2").unwrap().drops(DropReason::RxFilter), 0, "counted where refused, not at the sender");
}

/// `vmq` mode keeps a TX batch's last destination decision for the frames after it: frames to
/// different destinations, interleaved (sent back to back, so that batches hold several), must
/// each still reach their own, and the policy checks still run on every frame.
#[test]
fn interleaved_destinations_in_one_batch_each_reach_their_own() {
    let r = rig(
        Mode::Vmq,
        &[vm(10, 9000, OffloadCaps::NONE), vm(10, 9000, OffloadCaps::NONE), vm(10, 9000, OffloadCaps::NONE)],
        8,
        vec![],
    );
    let h = VnetHdr::default();
    let mut to_vm2 = Vec::new();
    let mut to_vm3 = Vec::new();
    let mut to_wire = 0;
    for round in 0..8u16 {
        for (k, dst) in [mac(2), mac(3), mac(2), MacAddr([0x02, 0, 0, 0, 0x77, 1]), mac(3)].into_iter().enumerate() {
            let id = round * 16 + k as u16;
            let frame = udp_frame(dst, mac(1), None, 100 + usize::from(id), id);
            assert!(r.guests[0].send(&h, &frame));
            match dst {
                d if d == mac(2) => to_vm2.push(frame),
                d if d == mac(3) => to_vm3.push(frame),
                _ => to_wire += 1,
            }
        }
        // The same destination right after a good frame, but tagged (VLAN violation on an
        // access port): dropped, not delivered by the kept decision.
        assert!(r.guests[0].send(&h, &udp_frame(mac(3), mac(1), Some(10), 100, 999)));
    }
    let got2: Vec<Vec<u8>> = collect(&r.guests[1], to_vm2.len()).into_iter().map(|f| f.frame).collect();
    let got3: Vec<Vec<u8>> = collect(&r.guests[2], to_vm3.len()).into_iter().map(|f| f.frame).collect();
    assert_eq!(got2, to_vm2, "vm2 gets its frames, in order, and only those");
    assert_eq!(got3, to_vm3, "vm3 gets its frames, in order, and only those");
    assert!(wait_until(|| r.wire.lock().unwrap().len() == to_wire));
    assert_eq!(r.dp.stats("vm1").unwrap().drops(DropReason::Vlan), 8);
    assert_accounted(&r.dp, 48);
}

/// VMMQ: a VM port with two RX lanes (two guest RX rings) takes a VM queue per lane; the NIC
/// spreads its flows over both queues, each flow on one, and every frame of a queue lands on
/// the RX ring of the same rank (the lane pick is the NIC's pick): no RX ring is written by
/// both queues' workers. A one-lane VM beside it keeps one queue.
#[test]
fn a_two_lane_vm_holds_two_vm_queues_and_each_feeds_its_own_rx_ring() {
    use std::collections::HashMap;
    use vmq_core::vmq::{FilterKey, QueueId};
    use vmq_datapath::nic::{StandInNic, spread_index};
    use vmq_datapath::port::lane_pick;
    let mut ports = vec![uplink_config(vec![10])];
    ports.push(mem_port_config("vm1", 1, 10));
    ports.push(mem_port_config("vm2", 2, 10));
    let cfg = DatapathConfig {
        mode: Mode::Vmq,
        workers: 2,
        vmq: VmqConfig { queues: 4, policy: QueuePolicy::Static, workers: 2, hysteresis: 1.5 },
        switch: SwitchConfig::default(),
        ports,
        rebalance_interval_ms: 1000,
    };
    let mut b = DatapathBuilder::new(cfg).unwrap();
    b.attach("up0", Box::new(WireSink::discard(OffloadCaps::NONE)), None).unwrap();
    let (lane0, source0, sink0) = mem_port(OffloadCaps::NONE, true);
    let (lane1, source1, sink1) = mem_port(OffloadCaps::NONE, true);
    b.attach("vm1", Box::new(sink0), Some(Box::new(source0))).unwrap();
    b.attach_more_source("vm1", Box::new(source1)).unwrap();
    b.attach_more_sink("vm1", Box::new(sink1)).unwrap();
    let (single, source, sink) = mem_port(OffloadCaps::NONE, true);
    b.attach("vm2", Box::new(sink), Some(Box::new(source))).unwrap();
    // 64 flows to vm1, 8 to vm2; the stand-in replays them endlessly.
    let vm1_frames: Vec<Vec<u8>> = (0..64u16).map(|f| udp_frame(mac(1), EXT, Some(10), 200, f)).collect();
    let vm2_frames: Vec<Vec<u8>> = (0..8u16).map(|f| udp_frame(mac(2), EXT, Some(10), 200, f)).collect();
    let nic = StandInNic::new(vec![
        (FilterKey { mac: mac(1), vlan: 10 }, vm1_frames.clone()),
        (FilterKey { mac: mac(2), vlan: 10 }, vm2_frames),
    ]);
    b.attach_nic_queue_id("up0", QueueId::DEFAULT, Box::new(nic.queue(QueueId::DEFAULT))).unwrap();
    for q in 1..=4 {
        b.attach_nic_queue_id("up0", QueueId(q), Box::new(nic.queue(QueueId(q)))).unwrap();
    }
    b.attach_steering("up0", Box::new(nic.steering())).unwrap();
    let dp = b.start().unwrap();

    let held = |name: &str| -> Vec<QueueId> {
        dp.queue_assignments().into_iter().filter(|(n, _)| n == name).filter_map(|(_, q)| q).collect()
    };
    assert_eq!(held("vm1"), vec![QueueId(1), QueueId(2)], "a VM queue per lane, first come");
    assert_eq!(held("vm2"), vec![QueueId(3)]);
    let (mut got0, mut got1) = (Vec::new(), Vec::new());
    assert!(wait_until(|| {
        got0.extend(lane0.take_received());
        got1.extend(lane1.take_received());
        got0.len() >= 500 && got1.len() >= 500
    }));
    // Each frame on the RX ring its flow picks, which is the rank of the NIC queue it came on.
    let mut lane_of_flow: HashMap<Vec<u8>, usize> = HashMap::new();
    for (lane, frames) in [(0usize, &got0), (1, &got1)] {
        for f in frames {
            // Frames reach the VM untagged; the NIC saw them tagged (the pick ignores the tag).
            assert_eq!(lane_pick(&f.frame, 2), lane, "a frame on the wrong RX ring");
            let flow = f.frame[34..36].to_vec(); // UDP source port
            assert_eq!(*lane_of_flow.entry(flow).or_insert(lane), lane, "a flow on two RX rings");
        }
    }
    for f in &vm1_frames {
        let queue_rank = spread_index(f, 2);
        let mut untagged = f[..12].to_vec();
        untagged.extend_from_slice(&f[16..]);
        assert_eq!(lane_pick(&untagged, 2), queue_rank, "NIC queue rank and RX ring differ");
    }
    let per_queue =
        |q: u16| dp.queue_stats().iter().filter(|s| s.queue == Some(QueueId(q))).map(|s| s.rx_packets).sum::<u64>();
    assert!(per_queue(1) > 0 && per_queue(2) > 0, "both of vm1's queues carry flows: {:?}", dp.queue_stats());
    assert!(wait_until(|| single.received().0 > 0), "vm2 gets its frames");
    assert_eq!(per_queue(4), 0, "the free queue has no filter");
}

//! Per-frame classification cost: switch ingress (parse, VLAN, spoof guard, MTU, FDB) against
//! the VMQ filter lookup that replaces it on the fast path, same run.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use vmq_core::switch::{Switch, SwitchConfig};
use vmq_core::vmq::{FilterKey, QueuePolicy, Vmq, VmqConfig};
use vmq_core::{OffloadCaps, PortId, PortKind, PortSpec, VlanMode};
use vmq_wire::{MacAddr, parse_l2};

fn mac(i: u16) -> MacAddr {
    MacAddr([0x52, 0x54, 0, 0, (i >> 8) as u8, i as u8])
}

fn bench(c: &mut Criterion) {
    let mut sw = Switch::new(SwitchConfig::default());
    let up = sw.add_port(PortSpec {
        name: "up".into(),
        kind: PortKind::Uplink,
        mac: None,
        mtu: 9000,
        vlan: VlanMode::Trunk { allowed: vec![10], native: None },
        allow_mac_spoofing: false,
        max_learned_macs: vmq_core::fdb::DEFAULT_MAX_LEARNED_MACS,
        guest: Default::default(),
        offloads: OffloadCaps::NONE,
    });
    sw.set_port_up(up, true);
    let mut vmq = Vmq::new(VmqConfig { queues: 64, policy: QueuePolicy::Static, workers: 2, hysteresis: 1.5 });
    for i in 0..64u16 {
        let p = sw.add_port(PortSpec {
            name: format!("vm{i}"),
            kind: PortKind::Mem,
            mac: Some(mac(i)),
            mtu: 9000,
            vlan: VlanMode::Access(10),
            allow_mac_spoofing: false,
            max_learned_macs: vmq_core::fdb::DEFAULT_MAX_LEARNED_MACS,
            guest: Default::default(),
            offloads: OffloadCaps::NONE,
        });
        sw.set_port_up(p, true);
        sw.fdb_mut().add_static(mac(i), 10, p);
        vmq.add_port(p, FilterKey { mac: mac(i), vlan: 10 });
    }
    let mut frame = vec![0u8; 64];
    frame[..6].copy_from_slice(&mac(33).0);
    frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    frame[12..16].copy_from_slice(&[0x81, 0, 0, 10]);
    frame[16..18].copy_from_slice(&[0x08, 0]);
    sw.classify(up, &frame, None, 0);
    c.bench_function("switch_classify", |b| b.iter(|| sw.classify(PortId(0), black_box(&frame), None, 1)));
    c.bench_function("vmq_filter_lookup", |b| {
        b.iter(|| {
            let l2 = parse_l2(black_box(&frame)).ok()?;
            vmq.lookup(l2.dst, l2.vlan.unwrap_or(0))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Worker supervision: a panic in a worker is caught, counted (`worker_panics`), logged, the
//! ports it served are marked down and up again (their learned addresses forgotten, the state
//! change logged), and a fresh worker takes its tasks over. See docs/design.md, "Supervision",
//! for why vmq catches worker panics instead of aborting.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vmq_core::PortId;

use crate::engine::{Shared, Worker, lock};

/// Restart delay after a panic, doubled while the worker keeps panicking soon after its
/// restart (a frame that panics it every time must not turn into a busy loop of restarts).
const FIRST_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// A worker that ran this long before panicking restarts after [`FIRST_BACKOFF`] again.
const HEALTHY_RUN: Duration = Duration::from_secs(1);

/// Runs worker `index` until shutdown, restarting it after a panic.
pub(crate) fn run_supervised(shared: Arc<Shared>, index: usize) {
    let mut backoff = FIRST_BACKOFF;
    while !shared.stop.load(Ordering::Relaxed) {
        let worker = match Worker::new(shared.clone(), index) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(worker = index, error = %e, "cannot restart worker; retrying");
                std::thread::sleep(MAX_BACKOFF);
                continue;
            }
        };
        let started = Instant::now();
        let Err(payload) = catch_unwind(AssertUnwindSafe(|| worker.run())) else {
            return; // stopped
        };
        shared.worker_stats[index].panics.fetch_add(1, Ordering::Relaxed);
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-text panic".into());
        tracing::error!(worker = index, panic = %what, "worker panicked; its ports go down and it restarts");
        bounce_ports(&shared, index);
        backoff = if started.elapsed() >= HEALTHY_RUN { FIRST_BACKOFF } else { (backoff * 2).min(MAX_BACKOFF) };
        std::thread::sleep(backoff);
    }
}

/// Marks the ports whose traffic worker `index` took in down and up again: whatever the
/// panicking batch left half done, they start over (learned addresses forgotten, flooding
/// resumes only with the new worker).
fn bounce_ports(shared: &Shared, index: usize) {
    let mut ports: Vec<PortId> = lock(&shared.lists[index].tasks).iter().map(|t| t.kind.in_port()).collect();
    ports.sort_unstable();
    ports.dedup();
    let up: Vec<PortId> = {
        let sw = shared.switch_read();
        ports.into_iter().filter(|&p| sw.is_up(p)).collect()
    };
    for &p in &up {
        shared.set_port_up(p, false);
    }
    for &p in &up {
        shared.set_port_up(p, true);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use vmq_core::switch::SwitchConfig;
    use vmq_core::vmq::{QueuePolicy, VmqConfig};
    use vmq_core::{Mode, OffloadCaps, PortBackend, PortConfig, PortKind, PortSpec, VlanMode};
    use vmq_wire::{MacAddr, VnetHdr};

    use crate::mem::mem_port;
    use crate::nic::udp_frame;
    use crate::{DatapathBuilder, DatapathConfig};

    fn mac(i: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, i])
    }

    fn vm(i: u8) -> PortConfig {
        PortConfig {
            spec: PortSpec {
                name: format!("vm{i}"),
                kind: PortKind::Mem,
                mac: Some(mac(i)),
                mtu: 1500,
                vlan: VlanMode::Access(0),
                allow_mac_spoofing: false,
                max_learned_macs: vmq_core::fdb::DEFAULT_MAX_LEARNED_MACS,
                guest: Default::default(),
                offloads: OffloadCaps::NONE,
            },
            backend: PortBackend::Mem,
            uplink: None,
        }
    }

    /// Polls `cond` every millisecond for at most 10 s.
    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A worker panics once in the middle of a batch, holding the switch's write lock (which
    /// poisons it): the panic is counted, the worker restarts and traffic resumes.
    #[test]
    fn a_panicking_worker_is_counted_restarted_and_traffic_resumes() {
        let cfg = DatapathConfig {
            mode: Mode::Switch,
            workers: 1,
            vmq: VmqConfig { queues: 0, policy: QueuePolicy::Static, workers: 1, hysteresis: 1.5 },
            switch: SwitchConfig::default(),
            ports: vec![vm(0), vm(1)],
            rebalance_interval_ms: 3_600_000,
        };
        let mut b = DatapathBuilder::new(cfg).unwrap();
        let mut guests = Vec::new();
        for i in 0..2 {
            let (guest, source, sink) = mem_port(OffloadCaps::NONE, false);
            b.attach(&format!("vm{i}"), Box::new(sink), Some(Box::new(source))).unwrap();
            guests.push(guest);
        }
        let frames: Vec<(VnetHdr, Vec<u8>)> =
            (0..64).map(|f| (VnetHdr::default(), udp_frame(mac(1), mac(0), None, 60, f))).collect();
        guests[0].start_replay(&frames);
        let dp = b.start().unwrap();
        wait_for("first frames", || guests[1].received().0 > 100);
        assert_eq!(dp.workers()[0].panics, 0);
        dp.shared.inject_panic.store(true, std::sync::atomic::Ordering::Relaxed);
        wait_for("the panic to be counted", || dp.workers()[0].panics == 1);
        let after = guests[1].received().0;
        wait_for("traffic to resume", || guests[1].received().0 > after + 1000);
        assert_eq!(dp.workers()[0].panics, 1, "one injected panic, one counted");
        assert!(dp.ports().iter().all(|p| p.up), "ports are up again");
        dp.shutdown();
    }
}

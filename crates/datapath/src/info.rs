//! What the data path reports about itself (`vmq ctl show`, `queues`, `fdb`, `workers`): the
//! info types and how they are read out of the control state.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use vmq_core::stats::PortStatsSnapshot;
use vmq_core::vmq::QueueId;
use vmq_core::{Mode, PortConfig, PortId, PortKind};
use vmq_wire::MacAddr;

use crate::engine::{Shared, Task, TaskKind, lock};
use crate::state::ControlState;

/// Frames taken from one NIC queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    pub uplink: String,
    /// None: the default queue.
    pub queue: Option<QueueId>,
    /// The VM port a VM queue feeds.
    pub port: Option<String>,
    /// The interface receive queue (an AF_XDP uplink has a socket set per queue); None where
    /// the uplink's queue spans the interface (AF_PACKET).
    pub rx_queue: Option<u16>,
    pub rx_packets: u64,
}

/// A port as `vmq ctl show` reports it.
#[derive(Debug, Clone)]
pub struct PortInfo {
    pub config: PortConfig,
    pub up: bool,
    /// What the attached receiver accepts (negotiated offloads).
    pub caps: vmq_core::OffloadCaps,
    /// Its VM queue (None: the default queue); the first of them for a multiqueue port.
    pub queue: Option<QueueId>,
    /// Every VM queue it holds (several for a multiqueue port, VMMQ), each with the worker
    /// serving it.
    pub vm_queues: Vec<(QueueId, Option<usize>)>,
    /// The worker serving its traffic into vmq (its own TX, or its VM queue on the NIC).
    pub worker: Option<usize>,
    /// Frames per second delivered to it at the last measurement.
    pub rx_rate: u64,
    /// Bytes per second delivered to it at the last measurement.
    pub rx_byte_rate: u64,
    pub stats: PortStatsSnapshot,
    /// vhost-user ports: the connection to the VM.
    pub vhost: Option<VhostLink>,
    /// VM ports: the guest's receive filter vmq applies (None: none relayed).
    pub rx_filter: Option<vmq_core::rxfilter::RxFilter>,
    /// Uplinks configured with `driver = "af_xdp"` or `"auto"`: the driver in use.
    pub uplink_driver: Option<&'static str>,
    /// Multiqueue VM ports: each queue pair (empty for one pair).
    pub queue_pairs: Vec<QueuePairInfo>,
}

/// One queue pair of a multiqueue VM port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePairInfo {
    /// Frames vmq wrote into the pair's RX ring.
    pub rx_frames: u64,
    /// Frames vmq took from the pair's TX ring.
    pub tx_frames: u64,
    /// The worker serving the pair's TX ring.
    pub worker: Option<usize>,
}

/// A vhost-user port's connection to its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VhostLink {
    pub mode: vmq_core::VhostMode,
    pub connected: bool,
    /// Connections made since the port was added (every one after the first is a reconnect).
    pub connections: u64,
    /// Live migration: dirty logging on now; times it was switched on (migrations away from
    /// this vmq begun); times the VM was handed over; RARP announces injected for it.
    pub logging: bool,
    pub log_starts: u64,
    pub migrated_out: u64,
    pub announces: u64,
}

/// Why a port has no VM queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoQueueReason {
    SwitchMode,
    NotAVmPort,
    NoMac,
    BudgetExhausted,
}

impl NoQueueReason {
    pub fn describe(self) -> &'static str {
        match self {
            NoQueueReason::SwitchMode => "switch mode (VMQ off)",
            NoQueueReason::NotAVmPort => "not a VM port",
            NoQueueReason::NoMac => "no MAC configured",
            NoQueueReason::BudgetExhausted => "queue budget exhausted",
        }
    }
}

/// One learned or static FDB entry, by port name.
#[derive(Debug, Clone, PartialEq)]
pub struct FdbRow {
    pub mac: MacAddr,
    pub vlan: u16,
    pub port: String,
    /// None for static entries.
    pub age_secs: Option<f64>,
}

/// Time a lock was held by the workers: batches that took it, total and longest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockHoldStats {
    pub batches: u64,
    pub total_ns: u64,
    pub max_ns: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    pub index: usize,
    pub busy_ratio: f64,
    pub frames: u64,
    /// Panics caught in it (each followed by a restart).
    pub panics: u64,
    /// Times it ran out of work and tried to sleep (~10/s idle; a source that keeps it awake
    /// without frames makes thousands a second).
    pub sleeps: u64,
    /// Waiting for a wake-up right now (idle, not stalled).
    pub asleep: bool,
    /// Tasks it serves: "vm1 tx", "up0 queue 3", "up0 default".
    pub tasks: Vec<String>,
}

/// Counters of every port, by name, in port id order.
pub(crate) fn port_stats(st: &ControlState) -> Vec<(String, PortStatsSnapshot)> {
    st.ports.iter().flatten().map(|r| (r.config.spec.name.clone(), r.stats.snapshot())).collect()
}

pub(crate) fn stats(st: &ControlState, name: &str) -> Option<PortStatsSnapshot> {
    let id = st.names.get(name)?;
    st.record(*id).map(|r| r.stats.snapshot())
}

/// VM queue assignments: (port name, queue; None = default queue).
pub(crate) fn queue_assignments(st: &ControlState) -> Vec<(String, Option<QueueId>)> {
    let names: HashMap<PortId, String> = st.names_by_id().into_iter().collect();
    let mut out = Vec::new();
    for (p, _) in st.vmq.assignments() {
        let Some(name) = names.get(&p) else { continue };
        match st.vmq.queues_of(p) {
            [] => out.push((name.clone(), None)),
            queues => out.extend(queues.iter().map(|q| (name.clone(), Some(*q)))),
        }
    }
    out
}

/// Why a port has no VM queue, or None if it has one (or no port has that name).
pub(crate) fn no_queue_reason(st: &ControlState, name: &str) -> Option<NoQueueReason> {
    let id = *st.names.get(name)?;
    let rec = st.record(id)?;
    if st.mode == Mode::Switch {
        Some(NoQueueReason::SwitchMode)
    } else if rec.config.spec.kind == PortKind::Uplink {
        Some(NoQueueReason::NotAVmPort)
    } else if ControlState::filter_key(&rec.config.spec).is_none() {
        Some(NoQueueReason::NoMac)
    } else if st.vmq.queue_of(id).is_none() {
        Some(NoQueueReason::BudgetExhausted)
    } else {
        None
    }
}

/// Per NIC queue counters.
pub(crate) fn queue_stats(st: &ControlState) -> Vec<QueueStats> {
    let name = |p: PortId| st.name_of(p);
    let mut out = Vec::new();
    for rec in st.ports.iter().flatten() {
        for t in &rec.tasks {
            let rx_packets = t.frames.load(Ordering::Relaxed);
            match t.kind {
                TaskKind::VmQueue { uplink, queue } => out.push(QueueStats {
                    uplink: name(uplink),
                    queue: Some(queue),
                    port: st
                        .vmq
                        .queue_assignments()
                        .find(|(p, q)| *q == queue && st.uplink_of(*p) == Some(uplink))
                        .map(|(p, _)| name(p)),
                    rx_queue: t.nic_rx_queue,
                    rx_packets,
                }),
                TaskKind::DefaultQueue { uplink } => out.push(QueueStats {
                    uplink: name(uplink),
                    queue: None,
                    port: None,
                    rx_queue: t.nic_rx_queue,
                    rx_packets,
                }),
                TaskKind::PortTx { .. } => {}
            }
        }
    }
    out
}

/// Every port with its state, negotiated offloads, queue and worker.
pub(crate) fn ports(st: &ControlState, shared: &Shared) -> Vec<PortInfo> {
    let worker_of =
        |task: &Arc<Task>| shared.lists.iter().position(|l| lock(&l.tasks).iter().any(|t| Arc::ptr_eq(t, task)));
    let sw = shared.switch_read();
    let mut out = Vec::new();
    for (i, rec) in st.ports.iter().enumerate() {
        let Some(rec) = rec else { continue };
        let id = PortId(i as u16);
        let queue = st.vmq.queue_of(id);
        let task_of = |q: QueueId| {
            let uplink = st.uplink_of(id)?;
            st.record(uplink)?.tasks.iter().find(|t| t.kind == TaskKind::VmQueue { uplink, queue: q }).cloned()
        };
        let vm_queues = st.vmq.queues_of(id).iter().map(|&q| (q, task_of(q).and_then(|t| worker_of(&t)))).collect();
        // The worker that brings its traffic in: its VM queue's, else its own TX task's.
        let queue_task = queue.and_then(task_of);
        let worker = queue_task.or_else(|| rec.tasks.first().cloned()).and_then(|t| worker_of(&t));
        out.push(PortInfo {
            config: rec.config.clone(),
            up: sw.is_up(id),
            caps: lock(rec.sinks.first()).caps(),
            queue,
            vm_queues,
            worker,
            rx_rate: st.rates.get(&id).copied().unwrap_or(0),
            rx_byte_rate: st.byte_rates.get(&id).copied().unwrap_or(0),
            stats: rec.stats.snapshot(),
            vhost: rec.vhost.as_ref().map(|s| VhostLink {
                mode: s.mode(),
                connected: s.connected(),
                connections: s.connections(),
                logging: s.migration().logging(),
                log_starts: s.migration().log_starts(),
                migrated_out: s.migration().migrated_out(),
                announces: s.migration().announces(),
            }),
            rx_filter: rec.rx_filter.as_deref().cloned(),
            uplink_driver: rec.uplink_driver,
            queue_pairs: queue_pairs(rec, &worker_of),
        });
    }
    out
}

/// A multiqueue port's pairs: RX frames from its sink's counters, TX from its TX tasks (one per
/// pair, in pair order). Empty for ports with one TX task and no counters.
fn queue_pairs(rec: &crate::state::PortRecord, worker_of: &dyn Fn(&Arc<Task>) -> Option<usize>) -> Vec<QueuePairInfo> {
    let tx: Vec<&Arc<Task>> = rec.tasks.iter().filter(|t| matches!(t.kind, TaskKind::PortTx { .. })).collect();
    let rx = rec.queue_counters.as_ref().map(|c| c.rx()).unwrap_or_default();
    let pairs = tx.len().max(rx.len());
    if pairs < 2 {
        return Vec::new();
    }
    (0..pairs)
        .map(|pair| QueuePairInfo {
            rx_frames: rx.get(pair).copied().unwrap_or(0),
            tx_frames: tx.get(pair).map_or(0, |t| t.frames.load(Ordering::Relaxed)),
            worker: tx.get(pair).and_then(|t| worker_of(t)),
        })
        .collect()
}

/// The FDB, static and learned entries.
pub(crate) fn fdb(st: &ControlState, shared: &Shared) -> Vec<FdbRow> {
    let now = shared.now_ns();
    let sw = shared.switch_read();
    let mut rows: Vec<FdbRow> = sw
        .fdb()
        .entries(now)
        .filter_map(|e| {
            let port = st.record(e.port)?.config.spec.name.clone();
            Some(FdbRow { mac: e.mac, vlan: e.vlan, port, age_secs: (!e.is_static).then(|| e.age_ns as f64 / 1e9) })
        })
        .collect();
    rows.sort_by_key(|r| (r.vlan, r.mac.0));
    rows
}

/// Per worker: busy ratio at the last measurement, frames, tasks.
pub(crate) fn workers(st: &ControlState, shared: &Shared) -> Vec<WorkerInfo> {
    let name = |p: PortId| st.name_of(p);
    shared
        .lists
        .iter()
        .enumerate()
        .map(|(i, l)| WorkerInfo {
            index: i,
            busy_ratio: st.busy.get(i).copied().unwrap_or(0.0),
            frames: shared.worker_stats[i].frames.load(Ordering::Relaxed),
            panics: shared.worker_stats[i].panics.load(Ordering::Relaxed),
            sleeps: shared.worker_stats[i].sleeps.load(Ordering::Relaxed),
            asleep: shared.worker_stats[i].asleep.load(Ordering::Relaxed),
            tasks: lock(&l.tasks)
                .iter()
                .map(|t| match t.kind {
                    TaskKind::PortTx { port } => format!("{} tx", name(port)),
                    TaskKind::VmQueue { uplink, queue } => format!("{} queue {}", name(uplink), queue.0),
                    TaskKind::DefaultQueue { uplink } => format!("{} default", name(uplink)),
                })
                .collect(),
        })
        .collect()
}

//! vmq's data path: worker threads that move frames between ports, using the sans-IO core for
//! every decision. Ports plug in as a [`FrameSource`] and a [`FrameSink`]; the in-process
//! virtio-net device ([`mem`]) and NIC stand-in ([`nic`]) serve tests and `vmq bench`.
#![forbid(unsafe_code)]

pub mod bench;
mod control;
pub mod driver;
mod egress;
mod engine;
pub mod mem;
pub mod nic;
pub mod port;
pub mod tap;
pub mod uplink;
pub mod virtio;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use vmq_core::fdb::MixMap;
use vmq_core::stats::{PortStats, PortStatsSnapshot};
use vmq_core::switch::{Switch, SwitchConfig};
use vmq_core::vmq::{FilterKey, QueueId, Vmq, VmqConfig};
use vmq_core::{Mode, PortBackend, PortConfig, PortId, PortKind, VlanMode};

use engine::{PortEntry, Shared, Task, TaskKind, TaskList, Worker, local_key};
pub use port::{FrameSink, FrameSource, NicSteering};

#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub mode: Mode,
    pub workers: usize,
    pub vmq: VmqConfig,
    pub switch: SwitchConfig,
    pub ports: Vec<PortConfig>,
    /// How often the control thread re-measures load: moves VM queues (dynamic policy) and
    /// re-places queues on workers.
    pub rebalance_interval_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("port {0:?} is configured twice")]
    DuplicatePort(String),
    #[error("no port named {0:?}")]
    NoSuchPort(String),
    #[error("port {port:?}: {kind} ports are not supported by this build of the data path yet")]
    Unsupported { port: String, kind: &'static str },
    #[error("port {0:?} has no sink attached")]
    NotAttached(String),
    #[error("port {port:?} names uplink {uplink:?}, which is not an uplink port")]
    BadUplink { port: String, uplink: String },
    #[error("port {0} has no VM queue")]
    NoQueue(u16),
    #[error("workers must be at least 1")]
    NoWorkers,
    #[error("cannot start worker thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Where a NIC RX queue's frames go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicQueueTarget {
    /// The queue a NIC filter for this VM port feeds (`vmq` mode).
    Vm(PortId),
    /// The default queue: the software switch.
    Default,
}

struct Attached {
    sink: Box<dyn FrameSink>,
    source: Option<Box<dyn FrameSource>>,
}

/// Assembles a data path: ports from the configuration, their attachments, NIC queues.
pub struct DatapathBuilder {
    cfg: DatapathConfig,
    ids: HashMap<String, PortId>,
    switch: Switch,
    vmq: Vmq,
    attached: HashMap<PortId, Attached>,
    nic_queues: Vec<(PortId, QueueId, Box<dyn FrameSource>)>,
    steering: HashMap<PortId, Box<dyn NicSteering>>,
    uplink_of: HashMap<PortId, PortId>,
}

impl DatapathBuilder {
    pub fn new(cfg: DatapathConfig) -> Result<DatapathBuilder, DatapathError> {
        if cfg.workers == 0 {
            return Err(DatapathError::NoWorkers);
        }
        let mut switch = Switch::new(cfg.switch);
        let mut vmq = Vmq::new(cfg.vmq);
        let mut ids = HashMap::new();
        for p in &cfg.ports {
            if ids.contains_key(&p.spec.name) {
                return Err(DatapathError::DuplicatePort(p.spec.name.clone()));
            }
            let id = switch.add_port(p.spec.clone());
            switch.set_port_up(id, true);
            ids.insert(p.spec.name.clone(), id);
        }
        let first_uplink = cfg.ports.iter().find(|p| p.spec.kind == PortKind::Uplink).map(|p| ids[&p.spec.name]);
        let mut uplink_of = HashMap::new();
        for p in &cfg.ports {
            let id = ids[&p.spec.name];
            if p.spec.kind == PortKind::Uplink {
                continue;
            }
            let uplink = match &p.uplink {
                Some(name) => {
                    let u =
                        ids.get(name).copied().filter(|u| switch.port(*u).is_some_and(|s| s.kind == PortKind::Uplink));
                    Some(u.ok_or_else(|| DatapathError::BadUplink { port: p.spec.name.clone(), uplink: name.clone() })?)
                }
                None => first_uplink,
            };
            if let Some(u) = uplink {
                uplink_of.insert(id, u);
            }
            // Configured addresses are known: static FDB entries, and VMQ filters for VM ports.
            if let Some(mac) = p.spec.mac {
                let vlan = match &p.spec.vlan {
                    VlanMode::Access(v) => *v,
                    VlanMode::Trunk { native, .. } => native.unwrap_or(0),
                };
                switch.fdb_mut().add_static(mac, vlan, id);
                if cfg.mode == Mode::Vmq {
                    vmq.add_port(id, FilterKey { mac, vlan });
                }
            }
        }
        Ok(DatapathBuilder {
            cfg,
            ids,
            switch,
            vmq,
            attached: HashMap::new(),
            nic_queues: Vec::new(),
            steering: HashMap::new(),
            uplink_of,
        })
    }

    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.ids.get(name).copied()
    }

    /// The VM queue a port got (None: it shares the default queue).
    pub fn vm_queue(&self, port: PortId) -> Option<QueueId> {
        self.vmq.queue_of(port)
    }

    pub fn attach(
        &mut self,
        name: &str,
        sink: Box<dyn FrameSink>,
        source: Option<Box<dyn FrameSource>>,
    ) -> Result<PortId, DatapathError> {
        let id = self.port_id(name).ok_or_else(|| DatapathError::NoSuchPort(name.to_string()))?;
        self.attached.insert(id, Attached { sink, source });
        Ok(id)
    }

    /// Adds a NIC RX queue of uplink `uplink`: the queue a VM port was given, or the default.
    pub fn attach_nic_queue(
        &mut self,
        uplink: &str,
        target: NicQueueTarget,
        source: Box<dyn FrameSource>,
    ) -> Result<(), DatapathError> {
        let queue = match target {
            NicQueueTarget::Vm(port) => self.vmq.queue_of(port).ok_or(DatapathError::NoQueue(port.0))?,
            NicQueueTarget::Default => QueueId::DEFAULT,
        };
        self.attach_nic_queue_id(uplink, queue, source)
    }

    /// Adds NIC RX queue `queue` of uplink `uplink` (whatever filter it gets over time).
    pub fn attach_nic_queue_id(
        &mut self,
        uplink: &str,
        queue: QueueId,
        source: Box<dyn FrameSource>,
    ) -> Result<(), DatapathError> {
        let id = self.port_id(uplink).ok_or_else(|| DatapathError::NoSuchPort(uplink.to_string()))?;
        self.nic_queues.push((id, queue, source));
        Ok(())
    }

    /// Gives the data path control of an uplink's VMQ filters.
    pub fn attach_steering(&mut self, uplink: &str, steering: Box<dyn NicSteering>) -> Result<(), DatapathError> {
        let id = self.port_id(uplink).ok_or_else(|| DatapathError::NoSuchPort(uplink.to_string()))?;
        self.steering.insert(id, steering);
        Ok(())
    }

    /// Starts the workers.
    pub fn start(mut self) -> Result<Datapath, DatapathError> {
        let mut ports = Vec::new();
        let mut names = Vec::new();
        let mut sources = Vec::new();
        let mut local = MixMap::default();
        for p in &self.cfg.ports {
            let id = self.ids[&p.spec.name];
            let att = self.attached.remove(&id).ok_or_else(|| DatapathError::NotAttached(p.spec.name.clone()))?;
            // Ports are dense and added in order: index == id.
            debug_assert_eq!(ports.len(), id.0 as usize);
            if let (Some(mac), false, VlanMode::Access(v)) = (p.spec.mac, p.spec.kind == PortKind::Uplink, &p.spec.vlan)
            {
                local.insert(local_key(mac, *v), id);
            }
            ports.push(Arc::new(PortEntry {
                spec: p.spec.clone(),
                stats: Arc::new(PortStats::default()),
                sink: Mutex::new(att.sink),
                uplink: self.uplink_of.get(&id).copied(),
            }));
            names.push(p.spec.name.clone());
            if let Some(s) = att.source {
                sources.push((id, s));
            }
        }
        let shared = Arc::new(Shared {
            mode: self.cfg.mode,
            ports,
            switch: RwLock::new(self.switch),
            local,
            stop: AtomicBool::new(false),
            epoch: Instant::now(),
        });
        // Initial placement: ports' own TX and the NIC queues round robin over the workers;
        // the control thread re-places them by measured load.
        let workers = self.cfg.workers;
        let mut tasks: Vec<Arc<Task>> = Vec::new();
        for (id, source) in sources {
            tasks.push(Arc::new(Task {
                kind: TaskKind::PortTx { port: id },
                source: Mutex::new(source),
                frames: AtomicU64::new(0),
            }));
        }
        for (uplink, queue, source) in self.nic_queues {
            let kind = if queue == QueueId::DEFAULT {
                TaskKind::DefaultQueue { uplink }
            } else {
                TaskKind::VmQueue { uplink, queue }
            };
            tasks.push(Arc::new(Task { kind, source: Mutex::new(source), frames: AtomicU64::new(0) }));
        }
        let lists: Vec<Arc<TaskList>> = (0..workers).map(|_| Arc::new(TaskList::default())).collect();
        let mut initial: Vec<Vec<Arc<Task>>> = vec![Vec::new(); workers];
        for (i, t) in tasks.iter().enumerate() {
            initial[i % workers].push(t.clone());
        }
        for (list, ts) in lists.iter().zip(initial) {
            list.set(ts);
        }
        // The NICs start with the filters of the initial queue assignment.
        for (port, queue) in self.vmq.assignments() {
            if let (Some(q), Some(uplink)) = (queue, self.uplink_of.get(&port))
                && let Some(st) = self.steering.get_mut(uplink)
            {
                st.set_filter(q, self.vmq.filter_of(port));
            }
        }
        let mut threads = Vec::new();
        let mut wakes = Vec::new();
        for (i, list) in lists.iter().enumerate() {
            let wake = Arc::new(engine::new_wake().map_err(DatapathError::Thread)?);
            wakes.push(wake.clone());
            let worker = Worker::new(shared.clone(), list.clone(), wake).map_err(DatapathError::Thread)?;
            let t = std::thread::Builder::new()
                .name(format!("vmq-worker-{i}"))
                .spawn(move || worker.run())
                .map_err(DatapathError::Thread)?;
            threads.push(t);
        }
        let vmq = Arc::new(Mutex::new(self.vmq));
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let control = control::Control {
            shared: shared.clone(),
            vmq: vmq.clone(),
            steering: self.steering,
            uplink_of: self.uplink_of,
            tasks: tasks.clone(),
            lists,
            interval: std::time::Duration::from_millis(self.cfg.rebalance_interval_ms.max(10)),
        };
        let control_thread = std::thread::Builder::new()
            .name("vmq-control".into())
            .spawn(move || control.run(stop_rx))
            .map_err(DatapathError::Thread)?;
        Ok(Datapath { shared, names, threads, wakes, vmq, tasks, control: Some((stop_tx, control_thread)) })
    }
}

/// A running data path.
pub struct Datapath {
    shared: Arc<Shared>,
    names: Vec<String>,
    threads: Vec<JoinHandle<()>>,
    wakes: Vec<Arc<vmm_sys_util::eventfd::EventFd>>,
    vmq: Arc<Mutex<Vmq>>,
    tasks: Vec<Arc<Task>>,
    control: Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>,
}

/// Frames taken from one NIC queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    pub uplink: String,
    /// None: the default queue.
    pub queue: Option<QueueId>,
    /// The VM port a VM queue feeds.
    pub port: Option<String>,
    pub rx_packets: u64,
}

impl Datapath {
    /// Builds and starts a data path from configuration alone: `mem` ports get an idle
    /// in-process device. Other kinds need their OS glue, which this build does not wire yet.
    pub fn start(cfg: DatapathConfig) -> Result<Datapath, DatapathError> {
        let ports = cfg.ports.clone();
        let mut b = DatapathBuilder::new(cfg)?;
        for p in &ports {
            match &p.backend {
                PortBackend::Mem => {
                    let (_guest, source, sink) = mem::mem_port(p.spec.offloads, false);
                    b.attach(&p.spec.name, Box::new(sink), Some(Box::new(source)))?;
                }
                PortBackend::VhostUser { .. } => {
                    return Err(DatapathError::Unsupported { port: p.spec.name.clone(), kind: "vhost-user" });
                }
                PortBackend::Tap { .. } => {
                    return Err(DatapathError::Unsupported { port: p.spec.name.clone(), kind: "tap" });
                }
                PortBackend::Uplink { .. } => {
                    return Err(DatapathError::Unsupported { port: p.spec.name.clone(), kind: "uplink" });
                }
            }
        }
        b.start()
    }

    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.names.iter().position(|n| n == name).map(|i| PortId(i as u16))
    }

    /// Counters of every port, by name, in configuration order.
    pub fn port_stats(&self) -> Vec<(String, PortStatsSnapshot)> {
        self.names.iter().zip(&self.shared.ports).map(|(n, p)| (n.clone(), p.stats.snapshot())).collect()
    }

    pub fn stats(&self, name: &str) -> Option<PortStatsSnapshot> {
        let id = self.port_id(name)?;
        Some(self.shared.ports[id.0 as usize].stats.snapshot())
    }

    /// VM queue assignments: (port name, queue; None = default queue).
    pub fn queue_assignments(&self) -> Vec<(String, Option<QueueId>)> {
        engine::lock(&self.vmq).assignments().map(|(p, q)| (self.names[p.0 as usize].clone(), q)).collect()
    }

    /// Per NIC queue counters.
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        let name = |p: PortId| self.names[p.0 as usize].clone();
        let vmq = engine::lock(&self.vmq);
        self.tasks
            .iter()
            .filter_map(|t| {
                let rx_packets = t.frames.load(Ordering::Relaxed);
                match t.kind {
                    TaskKind::VmQueue { uplink, queue } => Some(QueueStats {
                        uplink: name(uplink),
                        queue: Some(queue),
                        port: vmq.assignments().find(|(_, q)| *q == Some(queue)).map(|(p, _)| name(p)),
                        rx_packets,
                    }),
                    TaskKind::DefaultQueue { uplink } => {
                        Some(QueueStats { uplink: name(uplink), queue: None, port: None, rx_packets })
                    }
                    TaskKind::PortTx { .. } => None,
                }
            })
            .collect()
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode
    }

    /// Stops the workers and waits for them.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some((tx, t)) = self.control.take() {
            let _ = tx.send(());
            let _ = t.join();
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        for w in &self.wakes {
            let _ = w.write(1);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.stop();
    }
}

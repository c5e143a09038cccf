//! vmq's data path: worker threads that move frames between ports, using the sans-IO core for
//! every decision. Ports plug in as a [`FrameSource`] and a [`FrameSink`]; the in-process
//! virtio-net device ([`mem`]) and NIC stand-in ([`nic`]) serve tests and `vmq bench`.
//!
//! The running data path can be changed without a restart: ports are added and removed, their
//! MTU and VLAN changed, the VM queue budget and policy set. The control plane (this module and
//! [`control`]) keeps its state under one lock and hands workers immutable snapshots (the port
//! table, task lists) that they pick up between batches, so no frame of an unaffected port is
//! ever dropped by a change.
#![forbid(unsafe_code)]

pub mod backend;
pub mod bench;
mod control;
pub mod driver;
mod egress;
mod engine;
pub mod mem;
pub mod nic;
pub mod port;
pub mod ring;
mod supervise;
pub mod tap;
pub mod uplink;
pub mod vhost;
pub mod virtio;

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmq_core::fdb::MixMap;
use vmq_core::stats::{PortStats, PortStatsSnapshot};
use vmq_core::switch::{Switch, SwitchConfig};
use vmq_core::vmq::{FilterKey, QueueChange, QueueId, QueuePolicy, Vmq, VmqConfig};
use vmq_core::{Mode, PortConfig, PortId, PortKind, PortSpec, VlanMode};
use vmq_wire::MacAddr;

use engine::{PortEntry, PortTable, Shared, Task, TaskKind, local_key, lock};
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
    #[error("too many ports (at most {0})")]
    TooManyPorts(usize),
    #[error("port {port:?}: {message}")]
    Backend { port: String, message: String },
    #[error("{0}")]
    Invalid(String),
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

/// Run-time changes a backend applies to its attachment (the kernel side of a TAP, say).
pub trait PortControl: Send {
    /// The port's MTU changed.
    fn set_mtu(&mut self, mtu: u16) -> Result<(), String>;
}

/// How a port is attached: everything the data path needs to move its frames.
pub struct Attachment {
    /// Frames vmq delivers to the port.
    pub sink: Box<dyn FrameSink>,
    /// Frames the port sends into vmq (None for uplinks: they send through NIC queues).
    pub source: Option<Box<dyn FrameSource>>,
    /// Uplinks: the NIC's RX queues (the default queue and the VM queues).
    pub nic_queues: Vec<(QueueId, Box<dyn FrameSource>)>,
    /// Uplinks: control of the NIC's VM queue filters.
    pub steering: Option<Box<dyn NicSteering>>,
    /// False for attachments that come up later (a VM that has not connected yet); the backend
    /// then raises the port with [`PortHandle::set_up`].
    pub up: bool,
    pub control: Option<Box<dyn PortControl>>,
    /// Whatever must live as long as the port (a socket registration, a namespace).
    pub keepalive: Option<Box<dyn Any + Send>>,
}

impl Attachment {
    /// A port with a sink and optionally a source, up at once.
    pub fn new(sink: Box<dyn FrameSink>, source: Option<Box<dyn FrameSource>>) -> Attachment {
        Attachment { sink, source, nic_queues: Vec::new(), steering: None, up: true, control: None, keepalive: None }
    }
}

/// Lets a backend report its port's state from any thread (a vhost-user VM connecting).
#[derive(Clone)]
pub struct PortHandle {
    shared: Arc<Shared>,
    port: PortId,
    removed: Arc<AtomicBool>,
}

impl PortHandle {
    pub fn port(&self) -> PortId {
        self.port
    }

    /// The attachment came up (true) or went away (false).
    pub fn set_up(&self, up: bool) {
        if !self.removed.load(Ordering::Acquire) {
            self.shared.set_port_up(self.port, up);
        }
    }

    /// Makes workers re-read their sources' wake fds (a VM reconnected with new eventfds).
    pub fn refresh(&self) {
        self.shared.refresh_workers();
    }
}

/// What a backend gets to build an attachment.
pub struct AttachContext {
    pub handle: PortHandle,
    /// VM queues an uplink must provide (besides the default queue).
    pub nic_queues: u16,
    pub mode: Mode,
}

/// Builds attachments for configured ports (TAP, uplink, vhost-user, mem).
pub trait Backends: Send {
    fn attach(&mut self, config: &PortConfig, ctx: AttachContext) -> Result<Attachment, DatapathError>;
}

/// A port as the control plane keeps it.
struct PortRecord {
    config: PortConfig,
    stats: Arc<PortStats>,
    sink: Arc<Mutex<Box<dyn FrameSink>>>,
    tasks: Vec<Arc<Task>>,
    steering: Option<Box<dyn NicSteering>>,
    /// Uplinks: VM queues the NIC has (the budget can't exceed it).
    nic_queue_count: u16,
    control: Option<Box<dyn PortControl>>,
    removed: Arc<AtomicBool>,
    _keepalive: Option<Box<dyn Any + Send>>,
}

/// The control plane's state. One lock; never taken on the frame path.
pub(crate) struct ControlState {
    mode: Mode,
    vmq: Vmq,
    ports: Vec<Option<PortRecord>>,
    names: HashMap<String, PortId>,
    /// Receive rate (frames/s) of each port at the last rebalance, for `vmq ctl queues`.
    rates: HashMap<PortId, u64>,
    /// The same in bytes/s.
    byte_rates: HashMap<PortId, u64>,
    /// Busy ratio of each worker at the last measurement.
    busy: Vec<f64>,
    backends: Option<Box<dyn Backends>>,
}

impl ControlState {
    fn record(&self, id: PortId) -> Option<&PortRecord> {
        self.ports.get(id.0 as usize).and_then(Option::as_ref)
    }

    fn id(&self, name: &str) -> Result<PortId, DatapathError> {
        self.names.get(name).copied().ok_or_else(|| DatapathError::NoSuchPort(name.to_string()))
    }

    /// The uplink a port's traffic uses: the one it names, else the first uplink.
    fn uplink_of(&self, id: PortId) -> Option<PortId> {
        let rec = self.record(id)?;
        if rec.config.spec.kind == PortKind::Uplink {
            return None;
        }
        match &rec.config.uplink {
            Some(name) => self.names.get(name).copied(),
            None => self.ports.iter().enumerate().find_map(|(i, r)| {
                r.as_ref().filter(|r| r.config.spec.kind == PortKind::Uplink).map(|_| PortId(i as u16))
            }),
        }
    }

    /// Builds the workers' view of the ports.
    fn port_table(&self) -> PortTable {
        let mut table = PortTable { ports: Vec::with_capacity(self.ports.len()), local: MixMap::default() };
        for (i, rec) in self.ports.iter().enumerate() {
            let id = PortId(i as u16);
            table.ports.push(rec.as_ref().map(|r| {
                if let (Some(mac), false, VlanMode::Access(v)) =
                    (r.config.spec.mac, r.config.spec.kind == PortKind::Uplink, &r.config.spec.vlan)
                {
                    table.local.insert(local_key(mac, *v), id);
                }
                Arc::new(PortEntry {
                    spec: r.config.spec.clone(),
                    stats: r.stats.clone(),
                    sink: r.sink.clone(),
                    uplink: self.uplink_of(id),
                })
            }));
        }
        table
    }

    /// Programs the NIC filters for queue changes: revocations first, so that a queue never
    /// matches two VMs at once.
    fn apply_queue_changes(&mut self, changes: &[QueueChange]) {
        for change in changes {
            if let QueueChange::Revoked { port, queue } = *change {
                tracing::info!(port = port.0, queue = queue.0, "VM queue revoked");
                if let Some(u) = self.uplink_of(port)
                    && let Some(st) = self.ports[u.0 as usize].as_mut().and_then(|r| r.steering.as_mut())
                {
                    st.set_filter(queue, None);
                }
            }
        }
        for change in changes {
            if let QueueChange::Assigned { port, queue } = *change {
                tracing::info!(port = port.0, queue = queue.0, "VM queue assigned");
                let filter = self.vmq.filter_of(port);
                if let Some(u) = self.uplink_of(port)
                    && let Some(st) = self.ports[u.0 as usize].as_mut().and_then(|r| r.steering.as_mut())
                {
                    st.set_filter(queue, filter);
                }
            }
        }
    }

    /// The VMQ filter of a port: its configured MAC in its VLAN (VM and TAP ports).
    fn filter_key(spec: &PortSpec) -> Option<FilterKey> {
        if spec.kind == PortKind::Uplink {
            return None;
        }
        let mac = spec.mac?;
        let vlan = match &spec.vlan {
            VlanMode::Access(v) => *v,
            VlanMode::Trunk { native, .. } => (*native)?,
        };
        Some(FilterKey { mac, vlan })
    }
}

/// Assembles a data path from the configuration and attachments the caller provides (tests,
/// `vmq bench`); [`Datapath::start`] does the same with the real backends.
pub struct DatapathBuilder {
    cfg: DatapathConfig,
    attached: HashMap<String, Attachment>,
    names: Vec<String>,
    backends: Option<Box<dyn Backends>>,
}

impl DatapathBuilder {
    pub fn new(cfg: DatapathConfig) -> Result<DatapathBuilder, DatapathError> {
        if cfg.workers == 0 {
            return Err(DatapathError::NoWorkers);
        }
        let mut names = Vec::new();
        for p in &cfg.ports {
            if names.contains(&p.spec.name) {
                return Err(DatapathError::DuplicatePort(p.spec.name.clone()));
            }
            names.push(p.spec.name.clone());
        }
        for p in &cfg.ports {
            if let Some(u) = &p.uplink
                && !cfg.ports.iter().any(|q| &q.spec.name == u && q.spec.kind == PortKind::Uplink)
            {
                return Err(DatapathError::BadUplink { port: p.spec.name.clone(), uplink: u.clone() });
            }
        }
        Ok(DatapathBuilder { cfg, attached: HashMap::new(), names, backends: None })
    }

    /// Ports are numbered in configuration order.
    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.names.iter().position(|n| n == name).map(|i| PortId(i as u16))
    }

    /// The VM queue a port will get at start (None: it shares the default queue). Queues are
    /// handed out first come, in configuration order, to ports with a MAC.
    pub fn vm_queue(&self, port: PortId) -> Option<QueueId> {
        if self.cfg.mode != Mode::Vmq {
            return None;
        }
        let mut next = 1u16;
        for (i, p) in self.cfg.ports.iter().enumerate() {
            if ControlState::filter_key(&p.spec).is_some() {
                if next > self.cfg.vmq.queues {
                    return None;
                }
                if i == port.0 as usize {
                    return Some(QueueId(next));
                }
                next += 1;
            }
        }
        None
    }

    fn attachment(&mut self, name: &str) -> Result<&mut Attachment, DatapathError> {
        self.attached.get_mut(name).ok_or_else(|| DatapathError::NotAttached(name.to_string()))
    }

    pub fn attach(
        &mut self,
        name: &str,
        sink: Box<dyn FrameSink>,
        source: Option<Box<dyn FrameSource>>,
    ) -> Result<PortId, DatapathError> {
        let id = self.port_id(name).ok_or_else(|| DatapathError::NoSuchPort(name.to_string()))?;
        self.attached.insert(name.to_string(), Attachment::new(sink, source));
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
            NicQueueTarget::Vm(port) => self.vm_queue(port).ok_or(DatapathError::NoQueue(port.0))?,
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
        self.attachment(uplink)?.nic_queues.push((queue, source));
        Ok(())
    }

    /// Gives the data path control of an uplink's VMQ filters.
    pub fn attach_steering(&mut self, uplink: &str, steering: Box<dyn NicSteering>) -> Result<(), DatapathError> {
        self.attachment(uplink)?.steering = Some(steering);
        Ok(())
    }

    /// Backends for ports added at run time ([`Datapath::add_port`]).
    pub fn backends(&mut self, backends: Box<dyn Backends>) {
        self.backends = Some(backends);
    }

    /// Starts the workers and adds the ports in configuration order.
    pub fn start(mut self) -> Result<Datapath, DatapathError> {
        for name in &self.names {
            if !self.attached.contains_key(name) {
                return Err(DatapathError::NotAttached(name.clone()));
            }
        }
        let ports = std::mem::take(&mut self.cfg.ports);
        let dp = Datapath::start_empty(&self.cfg, self.backends.take())?;
        for p in ports {
            let att =
                self.attached.remove(&p.spec.name).ok_or_else(|| DatapathError::NotAttached(p.spec.name.clone()))?;
            dp.add_port_attached(p, |_| Ok(att), false)?;
        }
        dp.release_tasks();
        Ok(dp)
    }
}

/// A running data path.
pub struct Datapath {
    shared: Arc<Shared>,
    control: Arc<Mutex<ControlState>>,
    threads: Vec<JoinHandle<()>>,
    rebalancer: Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>,
    workers: usize,
    queue_budget_max: u16,
    /// While the configured ports are being added at start, their tasks wait here so that no
    /// frame moves before every port exists.
    held_tasks: Mutex<Option<Vec<Arc<Task>>>>,
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

/// A port as `vmq ctl show` reports it.
#[derive(Debug, Clone)]
pub struct PortInfo {
    pub config: PortConfig,
    pub up: bool,
    /// What the attached receiver accepts (negotiated offloads).
    pub caps: vmq_core::OffloadCaps,
    /// Its VM queue (None: the default queue).
    pub queue: Option<QueueId>,
    /// The worker serving its traffic into vmq (its own TX, or its VM queue on the NIC).
    pub worker: Option<usize>,
    /// Frames per second delivered to it at the last measurement.
    pub rx_rate: u64,
    /// Bytes per second delivered to it at the last measurement.
    pub rx_byte_rate: u64,
    pub stats: PortStatsSnapshot,
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
    /// Tasks it serves: "vm1 tx", "up0 queue 3", "up0 default".
    pub tasks: Vec<String>,
}

impl Datapath {
    /// Builds and starts a data path from configuration alone, with the backends of this build.
    pub fn start(cfg: DatapathConfig) -> Result<Datapath, DatapathError> {
        Self::start_with(cfg, Box::new(backend::DefaultBackends::new()?))
    }

    /// Builds and starts a data path whose ports are attached by `backends`.
    pub fn start_with(mut cfg: DatapathConfig, backends: Box<dyn Backends>) -> Result<Datapath, DatapathError> {
        let ports = std::mem::take(&mut cfg.ports);
        let b = DatapathBuilder::new(DatapathConfig { ports: ports.clone(), ..cfg.clone() })?;
        drop(b);
        let dp = Datapath::start_empty(&cfg, Some(backends))?;
        for p in ports {
            dp.add_port_checked(p, false)?;
        }
        dp.release_tasks();
        Ok(dp)
    }

    fn start_empty(cfg: &DatapathConfig, backends: Option<Box<dyn Backends>>) -> Result<Datapath, DatapathError> {
        if cfg.workers == 0 {
            return Err(DatapathError::NoWorkers);
        }
        let shared =
            Arc::new(Shared::new(cfg.mode, Switch::new(cfg.switch), cfg.workers).map_err(DatapathError::Thread)?);
        let vmq_cfg = VmqConfig { workers: cfg.workers as u16, ..cfg.vmq };
        let control = Arc::new(Mutex::new(ControlState {
            mode: cfg.mode,
            vmq: Vmq::new(vmq_cfg),
            ports: Vec::new(),
            names: HashMap::new(),
            rates: HashMap::new(),
            byte_rates: HashMap::new(),
            busy: vec![0.0; cfg.workers],
            backends,
        }));
        let mut threads = Vec::new();
        for i in 0..cfg.workers {
            let worker_shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("vmq-worker-{i}"))
                .spawn(move || supervise::run_supervised(worker_shared, i))
                .map_err(DatapathError::Thread)?;
            threads.push(t);
        }
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let rebalancer = control::Rebalancer::new(
            shared.clone(),
            control.clone(),
            std::time::Duration::from_millis(cfg.rebalance_interval_ms.max(10)),
        );
        let rebalance_thread = std::thread::Builder::new()
            .name("vmq-control".into())
            .spawn(move || rebalancer.run(stop_rx))
            .map_err(DatapathError::Thread)?;
        Ok(Datapath {
            shared,
            control,
            threads,
            rebalancer: Some((stop_tx, rebalance_thread)),
            workers: cfg.workers,
            queue_budget_max: cfg.vmq.queues,
            held_tasks: Mutex::new(Some(Vec::new())),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        lock(&self.control)
    }

    /// Adds a port at run time, attached by the data path's backends.
    pub fn add_port(&self, config: PortConfig) -> Result<PortId, DatapathError> {
        self.add_port_checked(config, true)
    }

    fn add_port_checked(&self, config: PortConfig, check_uplink: bool) -> Result<PortId, DatapathError> {
        let control = self.control.clone();
        self.add_port_attached(
            config,
            move |ctx| {
                let mut backends = lock(&control).backends.take();
                let port = ctx.handle.port;
                let config = ctx.config.clone();
                let result = match backends.as_mut() {
                    Some(b) => b.attach(&config, ctx.into_context()),
                    None => Err(DatapathError::Backend {
                        port: format!("{}", port.0),
                        message: "this data path has no backends for run-time ports".into(),
                    }),
                };
                lock(&control).backends = backends;
                result
            },
            check_uplink,
        )
    }

    /// Adds a port with an attachment built by `attach` (tests and the bench build their own).
    pub fn add_port_with(&self, config: PortConfig, attachment: Attachment) -> Result<PortId, DatapathError> {
        self.add_port_attached(config, |_| Ok(attachment), true)
    }

    fn add_port_attached(
        &self,
        config: PortConfig,
        attach: impl FnOnce(PendingAttach) -> Result<Attachment, DatapathError>,
        check_uplink: bool,
    ) -> Result<PortId, DatapathError> {
        let name = config.spec.name.clone();
        // Reserve the name and the id, then attach without holding the control lock (a backend
        // may take a while, e.g. creating a TAP in a namespace).
        let (id, removed) = {
            let mut st = self.lock();
            if st.names.contains_key(&name) {
                return Err(DatapathError::DuplicatePort(name));
            }
            if let Some(u) = config.uplink.as_ref().filter(|_| check_uplink)
                && !st
                    .names
                    .get(u)
                    .and_then(|id| st.record(*id))
                    .is_some_and(|r| r.config.spec.kind == PortKind::Uplink)
            {
                return Err(DatapathError::BadUplink { port: name, uplink: u.clone() });
            }
            if st.ports.iter().filter(|p| p.is_some()).count() >= u16::MAX as usize {
                return Err(DatapathError::TooManyPorts(u16::MAX as usize));
            }
            let id = self.shared.switch_write().add_port(config.spec.clone());
            st.names.insert(name.clone(), id);
            (id, Arc::new(AtomicBool::new(false)))
        };
        let handle = PortHandle { shared: self.shared.clone(), port: id, removed: removed.clone() };
        let pending =
            PendingAttach { config: config.clone(), handle, nic_queues: self.queue_budget_max, mode: self.shared.mode };
        let att = match attach(pending) {
            Ok(a) => a,
            Err(e) => {
                let mut st = self.lock();
                st.names.remove(&name);
                self.shared.switch_write().remove_port(id);
                return Err(e);
            }
        };
        let mut st = self.lock();
        let stats = Arc::new(PortStats::default());
        let mut tasks = Vec::new();
        if let Some(source) = att.source {
            tasks.push(Task::new(TaskKind::PortTx { port: id }, source, stats.clone()));
        }
        let mut nic_queue_count = 0u16;
        for (queue, source) in att.nic_queues {
            let kind = if queue == QueueId::DEFAULT {
                TaskKind::DefaultQueue { uplink: id }
            } else {
                nic_queue_count = nic_queue_count.max(queue.0);
                TaskKind::VmQueue { uplink: id, queue }
            };
            tasks.push(Task::new(kind, source, stats.clone()));
        }
        let record = PortRecord {
            config: config.clone(),
            stats,
            sink: Arc::new(Mutex::new(att.sink)),
            tasks: tasks.clone(),
            steering: att.steering,
            nic_queue_count,
            control: att.control,
            removed,
            _keepalive: att.keepalive,
        };
        let slot = id.0 as usize;
        if st.ports.len() <= slot {
            st.ports.resize_with(slot + 1, || None);
        }
        st.ports[slot] = Some(record);
        {
            let mut sw = self.shared.switch_write();
            if let Some(key) = ControlState::filter_key(&config.spec) {
                sw.fdb_mut().add_static(key.mac, key.vlan, id);
            }
            sw.set_port_up(id, att.up);
        }
        let mut changes = Vec::new();
        if st.mode == Mode::Vmq
            && let Some(key) = ControlState::filter_key(&config.spec)
            && let Some(queue) = st.vmq.add_port(id, key)
        {
            changes.push(QueueChange::Assigned { port: id, queue });
        }
        if config.spec.kind == PortKind::Uplink {
            // A new uplink: program the filters of queues already held by ports using it.
            let held: Vec<QueueChange> = st
                .vmq
                .assignments()
                .filter_map(|(p, q)| q.map(|queue| QueueChange::Assigned { port: p, queue }))
                .collect();
            changes.extend(held.into_iter().filter(|c| match c {
                QueueChange::Assigned { port, .. } => st.uplink_of(*port) == Some(id),
                QueueChange::Revoked { .. } => false,
            }));
        }
        st.apply_queue_changes(&changes);
        self.shared.publish(st.port_table());
        self.place_new_tasks(tasks);
        tracing::info!(port = %name, id = id.0, kind = ?config.spec.kind, mtu = config.spec.mtu, vlan = ?config.spec.vlan, "port added");
        Ok(id)
    }

    /// Lets the tasks of the ports added at start run.
    fn release_tasks(&self) {
        let held = lock(&self.held_tasks).take();
        self.place_new_tasks(held.unwrap_or_default());
    }

    /// New tasks go to the workers with the fewest tasks; the rebalancer moves them by load.
    fn place_new_tasks(&self, tasks: Vec<Arc<Task>>) {
        if let Some(held) = lock(&self.held_tasks).as_mut() {
            held.extend(tasks);
            return;
        }
        for task in tasks {
            let lists = &self.shared.lists;
            let Some(list) = lists.iter().min_by_key(|l| lock(&l.tasks).len()) else { return };
            let mut current = lock(&list.tasks).clone();
            current.push(task);
            list.set(current);
            self.shared.refresh_workers();
        }
    }

    /// Removes a port at run time. Frames in flight to it are dropped; other ports are untouched.
    pub fn remove_port(&self, name: &str) -> Result<(), DatapathError> {
        let record = {
            let mut st = self.lock();
            let id = st.id(name)?;
            let Some(record) = st.ports.get_mut(id.0 as usize).and_then(Option::take) else {
                return Err(DatapathError::NoSuchPort(name.to_string()));
            };
            record.removed.store(true, Ordering::Release);
            st.names.remove(name);
            let changes = st.vmq.remove_port(id);
            st.apply_queue_changes(&changes);
            self.shared.switch_write().remove_port(id);
            for list in &self.shared.lists {
                let remaining: Vec<Arc<Task>> = lock(&list.tasks)
                    .iter()
                    .filter(|t| !record.tasks.iter().any(|r| Arc::ptr_eq(r, t)))
                    .cloned()
                    .collect();
                list.set(remaining);
            }
            self.shared.publish(st.port_table());
            self.shared.refresh_workers();
            record
        };
        // Dropped outside the lock: closing a TAP or a VM socket may take a moment.
        drop(record);
        tracing::info!(port = name, "port removed");
        Ok(())
    }

    /// Changes a port's MTU (68..=9000).
    pub fn set_port_mtu(&self, name: &str, mtu: u16) -> Result<(), DatapathError> {
        if !(vmq_core::port::MIN_MTU..=vmq_core::port::MAX_MTU).contains(&mtu) {
            return Err(DatapathError::Invalid(format!(
                "MTU {mtu} is outside {}..={}",
                vmq_core::port::MIN_MTU,
                vmq_core::port::MAX_MTU
            )));
        }
        let mut st = self.lock();
        let id = st.id(name)?;
        let rec = st.ports[id.0 as usize].as_mut().ok_or_else(|| DatapathError::NoSuchPort(name.to_string()))?;
        if let Some(c) = rec.control.as_mut() {
            c.set_mtu(mtu).map_err(|message| DatapathError::Backend { port: name.to_string(), message })?;
        }
        rec.config.spec.mtu = mtu;
        let spec = rec.config.spec.clone();
        self.shared.switch_write().update_port(id, spec);
        self.shared.publish(st.port_table());
        Ok(())
    }

    /// Changes a port's VLAN mode; its static address and VM queue filter follow.
    pub fn set_port_vlan(&self, name: &str, vlan: VlanMode) -> Result<(), DatapathError> {
        let valid = |v: u16| v <= 4094;
        let ok = match &vlan {
            VlanMode::Access(v) => valid(*v),
            VlanMode::Trunk { allowed, native } => {
                !allowed.is_empty() && allowed.iter().all(|v| (1..=4094).contains(v)) && native.is_none_or(valid)
            }
        };
        if !ok {
            return Err(DatapathError::Invalid(format!("invalid VLAN setting {vlan:?}")));
        }
        let mut st = self.lock();
        let id = st.id(name)?;
        let rec = st.ports[id.0 as usize].as_mut().ok_or_else(|| DatapathError::NoSuchPort(name.to_string()))?;
        let old_key = ControlState::filter_key(&rec.config.spec);
        rec.config.spec.vlan = vlan;
        let spec = rec.config.spec.clone();
        let new_key = ControlState::filter_key(&spec);
        {
            let mut sw = self.shared.switch_write();
            sw.fdb_mut().remove_port(id);
            sw.update_port(id, spec);
            if let Some(k) = new_key {
                sw.fdb_mut().add_static(k.mac, k.vlan, id);
            }
        }
        if st.mode == Mode::Vmq && old_key != new_key {
            let mut changes = st.vmq.remove_port(id);
            if let Some(k) = new_key
                && let Some(queue) = st.vmq.add_port(id, k)
            {
                changes.push(QueueChange::Assigned { port: id, queue });
            }
            st.apply_queue_changes(&changes);
        }
        self.shared.publish(st.port_table());
        Ok(())
    }

    /// Sets the VM queue budget; at most the queue count the uplinks were created with.
    pub fn set_queue_budget(&self, queues: u16) -> Result<(), DatapathError> {
        let mut st = self.lock();
        let max = st
            .ports
            .iter()
            .flatten()
            .filter(|r| r.config.spec.kind == PortKind::Uplink && r.steering.is_some())
            .map(|r| r.nic_queue_count)
            .min()
            .unwrap_or(self.queue_budget_max);
        if queues > max {
            return Err(DatapathError::Invalid(format!(
                "queue budget {queues} exceeds the {max} VM queues the uplinks have"
            )));
        }
        let changes = st.vmq.set_queues(queues);
        st.apply_queue_changes(&changes);
        Ok(())
    }

    pub fn set_queue_policy(&self, policy: QueuePolicy) {
        self.lock().vmq.set_policy(policy);
    }

    /// Runs a VMQ rebalance now (dynamic policy), with the rates of the last measurement.
    /// Returns the changes: (port, queue, granted (true) or revoked).
    pub fn rebalance_now(&self) -> Vec<(String, QueueId, bool)> {
        let mut st = self.lock();
        let rates: Vec<(PortId, u64)> = st.rates.iter().map(|(p, r)| (*p, *r)).collect();
        let changes = st.vmq.rebalance(&rates);
        st.apply_queue_changes(&changes);
        let name = |p: PortId| st.record(p).map(|r| r.config.spec.name.clone()).unwrap_or_default();
        changes
            .iter()
            .map(|c| match *c {
                QueueChange::Assigned { port, queue } => (name(port), queue, true),
                QueueChange::Revoked { port, queue } => (name(port), queue, false),
            })
            .collect()
    }

    /// Nanoseconds since the data path started (a monotonic clock for rates).
    pub fn uptime_ns(&self) -> u64 {
        self.shared.now_ns()
    }

    /// Most entries the FDB learns.
    pub fn fdb_capacity(&self) -> usize {
        self.shared.switch_read().fdb().capacity()
    }

    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.lock().names.get(name).copied()
    }

    fn names_by_id(st: &ControlState) -> Vec<(PortId, String)> {
        st.ports
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (PortId(i as u16), r.config.spec.name.clone())))
            .collect()
    }

    /// Counters of every port, by name, in port id order.
    pub fn port_stats(&self) -> Vec<(String, PortStatsSnapshot)> {
        let st = self.lock();
        st.ports.iter().flatten().map(|r| (r.config.spec.name.clone(), r.stats.snapshot())).collect()
    }

    pub fn stats(&self, name: &str) -> Option<PortStatsSnapshot> {
        let st = self.lock();
        let id = st.names.get(name)?;
        st.record(*id).map(|r| r.stats.snapshot())
    }

    /// VM queue assignments: (port name, queue; None = default queue).
    pub fn queue_assignments(&self) -> Vec<(String, Option<QueueId>)> {
        let st = self.lock();
        let names: HashMap<PortId, String> = Self::names_by_id(&st).into_iter().collect();
        st.vmq.assignments().filter_map(|(p, q)| names.get(&p).map(|n| (n.clone(), q))).collect()
    }

    /// Why a port has no VM queue, or None if it has one.
    pub fn no_queue_reason(&self, name: &str) -> Option<NoQueueReason> {
        let st = self.lock();
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
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        let st = self.lock();
        let name = |p: PortId| st.record(p).map(|r| r.config.spec.name.clone()).unwrap_or_default();
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
                            .assignments()
                            .find(|(p, q)| *q == Some(queue) && st.uplink_of(*p) == Some(uplink))
                            .map(|(p, _)| name(p)),
                        rx_packets,
                    }),
                    TaskKind::DefaultQueue { uplink } => {
                        out.push(QueueStats { uplink: name(uplink), queue: None, port: None, rx_packets })
                    }
                    TaskKind::PortTx { .. } => {}
                }
            }
        }
        out
    }

    /// Every port with its state, negotiated offloads, queue and worker.
    pub fn ports(&self) -> Vec<PortInfo> {
        let st = self.lock();
        let worker_of = |task: &Arc<Task>| {
            self.shared.lists.iter().position(|l| lock(&l.tasks).iter().any(|t| Arc::ptr_eq(t, task)))
        };
        let sw = self.shared.switch_read();
        let mut out = Vec::new();
        for (i, rec) in st.ports.iter().enumerate() {
            let Some(rec) = rec else { continue };
            let id = PortId(i as u16);
            let queue = st.vmq.queue_of(id);
            // The worker that brings its traffic in: its VM queue's, else its own TX task's.
            let queue_task = queue.and_then(|q| {
                let uplink = st.uplink_of(id)?;
                st.record(uplink)?.tasks.iter().find(|t| t.kind == TaskKind::VmQueue { uplink, queue: q }).cloned()
            });
            let worker = queue_task.or_else(|| rec.tasks.first().cloned()).and_then(|t| worker_of(&t));
            out.push(PortInfo {
                config: rec.config.clone(),
                up: sw.is_up(id),
                caps: lock(&rec.sink).caps(),
                queue,
                worker,
                rx_rate: st.rates.get(&id).copied().unwrap_or(0),
                rx_byte_rate: st.byte_rates.get(&id).copied().unwrap_or(0),
                stats: rec.stats.snapshot(),
            });
        }
        out
    }

    /// The FDB, static and learned entries.
    pub fn fdb(&self) -> Vec<FdbRow> {
        let st = self.lock();
        let now = self.shared.now_ns();
        let sw = self.shared.switch_read();
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
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let st = self.lock();
        let name = |p: PortId| st.record(p).map(|r| r.config.spec.name.clone()).unwrap_or_default();
        self.shared
            .lists
            .iter()
            .enumerate()
            .map(|(i, l)| WorkerInfo {
                index: i,
                busy_ratio: st.busy.get(i).copied().unwrap_or(0.0),
                frames: self.shared.worker_stats[i].frames.load(Ordering::Relaxed),
                panics: self.shared.worker_stats[i].panics.load(Ordering::Relaxed),
                sleeps: self.shared.worker_stats[i].sleeps.load(Ordering::Relaxed),
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

    pub fn mode(&self) -> Mode {
        self.shared.mode
    }

    pub fn worker_count(&self) -> usize {
        self.workers
    }

    /// The VM queue budget and policy now.
    pub fn queue_config(&self) -> VmqConfig {
        *self.lock().vmq.config()
    }

    /// Stops the workers and waits for them; ports are closed.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some((tx, t)) = self.rebalancer.take() {
            let _ = tx.send(());
            let _ = t.join();
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.refresh_workers();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Close every attachment (TAPs, sockets) now, not when the last handle goes away.
        let mut st = self.lock();
        for rec in st.ports.iter_mut() {
            if let Some(r) = rec.take() {
                r.removed.store(true, Ordering::Release);
            }
        }
        st.backends = None;
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What [`Datapath::add_port`] hands the attach step: the port's id and handle, reserved.
pub struct PendingAttach {
    config: PortConfig,
    handle: PortHandle,
    nic_queues: u16,
    mode: Mode,
}

impl PendingAttach {
    fn into_context(self) -> AttachContext {
        AttachContext { handle: self.handle, nic_queues: self.nic_queues, mode: self.mode }
    }
}

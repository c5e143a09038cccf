//! vmq's data path: worker threads that move frames between ports, using the sans-IO core for
//! every decision. Ports plug in as a [`FrameSource`] and a [`FrameSink`]; the in-process
//! virtio-net device ([`mem`]) and, with the `testing` feature, the NIC stand-in (`nic`) serve
//! tests and `vmq bench`.
//!
//! The running data path can be changed without a restart: ports are added and removed, their
//! MTU and VLAN changed, the VM queue budget and policy set. This module is the facade,
//! [`Datapath`]; the control plane keeps its state under one lock ([`state`]) and hands workers
//! immutable snapshots (the port table, task lists) that they pick up between batches, so no
//! frame of an unaffected port is ever dropped by a change. The [`rebalance`] thread moves VM
//! queues and re-places work on workers by load.
#![forbid(unsafe_code)]

pub mod afxdp;
mod afxdp_backend;
mod attach;
mod backend;
mod builder;
mod config;
// The guest side of a split ring: the `mem` port plays the guest with it; public only for tests.
#[cfg(feature = "testing")]
pub mod driver;
#[cfg(not(feature = "testing"))]
mod driver;
mod egress;
mod engine;
mod error;
mod guest_ring;
pub mod guest_view;
mod info;
pub mod mem;
#[cfg(feature = "testing")]
pub mod nic;
#[cfg(any(test, feature = "testing"))]
pub mod packed_driver;
pub mod packed_ring;
pub mod port;
mod rebalance;
pub mod ring;
mod spoof;
mod state;
mod supervise;
pub mod tap;
pub mod uplink;
mod vhost;
pub mod vhost_mq;
pub mod virtio;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmq_core::stats::PortStatsSnapshot;
use vmq_core::switch::Switch;
use vmq_core::vmq::{QueueChange, QueueId, QueuePolicy, VmqConfig};
use vmq_core::{Mode, PortConfig, PortId, VlanMode};

use engine::{Shared, Task, lock};
use state::ControlState;

pub use attach::{AttachContext, Attachment, Backends, PendingAttach, PortControl, PortHandle};
pub use builder::{DatapathBuilder, NicQueueTarget};
pub use config::DatapathConfig;
pub use error::{BackendError, DatapathError};
pub use info::{FdbRow, LockHoldStats, NoQueueReason, PortInfo, QueuePairInfo, QueueStats, VhostLink, WorkerInfo};
pub use port::{FrameSink, FrameSource, NicSteering, Wake};
pub use vmq_vhost::server::PortStatus as VhostPortStatus;

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

impl DatapathBuilder {
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

impl Datapath {
    /// Builds and starts a data path from configuration alone, with the backends of this build.
    pub fn start(cfg: DatapathConfig) -> Result<Datapath, DatapathError> {
        Self::start_with(cfg, Box::new(backend::DefaultBackends::new()?))
    }

    /// Builds and starts a data path whose ports are attached by `backends`.
    pub fn start_with(mut cfg: DatapathConfig, backends: Box<dyn Backends>) -> Result<Datapath, DatapathError> {
        cfg.check()?;
        let ports = std::mem::take(&mut cfg.ports);
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
        let control = Arc::new(Mutex::new(ControlState::new(cfg, backends)));
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
        let rebalancer = rebalance::Rebalancer::new(
            shared.clone(),
            control.clone(),
            std::time::Duration::from_millis(cfg.rebalance_interval_ms.max(10)),
        );
        let rebalance_thread = std::thread::Builder::new()
            .name("vmq-rebalance".into())
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
                let config = ctx.config.clone();
                let result = match backends.as_mut() {
                    Some(b) => b.attach(&config, ctx.into_context()),
                    None => Err(DatapathError::NoBackends { port: config.spec.name.clone() }),
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
        let id = self.lock().reserve(&self.shared, &config, check_uplink)?;
        let removed = Arc::new(AtomicBool::new(false));
        let handle = PortHandle { shared: self.shared.clone(), port: id, removed: removed.clone() };
        let pending =
            PendingAttach { config: config.clone(), handle, nic_queues: self.queue_budget_max, mode: self.shared.mode };
        let att = match attach(pending) {
            Ok(a) => a,
            Err(e) => {
                self.lock().unreserve(&self.shared, &name, id);
                return Err(e);
            }
        };
        let mut st = self.lock();
        let tasks = st.install(&self.shared, id, &config, att, removed);
        // Placed under the control lock, as the rebalancer places: no task is placed twice.
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
        let record = self.lock().remove(&self.shared, name)?;
        // Dropped outside the lock: closing a TAP or a VM socket may take a moment.
        drop(record);
        tracing::info!(port = name, "port removed");
        Ok(())
    }

    /// Changes a port's MTU (68..=9000).
    pub fn set_port_mtu(&self, name: &str, mtu: u16) -> Result<(), DatapathError> {
        if !(vmq_core::port::MIN_MTU..=vmq_core::port::MAX_MTU).contains(&mtu) {
            return Err(DatapathError::InvalidMtu { mtu, min: vmq_core::port::MIN_MTU, max: vmq_core::port::MAX_MTU });
        }
        let mut st = self.lock();
        let id = st.id(name)?;
        let rec = st.ports[id.0 as usize].as_mut().ok_or_else(|| DatapathError::NoSuchPort(name.to_string()))?;
        if let Some(c) = rec.control.as_mut() {
            c.set_mtu(mtu).map_err(|source| DatapathError::Backend { port: name.to_string(), source })?;
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
            return Err(DatapathError::InvalidVlan(vlan));
        }
        self.lock().set_vlan(&self.shared, name, vlan)
    }

    /// A guest asks to move its port to `mac` (its frontend relays the guest's MAC_ADDR_SET).
    /// Decided by the port's policy ([`vmq_core::guest::review_mac_change`]): refused unless
    /// the port has `allow_mac_change`, and then counted (`mac_change_refused`) and the port
    /// keeps its MAC; allowed, the spoof guard, static FDB entry and VM queue filter follow the
    /// new MAC before this returns. `Ok(false)`: the port had that MAC already.
    pub fn guest_set_mac(&self, name: &str, mac: vmq_wire::MacAddr) -> Result<bool, DatapathError> {
        let mut st = self.lock();
        let id = st.id(name)?;
        let rec = st.record(id).ok_or_else(|| DatapathError::NoSuchPort(name.to_string()))?;
        match vmq_core::guest::review_mac_change(&rec.config.spec, mac) {
            Ok(false) => Ok(false),
            Ok(true) => {
                let old = rec.config.spec.mac;
                st.set_mac(&self.shared, id, mac);
                tracing::info!(port = name, old = ?old, new = %mac, "guest moved its port to a new MAC");
                Ok(true)
            }
            Err(reason) => {
                rec.stats.mac_change_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(port = name, %mac, %reason, "guest MAC change refused");
                Err(DatapathError::MacChangeRefused { port: name.to_string(), mac, reason })
            }
        }
    }

    /// A guest's receive filter, relayed from its VMM (QMP `query-rx-filter`): reviewed by the
    /// port's policy ([`vmq_core::rxfilter::review_rx_filter`]) and applied to every frame the
    /// switch delivers to the port from the next batch on. A promiscuous request the policy
    /// refuses is counted (`promiscuous_refused`) once, when it first appears. The guest's MAC
    /// (`main_mac`) is not applied here: that is [`Datapath::guest_set_mac`]. Returns the
    /// filter in force.
    pub fn guest_set_rx_filter(
        &self,
        name: &str,
        request: &vmq_core::rxfilter::GuestRxFilter,
    ) -> Result<vmq_core::rxfilter::RxFilter, DatapathError> {
        let mut st = self.lock();
        let id = st.id(name)?;
        let rec = st
            .ports
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .ok_or_else(|| DatapathError::NoSuchPort(name.to_string()))?;
        if !rec.config.spec.kind.is_vm() {
            return Err(DatapathError::NotAVmPort(name.to_string()));
        }
        let filter = vmq_core::rxfilter::review_rx_filter(&rec.config.spec, request);
        let was_refused = rec.rx_filter.as_ref().is_some_and(|f| f.promiscuous_refused);
        if filter.promiscuous_refused && !was_refused {
            rec.stats.promiscuous_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(port = name, "guest asked for promiscuous mode; refused (allow_promiscuous = false)");
        }
        if rec.rx_filter.as_deref() != Some(&filter) {
            tracing::info!(port = name, promiscuous = filter.promiscuous, multicast = filter.multicast.name(),
                multicast_entries = filter.multicast_entries(), vlans = ?filter.vlans, "guest receive filter applied");
            rec.rx_filter = Some(Arc::new(filter.clone()));
            self.shared.publish(st.port_table());
        }
        Ok(filter)
    }

    /// Counts an error of the QMP relay that feeds `name`'s receive filter (`qmp_errors`).
    pub fn count_qmp_error(&self, name: &str) {
        let st = self.lock();
        if let Some(rec) = st.names.get(name).and_then(|id| st.record(*id)) {
            rec.stats.qmp_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sets the VM queue budget; at most the queue count the uplinks were created with.
    pub fn set_queue_budget(&self, queues: u16) -> Result<(), DatapathError> {
        let mut st = self.lock();
        let max = st.queue_budget_max(self.queue_budget_max);
        if queues > max {
            return Err(DatapathError::QueueBudget { requested: queues, max });
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
        changes
            .iter()
            .map(|c| match *c {
                QueueChange::Assigned { port, queue } => (st.name_of(port), queue, true),
                QueueChange::Revoked { port, queue } => (st.name_of(port), queue, false),
            })
            .collect()
    }

    /// Nanoseconds since the data path started (a monotonic clock for rates).
    pub fn uptime_ns(&self) -> u64 {
        self.shared.now_ns()
    }

    /// Time the workers spent in rounds that moved frames, summed over workers (nanoseconds).
    pub fn busy_ns(&self) -> u64 {
        self.shared.worker_stats.iter().map(|w| w.busy_ns.load(Ordering::Relaxed)).sum()
    }

    /// How long MAC learning held the switch's write lock, over all workers: batches that took
    /// it, their total time and the longest (every other worker waits meanwhile).
    pub fn learn_lock_hold(&self) -> LockHoldStats {
        self.shared.worker_stats.iter().fold(LockHoldStats::default(), |acc, w| LockHoldStats {
            batches: acc.batches + w.learn_lock.batches.load(Ordering::Relaxed),
            total_ns: acc.total_ns + w.learn_lock.total_ns.load(Ordering::Relaxed),
            max_ns: acc.max_ns.max(w.learn_lock.max_ns.load(Ordering::Relaxed)),
        })
    }

    /// Starts a new measurement of the longest learning lock hold.
    pub fn reset_learn_lock_max(&self) {
        for w in &self.shared.worker_stats {
            w.learn_lock.max_ns.store(0, Ordering::Relaxed);
        }
    }

    /// Entries in the FDB now (static and learned).
    pub fn fdb_len(&self) -> usize {
        self.shared.switch_read().fdb().len()
    }

    /// Connection state of every vhost-user port's socket: connected, connections accepted and
    /// refused, panics caught. Empty while a port is being attached (the backends are busy).
    pub fn vhost_status(&self) -> Vec<VhostPortStatus> {
        self.lock().backends.as_ref().map(|b| b.vhost_status()).unwrap_or_default()
    }

    /// Most entries the FDB learns.
    pub fn fdb_capacity(&self) -> usize {
        self.shared.switch_read().fdb().capacity()
    }

    pub fn port_id(&self, name: &str) -> Option<PortId> {
        self.lock().names.get(name).copied()
    }

    /// Counters of every port, by name, in port id order.
    pub fn port_stats(&self) -> Vec<(String, PortStatsSnapshot)> {
        info::port_stats(&self.lock())
    }

    pub fn stats(&self, name: &str) -> Option<PortStatsSnapshot> {
        info::stats(&self.lock(), name)
    }

    /// VM queue assignments: (port name, queue; None = default queue), a row per queue held (a
    /// multiqueue port may hold several, VMMQ).
    pub fn queue_assignments(&self) -> Vec<(String, Option<QueueId>)> {
        info::queue_assignments(&self.lock())
    }

    /// Why a port has no VM queue, or None if it has one.
    pub fn no_queue_reason(&self, name: &str) -> Option<NoQueueReason> {
        info::no_queue_reason(&self.lock(), name)
    }

    /// Per NIC queue counters.
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        info::queue_stats(&self.lock())
    }

    /// Every port with its state, negotiated offloads, queue and worker.
    pub fn ports(&self) -> Vec<PortInfo> {
        info::ports(&self.lock(), &self.shared)
    }

    /// The FDB, static and learned entries.
    pub fn fdb(&self) -> Vec<FdbRow> {
        info::fdb(&self.lock(), &self.shared)
    }

    /// Per worker: busy ratio at the last measurement, frames, tasks.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        info::workers(&self.lock(), &self.shared)
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

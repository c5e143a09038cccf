//! The control plane's state: every port's record (configuration, counters, sink, tasks,
//! steering), the VMQ allocator, and the rates the rebalancer last measured. One lock, never
//! taken on the frame path; what workers need they get as snapshots ([`PortTable`], task lists)
//! through [`Shared`].

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vmq_core::fdb::MixMap;
use vmq_core::stats::PortStats;
use vmq_core::vmq::{FilterKey, QueueChange, QueueId, Vmq, VmqConfig};
use vmq_core::{Mode, PortConfig, PortId, PortKind, PortSpec, VlanMode};
use vmq_wire::MacAddr;

use crate::attach::{Attachment, Backends, PortControl};
use crate::config::DatapathConfig;
use crate::engine::{PortEntry, PortTable, Shared, Task, TaskKind, local_key, lock};
use crate::error::DatapathError;
use crate::port::{NicSteering, PortSinks};

/// A port as the control plane keeps it.
pub(crate) struct PortRecord {
    pub config: PortConfig,
    pub stats: Arc<PortStats>,
    pub sinks: PortSinks,
    pub tasks: Vec<Arc<Task>>,
    pub steering: Option<Box<dyn NicSteering>>,
    /// Uplinks: VM queues the NIC has (the budget can't exceed it).
    pub nic_queue_count: u16,
    pub control: Option<Box<dyn PortControl>>,
    pub removed: Arc<AtomicBool>,
    pub vhost: Option<Arc<vmq_vhost::server::ConnectionStatus>>,
    /// The guest's receive filter as last relayed and reviewed (None: not relayed, no filter).
    pub rx_filter: Option<Arc<vmq_core::rxfilter::RxFilter>>,
    /// See [`crate::Attachment::uplink_driver`].
    pub uplink_driver: Option<&'static str>,
    /// See [`crate::Attachment::queue_counters`].
    pub queue_counters: Option<Arc<crate::attach::QueueCounters>>,
    _keepalive: Option<Box<dyn Any + Send>>,
}

/// The control plane's state. One lock; never taken on the frame path.
pub(crate) struct ControlState {
    pub mode: Mode,
    pub vmq: Vmq,
    pub ports: Vec<Option<PortRecord>>,
    pub names: HashMap<String, PortId>,
    /// Receive rate (frames/s) of each port at the last rebalance, for `vmq ctl queues`.
    pub rates: HashMap<PortId, u64>,
    /// The same in bytes/s.
    pub byte_rates: HashMap<PortId, u64>,
    /// Busy ratio of each worker at the last measurement.
    pub busy: Vec<f64>,
    pub backends: Option<Box<dyn Backends>>,
}

impl ControlState {
    pub fn new(cfg: &DatapathConfig, backends: Option<Box<dyn Backends>>) -> ControlState {
        let vmq_cfg = VmqConfig { workers: cfg.workers as u16, ..cfg.vmq };
        ControlState {
            mode: cfg.mode,
            vmq: Vmq::new(vmq_cfg),
            ports: Vec::new(),
            names: HashMap::new(),
            rates: HashMap::new(),
            byte_rates: HashMap::new(),
            busy: vec![0.0; cfg.workers],
            backends,
        }
    }

    pub fn record(&self, id: PortId) -> Option<&PortRecord> {
        self.ports.get(id.0 as usize).and_then(Option::as_ref)
    }

    pub fn id(&self, name: &str) -> Result<PortId, DatapathError> {
        self.names.get(name).copied().ok_or_else(|| DatapathError::NoSuchPort(name.to_string()))
    }

    /// The uplink a port's traffic uses: the one it names, else the first uplink.
    pub fn uplink_of(&self, id: PortId) -> Option<PortId> {
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
    pub fn port_table(&self) -> PortTable {
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
                    sinks: r.sinks.clone(),
                    uplink: self.uplink_of(id),
                    rx_filter: r.rx_filter.clone(),
                })
            }));
        }
        table
    }

    /// Programs the NIC filters for queue changes: revocations first, so that a queue never
    /// matches two VMs at once.
    pub fn apply_queue_changes(&mut self, changes: &[QueueChange]) {
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
    pub fn filter_key(spec: &PortSpec) -> Option<FilterKey> {
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

    /// Reserves the port's name and id (the switch numbers ports), so that the attach step can
    /// run without the control lock.
    pub fn reserve(
        &mut self,
        shared: &Shared,
        config: &PortConfig,
        check_uplink: bool,
    ) -> Result<PortId, DatapathError> {
        let name = &config.spec.name;
        if self.names.contains_key(name) {
            return Err(DatapathError::DuplicatePort(name.clone()));
        }
        if let Some(u) = config.uplink.as_ref().filter(|_| check_uplink)
            && !self
                .names
                .get(u)
                .and_then(|id| self.record(*id))
                .is_some_and(|r| r.config.spec.kind == PortKind::Uplink)
        {
            return Err(DatapathError::BadUplink { port: name.clone(), uplink: u.clone() });
        }
        if self.ports.iter().filter(|p| p.is_some()).count() >= u16::MAX as usize {
            return Err(DatapathError::TooManyPorts(u16::MAX as usize));
        }
        let id = shared.switch_write().add_port(config.spec.clone());
        self.names.insert(name.clone(), id);
        Ok(id)
    }

    /// Gives back what [`ControlState::reserve`] took, when the attach step failed.
    pub fn unreserve(&mut self, shared: &Shared, name: &str, id: PortId) {
        self.names.remove(name);
        shared.switch_write().remove_port(id);
    }

    /// Records an attached port and hands its address, VLAN and VM queue to the switch, the
    /// VMQ allocator and the NIC filters. Returns the port's tasks, for the caller to place.
    pub fn install(
        &mut self,
        shared: &Shared,
        id: PortId,
        config: &PortConfig,
        att: Attachment,
        removed: Arc<AtomicBool>,
    ) -> Vec<Arc<Task>> {
        let stats = Arc::new(PortStats::default());
        let mut tasks = Vec::new();
        if let Some(source) = att.source {
            tasks.push(Task::new(TaskKind::PortTx { port: id }, source, stats.clone()));
        }
        // Further TX queues of a multiqueue port: tasks of the same kind, placed apart.
        for source in att.more_sources {
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
            sinks: if att.more_sinks.is_empty() {
                PortSinks::one(att.sink)
            } else {
                PortSinks::lanes(std::iter::once(att.sink).chain(att.more_sinks).collect(), att.live_lanes)
            },
            tasks: tasks.clone(),
            steering: att.steering,
            nic_queue_count,
            control: att.control,
            removed,
            vhost: att.vhost,
            rx_filter: None,
            uplink_driver: att.uplink_driver,
            queue_counters: att.queue_counters,
            _keepalive: att.keepalive,
        };
        let slot = id.0 as usize;
        if self.ports.len() <= slot {
            self.ports.resize_with(slot + 1, || None);
        }
        self.ports[slot] = Some(record);
        {
            let mut sw = shared.switch_write();
            if let Some(key) = ControlState::filter_key(&config.spec) {
                sw.fdb_mut().add_static(key.mac, key.vlan, id);
            }
            sw.set_port_up(id, att.up);
        }
        let mut changes = Vec::new();
        if self.mode == Mode::Vmq
            && let Some(key) = ControlState::filter_key(&config.spec)
        {
            let lanes = self.vm_queue_lanes(id);
            changes.extend(
                self.vmq
                    .add_port_lanes(id, key, lanes)
                    .into_iter()
                    .map(|queue| QueueChange::Assigned { port: id, queue }),
            );
        }
        if config.spec.kind == PortKind::Uplink {
            // A new uplink: program the filters of queues already held by ports using it.
            let held: Vec<QueueChange> =
                self.vmq.queue_assignments().map(|(port, queue)| QueueChange::Assigned { port, queue }).collect();
            changes.extend(held.into_iter().filter(|c| match c {
                QueueChange::Assigned { port, .. } => self.uplink_of(*port) == Some(id),
                QueueChange::Revoked { .. } => false,
            }));
        }
        self.apply_queue_changes(&changes);
        shared.publish(self.port_table());
        tasks
    }

    /// Takes a port out of the switch, the VMQ allocator, the NIC filters and the workers' task
    /// lists. Returns its record, for the caller to drop outside the lock.
    pub fn remove(&mut self, shared: &Shared, name: &str) -> Result<PortRecord, DatapathError> {
        let id = self.id(name)?;
        let Some(record) = self.ports.get_mut(id.0 as usize).and_then(Option::take) else {
            return Err(DatapathError::NoSuchPort(name.to_string()));
        };
        record.removed.store(true, Ordering::Release);
        self.names.remove(name);
        let changes = self.vmq.remove_port(id);
        self.apply_queue_changes(&changes);
        shared.switch_write().remove_port(id);
        for list in &shared.lists {
            let remaining: Vec<Arc<Task>> =
                lock(&list.tasks).iter().filter(|t| !record.tasks.iter().any(|r| Arc::ptr_eq(r, t))).cloned().collect();
            list.set(remaining);
        }
        shared.publish(self.port_table());
        shared.refresh_workers();
        Ok(record)
    }

    /// Changes a port's VLAN mode (already checked); its static address and VM queue filter
    /// follow.
    pub fn set_vlan(&mut self, shared: &Shared, name: &str, vlan: VlanMode) -> Result<(), DatapathError> {
        let id = self.id(name)?;
        if self.ports.get(id.0 as usize).and_then(Option::as_ref).is_none() {
            return Err(DatapathError::NoSuchPort(name.to_string()));
        }
        self.readdress(shared, id, |spec| spec.vlan = vlan);
        Ok(())
    }

    /// Moves a port to another MAC at once: its spoof guard, static FDB entry and VM queue
    /// filter follow (the policy was checked by the caller). Learned addresses of the port are
    /// forgotten with the old configuration.
    pub fn set_mac(&mut self, shared: &Shared, id: PortId, mac: MacAddr) {
        self.readdress(shared, id, |spec| spec.mac = Some(mac));
    }

    /// Changes what addresses a port (its MAC or VLAN mode) and makes everything keyed by them
    /// follow: the switch's view of the port, its static FDB entry (static entries are per port,
    /// so dropping the port's entries drops exactly the old one; learned ones go too) and, in
    /// `vmq` mode, its VM queue filter. Nothing happens for a port that is gone.
    fn readdress(&mut self, shared: &Shared, id: PortId, edit: impl FnOnce(&mut PortSpec)) {
        let Some(rec) = self.ports.get_mut(id.0 as usize).and_then(Option::as_mut) else { return };
        let old_key = ControlState::filter_key(&rec.config.spec);
        edit(&mut rec.config.spec);
        let spec = rec.config.spec.clone();
        let new_key = ControlState::filter_key(&spec);
        {
            let mut sw = shared.switch_write();
            sw.fdb_mut().remove_port(id);
            sw.update_port(id, spec);
            if let Some(k) = new_key {
                sw.fdb_mut().add_static(k.mac, k.vlan, id);
            }
        }
        if self.mode == Mode::Vmq && old_key != new_key {
            let mut changes = self.vmq.remove_port(id);
            if let Some(k) = new_key {
                let lanes = self.vm_queue_lanes(id);
                changes.extend(
                    self.vmq
                        .add_port_lanes(id, k, lanes)
                        .into_iter()
                        .map(|queue| QueueChange::Assigned { port: id, queue }),
                );
            }
            self.apply_queue_changes(&changes);
        }
        shared.publish(self.port_table());
    }

    /// How many VM queues a port may hold at once (VMMQ): one per lane (guest RX queue) where
    /// its uplink spreads a filter's flows over several queues, else one. An uplink not yet
    /// known counts as spreading (the AF_XDP program, which cannot, sends a key to its lowest
    /// queue: the further ones stay idle).
    fn vm_queue_lanes(&self, id: PortId) -> u16 {
        let Some(rec) = self.record(id) else { return 1 };
        let spreads = self
            .uplink_of(id)
            .and_then(|u| self.record(u))
            .and_then(|u| u.steering.as_ref())
            .is_none_or(|st| st.spreads_flows());
        if spreads { rec.sinks.count() as u16 } else { 1 }
    }

    /// The most VM queues the budget may grant: the fewest any steered uplink has, else
    /// `configured` (no uplink yet).
    pub fn queue_budget_max(&self, configured: u16) -> u16 {
        self.ports
            .iter()
            .flatten()
            .filter(|r| r.config.spec.kind == PortKind::Uplink && r.steering.is_some())
            .map(|r| r.nic_queue_count)
            .min()
            .unwrap_or(configured)
    }

    /// A port's name, or empty if it is gone.
    pub fn name_of(&self, id: PortId) -> String {
        self.record(id).map(|r| r.config.spec.name.clone()).unwrap_or_default()
    }

    pub fn names_by_id(&self) -> Vec<(PortId, String)> {
        self.ports
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (PortId(i as u16), r.config.spec.name.clone())))
            .collect()
    }
}

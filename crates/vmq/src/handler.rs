//! The control socket's requests, answered from (and applied to) the running data path; the
//! snapshot the metrics exporter renders; and the configuration file's side of the running
//! switch: reload (SIGHUP) and `save`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmq_control::ControlHandler;
use vmq_control::metrics::{
    BuildInfo, FdbMetrics, MetricsSnapshot, NicQueueMetrics, PortMetrics, QueueMetrics, RxFilterMetrics, VhostMetrics,
    WorkerMetrics,
};
use vmq_control::protocol::{
    ControlError, ErrorCode, FdbEntry, FdbReport, NicQueue, PortState, QueueAction, QueueAssignment, QueueChange,
    QueuePolicy, QueueReport, Request, Response, Setting, SharedPort, SharedReason, StatsReport, SwitchSummary,
    WorkerInfo,
};
use vmq_core::vmq::QueuePolicy as CorePolicy;
use vmq_core::{PortBackend, PortConfig, PortKind, SocketPolicy, VlanMode};
use vmq_datapath::{Datapath, DatapathError, NoQueueReason, PortInfo};

use crate::config::{self, Config};
use crate::control::{port_config, port_counters, port_info, switch_mode};
use crate::persist::{self, Running};
use crate::reload::{self, Current, Plan};

/// Longest FDB listing sent in one reply (the table may hold 65 536 entries).
const MAX_FDB_ROWS: usize = 4096;

pub struct DatapathHandler {
    dp: Arc<Datapath>,
    /// `[vhost]` of the configuration: the socket policy of vhost-user ports added at run time.
    socket_defaults: Mutex<SocketPolicy>,
    /// The configuration file and what was last applied from it (at start or by a reload).
    /// Held while a reload or a save runs, so that the two never interleave.
    file: Mutex<Option<(PathBuf, Config)>>,
}

/// What a reload did.
#[derive(Debug)]
pub struct ReloadOutcome {
    pub plan: Plan,
    /// Changes the data path refused while applying (a TAP that could not be created, ...);
    /// the rest of the plan was applied.
    pub failed: Vec<String>,
}

impl DatapathHandler {
    pub fn new(dp: Arc<Datapath>) -> DatapathHandler {
        DatapathHandler { dp, socket_defaults: Mutex::new(SocketPolicy::default()), file: Mutex::new(None) }
    }

    /// The configuration file the switch runs from: its `[vhost]` is the socket policy of
    /// vhost-user ports added with `add-port`; `save` writes to it; reload reads it.
    pub fn with_config_file(self, path: PathBuf, config: Config) -> DatapathHandler {
        *lock(&self.socket_defaults) = config.vhost.clone();
        *lock(&self.file) = Some((path, config));
        self
    }

    /// Re-reads the configuration file and applies the difference (see [`crate::reload`]).
    /// Refused, with nothing changed, if the file is invalid or changes a restart-only setting.
    pub fn reload(&self) -> Result<ReloadOutcome, String> {
        let mut file = lock(&self.file);
        let Some((path, applied)) = file.as_mut() else {
            return Err("vmq was not started from a configuration file".into());
        };
        let new = config::load(path).map_err(|e| e.to_string())?;
        let ports = self.configs();
        let queue_config = self.dp.queue_config();
        let socket_defaults = lock(&self.socket_defaults).clone();
        let current = Current {
            applied,
            ports: &ports,
            queues: queue_config.queues,
            policy: queue_config.policy,
            socket_defaults: &socket_defaults,
        };
        let plan = reload::plan(&current, &new)?;
        let mut failed = Vec::new();
        let mut note = |what: String, e: DatapathError| {
            tracing::error!(error = %e, "reload: {what} failed");
            failed.push(format!("{what}: {e}"));
        };
        // The budget first: a refusal there leaves everything else as it was.
        if let Some(q) = plan.queues {
            self.dp.set_queue_budget(q).map_err(|e| format!("[vmq] queues {q}: {e}"))?;
        }
        if let Some(p) = plan.policy {
            self.dp.set_queue_policy(p);
        }
        for name in &plan.remove {
            if let Err(e) = self.dp.remove_port(name) {
                note(format!("removing port {name}"), e);
            }
        }
        for (name, mtu) in &plan.mtu {
            if let Err(e) = self.dp.set_port_mtu(name, *mtu) {
                note(format!("port {name} mtu {mtu}"), e);
            }
        }
        for (name, vlan) in &plan.vlan {
            if let Err(e) = self.dp.set_port_vlan(name, vlan.clone()) {
                note(format!("port {name} vlan {vlan:?}"), e);
            }
        }
        for port in &plan.add {
            let name = port.spec.name.clone();
            if let Err(e) = self.dp.add_port(port.clone()) {
                note(format!("adding port {name}"), e);
            }
        }
        if let Some(policy) = &plan.socket_defaults {
            *lock(&self.socket_defaults) = policy.clone();
        }
        *applied = new;
        Ok(ReloadOutcome { plan, failed })
    }

    /// `save`: the running configuration into the configuration file.
    fn save(&self) -> Result<String, ControlError> {
        let file = lock(&self.file);
        let Some((path, _)) = file.as_ref() else {
            return Err(ControlError::new(ErrorCode::Unsupported, "vmq was not started from a configuration file"));
        };
        let queue_config = self.dp.queue_config();
        let running = Running { ports: self.configs(), queues: queue_config.queues, policy: queue_config.policy };
        persist::save(path, &running).map_err(|e| match e {
            persist::SaveError::FileInvalid(_) | persist::SaveError::NotExpressible(_) => {
                ControlError::new(ErrorCode::Unsupported, e.to_string())
            }
            _ => ControlError::internal(e.to_string()),
        })?;
        tracing::info!(file = %path.display(), "running configuration saved");
        Ok(format!("saved the running configuration to {}", path.display()))
    }

    fn port_infos(&self) -> Vec<vmq_control::protocol::PortInfo> {
        self.dp.ports().iter().map(info).collect()
    }

    fn policy(&self) -> QueuePolicy {
        match self.dp.queue_config().policy {
            CorePolicy::Static => QueuePolicy::Static,
            CorePolicy::Dynamic => QueuePolicy::Dynamic,
        }
    }

    fn summary(&self) -> SwitchSummary {
        let ports = self.dp.ports();
        SwitchSummary {
            mode: switch_mode(self.dp.mode()),
            workers: self.dp.worker_count() as u32,
            queue_budget: u32::from(self.dp.queue_config().queues),
            queues_in_use: ports.iter().map(|p| p.vm_queues.len()).sum::<usize>() as u32,
            policy: self.policy(),
            ports: ports.iter().map(info).collect(),
        }
    }

    fn queues(&self) -> QueueReport {
        let mut assigned = Vec::new();
        let mut shared = Vec::new();
        for p in self.dp.ports() {
            let name = p.config.spec.name.clone();
            let (rx_pps, rx_bits_per_sec) = (p.rx_rate, p.rx_byte_rate.saturating_mul(8));
            match p.queue {
                // A multiqueue port holds several (VMMQ): a row each; its rates are the port's.
                Some(_) => assigned.extend(p.vm_queues.iter().map(|&(q, worker)| QueueAssignment {
                    port: name.clone(),
                    queue: u32::from(q.0),
                    worker: worker.or(p.worker).unwrap_or(0) as u32,
                    rx_pps,
                    rx_bits_per_sec,
                })),
                None => {
                    let reason = match self.dp.no_queue_reason(&name) {
                        Some(NoQueueReason::SwitchMode) => SharedReason::SwitchMode,
                        Some(NoQueueReason::NotAVmPort) => SharedReason::NotVmPort,
                        Some(NoQueueReason::NoMac) => SharedReason::NoMac,
                        _ => SharedReason::BudgetExhausted,
                    };
                    shared.push(SharedPort { port: name, reason, rx_pps, rx_bits_per_sec });
                }
            }
        }
        let nic_queues = self
            .dp
            .queue_stats()
            .into_iter()
            .map(|q| NicQueue {
                uplink: q.uplink,
                queue: u32::from(q.queue.map_or(0, |q| q.0)),
                port: q.port,
                rx_queue: q.rx_queue.map(u32::from),
                rx_packets: q.rx_packets,
            })
            .collect();
        QueueReport {
            mode: switch_mode(self.dp.mode()),
            policy: self.policy(),
            budget: u32::from(self.dp.queue_config().queues),
            assigned,
            shared,
            nic_queues,
        }
    }

    fn fdb(&self) -> FdbReport {
        let rows = self.dp.fdb();
        FdbReport {
            total: rows.len() as u64,
            capacity: self.dp.fdb_capacity() as u64,
            entries: rows
                .into_iter()
                .take(MAX_FDB_ROWS)
                .map(|r| FdbEntry {
                    mac: r.mac.to_string(),
                    vlan: r.vlan,
                    port: r.port,
                    age_secs: r.age_secs.map(|a| a as u64),
                })
                .collect(),
        }
    }

    fn stats(&self, port: Option<String>) -> Result<StatsReport, ControlError> {
        let uptime_ns = self.dp.uptime_ns();
        let all = self.dp.port_stats();
        let ports = match port {
            Some(name) => {
                let (n, s) = all.iter().find(|(n, _)| *n == name).ok_or_else(|| no_such_port(&name))?;
                vec![port_counters(n, s)]
            }
            None => all.iter().map(|(n, s)| port_counters(n, s)).collect(),
        };
        Ok(StatsReport { uptime_ns, ports })
    }

    fn configs(&self) -> Vec<PortConfig> {
        self.dp.ports().into_iter().map(|p| p.config).collect()
    }

    fn set(&self, setting: Setting) -> Result<String, ControlError> {
        match setting {
            Setting::Queues { queues } => {
                let q = u16::try_from(queues).map_err(|_| ControlError::invalid_value("queue budget too large"))?;
                self.dp.set_queue_budget(q).map_err(datapath_error)?;
                Ok(format!("queue budget set to {q}"))
            }
            Setting::Policy { policy } => {
                self.dp.set_queue_policy(match policy {
                    QueuePolicy::Static => CorePolicy::Static,
                    QueuePolicy::Dynamic => CorePolicy::Dynamic,
                });
                Ok(format!("queue policy set to {}", policy.name()))
            }
            Setting::PortMtu { port, mtu } => {
                let m =
                    u16::try_from(mtu).map_err(|_| ControlError::invalid_value(format!("MTU {mtu} is too large")))?;
                self.dp.set_port_mtu(&port, m).map_err(datapath_error)?;
                Ok(format!("port {port}: MTU {m}"))
            }
            Setting::PortVlan { port, vlan } => {
                let v = u16::try_from(vlan)
                    .ok()
                    .filter(|v| *v <= 4094)
                    .ok_or_else(|| ControlError::invalid_value(format!("VLAN {vlan} is outside 0..=4094")))?;
                self.dp.set_port_vlan(&port, VlanMode::Access(v)).map_err(datapath_error)?;
                Ok(format!("port {port}: access VLAN {v}"))
            }
        }
    }

    /// The metrics exporter's view: counters, state and queue of every port, worker load,
    /// vhost-user connections, MAC table size, VM queue use, build.
    pub fn metrics(&self) -> MetricsSnapshot {
        let ports = self.dp.ports();
        let nic = self.dp.queue_stats();
        let in_use = ports
            .iter()
            .filter(|p| p.config.spec.kind == PortKind::Uplink)
            .map(|u| {
                let name = &u.config.spec.name;
                let n = nic.iter().filter(|q| &q.uplink == name && q.queue.is_some() && q.port.is_some()).count();
                (name.clone(), n as u64)
            })
            .collect();
        MetricsSnapshot {
            ports: ports
                .iter()
                .map(|p| PortMetrics {
                    counters: port_counters(&p.config.spec.name, &p.stats),
                    up: p.up,
                    queue_assigned: p.queue.is_some(),
                    rx_filter: p.rx_filter.as_ref().map(|f| RxFilterMetrics {
                        promiscuous: f.promiscuous,
                        multicast_entries: f.multicast_entries() as u64,
                    }),
                })
                .collect(),
            workers: self
                .dp
                .workers()
                .iter()
                .map(|w| WorkerMetrics { worker: w.index as u32, busy_ratio: w.busy_ratio, panics: w.panics })
                .collect(),
            vhost: self
                .dp
                .vhost_status()
                .into_iter()
                .map(|v| VhostMetrics {
                    port: v.name,
                    connected: v.connected,
                    connections: v.connections,
                    refused: v.refused,
                    panics: v.panics,
                    logging: v.logging,
                    log_starts: v.log_starts,
                    migrated_out: v.migrated_out,
                    announces: v.announces,
                })
                .collect(),
            fdb: FdbMetrics { entries: self.dp.fdb_len() as u64, capacity: self.dp.fdb_capacity() as u64 },
            queues: QueueMetrics {
                budget: u64::from(self.dp.queue_config().queues),
                in_use,
                nic_queues: nic_queue_metrics(nic),
            },
            build: build_info(),
        }
    }
}

/// One series per (uplink, VM queue): the socket sets of an AF_XDP uplink's interface receive
/// queues are summed (`vmq ctl queues` shows them apart).
fn nic_queue_metrics(queues: Vec<vmq_datapath::QueueStats>) -> Vec<NicQueueMetrics> {
    let mut out: Vec<NicQueueMetrics> = Vec::new();
    for q in queues {
        let queue = q.queue.map_or_else(|| "default".to_string(), |q| q.0.to_string());
        match out.iter_mut().find(|m| m.uplink == q.uplink && m.queue == queue) {
            Some(m) => m.rx_packets += q.rx_packets,
            None => out.push(NicQueueMetrics { uplink: q.uplink, queue, rx_packets: q.rx_packets }),
        }
    }
    out
}

/// This build: the crate version, and the commit when the build set `VMQ_BUILD_COMMIT`.
pub fn build_info() -> BuildInfo {
    BuildInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        commit: option_env!("VMQ_BUILD_COMMIT").filter(|c| !c.is_empty()).map(str::to_string),
    }
}

/// A poisoned lock (a panic elsewhere while holding it) still guards consistent data here:
/// every holder writes whole values.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn info(p: &PortInfo) -> vmq_control::protocol::PortInfo {
    let mut info = port_info(&p.config, if p.up { PortState::Up } else { PortState::Down }, p.caps, p.vhost);
    info.rx_filter = p.rx_filter.as_ref().map(crate::control::rx_filter_view);
    info.driver = p.uplink_driver.map(str::to_string);
    if !p.queue_pairs.is_empty() {
        let view = |q: &vmq_datapath::QueuePairInfo| vmq_control::protocol::QueuePairView {
            rx_frames: q.rx_frames,
            tx_frames: q.tx_frames,
            worker: q.worker,
        };
        info.queue_pairs = Some(p.queue_pairs.iter().map(view).collect());
    }
    info
}

fn no_such_port(name: &str) -> ControlError {
    ControlError::new(ErrorCode::NoSuchPort, format!("no port named {name:?}"))
}

fn datapath_error(e: DatapathError) -> ControlError {
    match e {
        DatapathError::NoSuchPort(name) => no_such_port(&name),
        DatapathError::DuplicatePort(name) => {
            ControlError::new(ErrorCode::PortExists, format!("a port named {name:?} exists already"))
        }
        DatapathError::Unsupported { .. } => ControlError::new(ErrorCode::Unsupported, e.to_string()),
        DatapathError::InvalidMtu { .. }
        | DatapathError::InvalidVlan(_)
        | DatapathError::QueueBudget { .. }
        | DatapathError::BadUplink { .. } => ControlError::invalid_value(e.to_string()),
        // The attachment could not be made (TAP name in use, socket path not writable, ...):
        // the request is refused, the switch runs on unchanged.
        DatapathError::Backend { .. } | DatapathError::NoBackends { .. } => ControlError::invalid_value(e.to_string()),
        _ => ControlError::internal(e.to_string()),
    }
}

impl ControlHandler for DatapathHandler {
    fn handle(&self, request: Request) -> Result<Response, ControlError> {
        match request {
            Request::Show => Ok(Response::Show(self.summary())),
            Request::Ports => Ok(Response::Ports { ports: self.port_infos() }),
            Request::Queues => Ok(Response::Queues(self.queues())),
            Request::Fdb => Ok(Response::Fdb(self.fdb())),
            Request::Stats { port } => Ok(Response::Stats(self.stats(port)?)),
            Request::AddPort(new) => {
                let mut config = port_config(&new, &self.configs())?;
                if let PortBackend::VhostUser { policy, .. } = &mut config.backend {
                    *policy = lock(&self.socket_defaults).clone();
                }
                let name = config.spec.name.clone();
                self.dp.add_port(config).map_err(datapath_error)?;
                let port = self.dp.ports().iter().find(|p| p.config.spec.name == name).map(info);
                let port = port.ok_or_else(|| ControlError::internal("the new port vanished"))?;
                Ok(Response::PortAdded { port: Box::new(port) })
            }
            Request::DelPort { name } => {
                self.dp.remove_port(&name).map_err(datapath_error)?;
                Ok(Response::Done { message: format!("port {name} removed") })
            }
            Request::Set(setting) => Ok(Response::Done { message: self.set(setting)? }),
            Request::Rebalance => Ok(Response::Rebalanced {
                changes: self
                    .dp
                    .rebalance_now()
                    .into_iter()
                    .map(|(port, queue, granted)| QueueChange {
                        port,
                        queue: u32::from(queue.0),
                        action: if granted { QueueAction::Granted } else { QueueAction::Revoked },
                    })
                    .collect(),
            }),
            Request::Save => Ok(Response::Done { message: self.save()? }),
            Request::Workers => Ok(Response::Workers {
                workers: self
                    .dp
                    .workers()
                    .into_iter()
                    .map(|w| WorkerInfo {
                        worker: w.index as u32,
                        busy_ratio: if w.busy_ratio.is_finite() { w.busy_ratio } else { 0.0 },
                        panics: w.panics,
                        frames: w.frames,
                        sleeps: w.sleeps,
                        asleep: w.asleep,
                        tasks: w.tasks,
                    })
                    .collect(),
            }),
        }
    }
}

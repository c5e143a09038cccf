//! The control socket's requests, answered from (and applied to) the running data path; and the
//! snapshot the metrics exporter renders.

use std::sync::Arc;

use vmq_control::ControlHandler;
use vmq_control::metrics::{MetricsSnapshot, PortMetrics, WorkerMetrics};
use vmq_control::protocol::{
    ControlError, ErrorCode, FdbEntry, FdbReport, NicQueue, PortState, QueueAction, QueueAssignment, QueueChange,
    QueuePolicy, QueueReport, Request, Response, Setting, SharedPort, SharedReason, StatsReport, SwitchSummary,
    WorkerInfo,
};
use vmq_core::vmq::QueuePolicy as CorePolicy;
use vmq_core::{PortBackend, PortConfig, SocketPolicy, VlanMode};
use vmq_datapath::{Datapath, DatapathError, NoQueueReason, PortInfo};

use crate::control::{port_config, port_counters, port_info, switch_mode};

/// Longest FDB listing sent in one reply (the table may hold 65 536 entries).
const MAX_FDB_ROWS: usize = 4096;

pub struct DatapathHandler {
    dp: Arc<Datapath>,
    /// `[vhost]` of the configuration: the socket policy of vhost-user ports added at run time.
    socket_defaults: SocketPolicy,
}

impl DatapathHandler {
    pub fn new(dp: Arc<Datapath>) -> DatapathHandler {
        DatapathHandler { dp, socket_defaults: SocketPolicy::default() }
    }

    /// Gives vhost-user ports added with `add-port` this socket policy (`[vhost]`).
    pub fn with_socket_defaults(mut self, policy: SocketPolicy) -> DatapathHandler {
        self.socket_defaults = policy;
        self
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
            queues_in_use: ports.iter().filter(|p| p.queue.is_some()).count() as u32,
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
                Some(q) => assigned.push(QueueAssignment {
                    port: name,
                    queue: u32::from(q.0),
                    worker: p.worker.unwrap_or(0) as u32,
                    rx_pps,
                    rx_bits_per_sec,
                }),
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

    /// The metrics exporter's view: counters, state and queue of every port, worker load.
    pub fn metrics(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            ports: self
                .dp
                .ports()
                .iter()
                .map(|p| PortMetrics {
                    counters: port_counters(&p.config.spec.name, &p.stats),
                    up: p.up,
                    queue_assigned: p.queue.is_some(),
                })
                .collect(),
            workers: self
                .dp
                .workers()
                .iter()
                .map(|w| WorkerMetrics { worker: w.index as u32, busy_ratio: w.busy_ratio, panics: w.panics })
                .collect(),
        }
    }
}

fn info(p: &PortInfo) -> vmq_control::protocol::PortInfo {
    port_info(&p.config, if p.up { PortState::Up } else { PortState::Down }, p.caps)
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
                    *policy = self.socket_defaults.clone();
                }
                let name = config.spec.name.clone();
                self.dp.add_port(config).map_err(datapath_error)?;
                let port = self.dp.ports().iter().find(|p| p.config.spec.name == name).map(info);
                let port = port.ok_or_else(|| ControlError::internal("the new port vanished"))?;
                Ok(Response::PortAdded { port })
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
                        tasks: w.tasks,
                    })
                    .collect(),
            }),
        }
    }
}

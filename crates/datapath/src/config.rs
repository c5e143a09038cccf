//! The data path's configuration and the checks a configuration must pass before any port is
//! attached.

use vmq_core::switch::SwitchConfig;
use vmq_core::vmq::VmqConfig;
use vmq_core::{Mode, PortConfig, PortKind};

use crate::error::DatapathError;

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

impl DatapathConfig {
    /// Checks what can be checked before anything is attached (a worker, unique port names,
    /// uplinks that name uplink ports) and returns the port names in configuration order.
    pub(crate) fn check(&self) -> Result<Vec<String>, DatapathError> {
        if self.workers == 0 {
            return Err(DatapathError::NoWorkers);
        }
        let mut names = Vec::new();
        for p in &self.ports {
            if names.contains(&p.spec.name) {
                return Err(DatapathError::DuplicatePort(p.spec.name.clone()));
            }
            names.push(p.spec.name.clone());
        }
        for p in &self.ports {
            if let Some(u) = &p.uplink
                && !self.ports.iter().any(|q| &q.spec.name == u && q.spec.kind == PortKind::Uplink)
            {
                return Err(DatapathError::BadUplink { port: p.spec.name.clone(), uplink: u.clone() });
            }
        }
        Ok(names)
    }
}

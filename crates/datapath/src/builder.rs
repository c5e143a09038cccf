//! Assembling a data path from a configuration and attachments the caller builds itself (tests,
//! `vmq bench`): ports, NIC queues and steering are collected here; `DatapathBuilder::start`
//! (with the facade, in the crate root) starts the data path with them.

use std::collections::HashMap;

use vmq_core::Mode;
use vmq_core::PortId;
use vmq_core::vmq::QueueId;

use crate::attach::{Attachment, Backends};
use crate::config::DatapathConfig;
use crate::error::DatapathError;
use crate::port::{FrameSink, FrameSource, NicSteering};
use crate::state::ControlState;

/// Where a NIC RX queue's frames go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicQueueTarget {
    /// The queue a NIC filter for this VM port feeds (`vmq` mode).
    Vm(PortId),
    /// The default queue: the software switch.
    Default,
}

/// Assembles a data path from the configuration and attachments the caller provides (tests,
/// `vmq bench`); [`Datapath::start`] does the same with the real backends.
pub struct DatapathBuilder {
    pub(crate) cfg: DatapathConfig,
    pub(crate) attached: HashMap<String, Attachment>,
    pub(crate) names: Vec<String>,
    pub(crate) backends: Option<Box<dyn Backends>>,
}

impl DatapathBuilder {
    pub fn new(cfg: DatapathConfig) -> Result<DatapathBuilder, DatapathError> {
        let names = cfg.check()?;
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

    /// Adds a further TX queue to port `name` (a multiqueue VM's next pair): a task of its own.
    pub fn attach_more_source(&mut self, name: &str, source: Box<dyn FrameSource>) -> Result<(), DatapathError> {
        self.attachment(name)?.more_sources.push(source);
        Ok(())
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

    /// Adds a further RX queue to port `name` (a multiqueue VM's next pair): a lane of its own,
    /// always live.
    pub fn attach_more_sink(&mut self, name: &str, sink: Box<dyn FrameSink>) -> Result<(), DatapathError> {
        self.attachment(name)?.more_sinks.push(sink);
        Ok(())
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
}

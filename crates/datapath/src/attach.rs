//! How ports plug into the data path: a backend ([`Backends`]) turns a port's configuration
//! into an [`Attachment`] (its frame source and sink, NIC queues, steering, run-time
//! [`PortControl`]) and reports the port's state later through a [`PortHandle`].

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vmq_core::vmq::QueueId;
use vmq_core::{Mode, PortConfig, PortId};
use vmq_vhost::server::ConnectionStatus;

use crate::engine::Shared;
use crate::error::{BackendError, DatapathError};
use crate::port::{FrameSink, FrameSource, LiveLanes, NicSteering};

/// Run-time changes a backend applies to its attachment (the kernel side of a TAP, say).
pub trait PortControl: Send {
    /// The port's MTU changed.
    fn set_mtu(&mut self, mtu: u16) -> Result<(), BackendError>;
}

/// How a port is attached: everything the data path needs to move its frames.
pub struct Attachment {
    /// Frames vmq delivers to the port.
    pub sink: Box<dyn FrameSink>,
    /// Frames the port sends into vmq (None for uplinks: they send through NIC queues).
    pub source: Option<Box<dyn FrameSource>>,
    /// Multiqueue VM ports: the TX rings of the further queue pairs, each a task of its own.
    pub more_sources: Vec<Box<dyn FrameSource>>,
    /// Multiqueue VM ports: the RX rings of the further queue pairs, each a sink (lane) of its
    /// own, and which of them are live (see [`crate::port::PortSinks`]).
    pub more_sinks: Vec<Box<dyn FrameSink>>,
    pub live_lanes: Option<Arc<dyn LiveLanes>>,
    /// Multiqueue VM ports: frames written into each pair's RX ring.
    pub queue_counters: Option<Arc<QueueCounters>>,
    /// Uplinks: the NIC's RX queues (the default queue and the VM queues).
    pub nic_queues: Vec<(QueueId, Box<dyn FrameSource>)>,
    /// Uplinks: control of the NIC's VM queue filters.
    pub steering: Option<Box<dyn NicSteering>>,
    /// False for attachments that come up later (a VM that has not connected yet); the backend
    /// then raises the port with [`PortHandle::set_up`].
    pub up: bool,
    pub control: Option<Box<dyn PortControl>>,
    /// vhost-user ports: the connection to the VM (mode, connected, connections made).
    pub vhost: Option<Arc<ConnectionStatus>>,
    /// Whatever must live as long as the port (a socket registration, a namespace).
    pub keepalive: Option<Box<dyn Any + Send>>,
    /// Uplinks configured with `driver = "af_xdp"` or `"auto"`: the driver in use, for
    /// `vmq ctl ports`.
    pub uplink_driver: Option<&'static str>,
}

impl Attachment {
    /// A port with a sink and optionally a source, up at once.
    pub fn new(sink: Box<dyn FrameSink>, source: Option<Box<dyn FrameSource>>) -> Attachment {
        Attachment {
            sink,
            source,
            more_sources: Vec::new(),
            more_sinks: Vec::new(),
            live_lanes: None,
            queue_counters: None,
            nic_queues: Vec::new(),
            steering: None,
            up: true,
            control: None,
            vhost: None,
            keepalive: None,
            uplink_driver: None,
        }
    }
}

/// Lets a backend report its port's state from any thread (a vhost-user VM connecting).
#[derive(Clone)]
pub struct PortHandle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) port: PortId,
    pub(crate) removed: Arc<AtomicBool>,
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

    /// Connection state of the vhost-user sockets these backends serve (none by default).
    fn vhost_status(&self) -> Vec<vmq_vhost::server::PortStatus> {
        Vec::new()
    }
}

/// What [`crate::Datapath::add_port`] hands the attach step: the port's id and handle, reserved.
pub struct PendingAttach {
    pub(crate) config: PortConfig,
    pub(crate) handle: PortHandle,
    pub(crate) nic_queues: u16,
    pub(crate) mode: Mode,
}

impl PendingAttach {
    pub(crate) fn into_context(self) -> AttachContext {
        AttachContext { handle: self.handle, nic_queues: self.nic_queues, mode: self.mode }
    }
}

/// Frames written into each queue pair's RX ring (index = pair), for `vmq ctl ports`.
#[derive(Debug, Default)]
pub struct QueueCounters {
    pub rx_frames: Vec<AtomicU64>,
}

impl QueueCounters {
    pub fn new(pairs: u16) -> Arc<QueueCounters> {
        Arc::new(QueueCounters { rx_frames: (0..pairs).map(|_| AtomicU64::new(0)).collect() })
    }

    pub fn rx(&self) -> Vec<u64> {
        self.rx_frames.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }
}

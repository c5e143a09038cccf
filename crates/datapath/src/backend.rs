//! The backends of this build: how each configured port kind gets attached.

use vmq_core::{PortBackend, PortConfig};
use vmq_vhost::NetDeviceConfig;

use crate::vhost::VhostService;
use crate::{AttachContext, Attachment, Backends, DatapathError};

/// Attaches `mem` ports (an idle in-process virtio-net device each) and vhost-user ports (one
/// protocol thread for all VM sockets, started with the first).
#[derive(Default)]
pub struct DefaultBackends {
    vhost: Option<VhostService>,
}

impl DefaultBackends {
    pub fn new() -> Result<DefaultBackends, DatapathError> {
        Ok(DefaultBackends::default())
    }
}

impl Backends for DefaultBackends {
    fn attach(&mut self, config: &PortConfig, ctx: AttachContext) -> Result<Attachment, DatapathError> {
        let port = config.spec.name.clone();
        match &config.backend {
            PortBackend::Mem => {
                let (_guest, source, sink) = crate::mem::mem_port(config.spec.offloads, false);
                Ok(Attachment::new(Box::new(sink), Some(Box::new(source))))
            }
            PortBackend::VhostUser { socket } => {
                let mac = config.spec.mac.ok_or_else(|| DatapathError::Backend {
                    port: port.clone(),
                    message: "a vhost-user port needs a MAC".into(),
                })?;
                let offloads = config.spec.offloads.accepts_gso() || config.spec.offloads.csum;
                let device = NetDeviceConfig { mac, mtu: config.spec.mtu, offloads };
                if self.vhost.is_none() {
                    self.vhost = Some(VhostService::start()?);
                }
                let service = self.vhost.as_ref().ok_or_else(|| DatapathError::Backend {
                    port: port.clone(),
                    message: "vhost-user service unavailable".into(),
                })?;
                service.attach(&port, socket.clone(), device, ctx.handle)
            }
            PortBackend::Tap { .. } => Err(DatapathError::Unsupported { port, kind: "tap" }),
            PortBackend::Uplink { .. } => Err(DatapathError::Unsupported { port, kind: "uplink" }),
        }
    }
}

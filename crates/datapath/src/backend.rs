//! The backends of this build: how each configured port kind gets attached.

use vmq_core::{PortBackend, PortConfig};

use crate::{AttachContext, Attachment, Backends, DatapathError};

/// Attaches `mem` ports (an idle in-process virtio-net device each).
pub struct DefaultBackends {}

impl DefaultBackends {
    pub fn new() -> Result<DefaultBackends, DatapathError> {
        Ok(DefaultBackends {})
    }
}

impl Backends for DefaultBackends {
    fn attach(&mut self, config: &PortConfig, _ctx: AttachContext) -> Result<Attachment, DatapathError> {
        let port = config.spec.name.clone();
        match &config.backend {
            PortBackend::Mem => {
                let (_guest, source, sink) = crate::mem::mem_port(config.spec.offloads, false);
                Ok(Attachment::new(Box::new(sink), Some(Box::new(source))))
            }
            PortBackend::VhostUser { .. } => Err(DatapathError::Unsupported { port, kind: "vhost-user" }),
            PortBackend::Tap { .. } => Err(DatapathError::Unsupported { port, kind: "tap" }),
            PortBackend::Uplink { .. } => Err(DatapathError::Unsupported { port, kind: "uplink" }),
        }
    }
}

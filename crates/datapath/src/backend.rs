//! The backends of this build: how each configured port kind gets attached.

use vmq_core::vmq::QueueId;
use vmq_core::{Mode, PortBackend, PortConfig, UplinkDriverKind};
use vmq_sys::packet::RingConfig;
use vmq_sys::tap::{Tap, TapConfig};
use vmq_vhost::NetDeviceConfig;

use crate::attach::{AttachContext, Attachment, Backends, PortControl};
use crate::error::{BackendError, DatapathError};
use crate::tap::TapPort;
use crate::uplink::{Uplink, UplinkQueue, UplinkSink};
use crate::vhost::VhostService;

/// Attaches every port kind: `mem` (an idle in-process virtio-net device), vhost-user (one
/// protocol thread for all VM sockets, started with the first), TAP and AF_PACKET uplinks.
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
    fn vhost_status(&self) -> Vec<vmq_vhost::server::PortStatus> {
        self.vhost.as_ref().map(VhostService::status).unwrap_or_default()
    }

    fn attach(&mut self, config: &PortConfig, ctx: AttachContext) -> Result<Attachment, DatapathError> {
        let port = config.spec.name.clone();
        match &config.backend {
            PortBackend::Mem => {
                let (_guest, source, sink) = crate::mem::mem_port(config.spec.offloads, false);
                Ok(Attachment::new(Box::new(sink), Some(Box::new(source))))
            }
            PortBackend::VhostUser { socket, mode, policy, trust_frontend_memory, queues } => {
                let mac = config.spec.mac.ok_or_else(|| DatapathError::Backend {
                    port: port.clone(),
                    source: BackendError::VhostNeedsMac,
                })?;
                let offloads = config.spec.offloads.accepts_gso() || config.spec.offloads.csum;
                // Guest memory must be sealed against shrinking (QEMU's memfd backend default)
                // unless the port trusts its frontend.
                let device = NetDeviceConfig {
                    mac,
                    mtu: config.spec.mtu,
                    offloads,
                    trust_unsealed_memory: *trust_frontend_memory,
                };
                if self.vhost.is_none() {
                    self.vhost = Some(VhostService::start()?);
                }
                let service = self.vhost.as_ref().ok_or_else(|| DatapathError::Backend {
                    port: port.clone(),
                    source: BackendError::VhostServiceUnavailable,
                })?;
                service.attach(&port, socket.clone(), *mode, policy.clone(), device, ctx.handle, *queues)
            }
            PortBackend::Tap { ifname, netns, create_netns } => {
                let cfg = TapConfig {
                    name: ifname.clone(),
                    netns: netns.clone(),
                    create_netns: *create_netns,
                    mac: config.spec.mac.map(|m| m.0),
                    mtu: Some(u32::from(config.spec.mtu)),
                    offloads: config.spec.offloads.accepts_gso(),
                    up: true,
                };
                let tap = Tap::create(&cfg)
                    .map_err(|e| DatapathError::Backend { port: port.clone(), source: BackendError::Tap(e) })?;
                let tap = TapPort::new(tap);
                let mut att = Attachment::new(Box::new(tap.clone()), Some(Box::new(tap.clone())));
                att.control = Some(Box::new(TapControl(tap)));
                Ok(att)
            }
            PortBackend::Uplink { ifname, netns, driver } => {
                let err = |e: vmq_sys::packet::PacketError| DatapathError::Backend {
                    port: port.clone(),
                    source: BackendError::Packet(e),
                };
                raise_mtu(ifname, netns.as_deref(), config.spec.mtu)
                    .map_err(|e| DatapathError::Backend { port: port.clone(), source: BackendError::Link(e) })?;
                let offloads = config.spec.offloads.accepts_gso();
                // In switch mode the NIC gets no VM queues: everything on the default queue.
                let vm_queues = if ctx.mode == Mode::Vmq { ctx.nic_queues } else { 0 };
                if driver.kind != UplinkDriverKind::AfPacket {
                    match crate::afxdp_backend::attach(&port, ifname, netns.as_deref(), vm_queues, config, *driver) {
                        Ok(mut att) => {
                            att.uplink_driver = Some("af_xdp");
                            att.control =
                                Some(Box::new(UplinkControl { ifname: ifname.clone(), netns: netns.clone() }));
                            return Ok(att);
                        }
                        Err(e) if driver.kind == UplinkDriverKind::AfXdp => {
                            return Err(DatapathError::Backend { port: port.clone(), source: BackendError::AfXdp(e) });
                        }
                        Err(e) => {
                            tracing::warn!(port = %port, "driver = \"auto\": AF_XDP unavailable ({e}); using AF_PACKET")
                        }
                    }
                }
                let auto = driver.kind == UplinkDriverKind::Auto;
                tracing::info!(port = %port, ifname = %ifname, "uplink driver: af_packet");
                match Uplink::open(ifname, netns.as_deref(), vm_queues, offloads, RingConfig::default()) {
                    Ok(uplink) => {
                        let mut att = Attachment::new(Box::new(uplink.sink), None);
                        for q in uplink.queues {
                            let id = q.queue();
                            att.nic_queues.push((id, Box::new(q)));
                        }
                        att.steering = Some(Box::new(uplink.steering));
                        att.control = Some(Box::new(UplinkControl { ifname: ifname.clone(), netns: netns.clone() }));
                        att.uplink_driver = auto.then_some("af_packet");
                        Ok(att)
                    }
                    Err(vmq_sys::packet::PacketError::FanoutRefused { .. }) => {
                        tracing::warn!(
                            port = %port,
                            "the kernel refused PACKET_FANOUT: VM queues are sorted in the reader instead of the kernel"
                        );
                        let single =
                            UplinkQueue::open_single(ifname, netns.as_deref(), RingConfig::default()).map_err(err)?;
                        let sink = UplinkSink::open(ifname, netns.as_deref(), offloads).map_err(err)?;
                        let mut att = Attachment::new(Box::new(sink), None);
                        att.nic_queues.push((QueueId::DEFAULT, Box::new(single)));
                        att.control = Some(Box::new(UplinkControl { ifname: ifname.clone(), netns: netns.clone() }));
                        att.uplink_driver = auto.then_some("af_packet");
                        Ok(att)
                    }
                    Err(e) => Err(err(e)),
                }
            }
        }
    }
}

/// Makes an uplink's interface carry frames of the port's MTU: an interface MTU below it is
/// raised (a jumbo port on a 1500-byte interface would pass no jumbo frame, silently); one
/// above it is left alone (the host may need it; vmq enforces the port's MTU itself). An MTU
/// the device refuses is an error.
fn raise_mtu(ifname: &str, netns: Option<&str>, mtu: u16) -> Result<(), vmq_sys::link::LinkError> {
    let link = vmq_sys::link::LinkCtl::new(netns)?;
    if link.mtu(ifname)? < u32::from(mtu) {
        link.set_mtu(ifname, u32::from(mtu))?;
        tracing::info!(ifname, mtu, "uplink MTU raised to the port's");
    }
    Ok(())
}

/// Run-time changes to an uplink: its interface's MTU follows the port's upward.
struct UplinkControl {
    ifname: String,
    netns: Option<String>,
}

impl PortControl for UplinkControl {
    fn set_mtu(&mut self, mtu: u16) -> Result<(), BackendError> {
        raise_mtu(&self.ifname, self.netns.as_deref(), mtu).map_err(BackendError::Link)
    }
}

/// Run-time changes to a TAP: its MTU is the kernel interface's too.
struct TapControl(TapPort);

impl PortControl for TapControl {
    fn set_mtu(&mut self, mtu: u16) -> Result<(), BackendError> {
        let tap = self.0.tap();
        tap.link().and_then(|l| l.set_mtu(tap.name(), u32::from(mtu))).map_err(BackendError::Link)
    }
}

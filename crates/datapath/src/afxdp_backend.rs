//! Attaching an uplink port with the AF_XDP driver (see [`crate::afxdp`]).

use vmq_core::{PortConfig, UplinkDriver, XdpAttachMode, ZeroCopyMode};
use vmq_sys::xdp::XdpMode;
use vmq_sys::xsk::ZeroCopy;

use crate::afxdp::{AfXdpError, AfXdpOptions, AfXdpUplink};
use crate::attach::Attachment;

/// Opens `ifname` as an AF_XDP uplink with `vm_queues` VM queues and wraps it as an attachment
/// (its `control` is left to the caller).
pub(crate) fn attach(
    port: &str,
    ifname: &str,
    netns: Option<&str>,
    vm_queues: u16,
    config: &PortConfig,
    driver: UplinkDriver,
) -> Result<Attachment, AfXdpError> {
    let opts = AfXdpOptions {
        mode: match driver.xdp_mode {
            XdpAttachMode::Native => XdpMode::Native,
            XdpAttachMode::Generic => XdpMode::Generic,
        },
        zero_copy: match driver.zero_copy {
            ZeroCopyMode::Auto => ZeroCopy::Auto,
            ZeroCopyMode::On => ZeroCopy::On,
            ZeroCopyMode::Off => ZeroCopy::Off,
        },
        rx_queues: driver.xdp_queues.ids(),
    };
    let uplink = AfXdpUplink::open(ifname, netns, vm_queues, config.spec.mtu, opts)?;
    tracing::info!(
        port,
        ifname,
        xdp_mode = driver.xdp_mode.name(),
        zero_copy = uplink.zero_copy,
        multi_buffer = uplink.multi_buffer,
        rx_queues = ?uplink.rx_queues,
        vm_queues,
        "uplink driver: af_xdp"
    );
    let mut att = Attachment::new(Box::new(uplink.sink), None);
    for q in uplink.queues {
        let id = q.queue();
        att.nic_queues.push((id, Box::new(q)));
    }
    att.steering = Some(Box::new(uplink.steering));
    Ok(att)
}

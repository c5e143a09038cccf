//! vhost-user-net ports: the protocol side (what QEMU or cloud-hypervisor talk to over the
//! port's Unix socket) and the device state shared with the data-path worker that serves the
//! guest's rings. One control thread serves every VM socket; workers never see protocol
//! messages, and no thread is created per VM.
#![forbid(unsafe_code)]

pub mod backend;
pub mod device;
pub mod server;

pub use backend::{DeviceEvent, NetBackend, NetDeviceConfig};
pub use device::{GuestMem, NetDevice, RX_QUEUE, TX_QUEUE, Vring};

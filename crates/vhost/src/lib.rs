//! vhost-user-net ports: the protocol side (what QEMU or cloud-hypervisor talk to over the
//! port's Unix socket) and the device state shared with the data-path worker that serves the
//! guest's rings. One control thread serves every VM socket; workers never see protocol
//! messages, and no thread is created per VM.
//!
//! # Serving a device from a data-path worker
//!
//! - **When**: the `on_event` callback given to [`server::VhostUserServer::add_port`] gets
//!   [`DeviceEvent::Started`] once both rings are live (memory table, size, addresses, base,
//!   kick fd and SET_VRING_ENABLE(1) for each), and [`DeviceEvent::Stopped`] when any of that
//!   goes away (GET_VRING_BASE, a ring no longer inside a new memory table, a new kick fd, a
//!   reset, a disconnect). The callback runs on the control thread with the port's protocol
//!   state locked: hand the event over (channel, eventfd), never block or call back into the
//!   server. Events can follow each other quickly (Stopped, Started on a new kick fd): compare
//!   [`NetDevice::generation`] with the one seen at attach before trusting cached state.
//! - **Per batch**: take a memory snapshot (`device.mem.memory()`; a new memory table can
//!   arrive while rings run, the snapshot keeps the old mapping alive until dropped), lock the
//!   ring (`device.vring(RX_QUEUE)`), check [`Vring::is_live`], and work on `ring.queue` in
//!   place, under the lock. Never copy the `Queue` out: GET_VRING_BASE reads the ring position
//!   from it (and the used index from guest memory) to hand the ring back to the VMM (a live
//!   migration or guest reboot depends on it).
//! - **Kicks**: `ring.kick` is an eventfd (checked), already non-blocking. Register a duplicate
//!   (`try_clone`) with the worker's epoll at attach and drop it at Stopped; read 8 bytes to
//!   clear it (EAGAIN means no kick). Process the TX ring once at attach without waiting for a
//!   kick: the guest may have queued frames before the device started.
//! - **Interrupts**: signal with [`Vring::signal_guest`] under the ring lock, never with a cached
//!   call fd: QEMU replaces the call fd of running rings (interrupt masking), and the final call
//!   fd of a starting device arrives only after `Started`. EVENT_IDX is normally negotiated: ask
//!   `queue.needs_notification(mem)` before signalling.
//! - **Reconnects**: the VM may go away at any time (kill -9, reboot of QEMU). The device then
//!   gets `Stopped`, its rings are replaced by fresh ones and its memory by an empty map; the
//!   next QEMU connects to the same socket (server mode) or is connected to by the server
//!   (client mode: it retries with backoff) and the same [`NetDevice`] starts again. When vmq
//!   itself restarts, QEMU resumes each ring at the used index in guest memory (SET_VRING_BASE):
//!   the used index a worker publishes must always count a prefix of the avail ring.
//! - **MTU**: the port MTU is the limit. QEMU 7.2 tells the guest an MTU only with
//!   `host_mtu=N` on `-device virtio-net-pci` and then asks vmq (NET_SET_MTU): up to the port MTU
//!   vmq accepts and records it ([`NetDevice::frontend_mtu`]); above, QEMU leaves the device
//!   stopped ("NBytes MTU not supported by the backend").
//! - **Live migration**: while QEMU logs dirty pages, [`Vring::dirty_log`] is set (under the
//!   ring lock, like everything else): mark every guest page written for the ring, after the
//!   write and before the lock is released ([`migration::DirtyLog::mark`]). GET_VRING_BASE
//!   takes the lock to stop the ring, so a batch that holds it finishes (and logs) first; after
//!   it, `is_live` is false and nothing may be written. A SEND_RARP announce is handed to the TX
//!   source through [`NetDevice::migration`] (see `migration.rs`).
//! - **Features**: [`NetDevice::acked_features`] is what the frontend acked. QEMU handles
//!   VIRTIO_NET_F_MAC and F_STATUS itself and never acks them to a vhost-user backend; the
//!   offload bits (CSUM, GUEST_CSUM, HOST/GUEST_TSO4/6, ECN) and MRG_RXBUF are passed on.
#![forbid(unsafe_code)]

pub mod backend;
pub mod device;
pub mod limits;
pub mod migration;
pub mod mq;
pub mod packed;
pub mod server;

pub use backend::{DeviceEvent, NetBackend, NetDeviceConfig};
pub use device::{GuestMem, MAX_QUEUE_PAIRS, NetDevice, RX_QUEUE, TX_QUEUE, Vring};
pub use migration::{DirtyLog, MigrationStatus};

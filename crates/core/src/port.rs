//! What the core knows about a port: identity, addressing, VLAN mode, MTU and offload abilities.

use vmq_wire::MacAddr;
use vmq_wire::ethernet::HEADER_LEN;
use vmq_wire::vlan::TAG_LEN;

/// Dense port index, stable for the life of the port. Index into per-port tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u16);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortKind {
    VhostUser,
    Tap,
    Uplink,
    /// In-process virtio-net device (tests and `vmq bench`).
    Mem,
}

impl PortKind {
    /// A VM-facing port: subject to the MAC spoof guard and a VMQ consumer.
    pub fn is_vm(self) -> bool {
        matches!(self, PortKind::VhostUser | PortKind::Mem)
    }
}

/// 802.1Q handling of a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VlanMode {
    /// Untagged on the port, member of one VLAN: tags are added on ingress, stripped on egress.
    /// VLAN 0 means "no VLAN" (the untagged domain).
    Access(u16),
    /// Tagged on the port; only the listed VLANs pass. Untagged frames belong to `native`, if any.
    Trunk { allowed: Vec<u16>, native: Option<u16> },
}

impl Default for VlanMode {
    fn default() -> Self {
        VlanMode::Access(0)
    }
}

pub use vmq_offload::OffloadCaps;

/// Largest MTU vmq supports (jumbo frames). Ethernet frame = MTU + 14 (+ 4 with a VLAN tag).
pub const MAX_MTU: u16 = 9000;
pub const MIN_MTU: u16 = 68;

/// Configured properties of a port, as the core sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub name: String,
    pub kind: PortKind,
    /// The port's own MAC (VM ports: the guest's MAC; enforced by the spoof guard).
    pub mac: Option<MacAddr>,
    pub mtu: u16,
    pub vlan: VlanMode,
    pub allow_mac_spoofing: bool,
    /// Most addresses the switch learns on this port (MAC-flood protection; beyond it, frames
    /// from new sources still pass but their addresses are not learned, counted as `fdb_limit`).
    pub max_learned_macs: u32,
    /// What the guest of a VM port may program itself (its MAC).
    pub guest: GuestPolicy,
    /// Offloads the port may use, before negotiation narrows them.
    pub offloads: OffloadCaps,
}

impl PortSpec {
    /// Largest Ethernet frame (without virtio-net header) this port accepts or sends, as seen
    /// on the port itself: MTU + Ethernet header, + a VLAN tag on trunk ports.
    pub fn max_frame_len(&self) -> usize {
        let tag = match self.vlan {
            VlanMode::Trunk { .. } => TAG_LEN,
            VlanMode::Access(_) => 0,
        };
        self.mtu as usize + HEADER_LEN + tag
    }
}

/// Most queue pairs a vhost-user port may have (`queues`; VIRTIO_NET_F_MQ).
pub const MAX_VHOST_QUEUE_PAIRS: u16 = 16;

/// How a port is attached; what the data path needs besides [`PortSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortBackend {
    /// vhost-user-net server socket (the VM connects to it), and who may use it.
    /// `trust_frontend_memory`: accept guest memory the frontend could shrink under vmq (not
    /// sealed with F_SEAL_SHRINK, e.g. DPDK virtio-user's hugepage files); such a frontend can
    /// crash vmq, so only for frontends as trusted as vmq itself.
    /// `mode`: who listens on `socket` (vmq, or the VM's QEMU).
    /// `queues`: queue pairs offered to the guest (1..=16; more than one offers
    /// VIRTIO_NET_F_MQ; QEMU's `-netdev vhost-user,queues=N` must not ask for more).
    VhostUser {
        socket: std::path::PathBuf,
        mode: VhostMode,
        policy: SocketPolicy,
        trust_frontend_memory: bool,
        queues: u16,
    },
    /// A TAP interface vmq creates, optionally inside a network namespace (created if asked).
    Tap { ifname: String, netns: Option<String>, create_netns: bool },
    /// A host interface (in `netns`, if given) used through AF_PACKET or AF_XDP (`driver`).
    Uplink { ifname: String, netns: Option<String>, driver: UplinkDriver },
    /// In-process virtio-net device (tests, bench).
    Mem,
}

/// Which kernel interface an uplink uses, and its AF_XDP settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct UplinkDriver {
    pub kind: UplinkDriverKind,
    /// Where the XDP program is attached (AF_XDP only).
    pub xdp_mode: XdpAttachMode,
    pub zero_copy: ZeroCopyMode,
    /// The interface's receive queues AF_XDP takes over (AF_XDP only).
    pub xdp_queues: XdpQueues,
}

/// `xdp_queues = [0, 1, ...]`: the receive queues of the interface whose frames the XDP program
/// sorts into vmq's sockets; frames arriving on the others stay with the kernel (the operator
/// steers VM traffic to vmq's queues with the NIC's flow rules or RSS table, as with OVS's
/// `n_rxq` or VPP's `af_xdp` queue options). The default is every queue. A set, as a bitmask:
/// queue ids up to [`XdpQueues::MAX_ID`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct XdpQueues(u64);

impl XdpQueues {
    /// Highest queue id a set can hold.
    pub const MAX_ID: u16 = 63;

    /// Every receive queue the interface has.
    pub fn all() -> XdpQueues {
        XdpQueues(0)
    }

    /// Exactly `ids`; `None` if empty, or an id is above [`Self::MAX_ID`] or repeated.
    pub fn only(ids: &[u16]) -> Option<XdpQueues> {
        let mut mask = 0u64;
        for &id in ids {
            if id > Self::MAX_ID || mask & (1 << id) != 0 {
                return None;
            }
            mask |= 1 << id;
        }
        (mask != 0).then_some(XdpQueues(mask))
    }

    pub fn is_all(self) -> bool {
        self.0 == 0
    }

    /// The chosen ids in ascending order; `None` for every queue.
    pub fn ids(self) -> Option<Vec<u16>> {
        (!self.is_all()).then(|| (0..=Self::MAX_ID).filter(|&q| self.0 & (1 << q) != 0).collect())
    }
}

/// `driver = "af_packet" | "af_xdp" | "auto"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum UplinkDriverKind {
    /// Packet sockets in a fanout group, steered by a classic-BPF program.
    #[default]
    AfPacket,
    /// AF_XDP sockets, steered by an XDP program; an error if it cannot be opened.
    AfXdp,
    /// AF_XDP where it opens (and the MTU fits), else AF_PACKET; the log says which.
    Auto,
}

impl UplinkDriverKind {
    pub fn name(self) -> &'static str {
        match self {
            UplinkDriverKind::AfPacket => "af_packet",
            UplinkDriverKind::AfXdp => "af_xdp",
            UplinkDriverKind::Auto => "auto",
        }
    }
}

/// `xdp_mode = "native" | "generic"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum XdpAttachMode {
    /// In the driver.
    #[default]
    Native,
    /// On the skb after the driver (any interface).
    Generic,
}

impl XdpAttachMode {
    pub fn name(self) -> &'static str {
        match self {
            XdpAttachMode::Native => "native",
            XdpAttachMode::Generic => "generic",
        }
    }
}

/// `zero_copy = "auto" | "on" | "off"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ZeroCopyMode {
    #[default]
    Auto,
    On,
    Off,
}

impl ZeroCopyMode {
    pub fn name(self) -> &'static str {
        match self {
            ZeroCopyMode::Auto => "auto",
            ZeroCopyMode::On => "on",
            ZeroCopyMode::Off => "off",
        }
    }
}

/// Which side of a vhost-user socket listens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum VhostMode {
    /// vmq listens; the VM's QEMU connects (`-chardev socket,path=...`, with `reconnect=N` to
    /// come back after a vmq restart).
    #[default]
    Server,
    /// The VM's QEMU listens (`-chardev socket,path=...,server=on,wait=off`); vmq connects and
    /// reconnects with backoff whenever the connection drops (OVS's `dpdkvhostuserclient`).
    Client,
}

impl VhostMode {
    pub fn name(self) -> &'static str {
        match self {
            VhostMode::Server => "server",
            VhostMode::Client => "client",
        }
    }
}

/// Who may use a vhost-user socket, and how long a connection may take to start the protocol.
/// `None` fields take the server's defaults (owner and group: vmq's; mode 0660; any peer that
/// can open the file; 30 s).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketPolicy {
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub mode: Option<u32>,
    /// Peer uids (`SO_PEERCRED`) allowed to connect; `None`: anyone the file mode lets in.
    pub allowed_uids: Option<Vec<u32>>,
    /// A connection that has not sent SET_OWNER after this long is closed.
    pub setup_timeout: Option<std::time::Duration>,
}

/// A port as configured: the core's view plus the attachment. `uplink` names the uplink port
/// a VM port's VMQ filter lives on (None: the first uplink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    pub spec: PortSpec,
    pub backend: PortBackend,
    pub uplink: Option<String>,
}

/// Data-path mode: `Vmq` (per-VM queues bypass the switch) or `Switch` (the baseline: every
/// frame through the default queue and the software switch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    #[default]
    Vmq,
    Switch,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Vmq => "vmq",
            Mode::Switch => "switch",
        }
    }
}

/// What a guest may change on its port (its MAC, promiscuous mode). Off by default: a guest sends only from the MAC the
/// operator gave it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct GuestPolicy {
    /// The guest may move its port to another unicast MAC; the static FDB entry and the VM
    /// queue filter follow it.
    pub allow_mac_change: bool,
    /// The guest may switch its port to promiscuous (or all-unicast) mode: it then also gets
    /// the unknown unicast the switch floods. Refused, it is counted (`promiscuous_refused`).
    pub allow_promiscuous: bool,
}

//! The control protocol: JSON lines over a Unix stream socket. The client writes one request
//! object per line, the server answers each with one response object on one line, in order.
//! `docs/control.md` is the reference; the types here are its source of truth.
//!
//! Requests are tagged by `"command"`, responses by `"type"`; every response line is an envelope
//! `{"ok":true,"result":{..}}` or `{"ok":false,"error":{"code":"..","message":".."}}`.
//! Unknown fields are rejected (a typo must not be silently ignored on a switch).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Largest request line the server reads (newline included); longer → `too_large`, connection
/// closed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Largest response line the client accepts. Responses are bounded by the switch's tables (an
/// FDB of 65536 entries is about 6 MiB of JSON); the limit only stops a runaway peer.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Every command name the server knows, as spelled on the wire.
pub const COMMANDS: [&str; 11] =
    ["show", "ports", "queues", "fdb", "stats", "add-port", "del-port", "set", "rebalance", "workers", "save"];

/// Commands without fields.
const UNIT_COMMANDS: [&str; 7] = ["show", "ports", "queues", "fdb", "rebalance", "workers", "save"];

/// One request line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Switch summary and every port.
    Show,
    /// Every port.
    Ports,
    /// VM queue assignment: who has a queue, who shares the default queue and why.
    Queues,
    /// The MAC table.
    Fdb,
    /// Counters of one port (`port` given) or of every port.
    Stats {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<String>,
    },
    /// Add a port at run time; the fields are those of a configuration file's `[[port]]`.
    AddPort(NewPort),
    /// Remove a port at run time.
    DelPort { name: String },
    /// Change a setting at run time.
    Set(Setting),
    /// Run the VM queue rebalancer now instead of at its next interval.
    Rebalance,
    /// Per-worker load and tasks.
    Workers,
    /// Write the running configuration (ports, VM queue budget and policy) back to the file
    /// vmq was started with, keeping its comments and layout; answered with `done`.
    Save,
}

impl Request {
    /// The wire name of the command (`"add-port"`, ...).
    pub fn command(&self) -> &'static str {
        match self {
            Request::Show => "show",
            Request::Ports => "ports",
            Request::Queues => "queues",
            Request::Fdb => "fdb",
            Request::Stats { .. } => "stats",
            Request::AddPort(_) => "add-port",
            Request::DelPort { .. } => "del-port",
            Request::Set(_) => "set",
            Request::Rebalance => "rebalance",
            Request::Workers => "workers",
            Request::Save => "save",
        }
    }

    /// Parses one request line. Distinguishes a line that is not a request object
    /// (`bad_request`) from a well-formed request for a command the server does not know
    /// (`unknown_command`) and from a known command with bad fields (`bad_request`).
    pub fn from_line(line: &[u8]) -> Result<Request, ControlError> {
        let value: serde_json::Value = serde_json::from_slice(line)
            .map_err(|e| ControlError::new(ErrorCode::BadRequest, format!("not valid JSON: {e}")))?;
        let command = match value.as_object().map(|o| o.get("command")) {
            None => return Err(ControlError::new(ErrorCode::BadRequest, "a request is a JSON object")),
            Some(None) => return Err(ControlError::new(ErrorCode::BadRequest, "the request has no \"command\" field")),
            Some(Some(serde_json::Value::String(c))) => c.clone(),
            Some(Some(_)) => return Err(ControlError::new(ErrorCode::BadRequest, "\"command\" must be a string")),
        };
        if !COMMANDS.contains(&command.as_str()) {
            let shown: String = command.chars().take(64).collect();
            return Err(ControlError::new(
                ErrorCode::UnknownCommand,
                format!("unknown command {shown:?}; known: {}", COMMANDS.join(", ")),
            ));
        }
        // serde ignores extra fields next to the tag of a unit variant; reject them here so
        // that `{"command":"show","port":"vm1"}` is not silently a full `show`.
        if let Some(extra) = value.as_object().and_then(|o| o.keys().find(|k| *k != "command"))
            && UNIT_COMMANDS.contains(&command.as_str())
        {
            let shown: String = extra.chars().take(64).collect();
            return Err(ControlError::new(
                ErrorCode::BadRequest,
                format!("bad {command:?} request: it takes no fields, got {shown:?}"),
            ));
        }
        serde_json::from_value(value)
            .map_err(|e| ControlError::new(ErrorCode::BadRequest, format!("bad {command:?} request: {e}")))
    }

    /// The request as one line, newline included.
    pub fn to_line(&self) -> String {
        // Serialising these plain types cannot fail (no maps with non-string keys, no floats).
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }
}

/// A port to add: the fields of a configuration file's `[[port]]`, with the same defaults and
/// the same checks (the switch validates them; out-of-range values are `invalid_value`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPort {
    pub name: String,
    pub kind: PortKind,
    /// vhost-user: the socket vmq listens on for the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// tap/uplink: the interface name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// tap: the network namespace the TAP is moved into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Access VLAN (0 = untagged); exclusive with `trunk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trunk: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native_vlan: Option<u32>,
    /// VM ports: the uplink port whose NIC filters carry this VM's queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_mac_spoofing: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offloads: Option<bool>,
    /// TAP ports: create `netns` if it does not exist (and delete it with the port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_netns: Option<bool>,
    /// vhost-user ports: queue pairs offered to the VM (the port's `queues` key, 1..=16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u32>,
}

/// What `set` changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "setting", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Setting {
    /// The VM queue budget.
    Queues { queues: u32 },
    /// The VM queue policy.
    Policy { policy: QueuePolicy },
    /// A port's MTU.
    PortMtu { port: String, mtu: u32 },
    /// A port's access VLAN (0 = untagged).
    PortVlan { port: String, vlan: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortKind {
    #[default]
    VhostUser,
    Tap,
    Uplink,
    Mem,
}

impl PortKind {
    pub fn name(self) -> &'static str {
        match self {
            PortKind::VhostUser => "vhost-user",
            PortKind::Tap => "tap",
            PortKind::Uplink => "uplink",
            PortKind::Mem => "mem",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SwitchMode {
    Vmq,
    Switch,
}

impl SwitchMode {
    pub fn name(self) -> &'static str {
        match self {
            SwitchMode::Vmq => "vmq",
            SwitchMode::Switch => "switch",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueuePolicy {
    /// First come, first served.
    Static,
    /// The busiest VMs hold the queues.
    Dynamic,
}

impl QueuePolicy {
    pub fn name(self) -> &'static str {
        match self {
            QueuePolicy::Static => "static",
            QueuePolicy::Dynamic => "dynamic",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortState {
    /// Passing traffic (VM connected and driver ready, TAP/uplink open).
    Up,
    /// Configured but not passing traffic (no VM connected, interface gone).
    Down,
}

impl PortState {
    pub fn name(self) -> &'static str {
        match self {
            PortState::Up => "up",
            PortState::Down => "down",
        }
    }
}

/// 802.1Q mode of a port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum VlanInfo {
    /// Untagged on the port, member of `vlan` (0: the untagged domain).
    Access { vlan: u16 },
    /// Tagged; `allowed` pass; untagged frames belong to `native`, if any.
    Trunk {
        allowed: Vec<u16>,
        #[serde(default)]
        native: Option<u16>,
    },
}

/// Offloads in effect on a port (after negotiation with the VM / TAP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffloadInfo {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub ecn: bool,
}

/// One port as `show`/`ports` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortInfo {
    pub name: String,
    pub kind: PortKind,
    pub state: PortState,
    pub mac: Option<String>,
    pub mtu: u16,
    pub vlan: VlanInfo,
    pub offloads: OffloadInfo,
    pub allow_mac_spoofing: bool,
    /// VM ports: the uplink carrying its queue filter.
    #[serde(default)]
    pub uplink: Option<String>,
    /// vhost-user socket path.
    #[serde(default)]
    pub socket: Option<String>,
    /// tap/uplink interface.
    #[serde(default)]
    pub ifname: Option<String>,
    #[serde(default)]
    pub netns: Option<String>,
    /// vhost-user ports: the connection to the VM (absent for other kinds, and from vmq
    /// versions before client mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost: Option<VhostInfo>,
    /// VM ports whose guest's receive filter is relayed (QMP): the filter vmq applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_filter: Option<RxFilterView>,
    /// Uplinks configured with `driver = "af_xdp"` or `"auto"`: the driver in use (`af_xdp`,
    /// `af_packet`); absent for plain AF_PACKET uplinks and other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Multiqueue vhost-user ports (`queues` > 1): each queue pair, in order; absent otherwise.
    /// (Boxed: `Response::PortAdded` carries a whole `PortInfo`.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_pairs: Option<Box<[QueuePairView]>>,
}

/// One queue pair of a multiqueue VM port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuePairView {
    /// Frames vmq wrote into the pair's RX ring (flows spread by their 5-tuple hash).
    pub rx_frames: u64,
    /// Frames vmq took from the pair's TX ring.
    pub tx_frames: u64,
    /// The worker serving the pair's TX ring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<usize>,
}

/// A VM port's guest receive filter as vmq applies it (the guest's request narrowed by policy).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RxFilterView {
    /// The guest gets unknown unicast to other MACs too.
    pub promiscuous: bool,
    /// The guest asks for promiscuous mode and `allow_promiscuous` refuses it.
    pub promiscuous_refused: bool,
    /// `normal` (the table), `none` or `all`.
    pub multicast: String,
    /// Multicast addresses the guest listens to.
    pub multicast_entries: u32,
    /// Extra unicast addresses the guest listens to (its unicast table).
    pub unicast_entries: u32,
    /// Tagged frames pass only with these VLAN ids (absent: every VLAN of the port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlans: Option<Vec<u16>>,
}

/// Which side of a vhost-user socket listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VhostModeInfo {
    /// vmq listens, the VM's QEMU connects.
    Server,
    /// The VM's QEMU listens, vmq connects (and reconnects).
    Client,
}

impl VhostModeInfo {
    pub fn name(self) -> &'static str {
        match self {
            VhostModeInfo::Server => "server",
            VhostModeInfo::Client => "client",
        }
    }
}

/// A vhost-user port's connection to its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostInfo {
    pub mode: VhostModeInfo,
    /// A frontend is connected (its device may not run yet: see the port's `state`).
    pub connected: bool,
    /// Connections made since the port was added; every one after the first is a reconnect
    /// (a VM or vmq restart).
    pub connections: u64,
    /// Live migration (absent from vmq versions before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationInfo>,
}

/// A vhost-user port's live-migration state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationInfo {
    /// QEMU has dirty logging on: the VM is being migrated away from this vmq now.
    pub logging: bool,
    /// Times logging was switched on (migrations away begun).
    pub log_starts: u64,
    /// Times the VM's rings were handed over while logging (migrations away completed or
    /// stopped for good).
    pub migrated_out: u64,
    /// RARP announces injected after the VM arrived here (SEND_RARP).
    pub announces: u64,
}

/// `show`: the switch and its ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSummary {
    pub mode: SwitchMode,
    pub workers: u32,
    /// VM queues the switch may hand out.
    pub queue_budget: u32,
    /// VM queues handed out now.
    pub queues_in_use: u32,
    pub policy: QueuePolicy,
    pub ports: Vec<PortInfo>,
}

/// A VM port holding a VM queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueAssignment {
    pub port: String,
    pub queue: u32,
    /// The worker thread serving the queue.
    pub worker: u32,
    /// Measured receive rate over the last rebalance interval.
    pub rx_pps: u64,
    pub rx_bits_per_sec: u64,
}

/// Why a port has no VM queue of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedReason {
    /// Every queue of the budget is held by a (busier, or earlier) VM.
    BudgetExhausted,
    /// `mode = "switch"`: VMQ is off, everything goes through the switch.
    SwitchMode,
    /// Uplink ports get no queue (they are what queues are made of).
    NotVmPort,
    /// A queue filters on the port's MAC; this port has none.
    NoMac,
}

impl SharedReason {
    pub fn name(self) -> &'static str {
        match self {
            SharedReason::BudgetExhausted => "budget_exhausted",
            SharedReason::SwitchMode => "switch_mode",
            SharedReason::NotVmPort => "not_vm_port",
            SharedReason::NoMac => "no_mac",
        }
    }
}

/// A port served through the default queue and the software switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedPort {
    pub port: String,
    pub reason: SharedReason,
    pub rx_pps: u64,
    pub rx_bits_per_sec: u64,
}

/// `queues`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueReport {
    pub mode: SwitchMode,
    pub policy: QueuePolicy,
    pub budget: u32,
    pub assigned: Vec<QueueAssignment>,
    pub shared: Vec<SharedPort>,
    /// Frames read from each receive queue of each uplink: what the in-kernel steering did.
    /// Absent in replies of older vmq versions.
    #[serde(default)]
    pub nic_queues: Vec<NicQueue>,
}

/// One receive queue of an uplink and the frames taken from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicQueue {
    pub uplink: String,
    /// 0: the default queue (the software switch); k: VM queue k.
    pub queue: u32,
    /// The port VM queue `queue` feeds now; `null` for the default queue or a VM queue no port
    /// holds.
    pub port: Option<String>,
    /// The interface receive queue, where the uplink has a socket set per queue (AF_XDP);
    /// absent where one queue spans the interface (AF_PACKET).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_queue: Option<u32>,
    /// Frames read from the queue since the uplink was added.
    pub rx_packets: u64,
}

/// One MAC table entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FdbEntry {
    pub mac: String,
    pub vlan: u16,
    pub port: String,
    /// Seconds since the entry was last refreshed; `null` for a static entry (a VM port's own
    /// MAC), which never ages out.
    pub age_secs: Option<u64>,
}

/// `fdb`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FdbReport {
    pub entries: Vec<FdbEntry>,
    /// Entries in the table (may exceed `entries.len()` if the switch capped the listing).
    pub total: u64,
    pub capacity: u64,
}

/// Offload work done toward a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffloadCounters {
    /// Segments made by software segmentation.
    pub segments: u64,
    /// Partial checksums finished in software.
    pub csum_finished: u64,
    /// Segments absorbed by receive coalescing.
    pub coalesced: u64,
    /// GSO frames delivered as they were.
    pub gso_passed: u64,
}

/// Counters of one port.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortCounters {
    pub port: String,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Drops by reason (`oversize`, `spoofed`, `vlan`, ...); every reason the switch knows is
    /// listed, zeros included.
    pub drops: BTreeMap<String, u64>,
    pub offload: OffloadCounters,
    /// FDB learning refused because the table was full.
    pub fdb_full: u64,
    /// Frames the kernel dropped before vmq read them (uplinks: a full AF_PACKET ring). Not in
    /// `rx_packets` nor in `drops`.
    #[serde(default)]
    pub kernel_drops: u64,
    /// AF_PACKET ring blocks skipped as corrupt (uplinks).
    #[serde(default)]
    pub corrupt_blocks: u64,
    /// Addresses that moved to this port from another.
    pub fdb_moves: u64,
    /// FDB learning refused because the port reached its `max_learned_macs`.
    pub fdb_limit: u64,
    /// MAC changes the guest asked for and the port's policy refused (`allow_mac_change`).
    #[serde(default)]
    pub mac_change_refused: u64,
    /// Promiscuous mode the guest asked for and the port's policy refused (`allow_promiscuous`).
    #[serde(default)]
    pub promiscuous_refused: u64,
    /// QMP relay errors (unusable messages from QEMU, refused queries, connections lost).
    #[serde(default)]
    pub qmp_errors: u64,
}

impl PortCounters {
    pub fn total_drops(&self) -> u64 {
        self.drops.values().fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// `stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsReport {
    /// The switch's monotonic clock when the counters were read: rates are counter deltas over
    /// deltas of this clock, not of the client's.
    pub uptime_ns: u64,
    pub ports: Vec<PortCounters>,
}

/// One queue change made by `rebalance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueChange {
    pub port: String,
    pub queue: u32,
    pub action: QueueAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueAction {
    Granted,
    Revoked,
}

/// One data-path worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerInfo {
    pub worker: u32,
    /// Share of the last interval spent doing work, 0.0 to 1.0.
    pub busy_ratio: f64,
    /// Panics caught in the worker (each followed by a restart).
    pub panics: u64,
    /// Frames the worker handled since it started.
    #[serde(default)]
    pub frames: u64,
    /// Times it ran out of work and went to sleep.
    #[serde(default)]
    pub sleeps: u64,
    /// Waiting for a wake-up right now. An idle worker sleeps without a timeout, so its
    /// counters stand still: a worker is stalled only if `frames + sleeps` stand still while it
    /// is not asleep.
    #[serde(default)]
    pub asleep: bool,
    /// What the worker serves ("vm1 tx", "up0 queue 3", ...).
    pub tasks: Vec<String>,
}

/// A successful answer. The variant a request gets is fixed (see `docs/control.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Response {
    Show(SwitchSummary),
    Ports {
        ports: Vec<PortInfo>,
    },
    Queues(QueueReport),
    Fdb(FdbReport),
    Stats(StatsReport),
    PortAdded {
        port: Box<PortInfo>,
    },
    /// `del-port` and `set`: what was done, in words.
    Done {
        message: String,
    },
    Rebalanced {
        changes: Vec<QueueChange>,
    },
    Workers {
        workers: Vec<WorkerInfo>,
    },
}

impl Response {
    /// Whether a float in the response is NaN or infinite (JSON cannot carry it).
    fn has_non_finite(&self) -> bool {
        match self {
            Response::Workers { workers } => workers.iter().any(|w| !w.busy_ratio.is_finite()),
            _ => false,
        }
    }
}

/// Stable error codes: scripts may match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, missing/ill-typed fields, unknown fields.
    BadRequest,
    UnknownCommand,
    NoSuchPort,
    /// `add-port` with a name already in use.
    PortExists,
    /// A field has the right type but a value the switch refuses (MTU 9001, VLAN 4095, bad MAC).
    InvalidValue,
    /// The switch cannot do this (now, or in this mode).
    Unsupported,
    /// Request longer than the limit; the connection is closed.
    TooLarge,
    /// The peer's uid may not use the control socket.
    Denied,
    /// Too many connections at once; retry.
    Busy,
    /// The switch failed.
    Internal,
    /// A code this client does not know (a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::NoSuchPort => "no_such_port",
            ErrorCode::PortExists => "port_exists",
            ErrorCode::InvalidValue => "invalid_value",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Denied => "denied",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error answer: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{code}: {message}")]
pub struct ControlError {
    pub code: ErrorCode,
    pub message: String,
}

impl ControlError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ControlError {
        ControlError { code, message: message.into() }
    }

    pub fn no_such_port(name: &str) -> ControlError {
        ControlError::new(ErrorCode::NoSuchPort, format!("no port named {name:?}"))
    }

    pub fn invalid_value(message: impl Into<String>) -> ControlError {
        ControlError::new(ErrorCode::InvalidValue, message)
    }

    pub fn internal(message: impl Into<String>) -> ControlError {
        ControlError::new(ErrorCode::Internal, message)
    }
}

/// One response line: the envelope around a [`Response`] or a [`ControlError`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reply(pub Result<Response, ControlError>);

/// The envelope as it is on the wire.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireReply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<Response>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ControlError>,
}

impl Reply {
    /// The reply as one line, newline included.
    pub fn to_line(&self) -> String {
        let wire = match &self.0 {
            // JSON has no NaN or infinity (serde_json would write null, which no reader
            // accepts as a ratio): answer with an error rather than a line nobody can parse.
            Ok(r) if r.has_non_finite() => WireReply {
                ok: false,
                result: None,
                error: Some(ControlError::internal("the switch produced a non-finite number")),
            },
            Ok(r) => WireReply { ok: true, result: Some(r.clone()), error: None },
            Err(e) => WireReply { ok: false, result: None, error: Some(e.clone()) },
        };
        let mut line = serde_json::to_string(&wire).unwrap_or_else(|e| {
            let error = ControlError::internal(format!("cannot encode the response: {e}"));
            serde_json::to_string(&WireReply { ok: false, result: None, error: Some(error) })
                .unwrap_or_else(|_| r#"{"ok":false,"error":{"code":"internal","message":"encoding"}}"#.to_string())
        });
        line.push('\n');
        line
    }

    /// Parses one response line (trailing newline optional).
    pub fn from_line(line: &[u8]) -> Result<Reply, serde_json::Error> {
        let wire: WireReply = serde_json::from_slice(line)?;
        use serde::de::Error;
        match (wire.ok, wire.result, wire.error) {
            (true, Some(r), None) => Ok(Reply(Ok(r))),
            (false, None, Some(e)) => Ok(Reply(Err(e))),
            _ => Err(serde_json::Error::custom(
                "a reply has \"ok\":true and a \"result\", or \"ok\":false and an \"error\"",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &str) -> ErrorCode {
        Request::from_line(line.as_bytes()).unwrap_err().code
    }

    #[test]
    fn requests_parse_from_documented_lines() {
        assert_eq!(Request::from_line(br#"{"command":"show"}"#).unwrap(), Request::Show);
        assert_eq!(Request::from_line(br#"{"command":"stats"}"#).unwrap(), Request::Stats { port: None });
        assert_eq!(
            Request::from_line(br#"{"command":"stats","port":"vm1"}"#).unwrap(),
            Request::Stats { port: Some("vm1".into()) }
        );
        assert_eq!(
            Request::from_line(br#"{"command":"set","setting":"port-mtu","port":"vm1","mtu":9000}"#).unwrap(),
            Request::Set(Setting::PortMtu { port: "vm1".into(), mtu: 9000 })
        );
        assert_eq!(
            Request::from_line(br#"{"command":"set","setting":"policy","policy":"static"}"#).unwrap(),
            Request::Set(Setting::Policy { policy: QueuePolicy::Static })
        );
        let add = Request::from_line(
            br#"{"command":"add-port","name":"vm3","kind":"vhost-user","socket":"/run/vmq/vm3.sock","mac":"52:54:00:00:00:03","trunk":[10,20],"native_vlan":10,"offloads":false}"#,
        )
        .unwrap();
        let Request::AddPort(p) = add else { panic!("not add-port: {add:?}") };
        assert_eq!(p.kind, PortKind::VhostUser);
        assert_eq!(p.trunk, Some(vec![10, 20]));
        assert_eq!(p.offloads, Some(false));
        assert_eq!(p.mtu, None);
    }

    #[test]
    fn every_request_round_trips() {
        let all = [
            Request::Show,
            Request::Ports,
            Request::Queues,
            Request::Fdb,
            Request::Stats { port: None },
            Request::Stats { port: Some("a".into()) },
            Request::AddPort(NewPort { name: "x".into(), kind: PortKind::Tap, mtu: Some(9000), ..NewPort::default() }),
            Request::DelPort { name: "x".into() },
            Request::Set(Setting::Queues { queues: 4 }),
            Request::Set(Setting::Policy { policy: QueuePolicy::Dynamic }),
            Request::Set(Setting::PortMtu { port: "x".into(), mtu: 1500 }),
            Request::Set(Setting::PortVlan { port: "x".into(), vlan: 0 }),
            Request::Rebalance,
            Request::Workers,
            Request::Save,
        ];
        for r in all {
            let line = r.to_line();
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            assert_eq!(Request::from_line(line.as_bytes()).unwrap(), r);
            assert!(COMMANDS.contains(&r.command()));
        }
    }

    #[test]
    fn bad_requests_get_distinct_codes() {
        assert_eq!(code("not json"), ErrorCode::BadRequest);
        assert_eq!(code("[1,2]"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"cmd":"show"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"command":7}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"command":"reboot"}"#), ErrorCode::UnknownCommand);
        assert_eq!(code(r#"{"command":"show","extra":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"command":"workers","port":"a"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"command":"save","file":"/etc/passwd"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"command":"stats","port":"a","x":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"command":"set","setting":"queues","queues":3,"x":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"command":"del-port"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"command":"add-port","name":"a","kind":"floppy"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"command":"add-port","name":"a","kind":"tap","mtuu":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"command":"set","setting":"port-mtu","port":"a","mtu":-1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"command":"set","setting":"colour"}"#), ErrorCode::BadRequest);
        assert_eq!(code("\u{0}\u{1}"), ErrorCode::BadRequest);
    }

    #[test]
    fn replies_round_trip_and_reject_inconsistent_envelopes() {
        let ok = Reply(Ok(Response::Done { message: "x".into() }));
        assert_eq!(ok.to_line(), "{\"ok\":true,\"result\":{\"type\":\"done\",\"message\":\"x\"}}\n");
        assert_eq!(Reply::from_line(ok.to_line().as_bytes()).unwrap(), ok);
        let err = Reply(Err(ControlError::no_such_port("vm9")));
        assert_eq!(
            err.to_line(),
            "{\"ok\":false,\"error\":{\"code\":\"no_such_port\",\"message\":\"no port named \\\"vm9\\\"\"}}\n"
        );
        assert_eq!(Reply::from_line(err.to_line().as_bytes()).unwrap(), err);
        assert!(Reply::from_line(br#"{"ok":true}"#).is_err());
        assert!(Reply::from_line(br#"{"ok":false,"result":{"type":"done","message":""}}"#).is_err());
        let future = Reply::from_line(br#"{"ok":false,"error":{"code":"on_fire","message":"m"}}"#).unwrap();
        assert_eq!(future.0.unwrap_err().code, ErrorCode::Unknown);
    }

    #[test]
    fn a_non_finite_ratio_becomes_an_internal_error_not_a_broken_line() {
        let reply = Reply(Ok(Response::Workers {
            workers: vec![WorkerInfo {
                worker: 0,
                busy_ratio: f64::NAN,
                panics: 0,
                frames: 0,
                sleeps: 0,
                asleep: false,
                tasks: vec![],
            }],
        }));
        let parsed = Reply::from_line(reply.to_line().as_bytes()).unwrap();
        assert_eq!(parsed.0.unwrap_err().code, ErrorCode::Internal);
    }
}

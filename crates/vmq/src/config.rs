//! The configuration file: TOML, parsed with serde, every key known (unknown keys are errors),
//! every value checked. Errors carry the line and column of the offending value.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use vmq_core::port::{MAX_MTU, MIN_MTU};
use vmq_core::switch::SwitchConfig;
use vmq_core::vmq::{QueuePolicy, VmqConfig};
use vmq_core::{Mode, OffloadCaps, PortBackend, PortConfig, PortKind, PortSpec, SocketPolicy, VhostMode, VlanMode};
use vmq_datapath::DatapathConfig;
use vmq_wire::MacAddr;

/// The configuration `vmq demo` and the README start from when no file is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{file}:{line}:{column}: {message}")]
    Invalid { file: String, line: usize, column: usize, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    switch: RawSwitch,
    #[serde(default)]
    vmq: RawVmq,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    vhost: RawSocketPolicy,
    #[serde(default)]
    port: Vec<Spanned<RawPort>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSwitch {
    mode: Option<Spanned<String>>,
    workers: Option<Spanned<i64>>,
    fdb_capacity: Option<Spanned<i64>>,
    fdb_aging_secs: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawVmq {
    queues: Option<Spanned<i64>>,
    policy: Option<Spanned<String>>,
    rebalance_interval_ms: Option<Spanned<i64>>,
    hysteresis: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<Spanned<PathBuf>>,
    metrics: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    name: Spanned<String>,
    kind: Spanned<String>,
    socket: Option<Spanned<PathBuf>>,
    /// vhost-user: "server" (vmq listens on `socket`, the default) or "client" (the VM's QEMU
    /// listens, vmq connects and reconnects).
    vhost_mode: Option<Spanned<String>>,
    // The keys of `[vhost]` (`RawSocketPolicy`), for this port alone; listed here because
    // serde's `flatten` loses spans and unknown-key checks.
    socket_owner: Option<Spanned<String>>,
    socket_group: Option<Spanned<String>>,
    socket_mode: Option<Spanned<String>>,
    allowed_uids: Option<Spanned<Vec<i64>>>,
    setup_timeout_secs: Option<Spanned<i64>>,
    ifname: Option<Spanned<String>>,
    netns: Option<Spanned<String>>,
    create_netns: Option<Spanned<bool>>,
    /// vhost-user: accept unsealed guest memory (see `PortBackend::VhostUser`).
    trust_frontend_memory: Option<Spanned<bool>>,
    /// vhost-user: queue pairs (1..=16; more than one offers VIRTIO_NET_F_MQ).
    queues: Option<Spanned<i64>>,
    mac: Option<Spanned<String>>,
    mtu: Option<Spanned<i64>>,
    vlan: Option<Spanned<i64>>,
    trunk: Option<Spanned<Vec<i64>>>,
    native_vlan: Option<Spanned<i64>>,
    allow_mac_spoofing: Option<bool>,
    max_learned_macs: Option<Spanned<i64>>,
    /// VM ports: the guest may move its port to another MAC (see `vmq_core::guest`).
    allow_mac_change: Option<Spanned<bool>>,
    /// VM ports: the guest may switch its port to promiscuous mode (see `vmq_core::rxfilter`).
    allow_promiscuous: Option<Spanned<bool>>,
    /// VM ports: the QMP socket of the VM's QEMU, where vmq reads the guest's receive filter.
    qmp_socket: Option<Spanned<PathBuf>>,
    /// The QEMU NIC id (`-device virtio-net-pci,id=...`) on that QMP; default: the port name.
    qmp_device: Option<Spanned<String>>,
    offloads: Option<bool>,
    uplink: Option<Spanned<String>>,
    /// Uplinks: "af_packet" (default), "af_xdp" or "auto".
    driver: Option<Spanned<String>>,
    /// AF_XDP uplinks: "native" (default) or "generic".
    xdp_mode: Option<Spanned<String>>,
    /// AF_XDP uplinks: "auto" (default), "on" or "off".
    zero_copy: Option<Spanned<String>>,
    /// AF_XDP uplinks: the interface's receive queues vmq takes over (default: all).
    xdp_queues: Option<Spanned<Vec<i64>>>,
}

/// `[vhost]`, and the same keys on a vhost-user `[[port]]` (which override `[vhost]`'s).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSocketPolicy {
    socket_owner: Option<Spanned<String>>,
    socket_group: Option<Spanned<String>>,
    socket_mode: Option<Spanned<String>>,
    allowed_uids: Option<Spanned<Vec<i64>>>,
    setup_timeout_secs: Option<Spanned<i64>>,
}

impl RawPort {
    fn access(&self) -> RawSocketPolicy {
        RawSocketPolicy {
            socket_owner: self.socket_owner.clone(),
            socket_group: self.socket_group.clone(),
            socket_mode: self.socket_mode.clone(),
            allowed_uids: self.allowed_uids.clone(),
            setup_timeout_secs: self.setup_timeout_secs.clone(),
        }
    }
}

impl RawSocketPolicy {
    fn is_empty(&self) -> bool {
        self.socket_owner.is_none()
            && self.socket_group.is_none()
            && self.socket_mode.is_none()
            && self.allowed_uids.is_none()
            && self.setup_timeout_secs.is_none()
    }
}

/// Validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub mode: Mode,
    pub workers: usize,
    pub fdb_capacity: usize,
    pub fdb_aging_secs: u64,
    pub vmq_queues: u16,
    pub vmq_dynamic: bool,
    pub rebalance_interval_ms: u64,
    pub hysteresis: f64,
    pub control_socket: PathBuf,
    /// `[vhost]`: the socket policy of vhost-user ports that set none of their own (also those
    /// added with `vmq ctl add-port`).
    pub vhost: SocketPolicy,
    /// `None` when metrics are off.
    pub metrics: Option<std::net::SocketAddr>,
    pub ports: Vec<PortConfig>,
    /// VM ports whose guest's receive filter is read from their QEMU over QMP. Set at start; a
    /// reload does not change them.
    pub qmp: Vec<QmpRelayConfig>,
}

/// A VM port's QMP relay: `qmp_socket` and `qmp_device` of its `[[port]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpRelayConfig {
    pub port: String,
    pub socket: PathBuf,
    /// The QEMU NIC id to ask `query-rx-filter` about.
    pub device: String,
}

impl Config {
    /// The data-path configuration this validated configuration describes.
    pub fn datapath_config(&self) -> DatapathConfig {
        DatapathConfig {
            mode: self.mode,
            workers: self.workers,
            vmq: VmqConfig {
                queues: self.vmq_queues,
                policy: if self.vmq_dynamic { QueuePolicy::Dynamic } else { QueuePolicy::Static },
                workers: self.workers as u16,
                hysteresis: self.hysteresis,
            },
            switch: SwitchConfig { fdb_capacity: self.fdb_capacity, fdb_aging_ns: self.fdb_aging_secs * 1_000_000_000 },
            ports: self.ports.clone(),
            rebalance_interval_ms: self.rebalance_interval_ms,
        }
    }
}

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/vmq/vmq.sock";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9464";
const MAX_WORKERS: i64 = 64;
const MAX_QUEUES: i64 = 1024;

/// Turns byte spans into line/column for messages.
struct Locator<'a> {
    file: &'a str,
    text: &'a str,
}

impl Locator<'_> {
    fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        let (line, column) = match span {
            Some(span) => line_col(self.text, span.start),
            None => (1, 1),
        };
        ConfigError::Invalid { file: self.file.to_string(), line, column, message: message.into() }
    }

    fn at<T>(&self, value: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(Some(value.span()), message)
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.chars().count(), |nl| before[nl + 1..].chars().count()) + 1;
    (line, column)
}

pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates a configuration; `file` names it in error messages.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let loc = Locator { file, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let message = e.message().to_string();
        loc.error(e.span(), message)
    })?;

    let mode = match raw.switch.mode.as_ref() {
        None => Mode::Vmq,
        Some(m) => match m.get_ref().as_str() {
            "vmq" => Mode::Vmq,
            "switch" => Mode::Switch,
            other => {
                return Err(loc.at(m, format!("mode must be \"vmq\" or \"switch\", not {other:?}")));
            }
        },
    };
    let default_workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    let workers = int_in(&loc, raw.switch.workers.as_ref(), default_workers, 1, MAX_WORKERS, "workers")?;
    let fdb_capacity = int_in(&loc, raw.switch.fdb_capacity.as_ref(), 65_536, 1, 1 << 24, "fdb_capacity")?;
    let fdb_aging_secs = int_in(&loc, raw.switch.fdb_aging_secs.as_ref(), 300, 1, 86_400 * 7, "fdb_aging_secs")?;
    let vmq_queues = int_in(&loc, raw.vmq.queues.as_ref(), 8, 0, MAX_QUEUES, "queues")?;
    let vmq_dynamic = match raw.vmq.policy.as_ref() {
        None => true,
        Some(p) => match p.get_ref().as_str() {
            "dynamic" => true,
            "static" => false,
            other => {
                return Err(loc.at(p, format!("policy must be \"dynamic\" or \"static\", not {other:?}")));
            }
        },
    };
    let rebalance_interval_ms =
        int_in(&loc, raw.vmq.rebalance_interval_ms.as_ref(), 1000, 10, 3_600_000, "rebalance_interval_ms")?;
    let hysteresis = match raw.vmq.hysteresis.as_ref() {
        None => 1.5,
        Some(h) if h.get_ref().is_finite() && (1.0..=100.0).contains(h.get_ref()) => *h.get_ref(),
        Some(h) => return Err(loc.at(h, "hysteresis must be a number from 1.0 to 100.0")),
    };
    let metrics = match raw.control.metrics.as_ref() {
        None => Some(DEFAULT_METRICS.parse().expect("default metrics address parses")),
        Some(m) if m.get_ref() == "off" => None,
        Some(m) => Some(
            m.get_ref()
                .parse()
                .map_err(|_| loc.at(m, format!("metrics must be \"off\" or ADDR:PORT, not {:?}", m.get_ref())))?,
        ),
    };

    let vhost = socket_policy(&loc, &raw.vhost, &SocketPolicy::default())?;
    let control_socket =
        raw.control.socket.as_ref().map_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET), |s| s.get_ref().clone());

    let mut names = HashSet::new();
    let mut ports = Vec::with_capacity(raw.port.len());
    let mut qmp = Vec::new();
    for port in &raw.port {
        let p = port.get_ref();
        let name = p.name.get_ref();
        if name.is_empty() || name.len() > 32 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(loc.at(&p.name, "port name must be 1 to 32 characters of A-Z a-z 0-9 - _ ."));
        }
        if !names.insert(name.clone()) {
            return Err(loc.at(&p.name, format!("duplicate port name {name:?}")));
        }
        let config = port_config(&loc, port, &vhost)?;
        if let Some(relay) = qmp_relay(&loc, p, &config)? {
            qmp.push(relay);
        }
        if let PortBackend::VhostUser { socket, .. } = &config.backend
            && *socket == control_socket
        {
            return Err(at_socket(&loc, port, format!("socket {} is the control socket", socket.display())));
        }
        if let Some((other, conflict)) = ports.iter().find_map(|o| Some((o, conflict(&config, o)?))) {
            let message = format!("port {name:?}: {}", conflict.describe(&other.spec.name));
            let p = port.get_ref();
            return Err(match conflict {
                Conflict::Socket(_) => at_socket(&loc, port, message),
                Conflict::Ifname(_) => loc.at(p.ifname.as_ref().unwrap_or(&p.name), message),
                Conflict::MacVlan(..) => p.mac.as_ref().map_or_else(|| loc.at(port, &message), |m| loc.at(m, &message)),
            });
        }
        ports.push(config);
    }
    // Uplink references resolve to uplink ports.
    for (port, raw_port) in ports.iter().zip(&raw.port) {
        if let (Some(uplink), Some(raw_uplink)) = (&port.uplink, &raw_port.get_ref().uplink) {
            let ok = ports.iter().any(|p| &p.spec.name == uplink && p.spec.kind == PortKind::Uplink);
            if !ok {
                return Err(
                    loc.at(raw_uplink, format!("uplink {uplink:?} is not the name of a port of kind \"uplink\""))
                );
            }
        }
    }

    Ok(Config {
        qmp,
        mode,
        workers: workers as usize,
        fdb_capacity: fdb_capacity as usize,
        fdb_aging_secs: fdb_aging_secs as u64,
        vmq_queues: vmq_queues as u16,
        vmq_dynamic,
        rebalance_interval_ms: rebalance_interval_ms as u64,
        hysteresis,
        control_socket,
        vhost,
        metrics,
        ports,
    })
}

fn int_in(
    loc: &Locator<'_>,
    value: Option<&Spanned<i64>>,
    default: i64,
    min: i64,
    max: i64,
    what: &str,
) -> Result<i64, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) if (min..=max).contains(v.get_ref()) => Ok(*v.get_ref()),
        Some(v) => Err(loc.at(v, format!("{what} must be from {min} to {max}, not {}", v.get_ref()))),
    }
}

fn at_socket(loc: &Locator<'_>, port: &Spanned<RawPort>, message: String) -> ConfigError {
    match &port.get_ref().socket {
        Some(s) => loc.at(s, message),
        None => loc.at(port, message),
    }
}

/// Why two ports cannot both be configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// The same vhost-user socket path (compared as written, component by component).
    Socket(PathBuf),
    /// The same interface name in the same namespace (TAP or uplink).
    Ifname(String),
    /// The same MAC address on a VLAN both ports carry.
    MacVlan(MacAddr, u16),
}

impl Conflict {
    pub fn describe(&self, other: &str) -> String {
        match self {
            Conflict::Socket(path) => format!("socket {} is also port {other:?}'s", path.display()),
            Conflict::Ifname(name) => format!("interface {name:?} is also port {other:?}'s (same namespace)"),
            Conflict::MacVlan(mac, vlan) => format!("mac {mac} on VLAN {vlan} is also port {other:?}'s"),
        }
    }
}

/// What keeps `a` and `b` from being ports of one switch, if anything.
pub fn conflict(a: &PortConfig, b: &PortConfig) -> Option<Conflict> {
    match (&a.backend, &b.backend) {
        (PortBackend::VhostUser { socket: x, .. }, PortBackend::VhostUser { socket: y, .. }) if x == y => {
            return Some(Conflict::Socket(x.clone()));
        }
        (
            PortBackend::Tap { ifname: x, netns: nx, .. } | PortBackend::Uplink { ifname: x, netns: nx, .. },
            PortBackend::Tap { ifname: y, netns: ny, .. } | PortBackend::Uplink { ifname: y, netns: ny, .. },
        ) if x == y && nx == ny => return Some(Conflict::Ifname(x.clone())),
        _ => {}
    }
    let (Some(mac), Some(other_mac)) = (a.spec.mac, b.spec.mac) else { return None };
    if mac != other_mac {
        return None;
    }
    let vlans = |v: &VlanMode| -> Vec<u16> {
        match v {
            VlanMode::Access(id) => vec![*id],
            VlanMode::Trunk { allowed, native } => allowed.iter().copied().chain(*native).collect(),
        }
    };
    let theirs = vlans(&b.spec.vlan);
    vlans(&a.spec.vlan).into_iter().find(|v| theirs.contains(v)).map(|v| Conflict::MacVlan(mac, v))
}

/// `raw` over `defaults`: owner and group are user/group names or numeric ids, the mode an
/// octal string.
fn socket_policy(
    loc: &Locator<'_>,
    raw: &RawSocketPolicy,
    defaults: &SocketPolicy,
) -> Result<SocketPolicy, ConfigError> {
    let id = |v: &Spanned<String>, what: &str, lookup: &dyn Fn(&str) -> Option<u32>| -> Result<u32, ConfigError> {
        let s = v.get_ref();
        if let Ok(id) = s.parse::<u32>() {
            return Ok(id);
        }
        lookup(s).ok_or_else(|| loc.at(v, format!("no {what} named {s:?} on this host")))
    };
    let user = |name: &str| nix::unistd::User::from_name(name).ok().flatten().map(|u| u.uid.as_raw());
    let group = |name: &str| nix::unistd::Group::from_name(name).ok().flatten().map(|g| g.gid.as_raw());
    let mut policy = defaults.clone();
    if let Some(v) = &raw.socket_owner {
        policy.owner = Some(id(v, "user", &user)?);
    }
    if let Some(v) = &raw.socket_group {
        policy.group = Some(id(v, "group", &group)?);
    }
    if let Some(v) = &raw.socket_mode {
        let s = v.get_ref();
        let mode = u32::from_str_radix(s, 8).ok().filter(|m| (3..=4).contains(&s.len()) && *m <= 0o777);
        policy.mode = Some(mode.ok_or_else(|| {
            loc.at(v, format!("socket_mode must be an octal mode from \"000\" to \"0777\" (e.g. \"0660\"), not {s:?}"))
        })?);
    }
    if let Some(v) = &raw.allowed_uids {
        let mut uids = Vec::new();
        for uid in v.get_ref() {
            let uid = u32::try_from(*uid)
                .ok()
                .filter(|u| *u != u32::MAX)
                .ok_or_else(|| loc.at(v, format!("allowed_uids: {uid} is not a uid")))?;
            if !uids.contains(&uid) {
                uids.push(uid);
            }
        }
        if uids.is_empty() {
            return Err(loc.at(v, "allowed_uids is empty: no frontend could connect (leave it out to allow any)"));
        }
        policy.allowed_uids = Some(uids);
    }
    if let Some(v) = &raw.setup_timeout_secs {
        let secs = int_in(loc, Some(v), 30, 1, 3600, "setup_timeout_secs")?;
        policy.setup_timeout = Some(std::time::Duration::from_secs(secs as u64));
    }
    Ok(policy)
}

fn port_config(loc: &Locator<'_>, port: &Spanned<RawPort>, vhost: &SocketPolicy) -> Result<PortConfig, ConfigError> {
    let p = port.get_ref();
    let name = p.name.get_ref().clone();
    let kind = match p.kind.get_ref().as_str() {
        "vhost-user" => PortKind::VhostUser,
        "tap" => PortKind::Tap,
        "uplink" => PortKind::Uplink,
        "mem" => PortKind::Mem,
        other => {
            return Err(
                loc.at(&p.kind, format!("kind must be \"vhost-user\", \"tap\", \"uplink\" or \"mem\", not {other:?}"))
            );
        }
    };
    let needs = |what: &str| loc.at(port, format!("port {name:?} of kind {:?} needs `{what}`", p.kind.get_ref()));
    let refuses = |what: &str| loc.at(port, format!("port {name:?} of kind {:?} takes no `{what}`", p.kind.get_ref()));

    let ifname = |v: &Spanned<String>| -> Result<String, ConfigError> {
        let s = v.get_ref();
        vmq_sys::ifname::check(s).map_err(|e| loc.at(v, format!("port {name:?}: {e}")))?;
        Ok(s.clone())
    };

    // A name under /run/netns, or an absolute path to a namespace file (`/proc/PID/ns/net`).
    let netns = |v: &Option<Spanned<String>>| -> Result<Option<String>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let s = v.get_ref();
        let valid = if vmq_sys::netns::is_path(s) {
            vmq_sys::netns::resolve(s).is_ok()
        } else {
            !s.is_empty() && !s.contains(['/', '\0']) && s.len() <= 64
        };
        if !valid {
            return Err(loc.at(
                v,
                "netns must be a namespace name (1 to 64 bytes, no '/') or an absolute path to a namespace \
                 file (/proc/PID/ns/net)",
            ));
        }
        Ok(Some(s.clone()))
    };

    let backend = match kind {
        PortKind::VhostUser => {
            let socket = p.socket.as_ref().ok_or_else(|| needs("socket"))?.get_ref().clone();
            if p.ifname.is_some() {
                return Err(refuses("ifname"));
            }
            let mode = match &p.vhost_mode {
                None => VhostMode::Server,
                Some(v) => match v.get_ref().as_str() {
                    "server" => VhostMode::Server,
                    "client" => VhostMode::Client,
                    other => {
                        return Err(loc.at(v, format!("vhost_mode must be \"server\" or \"client\", not {other:?}")));
                    }
                },
            };
            let policy = match mode {
                VhostMode::Server => socket_policy(loc, &p.access(), vhost)?,
                VhostMode::Client => {
                    // The VM's QEMU makes and listens on the socket: who may connect to it is
                    // its file's business, not vmq's. Only the setup timeout applies.
                    let listen_side = [
                        ("socket_owner", p.socket_owner.as_ref().map(Spanned::span)),
                        ("socket_group", p.socket_group.as_ref().map(Spanned::span)),
                        ("socket_mode", p.socket_mode.as_ref().map(Spanned::span)),
                        ("allowed_uids", p.allowed_uids.as_ref().map(Spanned::span)),
                    ];
                    if let Some((key, Some(span))) = listen_side.into_iter().find(|(_, span)| span.is_some()) {
                        return Err(loc.error(
                            Some(span),
                            format!(
                                "port {name:?}: {key} applies to sockets vmq listens on; with vhost_mode = \"client\" \
                                 the VM's QEMU makes the socket"
                            ),
                        ));
                    }
                    let own =
                        RawSocketPolicy { setup_timeout_secs: p.setup_timeout_secs.clone(), ..Default::default() };
                    let defaults = SocketPolicy { setup_timeout: vhost.setup_timeout, ..SocketPolicy::default() };
                    socket_policy(loc, &own, &defaults)?
                }
            };
            let trust_frontend_memory = p.trust_frontend_memory.as_ref().is_some_and(|t| *t.get_ref());
            let max = i64::from(vmq_core::port::MAX_VHOST_QUEUE_PAIRS);
            let queues = int_in(loc, p.queues.as_ref(), 1, 1, max, &format!("port {name:?}: queues"))? as u16;
            PortBackend::VhostUser { socket, mode, policy, trust_frontend_memory, queues }
        }
        PortKind::Tap => {
            let ifname = match &p.ifname {
                Some(v) => ifname(v)?,
                None => ifname(&Spanned::new(p.name.span(), name.clone()))?,
            };
            if p.socket.is_some() {
                return Err(refuses("socket"));
            }
            let create_netns = p.create_netns.as_ref().is_some_and(|c| *c.get_ref());
            if create_netns && p.netns.is_none() {
                return Err(needs("netns"));
            }
            if let Some(ns) = p.netns.as_ref().filter(|ns| create_netns && vmq_sys::netns::is_path(ns.get_ref())) {
                return Err(loc.at(ns, format!("port {name:?}: create_netns needs a namespace name, not a path")));
            }
            PortBackend::Tap { ifname, netns: netns(&p.netns)?, create_netns }
        }
        PortKind::Uplink => {
            let ifname = ifname(p.ifname.as_ref().ok_or_else(|| needs("ifname"))?)?;
            if p.socket.is_some() {
                return Err(refuses("socket"));
            }
            let choice = |v: &Option<Spanned<String>>, key: &str, names: &[&str]| -> Result<usize, ConfigError> {
                let Some(v) = v else { return Ok(0) };
                names.iter().position(|n| n == v.get_ref()).ok_or_else(|| {
                    let list = names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
                    loc.at(v, format!("port {name:?}: {key} must be one of {list}, not {:?}", v.get_ref()))
                })
            };
            use vmq_core::{UplinkDriverKind as K, XdpAttachMode as X, ZeroCopyMode as Z};
            let kind = [K::AfPacket, K::AfXdp, K::Auto][choice(&p.driver, "driver", &["af_packet", "af_xdp", "auto"])?];
            let xdp_mode = [X::Native, X::Generic][choice(&p.xdp_mode, "xdp_mode", &["native", "generic"])?];
            let zero_copy = [Z::Auto, Z::On, Z::Off][choice(&p.zero_copy, "zero_copy", &["auto", "on", "off"])?];
            if kind == K::AfPacket
                && let Some(v) = p.xdp_mode.as_ref().or(p.zero_copy.as_ref())
            {
                return Err(loc.at(
                    v,
                    format!("port {name:?}: xdp_mode and zero_copy apply to driver = \"af_xdp\" or \"auto\" only"),
                ));
            }
            let xdp_queues = match &p.xdp_queues {
                None => vmq_core::XdpQueues::all(),
                Some(v) if kind == K::AfPacket => {
                    return Err(
                        loc.at(v, format!("port {name:?}: xdp_queues applies to driver = \"af_xdp\" or \"auto\" only"))
                    );
                }
                Some(v) => {
                    let ids: Option<Vec<u16>> = v.get_ref().iter().map(|&q| u16::try_from(q).ok()).collect();
                    ids.as_deref().and_then(vmq_core::XdpQueues::only).ok_or_else(|| {
                        loc.at(
                            v,
                            format!(
                                "port {name:?}: xdp_queues must list distinct receive queue ids from 0 to {}, at least one, not {:?}",
                                vmq_core::XdpQueues::MAX_ID,
                                v.get_ref()
                            ),
                        )
                    })?
                }
            };
            let driver = vmq_core::UplinkDriver { kind, xdp_mode, zero_copy, xdp_queues };
            PortBackend::Uplink { ifname, netns: netns(&p.netns)?, driver }
        }
        PortKind::Mem => PortBackend::Mem,
    };
    if kind != PortKind::VhostUser && !p.access().is_empty() {
        return Err(refuses("socket_owner/socket_group/socket_mode/allowed_uids/setup_timeout_secs"));
    }
    if !matches!(kind, PortKind::Tap | PortKind::Uplink) && p.netns.is_some() {
        return Err(refuses("netns"));
    }
    if kind != PortKind::VhostUser && p.trust_frontend_memory.is_some() {
        return Err(refuses("trust_frontend_memory"));
    }
    if kind != PortKind::VhostUser && p.queues.is_some() {
        return Err(refuses("queues"));
    }
    if kind != PortKind::VhostUser && p.vhost_mode.is_some() {
        return Err(refuses("vhost_mode"));
    }
    if kind != PortKind::Tap && p.create_netns.is_some() {
        return Err(refuses("create_netns"));
    }
    if kind != PortKind::Uplink
        && (p.driver.is_some() || p.xdp_mode.is_some() || p.zero_copy.is_some() || p.xdp_queues.is_some())
    {
        return Err(refuses("driver/xdp_mode/zero_copy/xdp_queues"));
    }
    if !kind.is_vm() && p.uplink.is_some() {
        return Err(refuses("uplink"));
    }

    let mac = match &p.mac {
        Some(v) => {
            let mac: MacAddr = v.get_ref().parse().map_err(|e| loc.at(v, format!("{e}")))?;
            if mac.is_multicast() || mac.is_zero() {
                return Err(loc.at(v, format!("mac {mac} must be a unicast, non-zero address")));
            }
            Some(mac)
        }
        None if kind.is_vm() => return Err(needs("mac")),
        None => None,
    };
    let mtu = int_in(loc, p.mtu.as_ref(), 1500, MIN_MTU as i64, MAX_MTU as i64, "mtu")? as u16;
    let max_learned_macs = int_in(
        loc,
        p.max_learned_macs.as_ref(),
        i64::from(vmq_core::fdb::DEFAULT_MAX_LEARNED_MACS),
        0,
        1 << 24,
        "max_learned_macs",
    )? as u32;
    let allow_mac_change = match &p.allow_mac_change {
        Some(v) if !kind.is_vm() => {
            return Err(loc.at(v, "allow_mac_change is for VM ports (their guest changes the MAC)"));
        }
        Some(v) => *v.get_ref(),
        None => false,
    };
    let allow_promiscuous = match &p.allow_promiscuous {
        Some(v) if !kind.is_vm() => {
            return Err(loc.at(v, "allow_promiscuous is for VM ports (their guest asks for it)"));
        }
        Some(v) => *v.get_ref(),
        None => false,
    };

    let vlan_id = |v: &Spanned<i64>, allow_zero: bool| -> Result<u16, ConfigError> {
        let lo = if allow_zero { 0 } else { 1 };
        if (lo..=4094).contains(v.get_ref()) {
            Ok(*v.get_ref() as u16)
        } else {
            Err(loc.at(v, format!("VLAN id must be from {lo} to 4094, not {}", v.get_ref())))
        }
    };
    let vlan = match (&p.vlan, &p.trunk) {
        (Some(_), Some(t)) => {
            return Err(loc.at(t, "a port has either `vlan` (access) or `trunk`, not both"));
        }
        (Some(v), None) => {
            if let Some(n) = &p.native_vlan {
                return Err(loc.at(n, "native_vlan goes with `trunk`"));
            }
            VlanMode::Access(vlan_id(v, true)?)
        }
        (None, Some(t)) => {
            let mut allowed = Vec::new();
            for v in t.get_ref() {
                let spanned = Spanned::new(t.span(), *v);
                let id = vlan_id(&spanned, false)?;
                if !allowed.contains(&id) {
                    allowed.push(id);
                }
            }
            if allowed.is_empty() {
                return Err(loc.at(t, "trunk needs at least one VLAN"));
            }
            allowed.sort_unstable();
            let native = p.native_vlan.as_ref().map(|n| vlan_id(n, false)).transpose()?;
            VlanMode::Trunk { allowed, native }
        }
        (None, None) => {
            if let Some(n) = &p.native_vlan {
                return Err(loc.at(n, "native_vlan goes with `trunk`"));
            }
            VlanMode::Access(0)
        }
    };

    Ok(PortConfig {
        spec: PortSpec {
            name,
            kind,
            mac,
            mtu,
            vlan,
            allow_mac_spoofing: p.allow_mac_spoofing.unwrap_or(false),
            max_learned_macs,
            guest: vmq_core::GuestPolicy { allow_mac_change, allow_promiscuous },
            offloads: if p.offloads.unwrap_or(true) { OffloadCaps::ALL } else { OffloadCaps::NONE },
        },
        backend,
        uplink: p.uplink.as_ref().map(|u| u.get_ref().clone()),
    })
}

/// The QMP relay a `[[port]]` asks for, if any: `qmp_socket` on a VM port.
fn qmp_relay(loc: &Locator<'_>, p: &RawPort, config: &PortConfig) -> Result<Option<QmpRelayConfig>, ConfigError> {
    let Some(socket) = &p.qmp_socket else {
        if let Some(d) = &p.qmp_device {
            return Err(loc.at(d, "qmp_device goes with qmp_socket"));
        }
        return Ok(None);
    };
    if !config.spec.kind.is_vm() {
        return Err(loc.at(socket, "qmp_socket is for VM ports (vmq reads their guest's receive filter)"));
    }
    if socket.get_ref().as_os_str().is_empty() {
        return Err(loc.at(socket, "qmp_socket is empty"));
    }
    let device = match &p.qmp_device {
        Some(d) if d.get_ref().is_empty() || d.get_ref().len() > 128 || d.get_ref().chars().any(char::is_control) => {
            return Err(loc.at(d, "qmp_device must be 1 to 128 printable characters"));
        }
        Some(d) => d.get_ref().clone(),
        None => config.spec.name.clone(),
    };
    Ok(Some(QmpRelayConfig { port: config.spec.name.clone(), socket: socket.get_ref().clone(), device }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_relay_keys_only_on_vm_ports_device_defaults_to_port_name() {
        let vm =
            |extra: &str| format!("[[port]]\nname = \"vm1\"\nkind = \"mem\"\nmac = \"52:54:00:00:00:01\"\n{extra}");
        let c = parse(&vm("qmp_socket = \"/run/vm1.qmp\"\nallow_promiscuous = true\n"), "t").unwrap();
        let name = c.ports[0].spec.name.clone();
        assert_eq!(c.qmp, vec![QmpRelayConfig { port: name.clone(), socket: "/run/vm1.qmp".into(), device: name }]);
        assert!(c.ports[0].spec.guest.allow_promiscuous);
        let c = parse(&vm("qmp_socket = \"/q\"\nqmp_device = \"nic0\"\n"), "t").unwrap();
        assert_eq!(c.qmp[0].device, "nic0");
        assert!(!parse(&vm(""), "t").unwrap().ports[0].spec.guest.allow_promiscuous);
        let uplink = "[[port]]\nname = \"up0\"\nkind = \"uplink\"\nifname = \"eth0\"\n";
        assert!(err(&format!("{uplink}qmp_socket = \"/q\"\n")).2.contains("VM ports"));
        assert!(err(&format!("{uplink}allow_promiscuous = true\n")).2.contains("VM ports"));
        assert!(err(&vm("qmp_device = \"nic0\"\n")).2.contains("qmp_socket"));
    }

    fn err(text: &str) -> (usize, usize, String) {
        match parse(text, "t.toml") {
            Err(ConfigError::Invalid { line, column, message, .. }) => (line, column, message),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        // What the demo and the README rely on: vmq mode, 2 workers, 8 dynamic queues, a jumbo
        // trunk uplink with native VLAN 10, and three jumbo TAP VMs, vm3 alone on VLAN 20.
        let c = parse(EMBEDDED_DEFAULT, "default").unwrap();
        assert_eq!((c.mode, c.workers, c.vmq_queues, c.vmq_dynamic), (Mode::Vmq, 2, 8, true));
        assert_eq!(c.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert_eq!(c.metrics, Some(DEFAULT_METRICS.parse().unwrap()));
        let summary: Vec<(&str, PortKind, u16, &VlanMode, Option<&str>)> = c
            .ports
            .iter()
            .map(|p| {
                let netns = match &p.backend {
                    PortBackend::Uplink { netns, .. } | PortBackend::Tap { netns, .. } => netns.as_deref(),
                    _ => None,
                };
                (p.spec.name.as_str(), p.spec.kind, p.spec.mtu, &p.spec.vlan, netns)
            })
            .collect();
        let trunk = VlanMode::Trunk { allowed: vec![10, 20], native: Some(10) };
        assert_eq!(
            summary,
            vec![
                ("up0", PortKind::Uplink, 9000, &trunk, Some("vmq-demo-sw")),
                ("vm1", PortKind::Tap, 9000, &VlanMode::Access(10), Some("vmq-demo-vm1")),
                ("vm2", PortKind::Tap, 9000, &VlanMode::Access(10), Some("vmq-demo-vm2")),
                ("vm3", PortKind::Tap, 9000, &VlanMode::Access(20), Some("vmq-demo-vm3")),
            ]
        );
        let macs: Vec<Option<MacAddr>> = c.ports.iter().skip(1).map(|p| p.spec.mac).collect();
        assert_eq!(macs, (1..=3).map(|i| Some(MacAddr([0x52, 0x54, 0, 0, 0, i]))).collect::<Vec<_>>());
    }

    #[test]
    fn issue_example_parses() {
        let c = parse(
            r#"
[switch]
mode = "vmq"
workers = 2
[vmq]
queues = 8
policy = "dynamic"
[[port]]
name = "vm1"
kind = "vhost-user"
socket = "/run/vmq/vm1.sock"
mac = "52:54:00:00:00:01"
mtu = 9000
vlan = 10
[[port]]
name = "vm2"
kind = "mem"
mac = "52:54:00:00:00:02"
trunk = [20, 10, 10]
"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Vmq);
        assert_eq!(c.workers, 2);
        assert_eq!(c.vmq_queues, 8);
        assert_eq!(c.ports[0].spec.mtu, 9000);
        assert_eq!(c.ports[0].spec.vlan, VlanMode::Access(10));
        assert_eq!(
            c.ports[0].backend,
            PortBackend::VhostUser {
                socket: "/run/vmq/vm1.sock".into(),
                mode: VhostMode::Server,
                policy: SocketPolicy::default(),
                trust_frontend_memory: false,
                queues: 1,
            }
        );
        assert_eq!(c.ports[1].spec.vlan, VlanMode::Trunk { allowed: vec![10, 20], native: None });
        assert_eq!(c.ports[1].spec.mtu, 1500);
    }

    #[test]
    fn allow_mac_change_is_off_by_default_and_only_for_vm_ports() {
        let vm =
            |extra: &str| format!("[[port]]\nname = \"vm1\"\nkind = \"mem\"\nmac = \"52:54:00:00:00:01\"\n{extra}");
        let c = parse(&vm(""), "t").unwrap();
        assert!(!c.ports[0].spec.guest.allow_mac_change);
        let c = parse(&vm("allow_mac_change = true\n"), "t").unwrap();
        assert!(c.ports[0].spec.guest.allow_mac_change);
        let (line, _, message) =
            err("[[port]]\nname = \"up0\"\nkind = \"uplink\"\nifname = \"eth0\"\nallow_mac_change = true\n");
        assert_eq!(line, 5);
        assert!(message.contains("VM ports"), "{message}");
    }

    #[test]
    fn uplink_driver_keys_parse_and_bad_values_are_clear_errors() {
        use vmq_core::{UplinkDriver, UplinkDriverKind, XdpAttachMode, ZeroCopyMode};
        let up = |extra: &str| format!("[[port]]\nname = \"up0\"\nkind = \"uplink\"\nifname = \"eth0\"\n{extra}");
        let driver = |text: &str| match &parse(text, "t").unwrap().ports[0].backend {
            PortBackend::Uplink { driver, .. } => *driver,
            other => panic!("{other:?}"),
        };
        assert_eq!(driver(&up("")), UplinkDriver::default());
        assert_eq!(driver(&up("")).kind, UplinkDriverKind::AfPacket);
        let d = driver(&up("driver = \"af_xdp\"\nxdp_mode = \"generic\"\nzero_copy = \"off\"\n"));
        assert_eq!(
            d,
            UplinkDriver {
                kind: UplinkDriverKind::AfXdp,
                xdp_mode: XdpAttachMode::Generic,
                zero_copy: ZeroCopyMode::Off,
                xdp_queues: vmq_core::XdpQueues::all(),
            }
        );
        assert_eq!(driver(&up("driver = \"auto\"\n")).kind, UplinkDriverKind::Auto);
        let queues = driver(&up("driver = \"af_xdp\"\nxdp_queues = [3, 1]\n")).xdp_queues;
        assert_eq!(queues.ids(), Some(vec![1, 3]));
        for bad in ["[]", "[1, 1]", "[64]", "[-1]", "[70000]"] {
            let (line, _, message) = err(&up(&format!("driver = \"af_xdp\"\nxdp_queues = {bad}\n")));
            assert_eq!(line, 6, "{bad}");
            assert!(message.contains("xdp_queues must list distinct"), "{bad}: {message}");
        }
        let (_, _, message) = err(&up("xdp_queues = [0]\n"));
        assert!(message.contains("xdp_queues applies to driver"), "{message}");
        let (line, _, message) = err(&up("driver = \"dpdk\"\n"));
        assert_eq!(line, 5);
        assert!(message.contains("\"af_packet\", \"af_xdp\", \"auto\"") && message.contains("dpdk"), "{message}");
        let (_, _, message) = err(&up("driver = \"af_xdp\"\nzero_copy = \"maybe\"\n"));
        assert!(message.contains("zero_copy"), "{message}");
        let (line, _, message) = err(&up("xdp_mode = \"native\"\n"));
        assert_eq!(line, 5);
        assert!(message.contains("af_xdp"), "{message}");
        let (_, _, message) = err("[[port]]\nname = \"t\"\nkind = \"tap\"\ndriver = \"af_xdp\"\n");
        assert!(message.contains("driver"), "{message}");
    }

    #[test]
    fn unknown_key_has_line_and_column() {
        let (line, column, message) = err("[switch]\nmode = \"vmq\"\nworkerz = 2\n");
        assert_eq!((line, column), (3, 1));
        assert!(message.contains("workerz"), "{message}");
    }

    #[test]
    fn invalid_values_point_at_the_value() {
        let (line, column, message) = err("[switch]\nmode = \"fast\"\n");
        assert_eq!((line, column), (2, 8));
        assert!(message.contains("fast"));
        let port = "[[port]]\nname = \"a\"\nkind = \"mem\"\nmac = \"52:54:00:00:00:01\"\n";
        let (line, _, message) = err(&format!("{port}mtu = 9001\n"));
        assert_eq!(line, 5);
        assert!(message.contains("mtu"), "{message}");
        let (line, _, message) = err(&format!("{port}vlan = 4095\n"));
        assert_eq!(line, 5);
        assert!(message.contains("VLAN"));
        let (_, _, message) = err("[[port]]\nname = \"a\"\nkind = \"mem\"\nmac = \"01:00:5e:00:00:01\"\n");
        assert!(message.contains("unicast"));
        let (_, _, message) = err("[[port]]\nname = \"a\"\nkind = \"mem\"\nmac = \"zz\"\n");
        assert!(message.contains("invalid MAC"));
    }

    #[test]
    fn queues_sets_a_vhost_user_ports_queue_pairs_within_1_to_16() {
        let vhost =
            "[[port]]\nname = \"v\"\nkind = \"vhost-user\"\nsocket = \"/run/v.sock\"\nmac = \"52:54:00:00:00:01\"\n";
        let queues = |c: &Config| match &c.ports[0].backend {
            PortBackend::VhostUser { queues, .. } => *queues,
            other => panic!("{other:?}"),
        };
        assert_eq!(queues(&parse(vhost, "t.toml").unwrap()), 1);
        assert_eq!(queues(&parse(&format!("{vhost}queues = 4\n"), "t.toml").unwrap()), 4);
        assert_eq!(queues(&parse(&format!("{vhost}queues = 16\n"), "t.toml").unwrap()), 16);
        for bad in ["0", "17", "-1"] {
            let (line, _, m) = err(&format!("{vhost}queues = {bad}\n"));
            assert_eq!(line, 6, "{m}");
            assert!(m.contains("queues must be from 1 to 16"), "{m}");
        }
        let (_, _, m) = err("[[port]]\nname = \"t\"\nkind = \"tap\"\nqueues = 2\n");
        assert!(m.contains("takes no `queues`"), "{m}");
    }

    #[test]
    fn trust_frontend_memory_is_a_vhost_user_opt_in() {
        let vhost =
            "[[port]]\nname = \"v\"\nkind = \"vhost-user\"\nsocket = \"/run/v.sock\"\nmac = \"52:54:00:00:00:01\"\n";
        let c = parse(vhost, "t.toml").unwrap();
        assert_eq!(
            c.ports[0].backend,
            PortBackend::VhostUser {
                socket: "/run/v.sock".into(),
                mode: VhostMode::Server,
                policy: SocketPolicy::default(),
                trust_frontend_memory: false,
                queues: 1,
            }
        );
        let c = parse(&format!("{vhost}trust_frontend_memory = true\n"), "t.toml").unwrap();
        assert_eq!(
            c.ports[0].backend,
            PortBackend::VhostUser {
                socket: "/run/v.sock".into(),
                mode: VhostMode::Server,
                policy: SocketPolicy::default(),
                trust_frontend_memory: true,
                queues: 1,
            }
        );
        let (_, _, m) = err("[[port]]\nname = \"t\"\nkind = \"tap\"\ntrust_frontend_memory = true\n");
        assert!(m.contains("trust_frontend_memory"), "{m}");
    }

    #[test]
    fn semantic_errors() {
        let (_, _, m) = err("[[port]]\nname = \"v\"\nkind = \"vhost-user\"\nmac = \"52:54:00:00:00:01\"\n");
        assert!(m.contains("needs `socket`"), "{m}");
        let (_, _, m) = err("[[port]]\nname = \"u\"\nkind = \"uplink\"\nifname = \"a-name-longer-than-15\"\n");
        assert!(m.contains("interface name"), "{m}");
        let (_, _, m) = err(
            "[[port]]\nname = \"a\"\nkind = \"uplink\"\nifname = \"x\"\n[[port]]\nname = \"a\"\nkind = \"uplink\"\nifname = \"y\"\n",
        );
        assert!(m.contains("duplicate"), "{m}");
        let (_, _, m) = err("[[port]]\nname = \"v\"\nkind = \"mem\"\nmac = \"52:54:00:00:00:01\"\nuplink = \"nope\"\n");
        assert!(m.contains("not the name of a port"), "{m}");
        let (_, _, m) =
            err("[[port]]\nname = \"v\"\nkind = \"mem\"\nmac = \"52:54:00:00:00:01\"\nvlan = 1\ntrunk = [2]\n");
        assert!(m.contains("not both"), "{m}");
        let (_, _, m) = err("[switch]\nworkers = 0\n");
        assert!(m.contains("workers"), "{m}");
        let (_, _, m) = err("[control]\nmetrics = \"nonsense\"\n");
        assert!(m.contains("metrics"), "{m}");
        let (_, _, m) = err("this is not toml");
        assert!(!m.is_empty());
    }

    fn vm(name: &str, socket: &str, mac: &str, extra: &str) -> String {
        format!("[[port]]\nname = \"{name}\"\nkind = \"vhost-user\"\nsocket = \"{socket}\"\nmac = \"{mac}\"\n{extra}")
    }

    #[test]
    fn duplicate_socket_paths_point_at_the_second_socket() {
        let text = format!(
            "{}{}",
            vm("a", "/run/vmq/a.sock", "52:54:00:00:00:01", ""),
            vm("b", "/run/vmq/a.sock", "52:54:00:00:00:02", "")
        );
        let (line, column, m) = err(&text);
        assert_eq!((line, column), (9, 10), "{m}");
        assert!(m.contains("socket /run/vmq/a.sock is also port \"a\"'s"), "{m}");
        // Written differently, the same path.
        let text = format!(
            "{}{}",
            vm("a", "/run/vmq/a.sock", "52:54:00:00:00:01", ""),
            vm("b", "/run/vmq//a.sock", "52:54:00:00:00:02", "")
        );
        assert!(err(&text).2.contains("is also port"));
    }

    #[test]
    fn socket_path_equal_to_the_control_socket_is_refused() {
        let text =
            format!("[control]\nsocket = \"/run/vmq/x.sock\"\n{}", vm("a", "/run/vmq/x.sock", "52:54:00:00:00:01", ""));
        let (line, column, m) = err(&text);
        assert_eq!((line, column), (6, 10), "{m}");
        assert!(m.contains("is the control socket"), "{m}");
        // The default control socket, too.
        assert!(err(&vm("a", DEFAULT_CONTROL_SOCKET, "52:54:00:00:00:01", "")).2.contains("control socket"));
    }

    #[test]
    fn duplicate_interface_names_in_one_namespace() {
        let up = "[[port]]\nname = \"up\"\nkind = \"uplink\"\nifname = \"eth0\"\n";
        let tap = "[[port]]\nname = \"t\"\nkind = \"tap\"\nifname = \"eth0\"\n";
        let (line, column, m) = err(&format!("{up}{tap}"));
        assert_eq!((line, column), (8, 10), "{m}");
        assert!(m.contains("interface \"eth0\" is also port \"up\"'s"), "{m}");
        // A TAP named after its port, without `ifname`: the error points at the name.
        let (line, _, m) =
            err("[[port]]\nname = \"t0\"\nkind = \"tap\"\n[[port]]\nname = \"x\"\nkind = \"tap\"\nifname = \"t0\"\n");
        assert_eq!(line, 7, "{m}");
        // The same name in different namespaces is fine (the embedded default does that).
        parse(&format!("{up}{tap}netns = \"ns1\"\n"), "t").unwrap();
    }

    #[test]
    fn netns_is_a_name_or_an_absolute_path() {
        let tap =
            |netns: &str, extra: &str| format!("[[port]]\nname = \"t\"\nkind = \"tap\"\nnetns = {netns:?}\n{extra}");
        for good in ["ns1", "/proc/4242/ns/net", "/var/run/netns/pod-1", "/run/netns/x"] {
            let c = parse(&tap(good, ""), "t").unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(
                c.ports[0].backend,
                PortBackend::Tap { ifname: "t".into(), netns: Some(good.into()), create_netns: false }
            );
        }
        for bad in ["", "a/b", "relative/path/ns", &"n".repeat(65), &format!("/{}", "p".repeat(5000))] {
            let (line, _, m) = err(&tap(bad, ""));
            assert_eq!(line, 4, "{bad}: {m}");
            assert!(m.contains("netns must be a namespace name") && m.contains("absolute path"), "{m}");
        }
        // vmq makes only named namespaces; a path belongs to someone else.
        let (line, _, m) = err(&tap("/proc/1/ns/net", "create_netns = true\n"));
        assert_eq!(line, 4, "{m}");
        assert!(m.contains("create_netns needs a namespace name, not a path"), "{m}");
        parse(&tap("ns1", "create_netns = true\n"), "t").unwrap();
    }

    #[test]
    fn duplicate_mac_on_a_shared_vlan() {
        let a = vm("a", "/run/vmq/a.sock", "52:54:00:00:00:01", "vlan = 10\n");
        let (line, column, m) = err(&format!("{a}{}", vm("b", "/run/vmq/b.sock", "52:54:00:00:00:01", "vlan = 10\n")));
        assert_eq!((line, column), (11, 7), "{m}");
        assert!(m.contains("mac 52:54:00:00:00:01 on VLAN 10 is also port \"a\"'s"), "{m}");
        // A trunk carrying VLAN 10 (as its native VLAN) overlaps too.
        let b = vm("b", "/run/vmq/b.sock", "52:54:00:00:00:01", "trunk = [20]\nnative_vlan = 10\n");
        assert!(err(&format!("{a}{b}")).2.contains("on VLAN 10"));
        // Same MAC on different VLANs is allowed.
        parse(&format!("{a}{}", vm("b", "/run/vmq/b.sock", "52:54:00:00:00:01", "vlan = 20\n")), "t").unwrap();
    }

    #[test]
    fn socket_policy_global_and_per_port() {
        let text = format!(
            "[vhost]\nsocket_owner = \"root\"\nsocket_group = \"107\"\nsocket_mode = \"0660\"\nallowed_uids = [0, 64055, 0]\nsetup_timeout_secs = 5\n{}{}",
            vm("a", "/run/vmq/a.sock", "52:54:00:00:00:01", ""),
            vm(
                "b",
                "/run/vmq/b.sock",
                "52:54:00:00:00:02",
                "socket_mode = \"600\"\nallowed_uids = [1000]\nsocket_group = \"root\"\n"
            ),
        );
        let c = parse(&text, "t").unwrap();
        let global = SocketPolicy {
            owner: Some(0),
            group: Some(107),
            mode: Some(0o660),
            allowed_uids: Some(vec![0, 64055]),
            setup_timeout: Some(std::time::Duration::from_secs(5)),
        };
        assert_eq!(c.vhost, global);
        assert_eq!(
            c.ports[0].backend,
            PortBackend::VhostUser {
                socket: "/run/vmq/a.sock".into(),
                mode: VhostMode::Server,
                policy: global.clone(),
                trust_frontend_memory: false,
                queues: 1,
            }
        );
        let own = SocketPolicy { group: Some(0), mode: Some(0o600), allowed_uids: Some(vec![1000]), ..global };
        assert_eq!(
            c.ports[1].backend,
            PortBackend::VhostUser {
                socket: "/run/vmq/b.sock".into(),
                mode: VhostMode::Server,
                policy: own,
                trust_frontend_memory: false,
                queues: 1,
            }
        );
    }

    #[test]
    fn client_mode_takes_no_listen_side_socket_policy() {
        let vhost =
            "[[port]]\nname = \"v\"\nkind = \"vhost-user\"\nsocket = \"/run/v.sock\"\nmac = \"52:54:00:00:00:01\"\n";
        // `[vhost]` defaults for listening sockets do not reach a client port; its setup timeout does.
        let global = "[vhost]\nsocket_mode = \"0600\"\nallowed_uids = [0]\nsetup_timeout_secs = 7\n";
        let c = parse(&format!("{global}{vhost}vhost_mode = \"client\"\n"), "t.toml").unwrap();
        let timeout_only =
            SocketPolicy { setup_timeout: Some(std::time::Duration::from_secs(7)), ..Default::default() };
        assert_eq!(
            c.ports[0].backend,
            PortBackend::VhostUser {
                socket: "/run/v.sock".into(),
                mode: VhostMode::Client,
                policy: timeout_only,
                trust_frontend_memory: false,
                queues: 1,
            }
        );
        let c = parse(&format!("{vhost}vhost_mode = \"server\"\n"), "t.toml").unwrap();
        assert!(matches!(c.ports[0].backend, PortBackend::VhostUser { mode: VhostMode::Server, .. }));
        // Each listen-side key on a client port: an error at the key's value (line 7: after the
        // five lines of the port and vhost_mode).
        for (key, value, column) in [
            ("socket_owner", "\"root\"", 16),
            ("socket_group", "\"root\"", 16),
            ("socket_mode", "\"0660\"", 15),
            ("allowed_uids", "[0]", 16),
        ] {
            let (line, col, m) = err(&format!("{vhost}vhost_mode = \"client\"\n{key} = {value}\n"));
            assert_eq!((line, col), (7, column), "{key}: {m}");
            assert!(m.contains(key) && m.contains("client"), "{m}");
        }
        let (line, col, m) = err(&format!("{vhost}vhost_mode = \"both\"\n"));
        assert_eq!((line, col), (6, 14), "{m}");
        assert!(m.contains("vhost_mode"), "{m}");
        let (_, _, m) = err("[[port]]\nname = \"t\"\nkind = \"tap\"\nvhost_mode = \"client\"\n");
        assert!(m.contains("takes no `vhost_mode`"), "{m}");
    }

    #[test]
    fn socket_policy_errors_point_at_the_value() {
        let (line, column, m) = err("[vhost]\nsocket_mode = \"0669\"\n");
        assert_eq!((line, column), (2, 15), "{m}");
        assert!(m.contains("socket_mode"), "{m}");
        assert!(err("[vhost]\nsocket_mode = \"1777\"\n").2.contains("socket_mode"));
        let (line, _, m) = err("[vhost]\nsocket_group = \"no-such-group-here\"\n");
        assert_eq!(line, 2);
        assert!(m.contains("no group named"), "{m}");
        assert!(err("[vhost]\nsocket_owner = \"no-such-user-here\"\n").2.contains("no user named"));
        assert!(err("[vhost]\nallowed_uids = []\n").2.contains("empty"));
        assert!(err("[vhost]\nallowed_uids = [-1]\n").2.contains("not a uid"));
        assert!(err("[vhost]\nsetup_timeout_secs = 0\n").2.contains("setup_timeout_secs"));
        assert!(err("[vhost]\nsocket = \"x\"\n").2.contains("unknown field"));
        let (_, _, m) = err("[[port]]\nname = \"t\"\nkind = \"tap\"\nsocket_mode = \"0660\"\n");
        assert!(m.contains("takes no `socket_owner"), "{m}");
    }

    #[test]
    fn metrics_off_and_defaults() {
        let c = parse("[control]\nmetrics = \"off\"\n", "t").unwrap();
        assert_eq!(c.metrics, None);
        assert_eq!(c.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert!(c.ports.is_empty());
    }
}

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
use vmq_core::{Mode, OffloadCaps, PortBackend, PortConfig, PortKind, PortSpec, VlanMode};
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
    socket: Option<PathBuf>,
    metrics: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    name: Spanned<String>,
    kind: Spanned<String>,
    socket: Option<PathBuf>,
    ifname: Option<Spanned<String>>,
    netns: Option<Spanned<String>>,
    create_netns: Option<Spanned<bool>>,
    mac: Option<Spanned<String>>,
    mtu: Option<Spanned<i64>>,
    vlan: Option<Spanned<i64>>,
    trunk: Option<Spanned<Vec<i64>>>,
    native_vlan: Option<Spanned<i64>>,
    allow_mac_spoofing: Option<bool>,
    offloads: Option<bool>,
    uplink: Option<Spanned<String>>,
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
    /// `None` when metrics are off.
    pub metrics: Option<std::net::SocketAddr>,
    pub ports: Vec<PortConfig>,
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

    let mut names = HashSet::new();
    let mut ports = Vec::with_capacity(raw.port.len());
    for port in &raw.port {
        let p = port.get_ref();
        let name = p.name.get_ref();
        if name.is_empty() || name.len() > 32 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(loc.at(&p.name, "port name must be 1 to 32 characters of A-Z a-z 0-9 - _ ."));
        }
        if !names.insert(name.clone()) {
            return Err(loc.at(&p.name, format!("duplicate port name {name:?}")));
        }
        ports.push(port_config(&loc, port)?);
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
        mode,
        workers: workers as usize,
        fdb_capacity: fdb_capacity as usize,
        fdb_aging_secs: fdb_aging_secs as u64,
        vmq_queues: vmq_queues as u16,
        vmq_dynamic,
        rebalance_interval_ms: rebalance_interval_ms as u64,
        hysteresis,
        control_socket: raw.control.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET)),
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

fn port_config(loc: &Locator<'_>, port: &Spanned<RawPort>) -> Result<PortConfig, ConfigError> {
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

    let netns = |v: &Option<Spanned<String>>| -> Result<Option<String>, ConfigError> {
        match v {
            Some(v) if v.get_ref().is_empty() || v.get_ref().contains(['/', '\0']) || v.get_ref().len() > 64 => {
                Err(loc.at(v, "netns must be a namespace name (1 to 64 bytes, no '/')"))
            }
            Some(v) => Ok(Some(v.get_ref().clone())),
            None => Ok(None),
        }
    };

    let backend = match kind {
        PortKind::VhostUser => {
            let socket = p.socket.clone().ok_or_else(|| needs("socket"))?;
            if p.ifname.is_some() {
                return Err(refuses("ifname"));
            }
            PortBackend::VhostUser { socket }
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
            PortBackend::Tap { ifname, netns: netns(&p.netns)?, create_netns }
        }
        PortKind::Uplink => {
            let ifname = ifname(p.ifname.as_ref().ok_or_else(|| needs("ifname"))?)?;
            if p.socket.is_some() {
                return Err(refuses("socket"));
            }
            PortBackend::Uplink { ifname, netns: netns(&p.netns)? }
        }
        PortKind::Mem => PortBackend::Mem,
    };
    if !matches!(kind, PortKind::Tap | PortKind::Uplink) && p.netns.is_some() {
        return Err(refuses("netns"));
    }
    if kind != PortKind::Tap && p.create_netns.is_some() {
        return Err(refuses("create_netns"));
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
            offloads: if p.offloads.unwrap_or(true) { OffloadCaps::ALL } else { OffloadCaps::NONE },
        },
        backend,
        uplink: p.uplink.as_ref().map(|u| u.get_ref().clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (usize, usize, String) {
        match parse(text, "t.toml") {
            Err(ConfigError::Invalid { line, column, message, .. }) => (line, column, message),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = parse(EMBEDDED_DEFAULT, "default").unwrap();
        assert!(!c.ports.is_empty());
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
        assert_eq!(c.ports[0].backend, PortBackend::VhostUser { socket: "/run/vmq/vm1.sock".into() });
        assert_eq!(c.ports[1].spec.vlan, VlanMode::Trunk { allowed: vec![10, 20], native: None });
        assert_eq!(c.ports[1].spec.mtu, 1500);
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

    #[test]
    fn metrics_off_and_defaults() {
        let c = parse("[control]\nmetrics = \"off\"\n", "t").unwrap();
        assert_eq!(c.metrics, None);
        assert_eq!(c.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert!(c.ports.is_empty());
    }
}

//! What a runtime hands the plugin: the `CNI_*` environment variables and the network
//! configuration on stdin, parsed and checked before anything is touched; and the names derived
//! from them (the vmq port name, the pod interface's MAC). Pure: no I/O here.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{CniError, code};

/// The CNI versions this plugin speaks (configurations, results, errors).
pub const SUPPORTED_VERSIONS: [&str; 1] = ["1.0.0"];

/// The control socket when the configuration names none (vmq's default).
pub const DEFAULT_SOCKET: &str = vmq_control::server::DEFAULT_SOCKET;

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl Command {
    pub fn parse(value: Option<&str>) -> Result<Command, CniError> {
        match value {
            Some("ADD") => Ok(Command::Add),
            Some("DEL") => Ok(Command::Del),
            Some("CHECK") => Ok(Command::Check),
            Some("VERSION") => Ok(Command::Version),
            Some(other) => Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "CNI_COMMAND {other:?} is not supported (ADD, DEL, CHECK, VERSION; CNI {})",
                    SUPPORTED_VERSIONS[0]
                ),
            )),
            None => Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
        }
    }
}

/// The environment of an ADD, DEL or CHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// The pod's network namespace, a path. Optional for DEL only (the spec lets a runtime
    /// delete after the namespace is gone).
    pub netns: Option<String>,
    /// The interface name inside the pod.
    pub ifname: String,
    /// `CNI_ARGS`: `K=V` pairs, checked for shape; vmq-cni uses none of them.
    pub args: Vec<(String, String)>,
    /// `CNI_PATH`: where plugins (the IPAM plugin) are looked up.
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Reads and checks the `CNI_*` variables `get` returns for an ADD, DEL or CHECK.
    pub fn parse(command: Command, get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let invalid = |msg: String| Err(CniError::new(code::INVALID_ENV, msg));
        let required = |key: &str| match get(key) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(CniError::new(code::INVALID_ENV, format!("{key} is not set (required for {})", command.name()))),
        };
        let container_id = required("CNI_CONTAINERID")?;
        if !valid_container_id(&container_id) {
            return invalid(format!(
                "CNI_CONTAINERID {container_id:?} is invalid: it must start with a letter or digit, followed by \
                 letters, digits, '_', '.' or '-'"
            ));
        }
        let netns = match command {
            Command::Del => get("CNI_NETNS").filter(|v| !v.is_empty()),
            _ => Some(required("CNI_NETNS")?),
        };
        if let Some(ns) = &netns
            && (!ns.starts_with('/') || ns.contains('\0'))
        {
            return invalid(format!("CNI_NETNS {ns:?} is not an absolute path to a network namespace"));
        }
        let ifname = required("CNI_IFNAME")?;
        if let Err(e) = vmq_sys::ifname::check(&ifname) {
            return invalid(format!("CNI_IFNAME {e}"));
        }
        let args = parse_args(&get("CNI_ARGS").unwrap_or_default())?;
        let path: Vec<PathBuf> =
            required("CNI_PATH")?.split(':').filter(|d| !d.is_empty()).map(PathBuf::from).collect();
        Ok(Env { command, container_id, netns, ifname, args, path })
    }

    /// The namespace, which ADD and CHECK always have (checked by [`Env::parse`]).
    pub fn netns(&self) -> Result<&str, CniError> {
        self.netns.as_deref().ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is not set"))
    }
}

/// The spec's rule for container ids: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
fn valid_container_id(id: &str) -> bool {
    let mut bytes = id.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `CNI_ARGS`: `K1=V1;K2=V2`.
fn parse_args(raw: &str) -> Result<Vec<(String, String)>, CniError> {
    raw.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CniError::new(code::INVALID_ENV, format!("CNI_ARGS: {pair:?} is not KEY=VALUE"))),
        })
        .collect()
}

/// The network configuration on stdin. Fields other plugins or the runtime add
/// (`runtimeConfig`, `args`, ...) are ignored, as the spec lets plugins do.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin: String,
    /// vmq's control socket.
    #[serde(default = "default_socket")]
    pub socket: String,
    /// The pod interface's (and the vmq port's) MTU; vmq's default when absent.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Access VLAN of the pod's port (0 or absent: untagged).
    #[serde(default)]
    pub vlan: Option<u32>,
    /// Checksum/segmentation offloads on the TAP (vmq's default, on, when absent).
    #[serde(default)]
    pub offloads: Option<bool>,
    pub ipam: Option<Ipam>,
    #[serde(default)]
    pub dns: Dns,
    /// CHECK (and DEL): the result ADD returned.
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
}

fn default_socket() -> String {
    DEFAULT_SOCKET.to_string()
}

/// The `ipam` section; only its `type` is read here, the IPAM plugin reads the rest.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Ipam {
    #[serde(rename = "type")]
    pub plugin: String,
}

/// DNS settings, in the configuration and in results.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        *self == Dns::default()
    }
}

impl NetConf {
    /// Parses and checks the configuration.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(code::DECODE_FAILURE, "the network configuration on stdin is not valid").with_details(e)
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {:?} is not supported", conf.cni_version),
            )
            .with_details(format!("vmq-cni supports {}", SUPPORTED_VERSIONS.join(", "))));
        }
        let invalid = |msg: String| Err(CniError::new(code::INVALID_CONFIG, msg));
        if !valid_container_id(&conf.name) {
            return invalid(format!(
                "network name {:?} is invalid: it must start with a letter or digit, followed by letters, digits, \
                 '_', '.' or '-'",
                conf.name
            ));
        }
        if !conf.socket.starts_with('/') {
            return invalid(format!("\"socket\" {:?} must be an absolute path to vmq's control socket", conf.socket));
        }
        match &conf.ipam {
            None => return invalid("the \"ipam\" section is missing (e.g. {\"type\": \"host-local\", ...})".into()),
            Some(ipam) if !plain_file_name(&ipam.plugin) => {
                return invalid(format!("ipam \"type\" {:?} must be a plugin name", ipam.plugin));
            }
            Some(_) => {}
        }
        Ok(conf)
    }

    /// The IPAM plugin's name (present: checked by [`NetConf::parse`]).
    pub fn ipam_plugin(&self) -> &str {
        self.ipam.as_ref().map_or("", |i| i.plugin.as_str())
    }
}

fn plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// SHA-256 of the pod attachment's identity: stable across releases and platforms.
fn attachment_digest(container_id: &str, ifname: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(container_id.as_bytes());
    h.update([0]);
    h.update(ifname.as_bytes());
    h.finalize().into()
}

/// The vmq port of one pod interface: `cni-` + the container id's first 12 characters (for
/// people reading `vmq ctl ports`) + `-` + 8 hex digits of a digest of (container id, ifname)
/// (for uniqueness). At most 25 bytes of `A-Z a-z 0-9 - _ .`, as vmq's port names must be.
pub fn port_name(container_id: &str, ifname: &str) -> String {
    let short: String =
        container_id.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')).take(12).collect();
    let d = attachment_digest(container_id, ifname);
    format!("cni-{short}-{:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3])
}

/// The pod interface's MAC: 46 bits of the digest, locally administered and unicast.
pub fn mac(container_id: &str, ifname: &str) -> [u8; 6] {
    let d = attachment_digest(container_id, ifname);
    let mut mac = [d[4], d[5], d[6], d[7], d[8], d[9]];
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    const FULL: [(&str, &str); 5] = [
        ("CNI_CONTAINERID", "0123456789abcdef0123"),
        ("CNI_NETNS", "/proc/42/ns/net"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
        ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni"),
    ];

    #[test]
    fn env_is_parsed_and_checked() {
        let env = Env::parse(Command::Add, env_of(&FULL)).unwrap();
        assert_eq!(env.netns.as_deref(), Some("/proc/42/ns/net"));
        assert_eq!(env.path, vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]);
        assert_eq!(env.args[1], ("K8S_POD_NAME".to_string(), "web".to_string()));
        fn with<'a>(key: &'a str, value: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
            let mut pairs: Vec<(&str, &str)> = FULL.iter().copied().filter(|(k, _)| *k != key).collect();
            if let Some(v) = value {
                pairs.push((key, v));
            }
            pairs
        }
        for (key, value, command, needle) in [
            ("CNI_NETNS", None, Command::Add, "CNI_NETNS is not set"),
            ("CNI_NETNS", Some("pod1"), Command::Check, "not an absolute path"),
            ("CNI_IFNAME", Some("a-name-of-16-byt"), Command::Add, "longer than 15 bytes"),
            ("CNI_IFNAME", Some("et/h0"), Command::Add, "contains '/'"),
            ("CNI_CONTAINERID", Some("-abc"), Command::Add, "CNI_CONTAINERID \"-abc\" is invalid"),
            ("CNI_CONTAINERID", None, Command::Del, "CNI_CONTAINERID is not set"),
            ("CNI_ARGS", Some("K8S_POD_NAME"), Command::Add, "is not KEY=VALUE"),
            ("CNI_PATH", None, Command::Add, "CNI_PATH is not set"),
        ] {
            let e = Env::parse(command, env_of(&with(key, value))).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{key}={value:?}: {e}");
            assert!(e.msg.contains(needle), "{key}={value:?}: {e}");
        }
        // DEL may come after the namespace is gone.
        let env = Env::parse(Command::Del, env_of(&with("CNI_NETNS", None))).unwrap();
        assert_eq!(env.netns, None);
        assert_eq!(Command::parse(Some("GC")).unwrap_err().code, code::INVALID_ENV);
        assert_eq!(Command::parse(None).unwrap_err().code, code::INVALID_ENV);
    }

    #[test]
    fn config_is_parsed_and_checked() {
        let good = br#"{"cniVersion":"1.0.0","name":"pods","type":"vmq-cni","mtu":9000,"vlan":10,
            "ipam":{"type":"host-local","subnet":"10.1.0.0/24"},"runtimeConfig":{"x":1}}"#;
        let conf = NetConf::parse(good).unwrap();
        assert_eq!(conf.socket, DEFAULT_SOCKET);
        assert_eq!((conf.mtu, conf.vlan, conf.offloads), (Some(9000), Some(10), None));
        assert_eq!(conf.ipam_plugin(), "host-local");
        for (text, want, needle) in [
            (&b"not json"[..], code::DECODE_FAILURE, "not valid"),
            (br#"{"cniVersion":"1.0.0","type":"vmq-cni"}"#, code::DECODE_FAILURE, "not valid"),
            (
                br#"{"cniVersion":"1.0.0","name":"p","type":"vmq-cni","mtu":"big","ipam":{"type":"h"}}"#,
                code::DECODE_FAILURE,
                "not valid",
            ),
            (
                br#"{"cniVersion":"0.3.1","name":"p","type":"vmq-cni","ipam":{"type":"h"}}"#,
                code::INCOMPATIBLE_VERSION,
                "0.3.1",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"p","type":"vmq-cni"}"#,
                code::INVALID_CONFIG,
                "\"ipam\" section is missing",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"p","type":"vmq-cni","ipam":{"type":"../x"}}"#,
                code::INVALID_CONFIG,
                "plugin name",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"p","type":"vmq-cni","socket":"vmq.sock","ipam":{"type":"h"}}"#,
                code::INVALID_CONFIG,
                "absolute path",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"a b","type":"vmq-cni","ipam":{"type":"h"}}"#,
                code::INVALID_CONFIG,
                "network name",
            ),
        ] {
            let e = NetConf::parse(text).unwrap_err();
            assert_eq!(e.code, want, "{}: {e}", String::from_utf8_lossy(text));
            assert!(e.to_string().contains(needle), "{}: {e}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn names_and_macs_are_stable_distinct_and_valid() {
        let id = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let name = port_name(id, "eth0");
        // Fixed forever (SHA-256 of "ID\0eth0", as `hashlib` computes it): a DEL after an upgrade
        // must name the port ADD made.
        assert_eq!(name, "cni-9f86d081884c-5966457e");
        assert_eq!(format_mac(mac(id, "eth0")), "fe:f8:27:62:71:87");
        assert!(name.len() <= 32 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
        assert_ne!(port_name(id, "eth1"), name);
        assert_ne!(mac(id, "eth1"), mac(id, "eth0"));
        // Same 12-character prefix, different containers: different ports.
        assert_ne!(port_name(&format!("{}x", &id[..12]), "eth0"), port_name(&format!("{}y", &id[..12]), "eth0"));
        for (i, ifname) in ["eth0", "net1", "x"].iter().enumerate() {
            let m = mac(&format!("c{i}"), ifname);
            assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast: {}", format_mac(m));
        }
    }
}

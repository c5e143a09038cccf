//! `vmq ctl save`: the running configuration written back into the configuration file.
//!
//! The file is edited, not regenerated (toml_edit): comments, key order and layout of every
//! part that did not change stay as the operator wrote them. A port whose MTU or VLAN changed
//! gets just those keys rewritten; a port added at run time is appended as a new `[[port]]`;
//! a removed port's table goes. The result is checked before it is written: parsed back with
//! the configuration file's own rules, it must describe exactly the running ports and VM queue
//! settings. The write is atomic (temporary file, fsync, rename, fsync of the directory).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, Value};
use vmq_core::fdb::DEFAULT_MAX_LEARNED_MACS;
use vmq_core::vmq::QueuePolicy;
use vmq_core::{OffloadCaps, PortBackend, PortConfig, PortKind, SocketPolicy, VhostMode, VlanMode};

use crate::config::{self, Config};

/// What `save` writes: the switch's running state that a configuration file describes.
#[derive(Debug, Clone)]
pub struct Running {
    pub ports: Vec<PortConfig>,
    pub queues: u16,
    pub policy: QueuePolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the file as it is now is not a valid configuration ({0}); not overwriting it")]
    FileInvalid(String),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("the running configuration cannot be written as a configuration file: {0}")]
    NotExpressible(String),
}

/// Reads `path`, brings it up to `running` and writes it back atomically.
pub fn save(path: &Path, running: &Running) -> Result<(), SaveError> {
    // Write through a symlink to the file it names (/etc/vmq/vmq.toml -> a managed copy).
    let path = std::fs::canonicalize(path).map_err(|source| SaveError::Read { path: path.to_path_buf(), source })?;
    let text = std::fs::read_to_string(&path).map_err(|source| SaveError::Read { path: path.clone(), source })?;
    let updated = updated_text(&text, &path.display().to_string(), running)?;
    if updated != text {
        write_atomically(&path, &updated).map_err(|source| SaveError::Write { path: path.clone(), source })?;
    }
    Ok(())
}

/// `text` (the configuration file) edited to describe `running`.
pub fn updated_text(text: &str, file: &str, running: &Running) -> Result<String, SaveError> {
    let current = config::parse(text, file).map_err(|e| SaveError::FileInvalid(e.to_string()))?;
    let mut doc: DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| SaveError::FileInvalid(e.to_string()))?;

    if current.vmq_queues != running.queues {
        doc["vmq"]["queues"] = edited(doc["vmq"].get("queues"), Value::from(i64::from(running.queues)));
    }
    let dynamic = running.policy == QueuePolicy::Dynamic;
    if current.vmq_dynamic != dynamic {
        let policy = if dynamic { "dynamic" } else { "static" };
        doc["vmq"]["policy"] = edited(doc["vmq"].get("policy"), Value::from(policy));
    }

    let by_name: HashMap<&str, &PortConfig> = running.ports.iter().map(|p| (p.spec.name.as_str(), p)).collect();
    let in_file: HashMap<&str, &PortConfig> = current.ports.iter().map(|p| (p.spec.name.as_str(), p)).collect();
    if !doc.contains_key("port") {
        doc.insert("port", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    let tables = doc["port"]
        .as_array_of_tables_mut()
        .ok_or_else(|| SaveError::FileInvalid("`port` is not an array of [[port]] tables".into()))?;
    let mut gone = Vec::new();
    for (index, table) in tables.iter_mut().enumerate() {
        let name = table.get("name").and_then(Item::as_str).unwrap_or_default().to_string();
        let (Some(now), Some(was)) = (by_name.get(name.as_str()), in_file.get(name.as_str())) else {
            gone.push(index);
            continue;
        };
        if now == was {
            continue;
        }
        let mut only_mtu_vlan = (*was).clone();
        only_mtu_vlan.spec.mtu = now.spec.mtu;
        only_mtu_vlan.spec.vlan = now.spec.vlan.clone();
        if only_mtu_vlan == **now {
            if now.spec.mtu != was.spec.mtu {
                let old = table.get("mtu").cloned();
                table["mtu"] = edited(old.as_ref(), Value::from(i64::from(now.spec.mtu)));
            }
            if now.spec.vlan != was.spec.vlan {
                set_vlan(table, &now.spec.vlan);
            }
        } else {
            // Kind, attachment or policy changed (del-port, then add-port of the same name):
            // the table is rewritten, in its place and with its leading comment.
            let decor = table.decor().clone();
            *table = port_table(now, &current.vhost);
            *table.decor_mut() = decor;
        }
    }
    for index in gone.into_iter().rev() {
        tables.remove(index);
    }
    for port in &running.ports {
        if !in_file.contains_key(port.spec.name.as_str()) {
            tables.push(port_table(port, &current.vhost));
        }
    }
    if tables.is_empty() {
        doc.remove("port");
    }

    let updated = doc.to_string();
    check(&updated, file, running)?;
    Ok(updated)
}

/// `value` in place of `old`, keeping the old value's surrounding spaces and trailing comment.
fn edited(old: Option<&Item>, mut value: Value) -> Item {
    if let Some(decor) = old.and_then(Item::as_value).map(|v| v.decor().clone()) {
        *value.decor_mut() = decor;
    }
    Item::Value(value)
}

fn set_vlan(table: &mut Table, vlan: &VlanMode) {
    match vlan {
        VlanMode::Access(v) => {
            table.remove("trunk");
            table.remove("native_vlan");
            if *v == 0 {
                table.remove("vlan");
            } else {
                let old = table.get("vlan").cloned();
                table["vlan"] = edited(old.as_ref(), Value::from(i64::from(*v)));
            }
        }
        VlanMode::Trunk { allowed, native } => {
            table.remove("vlan");
            table["trunk"] = Item::Value(Value::Array(allowed.iter().map(|v| i64::from(*v)).collect::<Array>()));
            match native {
                Some(n) => table["native_vlan"] = Item::Value(Value::from(i64::from(*n))),
                None => {
                    table.remove("native_vlan");
                }
            }
        }
    }
}

/// A `[[port]]` table for `port`, with only the keys that differ from the defaults (a vhost-user
/// port's socket policy: from `[vhost]`'s).
fn port_table(port: &PortConfig, vhost: &SocketPolicy) -> Table {
    let mut t = Table::new();
    let spec = &port.spec;
    t["name"] = toml_edit::value(spec.name.as_str());
    let kind = match spec.kind {
        PortKind::VhostUser => "vhost-user",
        PortKind::Tap => "tap",
        PortKind::Uplink => "uplink",
        PortKind::Mem => "mem",
    };
    t["kind"] = toml_edit::value(kind);
    match &port.backend {
        PortBackend::VhostUser { socket, mode, policy, trust_frontend_memory, queues } => {
            t["socket"] = toml_edit::value(socket.display().to_string());
            if *mode == VhostMode::Client {
                t["vhost_mode"] = toml_edit::value("client");
            }
            if policy.owner != vhost.owner
                && let Some(owner) = policy.owner
            {
                t["socket_owner"] = toml_edit::value(owner.to_string());
            }
            if policy.group != vhost.group
                && let Some(group) = policy.group
            {
                t["socket_group"] = toml_edit::value(group.to_string());
            }
            if policy.mode != vhost.mode
                && let Some(mode) = policy.mode
            {
                t["socket_mode"] = toml_edit::value(format!("{mode:04o}"));
            }
            if policy.allowed_uids != vhost.allowed_uids
                && let Some(uids) = &policy.allowed_uids
            {
                t["allowed_uids"] = toml_edit::value(uids.iter().map(|u| i64::from(*u)).collect::<Array>());
            }
            if policy.setup_timeout != vhost.setup_timeout
                && let Some(timeout) = policy.setup_timeout
            {
                t["setup_timeout_secs"] = toml_edit::value(timeout.as_secs() as i64);
            }
            if *queues > 1 {
                t["queues"] = toml_edit::value(i64::from(*queues));
            }
            if *trust_frontend_memory {
                t["trust_frontend_memory"] = toml_edit::value(true);
            }
        }
        PortBackend::Tap { ifname, netns, create_netns } => {
            t["ifname"] = toml_edit::value(ifname.as_str());
            if let Some(ns) = netns {
                t["netns"] = toml_edit::value(ns.as_str());
            }
            if *create_netns {
                t["create_netns"] = toml_edit::value(true);
            }
        }
        PortBackend::Uplink { ifname, netns, driver } => {
            t["ifname"] = toml_edit::value(ifname.as_str());
            if let Some(ns) = netns {
                t["netns"] = toml_edit::value(ns.as_str());
            }
            if *driver != vmq_core::UplinkDriver::default() {
                t["driver"] = toml_edit::value(driver.kind.name());
                t["xdp_mode"] = toml_edit::value(driver.xdp_mode.name());
                t["zero_copy"] = toml_edit::value(driver.zero_copy.name());
                if let Some(ids) = driver.xdp_queues.ids() {
                    t["xdp_queues"] = toml_edit::value(ids.iter().map(|&q| i64::from(q)).collect::<toml_edit::Array>());
                }
            }
        }
        PortBackend::Mem => {}
    }
    if let Some(mac) = spec.mac {
        t["mac"] = toml_edit::value(mac.to_string());
    }
    if spec.mtu != 1500 {
        t["mtu"] = toml_edit::value(i64::from(spec.mtu));
    }
    set_vlan(&mut t, &spec.vlan);
    if spec.allow_mac_spoofing {
        t["allow_mac_spoofing"] = toml_edit::value(true);
    }
    if spec.max_learned_macs != DEFAULT_MAX_LEARNED_MACS {
        t["max_learned_macs"] = toml_edit::value(i64::from(spec.max_learned_macs));
    }
    if spec.offloads == OffloadCaps::NONE {
        t["offloads"] = toml_edit::value(false);
    }
    if let Some(uplink) = &port.uplink {
        t["uplink"] = toml_edit::value(uplink.as_str());
    }
    t
}

/// The edited file, read back, must say what is running.
fn check(text: &str, file: &str, running: &Running) -> Result<(), SaveError> {
    let parsed: Config = config::parse(text, file).map_err(|e| SaveError::NotExpressible(e.to_string()))?;
    let mismatch = |what: String| Err(SaveError::NotExpressible(what));
    if parsed.vmq_queues != running.queues || parsed.vmq_dynamic != (running.policy == QueuePolicy::Dynamic) {
        return mismatch("the VM queue settings do not read back".into());
    }
    if parsed.ports.len() != running.ports.len() {
        return mismatch(format!("{} ports read back, {} running", parsed.ports.len(), running.ports.len()));
    }
    for port in &running.ports {
        match parsed.ports.iter().find(|p| p.spec.name == port.spec.name) {
            Some(p) if p == port => {}
            _ => return mismatch(format!("port {:?} does not read back as it runs", port.spec.name)),
        }
    }
    Ok(())
}

/// Replaces `path` with `text` so that a crash leaves either the old file or the new one: a
/// temporary file beside it (same permissions), fsync, rename over it, fsync of the directory.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.vmq-save.{}", std::process::id()));
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"# vmq on host A: keep this comment
[switch]
workers = 2

[vmq]
queues = 4 # budget agreed with the NIC team

# The uplink.
[[port]]
name = "up0"
kind = "uplink"
ifname = "eth1"
mtu = 9000 # jumbo

# VM one: its comment stays.
[[port]]
name = "vm1"
kind = "mem"
mac = "52:54:00:00:00:01"
vlan = 10

# VM two, removed at run time.
[[port]]
name = "vm2"
kind = "mem"
mac = "52:54:00:00:00:02"
"#;

    fn running(text: &str) -> Running {
        let c = config::parse(text, "t").unwrap();
        Running {
            ports: c.ports,
            queues: c.vmq_queues,
            policy: if c.vmq_dynamic { QueuePolicy::Dynamic } else { QueuePolicy::Static },
        }
    }

    #[test]
    fn nothing_changed_leaves_the_file_byte_for_byte() {
        assert_eq!(updated_text(FILE, "t", &running(FILE)).unwrap(), FILE);
    }

    #[test]
    fn run_time_changes_are_written_and_comments_stay() {
        let mut r = running(FILE);
        r.ports.retain(|p| p.spec.name != "vm2");
        r.ports[0].spec.mtu = 1500;
        r.ports[1].spec.vlan = VlanMode::Trunk { allowed: vec![10, 20], native: Some(10) };
        let added = config::parse(
            "[[port]]\nname = \"vm3\"\nkind = \"vhost-user\"\nsocket = \"/run/vmq/vm3.sock\"\nmac = \"52:54:00:00:00:03\"\nsocket_mode = \"0660\"\nuplink = \"up0\"\nmtu = 9000\nqueues = 3\n[[port]]\nname = \"up0\"\nkind = \"uplink\"\nifname = \"eth1\"\n",
            "t",
        )
        .unwrap()
        .ports
        .remove(0);
        r.ports.push(added.clone());
        r.queues = 2;
        r.policy = QueuePolicy::Static;
        let text = updated_text(FILE, "t", &r).unwrap();
        for kept in ["# vmq on host A: keep this comment", "# The uplink.", "# VM one: its comment stays."] {
            assert!(text.contains(kept), "{kept:?} lost:\n{text}");
        }
        assert!(text.contains("queues = 2 # budget agreed with the NIC team"), "{text}");
        assert!(text.contains("mtu = 1500 # jumbo"), "{text}");
        assert!(text.contains("policy = \"static\""), "{text}");
        assert!(!text.contains("vm2") && !text.contains("VM two"), "{text}");
        let back = config::parse(&text, "t").unwrap();
        assert_eq!(back.ports, r.ports);
        assert_eq!(back.ports[2], added);
        assert_eq!((back.vmq_queues, back.vmq_dynamic), (2, false));
    }

    #[test]
    fn a_port_re_added_with_another_kind_is_rewritten_in_place() {
        let mut r = running(FILE);
        let tap = config::parse(
            "[[port]]\nname = \"vm1\"\nkind = \"tap\"\nifname = \"tap1\"\nnetns = \"ns1\"\nmac = \"52:54:00:00:00:01\"\n",
            "t",
        )
        .unwrap()
        .ports
        .remove(0);
        r.ports[1] = tap.clone();
        let text = updated_text(FILE, "t", &r).unwrap();
        assert!(text.contains("# VM one: its comment stays.\n[[port]]\nname = \"vm1\"\nkind = \"tap\""), "{text}");
        assert_eq!(config::parse(&text, "t").unwrap().ports[1], tap);
    }

    #[test]
    fn an_af_xdp_uplink_keeps_its_driver_keys() {
        let mut r = running(FILE);
        let up = config::parse(
            "[[port]]\nname = \"up0\"\nkind = \"uplink\"\nifname = \"eth1\"\ndriver = \"af_xdp\"\nxdp_mode = \"generic\"\nxdp_queues = [2, 0]\n",
            "t",
        )
        .unwrap()
        .ports
        .remove(0);
        r.ports[0] = up.clone();
        let text = updated_text(FILE, "t", &r).unwrap();
        assert!(text.contains("xdp_queues = [0, 2]"), "{text}");
        assert_eq!(config::parse(&text, "t").unwrap().ports[0], up);
    }

    #[test]
    fn an_invalid_file_is_not_overwritten() {
        let e = updated_text("[switch]\nworkers = 0\n", "t", &running(FILE)).unwrap_err();
        assert!(matches!(e, SaveError::FileInvalid(_)), "{e}");
    }

    #[test]
    fn the_write_is_atomic_and_keeps_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vmq-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vmq.toml");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomically(&path, "new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "temporary file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

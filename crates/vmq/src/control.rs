//! Between the configuration / core types and the control plane (`vmq-control`): the control
//! socket and metrics settings of a [`Config`], an `add-port` request validated by exactly the
//! rules of a configuration file's `[[port]]`, and the core's ports and counters in protocol
//! form. The `ControlHandler` over the data path is built from these.

use vmq_control::metrics::MetricsConfig;
use vmq_control::protocol::{
    ControlError, ErrorCode, MigrationInfo, NewPort, OffloadCounters, OffloadInfo, PortCounters, PortInfo, PortState,
    SwitchMode, VhostInfo, VhostModeInfo, VlanInfo,
};
use vmq_control::server::ServerConfig;
use vmq_core::stats::PortStatsSnapshot;
use vmq_core::{DropReason, Mode, OffloadCaps, PortBackend, PortConfig, PortKind, VhostMode, VlanMode};
use vmq_datapath::VhostLink;

use crate::config::{self, Config, ConfigError};

/// The control socket as `[control] socket` sets it (default `/run/vmq/vmq.sock`).
pub fn server_config(c: &Config) -> ServerConfig {
    ServerConfig::new(&c.control_socket)
}

/// The metrics exporter as `[control] metrics` sets it; `None` for `"off"`.
pub fn metrics_config(c: &Config) -> Option<MetricsConfig> {
    c.metrics.map(MetricsConfig::new)
}

fn protocol_kind(kind: PortKind) -> vmq_control::protocol::PortKind {
    use vmq_control::protocol::PortKind as P;
    match kind {
        PortKind::VhostUser => P::VhostUser,
        PortKind::Tap => P::Tap,
        PortKind::Uplink => P::Uplink,
        PortKind::Mem => P::Mem,
    }
}

/// An `add-port` request as a port configuration, checked by the configuration file's rules
/// (same defaults, same messages) against the ports the switch has now. Errors are
/// `port_exists` or `invalid_value`.
pub fn port_config(new: &NewPort, existing: &[PortConfig]) -> Result<PortConfig, ControlError> {
    if existing.iter().any(|p| p.spec.name == new.name) {
        return Err(ControlError::new(ErrorCode::PortExists, format!("a port named {:?} exists already", new.name)));
    }
    // The request becomes a one-port configuration file, so that every rule and default of
    // `[[port]]` applies unchanged. `uplink` is left out of it and checked below against the
    // running switch, since the file holds no other port to refer to.
    use toml::Value;
    let mut port = toml::Table::new();
    port.insert("name".into(), Value::String(new.name.clone()));
    port.insert("kind".into(), Value::String(new.kind.name().into()));
    for (key, value) in [("socket", &new.socket), ("ifname", &new.ifname), ("netns", &new.netns), ("mac", &new.mac)] {
        if let Some(v) = value {
            port.insert(key.into(), Value::String(v.clone()));
        }
    }
    for (key, value) in [("mtu", new.mtu), ("vlan", new.vlan), ("native_vlan", new.native_vlan), ("queues", new.queues)]
    {
        if let Some(v) = value {
            port.insert(key.into(), Value::Integer(i64::from(v)));
        }
    }
    if let Some(trunk) = &new.trunk {
        port.insert("trunk".into(), Value::Array(trunk.iter().map(|v| Value::Integer(i64::from(*v))).collect()));
    }
    for (key, value) in
        [("allow_mac_spoofing", new.allow_mac_spoofing), ("offloads", new.offloads), ("create_netns", new.create_netns)]
    {
        if let Some(v) = value {
            port.insert(key.into(), Value::Boolean(v));
        }
    }
    let mut document = toml::Table::new();
    document.insert("port".into(), Value::Array(vec![Value::Table(port)]));
    let text =
        toml::to_string(&document).map_err(|e| ControlError::internal(format!("cannot encode the port: {e}")))?;
    let mut parsed = config::parse(&text, "add-port").map_err(|e| match e {
        ConfigError::Invalid { message, .. } => ControlError::invalid_value(message),
        other => ControlError::internal(other.to_string()),
    })?;
    let mut port = parsed.ports.pop().ok_or_else(|| ControlError::internal("the port vanished in parsing"))?;
    // The file's checks across ports, against the running ones (same socket, interface, or
    // MAC on a shared VLAN).
    if let Some((other, conflict)) = existing.iter().find_map(|o| Some((o, config::conflict(&port, o)?))) {
        return Err(ControlError::invalid_value(format!(
            "port {:?}: {}",
            new.name,
            conflict.describe(&other.spec.name)
        )));
    }
    if let Some(uplink) = &new.uplink {
        if !port.spec.kind.is_vm() {
            return Err(ControlError::invalid_value(format!(
                "port {:?} of kind {:?} takes no `uplink`",
                new.name,
                new.kind.name()
            )));
        }
        if !existing.iter().any(|p| &p.spec.name == uplink && p.spec.kind == PortKind::Uplink) {
            return Err(ControlError::invalid_value(format!(
                "uplink {uplink:?} is not the name of a port of kind \"uplink\""
            )));
        }
        port.uplink = Some(uplink.clone());
    }
    Ok(port)
}

pub fn switch_mode(mode: Mode) -> SwitchMode {
    match mode {
        Mode::Vmq => SwitchMode::Vmq,
        Mode::Switch => SwitchMode::Switch,
    }
}

/// A configured port as `show`/`ports` report it; `offloads` are those in effect (after
/// negotiation with the VM or TAP), `vhost` a vhost-user port's connection.
pub fn port_info(port: &PortConfig, state: PortState, offloads: OffloadCaps, vhost: Option<VhostLink>) -> PortInfo {
    let spec = &port.spec;
    let (socket, ifname, netns) = match &port.backend {
        PortBackend::VhostUser { socket, .. } => (Some(socket.display().to_string()), None, None),
        PortBackend::Tap { ifname, netns, .. } | PortBackend::Uplink { ifname, netns, .. } => {
            (None, Some(ifname.clone()), netns.clone())
        }
        PortBackend::Mem => (None, None, None),
    };
    PortInfo {
        name: spec.name.clone(),
        kind: protocol_kind(spec.kind),
        state,
        mac: spec.mac.map(|m| m.to_string()),
        mtu: spec.mtu,
        vlan: match &spec.vlan {
            VlanMode::Access(vlan) => VlanInfo::Access { vlan: *vlan },
            VlanMode::Trunk { allowed, native } => VlanInfo::Trunk { allowed: allowed.clone(), native: *native },
        },
        offloads: OffloadInfo { csum: offloads.csum, tso4: offloads.tso4, tso6: offloads.tso6, ecn: offloads.ecn },
        allow_mac_spoofing: spec.allow_mac_spoofing,
        uplink: port.uplink.clone(),
        socket,
        ifname,
        netns,
        vhost: vhost.map(|v| VhostInfo {
            mode: match v.mode {
                VhostMode::Server => VhostModeInfo::Server,
                VhostMode::Client => VhostModeInfo::Client,
            },
            connected: v.connected,
            connections: v.connections,
            migration: Some(MigrationInfo {
                logging: v.logging,
                log_starts: v.log_starts,
                migrated_out: v.migrated_out,
                announces: v.announces,
            }),
        }),
        rx_filter: None,
        driver: None,
        queue_pairs: None,
    }
}

/// A port's applied guest receive filter in protocol form.
pub fn rx_filter_view(f: &vmq_core::rxfilter::RxFilter) -> vmq_control::protocol::RxFilterView {
    vmq_control::protocol::RxFilterView {
        promiscuous: f.promiscuous,
        promiscuous_refused: f.promiscuous_refused,
        multicast: f.multicast.name().to_string(),
        multicast_entries: f.multicast_entries() as u32,
        unicast_entries: f.unicast_table.len() as u32,
        vlans: f.vlans.clone(),
    }
}

/// A port's counters in protocol form: every drop reason by its stable name, zeros included.
pub fn port_counters(name: &str, s: &PortStatsSnapshot) -> PortCounters {
    PortCounters {
        port: name.to_string(),
        rx_packets: s.rx_packets,
        rx_bytes: s.rx_bytes,
        tx_packets: s.tx_packets,
        tx_bytes: s.tx_bytes,
        drops: DropReason::ALL.iter().map(|r| (r.name().to_string(), s.drops(*r))).collect(),
        offload: OffloadCounters {
            segments: s.offload_segments,
            csum_finished: s.offload_csum_finished,
            coalesced: s.offload_coalesced,
            gso_passed: s.offload_gso_passed,
        },
        fdb_full: s.fdb_full,
        kernel_drops: s.kernel_drops,
        corrupt_blocks: s.corrupt_blocks,
        fdb_moves: s.fdb_moves,
        fdb_limit: s.fdb_limit,
        mac_change_refused: s.mac_change_refused,
        promiscuous_refused: s.promiscuous_refused,
        qmp_errors: s.qmp_errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmq_control::protocol::PortKind as Kind;

    fn uplink() -> PortConfig {
        config::parse("[[port]]\nname = \"up0\"\nkind = \"uplink\"\nifname = \"eth9\"\n", "t").unwrap().ports.remove(0)
    }

    fn vm(name: &str) -> NewPort {
        NewPort {
            name: name.into(),
            kind: Kind::VhostUser,
            socket: Some(format!("/run/vmq/{name}.sock")),
            mac: Some("52:54:00:00:00:03".into()),
            ..NewPort::default()
        }
    }

    #[test]
    fn add_port_gets_the_configuration_files_defaults() {
        let p = port_config(&vm("vm3"), &[uplink()]).unwrap();
        assert_eq!(p.spec.mtu, 1500);
        assert_eq!(p.spec.vlan, VlanMode::Access(0));
        assert_eq!(p.spec.offloads, OffloadCaps::ALL);
        assert!(!p.spec.allow_mac_spoofing);
        assert_eq!(
            p.backend,
            PortBackend::VhostUser {
                socket: "/run/vmq/vm3.sock".into(),
                mode: VhostMode::Server,
                policy: Default::default(),
                trust_frontend_memory: false,
                queues: 1,
            }
        );
        let tap = port_config(&NewPort { name: "t1".into(), kind: Kind::Tap, ..NewPort::default() }, &[]).unwrap();
        assert_eq!(tap.backend, PortBackend::Tap { ifname: "t1".into(), netns: None, create_netns: false });
    }

    #[test]
    fn add_port_takes_every_field() {
        let new = NewPort {
            mtu: Some(9000),
            trunk: Some(vec![20, 10]),
            native_vlan: Some(10),
            uplink: Some("up0".into()),
            allow_mac_spoofing: Some(true),
            offloads: Some(false),
            queues: Some(4),
            ..vm("vm3")
        };
        let p = port_config(&new, &[uplink()]).unwrap();
        assert_eq!(p.spec.mtu, 9000);
        let PortBackend::VhostUser { queues, .. } = &p.backend else { panic!("not a VM port: {:?}", p.backend) };
        assert_eq!(*queues, 4, "--queue-pairs reaches the port");
        assert_eq!(p.spec.vlan, VlanMode::Trunk { allowed: vec![10, 20], native: Some(10) });
        assert_eq!(p.uplink.as_deref(), Some("up0"));
        assert!(p.spec.allow_mac_spoofing);
        assert_eq!(p.spec.offloads, OffloadCaps::NONE);
        let info = port_info(&p, PortState::Down, OffloadCaps::NONE, None);
        assert_eq!(info.vlan, VlanInfo::Trunk { allowed: vec![10, 20], native: Some(10) });
        assert_eq!(info.socket.as_deref(), Some("/run/vmq/vm3.sock"));
        assert_eq!(info.mac.as_deref(), Some("52:54:00:00:00:03"));
        assert_eq!(info.kind, Kind::VhostUser);
    }

    #[test]
    fn add_port_refuses_what_the_configuration_file_refuses() {
        let invalid = |new: NewPort| {
            let e = port_config(&new, &[uplink()]).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidValue, "{e}");
            e.message
        };
        assert!(invalid(NewPort { mtu: Some(9001), ..vm("a") }).contains("mtu"));
        assert!(invalid(NewPort { vlan: Some(4095), ..vm("a") }).contains("VLAN"));
        assert!(invalid(NewPort { mac: Some("01:00:5e:00:00:01".into()), ..vm("a") }).contains("unicast"));
        assert!(invalid(NewPort { mac: None, ..vm("a") }).contains("needs `mac`"));
        assert!(invalid(NewPort { socket: None, ..vm("a") }).contains("needs `socket`"));
        assert!(invalid(NewPort { vlan: Some(1), trunk: Some(vec![2]), ..vm("a") }).contains("not both"));
        assert!(invalid(NewPort { name: "bad name".into(), ..vm("a") }).contains("port name"));
        assert!(invalid(NewPort { name: "x\"]\n[switch]".into(), ..vm("a") }).contains("port name"));
        assert!(invalid(NewPort { uplink: Some("nope".into()), ..vm("a") }).contains("not the name of a port"));
        let tap = NewPort { name: "t".into(), kind: Kind::Tap, uplink: Some("up0".into()), ..NewPort::default() };
        assert!(invalid(tap).contains("takes no `uplink`"));
        assert!(invalid(NewPort { queues: Some(17), ..vm("a") }).contains("queues"), "queue pairs above 16");
        assert!(invalid(NewPort { queues: Some(0), ..vm("a") }).contains("queues"), "no queue pairs");
        let tap_mq = NewPort { name: "t".into(), kind: Kind::Tap, queues: Some(2), ..NewPort::default() };
        assert!(invalid(tap_mq).contains("queues"), "TAP ports take no queue pairs");
        let e = port_config(&vm("up0"), &[uplink()]).unwrap_err();
        assert_eq!(e.code, ErrorCode::PortExists);
        // Conflicts with running ports, as between ports of the file.
        let vm3 = port_config(&vm("vm3"), &[uplink()]).unwrap();
        let same_mac = NewPort { socket: Some("/run/vmq/other.sock".into()), ..vm("vm4") };
        let e = port_config(&same_mac, &[uplink(), vm3.clone()]).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidValue);
        assert!(e.message.contains("mac 52:54:00:00:00:03 on VLAN 0 is also port \"vm3\"'s"), "{}", e.message);
        let same_socket = NewPort { mac: Some("52:54:00:00:00:04".into()), ..vm("vm4") };
        let e = port_config(&NewPort { socket: Some("/run/vmq/vm3.sock".into()), ..same_socket }, &[vm3]).unwrap_err();
        assert!(e.message.contains("socket /run/vmq/vm3.sock is also port \"vm3\"'s"), "{}", e.message);
    }

    #[test]
    fn counters_name_every_drop_reason() {
        let snapshot = PortStatsSnapshot {
            rx_packets: 3,
            fdb_full: 2,
            fdb_moves: 4,
            fdb_limit: 5,
            kernel_drops: 7,
            corrupt_blocks: 1,
            ..Default::default()
        };
        let c = port_counters("vm1", &snapshot);
        assert_eq!((c.kernel_drops, c.corrupt_blocks), (7, 1));
        assert_eq!(c.drops.len(), DropReason::ALL.len());
        assert!(c.drops.contains_key("oversize") && c.drops.contains_key("no_buffer"));
        assert_eq!((c.rx_packets, c.fdb_full, c.fdb_moves, c.fdb_limit), (3, 2, 4, 5));
    }

    #[test]
    fn control_settings_come_from_the_configuration() {
        let c = config::parse("[control]\nsocket = \"/tmp/x.sock\"\nmetrics = \"127.0.0.1:9999\"\n", "t").unwrap();
        assert_eq!(server_config(&c).socket, std::path::PathBuf::from("/tmp/x.sock"));
        assert_eq!(metrics_config(&c).unwrap().addr, "127.0.0.1:9999".parse().unwrap());
        let off = config::parse("[control]\nmetrics = \"off\"\n", "t").unwrap();
        assert!(metrics_config(&off).is_none());
        assert_eq!(switch_mode(c.mode), SwitchMode::Vmq);
        assert_eq!(switch_mode(Mode::Switch), SwitchMode::Switch);
        assert_eq!(server_config(&off).socket, std::path::PathBuf::from(vmq_control::server::DEFAULT_SOCKET));
    }
}

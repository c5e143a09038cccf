//! Reload (SIGHUP, `systemctl reload vmq`): the configuration file is read again and the
//! difference from what runs is applied through the run-time paths `vmq ctl` uses.
//!
//! The new file is validated completely, and the whole change planned against the running
//! ports, before anything is touched: a file that does not parse, fails a check, or changes a
//! setting that only a restart can change is refused and the switch keeps running as it was.
//! Ports the file leaves unchanged are not touched at all, so their traffic flows on. A port
//! whose MTU or VLAN changed is changed in place; one whose kind, attachment or any other key
//! changed is removed and added again.

use std::collections::HashMap;

use vmq_core::vmq::QueuePolicy;
use vmq_core::{PortConfig, PortKind, SocketPolicy, VlanMode};

use crate::config::Config;

/// The changes that bring the running switch to a new configuration, in the order applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub queues: Option<u16>,
    pub policy: Option<QueuePolicy>,
    /// Ports removed, and ports removed to be added again (kind or attachment changed).
    pub remove: Vec<String>,
    pub mtu: Vec<(String, u16)>,
    pub vlan: Vec<(String, VlanMode)>,
    /// Ports added (uplinks first, so that VM ports can name them), in file order.
    pub add: Vec<PortConfig>,
    /// `[vhost]`, the socket policy of ports added later with `add-port`.
    pub socket_defaults: Option<SocketPolicy>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }

    /// One line for the log: what the reload does.
    pub fn summary(&self) -> String {
        let names = |ports: &mut dyn Iterator<Item = &str>| ports.collect::<Vec<_>>().join(",");
        format!(
            "remove [{}], add [{}], mtu [{}], vlan [{}], queues {:?}, policy {:?}",
            names(&mut self.remove.iter().map(String::as_str)),
            names(&mut self.add.iter().map(|p| p.spec.name.as_str())),
            names(&mut self.mtu.iter().map(|(n, _)| n.as_str())),
            names(&mut self.vlan.iter().map(|(n, _)| n.as_str())),
            self.queues,
            self.policy,
        )
    }
}

/// What runs now: the ports (as `add-port`/`set` left them), VM queue settings, and the
/// configuration the switch was started with or last reloaded from (for settings that only a
/// restart changes).
pub struct Current<'a> {
    pub applied: &'a Config,
    pub ports: &'a [PortConfig],
    pub queues: u16,
    pub policy: QueuePolicy,
    pub socket_defaults: &'a SocketPolicy,
}

/// The plan from `current` to `new` (a validated configuration), or why it is refused.
pub fn plan(current: &Current<'_>, new: &Config) -> Result<Plan, String> {
    let old = current.applied;
    let restart_only: [(&str, bool); 8] = [
        ("[switch] mode", old.mode != new.mode),
        ("[switch] workers", old.workers != new.workers),
        ("[switch] fdb_capacity", old.fdb_capacity != new.fdb_capacity),
        ("[switch] fdb_aging_secs", old.fdb_aging_secs != new.fdb_aging_secs),
        ("[vmq] rebalance_interval_ms", old.rebalance_interval_ms != new.rebalance_interval_ms),
        ("[vmq] hysteresis", old.hysteresis != new.hysteresis),
        ("[control] socket", old.control_socket != new.control_socket),
        ("[control] metrics", old.metrics != new.metrics),
    ];
    let changed: Vec<&str> = restart_only.iter().filter(|(_, c)| *c).map(|(k, _)| *k).collect();
    if !changed.is_empty() {
        return Err(format!("{} cannot change while vmq runs (restart vmq for that)", changed.join(", ")));
    }
    // The uplinks were created with the starting budget's queue count: more needs a restart.
    if new.vmq_queues > old.vmq_queues.max(current.queues) {
        return Err(format!(
            "[vmq] queues {} exceeds the {} queues the uplinks were opened with (restart vmq for more)",
            new.vmq_queues,
            old.vmq_queues.max(current.queues)
        ));
    }
    let mut plan = Plan::default();
    if new.vmq_queues != current.queues {
        plan.queues = Some(new.vmq_queues);
    }
    let policy = if new.vmq_dynamic { QueuePolicy::Dynamic } else { QueuePolicy::Static };
    if policy != current.policy {
        plan.policy = Some(policy);
    }
    if new.vhost != *current.socket_defaults {
        plan.socket_defaults = Some(new.vhost.clone());
    }
    let wanted: HashMap<&str, &PortConfig> = new.ports.iter().map(|p| (p.spec.name.as_str(), p)).collect();
    let mut readd = Vec::new();
    for running in current.ports {
        let name = running.spec.name.as_str();
        let Some(want) = wanted.get(name) else {
            plan.remove.push(name.to_string());
            continue;
        };
        if running == *want {
            continue;
        }
        let mut in_place = running.clone();
        in_place.spec.mtu = want.spec.mtu;
        in_place.spec.vlan = want.spec.vlan.clone();
        if in_place == **want {
            if running.spec.mtu != want.spec.mtu {
                plan.mtu.push((name.to_string(), want.spec.mtu));
            }
            if running.spec.vlan != want.spec.vlan {
                plan.vlan.push((name.to_string(), want.spec.vlan.clone()));
            }
        } else {
            plan.remove.push(name.to_string());
            readd.push(name);
        }
    }
    let running: HashMap<&str, &PortConfig> = current.ports.iter().map(|p| (p.spec.name.as_str(), p)).collect();
    let added = new.ports.iter().filter(|p| {
        let name = p.spec.name.as_str();
        !running.contains_key(name) || readd.contains(&name)
    });
    let (uplinks, others): (Vec<&PortConfig>, Vec<&PortConfig>) = added.partition(|p| p.spec.kind == PortKind::Uplink);
    plan.add = uplinks.into_iter().chain(others).cloned().collect();
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    const BASE: &str = "[switch]\nworkers = 2\n[vmq]\nqueues = 4\n";

    fn mem(name: &str, n: u8, extra: &str) -> String {
        format!("[[port]]\nname = \"{name}\"\nkind = \"mem\"\nmac = \"52:54:00:00:00:{n:02x}\"\n{extra}")
    }

    fn plan_between(old: &str, new: &str) -> Result<Plan, String> {
        let old = config::parse(old, "old").unwrap();
        let new = config::parse(new, "new").unwrap();
        let current = Current {
            applied: &old,
            ports: &old.ports,
            queues: old.vmq_queues,
            policy: if old.vmq_dynamic { QueuePolicy::Dynamic } else { QueuePolicy::Static },
            socket_defaults: &old.vhost,
        };
        plan(&current, &new)
    }

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let text = format!("{BASE}{}{}", mem("a", 1, ""), mem("b", 2, ""));
        assert!(plan_between(&text, &text).unwrap().is_empty());
    }

    #[test]
    fn add_remove_mtu_vlan_and_re_add() {
        let uplink = "[[port]]\nname = \"up0\"\nkind = \"uplink\"\nifname = \"eth1\"\n";
        let old = format!("{BASE}{}{}{}{}", mem("a", 1, ""), mem("b", 2, ""), mem("c", 3, ""), mem("d", 4, ""));
        let new = format!(
            "{BASE}{}{}{}{}{uplink}",
            mem("a", 1, ""),
            mem("b", 2, "mtu = 9000\nvlan = 5\n"),
            mem("d", 4, "allow_mac_spoofing = true\n"),
            mem("e", 5, "uplink = \"up0\"\n"),
        );
        let p = plan_between(&old, &new).unwrap();
        assert_eq!(p.remove, vec!["c".to_string(), "d".to_string()]);
        assert_eq!(p.mtu, vec![("b".to_string(), 9000)]);
        assert_eq!(p.vlan, vec![("b".to_string(), VlanMode::Access(5))]);
        let added: Vec<&str> = p.add.iter().map(|p| p.spec.name.as_str()).collect();
        assert_eq!(added, vec!["up0", "d", "e"], "uplinks first, then file order");
        assert!(p.add[1].spec.allow_mac_spoofing);
        assert_eq!((p.queues, p.policy), (None, None));
    }

    #[test]
    fn queue_settings_change_within_the_starting_budget() {
        let p = plan_between(BASE, "[switch]\nworkers = 2\n[vmq]\nqueues = 2\npolicy = \"static\"\n").unwrap();
        assert_eq!((p.queues, p.policy), (Some(2), Some(QueuePolicy::Static)));
        let e = plan_between(BASE, "[switch]\nworkers = 2\n[vmq]\nqueues = 5\n").unwrap_err();
        assert!(e.contains("queues 5 exceeds the 4"), "{e}");
    }

    #[test]
    fn restart_only_settings_are_refused_by_name() {
        let e = plan_between(BASE, "[switch]\nworkers = 3\nmode = \"switch\"\n[vmq]\nqueues = 4\n").unwrap_err();
        assert!(e.contains("[switch] mode, [switch] workers cannot change"), "{e}");
        let e = plan_between(BASE, &format!("{BASE}[control]\nmetrics = \"off\"\n")).unwrap_err();
        assert!(e.contains("[control] metrics"), "{e}");
    }
}

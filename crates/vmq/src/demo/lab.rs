//! The demo's small host in network namespaces: an external host behind a veth pair whose other
//! end is vmq's uplink, and one namespace per "VM" (vmq creates the VM's TAP inside it). Every
//! namespace and link made here is removed when the [`Lab`] is dropped, also on error or Ctrl-C.
//!
//! Links and addresses are set with iproute2's `ip` (always present where network namespaces
//! are): the demo is a harness around vmq, and `ip` is what a reader would type to do the same.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use vmq_sys::netns::{self, Netns};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("network namespace: {0}")]
    Netns(#[from] netns::NetnsError),
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error(
        "namespace {0} exists: another `vmq demo` is running, or one was killed (remove its namespaces with `ip netns del`)"
    )]
    Busy(String),
}

/// Runs a command, turning a failure into an error that shows the command and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, LabError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Command { command: command.clone(), detail: e.to_string() })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(LabError::Command { command, detail: if detail.is_empty() { out.status.to_string() } else { detail } })
    }
}

/// Is `program` on the PATH?
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|dir| dir.join(program).is_file())).unwrap_or(false)
}

/// One end host: a namespace, its interface and address.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub vlan: u16,
}

impl Host {
    /// Gives the interface its address and MTU (vmq re-creates TAPs for every run).
    pub fn configure(&self, mtu: u16) -> Result<(), LabError> {
        let ns = self.netns.as_str();
        let addr = format!("{}/24", self.ip);
        run("ip", &["-n", ns, "link", "set", &self.ifname, "mtu", &mtu.to_string(), "up"])?;
        run("ip", &["-n", ns, "addr", "replace", &addr, "dev", &self.ifname])?;
        Ok(())
    }
}

/// The namespaces and links of the demo.
pub struct Lab {
    pub external: Host,
    /// The switch side of the veth pair (vmq's uplink).
    pub uplink_netns: String,
    pub uplink_ifname: String,
    pub vms: Vec<Host>,
    /// Guards: dropping them deletes the namespaces (and the links and TAPs left inside).
    _namespaces: Vec<Netns>,
}

/// Prefix of everything the demo creates.
pub const PREFIX: &str = "vmq-demo";
pub const SUBNET: [u8; 3] = [10, 200, 0];

impl Lab {
    /// Creates the namespaces and the veth pair. `vms`: (name, netns, ifname, vlan) of each VM
    /// port, in order; VM k gets 10.200.0.k, the external host 10.200.0.100.
    pub fn build(
        uplink_netns: &str,
        uplink_ifname: &str,
        vms: &[(String, String, String, u16)],
        external_vlan: u16,
    ) -> Result<Lab, LabError> {
        let ext_netns = format!("{PREFIX}-ext");
        let mut names: Vec<&str> = vec![&ext_netns, uplink_netns];
        names.extend(vms.iter().map(|v| v.1.as_str()));
        for n in &names {
            if netns::exists(n) {
                return Err(LabError::Busy(n.to_string()));
            }
        }
        let mut namespaces = Vec::new();
        for n in &names {
            namespaces.push(Netns::create(n)?);
        }
        let ip = |k: u8| Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], k);
        let external = Host {
            name: "ext".into(),
            netns: ext_netns.clone(),
            ifname: "ext0".into(),
            ip: ip(100),
            vlan: external_vlan,
        };
        // Both ends are created in their namespaces directly: nothing appears in the host's.
        run(
            "ip",
            &[
                "link",
                "add",
                "name",
                uplink_ifname,
                "netns",
                uplink_netns,
                "type",
                "veth",
                "peer",
                "name",
                &external.ifname,
                "netns",
                &ext_netns,
            ],
        )?;
        run("ip", &["-n", uplink_netns, "link", "set", uplink_ifname, "up"])?;
        let vms = vms
            .iter()
            .enumerate()
            .map(|(k, (name, netns, ifname, vlan))| Host {
                name: name.clone(),
                netns: netns.clone(),
                ifname: ifname.clone(),
                ip: ip(k as u8 + 1),
                vlan: *vlan,
            })
            .collect();
        Ok(Lab {
            external,
            uplink_netns: uplink_netns.to_string(),
            uplink_ifname: uplink_ifname.to_string(),
            vms,
            _namespaces: namespaces,
        })
    }

    /// MTU of both veth ends, and the external host's offloads (with ethtool, if installed).
    pub fn configure_external(&self, mtu: u16, offloads: bool) -> Result<bool, LabError> {
        let mtu_s = mtu.to_string();
        run("ip", &["-n", &self.uplink_netns, "link", "set", &self.uplink_ifname, "mtu", &mtu_s])?;
        self.external.configure(mtu)?;
        if !have("ethtool") {
            return Ok(false);
        }
        let state = if offloads { "on" } else { "off" };
        let ns = self.external.netns.as_str();
        run(
            "ip",
            &["netns", "exec", ns, "ethtool", "-K", &self.external.ifname, "tso", state, "gso", state, "gro", state],
        )?;
        Ok(true)
    }
}

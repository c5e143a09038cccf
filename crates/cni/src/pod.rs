//! The pod side: the interface vmq made in the pod's namespace, its addresses and routes. `ip`
//! runs inside the namespace by being started from a thread that entered it
//! (`vmq_sys::netns::run_in`): a child starts in its parent thread's namespace.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{CniError, code};
use crate::exec;
use crate::result::{Cidr, CniResult};

const IP_TIMEOUT: Duration = Duration::from_secs(10);

fn netns_error(netns: &str, e: vmq_sys::netns::NetnsError) -> CniError {
    use vmq_sys::netns::NetnsError;
    let code = if matches!(e, NetnsError::NotFound(_) | NetnsError::NotANetns(_)) {
        code::UNKNOWN_CONTAINER
    } else {
        code::IO_FAILURE
    };
    CniError::new(code, format!("cannot enter the pod's namespace {netns}")).with_details(e)
}

/// `ip ARGS` inside `netns`; stdout on success.
fn ip(netns: &str, args: &[&str]) -> Result<String, CniError> {
    let shown = format!("ip {}", args.join(" "));
    let io = |e: std::io::Error| CniError::new(code::IO_FAILURE, format!("{shown} in {netns}")).with_details(e);
    let child = vmq_sys::netns::run_in(netns, || exec::spawn(Command::new("ip").args(args)))
        .map_err(|e| netns_error(netns, e))?
        .map_err(io)?;
    let out = exec::finish(child, b"", IP_TIMEOUT).map_err(io)?;
    if !out.status.success() {
        return Err(CniError::new(code::IO_FAILURE, format!("{shown} in {netns} failed"))
            .with_details(String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Gives `ifname` the addresses of `result` and adds its routes (a route without a gateway
/// goes through the address family's gateway, if any).
pub fn configure(netns: &str, ifname: &str, result: &CniResult) -> Result<(), CniError> {
    for config in &result.ips {
        // Parsed by CniResult::parse; an IPv6 address is usable at once (no DAD wait: the
        // addresses come from IPAM, which hands each out once).
        let cidr = Cidr::parse(&config.address).map(|c| c.to_string()).unwrap_or_default();
        let mut args = vec!["addr", "add", cidr.as_str(), "dev", ifname];
        if config.address.contains(':') {
            args.push("nodad");
        }
        ip(netns, &args)?;
    }
    for route in &result.routes {
        let Some(dst) = Cidr::parse(&route.dst) else { continue };
        let gw = route.gw.as_deref().and_then(|g| g.parse::<IpAddr>().ok()).or_else(|| result.gateway_for(&dst));
        let dst = dst.to_string();
        let gw = gw.map(|g| g.to_string());
        let mut args = vec!["route", "add", dst.as_str()];
        if let Some(gw) = &gw {
            args.extend(["via", gw.as_str()]);
        }
        args.extend(["dev", ifname]);
        ip(netns, &args)?;
    }
    Ok(())
}

/// The MAC of `ifname` in `netns`, `None` when there is no such interface.
pub fn mac(netns: &str, ifname: &str) -> Result<Option<[u8; 6]>, CniError> {
    let ctl = vmq_sys::link::LinkCtl::new(Some(netns)).map_err(|e| {
        CniError::new(code::UNKNOWN_CONTAINER, format!("cannot reach the pod's namespace {netns}")).with_details(e)
    })?;
    match ctl.mac(ifname) {
        Ok(mac) => Ok(Some(mac)),
        Err(vmq_sys::link::LinkError::NoSuchInterface { .. }) => Ok(None),
        Err(e) => {
            Err(CniError::new(code::IO_FAILURE, format!("cannot read {ifname}'s MAC in {netns}")).with_details(e))
        }
    }
}

#[derive(Deserialize)]
struct IpLink {
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

#[derive(Deserialize)]
struct IpAddrInfo {
    local: Option<IpAddr>,
    prefixlen: Option<u8>,
}

/// The addresses on `ifname` in `netns` (`ip -j addr show`).
pub fn addresses(netns: &str, ifname: &str) -> Result<Vec<Cidr>, CniError> {
    let text = ip(netns, &["-j", "addr", "show", "dev", ifname])?;
    let links: Vec<IpLink> = serde_json::from_str(&text).map_err(|e| {
        CniError::new(code::IO_FAILURE, format!("cannot read ip's list of {ifname}'s addresses")).with_details(e)
    })?;
    Ok(links
        .into_iter()
        .flat_map(|l| l.addr_info)
        .filter_map(|a| Some(Cidr { addr: a.local?, prefix: a.prefixlen? }))
        .collect())
}

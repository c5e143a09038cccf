//! ADD, DEL and CHECK: a pod interface is a TAP port of vmq, made in the pod's namespace through
//! the control socket, with addresses from the IPAM plugin.
//!
//! Across a vmq restart: vmq owns the TAP (the interface lives as long as vmq's fd), and a
//! restarted vmq starts from its configuration file, which does not hold ports added at run
//! time. So after a restart the pod has no interface and vmq no port: CHECK says so (code 101,
//! the runtime's cue to re-create the pod) instead of repairing behind the runtime's back; DEL
//! succeeds (nothing is left to remove but the IPAM reservation, which it releases).

use std::time::Duration;

use vmq_control::ClientError;
use vmq_control::protocol::{ErrorCode, NewPort, PortKind, PortState, Request, Response};

use crate::conf::{self, Command, Env, NetConf};
use crate::error::{CniError, code};
use crate::ipam;
use crate::pod;
use crate::result::{Cidr, CniResult, Interface};

/// How long vmq may take to accept a connection and to answer.
const VMQ_TIMEOUT: Duration = vmq_control::client::DEFAULT_TIMEOUT;

fn vmq_call(conf: &NetConf, request: &Request) -> Result<Response, ClientError> {
    vmq_control::client::call(&conf.socket, request, VMQ_TIMEOUT)
}

/// A failed exchange with vmq as a CNI error: unreachable or busy is "try again later".
fn vmq_error(conf: &NetConf, what: &str, e: ClientError) -> CniError {
    let code = match &e {
        ClientError::Connect { .. } | ClientError::Timeout { .. } | ClientError::Closed { .. } => code::TRY_AGAIN_LATER,
        ClientError::Remote(r) if r.code == ErrorCode::Busy => code::TRY_AGAIN_LATER,
        ClientError::Remote(r) if matches!(r.code, ErrorCode::InvalidValue | ErrorCode::BadRequest) => {
            code::INVALID_CONFIG
        }
        ClientError::Io { .. } => code::IO_FAILURE,
        _ => code::VMQ_REFUSED,
    };
    let msg = if code == code::TRY_AGAIN_LATER {
        format!("{what}: vmq is unreachable at {}", conf.socket)
    } else {
        format!("{what}: vmq refused")
    };
    CniError::new(code, msg).with_details(e)
}

/// `CNI_NETNS`, which must exist (code 3 otherwise: the container is gone).
fn existing_netns(env: &Env) -> Result<&str, CniError> {
    let netns = env.netns()?;
    if !std::path::Path::new(netns).exists() {
        return Err(CniError::new(code::UNKNOWN_CONTAINER, format!("the pod's namespace {netns} does not exist")));
    }
    Ok(netns)
}

/// ADD: IPAM first (nothing to undo if it fails), then the port, then the addresses; a failure
/// after a step undoes the steps before it.
pub fn add(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<CniResult, CniError> {
    let netns = existing_netns(env)?;
    let name = conf::port_name(&env.container_id, &env.ifname);
    let mac = conf::format_mac(conf::mac(&env.container_id, &env.ifname));
    let ipam_result = ipam::run(env, conf.ipam_plugin(), Command::Add, stdin)?
        .ok_or_else(|| CniError::new(code::IPAM_FAILED, "the IPAM plugin returned no result"))?;
    let release_ipam = || {
        let _ = ipam::run(env, conf.ipam_plugin(), Command::Del, stdin);
    };
    let port = NewPort {
        name: name.clone(),
        kind: PortKind::Tap,
        ifname: Some(env.ifname.clone()),
        netns: Some(netns.to_string()),
        mac: Some(mac.clone()),
        mtu: conf.mtu,
        vlan: conf.vlan,
        offloads: conf.offloads,
        ..NewPort::default()
    };
    if let Err(e) = vmq_call(conf, &Request::AddPort(port)) {
        return Err(match e {
            // The attachment exists: the lease (same container id and interface) is its lease,
            // an IPAM plugin that hands it out again must not have it released here.
            ClientError::Remote(r) if r.code == ErrorCode::PortExists => CniError::new(
                code::VMQ_REFUSED,
                format!("vmq has a port {name} already: DEL this pod's attachment before adding it again"),
            ),
            e => {
                release_ipam();
                vmq_error(conf, &format!("add port {name}"), e)
            }
        });
    }
    if let Err(e) = pod::configure(netns, &env.ifname, &ipam_result) {
        let _ = vmq_call(conf, &Request::DelPort { name });
        release_ipam();
        return Err(e);
    }
    let ips = ipam_result.ips.into_iter().map(|ip| crate::result::IpConfig { interface: Some(0), ..ip }).collect();
    Ok(CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![Interface { name: env.ifname.clone(), mac: Some(mac), sandbox: Some(netns.to_string()) }],
        ips,
        routes: ipam_result.routes,
        dns: if ipam_result.dns.is_empty() { conf.dns.clone() } else { ipam_result.dns },
    })
}

/// DEL: idempotent. A port vmq does not have (deleted before, or vmq restarted) and a vmq that
/// is not running (its TAPs went with it) are not errors; the IPAM reservation is released in
/// every case. A vmq that is running but does not answer is "try again later".
pub fn del(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<(), CniError> {
    let name = conf::port_name(&env.container_id, &env.ifname);
    let port = match vmq_call(conf, &Request::DelPort { name: name.clone() }) {
        Ok(_) => Ok(()),
        Err(ClientError::Remote(e)) if e.code == ErrorCode::NoSuchPort => Ok(()),
        Err(ClientError::Connect { source, .. })
            if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
        {
            Ok(())
        }
        Err(e) => Err(vmq_error(conf, &format!("delete port {name}"), e)),
    };
    let ipam = ipam::run(env, conf.ipam_plugin(), Command::Del, stdin).map(|_| ());
    port.and(ipam)
}

fn check_failed(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

/// CHECK: the IPAM plugin's own check, then vmq has the port (a TAP in this pod's namespace
/// with this interface name and MAC, up), then the interface is in the namespace with the MAC
/// and every address of `prevResult`.
pub fn check(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<(), CniError> {
    let netns = existing_netns(env)?;
    let prev = conf
        .prev_result
        .clone()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs the ADD result as \"prevResult\""))?;
    let prev = CniResult::parse(prev, "prevResult")?;
    let index = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox.as_deref() == Some(netns))
        .ok_or_else(|| check_failed(format!("prevResult has no interface {} in {netns}", env.ifname)))?;
    let want_mac = prev.interfaces[index].mac.clone().unwrap_or_default().to_ascii_lowercase();
    let derived = conf::format_mac(conf::mac(&env.container_id, &env.ifname));
    if want_mac != derived {
        return Err(check_failed(format!("prevResult's MAC {want_mac} is not the one vmq-cni gave: {derived}")));
    }
    ipam::run(env, conf.ipam_plugin(), Command::Check, stdin)?;

    let name = conf::port_name(&env.container_id, &env.ifname);
    let ports = match vmq_call(conf, &Request::Ports).map_err(|e| vmq_error(conf, "list ports", e))? {
        Response::Ports { ports } => ports,
        other => return Err(CniError::new(code::VMQ_REFUSED, format!("vmq answered `ports` with {other:?}"))),
    };
    let port = ports.iter().find(|p| p.name == name).ok_or_else(|| {
        check_failed(format!(
            "vmq has no port {name} for this pod: was vmq restarted? Ports vmq-cni adds do not survive a vmq \
             restart (their TAPs go with it); re-create the pod"
        ))
    })?;
    let mismatch = [
        (port.kind != PortKind::Tap).then(|| format!("kind {}", port.kind.name())),
        (port.netns.as_deref() != Some(netns)).then(|| format!("namespace {:?}", port.netns)),
        (port.ifname.as_deref() != Some(env.ifname.as_str())).then(|| format!("interface {:?}", port.ifname)),
        (port.mac.as_deref().map(str::to_ascii_lowercase) != Some(want_mac.clone()))
            .then(|| format!("MAC {:?}", port.mac)),
        (port.state != PortState::Up).then(|| "state down".to_string()),
    ];
    let mismatch: Vec<String> = mismatch.into_iter().flatten().collect();
    if !mismatch.is_empty() {
        return Err(check_failed(format!("vmq's port {name} is not as ADD made it: {}", mismatch.join(", "))));
    }

    match pod::mac(netns, &env.ifname)? {
        None => return Err(check_failed(format!("the pod has no interface {} in {netns}", env.ifname))),
        Some(mac) if conf::format_mac(mac) != want_mac => {
            return Err(check_failed(format!(
                "{} in the pod has MAC {}, not {want_mac}",
                env.ifname,
                conf::format_mac(mac)
            )));
        }
        Some(_) => {}
    }
    let present = pod::addresses(netns, &env.ifname)?;
    for ip in prev.ips.iter().filter(|ip| ip.interface == Some(index)) {
        let Some(want) = Cidr::parse(&ip.address) else { continue };
        if !present.contains(&want) {
            return Err(check_failed(format!("{} in the pod lacks address {want}", env.ifname)));
        }
    }
    Ok(())
}

//! IPAM by delegation, as the spec says: the plugin named by `ipam.type` is looked up in
//! `CNI_PATH` and run with the same `CNI_*` environment (the command set to the one wanted) and
//! the same network configuration on stdin. Its result is returned as is; its error too.

use std::path::PathBuf;
use std::process::Command as Process;
use std::time::Duration;

use crate::conf::{Command, Env};
use crate::error::{CniError, code};
use crate::exec;
use crate::result::CniResult;

/// Longest an IPAM plugin may take (host-local answers in milliseconds; a DHCP one may wait
/// for a lease).
const IPAM_TIMEOUT: Duration = Duration::from_secs(60);

/// Finds `plugin` in the `CNI_PATH` directories.
fn find(env: &Env, plugin: &str) -> Result<PathBuf, CniError> {
    env.path.iter().map(|dir| dir.join(plugin)).find(|p| p.is_file()).ok_or_else(|| {
        let dirs: Vec<String> = env.path.iter().map(|d| d.display().to_string()).collect();
        CniError::new(code::INVALID_CONFIG, format!("IPAM plugin {plugin:?} not found in CNI_PATH"))
            .with_details(format!("searched {}", dirs.join(":")))
    })
}

/// Runs the IPAM plugin for `command` with `stdin` (the network configuration as received).
/// ADD returns its result; DEL and CHECK return `None`.
pub fn run(env: &Env, plugin: &str, command: Command, stdin: &[u8]) -> Result<Option<CniResult>, CniError> {
    let path = find(env, plugin)?;
    let mut process = Process::new(&path);
    let search: Vec<String> = env.path.iter().map(|d| d.display().to_string()).collect();
    process
        .env("CNI_COMMAND", command.name())
        .env("CNI_CONTAINERID", &env.container_id)
        .env("CNI_IFNAME", &env.ifname)
        .env("CNI_PATH", search.join(":"));
    match &env.netns {
        Some(ns) => process.env("CNI_NETNS", ns),
        None => process.env_remove("CNI_NETNS"),
    };
    let io = |e: std::io::Error| {
        CniError::new(code::IO_FAILURE, format!("cannot run the IPAM plugin {}", path.display())).with_details(e)
    };
    let child = exec::spawn(&mut process).map_err(io)?;
    let out = exec::finish(child, stdin, IPAM_TIMEOUT).map_err(io)?;
    if !out.status.success() {
        // A CNI plugin's error is JSON on stdout: pass it on with its code, saying who failed.
        return Err(match serde_json::from_slice::<CniError>(&out.stdout) {
            Ok(e) => CniError { msg: format!("IPAM plugin {plugin}: {}", e.msg), ..e },
            Err(_) => CniError::new(code::IPAM_FAILED, format!("IPAM plugin {plugin} failed ({})", out.status))
                .with_details(String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout })),
        });
    }
    if command != Command::Add {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        CniError::new(code::DECODE_FAILURE, format!("IPAM plugin {plugin} printed no JSON result")).with_details(e)
    })?;
    let result = CniResult::parse(value, &format!("IPAM plugin {plugin}'s result"))?;
    if result.ips.is_empty() {
        return Err(CniError::new(code::IPAM_FAILED, format!("IPAM plugin {plugin} returned no address")));
    }
    Ok(Some(result))
}

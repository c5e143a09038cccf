//! `vmq-cni`: a CNI plugin (spec 1.0.0) that attaches a pod to vmq. ADD makes a TAP port of the
//! running vmq, through its control socket, with the interface inside the pod's namespace
//! (`CNI_IFNAME`, a MAC derived from the container id and interface name); the addresses come
//! from the IPAM plugin the configuration names (e.g. `host-local`) and are set on the
//! interface. DEL removes both and is idempotent; CHECK verifies vmq's port, the interface, its
//! MAC and addresses; VERSION lists the versions spoken. `docs/integration.md` has an example.
//!
//! Output follows the spec: the result (ADD) or version list on stdout with exit 0, or an error
//! object (`code`, `msg`, `details`) on stdout with exit 1. Diagnostics never go to stdout.
#![forbid(unsafe_code)]

pub mod conf;
pub mod error;
mod exec;
mod ipam;
pub mod plugin;
mod pod;
pub mod result;

use std::io::{Read, Write};
use std::process::ExitCode;

use conf::{Command, Env, NetConf, SUPPORTED_VERSIONS};
use error::{CniError, code};

/// Largest network configuration read from stdin.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Runs one invocation: `get` reads the environment, `stdin` is the configuration. Returns
/// what to print on success (nothing for DEL and CHECK).
pub fn run(get: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Option<String>, CniError> {
    let command = Command::parse(get("CNI_COMMAND").as_deref())?;
    if command == Command::Version {
        let answer =
            serde_json::json!({ "cniVersion": SUPPORTED_VERSIONS[0], "supportedVersions": SUPPORTED_VERSIONS });
        return Ok(Some(answer.to_string()));
    }
    let conf = NetConf::parse(stdin)?;
    let env = Env::parse(command, get)?;
    match command {
        Command::Add => {
            let result = plugin::add(&env, &conf, stdin)?;
            let text = serde_json::to_string(&result)
                .map_err(|e| CniError::new(code::IO_FAILURE, "cannot print the result").with_details(e))?;
            Ok(Some(text))
        }
        Command::Del => plugin::del(&env, &conf, stdin).map(|()| None),
        Command::Check => plugin::check(&env, &conf, stdin).map(|()| None),
        Command::Version => Ok(None),
    }
}

/// The binary's main: environment, stdin, stdout, exit status.
pub fn main() -> ExitCode {
    let wants_stdin = std::env::var("CNI_COMMAND").is_ok_and(|c| c != "VERSION");
    let mut stdin = Vec::new();
    let read = if wants_stdin {
        std::io::stdin().take(MAX_CONFIG_BYTES + 1).read_to_end(&mut stdin).map(|_| ())
    } else {
        Ok(())
    };
    let outcome = match read {
        Err(e) => Err(CniError::new(code::IO_FAILURE, "cannot read the configuration from stdin").with_details(e)),
        Ok(()) if stdin.len() as u64 > MAX_CONFIG_BYTES => Err(CniError::new(
            code::DECODE_FAILURE,
            format!("the configuration on stdin is longer than {MAX_CONFIG_BYTES} bytes"),
        )),
        Ok(()) => run(|k| std::env::var(k).ok(), &stdin),
    };
    let mut stdout = std::io::stdout().lock();
    let (text, status) = match outcome {
        Ok(Some(text)) => (text, ExitCode::SUCCESS),
        Ok(None) => (String::new(), ExitCode::SUCCESS),
        Err(e) => (e.to_json(SUPPORTED_VERSIONS[0]), ExitCode::FAILURE),
    };
    if !text.is_empty() && writeln!(stdout, "{text}").and_then(|()| stdout.flush()).is_err() {
        return ExitCode::FAILURE;
    }
    status
}

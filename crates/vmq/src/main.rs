//! `vmq`: a userspace virtual switch for hypervisor hosts.

mod bench;
mod cli;
mod config;
// The pieces the control handler over the data path is built from; `vmq run` starts the
// control socket and the exporter once that handler exists.
#[cfg_attr(not(test), allow(dead_code))]
mod control;
mod ctl;
mod run;
mod top;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}

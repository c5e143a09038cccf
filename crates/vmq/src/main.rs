//! `vmq`: a userspace virtual switch for hypervisor hosts.

mod bench;
mod cli;
mod config;
mod run;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}

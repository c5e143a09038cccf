//! `vmq`: a userspace virtual switch for hypervisor hosts.
#![forbid(unsafe_code)]

mod bench;
mod cli;
mod config;
mod control;
mod ctl;
mod demo;
mod exit;
mod handler;
mod logging;
mod notify;
mod persist;
mod qmp_relay;
mod reload;
mod run;
mod top;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}

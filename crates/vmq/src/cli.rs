//! Command line: parsing with clap and dispatch to the subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{bench, config, ctl, demo, exit, run, top};

#[derive(Debug, Parser)]
#[command(
    name = "vmq",
    version,
    about = "A userspace virtual switch for VM hosts: VM queues, jumbo frames, TCP offloads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job on the embedded default (root): namespaces, an uplink and TAP VMs; ping,
    /// VLAN isolation and TCP throughput in switch vs vmq mode, MTU 1500 vs 9000, offloads on/off.
    Demo(demo::DemoArgs),
    /// Run the switch with a configuration file until SIGINT/SIGTERM.
    Run {
        /// TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and report the first error with its line and column.
    CheckConfig {
        /// TOML configuration file.
        file: PathBuf,
    },
    /// Print the embedded default configuration (the topology `vmq demo` builds).
    DefaultConfig,
    /// Measure the in-process data path (no root needed): vmq mode against switch mode.
    Bench(bench::BenchArgs),
    /// Inspect or change the running vmq through its control socket.
    ///
    /// Exit codes: 0 done, 1 vmq refused or failed the request, 2 usage error, 3 vmq cannot be
    /// reached.
    Ctl(ctl::CtlArgs),
    /// Live per-port rates, drops and VM queues of the running vmq (q or Ctrl-C quits).
    Top(top::TopArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::demo(&args),
        Command::Run { config } => run::run(&config),
        Command::CheckConfig { file } => match config::load(&file) {
            Ok(c) => {
                println!("{}: ok ({} ports, mode {})", file.display(), c.ports.len(), c.mode.name());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vmq: {e}");
                ExitCode::from(exit::CONFIG)
            }
        },
        Command::DefaultConfig => {
            print!("{}", config::EMBEDDED_DEFAULT);
            ExitCode::SUCCESS
        }
        Command::Bench(args) => bench::bench(&args),
        Command::Ctl(args) => ctl::ctl(args),
        Command::Top(args) => top::top(args),
    }
}

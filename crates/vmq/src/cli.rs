//! Command line: parsing with clap and dispatch to the subcommands, and the shell completions
//! and man pages generated from the same definition.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::{bench, config, ctl, demo, exit, logging, run, top};

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
    ///
    /// Logs go to stderr: colour only on a terminal and without `NO_COLOR`; `--log-format json`
    /// writes one JSON object per line.
    Run {
        /// TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        log: logging::LogArgs,
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
    /// Print a shell completion script: `vmq completions bash > /etc/bash_completion.d/vmq`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages: vmq.1 to stdout, or with DIR one page per command (vmq.1,
    /// vmq-ctl.1, vmq-ctl-show.1, ...) into DIR.
    Man {
        /// Directory to write every page into (created if missing).
        dir: Option<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::demo(&args),
        Command::Run { config, log } => {
            if let Err(e) = logging::init(&log) {
                eprintln!("vmq: {e}");
                return ExitCode::from(exit::CONFIG);
            }
            run::run(&config)
        }
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
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vmq", &mut out);
            write_stdout(&out)
        }
        Command::Man { dir: None } => {
            let mut out = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                Ok(()) => write_stdout(&out),
                Err(e) => {
                    eprintln!("vmq man: {e}");
                    ExitCode::from(exit::RUNTIME)
                }
            }
        }
        Command::Man { dir: Some(dir) } => match write_man_pages(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmq man: {}: {e}", dir.display());
                ExitCode::from(exit::RUNTIME)
            }
        },
    }
}

/// One page per command and subcommand, named as `man` looks them up (`vmq-ctl-show.1`).
fn write_man_pages(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
}

/// Writes generated text; a closed pipe (`vmq man | head`) is the reader's choice, not a failure.
fn write_stdout(bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmq: stdout: {e}");
            ExitCode::from(exit::RUNTIME)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}

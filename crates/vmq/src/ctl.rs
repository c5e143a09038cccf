//! `vmq ctl`: inspect and change a running vmq through its control socket, in the manner of
//! `ovs-vsctl`/`ovs-appctl`. Tables by default, the reply line as received with `--json`.
//!
//! Exit codes: 0 done; 1 vmq refused or failed the request (or answered garbage); 2 usage
//! error; 3 vmq cannot be reached (not running, wrong socket, or no answer in time).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use vmq_control::protocol::{NewPort, PortKind, QueuePolicy, Request, Setting};
use vmq_control::server::DEFAULT_SOCKET;
use vmq_control::{Client, render};

use crate::exit;

#[derive(Debug, Args)]
pub struct CtlArgs {
    // `global`: these go before or after the subcommand (`vmq ctl --json show`, `vmq ctl show
    // --json`), as ovs-appctl and kubectl users type them.
    /// The control socket of the running vmq (`[control] socket`).
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print vmq's reply as JSON (the line as received) instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for vmq to accept the connection and to answer.
    #[arg(long, global = true, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    timeout_ms: u64,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Switch summary: mode, workers, VM queue budget and policy, every port.
    Show,
    /// Every port: kind, state, MAC, MTU, VLAN, offloads, attachment.
    Ports,
    /// VM queues: which port holds one, on which worker, at what rate; who shares the default
    /// queue and why.
    Queues,
    /// The MAC table: MAC, VLAN, port, age.
    Fdb,
    /// Counters of every port, or of one.
    Stats {
        /// Only this port.
        port: Option<String>,
    },
    /// Add a port (the fields of a configuration file's [[port]]).
    AddPort(AddPortArgs),
    /// Remove a port.
    DelPort {
        /// Port name.
        name: String,
    },
    /// Change a setting: `queues N`, `policy static|dynamic`, `port NAME mtu N`,
    /// `port NAME vlan N`.
    Set {
        #[command(subcommand)]
        setting: SetCommand,
    },
    /// Rebalance the VM queues now.
    Rebalance,
    /// Per-worker busy ratio and tasks.
    Workers,
    /// Write the running configuration back to vmq's configuration file (atomically, keeping
    /// its comments), so that add-port, del-port and set survive a restart.
    Save,
}

#[derive(Debug, Args)]
struct AddPortArgs {
    /// Port name (1 to 32 of A-Z a-z 0-9 - _ .).
    #[arg(long)]
    name: String,
    #[arg(long)]
    kind: KindArg,
    /// vhost-user: the socket vmq listens on for the VM (the port's `socket` key; `--socket`
    /// is the control socket).
    #[arg(long, value_name = "PATH")]
    vhost_socket: Option<String>,
    /// tap/uplink: the interface name.
    #[arg(long)]
    ifname: Option<String>,
    /// tap/uplink: the network namespace, a name under /run/netns or a path to a namespace file
    /// (`/proc/PID/ns/net`).
    #[arg(long)]
    netns: Option<String>,
    /// The port's MAC (required for VM ports).
    #[arg(long)]
    mac: Option<String>,
    #[arg(long)]
    mtu: Option<u32>,
    /// Access VLAN (0: untagged).
    #[arg(long, conflicts_with = "trunk")]
    vlan: Option<u32>,
    /// Trunk VLANs, comma-separated: --trunk 10,20.
    #[arg(long, value_delimiter = ',', value_name = "VLANS")]
    trunk: Option<Vec<u32>>,
    /// Untagged frames on a trunk belong to this VLAN.
    #[arg(long, requires = "trunk")]
    native_vlan: Option<u32>,
    /// VM ports: the uplink whose NIC filters carry this VM's queue.
    #[arg(long)]
    uplink: Option<String>,
    /// Let the VM send from any source MAC.
    #[arg(long)]
    allow_mac_spoofing: bool,
    /// Turn checksum/segmentation offloads off for this port.
    #[arg(long)]
    no_offloads: bool,
    /// TAP ports: create the namespace given with --netns if it does not exist.
    #[arg(long, requires = "netns")]
    create_netns: bool,
    /// vhost-user ports: queue pairs offered to the VM (multiqueue, 1 to 16; default 1).
    #[arg(long, value_name = "N")]
    queue_pairs: Option<u32>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KindArg {
    VhostUser,
    Tap,
    Uplink,
    Mem,
}

#[derive(Debug, Subcommand)]
enum SetCommand {
    /// The VM queue budget.
    Queues { count: u32 },
    /// The VM queue policy.
    Policy { policy: PolicyArg },
    /// A port's MTU or access VLAN.
    Port { name: String, key: PortKey, value: u32 },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PolicyArg {
    Static,
    Dynamic,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PortKey {
    Mtu,
    Vlan,
}

impl CtlCommand {
    fn request(self) -> Request {
        match self {
            CtlCommand::Show => Request::Show,
            CtlCommand::Ports => Request::Ports,
            CtlCommand::Queues => Request::Queues,
            CtlCommand::Fdb => Request::Fdb,
            CtlCommand::Stats { port } => Request::Stats { port },
            CtlCommand::AddPort(a) => Request::AddPort(NewPort {
                name: a.name,
                kind: match a.kind {
                    KindArg::VhostUser => PortKind::VhostUser,
                    KindArg::Tap => PortKind::Tap,
                    KindArg::Uplink => PortKind::Uplink,
                    KindArg::Mem => PortKind::Mem,
                },
                socket: a.vhost_socket,
                ifname: a.ifname,
                netns: a.netns,
                mac: a.mac,
                mtu: a.mtu,
                vlan: a.vlan,
                trunk: a.trunk,
                native_vlan: a.native_vlan,
                uplink: a.uplink,
                allow_mac_spoofing: a.allow_mac_spoofing.then_some(true),
                offloads: a.no_offloads.then_some(false),
                create_netns: a.create_netns.then_some(true),
                queues: a.queue_pairs,
            }),
            CtlCommand::DelPort { name } => Request::DelPort { name },
            CtlCommand::Set { setting } => Request::Set(match setting {
                SetCommand::Queues { count } => Setting::Queues { queues: count },
                SetCommand::Policy { policy } => Setting::Policy {
                    policy: match policy {
                        PolicyArg::Static => QueuePolicy::Static,
                        PolicyArg::Dynamic => QueuePolicy::Dynamic,
                    },
                },
                SetCommand::Port { name, key: PortKey::Mtu, value } => Setting::PortMtu { port: name, mtu: value },
                SetCommand::Port { name, key: PortKey::Vlan, value } => Setting::PortVlan { port: name, vlan: value },
            }),
            CtlCommand::Rebalance => Request::Rebalance,
            CtlCommand::Workers => Request::Workers,
            CtlCommand::Save => Request::Save,
        }
    }
}

pub fn ctl(args: CtlArgs) -> ExitCode {
    let timeout = Duration::from_millis(args.timeout_ms);
    let request = args.command.request();
    let exchange = Client::connect(&args.socket, timeout).and_then(|mut client| client.call_raw(&request));
    let (reply, raw) = match exchange {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmq ctl: {e}");
            return ExitCode::from(exit::for_client_error(&e));
        }
    };
    let mut stdout = std::io::stdout().lock();
    let printed = match (&reply.0, args.json) {
        (_, true) => writeln!(stdout, "{raw}"),
        (Ok(response), false) => write!(stdout, "{}", render::render(response)),
        (Err(e), false) => {
            eprintln!("vmq ctl: {} refused: {e}", request.command());
            Ok(())
        }
    };
    // A closed pipe (`vmq ctl fdb | head`) is not vmq's failure; the request was done.
    let _ = printed.and_then(|()| stdout.flush());
    match reply.0 {
        Ok(_) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(exit::RUNTIME),
    }
}

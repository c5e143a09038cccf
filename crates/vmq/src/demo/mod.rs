//! `vmq demo`: vmq's main job on the embedded default, for a newcomer with root on a fresh
//! machine. It builds the default topology in network namespaces (an external host behind the
//! uplink, VMs on TAP ports in VLANs 10 and 20), then shows reachability and VLAN isolation,
//! and TCP throughput from the Linux stacks for `switch` vs `vmq` mode, MTU 1500 vs 9000 and
//! offloads on vs off, with the drop counters. Everything it creates is removed on exit, on
//! error and on Ctrl-C.

mod lab;
mod traffic;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use clap::Args;
use serde::Serialize;
use vmq_core::{DropReason, Mode, OffloadCaps, PortBackend, PortKind, VlanMode};
use vmq_datapath::Datapath;

use crate::bench::harness::worker_cpu_ns;
use crate::config::{self, Config};
use crate::exit;
use lab::{Host, Lab};
use traffic::Tools;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of VMs (TAP ports); the last one is in VLAN 20, the others in VLAN 10.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(3..=16))]
    vms: u16,
    /// Seconds of TCP traffic per measurement.
    #[arg(long, default_value_t = 2.0, value_parser = parse_seconds)]
    seconds: f64,
    /// Short run (1 s per measurement): checks that everything works, figures are rough.
    #[arg(long)]
    quick: bool,
    /// Print the results as one JSON object (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.2..=600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: seconds must be from 0.2 to 600")),
    }
}

#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error("{0}")]
    Lab(#[from] lab::LabError),
    #[error("{0}")]
    Traffic(#[from] traffic::TrafficError),
    #[error("the embedded configuration: {0}")]
    Config(String),
    #[error("data path: {0}")]
    Datapath(#[from] vmq_datapath::DatapathError),
    #[error("interrupted")]
    Interrupted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum PathKind {
    ExtToVm,
    VmToVm,
}

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            PathKind::ExtToVm => "ext-to-vm",
            PathKind::VmToVm => "vm-to-vm",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct RunResult {
    mode: &'static str,
    mtu: u16,
    offloads: bool,
    path: PathKind,
    tcp_gbps: f64,
    /// CPU time vmq's worker threads used during the measurement (the kernel's accounting,
    /// `/proc/self/task/*/schedstat`), in seconds per GB vmq delivered to the receiving port.
    worker_cpu_s_per_gb: f64,
    /// Frames vmq dropped during this measurement (all ports, all reasons).
    drops: u64,
}

#[derive(Debug, Clone, Serialize)]
struct PairResult {
    from: String,
    to: String,
    same_vlan: bool,
    reachable: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    runs: Vec<RunResult>,
    ping_ok: bool,
    vlan_isolation_ok: bool,
    /// A 9000-byte IPv4 packet with don't-fragment set (ping -M do -s 8972, or the UDP echo's
    /// 8972-byte datagram from a DF socket) crossed between two jumbo ports and back.
    jumbo_ok: bool,
    /// False when ethtool is missing: "offloads off" then turned off vmq's ports' offloads only,
    /// not the external host's (its veth kept TSO/GSO/GRO).
    external_offloads_set: bool,
    pairs: Vec<PairResult>,
    /// Drops over the whole demo, by reason.
    drops: BTreeMap<&'static str, u64>,
    tcp_tool: &'static str,
    ping_tool: &'static str,
}

/// Progress on stderr, one line rewritten in place.
struct Progress {
    step: usize,
    steps: usize,
    started: Instant,
}

impl Progress {
    fn show(&mut self, what: &str) {
        self.step += 1;
        eprint!("\r\x1b[2K[{:>2}/{}] {:>5.1}s  {what}", self.step, self.steps, self.started.elapsed().as_secs_f64());
        let _ = std::io::stderr().flush();
    }

    fn done(&self) {
        eprintln!("\r\x1b[2Kdone in {:.1}s", self.started.elapsed().as_secs_f64());
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn demo(args: &DemoArgs) -> ExitCode {
    if !is_root() {
        eprintln!(
            "vmq demo: needs root: it creates network namespaces, a veth pair and TAP interfaces. \
             Without root, `vmq bench` runs the same data path in-process (in-memory virtio-net devices)."
        );
        return ExitCode::from(exit::RUNTIME);
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(signal, stop.clone()) {
            eprintln!("vmq demo: cannot install signal handlers: {e}");
            return ExitCode::from(exit::RUNTIME);
        }
    }
    match run_demo(args, &stop) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("vmq demo: {e}");
                        return ExitCode::from(exit::RUNTIME);
                    }
                }
            } else {
                print_report(&report, args);
            }
            if report.ping_ok && report.vlan_isolation_ok && report.jumbo_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(exit::RUNTIME)
            }
        }
        Err(e) => {
            eprintln!("\nvmq demo: {e} (everything the demo created has been removed)");
            ExitCode::from(exit::RUNTIME)
        }
    }
}

/// The demo's VM ports: the embedded default's, extended to `vms` (more VLAN-10 VMs before the
/// VLAN-20 one).
fn topology(vms: u16) -> Result<Config, DemoError> {
    let mut cfg = config::parse(config::EMBEDDED_DEFAULT, "default").map_err(|e| DemoError::Config(e.to_string()))?;
    let template: Vec<_> = cfg.ports.iter().filter(|p| p.spec.kind == PortKind::Tap).cloned().collect();
    let (Some(first), Some(last)) = (template.first().cloned(), template.last().cloned()) else {
        return Err(DemoError::Config("no TAP ports".into()));
    };
    let mut ports: Vec<_> = cfg.ports.iter().filter(|p| p.spec.kind != PortKind::Tap).cloned().collect();
    let mut vm_ports: Vec<_> = template[..template.len() - 1].to_vec();
    while vm_ports.len() + 1 < usize::from(vms) {
        let k = vm_ports.len() + 1;
        let mut p = first.clone();
        p.spec.name = format!("vm{k}");
        p.spec.mac = Some(vmq_wire::MacAddr([0x52, 0x54, 0, 0, 0, k as u8]));
        if let PortBackend::Tap { netns, .. } = &mut p.backend {
            *netns = Some(format!("{}-vm{k}", lab::PREFIX));
        }
        vm_ports.push(p);
    }
    let mut last = last;
    let k = vm_ports.len() + 1;
    last.spec.name = format!("vm{k}");
    last.spec.mac = Some(vmq_wire::MacAddr([0x52, 0x54, 0, 0, 0, k as u8]));
    if let PortBackend::Tap { netns, .. } = &mut last.backend {
        *netns = Some(format!("{}-vm{k}", lab::PREFIX));
    }
    vm_ports.push(last);
    ports.extend(vm_ports);
    cfg.ports = ports;
    Ok(cfg)
}

fn run_demo(args: &DemoArgs, stop: &AtomicBool) -> Result<Report, DemoError> {
    let seconds = if args.quick { 1.0 } else { args.seconds };
    let base = topology(args.vms)?;
    let uplink = base
        .ports
        .iter()
        .find(|p| p.spec.kind == PortKind::Uplink)
        .ok_or_else(|| DemoError::Config("no uplink".into()))?;
    let (PortBackend::Uplink { ifname, netns: Some(up_ns), .. }, VlanMode::Trunk { native, .. }) =
        (&uplink.backend, &uplink.spec.vlan)
    else {
        return Err(DemoError::Config("the uplink must be a trunk in a namespace".into()));
    };
    let vm_defs: Vec<(String, String, String, u16)> = base
        .ports
        .iter()
        .filter_map(|p| match (&p.backend, &p.spec.vlan) {
            (PortBackend::Tap { ifname, netns: Some(ns), .. }, VlanMode::Access(v)) => {
                Some((p.spec.name.clone(), ns.clone(), ifname.clone(), *v))
            }
            _ => None,
        })
        .collect();
    let lab = Lab::build(up_ns, ifname, &vm_defs, native.unwrap_or(0))?;
    let tools = Tools::detect();
    let modes = [Mode::Switch, Mode::Vmq];
    let mtus = [1500u16, 9000];
    let offloads = [true, false];
    let paths = [PathKind::ExtToVm, PathKind::VmToVm];
    let mut progress = Progress {
        step: 0,
        steps: modes.len() * (1 + mtus.len() * offloads.len() * paths.len()),
        started: Instant::now(),
    };
    let mut runs = Vec::new();
    let mut pairs = Vec::new();
    let mut jumbo_ok = true;
    let mut external_offloads_set = true;
    let mut drops: BTreeMap<&'static str, u64> = BTreeMap::new();
    // Per (MTU, offloads): both modes back to back, so that the two figures compared are
    // measured as close together as this noisy host allows, and taking turns going first (the
    // k-th configuration starts with mode k mod 2), so that neither always runs on a hotter or
    // colder host. Reachability once per mode, first.
    let mut first_of_mode = [true, true];
    let mut configuration = 0usize;
    for &mtu in mtus.iter().rev() {
        for &offl in &offloads {
            let order = if configuration.is_multiple_of(2) { [0, 1] } else { [1, 0] };
            configuration += 1;
            for m in order {
                let mode = modes[m];
                if stop.load(Ordering::Relaxed) {
                    return Err(DemoError::Interrupted);
                }
                let cfg = run_config(&base, mode, mtu, offl);
                let dp = Datapath::start(cfg.datapath_config())?;
                for h in &lab.vms {
                    h.configure(mtu)?;
                }
                external_offloads_set &= lab.configure_external(mtu, offl)?;
                let mut hosts: Vec<&Host> = vec![&lab.external];
                hosts.extend(lab.vms.iter());
                if std::mem::take(&mut first_of_mode[m]) {
                    progress.show(&format!("mode {}: ping between every pair", mode.name()));
                    for (a, from) in hosts.iter().enumerate() {
                        for to in &hosts[a + 1..] {
                            let reachable = traffic::reachable(tools, from, to, 56)?;
                            pairs.push(PairResult {
                                from: from.name.clone(),
                                to: to.name.clone(),
                                same_vlan: from.vlan == to.vlan,
                                reachable,
                            });
                        }
                    }
                    jumbo_ok &= traffic::reachable(tools, &lab.vms[0], &lab.vms[1], usize::from(mtu) - 28)?;
                }
                let before = dp.port_stats();
                for &path in &paths {
                    if stop.load(Ordering::Relaxed) {
                        return Err(DemoError::Interrupted);
                    }
                    progress.show(&format!(
                        "MTU {mtu}, offloads {}, mode {}: TCP {} for {seconds:.1}s",
                        if offl { "on" } else { "off" },
                        mode.name(),
                        path.name()
                    ));
                    let (from, to) = match path {
                        PathKind::ExtToVm => (&lab.external, &lab.vms[0]),
                        PathKind::VmToVm => (&lab.vms[1], &lab.vms[0]),
                    };
                    let before_run = total_drops(&dp);
                    let (cpu_before, bytes_before) = (worker_cpu_ns(), delivered_bytes(&dp, &to.name));
                    let gbps = traffic::tcp_gbps(tools, from, to, seconds)?;
                    let cpu_ns = worker_cpu_ns().saturating_sub(cpu_before);
                    let bytes = delivered_bytes(&dp, &to.name).saturating_sub(bytes_before);
                    runs.push(RunResult {
                        mode: mode.name(),
                        mtu,
                        offloads: offl,
                        path,
                        tcp_gbps: gbps,
                        // ns per byte is s per GB.
                        worker_cpu_s_per_gb: if bytes > 0 { cpu_ns as f64 / bytes as f64 } else { 0.0 },
                        drops: total_drops(&dp) - before_run,
                    });
                }
                for ((_, b), (_, a)) in before.iter().zip(dp.port_stats()) {
                    for r in DropReason::ALL {
                        let n = a.drops(r) - b.drops(r);
                        if n > 0 {
                            *drops.entry(r.name()).or_default() += n;
                        }
                    }
                }
                dp.shutdown();
            }
        }
    }
    progress.done();
    drop(lab);
    Ok(Report {
        ping_ok: pairs.iter().filter(|p| p.same_vlan).all(|p| p.reachable),
        vlan_isolation_ok: pairs.iter().filter(|p| !p.same_vlan).all(|p| !p.reachable),
        jumbo_ok,
        external_offloads_set,
        runs,
        pairs,
        drops,
        tcp_tool: if tools.iperf3 { "iperf3" } else { "built-in" },
        ping_tool: if tools.ping { "ping" } else { "udp-echo" },
    })
}

/// Bytes vmq has delivered to port `name` so far.
fn delivered_bytes(dp: &Datapath, name: &str) -> u64 {
    dp.port_stats().iter().find(|(n, _)| n == name).map_or(0, |(_, s)| s.tx_bytes)
}

fn total_drops(dp: &Datapath) -> u64 {
    dp.port_stats().iter().map(|(_, s)| s.total_drops()).sum()
}

/// The default topology with one run's mode, MTU and offloads. The namespaces exist already.
fn run_config(base: &Config, mode: Mode, mtu: u16, offloads: bool) -> Config {
    let mut cfg = base.clone();
    cfg.mode = mode;
    for p in &mut cfg.ports {
        p.spec.mtu = mtu;
        p.spec.offloads = if offloads { OffloadCaps::ALL } else { OffloadCaps::NONE };
        if let PortBackend::Tap { create_netns, .. } = &mut p.backend {
            *create_netns = false;
        }
    }
    cfg
}

fn print_report(r: &Report, args: &DemoArgs) {
    println!("\nvmq demo: an external host behind the uplink (native VLAN 10) and {} VMs on TAP ports", args.vms);
    println!("\nreachability ({}; the same pairs in both modes):", r.ping_tool);
    let mut seen = std::collections::BTreeSet::new();
    for p in &r.pairs {
        let key = (p.from.clone(), p.to.clone());
        let all_modes: Vec<&PairResult> = r.pairs.iter().filter(|q| q.from == p.from && q.to == p.to).collect();
        if !seen.insert(key) {
            continue;
        }
        let ok = all_modes.iter().all(|q| q.reachable == q.same_vlan);
        let what = match (p.same_vlan, all_modes.iter().all(|q| q.reachable)) {
            (true, true) => "reachable".to_string(),
            (true, false) => "UNREACHABLE (expected reachable)".to_string(),
            (false, _) if all_modes.iter().all(|q| !q.reachable) => "isolated (different VLANs)".to_string(),
            (false, _) => "REACHABLE across VLANs".to_string(),
        };
        println!("  {:<4} -> {:<4} {}{}", p.from, p.to, what, if ok { "" } else { "  <-- wrong" });
    }
    let probe = if r.ping_tool == "ping" { "ping -M do -s 8972" } else { "UDP echo of 8972 bytes from DF sockets" };
    println!(
        "  jumbo frame (9000-byte IPv4 packet, don't fragment; {probe}) vm1 <-> vm2: {}",
        if r.jumbo_ok { "ok" } else { "FAILED" }
    );
    println!(
        "\nTCP, 1 stream ({}): Gbit/s, and CPU-s/GB: CPU time of vmq's workers (kernel accounting) per GB delivered:",
        r.tcp_tool
    );
    println!(
        "{:<10} {:>5} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11} {:>11} {:>7}",
        "path", "MTU", "offloads", "switch", "vmq", "vmq/switch", "switch cpu", "vmq cpu", "vmq/switch", "drops"
    );
    for path in [PathKind::ExtToVm, PathKind::VmToVm] {
        for mtu in [1500u16, 9000] {
            for offl in [true, false] {
                let find = |mode: &str| {
                    r.runs.iter().find(|x| x.mode == mode && x.mtu == mtu && x.offloads == offl && x.path == path)
                };
                let (Some(s), Some(v)) = (find("switch"), find("vmq")) else { continue };
                let ratio = |v: f64, s: f64| if s > 0.0 { format!("{:.2}x", v / s) } else { "-".into() };
                println!(
                    "{:<10} {:>5} {:>9} {:>9.2} {:>9.2} {:>11} {:>11.3} {:>11.3} {:>11} {:>7}",
                    path.name(),
                    mtu,
                    if offl { "on" } else { "off" },
                    s.tcp_gbps,
                    v.tcp_gbps,
                    ratio(v.tcp_gbps, s.tcp_gbps),
                    s.worker_cpu_s_per_gb,
                    v.worker_cpu_s_per_gb,
                    ratio(v.worker_cpu_s_per_gb, s.worker_cpu_s_per_gb),
                    s.drops + v.drops
                );
            }
        }
    }
    if !r.external_offloads_set {
        println!(
            "\noffloads off: vmq's ports only. ethtool is not installed, so the external host's veth kept \
             TSO/GSO/GRO on in every ext-to-vm run."
        );
    }
    if r.drops.is_empty() {
        println!("\ndrops: none");
    } else {
        let list: Vec<String> = r.drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("\ndrops by reason (all runs): {}", list.join(", "));
    }
    println!(
        "\nOn this host the two stacks, vmq's workers and the traffic tools share the same cores: the \
         figures measure the whole host, and `vmq bench` isolates the data path."
    );
}

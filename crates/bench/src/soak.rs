//! `vmq-bench soak`: vmq under churn and faults for a bounded time, judged by exact counters.
//!
//! Topology (every namespace made here, prefix `--prefix`): two hosts `P-a` and `P-b` on TAP
//! ports `ta`/`tb` in VLAN 10 exchanging paced UDP both ways (the steady traffic); two DPDK
//! virtio-user VMs (one dpdk-testpmd each, mac forwarding, primed with `--tx-first`) on
//! vhost-user ports `vm1`/`vm2`; an uplink `up0` (veth into `P-sw`, its peer in `P-ext`, the
//! "external host"); a spare vhost-user port `spare`. VLAN 10 holds only the steady ports, so
//! every frame they see is steady traffic and the accounting can be exact.
//!
//! Every `--fault-interval` seconds one fault, in turn: a VM's testpmd killed with SIGKILL and
//! restarted; a TAP and a vhost-user port added and removed; MTU and VLAN changes on the VM
//! ports; a flood of random source MACs from the external host (AF_PACKET); garbage on the
//! spare port's vhost-user socket. A sampler reads vmq's RSS and the workers' heartbeats every
//! second. Verdict: [`crate::soak_check::evaluate`].
//!
//! Cleanup (children by PID, namespaces, the hugetlbfs mount, DPDK runtime directories, the
//! work directory) runs from `Drop`, so also on error; SIGINT/SIGTERM end the run early
//! through the same path (children run in their own process group: a terminal's Ctrl-C
//! reaches only this process).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmq_control::Client;
use vmq_control::protocol::{NewPort, PortKind, PortState, Request, Response, Setting};

use crate::soak_check::{self, Check, Limits, Record, Sample, SteadyCounts, WorkerBeat};

/// The `soak` subcommand's options.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Length of the run (faults and steady traffic), seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub seconds: u64,
    /// Seconds between faults.
    #[arg(long, default_value_t = 2.0, value_parser = parse_interval)]
    pub fault_interval: f64,
    /// Steady UDP datagrams per second, each direction.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(10..=100_000))]
    pub pps: u32,
    /// Random-source frames per MAC flood.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub flood_frames: u32,
    /// A worker's heartbeat (frames + sleeps) must advance within this many seconds.
    #[arg(long, default_value_t = 5.0)]
    pub heartbeat_limit: f64,
    /// The vmq binary (default: $CARGO_TARGET_DIR or target, release).
    #[arg(long)]
    pub vmq: Option<PathBuf>,
    /// Result file (default: bench/results/soak-DATE.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Prefix of every namespace, interface, DPDK file prefix and temp dir.
    #[arg(long, default_value = "vqs", value_parser = parse_prefix)]
    pub prefix: String,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && (0.2..=60.0).contains(&v) { Ok(v) } else { Err("from 0.2 to 60 seconds".into()) }
}

fn parse_prefix(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.len() <= 4 && s.chars().all(|c| c.is_ascii_lowercase()) {
        Ok(s.to_string())
    } else {
        Err("1 to 4 lowercase letters (interface names are short)".into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error("{0}")]
    Setup(String),
    #[error("interrupted")]
    Interrupted,
}

fn setup(what: impl std::fmt::Display) -> SoakError {
    SoakError::Setup(what.to_string())
}

/// Set by SIGINT/SIGTERM: the run stops at the next check and cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP.store(true, Ordering::SeqCst);
}

fn stopped() -> Result<(), SoakError> {
    if STOP.load(Ordering::SeqCst) { Err(SoakError::Interrupted) } else { Ok(()) }
}

/// Sleeps `d` in small steps, returning early on a signal.
fn pause(d: Duration) -> Result<(), SoakError> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        stopped()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    stopped()
}

/// Polls `f` every 50 ms until it returns Some, at most `limit`.
fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<Option<T>, SoakError> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(Some(v));
        }
        if Instant::now() >= end {
            return Ok(None);
        }
        pause(Duration::from_millis(50))?;
    }
}

/// Runs a command to completion (bounded by its nature: ip, tc, mount), failing on non-zero.
fn sh(args: &[&str]) -> Result<String, SoakError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| setup(format!("{}: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(setup(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const MAC_A: &str = "02:00:00:5a:00:01";
const MAC_B: &str = "02:00:00:5a:00:02";
const MAC_VM1: &str = "02:00:00:5b:00:01";
const MAC_VM2: &str = "02:00:00:5b:00:02";
const MAC_SPARE: &str = "02:00:00:5b:00:03";
const IP_A: &str = "10.93.0.1";
const IP_B: &str = "10.93.0.2";
const UDP_PORT: u16 = 5400;
const STEADY_VLAN: u32 = 10;
const VM_HUGE_MB: u32 = 256;

/// Everything the run made; `Drop` undoes it.
struct Env {
    prefix: String,
    work: PathBuf,
    namespaces: Vec<String>,
    vmq: Option<Child>,
    vms: [Option<Vm>; 2],
    huge_mounted: bool,
    /// nr_hugepages before the run raised it, and what it set.
    huge_restore: Option<(u64, u64)>,
    dpdk_prefixes: Vec<String>,
}

struct Vm {
    child: Child,
    file_prefix: String,
}

impl Env {
    fn ns(&self, which: &str) -> String {
        format!("{}-{which}", self.prefix)
    }
    fn ctl_socket(&self) -> PathBuf {
        self.work.join("ctl.sock")
    }
    fn huge_dir(&self) -> PathBuf {
        self.work.join("huge")
    }

    fn kill_vm(&mut self, i: usize) {
        if let Some(mut vm) = self.vms[i].take() {
            let _ = vm.child.kill();
            let _ = vm.child.wait();
            self.forget_dpdk_files(&vm.file_prefix);
        }
    }

    /// A killed testpmd leaves its hugepage files and runtime directory behind.
    fn forget_dpdk_files(&self, file_prefix: &str) {
        if let Ok(dir) = std::fs::read_dir(self.huge_dir()) {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&format!("{file_prefix}map_")) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(Path::new("/run/dpdk").join(file_prefix));
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for i in 0..2 {
            self.kill_vm(i);
        }
        if let Some(mut vmq) = self.vmq.take() {
            let _ = Command::new("kill").args(["-TERM", &vmq.id().to_string()]).status();
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end && matches!(vmq.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = vmq.kill();
            let _ = vmq.wait();
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        if self.huge_mounted {
            let _ = Command::new("umount").arg(self.huge_dir()).status();
        }
        for p in &self.dpdk_prefixes {
            let _ = std::fs::remove_dir_all(Path::new("/run/dpdk").join(p));
        }
        if let Some((before, set)) = self.huge_restore
            && read_u64("/proc/sys/vm/nr_hugepages") == Some(set)
        {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", before.to_string());
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

/// vmq's resident set (KiB) and CPU time (clock ticks), or why not: a gone or zombie process.
fn proc_rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("/proc/{pid}: {e}"))?;
    if status.lines().any(|l| l.starts_with("State:") && (l.contains("zombie") || l.contains("dead"))) {
        return Err("exited (zombie)".into());
    }
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}

fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz: f64 = sh(&["getconf", "CLK_TCK"]).ok()?.trim().parse().ok()?;
    Some(ticks as f64 / hz)
}

fn call(socket: &Path, req: &Request) -> Result<Response, String> {
    Client::connect(socket, Duration::from_secs(5))
        .and_then(|mut c| c.call(req))
        .map_err(|e| format!("{}: {e}", req.command()))
}

fn port_up(socket: &Path, name: &str) -> bool {
    matches!(call(socket, &Request::Ports), Ok(Response::Ports { ports })
        if ports.iter().any(|p| p.name == name && p.state == PortState::Up))
}

/// The soak's result file.
#[derive(Debug, Serialize)]
struct Report<'a> {
    benchmark: &'static str,
    date: String,
    command: String,
    host: BTreeMap<&'static str, String>,
    vmq_git: String,
    pass: bool,
    checks: &'a [Check],
    limits: Limits,
    duration_s: f64,
    fault_interval_s: f64,
    steady_pps_per_direction: u32,
    faults: &'a BTreeMap<String, u64>,
    fault_errors: &'a [String],
    steady_frames_per_port: &'a BTreeMap<String, u64>,
    steady: &'a SteadyCounts,
    drops_by_reason_all_ports: BTreeMap<String, u64>,
    kernel_drops_all_ports: u64,
    fdb_moves_all_ports: u64,
    fdb_limit_all_ports: u64,
    rss_kib: Option<soak_check::RssFigures>,
    max_heartbeat_gap_s: Option<f64>,
    vmq_cpu_seconds: Option<f64>,
    samples: &'a [Sample],
}

pub fn run(args: &SoakArgs, vmq_bin: &Path, repo: &Path, command: String) -> Result<bool, SoakError> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal)
            .map_err(|e| setup(format!("signal handler: {e}")))?;
    }
    if sh(&["id", "-u"])?.trim() != "0" {
        return Err(setup("needs root (namespaces, TAP, hugepages)"));
    }
    for tool in ["ip", "tc", "dpdk-testpmd", "mount", "getconf"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            return Err(setup(format!("{tool} is missing (apt-get install iproute2 dpdk-dev)")));
        }
    }
    let work = PathBuf::from(format!("/tmp/{}-soak.{}", args.prefix, std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| setup(format!("{}: {e}", work.display())))?;
    let mut env = Env {
        prefix: args.prefix.clone(),
        work,
        namespaces: vec![],
        vmq: None,
        vms: [None, None],
        huge_mounted: false,
        huge_restore: None,
        dpdk_prefixes: vec![],
    };
    let limits = Limits { max_heartbeat_gap_s: args.heartbeat_limit, ..Limits::default() };
    let p = args.prefix.clone();

    // --- namespaces and the uplink's veth -------------------------------------------------
    for which in ["a", "b", "sw", "ext", "c"] {
        let ns = env.ns(which);
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        sh(&["ip", "netns", "add", &ns])?;
        env.namespaces.push(ns.clone());
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        // No IPv6 chatter (router solicitations, DAD): only the soak's frames on the ports.
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
    }
    let (ns_a, ns_b, ns_sw, ns_ext, ns_c) = (env.ns("a"), env.ns("b"), env.ns("sw"), env.ns("ext"), env.ns("c"));
    let (if_up, if_ext, if_a, if_b) = (format!("{p}up"), format!("{p}ext"), format!("{p}a"), format!("{p}b"));
    sh(&["ip", "link", "add", &if_up, "netns", &ns_sw, "type", "veth", "peer", "name", &if_ext, "netns", &ns_ext])?;
    sh(&["ip", "-n", &ns_sw, "link", "set", &if_up, "up"])?;
    sh(&["ip", "-n", &ns_ext, "link", "set", &if_ext, "up"])?;

    // --- hugepages for the two VMs ----------------------------------------------------------
    // Room for four VMs, not two: vmq keeps a killed frontend's guest memory mapped until the
    // port's next frontend connects, so a restarted VM needs pages of its own meanwhile.
    let need_pages = u64::from(VM_HUGE_MB) * 4 / 2 + 64;
    let free = meminfo("HugePages_Free:").unwrap_or(0);
    if free < need_pages {
        let before = read_u64("/proc/sys/vm/nr_hugepages").unwrap_or(0);
        let set = before + need_pages - free;
        std::fs::write("/proc/sys/vm/nr_hugepages", set.to_string())
            .map_err(|e| setup(format!("nr_hugepages: {e}")))?;
        env.huge_restore = Some((before, set));
        if meminfo("HugePages_Free:").unwrap_or(0) < need_pages {
            return Err(setup(format!("could not get {need_pages} free 2 MiB hugepages")));
        }
    }
    std::fs::create_dir_all(env.huge_dir()).map_err(|e| setup(format!("huge dir: {e}")))?;
    sh(&["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "nodev", &env.huge_dir().to_string_lossy()])?;
    env.huge_mounted = true;

    // --- vmq ------------------------------------------------------------------------------
    let w = env.work.display().to_string();
    let config = format!(
        r#"[switch]
mode = "vmq"
workers = 2

[control]
socket = "{w}/ctl.sock"
metrics = "off"

[[port]]
name = "ta"
kind = "tap"
ifname = "{if_a}"
netns = "{ns_a}"
mac = "{MAC_A}"
mtu = 1500
vlan = {STEADY_VLAN}

[[port]]
name = "tb"
kind = "tap"
ifname = "{if_b}"
netns = "{ns_b}"
mac = "{MAC_B}"
mtu = 1500
vlan = {STEADY_VLAN}

[[port]]
name = "up0"
kind = "uplink"
ifname = "{if_up}"
netns = "{ns_sw}"

[[port]]
name = "vm1"
kind = "vhost-user"
socket = "{w}/vm1.sock"
trust_frontend_memory = true   # testpmd's hugetlbfs files cannot be sealed
mac = "{MAC_VM1}"
mtu = 9000

[[port]]
name = "vm2"
kind = "vhost-user"
socket = "{w}/vm2.sock"
trust_frontend_memory = true
mac = "{MAC_VM2}"
mtu = 9000

[[port]]
name = "spare"
kind = "vhost-user"
socket = "{w}/spare.sock"
mac = "{MAC_SPARE}"
"#
    );
    std::fs::write(env.work.join("vmq.toml"), config).map_err(|e| setup(format!("vmq.toml: {e}")))?;
    let log = std::fs::File::create(env.work.join("vmq.log")).map_err(|e| setup(format!("vmq.log: {e}")))?;
    let log2 = log.try_clone().map_err(|e| setup(format!("vmq.log: {e}")))?;
    let child = Command::new(vmq_bin)
        .args(["run", "--config"])
        .arg(env.work.join("vmq.toml"))
        .env("RUST_LOG", std::env::var("SOAK_VMQ_LOG").unwrap_or_else(|_| "warn".into()))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| setup(format!("{}: {e}", vmq_bin.display())))?;
    let vmq_pid = child.id();
    env.vmq = Some(child);
    let ctl = env.ctl_socket();
    let ready = poll(Duration::from_secs(15), || {
        (port_up(&ctl, "ta") && port_up(&ctl, "tb") && port_up(&ctl, "up0")).then_some(())
    })?;
    if ready.is_none() {
        return Err(setup(format!("vmq did not bring its ports up in 15 s: {}", tail(&env.work.join("vmq.log")))));
    }
    for (ns, ifname, ip, peer_ip, peer_mac) in [(&ns_a, &if_a, IP_A, IP_B, MAC_B), (&ns_b, &if_b, IP_B, IP_A, MAC_A)] {
        sh(&["ip", "-n", ns, "link", "set", ifname, "up"])?;
        sh(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", ifname])?;
        // Static neighbours: no ARP on the steady ports, only the steady datagrams.
        sh(&["ip", "-n", ns, "neigh", "replace", peer_ip, "lladdr", peer_mac, "dev", ifname, "nud", "permanent"])?;
    }

    // --- the VMs --------------------------------------------------------------------------
    let mut vm_generation = 0u32;
    for i in 0..2 {
        start_vm(&mut env, i, &mut vm_generation)?;
    }
    for name in ["vm1", "vm2"] {
        if poll(Duration::from_secs(30), || port_up(&ctl, name).then_some(()))?.is_none() {
            let out = tail(&env.work.join(format!("{name}.out")));
            let log = std::fs::read_to_string(env.work.join("vmq.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.contains("control request"))
                .collect::<Vec<_>>()
                .join("\n");
            return Err(setup(format!("{name} did not come up in 30 s; testpmd says: {out}\nvmq says: {log}")));
        }
    }
    println!(
        "soak: vmq pid {vmq_pid}, work dir {}; {} s, a fault every {} s",
        env.work.display(),
        args.seconds,
        args.fault_interval
    );

    // --- baseline, sampler, steady traffic -------------------------------------------------
    let kernel_before = kernel_counters(&[(&ns_a, &if_a), (&ns_b, &if_b)])?;
    let vmq_before = steady_vmq(&ctl)?;
    let t0 = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let gone: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (samples, gone, sampling, ctl) = (samples.clone(), gone.clone(), sampling.clone(), ctl.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                let t = t0.elapsed().as_secs_f64();
                match proc_rss_kib(vmq_pid) {
                    Ok(rss) => {
                        let workers = match call(&ctl, &Request::Workers) {
                            Ok(Response::Workers { workers }) => Some(
                                workers
                                    .iter()
                                    .map(|w| WorkerBeat {
                                        worker: w.worker,
                                        beat: w.frames + w.sleeps,
                                        asleep: w.asleep,
                                        panics: w.panics,
                                    })
                                    .collect(),
                            ),
                            _ => None,
                        };
                        samples.lock().unwrap_or_else(|e| e.into_inner()).push(Sample { t, rss_kib: rss, workers });
                    }
                    Err(e) => {
                        let mut g = gone.lock().unwrap_or_else(|e| e.into_inner());
                        if g.is_none() {
                            *g = Some(format!("{e} at t = {t:.1} s"));
                        }
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let steady = Steady::start(&ns_a, &ns_b, args.pps)?;

    // --- faults -----------------------------------------------------------------------------
    let kinds = ["vm-kill", "port-churn", "mtu-vlan", "mac-flood", "hostile-frontend"];
    let mut faults: BTreeMap<String, u64> = kinds.iter().map(|k| (k.to_string(), 0)).collect();
    let mut fault_errors = Vec::new();
    let mut n = 0u64;
    let mut first_round_done_s = 0.0;
    let run_for = Duration::from_secs(args.seconds);
    let mut result = Ok(());
    while t0.elapsed() < run_for {
        if let Err(e) = pause(Duration::from_secs_f64(args.fault_interval).min(run_for.saturating_sub(t0.elapsed()))) {
            result = Err(e);
            break;
        }
        if t0.elapsed() >= run_for {
            break;
        }
        let kind = kinds[(n % kinds.len() as u64) as usize];
        let outcome = match kind {
            "vm-kill" => fault_vm_kill(&mut env, (n / kinds.len() as u64 % 2) as usize, &mut vm_generation),
            "port-churn" => fault_port_churn(&env, &ns_c, n),
            "mtu-vlan" => fault_mtu_vlan(&ctl, n),
            "mac-flood" => fault_mac_flood(&if_ext, &ns_ext, args.flood_frames, n),
            _ => fault_hostile(&env.work.join("spare.sock"), n),
        };
        match outcome {
            Ok(()) => *faults.entry(kind.to_string()).or_default() += 1,
            Err(FaultError::Interrupted) => {
                result = Err(SoakError::Interrupted);
                break;
            }
            Err(FaultError::Failed(e)) => {
                eprintln!("soak: t = {:.1} s: {kind}: {e}", t0.elapsed().as_secs_f64());
                fault_errors.push(format!("t = {:.1} s: {kind}: {e}", t0.elapsed().as_secs_f64()));
            }
        }
        n += 1;
        if n == kinds.len() as u64 {
            first_round_done_s = t0.elapsed().as_secs_f64();
        }
        if n.is_multiple_of(25) {
            println!("soak: t = {:.0} s, {n} faults", t0.elapsed().as_secs_f64());
        }
    }
    let duration = t0.elapsed().as_secs_f64();

    // --- end: stop traffic, let the counters settle, compare --------------------------------
    let (sent, received) = steady.stop_senders_then(|| {
        // vmq's steady counters stop moving (two equal reads 300 ms apart, at most 10 s).
        let mut last = None;
        let _ = poll(Duration::from_secs(10), || {
            let now = steady_vmq(&ctl).ok();
            let same = now.is_some() && now == last;
            last = now;
            std::thread::sleep(Duration::from_millis(250));
            same.then_some(())
        });
    });
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    result?;
    let vmq_after = steady_vmq(&ctl)?;
    let kernel_after = kernel_counters(&[(&ns_a, &if_a), (&ns_b, &if_b)])?;
    let all_after = match call(&ctl, &Request::Stats { port: None }) {
        Ok(Response::Stats(s)) => s.ports,
        Ok(_) | Err(_) => vec![],
    };
    let cpu = proc_cpu_seconds(vmq_pid);

    let mut steady_counts = SteadyCounts {
        sent,
        received,
        kernel_drops_to_vmq: kernel_after.to_vmq - kernel_before.to_vmq,
        kernel_drops_from_vmq: kernel_after.from_vmq - kernel_before.from_vmq,
        ..SteadyCounts::default()
    };
    for (name, after) in &vmq_after.0 {
        let before = vmq_before.0.get(name).cloned().unwrap_or_default();
        steady_counts.vmq_rx += after.rx - before.rx;
        steady_counts.vmq_tx += after.tx - before.tx;
        steady_counts.per_port_rx.insert(name.clone(), after.rx - before.rx);
        for (reason, v) in &after.drops {
            let d = v - before.drops.get(reason).copied().unwrap_or(0);
            if d > 0 {
                *steady_counts.vmq_drops.entry(reason.clone()).or_default() += d;
            }
        }
    }

    // vmq must still be there, then exit cleanly on SIGTERM.
    for i in 0..2 {
        env.kill_vm(i);
    }
    let mut exited = gone.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut vmq = env.vmq.take().ok_or_else(|| setup("vmq child lost"))?;
    if let Ok(Some(status)) = vmq.try_wait() {
        exited.get_or_insert_with(|| format!("exited with {status} before the end"));
    }
    let _ = Command::new("kill").args(["-TERM", &vmq_pid.to_string()]).status();
    let mut exit_code = None;
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if let Ok(Some(status)) = vmq.try_wait() {
            exit_code = status.code().or(status.signal().map(|s| 128 + s));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if exit_code.is_none() {
        let _ = vmq.kill();
        let _ = vmq.wait();
    }

    let record = Record {
        seconds: duration,
        first_round_done_s,
        samples: samples.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        vmq_exited_during_run: exited,
        vmq_exit_code_at_end: exit_code,
        steady: steady_counts,
        faults,
        fault_errors,
    };
    let checks = soak_check::evaluate(&record, &limits);
    let pass = checks.iter().all(|c| c.pass);
    let mut drops_all: BTreeMap<String, u64> = BTreeMap::new();
    for port in &all_after {
        for (reason, v) in &port.drops {
            if *v > 0 {
                *drops_all.entry(reason.clone()).or_default() += v;
            }
        }
    }
    let report = Report {
        benchmark: "soak: vmq under churn and faults (2 DPDK virtio-user VMs, 2 TAP ports with steady UDP, an uplink)",
        date: utc_now(),
        command,
        host: host_info(),
        vmq_git: sh(&["git", "-C", &repo.to_string_lossy(), "rev-parse", "--short", "HEAD"])
            .unwrap_or_default()
            .trim()
            .to_string(),
        pass,
        checks: &checks,
        limits,
        duration_s: duration,
        fault_interval_s: args.fault_interval,
        steady_pps_per_direction: args.pps,
        faults: &record.faults,
        fault_errors: &record.fault_errors,
        steady_frames_per_port: &record.steady.per_port_rx,
        steady: &record.steady,
        drops_by_reason_all_ports: drops_all,
        kernel_drops_all_ports: all_after.iter().map(|p| p.kernel_drops).sum(),
        fdb_moves_all_ports: all_after.iter().map(|p| p.fdb_moves).sum(),
        fdb_limit_all_ports: all_after.iter().map(|p| p.fdb_limit).sum(),
        rss_kib: soak_check::rss_figures(&record, &limits),
        max_heartbeat_gap_s: soak_check::max_heartbeat_gap(&record).map(|(_, g)| g),
        vmq_cpu_seconds: cpu,
        samples: &record.samples,
    };
    let out = args.out.clone().unwrap_or_else(|| {
        let stamp = report.date.replace([':', '-'], "").replace('T', "-").trim_end_matches('Z').to_string();
        repo.join(format!("bench/results/soak-{stamp}.json"))
    });
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let json = serde_json::to_string_pretty(&report).map_err(|e| setup(format!("json: {e}")))?;
    std::fs::write(&out, json + "\n").map_err(|e| setup(format!("{}: {e}", out.display())))?;

    println!("\nsoak: {:.0} s, faults {:?}", duration, record.faults);
    println!(
        "soak: steady frames into vmq per port {:?}; drops on the steady ports {:?}",
        record.steady.per_port_rx, record.steady.vmq_drops
    );
    println!("soak: drops by reason, all ports {:?}", report.drops_by_reason_all_ports);
    if let Some(c) = cpu {
        println!("soak: vmq CPU time {c:.1} s ({:.0}% of one core)", 100.0 * c / duration.max(1.0));
    }
    for c in &checks {
        println!("  [{}] {}: {}", if c.pass { "pass" } else { "FAIL" }, c.name, c.detail);
    }
    println!("soak: {} ; results in {}", if pass { "PASSED" } else { "FAILED" }, out.display());
    if !pass {
        eprintln!("soak: vmq log (tail): {}", tail(&env.work.join("vmq.log")));
    }
    Ok(pass)
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn utc_now() -> String {
    sh(&["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"]).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn host_info() -> BTreeMap<&'static str, String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split_once(':').map(|x| x.1.trim().to_string()).unwrap_or_default())
        })
        .unwrap_or_default();
    BTreeMap::from([
        ("cpu", cpu),
        ("cpus", std::thread::available_parallelism().map(|n| n.to_string()).unwrap_or_default()),
        ("kernel", sh(&["uname", "-r"]).unwrap_or_default().trim().to_string()),
        ("load_average", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string()),
    ])
}

// --- the VMs ----------------------------------------------------------------------------------

fn start_vm(env: &mut Env, i: usize, generation: &mut u32) -> Result<(), SoakError> {
    *generation += 1;
    let file_prefix = format!("{}-vm{}-{}-{}", env.prefix, i + 1, std::process::id(), generation);
    env.dpdk_prefixes.push(file_prefix.clone());
    let (mac, peer) = if i == 0 { (MAC_VM1, MAC_VM2) } else { (MAC_VM2, MAC_VM1) };
    let sock = env.work.join(format!("vm{}.sock", i + 1));
    let out =
        std::fs::File::create(env.work.join(format!("vm{}.out", i + 1))).map_err(|e| setup(format!("vm out: {e}")))?;
    let err = out.try_clone().map_err(|e| setup(format!("vm out: {e}")))?;
    // Both VMs on CPU 0: each busy-polls one core; vmq and the rest get the other.
    let child = Command::new("dpdk-testpmd")
        .args([
            "--lcores",
            "0@0,1@0",
            "--no-pci",
            "--single-file-segments",
            "--file-prefix",
            &file_prefix,
            "--huge-dir",
        ])
        .arg(env.huge_dir())
        .args(["-m", &VM_HUGE_MB.to_string(), "--vdev"])
        .arg(format!("net_virtio_user0,path={},queues=1,queue_size=256,mac={mac}", sock.display()))
        .args(["--", "--forward-mode=mac", &format!("--eth-peer=0,{peer}"), "--nb-cores=1", "--tx-first"])
        .args(["--rxd=256", "--txd=256", "--total-num-mbufs=4096"])
        // testpmd without -i forwards until its stdin gives a line: the pipe stays open.
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| setup(format!("dpdk-testpmd: {e}")))?;
    env.vms[i] = Some(Vm { child, file_prefix });
    Ok(())
}

enum FaultError {
    Failed(String),
    Interrupted,
}

impl From<SoakError> for FaultError {
    fn from(e: SoakError) -> FaultError {
        match e {
            SoakError::Interrupted => FaultError::Interrupted,
            SoakError::Setup(s) => FaultError::Failed(s),
        }
    }
}

fn fault_vm_kill(env: &mut Env, i: usize, generation: &mut u32) -> Result<(), FaultError> {
    let name = format!("vm{}", i + 1);
    env.kill_vm(i);
    let ctl = env.ctl_socket();
    // vmq sees the frontend go; the port goes down, then a new frontend connects.
    if poll(Duration::from_secs(10), || (!port_up(&ctl, &name)).then_some(()))?.is_none() {
        return Err(FaultError::Failed(format!("{name} still up 10 s after its frontend was killed")));
    }
    start_vm(env, i, generation)?;
    if poll(Duration::from_secs(30), || port_up(&ctl, &name).then_some(()))?.is_none() {
        let out = tail(&env.work.join(format!("vm{}.out", i + 1)));
        return Err(FaultError::Failed(format!("{name} not up 30 s after testpmd restarted: {out}")));
    }
    Ok(())
}

fn fault_port_churn(env: &Env, ns_c: &str, n: u64) -> Result<(), FaultError> {
    let ctl = env.ctl_socket();
    let tap = NewPort {
        name: "churn-tap".into(),
        kind: PortKind::Tap,
        ifname: Some(format!("{}c", env.prefix)),
        netns: Some(ns_c.to_string()),
        mac: Some(format!("02:00:00:5c:00:{:02x}", n % 256)),
        vlan: Some(30),
        ..NewPort::default()
    };
    let vu = NewPort {
        name: "churn-vu".into(),
        kind: PortKind::VhostUser,
        socket: Some(env.work.join("churn.sock").display().to_string()),
        mac: Some(format!("02:00:00:5d:00:{:02x}", n % 256)),
        mtu: Some(if n.is_multiple_of(2) { 1500 } else { 9000 }),
        ..NewPort::default()
    };
    for port in [tap, vu] {
        let name = port.name.clone();
        match call(&ctl, &Request::AddPort(port)) {
            Ok(Response::PortAdded { .. }) => {}
            other => return Err(FaultError::Failed(format!("add-port {name}: {other:?}"))),
        }
    }
    for name in ["churn-tap", "churn-vu"] {
        match call(&ctl, &Request::DelPort { name: name.into() }) {
            Ok(Response::Done { .. }) => {}
            other => return Err(FaultError::Failed(format!("del-port {name}: {other:?}"))),
        }
    }
    Ok(())
}

fn fault_mtu_vlan(ctl: &Path, n: u64) -> Result<(), FaultError> {
    let mtu = [9000, 1500, 4000][(n / 5 % 3) as usize];
    let vlan = [20, 0][(n / 5 % 2) as usize];
    for setting in [
        Setting::PortMtu { port: "vm1".into(), mtu },
        Setting::PortVlan { port: "vm2".into(), vlan },
        Setting::PortMtu { port: "spare".into(), mtu },
        Setting::PortVlan { port: "spare".into(), vlan },
    ] {
        match call(ctl, &Request::Set(setting.clone())) {
            Ok(Response::Done { .. }) => {}
            other => return Err(FaultError::Failed(format!("set {setting:?}: {other:?}"))),
        }
    }
    Ok(())
}

/// xorshift64*: random enough for MAC addresses and garbage bytes, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn fault_mac_flood(ifname: &str, netns: &str, frames: u32, n: u64) -> Result<(), FaultError> {
    let sock = vmq_sys::packet::PacketSocket::open_tx(ifname, Some(netns))
        .map_err(|e| FaultError::Failed(format!("AF_PACKET on {ifname}: {e}")))?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (n + 1));
    let hdr = [0u8; vmq_sys::packet::VNET_HDR_LEN];
    let mut frame = [0u8; 60];
    let mut sent = 0u32;
    for _ in 0..frames {
        // Unknown unicast destination, random locally administered unicast source.
        rng.fill(&mut frame[..12]);
        frame[0] = (frame[0] & 0xfc) | 0x02;
        frame[6] = (frame[6] & 0xfc) | 0x02;
        frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        if sock.send(&hdr, &[&frame]).is_ok() {
            sent += 1;
        }
    }
    if sent == 0 {
        return Err(FaultError::Failed("no flood frame could be sent".into()));
    }
    Ok(())
}

fn fault_hostile(sock: &Path, n: u64) -> Result<(), FaultError> {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ (n + 1));
    // Four kinds of garbage, each on its own connection: random bytes; a header claiming a huge
    // payload; an unknown request code; SET_MEM_TABLE with no file descriptors.
    let mut messages: Vec<Vec<u8>> = Vec::new();
    let mut random = vec![0u8; 4096];
    rng.fill(&mut random);
    messages.push(random);
    let header = |req: u32, flags: u32, size: u32| {
        let mut m = Vec::new();
        m.extend_from_slice(&req.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m
    };
    messages.push(header(1, 1, 0xFFFF_FFF0));
    let mut unknown = header(0xdead, 1, 8);
    unknown.extend_from_slice(&rng.next().to_le_bytes());
    messages.push(unknown);
    let mut owner_then_table = header(3, 1, 0); // SET_OWNER
    owner_then_table.extend(header(5, 1, 32)); // SET_MEM_TABLE: 1 region, no fds
    owner_then_table.extend_from_slice(&1u32.to_le_bytes());
    owner_then_table.extend_from_slice(&[0u8; 4]);
    let mut region = [0u8; 24];
    rng.fill(&mut region);
    owner_then_table.extend_from_slice(&region);
    messages.push(owner_then_table);
    for m in messages {
        let mut s =
            UnixStream::connect(sock).map_err(|e| FaultError::Failed(format!("connect {}: {e}", sock.display())))?;
        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        // vmq may close the connection mid-write: that is a correct answer to garbage.
        let _ = s.write_all(&m);
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
    }
    Ok(())
}

// --- steady traffic ----------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PortCount {
    rx: u64,
    tx: u64,
    drops: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SteadyVmq(BTreeMap<String, PortCount>);

fn steady_vmq(ctl: &Path) -> Result<SteadyVmq, SoakError> {
    match call(ctl, &Request::Stats { port: None }) {
        Ok(Response::Stats(s)) => Ok(SteadyVmq(
            s.ports
                .into_iter()
                .filter(|p| p.port == "ta" || p.port == "tb")
                .map(|p| (p.port.clone(), PortCount { rx: p.rx_packets, tx: p.tx_packets, drops: p.drops }))
                .collect(),
        )),
        other => Err(setup(format!("stats: {other:?}"))),
    }
}

struct KernelCounts {
    to_vmq: u64,
    from_vmq: u64,
}

/// Drops the namespaces' kernels count on the steady path: TAP tx_dropped and qdisc drops
/// (frames that never reached vmq), TAP rx_dropped and UDP receive errors (after vmq).
fn kernel_counters(ports: &[(&String, &String)]) -> Result<KernelCounts, SoakError> {
    let mut k = KernelCounts { to_vmq: 0, from_vmq: 0 };
    for (ns, ifname) in ports {
        let link: serde_json::Value =
            serde_json::from_str(&sh(&["ip", "-n", ns, "-s", "-j", "link", "show", "dev", ifname])?)
                .map_err(|e| setup(format!("ip -s -j link: {e}")))?;
        let stats = &link[0]["stats64"];
        k.to_vmq += stats["tx"]["dropped"].as_u64().unwrap_or(0);
        k.from_vmq += stats["rx"]["dropped"].as_u64().unwrap_or(0);
        let qdisc: serde_json::Value =
            serde_json::from_str(&sh(&["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", ifname])?)
                .map_err(|e| setup(format!("tc -s -j qdisc: {e}")))?;
        for q in qdisc.as_array().into_iter().flatten() {
            // The root qdisc's drops include its children's.
            if q["root"].as_bool() == Some(true) {
                k.to_vmq += q["drops"].as_u64().unwrap_or(0);
            }
        }
        let snmp = sh(&["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"])?;
        let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
        if udp.len() == 2 {
            let names: Vec<&str> = udp[0].split_whitespace().collect();
            let values: Vec<&str> = udp[1].split_whitespace().collect();
            for (n, v) in names.iter().zip(&values) {
                // InErrors includes RcvbufErrors and InCsumErrors.
                if matches!(*n, "InErrors" | "NoPorts") {
                    k.from_vmq += v.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    Ok(k)
}

/// Paced UDP both ways between the steady hosts, counted by the senders and receivers.
struct Steady {
    sending: Arc<AtomicBool>,
    receiving: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Steady {
    fn start(ns_a: &str, ns_b: &str, pps: u32) -> Result<Steady, SoakError> {
        let bind = |ns: &str, ip: &str| -> Result<UdpSocket, SoakError> {
            let addr = format!("{ip}:{UDP_PORT}");
            let s = vmq_sys::netns::run_in(ns, || UdpSocket::bind(&addr))
                .map_err(|e| setup(format!("netns {ns}: {e}")))?
                .map_err(|e| setup(format!("bind {addr} in {ns}: {e}")))?;
            s.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| setup(format!("udp: {e}")))?;
            Ok(s)
        };
        let sock_a = bind(ns_a, IP_A)?;
        let sock_b = bind(ns_b, IP_B)?;
        let st = Steady {
            sending: Arc::new(AtomicBool::new(true)),
            receiving: Arc::new(AtomicBool::new(true)),
            sent: Arc::new(AtomicU64::new(0)),
            received: Arc::new(AtomicU64::new(0)),
            threads: vec![],
        };
        let mut threads = vec![];
        for (sock, peer) in [(sock_a, IP_B), (sock_b, IP_A)] {
            let rx = sock.try_clone().map_err(|e| setup(format!("udp: {e}")))?;
            let (receiving, received) = (st.receiving.clone(), st.received.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while receiving.load(Ordering::Relaxed) {
                    if rx.recv(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
            let (sending, sent) = (st.sending.clone(), st.sent.clone());
            let to = format!("{peer}:{UDP_PORT}");
            threads.push(std::thread::spawn(move || {
                // Batches every 10 ms, paced against the clock (no drift after a slow batch).
                let start = Instant::now();
                let payload = [0x5au8; 200];
                let mut done = 0u64;
                while sending.load(Ordering::Relaxed) {
                    let due = (start.elapsed().as_secs_f64() * f64::from(pps)) as u64;
                    while done < due {
                        if sock.send_to(&payload, &to).is_ok() {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                        done += 1;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }));
        }
        Ok(Steady { threads, ..st })
    }

    /// Stops the senders, runs `settle` (until vmq's counters stop), then lets the receivers
    /// drain for a second and stops them: (sent, received).
    fn stop_senders_then(self, settle: impl FnOnce()) -> (u64, u64) {
        self.sending.store(false, Ordering::Relaxed);
        // The sender threads exit within one 10 ms batch.
        std::thread::sleep(Duration::from_millis(100));
        settle();
        std::thread::sleep(Duration::from_secs(1));
        self.receiving.store(false, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        (self.sent.load(Ordering::Relaxed), self.received.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: SoakArgs,
    }

    #[test]
    fn defaults_are_a_ten_minute_run() {
        let t = T::try_parse_from(["soak"]).unwrap();
        assert_eq!(t.a.seconds, 600);
        assert_eq!(t.a.prefix, "vqs");
        assert!(t.a.fault_interval > 0.0 && t.a.heartbeat_limit > 0.0);
        let t = T::try_parse_from(["soak", "--seconds", "60", "--out", "/tmp/x.json"]).unwrap();
        assert_eq!((t.a.seconds, t.a.out), (60, Some(PathBuf::from("/tmp/x.json"))));
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [
            &["soak", "--seconds", "5"][..],
            &["soak", "--seconds", "-1"],
            &["soak", "--fault-interval", "0"],
            &["soak", "--fault-interval", "nan"],
            &["soak", "--pps", "0"],
            &["soak", "--prefix", "Toolong"],
            &["soak", "--prefix", ""],
        ] {
            assert!(T::try_parse_from(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn flood_frames_have_random_unicast_locally_administered_addresses() {
        let mut rng = Rng(7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut f = [0u8; 12];
            rng.fill(&mut f);
            f[6] = (f[6] & 0xfc) | 0x02;
            assert_eq!(f[6] & 0x03, 0x02);
            seen.insert(f[6..12].to_vec());
        }
        assert_eq!(seen.len(), 1000);
    }
}

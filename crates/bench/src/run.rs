//! `vmq-bench run`: checks the peers, runs each scenario (the two bench scripts for the
//! root-only ones, `vmq bench` for the in-process ones), and writes one result file.
//!
//! Every namespace, daemon, hugepage mount, socket and cgroup belongs to the script that made
//! it; each script removes them on exit, on error and on a signal (trap EXIT). This driver
//! owns only its child processes: a scenario that overruns its deadline gets SIGTERM (so its
//! cleanup runs), then SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::suite::{LoadMark, Machine, PeerCheck, ScalingRow, ScalingRun, Suite, Versions, median};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Failed(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Io { what, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// netns TCP: vmq vs Linux bridge vs OVS userspace (also the CPU per GB, and external -> VMs
    /// in vmq vs switch mode).
    Netns,
    /// vhost-user PVP: vmq vs dpdk-testpmd vs OVS-DPDK.
    Pvp,
    /// In-process: uplink -> 2..64 VM ports, queue budget 8, vmq vs switch mode.
    Scaling,
}

pub struct RunOptions {
    pub quick: bool,
    pub rounds: u32,
    /// Seconds per measurement (None: each scenario's default).
    pub seconds: Option<f64>,
    pub scenarios: Vec<Scenario>,
    pub vmq: PathBuf,
    pub repo: PathBuf,
    pub prefix: String,
    pub command: String,
}

/// True when a skipped scenario must fail the run: `--require-all`, or `VMQ_REQUIRE_ALL=1` (set
/// by `.ci/run` in CI and as root, like for the tests).
pub fn require_all(flag: bool) -> bool {
    flag || std::env::var("VMQ_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Where a program is, if on PATH (or an absolute path that exists).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.starts_with('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

pub const OVS_DPDK_BINARY: &str = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk";

/// Checks every peer and the tools a scenario needs; installs nothing.
pub fn check_peers() -> Vec<PeerCheck> {
    let peers: [(&str, &[&str], &str); 6] = [
        (
            "iperf3 + netns tools (netns TCP)",
            &["iperf3", "ip", "ethtool", "ss", "python3"],
            "apt-get install iperf3 iproute2 ethtool python3",
        ),
        ("Linux bridge", &["ip"], "apt-get install iproute2"),
        (
            "Open vSwitch userspace (netdev)",
            &["ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl"],
            "apt-get install openvswitch-switch",
        ),
        // Debian ships dpdk-testpmd in dpdk-dev, not in dpdk (the libraries).
        ("dpdk-testpmd (vhost-user PVP)", &["dpdk-testpmd", "taskset", "stdbuf"], "apt-get install dpdk-dev"),
        (
            "OVS-DPDK",
            &[OVS_DPDK_BINARY, "ovsdb-server", "ovs-vsctl", "ovs-ofctl"],
            "apt-get install openvswitch-switch-dpdk",
        ),
        ("QEMU (version report only)", &["qemu-system-x86_64"], "apt-get install qemu-system-x86"),
    ];
    peers
        .iter()
        .map(|(peer, programs, install)| {
            let missing: Vec<String> =
                programs.iter().filter(|p| find_program(p).is_none()).map(|p| p.to_string()).collect();
            PeerCheck { peer: peer.to_string(), available: missing.is_empty(), missing, install: install.to_string() }
        })
        .collect()
}

fn peer_ok(peers: &[PeerCheck], prefix: &str) -> bool {
    peers.iter().any(|p| p.peer.starts_with(prefix) && p.available)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn first_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).lines().next().map(|l| l.trim().to_string()).filter(|l| !l.is_empty())
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
    }
}

pub fn versions(repo: &Path) -> Versions {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let mut vmq_git = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
        vmq_git.push_str("-dirty");
    }
    let dpkg = |pkg: &str| first_line("dpkg-query", &["-W", "-f", "${Version}", pkg]);
    Versions {
        vmq_git,
        ovs: first_line("ovs-vswitchd", &["--version"]),
        dpdk: dpkg("dpdk").map(|v| format!("DPDK {v} (Debian package dpdk)")),
        qemu: first_line("qemu-system-x86_64", &["--version"]),
        iperf3: first_line("iperf3", &["--version"]),
    }
}

/// Runs a child to completion within `deadline`; past it, SIGTERM (its cleanup traps run),
/// 30 s, then SIGKILL.
fn run_bounded(mut cmd: Command, what: &str, deadline: Duration) -> Result<ExitStatus, RunError> {
    let mut child: Child = cmd.spawn().map_err(io(format!("starting {what}")))?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(io(format!("waiting for {what}")))? {
            return Ok(status);
        }
        if start.elapsed() > deadline {
            eprintln!("vmq-bench: {what} overran {} s: stopping it", deadline.as_secs());
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let grace = Instant::now();
            while grace.elapsed() < Duration::from_secs(30) {
                if child.try_wait().map_err(io(format!("waiting for {what}")))?.is_some() {
                    return Err(RunError::Failed(format!("{what} overran its {} s deadline", deadline.as_secs())));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            return Err(RunError::Failed(format!("{what} overran its deadline and was killed")));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, RunError> {
    let text = std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| RunError::Failed(format!("{}: {e}", path.display())))
}

/// A temporary directory for the scripts' JSON, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Result<TempDir, RunError> {
        let dir = std::env::temp_dir().join(format!("{prefix}-suite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(opts: &RunOptions) -> Result<Suite, RunError> {
    let is_root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false);
    let peers = check_peers();
    println!("vmq-bench: peers");
    for p in &peers {
        if p.available {
            println!("  found    {}", p.peer);
        } else {
            println!("  SKIPPED  {}: missing {} (install: {})", p.peer, p.missing.join(", "), p.install);
        }
    }
    let tmp = TempDir::new(&opts.prefix)?;
    let mut suite = Suite {
        date: utc_now(),
        command: opts.command.clone(),
        quick: opts.quick,
        rounds: opts.rounds,
        seconds: opts.seconds.unwrap_or(0.0),
        machine: machine(),
        versions: versions(&opts.repo),
        load: vec![LoadMark { when: "start".into(), loadavg: loadavg() }],
        peers: peers.clone(),
        netns: None,
        pvp: None,
        scaling: Vec::new(),
        skipped: Vec::new(),
        failures: Vec::new(),
    };
    println!("vmq-bench: load average at start: {}", suite.load[0].loadavg);

    for &scenario in &opts.scenarios {
        let result = match scenario {
            Scenario::Netns => run_netns(opts, is_root, &peers, &tmp.0, &mut suite),
            Scenario::Pvp => run_pvp(opts, is_root, &peers, &tmp.0, &mut suite),
            Scenario::Scaling => run_scaling(opts, &mut suite),
        };
        if let Err(e) = result {
            eprintln!("vmq-bench: {scenario:?} FAILED: {e}");
            suite.failures.push(format!("{scenario:?}: {e}"));
        }
        suite.load.push(LoadMark { when: format!("after {scenario:?}").to_lowercase(), loadavg: loadavg() });
    }
    Ok(suite)
}

fn skip(suite: &mut Suite, why: String) {
    println!("vmq-bench: SKIPPED {why}");
    suite.skipped.push(why);
}

fn run_netns(
    opts: &RunOptions,
    is_root: bool,
    peers: &[PeerCheck],
    tmp: &Path,
    suite: &mut Suite,
) -> Result<(), RunError> {
    if !is_root {
        skip(suite, "netns TCP (scenarios 1, 3, 5b, 6): needs root (network namespaces)".into());
        return Ok(());
    }
    if !peer_ok(peers, "iperf3") {
        skip(
            suite,
            "netns TCP (scenarios 1, 3, 5b, 6): iperf3/ip/ethtool missing (apt-get install iperf3 iproute2 ethtool)"
                .into(),
        );
        return Ok(());
    }
    let mut systems = vec!["vmq", "bridge"];
    if peer_ok(peers, "Open vSwitch userspace") {
        systems.push("ovs");
    } else {
        skip(suite, "OVS userspace in netns TCP: openvswitch-switch is not installed".into());
    }
    // Part (c), 64-byte frames from a generator behind the uplink, needs dpdk-testpmd.
    let frames_64 = peer_ok(peers, "dpdk-testpmd");
    if !frames_64 {
        skip(
            suite,
            "64-byte frames through the uplink (scenario 6): dpdk-testpmd missing (apt-get install dpdk-dev)".into(),
        );
    }
    let out = tmp.join("netns.json");
    let seconds = opts.seconds.unwrap_or(if opts.quick { 1.0 } else { 5.0 });
    let mut cmd = Command::new("bash");
    cmd.arg(opts.repo.join("bench/netns-tcp.sh"))
        .args(["--rounds", &opts.rounds.to_string(), "--seconds", &seconds.to_string()])
        .args(["--systems", &systems.join(" "), "--mtus", "1500 9000", "--offloads", "on off"])
        .args(["--streams", if opts.quick { "1" } else { "1 4" }, "--parts", if frames_64 { "a b c" } else { "a b" }])
        // Parts (b) and (c) with each uplink driver (scenario 6).
        .args(["--drivers", "af_packet af_xdp"])
        .args(["--prefix", &opts.prefix, "--vmq"])
        .arg(&opts.vmq)
        .arg("--out")
        .arg(&out)
        .current_dir(&opts.repo);
    println!("\nvmq-bench: scenario netns TCP ({}): {:?}", systems.join(", "), cmd);
    // Budget: measurements x (seconds + setup), generously.
    // Part (a): MTUs x offloads x streams x systems; (b): 2 modes x 2 drivers; (c) the same, each
    // with a second of warm-up.
    let per_round = 2 * 2 * if opts.quick { 1 } else { 2 } * systems.len() as u64 + 4 + if frames_64 { 8 } else { 0 };
    let deadline = Duration::from_secs(120 + opts.rounds as u64 * per_round * (seconds as u64 + 15));
    let status = run_bounded(cmd, "bench/netns-tcp.sh", deadline)?;
    if !status.success() {
        return Err(RunError::Failed(format!("bench/netns-tcp.sh exited with {status}")));
    }
    let v = read_json(&out)?;
    // Correctness: every measurement delivered bytes.
    let summary = crate::suite::NetnsSummary::from_value(&v)
        .ok_or_else(|| RunError::Failed("bench/netns-tcp.sh wrote JSON this driver cannot read".into()))?;
    if summary.measurements.is_empty() {
        return Err(RunError::Failed("bench/netns-tcp.sh measured nothing".into()));
    }
    for m in &summary.measurements {
        if m.runs.iter().any(|r| r.bytes == 0 || r.gbps <= 0.0) {
            return Err(RunError::Failed(format!(
                "netns TCP {} {} MTU {}: nothing delivered",
                m.part, m.system, m.mtu
            )));
        }
    }
    // Part (c): each mode with each driver delivered frames.
    if frames_64 && summary.frames_64.len() < 4 {
        return Err(RunError::Failed(format!(
            "bench/netns-tcp.sh part (c): {} of 4 mode/driver rows of 64-byte frames",
            summary.frames_64.len()
        )));
    }
    if let Some(f) = summary.frames_64.iter().find(|f| f.median_mpps <= 0.0) {
        return Err(RunError::Failed(format!("64-byte frames, {} mode, {}: nothing delivered", f.mode, f.driver)));
    }
    suite.netns = Some(v);
    Ok(())
}

fn run_pvp(
    opts: &RunOptions,
    is_root: bool,
    peers: &[PeerCheck],
    tmp: &Path,
    suite: &mut Suite,
) -> Result<(), RunError> {
    if !is_root {
        skip(suite, "vhost-user PVP (scenario 2): needs root (hugepages)".into());
        return Ok(());
    }
    if !peer_ok(peers, "dpdk-testpmd") {
        // The VM side is dpdk-testpmd too: without it nothing can be measured.
        skip(
            suite,
            "vhost-user PVP (scenario 2): dpdk-testpmd is the VM and is missing (apt-get install dpdk-dev)".into(),
        );
        return Ok(());
    }
    if suite.machine.cpus < 2 {
        skip(suite, "vhost-user PVP (scenario 2): needs 2 CPUs (VM on CPU 0, switch on CPU 1)".into());
        return Ok(());
    }
    let mut switches = vec!["vmq", "testpmd"];
    if peer_ok(peers, "OVS-DPDK") {
        switches.push("ovs-dpdk");
    } else {
        skip(suite, "OVS-DPDK in vhost-user PVP: openvswitch-switch-dpdk is not installed".into());
    }
    let out = tmp.join("pvp.json");
    let mut cmd = Command::new("bash");
    cmd.arg(opts.repo.join("bench/pvp-testpmd.sh")).args(["--switches", &switches.join(" "), "--prefix", &opts.prefix]);
    if opts.quick {
        cmd.arg("--quick");
    } else {
        cmd.args(["--repeat", &opts.rounds.to_string()]);
        if let Some(s) = opts.seconds {
            cmd.args(["--seconds", &format!("{}", s.max(1.0).round())]);
        }
    }
    cmd.arg("--json-out").arg(&out).env("VMQ", &opts.vmq).current_dir(&opts.repo);
    println!("\nvmq-bench: scenario vhost-user PVP ({}): {:?}", switches.join(", "), cmd);
    let sizes = if opts.quick { 1 } else { 3 };
    let secs = opts.seconds.unwrap_or(if opts.quick { 2.0 } else { 10.0 }) as u64;
    let deadline = Duration::from_secs(120 + sizes * opts.rounds as u64 * switches.len() as u64 * (secs + 60));
    let status = run_bounded(cmd, "bench/pvp-testpmd.sh", deadline)?;
    if !status.success() {
        return Err(RunError::Failed(format!("bench/pvp-testpmd.sh exited with {status}")));
    }
    let v = read_json(&out)?;
    check_pvp_result(&v, &switches)?;
    suite.pvp = Some(v);
    Ok(())
}

/// Correctness of a PVP result: a row per frame size, and in every row a rate above zero for
/// every switch that was run (a switch whose figure is missing failed, it did not pass).
fn check_pvp_result(v: &serde_json::Value, switches: &[&str]) -> Result<(), RunError> {
    let rows = crate::suite::pvp_rows(v);
    if rows.is_empty() {
        return Err(RunError::Failed("vhost-user PVP: bench/pvp-testpmd.sh reported no frame size".into()));
    }
    for row in &rows {
        for switch in switches {
            let column = match *switch {
                "vmq" => 0,
                "testpmd" => 1,
                "ovs-dpdk" => 2,
                other => return Err(RunError::Failed(format!("vhost-user PVP: unknown switch {other}"))),
            };
            match row.mpps[column] {
                Some(mpps) if mpps > 0.0 => {}
                Some(_) => {
                    return Err(RunError::Failed(format!(
                        "vhost-user PVP {} B: {switch} delivered nothing",
                        row.frame_bytes
                    )));
                }
                None => {
                    return Err(RunError::Failed(format!(
                        "vhost-user PVP {} B: no result for {switch}",
                        row.frame_bytes
                    )));
                }
            }
        }
    }
    Ok(())
}

/// What `vmq bench --json` prints (the fields used here).
#[derive(Debug, Deserialize)]
struct VmqBenchReport {
    workers: usize,
    results: Vec<VmqBenchResult>,
}

#[derive(Debug, Deserialize)]
struct VmqBenchResult {
    mode: String,
    frame_len: usize,
    mpps: f64,
    delivered: u64,
    drops: u64,
    cpu_ns_per_frame: f64,
    busy_ns_per_frame: f64,
    vms_with_queue: usize,
    default_queue_frames: u64,
}

/// (VM ports, queue budget): budget 8 below, at and far above the VM count, and a queue per VM.
const SCALING_CONFIGS: [(usize, u16); 6] = [(2, 8), (8, 8), (32, 8), (64, 8), (32, 32), (64, 64)];

/// (VM ports, queue budget, mode, frame length).
type ConfigKey = (usize, u16, String, usize);

fn run_scaling(opts: &RunOptions, suite: &mut Suite) -> Result<(), RunError> {
    let seconds = opts.seconds.unwrap_or(if opts.quick { 0.2 } else { 2.0 }).min(10.0);
    let frame_lens: &[usize] = &[64, 1518];
    println!(
        "\nvmq-bench: scenario VM scaling / VMQ vs switch mode (in-process, {} VM counts, 2 workers, {seconds} s per run)",
        SCALING_CONFIGS.len()
    );
    let mut runs: Vec<(ConfigKey, (usize, ScalingRun))> = Vec::new();
    for round in 0..opts.rounds {
        // Configurations take turns going first, and within each so do the modes (one `vmq
        // bench` per mode, the order rotated by round and configuration).
        let n = SCALING_CONFIGS.len();
        for k in 0..n {
            let (vms, queues) = SCALING_CONFIGS[(k + round as usize) % n];
            for mode in scaling_mode_order(round as usize + k) {
                run_scaling_case(opts, round, vms, queues, mode, seconds, frame_lens, &mut runs)?;
            }
        }
    }
    let mut keys: Vec<ConfigKey> = runs.iter().map(|(k, _)| k.clone()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let these: Vec<&(usize, ScalingRun)> = runs.iter().filter(|(k, _)| *k == key).map(|(_, r)| r).collect();
        let (vms, queues, mode, frame_len) = key;
        suite.scaling.push(ScalingRow {
            vms,
            queues,
            policy: "dynamic".into(),
            mode,
            frame_len,
            workers: these.first().map(|(w, _)| *w).unwrap_or(2),
            median_mpps: median(these.iter().map(|(_, r)| r.mpps)),
            median_cpu_ns_per_frame: median(these.iter().map(|(_, r)| r.cpu_ns_per_frame)),
            median_busy_ns_per_frame: median(these.iter().map(|(_, r)| r.busy_ns_per_frame)),
            median_default_share: median(
                these.iter().map(|(_, r)| r.default_queue_frames as f64 / r.delivered.max(1) as f64),
            ),
            vms_with_queue: these.last().map(|(_, r)| r.vms_with_queue).unwrap_or(0),
            runs: these.into_iter().map(|(_, r)| r.clone()).collect(),
        });
    }
    Ok(())
}

/// The order of the two modes in the `turn`-th run: vmq first on even turns, switch on odd.
fn scaling_mode_order(turn: usize) -> [&'static str; 2] {
    if turn.is_multiple_of(2) { ["vmq", "switch"] } else { ["switch", "vmq"] }
}

/// One `vmq bench` of one mode and configuration; its results go to `runs`.
#[allow(clippy::too_many_arguments)]
fn run_scaling_case(
    opts: &RunOptions,
    round: u32,
    vms: usize,
    queues: u16,
    mode: &str,
    seconds: f64,
    frame_lens: &[usize],
    runs: &mut Vec<(ConfigKey, (usize, ScalingRun))>,
) -> Result<(), RunError> {
    let mut cmd = Command::new(&opts.vmq);
    cmd.args([
        "bench",
        "--json",
        "--no-tcp",
        "--path",
        "uplink-to-vm",
        "--workers",
        "2",
        "--policy",
        "dynamic",
        "--mode",
        mode,
    ])
    .args(["--vms", &vms.to_string(), "--queues", &queues.to_string(), "--seconds", &seconds.to_string()]);
    for len in frame_lens {
        cmd.args(["--frame-len", &len.to_string()]);
    }
    let out = cmd.stderr(Stdio::inherit()).output().map_err(io("running vmq bench"))?;
    if !out.status.success() {
        return Err(RunError::Failed(format!("vmq bench --vms {vms} --queues {queues} exited with {}", out.status)));
    }
    let report: VmqBenchReport =
        serde_json::from_slice(&out.stdout).map_err(|e| RunError::Failed(format!("vmq bench JSON: {e}")))?;
    let mut lens: Vec<usize> = report.results.iter().filter(|r| r.mode == mode).map(|r| r.frame_len).collect();
    lens.sort_unstable();
    if report.results.len() != frame_lens.len() || lens != frame_lens {
        return Err(RunError::Failed(format!(
            "vmq bench {vms} VMs, budget {queues}, {mode} mode: results for frame lengths {lens:?}, expected {frame_lens:?}"
        )));
    }
    for r in report.results {
        // Correctness (quick mode's assertion too): frames arrive, none dropped.
        if r.delivered == 0 || r.drops != 0 {
            return Err(RunError::Failed(format!(
                "vmq bench {vms} VMs, budget {queues}, {} mode, {} B: delivered {}, drops {}",
                r.mode, r.frame_len, r.delivered, r.drops
            )));
        }
        println!(
            "  round {}: {vms:>2} VMs, budget {queues:>2}, {:<6} {:>4} B: {:>6.2} Mpps, {:>6.1} ns/frame, {} VMs queued, {:.0}% via default queue",
            round + 1,
            r.mode,
            r.frame_len,
            r.mpps,
            r.cpu_ns_per_frame,
            r.vms_with_queue,
            100.0 * r.default_queue_frames as f64 / r.delivered as f64
        );
        runs.push((
            (vms, queues, r.mode, r.frame_len),
            (
                report.workers,
                ScalingRun {
                    mpps: r.mpps,
                    cpu_ns_per_frame: r.cpu_ns_per_frame,
                    busy_ns_per_frame: r.busy_ns_per_frame,
                    delivered: r.delivered,
                    drops: r.drops,
                    vms_with_queue: r.vms_with_queue,
                    default_queue_frames: r.default_queue_frames,
                },
            ),
        ));
    }
    Ok(())
}

/// Now as RFC 3339 UTC, from `date` (std has no calendar).
pub fn utc_now() -> String {
    first_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_modes_take_turns_going_first() {
        assert_eq!(scaling_mode_order(0), ["vmq", "switch"]);
        assert_eq!(scaling_mode_order(1), ["switch", "vmq"]);
        assert_eq!(scaling_mode_order(6), ["vmq", "switch"]);
    }

    #[test]
    fn a_pvp_result_missing_a_switch_that_ran_fails() {
        let all = serde_json::json!({"results": [
            {"frame_bytes": 64, "vmq_mpps": 2.0, "testpmd_mpps": 3.0, "ovs_dpdk_mpps": 1.0},
            {"frame_bytes": 1518, "vmq_mpps": 1.0, "testpmd_mpps": 1.5, "ovs_dpdk_mpps": 0.5},
        ]});
        check_pvp_result(&all, &["vmq", "testpmd", "ovs-dpdk"]).unwrap();
        // OVS-DPDK was not run: its column may be absent.
        let no_ovs = serde_json::json!({"results": [{"frame_bytes": 64, "vmq_mpps": 2.0, "testpmd_mpps": 3.0}]});
        check_pvp_result(&no_ovs, &["vmq", "testpmd"]).unwrap();
        // ...but not when it was.
        let err = check_pvp_result(&no_ovs, &["vmq", "testpmd", "ovs-dpdk"]).unwrap_err().to_string();
        assert!(err.contains("no result for ovs-dpdk"), "{err}");
        let zero = serde_json::json!({"results": [{"frame_bytes": 64, "vmq_mpps": 0.0, "testpmd_mpps": 3.0}]});
        let err = check_pvp_result(&zero, &["vmq", "testpmd"]).unwrap_err().to_string();
        assert!(err.contains("vmq delivered nothing"), "{err}");
        let empty = serde_json::json!({"results": []});
        assert!(check_pvp_result(&empty, &["vmq"]).is_err());
        assert!(check_pvp_result(&serde_json::json!({}), &["vmq"]).is_err());
    }
}

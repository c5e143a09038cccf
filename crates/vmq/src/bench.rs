//! `vmq bench`: the in-process data-path benchmark, printed as a table or one JSON object.

pub(crate) mod harness;

use std::process::ExitCode;

use clap::Args;
use serde::Serialize;
use vmq_core::Mode;
use vmq_core::vmq::QueuePolicy;

use harness::{
    BenchOptions, BenchPath, BenchResult, MqDirection, TcpBenchResult, memcpy_gbps, run_bench, run_tcp_bench,
};

use crate::exit;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 1.0, value_parser = parse_seconds)]
    seconds: f64,
    /// Number of VM ports (in-process virtio-net devices).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=256))]
    vms: u16,
    /// Number of data-path worker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// Ethernet frame lengths to measure (repeatable).
    #[arg(long = "frame-len", value_parser = clap::value_parser!(u16).range(60..=9018))]
    frame_lens: Vec<u16>,
    /// Only this mode (default: both, for the vmq/switch ratio).
    #[arg(long, value_parser = ["vmq", "switch"])]
    mode: Option<String>,
    /// Only this path (default: both).
    #[arg(long, value_parser = ["uplink-to-vm", "vm-to-vm"])]
    path: Option<String>,
    /// VM queue budget (and the stand-in NIC's VM queue count); VMs beyond it share the default
    /// queue and the switch.
    #[arg(long, default_value_t = harness::DEFAULT_QUEUES, value_parser = clap::value_parser!(u16).range(1..=256))]
    queues: u16,
    /// VM queue policy: static (first come, first served) or dynamic (the rebalancer moves
    /// queues to the busiest VMs every 100 ms).
    #[arg(long, default_value = "static", value_parser = ["static", "dynamic"])]
    policy: String,
    /// Skip the VM-to-VM TCP offload measurement.
    #[arg(long)]
    no_tcp: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Instead: the MAC-flood measurement. Two VMs forward through the switch while the uplink
    /// takes 1M random source addresses (each port limited to its default `max_learned_macs`);
    /// prints their rate against the same load from one address, and how long learning held
    /// the switch's write lock. 3 rounds of `--seconds` per case.
    #[arg(long, conflicts_with_all = ["mode", "path", "frame_lens", "no_tcp"])]
    mac_flood: bool,
    /// Instead: the multiqueue measurement. One VM transmits to the uplink as fast as it can
    /// over one queue pair, then over `--mq-pairs` pairs (each TX ring a task of its own, spread
    /// over `--workers`); then receives from the uplink the same way (a VM queue and an RX ring
    /// per pair); prints the rates and their ratio (median of 3 alternating rounds of
    /// `--seconds` each, per frame length; default 64 and 1518 bytes).
    #[arg(long, conflicts_with_all = ["mode", "path", "no_tcp", "mac_flood"])]
    mq: bool,
    /// Queue pairs of the multiqueue measurement's VM.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=16))]
    mq_pairs: u16,
    /// Which way the multiqueue measurement's frames go: `send` (the VM to the uplink),
    /// `receive` (the uplink to the VM, a VM queue per pair) or both.
    #[arg(long, default_value = "both", value_parser = ["send", "receive", "both"])]
    mq_direction: String,
}

fn mq(args: &BenchArgs) -> ExitCode {
    let lens: Vec<usize> =
        if args.frame_lens.is_empty() { vec![64, 1518] } else { args.frame_lens.iter().map(|&l| l as usize).collect() };
    let workers = args.workers as usize;
    let machine = Machine::this();
    eprintln!("vmq bench --mq: on {} ({} CPUs), Linux {}", machine.cpu, machine.cpus, machine.kernel);
    let mut results = Vec::new();
    let directions = match args.mq_direction.as_str() {
        "send" => vec![MqDirection::Send],
        "receive" => vec![MqDirection::Receive],
        _ => vec![MqDirection::Send, MqDirection::Receive],
    };
    for direction in directions {
        match harness::run_mq_bench(direction, args.seconds, workers, args.mq_pairs, &lens, 3) {
            Ok(r) => results.extend(r),
            Err(e) => {
                eprintln!("vmq bench: {e}");
                return ExitCode::from(exit::RUNTIME);
            }
        }
    }
    if args.json {
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "direction": r.direction.name(), "frame_len": r.frame_len, "pairs": r.pairs, "workers": r.workers,
                    "workers_used": r.workers_used, "mpps": finite(r.mpps),
                    "cpu_ns_per_frame": finite(r.cpu_ns_per_frame), "cores_used": finite(r.cores_used),
                    "vm_queues": r.vm_queues, "rx_rings_fed": r.rx_rings_fed,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "machine": machine, "mq": rows }));
        return ExitCode::SUCCESS;
    }
    println!("one VM, {workers} workers (median of 3 rounds of {:.2} s)", args.seconds);
    println!(
        "{:>12}  {:>9}  {:>11}  {:>12}  {:>8}  {:>6}  {:>10}  {:>10}",
        "direction", "frame", "queue pairs", "workers used", "Mpps", "ratio", "cores got", "CPU ns/fr"
    );
    for pair in results.chunks(2) {
        let [one, many] = pair else { continue };
        let ratio = if one.mpps > 0.0 { many.mpps / one.mpps } else { f64::NAN };
        for (r, ratio) in [(one, None), (many, Some(ratio))] {
            let ratio = ratio.map_or(String::new(), |x| format!("{x:.2}x"));
            println!(
                "{:>12}  {:>9}  {:>11}  {:>12}  {:>8.3}  {:>6}  {:>10.2}  {:>10.1}",
                r.direction.name(),
                r.frame_len,
                r.pairs,
                r.workers_used,
                r.mpps,
                ratio,
                r.cores_used,
                r.cpu_ns_per_frame
            );
        }
    }
    ExitCode::SUCCESS
}

fn mac_flood(args: &BenchArgs) -> ExitCode {
    let r = match harness::run_mac_flood_bench(args.seconds, 3, 1_000_000, vmq_core::fdb::DEFAULT_MAX_LEARNED_MACS) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmq bench: {e}");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    if args.json {
        let report = serde_json::json!({
            "machine": Machine::this(),
            "idle_mpps": r.idle_mpps,
            "same_load_mpps": r.same_load_mpps,
            "flood_mpps": r.flood_mpps,
            "rate_ratio": r.rate_ratio(),
            "flood_frames": r.flood_frames,
            "lock_batches": r.lock_batches,
            "lock_max_ns": r.lock_max_ns,
            "lock_mean_ns": r.lock_mean_ns,
            "fdb_limit": r.fdb_limit,
            "fdb_full": r.fdb_full,
            "fdb_entries": r.fdb_entries,
        });
        println!("{report}");
    } else {
        let m = Machine::this();
        println!("vmq bench --mac-flood: on {} ({} CPUs), Linux {}", m.cpu, m.cpus, m.kernel);
        println!(
            "vm0->vm1: idle {:.3} Mpps, uplink busy from one address {:.3}, uplink flooded {:.3} (flood / same load {:.3})",
            r.idle_mpps,
            r.same_load_mpps,
            r.flood_mpps,
            r.rate_ratio()
        );
        println!(
            "learning's write lock: {} batches, mean {:.1} us, longest {:.1} us; flood frames {}, refused at the port limit {}, table full {}, FDB entries {}",
            r.lock_batches,
            r.lock_mean_ns / 1e3,
            r.lock_max_ns as f64 / 1e3,
            r.flood_frames,
            r.fdb_limit,
            r.fdb_full,
            r.fdb_entries
        );
    }
    ExitCode::SUCCESS
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() && (0.01..=3600.0).contains(&v) {
        Ok(v)
    } else {
        Err("seconds must be from 0.01 to 3600".to_string())
    }
}

#[derive(Serialize)]
struct JsonReport {
    /// The machine that measured: figures from another CPU or kernel are not comparable.
    machine: Machine,
    memcpy_gbps: f64,
    workers: usize,
    vms: usize,
    queues: u16,
    policy: &'static str,
    results: Vec<JsonResult>,
    /// VM-to-VM TCP with and without offloads (one worker): vmq's CPU per byte.
    tcp: Vec<JsonTcp>,
}

#[derive(Serialize)]
struct Machine {
    /// `model name` of /proc/cpuinfo.
    cpu: String,
    cpus: usize,
    /// /proc/sys/kernel/osrelease.
    kernel: String,
}

impl Machine {
    fn this() -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        Machine {
            cpu,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        }
    }
}

#[derive(Serialize)]
struct JsonTcp {
    case: &'static str,
    payload_gbps: f64,
    cpu_ns_per_kib: f64,
    frames: u64,
    segments: u64,
    coalesced: u64,
}

fn json_tcp(r: &TcpBenchResult) -> JsonTcp {
    JsonTcp {
        case: r.case.name(),
        payload_gbps: r.payload_gbps,
        cpu_ns_per_kib: r.cpu_ns_per_kib,
        frames: r.frames_delivered,
        segments: r.segments,
        coalesced: r.coalesced,
    }
}

#[derive(Serialize)]
struct JsonResult {
    mode: &'static str,
    path: &'static str,
    frame_len: usize,
    mpps: f64,
    gbps: f64,
    delivered: u64,
    /// Frames delivered over the whole run, warm-up included (for callgrind's whole-run counts).
    delivered_total: u64,
    drops: u64,
    segments: u64,
    /// Worker threads' CPU time during the measurement (kernel accounting, polling included).
    worker_cpu_ns: u64,
    /// Worker time in rounds that moved frames.
    worker_busy_ns: u64,
    cpu_ns_per_frame: f64,
    busy_ns_per_frame: f64,
    vms_with_queue: usize,
    default_queue_frames: u64,
}

fn path_name(path: BenchPath) -> &'static str {
    match path {
        BenchPath::UplinkToVm => "uplink-to-vm",
        BenchPath::VmToVm => "vm-to-vm",
    }
}

pub fn bench(args: &BenchArgs) -> ExitCode {
    if args.mac_flood {
        return mac_flood(args);
    }
    if args.mq {
        return mq(args);
    }
    let frame_lens = if args.frame_lens.is_empty() {
        vec![64, 1518, 9018]
    } else {
        args.frame_lens.iter().map(|&l| l as usize).collect()
    };
    let opts = BenchOptions {
        seconds: args.seconds,
        vms: args.vms as usize,
        workers: args.workers as usize,
        frame_lens,
        modes: match args.mode.as_deref() {
            Some("vmq") => vec![Mode::Vmq],
            Some(_) => vec![Mode::Switch],
            None => vec![Mode::Vmq, Mode::Switch],
        },
        paths: match args.path.as_deref() {
            Some("uplink-to-vm") => vec![BenchPath::UplinkToVm],
            Some(_) => vec![BenchPath::VmToVm],
            None => vec![BenchPath::UplinkToVm, BenchPath::VmToVm],
        },
        queues: args.queues,
        policy: if args.policy == "dynamic" { QueuePolicy::Dynamic } else { QueuePolicy::Static },
    };
    if !args.json {
        let machine = Machine::this();
        eprintln!("vmq bench: on {} ({} CPUs), Linux {}", machine.cpu, machine.cpus, machine.kernel);
        eprintln!(
            "vmq bench: {} VMs, {} workers, queue budget {} ({}), {:.2} s per run (in-process virtio-net devices, no root needed)",
            opts.vms, opts.workers, opts.queues, args.policy, opts.seconds
        );
    }
    let memcpy = memcpy_gbps(opts.seconds.min(1.0));
    let results = match run_bench(&opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmq bench: {e}");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    let tcp = match if args.no_tcp { Ok(Vec::new()) } else { run_tcp_bench(opts.seconds) } {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmq bench: {e}");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    if args.json {
        let report = JsonReport {
            machine: Machine::this(),
            memcpy_gbps: memcpy,
            workers: opts.workers,
            vms: opts.vms,
            queues: opts.queues,
            policy: if opts.policy == QueuePolicy::Dynamic { "dynamic" } else { "static" },
            results: results.iter().map(json_result).collect(),
            tcp: tcp.iter().map(json_tcp).collect(),
        };
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("vmq bench: {e}");
                return ExitCode::from(exit::RUNTIME);
            }
        }
    } else {
        print_table(memcpy, &results);
        print_tcp_table(&tcp);
    }
    ExitCode::SUCCESS
}

fn json_result(r: &BenchResult) -> JsonResult {
    JsonResult {
        mode: r.mode.name(),
        path: path_name(r.path),
        frame_len: r.frame_len,
        mpps: r.mpps,
        gbps: r.gbps,
        delivered: r.delivered,
        delivered_total: r.delivered_total,
        drops: r.drops,
        segments: r.segments,
        worker_cpu_ns: r.worker_cpu_ns,
        worker_busy_ns: r.worker_busy_ns,
        cpu_ns_per_frame: finite(r.cpu_ns_per_frame()),
        busy_ns_per_frame: finite(if r.delivered == 0 { 0.0 } else { r.worker_busy_ns as f64 / r.delivered as f64 }),
        vms_with_queue: r.vms_with_queue,
        default_queue_frames: r.default_queue_frames,
    }
}

/// JSON has no infinity: a cost per frame with nothing delivered is reported as 0.
fn finite(v: f64) -> f64 {
    if v.is_finite() { v } else { 0.0 }
}

fn print_table(memcpy: f64, results: &[BenchResult]) {
    println!("memcpy (1 thread, 9018 B blocks): {memcpy:.1} Gbit/s");
    println!(
        "{:<7} {:<13} {:>9} {:>9} {:>9} {:>12} {:>9} {:>9} {:>10} {:>9} {:>8}",
        "mode",
        "path",
        "frame_len",
        "Mpps",
        "Gbit/s",
        "delivered",
        "drops",
        "segments",
        "vmq/switch",
        "ns/frame",
        "queued"
    );
    for r in results {
        let ratio = match r.mode {
            Mode::Vmq => results
                .iter()
                .find(|s| s.mode == Mode::Switch && s.path == r.path && s.frame_len == r.frame_len && s.mpps > 0.0)
                .map(|s| format!("{:.2}x", r.mpps / s.mpps))
                .unwrap_or_default(),
            Mode::Switch => String::new(),
        };
        println!(
            "{:<7} {:<13} {:>9} {:>9.2} {:>9.2} {:>12} {:>9} {:>9} {:>10} {:>9.1} {:>8}",
            r.mode.name(),
            path_name(r.path),
            r.frame_len,
            r.mpps,
            r.gbps,
            r.delivered,
            r.drops,
            r.segments,
            ratio,
            finite(r.cpu_ns_per_frame()),
            r.vms_with_queue
        );
    }
}

fn print_tcp_table(results: &[TcpBenchResult]) {
    println!();
    println!("VM-to-VM TCP, 1 worker (its CPU time per KiB of payload delivered):");
    println!(
        "{:<15} {:>13} {:>12} {:>10} {:>10} {:>10} {:>14}",
        "case", "payload Gb/s", "ns/KiB", "frames", "segments", "coalesced", "CPU vs no-offl"
    );
    let off = results.iter().find(|r| r.case == harness::TcpCase::OffloadsOff).map(|r| r.cpu_ns_per_kib);
    for r in results {
        let rel = off
            .filter(|o| o.is_finite() && *o > 0.0)
            .map(|o| format!("{:.0}%", 100.0 * r.cpu_ns_per_kib / o))
            .unwrap_or_default();
        println!(
            "{:<15} {:>13.2} {:>12.1} {:>10} {:>10} {:>10} {:>14}",
            r.case.name(),
            r.payload_gbps,
            r.cpu_ns_per_kib,
            r.frames_delivered,
            r.segments,
            r.coalesced,
            rel
        );
    }
}

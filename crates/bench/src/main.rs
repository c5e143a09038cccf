//! `vmq-bench`: the benchmark suite. `run` measures vmq against the switches in use today
//! (Linux bridge, Open vSwitch userspace, OVS-DPDK, dpdk-testpmd) and writes
//! `bench/results/suite-*.json`; `report` turns a result file into BENCHMARKS.md's generated
//! tables and the PNG plots the README links.
#![forbid(unsafe_code)]

mod plot;
mod report;
mod run;
mod soak;
mod soak_check;
mod suite;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::run::{RunOptions, Scenario};
use crate::suite::Suite;

#[derive(Parser)]
#[command(
    name = "vmq-bench",
    about = "vmq's benchmark suite against Linux bridge, Open vSwitch, OVS-DPDK and dpdk-testpmd"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the scenarios (root for netns and PVP; they are skipped, with a line, without it).
    Run {
        /// Smoke test: 1 round, short runs, small counts; checks that traffic is delivered
        /// without errors through every system, never speed. Writes no report unless --out.
        #[arg(long)]
        quick: bool,
        /// Rounds per measurement (systems alternate first place).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
        rounds: u32,
        /// Seconds per measurement (default: netns 5, PVP 10, in-process 2; quick: 1, 2, 0.2).
        #[arg(long)]
        seconds: Option<f64>,
        /// Scenarios to run (default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        scenarios: Vec<Scenario>,
        /// The vmq binary (default: $CARGO_TARGET_DIR or target, release).
        #[arg(long)]
        vmq: Option<PathBuf>,
        /// Result file (default: bench/results/suite-DATE.json; quick: none).
        #[arg(long)]
        out: Option<PathBuf>,
        /// After the run, regenerate BENCHMARKS.md's tables and the plots from it.
        #[arg(long)]
        report: bool,
        /// Prefix of every namespace, interface, cgroup, DPDK file prefix and temp dir.
        #[arg(long, default_value = "vqb")]
        prefix: String,
        /// Fail when a scenario or peer is skipped (also when VMQ_REQUIRE_ALL=1, as `.ci/run` sets
        /// in CI): a skip must not pass for a run.
        #[arg(long)]
        require_all: bool,
    },
    /// Regenerate BENCHMARKS.md's generated tables and bench/plots/*.png from a result file.
    Report {
        /// Result file (default: the newest bench/results/suite-*.json).
        #[arg(long)]
        results: Option<PathBuf>,
        /// Skip the plots.
        #[arg(long)]
        no_plots: bool,
    },
    /// Check that every ratio and percentage of BENCHMARKS.md's hand-written reading appears in
    /// its generated tables, and that the reading names their result file (`report` checks too).
    CheckProse,
    /// Soak: vmq for --seconds with 2 DPDK VMs, 2 TAP ports with steady traffic and an uplink,
    /// a fault every few seconds (VM killed and restarted, ports added and removed, MTU/VLAN
    /// changes, MAC flood, hostile vhost-user frontend); asserts exact counters, RSS, worker
    /// heartbeats, vmq alive. Root; writes bench/results/soak-DATE.json.
    Soak(soak::SoakArgs),
}

fn repo_root() -> PathBuf {
    // The binary runs from the repository (cargo run, or target/release/vmq-bench from it).
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    cwd.ancestors().find(|d| d.join("bench/netns-tcp.sh").is_file()).map(Path::to_path_buf).unwrap_or(cwd)
}

fn default_vmq(repo: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo.join("target"));
    target.join("release/vmq")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let repo = repo_root();
    match cli.command {
        Cmd::Run { quick, rounds, seconds, scenarios, vmq, out, report, prefix, require_all } => {
            let vmq = vmq.unwrap_or_else(|| default_vmq(&repo));
            if !vmq.is_file() {
                eprintln!(
                    "vmq-bench: no vmq binary at {} (cargo build --release -p vmq, or --vmq PATH)",
                    vmq.display()
                );
                return ExitCode::from(2);
            }
            if let Some(s) = seconds
                && !(s.is_finite() && (0.1..=600.0).contains(&s))
            {
                eprintln!("vmq-bench: --seconds must be from 0.1 to 600");
                return ExitCode::from(2);
            }
            if prefix.is_empty() || prefix.len() > 5 || !prefix.chars().all(|c| c.is_ascii_lowercase()) {
                eprintln!("vmq-bench: --prefix must be 1 to 5 lowercase letters (interface names are short)");
                return ExitCode::from(2);
            }
            let opts = RunOptions {
                quick,
                rounds: if quick { 1 } else { rounds },
                seconds,
                scenarios: if scenarios.is_empty() {
                    vec![Scenario::Scaling, Scenario::Netns, Scenario::Pvp]
                } else {
                    scenarios
                },
                vmq,
                repo: repo.clone(),
                prefix,
                command: std::env::args().collect::<Vec<_>>().join(" "),
            };
            let suite = match run::run(&opts) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("vmq-bench: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let out = out.or_else(|| {
                (!quick).then(|| {
                    let stamp = suite.date.replace([':', '-'], "").replace('T', "-").trim_end_matches('Z').to_string();
                    repo.join(format!("bench/results/suite-{stamp}.json"))
                })
            });
            if let Some(path) = &out {
                if let Err(e) = write_suite(path, &suite) {
                    eprintln!("vmq-bench: {e}");
                    return ExitCode::FAILURE;
                }
                println!("\nvmq-bench: results in {}", path.display());
                if report && let Err(e) = make_report(&repo, path, false) {
                    eprintln!("vmq-bench: report: {e}");
                    return ExitCode::FAILURE;
                }
            }
            summarize(&suite);
            let mut failed = false;
            if !suite.failures.is_empty() {
                eprintln!("vmq-bench: {} scenario(s) failed: {}", suite.failures.len(), suite.failures.join("; "));
                failed = true;
            }
            if run::require_all(require_all) && !suite.skipped.is_empty() {
                eprintln!(
                    "vmq-bench: {} skip(s) where every scenario must run (--require-all or VMQ_REQUIRE_ALL=1): {}",
                    suite.skipped.len(),
                    suite.skipped.join("; ")
                );
                failed = true;
            }
            if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
        }
        Cmd::Soak(args) => {
            let vmq = args.vmq.clone().unwrap_or_else(|| default_vmq(&repo));
            if !vmq.is_file() {
                eprintln!(
                    "vmq-bench: no vmq binary at {} (cargo build --release -p vmq, or --vmq PATH)",
                    vmq.display()
                );
                return ExitCode::from(2);
            }
            match soak::run(&args, &vmq, &repo, std::env::args().collect::<Vec<_>>().join(" ")) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("vmq-bench soak: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::CheckProse => {
            let path = repo.join("BENCHMARKS.md");
            let doc = match std::fs::read_to_string(&path) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("vmq-bench: {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            };
            match prose_problems(&doc) {
                Ok(()) => {
                    println!("vmq-bench: every figure of the hand-written reading is in the generated tables");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vmq-bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Report { results, no_plots } => {
            let path = match results.or_else(|| newest_result(&repo)) {
                Some(p) => p,
                None => {
                    eprintln!(
                        "vmq-bench: no bench/results/suite-*.json (run `vmq-bench run` first, or --results FILE)"
                    );
                    return ExitCode::from(2);
                }
            };
            match make_report(&repo, &path, no_plots) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vmq-bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn write_suite(path: &Path, suite: &Suite) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(suite).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

fn newest_result(repo: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo.join("bench/results"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("suite-") && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    files.pop()
}

const PLOT_THROUGHPUT: &str = "bench/plots/pvp-throughput-vs-frame-size.png";
const PLOT_CPU: &str = "bench/plots/tcp-cpu-per-gb.png";
const PLOT_VMS: &str = "bench/plots/rate-vs-vms.png";

fn make_report(repo: &Path, results: &Path, no_plots: bool) -> Result<(), String> {
    let text = std::fs::read_to_string(results).map_err(|e| format!("{}: {e}", results.display()))?;
    let suite: Suite = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", results.display()))?;
    let mut plots: Vec<(&str, &str)> = Vec::new();
    if !no_plots {
        plot::init_font().map_err(|e| e.to_string())?;
        std::fs::create_dir_all(repo.join("bench/plots")).map_err(|e| e.to_string())?;
        let netns = suite.netns.as_ref().and_then(suite::NetnsSummary::from_value);
        let pvp = suite.pvp.as_ref().map(suite::pvp_rows).unwrap_or_default();
        let attempts: [(&str, &str, Result<(), plot::PlotError>); 3] = [
            (
                "vhost-user PVP: throughput vs frame size",
                PLOT_THROUGHPUT,
                plot::throughput_vs_frame_size(&repo.join(PLOT_THROUGHPUT), &pvp),
            ),
            (
                "netns TCP: CPU per GB with and without offloads",
                PLOT_CPU,
                match &netns {
                    Some(n) => plot::cpu_per_gb(&repo.join(PLOT_CPU), n),
                    None => Err(plot::PlotError::NoData("the CPU plot")),
                },
            ),
            (
                "uplink -> VMs: rate and cost vs VM count",
                PLOT_VMS,
                plot::rate_vs_vms(&repo.join(PLOT_VMS), &suite.scaling, 64),
            ),
        ];
        for (title, file, result) in attempts {
            match result {
                Ok(()) => {
                    println!("vmq-bench: plot {file}");
                    plots.push((title, file));
                }
                Err(plot::PlotError::NoData(what)) => println!("vmq-bench: no plot for {what}: not measured"),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    let rel = results.strip_prefix(repo).unwrap_or(results).display().to_string();
    let generated = report::generate(&suite, &rel, &plots);
    let doc_path = repo.join("BENCHMARKS.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap_or_else(|_| "# vmq benchmarks\n\n".into());
    let new = report::splice(&doc, &generated).map_err(|e| e.to_string())?;
    std::fs::write(&doc_path, &new).map_err(|e| format!("{}: {e}", doc_path.display()))?;
    println!("vmq-bench: BENCHMARKS.md regenerated from {rel}");
    prose_problems(&new)
}

/// The hand-written reading's figures that the generated tables do not hold, as one error.
fn prose_problems(doc: &str) -> Result<(), String> {
    let unbacked = report::check_prose(doc)?;
    if unbacked.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = unbacked.iter().map(|u| format!("line {}: {}", u.line, u.figure)).collect();
    Err(format!(
        "BENCHMARKS.md: {} figure(s) of the hand-written reading are not in the generated tables of its result \
         file (update the reading): {}",
        unbacked.len(),
        list.join("; ")
    ))
}

fn summarize(suite: &Suite) {
    println!("\nvmq-bench: summary");
    for l in &suite.load {
        println!("  load {}: {}", l.when, l.loadavg);
    }
    for s in &suite.skipped {
        println!("  skipped: {s}");
    }
    for f in &suite.failures {
        println!("  FAILED: {f}");
    }
    if let Some(n) = suite.netns.as_ref().and_then(suite::NetnsSummary::from_value) {
        println!("  netns TCP: {} measurements", n.measurements.len());
    }
    if let Some(p) = &suite.pvp {
        for r in suite::pvp_rows(p) {
            println!(
                "  PVP {:>5} B: vmq {:?} Mpps, testpmd {:?}, OVS-DPDK {:?}",
                r.frame_bytes, r.mpps[0], r.mpps[1], r.mpps[2]
            );
        }
    }
    println!("  in-process: {} configurations", suite.scaling.len());
}

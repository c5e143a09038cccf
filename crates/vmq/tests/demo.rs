//! `vmq demo` end to end (root): it builds the default topology in namespaces, shows
//! reachability with VLAN isolation and jumbo frames, measures TCP in every configuration, and
//! leaves nothing behind. Without root it refuses at once and points to `vmq bench`.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vmq_testkit::skip::is_root;

fn demo_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vmq-demo"))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `vmq demo --quick --json` with `path` as PATH; its report.
fn run_demo(path: &std::ffi::OsStr) -> serde_json::Value {
    assert!(demo_namespaces().is_empty(), "leftover demo namespaces: {:?}", demo_namespaces());
    let out =
        Command::new(env!("CARGO_BIN_EXE_vmq")).args(["demo", "--quick", "--json"]).env("PATH", path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vmq demo failed: {stderr}\n{}", String::from_utf8_lossy(&out.stdout));
    assert!(demo_namespaces().is_empty(), "the demo left namespaces behind: {:?}", demo_namespaces());
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// What every demo report must show, whichever tools carried the traffic.
fn check_report(report: &serde_json::Value) {
    assert_eq!(report["ping_ok"], true, "{report}");
    assert_eq!(report["vlan_isolation_ok"], true, "{report}");
    assert_eq!(report["jumbo_ok"], true, "{report}");
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 16, "2 modes x 2 MTUs x offloads on/off x 2 paths: {report}");
    for mode in ["vmq", "switch"] {
        for mtu in [1500, 9000] {
            for offloads in [true, false] {
                for path in ["ext-to-vm", "vm-to-vm"] {
                    let these: Vec<&serde_json::Value> = runs
                        .iter()
                        .filter(|r| {
                            r["mode"] == mode && r["mtu"] == mtu && r["offloads"] == offloads && r["path"] == path
                        })
                        .collect();
                    assert_eq!(these.len(), 1, "run {mode} {mtu} {offloads} {path}: {report}");
                    let run = these[0];
                    // TCP went through (no figure is asserted: the host is shared), without a drop.
                    let gbps = run["tcp_gbps"].as_f64().unwrap();
                    assert!(gbps.is_finite() && gbps > 0.0, "TCP through vmq: {run}");
                    // vmq's workers carried the bytes, and the kernel accounted their CPU time.
                    let cpu = run["worker_cpu_s_per_gb"].as_f64().expect("worker_cpu_s_per_gb");
                    assert!(cpu.is_finite() && cpu > 0.0, "vmq's worker CPU per GB: {run}");
                    assert_eq!(run["drops"], 0, "{run}");
                }
            }
        }
    }
    assert_eq!(report["drops"], serde_json::json!({}), "no drop of any reason: {report}");
    // The four runs of one (MTU, offloads) are consecutive; the mode going first alternates.
    let first_modes: Vec<&str> = runs.chunks(4).map(|c| c[0]["mode"].as_str().unwrap()).collect();
    assert_eq!(first_modes, ["switch", "vmq", "switch", "vmq"], "{report}");
    // Every pair of hosts, once per mode; vm3 (VLAN 20) is reachable from nobody, the VLAN-10
    // hosts reach each other.
    let pairs = report["pairs"].as_array().unwrap();
    let mut hosts: Vec<&str> =
        pairs.iter().flat_map(|p| [p["from"].as_str().unwrap(), p["to"].as_str().unwrap()]).collect();
    hosts.sort_unstable();
    hosts.dedup();
    assert!(hosts.len() >= 4, "the external host and at least 3 VMs: {hosts:?}");
    assert_eq!(pairs.len(), 2 * hosts.len() * (hosts.len() - 1) / 2, "{report}");
    assert!(pairs.iter().any(|p| p["same_vlan"] == false), "no pair across VLANs was tried: {report}");
    for pair in pairs {
        assert_eq!(pair["reachable"], pair["same_vlan"], "{pair}");
    }
}

/// A PATH of symbolic links to every program of this one except `without`.
fn path_without(dir: &Path, without: &[&str]) -> std::ffi::OsString {
    std::fs::create_dir_all(dir).unwrap();
    for d in std::env::split_paths(&std::env::var_os("PATH").unwrap()) {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let link = dir.join(&name);
            if without.iter().any(|w| name == **w) || link.exists() {
                continue;
            }
            let _ = std::os::unix::fs::symlink(entry.path(), link);
        }
    }
    dir.as_os_str().to_owned()
}

#[test]
fn demo_shows_isolation_jumbo_frames_and_tcp_in_every_configuration() {
    let test = vmq_testkit::skip::current_test();
    if !vmq_testkit::skip::root_with_tools_or_skip(&test, &["ip", "ping", "ethtool"]) {
        return;
    }
    let started = Instant::now();
    let report = run_demo(&std::env::var_os("PATH").unwrap());
    assert!(started.elapsed() < Duration::from_secs(180), "the quick demo took {:?}", started.elapsed());
    check_report(&report);
    assert_eq!(report["ping_tool"], "ping", "{report}");
    assert_eq!(report["external_offloads_set"], true, "{report}");

    // Without ping the jumbo probe is a UDP echo from don't-fragment sockets, and it must still
    // send a 9000-byte packet; without ethtool the report says the external host kept its offloads.
    let dir = std::env::temp_dir().join(format!("vqq-demo-path-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = path_without(&dir, &["ping", "ethtool"]);
    let report = run_demo(&path);
    let _ = std::fs::remove_dir_all(&dir);
    check_report(&report);
    assert_eq!(report["ping_tool"], "udp-echo", "{report}");
    assert_eq!(report["external_offloads_set"], false, "{report}");
}

#[test]
fn demo_without_root_points_to_bench() {
    if !is_root() {
        vmq_testkit::skip(&vmq_testkit::skip::current_test(), "needs root to drop to another user");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vmq")).arg("demo").uid(65534).gid(65534).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs root") && stderr.contains("vmq bench"), "{stderr}");
}

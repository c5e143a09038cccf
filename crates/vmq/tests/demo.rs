//! `vmq demo` end to end (root): it builds the default topology in namespaces, shows
//! reachability with VLAN isolation and jumbo frames, measures TCP in every configuration, and
//! leaves nothing behind. Without root it refuses at once and points to `vmq bench`.

use std::os::unix::process::CommandExt;
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

#[test]
fn demo_shows_isolation_jumbo_frames_and_tcp_in_every_configuration() {
    if !is_root() {
        vmq_testkit::skip(&vmq_testkit::skip::current_test(), "vmq demo needs root");
        return;
    }
    assert!(demo_namespaces().is_empty(), "leftover demo namespaces: {:?}", demo_namespaces());
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vmq")).args(["demo", "--quick", "--json"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vmq demo failed: {stderr}\n{}", String::from_utf8_lossy(&out.stdout));
    assert!(started.elapsed() < Duration::from_secs(180), "the quick demo took {:?}", started.elapsed());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(report["ping_ok"], true, "{report}");
    assert_eq!(report["vlan_isolation_ok"], true, "{report}");
    assert_eq!(report["jumbo_ok"], true, "{report}");
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 16, "2 modes x 2 MTUs x offloads on/off x 2 paths: {report}");
    for mode in ["vmq", "switch"] {
        for mtu in [1500, 9000] {
            for offloads in [true, false] {
                for path in ["ext-to-vm", "vm-to-vm"] {
                    let run = runs
                        .iter()
                        .find(|r| {
                            r["mode"] == mode && r["mtu"] == mtu && r["offloads"] == offloads && r["path"] == path
                        })
                        .unwrap_or_else(|| panic!("no run {mode} {mtu} {offloads} {path}: {report}"));
                    let gbps = run["tcp_gbps"].as_f64().unwrap();
                    assert!(gbps > 0.05, "TCP through vmq: {run}");
                }
            }
        }
    }
    // vm3 (VLAN 20) is reachable from nobody; the VLAN-10 hosts reach each other.
    for pair in report["pairs"].as_array().unwrap() {
        assert_eq!(pair["reachable"], pair["same_vlan"], "{pair}");
    }
    assert!(demo_namespaces().is_empty(), "the demo left namespaces behind: {:?}", demo_namespaces());
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

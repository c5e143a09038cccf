//! The suite's result file (`bench/results/suite-*.json`) and typed views of the scenario
//! scripts' JSON inside it.

use serde::{Deserialize, Serialize};

/// One run of the whole suite.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Suite {
    /// UTC, RFC 3339.
    pub date: String,
    pub command: String,
    pub quick: bool,
    pub rounds: u32,
    pub seconds: f64,
    pub machine: Machine,
    pub versions: Versions,
    /// `/proc/loadavg` (1, 5, 15 min) at the start and after each scenario.
    pub load: Vec<LoadMark>,
    pub peers: Vec<PeerCheck>,
    /// What `bench/netns-tcp.sh` wrote (scenarios 1, 3 and the netns part of 5).
    pub netns: Option<serde_json::Value>,
    /// What `bench/pvp-testpmd.sh` wrote (scenario 2).
    pub pvp: Option<serde_json::Value>,
    /// In-process `vmq bench` runs (scenarios 4 and 5).
    pub scaling: Vec<ScalingRow>,
    /// Scenarios skipped, with why.
    pub skipped: Vec<String>,
    /// Scenarios that failed, with why.
    pub failures: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Versions {
    pub vmq_git: String,
    pub ovs: Option<String>,
    pub dpdk: Option<String>,
    pub qemu: Option<String>,
    pub iperf3: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadMark {
    pub when: String,
    pub loadavg: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerCheck {
    pub peer: String,
    pub available: bool,
    /// Programs not found.
    pub missing: Vec<String>,
    /// How to get them.
    pub install: String,
}

/// One in-process configuration measured over the rounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScalingRow {
    pub vms: usize,
    pub queues: u16,
    pub policy: String,
    pub mode: String,
    pub frame_len: usize,
    pub workers: usize,
    pub runs: Vec<ScalingRun>,
    pub median_mpps: f64,
    pub median_cpu_ns_per_frame: f64,
    pub median_busy_ns_per_frame: f64,
    /// Share of delivered frames that came through the default queue (the switch).
    pub median_default_share: f64,
    pub vms_with_queue: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScalingRun {
    pub mpps: f64,
    pub cpu_ns_per_frame: f64,
    pub busy_ns_per_frame: f64,
    pub delivered: u64,
    pub drops: u64,
    pub vms_with_queue: usize,
    pub default_queue_frames: u64,
}

pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

pub fn system_label(system: &str) -> &str {
    match system {
        "vmq" => "vmq",
        "bridge" => "Linux bridge",
        "ovs" => "OVS userspace",
        other => other,
    }
}

/// `bench/netns-tcp.sh` output, the parts the report uses.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NetnsSummary {
    #[serde(default)]
    pub measurements: Vec<NetnsMeasurement>,
    /// Part (c): 64-byte frames from a generator behind the uplink to 3 TAP VMs.
    #[serde(default)]
    pub frames_64: Vec<Frames64>,
}

/// One (mode, uplink driver) of part (c), medians of the rounds.
#[derive(Debug, Clone, Deserialize)]
pub struct Frames64 {
    /// `vmq` or `switch`.
    pub mode: String,
    /// `af_packet` or `af_xdp`.
    pub driver: String,
    /// Frames vmq delivered to the VMs, millions per second.
    pub median_mpps: f64,
    /// The vmq process's CPU-seconds per million frames delivered.
    pub median_vmq_cpu_s_per_mframe: f64,
    /// The same with the generator's CPU (which pays the kernel's receive softirq on the veth).
    pub median_total_cpu_s_per_mframe: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NetnsMeasurement {
    pub part: String,
    pub system: String,
    pub mtu: u32,
    pub offloads: bool,
    pub streams: u32,
    pub median_gbps: f64,
    /// Every process of the measurement (a cgroup: the switch and the iperf3 endpoints).
    pub median_cpu_s_per_gb: Option<f64>,
    /// The vmq process alone; None where vmq was not the switch (or in results from before it
    /// was measured).
    #[serde(default)]
    pub median_vmq_cpu_s_per_gb: Option<f64>,
    #[serde(default)]
    pub runs: Vec<NetnsRun>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NetnsRun {
    pub gbps: f64,
    #[serde(default)]
    pub bytes: u64,
}

impl NetnsSummary {
    pub fn from_value(v: &serde_json::Value) -> Option<NetnsSummary> {
        serde_json::from_value(v.clone()).ok()
    }

    pub fn find(&self, part: &str, system: &str, mtu: u32, offloads: bool, streams: u32) -> Option<&NetnsMeasurement> {
        self.measurements.iter().find(|m| {
            m.part == part && m.system == system && m.mtu == mtu && m.offloads == offloads && m.streams == streams
        })
    }

    pub fn gbps(&self, system: &str, mtu: u32, offloads: bool, streams: u32) -> Option<f64> {
        self.find("a", system, mtu, offloads, streams).map(|m| m.median_gbps)
    }

    pub fn cpu_s_per_gb(&self, system: &str, mtu: u32, offloads: bool, streams: u32) -> Option<f64> {
        self.find("a", system, mtu, offloads, streams).and_then(|m| m.median_cpu_s_per_gb)
    }

    /// Part (c)'s row of one mode and uplink driver.
    pub fn frames(&self, mode: &str, driver: &str) -> Option<&Frames64> {
        self.frames_64.iter().find(|f| f.mode == mode && f.driver == driver)
    }

    /// Systems of part (a), vmq first.
    pub fn systems(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in ["vmq", "bridge", "ovs"] {
            if self.measurements.iter().any(|m| m.part == "a" && m.system == s) {
                out.push(s.to_string());
            }
        }
        out
    }

    pub fn mtus(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.measurements.iter().filter(|m| m.part == "a").map(|m| m.mtu).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn streams(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.measurements.iter().filter(|m| m.part == "a").map(|m| m.streams).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// One frame size of the PVP scenario.
#[derive(Debug, Clone)]
pub struct PvpRow {
    pub frame_bytes: u32,
    /// Mpps medians: vmq, dpdk-testpmd, OVS-DPDK.
    pub mpps: [Option<f64>; 3],
    /// Forwarding thread CPU ns per frame: vmq, dpdk-testpmd, OVS-DPDK.
    pub cpu_ns: [Option<f64>; 3],
    /// vmq / testpmd and vmq / OVS-DPDK of each run pair.
    pub paired: [Vec<f64>; 2],
}

pub fn pvp_rows(v: &serde_json::Value) -> Vec<PvpRow> {
    let Some(rows) = v.get("results").and_then(|r| r.as_array()) else {
        return Vec::new();
    };
    let f = |r: &serde_json::Value, k: &str| r.get(k).and_then(|x| x.as_f64());
    let list = |r: &serde_json::Value, k: &str| -> Vec<f64> {
        r.get(k).and_then(|x| x.as_array()).map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default()
    };
    let mut out: Vec<PvpRow> = rows
        .iter()
        .filter_map(|r| {
            Some(PvpRow {
                frame_bytes: r.get("frame_bytes")?.as_u64()? as u32,
                mpps: [f(r, "vmq_mpps"), f(r, "testpmd_mpps"), f(r, "ovs_dpdk_mpps")],
                cpu_ns: [
                    f(r, "vmq_cpu_ns_per_frame"),
                    f(r, "testpmd_cpu_ns_per_frame"),
                    f(r, "ovs_dpdk_cpu_ns_per_frame"),
                ],
                paired: [list(r, "paired_ratios"), list(r, "paired_ratios_ovs_dpdk")],
            })
        })
        .collect();
    out.sort_by_key(|r| r.frame_bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts_ignores_non_finite() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median([f64::NAN, 5.0, f64::INFINITY]), 5.0);
        assert_eq!(median([]), 0.0);
    }

    #[test]
    fn the_netns_script_output_with_both_uplink_drivers_reads_back() {
        // A real result of `bench/netns-tcp.sh --parts "b c" --drivers "af_packet af_xdp"`.
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../../bench/results/netns-afxdp-64b-tcp-20261205.json")).unwrap();
        let n = NetnsSummary::from_value(&v).unwrap();
        assert_eq!(n.frames_64.len(), 4);
        for mode in ["vmq", "switch"] {
            for driver in ["af_packet", "af_xdp"] {
                let f = n.frames(mode, driver).unwrap();
                assert!(f.median_mpps > 0.0 && f.median_vmq_cpu_s_per_mframe > 0.0, "{f:?}");
                assert!(f.median_total_cpu_s_per_mframe > f.median_vmq_cpu_s_per_mframe, "{f:?}");
            }
        }
        assert!(n.find("b", "vmq+af_xdp", 1500, true, 3).is_some());
        assert!(n.find("b", "switch", 1500, true, 3).is_some());
    }

    #[test]
    fn pvp_rows_read_the_script_output_sorted_by_size() {
        let v = serde_json::json!({"results": [
            {"frame_bytes": 1518, "vmq_mpps": 2.0, "testpmd_mpps": 4.0, "paired_ratios": [0.5]},
            {"frame_bytes": 64, "vmq_mpps": 7.0, "ovs_dpdk_mpps": 8.0, "ovs_dpdk_cpu_ns_per_frame": 120.0},
        ]});
        let rows = pvp_rows(&v);
        assert_eq!(rows.iter().map(|r| r.frame_bytes).collect::<Vec<_>>(), vec![64, 1518]);
        assert_eq!(rows[0].mpps, [Some(7.0), None, Some(8.0)]);
        assert_eq!(rows[0].cpu_ns[2], Some(120.0));
        assert_eq!(rows[1].paired[0], vec![0.5]);
    }

    #[test]
    fn netns_summary_finds_measurements_by_key() {
        let v = serde_json::json!({"measurements": [
            {"part": "a", "system": "vmq", "mtu": 1500, "offloads": true, "streams": 1, "median_gbps": 9.0, "median_cpu_s_per_gb": 1.0},
            {"part": "a", "system": "ovs", "mtu": 9000, "offloads": false, "streams": 4, "median_gbps": 3.0, "median_cpu_s_per_gb": null},
        ]});
        let s = NetnsSummary::from_value(&v).expect("parses");
        assert_eq!(s.gbps("vmq", 1500, true, 1), Some(9.0));
        assert_eq!(s.cpu_s_per_gb("ovs", 9000, false, 4), None);
        assert_eq!(s.gbps("vmq", 1500, false, 1), None);
        assert_eq!(s.systems(), vec!["vmq".to_string(), "ovs".to_string()]);
        assert_eq!(s.mtus(), vec![1500, 9000]);
    }
}

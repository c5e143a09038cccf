//! The soak's record and verdict, without I/O: what a run measured (samples of vmq's RSS and
//! worker heartbeats, the steady ports' counters on every side, the faults injected) and the
//! pass criteria evaluated on it, so that a recorded run can be judged again in a unit test.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Limits a run is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Share of the run before the RSS baseline is taken.
    pub warmup_fraction: f64,
    /// RSS at the end may exceed the baseline by less than this share.
    pub max_rss_growth: f64,
    /// A worker's `frames + sleeps` must advance at least once in this many seconds.
    pub max_heartbeat_gap_s: f64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { warmup_fraction: 0.2, max_rss_growth: 0.10, max_heartbeat_gap_s: 5.0 }
    }
}

/// One periodic look at vmq.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the faults started.
    pub t: f64,
    pub rss_kib: u64,
    /// Per worker: `frames + sleeps` (its heartbeat), whether it was asleep (idle: a worker
    /// with nothing to do sleeps without a timeout) and panics; `None` when the control call
    /// failed at this sample.
    pub workers: Option<Vec<WorkerBeat>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerBeat {
    pub worker: u32,
    pub beat: u64,
    #[serde(default)]
    pub asleep: bool,
    pub panics: u64,
}

/// The steady traffic between the two TAP ports, counted on every side (deltas over the run).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SteadyCounts {
    /// Datagrams the senders handed to the kernel (`send` succeeded), both directions.
    pub sent: u64,
    /// Datagrams the receivers read.
    pub received: u64,
    /// Frames the namespaces' kernels dropped on the way into vmq (TAP `tx_dropped`, qdisc).
    pub kernel_drops_to_vmq: u64,
    /// Frames the namespaces' kernels dropped after vmq wrote them (TAP `rx_dropped`, UDP
    /// receive errors, no socket).
    pub kernel_drops_from_vmq: u64,
    /// vmq's counters of the two steady ports, summed.
    pub vmq_rx: u64,
    pub vmq_tx: u64,
    /// vmq's drops on the two steady ports, by reason (zeros left out).
    pub vmq_drops: BTreeMap<String, u64>,
    /// Per port: frames received by vmq from it.
    pub per_port_rx: BTreeMap<String, u64>,
}

impl SteadyCounts {
    pub fn vmq_drops_total(&self) -> u64 {
        self.vmq_drops.values().sum()
    }
}

/// Everything a run recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seconds: f64,
    /// When every fault kind had run once (the MAC table fills on the first flood): the RSS
    /// baseline is taken no earlier, nor before `warmup_fraction` of the run.
    #[serde(default)]
    pub first_round_done_s: f64,
    pub samples: Vec<Sample>,
    /// Set when vmq was seen gone during the run (what was seen, when).
    pub vmq_exited_during_run: Option<String>,
    /// vmq's exit after the soak's SIGTERM at the end: `Some(0)` is a clean exit.
    pub vmq_exit_code_at_end: Option<i32>,
    pub steady: SteadyCounts,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Faults that could not be injected or whose aftermath was wrong (vmq refused a valid
    /// request, a restarted VM never came back), in words.
    pub fault_errors: Vec<String>,
}

/// One pass criterion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

/// Figures derived from the samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RssFigures {
    pub start_kib: u64,
    pub after_warmup_kib: u64,
    pub end_kib: u64,
    pub max_after_warmup_kib: u64,
}

pub fn rss_figures(r: &Record, limits: &Limits) -> Option<RssFigures> {
    let first = r.samples.first()?;
    let warm_t = (r.seconds * limits.warmup_fraction).max(r.first_round_done_s);
    let warm_idx = r.samples.iter().position(|s| s.t >= warm_t)?;
    let after = &r.samples[warm_idx..];
    Some(RssFigures {
        start_kib: first.rss_kib,
        after_warmup_kib: after[0].rss_kib,
        end_kib: r.samples.last()?.rss_kib,
        max_after_warmup_kib: after.iter().map(|s| s.rss_kib).max().unwrap_or(0),
    })
}

/// The longest time any worker went without its heartbeat advancing while awake, in seconds,
/// and which worker: a sample that finds the worker asleep (waiting for work) counts as a beat.
/// Samples where the control call failed count as "no news" (the gap runs on).
pub fn max_heartbeat_gap(r: &Record) -> Option<(u32, f64)> {
    // worker -> (time of last advance, last beat)
    let mut last: BTreeMap<u32, (f64, u64)> = BTreeMap::new();
    let mut worst: Option<(u32, f64)> = None;
    let mut bump = |w: u32, gap: f64| {
        if worst.is_none_or(|(_, g)| gap > g) {
            worst = Some((w, gap));
        }
    };
    let first_t = r.samples.first().map(|s| s.t).unwrap_or(0.0);
    let end_t = r.samples.last().map(|s| s.t).unwrap_or(0.0);
    for s in &r.samples {
        let Some(ws) = &s.workers else { continue };
        for w in ws {
            match last.get(&w.worker) {
                None => {
                    last.insert(w.worker, (s.t, w.beat));
                }
                Some(&(t0, b0)) if w.beat != b0 || w.asleep => {
                    bump(w.worker, s.t - t0);
                    last.insert(w.worker, (s.t, w.beat));
                }
                Some(_) => {}
            }
        }
    }
    for (&w, &(t0, _)) in &last {
        bump(w, end_t - t0);
    }
    if last.is_empty() && !r.samples.is_empty() {
        // No worker was ever seen: the whole run is one gap.
        bump(u32::MAX, end_t - first_t);
    }
    worst
}

pub fn total_panics(r: &Record) -> u64 {
    let mut by_worker: BTreeMap<u32, u64> = BTreeMap::new();
    for s in &r.samples {
        for w in s.workers.iter().flatten() {
            let e = by_worker.entry(w.worker).or_default();
            *e = (*e).max(w.panics);
        }
    }
    by_worker.values().sum()
}

/// Judges a run.
pub fn evaluate(r: &Record, limits: &Limits) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut check = |name: &str, pass: bool, detail: String| {
        checks.push(Check { name: name.to_string(), pass, detail });
    };

    let alive = r.vmq_exited_during_run.is_none();
    check(
        "vmq never exited",
        alive && r.vmq_exit_code_at_end == Some(0),
        match (&r.vmq_exited_during_run, r.vmq_exit_code_at_end) {
            (Some(what), _) => format!("vmq gone during the run: {what}"),
            (None, Some(0)) => "alive throughout; exit status 0 after SIGTERM at the end".to_string(),
            (None, Some(c)) => format!("alive throughout, but exit status {c} after SIGTERM at the end"),
            (None, None) => "alive throughout, but no clean exit after SIGTERM at the end".to_string(),
        },
    );

    let s = &r.steady;
    let drops = s.vmq_drops_total();
    check(
        "steady ports: vmq rx = tx + drops",
        s.vmq_rx > 0 && s.vmq_rx == s.vmq_tx + drops,
        format!(
            "rx {} = tx {} + drops {} {:?} (difference {})",
            s.vmq_rx,
            s.vmq_tx,
            drops,
            s.vmq_drops,
            s.vmq_rx as i128 - (s.vmq_tx + drops) as i128
        ),
    );
    check(
        "steady senders: sent = vmq rx + kernel drops before vmq",
        s.sent > 0 && s.sent == s.vmq_rx + s.kernel_drops_to_vmq,
        format!(
            "sent {} = vmq rx {} + kernel drops {} (difference {})",
            s.sent,
            s.vmq_rx,
            s.kernel_drops_to_vmq,
            s.sent as i128 - (s.vmq_rx + s.kernel_drops_to_vmq) as i128
        ),
    );
    check(
        "steady receivers: vmq tx = received + kernel drops after vmq",
        s.vmq_tx == s.received + s.kernel_drops_from_vmq,
        format!(
            "vmq tx {} = received {} + kernel drops {} (difference {})",
            s.vmq_tx,
            s.received,
            s.kernel_drops_from_vmq,
            s.vmq_tx as i128 - (s.received + s.kernel_drops_from_vmq) as i128
        ),
    );

    match rss_figures(r, limits) {
        Some(f) => {
            let growth = f.end_kib as f64 / f.after_warmup_kib.max(1) as f64 - 1.0;
            check(
                "RSS after warm-up grows < 10%",
                growth < limits.max_rss_growth,
                format!(
                    "{} KiB after warm-up -> {} KiB at the end ({:+.1}%; start {} KiB, max after warm-up {} KiB)",
                    f.after_warmup_kib,
                    f.end_kib,
                    growth * 100.0,
                    f.start_kib,
                    f.max_after_warmup_kib
                ),
            );
        }
        None => check("RSS after warm-up grows < 10%", false, "no RSS sample after the warm-up".to_string()),
    }

    match max_heartbeat_gap(r) {
        Some((w, gap)) => check(
            "no worker stall (heartbeat)",
            gap <= limits.max_heartbeat_gap_s,
            format!("longest gap {gap:.1} s (worker {w}; limit {:.1} s)", limits.max_heartbeat_gap_s),
        ),
        None => check("no worker stall (heartbeat)", false, "no worker sample".to_string()),
    }
    let panics = total_panics(r);
    check("no worker panic", panics == 0, format!("{panics} panic(s) caught in workers"));

    let injected: u64 = r.faults.values().sum();
    check(
        "faults injected as planned",
        injected > 0 && r.fault_errors.is_empty(),
        if r.fault_errors.is_empty() {
            format!("{injected} faults: {:?}", r.faults)
        } else {
            format!("{} fault error(s), first: {}", r.fault_errors.len(), r.fault_errors[0])
        },
    );
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, rss: u64, beats: &[u64]) -> Sample {
        Sample {
            t,
            rss_kib: rss,
            workers: Some(
                beats
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| WorkerBeat { worker: i as u32, beat: b, asleep: false, panics: 0 })
                    .collect(),
            ),
        }
    }

    /// A recorded 10-second run that passes every check.
    fn passing() -> Record {
        Record {
            seconds: 10.0,
            first_round_done_s: 1.5,
            samples: (0..=10).map(|i| sample(i as f64, 8000 + i * 10, &[i * 10, i * 7])).collect(),
            vmq_exited_during_run: None,
            vmq_exit_code_at_end: Some(0),
            steady: SteadyCounts {
                sent: 1000,
                received: 990,
                kernel_drops_to_vmq: 2,
                kernel_drops_from_vmq: 3,
                vmq_rx: 998,
                vmq_tx: 993,
                vmq_drops: BTreeMap::from([("no_route".to_string(), 5)]),
                per_port_rx: BTreeMap::new(),
            },
            faults: BTreeMap::from([("vm-kill".to_string(), 2)]),
            fault_errors: vec![],
        }
    }

    fn failed(r: &Record) -> Vec<String> {
        evaluate(r, &Limits::default()).into_iter().filter(|c| !c.pass).map(|c| c.name).collect()
    }

    #[test]
    fn a_clean_run_passes_every_check() {
        assert_eq!(failed(&passing()), Vec::<String>::new());
    }

    #[test]
    fn one_uncounted_frame_fails_the_accounting() {
        let mut r = passing();
        r.steady.vmq_tx -= 1;
        assert_eq!(
            failed(&r),
            ["steady ports: vmq rx = tx + drops", "steady receivers: vmq tx = received + kernel drops after vmq"]
        );
        let mut r = passing();
        r.steady.sent += 1;
        assert_eq!(failed(&r), ["steady senders: sent = vmq rx + kernel drops before vmq"]);
    }

    #[test]
    fn no_steady_traffic_is_a_failure_not_a_pass() {
        let mut r = passing();
        r.steady = SteadyCounts::default();
        let f = failed(&r);
        assert!(f.contains(&"steady ports: vmq rx = tx + drops".to_string()), "{f:?}");
    }

    #[test]
    fn rss_growth_is_measured_from_the_end_of_the_warm_up() {
        let mut r = passing();
        // Growth during the warm-up (first 20%) does not count ...
        r.samples[0].rss_kib = 1000;
        r.samples[1].rss_kib = 4000;
        assert_eq!(failed(&r), Vec::<String>::new());
        // ... growth after it does: 8020 KiB at t = 2 s, 8830 at the end is +10.1%.
        r.samples[10].rss_kib = 8830;
        assert_eq!(failed(&r), ["RSS after warm-up grows < 10%"]);
        let f = rss_figures(&r, &Limits::default()).unwrap();
        assert_eq!((f.start_kib, f.after_warmup_kib, f.end_kib, f.max_after_warmup_kib), (1000, 8020, 8830, 8830));
        // A first round of faults that ends later moves the baseline: 8060 KiB at t = 6 s.
        r.first_round_done_s = 6.0;
        assert_eq!(rss_figures(&r, &Limits::default()).unwrap().after_warmup_kib, 8060);
        assert_eq!(failed(&r), Vec::<String>::new());
    }

    #[test]
    fn a_worker_whose_heartbeat_stops_is_a_stall() {
        let mut r = passing();
        for s in &mut r.samples[3..] {
            s.workers.as_mut().unwrap()[1].beat = 21;
        }
        // Worker 1 last advanced at t = 3 and the run ended at t = 10.
        assert_eq!(max_heartbeat_gap(&r), Some((1, 7.0)));
        assert_eq!(failed(&r), ["no worker stall (heartbeat)"]);
    }

    /// An idle worker sleeps without a timeout: standing counters while asleep are no stall,
    /// the same counters while awake are.
    #[test]
    fn a_sleeping_worker_is_idle_not_stalled() {
        let mut r = passing();
        for s in &mut r.samples[3..] {
            let w = &mut s.workers.as_mut().unwrap()[1];
            w.beat = 21;
            w.asleep = true;
        }
        assert_eq!(failed(&r), Vec::<String>::new());
        // Awake from t = 4 on with the same count: last seen asleep at t = 3, stalled since.
        for s in &mut r.samples[4..] {
            s.workers.as_mut().unwrap()[1].asleep = false;
        }
        assert_eq!(max_heartbeat_gap(&r), Some((1, 7.0)));
        assert_eq!(failed(&r), ["no worker stall (heartbeat)"]);
    }

    #[test]
    fn missing_worker_samples_stretch_the_gap() {
        let mut r = passing();
        for s in &mut r.samples[2..9] {
            s.workers = None;
        }
        // Last news at t = 1, next at t = 9.
        assert_eq!(max_heartbeat_gap(&r).map(|(_, g)| g), Some(8.0));
        assert_eq!(failed(&r), ["no worker stall (heartbeat)"]);
    }

    #[test]
    fn vmq_exiting_or_a_worker_panic_fails() {
        let mut r = passing();
        r.vmq_exited_during_run = Some("gone at t = 4.0 s".into());
        assert_eq!(failed(&r), ["vmq never exited"]);
        let mut r = passing();
        r.vmq_exit_code_at_end = Some(1);
        assert_eq!(failed(&r), ["vmq never exited"]);
        let mut r = passing();
        r.samples[5].workers.as_mut().unwrap()[0].panics = 1;
        r.samples[6].workers.as_mut().unwrap()[0].panics = 1;
        assert_eq!(total_panics(&r), 1);
        assert_eq!(failed(&r), ["no worker panic"]);
    }

    #[test]
    fn a_fault_error_fails_the_run() {
        let mut r = passing();
        r.fault_errors.push("add-port refused".into());
        assert_eq!(failed(&r), ["faults injected as planned"]);
    }

    #[test]
    fn a_record_survives_json() {
        let r = passing();
        let back: Record = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}

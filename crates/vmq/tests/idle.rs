//! An idle `vmq run` costs (almost) nothing (root): with an AF_PACKET uplink on a veth into a
//! namespace and two TAP ports in namespaces, all up and connected but carrying no traffic, the
//! vmq process uses at most 1% of a core, and its threads sleep on wake-ups instead of waking
//! on timers. A vhost-user port whose VM has not connected is part of the topology: its source
//! has nothing to wait on and must not be polled.
//!
//! The figure is the process's own CPU time from the kernel's accounting (the `sum_exec_runtime`
//! of every thread, `/proc/PID/task/TID/schedstat`), so it does not depend on how busy the rest
//! of the machine is; wall-clock time only bounds the window.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::*;

/// How long the idle process is watched.
const WINDOW: Duration = Duration::from_secs(5);

/// The most CPU an idle vmq may use, as a share of one core.
const MAX_IDLE_CPU: f64 = 0.01;

/// The most wake-ups per second of all its threads together: the rebalancer's one a second and
/// some slack. A timer on the data path (a 100 ms backstop on two workers: 20 a second, a 1 ms
/// poll: thousands) exceeds it.
const MAX_IDLE_WAKEUPS: f64 = 5.0;

/// One thread's counters at one instant.
#[derive(Clone, Debug, Default)]
struct ThreadSample {
    name: String,
    /// Nanoseconds on a CPU so far.
    cpu_ns: u64,
    /// Times it went to sleep of its own accord (each one ends in a wake-up).
    wakeups: u64,
}

/// Every thread of `pid` by thread id.
fn sample(pid: u32) -> BTreeMap<u32, ThreadSample> {
    let mut threads = BTreeMap::new();
    let dir = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")).flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let path = entry.path();
        // A thread may end between the listing and the reads: skip it then.
        let (Ok(comm), Ok(schedstat), Ok(status)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("schedstat")),
            std::fs::read_to_string(path.join("status")),
        ) else {
            continue;
        };
        let cpu_ns = schedstat.split_whitespace().next().and_then(|v| v.parse().ok()).expect("schedstat");
        let wakeups = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches");
        threads.insert(tid, ThreadSample { name: comm.trim().to_string(), cpu_ns, wakeups });
    }
    threads
}

/// What each thread did between two samples, and the process's CPU share over `secs`.
struct IdleReport {
    cpu_share: f64,
    wakeups_per_sec: f64,
    lines: Vec<String>,
}

fn compare(before: &BTreeMap<u32, ThreadSample>, after: &BTreeMap<u32, ThreadSample>, secs: f64) -> IdleReport {
    let (mut total_ns, mut total_wakeups) = (0, 0);
    let mut lines = Vec::new();
    for (tid, a) in after {
        let b = before.get(tid).cloned().unwrap_or_default();
        let cpu = a.cpu_ns - b.cpu_ns;
        let wakeups = a.wakeups - b.wakeups;
        total_ns += cpu;
        total_wakeups += wakeups;
        lines.push(format!(
            "{:<16} tid {tid:>7}: {:>8.3} ms CPU ({:.3}% of a core), {:>7.1} wake-ups/s",
            a.name,
            cpu as f64 / 1e6,
            cpu as f64 / secs / 1e7,
            wakeups as f64 / secs
        ));
    }
    IdleReport { cpu_share: total_ns as f64 / secs / 1e9, wakeups_per_sec: total_wakeups as f64 / secs, lines }
}

#[test]
fn idle_vmq_uses_at_most_one_percent_of_a_core() {
    if !can_run() {
        return;
    }
    for mode in ["vmq", "switch"] {
        let p = unique(&format!("i{}", &mode[..1]));
        let (sw, ext) = (Ns::new(&format!("{p}s")), Ns::new(&format!("{p}x")));
        let (up_if, ext_if) = (format!("{p}u"), format!("{p}x"));
        veth(&sw, &up_if, &ext, &ext_if);
        let hosts: Vec<(Ns, String)> =
            ["a", "b"].iter().map(|r| (Ns::new(&format!("{p}{r}")), format!("{p}{r}"))).collect();
        let mut body = switch_section(mode) + &uplink_port("up0", &up_if, &sw, "");
        for (i, (ns, ifname)) in hosts.iter().enumerate() {
            body += &tap_port(&format!("t{i}"), ifname, ns, &format!("02:00:00:00:01:{i:02x}"), "");
        }
        // A vhost-user port whose VM has not connected (yet): its source has no kick fd.
        let dir = TempDir::new(&format!("{p}v"));
        body += &format!(
            "[[port]]\nname = \"vm0\"\nkind = \"vhost-user\"\nsocket = \"{}\"\nmac = \"02:00:00:00:02:01\"\n\n",
            dir.path().join("vm0.sock").display()
        );
        let vmq = Vmq::start_until_up(&p, &body, |port| port != "vm0");
        // The hosts' links are up (the TAPs are vmq's, the veth is up), addressed, and quiet:
        // IPv6 is off in the namespaces, nothing sends unless asked.
        for (i, (ns, ifname)) in hosts.iter().enumerate() {
            ns.ip(&["addr", "add", &format!("10.9.0.{}/24", i + 1), "dev", ifname]);
        }
        ext.ip(&["addr", "add", "10.9.0.100/24", "dev", &ext_if]);
        // One exchange through every port, so that every source has been read once.
        assert!(hosts[0].0.ping("10.9.0.2", 1, &[]), "TAP a -> TAP b");
        assert!(ext.ping("10.9.0.1", 1, &[]), "external -> TAP a");

        let before = sample(vmq.pid());
        let start = Instant::now();
        std::thread::sleep(WINDOW);
        let after = sample(vmq.pid());
        let secs = start.elapsed().as_secs_f64();
        let report = compare(&before, &after, secs);
        eprintln!(
            "{mode} mode, idle for {secs:.2} s: {:.3}% of a core, {:.1} wake-ups/s",
            report.cpu_share * 100.0,
            report.wakeups_per_sec
        );
        for line in &report.lines {
            eprintln!("  {line}");
        }
        assert!(
            report.cpu_share <= MAX_IDLE_CPU,
            "{mode} mode: an idle vmq used {:.2}% of a core (at most {:.0}%):\n{}",
            report.cpu_share * 100.0,
            MAX_IDLE_CPU * 100.0,
            report.lines.join("\n")
        );
        assert!(
            report.wakeups_per_sec <= MAX_IDLE_WAKEUPS,
            "{mode} mode: an idle vmq woke {:.1} times a second (at most {MAX_IDLE_WAKEUPS}):\n{}",
            report.wakeups_per_sec,
            report.lines.join("\n")
        );
    }
}

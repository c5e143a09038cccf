//! Human-readable views of responses: aligned tables in the manner of `ovs-vsctl show` and
//! `ovs-appctl`, and the frames of `vmq top`. `--json` prints the reply line as received instead.

use std::fmt::Write;

use crate::protocol::{
    FdbReport, PortCounters, PortInfo, QueueReport, Response, SharedReason, StatsReport, SwitchSummary, VlanInfo,
    WorkerInfo,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A table with a header row; columns are separated by two spaces, numbers right-aligned, and
/// no line has trailing spaces.
struct Table {
    headers: Vec<&'static str>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, Align)]) -> Table {
        Table {
            headers: columns.iter().map(|c| c.0).collect(),
            align: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let width = widths.get(i).copied().unwrap_or(0);
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = width.saturating_sub(cell.chars().count());
                match self.align.get(i) {
                    Some(Align::Right) => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                    _ => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

use Align::{Left as L, Right as R};

/// The table view of a response.
pub fn render(response: &Response) -> String {
    let mut out = String::new();
    match response {
        Response::Show(summary) => show(summary, &mut out),
        Response::Ports { ports } => port_table(ports, &mut out),
        Response::Queues(report) => queues(report, &mut out),
        Response::Fdb(report) => fdb(report, &mut out),
        Response::Stats(report) => stats(&report.ports, &mut out),
        Response::PortAdded { port } => {
            let _ = writeln!(out, "port {} added", port.name);
            port_table(std::slice::from_ref(port), &mut out);
        }
        Response::Done { message } => {
            out.push_str(message);
            out.push('\n');
        }
        Response::Rebalanced { changes } if changes.is_empty() => out.push_str("rebalanced: no queue changes\n"),
        Response::Rebalanced { changes } => {
            let _ = writeln!(out, "rebalanced: {} queue change(s)", changes.len());
            let mut t = Table::new(&[("PORT", L), ("QUEUE", R), ("ACTION", L)]);
            for c in changes {
                let action = match c.action {
                    crate::protocol::QueueAction::Granted => "granted",
                    crate::protocol::QueueAction::Revoked => "revoked",
                };
                t.row(vec![c.port.clone(), c.queue.to_string(), action.to_string()]);
            }
            t.render(&mut out);
        }
        Response::Workers { workers } => worker_table(workers, &mut out),
    }
    out
}

fn show(s: &SwitchSummary, out: &mut String) {
    let _ = writeln!(
        out,
        "vmq: mode {}, {} worker(s), VM queues {} of {} in use, policy {}, {} port(s)",
        s.mode.name(),
        s.workers,
        s.queues_in_use,
        s.queue_budget,
        s.policy.name(),
        s.ports.len()
    );
    port_table(&s.ports, out);
}

fn vlan(v: &VlanInfo) -> String {
    match v {
        VlanInfo::Access { vlan: 0 } => "untagged".to_string(),
        VlanInfo::Access { vlan } => format!("access {vlan}"),
        VlanInfo::Trunk { allowed, native } => {
            let ids: Vec<String> = allowed.iter().map(u16::to_string).collect();
            match native {
                Some(n) => format!("trunk {} native {n}", ids.join(",")),
                None => format!("trunk {}", ids.join(",")),
            }
        }
    }
}

fn offloads(p: &PortInfo) -> String {
    let o = p.offloads;
    let on: Vec<&str> = [(o.csum, "csum"), (o.tso4, "tso4"), (o.tso6, "tso6"), (o.ecn, "ecn")]
        .iter()
        .filter(|f| f.0)
        .map(|f| f.1)
        .collect();
    if on.is_empty() { "none".to_string() } else { on.join(",") }
}

fn attachment(p: &PortInfo) -> String {
    let mut parts = Vec::new();
    if let Some(s) = &p.socket {
        parts.push(s.clone());
    }
    if let Some(v) = &p.vhost {
        let state = if v.connected { "connected" } else { "not connected" };
        parts.push(format!("{} mode, {state}, {} connections", v.mode.name(), v.connections));
        if let Some(m) = &v.migration
            && (m.logging || m.log_starts != 0 || m.announces != 0)
        {
            let logging = if m.logging { "dirty logging on" } else { "dirty logging off" };
            parts.push(format!(
                "migration: {logging}, {} started, {} handed over, {} announces",
                m.log_starts, m.migrated_out, m.announces
            ));
        }
    }
    if let Some(i) = &p.ifname {
        parts.push(format!("ifname {i}"));
    }
    if let Some(n) = &p.netns {
        parts.push(format!("netns {n}"));
    }
    if let Some(d) = &p.driver {
        parts.push(format!("driver {d}"));
    }
    if let Some(queue_pairs) = &p.queue_pairs {
        let pairs: Vec<String> = queue_pairs
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let worker = q.worker.map_or("-".to_string(), |w| w.to_string());
                format!("q{i} rx {} tx {} w{worker}", q.rx_frames, q.tx_frames)
            })
            .collect();
        parts.push(format!("{} queue pairs [{}]", queue_pairs.len(), pairs.join("; ")));
    }
    if let Some(u) = &p.uplink {
        parts.push(format!("uplink {u}"));
    }
    if p.allow_mac_spoofing {
        parts.push("mac-spoofing allowed".to_string());
    }
    if let Some(f) = &p.rx_filter {
        let promiscuous = match (f.promiscuous, f.promiscuous_refused) {
            (true, _) => "promiscuous",
            (false, true) => "promiscuous refused",
            (false, false) => "filtering",
        };
        let mut text = format!("guest filter: {promiscuous}, multicast {} ({})", f.multicast, f.multicast_entries);
        if let Some(v) = &f.vlans {
            let ids: Vec<String> = v.iter().map(u16::to_string).collect();
            let _ = write!(text, ", vlans [{}]", ids.join(","));
        }
        parts.push(text);
    }
    if parts.is_empty() { "-".to_string() } else { parts.join(", ") }
}

fn port_table(ports: &[PortInfo], out: &mut String) {
    let mut t = Table::new(&[
        ("PORT", L),
        ("KIND", L),
        ("STATE", L),
        ("MAC", L),
        ("MTU", R),
        ("VLAN", L),
        ("OFFLOADS", L),
        ("ATTACHMENT", L),
    ]);
    for p in ports {
        t.row(vec![
            p.name.clone(),
            p.kind.name().to_string(),
            p.state.name().to_string(),
            p.mac.clone().unwrap_or_else(|| "-".to_string()),
            p.mtu.to_string(),
            vlan(&p.vlan),
            offloads(p),
            attachment(p),
        ]);
    }
    t.render(out);
}

fn gbits(bits_per_sec: f64) -> String {
    format!("{:.3}", bits_per_sec / 1e9)
}

fn queues(q: &QueueReport, out: &mut String) {
    let _ = writeln!(
        out,
        "mode {}, policy {}, VM queues {} of {} in use",
        q.mode.name(),
        q.policy.name(),
        q.assigned.len(),
        q.budget
    );
    let _ = writeln!(out, "\nVM queues:");
    if q.assigned.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut t = Table::new(&[("PORT", L), ("QUEUE", R), ("WORKER", R), ("RX_PPS", R), ("RX_GBIT/S", R)]);
        for a in &q.assigned {
            t.row(vec![
                a.port.clone(),
                a.queue.to_string(),
                a.worker.to_string(),
                a.rx_pps.to_string(),
                gbits(a.rx_bits_per_sec as f64),
            ]);
        }
        t.render(out);
    }
    let _ = writeln!(out, "\ndefault queue (software switch):");
    if q.shared.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut t = Table::new(&[("PORT", L), ("REASON", L), ("RX_PPS", R), ("RX_GBIT/S", R)]);
        for s in &q.shared {
            t.row(vec![
                s.port.clone(),
                s.reason.name().to_string(),
                s.rx_pps.to_string(),
                gbits(s.rx_bits_per_sec as f64),
            ]);
        }
        t.render(out);
    }
    if !q.nic_queues.is_empty() {
        let _ = writeln!(
            out,
            "
uplink receive queues:"
        );
        let mut t = Table::new(&[("UPLINK", L), ("QUEUE", L), ("PORT", L), ("RXQ", R), ("RX_PACKETS", R)]);
        for n in &q.nic_queues {
            t.row(vec![
                n.uplink.clone(),
                if n.queue == 0 { "default".to_string() } else { n.queue.to_string() },
                n.port.clone().unwrap_or_else(|| "-".to_string()),
                n.rx_queue.map_or_else(|| "-".to_string(), |r| r.to_string()),
                n.rx_packets.to_string(),
            ]);
        }
        t.render(out);
    }
}

fn fdb(f: &FdbReport, out: &mut String) {
    let mut t = Table::new(&[("MAC", L), ("VLAN", R), ("PORT", L), ("AGE", R)]);
    for e in &f.entries {
        let age = e.age_secs.map_or_else(|| "static".to_string(), |s| format!("{s}s"));
        t.row(vec![e.mac.clone(), e.vlan.to_string(), e.port.clone(), age]);
    }
    t.render(out);
    if f.total > f.entries.len() as u64 {
        let _ = writeln!(out, "showing {} of {} entries (capacity {})", f.entries.len(), f.total, f.capacity);
    } else {
        let _ = writeln!(out, "{} entries (capacity {})", f.total, f.capacity);
    }
}

fn stats(ports: &[PortCounters], out: &mut String) {
    let mut t = Table::new(&[
        ("PORT", L),
        ("RX_PACKETS", R),
        ("RX_BYTES", R),
        ("TX_PACKETS", R),
        ("TX_BYTES", R),
        ("DROPS", R),
        ("SEGMENTS", R),
        ("CSUM_FINISHED", R),
        ("COALESCED", R),
        ("GSO_PASSED", R),
        ("FDB_FULL", R),
        ("FDB_MOVES", R),
        ("FDB_LIMIT", R),
    ]);
    for p in ports {
        t.row(vec![
            p.port.clone(),
            p.rx_packets.to_string(),
            p.rx_bytes.to_string(),
            p.tx_packets.to_string(),
            p.tx_bytes.to_string(),
            p.total_drops().to_string(),
            p.offload.segments.to_string(),
            p.offload.csum_finished.to_string(),
            p.offload.coalesced.to_string(),
            p.offload.gso_passed.to_string(),
            p.fdb_full.to_string(),
            p.fdb_moves.to_string(),
            p.fdb_limit.to_string(),
        ]);
    }
    t.render(out);
    let with_drops: Vec<&PortCounters> = ports.iter().filter(|p| p.total_drops() > 0).collect();
    if !with_drops.is_empty() {
        // No blank line: in a pipe, a blank line is what separates frames.
        out.push_str("drops by reason:\n");
        for p in with_drops {
            let reasons: Vec<String> =
                p.drops.iter().filter(|(_, n)| **n > 0).map(|(reason, n)| format!("{reason} {n}")).collect();
            let _ = writeln!(out, "  {}: {}", p.port, reasons.join(", "));
        }
    }
    let with_kernel_losses: Vec<&PortCounters> =
        ports.iter().filter(|p| p.kernel_drops > 0 || p.corrupt_blocks > 0).collect();
    if !with_kernel_losses.is_empty() {
        out.push_str("\nlost in the kernel (not in RX_PACKETS or DROPS):\n");
        for p in with_kernel_losses {
            let _ = writeln!(out, "  {}: ring full {}, corrupt blocks {}", p.port, p.kernel_drops, p.corrupt_blocks);
        }
    }
}

fn worker_table(workers: &[WorkerInfo], out: &mut String) {
    let mut t = Table::new(&[("WORKER", R), ("BUSY", R), ("PANICS", R), ("TASKS", L)]);
    for w in workers {
        let tasks = if w.tasks.is_empty() { "-".to_string() } else { w.tasks.join(", ") };
        t.row(vec![w.worker.to_string(), format!("{:.1}%", w.busy_ratio * 100.0), w.panics.to_string(), tasks]);
    }
    t.render(out);
}

fn short_reason(r: SharedReason) -> &'static str {
    match r {
        SharedReason::BudgetExhausted => "budget",
        SharedReason::SwitchMode => "switch-mode",
        SharedReason::NotVmPort => "not-vm",
        SharedReason::NoMac => "no-mac",
    }
}

/// Per-port rates between two `stats` snapshots, rated by the switch's own clock.
#[derive(Debug, Clone, PartialEq)]
pub struct PortRates {
    pub port: String,
    pub rx_pps: f64,
    pub rx_bits_per_sec: f64,
    pub tx_pps: f64,
    pub tx_bits_per_sec: f64,
    pub drops_per_sec: f64,
    pub drops: u64,
}

/// Rates of every port in `current`; `None` for a port absent from `previous` (just added) or
/// when no time passed between the snapshots. A counter that went backwards (port re-created)
/// rates as 0.
pub fn rates(previous: &StatsReport, current: &StatsReport) -> Vec<(String, Option<PortRates>)> {
    let seconds = current.uptime_ns.saturating_sub(previous.uptime_ns) as f64 / 1e9;
    current
        .ports
        .iter()
        .map(|cur| {
            let prev = previous.ports.iter().find(|p| p.port == cur.port);
            let rates = prev.filter(|_| seconds > 0.0).map(|prev| {
                let per_sec = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds;
                PortRates {
                    port: cur.port.clone(),
                    rx_pps: per_sec(cur.rx_packets, prev.rx_packets),
                    rx_bits_per_sec: per_sec(cur.rx_bytes, prev.rx_bytes) * 8.0,
                    tx_pps: per_sec(cur.tx_packets, prev.tx_packets),
                    tx_bits_per_sec: per_sec(cur.tx_bytes, prev.tx_bytes) * 8.0,
                    drops_per_sec: per_sec(cur.total_drops(), prev.total_drops()),
                    drops: cur.total_drops(),
                }
            });
            (cur.port.clone(), rates)
        })
        .collect()
}

/// The row order of `vmq top`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TopSort {
    /// Busiest receivers first (packets per second).
    #[default]
    Rx,
    /// Busiest senders first.
    Tx,
    /// Most drops per second first, then most drops in all.
    Drops,
    /// Port name.
    Name,
}

/// Orders `rows` by `sort`, highest first; ports without rates (just added) go last. Ties and
/// `Name` go by port name, so a frame's order never flickers between equal ports.
fn sort_rows(rows: &mut [(String, Option<PortRates>)], sort: TopSort) {
    let key = |r: &Option<PortRates>| -> (f64, u64) {
        match (r, sort) {
            (None, _) | (_, TopSort::Name) => (f64::NEG_INFINITY, 0),
            (Some(r), TopSort::Rx) => (r.rx_pps, 0),
            (Some(r), TopSort::Tx) => (r.tx_pps, 0),
            (Some(r), TopSort::Drops) => (r.drops_per_sec, r.drops),
        }
    };
    rows.sort_by(|(a_name, a), (b_name, b)| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0).then(kb.1.cmp(&ka.1)).then_with(|| a_name.cmp(b_name))
    });
}

/// One frame of `vmq top`: per-port rates between two snapshots and queue assignment, rows in
/// `sort` order, then the drops of each port by reason (those with any).
pub fn top_frame(previous: &StatsReport, current: &StatsReport, queues: Option<&QueueReport>, sort: TopSort) -> String {
    let seconds = current.uptime_ns.saturating_sub(previous.uptime_ns) as f64 / 1e9;
    let mut out = String::new();
    let _ = write!(out, "vmq top: {} port(s), rates over {seconds:.3} s", current.ports.len());
    if let Some(q) = queues {
        let _ = write!(out, ", mode {}, VM queues {} of {}", q.mode.name(), q.assigned.len(), q.budget);
    }
    out.push('\n');
    let mut t = Table::new(&[
        ("PORT", L),
        ("QUEUE", L),
        ("RX_PPS", R),
        ("RX_GBIT/S", R),
        ("TX_PPS", R),
        ("TX_GBIT/S", R),
        ("DROPS/S", R),
        ("DROPS", R),
    ]);
    let queue_of = |port: &str| -> String {
        let Some(q) = queues else { return "?".to_string() };
        if let Some(a) = q.assigned.iter().find(|a| a.port == port) {
            return format!("q{}@w{}", a.queue, a.worker);
        }
        match q.shared.iter().find(|s| s.port == port) {
            Some(s) => format!("shared:{}", short_reason(s.reason)),
            None => "-".to_string(),
        }
    };
    let mut rows = rates(previous, current);
    sort_rows(&mut rows, sort);
    for (port, r) in &rows {
        let cells = match r {
            Some(r) => vec![
                format!("{:.0}", r.rx_pps),
                gbits(r.rx_bits_per_sec),
                format!("{:.0}", r.tx_pps),
                gbits(r.tx_bits_per_sec),
                format!("{:.0}", r.drops_per_sec),
                r.drops.to_string(),
            ],
            None => {
                let drops = current.ports.iter().find(|p| &p.port == port).map_or(0, PortCounters::total_drops);
                vec!["-".into(), "-".into(), "-".into(), "-".into(), "-".into(), drops.to_string()]
            }
        };
        let mut row = vec![port.clone(), queue_of(port)];
        row.extend(cells);
        t.row(row);
    }
    t.render(&mut out);
    drops_by_reason(previous, current, &rows, seconds, &mut out);
    out
}

/// The drops of each port by reason, in the frame's port order: every reason counted so far,
/// with its rate over the frame's interval (`-` for a port that was not in the previous
/// snapshot). Kernel ring losses of uplinks are listed too, as `kernel_ring_full`.
fn drops_by_reason(
    previous: &StatsReport,
    current: &StatsReport,
    order: &[(String, Option<PortRates>)],
    seconds: f64,
    out: &mut String,
) {
    let mut t = Table::new(&[("PORT", L), ("REASON", L), ("DROPS/S", R), ("DROPS", R)]);
    let mut any = false;
    for (port, _) in order {
        let Some(cur) = current.ports.iter().find(|p| &p.port == port) else { continue };
        let prev = previous.ports.iter().find(|p| &p.port == port).filter(|_| seconds > 0.0);
        let mut reasons: Vec<(&str, u64, Option<u64>)> = cur
            .drops
            .iter()
            .map(|(reason, n)| (reason.as_str(), *n, prev.map(|p| p.drops.get(reason).copied().unwrap_or(0))))
            .collect();
        reasons.push(("kernel_ring_full", cur.kernel_drops, prev.map(|p| p.kernel_drops)));
        for (reason, now, then) in reasons.into_iter().filter(|(_, now, _)| *now > 0) {
            let rate = then.map_or("-".to_string(), |then| format!("{:.0}", now.saturating_sub(then) as f64 / seconds));
            t.row(vec![port.clone(), reason.to_string(), rate, now.to_string()]);
            any = true;
        }
    }
    if any {
        // No blank line: in a pipe, a blank line is what separates frames.
        out.push_str("drops by reason:\n");
        t.render(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_without_trailing_spaces() {
        let mut t = Table::new(&[("A", L), ("NUM", R), ("C", L)]);
        t.row(vec!["long-name".into(), "7".into(), "".into()]);
        t.row(vec!["x".into(), "12345".into(), "end".into()]);
        let mut out = String::new();
        t.render(&mut out);
        assert_eq!(out, "A            NUM  C\nlong-name      7\nx          12345  end\n");
    }

    fn counters(port: &str, rx: u64, drops: u64) -> PortCounters {
        PortCounters {
            port: port.into(),
            rx_packets: rx,
            rx_bytes: rx * 100,
            drops: [("oversize".to_string(), drops)].into(),
            ..PortCounters::default()
        }
    }

    #[test]
    fn stats_show_kernel_losses_only_where_there_are_some() {
        let quiet = counters("vm1", 5, 0);
        let lossy = PortCounters { kernel_drops: 17, corrupt_blocks: 2, ..counters("up0", 9, 0) };
        let mut out = String::new();
        stats(std::slice::from_ref(&quiet), &mut out);
        assert!(!out.contains("kernel"), "{out}");
        out.clear();
        stats(&[quiet, lossy], &mut out);
        assert!(
            out.contains("lost in the kernel (not in RX_PACKETS or DROPS):\n  up0: ring full 17, corrupt blocks 2\n"),
            "{out}"
        );
        assert!(!out.contains("vm1: ring full"), "{out}");
    }

    #[test]
    fn rates_use_the_switch_clock_and_survive_resets() {
        let a = StatsReport { uptime_ns: 1_000_000_000, ports: vec![counters("a", 100, 0), counters("b", 500, 5)] };
        let b = StatsReport {
            uptime_ns: 3_000_000_000,
            ports: vec![counters("a", 300, 4), counters("b", 10, 5), counters("new", 1, 0)],
        };
        let r = rates(&a, &b);
        let ra = r[0].1.clone().unwrap();
        assert_eq!((ra.rx_pps, ra.rx_bits_per_sec, ra.drops_per_sec, ra.drops), (100.0, 80_000.0, 2.0, 4));
        assert_eq!(r[1].1.clone().unwrap().rx_pps, 0.0);
        assert_eq!(r[2], ("new".to_string(), None));
        assert!(rates(&b, &b).iter().all(|(_, r)| r.is_none()));
    }

    fn with_tx(c: PortCounters, tx: u64) -> PortCounters {
        PortCounters { tx_packets: tx, tx_bytes: tx * 100, ..c }
    }

    fn port_order(frame: &str) -> Vec<&str> {
        frame
            .lines()
            .skip(2)
            .take_while(|l| *l != "drops by reason:")
            .map(|l| l.split_whitespace().next().unwrap())
            .collect()
    }

    #[test]
    fn top_sorts_by_the_key_asked_for() {
        let a = StatsReport {
            uptime_ns: 1_000_000_000,
            ports: vec![counters("b", 0, 0), counters("a", 0, 0), counters("c", 0, 0)],
        };
        let b = StatsReport {
            uptime_ns: 2_000_000_000,
            // rx: c > a > b; tx: b > c > a; drops: a, then b and c (none) by name; `new` has no rates.
            ports: vec![
                with_tx(counters("b", 10, 0), 900),
                with_tx(counters("a", 500, 7), 5),
                with_tx(counters("c", 900, 0), 50),
                counters("new", 1, 3),
            ],
        };
        assert_eq!(port_order(&top_frame(&a, &b, None, TopSort::Rx)), ["c", "a", "b", "new"]);
        assert_eq!(port_order(&top_frame(&a, &b, None, TopSort::Tx)), ["b", "c", "a", "new"]);
        assert_eq!(port_order(&top_frame(&a, &b, None, TopSort::Drops)), ["a", "b", "c", "new"]);
        assert_eq!(port_order(&top_frame(&a, &b, None, TopSort::Name)), ["a", "b", "c", "new"]);
    }

    #[test]
    fn top_lists_drops_by_reason_with_rates() {
        let mut a1 = counters("a", 0, 4);
        a1.drops.insert("spoofed".into(), 0);
        let a = StatsReport { uptime_ns: 0, ports: vec![a1, counters("quiet", 0, 0)] };
        let mut a2 = counters("a", 0, 10);
        a2.drops.insert("spoofed".into(), 20);
        let up = PortCounters { kernel_drops: 5, ..counters("up0", 0, 0) };
        let b = StatsReport { uptime_ns: 2_000_000_000, ports: vec![a2, counters("quiet", 0, 0), up] };
        let frame = top_frame(&a, &b, None, TopSort::Name);
        let section = frame.split("\ndrops by reason:\n").nth(1).unwrap_or_else(|| panic!("{frame}"));
        assert_eq!(
            section,
            "PORT  REASON            DROPS/S  DROPS\n\
             a     oversize                3     10\n\
             a     spoofed                10     20\n\
             up0   kernel_ring_full        -      5\n"
        );
        // Nothing dropped: no section.
        let quiet = StatsReport { uptime_ns: 0, ports: vec![counters("quiet", 7, 0)] };
        assert!(!top_frame(&quiet, &quiet, None, TopSort::Rx).contains("drops by reason"));
    }
}

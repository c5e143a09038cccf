//! The rebalancer: every interval it measures load and (1) under the dynamic policy moves VM
//! queues to the VMs receiving the most, reprogramming the NIC filters, and (2) re-places
//! queues and ports on workers so that the busiest work is spread over cores.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmq_core::PortId;
use vmq_core::stats::DropReason;
use vmq_core::vmq::place_by_load;
use vmq_wire::MacAddr;

use crate::engine::{Shared, Task, lock};
use crate::spoof::SpoofWatch;
use crate::state::ControlState;

pub(crate) struct Rebalancer {
    shared: Arc<Shared>,
    control: Arc<Mutex<ControlState>>,
    interval: Duration,
    /// Frames and bytes delivered to each port at the last measurement.
    last_port_tx: HashMap<PortId, (u64, u64)>,
    /// Frames each task took in at the last measurement (by task address: tasks come and go).
    last_task_frames: HashMap<usize, u64>,
    last_busy_ns: Vec<u64>,
    last: Instant,
    spoof: SpoofWatch,
}

/// Re-place only when it cuts the busiest worker's load by this much: moving work costs cache
/// warmth, so small gains are not worth it.
const REPLACE_GAIN: f64 = 0.8;

impl Rebalancer {
    pub fn new(shared: Arc<Shared>, control: Arc<Mutex<ControlState>>, interval: Duration) -> Rebalancer {
        let workers = shared.lists.len();
        Rebalancer {
            shared,
            control,
            interval,
            last_port_tx: HashMap::new(),
            last_task_frames: HashMap::new(),
            last_busy_ns: vec![0; workers],
            last: Instant::now(),
            spoof: SpoofWatch::default(),
        }
    }

    pub fn run(mut self, stop: Receiver<()>) {
        loop {
            match stop.recv_timeout(self.interval) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            self.round();
        }
    }

    fn round(&mut self) {
        let secs = self.last.elapsed().as_secs_f64().max(1e-3);
        self.last = Instant::now();
        let mut st = lock(&self.control);
        // Receive rate of each port: frames vmq delivered to it.
        let mut rates = Vec::new();
        let mut byte_rates = HashMap::new();
        let mut port_tx = HashMap::new();
        for (i, rec) in st.ports.iter().enumerate() {
            let Some(rec) = rec else { continue };
            let id = PortId(i as u16);
            let now = (rec.stats.tx_packets(), rec.stats.tx_bytes());
            let before = self.last_port_tx.get(&id).copied().unwrap_or(now);
            let per_sec = |now: u64, before: u64| (now.saturating_sub(before) as f64 / secs) as u64;
            rates.push((id, per_sec(now.0, before.0)));
            byte_rates.insert(id, per_sec(now.1, before.1));
            port_tx.insert(id, now);
        }
        self.last_port_tx = port_tx;
        st.rates = rates.iter().copied().collect();
        st.byte_rates = byte_rates;
        let changes = st.vmq.rebalance(&rates);
        st.apply_queue_changes(&changes);
        // Worker busy ratios.
        let busy: Vec<f64> = self
            .shared
            .worker_stats
            .iter()
            .zip(self.last_busy_ns.iter_mut())
            .map(|(w, last)| {
                let now = w.busy_ns.load(Ordering::Relaxed);
                let ratio = now.saturating_sub(*last) as f64 / (secs * 1e9);
                *last = now;
                ratio.min(1.0)
            })
            .collect();
        st.busy = busy;
        warn_spoofing(&mut self.spoof, &st);
        let tasks: Vec<Arc<Task>> = st.ports.iter().flatten().flat_map(|r| r.tasks.iter().cloned()).collect();
        drop(st);
        self.replace_tasks(&tasks);
    }

    fn replace_tasks(&mut self, tasks: &[Arc<Task>]) {
        let mut frames = HashMap::new();
        let loads: Vec<u64> = tasks
            .iter()
            .map(|t| {
                let key = Arc::as_ptr(t) as usize;
                let now = t.frames.load(Ordering::Relaxed);
                frames.insert(key, now);
                now.saturating_sub(self.last_task_frames.get(&key).copied().unwrap_or(now))
            })
            .collect();
        self.last_task_frames = frames;
        let lists = &self.shared.lists;
        let workers = lists.len();
        if workers < 2 || tasks.is_empty() {
            return;
        }
        let load_of = |t: &Arc<Task>| tasks.iter().position(|x| Arc::ptr_eq(x, t)).map_or(0, |i| loads[i]);
        let current: Vec<u64> = lists.iter().map(|l| lock(&l.tasks).iter().map(load_of).sum()).collect();
        let current_max = current.iter().copied().max().unwrap_or(0);
        let items: Vec<(usize, u64)> = loads.iter().copied().enumerate().collect();
        let placed = place_by_load(&items, workers as u16);
        let mut bins = vec![0u64; workers];
        for &(i, w) in &placed {
            bins[w as usize] += loads[i];
        }
        let new_max = bins.iter().copied().max().unwrap_or(0);
        if current_max == 0 || (new_max as f64) > current_max as f64 * REPLACE_GAIN {
            return;
        }
        // Ports added or removed since the task snapshot was taken keep their place: only the
        // snapshot's tasks move, and only if they are still placed somewhere.
        let control = lock(&self.control);
        let live: Vec<Arc<Task>> = control.ports.iter().flatten().flat_map(|r| r.tasks.iter().cloned()).collect();
        if live.len() != tasks.len() || !live.iter().zip(tasks).all(|(a, b)| Arc::ptr_eq(a, b)) {
            return;
        }
        tracing::info!(before = current_max, after = new_max, "re-placing queues on workers");
        let mut per_worker: Vec<Vec<Arc<Task>>> = vec![Vec::new(); workers];
        for (i, w) in placed {
            per_worker[w as usize].push(tasks[i].clone());
        }
        for (list, ts) in lists.iter().zip(per_worker) {
            list.set(ts);
        }
        drop(control);
        self.shared.refresh_workers();
    }
}

/// Logs ports that started dropping `spoofed` frames, naming the source MAC seen and the
/// port's own (rate limited per port, see [`crate::spoof`]).
fn warn_spoofing(watch: &mut SpoofWatch, st: &ControlState) {
    let now = Instant::now();
    let key = |stats: &Arc<vmq_core::stats::PortStats>| Arc::as_ptr(stats) as usize;
    let present: std::collections::HashSet<usize> = st.ports.iter().flatten().map(|r| key(&r.stats)).collect();
    watch.retain(|k| present.contains(&k));
    for rec in st.ports.iter().flatten() {
        let count = rec.stats.drops(DropReason::Spoofed);
        let Some(warning) = watch.observe(key(&rec.stats), count, now) else { continue };
        let seen = rec.stats.last_spoofed_source().map(|m| MacAddr(m).to_string());
        let configured = rec.config.spec.mac.map(|m| m.to_string());
        tracing::warn!(
            port = %rec.config.spec.name,
            dropped = warning.dropped,
            seen = seen.as_deref().unwrap_or("?"),
            configured = configured.as_deref().unwrap_or("none"),
            "port drops frames as spoofed: their source MAC is not the port's `mac` (does the VM's MAC, e.g. QEMU's mac=, match the port's?)"
        );
    }
}

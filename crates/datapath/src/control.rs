//! The control thread: every interval it measures load and (1) under the dynamic policy moves
//! VM queues to the VMs receiving the most, reprogramming the NIC filters, and (2) re-places
//! queues and ports on workers so that the busiest work is spread over cores.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmq_core::PortId;
use vmq_core::vmq::{QueueChange, Vmq, place_by_load};

use crate::engine::{Shared, Task, TaskList, lock};
use crate::port::NicSteering;

pub(crate) struct Control {
    pub shared: Arc<Shared>,
    pub vmq: Arc<Mutex<Vmq>>,
    pub steering: HashMap<PortId, Box<dyn NicSteering>>,
    pub uplink_of: HashMap<PortId, PortId>,
    pub tasks: Vec<Arc<Task>>,
    pub lists: Vec<Arc<TaskList>>,
    pub interval: Duration,
}

/// Re-place only when it cuts the busiest worker's load by this much: moving work costs cache
/// warmth, so small gains are not worth it.
const REPLACE_GAIN: f64 = 0.8;

impl Control {
    pub fn run(mut self, stop: Receiver<()>) {
        let mut last_port_rx: Vec<u64> = self.port_rx();
        let mut last_task_frames: Vec<u64> = self.task_frames();
        let mut last = Instant::now();
        loop {
            match stop.recv_timeout(self.interval) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let secs = last.elapsed().as_secs_f64().max(1e-3);
            last = Instant::now();
            let port_rx = self.port_rx();
            let rates: Vec<(PortId, u64)> = port_rx
                .iter()
                .zip(&last_port_rx)
                .enumerate()
                .map(|(i, (now, before))| (PortId(i as u16), ((now - before) as f64 / secs) as u64))
                .collect();
            last_port_rx = port_rx;
            self.rebalance_queues(&rates);
            let frames = self.task_frames();
            let loads: Vec<u64> = frames.iter().zip(&last_task_frames).map(|(a, b)| a - b).collect();
            last_task_frames = frames;
            self.replace_tasks(&loads);
        }
    }

    /// What each VM port received (frames vmq delivered to it), by port index.
    fn port_rx(&self) -> Vec<u64> {
        self.shared.ports.iter().map(|p| p.stats.tx_packets.load(Ordering::Relaxed)).collect()
    }

    fn task_frames(&self) -> Vec<u64> {
        self.tasks.iter().map(|t| t.frames.load(Ordering::Relaxed)).collect()
    }

    fn rebalance_queues(&mut self, rates: &[(PortId, u64)]) {
        let mut vmq = lock(&self.vmq);
        let changes = vmq.rebalance(rates);
        // Revocations first, so that a queue is never filtered for two VMs at once.
        for change in changes.iter().filter(|c| matches!(c, QueueChange::Revoked { .. })) {
            if let QueueChange::Revoked { port, queue } = *change {
                tracing::info!(port = port.0, queue = queue.0, "VM queue revoked");
                if let Some(st) = self.uplink_of.get(&port).and_then(|u| self.steering.get_mut(u)) {
                    st.set_filter(queue, None);
                }
            }
        }
        for change in &changes {
            if let QueueChange::Assigned { port, queue } = *change {
                tracing::info!(port = port.0, queue = queue.0, "VM queue assigned");
                if let Some(st) = self.uplink_of.get(&port).and_then(|u| self.steering.get_mut(u)) {
                    st.set_filter(queue, vmq.filter_of(port));
                }
            }
        }
    }

    fn replace_tasks(&self, loads: &[u64]) {
        let workers = self.lists.len();
        if workers < 2 {
            return;
        }
        let current: Vec<u64> = self
            .lists
            .iter()
            .map(|l| {
                lock(&l.tasks)
                    .iter()
                    .filter_map(|t| self.tasks.iter().position(|x| Arc::ptr_eq(x, t)).map(|i| loads[i]))
                    .sum()
            })
            .collect();
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
        tracing::info!(before = current_max, after = new_max, "re-placing queues on workers");
        let mut per_worker: Vec<Vec<Arc<Task>>> = vec![Vec::new(); workers];
        for (i, w) in placed {
            per_worker[w as usize].push(self.tasks[i].clone());
        }
        for (list, ts) in self.lists.iter().zip(per_worker) {
            list.set(ts);
        }
    }
}

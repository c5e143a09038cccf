//! VM queues: the filter table (MAC, VLAN) → queue, a budget of queues like a NIC's hardware
//! queue count, the static (first come) and dynamic (busiest ports win, with hysteresis) policies,
//! and placement of queues on workers by measured load.

use std::collections::BTreeMap;

use vmq_wire::MacAddr;

use crate::fdb::MixMap;
use crate::port::PortId;

/// A queue number. Queue 0 is the default queue (served by the software switch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u16);

impl QueueId {
    pub const DEFAULT: QueueId = QueueId(0);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueuePolicy {
    /// First come, first served; a queue is held until the port goes away.
    Static,
    /// Queues follow load: every interval the busiest ports get them.
    #[default]
    Dynamic,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VmqConfig {
    /// VM queues available (not counting the default queue).
    pub queues: u16,
    pub policy: QueuePolicy,
    pub workers: u16,
    /// A port without a queue takes one from a holder only if its rate is higher than the
    /// holder's by this factor (> 1.0); stops queues flapping between ports of similar load.
    pub hysteresis: f64,
}

impl Default for VmqConfig {
    fn default() -> Self {
        VmqConfig { queues: 8, policy: QueuePolicy::Dynamic, workers: 2, hysteresis: 1.5 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FilterKey {
    pub mac: MacAddr,
    pub vlan: u16,
}

impl FilterKey {
    fn as_u64(self) -> u64 {
        self.mac.to_u64() | (u64::from(self.vlan) << 48)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueChange {
    Assigned { port: PortId, queue: QueueId },
    Revoked { port: PortId, queue: QueueId },
}

#[derive(Debug, Clone)]
struct VmPort {
    key: FilterKey,
    queue: Option<QueueId>,
    /// Arrival order, for first-come fairness.
    seq: u64,
}

#[derive(Debug, Clone)]
pub struct Vmq {
    cfg: VmqConfig,
    ports: BTreeMap<PortId, VmPort>,
    filters: MixMap<u64, (QueueId, PortId)>,
    free: Vec<QueueId>,
    next_seq: u64,
}

impl Vmq {
    pub fn new(cfg: VmqConfig) -> Vmq {
        // Pop from the end: hand out queue 1 first.
        let free = (1..=cfg.queues).rev().map(QueueId).collect();
        Vmq { cfg, ports: BTreeMap::new(), filters: MixMap::default(), free, next_seq: 0 }
    }

    pub fn config(&self) -> &VmqConfig {
        &self.cfg
    }

    /// Registers a VM port; gives it a queue if one is free (both policies start first come).
    pub fn add_port(&mut self, port: PortId, key: FilterKey) -> Option<QueueId> {
        self.remove_port(port);
        self.next_seq += 1;
        self.ports.insert(port, VmPort { key, queue: None, seq: self.next_seq });
        let queue = self.free.pop()?;
        self.assign(port, queue);
        Some(queue)
    }

    /// Unregisters a port. Its queue goes to the longest-waiting port, if any.
    pub fn remove_port(&mut self, port: PortId) -> Vec<QueueChange> {
        let mut changes = Vec::new();
        let Some(vp) = self.ports.remove(&port) else {
            return changes;
        };
        if let Some(q) = vp.queue {
            self.filters.remove(&vp.key.as_u64());
            changes.push(QueueChange::Revoked { port, queue: q });
            let waiter =
                self.ports.iter().filter(|(_, p)| p.queue.is_none()).min_by_key(|(_, p)| p.seq).map(|(id, _)| *id);
            match waiter {
                Some(w) => {
                    self.assign(w, q);
                    changes.push(QueueChange::Assigned { port: w, queue: q });
                }
                None => self.free.push(q),
            }
        }
        changes
    }

    fn assign(&mut self, port: PortId, queue: QueueId) {
        if let Some(p) = self.ports.get_mut(&port) {
            p.queue = Some(queue);
            self.filters.insert(p.key.as_u64(), (queue, port));
        }
    }

    fn revoke(&mut self, port: PortId) -> Option<QueueId> {
        let p = self.ports.get_mut(&port)?;
        let q = p.queue.take()?;
        self.filters.remove(&p.key.as_u64());
        Some(q)
    }

    /// Hot path: the VM queue (and port) for (mac, vlan); None = the default queue.
    #[inline]
    pub fn lookup(&self, mac: MacAddr, vlan: u16) -> Option<(QueueId, PortId)> {
        self.filters.get(&FilterKey { mac, vlan }.as_u64()).copied()
    }

    pub fn queue_of(&self, port: PortId) -> Option<QueueId> {
        self.ports.get(&port).and_then(|p| p.queue)
    }

    pub fn filter_of(&self, port: PortId) -> Option<FilterKey> {
        self.ports.get(&port).map(|p| p.key)
    }

    /// Dynamic policy: given each VM port's RX rate since the last call, move queues toward the
    /// busiest ports. Free queues go to waiting ports with traffic; a waiting port displaces the
    /// least busy holder only when its rate exceeds the holder's by the hysteresis factor.
    /// Ports missing from `rates` count as idle. Static policy: no changes.
    pub fn rebalance(&mut self, rates: &[(PortId, u64)]) -> Vec<QueueChange> {
        let mut changes = Vec::new();
        if self.cfg.policy == QueuePolicy::Static {
            return changes;
        }
        let rate_of = |p: PortId| rates.iter().find(|(id, _)| *id == p).map_or(0, |(_, r)| *r);
        let mut waiters: Vec<(PortId, u64)> = self
            .ports
            .iter()
            .filter(|(_, p)| p.queue.is_none())
            .map(|(id, _)| (*id, rate_of(*id)))
            .filter(|(_, r)| *r > 0)
            .collect();
        // Busiest first; ties to the longest waiting (lower seq) for determinism.
        waiters.sort_by(|a, b| b.1.cmp(&a.1).then(self.ports[&a.0].seq.cmp(&self.ports[&b.0].seq)));
        let mut holders: Vec<(PortId, u64)> =
            self.ports.iter().filter(|(_, p)| p.queue.is_some()).map(|(id, _)| (*id, rate_of(*id))).collect();
        // Least busy first.
        holders.sort_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
        let mut holders = holders.into_iter();
        for (waiter, rate) in waiters {
            if let Some(q) = self.free.pop() {
                self.assign(waiter, q);
                changes.push(QueueChange::Assigned { port: waiter, queue: q });
                continue;
            }
            let Some((holder, holder_rate)) = holders.next() else {
                break;
            };
            if (rate as f64) <= holder_rate as f64 * self.cfg.hysteresis {
                break; // holders are sorted ascending: no later one is weaker
            }
            if let Some(q) = self.revoke(holder) {
                changes.push(QueueChange::Revoked { port: holder, queue: q });
                self.assign(waiter, q);
                changes.push(QueueChange::Assigned { port: waiter, queue: q });
            }
        }
        changes
    }

    /// Which worker serves each queue: longest-processing-time-first greedy balance of the
    /// measured loads (any unit). Deterministic for equal inputs.
    pub fn placement(&self, loads: &[(QueueId, u64)]) -> Vec<(QueueId, u16)> {
        place_by_load(loads, self.cfg.workers.max(1))
    }

    /// Changes the queue budget (a NIC's queue count can't be exceeded; the caller checks).
    /// Shrinking revokes the highest-numbered queues (their ports fall back to the default
    /// queue); growing hands the new queues to waiting ports, longest waiting first.
    pub fn set_queues(&mut self, queues: u16) -> Vec<QueueChange> {
        let mut changes = Vec::new();
        let old = self.cfg.queues;
        self.cfg.queues = queues;
        if queues < old {
            self.free.retain(|q| q.0 <= queues);
            let holders: Vec<PortId> =
                self.ports.iter().filter(|(_, p)| p.queue.is_some_and(|q| q.0 > queues)).map(|(id, _)| *id).collect();
            for port in holders {
                if let Some(queue) = self.revoke(port) {
                    changes.push(QueueChange::Revoked { port, queue });
                }
            }
        } else {
            for q in (old + 1..=queues).rev() {
                self.free.push(QueueId(q));
            }
            self.free.sort_by(|a, b| b.cmp(a));
            let mut waiters: Vec<(u64, PortId)> =
                self.ports.iter().filter(|(_, p)| p.queue.is_none()).map(|(id, p)| (p.seq, *id)).collect();
            waiters.sort();
            for (_, port) in waiters {
                let Some(queue) = self.free.pop() else { break };
                self.assign(port, queue);
                changes.push(QueueChange::Assigned { port, queue });
            }
        }
        changes
    }

    pub fn set_policy(&mut self, policy: QueuePolicy) {
        self.cfg.policy = policy;
    }

    pub fn assignments(&self) -> impl Iterator<Item = (PortId, Option<QueueId>)> + '_ {
        self.ports.iter().map(|(id, p)| (*id, p.queue))
    }

    pub fn free_queues(&self) -> usize {
        self.free.len()
    }
}

/// LPT placement of weighted items on `workers` bins. Returns (item, worker) in input order.
pub fn place_by_load<T: Copy + Ord>(loads: &[(T, u64)], workers: u16) -> Vec<(T, u16)> {
    let mut order: Vec<usize> = (0..loads.len()).collect();
    order.sort_by(|&a, &b| loads[b].1.cmp(&loads[a].1).then(loads[a].0.cmp(&loads[b].0)));
    let bins_len = workers.max(1) as usize;
    let mut bins = vec![0u64; bins_len];
    let mut worker_of = vec![0u16; loads.len()];
    for i in order {
        let w = (0..bins_len).min_by_key(|&w| (bins[w], w)).unwrap_or(0);
        // Count idle queues as 1 so that they spread too.
        bins[w] += loads[i].1.max(1);
        worker_of[i] = w as u16;
    }
    loads.iter().zip(worker_of).map(|((item, _), w)| (*item, w)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> FilterKey {
        FilterKey { mac: MacAddr([0x52, 0x54, 0, 0, 0, n]), vlan: 10 }
    }

    fn cfg(queues: u16, policy: QueuePolicy) -> VmqConfig {
        VmqConfig { queues, policy, workers: 2, hysteresis: 1.5 }
    }

    #[test]
    fn static_budget_first_come_and_handover() {
        let mut v = Vmq::new(cfg(2, QueuePolicy::Static));
        assert_eq!(v.add_port(PortId(1), key(1)), Some(QueueId(1)));
        assert_eq!(v.add_port(PortId(2), key(2)), Some(QueueId(2)));
        assert_eq!(v.add_port(PortId(3), key(3)), None, "budget exhausted: default queue");
        assert_eq!(v.add_port(PortId(4), key(4)), None);
        assert_eq!(v.lookup(key(1).mac, 10), Some((QueueId(1), PortId(1))));
        assert_eq!(v.lookup(key(1).mac, 20), None, "filters match MAC and VLAN");
        assert_eq!(v.lookup(key(3).mac, 10), None);
        assert!(v.rebalance(&[(PortId(3), 1_000_000)]).is_empty(), "static never moves queues");
        let changes = v.remove_port(PortId(1));
        assert_eq!(
            changes,
            vec![
                QueueChange::Revoked { port: PortId(1), queue: QueueId(1) },
                QueueChange::Assigned { port: PortId(3), queue: QueueId(1) }
            ]
        );
        assert_eq!(v.lookup(key(3).mac, 10), Some((QueueId(1), PortId(3))));
        assert_eq!(v.lookup(key(1).mac, 10), None);
    }

    #[test]
    fn dynamic_moves_queues_to_busiest_with_hysteresis() {
        let mut v = Vmq::new(cfg(2, QueuePolicy::Dynamic));
        for n in 1..=4 {
            v.add_port(PortId(n), key(n as u8));
        }
        // Port 3 is 1.4x port 1: below the hysteresis, no change.
        assert!(v.rebalance(&[(PortId(1), 100), (PortId(2), 500), (PortId(3), 140)]).is_empty());
        // Port 4 is busiest and port 3 beats port 2 by 2x: both take queues.
        let ch = v.rebalance(&[(PortId(1), 100), (PortId(2), 150), (PortId(3), 300), (PortId(4), 1000)]);
        assert_eq!(ch.len(), 4, "{ch:?}");
        let holders: Vec<_> = v.assignments().filter(|(_, q)| q.is_some()).map(|(p, _)| p).collect();
        assert_eq!(holders, vec![PortId(3), PortId(4)]);
        // Stable under equal load: no flapping.
        for _ in 0..10 {
            assert!(v.rebalance(&[(PortId(1), 200), (PortId(2), 200), (PortId(3), 200), (PortId(4), 200)]).is_empty());
        }
        // Filters always match assignments.
        for (p, q) in v.assignments() {
            let k = v.filter_of(p).unwrap();
            assert_eq!(v.lookup(k.mac, k.vlan).map(|(q, _)| q), q);
        }
    }

    #[test]
    fn dynamic_fills_free_queues_only_for_active_ports() {
        let mut v = Vmq::new(cfg(2, QueuePolicy::Dynamic));
        v.add_port(PortId(1), key(1));
        v.add_port(PortId(2), key(2));
        v.add_port(PortId(3), key(3));
        v.remove_port(PortId(1)); // handed to port 3 at once
        assert_eq!(v.queue_of(PortId(3)), Some(QueueId(1)));
        v.remove_port(PortId(2));
        assert_eq!(v.free_queues(), 1);
        v.add_port(PortId(5), key(5));
        assert_eq!(v.free_queues(), 0);
    }

    #[test]
    fn budget_changes_revoke_and_hand_out_queues() {
        let mut v = Vmq::new(cfg(3, QueuePolicy::Static));
        for n in 1..=5 {
            v.add_port(PortId(n), key(n as u8));
        }
        let changes = v.set_queues(1);
        assert_eq!(
            changes,
            vec![
                QueueChange::Revoked { port: PortId(2), queue: QueueId(2) },
                QueueChange::Revoked { port: PortId(3), queue: QueueId(3) }
            ]
        );
        assert_eq!(v.lookup(key(2).mac, 10), None);
        assert_eq!(v.free_queues(), 0);
        // Growing gives the new queues to the longest-waiting ports, lowest queue first.
        let changes = v.set_queues(3);
        assert_eq!(
            changes,
            vec![
                QueueChange::Assigned { port: PortId(2), queue: QueueId(2) },
                QueueChange::Assigned { port: PortId(3), queue: QueueId(3) }
            ]
        );
        assert_eq!(v.set_queues(5).len(), 2);
        assert_eq!(v.assignments().filter(|(_, q)| q.is_some()).count(), 5);
        for (p, q) in v.assignments() {
            let k = v.filter_of(p).unwrap();
            assert_eq!(v.lookup(k.mac, k.vlan).map(|(q, _)| q), q);
        }
    }

    #[test]
    fn placement_balances_load() {
        let loads = [(QueueId(1), 100), (QueueId(2), 90), (QueueId(3), 60), (QueueId(4), 40), (QueueId(0), 10)];
        let p = place_by_load(&loads, 2);
        let mut bins = [0u64; 2];
        for ((_, w), (_, l)) in p.iter().zip(&loads) {
            bins[*w as usize] += l;
        }
        assert_eq!(bins.iter().sum::<u64>(), 300);
        assert!(bins[0].abs_diff(bins[1]) <= 20, "{bins:?}");
        assert_eq!(p.iter().map(|(q, _)| *q).collect::<Vec<_>>(), loads.iter().map(|(q, _)| *q).collect::<Vec<_>>());
        assert!(place_by_load::<QueueId>(&[], 2).is_empty());
    }
}

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

/// Most lanes (VM queues of one filter key) a multiqueue port may hold.
pub const MAX_LANES: u16 = 16;

#[derive(Debug, Clone)]
struct VmPort {
    key: FilterKey,
    /// VM queues this port can use at once (its guest RX queue pairs), 1..=[`MAX_LANES`].
    lanes: u16,
    /// Queues held, in the order they were granted (0..=lanes entries). The first one is the
    /// filter table's target for `key`.
    queues: Vec<QueueId>,
    /// Arrival order, for first-come fairness.
    seq: u64,
}

#[derive(Debug, Clone)]
pub struct Vmq {
    cfg: VmqConfig,
    ports: BTreeMap<PortId, VmPort>,
    filters: MixMap<u64, (QueueId, PortId)>,
    /// Free queues, highest number first: pop hands out the lowest.
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

    /// Registers a single-lane VM port; gives it a queue if one is free (both policies start
    /// first come).
    pub fn add_port(&mut self, port: PortId, key: FilterKey) -> Option<QueueId> {
        self.add_port_lanes(port, key, 1).first().copied()
    }

    /// Registers a multiqueue VM port that can use up to `lanes` queues (clamped to
    /// 1..=[`MAX_LANES`]), all with the same filter key; first come, it takes up to `lanes` free
    /// queues at once, lowest numbers first. Returns the queues granted.
    pub fn add_port_lanes(&mut self, port: PortId, key: FilterKey, lanes: u16) -> Vec<QueueId> {
        self.remove_port(port);
        self.next_seq += 1;
        let lanes = lanes.clamp(1, MAX_LANES);
        self.ports.insert(port, VmPort { key, lanes, queues: Vec::new(), seq: self.next_seq });
        let mut granted = Vec::new();
        while granted.len() < usize::from(lanes) {
            let Some(queue) = self.free.pop() else { break };
            self.grant(port, queue);
            granted.push(queue);
        }
        granted
    }

    /// Unregisters a port. Its queues go to waiting ports (those without a queue first, longest
    /// waiting first, then those holding fewer than their lanes); leftovers become free.
    pub fn remove_port(&mut self, port: PortId) -> Vec<QueueChange> {
        let mut changes = Vec::new();
        let Some(vp) = self.ports.remove(&port) else {
            return changes;
        };
        if vp.queues.is_empty() {
            return changes;
        }
        self.filters.remove(&vp.key.as_u64());
        for &queue in &vp.queues {
            changes.push(QueueChange::Revoked { port, queue });
        }
        let mut freed = vp.queues;
        freed.sort_unstable();
        for queue in freed {
            if !self.hand_out(queue, &mut changes) {
                self.release(queue);
            }
        }
        changes
    }

    /// The port next in line for a queue: one holding none (lowest seq), else one holding fewer
    /// than its lanes (lowest seq).
    fn next_waiter(&self) -> Option<PortId> {
        self.ports
            .iter()
            .filter(|(_, p)| p.queues.len() < usize::from(p.lanes))
            .min_by_key(|(_, p)| (!p.queues.is_empty(), p.seq))
            .map(|(id, _)| *id)
    }

    /// Gives `queue` to the next waiting port, if any.
    fn hand_out(&mut self, queue: QueueId, changes: &mut Vec<QueueChange>) -> bool {
        let Some(port) = self.next_waiter() else {
            return false;
        };
        self.grant(port, queue);
        changes.push(QueueChange::Assigned { port, queue });
        true
    }

    /// Hands free queues (lowest first) to waiting ports while both last.
    fn hand_out_free(&mut self, changes: &mut Vec<QueueChange>) {
        while let Some(&queue) = self.free.last() {
            if !self.hand_out(queue, changes) {
                break;
            }
            self.free.pop();
        }
    }

    /// Returns a queue to the free list, keeping it sorted (highest first).
    fn release(&mut self, queue: QueueId) {
        let at = self.free.partition_point(|q| *q > queue);
        self.free.insert(at, queue);
    }

    fn grant(&mut self, port: PortId, queue: QueueId) {
        if let Some(p) = self.ports.get_mut(&port) {
            p.queues.push(queue);
            if p.queues.len() == 1 {
                self.filters.insert(p.key.as_u64(), (queue, port));
            }
        }
    }

    /// Takes `queue` from `port`; the filter follows the port's (new) first queue.
    fn revoke(&mut self, port: PortId, queue: QueueId) -> bool {
        let Some(p) = self.ports.get_mut(&port) else {
            return false;
        };
        let Some(i) = p.queues.iter().position(|q| *q == queue) else {
            return false;
        };
        p.queues.remove(i);
        if i == 0 {
            match p.queues.first() {
                Some(&first) => self.filters.insert(p.key.as_u64(), (first, port)),
                None => self.filters.remove(&p.key.as_u64()),
            };
        }
        true
    }

    /// Hot path: the VM queue (and port) for (mac, vlan); None = the default queue. A
    /// multiqueue port's first queue (the NIC spreads the key's flows over all of them).
    #[inline]
    pub fn lookup(&self, mac: MacAddr, vlan: u16) -> Option<(QueueId, PortId)> {
        self.filters.get(&FilterKey { mac, vlan }.as_u64()).copied()
    }

    /// The port's first queue.
    pub fn queue_of(&self, port: PortId) -> Option<QueueId> {
        self.ports.get(&port).and_then(|p| p.queues.first().copied())
    }

    /// Every queue the port holds, in the order they were granted (empty if unknown).
    pub fn queues_of(&self, port: PortId) -> &[QueueId] {
        self.ports.get(&port).map_or(&[], |p| p.queues.as_slice())
    }

    /// The port's lanes (0 if unknown).
    pub fn lanes_of(&self, port: PortId) -> u16 {
        self.ports.get(&port).map_or(0, |p| p.lanes)
    }

    pub fn filter_of(&self, port: PortId) -> Option<FilterKey> {
        self.ports.get(&port).map(|p| p.key)
    }

    /// Dynamic policy: given each VM port's RX rate since the last call, move queues toward
    /// where they are worth most. A port holding k queues at rate r values its weakest queue at
    /// r / k; one holding fewer than its lanes, with traffic, wants one more worth r / (k + 1).
    /// The most wanting port takes a free queue, or the last granted queue of the holder with the
    /// lowest per-queue value, but only when its want exceeds that value by the hysteresis
    /// factor. (For single-lane ports: the busiest waiting ports displace the least busy
    /// holders.) Ports missing from `rates` count as idle. Static policy: no changes.
    pub fn rebalance(&mut self, rates: &[(PortId, u64)]) -> Vec<QueueChange> {
        let mut changes = Vec::new();
        if self.cfg.policy == QueuePolicy::Static {
            return changes;
        }
        let rate_of = |p: PortId| rates.iter().find(|(id, _)| *id == p).map_or(0, |(_, r)| *r);
        let steps = 2 * (usize::from(self.cfg.queues) + self.ports.len());
        for _ in 0..steps {
            // The most wanting port: highest r / (k + 1); ties to the longest waiting.
            let waiter = self
                .ports
                .iter()
                .filter(|(_, p)| p.queues.len() < usize::from(p.lanes))
                .map(|(id, p)| (*id, rate_of(*id), p.queues.len(), p.seq))
                .filter(|&(_, r, _, _)| r > 0)
                .map(|(id, r, k, seq)| (id, r as f64 / (k + 1) as f64, seq))
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.2.cmp(&a.2)));
            let Some((waiter, want, _)) = waiter else { break };
            if let Some(queue) = self.free.pop() {
                self.grant(waiter, queue);
                changes.push(QueueChange::Assigned { port: waiter, queue });
                continue;
            }
            // The weakest holder: lowest r / k; ties to the lower rate, then the higher PortId.
            let holder = self
                .ports
                .iter()
                .filter(|(id, p)| **id != waiter && !p.queues.is_empty())
                .map(|(id, p)| (*id, rate_of(*id), rate_of(*id) as f64 / p.queues.len() as f64))
                .min_by(|a, b| a.2.total_cmp(&b.2).then(a.1.cmp(&b.1)).then(b.0.cmp(&a.0)));
            let Some((holder, _, value)) = holder else { break };
            if want <= value * self.cfg.hysteresis {
                break; // the strongest want can't beat the weakest holder: no other can
            }
            let Some(&queue) = self.ports[&holder].queues.last() else { break };
            self.revoke(holder, queue);
            changes.push(QueueChange::Revoked { port: holder, queue });
            self.grant(waiter, queue);
            changes.push(QueueChange::Assigned { port: waiter, queue });
        }
        changes
    }

    /// Which worker serves each queue: longest-processing-time-first greedy balance of the
    /// measured loads (any unit). Deterministic for equal inputs.
    pub fn placement(&self, loads: &[(QueueId, u64)]) -> Vec<(QueueId, u16)> {
        place_by_load(loads, self.cfg.workers.max(1))
    }

    /// Changes the queue budget (a NIC's queue count can't be exceeded; the caller checks).
    /// Shrinking revokes every held queue numbered above the new budget (their ports fall back to
    /// their other queues or the default queue); growing hands the new queues, lowest first, to
    /// waiting ports: those without a queue first (longest waiting first), then those holding
    /// fewer than their lanes.
    pub fn set_queues(&mut self, queues: u16) -> Vec<QueueChange> {
        let mut changes = Vec::new();
        let old = self.cfg.queues;
        self.cfg.queues = queues;
        if queues < old {
            self.free.retain(|q| q.0 <= queues);
            let lost: Vec<(PortId, QueueId)> = self
                .ports
                .iter()
                .flat_map(|(id, p)| p.queues.iter().filter(|q| q.0 > queues).map(move |q| (*id, *q)))
                .collect();
            for (port, queue) in lost {
                if self.revoke(port, queue) {
                    changes.push(QueueChange::Revoked { port, queue });
                }
            }
        } else {
            for q in old + 1..=queues {
                self.release(QueueId(q));
            }
        }
        // Free queues (new ones, or ones left free before a shrink) go to waiting ports.
        self.hand_out_free(&mut changes);
        changes
    }

    pub fn set_policy(&mut self, policy: QueuePolicy) {
        self.cfg.policy = policy;
    }

    /// Every port with its first queue.
    pub fn assignments(&self) -> impl Iterator<Item = (PortId, Option<QueueId>)> + '_ {
        self.ports.iter().map(|(id, p)| (*id, p.queues.first().copied()))
    }

    /// Every held queue with its port (a multiqueue port once per queue).
    pub fn queue_assignments(&self) -> impl Iterator<Item = (PortId, QueueId)> + '_ {
        self.ports.iter().flat_map(|(id, p)| p.queues.iter().map(move |q| (*id, *q)))
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
    use proptest::prelude::*;

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

    fn rate_list(rates: &[(u16, u64)]) -> Vec<(PortId, u64)> {
        rates.iter().map(|&(p, r)| (PortId(p), r)).collect()
    }

    /// Invariant: a queue is held by at most one port, held + free == budget, no port holds more
    /// than its lanes, and the filter table points every key at its port's first queue.
    fn check(v: &Vmq) {
        let held: Vec<QueueId> = v.queue_assignments().map(|(_, q)| q).collect();
        let mut unique = held.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), held.len(), "a queue held twice: {held:?}");
        assert_eq!(held.len() + v.free_queues(), usize::from(v.config().queues));
        assert!(held.iter().chain(&v.free).all(|q| (1..=v.config().queues).contains(&q.0)));
        for (port, first) in v.assignments() {
            let qs = v.queues_of(port);
            assert!(qs.len() <= usize::from(v.lanes_of(port)), "{port:?} holds {qs:?}");
            assert_eq!(first, qs.first().copied());
            assert_eq!(v.queue_of(port), first);
            let k = v.filter_of(port).unwrap();
            assert_eq!(v.lookup(k.mac, k.vlan), first.map(|q| (q, port)));
        }
    }

    #[test]
    fn multiqueue_port_takes_its_lanes_first_come() {
        let mut v = Vmq::new(cfg(6, QueuePolicy::Static));
        let qs = v.add_port_lanes(PortId(1), key(1), 4);
        assert_eq!(qs, vec![QueueId(1), QueueId(2), QueueId(3), QueueId(4)]);
        assert_eq!(v.queues_of(PortId(1)), qs.as_slice());
        assert_eq!(v.lanes_of(PortId(1)), 4);
        assert_eq!(v.queue_of(PortId(1)), Some(QueueId(1)));
        assert_eq!(v.lookup(key(1).mac, 10), Some((QueueId(1), PortId(1))));
        assert_eq!(v.add_port(PortId(2), key(2)), Some(QueueId(5)));
        assert_eq!(v.add_port_lanes(PortId(3), key(3), 4), vec![QueueId(6)], "the rest of the budget");
        assert_eq!(v.add_port(PortId(4), key(4)), None);
        assert_eq!(v.free_queues(), 0);
        assert_eq!(v.lanes_of(PortId(4)), 1);
        assert_eq!(v.lanes_of(PortId(9)), 0);
        assert!(v.queues_of(PortId(9)).is_empty());
        assert_eq!(v.add_port_lanes(PortId(5), key(5), 100), vec![]);
        assert_eq!(v.lanes_of(PortId(5)), MAX_LANES, "clamped");
        v.add_port_lanes(PortId(6), key(6), 0);
        assert_eq!(v.lanes_of(PortId(6)), 1, "clamped");
        assert_eq!(v.queue_assignments().count(), 6);
        check(&v);
    }

    #[test]
    fn remove_port_serves_queueless_ports_before_under_lane_ones() {
        let mut v = Vmq::new(cfg(4, QueuePolicy::Static));
        assert_eq!(v.add_port_lanes(PortId(1), key(1), 2).len(), 2); // queues 1, 2
        assert_eq!(v.add_port_lanes(PortId(2), key(2), 3).len(), 2); // queues 3, 4: one short
        assert!(v.add_port(PortId(3), key(3)).is_none()); // waits with no queue
        let changes = v.remove_port(PortId(1));
        assert_eq!(
            changes,
            vec![
                QueueChange::Revoked { port: PortId(1), queue: QueueId(1) },
                QueueChange::Revoked { port: PortId(1), queue: QueueId(2) },
                QueueChange::Assigned { port: PortId(3), queue: QueueId(1) },
                QueueChange::Assigned { port: PortId(2), queue: QueueId(2) },
            ]
        );
        assert_eq!(v.queues_of(PortId(2)), &[QueueId(3), QueueId(4), QueueId(2)]);
        assert_eq!(v.lookup(key(2).mac, 10), Some((QueueId(3), PortId(2))), "still its first queue");
        assert_eq!(v.lookup(key(1).mac, 10), None);
        check(&v);
        // Nobody waits any more: leftovers go back to the free list.
        let changes = v.remove_port(PortId(2));
        assert_eq!(changes.len(), 3);
        assert_eq!(v.free_queues(), 3);
        assert_eq!(v.add_port_lanes(PortId(4), key(4), 2), vec![QueueId(2), QueueId(3)], "lowest first");
        check(&v);
    }

    #[test]
    fn dynamic_busy_multiqueue_port_takes_queues_by_marginal_value() {
        // Four idle-ish single-lane holders: 4000/k stays above 100 * 1.5 up to k = 4.
        let mut v = Vmq::new(cfg(4, QueuePolicy::Dynamic));
        for n in 1..=4 {
            v.add_port(PortId(n), key(n as u8));
        }
        assert!(v.add_port_lanes(PortId(5), key(5), 4).is_empty());
        let rates = rate_list(&[(1, 100), (2, 100), (3, 100), (4, 100), (5, 4000)]);
        let ch = v.rebalance(&rates);
        assert_eq!(ch.len(), 8, "{ch:?}");
        // Equal rates: the higher PortId loses first; each move is Revoked then Assigned.
        assert_eq!(
            &ch[..2],
            &[
                QueueChange::Revoked { port: PortId(4), queue: QueueId(4) },
                QueueChange::Assigned { port: PortId(5), queue: QueueId(4) }
            ]
        );
        assert_eq!(v.queues_of(PortId(5)), &[QueueId(4), QueueId(3), QueueId(2), QueueId(1)]);
        assert_eq!(v.lookup(key(5).mac, 10), Some((QueueId(4), PortId(5))));
        check(&v);
        assert!(v.rebalance(&rates).is_empty(), "stable");

        // Busier holders: 4000/2 > 200*1.5, 4000/3 > 300*1.5, but 4000/4 = 1000 <= 1000*1.5.
        let mut v = Vmq::new(cfg(4, QueuePolicy::Dynamic));
        for n in 1..=4 {
            v.add_port(PortId(n), key(n as u8));
        }
        v.add_port_lanes(PortId(5), key(5), 4);
        let rates = rate_list(&[(1, 100), (2, 200), (3, 300), (4, 1000), (5, 4000)]);
        let ch = v.rebalance(&rates);
        assert_eq!(ch.len(), 6, "{ch:?}");
        assert_eq!(v.queues_of(PortId(5)), &[QueueId(1), QueueId(2), QueueId(3)]);
        assert_eq!(v.queues_of(PortId(4)), &[QueueId(4)]);
        for n in 1..=3 {
            assert!(v.queues_of(PortId(n)).is_empty());
        }
        check(&v);
        assert!(v.rebalance(&rates).is_empty(), "stable");

        // Load moves away: a holder's last granted queue goes first, its first queue stays.
        let ch = v.rebalance(&rate_list(&[(1, 2000), (4, 1000), (5, 900)]));
        assert_eq!(
            &ch[..2],
            &[
                QueueChange::Revoked { port: PortId(5), queue: QueueId(3) },
                QueueChange::Assigned { port: PortId(1), queue: QueueId(3) }
            ]
        );
        assert_eq!(v.queue_of(PortId(5)), Some(QueueId(1)));
        check(&v);
    }

    #[test]
    fn dynamic_no_flapping_with_equal_per_queue_load() {
        let mut v = Vmq::new(cfg(4, QueuePolicy::Dynamic));
        v.add_port_lanes(PortId(1), key(1), 2); // 400 over 2 queues: 200 each
        v.add_port(PortId(2), key(2));
        v.add_port(PortId(3), key(3));
        v.add_port(PortId(4), key(4)); // waits
        v.add_port_lanes(PortId(5), key(5), 4); // waits, 800/1 > 300 but wants more later
        let rates = rate_list(&[(1, 400), (2, 200), (3, 200), (4, 200), (5, 800)]);
        // Port 5 (800) beats the weakest (200 * 1.5); then 800/2 = 400 beats 300 again; then
        // 800/3 = 266 doesn't.
        let ch = v.rebalance(&rates);
        assert_eq!(ch.len(), 4, "{ch:?}");
        assert_eq!(v.queues_of(PortId(5)).len(), 2);
        check(&v);
        let before: Vec<_> = v.queue_assignments().collect();
        for _ in 0..10 {
            assert!(v.rebalance(&rates).is_empty());
            let equal = rate_list(&[(1, 200), (2, 100), (3, 100), (4, 100), (5, 200)]);
            assert!(v.rebalance(&equal).is_empty());
        }
        assert_eq!(v.queue_assignments().collect::<Vec<_>>(), before);
    }

    #[test]
    fn budget_changes_with_lanes() {
        let mut v = Vmq::new(cfg(4, QueuePolicy::Static));
        assert_eq!(v.add_port_lanes(PortId(1), key(1), 3).len(), 3); // 1, 2, 3
        assert_eq!(v.add_port_lanes(PortId(2), key(2), 2), vec![QueueId(4)]);
        assert!(v.add_port(PortId(3), key(3)).is_none());
        let changes = v.set_queues(2);
        assert_eq!(
            changes,
            vec![
                QueueChange::Revoked { port: PortId(1), queue: QueueId(3) },
                QueueChange::Revoked { port: PortId(2), queue: QueueId(4) }
            ]
        );
        assert_eq!(v.queues_of(PortId(1)), &[QueueId(1), QueueId(2)]);
        assert_eq!(v.lookup(key(2).mac, 10), None);
        check(&v);
        // Growing: the queueless ports (by arrival) first, then the under-lane ones.
        let changes = v.set_queues(6);
        assert_eq!(
            changes,
            vec![
                QueueChange::Assigned { port: PortId(2), queue: QueueId(3) },
                QueueChange::Assigned { port: PortId(3), queue: QueueId(4) },
                QueueChange::Assigned { port: PortId(1), queue: QueueId(5) },
                QueueChange::Assigned { port: PortId(2), queue: QueueId(6) },
            ]
        );
        check(&v);
        // A shrink that takes a port's first queue: the filter follows its next one.
        let mut v = Vmq::new(cfg(3, QueuePolicy::Static));
        v.add_port(PortId(1), key(1));
        v.add_port(PortId(2), key(2));
        v.add_port(PortId(3), key(3));
        v.remove_port(PortId(1));
        v.remove_port(PortId(2));
        assert_eq!(v.add_port_lanes(PortId(4), key(4), 3), vec![QueueId(1), QueueId(2)]);
        v.remove_port(PortId(3));
        assert_eq!(v.queues_of(PortId(4)), &[QueueId(1), QueueId(2), QueueId(3)]);
        v.set_queues(3);
        check(&v);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u16, u16),
        Remove(u16),
        Rebalance(Vec<(u16, u64)>),
        SetQueues(u16),
        Policy(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u16..8, 0u16..6).prop_map(|(p, l)| Op::Add(p, l)),
            2 => (0u16..8).prop_map(Op::Remove),
            3 => proptest::collection::vec((0u16..8, prop_oneof![Just(0u64), 1u64..5000]), 0..8)
                .prop_map(Op::Rebalance),
            1 => (0u16..10).prop_map(Op::SetQueues),
            1 => any::<bool>().prop_map(Op::Policy),
        ]
    }

    proptest! {
        #[test]
        fn invariants_hold_over_random_operations(
            queues in 0u16..8,
            ops in proptest::collection::vec(op(), 0..40),
        ) {
            let mut v = Vmq::new(cfg(queues, QueuePolicy::Dynamic));
            for op in ops {
                match op {
                    Op::Add(p, l) => {
                        let qs = v.add_port_lanes(PortId(p), key(p as u8), l);
                        prop_assert_eq!(v.queues_of(PortId(p)), qs.as_slice());
                    }
                    Op::Remove(p) => {
                        v.remove_port(PortId(p));
                        prop_assert_eq!(v.lookup(key(p as u8).mac, 10), None);
                    }
                    Op::Rebalance(r) => {
                        v.rebalance(&rate_list(&r));
                    }
                    Op::SetQueues(n) => {
                        v.set_queues(n);
                    }
                    Op::Policy(d) => {
                        v.set_policy(if d { QueuePolicy::Dynamic } else { QueuePolicy::Static })
                    }
                }
                check(&v);
            }
        }
    }
}

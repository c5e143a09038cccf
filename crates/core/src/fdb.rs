//! The forwarding database: (MAC, VLAN) → port, with learning, aging, static entries, a hard
//! capacity and a per-port learning limit (MAC-flood protection). The clock is injected
//! (`now_ns`), so aging is testable.
//!
//! Aging is incremental: learned entries sit in a FIFO in the order they were learned, and every
//! attempt to learn a new address first examines at most [`SWEEP_BUDGET`] of them (expired ones
//! are removed, live ones go to the back). Learning therefore costs O(1) even with a full table,
//! which matters because it runs under the switch's write lock while every other worker waits.
//!
//! Lookups and refreshes work through `&self` (the refresh is a relaxed atomic store), so data-path
//! workers share the table under a read lock and take the write lock only to learn a new or
//! moved address — which in steady state never happens.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use vmq_wire::MacAddr;

use crate::port::PortId;

/// Default entry lifetime without traffic (like Linux bridge and OVS: 300 s).
pub const DEFAULT_AGING_NS: u64 = 300 * 1_000_000_000;
/// Default capacity (entries).
pub const DEFAULT_CAPACITY: usize = 65_536;
/// Default limit of addresses learned on one port: far more than a VM (or a nested bridge)
/// has, and a flood from one port cannot fill the table for the others.
pub const DEFAULT_MAX_LEARNED_MACS: u32 = 4096;
/// Learned entries examined by the aging sweep per attempt to learn a new address. Larger than
/// one so that the sweep outpaces learning (the FIFO never holds more than the table), small so
/// that a batch of learns holds the write lock for microseconds.
pub const SWEEP_BUDGET: usize = 8;
/// Most entries reserved when the table is made (see [`Fdb::new`]).
const RESERVE_MAX: usize = 1 << 18;

/// The key as one integer: MAC in the low 48 bits, VLAN above. Hashing an integer with
/// [`MixHasher`] is several times cheaper than SipHash over a struct, and this is per frame.
fn key(mac: MacAddr, vlan: u16) -> u64 {
    mac.to_u64() | (u64::from(vlan) << 48)
}

/// A multiply-xorshift hasher for integer keys. Hand-written because the FDB and VMQ filter
/// lookups are on the per-frame path; HashDoS is not a concern for keys whose count is capped
/// and which are only ever written by learning (bounded) or configuration.
#[derive(Default, Clone, Copy)]
pub struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
}

pub type MixMap<K, V> = HashMap<K, V, BuildHasherDefault<MixHasher>>;

#[derive(Debug)]
struct Entry {
    port: PortId,
    last_seen_ns: AtomicU64,
    is_static: bool,
    /// Which FIFO item stands for this entry (0 for static entries, which are not in it): an
    /// item whose sequence differs is stale (its entry was removed or replaced) and is dropped.
    seq: u64,
}

/// What learning a source address did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LearnOutcome {
    New,
    Refreshed,
    /// The address moved to another port (VM migration, or a loop).
    Moved,
    /// The table is full: not learned (frames to it are flooded). Counted by the caller.
    Full,
    /// The port has learned as many addresses as it may: not learned (or not moved to it).
    /// Counted by the caller.
    LimitReached,
    /// A static entry exists; learning never overrides it.
    Static,
}

/// A read-only view of one entry, for `vmq ctl fdb` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: MacAddr,
    pub vlan: u16,
    pub port: PortId,
    pub is_static: bool,
    pub age_ns: u64,
}

#[derive(Debug)]
pub struct Fdb {
    entries: MixMap<u64, Entry>,
    /// Learned entries, oldest learned first, as (key, seq): the aging sweep's work list.
    fifo: VecDeque<(u64, u64)>,
    next_seq: u64,
    /// Per port (indexed by `PortId`): learned entries now, and how many it may have.
    learned: Vec<u32>,
    limits: Vec<u32>,
    capacity: usize,
    aging_ns: u64,
    /// Entries the aging sweep has examined so far (makes its cost observable).
    sweep_visits: u64,
}

impl Fdb {
    pub fn new(capacity: usize, aging_ns: u64) -> Fdb {
        // Room reserved up front: growing a big table rehashes it, all at once, under the
        // switch's write lock. Beyond this size the table grows on demand.
        let reserve = capacity.min(RESERVE_MAX);
        Fdb {
            entries: MixMap::with_capacity_and_hasher(reserve, Default::default()),
            fifo: VecDeque::with_capacity(reserve),
            next_seq: 1,
            learned: Vec::new(),
            limits: Vec::new(),
            capacity,
            aging_ns,
            sweep_visits: 0,
        }
    }

    /// How many addresses `port` may learn (default [`DEFAULT_MAX_LEARNED_MACS`]). Lowering it
    /// below what the port has learned keeps those entries until they age out.
    pub fn set_port_limit(&mut self, port: PortId, limit: u32) {
        let i = port.0 as usize;
        if self.limits.len() <= i {
            self.limits.resize(i + 1, DEFAULT_MAX_LEARNED_MACS);
        }
        self.limits[i] = limit;
    }

    fn limit(&self, port: PortId) -> u32 {
        self.limits.get(port.0 as usize).copied().unwrap_or(DEFAULT_MAX_LEARNED_MACS)
    }

    /// Whether `port` has learned as many addresses as it may (read-only: lets the data path
    /// skip the write lock for a port under a MAC flood).
    pub fn at_limit(&self, port: PortId) -> bool {
        self.learned(port) >= self.limit(port)
    }

    /// Learned (not static) entries on `port`.
    pub fn learned(&self, port: PortId) -> u32 {
        self.learned.get(port.0 as usize).copied().unwrap_or(0)
    }

    fn count_learned(&mut self, port: PortId, add: bool) {
        let i = port.0 as usize;
        if self.learned.len() <= i {
            self.learned.resize(i + 1, 0);
        }
        let n = &mut self.learned[i];
        *n = if add { n.saturating_add(1) } else { n.saturating_sub(1) };
    }

    /// Entries the aging sweep has examined since the table was made: a learn adds at most
    /// [`SWEEP_BUDGET`] to it.
    pub fn sweep_visits(&self) -> u64 {
        self.sweep_visits
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The port for `(mac, vlan)` if known and not expired.
    pub fn lookup(&self, mac: MacAddr, vlan: u16, now_ns: u64) -> Option<PortId> {
        let e = self.entries.get(&key(mac, vlan))?;
        if e.is_static || !self.expired(e, now_ns) { Some(e.port) } else { None }
    }

    fn expired(&self, e: &Entry, now_ns: u64) -> bool {
        now_ns.saturating_sub(e.last_seen_ns.load(Relaxed)) > self.aging_ns
    }

    /// Read-only half of learning: if `(mac, vlan)` is already on `port`, refresh its age and
    /// return true; false means [`Fdb::learn`] (write access) is needed.
    pub fn refresh(&self, mac: MacAddr, vlan: u16, port: PortId, now_ns: u64) -> bool {
        match self.entries.get(&key(mac, vlan)) {
            Some(e) if e.is_static => true,
            Some(e) if e.port == port => {
                // Store only when it changes noticeably: avoids bouncing the cache line
                // between workers on every frame.
                if now_ns.saturating_sub(e.last_seen_ns.load(Relaxed)) > 1_000_000 {
                    e.last_seen_ns.store(now_ns, Relaxed);
                }
                true
            }
            _ => false,
        }
    }

    pub fn learn(&mut self, mac: MacAddr, vlan: u16, port: PortId, now_ns: u64) -> LearnOutcome {
        if mac.is_multicast() || mac.is_zero() {
            return LearnOutcome::Static; // never learn group or zero addresses
        }
        let k = key(mac, vlan);
        let at_limit = self.learned(port) >= self.limit(port);
        if let Some(e) = self.entries.get_mut(&k) {
            if e.is_static {
                return LearnOutcome::Static;
            }
            if e.port == port {
                *e.last_seen_ns.get_mut() = now_ns;
                return LearnOutcome::Refreshed;
            }
            if at_limit {
                return LearnOutcome::LimitReached;
            }
            let from = std::mem::replace(&mut e.port, port);
            *e.last_seen_ns.get_mut() = now_ns;
            self.count_learned(from, false);
            self.count_learned(port, true);
            return LearnOutcome::Moved;
        }
        // Make room from expired entries, a few per attempt (bounded work under the lock).
        self.sweep(now_ns, SWEEP_BUDGET);
        if self.learned(port) >= self.limit(port) {
            return LearnOutcome::LimitReached;
        }
        if self.entries.len() >= self.capacity {
            return LearnOutcome::Full;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(k, Entry { port, last_seen_ns: AtomicU64::new(now_ns), is_static: false, seq });
        self.fifo.push_back((k, seq));
        self.count_learned(port, true);
        LearnOutcome::New
    }

    /// Examines up to `budget` learned entries, oldest learned first: removes the expired ones,
    /// sends the live ones to the back. Returns how many were removed.
    pub fn sweep(&mut self, now_ns: u64, budget: usize) -> usize {
        let mut removed = 0;
        for _ in 0..budget {
            let Some((k, seq)) = self.fifo.pop_front() else {
                break;
            };
            self.sweep_visits += 1;
            let Some(e) = self.entries.get_mut(&k) else {
                continue; // stale: removed since
            };
            if e.seq != seq {
                continue; // stale: replaced since
            }
            if now_ns.saturating_sub(*e.last_seen_ns.get_mut()) > self.aging_ns {
                let port = e.port;
                self.entries.remove(&k);
                self.count_learned(port, false);
                removed += 1;
            } else {
                self.fifo.push_back((k, seq));
            }
        }
        removed
    }

    /// A configured entry: never ages, never overridden by learning, not limited by capacity.
    pub fn add_static(&mut self, mac: MacAddr, vlan: u16, port: PortId) {
        let e = Entry { port, last_seen_ns: AtomicU64::new(0), is_static: true, seq: 0 };
        if let Some(old) = self.entries.insert(key(mac, vlan), e)
            && !old.is_static
        {
            self.count_learned(old.port, false); // its FIFO item is stale now
        }
    }

    /// Forget every entry (learned and static) pointing at `port` (port removed or down).
    pub fn remove_port(&mut self, port: PortId) -> usize {
        self.remove_where(|e| e.port == port)
    }

    /// Forget the learned entries pointing at `port` (port down): static ones stay, so that the
    /// port's configured address is unicast to again as soon as it comes back.
    pub fn forget_learned(&mut self, port: PortId) -> usize {
        self.remove_where(|e| !e.is_static && e.port == port)
    }

    /// Remove expired learned entries; returns how many. A full scan: for the control plane
    /// and tests; learning ages incrementally (see [`Fdb::sweep`]).
    pub fn age(&mut self, now_ns: u64) -> usize {
        let aging = self.aging_ns;
        self.remove_where(|e| !e.is_static && now_ns.saturating_sub(e.last_seen_ns.load(Relaxed)) > aging)
    }

    /// Removes the entries `gone` selects, keeping the per-port counts and the FIFO right.
    fn remove_where(&mut self, gone: impl Fn(&Entry) -> bool) -> usize {
        let before = self.entries.len();
        let mut learned = std::mem::take(&mut self.learned);
        self.entries.retain(|_, e| {
            let remove = gone(e);
            if remove
                && !e.is_static
                && let Some(n) = learned.get_mut(e.port.0 as usize)
            {
                *n = n.saturating_sub(1);
            }
            !remove
        });
        self.learned = learned;
        let entries = &self.entries;
        self.fifo.retain(|(k, seq)| entries.get(k).is_some_and(|e| e.seq == *seq));
        before - self.entries.len()
    }

    pub fn entries(&self, now_ns: u64) -> impl Iterator<Item = FdbEntry> + '_ {
        self.entries.iter().map(move |(k, e)| {
            let b = k.to_be_bytes();
            FdbEntry {
                mac: MacAddr([b[2], b[3], b[4], b[5], b[6], b[7]]),
                vlan: (k >> 48) as u16,
                port: e.port,
                is_static: e.is_static,
                age_ns: if e.is_static { 0 } else { now_ns.saturating_sub(e.last_seen_ns.load(Relaxed)) },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }

    #[test]
    fn learns_and_looks_up_per_vlan() {
        let mut f = Fdb::new(16, 1000);
        assert_eq!(f.learn(mac(1), 10, PortId(1), 0), LearnOutcome::New);
        assert_eq!(f.lookup(mac(1), 10, 5), Some(PortId(1)));
        assert_eq!(f.lookup(mac(1), 20, 5), None, "VLANs are separate domains");
        assert_eq!(f.learn(mac(1), 10, PortId(1), 10), LearnOutcome::Refreshed);
        assert_eq!(f.learn(mac(1), 10, PortId(2), 20), LearnOutcome::Moved);
        assert_eq!(f.lookup(mac(1), 10, 25), Some(PortId(2)));
    }

    #[test]
    fn entries_age_out_and_refresh_keeps_them() {
        let mut f = Fdb::new(16, 1_000_000_000);
        f.learn(mac(1), 0, PortId(1), 0);
        f.learn(mac(2), 0, PortId(1), 0);
        assert!(f.refresh(mac(1), 0, PortId(1), 900_000_000));
        assert!(!f.refresh(mac(1), 0, PortId(3), 900_000_000), "other port needs learn");
        assert_eq!(f.lookup(mac(2), 0, 1_500_000_000), None, "expired");
        assert_eq!(f.lookup(mac(1), 0, 1_500_000_000), Some(PortId(1)));
        assert_eq!(f.age(1_500_000_000), 1);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn capacity_stops_learning_but_not_statics() {
        let mut f = Fdb::new(2, 1000);
        assert_eq!(f.learn(mac(1), 0, PortId(1), 0), LearnOutcome::New);
        assert_eq!(f.learn(mac(2), 0, PortId(1), 0), LearnOutcome::New);
        assert_eq!(f.learn(mac(3), 0, PortId(1), 0), LearnOutcome::Full);
        assert_eq!(f.lookup(mac(3), 0, 0), None);
        // Once entries expire, room is made on demand.
        assert_eq!(f.learn(mac(3), 0, PortId(1), 5000), LearnOutcome::New);
        f.add_static(mac(9), 0, PortId(4));
        assert_eq!(f.learn(mac(9), 0, PortId(1), 6000), LearnOutcome::Static);
        assert_eq!(f.lookup(mac(9), 0, u64::MAX), Some(PortId(4)), "static never ages");
    }

    /// Random-looking unicast addresses, distinct for distinct `i`.
    fn flood_mac(i: u32) -> MacAddr {
        let x = (u64::from(i)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16;
        let b = x.to_be_bytes();
        MacAddr([0x02, b[3], b[4], b[5], b[6], b[7]])
    }

    /// A full table of live entries: each further learn attempt examines at most SWEEP_BUDGET
    /// entries (before, every attempt scanned the whole table for expired ones).
    #[test]
    fn learning_into_a_full_table_costs_a_bounded_sweep() {
        let capacity = 20_000;
        let mut f = Fdb::new(capacity, 1_000_000);
        for port in 0..10u16 {
            f.set_port_limit(PortId(port), u32::MAX);
        }
        for i in 0..capacity as u32 {
            assert_eq!(f.learn(flood_mac(i), 0, PortId((i % 10) as u16), 0), LearnOutcome::New);
        }
        let before = f.sweep_visits();
        for i in 0..1000 {
            assert_eq!(f.learn(flood_mac(1_000_000 + i), 0, PortId(3), 10), LearnOutcome::Full);
        }
        let visits = f.sweep_visits() - before;
        assert!(visits <= 1000 * SWEEP_BUDGET as u64, "{visits} entries examined for 1000 learns");
        // Once the entries have expired, room is made on demand, a few at a time.
        assert_eq!(f.learn(flood_mac(2_000_000), 0, PortId(3), 2_000_000), LearnOutcome::New);
        assert!(f.len() <= capacity);
        // The sweep catches up with every expired entry within len / (SWEEP_BUDGET - 1) learns.
        for i in 0..(capacity / (SWEEP_BUDGET - 1) + 1) as u32 {
            f.learn(flood_mac(3_000_000 + i), 0, PortId(4), 2_000_000);
        }
        assert!(f.entries(2_000_000).all(|e| e.age_ns == 0), "expired entries remain");
    }

    #[test]
    fn a_port_at_its_limit_learns_no_more_while_others_still_do() {
        let mut f = Fdb::new(1000, 1_000_000);
        f.set_port_limit(PortId(0), 3);
        for i in 0..3 {
            assert_eq!(f.learn(flood_mac(i), 0, PortId(0), 0), LearnOutcome::New);
        }
        assert_eq!(f.learn(flood_mac(3), 0, PortId(0), 0), LearnOutcome::LimitReached);
        assert_eq!(f.lookup(flood_mac(3), 0, 0), None);
        assert_eq!(f.learn(flood_mac(0), 0, PortId(0), 5), LearnOutcome::Refreshed, "known ones refresh");
        assert_eq!(f.learn(flood_mac(4), 0, PortId(1), 0), LearnOutcome::New, "other ports still learn");
        // A move to a port at its limit is refused; a move away frees a place.
        assert_eq!(f.learn(flood_mac(4), 0, PortId(0), 0), LearnOutcome::LimitReached);
        assert_eq!(f.lookup(flood_mac(4), 0, 0), Some(PortId(1)));
        assert_eq!(f.learn(flood_mac(0), 0, PortId(1), 0), LearnOutcome::Moved);
        assert_eq!((f.learned(PortId(0)), f.learned(PortId(1))), (2, 2));
        assert_eq!(f.learn(flood_mac(3), 0, PortId(0), 0), LearnOutcome::New);
        // Aged-out entries give their places back; forgetting a port resets its count.
        assert_eq!(f.learn(flood_mac(9), 0, PortId(0), 2_000_000), LearnOutcome::New);
        assert!(f.learned(PortId(0)) <= 3);
        let had = f.learned(PortId(0)) as usize;
        assert_eq!(f.forget_learned(PortId(0)), had);
        assert_eq!(f.learned(PortId(0)), 0);
        assert_eq!(f.learn(flood_mac(5), 0, PortId(0), 2_000_000), LearnOutcome::New);
    }

    #[test]
    fn never_learns_group_addresses_and_remove_port() {
        let mut f = Fdb::new(8, 1000);
        assert_eq!(f.learn(MacAddr::BROADCAST, 0, PortId(1), 0), LearnOutcome::Static);
        assert!(f.is_empty());
        f.learn(mac(1), 0, PortId(1), 0);
        f.learn(mac(2), 0, PortId(2), 0);
        assert_eq!(f.remove_port(PortId(1)), 1);
        let e: Vec<_> = f.entries(10).collect();
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].mac, e[0].vlan, e[0].port, e[0].age_ns), (mac(2), 0, PortId(2), 10));
    }
}

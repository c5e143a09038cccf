//! The forwarding database: (MAC, VLAN) → port, with learning, aging, static entries and a hard
//! capacity (MAC-flood protection). The clock is injected (`now_ns`), so aging is testable.
//!
//! Lookups and refreshes work through `&self` (the refresh is a relaxed atomic store), so data-path
//! workers share the table under a read lock and take the write lock only to learn a new or
//! moved address — which in steady state never happens.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use vmq_wire::MacAddr;

use crate::port::PortId;

/// Default entry lifetime without traffic (like Linux bridge and OVS: 300 s).
pub const DEFAULT_AGING_NS: u64 = 300 * 1_000_000_000;
/// Default capacity (entries).
pub const DEFAULT_CAPACITY: usize = 65_536;

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
    capacity: usize,
    aging_ns: u64,
}

impl Fdb {
    pub fn new(capacity: usize, aging_ns: u64) -> Fdb {
        Fdb { entries: MixMap::default(), capacity, aging_ns }
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
        if let Some(e) = self.entries.get_mut(&k) {
            if e.is_static {
                return LearnOutcome::Static;
            }
            let outcome = if e.port == port { LearnOutcome::Refreshed } else { LearnOutcome::Moved };
            e.port = port;
            *e.last_seen_ns.get_mut() = now_ns;
            return outcome;
        }
        if self.entries.len() >= self.capacity {
            // Try to make room from expired entries before refusing.
            if self.age(now_ns) == 0 {
                return LearnOutcome::Full;
            }
        }
        self.entries.insert(k, Entry { port, last_seen_ns: AtomicU64::new(now_ns), is_static: false });
        LearnOutcome::New
    }

    /// A configured entry: never ages, never overridden by learning, not limited by capacity.
    pub fn add_static(&mut self, mac: MacAddr, vlan: u16, port: PortId) {
        self.entries.insert(key(mac, vlan), Entry { port, last_seen_ns: AtomicU64::new(0), is_static: true });
    }

    /// Forget every entry (learned and static) pointing at `port` (port removed or down).
    pub fn remove_port(&mut self, port: PortId) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.port != port);
        before - self.entries.len()
    }

    /// Forget the learned entries pointing at `port` (port down): static ones stay, so that the
    /// port's configured address is unicast to again as soon as it comes back.
    pub fn forget_learned(&mut self, port: PortId) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.is_static || e.port != port);
        before - self.entries.len()
    }

    /// Remove expired learned entries; returns how many.
    pub fn age(&mut self, now_ns: u64) -> usize {
        let before = self.entries.len();
        let aging = self.aging_ns;
        self.entries.retain(|_, e| e.is_static || now_ns.saturating_sub(*e.last_seen_ns.get_mut()) <= aging);
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

//! Counters. Per-port values are `AtomicU64`s updated with relaxed ordering (written by the
//! data-path worker, read by the control thread at scrape time): no locks on the frame path.
//! Workers batch their increments, so the atomic cost is per batch rather than per frame.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a frame was dropped. Every frame a port receives is either forwarded or counted under
/// exactly one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Longer than the port's MTU allows (ingress or egress); never truncated.
    Oversize,
    /// Source MAC is not the VM port's MAC (spoof guard).
    Spoofed,
    /// VLAN not allowed on the port, or a tag where none is allowed.
    Vlan,
    /// Frame too short, bad header, or an invalid virtio-net header.
    Malformed,
    /// QinQ or another tag protocol vmq does not handle.
    Unsupported,
    /// The receiver had no buffer (RX ring full) or a cross-worker ring was full.
    NoBuffer,
    /// A guest descriptor chain was invalid (out of guest memory, looping, too long).
    BadDescriptor,
    /// The destination port is down (VM not connected, TAP gone).
    PortDown,
    /// The destination is the port the frame came from (hairpin), or a frame with no receiver.
    NoDestination,
    /// Offload processing failed (a GSO frame that cannot be segmented as described, or whose
    /// `gso_size` is below the minimum vmq accepts).
    Offload,
    /// A guest ring is broken (an available index more than a ring ahead, ring areas outside
    /// guest memory): it is no longer served until the frontend resets it. Counted once when a
    /// TX ring breaks (no frame can be read from it, so `rx_packets` does not include it), and
    /// once per frame that finds a broken RX ring.
    RingBroken,
    /// Toward a VM port: the guest's receive filter (relayed from its VMM, narrowed by the
    /// port's policy) does not take the frame (another MAC without promiscuous mode, a
    /// multicast group or VLAN it did not join). Counted on the VM port.
    RxFilter,
}

impl DropReason {
    pub const ALL: [DropReason; 12] = [
        DropReason::Oversize,
        DropReason::Spoofed,
        DropReason::Vlan,
        DropReason::Malformed,
        DropReason::Unsupported,
        DropReason::NoBuffer,
        DropReason::BadDescriptor,
        DropReason::PortDown,
        DropReason::NoDestination,
        DropReason::Offload,
        DropReason::RingBroken,
        DropReason::RxFilter,
    ];

    /// Stable lowercase name, used in metrics labels and `vmq ctl stats`.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Oversize => "oversize",
            DropReason::Spoofed => "spoofed",
            DropReason::Vlan => "vlan",
            DropReason::Malformed => "malformed",
            DropReason::Unsupported => "unsupported",
            DropReason::NoBuffer => "no_buffer",
            DropReason::BadDescriptor => "bad_descriptor",
            DropReason::PortDown => "port_down",
            DropReason::NoDestination => "no_destination",
            DropReason::Offload => "offload",
            DropReason::RingBroken => "ring_broken",
            DropReason::RxFilter => "rx_filter",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Shards of the frame counters. Each worker adds to its own (by worker index), so two workers
/// counting frames of one port (the TX rings of a multiqueue VM, an uplink every worker sends
/// to) do not pass one cache line between cores every batch; readers add the shards up.
const TRAFFIC_SHARDS: usize = 4;

/// One shard of a port's frame counters, on cache lines of its own (128 bytes: the adjacent
/// line prefetcher pairs 64-byte lines).
#[derive(Debug, Default)]
#[repr(align(128))]
struct TrafficShard {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
}

/// Counters of one port (or one queue). Shared between workers and the control thread.
#[derive(Debug, Default)]
pub struct PortStats {
    traffic: [TrafficShard; TRAFFIC_SHARDS],
    drops: [AtomicU64; DropReason::ALL.len()],
    /// Segments made by software segmentation toward this port.
    pub offload_segments: AtomicU64,
    /// Partial checksums finished in software toward this port.
    pub offload_csum_finished: AtomicU64,
    /// Frames merged by receive coalescing toward this port (segments absorbed).
    pub offload_coalesced: AtomicU64,
    /// GSO frames delivered as is (no segmentation needed).
    pub offload_gso_passed: AtomicU64,
    /// FDB learning refused because the table was full (frame still forwarded).
    pub fdb_full: AtomicU64,
    /// Frames the kernel dropped before vmq saw them (AF_PACKET ring full: `tp_drops`). Not
    /// in `rx_packets` nor in the drops by reason, which count frames vmq received.
    pub kernel_drops: AtomicU64,
    /// AF_PACKET ring blocks skipped because the kernel's block header made no sense.
    pub corrupt_blocks: AtomicU64,
    /// Addresses that moved to this port from another (VM migration, or a loop / spoofing).
    pub fdb_moves: AtomicU64,
    /// FDB learning refused because the port reached its `max_learned_macs` (frame still
    /// forwarded).
    pub fdb_limit: AtomicU64,
    /// The source MAC of the last frame dropped as `spoofed` (bit 48 set once there was one):
    /// written on the drop path only, read by the control thread to name it in a warning.
    last_spoofed_source: AtomicU64,
    /// MAC changes the guest asked for and the port's policy refused (`allow_mac_change`).
    pub mac_change_refused: AtomicU64,
    /// Times the guest asked for promiscuous (or all-unicast) mode and the port's policy
    /// refused it (`allow_promiscuous`).
    pub promiscuous_refused: AtomicU64,
    /// VM ports with a QMP relay: messages from QEMU that could not be used (unparsable, a
    /// refused query) and connections lost.
    pub qmp_errors: AtomicU64,
}

/// A snapshot of [`PortStats`], plain numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStatsSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: [u64; DropReason::ALL.len()],
    pub offload_segments: u64,
    pub offload_csum_finished: u64,
    pub offload_coalesced: u64,
    pub offload_gso_passed: u64,
    pub fdb_full: u64,
    pub kernel_drops: u64,
    pub corrupt_blocks: u64,
    pub fdb_moves: u64,
    pub fdb_limit: u64,
    pub mac_change_refused: u64,
    pub promiscuous_refused: u64,
    pub qmp_errors: u64,
}

impl PortStatsSnapshot {
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}

impl PortStats {
    /// Frames received, counted in worker `worker`'s shard (any index; threads that are not
    /// workers use 0).
    pub fn add_rx(&self, worker: usize, packets: u64, bytes: u64) {
        if packets != 0 {
            let shard = &self.traffic[worker % TRAFFIC_SHARDS];
            shard.rx_packets.fetch_add(packets, Relaxed);
            shard.rx_bytes.fetch_add(bytes, Relaxed);
        }
    }

    /// Frames sent, counted in worker `worker`'s shard (as [`PortStats::add_rx`]).
    pub fn add_tx(&self, worker: usize, packets: u64, bytes: u64) {
        if packets != 0 {
            let shard = &self.traffic[worker % TRAFFIC_SHARDS];
            shard.tx_packets.fetch_add(packets, Relaxed);
            shard.tx_bytes.fetch_add(bytes, Relaxed);
        }
    }

    fn traffic_sum(&self, field: impl Fn(&TrafficShard) -> &AtomicU64) -> u64 {
        self.traffic.iter().map(|shard| field(shard).load(Relaxed)).fold(0, u64::wrapping_add)
    }

    pub fn rx_packets(&self) -> u64 {
        self.traffic_sum(|s| &s.rx_packets)
    }

    pub fn rx_bytes(&self) -> u64 {
        self.traffic_sum(|s| &s.rx_bytes)
    }

    pub fn tx_packets(&self) -> u64 {
        self.traffic_sum(|s| &s.tx_packets)
    }

    pub fn tx_bytes(&self) -> u64 {
        self.traffic_sum(|s| &s.tx_bytes)
    }

    pub fn add_drop(&self, reason: DropReason, count: u64) {
        if count != 0 {
            self.drops[reason.index()].fetch_add(count, Relaxed);
        }
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Relaxed)
    }

    /// Records the source MAC of a frame dropped as `spoofed` (one relaxed store, on the drop
    /// path only).
    pub fn note_spoofed_source(&self, mac: [u8; 6]) {
        let mut bytes = [0u8; 8];
        bytes[2..].copy_from_slice(&mac);
        self.last_spoofed_source.store(u64::from_be_bytes(bytes) | 1 << 48, Relaxed);
    }

    /// The source MAC of the last frame dropped as `spoofed`, if any was.
    pub fn last_spoofed_source(&self) -> Option<[u8; 6]> {
        let v = self.last_spoofed_source.load(Relaxed);
        if v & 1 << 48 == 0 {
            return None;
        }
        let bytes = v.to_be_bytes();
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&bytes[2..]);
        Some(mac)
    }

    pub fn snapshot(&self) -> PortStatsSnapshot {
        let mut drops = [0u64; DropReason::ALL.len()];
        for (d, a) in drops.iter_mut().zip(&self.drops) {
            *d = a.load(Relaxed);
        }
        PortStatsSnapshot {
            rx_packets: self.rx_packets(),
            rx_bytes: self.rx_bytes(),
            tx_packets: self.tx_packets(),
            tx_bytes: self.tx_bytes(),
            drops,
            offload_segments: self.offload_segments.load(Relaxed),
            offload_csum_finished: self.offload_csum_finished.load(Relaxed),
            offload_coalesced: self.offload_coalesced.load(Relaxed),
            offload_gso_passed: self.offload_gso_passed.load(Relaxed),
            fdb_full: self.fdb_full.load(Relaxed),
            kernel_drops: self.kernel_drops.load(Relaxed),
            corrupt_blocks: self.corrupt_blocks.load(Relaxed),
            fdb_moves: self.fdb_moves.load(Relaxed),
            fdb_limit: self.fdb_limit.load(Relaxed),
            mac_change_refused: self.mac_change_refused.load(Relaxed),
            promiscuous_refused: self.promiscuous_refused.load(Relaxed),
            qmp_errors: self.qmp_errors.load(Relaxed),
        }
    }
}

/// Frame-local counter batch: a worker accumulates here and flushes once per batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct CounterBatch {
    pub packets: u64,
    pub bytes: u64,
}

impl CounterBatch {
    pub fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_counters_of_every_worker_add_up() {
        let s = PortStats::default();
        // More workers than shards: some share one.
        for worker in 0..9 {
            s.add_rx(worker, 2, 100);
            s.add_tx(worker, 1, 50);
        }
        s.add_rx(0, 1, 10);
        let snap = s.snapshot();
        assert_eq!((snap.rx_packets, snap.rx_bytes, snap.tx_packets, snap.tx_bytes), (19, 910, 9, 450));
        assert_eq!((s.rx_packets(), s.tx_bytes()), (19, 450));
    }

    #[test]
    fn the_last_spoofed_source_is_kept_zero_mac_included() {
        let s = PortStats::default();
        assert_eq!(s.last_spoofed_source(), None);
        s.note_spoofed_source([0; 6]);
        assert_eq!(s.last_spoofed_source(), Some([0; 6]));
        s.note_spoofed_source([0x02, 0, 0, 0, 0, 0x99]);
        assert_eq!(s.last_spoofed_source(), Some([0x02, 0, 0, 0, 0, 0x99]));
        s.note_spoofed_source([0xff; 6]);
        assert_eq!(s.last_spoofed_source(), Some([0xff; 6]));
    }

    #[test]
    fn drop_names_unique_and_indexed() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DropReason::ALL.len());
    }

    #[test]
    fn counters_accumulate() {
        let s = PortStats::default();
        s.add_rx(0, 2, 128);
        s.add_drop(DropReason::Oversize, 1);
        let snap = s.snapshot();
        assert_eq!((snap.rx_packets, snap.rx_bytes), (2, 128));
        assert_eq!(snap.drops(DropReason::Oversize), 1);
        assert_eq!(snap.total_drops(), 1);
    }
}

//! Live migration support on the backend side: the dirty log, and what the port reports about
//! migrations.
//!
//! While QEMU migrates a VM it must know every guest page that changes, including the pages
//! vmq writes (RX frame buffers, used ring entries, the used index). It hands vmq a shared
//! bitmap (SET_LOG_BASE, with VHOST_USER_PROTOCOL_F_LOG_SHMFD), one bit per 4 KiB page of guest
//! physical address, and switches logging on and off with VHOST_F_LOG_ALL in SET_FEATURES.
//! The log is installed into every ring under the ring's lock ([`crate::Vring::dirty_log`]),
//! so a worker's batch either logs all its writes or runs wholly before logging began; a worker
//! that does not log pays one branch per batch and one per RX frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vmq_sys::shared_bitmap::{SharedBitmap, SharedBitmapError};

/// Page size of the dirty log (fixed by the vhost protocol, whatever the host's page size).
pub const LOG_PAGE_SIZE: u64 = 4096;
/// Largest log vmq maps: one bit per page of [`crate::limits::MAX_GUEST_MEMORY`].
pub const MAX_LOG_SIZE: u64 = crate::limits::MAX_GUEST_MEMORY / LOG_PAGE_SIZE / 8;

/// The frontend's dirty-page bitmap.
#[derive(Debug)]
pub struct DirtyLog {
    bitmap: SharedBitmap,
    /// Marks that fell beyond the bitmap (a log too small for the memory table: QEMU resizes
    /// the log before it grows the memory, so this stays 0).
    beyond: AtomicU64,
}

impl DirtyLog {
    pub fn map(file: &std::fs::File, offset: u64, size: u64) -> Result<DirtyLog, SharedBitmapError> {
        Ok(DirtyLog { bitmap: SharedBitmap::map(file, offset, size, MAX_LOG_SIZE)?, beyond: AtomicU64::new(0) })
    }

    /// Marks the pages of guest physical range `[gpa, gpa + len)` dirty. Call it after the
    /// write: QEMU may clear the bit and copy the page between a mark and a later write.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        // The guest-memory writes before this (plain copies) must not be reordered after the
        // mark, by the compiler or the CPU: QEMU copies the page as soon as it sees the bit.
        std::sync::atomic::fence(Ordering::Release);
        let first = gpa / LOG_PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_SIZE;
        let beyond = self.bitmap.set_range(first, last);
        if beyond != 0 {
            self.beyond.fetch_add(beyond, Ordering::Relaxed);
        }
    }

    /// Is the page holding `gpa` marked (tests)?
    pub fn is_dirty(&self, gpa: u64) -> bool {
        self.bitmap.get(gpa / LOG_PAGE_SIZE)
    }

    pub fn marks_beyond(&self) -> u64 {
        self.beyond.load(Ordering::Relaxed)
    }
}

/// Migration state and counters of one port, readable from any thread (`vmq ctl ports`,
/// metrics).
#[derive(Debug, Default)]
pub struct MigrationStatus {
    logging: AtomicBool,
    /// Times logging was switched on (a migration of this VM away from vmq began).
    log_starts: AtomicU64,
    /// Times the rings were handed back (GET_VRING_BASE) while logging: the VM's final stop
    /// on the source of a migration.
    migrated_out: AtomicU64,
    /// RARP announces injected for the VM (SEND_RARP).
    announces: AtomicU64,
    /// The next announce to inject, as a MAC in the low 48 bits with bit 63 set; 0: none.
    pending_announce: AtomicU64,
}

const ANNOUNCE_PENDING: u64 = 1 << 63;

impl MigrationStatus {
    pub fn logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }

    pub fn log_starts(&self) -> u64 {
        self.log_starts.load(Ordering::Relaxed)
    }

    pub fn migrated_out(&self) -> u64 {
        self.migrated_out.load(Ordering::Relaxed)
    }

    pub fn announces(&self) -> u64 {
        self.announces.load(Ordering::Relaxed)
    }

    pub(crate) fn set_logging(&self, on: bool) {
        if !self.logging.swap(on, Ordering::AcqRel) && on {
            self.log_starts.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_migrated_out(&self) {
        self.migrated_out.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_announce(&self, mac: vmq_wire::MacAddr) {
        let mut raw = [0u8; 8];
        raw[2..].copy_from_slice(&mac.0);
        self.pending_announce.store(u64::from_be_bytes(raw) | ANNOUNCE_PENDING, Ordering::Release);
    }

    /// Is an announce waiting (one load: the TX source asks once per batch)?
    pub fn announce_pending(&self) -> bool {
        self.pending_announce.load(Ordering::Relaxed) != 0
    }

    /// Takes the waiting announce, counting it.
    pub fn take_announce(&self) -> Option<vmq_wire::MacAddr> {
        let raw = self.pending_announce.swap(0, Ordering::AcqRel);
        if raw == 0 {
            return None;
        }
        self.announces.fetch_add(1, Ordering::Relaxed);
        let bytes = (raw & !ANNOUNCE_PENDING).to_be_bytes();
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&bytes[2..]);
        Some(vmq_wire::MacAddr(mac))
    }
}

/// The log each ring gets: the mapped log while VHOST_F_LOG_ALL is on, else none.
pub(crate) fn effective_log(log: &Option<Arc<DirtyLog>>, log_all: bool) -> Option<Arc<DirtyLog>> {
    if log_all { log.clone() } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_cover_every_page_touched() {
        let file = vmq_sys::memfd::create("log", 4096, 0).unwrap();
        let log = DirtyLog::map(&file, 0, 4096).unwrap();
        log.mark(4095, 2); // straddles pages 0 and 1
        assert!(log.is_dirty(0) && log.is_dirty(4096) && !log.is_dirty(8192));
        log.mark(10 * 4096 + 100, 0);
        assert!(!log.is_dirty(10 * 4096), "an empty write marks nothing");
        log.mark(20 * 4096, 3 * 4096);
        assert!(log.is_dirty(20 * 4096) && log.is_dirty(22 * 4096) && !log.is_dirty(23 * 4096));
        assert_eq!(log.marks_beyond(), 0);
        log.mark(4096 * 8 * 4096, 4096);
        assert_eq!(log.marks_beyond(), 1, "beyond the log: counted, not a crash");
        log.mark(u64::MAX - 10, 100);
    }

    #[test]
    fn an_announce_is_taken_once() {
        let s = MigrationStatus::default();
        assert!(!s.announce_pending());
        let mac = vmq_wire::MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        s.request_announce(mac);
        assert!(s.announce_pending());
        assert_eq!(s.take_announce(), Some(mac));
        assert_eq!(s.take_announce(), None);
        assert_eq!(s.announces(), 1);
        s.request_announce(vmq_wire::MacAddr([0; 6]));
        assert_eq!(s.take_announce(), Some(vmq_wire::MacAddr([0; 6])), "even a zero MAC is an announce");
    }
}

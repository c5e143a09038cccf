//! The warning when a port starts dropping `spoofed` frames: most often the VM's MAC in QEMU
//! (`mac=`) differs from the port's `mac`, and every frame it sends is dropped. The workers only
//! count the drop and store the offending source MAC; the rebalancer thread notices the counter
//! rising and logs, at most once per port per [`WARN_EVERY`], the MAC seen and the one configured.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Least time between two warnings about one port.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(60);

/// A warning to log: frames dropped since the last look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SpoofWarning {
    pub dropped: u64,
}

/// Per port: the `spoofed` counter at the last look and when it was last warned about. Ports
/// are keyed by their counters' address, which no other port has while this one exists (port
/// ids are reused at once).
#[derive(Debug, Default)]
pub(crate) struct SpoofWatch {
    ports: HashMap<usize, (u64, Option<Instant>)>,
}

impl SpoofWatch {
    /// The port's `spoofed` counter is `count` at `now`: a warning if it rose and the port was
    /// not warned about within [`WARN_EVERY`]. A port seen for the first time with drops
    /// already counted warns too.
    pub fn observe(&mut self, port: usize, count: u64, now: Instant) -> Option<SpoofWarning> {
        let (last, warned) = self.ports.entry(port).or_insert((0, None));
        let dropped = count.saturating_sub(*last);
        if dropped == 0 || warned.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            // Drops in the quiet period are reported with the next warning.
            return None;
        }
        *last = count;
        *warned = Some(now);
        Some(SpoofWarning { dropped })
    }

    /// Forgets ports no longer present (ids are reused).
    pub fn retain(&mut self, present: impl Fn(usize) -> bool) {
        self.ports.retain(|p, _| present(*p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_when_drops_start_then_at_most_once_a_period() {
        let mut w = SpoofWatch::default();
        let t0 = Instant::now();
        let p = 3;
        assert_eq!(w.observe(p, 0, t0), None, "no drops, no warning");
        assert_eq!(w.observe(p, 5, t0 + Duration::from_secs(1)), Some(SpoofWarning { dropped: 5 }));
        assert_eq!(w.observe(p, 50, t0 + Duration::from_secs(2)), None, "rate limited");
        assert_eq!(w.observe(p, 90, t0 + Duration::from_secs(59)), None);
        // The next warning counts everything since the last one.
        assert_eq!(w.observe(p, 95, t0 + Duration::from_secs(62)), Some(SpoofWarning { dropped: 90 }));
        assert_eq!(w.observe(p, 95, t0 + Duration::from_secs(200)), None, "stopped dropping: quiet");
        assert_eq!(w.observe(p, 96, t0 + Duration::from_secs(201)), Some(SpoofWarning { dropped: 1 }));
        // Another port is watched on its own.
        assert_eq!(w.observe(4, 1, t0 + Duration::from_secs(201)), Some(SpoofWarning { dropped: 1 }));
        w.retain(|p| p != 3);
        assert_eq!(
            w.observe(p, 2, t0 + Duration::from_secs(202)),
            Some(SpoofWarning { dropped: 2 }),
            "forgotten once gone"
        );
    }
}

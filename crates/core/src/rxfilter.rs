//! A guest's receive filter (what its virtio-net driver programmed: promiscuous mode, multicast
//! and unicast tables, VLAN table), as relayed from its VMM, and the port policy that decides
//! which of it vmq honours. Pure decisions; the data path applies the result to frames it would
//! deliver to the port.
//!
//! With vhost-user the VMM (QEMU) keeps the control virtqueue, so the guest's `CTRL_RX`,
//! `CTRL_MAC` and `CTRL_VLAN` commands land in QEMU's filter state; vmq reads it over QMP
//! (`query-rx-filter`) and hands it here. Until a filter has been relayed for a port, nothing
//! is filtered (the behaviour of ports without a relay).

use vmq_wire::MacAddr;

use crate::port::PortSpec;

/// How one class of addresses is received (QEMU's `RxState`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum RxMode {
    /// Only the addresses in the table.
    #[default]
    Normal,
    /// None of them.
    None,
    /// All of them.
    All,
}

impl RxMode {
    pub fn name(self) -> &'static str {
        match self {
            RxMode::Normal => "normal",
            RxMode::None => "none",
            RxMode::All => "all",
        }
    }
}

/// What the guest asked for, as its VMM reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestRxFilter {
    /// The guest's current MAC (QEMU's `main-mac`).
    pub main_mac: Option<MacAddr>,
    pub promiscuous: bool,
    /// Unicast besides the main MAC; `All` also when the table overflowed.
    pub unicast: RxMode,
    pub unicast_table: Vec<MacAddr>,
    /// `All` also when the table overflowed (all-multicast).
    pub multicast: RxMode,
    pub multicast_table: Vec<MacAddr>,
    /// `All`: the guest has no VLAN filtering (no CTRL_VLAN); `Normal`: only `vlan_table`.
    pub vlan: RxMode,
    pub vlan_table: Vec<u16>,
}

/// The filter vmq applies to frames toward a VM port: the guest's request narrowed by policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RxFilter {
    /// Every frame of the port's VLANs, unknown unicast to other MACs included.
    pub promiscuous: bool,
    /// The guest asked for promiscuous (or all-unicast) mode and the policy refused it.
    pub promiscuous_refused: bool,
    pub unicast_table: Vec<MacAddr>,
    pub multicast: RxMode,
    pub multicast_table: Vec<MacAddr>,
    /// `Some`: tagged frames pass only with one of these VLAN ids.
    pub vlans: Option<Vec<u16>>,
}

/// Narrows a guest's request to what the port allows: promiscuous (and all-unicast) mode only
/// with `allow_promiscuous`. Multicast and VLAN tables only narrow what the guest receives, so
/// they are taken as asked.
pub fn review_rx_filter(spec: &PortSpec, request: &GuestRxFilter) -> RxFilter {
    let wants_promiscuous = request.promiscuous || request.unicast == RxMode::All;
    let promiscuous = wants_promiscuous && spec.guest.allow_promiscuous;
    RxFilter {
        promiscuous,
        promiscuous_refused: wants_promiscuous && !promiscuous,
        unicast_table: if request.unicast == RxMode::None { Vec::new() } else { request.unicast_table.clone() },
        multicast: request.multicast,
        multicast_table: request.multicast_table.clone(),
        vlans: (request.vlan != RxMode::All).then(|| request.vlan_table.clone()),
    }
}

impl RxFilter {
    /// Does a frame to `dst`, leaving toward the guest with 802.1Q tag `tag` (None: untagged),
    /// pass? `own`: the port's MAC. Broadcast always passes.
    pub fn admits(&self, own: Option<MacAddr>, dst: MacAddr, tag: Option<u16>) -> bool {
        if let (Some(vid), Some(vlans)) = (tag, &self.vlans)
            && vid != 0
            && !vlans.contains(&vid)
        {
            return false;
        }
        if self.promiscuous || dst.0 == [0xff; 6] {
            return true;
        }
        if dst.is_multicast() {
            return match self.multicast {
                RxMode::All => true,
                RxMode::None => false,
                RxMode::Normal => self.multicast_table.contains(&dst),
            };
        }
        own == Some(dst) || self.unicast_table.contains(&dst)
    }

    /// Multicast addresses the guest listens to (`None` mode: 0).
    pub fn multicast_entries(&self) -> usize {
        match self.multicast {
            RxMode::None => 0,
            _ => self.multicast_table.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::{GuestPolicy, PortKind, VlanMode};
    use proptest::prelude::*;

    const OWN: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
    const OTHER: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 9]);
    const BCAST: MacAddr = MacAddr([0xff; 6]);
    const MCAST: MacAddr = MacAddr([0x01, 0, 0x5e, 0, 0, 0xfb]);

    fn vm(allow_promiscuous: bool) -> PortSpec {
        PortSpec {
            name: "vm".into(),
            kind: PortKind::VhostUser,
            mac: Some(OWN),
            mtu: 1500,
            vlan: VlanMode::Access(0),
            allow_mac_spoofing: false,
            max_learned_macs: crate::fdb::DEFAULT_MAX_LEARNED_MACS,
            guest: GuestPolicy { allow_mac_change: false, allow_promiscuous },
            offloads: Default::default(),
        }
    }

    #[test]
    fn promiscuous_only_where_allowed() {
        let req = GuestRxFilter { promiscuous: true, ..Default::default() };
        let refused = review_rx_filter(&vm(false), &req);
        assert!(!refused.promiscuous && refused.promiscuous_refused);
        assert!(!refused.admits(Some(OWN), OTHER, None), "unknown unicast stays out");
        let allowed = review_rx_filter(&vm(true), &req);
        assert!(allowed.promiscuous && !allowed.promiscuous_refused);
        assert!(allowed.admits(Some(OWN), OTHER, None));
        let all_unicast = GuestRxFilter { unicast: RxMode::All, ..Default::default() };
        assert!(review_rx_filter(&vm(false), &all_unicast).promiscuous_refused, "all-unicast is promiscuous");
    }

    #[test]
    fn multicast_by_mode_and_table_broadcast_always() {
        let mut req = GuestRxFilter { multicast: RxMode::Normal, multicast_table: vec![MCAST], ..Default::default() };
        let f = review_rx_filter(&vm(false), &req);
        assert!(f.admits(Some(OWN), MCAST, None));
        assert!(!f.admits(Some(OWN), MacAddr([0x01, 0, 0x5e, 0, 0, 1]), None));
        assert!(f.admits(Some(OWN), BCAST, None));
        assert_eq!(f.multicast_entries(), 1);
        req.multicast = RxMode::None;
        let f = review_rx_filter(&vm(false), &req);
        assert!(!f.admits(Some(OWN), MCAST, None) && f.admits(Some(OWN), BCAST, None));
        assert_eq!(f.multicast_entries(), 0);
        req.multicast = RxMode::All;
        assert!(review_rx_filter(&vm(false), &req).admits(Some(OWN), MacAddr([0x33, 0x33, 0, 0, 0, 1]), None));
    }

    #[test]
    fn vlan_table_filters_tagged_frames_only() {
        let req = GuestRxFilter { vlan: RxMode::Normal, vlan_table: vec![10], ..Default::default() };
        let f = review_rx_filter(&vm(false), &req);
        assert!(f.admits(Some(OWN), OWN, Some(10)));
        assert!(!f.admits(Some(OWN), OWN, Some(20)));
        assert!(!f.admits(Some(OWN), BCAST, Some(20)), "not even broadcast in a VLAN the guest left");
        assert!(f.admits(Some(OWN), OWN, None));
        let all = GuestRxFilter { vlan: RxMode::All, ..Default::default() };
        assert!(review_rx_filter(&vm(false), &all).admits(Some(OWN), OWN, Some(20)));
    }

    #[test]
    fn unicast_table_entries_pass_unless_unicast_none() {
        let mut req = GuestRxFilter { unicast_table: vec![OTHER], ..Default::default() };
        assert!(review_rx_filter(&vm(false), &req).admits(Some(OWN), OTHER, None));
        req.unicast = RxMode::None;
        assert!(!review_rx_filter(&vm(false), &req).admits(Some(OWN), OTHER, None));
    }

    proptest! {
        /// Whatever the guest asks for: its own MAC and broadcast always pass untagged, and a
        /// port that does not allow promiscuous mode never gets unicast for an address the guest
        /// did not list.
        #[test]
        fn policy_bounds_what_passes(
            promiscuous in any::<bool>(),
            unicast in 0u8..3,
            allow in any::<bool>(),
            dst in any::<[u8; 6]>(),
            table in proptest::collection::vec(any::<[u8; 6]>(), 0..4),
        ) {
            let mode = [RxMode::Normal, RxMode::None, RxMode::All][unicast as usize];
            let req = GuestRxFilter {
                promiscuous,
                unicast: mode,
                unicast_table: table.iter().map(|b| MacAddr(*b)).collect(),
                ..Default::default()
            };
            let f = review_rx_filter(&vm(allow), &req);
            prop_assert!(f.admits(Some(OWN), OWN, None));
            prop_assert!(f.admits(Some(OWN), BCAST, None));
            let dst = MacAddr(dst);
            if !allow && !dst.is_multicast() && dst != OWN && !req.unicast_table.contains(&dst) {
                prop_assert!(!f.admits(Some(OWN), dst, None));
            }
            prop_assert_eq!(f.promiscuous_refused, (promiscuous || mode == RxMode::All) && !allow);
        }
    }
}

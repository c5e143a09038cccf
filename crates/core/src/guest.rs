//! What a VM's guest may program on its own port (its MAC address), as policy: pure decisions,
//! applied by the data path.
//!
//! Where a guest's request comes from matters for what vmq can see. With QEMU (7.2 and later)
//! and every other vhost-user-net frontend in use (cloud-hypervisor, DPDK virtio-user), the
//! frontend emulates the virtio-net control virtqueue itself and never hands it to the backend
//! (QEMU starts a control queue only on vhost-vdpa). The guest's `MAC_ADDR_SET`, `CTRL_RX` and
//! `CTRL_VLAN` commands are acked by QEMU and land in QEMU's own receive-filter state
//! (`query-rx-filter`, `NIC_RX_FILTER_CHANGED`), not in vmq. A MAC change therefore reaches vmq
//! as a request from the management layer that relays QEMU's filter state (as libvirt does for
//! macvtap with `trustGuestRxFilters`), and this module decides it the same way whatever relays
//! it.

use vmq_wire::MacAddr;

use crate::port::PortSpec;

/// Why a guest's MAC change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MacChangeRefused {
    #[error("the port does not allow the guest to change its MAC (allow_mac_change = false)")]
    NotAllowed,
    #[error("only VM ports have a guest that can change its MAC")]
    NotAVmPort,
    #[error("{0} is not a unicast address (multicast, broadcast or all zeros)")]
    NotUnicast(MacAddr),
}

/// A unicast address a port can own: not multicast (which includes broadcast), not all zeros.
pub fn is_assignable_unicast(mac: MacAddr) -> bool {
    mac.0[0] & 1 == 0 && mac.0 != [0; 6]
}

/// Decides a guest's request to move its port to `requested`. `Ok(false)`: nothing to do (the
/// port has that MAC already, always accepted so a guest re-applying its address is not
/// counted as refused); `Ok(true)`: the port's MAC, static FDB entry and VM queue filter move.
pub fn review_mac_change(spec: &PortSpec, requested: MacAddr) -> Result<bool, MacChangeRefused> {
    if !spec.kind.is_vm() {
        return Err(MacChangeRefused::NotAVmPort);
    }
    if spec.mac == Some(requested) {
        return Ok(false);
    }
    if !is_assignable_unicast(requested) {
        return Err(MacChangeRefused::NotUnicast(requested));
    }
    if !spec.guest.allow_mac_change {
        return Err(MacChangeRefused::NotAllowed);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::{GuestPolicy, PortKind, VlanMode};
    use proptest::prelude::*;

    fn vm(allow: bool) -> PortSpec {
        PortSpec {
            name: "vm".into(),
            kind: PortKind::VhostUser,
            mac: Some(MacAddr([0x52, 0x54, 0, 0, 0, 1])),
            mtu: 1500,
            vlan: VlanMode::Access(0),
            allow_mac_spoofing: false,
            max_learned_macs: crate::fdb::DEFAULT_MAX_LEARNED_MACS,
            guest: GuestPolicy { allow_mac_change: allow, allow_promiscuous: false },
            offloads: Default::default(),
        }
    }

    const NEW: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 2]);

    #[test]
    fn refused_unless_allowed() {
        assert_eq!(review_mac_change(&vm(false), NEW), Err(MacChangeRefused::NotAllowed));
        assert_eq!(review_mac_change(&vm(true), NEW), Ok(true));
    }

    #[test]
    fn own_mac_is_a_no_op_even_when_not_allowed() {
        let spec = vm(false);
        assert_eq!(review_mac_change(&spec, spec.mac.unwrap()), Ok(false));
    }

    #[test]
    fn only_unicast_and_only_vm_ports() {
        for bad in [MacAddr([0xff; 6]), MacAddr([0x01, 0, 0x5e, 0, 0, 1]), MacAddr([0; 6])] {
            assert_eq!(review_mac_change(&vm(true), bad), Err(MacChangeRefused::NotUnicast(bad)));
        }
        let mut tap = vm(true);
        tap.kind = PortKind::Tap;
        assert_eq!(review_mac_change(&tap, NEW), Err(MacChangeRefused::NotAVmPort));
    }

    proptest! {
        /// Whatever the guest asks for: a port that does not allow changes never moves, and a
        /// port that does moves only to unicast addresses.
        #[test]
        fn decision_matches_policy(bytes in any::<[u8; 6]>(), allow in any::<bool>()) {
            let spec = vm(allow);
            let mac = MacAddr(bytes);
            match review_mac_change(&spec, mac) {
                Ok(true) => prop_assert!(allow && is_assignable_unicast(mac) && Some(mac) != spec.mac),
                Ok(false) => prop_assert_eq!(Some(mac), spec.mac),
                Err(MacChangeRefused::NotAllowed) => prop_assert!(!allow && is_assignable_unicast(mac)),
                Err(MacChangeRefused::NotUnicast(m)) => prop_assert!(m == mac && !is_assignable_unicast(mac)),
                Err(MacChangeRefused::NotAVmPort) => prop_assert!(false, "a VM port"),
            }
        }
    }
}

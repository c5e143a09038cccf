//! The RARP announce a virtual switch sends for a VM that just arrived by live migration (as
//! QEMU's `qemu_announce_self` and OVS-DPDK's SEND_RARP handling do): a broadcast reverse-ARP
//! "request" from the VM's MAC, so that every switch on the way learns the MAC's new port.
//! Nothing answers it; its only purpose is its source address.

use crate::MacAddr;

/// EtherType of (R)ARP.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// RARP "request reverse" opcode.
const OP_REQUEST_REVERSE: u16 = 3;
/// Length of the announce: Ethernet header, 28-byte ARP body, padded to the 60-byte minimum.
pub const ANNOUNCE_LEN: usize = 60;

/// The announce frame for `mac`: to broadcast, from `mac`, sender and target hardware address
/// `mac`, protocol addresses zero (the switch does not know the VM's IP address).
pub fn announce(mac: MacAddr) -> [u8; ANNOUNCE_LEN] {
    let mut f = [0u8; ANNOUNCE_LEN];
    f[0..6].copy_from_slice(&MacAddr::BROADCAST.0);
    f[6..12].copy_from_slice(&mac.0);
    f[12..14].copy_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f[16..18].copy_from_slice(&crate::ethernet::ETHERTYPE_IPV4.to_be_bytes()); // protocol: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&OP_REQUEST_REVERSE.to_be_bytes());
    f[22..28].copy_from_slice(&mac.0); // sender hardware address
    // 28..32 sender protocol address: 0.0.0.0
    f[32..38].copy_from_slice(&mac.0); // target hardware address
    // 38..42 target protocol address: 0.0.0.0; the rest is padding.
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announce_is_a_broadcast_rarp_from_the_mac() {
        let mac = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let f = announce(mac);
        let l2 = crate::parse_l2(&f).unwrap();
        assert_eq!(l2.dst, MacAddr::BROADCAST);
        assert_eq!(l2.src, mac);
        assert_eq!(l2.ethertype, ETHERTYPE_RARP);
        // Checked against the layout tcpdump decodes as "Reverse Request who-is 52:54:00:12:34:56".
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &mac.0);
        assert_eq!(&f[32..38], &mac.0);
        assert!(f[28..32].iter().chain(&f[38..]).all(|&b| b == 0));
    }
}

//! Helpers for the root-only tests: unique names, `ip` commands, frame builders.
#![allow(dead_code)]

use std::process::Command;
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;

/// True when the test can run (root, `ip` present); else the test is recorded as skipped (a
/// failure under `VMQ_REQUIRE_ALL=1`) and returns.
pub fn can_run() -> bool {
    vmq_testkit::skip::root_with_tools_or_skip(&vmq_testkit::skip::current_test(), &["ip"])
}

/// A name unique to this test and process: `vqs` + tag + pid.
pub fn unique(tag: &str) -> String {
    format!("vqs{tag}{}", std::process::id() % 100_000)
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Runs `ip -n NS ARGS`.
pub fn ip_in(ns: &str, args: &[&str]) {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all);
}

/// Writes `value` to a sysctl inside `ns`.
pub fn sysctl_in(ns: &str, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_string();
    vmq_sys::netns::run_in(ns, move || {
        // /proc/sys/net follows the namespace of the thread that opens it... for the opener's
        // network namespace: open from inside.
        std::fs::write(&path, &value)
    })
    .expect("netns")
    .unwrap_or_else(|e| panic!("sysctl {key}: {e}"));
}

pub fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

pub fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// An ARP request (Ethernet frame) from `src_mac`/`src_ip` for `target_ip`.
pub fn arp_request(src_mac: [u8; 6], src_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    arp(1, src_mac, src_ip, [0xff; 6], [0; 6], target_ip)
}

/// An ARP reply telling `dst` that `ip` is at `mac`.
pub fn arp_reply(mac: [u8; 6], ip: [u8; 4], dst_mac: [u8; 6], dst_ip: [u8; 4]) -> Vec<u8> {
    arp(2, mac, ip, dst_mac, dst_mac, dst_ip)
}

fn arp(op: u16, smac: [u8; 6], sip: [u8; 4], eth_dst: [u8; 6], tmac: [u8; 6], tip: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&smac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&smac);
    f.extend_from_slice(&sip);
    f.extend_from_slice(&tmac);
    f.extend_from_slice(&tip);
    f.resize(60, 0);
    f
}

/// (operation, sender MAC, sender IP, target IP) of an ARP frame.
pub type Arp = (u16, [u8; 6], [u8; 4], [u8; 4]);

pub fn parse_arp(f: &[u8]) -> Option<Arp> {
    if f.len() < 42 || f[12..14] != [0x08, 0x06] {
        return None;
    }
    let op = u16::from_be_bytes([f[20], f[21]]);
    Some((op, f[22..28].try_into().ok()?, f[28..32].try_into().ok()?, f[38..42].try_into().ok()?))
}

pub fn icmp_echo_request(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], id: u16, seq: u16) -> Vec<u8> {
    let payload = b"vmq-sys echo payload 0123456789";
    let b = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src, dst, 64).icmpv4_echo_request(id, seq);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build echo request");
    out
}

pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src, dst, 64).udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build udp");
    out
}

/// One's-complement sum of `data` (not folded into 16 bits).
pub fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// True if the IPv4 packet at `ip` (header + L4) has valid IPv4 and TCP/UDP/ICMP checksums.
pub fn ipv4_checksums_ok(ip: &[u8]) -> bool {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if fold(sum16(&ip[..ihl], 0)) != 0xffff {
        return false;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = &ip[ihl..total];
    match ip[9] {
        1 => fold(sum16(l4, 0)) == 0xffff,
        6 | 17 => {
            let mut pseudo = sum16(&ip[12..20], 0);
            pseudo += u32::from(ip[9]) + l4.len() as u32;
            fold(sum16(l4, pseudo)) == 0xffff
        }
        _ => true,
    }
}

/// A minimal TCP peer: answers a SYN with a SYN-ACK (MSS `mss`, no window scaling, no
/// timestamps) and never acknowledges data, so the kernel's sender sends its first window and
/// stops. Returns the SYN-ACK frame for the SYN `syn` (an Ethernet frame), or None if `syn` is
/// not a TCP SYN.
pub fn syn_ack_for(syn: &[u8], my_mac: [u8; 6], mss: u16) -> Option<Vec<u8>> {
    let p = etherparse::SlicedPacket::from_ethernet(syn).ok()?;
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { return None };
    let Some(etherparse::TransportSlice::Tcp(tcp)) = &p.transport else { return None };
    if !tcp.syn() || tcp.ack() {
        return None;
    }
    let peer_mac: [u8; 6] = syn[6..12].try_into().ok()?;
    let h = ip.header();
    let b = PacketBuilder::ethernet2(my_mac, peer_mac)
        .ipv4(h.destination(), h.source(), 64)
        .tcp(tcp.destination_port(), tcp.source_port(), 0x1000_0000, 65535)
        .syn()
        .ack(tcp.sequence_number().wrapping_add(1))
        .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(mss)])
        .ok()?;
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).ok()?;
    Some(out)
}

/// TCP payload length of an IPv4/TCP frame (from the IP total length), or None.
pub fn tcp_payload_len(f: &[u8]) -> Option<usize> {
    if f.len() < 14 + 20 + 20 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 6 {
        return None;
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let thl = usize::from(ip[ihl + 12] >> 4) * 4;
    Some(total.saturating_sub(ihl + thl))
}

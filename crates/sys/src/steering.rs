//! Classic-BPF programs for AF_PACKET (pure logic, no I/O).
//!
//! [`fanout_program`] is the in-kernel VMQ steering: the `PACKET_FANOUT_CBPF` program of an
//! uplink's fanout group returns, for each received frame, the index of the group member (the
//! queue) that gets it: the index of the filter matching the frame's destination MAC and VLAN,
//! else 0 (the default queue). Where it runs (`packet_rcv_fanout`), `skb->data` is at the network
//! header, so the MAC is read relative to the link-layer header (`SKF_LL_OFF`); the VLAN tag is
//! no longer in the frame (the stack moved it into skb metadata before any packet tap sees the
//! frame) and comes from the ancillary loads `SKF_AD_VLAN_TAG_PRESENT` / `SKF_AD_VLAN_TAG`.
//! The kernel takes the return value modulo the number of members.
//!
//! [`drop_outgoing`] is the per-socket filter that keeps frames the host itself sends on the
//! uplink (`PACKET_OUTGOING`) away from vmq.

use libc::sock_filter;

/// The kernel's limit on classic-BPF program length (BPF_MAXINSNS).
pub const MAX_INSNS: usize = 4096;

const LL_OFF: u32 = libc::SKF_LL_OFF as u32;
const AD_OFF: u32 = libc::SKF_AD_OFF as u32;
const PROLOGUE: usize = 11;
const PER_FILTER: usize = 5;
const EPILOGUE: usize = 1;

/// Most filters one program can hold.
pub const MAX_FILTERS: usize = (MAX_INSNS - PROLOGUE - EPILOGUE) / PER_FILTER;

/// One steering rule: frames to `mac` on `vlan` (None or 0: untagged) go to member `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteeringRule {
    pub mac: [u8; 6],
    pub vlan: Option<u16>,
    pub index: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SteeringError {
    #[error(
        "{filters} filters need a BPF program longer than the kernel's {MAX_INSNS} instructions (at most {MAX_FILTERS} filters)"
    )]
    TooManyFilters { filters: usize },
    #[error("VLAN {0} is outside 0..=4095")]
    InvalidVlan(u16),
}

const fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

const fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code: code as u16, jt, jf, k }
}

const LD_W_ABS: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
const LD_H_ABS: u32 = libc::BPF_LD | libc::BPF_H | libc::BPF_ABS;
const LD_MEM: u32 = libc::BPF_LD | libc::BPF_MEM;
const ST: u32 = libc::BPF_ST;
const JEQ_K: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
const RET_K: u32 = libc::BPF_RET | libc::BPF_K;
const AND_K: u32 = libc::BPF_ALU | libc::BPF_AND | libc::BPF_K;
const LSH_K: u32 = libc::BPF_ALU | libc::BPF_LSH | libc::BPF_K;
const OR_X: u32 = libc::BPF_ALU | libc::BPF_OR | libc::BPF_X;
const TAX: u32 = libc::BPF_MISC | libc::BPF_TAX;

/// Builds the fanout program for `rules`. The first rule matching a frame wins; frames no rule
/// matches go to member 0. A VLAN id of 0 (a priority tag) counts as untagged.
pub fn fanout_program(rules: &[SteeringRule]) -> Result<Vec<sock_filter>, SteeringError> {
    if rules.len() > MAX_FILTERS {
        return Err(SteeringError::TooManyFilters { filters: rules.len() });
    }
    if rules.is_empty() {
        return Ok(vec![stmt(RET_K, 0)]);
    }
    let mut p = Vec::with_capacity(PROLOGUE + PER_FILTER * rules.len() + EPILOGUE);
    // M[1] = dst MAC bytes 4..6 << 16 | VLAN id (0: untagged); M[0] = A = dst MAC bytes 0..4.
    p.push(stmt(LD_W_ABS, AD_OFF + libc::SKF_AD_VLAN_TAG_PRESENT as u32));
    p.push(jump(JEQ_K, 0, 2, 0)); // untagged: A is already 0
    p.push(stmt(LD_W_ABS, AD_OFF + libc::SKF_AD_VLAN_TAG as u32));
    p.push(stmt(AND_K, 0x0fff)); // the TCI also carries priority and DEI
    p.push(stmt(TAX, 0));
    p.push(stmt(LD_H_ABS, LL_OFF + 4));
    p.push(stmt(LSH_K, 16));
    p.push(stmt(OR_X, 0));
    p.push(stmt(ST, 1));
    p.push(stmt(LD_W_ABS, LL_OFF));
    p.push(stmt(ST, 0));
    debug_assert_eq!(p.len(), PROLOGUE);
    for r in rules {
        let vlan = r.vlan.unwrap_or(0);
        if vlan > 0x0fff {
            return Err(SteeringError::InvalidVlan(vlan));
        }
        let hi = u32::from_be_bytes([r.mac[0], r.mac[1], r.mac[2], r.mac[3]]);
        let lo = (u32::from(u16::from_be_bytes([r.mac[4], r.mac[5]])) << 16) | u32::from(vlan);
        // A holds M[0] on entry (from the prologue, the previous rule's first miss, or its reload).
        p.push(jump(JEQ_K, hi, 0, 4)); // miss: A still holds M[0], on to the next rule
        p.push(stmt(LD_MEM, 1));
        p.push(jump(JEQ_K, lo, 0, 1));
        p.push(stmt(RET_K, r.index));
        p.push(stmt(LD_MEM, 0));
    }
    p.push(stmt(RET_K, 0));
    Ok(p)
}

/// Socket filter: drop frames the host sends (`PACKET_OUTGOING`), keep everything else whole.
pub fn drop_outgoing() -> Vec<sock_filter> {
    vec![
        stmt(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, AD_OFF + libc::SKF_AD_PKTTYPE as u32),
        jump(JEQ_K, u32::from(libc::PACKET_OUTGOING), 0, 1),
        stmt(RET_K, 0),
        stmt(RET_K, u32::MAX),
    ]
}

/// Socket filter: drop everything (while a socket is being set up).
pub fn drop_all() -> Vec<sock_filter> {
    vec![stmt(RET_K, 0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metadata and bytes a classic-BPF program sees in the fanout hook.
    struct Skb<'a> {
        /// From the link-layer header on (the untagged frame).
        frame: &'a [u8],
        vlan_tci: Option<u16>,
        pkttype: u8,
    }

    /// A small interpreter for the instructions these programs use, following the kernel's
    /// semantics for them (loads outside the packet end the program with 0).
    fn run(prog: &[sock_filter], skb: &Skb) -> u32 {
        let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
        let mut pc = 0usize;
        let load = |k: u32, size: usize| -> Option<u32> {
            if k >= AD_OFF {
                let anc = k - AD_OFF;
                return Some(match anc {
                    a if a == libc::SKF_AD_VLAN_TAG_PRESENT as u32 => skb.vlan_tci.is_some() as u32,
                    a if a == libc::SKF_AD_VLAN_TAG as u32 => u32::from(skb.vlan_tci.unwrap_or(0)),
                    a if a == libc::SKF_AD_PKTTYPE as u32 => u32::from(skb.pkttype),
                    _ => panic!("ancillary load {anc} not modelled"),
                });
            }
            assert!(k >= LL_OFF, "only SKF_LL_OFF-relative loads are valid in the fanout hook");
            let off = (k - LL_OFF) as usize;
            let b = skb.frame.get(off..off + size)?;
            Some(b.iter().fold(0u32, |acc, &v| (acc << 8) | u32::from(v)))
        };
        for _ in 0..MAX_INSNS {
            let i = prog[pc];
            pc += 1;
            match u32::from(i.code) {
                LD_W_ABS => match load(i.k, 4) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_H_ABS => match load(i.k, 2) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c == libc::BPF_LD | libc::BPF_B | libc::BPF_ABS => match load(i.k, 1) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_MEM => a = mem[i.k as usize],
                ST => mem[i.k as usize] = a,
                TAX => x = a,
                AND_K => a &= i.k,
                LSH_K => a <<= i.k,
                OR_X => a |= x,
                JEQ_K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                RET_K => return i.k,
                c => panic!("opcode {c:#x} not modelled"),
            }
        }
        panic!("program did not return");
    }

    fn frame(dst: [u8; 6]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        f.extend_from_slice(&[0x45; 40]);
        f
    }

    fn mac(n: u8) -> [u8; 6] {
        [0x52, 0x54, 0, 0x12, 0x34, n]
    }

    fn steer(prog: &[sock_filter], dst: [u8; 6], vlan_tci: Option<u16>) -> u32 {
        run(prog, &Skb { frame: &frame(dst), vlan_tci, pkttype: 0 })
    }

    #[test]
    fn empty_program_sends_everything_to_the_default_queue() {
        let p = fanout_program(&[]).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(steer(&p, mac(1), None), 0);
    }

    #[test]
    fn steers_by_mac_and_vlan() {
        let rules = [
            SteeringRule { mac: mac(1), vlan: None, index: 1 },
            SteeringRule { mac: mac(2), vlan: Some(10), index: 2 },
            SteeringRule { mac: mac(3), vlan: Some(4095), index: 7 },
            SteeringRule { mac: [0xff; 6], vlan: Some(20), index: 3 },
        ];
        let p = fanout_program(&rules).unwrap();
        assert_eq!(p.len(), PROLOGUE + PER_FILTER * rules.len() + EPILOGUE);
        assert_eq!(steer(&p, mac(1), None), 1);
        assert_eq!(steer(&p, mac(1), Some(0)), 1, "a priority tag (VID 0) is untagged");
        assert_eq!(steer(&p, mac(1), Some(0xe000)), 1, "priority bits are ignored");
        assert_eq!(steer(&p, mac(1), Some(10)), 0, "right MAC, wrong VLAN");
        assert_eq!(steer(&p, mac(2), Some(10)), 2);
        assert_eq!(steer(&p, mac(2), Some(0x300a)), 2, "PCP/DEI bits are masked");
        assert_eq!(steer(&p, mac(2), None), 0);
        assert_eq!(steer(&p, mac(2), Some(11)), 0);
        assert_eq!(steer(&p, mac(3), Some(4095)), 7);
        assert_eq!(steer(&p, [0xff; 6], Some(20)), 3);
        assert_eq!(steer(&p, mac(4), None), 0);
        // Differences only in the last two bytes, or only in the first four, do not match.
        assert_eq!(steer(&p, [0x52, 0x54, 0, 0x12, 0x35, 1], None), 0);
        assert_eq!(steer(&p, [0x53, 0x54, 0, 0x12, 0x34, 1], None), 0);
        // A frame too short to hold a MAC ends the program with 0: the default queue.
        assert_eq!(run(&p, &Skb { frame: &[0x52, 0x54], vlan_tci: None, pkttype: 0 }), 0);
    }

    #[test]
    fn first_rule_wins() {
        let rules =
            [SteeringRule { mac: mac(1), vlan: None, index: 2 }, SteeringRule { mac: mac(1), vlan: None, index: 5 }];
        let p = fanout_program(&rules).unwrap();
        assert_eq!(steer(&p, mac(1), None), 2);
    }

    #[test]
    fn jumps_stay_inside_the_program() {
        let rules: Vec<_> = (0..MAX_FILTERS)
            .map(|i| SteeringRule { mac: mac(i as u8), vlan: Some((i % 4096) as u16), index: 1 })
            .collect();
        let p = fanout_program(&rules).unwrap();
        assert!(p.len() <= MAX_INSNS);
        for (pc, i) in p.iter().enumerate() {
            if u32::from(i.code) & 0x07 == libc::BPF_JMP {
                assert!(pc + 1 + usize::from(i.jt.max(i.jf)) < p.len(), "jump out of the program at {pc}");
            }
        }
        assert_eq!(u32::from(p[p.len() - 1].code), RET_K, "the program ends with a return");
        // The last rule is still reachable.
        let last = rules[MAX_FILTERS - 1];
        assert_eq!(steer(&p, last.mac, last.vlan), 1);
    }

    #[test]
    fn limits_are_clear_errors() {
        let rule = SteeringRule { mac: mac(1), vlan: None, index: 1 };
        let too_many = vec![rule; MAX_FILTERS + 1];
        let e = fanout_program(&too_many).unwrap_err();
        assert_eq!(e, SteeringError::TooManyFilters { filters: MAX_FILTERS + 1 });
        assert!(e.to_string().contains("4096"));
        let e = fanout_program(&[SteeringRule { vlan: Some(4096), ..rule }]).unwrap_err();
        assert_eq!(e, SteeringError::InvalidVlan(4096));
    }

    #[test]
    fn outgoing_filter_drops_only_outgoing() {
        let f = frame(mac(1));
        let p = drop_outgoing();
        for pkttype in [libc::PACKET_HOST, libc::PACKET_BROADCAST, libc::PACKET_MULTICAST, libc::PACKET_OTHERHOST] {
            assert_eq!(run(&p, &Skb { frame: &f, vlan_tci: None, pkttype }), u32::MAX);
        }
        assert_eq!(run(&p, &Skb { frame: &f, vlan_tci: None, pkttype: libc::PACKET_OUTGOING }), 0);
        assert_eq!(run(&drop_all(), &Skb { frame: &f, vlan_tci: None, pkttype: 0 }), 0);
    }
}

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
//! Several queues may carry the same filter key (VMMQ: one VM with several queues). Such a
//! group shares the key's traffic by flow: [`flow_index`] picks the member from a hash of the
//! frame's addresses and ports, so each flow stays on one queue. The program computes the same
//! pick, reading the network header at absolute offset 0 and `skb->protocol` from
//! `SKF_AD_PROTOCOL`.
//!
//! [`drop_outgoing`] is the per-socket filter that keeps frames the host itself sends on the
//! uplink (`PACKET_OUTGOING`) away from vmq.

use libc::sock_filter;

/// The kernel's limit on classic-BPF program length (BPF_MAXINSNS).
pub const MAX_INSNS: usize = 4096;

/// Most queues that may share one filter key.
pub const MAX_GROUP_MEMBERS: usize = 16;

const LL_OFF: u32 = libc::SKF_LL_OFF as u32;
const AD_OFF: u32 = libc::SKF_AD_OFF as u32;
const PROLOGUE: usize = 11;
/// A key with one queue: match and return.
const PER_FILTER: usize = 5;
/// A key shared by queues: match, then jump to the shared flow hash.
const PER_GROUP_MATCH: usize = 6;
const EPILOGUE: usize = 1;
/// The shared flow hash, through the load of the group number that starts the dispatch.
const HASH_LEN: usize = 107;
const fn program_len(singles: usize, groups: usize, grouped_members: usize) -> usize {
    let mut len = PROLOGUE + PER_FILTER * singles + PER_GROUP_MATCH * groups + EPILOGUE;
    if groups > 0 {
        // Per group a dispatch block of 2n + 2: the test of the group number (the last group
        // needs none), load, modulo, n - 1 tests and n returns.
        len += HASH_LEN + 2 * grouped_members + 2 * groups - 1;
    }
    len
}

/// The longest program for `filters` rules: pairs of queues on a key cost the most per filter
/// (6 instructions each, a single key 5, a group of n 2 + 8/n), plus the shared hash.
const fn worst_program_len(filters: usize) -> usize {
    if filters < 2 { program_len(filters, 0, 0) } else { program_len(filters % 2, filters / 2, filters - filters % 2) }
}

const fn max_filters() -> usize {
    let mut n = 0;
    while worst_program_len(n + 1) <= MAX_INSNS {
        n += 1;
    }
    n
}

/// Filters that always fit in one program, whichever of them share keys. Filters on distinct
/// keys fit up to [`MAX_SINGLE_FILTERS`]; the real limit is the program's length.
pub const MAX_FILTERS: usize = max_filters();

/// Filters that fit in one program when no two share a key.
pub const MAX_SINGLE_FILTERS: usize = (MAX_INSNS - PROLOGUE - EPILOGUE) / PER_FILTER;

/// One steering rule: frames to `mac` on `vlan` (None or 0: untagged) go to member `index`.
/// Rules with the same MAC and VLAN form a group that shares the key's flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteeringRule {
    pub mac: [u8; 6],
    pub vlan: Option<u16>,
    pub index: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SteeringError {
    #[error(
        "{filters} filters need a BPF program longer than the kernel's {MAX_INSNS} instructions ({MAX_FILTERS} filters always fit, {MAX_SINGLE_FILTERS} when no two share a MAC and VLAN)"
    )]
    TooManyFilters { filters: usize },
    #[error("VLAN {0} is outside 0..=4095")]
    InvalidVlan(u16),
    #[error(
        "{members} queues share MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} VLAN {vlan}; at most {MAX_GROUP_MEMBERS} may",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )]
    GroupTooLarge { mac: [u8; 6], vlan: u16, members: usize },
}

const fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

const fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code: code as u16, jt, jf, k }
}

const LD_W_ABS: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
const LD_H_ABS: u32 = libc::BPF_LD | libc::BPF_H | libc::BPF_ABS;
const LD_B_ABS: u32 = libc::BPF_LD | libc::BPF_B | libc::BPF_ABS;
const LD_W_IND: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_IND;
const LD_LEN: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_LEN;
const LD_IMM: u32 = libc::BPF_LD | libc::BPF_IMM;
const LD_MEM: u32 = libc::BPF_LD | libc::BPF_MEM;
const LDX_IMM: u32 = libc::BPF_LDX | libc::BPF_IMM;
const LDX_MSH: u32 = libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH;
const ST: u32 = libc::BPF_ST;
const JA: u32 = libc::BPF_JMP | libc::BPF_JA;
const JEQ_K: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
const JGE_K: u32 = libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K;
const JGE_X: u32 = libc::BPF_JMP | libc::BPF_JGE | libc::BPF_X;
const JSET_K: u32 = libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K;
const RET_K: u32 = libc::BPF_RET | libc::BPF_K;
const AND_K: u32 = libc::BPF_ALU | libc::BPF_AND | libc::BPF_K;
const LSH_K: u32 = libc::BPF_ALU | libc::BPF_LSH | libc::BPF_K;
const RSH_K: u32 = libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K;
const SUB_K: u32 = libc::BPF_ALU | libc::BPF_SUB | libc::BPF_K;
const MUL_K: u32 = libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K;
const MOD_K: u32 = libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K;
const OR_X: u32 = libc::BPF_ALU | libc::BPF_OR | libc::BPF_X;
const XOR_X: u32 = libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X;
const TAX: u32 = libc::BPF_MISC | libc::BPF_TAX;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const HASH_MUL: u32 = 0x9e37_79b1;
const HASH_SHIFT: u32 = 16;

/// One step of the flow hash: fold in the big-endian word `w`.
fn mix(h: u32, w: u32) -> u32 {
    let a = (h ^ w).wrapping_mul(HASH_MUL);
    a ^ (a >> HASH_SHIFT)
}

/// The flow hash of a frame (from its network header) with L3 protocol `ethertype`:
/// IPv4 TCP/UDP: ports, source, destination; IPv4 fragments, other IPv4 protocols and IPv4
/// headers too short for the ports: source, destination; IPv6 TCP/UDP (no extension headers):
/// ports, then the 8 address words; anything else, and truncated headers: 0.
fn flow_hash(l3: &[u8], ethertype: u16) -> u32 {
    let word = |at: usize| l3.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    match ethertype {
        ETHERTYPE_IPV4 if l3.len() >= 20 => {
            let mut h = 0;
            let frag = u16::from_be_bytes([l3[6], l3[7]]) & 0x3fff;
            if frag == 0
                && matches!(l3[9], IPPROTO_TCP | IPPROTO_UDP)
                && let Some(ports) = word(usize::from(l3[0] & 0x0f) * 4)
            {
                h = mix(0, ports);
            }
            [12, 16].iter().fold(h, |h, &at| mix(h, word(at).unwrap_or(0)))
        }
        ETHERTYPE_IPV6 if l3.len() >= 44 && matches!(l3[6], IPPROTO_TCP | IPPROTO_UDP) => {
            (8..40).step_by(4).fold(mix(0, word(40).unwrap_or(0)), |h, at| mix(h, word(at).unwrap_or(0)))
        }
        _ => 0,
    }
}

/// Which of the `members` queues sharing a filter key gets a frame: the pick of
/// [`fanout_program`], for the frame `frame_from_l3` (from its network header) with L3
/// protocol `ethertype`. The same flow always gets the same pick; the fragments of an IPv4
/// datagram go together; frames that are neither IPv4 nor IPv6 TCP/UDP (ARP...) get 0, the
/// group's first (lowest) queue.
pub fn flow_index(frame_from_l3: &[u8], ethertype: u16, members: usize) -> usize {
    if members <= 1 {
        return 0;
    }
    (u64::from(flow_hash(frame_from_l3, ethertype)) % members as u64) as usize
}

/// Jump targets in [`hash_code`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    Next,
    V6,
    Ports4,
    Addr4,
    Addr4Mixed,
    Ports6,
    Zero,
    Done,
}

/// An instruction of [`hash_code`] before its jumps are resolved.
enum Asm {
    Op(sock_filter),
    Cond(u32, u32, Label, Label),
    Goto(Label),
    Here(Label),
}

/// The shared flow hash, entered (by jump) with the group number in A. It ends with the hash
/// in M[2] and the group number in A and M[3], for the groups' dispatch that follows.
fn hash_code() -> Vec<sock_filter> {
    use Asm::*;
    use Label::*;
    let op = |code, k| Op(stmt(code, k));
    // h = mix(h, word) with h in X (none yet when `first`); the result stays in A (and, with
    // `keep`, in X).
    let mix_word = |a: &mut Vec<Asm>, load: u32, k: u32, first: bool, keep: bool| {
        a.push(op(load, k));
        if !first {
            a.push(op(XOR_X, 0));
        }
        a.extend([op(MUL_K, HASH_MUL), op(TAX, 0), op(RSH_K, HASH_SHIFT), op(XOR_X, 0)]);
        if keep {
            a.push(op(TAX, 0));
        }
    };
    let mut a = vec![
        op(ST, 3),
        op(LD_H_ABS, AD_OFF + libc::SKF_AD_PROTOCOL as u32),
        Cond(JEQ_K, u32::from(ETHERTYPE_IPV6), V6, Next),
        Cond(JEQ_K, u32::from(ETHERTYPE_IPV4), Next, Zero),
        // IPv4: the fixed header must be there, the ports may be missing.
        op(LD_LEN, 0),
        Cond(JGE_K, 20, Next, Zero),
        op(LD_H_ABS, 6),
        Cond(JSET_K, 0x3fff, Addr4, Next), // a fragment: addresses only
        op(LD_B_ABS, 9),
        Cond(JEQ_K, u32::from(IPPROTO_TCP), Ports4, Next),
        Cond(JEQ_K, u32::from(IPPROTO_UDP), Next, Addr4),
        Here(Ports4),
        op(LDX_MSH, 0), // X = 4 * IHL
        op(LD_LEN, 0),
        op(SUB_K, 4),
        Cond(JGE_X, 0, Next, Addr4), // len - 4 >= 4 * IHL: the ports are there
    ];
    mix_word(&mut a, LD_W_IND, 0, true, true); // the ports, at X + 0

    a.push(Goto(Addr4Mixed));
    a.push(Here(Addr4));
    a.push(op(LDX_IMM, 0));
    a.push(Here(Addr4Mixed));
    mix_word(&mut a, LD_W_ABS, 12, false, true);
    mix_word(&mut a, LD_W_ABS, 16, false, false);
    a.push(Goto(Done));
    // IPv6 TCP/UDP without extension headers: the ports at [40], then the addresses.
    a.extend([
        Here(V6),
        op(LD_LEN, 0),
        Cond(JGE_K, 44, Next, Zero),
        op(LD_B_ABS, 6),
        Cond(JEQ_K, u32::from(IPPROTO_TCP), Ports6, Next),
        Cond(JEQ_K, u32::from(IPPROTO_UDP), Next, Zero),
        Here(Ports6),
    ]);
    mix_word(&mut a, LD_W_ABS, 40, true, true);
    for at in (8..40).step_by(4) {
        mix_word(&mut a, LD_W_ABS, at, false, at != 36);
    }
    a.push(Goto(Done));
    a.extend([Here(Zero), op(LD_IMM, 0), Here(Done), op(ST, 2), op(LD_MEM, 3)]);

    // Resolve the labels (`Next` is the next instruction).
    let mut at: Vec<(Label, usize)> = Vec::new();
    let mut pc = 0;
    for i in &a {
        match i {
            Here(l) => at.push((*l, pc)),
            _ => pc += 1,
        }
    }
    let target = |l: Label, pc: usize| -> usize {
        if l == Next {
            return 0;
        }
        let (_, to) = at.iter().find(|(m, _)| *m == l).expect("label placed");
        to.checked_sub(pc + 1).expect("forward jumps only")
    };
    let mut p = Vec::with_capacity(HASH_LEN);
    for i in a {
        let pc = p.len();
        match i {
            Op(f) => p.push(f),
            Cond(code, k, jt, jf) => {
                let (jt, jf) = (target(jt, pc), target(jf, pc));
                p.push(jump(code, k, u8::try_from(jt).expect("short jump"), u8::try_from(jf).expect("short jump")));
            }
            Goto(l) => p.push(stmt(JA, target(l, pc) as u32)),
            Here(_) => {}
        }
    }
    p
}

/// The queues of one filter key, ascending.
struct Group {
    hi: u32,
    lo: u32,
    members: Vec<u32>,
}

/// Builds the fanout program for `rules`. Rules with the same MAC and VLAN form a group whose
/// members (ascending queue order) share the key's frames by [`flow_index`]; between keys, the
/// first matching rule wins. Frames no rule matches go to member 0. A VLAN id of 0 (a priority
/// tag) counts as untagged.
///
/// Layout: a prologue that loads the key (11 instructions); per key with one queue, 5
/// instructions (match, return); per shared key, 6 (match, jump to the hash with the group
/// number); a return of 0; then, with any shared key, the flow hash once ([`HASH_LEN`]) and per
/// group a dispatch block of 2 × members + 2 instructions (`hash % members`, then the member).
pub fn fanout_program(rules: &[SteeringRule]) -> Result<Vec<sock_filter>, SteeringError> {
    let mut groups: Vec<Group> = Vec::new();
    let mut by_key = std::collections::HashMap::new();
    for r in rules {
        let vlan = r.vlan.unwrap_or(0);
        if vlan > 0x0fff {
            return Err(SteeringError::InvalidVlan(vlan));
        }
        let hi = u32::from_be_bytes([r.mac[0], r.mac[1], r.mac[2], r.mac[3]]);
        let lo = (u32::from(u16::from_be_bytes([r.mac[4], r.mac[5]])) << 16) | u32::from(vlan);
        let g = *by_key.entry((hi, lo)).or_insert_with(|| {
            groups.push(Group { hi, lo, members: Vec::new() });
            groups.len() - 1
        });
        groups[g].members.push(r.index);
    }
    let (mut singles, mut shared, mut grouped_members) = (0, 0, 0);
    for g in &mut groups {
        g.members.sort_unstable();
        g.members.dedup();
        let n = g.members.len();
        if n > MAX_GROUP_MEMBERS {
            let [a, b, c, d] = g.hi.to_be_bytes();
            let [e, f, ..] = g.lo.to_be_bytes();
            return Err(SteeringError::GroupTooLarge {
                mac: [a, b, c, d, e, f],
                vlan: (g.lo & 0x0fff) as u16,
                members: n,
            });
        }
        if n == 1 {
            singles += 1;
        } else {
            shared += 1;
            grouped_members += n;
        }
    }
    let len = program_len(singles, shared, grouped_members);
    if len > MAX_INSNS {
        return Err(SteeringError::TooManyFilters { filters: rules.len() });
    }
    if groups.is_empty() {
        return Ok(vec![stmt(RET_K, 0)]);
    }
    let mut p = Vec::with_capacity(len);
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
    let hash_at = PROLOGUE + PER_FILTER * singles + PER_GROUP_MATCH * shared + EPILOGUE;
    let mut group_no = 0u32;
    for g in &groups {
        // A holds M[0] on entry (from the prologue, the previous rule's first miss, or its reload).
        if let [index] = g.members[..] {
            p.push(jump(JEQ_K, g.hi, 0, 4)); // miss: A still holds M[0], on to the next rule
            p.push(stmt(LD_MEM, 1));
            p.push(jump(JEQ_K, g.lo, 0, 1));
            p.push(stmt(RET_K, index));
            p.push(stmt(LD_MEM, 0));
        } else {
            p.push(jump(JEQ_K, g.hi, 0, 5));
            p.push(stmt(LD_MEM, 1));
            p.push(jump(JEQ_K, g.lo, 0, 2));
            p.push(stmt(LD_IMM, group_no));
            p.push(stmt(JA, (hash_at - (p.len() + 1)) as u32));
            p.push(stmt(LD_MEM, 0));
            group_no += 1;
        }
    }
    p.push(stmt(RET_K, 0));
    debug_assert_eq!(p.len(), hash_at);
    if shared == 0 {
        return Ok(p);
    }
    let hash = hash_code();
    debug_assert_eq!(hash.len(), HASH_LEN);
    p.extend(hash);
    // Dispatch on the group number in A; the hash is in M[2].
    for (group_no, g) in groups.iter().filter(|g| g.members.len() > 1).enumerate() {
        let n = g.members.len();
        if group_no + 1 < shared {
            // Skip this group's block (2n + 1 <= 33 instructions) when the number differs.
            p.push(jump(JEQ_K, group_no as u32, 0, (2 * n + 1) as u8));
        }
        p.push(stmt(LD_MEM, 2));
        p.push(stmt(MOD_K, n as u32));
        for (pick, &index) in g.members[..n - 1].iter().enumerate() {
            p.push(jump(JEQ_K, pick as u32, 0, 1));
            p.push(stmt(RET_K, index));
        }
        p.push(stmt(RET_K, g.members[n - 1]));
    }
    debug_assert_eq!(p.len(), len);
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
    use proptest::prelude::*;

    /// The metadata and bytes a classic-BPF program sees in the fanout hook.
    struct Skb<'a> {
        /// From the link-layer header on (the untagged frame).
        frame: &'a [u8],
        /// Where the network header starts in `frame`: `skb->data` in the fanout hook.
        l3: usize,
        /// `skb->protocol`, as `SKF_AD_PROTOCOL` reports it (the ethertype).
        protocol: u16,
        vlan_tci: Option<u16>,
        pkttype: u8,
    }

    impl<'a> Skb<'a> {
        /// An Ethernet frame as the stack hands it to the fanout hook: the network header after
        /// the 14-byte MAC header, the protocol from its ethertype.
        fn eth(frame: &'a [u8], vlan_tci: Option<u16>) -> Skb<'a> {
            let protocol = frame.get(12..14).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            Skb { frame, l3: frame.len().min(14), protocol, vlan_tci, pkttype: 0 }
        }
    }

    /// A classic-BPF interpreter following the kernel's semantics for the instructions it
    /// knows: loads outside the packet, and division or modulo by zero, end the program with 0.
    fn run(prog: &[sock_filter], skb: &Skb) -> u32 {
        let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
        let mut pc = 0usize;
        let net = &skb.frame[skb.l3..];
        let net_off = libc::SKF_NET_OFF as u32;
        let load = |k: u32, size: usize| -> Option<u32> {
            if k >= AD_OFF {
                let anc = k - AD_OFF;
                return Some(match anc {
                    a if a == libc::SKF_AD_VLAN_TAG_PRESENT as u32 => skb.vlan_tci.is_some() as u32,
                    a if a == libc::SKF_AD_VLAN_TAG as u32 => u32::from(skb.vlan_tci.unwrap_or(0)),
                    a if a == libc::SKF_AD_PKTTYPE as u32 => u32::from(skb.pkttype),
                    a if a == libc::SKF_AD_PROTOCOL as u32 => u32::from(skb.protocol),
                    _ => panic!("ancillary load {anc} not modelled"),
                });
            }
            let bytes = if k >= net_off {
                net.get((k - net_off) as usize..)?.get(..size)?
            } else if k >= LL_OFF {
                skb.frame.get((k - LL_OFF) as usize..)?.get(..size)?
            } else if (k as i32) < 0 {
                return None;
            } else {
                net.get(k as usize..)?.get(..size)?
            };
            Some(bytes.iter().fold(0u32, |acc, &v| (acc << 8) | u32::from(v)))
        };
        for _ in 0..MAX_INSNS {
            let i = *prog.get(pc).expect("the program counter stays inside the program");
            pc += 1;
            let code = u32::from(i.code);
            let src = if code & libc::BPF_X != 0 { x } else { i.k };
            let size = match code & 0x18 {
                libc::BPF_W => 4,
                libc::BPF_H => 2,
                _ => 1,
            };
            match code & 0x07 {
                libc::BPF_LD => {
                    a = match code & 0xe0 {
                        libc::BPF_ABS => match load(i.k, size) {
                            Some(v) => v,
                            None => return 0,
                        },
                        libc::BPF_IND => match load(x.wrapping_add(i.k), size) {
                            Some(v) => v,
                            None => return 0,
                        },
                        libc::BPF_MEM => mem[i.k as usize],
                        libc::BPF_IMM => i.k,
                        libc::BPF_LEN => net.len() as u32,
                        _ => panic!("opcode {code:#x} not modelled"),
                    }
                }
                libc::BPF_LDX => {
                    x = match code & 0xe0 {
                        libc::BPF_IMM => i.k,
                        libc::BPF_MEM => mem[i.k as usize],
                        libc::BPF_LEN => net.len() as u32,
                        libc::BPF_MSH => match load(i.k, 1) {
                            Some(v) => 4 * (v & 0x0f),
                            None => return 0,
                        },
                        _ => panic!("opcode {code:#x} not modelled"),
                    }
                }
                libc::BPF_ST => mem[i.k as usize] = a,
                libc::BPF_STX => mem[i.k as usize] = x,
                libc::BPF_ALU => {
                    a = match code & 0xf0 {
                        libc::BPF_ADD => a.wrapping_add(src),
                        libc::BPF_SUB => a.wrapping_sub(src),
                        libc::BPF_MUL => a.wrapping_mul(src),
                        libc::BPF_DIV | libc::BPF_MOD if src == 0 => return 0,
                        libc::BPF_DIV => a / src,
                        libc::BPF_MOD => a % src,
                        libc::BPF_OR => a | src,
                        libc::BPF_AND => a & src,
                        libc::BPF_XOR => a ^ src,
                        libc::BPF_LSH => a.checked_shl(src).unwrap_or(0),
                        libc::BPF_RSH => a.checked_shr(src).unwrap_or(0),
                        libc::BPF_NEG => a.wrapping_neg(),
                        _ => panic!("opcode {code:#x} not modelled"),
                    }
                }
                libc::BPF_JMP => {
                    let taken = match code & 0xf0 {
                        libc::BPF_JA => {
                            pc += i.k as usize;
                            continue;
                        }
                        libc::BPF_JEQ => a == src,
                        libc::BPF_JGT => a > src,
                        libc::BPF_JGE => a >= src,
                        libc::BPF_JSET => a & src != 0,
                        _ => panic!("opcode {code:#x} not modelled"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                libc::BPF_RET => {
                    return match code & 0x18 {
                        libc::BPF_K => i.k,
                        libc::BPF_A => a,
                        _ => panic!("opcode {code:#x} not modelled"),
                    };
                }
                libc::BPF_MISC => match code & 0xf8 {
                    libc::BPF_TAX => x = a,
                    libc::BPF_TXA => a = x,
                    _ => panic!("opcode {code:#x} not modelled"),
                },
                _ => unreachable!(),
            }
        }
        panic!("program did not return");
    }

    /// The checks the kernel makes before it takes a classic program (`bpf_check_classic`):
    /// length, jumps inside the program, a return at the end, no division by a constant 0, no
    /// shift by 32 or more, known ancillary loads, and no scratch word read before it is written
    /// on every path (`check_load_and_stores`).
    fn check_like_kernel(p: &[sock_filter]) {
        assert!(!p.is_empty() && p.len() <= MAX_INSNS, "length {}", p.len());
        assert_eq!(u32::from(p[p.len() - 1].code) & 0x07, libc::BPF_RET, "the program ends with a return");
        let mut masks = vec![u16::MAX; p.len()];
        let mut valid = 0u16;
        for (pc, i) in p.iter().enumerate() {
            let code = u32::from(i.code);
            valid &= masks[pc];
            let mem_k = || {
                assert!(i.k < 16, "scratch word {} at {pc}", i.k);
                1u16 << i.k
            };
            match code & 0x07 {
                libc::BPF_ST | libc::BPF_STX => valid |= mem_k(),
                libc::BPF_LD | libc::BPF_LDX if code & 0xe0 == libc::BPF_MEM => {
                    assert!(valid & mem_k() != 0, "M[{}] read at {pc} before it is written", i.k)
                }
                libc::BPF_LD if code & 0xe0 == libc::BPF_ABS && i.k >= AD_OFF => {
                    let anc = (i.k - AD_OFF) as i32;
                    assert!(
                        [
                            libc::SKF_AD_PROTOCOL,
                            libc::SKF_AD_PKTTYPE,
                            libc::SKF_AD_VLAN_TAG,
                            libc::SKF_AD_VLAN_TAG_PRESENT
                        ]
                        .contains(&anc),
                        "ancillary load {anc} at {pc}"
                    );
                }
                libc::BPF_ALU if code & libc::BPF_X == 0 => match code & 0xf0 {
                    libc::BPF_DIV | libc::BPF_MOD => assert_ne!(i.k, 0, "division by 0 at {pc}"),
                    libc::BPF_LSH | libc::BPF_RSH => assert!(i.k < 32, "shift by {} at {pc}", i.k),
                    _ => {}
                },
                libc::BPF_JMP => {
                    let targets = if code & 0xf0 == libc::BPF_JA {
                        vec![pc + 1 + i.k as usize]
                    } else {
                        vec![pc + 1 + usize::from(i.jt), pc + 1 + usize::from(i.jf)]
                    };
                    for t in targets {
                        assert!(t < p.len(), "jump out of the program at {pc}");
                        masks[t] &= valid;
                    }
                    valid = u16::MAX;
                }
                _ => {}
            }
        }
    }

    fn eth(dst: [u8; 6], ethertype: u16, l3: &[u8]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(l3);
        f
    }

    /// An IPv4 header (IHL 5) with flags/fragment offset `frag`, then `l4`.
    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0, 0, 64, proto, 0, 0];
        h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(l4);
        h
    }

    fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, l4: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0, 0, 0, next, 64];
        h[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(l4);
        h
    }

    /// A transport header (TCP-sized) with these ports.
    fn l4(sport: u16, dport: u16) -> Vec<u8> {
        let mut t = sport.to_be_bytes().to_vec();
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&[0x5a; 16]);
        t
    }

    fn arp() -> Vec<u8> {
        vec![0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2]
    }

    fn frame(dst: [u8; 6]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        f.extend_from_slice(&[0x45; 40]);
        f
    }

    fn mac(n: u16) -> [u8; 6] {
        let [a, b] = n.to_be_bytes();
        [0x52, 0x54, 0, 0x12, 0x34 ^ a, b]
    }

    fn rule(mac: [u8; 6], index: u32) -> SteeringRule {
        SteeringRule { mac, vlan: None, index }
    }

    fn steer(prog: &[sock_filter], dst: [u8; 6], vlan_tci: Option<u16>) -> u32 {
        run(prog, &Skb::eth(&frame(dst), vlan_tci))
    }

    fn steer_l3(prog: &[sock_filter], dst: [u8; 6], ethertype: u16, l3: &[u8]) -> u32 {
        run(prog, &Skb::eth(&eth(dst, ethertype, l3), None))
    }

    fn tcp4(n: u16) -> Vec<u8> {
        ipv4([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_TCP, 0x4000, &l4(40000 + n, 443))
    }

    fn tcp6(n: u16) -> Vec<u8> {
        let mut src = [0xfd; 16];
        src[15] = 1;
        ipv6(src, [0xfd; 16], IPPROTO_TCP, &l4(40000 + n, 443))
    }

    /// The indices the program gives 64 flows to `dst`, checking each flow keeps its index.
    fn spread(p: &[sock_filter], dst: [u8; 6], ethertype: u16, l3: fn(u16) -> Vec<u8>) -> Vec<u32> {
        (0..64)
            .map(|n| {
                let got = steer_l3(p, dst, ethertype, &l3(n));
                assert_eq!(steer_l3(p, dst, ethertype, &l3(n)), got, "flow {n} moved");
                got
            })
            .collect()
    }

    fn count(picks: &[u32], index: u32) -> usize {
        picks.iter().filter(|&&i| i == index).count()
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
        check_like_kernel(&p);
        assert_eq!(p.len(), PROLOGUE + PER_FILTER * rules.len() + EPILOGUE, "single keys keep the short form");
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
        assert_eq!(run(&p, &Skb::eth(&[0x52, 0x54], None)), 0);
        // Every flow of a single-queue key goes to its queue.
        assert!(spread(&p, mac(1), 0x0800, tcp4).iter().all(|&i| i == 1));
    }

    #[test]
    fn a_repeated_rule_is_one_queue() {
        let p = fanout_program(&[rule(mac(1), 2), rule(mac(1), 2)]).unwrap();
        assert_eq!(p.len(), PROLOGUE + PER_FILTER + EPILOGUE);
        assert_eq!(steer(&p, mac(1), None), 2);
    }

    #[test]
    fn queues_sharing_a_key_share_its_tcp_flows() {
        let p = fanout_program(&[rule(mac(1), 2), rule(mac(1), 5)]).unwrap();
        check_like_kernel(&p);
        assert_eq!(p.len(), program_len(0, 1, 2));
        let picks = spread(&p, mac(1), 0x0800, tcp4);
        assert_eq!(count(&picks, 2) + count(&picks, 5), 64, "{picks:?}");
        assert!(count(&picks, 2) >= 1 && count(&picks, 5) >= 1, "{picks:?}");
        // The payload does not move a flow.
        let mut l3 = tcp4(7);
        let before = steer_l3(&p, mac(1), 0x0800, &l3);
        l3.extend_from_slice(&[1, 2, 3]);
        assert_eq!(steer_l3(&p, mac(1), 0x0800, &l3), before);
        // Other MACs still go to the default queue.
        assert_eq!(steer_l3(&p, mac(2), 0x0800, &tcp4(1)), 0);
    }

    #[test]
    fn fragments_of_a_datagram_stay_together() {
        let p = fanout_program(&[rule(mac(1), 1), rule(mac(1), 2)]).unwrap();
        let mut seen = [0usize; 3];
        for n in 0..64u8 {
            let src = [10, 0, 1, n];
            let first = ipv4(src, [10, 0, 0, 2], IPPROTO_UDP, 0x2000, &l4(5000, 53)); // MF
            let middle = ipv4(src, [10, 0, 0, 2], IPPROTO_UDP, 0x2000 | 185, &[n; 40]); // MF + offset
            let last = ipv4(src, [10, 0, 0, 2], IPPROTO_UDP, 370, &[n.wrapping_mul(7); 40]);
            let i = steer_l3(&p, mac(1), 0x0800, &first);
            assert_eq!(steer_l3(&p, mac(1), 0x0800, &middle), i, "datagram {n}");
            assert_eq!(steer_l3(&p, mac(1), 0x0800, &last), i, "datagram {n}");
            seen[i as usize] += 1;
        }
        assert!(seen[1] >= 1 && seen[2] >= 1, "{seen:?}");
        // Non-TCP/UDP IPv4 (ICMP) hashes on the addresses too.
        let icmp = |n: u8| ipv4([10, 0, 1, n], [10, 0, 0, 2], 1, 0, &[8, 0, 0, 0, n, n]);
        let picks: Vec<u32> = (0..64).map(|n| steer_l3(&p, mac(1), 0x0800, &icmp(n))).collect();
        assert!(count(&picks, 1) >= 1 && count(&picks, 2) >= 1, "{picks:?}");
    }

    #[test]
    fn arp_and_other_protocols_go_to_the_first_queue_of_the_group() {
        let p = fanout_program(&[rule(mac(1), 6), rule(mac(1), 3), rule(mac(1), 4)]).unwrap();
        assert_eq!(steer_l3(&p, mac(1), 0x0806, &arp()), 3);
        // IPv6 without TCP/UDP right after the header (here ICMPv6), and other ethertypes.
        assert_eq!(steer_l3(&p, mac(1), 0x86dd, &ipv6([1; 16], [2; 16], 58, &[0; 8])), 3);
        assert_eq!(steer_l3(&p, mac(1), 0x88cc, &[0; 40]), 3);
    }

    #[test]
    fn ipv6_tcp_flows_spread() {
        let p = fanout_program(&[rule(mac(1), 1), rule(mac(1), 2)]).unwrap();
        let picks = spread(&p, mac(1), 0x86dd, tcp6);
        assert!(count(&picks, 1) >= 1 && count(&picks, 2) >= 1, "{picks:?}");
        assert_eq!(count(&picks, 1) + count(&picks, 2), 64);
    }

    #[test]
    fn a_group_of_three_uses_all_three() {
        let p = fanout_program(&[rule(mac(1), 3), rule(mac(1), 1), rule(mac(1), 2)]).unwrap();
        check_like_kernel(&p);
        let picks = spread(&p, mac(1), 0x0800, tcp4);
        for i in 1..=3 {
            assert!(count(&picks, i) >= 1, "queue {i}: {picks:?}");
        }
    }

    #[test]
    fn groups_and_single_keys_in_one_program() {
        let vlan10 = SteeringRule { mac: mac(4), vlan: Some(10), index: 6 };
        let rules = [
            rule(mac(1), 1),
            rule(mac(2), 2),
            rule(mac(1), 3),
            rule(mac(3), 4),
            rule(mac(2), 5),
            vlan10,
            SteeringRule { mac: mac(2), vlan: Some(10), index: 7 },
            SteeringRule { mac: mac(2), vlan: Some(0), index: 8 }, // untagged: joins mac(2)
        ];
        let p = fanout_program(&rules).unwrap();
        check_like_kernel(&p);
        assert_eq!(p.len(), program_len(3, 2, 5));
        let a = spread(&p, mac(1), 0x0800, tcp4);
        assert!(count(&a, 1) >= 1 && count(&a, 3) >= 1 && count(&a, 1) + count(&a, 3) == 64, "{a:?}");
        let b = spread(&p, mac(2), 0x86dd, tcp6);
        for i in [2, 5, 8] {
            assert!(count(&b, i) >= 1, "queue {i}: {b:?}");
        }
        assert!(spread(&p, mac(3), 0x0800, tcp4).iter().all(|&i| i == 4));
        assert_eq!(steer(&p, mac(4), Some(10)), 6);
        assert_eq!(steer(&p, mac(2), Some(10)), 7);
        assert_eq!(steer(&p, mac(4), None), 0);
        assert_eq!(steer(&p, mac(5), None), 0);
        assert_eq!(steer_l3(&p, mac(2), 0x0806, &arp()), 2);
    }

    /// The program's pick for a frame equals `members[flow_index(..)]`.
    fn assert_agrees(p: &[sock_filter], members: &[u32], dst: [u8; 6], frame: &[u8]) {
        let skb = Skb::eth(frame, None);
        let got = run(p, &skb);
        if frame.len() < 6 {
            assert_eq!(got, 0, "no MAC: the default queue");
            return;
        }
        let want = members[flow_index(&frame[skb.l3..], skb.protocol, members.len())];
        assert_eq!(got, want, "frame {frame:02x?} to {dst:02x?}");
    }

    #[test]
    fn truncated_frames_get_a_member_or_the_default_queue() {
        let members = [1, 4, 9];
        let rules: Vec<_> = members.iter().map(|&i| rule(mac(1), i)).chain([rule(mac(2), 2)]).collect();
        let p = fanout_program(&rules).unwrap();
        let mut long_ihl = tcp4(3);
        long_ihl[0] = 0x4f; // IHL 15: the ports would be at 60
        let frames = [
            eth(mac(1), 0x0800, &tcp4(1)),
            eth(mac(1), 0x0800, &long_ihl),
            eth(mac(1), 0x0800, &ipv4([1; 4], [2; 4], IPPROTO_UDP, 0x2000, &l4(1, 2))),
            eth(mac(1), 0x86dd, &tcp6(2)),
            eth(mac(1), 0x0806, &arp()),
        ];
        for f in &frames {
            for len in 0..=f.len() {
                assert_agrees(&p, &members, mac(1), &f[..len]);
                let mut other = f[..len].to_vec();
                if let Some(m) = other.get_mut(..6) {
                    m.copy_from_slice(&mac(2));
                }
                let got = run(&p, &Skb::eth(&other, None));
                assert!(got == 0 || (got == 2 && len >= 6), "{len}: {got}");
            }
        }
    }

    #[test]
    fn flow_index_of_no_group_is_0() {
        assert_eq!(flow_index(&tcp4(1), 0x0800, 0), 0);
        assert_eq!(flow_index(&tcp4(1), 0x0800, 1), 0);
        assert_eq!(flow_index(&arp(), 0x0806, 5), 0);
    }

    /// A frame with a random network header, biased towards IPv4/IPv6 TCP/UDP.
    fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
        let ethertype = prop_oneof![Just(0x0800u16), Just(0x86dd), Just(0x0806), any::<u16>()];
        let frag = prop_oneof![Just(0u16), Just(0x4000), Just(0x2000), Just(0x0001), any::<u16>()];
        let proto = prop_oneof![Just(6u8), Just(17), Just(1), any::<u8>()];
        (ethertype, 0u8..16, frag, proto, proptest::collection::vec(any::<u8>(), 0..96)).prop_map(
            |(ethertype, ihl, frag, proto, mut l3)| {
                if ethertype == 0x0800 && l3.len() >= 20 {
                    l3[0] = 0x40 | ihl;
                    l3[6..8].copy_from_slice(&frag.to_be_bytes());
                    l3[9] = proto;
                } else if ethertype == 0x86dd && l3.len() >= 8 {
                    l3[6] = proto;
                }
                eth(mac(1), ethertype, &l3)
            },
        )
    }

    proptest! {
        #[test]
        fn program_and_flow_index_agree(
            frame in arb_frame(),
            members in proptest::collection::btree_set(1u32..64, 2..=MAX_GROUP_MEMBERS),
        ) {
            let members: Vec<u32> = members.into_iter().collect();
            let mut rules: Vec<_> = members.iter().rev().map(|&i| rule(mac(1), i)).collect();
            rules.push(rule(mac(2), 70));
            let p = fanout_program(&rules).unwrap();
            assert_agrees(&p, &members, mac(1), &frame);
        }
    }

    #[test]
    fn jumps_stay_inside_the_program_at_the_maximum_size() {
        let pairs: Vec<_> = (0..MAX_FILTERS).map(|i| rule(mac(i as u16 / 2), i as u32 % 2 + 1)).collect();
        let singles: Vec<_> = (0..MAX_SINGLE_FILTERS).map(|i| rule(mac(i as u16), 1)).collect();
        let mut big_groups = Vec::new();
        for g in 0.. {
            let next: Vec<_> = (0..MAX_GROUP_MEMBERS).map(|i| rule(mac(g), i as u32 + 1)).collect();
            if program_len(0, g as usize + 1, (g as usize + 1) * MAX_GROUP_MEMBERS) > MAX_INSNS {
                break;
            }
            big_groups.extend(next);
        }
        for rules in [&pairs, &singles, &big_groups] {
            let p = fanout_program(rules).unwrap();
            check_like_kernel(&p);
            assert!(p.len() > MAX_INSNS - 40, "{} instructions: not near the limit", p.len());
            let last = rules[rules.len() - 1];
            let members: Vec<u32> = rules.iter().filter(|r| r.mac == last.mac).map(|r| r.index).collect();
            let picks: Vec<u32> = (0..1024).map(|n| steer_l3(&p, last.mac, 0x0800, &tcp4(n))).collect();
            for i in members {
                assert!(count(&picks, i) >= 1, "{} rules, queue {i}: {picks:?}", rules.len());
            }
            let first = rules[0];
            assert_ne!(steer(&p, first.mac, None), 0);
        }
    }

    #[test]
    fn limits_are_clear_errors() {
        assert_eq!((MAX_FILTERS, MAX_SINGLE_FILTERS), (663, 816));
        assert_eq!(hash_code().len(), HASH_LEN);
        // Pairs plus a single: the longest program for its number of filters.
        let worst: Vec<_> = (0..MAX_FILTERS + 1).map(|i| rule(mac(i as u16 / 2), i as u32 % 2 + 1)).collect();
        let e = fanout_program(&worst).unwrap_err();
        assert_eq!(e, SteeringError::TooManyFilters { filters: MAX_FILTERS + 1 });
        assert!(e.to_string().contains("4096"));
        let singles: Vec<_> = (0..=MAX_SINGLE_FILTERS).map(|i| rule(mac(i as u16), 1)).collect();
        let e = fanout_program(&singles).unwrap_err();
        assert_eq!(e, SteeringError::TooManyFilters { filters: MAX_SINGLE_FILTERS + 1 });
        let e = fanout_program(&[SteeringRule { vlan: Some(4096), ..rule(mac(1), 1) }]).unwrap_err();
        assert_eq!(e, SteeringError::InvalidVlan(4096));
        let group = |n: u32| -> Vec<_> { (1..=n).map(|i| SteeringRule { vlan: Some(5), ..rule(mac(1), i) }).collect() };
        let p = fanout_program(&group(MAX_GROUP_MEMBERS as u32)).unwrap();
        check_like_kernel(&p);
        let e = fanout_program(&group(MAX_GROUP_MEMBERS as u32 + 1)).unwrap_err();
        assert_eq!(e, SteeringError::GroupTooLarge { mac: mac(1), vlan: 5, members: 17 });
        assert!(e.to_string().contains("52:54:00:12:34:01 VLAN 5"), "{e}");
    }

    #[test]
    fn outgoing_filter_drops_only_outgoing() {
        let f = frame(mac(1));
        let p = drop_outgoing();
        check_like_kernel(&p);
        for pkttype in [libc::PACKET_HOST, libc::PACKET_BROADCAST, libc::PACKET_MULTICAST, libc::PACKET_OTHERHOST] {
            assert_eq!(run(&p, &Skb { pkttype, ..Skb::eth(&f, None) }), u32::MAX);
        }
        assert_eq!(run(&p, &Skb { pkttype: libc::PACKET_OUTGOING, ..Skb::eth(&f, None) }), 0);
        assert_eq!(run(&drop_all(), &Skb::eth(&f, None)), 0);
    }
}

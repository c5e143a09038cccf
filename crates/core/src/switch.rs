//! The software L2 switch: VLAN admission, MAC spoof guard, MTU policy, learning and forwarding
//! decisions. Serves the default queue in `vmq` mode and every frame in `switch` mode.
//!
//! `classify` takes `&self` so workers share one switch under a read lock; the rare writes
//! (learning a new or moved address) go through [`Switch::learn`] under the write lock.

use vmq_wire::MacAddr;
use vmq_wire::WireError;
use vmq_wire::ethernet::{HEADER_LEN, L2Info, TAGGED_HEADER_LEN, parse_l2};
use vmq_wire::vlan::TAG_LEN;

use crate::fdb::{DEFAULT_AGING_NS, DEFAULT_CAPACITY, Fdb, LearnOutcome};
use crate::port::{PortId, PortKind, PortSpec, VlanMode};
use crate::stats::DropReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchConfig {
    pub fdb_capacity: usize,
    pub fdb_aging_ns: u64,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig { fdb_capacity: DEFAULT_CAPACITY, fdb_aging_ns: DEFAULT_AGING_NS }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    Port(PortId),
    Flood,
}

/// A source address the switch could not learn read-only; apply with [`Switch::learn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnRequest {
    pub mac: MacAddr,
    pub vlan: u16,
    pub port: PortId,
    /// The port was at its learning limit when the frame was classified: the request will
    /// most likely be refused, so the caller may count it without taking the write lock (and
    /// take it now and then, so that the aging sweep can free places).
    pub at_limit: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Drop(DropReason),
    Forward { vlan: u16, dst: Dest, learn: Option<LearnRequest> },
}

/// How a frame's 802.1Q tag must change on its way out of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagEdit {
    Keep,
    Strip,
    Push(u16),
}

impl TagEdit {
    /// Frame length after the edit.
    pub fn len_after(self, len: usize) -> usize {
        match self {
            TagEdit::Keep => len,
            TagEdit::Strip => len.saturating_sub(TAG_LEN),
            TagEdit::Push(_) => len + TAG_LEN,
        }
    }
}

#[derive(Debug, Clone)]
struct PortState {
    spec: PortSpec,
    up: bool,
}

#[derive(Debug)]
pub struct Switch {
    ports: Vec<Option<PortState>>,
    fdb: Fdb,
}

/// Checks that a frame's L3 payload (frame minus L2 header) fits `mtu`. For a GSO frame the
/// size that goes on the wire is one segment: `segment_len` = headers + gso_size.
pub fn fits_mtu(frame_len: usize, l2_header_len: usize, segment_len: Option<usize>, mtu: u16) -> bool {
    let on_wire = segment_len.map_or(frame_len, |s| s.min(frame_len));
    on_wire.saturating_sub(l2_header_len) <= mtu as usize
}

/// Which VLAN an ingress frame belongs to on a port, or why it is refused.
pub fn admit_vlan(mode: &VlanMode, tag: Option<u16>) -> Result<u16, DropReason> {
    match (mode, tag) {
        // Priority-tagged frames (VID 0) count as untagged, as on Linux bridges.
        (VlanMode::Access(v), None | Some(0)) => Ok(*v),
        (VlanMode::Access(_), Some(_)) => Err(DropReason::Vlan),
        (VlanMode::Trunk { native, .. }, None | Some(0)) => native.ok_or(DropReason::Vlan),
        (VlanMode::Trunk { allowed, .. }, Some(v)) => {
            if allowed.contains(&v) {
                Ok(v)
            } else {
                Err(DropReason::Vlan)
            }
        }
    }
}

/// How the tag changes when a frame of `vlan` leaves a port in `mode`, or None if the port is
/// not in that VLAN.
pub fn egress_tag(mode: &VlanMode, vlan: u16, frame_tagged: bool) -> Option<TagEdit> {
    let untagged_out = match mode {
        VlanMode::Access(v) => {
            if *v != vlan {
                return None;
            }
            true
        }
        VlanMode::Trunk { allowed, native } => {
            if *native == Some(vlan) {
                true
            } else if allowed.contains(&vlan) {
                false
            } else {
                return None;
            }
        }
    };
    Some(match (untagged_out, frame_tagged) {
        (true, true) => TagEdit::Strip,
        (true, false) | (false, true) => TagEdit::Keep,
        (false, false) => TagEdit::Push(vlan),
    })
}

/// Spoof guard: a port with a configured MAC (VM and TAP ports) sends only from it.
pub fn source_allowed(spec: &PortSpec, src: MacAddr) -> bool {
    match (spec.kind, spec.mac) {
        (PortKind::Uplink, _) | (_, None) => true,
        (_, Some(own)) => spec.allow_mac_spoofing || own == src,
    }
}

impl Switch {
    pub fn new(cfg: SwitchConfig) -> Switch {
        Switch { ports: Vec::new(), fdb: Fdb::new(cfg.fdb_capacity, cfg.fdb_aging_ns) }
    }

    /// Adds a port (down until [`Switch::set_port_up`]); ids are dense and reused.
    pub fn add_port(&mut self, spec: PortSpec) -> PortId {
        let limit = spec.max_learned_macs;
        let state = Some(PortState { spec, up: false });
        let id = if let Some(i) = self.ports.iter().position(Option::is_none) {
            self.ports[i] = state;
            PortId(i as u16)
        } else {
            self.ports.push(state);
            PortId((self.ports.len() - 1) as u16)
        };
        self.fdb.set_port_limit(id, limit);
        id
    }

    pub fn remove_port(&mut self, port: PortId) {
        if let Some(slot) = self.ports.get_mut(port.0 as usize) {
            *slot = None;
        }
        self.fdb.remove_port(port);
    }

    pub fn port(&self, port: PortId) -> Option<&PortSpec> {
        self.state(port).map(|s| &s.spec)
    }

    fn state(&self, port: PortId) -> Option<&PortState> {
        self.ports.get(port.0 as usize).and_then(Option::as_ref)
    }

    pub fn is_up(&self, port: PortId) -> bool {
        self.state(port).is_some_and(|s| s.up)
    }

    pub fn set_port_up(&mut self, port: PortId, up: bool) {
        if let Some(Some(s)) = self.ports.get_mut(port.0 as usize) {
            s.up = up;
        }
        if !up {
            self.fdb.forget_learned(port);
        }
    }

    /// Replaces a port's configuration (MTU, VLAN, ...), keeping its id and state. Learned
    /// addresses are forgotten: they may belong to another VLAN now.
    pub fn update_port(&mut self, port: PortId, spec: PortSpec) -> bool {
        match self.ports.get_mut(port.0 as usize) {
            Some(Some(s)) => {
                self.fdb.set_port_limit(port, spec.max_learned_macs);
                s.spec = spec;
                self.fdb.forget_learned(port);
                true
            }
            _ => false,
        }
    }

    /// Ingress pipeline for a frame from `in_port`. `segment_len`: for GSO frames, the length of
    /// one segment on the wire (headers + gso_size), which is what the MTU limits.
    pub fn classify(&self, in_port: PortId, frame: &[u8], segment_len: Option<usize>, now_ns: u64) -> Verdict {
        self.classify_head(in_port, frame, frame.len(), segment_len, now_ns)
    }

    /// [`Switch::classify`] for a frame of `frame_len` bytes of which `head` (at least its
    /// headers) is at hand.
    pub fn classify_head(
        &self,
        in_port: PortId,
        head: &[u8],
        frame_len: usize,
        segment_len: Option<usize>,
        now_ns: u64,
    ) -> Verdict {
        let Some(state) = self.state(in_port) else {
            return Verdict::Drop(DropReason::PortDown);
        };
        let l2 = match parse_l2(head) {
            Ok(l2) => l2,
            Err(WireError::Unsupported) => return Verdict::Drop(DropReason::Unsupported),
            Err(_) => return Verdict::Drop(DropReason::Malformed),
        };
        self.classify_parsed(in_port, &state.spec, &l2, frame_len, segment_len, now_ns)
    }

    fn classify_parsed(
        &self,
        in_port: PortId,
        spec: &PortSpec,
        l2: &L2Info,
        frame_len: usize,
        segment_len: Option<usize>,
        now_ns: u64,
    ) -> Verdict {
        if l2.src.is_multicast() {
            return Verdict::Drop(DropReason::Malformed);
        }
        let vlan = match admit_vlan(&spec.vlan, l2.vlan) {
            Ok(v) => v,
            Err(r) => return Verdict::Drop(r),
        };
        if !source_allowed(spec, l2.src) {
            return Verdict::Drop(DropReason::Spoofed);
        }
        if !fits_mtu(frame_len, l2.header_len, segment_len, spec.mtu) {
            return Verdict::Drop(DropReason::Oversize);
        }
        let learn = if self.fdb.refresh(l2.src, vlan, in_port, now_ns) {
            None
        } else {
            Some(LearnRequest { mac: l2.src, vlan, port: in_port, at_limit: self.fdb.at_limit(in_port) })
        };
        let dst = if l2.dst.is_multicast() {
            Dest::Flood
        } else {
            match self.fdb.lookup(l2.dst, vlan, now_ns) {
                Some(p) if p == in_port => return Verdict::Drop(DropReason::NoDestination),
                Some(p) => Dest::Port(p),
                None => Dest::Flood,
            }
        };
        Verdict::Forward { vlan, dst, learn }
    }

    /// Applies a learn request (write access). Requests from ports removed meanwhile are ignored.
    pub fn learn(&mut self, req: LearnRequest, now_ns: u64) -> LearnOutcome {
        if self.state(req.port).is_none() {
            return LearnOutcome::Static;
        }
        self.fdb.learn(req.mac, req.vlan, req.port, now_ns)
    }

    /// Egress check for one port: None if it is down or not in `vlan`; else the tag edit.
    pub fn egress(&self, out: PortId, vlan: u16, frame_tagged: bool) -> Option<TagEdit> {
        let s = self.state(out).filter(|s| s.up)?;
        egress_tag(&s.spec.vlan, vlan, frame_tagged)
    }

    /// Does a frame of `frame_len` (after the tag edit) fit the out port's MTU?
    pub fn egress_fits(&self, out: PortId, frame_len: usize, tagged: bool, segment_len: Option<usize>) -> bool {
        self.state(out).is_some_and(|s| {
            let hdr = if tagged { TAGGED_HEADER_LEN } else { HEADER_LEN };
            fits_mtu(frame_len, hdr, segment_len, s.spec.mtu)
        })
    }

    /// Up ports in `vlan` other than `except`, for flooding.
    pub fn flood_ports(&self, vlan: u16, except: PortId) -> impl Iterator<Item = PortId> + '_ {
        self.ports.iter().enumerate().filter_map(move |(i, s)| {
            let s = s.as_ref()?;
            let id = PortId(i as u16);
            (id != except && s.up && egress_tag(&s.spec.vlan, vlan, false).is_some()).then_some(id)
        })
    }

    pub fn fdb(&self) -> &Fdb {
        &self.fdb
    }

    pub fn fdb_mut(&mut self) -> &mut Fdb {
        &mut self.fdb
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::OffloadCaps;

    fn spec(name: &str, kind: PortKind, mac: Option<u8>, vlan: VlanMode, mtu: u16) -> PortSpec {
        PortSpec {
            name: name.into(),
            kind,
            mac: mac.map(|n| MacAddr([0x52, 0x54, 0, 0, 0, n])),
            mtu,
            vlan,
            allow_mac_spoofing: false,
            max_learned_macs: crate::fdb::DEFAULT_MAX_LEARNED_MACS,
            guest: Default::default(),
            offloads: OffloadCaps::NONE,
        }
    }

    fn frame(dst: MacAddr, src: MacAddr, tag: Option<u16>, payload: usize) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst.0);
        f.extend_from_slice(&src.0);
        if let Some(t) = tag {
            f.extend_from_slice(&[0x81, 0x00]);
            f.extend_from_slice(&t.to_be_bytes());
        }
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(f.len() + payload, 0xab);
        f
    }

    fn m(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }

    /// uplink (trunk 10,20), vm1 (access 10), vm2 (access 10), vm3 (access 20).
    fn topology() -> (Switch, [PortId; 4]) {
        let mut sw = Switch::new(SwitchConfig::default());
        let up = sw.add_port(spec(
            "up0",
            PortKind::Uplink,
            None,
            VlanMode::Trunk { allowed: vec![10, 20], native: None },
            9000,
        ));
        let a = sw.add_port(spec("vm1", PortKind::Mem, Some(1), VlanMode::Access(10), 9000));
        let b = sw.add_port(spec("vm2", PortKind::Mem, Some(2), VlanMode::Access(10), 1500));
        let c = sw.add_port(spec("vm3", PortKind::Mem, Some(3), VlanMode::Access(20), 9000));
        for p in [up, a, b, c] {
            sw.set_port_up(p, true);
        }
        (sw, [up, a, b, c])
    }

    fn forward(sw: &mut Switch, port: PortId, f: &[u8], now: u64) -> Verdict {
        let v = sw.classify(port, f, None, now);
        if let Verdict::Forward { learn: Some(req), .. } = v {
            sw.learn(req, now);
        }
        v
    }

    #[test]
    fn floods_unknown_then_forwards_learned_within_vlan() {
        let (mut sw, [up, a, b, c]) = topology();
        let v = forward(&mut sw, a, &frame(m(2), m(1), None, 46), 0);
        assert!(matches!(v, Verdict::Forward { vlan: 10, dst: Dest::Flood, learn: Some(_) }));
        let flood: Vec<_> = sw.flood_ports(10, a).collect();
        assert_eq!(flood, vec![up, b], "vm3 is in VLAN 20 and must not see VLAN 10 floods");
        let v = forward(&mut sw, b, &frame(m(1), m(2), None, 46), 1);
        assert!(matches!(v, Verdict::Forward { vlan: 10, dst: Dest::Port(p), .. } if p == a));
        // Same MAC in VLAN 20 is a different domain: unknown, flooded.
        let v = forward(&mut sw, up, &frame(m(1), m(7), Some(20), 46), 2);
        assert!(matches!(v, Verdict::Forward { vlan: 20, dst: Dest::Flood, .. }));
        assert_eq!(sw.flood_ports(20, up).collect::<Vec<_>>(), vec![c]);
    }

    #[test]
    fn vlan_admission_and_tag_edits() {
        let (sw, [up, a, _, _]) = topology();
        assert_eq!(sw.classify(a, &frame(m(2), m(1), Some(10), 46), None, 0), Verdict::Drop(DropReason::Vlan));
        assert_eq!(sw.classify(up, &frame(m(2), m(9), Some(30), 46), None, 0), Verdict::Drop(DropReason::Vlan));
        assert_eq!(sw.classify(up, &frame(m(2), m(9), None, 46), None, 0), Verdict::Drop(DropReason::Vlan));
        assert_eq!(sw.egress(up, 10, false), Some(TagEdit::Push(10)));
        assert_eq!(sw.egress(a, 10, true), Some(TagEdit::Strip));
        assert_eq!(sw.egress(a, 20, true), None);
        assert_eq!(egress_tag(&VlanMode::Trunk { allowed: vec![5], native: Some(7) }, 7, true), Some(TagEdit::Strip));
        assert_eq!(admit_vlan(&VlanMode::Trunk { allowed: vec![5], native: Some(7) }, None), Ok(7));
    }

    #[test]
    fn spoof_mtu_malformed_hairpin() {
        let (mut sw, [up, a, b, _]) = topology();
        assert_eq!(sw.classify(a, &frame(m(2), m(9), None, 46), None, 0), Verdict::Drop(DropReason::Spoofed));
        // Uplinks carry many sources.
        assert!(matches!(sw.classify(up, &frame(m(2), m(9), Some(10), 46), None, 0), Verdict::Forward { .. }));
        // vm2 has MTU 1500: 1500 bytes of payload pass, 1501 do not; a GSO frame is judged by segment.
        assert!(matches!(sw.classify(b, &frame(m(1), m(2), None, 1500), None, 0), Verdict::Forward { .. }));
        assert_eq!(sw.classify(b, &frame(m(1), m(2), None, 1501), None, 0), Verdict::Drop(DropReason::Oversize));
        assert!(matches!(sw.classify(b, &frame(m(1), m(2), None, 60000), Some(1514), 0), Verdict::Forward { .. }));
        assert_eq!(sw.classify(a, &[0u8; 13], None, 0), Verdict::Drop(DropReason::Malformed));
        let mut qinq = frame(m(2), m(1), Some(10), 46);
        qinq[12..14].copy_from_slice(&vmq_wire::ethernet::ETHERTYPE_QINQ[0].to_be_bytes());
        assert_eq!(sw.classify(up, &qinq, None, 0), Verdict::Drop(DropReason::Unsupported));
        forward(&mut sw, a, &frame(m(2), m(1), None, 46), 0);
        assert_eq!(sw.classify(a, &frame(m(1), m(1), None, 46), None, 0), Verdict::Drop(DropReason::NoDestination));
        let mut group_src = frame(m(2), m(1), None, 46);
        group_src[6] |= 1;
        assert_eq!(sw.classify(up, &group_src, None, 0), Verdict::Drop(DropReason::Malformed));
    }

    #[test]
    fn the_port_limit_comes_from_the_spec() {
        let (mut sw, [up, a, _, _]) = topology();
        let mut s = sw.port(up).unwrap().clone();
        s.max_learned_macs = 1;
        assert!(sw.update_port(up, s));
        assert_eq!(sw.learn(LearnRequest { mac: m(7), vlan: 10, port: up, at_limit: false }, 0), LearnOutcome::New);
        assert_eq!(
            sw.learn(LearnRequest { mac: m(8), vlan: 10, port: up, at_limit: true }, 0),
            LearnOutcome::LimitReached
        );
        assert_eq!(sw.learn(LearnRequest { mac: m(1), vlan: 10, port: a, at_limit: false }, 0), LearnOutcome::New);
        let f = frame(m(2), m(9), Some(10), 46);
        assert!(matches!(sw.classify(up, &f, None, 0), Verdict::Forward { learn: Some(r), .. } if r.at_limit));
    }

    #[test]
    fn down_and_removed_ports() {
        let (mut sw, [up, a, b, _]) = topology();
        forward(&mut sw, b, &frame(m(1), m(2), None, 46), 0);
        sw.set_port_up(b, false);
        assert_eq!(sw.egress(b, 10, false), None);
        assert!(!sw.flood_ports(10, a).any(|p| p == b));
        assert!(matches!(
            sw.classify(a, &frame(m(2), m(1), None, 46), None, 0),
            Verdict::Forward { dst: Dest::Flood, .. }
        ));
        sw.remove_port(a);
        assert_eq!(sw.classify(a, &frame(m(2), m(1), None, 46), None, 0), Verdict::Drop(DropReason::PortDown));
        let again = sw.add_port(spec("vm9", PortKind::Tap, Some(9), VlanMode::Access(10), 1500));
        assert_eq!(again, a, "ids are reused");
        assert!(sw.port(up).is_some());
    }
}

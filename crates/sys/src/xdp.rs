//! The XDP program of an AF_XDP uplink, its maps, and its attachment (a BPF link).
//!
//! Why an eBPF assembler in Rust: the program is some 35 instructions, and building it here keeps
//! vmq free of a C/clang build step and of `libbpf` (the `aya` loader needs a newer Rust than
//! vmq's 1.95). [`program`] is pure and unit-tested; the kernel's verifier checks it again at
//! load time.
//!
//! What the program does, per received frame:
//! 1. frames shorter than an Ethernet header go to the kernel (`XDP_PASS`, which drops them);
//! 2. key = destination MAC + VLAN id (0 when untagged; the 802.1Q tag as the frame carries it);
//! 3. the key is looked up in the steering hash map: a hit gives an XSKMAP index (the socket of
//!    the VM queue holding that filter) or [`PASS_TO_KERNEL`]; a miss gives index 0, the
//!    default queue's socket;
//! 4. `bpf_redirect_map(xskmap, index + rx_queue_index * sockets_per_queue, XDP_PASS)`: each
//!    receive queue of the interface has its own set of sockets (an AF_XDP socket only gets
//!    frames of the queue it is bound to); a missing socket leaves the frame to the kernel
//!    rather than losing it.
//!
//! Entries the uplink passes to the kernel (see the AF_XDP uplink in the data path): frames to
//! the interface's own MAC (by definition for the host, no VM has it) and the IEEE 802.1D
//! link-local group 01:80:C2:00:00:0x (STP, LACP, LLDP: protocols of the link itself, which a
//! bridge must not forward and which the host's bonding or LLDP daemon may need).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::link::{IfRef, LinkCtl, LinkError};
use crate::netns::{self, NetnsError};

/// A steering map value that sends the frame to the kernel's stack.
pub const PASS_TO_KERNEL: u32 = u32::MAX;
/// Entries of the steering map and the XSKMAP.
pub const MAX_ENTRIES: u32 = 1024;

/// How the program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`); veth and most NIC drivers have it.
    Native,
    /// On the skb, after the driver (`XDP_FLAGS_SKB_MODE`): works everywhere, slower.
    Generic,
}

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("{at}: {op}: {source}")]
    Os { at: IfRef, op: &'static str, source: io::Error },
    #[error("{at}: the kernel's verifier refuses vmq's XDP program: {source}: {log}")]
    Verifier { at: IfRef, source: io::Error, log: String },
    #[error("{at}: attaching the XDP program ({mode:?} mode) failed: {source}")]
    Attach { at: IfRef, mode: XdpMode, source: io::Error },
    #[error("XDP map update: {0}")]
    Map(io::Error),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// A tiny eBPF assembler: just the instructions [`program`] needs.
pub mod asm {
    use super::Insn;

    pub const R0: u8 = 0;
    pub const R1: u8 = 1;
    pub const R2: u8 = 2;
    pub const R3: u8 = 3;
    pub const R4: u8 = 4;
    pub const R5: u8 = 5;
    pub const R6: u8 = 6;
    pub const R10: u8 = 10;

    const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn { code, regs: (src << 4) | (dst & 0x0f), off, imm }
    }
    /// Memory access sizes.
    pub const W: u8 = 0x00;
    pub const H: u8 = 0x08;
    pub const DW: u8 = 0x18;

    /// dst = *(size *)(src + off)
    pub const fn ldx(size: u8, dst: u8, src: u8, off: i16) -> Insn {
        insn(0x61 | size, dst, src, off, 0)
    }
    /// *(size *)(dst + off) = src
    pub const fn stx(size: u8, dst: u8, src: u8, off: i16) -> Insn {
        insn(0x63 | size, dst, src, off, 0)
    }
    /// *(size *)(dst + off) = imm
    pub const fn st(size: u8, dst: u8, off: i16, imm: i32) -> Insn {
        insn(0x62 | size, dst, 0, off, imm)
    }
    pub const fn mov(dst: u8, src: u8) -> Insn {
        insn(0xbf, dst, src, 0, 0)
    }
    pub const fn mov_imm(dst: u8, imm: i32) -> Insn {
        insn(0xb7, dst, 0, 0, imm)
    }
    pub const fn add_imm(dst: u8, imm: i32) -> Insn {
        insn(0x07, dst, 0, 0, imm)
    }
    /// dst += src (64-bit)
    pub const fn add(dst: u8, src: u8) -> Insn {
        insn(0x0f, dst, src, 0, 0)
    }
    /// dst *= imm (64-bit)
    pub const fn mul_imm(dst: u8, imm: i32) -> Insn {
        insn(0x27, dst, 0, 0, imm)
    }
    pub const fn and_imm(dst: u8, imm: i32) -> Insn {
        insn(0x57, dst, 0, 0, imm)
    }
    /// if dst > src goto +off (unsigned)
    pub const fn jgt(dst: u8, src: u8, off: i16) -> Insn {
        insn(0x2d, dst, src, off, 0)
    }
    pub const fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
        insn(0x15, dst, 0, off, imm)
    }
    pub const fn jne_imm(dst: u8, imm: i32, off: i16) -> Insn {
        insn(0x55, dst, 0, off, imm)
    }
    /// if (u32)dst != (u32)imm goto +off (a JMP32 compare)
    pub const fn jne32_imm(dst: u8, imm: i32, off: i16) -> Insn {
        insn(0x56, dst, 0, off, imm)
    }
    pub const fn ja(off: i16) -> Insn {
        insn(0x05, 0, 0, off, 0)
    }
    pub const fn call(helper: i32) -> Insn {
        insn(0x85, 0, 0, 0, helper)
    }
    pub const fn exit() -> Insn {
        insn(0x95, 0, 0, 0, 0)
    }
    /// dst = the map with this fd (two instruction slots, `BPF_PSEUDO_MAP_FD`).
    pub const fn ld_map_fd(dst: u8, fd: i32) -> [Insn; 2] {
        [insn(0x18, dst, 1, 0, fd), insn(0, 0, 0, 0, 0)]
    }
}

const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_REDIRECT_MAP: i32 = 51;
const XDP_PASS: i32 = 2;
/// 0x8100 as a little-endian load of the big-endian ethertype sees it.
const ETH_P_8021Q_LE: i32 = 0x0081;
/// The VLAN id bits of a big-endian TCI, as a little-endian 16-bit load sees them.
const VID_MASK_LE: i32 = 0xff0f;

/// The steering program for maps `steer_fd` (hash: [`steer_key`] → u32) and `xsk_fd` (XSKMAP),
/// with `sockets_per_queue` XSKMAP entries for each receive queue of the interface.
pub fn program(steer_fd: RawFd, xsk_fd: RawFd, sockets_per_queue: u32) -> Vec<Insn> {
    use asm::*;
    let mut p = vec![
        ldx(W, R6, R1, 16), // r6 = ctx->rx_queue_index (r6 survives helper calls)
        ldx(W, R2, R1, 0),  // r2 = ctx->data
        ldx(W, R3, R1, 4),  // r3 = ctx->data_end
        mov(R4, R2),
        add_imm(R4, 14),
        jgt(R4, R3, 30), // shorter than an Ethernet header: -> pass
        // key at r10-8: dst MAC (6 bytes), VLAN id (2 bytes, big-endian; 0 untagged)
        ldx(W, R5, R2, 0),
        stx(W, R10, R5, -8),
        ldx(H, R5, R2, 4),
        stx(H, R10, R5, -4),
        st(H, R10, -2, 0),
        ldx(H, R5, R2, 12),
        jne_imm(R5, ETH_P_8021Q_LE, 6), // untagged -> lookup
        mov(R4, R2),
        add_imm(R4, 18),
        jgt(R4, R3, 3), // truncated tag: keep VLAN 0 -> lookup
        ldx(H, R5, R2, 14),
        and_imm(R5, VID_MASK_LE),
        stx(H, R10, R5, -2),
    ];
    // lookup:
    p.extend(ld_map_fd(R1, steer_fd));
    p.extend([
        mov(R2, R10),
        add_imm(R2, -8),
        call(HELPER_MAP_LOOKUP_ELEM),
        mov_imm(R2, 0),
        jeq_imm(R0, 0, 3),    // miss: index 0, the default queue
        ldx(W, R2, R0, 0),    // hit: the value
        jne32_imm(R2, -1, 1), // PASS_TO_KERNEL? (32-bit compare)
        ja(7),                // -> pass
        // redirect: the socket set of the frame's receive queue
        mul_imm(R6, sockets_per_queue as i32),
        add(R2, R6),
    ]);
    p.extend(ld_map_fd(R1, xsk_fd));
    p.extend([
        mov_imm(R3, XDP_PASS), // no socket at that index: the kernel gets the frame
        call(HELPER_REDIRECT_MAP),
        exit(),
        // pass:
        mov_imm(R0, XDP_PASS),
        exit(),
    ]);
    p
}

/// The steering map key of (MAC, VLAN id).
pub fn steer_key(mac: [u8; 6], vlan: u16) -> [u8; 8] {
    let v = (vlan & 0x0fff).to_be_bytes();
    [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], v[0], v[1]]
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_SKB_MODE: u32 = 2;
const XDP_FLAGS_DRV_MODE: u32 = 4;
/// prog_flags: the program handles multi-buffer frames (it reads only the first buffer's
/// headers), so drivers may hand it frames larger than a page (Linux 5.18 and later).
const BPF_F_XDP_HAS_FRAGS: u32 = 1 << 5;

/// `union bpf_attr`, as a zeroed block the commands fill their fields into (the kernel wants
/// the unused tail zero).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn u32(mut self, at: usize, v: u32) -> Attr {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, at: usize, v: u64) -> Attr {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-padded bpf_attr of the size passed; pointers inside it (keys,
    // values, instructions, log buffer) point at live memory of the sizes the fields state.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_ptr(), attr.0.len() as u32) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn bpf_fd(cmd: libc::c_long, attr: &Attr) -> io::Result<OwnedFd> {
    // SAFETY: the command returns a fresh descriptor we own.
    bpf(cmd, attr).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn map_create(map_type: u32, key: u32, value: u32, entries: u32) -> io::Result<OwnedFd> {
    bpf_fd(BPF_MAP_CREATE, &Attr::new().u32(0, map_type).u32(4, key).u32(8, value).u32(12, entries))
}

fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let a = Attr::new().u32(0, map.as_raw_fd() as u32).u64(8, key.as_ptr() as u64).u64(16, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &a).map(|_| ())
}

fn map_delete(map: &OwnedFd, key: &[u8]) -> io::Result<()> {
    bpf(BPF_MAP_DELETE_ELEM, &Attr::new().u32(0, map.as_raw_fd() as u32).u64(8, key.as_ptr() as u64)).map(|_| ())
}

/// An XDP program attached to one interface with its maps; detached when dropped (the link
/// fd closes).
pub struct XdpSteering {
    _link: OwnedFd,
    _prog: OwnedFd,
    steer: OwnedFd,
    xsks: OwnedFd,
    at: IfRef,
}

impl XdpSteering {
    /// Creates the maps, loads the program and attaches it to `ifname` (in `netns`), for
    /// `sockets_per_queue` sockets on each receive queue (XSKMAP index `queue * sockets_per_queue
    /// + k`). With
    /// `frags` the program is loaded as multi-buffer capable (for sockets bound with
    /// `XDP_USE_SG`): a driver then passes it frames of several pages (jumbo MTUs on a veth).
    pub fn attach(
        ifname: &str,
        netns: Option<&str>,
        mode: XdpMode,
        frags: bool,
        sockets_per_queue: u32,
    ) -> Result<XdpSteering, XdpError> {
        let at = IfRef { name: ifname.to_string(), netns: netns.map(str::to_string) };
        let ifindex = LinkCtl::new(netns)?.ifindex(ifname)?;
        let os = |op| {
            let at = at.clone();
            move |source| XdpError::Os { at, op, source }
        };
        let steer = map_create(BPF_MAP_TYPE_HASH, 8, 4, MAX_ENTRIES).map_err(os("BPF_MAP_CREATE (hash)"))?;
        let xsks = map_create(BPF_MAP_TYPE_XSKMAP, 4, 4, MAX_ENTRIES).map_err(os("BPF_MAP_CREATE (XSKMAP)"))?;
        let insns = program(steer.as_raw_fd(), xsks.as_raw_fd(), sockets_per_queue);
        let license = c"Dual MIT/GPL";
        let load = |log: &mut [u8]| {
            let a = Attr::new()
                .u32(0, BPF_PROG_TYPE_XDP)
                .u32(4, insns.len() as u32)
                .u64(8, insns.as_ptr() as u64)
                .u64(16, license.as_ptr() as u64)
                .u32(24, u32::from(!log.is_empty()))
                .u32(28, log.len() as u32)
                // No log: the pointer must be null, not an empty slice's dangling one.
                .u64(32, if log.is_empty() { 0 } else { log.as_mut_ptr() as u64 })
                .u32(44, if frags { BPF_F_XDP_HAS_FRAGS } else { 0 });
            bpf_fd(BPF_PROG_LOAD, &a)
        };
        let prog = match load(&mut []) {
            Ok(p) => p,
            Err(source) => {
                let mut log = vec![0u8; 64 * 1024];
                let _ = load(&mut log);
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                let log = String::from_utf8_lossy(&log[..end]).trim().to_string();
                return Err(XdpError::Verifier { at, source, log });
            }
        };
        let flags = match mode {
            XdpMode::Native => XDP_FLAGS_DRV_MODE,
            XdpMode::Generic => XDP_FLAGS_SKB_MODE,
        };
        let link_attr = Attr::new().u32(0, prog.as_raw_fd() as u32).u32(4, ifindex).u32(8, BPF_XDP).u32(12, flags);
        // The ifindex is resolved in the calling thread's namespace.
        let link = netns::run_in_opt(netns, || bpf_fd(BPF_LINK_CREATE, &link_attr))?
            .map_err(|source| XdpError::Attach { at: at.clone(), mode, source })?;
        Ok(XdpSteering { _link: link, _prog: prog, steer, xsks, at })
    }

    /// Puts socket `fd` at XSKMAP index `index`.
    pub fn set_socket(&self, index: u32, fd: RawFd) -> Result<(), XdpError> {
        map_update(&self.xsks, &index.to_ne_bytes(), &(fd as u32).to_ne_bytes()).map_err(XdpError::Map)
    }

    /// Frames to (`mac`, `vlan`) go to XSKMAP index `target` (or [`PASS_TO_KERNEL`]).
    pub fn set_rule(&self, mac: [u8; 6], vlan: u16, target: u32) -> Result<(), XdpError> {
        map_update(&self.steer, &steer_key(mac, vlan), &target.to_ne_bytes()).map_err(XdpError::Map)
    }

    /// Frames to (`mac`, `vlan`) go to the default queue again.
    pub fn remove_rule(&self, mac: [u8; 6], vlan: u16) -> Result<(), XdpError> {
        match map_delete(&self.steer, &steer_key(mac, vlan)) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other.map_err(XdpError::Map),
        }
    }

    pub fn interface(&self) -> &IfRef {
        &self.at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_inside_the_program_and_it_ends_with_exit() {
        let p = program(3, 4, 5);
        for (pc, i) in p.iter().enumerate() {
            let class = i.code & 0x07;
            if (class == 0x05 || class == 0x06) && i.code != 0x85 && i.code != 0x95 {
                let target = pc as i64 + 1 + i64::from(i.off);
                assert!((0..p.len() as i64).contains(&target), "jump at {pc} to {target}");
                assert_ne!(p[target as usize].code, 0, "jump at {pc} into the second half of a wide load");
            }
        }
        assert_eq!(p.last().map(|i| i.code), Some(0x95));
        // The map fds are in the wide loads.
        let fds: Vec<i32> = p.iter().filter(|i| i.code == 0x18).map(|i| i.imm).collect();
        assert_eq!(fds, vec![3, 4]);
        // The queue's socket set: r6 = rx_queue_index, scaled by the sockets per queue.
        assert!(p.iter().any(|i| i.code == 0x27 && i.imm == 5), "no multiply by the set size");
    }

    #[test]
    fn key_layout() {
        assert_eq!(steer_key([1, 2, 3, 4, 5, 6], 0x123), [1, 2, 3, 4, 5, 6, 0x01, 0x23]);
        assert_eq!(steer_key([1, 2, 3, 4, 5, 6], 0xf123), [1, 2, 3, 4, 5, 6, 0x01, 0x23]);
        // The program's mask keeps the same bits of a TCI as loaded little-endian.
        let tci: u16 = 0xe123;
        let loaded = u16::from_le_bytes(tci.to_be_bytes());
        let masked = loaded & VID_MASK_LE as u16;
        assert_eq!(masked.to_le_bytes(), [0x01, 0x23]);
    }
}

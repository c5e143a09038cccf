//! Seed inputs for each target, built from real frames and messages (etherparse, the
//! protocol's own types), written to `fuzz/corpus/<target>/` by the `corpus` test.

use etherparse::PacketBuilder;
use vmq_control::Request;
use vmq_control::protocol::{NewPort, PortKind, Setting};
use vmq_offload::OffloadCaps;
use vmq_wire::VnetHdr;
use vmq_wire::checksum::fold;
use vmq_wire::ip::locate;
use vmq_wire::vnet::{FLAG_DATA_VALID, FLAG_NEEDS_CSUM, GsoType};

/// An Ethernet/IP/TCP frame (ACK set; PSH optional) with `payload`.
pub fn tcp_frame(v6: bool, seq: u32, payload: &[u8], psh: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let b = if v6 { b.ipv6([0xfd; 16], [0xfe; 16], 64) } else { b.ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64) };
    let mut b = b.tcp(40000, 5201, seq, 65000).ack(12345);
    if psh {
        b = b.psh();
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build TCP frame");
    out
}

/// An Ethernet/IPv4/UDP frame.
pub fn udp_frame(payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .udp(4000, 53);
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build UDP frame");
    out
}

/// A guest's GSO frame: one big TCP packet with a partial checksum (pseudo-header sum in the
/// field, NEEDS_CSUM), as virtio-net drivers hand them over.
pub fn gso_frame(v6: bool, payload: &[u8], mss: u16) -> (VnetHdr, Vec<u8>) {
    let (hdr, f) = partial_csum_frame(v6, payload);
    let gso = if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 };
    (VnetHdr { gso_type: gso.to_raw(), gso_size: mss, ..hdr }, f)
}

/// A TCP frame with a partial checksum and no GSO.
pub fn partial_csum_frame(v6: bool, payload: &[u8]) -> (VnetHdr, Vec<u8>) {
    let mut f = tcp_frame(v6, 1000, payload, true);
    let l = locate(&f).expect("locate built frame");
    let l4_len = f.len() - l.l4;
    let pseudo = fold(l.pseudo_header(&f, l4_len));
    f[l.l4 + 16..l.l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    let hdr = VnetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: 0,
        hdr_len: l.payload as u16,
        gso_size: 0,
        csum_start: l.l4 as u16,
        csum_offset: 16,
        num_buffers: 0,
    };
    (hdr, f)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

/// `vnet_offload` seeds: GSO v4/v6 toward receivers with and without TSO, a partial checksum
/// toward a receiver without checksum offload, a complete UDP frame, an oversize frame.
pub fn vnet_offload() -> Seeds {
    use crate::offload::encode;
    let (g4, f4) = gso_frame(false, &pattern(4000), 1448);
    let (g6, f6) = gso_frame(true, &pattern(3000), 1440);
    let (p, pf) = partial_csum_frame(false, &pattern(300));
    let udp = udp_frame(&pattern(100));
    vec![
        ("gso-v4-to-no-tso", encode(OffloadCaps::NONE, 1500, &g4, &f4)),
        ("gso-v4-to-csum-only", encode(OffloadCaps { csum: true, ..OffloadCaps::NONE }, 1500, &g4, &f4)),
        ("gso-v6-to-tso", encode(OffloadCaps::ALL, 1500, &g6, &f6)),
        ("gso-v6-min-mss", encode(OffloadCaps::NONE, 9000, &VnetHdr { gso_size: 88, ..g6 }, &f6)),
        ("gso-v6-below-min-mss", encode(OffloadCaps::NONE, 9000, &VnetHdr { gso_size: 87, ..g6 }, &f6)),
        ("partial-csum-to-no-csum", encode(OffloadCaps::NONE, 1500, &p, &pf)),
        (
            "udp-data-valid",
            encode(OffloadCaps::NONE, 1500, &VnetHdr { flags: FLAG_DATA_VALID, ..VnetHdr::default() }, &udp),
        ),
        (
            "tcp-oversize",
            encode(OffloadCaps::NONE, 68, &VnetHdr::default(), &tcp_frame(false, 1, &pattern(500), false)),
        ),
    ]
}

/// `control_line` seeds: every command, good and bad lines, several lines per connection.
pub fn control_line() -> Seeds {
    let add = Request::AddPort(NewPort {
        name: "vm1".into(),
        kind: PortKind::VhostUser,
        socket: Some("/run/vmq/vm1.sock".into()),
        mac: Some("52:54:00:00:00:01".into()),
        mtu: Some(1500),
        vlan: Some(10),
        ..NewPort::default()
    });
    let all: String = [
        Request::Show,
        Request::Ports,
        Request::Queues,
        Request::Fdb,
        Request::Stats { port: Some("vm1".into()) },
        Request::DelPort { name: "vm1".into() },
        Request::Set(Setting::PortMtu { port: "vm1".into(), mtu: 9000 }),
        Request::Rebalance,
        Request::Workers,
    ]
    .iter()
    .map(Request::to_line)
    .collect();
    vec![
        ("add-port", add.to_line().into_bytes()),
        ("every-command", all.into_bytes()),
        (
            "bad-lines",
            b"{\"command\":\"show\",\"port\":\"x\"}\r\n\n   \n{\"command\":42}\nnot json\n{\"command\":\"reboot\"}"
                .to_vec(),
        ),
        ("too-long", format!("{{\"command\":\"stats\",\"port\":\"{}\"}}\n", "p".repeat(600)).into_bytes()),
    ]
}

/// `split_ring` seeds: direct chains, an indirect table, a loop, a bogus avail index.
pub fn split_ring() -> Seeds {
    use crate::ring::{Desc, encode};
    let d = |addr: u64, len: u32, flags: u16, next: u16| Desc { addr, len, flags, next };
    let chain = vec![d(0x3000, 12, 1, 1), d(0x3100, 1500, 0, 0), d(0x3800, 2048, 2, 0), d(0x1f00, 64, 4, 0)];
    let table = vec![d(0x3000, 12, 1, 1), d(0x3200, 100, 3, 2), d(0x3400, 100, 2, 0), d(0, 0, 0, 0)];
    vec![
        ("direct-chains", encode(8, 0, &chain, &[0, 2], &[])),
        ("indirect", encode(3, 65530, &[d(0x3c00, 64, 4, 0), d(0x3000, 64, 0, 0)], &[0, 1], &[(0x3c00, table)])),
        ("loop", encode(2, 0, &[d(0x3000, 1, 1, 1), d(0x3000, 1, 1, 0)], &[0], &[])),
        ("wrapped-start", encode(1, 65535, &chain, &[1, 0], &[])),
        ("bad-avail-index", {
            let mut s = encode(2, 0, &chain, &[0], &[]);
            s[3 + 0x1002] = 200;
            s
        }),
    ]
}

/// `tx_assembly` seeds: a small frame, a big one split into head and tail, a big one in an
/// indirect table, one straddling two memory regions, and the errors (device-writable buffer,
/// too long for the buffer, shorter than a header).
pub fn tx_assembly() -> Seeds {
    use crate::ring::{Desc, encode as ring};
    use crate::tx::encode;
    let d = |addr: u64, len: u32, flags: u16, next: u16| Desc { addr, len, flags, next };
    let frame = pattern(0x1000);
    let fill = [(0x3000u64, &frame[..0x800])];
    // desc 0-1: header + 60-byte frame; 2-3: header + 1500 bytes; 4: indirect; 5: writable.
    let descs = vec![
        d(0x3000, 12, 1, 1),
        d(0x3010, 60, 0, 0),
        d(0x3000, 12, 1, 3),
        d(0x3100, 1500, 0, 0),
        d(0x2c00, 48, 4, 0),
        d(0x3000, 100, 2, 0),
        d(0x3000, 8, 0, 0),
    ];
    let table = vec![d(0x3000, 12, 1, 1), d(0x3040, 700, 1, 2), d(0x3400, 300, 0, 0)];
    let tables = [(0x2c00, table)];
    vec![
        ("small-and-split", encode(3, &ring(3, 0, &descs, &[0, 2], &tables), &fill)),
        ("indirect-split", encode(3, &ring(3, 7, &descs, &[4], &tables), &fill)),
        (
            "straddles-regions",
            encode(
                4 | 3,
                &ring(2, 0, &[d(0x3000, 12, 1, 1), d(REGION_SPLIT_SEED, 600, 0, 0)], &[0], &[]),
                &[(0x3000, &frame[..12]), (REGION_SPLIT_SEED, &frame[..600])],
            ),
        ),
        ("errors", encode(0, &ring(3, 65534, &descs, &[5, 2, 6, 0], &tables), &fill)),
    ]
}

/// `rx_writer` seeds: a frame over two chains (MRG_RXBUF), one too long for a chain without
/// it, frames left without buffers, a chain the device may not write, frames ending in a
/// sender's memory written into an indirect table's buffers, a buffer across two regions.
pub fn rx_writer() -> Seeds {
    use crate::ring::{Desc, encode as ring};
    use crate::rx::{Frame, encode};
    let d = |addr: u64, len: u32, flags: u16, next: u16| Desc { addr, len, flags, next };
    let f = |len: u16, cut: u16| Frame { len, cut, flags: 1, gso_type: 0, gso_size: 0 };
    let w = 2; // VIRTQ_DESC_F_WRITE
    let three = vec![d(0x3000, 1024, w, 0), d(0x3400, 1024, w, 0), d(0x3800, 1024, w, 0), d(0x3c00, 64, 0, 0)];
    let table = vec![d(0x3000, 12, w | 1, 1), d(0x3100, 700, w | 1, 2), d(0x3400, 2000, w, 0)];
    let indirect = vec![d(0x2c00, 48, 4, 0)];
    let own_idx = vec![d(0xff6, 14, w, 0), d(0x3000, 100, w, 0), d(0x3100, 100, w, 0)];
    vec![
        ("mrg-two-chains", encode(1, &[f(1500, 54)], &ring(3, 0, &three, &[0, 1, 2], &[]))),
        ("too-long-without-mrg", encode(0, &[f(1500, 54), f(100, 14)], &ring(3, 0, &three, &[0, 1], &[]))),
        ("no-buffer", encode(1, &[f(100, 14), f(100, 14), f(60, 0)], &ring(3, 65535, &three, &[2], &[]))),
        ("readable-chain", encode(1, &[f(100, 14)], &ring(3, 0, &three, &[3], &[]))),
        ("tail-indirect", encode(4 | 1, &[f(2600, 54)], &ring(2, 0, &indirect, &[0], &[(0x2c00, table)]))),
        ("straddles-regions", encode(2, &[f(600, 54)], &ring(1, 0, &[d(REGION_SPLIT_SEED, 1024, w, 0)], &[0], &[]))),
        // The first frame's last two bytes land on the guest's own avail index (0x1002): the
        // second frame takes the two chains the device had seen, re-reads the index, finds it
        // bogus and breaks the ring; it and the third are refused, no chain kept.
        (
            "overwrites-own-avail-index",
            encode(1, &[f(2, 0), f(1000, 54), f(60, 0)], &ring(3, 0, &own_idx, &[0, 1, 2], &[])),
        ),
    ]
}

/// `config_file` seeds: vmq's embedded default, a vhost-user setup with socket policies, and
/// files refused for a duplicate socket, an unknown key, an MTU out of range and broken TOML.
pub fn config_file() -> Seeds {
    const VHOST: &str = r#"[switch]
mode = "switch"
workers = 2
fdb_capacity = 4096

[vhost]
socket_group = "root"
socket_mode = "0660"
setup_timeout_secs = 20

[[port]]
name = "vm1"
kind = "vhost-user"
socket = "/run/vmq/vm1.sock"
mac = "52:54:00:00:00:01"
vlan = 10
allowed_uids = [0, 107]

[[port]]
name = "vm2"
kind = "vhost-user"
socket = "/run/vmq/vm2.sock"
mac = "52:54:00:00:00:02"
trunk = [10, 20]
native_vlan = 20
mtu = 9000
"#;
    let duplicate_socket = VHOST.replace("vm2.sock", "vm1.sock");
    let unknown_key = VHOST.replace("fdb_capacity", "fdb_capacityy");
    let bad_mtu = VHOST.replace("9000", "65536");
    vec![
        ("embedded-default", crate::config_file::EMBEDDED_DEFAULT.as_bytes().to_vec()),
        ("vhost-user", VHOST.as_bytes().to_vec()),
        ("duplicate-socket", duplicate_socket.into_bytes()),
        ("unknown-key", unknown_key.into_bytes()),
        ("bad-mtu", bad_mtu.into_bytes()),
        ("broken-toml", b"[switch\nmode = \"vmq\"\n[[port]]\nname = 'a\n".to_vec()),
    ]
}

/// `vhost_messages` seeds: QEMU's bring-up of both rings (the device starts), a memory table
/// over an unsealed memfd (refused), and malformed messages (raw garbage, a header
/// lying about its body, a pipe as kick fd, ring setup outside guest memory).
pub fn vhost_messages() -> Seeds {
    use crate::vhost::{OP_LIE_SIZE, OP_NEED_REPLY as ACK, OP_RAW, OP_SHRINK, encode};
    let all = u64::MAX.to_le_bytes();
    let masked = |selector: u8| -> Vec<u8> { [&[selector][..], &all].concat() };
    let mut bring_up: Vec<(u8, Vec<u8>)> = vec![
        (2, vec![]),
        (0, vec![]),
        (11, vec![]),
        (12, masked(1)),
        (1 | ACK, masked(1)),
        // One region: memfd 0, at guest address 0, its whole size, mapped at VMM_BASE.
        (4 | ACK, vec![0, 0, 0]),
    ];
    for q in 0..2u8 {
        let offset = (u16::from(q) * 0x400).to_le_bytes();
        bring_up.extend([
            (5 | ACK, vec![q, 0]),
            (7 | ACK, vec![q, 4]),
            (6 | ACK, vec![q, 0, offset[0], offset[1], 1, 1]),
            (10 | ACK, vec![q, 3]),
            (9 | ACK, vec![q, 3]),
            (13 | ACK, vec![q, 3]),
        ]);
    }
    let seq = |m: &[(u8, Vec<u8>)]| m.iter().map(|(op, f)| (*op, f.clone())).collect::<Vec<_>>();
    let enc = |setup: u8, m: Vec<(u8, Vec<u8>)>| {
        let refs: Vec<(u8, &[u8])> = m.iter().map(|(op, f)| (*op, &f[..])).collect();
        encode(setup, &refs)
    };
    let mut hostile = seq(&bring_up[..5]);
    hostile.extend([
        (OP_RAW, vec![5, 4, 0, 1, 2, 3, 4, 1, 3]),
        (OP_LIE_SIZE | 14, vec![0, 200]),
        (5 | ACK, vec![0, 5, 0, 0, 0, 0xff]),
        (6 | ACK, vec![0, 7, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 1]),
        (9 | ACK, vec![0, 1]),
    ]);
    // The unsealed memfd 0 shrinks while nothing maps it, then a memory table over it is
    // refused (no F_SEAL_SHRINK) and the connection ends; the sealed memfd 1 refuses to shrink.
    let mut unsealed = seq(&bring_up[..5]);
    unsealed.extend([(OP_SHRINK, vec![0]), (OP_SHRINK, vec![1]), (4 | ACK, vec![0, 0, 0]), (0, vec![])]);
    vec![
        ("bring-up", enc(3, seq(&bring_up))),
        ("unsealed-memfd-refused", enc(0x40 | 3, unsealed)),
        ("hostile", enc(3, hostile)),
    ]
}

/// `qmp_session` seeds: QEMU's side of a real conversation (greeting, capabilities, a filter,
/// an event and the filter after it), and one with refusals and junk.
pub fn qmp_session() -> Seeds {
    use vmq_control::qmp::rx_filter_reply;
    let greeting = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n";
    let event = "{\"timestamp\": {\"seconds\": 1764900000, \"microseconds\": 1}, \"event\": \"NIC_RX_FILTER_CHANGED\", \"data\": {\"name\": \"vm1\", \"path\": \"/machine/peripheral/vm1/virtio-backend\"}}\r\n";
    let mut conversation = vec![16u8];
    conversation.extend_from_slice(greeting.as_bytes());
    conversation.extend_from_slice(b"{\"return\": {}, \"id\": 0}\r\n");
    conversation.extend_from_slice(rx_filter_reply(1, "vm1", "52:54:00:12:34:56", false, &[]).as_bytes());
    conversation.extend_from_slice(event.as_bytes());
    conversation.extend_from_slice(
        rx_filter_reply(2, "vm1", "52:54:00:12:34:57", true, &["01:00:5e:00:00:01", "33:33:00:00:00:01"]).as_bytes(),
    );
    let mut hostile = vec![7u8];
    hostile.extend_from_slice(greeting.as_bytes());
    hostile.extend_from_slice(b"{\"return\": {}, \"id\": 0}\r\n");
    hostile.extend_from_slice(
        b"{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"invalid net client name: vm1\"}}\r\n",
    );
    hostile.extend_from_slice(
        b"[1, 2]\r\n{\"return\": [{\"name\": \"vm1\", \"vlan-table\": [70000]}], \"id\": 2}\r\n\xff\xfe\n",
    );
    hostile.extend_from_slice(event.as_bytes());
    vec![("conversation", conversation), ("hostile", hostile)]
}

/// `xsk_ring` seeds: indices about to wrap with a descriptor at a chunk's end, and a kernel that
/// runs more than a ring ahead with a descriptor across two chunks.
pub fn xsk_ring() -> Seeds {
    let step = |b: &mut crate::InputBuilder, kind: u8, index: u32, addr: u64, len: u32| {
        b.u8(kind).u32(index).u64(addr).u32(len);
    };
    let mut wrap = crate::InputBuilder::default();
    wrap.u8(3).u8(8).u32(u32::MAX - 2).u32(u32::MAX - 1);
    step(&mut wrap, 0, 3, 0x100 + 0xf0, 0x10);
    step(&mut wrap, 1, 0, 0x7ff, 1);
    let mut ahead = crate::InputBuilder::default();
    ahead.u8(2).u8(4).u32(0).u32(0);
    step(&mut ahead, 0, 5, 0xf0, 0x20);
    step(&mut ahead, 1, u32::MAX, 0x400, 0);
    vec![("wrapping", wrap.bytes), ("kernel-ahead", ahead.bytes)]
}

/// A buffer address 0x100 below the region split, so that a 600-byte buffer straddles it.
const REGION_SPLIT_SEED: u64 = crate::ring::REGION_SPLIT - 0x100;

/// Named seed inputs of one target.
pub type Seeds = Vec<(&'static str, Vec<u8>)>;

/// Every target's seeds.
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("vnet_offload", vnet_offload()),
        ("control_line", control_line()),
        ("split_ring", split_ring()),
        ("tx_assembly", tx_assembly()),
        ("rx_writer", rx_writer()),
        ("config_file", config_file()),
        ("vhost_messages", vhost_messages()),
        ("qmp_session", qmp_session()),
        ("xsk_ring", xsk_ring()),
        ("packed_ring", packed_ring()),
    ]
}

/// `packed_ring` seeds: a direct chain and an indirect one made available on a fresh ring
/// (wrap counter 1: AVAIL set, USED clear), a wrapped start, and a chain that never ends.
pub fn packed_ring() -> Seeds {
    use crate::packed_ring::encode;
    const AVAIL: u16 = 1 << 7;
    let table: Vec<u8> = [(0x3000u64, 12u32, 0u16, 2u16), (0x3200, 100, 0, 2)]
        .iter()
        .flat_map(|&(a, l, i, f): &(u64, u32, u16, u16)| {
            let mut d = a.to_le_bytes().to_vec();
            d.extend_from_slice(&l.to_le_bytes());
            d.extend_from_slice(&i.to_le_bytes());
            d.extend_from_slice(&f.to_le_bytes());
            d
        })
        .collect();
    let chains = [(0x3000, 12, 0, AVAIL | 1), (0x3100, 1500, 0, AVAIL), (0x3c00, 32, 1, AVAIL | 4)];
    vec![
        ("direct-and-indirect", encode(8, 0x8000, true, &chains, &[(0x3c00, table)])),
        (
            "wrapped-start",
            encode(4, 0x0003, false, &[(0x3000, 64, 2, 0), (0, 0, 0, 0), (0, 0, 0, 0), (0x3000, 64, 2, 1 << 15)], &[]),
        ),
        ("endless-chain", encode(4, 0x8000, false, &[(0x3000, 8, 0, AVAIL | 1); 4], &[])),
    ]
}

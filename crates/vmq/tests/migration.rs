//! Live migration of a VM on a vhost-user port between two vmq instances, on one machine made
//! to look like two hosts: vmq A and vmq B each have their uplink on a veth into a shared
//! "network" namespace (a bridge) where an external host lives. A QEMU guest on vmq A migrates
//! (QMP `migrate` over a Unix socket) to a QEMU started with `-incoming` on vmq B while the
//! external host streams TCP to the guest and pings it; then it migrates back. Every byte of
//! the stream is verified (SHA-256 on both ends); the ping gap and QEMU's own downtime figure
//! are printed for each move. Root-only; skipped like the other QEMU tests when QEMU, the guest
//! image or a tool is missing.

mod guests;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guests::*;
use serde_json::json;
use sha2::{Digest, Sha256};
use vmq_control::protocol::PortState;
use vmq_testkit::qemu::{Guest, GuestConfig, GuestImage, guest_image_or_skip};
use vmq_testkit::qmp::Qmp;

const BOOT: Duration = Duration::from_secs(90);
const MAC: &str = "52:54:00:74:00:01";
const GUEST_IP: &str = "10.74.0.1";
const EXT_IP: &str = "10.74.0.200";
const STREAM_PORT: u16 = 5001;
/// The stream's pace: enough to be busy during the move, little enough for a TCG guest that
/// also hashes it.
const CHUNK: usize = 64 * 1024;
const CHUNK_PERIOD: Duration = Duration::from_millis(10);

/// One side of the test: a vmq instance with a vhost-user port `vm1` and its uplink.
struct Host {
    dir: TestDir,
    vmq: Vmq,
}

impl Host {
    fn start(tag: &str, uplink: &str, net: &Netns) -> Host {
        let dir = TestDir::new(tag);
        let config = switch_header(&dir, 1)
            + &vhost_port(&dir, "vm1", MAC, 1500, 0, true)
            + &format!(
                "[[port]]\nname = \"up0\"\nkind = \"uplink\"\nifname = \"{uplink}\"\nnetns = \"{}\"\nmtu = 1500\n",
                net.name()
            );
        let vmq = Vmq::start(&dir, &config);
        Host { dir, vmq }
    }

    fn guest_config(&self, qmp: &str, guest_announce: bool) -> GuestConfig {
        let config =
            guest_config(&self.dir, "vm1", MAC, GUEST_IP).qmp(self.dir.join(qmp), "vm1").memory_kib(guest_memory_kib());
        if guest_announce { config } else { config.net_device_option("guest_announce=off") }
    }
}

/// Guest RAM: 256 MiB less 8 KiB, so that QEMU 7.2 (Debian 12) under TCG syncs its dirty bitmap
/// page by page. With RAM a multiple of 256 KiB it takes a word-at-a-time path that does not
/// reset TCG's TLB dirty tracking, and pages the guest CPU writes during the move are lost
/// (fixed in QEMU 9.0: "physmem: Fix migration dirty bitmap coherency with TCG memory access").
/// Seen here as guest kernel crashes and a stale stream page after a move: 11 failures in 127
/// runs at 256 MiB, none in 128 at this size (docs/design.md). `VMQ_TEST_GUEST_MEMORY` (e.g.
/// `256M` or `262136K`) overrides it, to show the QEMU bug.
fn guest_memory_kib() -> u32 {
    const DEFAULT_KIB: u32 = 256 * 1024 - 8;
    let Ok(text) = std::env::var("VMQ_TEST_GUEST_MEMORY") else { return DEFAULT_KIB };
    let parsed = if let Some(mib) = text.strip_suffix(['M', 'm']) {
        mib.parse::<u32>().ok().and_then(|m| m.checked_mul(1024))
    } else {
        text.strip_suffix(['K', 'k']).and_then(|k| k.parse::<u32>().ok())
    };
    parsed.unwrap_or_else(|| panic!("VMQ_TEST_GUEST_MEMORY={text:?}: want a size like 256M or 262136K"))
}

/// Sets the flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// What one move took.
#[derive(Debug)]
struct Move {
    /// QEMU's own figure (query-migrate `downtime`, ms): the guest was paused this long. Once
    /// in ten runs QEMU 7.2's final query-migrate carried neither this nor `total-time`.
    qemu_downtime_ms: Option<u64>,
    /// The longest gap between two ping replies at the external host around the move (ms).
    ping_gap_ms: f64,
    total_ms: Option<u64>,
}

/// Migrates the guest behind `source_qmp` to a new QEMU on `dest`; returns the new guest.
fn migrate(
    image: &GuestImage,
    source: &mut Guest,
    source_qmp: &mut Qmp,
    dest: &Host,
    tag: &str,
    guest_announce: bool,
) -> (Guest, Qmp, Move) {
    let incoming = dest.dir.join(&format!("migrate-{tag}.sock"));
    let qmp_name = format!("qmp-{tag}.sock");
    let config = dest.guest_config(&qmp_name, guest_announce).incoming(format!("unix:{}", incoming.display()));
    let mut target = Guest::spawn(image, config).unwrap_or_else(|e| panic!("start the destination QEMU: {e}"));
    // QMP answers once QEMU's main loop runs, i.e. after it listens on the incoming socket.
    let dest_qmp = Qmp::connect(&dest.dir.join(&qmp_name), Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("destination QMP: {e}\n{}", target.log_tails()));
    // QEMU 7.2 limits migration to 128 MiB/s by default; on loopback that only adds downtime.
    source_qmp
        .execute("migrate-set-parameters", json!({ "max-bandwidth": 4u64 << 30, "downtime-limit": 300 }))
        .expect("migrate-set-parameters");
    source_qmp.execute("migrate", json!({ "uri": format!("unix:{}", incoming.display()) })).expect("migrate");
    let info = wait_for("migration to complete", Duration::from_secs(120), || {
        let info = source_qmp.execute("query-migrate", json!({})).map_err(|e| e.to_string())?;
        match info["status"].as_str() {
            Some("completed") => Ok(info),
            Some("failed" | "cancelled") => panic!("migration {tag} failed: {info}\n{}", target.log_tails()),
            _ => Err(info.to_string()),
        }
    });
    target.migrated_in(source);
    let qemu_downtime_ms = info["downtime"].as_u64();
    let total_ms = info["total-time"].as_u64();
    if qemu_downtime_ms.is_none() {
        eprintln!("migration {tag}: query-migrate without a downtime: {info}");
    }
    (target, dest_qmp, Move { qemu_downtime_ms, ping_gap_ms: 0.0, total_ms })
}

/// Reply timestamps (`ping -D`) in `log`.
fn reply_times(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect()
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Waits until the external host's ping log shows replies after `since` (unix time), and
/// returns the longest gap between replies after `from`.
fn ping_gap_after(ping_log: &Path, from: f64, since: f64) -> f64 {
    let times = wait_for("ping replies after the move", Duration::from_secs(60), || {
        let log = std::fs::read_to_string(ping_log).map_err(|e| e.to_string())?;
        let times = reply_times(&log);
        if times.iter().filter(|&&t| t > since).count() >= 5 {
            Ok(times)
        } else {
            Err(format!("{} replies", times.len()))
        }
    });
    let window: Vec<f64> = times.into_iter().filter(|&t| t >= from).collect();
    window.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max) * 1000.0
}

/// The stream's content: every 4-byte word holds its own offset in the stream (little-endian),
/// so a wrong word found in the guest tells where the damage is and, for stale data, which
/// older part of the stream (or 0: a page never written) the guest saw instead.
fn fill_pattern(chunk: &mut [u8], offset: u64) {
    for (i, word) in chunk.chunks_mut(4).enumerate() {
        let at = (offset + 4 * i as u64) as u32;
        word.copy_from_slice(&at.to_le_bytes()[..word.len()]);
    }
}

/// After a hash mismatch: which MiB of what the guest kept (`/tmp/stream.bin`) differs from
/// the pattern, and the first wrong words of the first bad MiB (offset, what was there). Makes
/// a failure say where and what, not only that.
fn locate_damage(vm: &mut Guest, sent: u64) -> String {
    const MIB: u64 = 1 << 20;
    let mibs = sent.div_ceil(MIB);
    let listing = vm.run_ok(&format!(
        "ls -l /tmp/stream.bin; for i in $(seq 0 {}); do dd if=/tmp/stream.bin bs=1048576 skip=$i count=1 2>/dev/null | sha256sum; done",
        mibs - 1
    ));
    let mut lines = listing.lines();
    let mut report = format!("guest kept: {}\n", lines.next().unwrap_or("?"));
    let mut bad = Vec::new();
    for (i, line) in lines.filter(|l| l.contains(" -")).enumerate() {
        let len = MIB.min(sent - i as u64 * MIB) as usize;
        let mut expected = vec![0u8; len];
        fill_pattern(&mut expected, i as u64 * MIB);
        let want: String = Sha256::digest(&expected).iter().map(|b| format!("{b:02x}")).collect();
        if line.split_whitespace().next() != Some(want.as_str()) {
            bad.push(i as u64);
        }
    }
    report += &format!("bad MiB (of {mibs}): {bad:?}\n");
    if let Some(&first) = bad.first() {
        // od prints four words a line (no addresses: busybox awk reads "0000016" as octal);
        // awk compares each word with its expected value, prints the first wrong ones and
        // counts them.
        let words = vm.run_ok(&format!(
            "dd if=/tmp/stream.bin bs=1048576 skip={first} count=1 2>/dev/null | od -A n -t u4 -v | \
             awk -v base={} '{{for(k=1;k<=NF;k++){{e=base+(NR-1)*16+(k-1)*4; if($k!=e){{n++; if(n<=24) print e, $k; last=e}}}}}} END{{print \"wrong words:\", n+0, \"last at\", last}}'",
            first * MIB
        ));
        report += &format!("MiB {first}: offset, word found (expected: the offset)\n{words}");
    }
    report
}

/// The external host's TCP stream to the guest: deterministic bytes at a steady pace until
/// `stop`, then the connection is closed. Returns (bytes sent, SHA-256 hex).
fn stream_to_guest(
    ext: &str,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<(u64, String), String>> {
    let ext = ext.to_string();
    std::thread::spawn(move || {
        vmq_sys::netns::run_in(&ext, || -> Result<(u64, String), String> {
            let addr: SocketAddr = format!("{GUEST_IP}:{STREAM_PORT}").parse().map_err(|e| format!("{e}"))?;
            let mut stream =
                TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|e| format!("connect: {e}"))?;
            // A stream that stalls this long across a move is broken.
            stream.set_write_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
            let mut hash = Sha256::new();
            let mut sent = 0u64;
            let mut chunk = vec![0u8; CHUNK];
            let mut next = Instant::now();
            while !stop.load(Ordering::Acquire) {
                fill_pattern(&mut chunk, sent);
                stream.write_all(&chunk).map_err(|e| format!("after {sent} bytes: {e}"))?;
                hash.update(&chunk);
                sent += CHUNK as u64;
                progress.store(sent, Ordering::Release);
                next += CHUNK_PERIOD;
                // Pacing the sender (not synchronisation).
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            stream.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
            let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
            Ok((sent, digest))
        })
        .map_err(|e| e.to_string())?
    })
}

/// The guest announces itself after each move (VIRTIO_NET_F_GUEST_ANNOUNCE, which vmq offers):
/// QEMU then sends no SEND_RARP.
#[test]
fn vm_migrates_between_two_vmqs_and_back_with_a_tcp_stream_intact() {
    migrate_there_and_back("vm_migrates_between_two_vmqs_and_back_with_a_tcp_stream_intact", true);
}

/// The guest cannot announce itself (`guest_announce=off`): QEMU asks vmq (SEND_RARP) and vmq
/// injects a RARP from the guest's MAC, which teaches the network's bridge the new way.
#[test]
fn vm_migrates_between_two_vmqs_and_back_announced_by_vmq_rarp() {
    migrate_there_and_back("vm_migrates_between_two_vmqs_and_back_announced_by_vmq_rarp", false);
}

fn migrate_there_and_back(test: &str, guest_announce: bool) {
    let Some(image) = guest_image_or_skip(test) else { return };
    if !root_or_skip(test) {
        return;
    }
    // The shared network: a bridge with both vmqs' uplinks and the external host.
    // Both variants run at once in one process: names apart.
    let variant = if guest_announce { "g" } else { "r" };
    let net = Netns::create(&unique(&format!("n{variant}")));
    let ext = Netns::create(&unique(&format!("x{variant}")));
    net.ip(&["link", "add", "br0", "type", "bridge"]);
    net.ip(&["link", "set", "br0", "up"]);
    for (uplink, port) in [("upA", "pa"), ("upB", "pb")] {
        net.ip(&["link", "add", uplink, "type", "veth", "peer", "name", port]);
        net.ip(&["link", "set", port, "master", "br0", "up"]);
        net.ip(&["link", "set", uplink, "up"]);
    }
    net.ip(&["link", "add", "pe", "type", "veth", "peer", "name", "eth0", "netns", ext.name()]);
    net.ip(&["link", "set", "pe", "master", "br0", "up"]);
    ext.ip(&["addr", "add", &format!("{EXT_IP}/24"), "dev", "eth0"]);
    ext.ip(&["link", "set", "eth0", "up"]);

    let a = Host::start(&format!("migA{variant}"), "upA", &net);
    let b = Host::start(&format!("migB{variant}"), "upB", &net);

    let mut vm = Guest::spawn(&image, a.guest_config("qmp-boot.sock", guest_announce))
        .unwrap_or_else(|e| panic!("start QEMU: {e}"));
    vm.wait_ready(BOOT).unwrap_or_else(|e| panic!("{e}"));
    let mut qmp = Qmp::connect(&a.dir.join("qmp-boot.sock"), Duration::from_secs(30)).expect("QMP");
    a.vmq.wait_state(&["vm1", "up0"], PortState::Up, BOOT);
    wait_link_up(&mut vm);
    assert_ping(&mut vm, EXT_IP, 2);

    // The guest hashes what it receives; the external host streams and pings throughout.
    // The guest keeps a copy, so that a mismatch can be located (`locate_damage`).
    vm.spawn_background(&format!("nc -l -p {STREAM_PORT} | tee /tmp/stream.bin | sha256sum > /tmp/stream.sum"))
        .expect("receiver");
    vm.run_ok(&format!(
        "for i in $(seq 100); do netstat -ltn | grep -q ':{STREAM_PORT} ' && exit 0; sleep 0.1; done; exit 1"
    ));
    let ping_log = a.dir.join("ping.log");
    let _ping = ext.spawn(&["sh", "-c", &format!("exec ping -D -i 0.05 -W 1 {GUEST_IP} > {}", ping_log.display())]);
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let sender = stream_to_guest(ext.name(), stop.clone(), progress.clone());
    // Also when the test fails: the sender stops with it.
    let _stop_sender = StopOnDrop(stop.clone());
    wait_for("stream and pings under way", Duration::from_secs(30), || {
        if sender.is_finished() || progress.load(Ordering::Acquire) < 1 << 20 {
            return Err(format!("{} bytes streamed", progress.load(Ordering::Acquire)));
        }
        let log = std::fs::read_to_string(&ping_log).map_err(|e| e.to_string())?;
        if reply_times(&log).len() >= 10 { Ok(()) } else { Err("too few replies".into()) }
    });

    let mut moves = Vec::new();
    // A -> B, then B -> A.
    for (tag, dest) in [("to-b", &b), ("to-a", &a)] {
        let start = now_unix();
        let streamed_before = progress.load(Ordering::Acquire);
        let (mut target, target_qmp, mut m) = migrate(&image, &mut vm, &mut qmp, dest, tag, guest_announce);
        let done = now_unix();
        // Where the stream was around the move: damage found later (a wrong word holds the
        // offset it came from) can be placed before, during or after it.
        eprintln!(
            "migration {tag} ({test}): stream at {streamed_before} bytes when it began, {} when it completed",
            progress.load(Ordering::Acquire)
        );
        qmp = target_qmp;
        // The source QEMU stays paused after a migration; it is done.
        target.run_ok("true");
        vm = target;
        dest.vmq.wait_state(&["vm1"], PortState::Up, Duration::from_secs(30));
        m.ping_gap_ms = ping_gap_after(&ping_log, start, done);
        // Collected for BENCHMARKS.md ("Live migration").
        eprintln!(
            "migration {tag}: QEMU downtime {:?} ms, ping gap at the external host {:.0} ms, total {:?} ms",
            m.qemu_downtime_ms, m.ping_gap_ms, m.total_ms
        );
        moves.push(m);
        if sender.is_finished() {
            let result = sender.join().expect("sender thread");
            panic!("the stream ended during migration {tag}: {result:?}");
        }
    }
    // The way out still works after both moves. On a very busy host (load 16) one echo of two
    // was seen lost once, right after the move back: a few tries, each one reported.
    let mut tries = Vec::new();
    let answered = (0..3).any(|_| {
        let (sent, received, output) = guest_ping(&mut vm, EXT_IP, 2, 5);
        tries.push(output);
        sent == 2 && received == 2
    });
    assert!(answered, "pings from the guest after the moves:\n{}", tries.join("\n"));
    if tries.len() > 1 {
        eprintln!("pings after the moves answered on try {}: {}", tries.len(), tries[0]);
    }
    // A page vmq wrote but did not log arrives stale on the destination: in a frame buffer it
    // corrupts the stream (below), in a used ring or a buffer the kernel reuses it corrupts the
    // guest kernel (a previous attempt saw list corruption after a move).
    let oops =
        vm.run_ok("dmesg | grep -E 'corruption|BUG:|Oops|general protection|soft lockup|NETDEV WATCHDOG' || true");
    assert!(oops.is_empty(), "guest kernel complaints after the moves:\n{oops}");

    stop.store(true, Ordering::Release);
    let (sent, sent_hash) = sender.join().expect("sender thread").unwrap_or_else(|e| panic!("stream: {e}"));
    let received =
        vm.run_ok("for i in $(seq 300); do [ -s /tmp/stream.sum ] && break; sleep 0.1; done; cat /tmp/stream.sum");
    let received_hash = received.split_whitespace().next().unwrap_or("");
    eprintln!("stream ({test}): {sent} bytes, sha256 {sent_hash}");
    if received_hash != sent_hash {
        let damage = locate_damage(&mut vm, sent);
        panic!(
            "the guest received other bytes than the {sent} sent (sha256 {received_hash} instead of {sent_hash}):\n{damage}"
        );
    }

    let migration = |host: &Host| {
        let ports = host.vmq.ports().expect("ports");
        let vm1 = ports.into_iter().find(|p| p.name == "vm1").expect("port vm1");
        vm1.vhost.and_then(|v| v.migration).expect("migration state of a vhost-user port")
    };
    let (ma, mb) = (migration(&a), migration(&b));
    eprintln!("vmq A: {ma:?}\nvmq B: {mb:?}");
    // Each vmq saw QEMU switch logging on once and stop the rings while logging once.
    assert_eq!((ma.log_starts, ma.migrated_out), (1, 1), "A logged and handed the VM over: {ma:?}");
    assert_eq!((mb.log_starts, mb.migrated_out), (1, 1), "B logged and handed the VM back: {mb:?}");
    assert!(!mb.logging, "logging off on B after the move back: {mb:?}");
    // When the guest cannot announce itself, QEMU asks vmq once per announce round (QEMU's
    // default: 5 rounds over about a second); when it can, never.
    for (host, m) in [("A", &ma), ("B", &mb)] {
        if guest_announce {
            assert_eq!(m.announces, 0, "{host}: QEMU asked for RARP though the guest announces itself: {m:?}");
        } else {
            assert!((1..=5).contains(&m.announces), "{host}: RARP announces after the arrival: {m:?}");
        }
    }
    // The ping gap is the downtime as the network sees it: pause, switch-over and announce.
    for m in &moves {
        assert!(m.ping_gap_ms > 0.0 && m.ping_gap_ms < 30_000.0, "ping gap: {m:?}");
    }
}

//! Helpers for the root-only end-to-end tests: network namespaces, a running `vmq` with its
//! control socket, processes and TCP streams inside namespaces, raw frame injection. Everything
//! a test creates is removed by a Drop guard, also when the test fails; every wait is bounded.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vmq_control::protocol::{PortCounters, PortState, QueueReport, Reply, Response, SwitchSummary, WorkerInfo};

/// The vmq binary under test.
pub const VMQ: &str = env!("CARGO_BIN_EXE_vmq");

/// Longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// True when the tests can run here (root, `ip`, `ping`, `timeout`); else the test is recorded
/// as skipped (a failure under `VMQ_REQUIRE_ALL=1`) and returns.
pub fn can_run() -> bool {
    vmq_testkit::skip::root_with_tools_or_skip(&vmq_testkit::skip::current_test(), &["ip", "ping", "timeout"])
}

/// A name unique to this test and process: `vqn` + tag + 4 digits of the pid. Keep tags at
/// most 5 bytes so that interface names built from it (plus 2 bytes) stay within 15.
pub fn unique(tag: &str) -> String {
    assert!(tag.len() <= 5, "tag {tag:?} too long for interface names");
    format!("vqn{tag}{:04}", std::process::id() % 10_000)
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; true if it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command with a hard time limit (coreutils `timeout`, SIGKILL 2 s after SIGTERM).
pub fn run_bounded(args: &[&str], limit: Duration) -> Output {
    let secs = format!("{}", limit.as_secs().max(1));
    Command::new("timeout")
        .args(["-k", "2", &secs])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

fn ip(args: &[&str]) -> Output {
    let mut all = vec!["ip"];
    all.extend_from_slice(args);
    run_bounded(&all, Duration::from_secs(10))
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A network namespace made for one test, deleted on drop. IPv6 is off in it, so that the
/// hosts send nothing the test did not ask for (router solicitations, MLD): counters then
/// count exactly the test's traffic.
pub struct Ns {
    name: String,
}

impl Ns {
    pub fn new(name: &str) -> Ns {
        if Path::new("/run/netns").join(name).exists() {
            // Left over from a killed run of this test (same pid digits).
            let _ = ip(&["netns", "del", name]);
        }
        ip_ok(&["netns", "add", name]);
        let ns = Ns { name: name.to_string() };
        for conf in ["all", "default"] {
            ns.sysctl(&format!("net/ipv6/conf/{conf}/disable_ipv6"), "1");
        }
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Takes charge of an existing namespace (deletes it on drop).
    pub fn adopt(name: &str) -> Ns {
        Ns { name: name.to_string() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes a sysctl of this namespace (`key` as a path under /proc/sys).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{key}");
        // /proc/sys/net shows the namespace of the thread that opens it.
        vmq_sys::netns::run_in(&self.name, || std::fs::write(&path, value))
            .expect("enter netns")
            .unwrap_or_else(|e| panic!("sysctl {key} in {}: {e}", self.name));
    }

    /// `ip -n NS ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip_ok(&all);
    }

    /// `ip -n NS ARGS`, whatever comes of it.
    pub fn ip_output(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs a program inside the namespace with a time limit.
    pub fn exec(&self, args: &[&str], limit: Duration) -> Output {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        run_bounded(&all, limit)
    }

    /// Pings `dst` until `count` replies came back (true) or 10 s passed (false). `extra`
    /// goes to ping as it is (`-s 8972 -M do`).
    pub fn ping(&self, dst: &str, count: u32, extra: &[&str]) -> bool {
        let count = count.to_string();
        let mut args = vec!["ping", "-n", "-q", "-c", &count, "-i", "0.1", "-w", "10"];
        args.extend_from_slice(extra);
        args.push(dst);
        self.exec(&args, Duration::from_secs(15)).status.success()
    }

    /// Pings `dst` `count` times at most `secs` seconds and expects no reply at all.
    pub fn ping_fails(&self, dst: &str, count: u32, extra: &[&str]) -> bool {
        let count = count.to_string();
        let mut args = vec!["ping", "-n", "-q", "-c", &count, "-i", "0.1", "-W", "1"];
        args.extend_from_slice(extra);
        args.push(dst);
        let out = self.exec(&args, Duration::from_secs(15));
        !out.status.success() && String::from_utf8_lossy(&out.stdout).contains(" 0 received")
    }

    /// The MAC of interface `ifname` in this namespace.
    pub fn mac(&self, ifname: &str) -> String {
        let out = self.ip_output(&["-o", "link", "show", "dev", ifname]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no MAC in {text}"))
            .to_string()
    }

    /// A permanent neighbour entry: no ARP for `ip` from now on.
    pub fn neigh(&self, ifname: &str, ip: &str, mac: &str) {
        self.ip(&["neigh", "replace", ip, "lladdr", mac, "dev", ifname, "nud", "permanent"]);
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A veth pair with one end in each namespace (deleted with them).
pub fn veth(a: &Ns, a_if: &str, b: &Ns, b_if: &str) {
    veth_with_queues(a, a_if, b, b_if, 1);
}

/// A veth pair whose ends have `queues` receive and transmit queues each.
pub fn veth_with_queues(a: &Ns, a_if: &str, b: &Ns, b_if: &str, queues: u32) {
    let q = queues.to_string();
    let per_end = ["numrxqueues", q.as_str(), "numtxqueues", q.as_str()];
    let peer = ["type", "veth", "peer", "name", b_if, "netns", b.name()];
    ip_ok(&[&["link", "add", a_if, "netns", a.name()][..], &per_end, &peer, &per_end].concat());
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// A temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("vqn-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `[switch]` and `[vmq]` sections for a mode (`"vmq"` or `"switch"`), two workers.
pub fn switch_section(mode: &str) -> String {
    format!("[switch]\nmode = \"{mode}\"\nworkers = 2\n\n[vmq]\nqueues = 4\n\n")
}

/// A `[[port]]` of kind tap named `name`, its interface `ifname` in namespace `ns` (which
/// exists), with `mac`; `extra` lines (`mtu = 9000`, `vlan = 10`) appended.
pub fn tap_port(name: &str, ifname: &str, ns: &Ns, mac: &str, extra: &str) -> String {
    format!(
        "[[port]]\nname = \"{name}\"\nkind = \"tap\"\nifname = \"{ifname}\"\nnetns = \"{}\"\nmac = \"{mac}\"\n{extra}\n",
        ns.name()
    )
}

/// A `[[port]]` of kind uplink over `ifname` in namespace `ns`.
pub fn uplink_port(name: &str, ifname: &str, ns: &Ns, extra: &str) -> String {
    format!(
        "[[port]]\nname = \"{name}\"\nkind = \"uplink\"\nifname = \"{ifname}\"\nnetns = \"{}\"\n{extra}\n",
        ns.name()
    )
}

/// A running `vmq run`, stopped with SIGTERM (then SIGKILL) on drop.
pub struct Vmq {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

/// What became of a `vmq run` that was expected to fail.
pub struct Failed {
    pub code: Option<i32>,
    pub stderr: String,
}

impl Vmq {
    fn spawn(tag: &str, body: &str) -> (Child, TempDir, PathBuf, PathBuf) {
        let dir = TempDir::new(tag);
        let socket = dir.path().join("vmq.sock");
        let log = dir.path().join("vmq.log");
        let config = dir.path().join("vmq.toml");
        let text = format!("{body}\n[control]\nsocket = \"{}\"\nmetrics = \"off\"\n", socket.display());
        std::fs::write(&config, text).expect("write config");
        let log_file = std::fs::File::create(&log).expect("create log");
        let child = Self::spawn_process(&config, log_file);
        (child, dir, socket, log)
    }

    fn spawn_process(config: &Path, log_file: std::fs::File) -> Child {
        Command::new(VMQ)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .expect("start vmq")
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops vmq (SIGTERM, as a service manager does) and starts it again with the same
    /// configuration file and control socket; waits until it answers with every port up.
    pub fn restart(&mut self) {
        self.stop();
        let log_file = std::fs::OpenOptions::new().append(true).open(&self.log).expect("open log");
        self.child = Self::spawn_process(&self._dir.path().join("vmq.toml"), log_file);
        let ready = wait_until(WAIT, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("vmq exited during restart ({status}):\n{}", self.log());
            }
            self.try_show().is_some_and(|s| s.ports.iter().all(|p| p.state == PortState::Up))
        });
        assert!(ready, "vmq did not come back within {WAIT:?}:\n{}", self.log());
    }

    /// SIGTERM (by PID: only the process this test started), then SIGKILL if it lingers.
    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let stopped = wait_until(Duration::from_secs(10), || !matches!(self.child.try_wait(), Ok(None)));
        if !stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Starts vmq with `body` (sections and ports; `[control]` is added) and waits until every
    /// port is up.
    pub fn start(tag: &str, body: &str) -> Vmq {
        Self::start_until_up(tag, body, |_| true)
    }

    /// Starts vmq with `body` and waits until every port for which `expect_up(name)` holds is
    /// up (a vhost-user port without a VM stays down).
    pub fn start_until_up(tag: &str, body: &str, expect_up: impl Fn(&str) -> bool) -> Vmq {
        let (child, dir, socket, log) = Self::spawn(tag, body);
        let mut vmq = Vmq { child, socket, log, _dir: dir };
        let ready = wait_until(WAIT, || {
            if let Ok(Some(status)) = vmq.child.try_wait() {
                panic!("vmq exited during start ({status}):\n{}", vmq.log());
            }
            vmq.try_show()
                .is_some_and(|s| s.ports.iter().filter(|p| expect_up(&p.name)).all(|p| p.state == PortState::Up))
        });
        assert!(ready, "vmq did not bring its ports up within {WAIT:?}:\n{}", vmq.log());
        vmq
    }

    /// Runs vmq with a configuration it must refuse; returns its exit code and stderr. Panics
    /// (after stopping it) if it keeps running.
    pub fn expect_failure(tag: &str, body: &str) -> Failed {
        let (child, dir, socket, log) = Self::spawn(tag, body);
        let mut vmq = Vmq { child, socket, log, _dir: dir };
        let mut status = None;
        wait_until(WAIT, || {
            status = vmq.child.try_wait().ok().flatten();
            status.is_some()
        });
        let Some(status) = status else {
            panic!("vmq kept running with a bad configuration:\n{}", vmq.log());
        };
        Failed { code: status.code(), stderr: vmq.log() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The configuration file vmq runs from (its `[control]` section at the end).
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("vmq.toml")
    }

    /// Everything vmq wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `vmq ctl --socket S --json ARGS`: the exit code and the reply line.
    pub fn ctl_raw(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let sock = self.socket.to_string_lossy().to_string();
        let mut all = vec![VMQ, "ctl", "--socket", &sock, "--json", "--timeout-ms", "5000"];
        all.extend_from_slice(args);
        let out = run_bounded(&all, Duration::from_secs(10));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// `vmq ctl --json ARGS`, which must succeed: the response.
    pub fn ctl(&self, args: &[&str]) -> Response {
        let (code, stdout, stderr) = self.ctl_raw(args);
        assert_eq!(code, Some(0), "vmq ctl {args:?}: {stdout} {stderr}\nvmq log:\n{}", self.log());
        match Reply::from_line(stdout.trim_end().as_bytes()) {
            Ok(Reply(Ok(r))) => r,
            other => panic!("vmq ctl {args:?}: unexpected reply {other:?} from {stdout:?}"),
        }
    }

    fn try_show(&self) -> Option<SwitchSummary> {
        let (code, stdout, _) = self.ctl_raw(&["show"]);
        if code != Some(0) {
            return None;
        }
        match Reply::from_line(stdout.trim_end().as_bytes()) {
            Ok(Reply(Ok(Response::Show(s)))) => Some(s),
            _ => None,
        }
    }

    pub fn show(&self) -> SwitchSummary {
        match self.ctl(&["show"]) {
            Response::Show(s) => s,
            other => panic!("show: {other:?}"),
        }
    }

    pub fn port_state(&self, port: &str) -> Option<PortState> {
        self.show().ports.into_iter().find(|p| p.name == port).map(|p| p.state)
    }

    pub fn stats(&self, port: &str) -> PortCounters {
        match self.ctl(&["stats", port]) {
            Response::Stats(s) => s.ports.into_iter().next().expect("one port"),
            other => panic!("stats: {other:?}"),
        }
    }

    pub fn queues(&self) -> QueueReport {
        match self.ctl(&["queues"]) {
            Response::Queues(q) => q,
            other => panic!("queues: {other:?}"),
        }
    }

    pub fn workers(&self) -> Vec<WorkerInfo> {
        match self.ctl(&["workers"]) {
            Response::Workers { workers } => workers,
            other => panic!("workers: {other:?}"),
        }
    }

    /// Waits until `port`'s counters satisfy `cond`; returns the last counters read.
    pub fn wait_stats(&self, port: &str, cond: impl Fn(&PortCounters) -> bool) -> PortCounters {
        let mut last = self.stats(port);
        let ok = wait_until(WAIT, || {
            last = self.stats(port);
            cond(&last)
        });
        assert!(ok, "counters of {port} never reached the expected values: {last:?}");
        last
    }

    /// Whether the vmq process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Vmq {
    fn drop(&mut self) {
        // SIGTERM: vmq removes its TAPs.
        self.stop();
    }
}

/// `n` random bytes from the kernel.
/// A port's drop counter for `reason` (the test fails if the reason is unknown).
pub fn drops(c: &vmq_control::protocol::PortCounters, reason: &str) -> u64 {
    c.drops.get(reason).copied().unwrap_or_else(|| panic!("no drop reason {reason:?} in {c:?}"))
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).expect("read /dev/urandom");
    buf
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// What a TCP transfer sent and what arrived.
#[derive(Debug)]
pub struct Transfer {
    pub sent_bytes: u64,
    pub sent_sha: [u8; 32],
    pub received_bytes: u64,
    pub received_sha: [u8; 32],
}

impl Transfer {
    pub fn assert_intact(&self) {
        assert_eq!(self.received_bytes, self.sent_bytes, "bytes lost or added");
        assert_eq!(self.received_sha, self.sent_sha, "the data arrived changed");
    }
}

/// A TCP connection from namespace `client` to `server_ip` (an address in namespace
/// `server`): (client side, server side), both with 30 s I/O timeouts.
pub fn tcp_pair(client: &Ns, server: &Ns, server_ip: &str) -> (TcpStream, TcpStream) {
    let ip: Ipv4Addr = server_ip.parse().expect("IPv4 address");
    let listener =
        vmq_sys::netns::run_in(server.name(), || TcpListener::bind((ip, 0))).expect("enter netns").expect("listen");
    let addr: SocketAddr = listener.local_addr().expect("local address");
    let stream = vmq_sys::netns::run_in(client.name(), || TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("connect {addr} from {}: {e}", client.name()));
    // The handshake is done, so the connection waits in the backlog: accept returns at once.
    listener.set_nonblocking(true).expect("non-blocking listener");
    let mut accepted = None;
    wait_until(Duration::from_secs(5), || {
        accepted = listener.accept().ok();
        accepted.is_some()
    });
    let (server_side, _) = accepted.expect("accept the connection");
    server_side.set_nonblocking(false).expect("blocking stream");
    for s in [&stream, &server_side] {
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(30))).expect("timeout");
    }
    (stream, server_side)
}

/// Reads `stream` to its end, hashing: (bytes, SHA-256). `progress` counts bytes as they come.
pub fn drain(mut stream: TcpStream, progress: &AtomicU64) -> (u64, [u8; 32]) {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hash.update(&buf[..n]);
                total += n as u64;
                progress.store(total, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("receive after {total} bytes: {e}"),
        }
    }
    (total, hash.finalize().into())
}

/// Sends `data` over TCP from namespace `client` to `server_ip` in namespace `server`.
pub fn tcp_transfer(client: &Ns, server: &Ns, server_ip: &str, data: &[u8]) -> Transfer {
    let (mut tx, rx) = tcp_pair(client, server, server_ip);
    let progress = AtomicU64::new(0);
    let (received_bytes, received_sha) = std::thread::scope(|s| {
        let reader = s.spawn(|| drain(rx, &progress));
        tx.write_all(data).expect("send");
        tx.shutdown(std::net::Shutdown::Write).expect("shutdown");
        reader.join().expect("receiver")
    });
    Transfer { sent_bytes: data.len() as u64, sent_sha: sha256(data), received_bytes, received_sha }
}

/// A TCP stream that runs until stopped: the sender cycles through a block of random bytes.
pub struct Stream {
    stop: Arc<AtomicBool>,
    pub received: Arc<AtomicU64>,
    sender: Option<std::thread::JoinHandle<(u64, [u8; 32])>>,
    receiver: Option<std::thread::JoinHandle<(u64, [u8; 32])>>,
}

impl Stream {
    pub fn start(client: &Ns, server: &Ns, server_ip: &str) -> Stream {
        let (mut tx, rx) = tcp_pair(client, server, server_ip);
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let block = random_bytes(3 * 1024 * 1024 + 7);
        let sender = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut hash = Sha256::new();
                let (mut sent, mut at) = (0u64, 0usize);
                while !stop.load(Ordering::Relaxed) {
                    let end = (at + 64 * 1024).min(block.len());
                    tx.write_all(&block[at..end]).expect("send");
                    hash.update(&block[at..end]);
                    sent += (end - at) as u64;
                    at = if end == block.len() { 0 } else { end };
                }
                tx.shutdown(std::net::Shutdown::Write).expect("shutdown");
                (sent, hash.finalize().into())
            })
        };
        let receiver = {
            let received = received.clone();
            std::thread::spawn(move || drain(rx, &received))
        };
        Stream { stop, received, sender: Some(sender), receiver: Some(receiver) }
    }

    /// Waits until at least `bytes` more arrived than now.
    pub fn wait_progress(&self, bytes: u64) {
        let start = self.received.load(Ordering::Relaxed);
        let ok = wait_until(WAIT, || self.received.load(Ordering::Relaxed) >= start + bytes);
        assert!(ok, "the stream stalled at {} bytes", self.received.load(Ordering::Relaxed));
    }

    /// Stops the sender and waits for the receiver to see the end.
    pub fn finish(mut self) -> Transfer {
        self.stop.store(true, Ordering::Relaxed);
        let (sent_bytes, sent_sha) = self.sender.take().expect("sender").join().expect("sender thread");
        let (received_bytes, received_sha) = self.receiver.take().expect("receiver").join().expect("receiver thread");
        Transfer { sent_bytes, sent_sha, received_bytes, received_sha }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // A failed test: let the threads end (their sockets time out or close with the
        // namespaces); they are not joined.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends raw Ethernet frames out of `ifname` in namespace `ns` (an AF_PACKET socket there).
pub fn inject(ns: &Ns, ifname: &str, frames: &[Vec<u8>]) {
    let socket = vmq_sys::packet::PacketSocket::open_tx(ifname, Some(ns.name()))
        .unwrap_or_else(|e| panic!("packet socket on {ifname}: {e}"));
    for f in frames {
        let sent = wait_until(Duration::from_secs(5), || socket.send(&[0u8; 12], &[f]).is_ok());
        assert!(sent, "cannot send a {}-byte frame on {ifname}: {:?}", f.len(), socket.send(&[0u8; 12], &[f]));
    }
}

pub fn parse_mac(mac: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    let parts: Vec<&str> = mac.split(':').collect();
    assert_eq!(parts.len(), 6, "MAC {mac}");
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).expect("hex MAC");
    }
    out
}

/// An Ethernet frame: `dst`, `src`, `ethertype`, then `payload`.
pub fn ethernet(dst: &str, src: &str, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&parse_mac(dst));
    f.extend_from_slice(&parse_mac(src));
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A frame of `len` bytes from `src` to `dst` with an experimental ethertype: nothing a
/// receiving stack answers.
pub fn filler_frame(dst: &str, src: &str, len: usize) -> Vec<u8> {
    let mut f = ethernet(dst, src, 0x88b5, &[]);
    f.resize(len.max(14), 0x5a);
    f
}

/// A host in its own namespace behind a TAP port of vmq: 10.0.0.`n`, MAC 02:00:00:00:00:`n`.
pub struct TapHost {
    pub ns: Ns,
    pub ifname: String,
    pub mac: String,
    pub ip: String,
}

impl TapHost {
    pub fn new(prefix: &str, role: &str, n: u8) -> TapHost {
        let name = format!("{prefix}{role}");
        TapHost { ns: Ns::new(&name), ifname: name, mac: format!("02:00:00:00:00:{n:02x}"), ip: format!("10.0.0.{n}") }
    }

    /// Its `[[port]]` (`extra`: more keys).
    pub fn port(&self, name: &str, extra: &str) -> String {
        tap_port(name, &self.ifname, &self.ns, &self.mac, extra)
    }

    /// Gives the interface vmq made its address (after vmq is up).
    pub fn address(&self) {
        self.ns.ip(&["addr", "add", &format!("{}/24", self.ip), "dev", &self.ifname]);
    }

    /// A permanent neighbour entry for `other`: no ARP between the two.
    pub fn knows(&self, other: &TapHost) {
        self.ns.neigh(&self.ifname, &other.ip, &other.mac);
    }
}

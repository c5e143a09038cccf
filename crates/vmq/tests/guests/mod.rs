//! Support for the end-to-end tests with real guests: the `vmq` binary as a child process with a
//! generated configuration, network namespaces, host processes in them, and helpers over the
//! guest harness of `vmq-testkit`. Everything started here is stopped by PID and everything
//! created is removed when its guard drops, also when a test fails.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use vmq_control::protocol::{PortCounters, PortInfo, PortState, Reply, Response, SwitchSummary};
use vmq_testkit::qemu::{Guest, GuestConfig, GuestImage};

/// Polling period of conditions checked against a deadline.
const POLL: Duration = Duration::from_millis(50);

/// Waits until `ready` returns `Some`, checking every 50 ms, at most `timeout`; panics with
/// `what` (and what the last check said) otherwise.
pub fn wait_for<T>(what: &str, timeout: Duration, mut ready: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match ready() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("no {what} within {:.1} s; last: {last}", timeout.as_secs_f64())
            }
            // A bounded poll of a condition, not a sleep standing in for one.
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// True when the test can run here: root (namespaces, TAP, AF_PACKET), `ip`, `iperf3` and
/// `ping`. Otherwise the test is recorded as skipped (a failure under `VMQ_REQUIRE_ALL=1`).
pub fn root_or_skip(test: &str) -> bool {
    vmq_testkit::skip::root_with_tools_or_skip(test, &["ip", "iperf3", "ping"])
}

/// A directory for one test's files (configuration, sockets, vmq's log), removed on drop.
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        let path = std::env::temp_dir().join(format!("vqq-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the test directory");
        TestDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A name unique to this process for namespaces and interfaces: `vqq` + tag + pid.
pub fn unique(tag: &str) -> String {
    format!("vqq{tag}{}", std::process::id() % 100_000)
}

/// Runs a host command to completion; panics with its output unless it succeeds.
#[track_caller]
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} failed ({}):\n{text}", args.join(" "), out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace: created by this test (`ip netns add`) or by vmq for a TAP port
/// (`create_netns`); deleted on drop either way if it still exists.
pub struct Netns(String);

impl Netns {
    pub fn create(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
        sh(&["ip", "netns", "add", name]);
        sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
        Netns(name.to_string())
    }

    /// A namespace someone else creates; this guard only removes it.
    pub fn adopt(name: &str) -> Netns {
        Netns(name.to_string())
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// Runs `ip -n NS ARGS`.
    #[track_caller]
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", &self.0];
        all.extend_from_slice(args);
        sh(&all);
    }

    /// A command line run inside the namespace, killed after `timeout` (coreutils timeout).
    pub fn command(&self, timeout: Duration, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, "timeout", "-s", "KILL", &timeout.as_secs().max(1).to_string()]);
        c.args(args);
        c
    }

    /// Runs a command in the namespace; returns its exit status and stdout+stderr.
    pub fn run(&self, timeout: Duration, args: &[&str]) -> (ExitStatus, String) {
        let out = self.command(timeout, args).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status, text)
    }

    /// Runs a command in the namespace; panics unless it succeeds. Returns its stdout.
    #[track_caller]
    pub fn run_ok(&self, timeout: Duration, args: &[&str]) -> String {
        let out = self.command(timeout, args).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "in {}: {} failed ({}):\n{stdout}{}",
            self.0,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Starts a command in the namespace in the background; killed by PID on drop.
    pub fn spawn(&self, args: &[&str]) -> HostProcess {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        HostProcess { child: Some(child), what: args.join(" ") }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if Path::new("/run/netns").join(&self.0).exists() {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
}

/// A host process started by a test (`ip netns exec` execs the command in place, so this PID
/// is the command's own). Killed with SIGKILL by PID on drop.
pub struct HostProcess {
    child: Option<Child>,
    what: String,
}

impl HostProcess {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGINT (ping prints its summary), waits at most `timeout` for the exit and
    /// returns the output.
    pub fn interrupt(mut self, timeout: Duration) -> String {
        let Some(mut child) = self.child.take() else { return String::new() };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        let deadline = Instant::now() + timeout;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(POLL);
        }
        let out = child.wait_with_output().expect("collect a host process");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("(host process {:?} killed)", self.what);
            }
        }
    }
}

/// The `vmq` binary running a test's configuration. Stopped by PID on drop (SIGTERM, then
/// SIGKILL after 10 s); its log is printed when a test fails.
pub struct Vmq {
    child: Child,
    control: PathBuf,
    log: PathBuf,
}

/// Counters of every port, by name.
pub type Stats = BTreeMap<String, PortCounters>;

impl Vmq {
    /// Writes `config` to `dir/vmq.toml`, starts `vmq run` and waits until its control socket
    /// answers. `config` must set `[control] socket` to [`Vmq::control_socket`] of `dir`.
    pub fn start(dir: &TestDir, config: &str) -> Vmq {
        let path = dir.join("vmq.toml");
        std::fs::write(&path, config).expect("write vmq.toml");
        let log = dir.join("vmq.log");
        let log_file = std::fs::File::create(&log).expect("create vmq.log");
        let child = Command::new(env!("CARGO_BIN_EXE_vmq"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log fd"))
            .stderr(log_file)
            .spawn()
            .expect("start vmq");
        let mut vmq = Vmq { child, control: Self::control_socket(dir), log };
        wait_for("answer on vmq's control socket", Duration::from_secs(30), || {
            if let Ok(Some(status)) = vmq.child.try_wait() {
                panic!("vmq exited at start ({status}):\n{}", vmq.log_text());
            }
            vmq.try_ctl(&["show"]).map(|_| ())
        });
        vmq
    }

    /// kill -9 vmq (no cleanup: its socket files stay behind, as after a crash) and reap it.
    pub fn kill9(&mut self) {
        // Our child, not reaped yet: its PID cannot have been reused.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Every port as `vmq ctl ports` reports it.
    pub fn ports(&self) -> Result<Vec<PortInfo>, String> {
        match self.try_ctl(&["ports"])? {
            Response::Ports { ports } => Ok(ports),
            other => Err(format!("ports answered {other:?}")),
        }
    }

    pub fn control_socket(dir: &TestDir) -> PathBuf {
        dir.join("ctl.sock")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `vmq ctl --json ARGS` through the binary, parsed.
    pub fn try_ctl(&self, args: &[&str]) -> Result<Response, String> {
        let out = Command::new(env!("CARGO_BIN_EXE_vmq"))
            .arg("ctl")
            .arg("--socket")
            .arg(&self.control)
            .args(["--json", "--timeout-ms", "5000"])
            .args(args)
            .output()
            .map_err(|e| format!("vmq ctl: {e}"))?;
        let line = String::from_utf8_lossy(&out.stdout);
        match Reply::from_line(line.trim().as_bytes()) {
            Ok(Reply(Ok(response))) => Ok(response),
            Ok(Reply(Err(e))) => Err(format!("vmq ctl {args:?}: {e:?}")),
            Err(e) => {
                Err(format!("vmq ctl {args:?} ({}): {e}: {line}{}", out.status, String::from_utf8_lossy(&out.stderr)))
            }
        }
    }

    #[track_caller]
    pub fn show(&self) -> SwitchSummary {
        match self.try_ctl(&["show"]) {
            Ok(Response::Show(s)) => s,
            other => panic!("vmq ctl show: {other:?}"),
        }
    }

    #[track_caller]
    pub fn stats(&self) -> Stats {
        match self.try_ctl(&["stats"]) {
            Ok(Response::Stats(report)) => report.ports.into_iter().map(|c| (c.port.clone(), c)).collect(),
            other => panic!("vmq ctl stats: {other:?}"),
        }
    }

    /// State of each port, by name.
    pub fn states(&self) -> Result<BTreeMap<String, PortState>, String> {
        match self.try_ctl(&["show"])? {
            Response::Show(s) => Ok(s.ports.into_iter().map(|p: PortInfo| (p.name, p.state)).collect()),
            other => Err(format!("show answered {other:?}")),
        }
    }

    /// Waits until every port in `ports` is in `state`.
    pub fn wait_state(&self, ports: &[&str], state: PortState, timeout: Duration) {
        wait_for(&format!("ports {ports:?} {}", state.name()), timeout, || {
            let states = self.states()?;
            if ports.iter().all(|p| states.get(*p) == Some(&state)) { Ok(()) } else { Err(format!("{states:?}")) }
        });
    }
}

impl Drop for Vmq {
    fn drop(&mut self) {
        // Reaped already (`kill9`): its PID may belong to someone else now.
        if let Ok(Some(_)) = self.child.try_wait() {
            return self.print_log_if_panicking();
        }
        // Our child: its PID cannot have been reused before we reap it.
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut exited = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(POLL);
        }
        if !exited {
            eprintln!("vmq (pid {}) did not stop on SIGTERM within 10 s: SIGKILL", self.child.id());
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.print_log_if_panicking();
    }
}

impl Vmq {
    fn print_log_if_panicking(&self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- vmq log (pid {}, last 60 lines) ---\n{}\n--- end of vmq log ---",
                self.child.id(),
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
    }
}

/// The difference of two counter snapshots of one port (`after - before`).
#[derive(Debug, Default, Clone)]
pub struct Delta {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: BTreeMap<String, u64>,
    pub segments: u64,
    pub csum_finished: u64,
    pub coalesced: u64,
    pub gso_passed: u64,
}

impl Delta {
    pub fn between(before: &Stats, after: &Stats, port: &str) -> Delta {
        let zero = PortCounters::default();
        let b = before.get(port).unwrap_or(&zero);
        let a = after.get(port).unwrap_or_else(|| panic!("no counters for port {port}"));
        Delta {
            rx_packets: a.rx_packets - b.rx_packets,
            rx_bytes: a.rx_bytes - b.rx_bytes,
            tx_packets: a.tx_packets - b.tx_packets,
            tx_bytes: a.tx_bytes - b.tx_bytes,
            drops: a
                .drops
                .iter()
                .map(|(k, v)| (k.clone(), v - b.drops.get(k).copied().unwrap_or(0)))
                .filter(|(_, v)| *v != 0)
                .collect(),
            segments: a.offload.segments - b.offload.segments,
            csum_finished: a.offload.csum_finished - b.offload.csum_finished,
            coalesced: a.offload.coalesced - b.offload.coalesced,
            gso_passed: a.offload.gso_passed - b.offload.gso_passed,
        }
    }

    pub fn drop_count(&self, reason: &str) -> u64 {
        self.drops.get(reason).copied().unwrap_or(0)
    }
}

/// No IPv6 addresses in the guests: no router solicitations, DAD or MLD reports, so that the
/// counters the tests read hold only the traffic the tests make (and ARP).
pub const QUIET_GUEST: &str = "ipv6.disable_ipv6=1";

/// Boots all guests at once and waits for each; returns them in order.
pub fn boot_all(image: &GuestImage, configs: Vec<GuestConfig>) -> Vec<Guest> {
    let mut guests: Vec<Guest> =
        configs.into_iter().map(|c| Guest::spawn(image, c).unwrap_or_else(|e| panic!("start QEMU: {e}"))).collect();
    for g in &mut guests {
        let timeout = vmq_testkit::qemu::DEFAULT_BOOT_TIMEOUT;
        g.wait_ready(timeout).unwrap_or_else(|e| panic!("{e}"));
    }
    guests
}

/// Waits (in the guest, at most 20 s) for eth0's carrier.
pub fn wait_link_up(guest: &mut Guest) {
    guest.run_ok(
        "for i in $(seq 200); do [ \"$(cat /sys/class/net/eth0/operstate)\" = up ] && exit 0; sleep 0.1; done; \
         echo operstate $(cat /sys/class/net/eth0/operstate); exit 1",
    );
}

/// Starts `iperf3 -s -D` in the guest and waits until it listens.
pub fn start_iperf3_server(guest: &mut Guest) {
    guest.run_ok("iperf3 -s -D");
    guest.run_ok("for i in $(seq 100); do netstat -ltn | grep -q ':5201 ' && exit 0; sleep 0.1; done; exit 1");
}

/// One iperf3 run (`-J` output): the receiver's rate and the sender's retransmissions.
#[derive(Debug, Clone, Copy)]
pub struct Iperf {
    pub bits_per_second: f64,
    pub retransmits: u64,
    pub bytes: u64,
}

pub fn parse_iperf3_json(json: &str) -> Result<Iperf, String> {
    // The guest console may carry a line before the JSON object (nothing should, but be exact
    // about where the object starts).
    let start = json.find('{').ok_or_else(|| format!("no JSON in iperf3 output: {json}"))?;
    let v: serde_json::Value = serde_json::from_str(&json[start..]).map_err(|e| format!("{e}: {json}"))?;
    if let Some(err) = v.get("error") {
        return Err(format!("iperf3: {err}"));
    }
    let end = &v["end"];
    let missing = |what: &str| format!("no {what} in iperf3's report: {}", &json[json.len().saturating_sub(2000)..]);
    let bits_per_second = end["sum_received"]["bits_per_second"].as_f64().ok_or_else(|| missing("receiver rate"))?;
    let bytes = end["sum_received"]["bytes"].as_f64().ok_or_else(|| missing("receiver bytes"))? as u64;
    let retransmits = end["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok(Iperf { bits_per_second, retransmits, bytes })
}

/// `iperf3 -c SERVER -t SECS -J [-R]` in `guest`.
#[track_caller]
pub fn guest_iperf3(guest: &mut Guest, server: &str, secs: u32, reverse: bool) -> Iperf {
    let r = if reverse { " -R" } else { "" };
    let out = guest
        .run(&format!("iperf3 -c {server} -t {secs} -J{r}"), Duration::from_secs(u64::from(secs) + 30))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status, 0, "iperf3 -c {server}{r} in {}:\n{}", guest.name(), out.output);
    parse_iperf3_json(&out.output).unwrap_or_else(|e| panic!("{e}"))
}

/// The lines of a ping summary: (transmitted, received).
pub fn ping_counts(output: &str) -> Option<(u32, u32)> {
    let line = output.lines().find(|l| l.contains("packets transmitted"))?;
    let mut numbers = line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
    let sent = numbers.next()?.parse().ok()?;
    let received = numbers.next()?.parse().ok()?;
    Some((sent, received))
}

/// `ping -c COUNT` in the guest (busybox), replies awaited at most `wait` seconds after the
/// last request; returns (transmitted, received, output).
pub fn guest_ping(guest: &mut Guest, args: &str, count: u32, wait: u32) -> (u32, u32, String) {
    let out = guest
        .run(&format!("ping -c {count} -i 0.2 -W {wait} {args}"), Duration::from_secs(u64::from(count + wait) + 20))
        .unwrap_or_else(|e| panic!("{e}"));
    let (sent, received) =
        ping_counts(&out.output).unwrap_or_else(|| panic!("no ping summary in {}:\n{}", guest.name(), out.output));
    (sent, received, out.output)
}

/// Asserts every ping of `ping -c COUNT ARGS` in the guest is answered.
#[track_caller]
pub fn assert_ping(guest: &mut Guest, args: &str, count: u32) {
    let (sent, received, output) = guest_ping(guest, args, count, 5);
    assert!(
        sent == count && received == count,
        "ping {args} from {}: {sent} sent, {received} back:\n{output}",
        guest.name()
    );
}

/// Asserts no ping of `ping -c COUNT ARGS` in the guest is answered (within a second of the
/// last request: between guests on one host a reply takes milliseconds).
#[track_caller]
pub fn assert_no_ping(guest: &mut Guest, args: &str, count: u32) {
    let (_, received, output) = guest_ping(guest, args, count, 1);
    assert_eq!(received, 0, "ping {args} from {} must not be answered:\n{output}", guest.name());
}

/// A vhost-user port's `[[port]]` table.
pub fn vhost_port(dir: &TestDir, name: &str, mac: &str, mtu: u16, vlan: u16, offloads: bool) -> String {
    format!(
        "[[port]]\nname = \"{name}\"\nkind = \"vhost-user\"\nsocket = \"{}\"\nmac = \"{mac}\"\nmtu = {mtu}\nvlan = {vlan}\noffloads = {offloads}\n\n",
        dir.join(&format!("{name}.sock")).display()
    )
}

/// A vhost-user port's `[[port]]` table with `vhost_mode` ("server" or "client").
pub fn vhost_port_mode(dir: &TestDir, name: &str, mac: &str, mode: &str) -> String {
    vhost_port(dir, name, mac, 1500, 0, true) + &format!("vhost_mode = \"{mode}\"\n\n")
}

/// The `[switch]` and `[control]` tables of a test configuration (metrics off: no TCP port).
pub fn switch_header(dir: &TestDir, workers: u32) -> String {
    format!(
        "[switch]\nmode = \"vmq\"\nworkers = {workers}\n\n[control]\nsocket = \"{}\"\nmetrics = \"off\"\n\n",
        Vmq::control_socket(dir).display()
    )
}

/// The guest configuration for a port made by [`vhost_port`].
pub fn guest_config(dir: &TestDir, name: &str, mac: &str, ip: &str) -> GuestConfig {
    GuestConfig::new(name, dir.join(&format!("{name}.sock")), mac)
        .ipv4(ip.parse().expect("test IPv4 address"), 24)
        .kernel_arg(QUIET_GUEST)
}

//! vmq as a service: the systemd unit (`systemd-analyze verify`), readiness notification
//! (READY=1, RELOADING=1, STOPPING=1 on `$NOTIFY_SOCKET`), reload on SIGHUP (applied under
//! traffic; an invalid file refused with nothing changed) and `vmq ctl save` (the running
//! configuration back into the file, comments kept, read again by a restarted vmq).
//!
//! The notify, save and refused-reload tests use `mem` ports and run without root; the unit
//! check and the reload under traffic (TAP ports in network namespaces) need root.

mod support;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::*;
use vmq_control::protocol::{PortInfo, Request, Response};

/// A test-owned `$NOTIFY_SOCKET`: an abstract datagram socket, as systemd's.
struct NotifySocket {
    socket: UnixDatagram,
    name: String,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("vmq-test-notify-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        NotifySocket { socket, name: format!("@{name}") }
    }

    /// The next datagram, within [`WAIT`]. A signal to this thread (another test's child
    /// exiting) interrupts the wait; it is taken up again for the time left.
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let deadline = std::time::Instant::now() + WAIT;
        self.socket.set_read_timeout(Some(WAIT)).unwrap();
        loop {
            match self.socket.recv(&mut buf) {
                Ok(n) => return String::from_utf8_lossy(&buf[..n]).to_string(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    assert!(!left.is_zero(), "no notification within {WAIT:?}: {e}");
                    self.socket.set_read_timeout(Some(left)).unwrap();
                }
                Err(e) => panic!("no notification within {WAIT:?}: {e}"),
            }
        }
    }
}

/// `vmq run` on a configuration file of the test's, stopped with SIGTERM (by PID) on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(config: &Path, log: &Path, notify: Option<&NotifySocket>) -> Daemon {
        let log_file = std::fs::File::create(log).unwrap();
        let mut command = Command::new(VMQ);
        command
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        if let Some(n) = notify {
            command.env("NOTIFY_SOCKET", &n.name);
        }
        Daemon { child: command.spawn().unwrap(), log: log.to_path_buf() }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// SIGTERM, then the exit status within [`WAIT`].
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal(Signal::SIGTERM);
        let mut status = None;
        assert!(
            wait_until(WAIT, || {
                status = self.child.try_wait().unwrap();
                status.is_some()
            }),
            "vmq did not stop on SIGTERM:\n{}",
            self.log()
        );
        status.unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            if !wait_until(Duration::from_secs(10), || !matches!(self.child.try_wait(), Ok(None))) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

fn call(socket: &Path, request: &Request) -> Result<Response, String> {
    vmq_control::client::call(socket, request, Duration::from_secs(5)).map_err(|e| e.to_string())
}

fn ports(socket: &Path) -> Vec<PortInfo> {
    match call(socket, &Request::Ports) {
        Ok(Response::Ports { ports }) => ports,
        other => panic!("ports: {other:?}"),
    }
}

/// `vmq ctl --socket S ARGS` (the binary, as an operator runs it), which must succeed.
fn ctl_ok(socket: &Path, args: &[&str]) -> String {
    let mut all = vec![VMQ, "ctl", "--socket", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = run_bounded(&all, Duration::from_secs(10));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "vmq ctl {args:?}: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn mem_port(name: &str, n: u8, extra: &str) -> String {
    format!("[[port]]\nname = \"{name}\"\nkind = \"mem\"\nmac = \"52:54:00:00:00:{n:02x}\"\n{extra}\n")
}

fn control(socket: &Path) -> String {
    format!("[control]\nsocket = \"{}\"\nmetrics = \"off\"\n", socket.display())
}

// ---------------------------------------------------------------------------------------------

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let test = vmq_testkit::skip::current_test();
    if !vmq_testkit::skip::root_with_tools_or_skip(&test, &["systemd-analyze"]) {
        return;
    }
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../contrib/vmq.service")).unwrap();
    for needed in [
        "Type=notify",
        "RuntimeDirectory=vmq",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SYS_ADMIN",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed:?}");
    }
    // verify checks that ExecStart's program exists: point it at the binary under test.
    let dir = TempDir::new("unit");
    let copy = dir.path().join("vmq.service");
    std::fs::write(&copy, unit.replace("/usr/bin/vmq", VMQ)).unwrap();
    let out = run_bounded(&["systemd-analyze", "verify", copy.to_str().unwrap()], Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are warnings with exit status 0: any output is a finding.
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}

#[test]
fn ready_is_notified_once_the_control_socket_answers_then_reloading_and_stopping() {
    let dir = TempDir::new("notify");
    let socket = dir.path().join("vmq.sock");
    let config = dir.path().join("vmq.toml");
    std::fs::write(&config, format!("[switch]\nworkers = 1\n{}{}", mem_port("m1", 1, ""), control(&socket))).unwrap();
    let notify = NotifySocket::new();
    let vmq = Daemon::start(&config, &dir.path().join("vmq.log"), Some(&notify));

    let first = notify.next();
    assert!(first.lines().any(|l| l == "READY=1"), "first notification {first:?}:\n{}", vmq.log());
    // Ready means ready: the control socket answers with the data path's ports.
    let names: Vec<String> = ports(&socket).into_iter().map(|p| p.name).collect();
    assert_eq!(names, vec!["m1".to_string()]);

    vmq.signal(Signal::SIGHUP);
    let reloading = notify.next();
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading:?}");
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading:?}");
    let ready = notify.next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");

    vmq.signal(Signal::SIGTERM);
    let stopping = notify.next();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(vmq.stop().success());
}

#[test]
fn a_bad_or_restart_only_reload_is_refused_and_changes_nothing() {
    let dir = TempDir::new("badrl");
    let socket = dir.path().join("vmq.sock");
    let config = dir.path().join("vmq.toml");
    let good = format!("[switch]\nworkers = 1\n{}{}{}", mem_port("m1", 1, ""), mem_port("m2", 2, ""), control(&socket));
    std::fs::write(&config, &good).unwrap();
    let notify = NotifySocket::new();
    let vmq = Daemon::start(&config, &dir.path().join("vmq.log"), Some(&notify));
    assert!(notify.next().contains("READY=1"));
    let before = ports(&socket);

    let reload = |text: &str| {
        std::fs::write(&config, text).unwrap();
        vmq.signal(Signal::SIGHUP);
        assert!(notify.next().contains("RELOADING=1"));
        assert!(notify.next().contains("READY=1"), "the reload did not end:\n{}", vmq.log());
    };
    // An invalid value (m2 removed too: nothing of it may apply), a syntax error, and a change
    // only a restart can make.
    reload(&format!("[switch]\nworkers = 1\n{}{}", mem_port("m1", 1, "mtu = 9001"), control(&socket)));
    reload("[switch\nworkers = 1\n");
    reload(&format!("[switch]\nworkers = 2\n{}{}{}", mem_port("m1", 1, ""), mem_port("m3", 3, ""), control(&socket)));
    let log = vmq.log();
    assert_eq!(log.matches("reload refused").count(), 3, "{log}");
    assert!(log.contains("mtu must be from 68 to 9000"), "{log}");
    assert!(log.contains("[switch] workers cannot change"), "{log}");
    assert_eq!(ports(&socket), before, "a refused reload changed the switch");

    // The same file, fixed: applied.
    reload(&format!("[switch]\nworkers = 1\n{}{}", mem_port("m1", 1, "mtu = 9000"), control(&socket)));
    let after = ports(&socket);
    assert_eq!(after.iter().map(|p| (p.name.as_str(), p.mtu)).collect::<Vec<_>>(), vec![("m1", 9000)]);
    assert!(vmq.stop().success());
}

#[test]
fn save_persists_run_time_changes_and_keeps_comments() {
    let dir = TempDir::new("save");
    let socket = dir.path().join("vmq.sock");
    let config = dir.path().join("vmq.toml");
    let text = format!(
        "# Host A's switch: this comment must survive a save.\n[switch]\nworkers = 1 # one core is enough here\n\n[vmq]\nqueues = 4\n\n# The first VM.\n{}# The second VM, removed at run time.\n{}{}",
        mem_port("m1", 1, ""),
        mem_port("m2", 2, ""),
        control(&socket)
    );
    std::fs::write(&config, &text).unwrap();
    let notify = NotifySocket::new();
    let vmq = Daemon::start(&config, &dir.path().join("vmq.log"), Some(&notify));
    assert!(notify.next().contains("READY=1"));

    ctl_ok(&socket, &["add-port", "--name", "m3", "--kind", "mem", "--mac", "52:54:00:00:00:03", "--mtu", "9000"]);
    ctl_ok(&socket, &["del-port", "m2"]);
    ctl_ok(&socket, &["set", "port", "m1", "mtu", "4000"]);
    ctl_ok(&socket, &["set", "queues", "2"]);
    let running = ports(&socket);
    let said = ctl_ok(&socket, &["save"]);
    assert!(said.contains("saved the running configuration to"), "{said}");
    assert!(vmq.stop().success());

    let saved = std::fs::read_to_string(&config).unwrap();
    for kept in [
        "# Host A's switch: this comment must survive a save.",
        "workers = 1 # one core is enough here",
        "# The first VM.",
    ] {
        assert!(saved.contains(kept), "{kept:?} lost:\n{saved}");
    }
    assert!(!saved.contains("m2"), "{saved}");
    assert!(saved.contains("queues = 2"), "{saved}");

    // A new vmq on the saved file runs what the old one ran.
    let notify = NotifySocket::new();
    let vmq = Daemon::start(&config, &dir.path().join("vmq2.log"), Some(&notify));
    assert!(notify.next().contains("READY=1"), "{}", vmq.log());
    assert_eq!(ports(&socket), running);
    match call(&socket, &Request::Show) {
        Ok(Response::Show(s)) => assert_eq!(s.queue_budget, 2),
        other => panic!("show: {other:?}"),
    }
    // Nothing changed since: a second save leaves the file byte for byte.
    ctl_ok(&socket, &["save"]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), saved);
    assert!(vmq.stop().success());
}

// ---------------------------------------------------------------------------------------------
// Reload under traffic (root): TAP ports in namespaces.

/// A host in its own namespace behind TAP port `name`: 10.0.0.`n`, MAC 02:00:00:00:00:`n`.
struct Host {
    ns: Ns,
    name: String,
    ifname: String,
    mac: String,
    ip: String,
}

impl Host {
    fn new(prefix: &str, name: &str, n: u8) -> Host {
        let ifname = format!("{prefix}{name}");
        Host {
            ns: Ns::new(&ifname),
            name: name.to_string(),
            ifname,
            mac: format!("02:00:00:00:00:{n:02x}"),
            ip: format!("10.0.0.{n}"),
        }
    }

    fn port(&self, extra: &str) -> String {
        tap_port(&self.name, &self.ifname, &self.ns, &self.mac, extra)
    }
}

fn packets(ping_output: &str) -> (u64, u64) {
    let line = ping_output.lines().find(|l| l.contains("packets transmitted")).unwrap_or_default();
    let mut numbers = line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap());
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

#[test]
fn sighup_applies_the_file_under_traffic_without_losing_a_frame() {
    if !can_run() {
        return;
    }
    let p = unique("rl");
    let (a, b, c, d, e) = (
        Host::new(&p, "a", 1),
        Host::new(&p, "b", 2),
        Host::new(&p, "c", 3),
        Host::new(&p, "d", 4),
        Host::new(&p, "e", 5),
    );
    let sections = "[switch]\nmode = \"vmq\"\nworkers = 2\n\n[vmq]\nqueues = 4\n\n";
    let vmq = Vmq::start(&p, &[sections, &a.port(""), &b.port(""), &c.port(""), &d.port("")].concat());
    for h in [&a, &b] {
        h.ns.ip(&["addr", "add", &format!("{}/24", h.ip), "dev", &h.ifname]);
    }
    // Static neighbours: the stream is ICMP alone, no ARP.
    a.ns.neigh(&a.ifname, &b.ip, &b.mac);
    b.ns.neigh(&b.ifname, &a.ip, &a.mac);
    assert!(a.ns.ping(&b.ip, 3, &[]), "a cannot reach b before the reload");
    let (a0, b0) = (vmq.stats("a"), vmq.stats("b"));

    // A steady stream a -> b: 1500 echo requests 4 ms apart (6 s), every reply counted.
    let ns = a.ns.name().to_string();
    let dst = b.ip.clone();
    let stream = std::thread::spawn(move || {
        let out = run_bounded(
            &["ip", "netns", "exec", &ns, "ping", "-n", "-q", "-c", "1500", "-i", "0.004", "-W", "2", &dst],
            Duration::from_secs(30),
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    });
    assert!(wait_until(WAIT, || vmq.stats("b").tx_packets >= b0.tx_packets + 50), "the stream did not start");

    // The new file: e added, c's MTU changed, d removed; a and b as they were.
    let original = std::fs::read_to_string(vmq.config_path()).unwrap();
    let control = &original[original.find("\n[control]\n").expect("[control] in the test's file")..];
    let new = [sections, &a.port(""), &b.port(""), &c.port("mtu = 4000"), &e.port(""), control].concat();
    std::fs::write(vmq.config_path(), new).unwrap();
    nix::sys::signal::kill(Pid::from_raw(vmq.pid() as i32), Signal::SIGHUP).unwrap();
    let applied = wait_until(WAIT, || {
        let Response::Ports { ports } = vmq.ctl(&["ports"]) else { return false };
        let names: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
        names.contains(&"e") && !names.contains(&"d") && ports.iter().any(|p| p.name == "c" && p.mtu == 4000)
    });
    assert!(applied, "the reload did not take effect:\n{}", vmq.log());
    assert!(!stream.is_finished(), "the stream ended before the reload was applied: the test proves nothing");
    let output = stream.join().unwrap();

    let (sent, received) = packets(&output);
    assert_eq!(sent, 1500, "{output}");
    assert_eq!(received, sent, "the stream lost replies across the reload: {output}\n{}", vmq.log());
    let (a1, b1) = (vmq.stats("a"), vmq.stats("b"));
    assert_eq!(a1.total_drops(), a0.total_drops(), "a dropped frames: {a1:?}");
    assert_eq!(b1.total_drops(), b0.total_drops(), "b dropped frames: {b1:?}");
    assert!(b1.tx_packets >= b0.tx_packets + 1500 && a1.tx_packets >= a0.tx_packets + 1500, "{a1:?} {b1:?}");
    // The changes reached the kernel side too: c's TAP has the new MTU, e's TAP exists.
    let link = c.ns.ip_output(&["link", "show", &c.ifname]);
    assert!(String::from_utf8_lossy(&link.stdout).contains("mtu 4000"), "{link:?}");
    assert!(e.ns.ip_output(&["link", "show", &e.ifname]).status.success(), "e's TAP is missing");
    assert!(vmq.log().contains("configuration reloaded"), "{}", vmq.log());
    // Unchanged ports kept their place: a and b still answer each other.
    assert!(a.ns.ping(&b.ip, 3, &[]));
}

// ---------------------------------------------------------------------------------------------
// Metrics of a running vmq: the snapshot the exporter renders comes from the data path.

/// `GET /metrics` from `addr`: the body.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n").expect("an HTTP answer").1.to_string()
}

/// The value of the sample `series` (name and labels as written) in an exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_running_vmq_exports_vhost_fdb_queue_and_build_metrics() {
    let dir = TempDir::new("metr");
    let socket = dir.path().join("vmq.sock");
    let vm_socket = dir.path().join("v1.sock");
    let config = dir.path().join("vmq.toml");
    let text = format!(
        "[switch]\nworkers = 1\nfdb_capacity = 1000\n[vmq]\nqueues = 3\n{}[[port]]\nname = \"v1\"\nkind = \"vhost-user\"\nsocket = \"{}\"\nmac = \"52:54:00:00:00:09\"\n[control]\nsocket = \"{}\"\nmetrics = \"127.0.0.1:0\"\n",
        mem_port("m1", 1, ""),
        vm_socket.display(),
        socket.display()
    );
    std::fs::write(&config, text).unwrap();
    let notify = NotifySocket::new();
    let vmq = Daemon::start(&config, &dir.path().join("vmq.log"), Some(&notify));
    assert!(notify.next().contains("READY=1"), "{}", vmq.log());
    let log = vmq.log();
    let addr = log
        .split("metrics at http://")
        .nth(1)
        .and_then(|rest| rest.split("/metrics").next())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
        .to_string();

    let before = scrape(&addr);
    assert_eq!(sample(&before, "vmq_fdb_capacity"), Some(1000.0), "{before}");
    // The VM ports' own MACs are static entries.
    assert!(sample(&before, "vmq_fdb_entries").is_some_and(|n| n >= 2.0), "{before}");
    assert_eq!(sample(&before, "vmq_vm_queue_budget"), Some(3.0), "{before}");
    assert_eq!(sample(&before, "vmq_vhost_connected{port=\"v1\"}"), Some(0.0), "{before}");
    assert_eq!(sample(&before, "vmq_vhost_connections_total{port=\"v1\"}"), Some(0.0), "{before}");
    let version = format!("vmq_build_info{{version=\"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(before.lines().any(|l| l.starts_with(&version) && l.ends_with(" 1")), "{before}");

    // A frontend connects: the socket's state follows.
    let _frontend = std::os::unix::net::UnixStream::connect(&vm_socket).unwrap();
    let mut after = String::new();
    let connected = wait_until(WAIT, || {
        after = scrape(&addr);
        sample(&after, "vmq_vhost_connected{port=\"v1\"}") == Some(1.0)
    });
    assert!(connected, "{after}");
    assert_eq!(sample(&after, "vmq_vhost_connections_total{port=\"v1\"}"), Some(1.0), "{after}");
    assert!(vmq.stop().success());
}

// ---------------------------------------------------------------------------------------------
// The warning when a port drops spoofed frames (root: a TAP port in a namespace).

/// `text` without ANSI colour sequences (`ESC [ ... m`), whether or not the log has them.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn a_port_dropping_spoofed_frames_is_logged_once_naming_both_macs() {
    if !can_run() {
        return;
    }
    let p = unique("sp");
    let (a, b) = (Host::new(&p, "a", 1), Host::new(&p, "b", 2));
    // A short rebalance interval: the rebalancer is what notices the drops.
    let sections = "[switch]\nworkers = 1\n\n[vmq]\nqueues = 2\nrebalance_interval_ms = 50\n\n";
    let vmq = Vmq::start(&p, &[sections, &a.port(""), &b.port("")].concat());
    let warning = "port drops frames as spoofed";
    assert!(!vmq.log().contains(warning), "{}", vmq.log());

    let forged = filler_frame(&b.mac, "02:00:00:00:00:66", 60);
    inject(&a.ns, &a.ifname, &vec![forged.clone(); 5]);
    let logged = wait_until(WAIT, || vmq.log().contains(warning));
    assert!(logged, "no warning:\n{}", vmq.log());
    let log = strip_ansi(&vmq.log());
    let line = log.lines().find(|l| l.contains(warning)).unwrap();
    assert!(line.contains("WARN") && line.contains("port=a"), "{line}");
    assert!(line.contains("02:00:00:00:00:66"), "the MAC seen is not named: {line}");
    assert!(line.contains(&a.mac), "the configured MAC is not named: {line}");

    // More spoofed frames within the minute: counted, not logged again.
    let before = vmq.stats("a");
    inject(&a.ns, &a.ifname, &vec![forged; 5]);
    vmq.wait_stats("a", |s| s.drops["spoofed"] >= before.drops["spoofed"] + 5);
    let repeated = wait_until(Duration::from_secs(1), || vmq.log().matches(warning).count() > 1);
    assert!(!repeated, "the warning is not rate limited:\n{}", vmq.log());
}

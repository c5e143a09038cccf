//! `vmq ctl` and `vmq top`, the real binary against a control socket served in this process by
//! vmq-control's server with a mock handler (the data path is not needed to test the front
//! ends).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmq_control::protocol::*;
use vmq_control::{ControlHandler, ControlServer, ServerConfig};

/// A temporary directory (mode 0755, so that an unprivileged child can reach a socket in it),
/// removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("vqc-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn port(name: &str, kind: PortKind) -> PortInfo {
    PortInfo {
        name: name.into(),
        kind,
        state: if kind == PortKind::Uplink { PortState::Up } else { PortState::Down },
        mac: (kind != PortKind::Uplink).then(|| "52:54:00:00:00:01".to_string()),
        mtu: 9000,
        vlan: if kind == PortKind::Uplink {
            VlanInfo::Trunk { allowed: vec![10, 20], native: None }
        } else {
            VlanInfo::Access { vlan: 10 }
        },
        offloads: OffloadInfo { csum: true, tso4: true, tso6: true, ecn: false },
        allow_mac_spoofing: false,
        uplink: (kind == PortKind::VhostUser).then(|| "up0".to_string()),
        socket: (kind == PortKind::VhostUser).then(|| format!("/run/vmq/{name}.sock")),
        ifname: (kind == PortKind::Uplink).then(|| "eth1".to_string()),
        netns: None,
        driver: None,
        queue_pairs: None,
        vhost: (kind == PortKind::VhostUser).then_some(VhostInfo {
            mode: VhostModeInfo::Client,
            connected: false,
            connections: 2,
            migration: Some(MigrationInfo { logging: true, log_starts: 1, migrated_out: 0, announces: 0 }),
        }),
        rx_filter: None,
    }
}

/// Counters that grow with each `stats` call `n`, with the switch clock at n seconds: vm1
/// receives 1e6·n pps of 1500-byte frames during second n, so rates differ per frame.
fn stats_at(n: u64) -> StatsReport {
    let rx = 1_000_000 * n * (n + 1) / 2;
    let vm1 = PortCounters {
        port: "vm1".into(),
        rx_packets: rx,
        rx_bytes: rx * 1500,
        tx_packets: 500 * n,
        tx_bytes: 500 * n * 64,
        drops: [("oversize".to_string(), 10 * n), ("spoofed".to_string(), 0)].into(),
        offload: OffloadCounters { segments: 1, csum_finished: 2, coalesced: 3, gso_passed: 4 },
        fdb_full: 0,
        kernel_drops: 3 * n,
        corrupt_blocks: 0,
        fdb_moves: 0,
        fdb_limit: 0,
        mac_change_refused: 0,
        promiscuous_refused: 0,
        qmp_errors: 0,
    };
    let vm2 =
        PortCounters { port: "vm2".into(), drops: [("oversize".to_string(), 0)].into(), ..PortCounters::default() };
    StatsReport { uptime_ns: n * 1_000_000_000, ports: vec![vm1, vm2] }
}

#[derive(Default)]
struct Mock {
    seen: Mutex<Vec<Request>>,
    stats_calls: AtomicU64,
}

impl ControlHandler for Mock {
    fn handle(&self, request: Request) -> Result<Response, ControlError> {
        self.seen.lock().unwrap().push(request.clone());
        Ok(match request {
            Request::Show => Response::Show(SwitchSummary {
                mode: SwitchMode::Vmq,
                workers: 2,
                queue_budget: 8,
                queues_in_use: 1,
                policy: QueuePolicy::Dynamic,
                ports: vec![port("vm1", PortKind::VhostUser), port("up0", PortKind::Uplink)],
            }),
            Request::Ports => Response::Ports { ports: vec![port("vm1", PortKind::VhostUser)] },
            Request::Queues => Response::Queues(QueueReport {
                mode: SwitchMode::Vmq,
                policy: QueuePolicy::Dynamic,
                budget: 1,
                assigned: vec![QueueAssignment {
                    port: "vm1".into(),
                    queue: 1,
                    worker: 1,
                    rx_pps: 812_000,
                    rx_bits_per_sec: 9_744_000_000,
                }],
                shared: vec![SharedPort {
                    port: "vm2".into(),
                    reason: SharedReason::BudgetExhausted,
                    rx_pps: 120,
                    rx_bits_per_sec: 1_440_000,
                }],
                nic_queues: vec![
                    NicQueue { uplink: "up0".into(), queue: 0, port: None, rx_queue: None, rx_packets: 17 },
                    NicQueue {
                        uplink: "up0".into(),
                        queue: 1,
                        port: Some("vm1".into()),
                        rx_queue: Some(1),
                        rx_packets: 90_210,
                    },
                ],
            }),
            Request::Fdb => Response::Fdb(FdbReport {
                entries: vec![
                    FdbEntry { mac: "52:54:00:00:00:01".into(), vlan: 10, port: "vm1".into(), age_secs: None },
                    FdbEntry { mac: "02:00:00:00:00:09".into(), vlan: 10, port: "up0".into(), age_secs: Some(42) },
                ],
                total: 2,
                capacity: 65536,
            }),
            Request::Stats { port: Some(p) } if p != "vm1" && p != "vm2" => {
                return Err(ControlError::no_such_port(&p));
            }
            Request::Stats { port } => {
                let n = self.stats_calls.fetch_add(1, Ordering::SeqCst);
                let mut report = stats_at(n);
                report.ports.retain(|c| port.as_ref().is_none_or(|p| *p == c.port));
                Response::Stats(report)
            }
            Request::AddPort(p) => {
                if p.mtu.is_some_and(|m| m > 9000) {
                    return Err(ControlError::invalid_value("mtu must be from 68 to 9000"));
                }
                Response::PortAdded { port: Box::new(port(&p.name, p.kind)) }
            }
            Request::DelPort { name } if name == "vm1" => Response::Done { message: format!("port {name} removed") },
            Request::DelPort { name } => return Err(ControlError::no_such_port(&name)),
            Request::Set(s) => Response::Done { message: format!("set {s:?}") },
            Request::Rebalance => Response::Rebalanced {
                changes: vec![
                    QueueChange { port: "vm1".into(), queue: 0, action: QueueAction::Revoked },
                    QueueChange { port: "vm2".into(), queue: 0, action: QueueAction::Granted },
                ],
            },
            Request::Workers => Response::Workers {
                workers: vec![
                    WorkerInfo {
                        worker: 0,
                        busy_ratio: 0.125,
                        panics: 0,
                        frames: 1,
                        sleeps: 2,
                        asleep: false,
                        tasks: vec!["up0 default".into(), "vm2 tx".into()],
                    },
                    WorkerInfo {
                        worker: 1,
                        busy_ratio: 0.5,
                        panics: 3,
                        frames: 9,
                        sleeps: 11,
                        asleep: true,
                        tasks: vec!["up0 queue 0 -> vm1".into()],
                    },
                ],
            },
            Request::Save => Response::Done { message: "saved the running configuration to /etc/vmq/vmq.toml".into() },
        })
    }
}

struct Fixture {
    _dir: TempDir,
    socket: PathBuf,
    mock: Arc<Mock>,
    server: Option<ControlServer>,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        Fixture::with_mode(tag, 0o600)
    }

    fn with_mode(tag: &str, mode: u32) -> Fixture {
        let dir = TempDir::new(tag);
        let socket = dir.join("vmq.sock");
        let mock = Arc::new(Mock::default());
        let mut config = ServerConfig::new(&socket);
        config.socket_mode = mode;
        let server = ControlServer::start(config, mock.clone()).unwrap();
        Fixture { _dir: dir, socket, mock, server: Some(server) }
    }

    fn seen(&self) -> Vec<Request> {
        std::mem::take(&mut *self.mock.seen.lock().unwrap())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs a command to its end within a deadline (killed past it), capturing its output.
fn run(mut command: Command) -> Output {
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).map(|_| s)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        code: status.code().unwrap_or(-1),
        stdout: out_reader.join().unwrap().unwrap(),
        stderr: err_reader.join().unwrap().unwrap(),
    }
}

fn vmq(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmq"));
    command.args(args);
    run(command)
}

fn ctl(socket: &Path, args: &[&str]) -> Output {
    let socket = socket.to_str().unwrap();
    let mut all = vec!["ctl", "--socket", socket];
    all.extend_from_slice(args);
    vmq(&all)
}

fn ok(socket: &Path, args: &[&str]) -> String {
    let out = ctl(socket, args);
    assert_eq!(out.code, 0, "vmq ctl {args:?}: {}", out.stderr);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    out.stdout
}

#[test]
fn show_prints_the_summary_and_an_aligned_port_table() {
    let f = Fixture::new("show");
    assert_eq!(
        ok(&f.socket, &["show"]),
        "\
vmq: mode vmq, 2 worker(s), VM queues 1 of 8 in use, policy dynamic, 2 port(s)
PORT  KIND        STATE  MAC                 MTU  VLAN         OFFLOADS        ATTACHMENT
vm1   vhost-user  down   52:54:00:00:00:01  9000  access 10    csum,tso4,tso6  /run/vmq/vm1.sock, client mode, not connected, 2 connections, migration: dirty logging on, 1 started, 0 handed over, 0 announces, uplink up0
up0   uplink      up     -                  9000  trunk 10,20  csum,tso4,tso6  ifname eth1
"
    );
    assert_eq!(f.seen(), vec![Request::Show]);
}

#[test]
fn every_read_command_prints_its_table() {
    let f = Fixture::new("read");
    let ports = ok(&f.socket, &["ports"]);
    assert!(ports.starts_with("PORT  KIND"), "{ports}");
    assert!(ports.contains("vm1   vhost-user  down"), "{ports}");

    assert_eq!(
        ok(&f.socket, &["queues"]),
        "\
mode vmq, policy dynamic, VM queues 1 of 1 in use

VM queues:
PORT  QUEUE  WORKER  RX_PPS  RX_GBIT/S
vm1       1       1  812000      9.744

default queue (software switch):
PORT  REASON            RX_PPS  RX_GBIT/S
vm2   budget_exhausted     120      0.001

uplink receive queues:
UPLINK  QUEUE    PORT  RXQ  RX_PACKETS
up0     default  -       -          17
up0     1        vm1     1       90210
"
    );

    assert_eq!(
        ok(&f.socket, &["fdb"]),
        "\
MAC                VLAN  PORT     AGE
52:54:00:00:00:01    10  vm1   static
02:00:00:00:00:09    10  up0      42s
2 entries (capacity 65536)
"
    );

    let stats = ok(&f.socket, &["stats"]);
    let mut lines = stats.lines();
    assert_eq!(
        lines.next().unwrap(),
        "PORT  RX_PACKETS  RX_BYTES  TX_PACKETS  TX_BYTES  DROPS  SEGMENTS  CSUM_FINISHED  COALESCED  GSO_PASSED  FDB_FULL  FDB_MOVES  FDB_LIMIT"
    );
    // First stats call: n = 0, all zero.
    assert!(lines.next().unwrap().starts_with("vm1            0"), "{stats}");
    let one = ok(&f.socket, &["stats", "vm1"]);
    // Second call, n = 1: 1e6 packets, 1.5e9 bytes, 10 oversize drops listed by reason.
    assert!(one.contains("vm1      1000000  1500000000         500     32000     10         1"), "{one}");
    assert!(one.contains("drops by reason:\n  vm1: oversize 10\n"), "{one}");
    // Kernel losses (an uplink's full AF_PACKET ring) are listed apart, only where there are some.
    assert!(
        one.contains("lost in the kernel (not in RX_PACKETS or DROPS):\n  vm1: ring full 3, corrupt blocks 0\n"),
        "{one}"
    );
    assert!(!stats.contains("lost in the kernel"), "{stats}");
    assert!(!one.contains("vm2"), "{one}");

    assert_eq!(
        ok(&f.socket, &["workers"]),
        "\
WORKER   BUSY  PANICS  TASKS
     0  12.5%       0  up0 default, vm2 tx
     1  50.0%       3  up0 queue 0 -> vm1
"
    );
    assert_eq!(
        ok(&f.socket, &["rebalance"]),
        "rebalanced: 2 queue change(s)\nPORT  QUEUE  ACTION\nvm1       0  revoked\nvm2       0  granted\n"
    );
    assert_eq!(
        f.seen(),
        vec![
            Request::Ports,
            Request::Queues,
            Request::Fdb,
            Request::Stats { port: None },
            Request::Stats { port: Some("vm1".into()) },
            Request::Workers,
            Request::Rebalance,
        ]
    );
}

#[test]
fn write_commands_send_the_request_the_arguments_say() {
    let f = Fixture::new("write");
    let added = ok(
        &f.socket,
        &[
            "add-port",
            "--name",
            "vm3",
            "--kind",
            "vhost-user",
            "--vhost-socket",
            "/run/vmq/vm3.sock",
            "--mac",
            "52:54:00:00:00:03",
            "--mtu",
            "9000",
            "--trunk",
            "10,20",
            "--native-vlan",
            "10",
            "--uplink",
            "up0",
            "--allow-mac-spoofing",
            "--no-offloads",
            "--queue-pairs",
            "4",
        ],
    );
    assert!(added.starts_with("port vm3 added\nPORT  KIND"), "{added}");
    ok(
        &f.socket,
        &["add-port", "--name", "t1", "--kind", "tap", "--ifname", "vqc-t1", "--netns", "ns1", "--vlan", "5"],
    );
    assert_eq!(ok(&f.socket, &["del-port", "vm1"]), "port vm1 removed\n");
    ok(&f.socket, &["set", "queues", "4"]);
    ok(&f.socket, &["set", "policy", "static"]);
    ok(&f.socket, &["set", "port", "vm1", "mtu", "1500"]);
    ok(&f.socket, &["set", "port", "vm1", "vlan", "20"]);
    assert_eq!(ok(&f.socket, &["save"]), "saved the running configuration to /etc/vmq/vmq.toml\n");
    assert_eq!(
        f.seen(),
        vec![
            Request::AddPort(NewPort {
                name: "vm3".into(),
                kind: PortKind::VhostUser,
                socket: Some("/run/vmq/vm3.sock".into()),
                mac: Some("52:54:00:00:00:03".into()),
                mtu: Some(9000),
                trunk: Some(vec![10, 20]),
                native_vlan: Some(10),
                uplink: Some("up0".into()),
                allow_mac_spoofing: Some(true),
                offloads: Some(false),
                queues: Some(4),
                ..NewPort::default()
            }),
            Request::AddPort(NewPort {
                name: "t1".into(),
                kind: PortKind::Tap,
                ifname: Some("vqc-t1".into()),
                netns: Some("ns1".into()),
                vlan: Some(5),
                ..NewPort::default()
            }),
            Request::DelPort { name: "vm1".into() },
            Request::Set(Setting::Queues { queues: 4 }),
            Request::Set(Setting::Policy { policy: QueuePolicy::Static }),
            Request::Set(Setting::PortMtu { port: "vm1".into(), mtu: 1500 }),
            Request::Set(Setting::PortVlan { port: "vm1".into(), vlan: 20 }),
            Request::Save,
        ]
    );
}

#[test]
fn json_prints_the_reply_as_received() {
    let f = Fixture::new("json");
    let out = ok(&f.socket, &["--json", "fdb"]);
    assert_eq!(out.lines().count(), 1);
    let reply = Reply::from_line(out.trim_end().as_bytes()).unwrap();
    let Ok(Response::Fdb(report)) = reply.0 else { panic!("not an fdb reply: {out}") };
    assert_eq!(report.entries[1].age_secs, Some(42));
    assert!(out.starts_with(r#"{"ok":true,"result":{"type":"fdb","entries":[{"mac":"52:54:00:00:00:01""#), "{out}");
    // Every command: one reply line of the command's result type.
    for (args, kind) in [
        (&["show"][..], "show"),
        (&["ports"], "ports"),
        (&["queues"], "queues"),
        (&["stats"], "stats"),
        (&["stats", "vm2"], "stats"),
        (&["add-port", "--name", "m1", "--kind", "mem", "--mac", "52:54:00:00:00:09"], "port-added"),
        (&["del-port", "vm1"], "done"),
        (&["set", "queues", "2"], "done"),
        (&["set", "policy", "dynamic"], "done"),
        (&["set", "port", "vm1", "mtu", "9000"], "done"),
        (&["set", "port", "vm1", "vlan", "0"], "done"),
        (&["rebalance"], "rebalanced"),
        (&["workers"], "workers"),
    ] {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = ok(&f.socket, &all);
        assert_eq!(out.lines().count(), 1, "{out}");
        let reply = Reply::from_line(out.trim_end().as_bytes()).unwrap();
        assert!(reply.0.is_ok(), "{out}");
        assert!(out.starts_with(&format!("{{\"ok\":true,\"result\":{{\"type\":\"{kind}\"")), "{args:?}: {out}");
    }
    // Refusals are JSON too, on stdout, with exit code 1.
    let refused = ctl(&f.socket, &["--json", "del-port", "vm9"]);
    assert_eq!(refused.code, 1);
    assert_eq!(
        refused.stdout,
        "{\"ok\":false,\"error\":{\"code\":\"no_such_port\",\"message\":\"no port named \\\"vm9\\\"\"}}\n"
    );
}

#[test]
fn socket_json_and_timeout_are_taken_before_or_after_the_subcommand() {
    let f = Fixture::new("pos");
    let socket = f.socket.to_str().unwrap();
    let json = |out: &Output| {
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(out.stdout.starts_with(r#"{"ok":true,"result":{"type":"show""#), "{}", out.stdout);
    };
    // Before (as ever), after, and split around the subcommand.
    json(&vmq(&["ctl", "--socket", socket, "--json", "show"]));
    json(&vmq(&["ctl", "show", "--json", "--socket", socket]));
    json(&vmq(&["ctl", "show", "--socket", socket, "--json", "--timeout-ms", "3000"]));
    json(&vmq(&["ctl", "--json", "show", "--socket", socket]));
    // After a subcommand's own arguments and on a nested subcommand.
    let stats = vmq(&["ctl", "stats", "vm1", "--socket", socket, "--json"]);
    assert_eq!(stats.code, 0, "{}", stats.stderr);
    assert!(stats.stdout.starts_with(r#"{"ok":true,"result":{"type":"stats""#), "{}", stats.stdout);
    let set = vmq(&["ctl", "set", "queues", "3", "--socket", socket, "--json"]);
    assert_eq!(set.code, 0, "{}", set.stderr);
    // The port's vhost-user socket has its own flag and does not take the control socket's place.
    let added = vmq(&[
        "ctl",
        "add-port",
        "--name",
        "vm7",
        "--kind",
        "vhost-user",
        "--vhost-socket",
        "/run/vmq/vm7.sock",
        "--mac",
        "52:54:00:00:00:07",
        "--socket",
        socket,
    ]);
    assert_eq!(added.code, 0, "{}", added.stderr);
    // A table without --json wherever it is asked.
    let table = vmq(&["ctl", "show", "--socket", socket]);
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(table.stdout.starts_with("vmq: mode vmq"), "{}", table.stdout);
    assert_eq!(
        f.seen(),
        [
            vec![Request::Show; 4],
            vec![Request::Stats { port: Some("vm1".into()) }, Request::Set(Setting::Queues { queues: 3 })],
            vec![Request::AddPort(NewPort {
                name: "vm7".into(),
                kind: PortKind::VhostUser,
                socket: Some("/run/vmq/vm7.sock".into()),
                mac: Some("52:54:00:00:00:07".into()),
                ..NewPort::default()
            })],
            vec![Request::Show],
        ]
        .concat()
    );
    // The socket given after the subcommand is the one used: a missing one is unreachable (3).
    let missing = f.socket.with_file_name("missing.sock");
    let out = vmq(&["ctl", "show", "--socket", missing.to_str().unwrap()]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains("missing.sock"), "{}", out.stderr);
}

#[test]
fn exit_codes_tell_refused_from_usage_from_unreachable() {
    let f = Fixture::new("exit");
    // 1: vmq refused.
    let refused = ctl(&f.socket, &["stats", "vm9"]);
    assert_eq!(refused.code, 1);
    assert!(refused.stdout.is_empty());
    assert_eq!(refused.stderr, "vmq ctl: stats refused: no_such_port: no port named \"vm9\"\n");
    let invalid = ctl(&f.socket, &["add-port", "--name", "x", "--kind", "mem", "--mtu", "9001"]);
    assert_eq!(invalid.code, 1);
    assert!(invalid.stderr.contains("invalid_value"), "{}", invalid.stderr);
    // 2: usage, before vmq is asked anything.
    for args in [
        &["bogus"][..],
        &["set", "policy", "fastest"],
        &["set", "port", "vm1", "colour", "3"],
        &["add-port", "--name", "x"],
        &["add-port", "--name", "x", "--kind", "mem", "--vlan", "1", "--trunk", "2"],
        &["add-port", "--name", "x", "--kind", "mem", "--native-vlan", "1"],
        &["set", "queues", "-1"],
    ] {
        let out = ctl(&f.socket, args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
    }
    assert_eq!(
        f.seen(),
        vec![
            Request::Stats { port: Some("vm9".into()) },
            Request::AddPort(NewPort { name: "x".into(), kind: PortKind::Mem, mtu: Some(9001), ..NewPort::default() })
        ]
    );
    // 3: nobody there.
    let missing = f.socket.with_file_name("missing.sock");
    let out = ctl(&missing, &["show"]);
    assert_eq!(out.code, 3);
    assert!(out.stderr.contains("is vmq running?") && out.stderr.contains("missing.sock"), "{}", out.stderr);
    // 3: something listens but never answers.
    let silent_path = f.socket.with_file_name("silent.sock");
    let _silent = UnixListener::bind(&silent_path).unwrap();
    let out = ctl(&silent_path, &["--timeout-ms", "200", "show"]);
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains("did not answer"), "{}", out.stderr);
}

/// Copies the vmq binary where any user can run it (the build directory may be private).
fn public_copy_of_vmq(dir: &TempDir) -> PathBuf {
    let copy = dir.join("vmq");
    // `cp`, not std::fs::copy: a write descriptor open in this process would leak into children
    // other tests fork meanwhile, and exec of the copy would fail with ETXTBSY.
    let status = Command::new("cp").arg(env!("CARGO_BIN_EXE_vmq")).arg(&copy).status().unwrap();
    assert!(status.success(), "cp vmq");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

#[test]
fn a_peer_that_is_not_root_nor_vmqs_user_is_denied() {
    if !vmq_testkit::skip::is_root() {
        vmq_testkit::skip(&vmq_testkit::skip::current_test(), "needs root to run a client as uid 65534");
        return;
    }
    // The socket file admits everybody, so only the peer credential check stands in the way.
    let f = Fixture::with_mode("denied", 0o666);
    let bin_dir = TempDir::new("denied-bin");
    let vmq = public_copy_of_vmq(&bin_dir);
    let mut command = Command::new(&vmq);
    command.args(["ctl", "--socket", f.socket.to_str().unwrap(), "show"]).uid(65534).gid(65534);
    let out = run(command);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("denied: uid 65534 may not control vmq"), "{}", out.stderr);
    assert!(f.seen().is_empty(), "a denied request reached the handler");
    // Root, through the same binary and socket, is served; and the server survived the refusal.
    let mut command = Command::new(&vmq);
    command.args(["ctl", "--socket", f.socket.to_str().unwrap(), "show"]);
    assert_eq!(run(command).code, 0);
    assert_eq!(f.seen(), vec![Request::Show]);
}

#[test]
fn top_prints_frames_rated_from_consecutive_snapshots() {
    let f = Fixture::new("top");
    let socket = f.socket.to_str().unwrap();
    let out = vmq(&["top", "--socket", socket, "--iterations", "2", "--interval-ms", "1"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let frames: Vec<&str> = out.stdout.split("\n\n").collect();
    assert_eq!(frames.len(), 2, "{}", out.stdout);
    // Frame 1 rates snapshot 0 → 1, frame 2 snapshot 1 → 2 (the switch clock advances 1 s per
    // sample, whatever the real interval): vm1 gets 1e6 then 2e6 pps of 1500 bytes.
    let header = "PORT  QUEUE           RX_PPS  RX_GBIT/S  TX_PPS  TX_GBIT/S  DROPS/S  DROPS";
    assert_eq!(
        frames[0],
        format!(
            "vmq top: 2 port(s), rates over 1.000 s, mode vmq, VM queues 1 of 1\n{header}\n\
             vm1   q1@w1          1000000     12.000     500      0.000       10     10\n\
             vm2   shared:budget        0      0.000       0      0.000        0      0\n\
             drops by reason:\n\
             PORT  REASON            DROPS/S  DROPS\n\
             vm1   oversize               10     10\n\
             vm1   kernel_ring_full        3      3"
        )
    );
    assert!(
        frames[1].contains("vm1   q1@w1          2000000     24.000     500      0.000       10     20"),
        "{}",
        frames[1]
    );
    assert_eq!(f.mock.stats_calls.load(Ordering::SeqCst), 3, "three snapshots for two frames");

    let once = vmq(&["top", "--socket", socket, "--once", "--interval-ms", "1"]);
    assert_eq!(once.code, 0);
    assert_eq!(once.stdout.matches("vmq top:").count(), 1);
}

#[test]
fn top_without_vmq_exits_3() {
    let dir = TempDir::new("top-missing");
    let out = vmq(&["top", "--socket", dir.join("none.sock").to_str().unwrap(), "--once"]);
    assert_eq!(out.code, 3);
    assert!(out.stderr.contains("is vmq running?"), "{}", out.stderr);
}

#[test]
fn interactive_top_quits_on_q_and_restores_the_terminal() {
    // `script` runs vmq top on a pseudo-terminal, so that the interactive mode is taken.
    if Command::new("script").arg("--version").output().is_err() {
        vmq_testkit::skip(&vmq_testkit::skip::current_test(), "`script` (util-linux) is not installed");
        return;
    }
    let f = Fixture::new("top-tty");
    let line = format!("{} top --socket {} --interval-ms 50", env!("CARGO_BIN_EXE_vmq"), f.socket.display());
    let mut command = Command::new("script");
    command.args(["-qfec", &line, "/dev/null"]);
    let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        stdout.read_to_end(&mut s).map(|_| s)
    });
    // Wait until top has drawn a frame (it has sampled twice), then press q.
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.mock.stats_calls.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "vmq top never sampled");
        std::thread::sleep(Duration::from_millis(5));
    }
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"q").unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmq top did not quit on q");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success(), "{status:?}");
    let screen = String::from_utf8_lossy(&reader.join().unwrap().unwrap()).into_owned();
    // Entered the alternate screen with the cursor hidden, drew rates, and left it as it was.
    assert!(screen.contains("\x1b[?1049h"), "{screen:?}");
    assert!(screen.contains("vm1   q1@w1"), "{screen:?}");
    assert!(screen.contains("\x1b[?25h\x1b[?1049l"), "cursor shown and alternate screen left: {screen:?}");
}

#[test]
fn top_into_a_pipe_prints_plain_frames_until_stopped() {
    let f = Fixture::new("toppipe");
    let socket = f.socket.to_str().unwrap();
    // No --once/--iterations: on a terminal this would be the interactive view; into a pipe it
    // is plain frames, forever, each ended by a blank line before the next.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmq"))
        .args(["top", "--socket", socket, "--interval-ms", "1", "--sort", "name"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while text.windows(8).filter(|w| *w == b"vmq top:").count() < 3 && Instant::now() < deadline {
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
        }
    }
    // By PID: only the process this test started.
    let _ = child.kill();
    let _ = child.wait();
    assert!(!text.contains(&0x1b), "escape sequences into a pipe: {:?}", String::from_utf8_lossy(&text));
    let text = String::from_utf8(text).unwrap();
    let frames: Vec<&str> = text.split("\n\n").filter(|f| f.starts_with("vmq top:")).collect();
    assert!(frames.len() >= 2, "{text}");
    for frame in &frames[..2] {
        let ports: Vec<&str> = frame.lines().skip(2).take(2).map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(ports, ["vm1", "vm2"], "{frame}");
        assert!(frame.contains("drops by reason:\nPORT  REASON"), "{frame}");
    }
    // A sort key it does not know: usage error.
    let out = vmq(&["top", "--socket", socket, "--once", "--sort", "loudest"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
}

//! The control socket server and client over real Unix sockets, with an in-process mock handler.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmq_control::protocol::*;
use vmq_control::{Client, ClientError, ControlHandler, ControlServer, ServerConfig, ServerError};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A temporary directory removed on drop (also when a test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("vqc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
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

fn port_info(name: &str) -> PortInfo {
    PortInfo {
        name: name.into(),
        kind: PortKind::VhostUser,
        state: PortState::Up,
        mac: Some("52:54:00:00:00:01".into()),
        mtu: 9000,
        vlan: VlanInfo::Access { vlan: 10 },
        offloads: OffloadInfo { csum: true, tso4: true, tso6: true, ecn: false },
        allow_mac_spoofing: false,
        uplink: Some("up0".into()),
        socket: Some(format!("/run/vmq/{name}.sock")),
        ifname: None,
        netns: None,
        vhost: None,
        rx_filter: None,
        driver: None,
        queue_pairs: None,
    }
}

fn counters(name: &str) -> PortCounters {
    PortCounters {
        port: name.into(),
        rx_packets: 10,
        rx_bytes: 15_000,
        tx_packets: 20,
        tx_bytes: 30_000,
        drops: [("oversize".to_string(), 2), ("spoofed".to_string(), 0)].into(),
        offload: OffloadCounters { segments: 4, csum_finished: 5, coalesced: 6, gso_passed: 7 },
        fdb_full: 1,
        kernel_drops: 8,
        corrupt_blocks: 9,
        fdb_moves: 2,
        fdb_limit: 3,
        mac_change_refused: 0,
        promiscuous_refused: 0,
        qmp_errors: 0,
    }
}

/// Answers every request with a response derived from it, and records what it was asked.
#[derive(Default)]
struct Mock {
    seen: Mutex<Vec<Request>>,
}

fn answer(request: &Request) -> Result<Response, ControlError> {
    Ok(match request {
        Request::Show => Response::Show(SwitchSummary {
            mode: SwitchMode::Vmq,
            workers: 2,
            queue_budget: 8,
            queues_in_use: 1,
            policy: QueuePolicy::Dynamic,
            ports: vec![port_info("vm1")],
        }),
        Request::Ports => Response::Ports { ports: vec![port_info("vm1"), port_info("vm2")] },
        Request::Queues => Response::Queues(QueueReport {
            mode: SwitchMode::Vmq,
            policy: QueuePolicy::Dynamic,
            budget: 1,
            assigned: vec![QueueAssignment {
                port: "vm1".into(),
                queue: 0,
                worker: 1,
                rx_pps: 1000,
                rx_bits_per_sec: 12_000_000,
            }],
            shared: vec![SharedPort {
                port: "vm2".into(),
                reason: SharedReason::BudgetExhausted,
                rx_pps: 5,
                rx_bits_per_sec: 6000,
            }],
            nic_queues: vec![NicQueue { uplink: "up0".into(), queue: 0, port: None, rx_queue: None, rx_packets: 3 }],
        }),
        Request::Fdb => Response::Fdb(FdbReport {
            entries: vec![FdbEntry { mac: "52:54:00:00:00:01".into(), vlan: 10, port: "vm1".into(), age_secs: None }],
            total: 1,
            capacity: 65536,
        }),
        Request::Stats { port: Some(p) } if p != "vm1" => return Err(ControlError::no_such_port(p)),
        Request::Stats { port } => Response::Stats(StatsReport {
            uptime_ns: 42,
            ports: match port {
                Some(p) => vec![counters(p)],
                None => vec![counters("vm1"), counters("vm2")],
            },
        }),
        Request::AddPort(p) => {
            Response::PortAdded { port: Box::new(PortInfo { mtu: p.mtu.unwrap_or(1500) as u16, ..port_info(&p.name) }) }
        }
        Request::DelPort { name } => Response::Done { message: format!("port {name} removed") },
        Request::Set(s) => Response::Done { message: format!("{s:?}") },
        Request::Rebalance => Response::Rebalanced {
            changes: vec![QueueChange { port: "vm2".into(), queue: 0, action: QueueAction::Granted }],
        },
        Request::Workers => Response::Workers {
            workers: vec![WorkerInfo {
                worker: 0,
                busy_ratio: 0.25,
                panics: 1,
                frames: 5,
                sleeps: 7,
                asleep: true,
                tasks: vec!["vm1 tx".into()],
            }],
        },
        Request::Save => Response::Done { message: "saved".into() },
    })
}

impl ControlHandler for Mock {
    fn handle(&self, request: Request) -> Result<Response, ControlError> {
        self.seen.lock().unwrap().push(request.clone());
        if let Request::DelPort { name } = &request
            && name == "panic"
        {
            panic!("mock handler told to panic");
        }
        answer(&request)
    }
}

fn start(path: &Path) -> (ControlServer, Arc<Mock>) {
    start_with(ServerConfig::new(path))
}

fn start_with(config: ServerConfig) -> (ControlServer, Arc<Mock>) {
    let mock = Arc::new(Mock::default());
    let server = ControlServer::start(config, mock.clone()).unwrap();
    (server, mock)
}

fn all_requests() -> Vec<Request> {
    vec![
        Request::Show,
        Request::Ports,
        Request::Queues,
        Request::Fdb,
        Request::Stats { port: None },
        Request::Stats { port: Some("vm1".into()) },
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
            ..NewPort::default()
        }),
        Request::DelPort { name: "vm3".into() },
        Request::Set(Setting::Queues { queues: 4 }),
        Request::Set(Setting::Policy { policy: QueuePolicy::Static }),
        Request::Set(Setting::PortMtu { port: "vm1".into(), mtu: 1500 }),
        Request::Set(Setting::PortVlan { port: "vm1".into(), vlan: 20 }),
        Request::Rebalance,
        Request::Workers,
        Request::Save,
    ]
}

#[test]
fn every_request_round_trips_through_server_and_client() {
    let dir = TempDir::new("roundtrip");
    let (server, mock) = start(&dir.join("vmq.sock"));
    let mut client = Client::connect(server.path(), TIMEOUT).unwrap();
    for request in all_requests() {
        let response = client.call(&request).unwrap();
        assert_eq!(response, answer(&request).unwrap(), "{request:?}");
    }
    // The handler got exactly what the client sent, in order, all on one connection.
    assert_eq!(*mock.seen.lock().unwrap(), all_requests());
    // A fresh connection per call works as well.
    let response = vmq_control::client::call(server.path(), &Request::Workers, TIMEOUT).unwrap();
    assert_eq!(response, answer(&Request::Workers).unwrap());
    server.shutdown();
}

#[test]
fn handler_errors_reach_the_client_with_their_code() {
    let dir = TempDir::new("remote-err");
    let (server, _) = start(&dir.join("vmq.sock"));
    let mut client = Client::connect(server.path(), TIMEOUT).unwrap();
    match client.call(&Request::Stats { port: Some("vm9".into()) }) {
        Err(ClientError::Remote(e)) => {
            assert_eq!(e.code, ErrorCode::NoSuchPort);
            assert!(e.message.contains("vm9"), "{e}");
        }
        other => panic!("expected no_such_port, got {other:?}"),
    }
    // The raw reply is what --json prints.
    let (reply, raw) = client.call_raw(&Request::Stats { port: Some("vm9".into()) }).unwrap();
    assert!(reply.0.is_err());
    assert_eq!(raw, r#"{"ok":false,"error":{"code":"no_such_port","message":"no port named \"vm9\""}}"#);
}

#[test]
fn malformed_and_unknown_requests_get_errors_and_the_connection_goes_on() {
    let dir = TempDir::new("malformed");
    let (server, mock) = start(&dir.join("vmq.sock"));
    let mut client = Client::connect(server.path(), TIMEOUT).unwrap();
    let code = |raw: String| Reply::from_line(raw.as_bytes()).unwrap().0.unwrap_err().code;
    assert_eq!(code(client.send_raw(b"this is not json\n").unwrap()), ErrorCode::BadRequest);
    assert_eq!(code(client.send_raw(b"{\"command\":\"reboot\"}\n").unwrap()), ErrorCode::UnknownCommand);
    assert_eq!(code(client.send_raw(b"{\"command\":\"del-port\"}\n").unwrap()), ErrorCode::BadRequest);
    assert_eq!(code(client.send_raw(b"\xff\xfe\n").unwrap()), ErrorCode::BadRequest);
    assert_eq!(code(client.send_raw(b"{\"command\":\"show\"\n").unwrap()), ErrorCode::BadRequest);
    // Blank lines are skipped; CRLF works.
    let raw = client.send_raw(b"\n\r\n{\"command\":\"fdb\"}\r\n").unwrap();
    assert!(Reply::from_line(raw.as_bytes()).unwrap().0.is_ok(), "{raw}");
    assert_eq!(client.call(&Request::Show).unwrap(), answer(&Request::Show).unwrap());
    // None of the bad lines reached the handler.
    assert_eq!(*mock.seen.lock().unwrap(), vec![Request::Fdb, Request::Show]);
}

#[test]
fn an_oversized_request_is_refused_the_connection_closed_and_the_next_client_served() {
    let dir = TempDir::new("oversize");
    let (server, mock) = start(&dir.join("vmq.sock"));
    let mut stream = UnixStream::connect(server.path()).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    // 100 KiB without a newline: more than the 64 KiB limit.
    let big = vec![b'x'; 100 * 1024];
    // The server stops reading at the limit, so part of this write may fail with EPIPE.
    let _ = stream.write_all(&big);
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let error = Reply::from_line(line.as_bytes()).unwrap().0.unwrap_err();
    assert_eq!(error.code, ErrorCode::TooLarge, "{line}");
    // Then the connection is closed: end of stream or a reset, never a hang (read timeout set).
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty()),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
    // An exactly-at-the-limit request is read whole (and is bad JSON, not too large).
    let mut client = Client::connect(server.path(), TIMEOUT).unwrap();
    let mut at_limit = vec![b' '; MAX_REQUEST_BYTES];
    at_limit[0] = b'[';
    at_limit.push(b'\n');
    let raw = client.send_raw(&at_limit).unwrap();
    assert_eq!(Reply::from_line(raw.as_bytes()).unwrap().0.unwrap_err().code, ErrorCode::BadRequest);
    assert_eq!(client.call(&Request::Ports).unwrap(), answer(&Request::Ports).unwrap());
    assert_eq!(*mock.seen.lock().unwrap(), vec![Request::Ports]);
}

#[test]
fn a_panicking_handler_answers_internal_and_the_server_survives() {
    let dir = TempDir::new("panic");
    let (server, _) = start(&dir.join("vmq.sock"));
    let mut client = Client::connect(server.path(), TIMEOUT).unwrap();
    match client.call(&Request::DelPort { name: "panic".into() }) {
        Err(ClientError::Remote(e)) => assert_eq!(e.code, ErrorCode::Internal),
        other => panic!("expected internal, got {other:?}"),
    }
    assert_eq!(client.call(&Request::Show).unwrap(), answer(&Request::Show).unwrap());
}

#[test]
fn a_second_server_on_the_same_path_is_refused() {
    let dir = TempDir::new("second");
    let path = dir.join("vmq.sock");
    let (server, _) = start(&path);
    let second = ControlServer::start(ServerConfig::new(&path), Arc::new(Mock::default()));
    match second {
        Err(e @ ServerError::AlreadyRunning(_)) => {
            assert_eq!(e.to_string(), format!("another vmq is running on {}", path.display()));
        }
        Err(e) => panic!("expected AlreadyRunning, got {e}"),
        Ok(_) => panic!("a second server started on a live socket"),
    }
    // The first one is untouched.
    assert_eq!(vmq_control::client::call(&path, &Request::Fdb, TIMEOUT).unwrap(), answer(&Request::Fdb).unwrap());
    server.shutdown();
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = TempDir::new("stale");
    let path = dir.join("vmq.sock");
    // A listener that is gone leaves its socket file behind, as a crashed vmq does.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    assert!(matches!(UnixStream::connect(&path), Err(e) if e.kind() == ErrorKind::ConnectionRefused));
    let (server, _) = start(&path);
    assert_eq!(vmq_control::client::call(&path, &Request::Show, TIMEOUT).unwrap(), answer(&Request::Show).unwrap());
    server.shutdown();
    assert!(!path.exists(), "shutdown removes the socket file");
}

#[test]
fn a_file_that_is_not_a_socket_is_left_alone() {
    let dir = TempDir::new("notsock");
    let path = dir.join("vmq.sock");
    std::fs::write(&path, "precious").unwrap();
    match ControlServer::start(ServerConfig::new(&path), Arc::new(Mock::default())) {
        Err(e @ ServerError::NotASocket(_)) => assert!(e.to_string().contains("not a socket"), "{e}"),
        Err(e) => panic!("expected NotASocket, got {e}"),
        Ok(_) => panic!("started over a regular file"),
    }
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn the_parent_directory_is_created_and_the_socket_is_private() {
    let dir = TempDir::new("mode");
    let path = dir.join("run/vmq/vmq.sock");
    let (server, _) = start(&path);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    server.shutdown();
}

#[test]
fn shutdown_closes_connections_removes_the_socket_and_is_prompt() {
    let dir = TempDir::new("shutdown");
    let path = dir.join("vmq.sock");
    let (server, _) = start(&path);
    let mut idle = Client::connect(&path, TIMEOUT).unwrap();
    idle.call(&Request::Show).unwrap();
    assert_eq!(server.connections(), 1);
    let started = Instant::now();
    server.shutdown();
    assert!(started.elapsed() < Duration::from_secs(2), "shutdown took {:?}", started.elapsed());
    assert!(!path.exists());
    // The idle connection was closed by the server: no answer, not a hang.
    match idle.call(&Request::Show) {
        Err(ClientError::Closed { .. } | ClientError::Io { .. }) => {}
        other => panic!("expected a closed connection, got {other:?}"),
    }
    // And nobody listens any more.
    let err = Client::connect(&path, TIMEOUT).err().expect("connect after shutdown");
    assert!(err.is_unreachable());
}

#[test]
fn dropping_the_server_also_stops_it() {
    let dir = TempDir::new("drop");
    let path = dir.join("vmq.sock");
    drop(start(&path));
    assert!(!path.exists());
}

#[test]
fn too_many_connections_get_busy_and_a_freed_slot_is_reused() {
    let dir = TempDir::new("busy");
    let mut config = ServerConfig::new(dir.join("vmq.sock"));
    config.max_connections = 2;
    let (server, _) = start_with(config);
    let mut first = Client::connect(server.path(), TIMEOUT).unwrap();
    let mut second = Client::connect(server.path(), TIMEOUT).unwrap();
    // An answer proves each connection was admitted.
    first.call(&Request::Show).unwrap();
    second.call(&Request::Show).unwrap();
    let mut third = Client::connect(server.path(), TIMEOUT).unwrap();
    match third.call(&Request::Show) {
        Err(ClientError::Remote(e)) => assert_eq!(e.code, ErrorCode::Busy, "{e}"),
        other => panic!("expected busy, got {other:?}"),
    }
    drop(first);
    // The slot frees when the server notices the close; poll for it within a deadline.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut client = Client::connect(server.path(), TIMEOUT).unwrap();
        match client.call(&Request::Show) {
            Ok(_) => break,
            Err(ClientError::Remote(e)) if e.code == ErrorCode::Busy && Instant::now() < deadline => {}
            other => panic!("expected the freed slot to be reused, got {other:?}"),
        }
    }
    second.call(&Request::Ports).unwrap();
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let dir = TempDir::new("idle");
    let mut config = ServerConfig::new(dir.join("vmq.sock"));
    config.idle_timeout = Duration::from_millis(100);
    let (server, _) = start_with(config);
    let mut stream = UnixStream::connect(server.path()).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    // The server closes: end of stream well before our own 5 s read timeout.
    assert_eq!(stream.read(&mut buf).unwrap(), 0);
    assert!(started.elapsed() < TIMEOUT);
    drop(server);
}

#[test]
fn the_client_says_when_vmq_is_not_running() {
    let dir = TempDir::new("noserver");
    let path = dir.join("vmq.sock");
    let err = Client::connect(&path, TIMEOUT).err().expect("no server");
    assert!(err.is_unreachable());
    let text = err.to_string();
    assert!(text.contains("is vmq running?") && text.contains(&path.display().to_string()), "{text}");
}

#[test]
fn the_client_times_out_on_a_server_that_does_not_answer() {
    let dir = TempDir::new("silent");
    let path = dir.join("vmq.sock");
    // Listens (so connect succeeds through the backlog) but never answers.
    let _listener = UnixListener::bind(&path).unwrap();
    let mut client = Client::connect(&path, Duration::from_millis(200)).unwrap();
    let started = Instant::now();
    let err = client.call(&Request::Show).unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert!(err.is_unreachable());
    assert!(started.elapsed() < TIMEOUT);
}

#[test]
fn the_client_rejects_an_answer_that_is_not_a_reply() {
    let dir = TempDir::new("garbage");
    let path = dir.join("vmq.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let answerer = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(stream.try_clone().unwrap()).read_line(&mut line).unwrap();
        stream.write_all(b"{\"ok\":true}\n").unwrap();
    });
    let err = vmq_control::client::call(&path, &Request::Show, TIMEOUT).unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
    assert!(!err.is_unreachable());
    answerer.join().unwrap();
}

#[test]
fn shutdown_leaves_a_successors_socket_alone() {
    let dir = TempDir::new("successor");
    let path = dir.join("vmq.sock");
    let (first, _) = start(&path);
    // Somebody removed the first server's socket file and a second server took the path.
    std::fs::remove_file(&path).unwrap();
    let (second, _) = start(&path);
    first.shutdown();
    assert!(path.exists(), "the first server removed the second one's socket");
    assert_eq!(vmq_control::client::call(&path, &Request::Show, TIMEOUT).unwrap(), answer(&Request::Show).unwrap());
    second.shutdown();
    assert!(!path.exists());
}

#[test]
fn a_refusal_sent_before_the_request_is_still_read() {
    let dir = TempDir::new("early");
    let mut config = ServerConfig::new(dir.join("vmq.sock"));
    config.max_connections = 0;
    let (server, _) = start_with(config);
    let mut client = Client::connect(server.path(), TIMEOUT).unwrap();
    // The acceptor handles connections in order: once a later connection has been refused
    // and closed, so has the client's, before the client wrote anything.
    let mut later = UnixStream::connect(server.path()).unwrap();
    later.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut refusal = String::new();
    later.read_to_string(&mut refusal).unwrap();
    assert!(refusal.contains("\"busy\""), "{refusal}");
    // Writing now meets a closed socket; the client still reads the answer waiting for it.
    match client.call(&Request::Show) {
        Err(ClientError::Remote(e)) => assert_eq!(e.code, ErrorCode::Busy),
        other => panic!("expected busy, got {other:?}"),
    }
}

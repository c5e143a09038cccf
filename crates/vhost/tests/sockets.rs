//! Socket hygiene of the vhost-user server: who may connect (file owner, group, mode, peer
//! uid), what happens to a socket file already there, and how long a connection that never
//! starts the protocol may hold a port.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use vmq_vhost::server::{SocketPolicy, VhostUserServer};
use vmq_vhost::{DeviceEvent, NetDevice, NetDeviceConfig};

fn config() -> NetDeviceConfig {
    net_config("52:54:00:00:00:01", 1500)
}

/// Sends GET_FEATURES and reads the reply: `Some(features)`, or `None` if the server closed
/// the connection instead of answering.
fn get_features(stream: &mut UnixStream) -> Option<u64> {
    stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    let mut msg = [0u8; 12];
    msg[..4].copy_from_slice(&1u32.to_le_bytes());
    msg[4..8].copy_from_slice(&1u32.to_le_bytes());
    stream.write_all(&msg).ok()?;
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply).ok()?;
    Some(u64::from_le_bytes(reply[12..].try_into().expect("8 bytes")))
}

/// The server closed this connection (EOF or reset), bounded by [`TIMEOUT`].
fn assert_closed_by_server(stream: &mut UnixStream) {
    stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("connection not closed by the server: {other:?}"),
    }
}

fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut fields = l.split(':');
        (fields.next()? == name).then(|| fields.nth(1)?.parse().ok())?
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

#[test]
fn a_live_socket_is_not_taken_over() {
    init_tracing();
    let dir = TempDir::new("live-socket");
    let server = TestServer::start(dir.path(), &[("vm", config())]);
    let socket = server.port(0).socket.clone();
    // A second vmq (or a second port) configured on the same path.
    let mut second = VhostUserServer::new().expect("epoll");
    let err = second
        .add_port("vm", &socket, config(), NetDevice::new(), Box::new(|_| {}))
        .expect_err("a socket something listens on was replaced");
    assert!(err.to_string().contains("socket in use"), "{err}");
    drop(second);
    // The first server still owns the socket file and serves on it.
    assert_ports_still_work(&server, dir.path(), 0);
}

#[test]
fn a_stale_socket_is_replaced() {
    init_tracing();
    let dir = TempDir::new("stale-socket");
    let socket = dir.path().join("vm.sock");
    // Left by a crashed process: a socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(UnixStream::connect(&socket).is_err());
    let server = TestServer::start(dir.path(), &[("vm", config())]);
    assert_ports_still_work(&server, dir.path(), 0);
}

#[test]
fn socket_owner_group_and_mode_are_applied() {
    init_tracing();
    if !is_root() {
        println!("SKIPPED: needs root to give a socket to another owner and group");
        return;
    }
    let group = group_id("kvm").or_else(|| group_id("nogroup")).expect("a kvm or nogroup group in /etc/group");
    let dir = TempDir::new("socket-access");
    let policy = SocketPolicy { owner: Some(65534), group: Some(group), mode: Some(0o640), ..Default::default() };
    let server = TestServer::start_with_policies(
        dir.path(),
        &[("set", config(), policy), ("default", config(), SocketPolicy::default())],
        None,
    );
    let set = std::fs::symlink_metadata(&server.port(0).socket).expect("socket file");
    assert_eq!((set.uid(), set.gid(), set.mode() & 0o7777), (65534, group, 0o640));
    // Without a policy: vmq's owner, and 0660 whatever the umask (0022 makes binds 0755).
    let default = std::fs::symlink_metadata(&server.port(1).socket).expect("socket file");
    assert_eq!((default.uid(), default.mode() & 0o7777), (0, 0o660));
    assert_ports_still_work(&server, dir.path(), 0);
}

/// Not a test of its own: the client half of `peers_are_checked_against_allowed_uids`, run
/// in a child process as another user. Exits 0 if served, 3 if the connection was closed.
#[test]
fn peer_helper() {
    let Ok(socket) = std::env::var("VQV_PEER_SOCKET") else { return };
    let Ok(mut stream) = UnixStream::connect(&socket) else { std::process::exit(4) };
    std::process::exit(if get_features(&mut stream).is_some() { 0 } else { 3 });
}

/// Runs `peer_helper` as uid/gid 65534 against `socket`; its exit code.
fn connect_as_nobody(binary: &Path, socket: &Path) -> i32 {
    let mut child = Command::new(binary);
    child
        .args(["--exact", "peer_helper", "--nocapture", "--test-threads=1"])
        .env("VQV_PEER_SOCKET", socket)
        .uid(65534)
        .gid(65534);
    let out = child.output().expect("run the helper as uid 65534");
    out.status.code().unwrap_or(-1)
}

#[test]
fn peers_are_checked_against_allowed_uids() {
    init_tracing();
    if !is_root() {
        println!("SKIPPED: needs root to run a client as uid 65534");
        return;
    }
    let dir = TempDir::new("allowed-uids");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Both files admit everybody: only the uid check stands in the way.
    let root_only = SocketPolicy { mode: Some(0o666), allowed_uids: Some(vec![0]), ..Default::default() };
    let nobody_only = SocketPolicy { mode: Some(0o666), allowed_uids: Some(vec![65534]), ..Default::default() };
    let server = TestServer::start_with_policies(
        dir.path(),
        &[("root", config(), root_only), ("nobody", config(), nobody_only)],
        None,
    );
    // The test binary, where uid 65534 can run it.
    let binary = dir.path().join("sockets-test");
    std::fs::copy(std::env::current_exe().expect("test binary"), &binary).expect("copy test binary");
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    // Root on the port that only admits 65534: closed at once, counted.
    let mut stream = UnixStream::connect(&server.port(1).socket).expect("connect");
    assert_eq!(get_features(&mut stream), None);
    server.wait_status(1, "one refusal", |s| s.refused == 1 && s.connections == 0);
    // 65534 on the root-only port: refused; on its own port: served.
    assert_eq!(connect_as_nobody(&binary, &server.port(0).socket), 3);
    server.wait_status(0, "one refusal", |s| s.refused == 1 && s.connections == 0);
    assert_eq!(connect_as_nobody(&binary, &server.port(1).socket), 0);
    server.wait_closed(1, 1);
    // Root on its own port: a full handshake.
    let session = bring_up(server.port(0), dir.path());
    drop(session);
    server.port(0).expect_event(DeviceEvent::Stopped, TIMEOUT);
    server.wait_closed(0, 1);
}

#[test]
fn a_connection_without_set_owner_is_closed_and_the_port_accepts_again() {
    init_tracing();
    let dir = TempDir::new("setup-timeout");
    let timeout = Duration::from_millis(300);
    let policy = SocketPolicy { setup_timeout: Some(timeout), ..Default::default() };
    let server = TestServer::start_with_policies(dir.path(), &[("vm", config(), policy)], None);
    let socket = server.port(0).socket.clone();
    // A process that connects and says nothing holds the port...
    let mut idle = UnixStream::connect(&socket).expect("connect");
    server.wait_status(0, "connected", |s| s.connected);
    // ... so a second frontend meanwhile is refused (one frontend per socket) ...
    let mut second = UnixStream::connect(&socket).expect("connect");
    assert_closed_by_server(&mut second);
    server.wait_status(0, "one refusal", |s| s.refused == 1);
    // ... until the setup timeout ends the idle connection.
    assert_closed_by_server(&mut idle);
    server.wait_closed(0, 1);
    // Then a frontend gets the port; past SET_OWNER, idling is its right (a VM in firmware).
    let session = bring_up(server.port(0), dir.path());
    server.port(0).expect_no_event(timeout * 3);
    server.wait_status(0, "still connected", |s| s.connected && s.running && s.connections == 2);
    drop(session);
    server.port(0).expect_event(DeviceEvent::Stopped, TIMEOUT);
    server.wait_closed(0, 2);
}

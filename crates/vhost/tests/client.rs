//! Client mode: vmq connects to a socket the frontend (QEMU with `server=on`) listens on, and
//! connects again whenever the connection ends or the socket is not there yet, with a backoff
//! from `MIN_BACKOFF` to `MAX_BACKOFF`. The frontend here is the `vhost` crate's, on sockets this
//! test listens on.

mod common;

use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use common::*;
use vmq_vhost::DeviceEvent;
use vmq_vhost::server::{MAX_BACKOFF, ServerError, SocketPolicy, VhostMode, VhostUserServer};
use vmq_vhost::{NetDevice, NetDeviceConfig};

fn config() -> NetDeviceConfig {
    net_config("52:54:00:00:00:31", 1500)
}

/// Accepts one connection on `listener` within `within`; returns it and how long it took.
fn accept_within(listener: &UnixListener, within: Duration) -> (UnixStream, Duration) {
    listener.set_nonblocking(true).expect("non-blocking listener");
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, _)) => return (stream, start.elapsed()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(start.elapsed() < within, "vmq did not connect within {within:?}");
                // Bounded poll of the listener: the connection comes from another thread.
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

#[test]
fn client_port_connects_when_the_socket_appears_and_after_every_disconnect() {
    init_tracing();
    let dir = TempDir::new("client-mode");
    let server =
        TestServer::start_with_modes(dir.path(), &[("vm", config(), SocketPolicy::default(), VhostMode::Client)], None);
    let socket = server.port(0).socket.clone();
    // No socket yet (the VM has not started): the port waits, not connected, backing off.
    server.wait_status(0, "waiting", |s| s.mode == VhostMode::Client && !s.connected && s.connections == 0);
    // Let a few attempts fail so that the backoff has grown to its maximum.
    std::thread::sleep(MAX_BACKOFF + Duration::from_millis(500));
    server.assert_polling();
    assert!(!socket.exists(), "a client-mode port made a socket file");

    // The VM's QEMU starts and listens: vmq connects within one backoff period.
    let listener = UnixListener::bind(&socket).expect("listen as the frontend");
    let (stream, waited) = accept_within(&listener, MAX_BACKOFF + TIMEOUT);
    assert!(waited <= MAX_BACKOFF + Duration::from_millis(500), "connected {waited:?} after the socket appeared");
    let session = bring_up_on(stream, server.port(0), dir.path());
    server.wait_status(0, "connected and running", |s| s.connected && s.running && s.connections == 1);

    // The frontend drops the connection (QEMU restarting its chardev): the device stops and
    // vmq connects again at once, without the listener going away.
    drop(session);
    server.port(0).expect_event(DeviceEvent::Stopped, TIMEOUT);
    let (stream, waited) = accept_within(&listener, TIMEOUT);
    eprintln!("reconnected {waited:?} after the connection ended");
    let session = bring_up_on(stream, server.port(0), dir.path());
    server.wait_status(0, "reconnected", |s| s.connected && s.running && s.connections == 2);

    // The frontend goes away entirely (socket file removed), then comes back on a new socket.
    drop(session);
    drop(listener);
    std::fs::remove_file(&socket).expect("remove the frontend's socket");
    server.port(0).expect_event(DeviceEvent::Stopped, TIMEOUT);
    server.wait_status(0, "disconnected", |s| !s.connected && s.connections == 2);
    let listener = UnixListener::bind(&socket).expect("listen again");
    let (stream, _) = accept_within(&listener, MAX_BACKOFF + TIMEOUT);
    let _session = bring_up_on(stream, server.port(0), dir.path());
    server.wait_status(0, "third connection", |s| s.connected && s.running && s.connections == 3);
}

#[test]
fn client_port_refuses_listen_side_policy() {
    let dir = TempDir::new("client-policy");
    let mut server = VhostUserServer::new().expect("epoll");
    for policy in [
        SocketPolicy { mode: Some(0o600), ..Default::default() },
        SocketPolicy { owner: Some(0), ..Default::default() },
        SocketPolicy { group: Some(0), ..Default::default() },
        SocketPolicy { allowed_uids: Some(vec![0]), ..Default::default() },
    ] {
        let socket = dir.path().join("vm.sock");
        let result = server.add_port_mode(
            "vm",
            &socket,
            VhostMode::Client,
            &policy,
            config(),
            NetDevice::new(),
            Box::new(|_| {}),
        );
        assert!(matches!(result, Err(ServerError::ClientPolicy(_))), "{policy:?}: {result:?}");
    }
    // The setup timeout applies to client connections too.
    let policy = SocketPolicy { setup_timeout: Some(Duration::from_secs(3)), ..Default::default() };
    let socket = dir.path().join("ok.sock");
    server
        .add_port_mode("ok", &socket, VhostMode::Client, &policy, config(), NetDevice::new(), Box::new(|_| {}))
        .expect("client port with a setup timeout");
    assert!(server.connection_status("ok").is_some_and(|s| s.mode() == VhostMode::Client && !s.connected()));
}

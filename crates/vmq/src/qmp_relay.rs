//! The QMP relays: for every VM port with `qmp_socket`, a connection to its QEMU that follows the
//! guest's receive filter (`NIC_RX_FILTER_CHANGED` → `query-rx-filter`) and hands it to the data
//! path's policy (`Datapath::guest_set_mac`, `Datapath::guest_set_rx_filter`). One thread
//! (`vmq-qmp`) serves every relay; it sleeps in poll(2) until QEMU writes, a re-query is due
//! or a reconnect is. The protocol itself is `vmq_control::qmp` (sans-IO).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use vmq_control::qmp::{QmpSession, RxFilterInfo, RxState, SessionEvent};
use vmq_core::rxfilter::{GuestRxFilter, RxMode};
use vmq_datapath::Datapath;
use vmq_wire::MacAddr;

use crate::config::QmpRelayConfig;

/// Re-query this often in case an event was missed (QEMU sends one event per change and then
/// none until queried).
const REQUERY: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The running relays; dropped or [`QmpRelays::shutdown`], the thread stops.
pub struct QmpRelays {
    stop: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl QmpRelays {
    /// Starts the `vmq-qmp` thread; `None` when no port has a relay.
    pub fn start(datapath: Arc<Datapath>, configs: &[QmpRelayConfig]) -> std::io::Result<Option<QmpRelays>> {
        if configs.is_empty() {
            return Ok(None);
        }
        let (stop, stop_rx) = UnixStream::pair()?;
        let relays: Vec<Relay> = configs.iter().cloned().map(Relay::new).collect();
        let thread =
            std::thread::Builder::new().name("vmq-qmp".into()).spawn(move || serve(&datapath, relays, stop_rx))?;
        Ok(Some(QmpRelays { stop, thread: Some(thread) }))
    }

    pub fn shutdown(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        let _ = self.stop.write_all(b"x");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for QmpRelays {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

struct Connection {
    stream: UnixStream,
    session: QmpSession,
    unsent: Vec<u8>,
    next_query: Instant,
}

struct Relay {
    config: QmpRelayConfig,
    connection: Option<Connection>,
    retry_at: Instant,
    backoff: Duration,
    /// The connect error last logged (one line per outage, not per attempt).
    logged_failure: Option<ErrorKind>,
    /// What was last applied, so that a re-query that finds nothing new changes nothing.
    applied: Option<GuestRxFilter>,
}

impl Relay {
    fn new(config: QmpRelayConfig) -> Relay {
        Relay {
            config,
            connection: None,
            retry_at: Instant::now(),
            backoff: FIRST_BACKOFF,
            logged_failure: None,
            applied: None,
        }
    }

    fn connect(&mut self, now: Instant) {
        match UnixStream::connect(&self.config.socket).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => {
                tracing::info!(port = %self.config.port, socket = %self.config.socket.display(), "QMP connected");
                self.logged_failure = None;
                self.backoff = FIRST_BACKOFF;
                self.applied = None;
                self.connection = Some(Connection {
                    stream,
                    session: QmpSession::new(self.config.device.clone()),
                    unsent: Vec::new(),
                    next_query: now + REQUERY,
                });
            }
            Err(e) => {
                if self.logged_failure != Some(e.kind()) {
                    tracing::warn!(port = %self.config.port, socket = %self.config.socket.display(), error = %e,
                        "QMP socket not reachable; retrying with backoff");
                    self.logged_failure = Some(e.kind());
                }
                self.retry_at = now + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    fn disconnect(&mut self, datapath: &Datapath, now: Instant, why: &str) {
        tracing::warn!(port = %self.config.port, reason = why, "QMP connection lost; reconnecting");
        datapath.count_qmp_error(&self.config.port);
        self.connection = None;
        self.retry_at = now + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// When this relay next needs the thread without QEMU writing.
    fn deadline(&self) -> Instant {
        match &self.connection {
            Some(c) => c.next_query,
            None => self.retry_at,
        }
    }

    /// Reads what QEMU sent and acts on it; false if the connection ended.
    fn read(&mut self, datapath: &Datapath) -> Result<(), &'static str> {
        let Some(conn) = self.connection.as_mut() else { return Ok(()) };
        let mut buf = [0u8; 16384];
        loop {
            match conn.stream.read(&mut buf) {
                Ok(0) => return Err("QEMU closed the QMP socket"),
                Ok(n) => {
                    for event in conn.session.receive(&buf[..n]) {
                        match event {
                            Ok(SessionEvent::Ready) => {
                                tracing::info!(port = %self.config.port, device = %self.config.device, "QMP command mode")
                            }
                            Ok(SessionEvent::RxFilter(info)) => {
                                apply(datapath, &self.config.port, &mut self.applied, &info)
                            }
                            Err(e) => {
                                datapath.count_qmp_error(&self.config.port);
                                tracing::warn!(port = %self.config.port, error = %e, "QMP");
                            }
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err("QMP socket read failed"),
            }
        }
    }

    /// Writes what the session has for QEMU, as far as the socket takes it.
    fn flush(&mut self) -> Result<(), &'static str> {
        let Some(conn) = self.connection.as_mut() else { return Ok(()) };
        conn.unsent.extend(conn.session.take_output());
        while !conn.unsent.is_empty() {
            match conn.stream.write(&conn.unsent) {
                Ok(0) => return Err("QMP socket write failed"),
                Ok(n) => {
                    conn.unsent.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err("QMP socket write failed"),
            }
        }
        Ok(())
    }
}

fn serve(datapath: &Datapath, mut relays: Vec<Relay>, mut stop: UnixStream) {
    loop {
        let now = Instant::now();
        for r in &mut relays {
            match &mut r.connection {
                None if r.retry_at <= now => r.connect(now),
                Some(c) if c.next_query <= now => {
                    c.session.query();
                    c.next_query = now + REQUERY;
                }
                _ => {}
            }
            if let Err(why) = r.flush() {
                r.disconnect(datapath, now, why);
            }
        }
        let wait = relays.iter().map(Relay::deadline).min().map_or(REQUERY, |d| d.saturating_duration_since(now));
        let (stop_ready, ready) = {
            let mut fds = vec![PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
            let mut which = Vec::new();
            for (i, r) in relays.iter().enumerate() {
                if let Some(c) = &r.connection {
                    let mut flags = PollFlags::POLLIN;
                    if !c.unsent.is_empty() {
                        flags |= PollFlags::POLLOUT;
                    }
                    fds.push(PollFd::new(c.stream.as_fd(), flags));
                    which.push(i);
                }
            }
            // Rounded up, so that a deadline a fraction of a millisecond away is not a busy loop.
            let ms = wait.as_millis().saturating_add(1).min(i32::MAX as u128) as i32;
            match poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "QMP relays: poll failed; relays stop");
                    return;
                }
            }
            let any = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            let ready: Vec<usize> = which.iter().zip(&fds[1..]).filter(|(_, f)| any(f)).map(|(i, _)| *i).collect();
            (any(&fds[0]), ready)
        };
        if stop_ready {
            let _ = stop.read(&mut [0u8; 8]);
            return;
        }
        let now = Instant::now();
        for i in ready {
            let r = &mut relays[i];
            if let Err(why) = r.read(datapath).and_then(|()| r.flush()) {
                r.disconnect(datapath, now, why);
            }
        }
    }
}

/// Applies a filter QEMU reported, if it differs from what was last applied: the MAC first
/// (policy: `allow_mac_change`), then the rest (policy: `allow_promiscuous`).
fn apply(datapath: &Datapath, port: &str, applied: &mut Option<GuestRxFilter>, info: &RxFilterInfo) {
    let request = guest_filter(info);
    if applied.as_ref() == Some(&request) {
        return;
    }
    let mac_changed = applied.as_ref().is_none_or(|a| a.main_mac != request.main_mac);
    if let (true, Some(mac)) = (mac_changed, request.main_mac) {
        // Refused changes are logged and counted by the data path.
        let _ = datapath.guest_set_mac(port, mac);
    }
    match datapath.guest_set_rx_filter(port, &request) {
        Ok(_) => *applied = Some(request),
        Err(e) => tracing::warn!(port, error = %e, "guest receive filter not applied"),
    }
}

fn mode(state: RxState, overflow: bool) -> RxMode {
    match (state, overflow) {
        (RxState::None, _) => RxMode::None,
        (RxState::All, _) | (_, true) => RxMode::All,
        (RxState::Normal, false) => RxMode::Normal,
    }
}

/// QEMU's view of the filter as the core's request (overflowed tables mean "all").
pub fn guest_filter(info: &RxFilterInfo) -> GuestRxFilter {
    GuestRxFilter {
        main_mac: Some(MacAddr(info.main_mac)),
        promiscuous: info.promiscuous,
        unicast: mode(info.unicast, info.unicast_overflow),
        unicast_table: info.unicast_table.iter().map(|m| MacAddr(*m)).collect(),
        multicast: mode(info.multicast, info.multicast_overflow),
        multicast_table: info.multicast_table.iter().map(|m| MacAddr(*m)).collect(),
        vlan: mode(info.vlan, false),
        vlan_table: info.vlan_table.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflowed_tables_mean_all() {
        let info = RxFilterInfo {
            multicast: RxState::Normal,
            multicast_overflow: true,
            unicast: RxState::None,
            unicast_overflow: true,
            ..Default::default()
        };
        let f = guest_filter(&info);
        assert_eq!(f.multicast, RxMode::All);
        assert_eq!(f.unicast, RxMode::None, "none wins over an overflow");
        assert_eq!(f.vlan, RxMode::Normal);
    }
}

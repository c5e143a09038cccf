//! systemd's readiness protocol (`sd_notify(3)`): one datagram of `KEY=VALUE` lines to the Unix
//! socket named by `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`).
//! A few lines of std instead of a crate: nothing is sent when the variable is unset, and a
//! failure to send is logged, never fatal (vmq works the same without systemd).

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// What vmq tells its service manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The data path and the control socket are up.
    Ready,
    /// A reload (SIGHUP) has started; `Ready` follows when it is done.
    Reloading,
    /// Shutting down.
    Stopping,
}

impl State {
    /// The datagram's text. `RELOADING=1` carries the monotonic time, as `Type=notify-reload`
    /// requires (plain `Type=notify` ignores it).
    fn message(self) -> String {
        match self {
            State::Ready => "READY=1\nSTATUS=running\n".to_string(),
            State::Reloading => format!("RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading\n", monotonic_usec()),
            State::Stopping => "STOPPING=1\nSTATUS=stopping\n".to_string(),
        }
    }
}

/// CLOCK_MONOTONIC in microseconds.
fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// The address `$NOTIFY_SOCKET` names, or None when unset or empty.
fn socket_address(value: &std::ffi::OsStr) -> io::Result<Option<SocketAddr>> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = value.as_bytes();
    match bytes.first() {
        None => Ok(None),
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]).map(Some),
        Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(value)).map(Some),
        Some(_) => Err(io::Error::new(io::ErrorKind::InvalidInput, "NOTIFY_SOCKET is neither a path nor @name")),
    }
}

/// Sends `state` to the service manager if there is one; true if a datagram was sent.
pub fn notify(state: State) -> bool {
    let Some(value) = std::env::var_os("NOTIFY_SOCKET") else { return false };
    let sent = socket_address(&value).and_then(|addr| match addr {
        None => Ok(false),
        Some(addr) => {
            let socket = UnixDatagram::unbound()?;
            socket.send_to_addr(state.message().as_bytes(), &addr).map(|_| true)
        }
    });
    match sent {
        Ok(sent) => sent,
        Err(e) => {
            tracing::warn!(error = %e, socket = ?value, ?state, "cannot notify the service manager");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn messages_are_the_documented_assignments() {
        assert!(State::Ready.message().starts_with("READY=1\n"));
        assert!(State::Stopping.message().starts_with("STOPPING=1\n"));
        let reloading = State::Reloading.message();
        let usec: u64 = reloading
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse().ok())
            .expect("MONOTONIC_USEC");
        assert!(reloading.starts_with("RELOADING=1\n") && usec > 0, "{reloading}");
    }

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        assert!(socket_address(OsStr::new("")).unwrap().is_none());
        let abstract_addr = socket_address(OsStr::new("@vmq/notify")).unwrap().unwrap();
        assert_eq!(abstract_addr.as_abstract_name(), Some(&b"vmq/notify"[..]));
        let path = socket_address(OsStr::new("/run/systemd/notify")).unwrap().unwrap();
        assert_eq!(path.as_pathname(), Some(std::path::Path::new("/run/systemd/notify")));
        assert!(socket_address(OsStr::new("relative")).is_err());
    }

    #[test]
    fn a_datagram_reaches_an_abstract_socket() {
        let name = format!("vmq-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        receiver.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let target = socket_address(OsStr::new(&format!("@{name}"))).unwrap().unwrap();
        UnixDatagram::unbound().unwrap().send_to_addr(State::Ready.message().as_bytes(), &target).unwrap();
        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], State::Ready.message().as_bytes());
    }
}

//! The control socket client: connect with a timeout, send a request, read its reply with a
//! timeout. Errors say whether vmq could not be reached at all or answered badly.

use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};

use crate::lines::{self, LineError};
use crate::protocol::{ControlError, MAX_RESPONSE_BYTES, Reply, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to vmq (is vmq running? socket {}): {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("vmq did not answer within {} ms (socket {})", timeout.as_millis(), path.display())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("vmq closed the connection without answering (socket {})", path.display())]
    Closed { path: PathBuf },
    #[error("control socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("bad answer from vmq: {0}")]
    Protocol(String),
    /// vmq answered with an error.
    #[error("{0}")]
    Remote(ControlError),
}

impl ClientError {
    /// vmq could not be reached (not running, wrong socket, or not answering).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Connect { .. } | ClientError::Timeout { .. })
    }
}

/// Default for connecting and for waiting for an answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection to the control socket; requests on it are answered in order.
pub struct Client {
    path: PathBuf,
    timeout: Duration,
    reader: BufReader<DeadlineReader>,
    writer: UnixStream,
    line: Vec<u8>,
}

impl Client {
    /// Connects, waiting at most `timeout` (a server whose backlog is full makes a plain connect
    /// block). `timeout` also bounds the wait for each answer.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Client, ClientError> {
        let path = path.as_ref().to_path_buf();
        let stream =
            connect_stream(&path, timeout).map_err(|source| ClientError::Connect { path: path.clone(), source })?;
        let io = |source| ClientError::Io { path: path.clone(), source };
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let read_half = stream.try_clone().map_err(io)?;
        Ok(Client {
            reader: BufReader::with_capacity(64 * 1024, DeadlineReader { stream: read_half, deadline: None }),
            writer: stream,
            path,
            timeout,
            line: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends a request; `Err(ClientError::Remote)` when vmq answers with an error.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        let (reply, _) = self.call_raw(request)?;
        reply.0.map_err(ClientError::Remote)
    }

    /// Sends a request; returns vmq's reply, error replies included, and the reply line as
    /// received (for `--json`).
    pub fn call_raw(&mut self, request: &Request) -> Result<(Reply, String), ClientError> {
        let raw = self.send_raw(request.to_line().as_bytes())?;
        let reply = Reply::from_line(raw.as_bytes()).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok((reply, raw))
    }

    /// Writes `bytes` as they are (they should end with a newline) and reads one reply line.
    /// For tests and debugging: nothing checks that `bytes` is a request.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<String, ClientError> {
        let path = self.path.clone();
        let io = |source: io::Error| match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ClientError::Timeout { path: path.clone(), timeout: self.timeout }
            }
            _ => ClientError::Io { path: path.clone(), source },
        };
        // A server that refuses a connection (denied, busy) answers at once and closes, so
        // our write may meet a closed socket while the answer waits to be read: read it.
        let written = self.writer.write_all(bytes);
        let refused_early = matches!(&written, Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset));
        if !refused_early {
            written.map_err(io)?;
        }
        self.reader.get_mut().deadline = Some(Instant::now() + self.timeout);
        match lines::read_line(&mut self.reader, MAX_RESPONSE_BYTES, &mut self.line) {
            Ok(true) => String::from_utf8(std::mem::take(&mut self.line))
                .map_err(|_| ClientError::Protocol("the answer is not UTF-8".into())),
            Ok(false) => Err(ClientError::Closed { path: self.path.clone() }),
            Err(LineError::TooLong) => {
                Err(ClientError::Protocol(format!("answer longer than {MAX_RESPONSE_BYTES} bytes")))
            }
            Err(LineError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                Err(ClientError::Closed { path: self.path.clone() })
            }
            Err(LineError::Io(e)) => Err(io(e)),
        }
    }
}

/// One request on a fresh connection.
pub fn call(path: impl AsRef<Path>, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    Client::connect(path, timeout)?.call(request)
}

/// Bounds every read by a deadline for the whole answer, not per read: a peer trickling bytes
/// cannot stretch the wait.
struct DeadlineReader {
    stream: UnixStream,
    deadline: Option<Instant>,
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf)
    }
}

/// Connects to a Unix stream socket, giving up after `timeout`. A plain blocking connect waits
/// without limit while the server's accept backlog is full; a non-blocking one reports EAGAIN,
/// and we retry until the deadline.
pub(crate) fn connect_stream(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)
        .map_err(io::Error::from)?;
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(1);
    loop {
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "the server's connection backlog stayed full"));
                }
                // Nothing to wait on for a full backlog: retry with a bounded backoff.
                std::thread::sleep(backoff.min(left));
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

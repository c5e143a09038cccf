//! `control_line`: bytes sent on the control socket, split into request lines the way the
//! server splits them, each parsed (`Request::from_line`) and handled by a mock handler; and the
//! same bytes sent to a real [`ControlServer`] over its Unix socket.
//!
//! Invariants: no panic; every non-blank line gets exactly one reply line, `ok` or a typed
//! error, which parses back as the same reply; a line over the limit gets one `too_large` and
//! ends the connection; the server's replies are the ones the in-process path computes; a
//! parsed request survives `to_line` → `from_line` unchanged.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use vmq_control::protocol::Response;
use vmq_control::{ControlError, ControlServer, ErrorCode, Reply, Request, ServerConfig};

/// Longest request line the harness's server takes (small, so that fuzz inputs reach it).
pub const MAX_LINE: usize = 512;
const TIMEOUT: Duration = Duration::from_secs(10);

/// A deterministic handler: refuses `del-port` (no such port), answers everything else with
/// the command's name.
fn mock_handler(request: Request) -> Result<Response, ControlError> {
    match request {
        Request::DelPort { name } => Err(ControlError::no_such_port(&name)),
        other => Ok(Response::Done { message: other.command().to_string() }),
    }
}

/// What the server should answer to `data`: one reply per non-blank line, in order.
pub fn expected_replies(data: &[u8]) -> Vec<Reply> {
    let mut replies = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (raw, next, had_newline) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..], true),
            None => (rest, &[][..], false),
        };
        if raw.len() > MAX_LINE {
            let msg = format!("request longer than {MAX_LINE} bytes; closing the connection");
            replies.push(Reply(Err(ControlError::new(ErrorCode::TooLarge, msg))));
            return replies;
        }
        // Only a newline-terminated line loses its `\r` (as `lines::read_line` does).
        let line = if had_newline { raw.strip_suffix(b"\r").unwrap_or(raw) } else { raw };
        rest = next;
        if !had_newline && raw.is_empty() {
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        replies.push(reply_to(line));
    }
    replies
}

/// The in-process path for one line, with its own checks.
fn reply_to(line: &[u8]) -> Reply {
    let reply = match Request::from_line(line) {
        Ok(request) => {
            let again = Request::from_line(request.to_line().as_bytes());
            assert_eq!(again.as_ref(), Ok(&request), "request does not survive to_line/from_line");
            Reply(mock_handler(request))
        }
        Err(e) => {
            assert!(
                matches!(e.code, ErrorCode::BadRequest | ErrorCode::UnknownCommand),
                "parse error with code {:?}",
                e.code
            );
            Reply(Err(e))
        }
    };
    let text = reply.to_line();
    assert!(text.ends_with('\n') && text.matches('\n').count() == 1, "a reply is exactly one line: {text:?}");
    let parsed = Reply::from_line(text.as_bytes()).expect("a reply parses back");
    assert_eq!(parsed, reply, "reply does not survive to_line/from_line");
    reply
}

/// A control server with the mock handler on a private socket, removed on drop.
pub struct ControlHarness {
    server: Option<ControlServer>,
    dir: PathBuf,
}

impl ControlHarness {
    pub fn start() -> ControlHarness {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmq-fuzz-control-{}-{n}", std::process::id()));
        let mut config = ServerConfig::new(dir.join("control.sock"));
        config.max_request_bytes = MAX_LINE;
        // Connections are sequential, but the server may not have reaped the last one yet.
        config.max_connections = 4096;
        config.idle_timeout = TIMEOUT;
        let server = ControlServer::start(config, Arc::new(mock_handler)).expect("start the control server");
        ControlHarness { server: Some(server), dir }
    }

    /// Sends `data` on a fresh connection and checks the replies.
    pub fn run(&self, data: &[u8]) {
        let expected = expected_replies(data);
        let path = self.server.as_ref().expect("server").path().to_path_buf();
        let mut stream = UnixStream::connect(&path).expect("connect to the control server");
        stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
        stream.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
        // The server may close early (a line over the limit): a failed write is then expected.
        let wrote = stream.write_all(data).is_ok();
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        if let Err(e) = stream.read_to_end(&mut answer) {
            // A reset after `too_large` may cut what we read; anything else is a failure.
            assert!(
                e.kind() == std::io::ErrorKind::ConnectionReset,
                "reading replies failed: {e} (after {} bytes)",
                answer.len()
            );
        }
        let got: Vec<Reply> = answer
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| Reply::from_line(l).expect("server reply parses"))
            .collect();
        let too_large = expected.last().is_some_and(|r| matches!(&r.0, Err(e) if e.code == ErrorCode::TooLarge));
        if wrote && !too_large {
            assert_eq!(got, expected, "server replies differ from one reply per line");
        } else {
            // Closed after `too_large`: every answered line is the expected one.
            assert!(got.len() <= expected.len(), "more replies than lines");
            assert_eq!(got[..], expected[..got.len()], "server replies differ");
        }
        assert!(!got.is_empty() || expected.is_empty() || !wrote, "no reply at all");
    }
}

impl Drop for ControlHarness {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The fuzz target: one connection per input to a server started once per process.
pub fn control_line(data: &[u8]) {
    static HARNESS: OnceLock<ControlHarness> = OnceLock::new();
    HARNESS.get_or_init(ControlHarness::start).run(data);
}

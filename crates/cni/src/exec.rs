//! Runs a helper program (the IPAM plugin, `ip`) with its stdin given, its output collected and
//! a deadline: a hung helper is killed rather than hanging the runtime's call.

use std::io::{self, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a finished program left.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Starts `command` (where the caller chooses: inside a namespace, see `pod`), piping its
/// stdin, stdout and stderr.
pub fn spawn(command: &mut Command) -> io::Result<Child> {
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()
}

/// Feeds `stdin` to a child from [`spawn`], collects its output and waits at most `limit`,
/// killing it past that.
pub fn finish(mut child: Child, stdin: &[u8], limit: Duration) -> io::Result<Output> {
    let drain = |pipe: Option<Box<dyn Read + Send>>| -> JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                // A read error just ends the output early; the exit status still says how it went.
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    if let Some(mut pipe) = child.stdin.take() {
        // A program that exits without reading its stdin closes the pipe: not our failure.
        match pipe.write_all(stdin) {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e),
            _ => {}
        }
    }
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {} s", limit.as_secs())));
        }
        // A child has no fd to wait on with a timeout here; poll with a short bounded period.
        std::thread::sleep(Duration::from_millis(2));
    };
    Ok(Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_collected_and_hung_programs_are_killed() {
        let child = spawn(Command::new("cat").arg("-")).unwrap();
        let out = finish(child, b"hello", Duration::from_secs(10)).unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"hello");
        let child = spawn(Command::new("sleep").arg("30")).unwrap();
        let started = Instant::now();
        let e = finish(child, b"", Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

//! The accept loops' wait, shared by the control socket server and the metrics exporter: block
//! until the listener has a connection or the shutdown wake-up arrives.

use std::os::fd::AsFd;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// What woke the loop.
pub(crate) struct Readiness {
    pub listener: bool,
    pub woken: bool,
}

/// Waits on `listener` and `wake`; EINTR is retried, any other poll error is returned.
pub(crate) fn listener_or_wake(listener: &impl AsFd, wake: &impl AsFd) -> Result<Readiness, nix::errno::Errno> {
    loop {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN), PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        return Ok(Readiness { listener: ready(&fds[0]), woken: ready(&fds[1]) });
    }
}

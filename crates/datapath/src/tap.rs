//! TAP ports: a [`Tap`] from the OS glue as a [`FrameSource`] (what the container/namespace
//! sends) and a [`FrameSink`] (what vmq delivers to it), sharing one fd. Frames cross as 12-byte
//! virtio-net header + Ethernet frame in one read or one vectored write: no copy besides the
//! kernel's. A TAP whose interface disappears turns into a port that is down for good.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vmq_core::{DropReason, OffloadCaps};
use vmq_sys::tap::{MAX_PARTS, Tap, TapIoError};
use vmq_wire::VnetHdr;

use crate::port::{FrameSink, FrameSource, RecvError, Scratch, Wake};

/// Shortest read that can be a frame: the header plus an Ethernet header.
const MIN_READ: usize = VnetHdr::LEN + 14;

/// One TAP port. Clones share the TAP: attach one clone as the source, one as the sink.
#[derive(Clone)]
pub struct TapPort {
    tap: Arc<Tap>,
    gone: Arc<AtomicBool>,
}

impl TapPort {
    pub fn new(tap: Tap) -> TapPort {
        TapPort { tap: Arc::new(tap), gone: Arc::new(AtomicBool::new(false)) }
    }

    /// The TAP's fd, for the worker's epoll (readable: frames to receive; error: TAP gone).
    pub fn raw_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    /// The interface was deleted: nothing will be received or delivered any more.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    fn mark_gone(&self, e: &TapIoError) {
        if !self.gone.swap(true, Ordering::Relaxed) {
            tracing::warn!("TAP {}: interface gone, port down: {e}", self.tap.name());
        }
    }
}

impl FrameSource for TapPort {
    fn recv(&mut self, scratch: &mut Scratch, max: usize, errors: &mut Vec<RecvError>) -> usize {
        if self.is_gone() {
            return 0;
        }
        let mut n = 0;
        // Bounded by reads, not frames kept: a stream of bad frames cannot hold the worker.
        for _ in 0..max {
            let Some(buf) = scratch.next_buf() else {
                break;
            };
            match self.tap.read(buf) {
                Ok(len) if len < MIN_READ => errors.push(RecvError::Drop(DropReason::Malformed)),
                Ok(len) => {
                    scratch.commit(len);
                    n += 1;
                }
                Err(TapIoError::WouldBlock) => break,
                Err(e @ TapIoError::Gone(_)) => {
                    self.mark_gone(&e);
                    errors.push(RecvError::Gone);
                    break;
                }
                Err(e) => {
                    tracing::debug!("TAP {}: read: {e}", self.tap.name());
                    errors.push(RecvError::Drop(DropReason::Malformed));
                    break;
                }
            }
        }
        n
    }

    fn polls_cheaply(&self) -> bool {
        false // every poll is a read() syscall
    }

    fn wake(&mut self) -> Wake {
        // A deleted TAP's fd stays readable (an error) forever: stop waiting on it. Nothing
        // comes from it any more either.
        if self.is_gone() { Wake::Never } else { Wake::Fd(self.raw_fd()) }
    }
}

impl FrameSink for TapPort {
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason> {
        if self.is_gone() {
            return Err(DropReason::PortDown);
        }
        let hdr = hdr.to_bytes();
        let joined;
        let mut iov: [&[u8]; MAX_PARTS] = [&[]; MAX_PARTS];
        iov[0] = &hdr;
        let count = if parts.len() < MAX_PARTS {
            iov[1..=parts.len()].copy_from_slice(parts);
            parts.len() + 1
        } else {
            // More parts than one writev takes here: rare, so one copy is fine.
            joined = parts.concat();
            iov[1] = &joined;
            2
        };
        match self.tap.write(&iov[..count]) {
            Ok(_) => Ok(()),
            Err(TapIoError::WouldBlock) => Err(DropReason::NoBuffer),
            Err(e @ TapIoError::Gone(_)) => {
                self.mark_gone(&e);
                Err(DropReason::PortDown)
            }
            Err(TapIoError::Down(_)) => Err(DropReason::PortDown),
            Err(TapIoError::Invalid(_)) => Err(DropReason::Malformed),
            Err(e) => {
                tracing::debug!("TAP {}: write: {e}", self.tap.name());
                Err(DropReason::NoBuffer)
            }
        }
    }

    fn flush(&mut self) {}

    /// With offloads the kernel takes GSO frames and partial checksums and finishes what its
    /// stack needs; without, vmq must segment and finish checksums first.
    fn caps(&self) -> OffloadCaps {
        if self.tap.offloads() { OffloadCaps::ALL } else { OffloadCaps::NONE }
    }
}

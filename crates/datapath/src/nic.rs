//! An in-process stand-in for a NIC, for tests and `vmq bench`. Its RX queues replay frames that
//! "arrived from the wire" from host memory, handing buffers over without a copy (as a NIC DMAs
//! into host buffers); in `vmq` mode each VM queue holds only its VM's frames, as a NIC with VMQ
//! filters would sort them, and in `switch` mode everything comes on the default queue. Its TX
//! side discards (the wire), after vmq has counted the frames.

use std::sync::Arc;

use vmq_core::{DropReason, OffloadCaps};
use vmq_wire::VnetHdr;

use crate::port::{FrameSink, FrameSource, RecvError, Scratch};

/// An RX queue that replays a fixed set of frames forever.
pub struct ReplayQueue {
    frames: Vec<Arc<[u8]>>,
    next: usize,
}

impl ReplayQueue {
    /// `frames` are Ethernet frames; each gets an all-zero virtio-net header (a NIC that
    /// validated nothing and coalesced nothing).
    pub fn new(frames: &[Vec<u8>]) -> ReplayQueue {
        let frames = frames
            .iter()
            .map(|f| {
                let mut v = Vec::with_capacity(VnetHdr::LEN + f.len());
                v.extend_from_slice(&VnetHdr::default().to_bytes());
                v.extend_from_slice(f);
                Arc::from(v.into_boxed_slice())
            })
            .collect();
        ReplayQueue { frames, next: 0 }
    }
}

impl FrameSource for ReplayQueue {
    fn recv(&mut self, scratch: &mut Scratch, max: usize, _errors: &mut Vec<RecvError>) -> usize {
        if self.frames.is_empty() {
            return 0;
        }
        let mut n = 0;
        while n < max && scratch.push_shared(self.frames[self.next].clone()) {
            self.next = (self.next + 1) % self.frames.len();
            n += 1;
        }
        n
    }
}

/// A source that yields frames given once (tests), then nothing.
pub struct OnceQueue {
    frames: std::collections::VecDeque<Arc<[u8]>>,
}

impl OnceQueue {
    /// `frames`: virtio-net header + Ethernet frame each.
    pub fn new(frames: Vec<Vec<u8>>) -> OnceQueue {
        OnceQueue {
            frames: frames
                .into_iter()
                .map(|f| Arc::from(f.into_boxed_slice()))
                .collect(),
        }
    }
}

impl FrameSource for OnceQueue {
    fn recv(&mut self, scratch: &mut Scratch, max: usize, _errors: &mut Vec<RecvError>) -> usize {
        let mut n = 0;
        while n < max {
            let Some(f) = self.frames.pop_front() else {
                break;
            };
            if !scratch.push_shared(f.clone()) {
                self.frames.push_front(f);
                break;
            }
            n += 1;
        }
        n
    }
}

/// Frames a [`WireSink`] kept, for tests to inspect.
pub type KeptFrames = Arc<std::sync::Mutex<Vec<(VnetHdr, Vec<u8>)>>>;

/// The NIC's transmit side: frames leave for the wire. Optionally keeps them (tests).
pub struct WireSink {
    caps: OffloadCaps,
    kept: Option<KeptFrames>,
}

impl WireSink {
    pub fn discard(caps: OffloadCaps) -> WireSink {
        WireSink { caps, kept: None }
    }

    pub fn keeping(caps: OffloadCaps) -> (WireSink, KeptFrames) {
        let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
        (
            WireSink {
                caps,
                kept: Some(kept.clone()),
            },
            kept,
        )
    }
}

impl FrameSink for WireSink {
    fn send(&mut self, hdr: &VnetHdr, parts: &[&[u8]]) -> Result<(), DropReason> {
        if let Some(kept) = &self.kept {
            let frame = parts.concat();
            kept.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((*hdr, frame));
        }
        Ok(())
    }

    fn flush(&mut self) {}

    fn caps(&self) -> OffloadCaps {
        self.caps
    }
}

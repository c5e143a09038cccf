//! Fuzz harnesses for vmq's guest- and peer-facing parsers. Each `pub fn <target>(data: &[u8])`
//! decodes its input, drives the real code and checks the target's invariants, panicking on a
//! violation. The same functions run under libFuzzer (`fuzz/`, cargo-fuzz) and as property tests
//! (`tests/`), so CI exercises them on every `cargo test`.
//!
//! Inputs are decoded leniently (short input reads as zeros) so that every byte string is a
//! valid test case; [`seeds`] builds meaningful inputs from real frames and messages.
#![forbid(unsafe_code)]

pub mod config_file;
pub mod control;
pub mod offload;
pub mod packed_ring;
pub mod qmp;
pub mod ring;
pub mod rx;
pub mod seeds;
pub mod tx;
pub mod vhost;
pub mod xsk;

pub use config_file::config_file;
pub use control::control_line;
pub use offload::vnet_offload;
pub use packed_ring::packed_ring;
pub use qmp::qmp_session;
pub use ring::split_ring;
pub use rx::rx_writer;
pub use tx::tx_assembly;
pub use vhost::vhost_messages;
pub use xsk::xsk_ring;

/// Reads a fuzz input front to back; past the end everything reads as zero.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A length-prefixed (u16) chunk, at most `max` bytes.
    pub fn chunk(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u16()).min(max);
        self.bytes(n)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Writes the encoding [`Input`] reads back: the seed builders use it.
#[derive(Default)]
pub struct InputBuilder {
    pub bytes: Vec<u8>,
}

impl InputBuilder {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(b);
        self
    }
    /// A chunk as [`Input::chunk`] reads it.
    pub fn chunk(&mut self, b: &[u8]) -> &mut Self {
        self.u16(b.len() as u16);
        self.raw(b)
    }
}

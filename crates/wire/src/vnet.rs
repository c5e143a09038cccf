//! The 12-byte `virtio_net_hdr_v1` that precedes every frame on virtio-net, TAP (IFF_VNET_HDR)
//! and AF_PACKET (PACKET_VNET_HDR). All fields are little-endian (VIRTIO_F_VERSION_1).

/// Header flags (virtio spec 5.1.6).
pub const FLAG_NEEDS_CSUM: u8 = 1;
pub const FLAG_DATA_VALID: u8 = 2;
pub const FLAG_RSC_INFO: u8 = 4;

/// Bit in `gso_type` marking that the sender set ECN CWR on a segment.
pub const GSO_ECN: u8 = 0x80;

/// GSO kind carried in `gso_type` (without the ECN bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GsoType {
    None,
    TcpV4,
    Udp,
    TcpV6,
    UdpL4,
}

impl GsoType {
    pub fn from_raw(raw: u8) -> Option<GsoType> {
        match raw & !GSO_ECN {
            0 => Some(GsoType::None),
            1 => Some(GsoType::TcpV4),
            3 => Some(GsoType::Udp),
            4 => Some(GsoType::TcpV6),
            5 => Some(GsoType::UdpL4),
            _ => None,
        }
    }

    pub fn to_raw(self) -> u8 {
        match self {
            GsoType::None => 0,
            GsoType::TcpV4 => 1,
            GsoType::Udp => 3,
            GsoType::TcpV6 => 4,
            GsoType::UdpL4 => 5,
        }
    }
}

/// Decoded virtio-net header. `num_buffers` is only meaningful on receive with MRG_RXBUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

/// Why a virtio-net header was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VnetHdrError {
    #[error("virtio-net header truncated")]
    Truncated,
    #[error("unknown gso_type {0:#x}")]
    UnknownGsoType(u8),
    #[error("GSO frame with gso_size 0")]
    ZeroGsoSize,
    #[error("checksum start/offset outside the frame")]
    CsumOutOfFrame,
    #[error("hdr_len {0} outside the frame")]
    HdrLenOutOfFrame(u16),
}

impl VnetHdr {
    /// Size of `virtio_net_hdr_v1` (with `num_buffers`).
    pub const LEN: usize = 12;

    pub fn parse(bytes: &[u8]) -> Result<VnetHdr, VnetHdrError> {
        let b = bytes.get(..Self::LEN).ok_or(VnetHdrError::Truncated)?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        })
    }

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    pub fn gso(&self) -> Option<GsoType> {
        GsoType::from_raw(self.gso_type)
    }

    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != 0
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & FLAG_NEEDS_CSUM != 0
    }

    pub fn data_valid(&self) -> bool {
        self.flags & FLAG_DATA_VALID != 0
    }

    /// Checks the header against the frame it describes (`frame_len` bytes, without the header).
    /// `hdr_len` is advisory in the spec (drivers often get it wrong), so it is not checked here.
    pub fn validate(&self, frame_len: usize) -> Result<GsoType, VnetHdrError> {
        let gso = self.gso().ok_or(VnetHdrError::UnknownGsoType(self.gso_type))?;
        if gso != GsoType::None && self.gso_size == 0 {
            return Err(VnetHdrError::ZeroGsoSize);
        }
        if self.needs_csum() {
            let end = self.csum_start as usize + self.csum_offset as usize + 2;
            if end > frame_len {
                return Err(VnetHdrError::CsumOutOfFrame);
            }
        }
        Ok(gso)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = VnetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: 1 | GSO_ECN,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        assert_eq!(VnetHdr::parse(&h.to_bytes()).unwrap(), h);
        assert_eq!(h.gso(), Some(GsoType::TcpV4));
    }

    #[test]
    fn rejects_bogus() {
        assert_eq!(VnetHdr::parse(&[0; 11]), Err(VnetHdrError::Truncated));
        let h = VnetHdr { gso_type: 1, gso_size: 0, ..Default::default() };
        assert_eq!(h.validate(100), Err(VnetHdrError::ZeroGsoSize));
        let h = VnetHdr { gso_type: 9, ..Default::default() };
        assert_eq!(h.validate(100), Err(VnetHdrError::UnknownGsoType(9)));
        let h = VnetHdr { flags: FLAG_NEEDS_CSUM, csum_start: 90, csum_offset: 16, ..Default::default() };
        assert_eq!(h.validate(100), Err(VnetHdrError::CsumOutOfFrame));
    }
}

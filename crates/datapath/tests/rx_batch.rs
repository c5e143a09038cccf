//! An RX batch (the ring opened once for several frames, as the vhost-user and in-process RX
//! sinks write them) against a guest whose receive buffer overlaps its own avail index: the
//! first frame overwrites the index with a bogus value, the next frame (mergeable buffers)
//! takes the chains the device had already seen, then re-reads the index and breaks the ring.
//! Checked: the ring breaks once, the frame is refused, and the chains it had taken are given
//! back untaken, so the device position (what GET_VRING_BASE reports) counts only chains that
//! went back through the used ring.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmq_datapath::driver::{BufferSpec, SplitRingDriver};
use vmq_datapath::ring::{Memory, Ring, RingState};
use vmq_datapath::virtio::{RxWriter, VirtioError};
use vmq_wire::VnetHdr;

const SIZE: u16 = 8;
const BUFS: u64 = 0x8000;

#[test]
fn a_frame_that_breaks_the_ring_mid_batch_keeps_no_chain() {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let (mut driver, _) = SplitRingDriver::new(SIZE, GuestAddress(0));
    driver.init(&mem).unwrap();
    let mut queue = Queue::new(SIZE).unwrap();
    driver.configure(&mut queue);
    let mut state = RingState::from_queue(&queue);
    let avail_idx_at = state.avail_ring.0 + 2;
    // Chain 0: 14 bytes ending on the avail index (the frame's last two bytes land on it).
    let buf = |addr: u64, len: u32| BufferSpec { addr: GuestAddress(addr), len, device_writes: true };
    let own = driver.add_chain(&mem, &[buf(avail_idx_at + 2 - 14, 14)]).unwrap();
    for at in [BUFS, BUFS + 0x100] {
        driver.add_chain(&mem, &[buf(at, 100)]).unwrap();
    }
    driver.publish(&mem);

    let mut writer = RxWriter::new(true);
    let hdr = VnetHdr::default();
    let mut ring = Ring::open(&mem, &mut state).unwrap();
    // 0x2001 as the avail index: far more than a ring ahead of the device.
    assert_eq!(writer.push(&mut ring, &hdr, &[&[0x01, 0x20]]), Ok(()));
    assert_eq!(ring.position(), (1, 1));
    // Needs all three chains' room: takes the two the device has seen, then re-reads the index.
    assert_eq!(writer.push(&mut ring, &hdr, &[&[0u8; 1000]]), Err(VirtioError::RingBroken));
    assert_eq!(ring.position(), (1, 1), "chains taken for the refused frame are given back untaken");
    assert_eq!(writer.push(&mut ring, &hdr, &[&[0u8; 60]]), Err(VirtioError::RingBroken));
    assert_eq!(ring.position(), (1, 1));
    drop(ring);
    assert!(state.is_broken());
    // The guest sees the one frame delivered, and nothing else.
    assert_eq!(driver.pop_used(&mem), Some((own, 14)));
    assert_eq!(driver.pop_used(&mem), None);
    // What GET_VRING_BASE would report: the device has consumed exactly what it returned.
    state.store_position(&mut queue);
    assert_eq!((queue.next_avail(), queue.next_used()), (1, 1));
    let idx: u16 = mem.read_obj(GuestAddress(avail_idx_at)).unwrap();
    assert_eq!(u16::from_le(idx), 0x2001, "the guest's own buffer overwrote its index");
}

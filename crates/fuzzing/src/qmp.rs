//! `qmp_session`: bytes as QEMU's QMP socket would send them, fed to vmq's QMP session
//! (`vmq_control::qmp`) in chunks. Input: a chunking byte (how many bytes each `receive` gets),
//! then the stream. Invariants: no panic; an unfinished message never holds more than
//! `MAX_LINE` bytes; everything the session writes back is JSON commands, one a line; a filter
//! it reports is for the NIC it follows, with VLAN ids below 4096.

use vmq_control::qmp::{MAX_LINE, QmpSession, SessionEvent};

/// The NIC the harness's session follows.
pub const DEVICE: &str = "vm1";

pub fn qmp_session(data: &[u8]) {
    run_qmp_session(data);
}

/// [`qmp_session`], returning how many filters the session reported.
pub fn run_qmp_session(data: &[u8]) -> usize {
    let mut filters = 0;
    let Some((&chunk, stream)) = data.split_first() else { return 0 };
    let chunk = usize::from(chunk).max(1);
    let mut session = QmpSession::new(DEVICE);
    for (i, part) in stream.chunks(chunk).enumerate() {
        for event in session.receive(part).into_iter().flatten() {
            if let SessionEvent::RxFilter(f) = event {
                filters += 1;
                assert_eq!(f.name, DEVICE);
                assert!(f.vlan_table.iter().all(|v| *v < 4096), "{f:?}");
            }
        }
        if i % 3 == 0 {
            // Periodic re-queries interleave with whatever QEMU sends.
            session.query();
        }
        let out = session.take_output();
        let text = std::str::from_utf8(&out).expect("commands are UTF-8");
        for line in text.split_terminator("\r\n") {
            let v: serde_json::Value = serde_json::from_str(line).expect("a command is JSON");
            assert!(v.get("execute").and_then(|e| e.as_str()).is_some(), "{line}");
        }
    }
    assert!(session.pending() <= MAX_LINE);
    filters
}

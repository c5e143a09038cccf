//! `vhost_messages` as a property test: QEMU's bring-up sequence with messages dropped,
//! repeated or changed, and random opcode sequences, each against a fresh in-process server.

mod common;

use proptest::prelude::*;
use vmq_fuzzing::seeds;
use vmq_fuzzing::vhost::{VhostOutcome, run_vhost_messages};

fn sequences() -> impl Strategy<Value = Vec<u8>> {
    let bring_up = seeds::vhost_messages().into_iter().find(|(n, _)| *n == "bring-up").expect("seed").1;
    prop_oneof![
        (Just(bring_up), proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6)).prop_map(|(mut s, edits)| {
            common::mutate(&mut s[1..], &edits);
            s
        }),
        proptest::collection::vec(any::<u8>(), 0..160),
    ]
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn vhost_messages(input in sequences()) {
        run_vhost_messages(&input);
    }
}

#[test]
fn seeds_reach_each_outcome() {
    let outcome = |name: &str| {
        let (_, input) = seeds::vhost_messages().into_iter().find(|(n, _)| *n == name).expect("seed");
        run_vhost_messages(&input)
    };
    // 18 messages; replies: GET_FEATURES, GET_PROTOCOL_FEATURES, and an ack for each of the 14
    // NEED_REPLY requests after REPLY_ACK was negotiated. The device starts once, stops at the
    // hang-up.
    assert_eq!(outcome("bring-up"), VhostOutcome { sent: 18, replies: 16, closed_by_server: false, started: 1 });
    // 6 messages (the shrinks are harness actions); replies: GET_FEATURES,
    // GET_PROTOCOL_FEATURES, the ack of SET_FEATURES and the refusal of the memory table over the
    // unsealed memfd, after which the server ends the connection; nothing is mapped.
    assert_eq!(
        outcome("unsealed-memfd-refused"),
        VhostOutcome { sent: 6, replies: 4, closed_by_server: true, started: 0 }
    );
    // The raw SET_MEM_TABLE with a 4-byte body ends the connection after 3 replies.
    assert_eq!(outcome("hostile"), VhostOutcome { sent: 6, replies: 3, closed_by_server: true, started: 0 });
}

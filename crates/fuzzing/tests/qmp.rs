//! `qmp_session` as a property test: QEMU's side of a real conversation with bytes changed,
//! and raw bytes, fed to vmq's QMP session in chunks of every size.

mod common;

use proptest::prelude::*;
use vmq_fuzzing::qmp::run_qmp_session;
use vmq_fuzzing::seeds;

fn streams() -> impl Strategy<Value = Vec<u8>> {
    let seeds: Vec<Vec<u8>> = seeds::qmp_session().into_iter().map(|(_, s)| s).collect();
    prop_oneof![
        (proptest::sample::select(seeds), proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6)).prop_map(
            |(mut s, edits)| {
                common::mutate(&mut s, &edits);
                s
            }
        ),
        proptest::collection::vec(any::<u8>(), 0..200),
    ]
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn qmp_session(input in streams()) {
        run_qmp_session(&input);
    }
}

#[test]
fn seeds_reach_filters() {
    let filters = |name: &str| {
        let (_, input) = seeds::qmp_session().into_iter().find(|(n, _)| *n == name).expect("seed");
        run_qmp_session(&input)
    };
    // The first query's answer, then the one that follows the event.
    assert_eq!(filters("conversation"), 2);
    // A refused query, a filter with a VLAN id out of range: no filter gets through.
    assert_eq!(filters("hostile"), 0);
}

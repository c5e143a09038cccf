//! `control_line` as a property test: request lines built from real requests with a few bytes
//! changed, mixed with raw bytes, sent to a control server with a mock handler.

mod common;

use proptest::prelude::*;
use vmq_fuzzing::control::{ControlHarness, expected_replies};
use vmq_fuzzing::seeds;

fn lines() -> impl Strategy<Value = Vec<u8>> {
    let seeds: Vec<Vec<u8>> = seeds::control_line()
        .into_iter()
        .flat_map(|(_, s)| s.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect::<Vec<_>>())
        .collect();
    let line = prop_oneof![
        (proptest::sample::select(seeds), proptest::collection::vec((any::<usize>(), any::<u8>()), 0..3)).prop_map(
            |(mut l, edits)| {
                common::mutate(&mut l, &edits);
                l
            }
        ),
        proptest::collection::vec(any::<u8>(), 0..40),
    ];
    proptest::collection::vec(line, 0..6).prop_map(|ls| ls.join(&b'\n'))
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn control_lines(input in lines()) {
        HARNESS.with(|h| h.run(&input));
    }
}

thread_local! {
    static HARNESS: ControlHarness = ControlHarness::start();
}

#[test]
fn every_line_gets_one_reply() {
    let harness = ControlHarness::start();
    for (name, seed) in seeds::control_line() {
        harness.run(&seed);
        let n = expected_replies(&seed).len();
        let expected = match name {
            "add-port" => 1,
            "every-command" => 9,
            "bad-lines" => 4,
            "too-long" => 1,
            other => panic!("unknown seed {other}"),
        };
        assert_eq!(n, expected, "seed {name}");
    }
}

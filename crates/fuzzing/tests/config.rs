//! `config_file` as a property test: the seed files with lines dropped, repeated or changed
//! and values replaced by others from a list of plausible and implausible ones, and raw text.

mod common;

use proptest::prelude::*;
use vmq_fuzzing::config_file::{ConfigOutcome, run_config_file};
use vmq_fuzzing::seeds;

const VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "68",
    "9000",
    "65535",
    "4095",
    "4096",
    "1e400",
    "nan",
    "\"\"",
    "\"x\"",
    "[]",
    "[1, 1]",
    "\"52:54:00:00:00:01\"",
    "\"ff:ff:ff:ff:ff:ff\"",
    "\"/run/vmq/vmq.sock\"",
    "\"uplink\"",
    "\"tap\"",
    "\"0777\"",
    "\"9\"",
    "true",
    "{}",
    "\"up0\"",
];

fn text() -> impl Strategy<Value = Vec<u8>> {
    let files: Vec<String> =
        seeds::config_file().into_iter().map(|(_, s)| String::from_utf8(s).expect("seed is text")).collect();
    (
        proptest::sample::select(files),
        proptest::collection::vec((any::<usize>(), 0u8..4, proptest::sample::select(VALUES)), 0..4),
    )
        .prop_map(|(file, edits)| {
            let mut lines: Vec<String> = file.lines().map(str::to_string).collect();
            for (at, op, value) in edits {
                if lines.is_empty() {
                    break;
                }
                let i = at % lines.len();
                match op {
                    0 => {
                        lines.remove(i);
                    }
                    1 => lines.insert(i, lines[i].clone()),
                    2 => {
                        if let Some((key, _)) = lines[i].split_once('=') {
                            lines[i] = format!("{key}= {value}");
                        }
                    }
                    _ => lines.insert(i, format!("{value} = {value}")),
                }
            }
            lines.join("\n").into_bytes()
        })
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn config_file(mut input in text(), edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8)) {
        common::mutate(&mut input, &edits[..edits.len().saturating_sub(6)]);
        run_config_file(&input);
    }

    #[test]
    fn config_file_raw(input in proptest::collection::vec(any::<u8>(), 0..200)) {
        run_config_file(&input);
    }
}

#[test]
fn seeds_reach_each_outcome() {
    let outcome = |name: &str| {
        let (_, input) = seeds::config_file().into_iter().find(|(n, _)| *n == name).expect("seed");
        run_config_file(&input)
    };
    assert_eq!(outcome("embedded-default"), ConfigOutcome::Valid(4));
    assert_eq!(outcome("vhost-user"), ConfigOutcome::Valid(2));
    assert!(matches!(outcome("duplicate-socket"), ConfigOutcome::Invalid(19..=22, _)));
    assert_eq!(outcome("unknown-key"), ConfigOutcome::Invalid(4, 1));
    assert!(matches!(outcome("bad-mtu"), ConfigOutcome::Invalid(26, _)));
    assert!(matches!(outcome("broken-toml"), ConfigOutcome::Invalid(1, _)));
}

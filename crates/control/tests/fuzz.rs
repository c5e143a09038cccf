//! Fuzz-style properties of everything that parses outside input: request lines (the server's
//! input), reply lines (the client's input), and a live server fed random lines.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use vmq_control::protocol::{ErrorCode, Reply, Request, Response};
use vmq_control::{ControlServer, ServerConfig};

/// Valid request lines to mutate.
const SEEDS: [&str; 6] = [
    r#"{"command":"stats","port":"vm1"}"#,
    r#"{"command":"set","setting":"port-mtu","port":"vm1","mtu":9000}"#,
    r#"{"command":"add-port","name":"vm3","kind":"vhost-user","socket":"/s","mac":"52:54:00:00:00:03","trunk":[10,20]}"#,
    r#"{"command":"del-port","name":"vm3"}"#,
    r#"{"command":"set","setting":"policy","policy":"static"}"#,
    r#"{"command":"show"}"#,
];

fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (
        0..SEEDS.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..6),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(seed, edits, cut)| {
            let mut line = SEEDS[seed].as_bytes().to_vec();
            for (at, byte, op) in edits {
                if line.is_empty() {
                    break;
                }
                let i = at.index(line.len());
                match op {
                    0 => line[i] = byte,
                    1 => line.insert(i, byte),
                    _ => {
                        line.remove(i);
                    }
                }
            }
            if cut.index(4) == 0 {
                let keep = cut.index(line.len() + 1);
                line.truncate(keep);
            }
            line
        })
}

fn check_request_line(line: &[u8]) {
    match Request::from_line(line) {
        Ok(request) => {
            // Whatever parses survives a round trip unchanged.
            assert_eq!(Request::from_line(request.to_line().as_bytes()).unwrap(), request);
        }
        Err(e) => assert!(matches!(e.code, ErrorCode::BadRequest | ErrorCode::UnknownCommand), "{e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_the_request_parser(line in prop::collection::vec(any::<u8>(), 0..300)) {
        check_request_line(&line);
    }

    #[test]
    fn mutated_requests_parse_or_fail_with_a_request_error(line in mutated()) {
        check_request_line(&line);
    }

    #[test]
    fn random_bytes_never_panic_the_reply_parser(line in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(reply) = Reply::from_line(&line) {
            assert_eq!(Reply::from_line(reply.to_line().as_bytes()).unwrap(), reply);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// A live server answers every line with exactly one reply, whatever the lines are.
    #[test]
    fn the_server_answers_every_random_line_once(
        lines in prop::collection::vec(prop_oneof![mutated(), prop::collection::vec(any::<u8>(), 1..200)], 1..20)
    ) {
        let path = std::env::temp_dir().join(format!("vqc-fuzz-{}.sock", std::process::id()));
        let server = ControlServer::start(
            ServerConfig::new(&path),
            Arc::new(|_: Request| Ok(Response::Done { message: "ok".into() })),
        )
        .unwrap();
        let stream = UnixStream::connect(&path).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = &stream;
        for mut line in lines {
            line.retain(|b| *b != b'\n');
            if line.iter().all(u8::is_ascii_whitespace) {
                continue; // blank lines get no reply, by design
            }
            line.push(b'\n');
            writer.write_all(&line).unwrap();
            let mut reply = String::new();
            reader.read_line(&mut reply).unwrap();
            let reply = Reply::from_line(reply.as_bytes()).unwrap();
            let expected_ok = Request::from_line(&line[..line.len() - 1]).is_ok();
            assert_eq!(reply.0.is_ok(), expected_ok);
        }
        server.shutdown();
    }
}

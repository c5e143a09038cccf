//! The examples in docs/control.md are real: every request line parses (or fails with the code
//! the next reply line shows), and every reply line is a valid reply.

use vmq_control::protocol::{ErrorCode, Reply, Request};

#[test]
fn docs_examples_parse() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/control.md")).unwrap();
    let mut request: Option<&str> = None;
    let (mut requests, mut replies) = (0, 0);
    for line in doc.lines() {
        if let Some(r) = line.strip_prefix("→ ") {
            assert!(request.is_none(), "two requests without a reply: {r}");
            request = Some(r);
            requests += 1;
        } else if let Some(r) = line.strip_prefix("← ") {
            let reply = Reply::from_line(r.as_bytes()).unwrap_or_else(|e| panic!("bad reply example {r}: {e}"));
            // Examples are written as vmq writes them.
            assert_eq!(reply.to_line().trim_end(), r);
            let sent = request.take().expect("a reply without a request");
            let parsed = Request::from_line(sent.as_bytes());
            match reply.0 {
                Err(e) if matches!(e.code, ErrorCode::BadRequest | ErrorCode::UnknownCommand) => {
                    let error = parsed.expect_err(sent);
                    assert_eq!(error.code, e.code, "{sent}");
                    assert_eq!(error.message, e.message, "{sent}");
                }
                _ => {
                    let parsed = parsed.unwrap_or_else(|e| panic!("bad request example {sent}: {e}"));
                    assert_eq!(parsed.to_line().trim_end(), sent, "examples are written as the client writes them");
                }
            }
            replies += 1;
        }
    }
    assert!(request.is_none());
    assert!(requests >= 15 && requests == replies, "{requests} requests, {replies} replies");
}

//! A QMP (QEMU Machine Protocol) client for one purpose: following a guest NIC's receive filter.
//! Sans-IO: bytes from QEMU go in ([`QmpSession::receive`]), bytes for QEMU come out
//! ([`QmpSession::take_output`]) with what happened ([`SessionEvent`]); the caller owns the
//! socket, the clock and the retries.
//!
//! The conversation: QEMU greets (`{"QMP": ...}`), the client enters command mode with
//! `qmp_capabilities`, then asks `query-rx-filter` for its NIC. QEMU emits
//! `NIC_RX_FILTER_CHANGED` when the guest changes its filter (MAC, promiscuous mode, multicast
//! or VLAN tables) and then stays quiet about that NIC until it is queried again, so every
//! event is answered with a query. Messages are JSON objects, one a line (QEMU ends each with
//! CRLF). Whatever QEMU (or something pretending to be it) sends, the session returns errors,
//! never panics, and keeps at most [`MAX_LINE`] bytes of an unfinished line.

use serde_json::{Map, Value, json};

/// Longest message kept (a filter with full tables is a few KiB).
pub const MAX_LINE: usize = 1 << 20;
/// Most entries taken from one table (QEMU keeps at most 64 MAC entries, 4096 VLANs).
const MAX_TABLE: usize = 4096;

/// Why a message from QEMU could not be used. The session goes on with the next message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QmpError {
    #[error("QMP message longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("QMP message is not JSON: {0}")]
    Json(String),
    #[error("QMP message is not a JSON object")]
    NotAnObject,
    #[error("QMP message of an unknown kind (no return, error, event or greeting)")]
    UnknownKind,
    #[error("QMP greeting expected first")]
    NoGreeting,
    #[error("QEMU refused {command}: {class}: {desc}")]
    Refused { command: &'static str, class: String, desc: String },
    #[error("query-rx-filter answer: {0}")]
    BadRxFilter(String),
}

/// One decoded QMP message.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    Greeting,
    Return { id: Option<Value>, value: Value },
    Error { id: Option<Value>, class: String, desc: String },
    Event { name: String, data: Value },
}

/// Splits QEMU's byte stream into messages. Bytes of a line longer than [`MAX_LINE`] are
/// discarded up to its end and reported once as [`QmpError::TooLong`].
#[derive(Debug, Default)]
pub struct QmpDecoder {
    buf: Vec<u8>,
    discarding: bool,
}

impl QmpDecoder {
    /// Feeds bytes; returns every message completed by them, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<QmpMessage, QmpError>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    let (line, tail) = rest.split_at(end);
                    rest = &tail[1..];
                    if self.discarding {
                        self.discarding = false;
                        self.buf.clear();
                        continue;
                    }
                    if self.buf.len() + line.len() > MAX_LINE {
                        self.buf.clear();
                        out.push(Err(QmpError::TooLong));
                        continue;
                    }
                    self.buf.extend_from_slice(line);
                    let line = std::mem::take(&mut self.buf);
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    out.push(decode_message(&line));
                }
                None => {
                    if !self.discarding {
                        if self.buf.len() + rest.len() > MAX_LINE {
                            self.buf.clear();
                            self.discarding = true;
                            out.push(Err(QmpError::TooLong));
                        } else {
                            self.buf.extend_from_slice(rest);
                        }
                    }
                    rest = &[];
                }
            }
        }
        out
    }

    /// Bytes of an unfinished message held now.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Decodes one QMP line.
pub fn decode_message(line: &[u8]) -> Result<QmpMessage, QmpError> {
    let value: Value = serde_json::from_slice(line).map_err(|e| QmpError::Json(e.to_string()))?;
    let Value::Object(mut obj) = value else { return Err(QmpError::NotAnObject) };
    let id = obj.remove("id");
    if obj.contains_key("QMP") {
        return Ok(QmpMessage::Greeting);
    }
    if let Some(value) = obj.remove("return") {
        return Ok(QmpMessage::Return { id, value });
    }
    if let Some(err) = obj.remove("error") {
        let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Ok(QmpMessage::Error { id, class: text("class"), desc: text("desc") });
    }
    if let Some(Value::String(name)) = obj.remove("event") {
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Ok(QmpMessage::Event { name, data });
    }
    Err(QmpError::UnknownKind)
}

/// QEMU's `RxState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RxState {
    #[default]
    Normal,
    None,
    All,
}

/// A NIC's receive filter as `query-rx-filter` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RxFilterInfo {
    pub name: String,
    pub promiscuous: bool,
    pub multicast: RxState,
    pub unicast: RxState,
    pub vlan: RxState,
    pub broadcast_allowed: bool,
    pub multicast_overflow: bool,
    pub unicast_overflow: bool,
    pub main_mac: [u8; 6],
    pub vlan_table: Vec<u16>,
    pub unicast_table: Vec<[u8; 6]>,
    pub multicast_table: Vec<[u8; 6]>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The filter of NIC `device` out of a `query-rx-filter` return value (a list of filters).
pub fn parse_rx_filter(value: &Value, device: &str) -> Result<RxFilterInfo, QmpError> {
    let bad = |m: &str| QmpError::BadRxFilter(m.to_string());
    let list = value.as_array().ok_or_else(|| bad("not a list"))?;
    let obj = list
        .iter()
        .filter_map(Value::as_object)
        .find(|o| o.get("name").and_then(Value::as_str) == Some(device))
        .ok_or_else(|| bad("no filter of that NIC"))?;
    let flag = |k: &str| obj.get(k).and_then(Value::as_bool).ok_or_else(|| bad(&format!("{k} is not a boolean")));
    let state = |k: &str| match obj.get(k).and_then(Value::as_str) {
        Some("normal") => Ok(RxState::Normal),
        Some("none") => Ok(RxState::None),
        Some("all") => Ok(RxState::All),
        _ => Err(bad(&format!("{k} is not normal, none or all"))),
    };
    let macs = |k: &str| -> Result<Vec<[u8; 6]>, QmpError> {
        let list = obj.get(k).and_then(Value::as_array).ok_or_else(|| bad(&format!("{k} is not a list")))?;
        if list.len() > MAX_TABLE {
            return Err(bad(&format!("{k} has more than {MAX_TABLE} entries")));
        }
        list.iter()
            .map(|m| m.as_str().and_then(parse_mac).ok_or_else(|| bad(&format!("{k}: not a MAC address"))))
            .collect()
    };
    let vlans = obj.get("vlan-table").and_then(Value::as_array).ok_or_else(|| bad("vlan-table is not a list"))?;
    if vlans.len() > MAX_TABLE {
        return Err(bad("vlan-table is too long"));
    }
    let vlan_table = vlans
        .iter()
        .map(|v| v.as_u64().filter(|v| *v < 4096).map(|v| v as u16).ok_or_else(|| bad("vlan-table: not a VLAN id")))
        .collect::<Result<_, _>>()?;
    let main_mac = obj.get("main-mac").and_then(Value::as_str).and_then(parse_mac).ok_or_else(|| bad("main-mac"))?;
    Ok(RxFilterInfo {
        name: device.to_string(),
        promiscuous: flag("promiscuous")?,
        multicast: state("multicast")?,
        unicast: state("unicast")?,
        vlan: state("vlan")?,
        broadcast_allowed: flag("broadcast-allowed")?,
        multicast_overflow: flag("multicast-overflow")?,
        unicast_overflow: flag("unicast-overflow")?,
        main_mac,
        vlan_table,
        unicast_table: macs("unicast-table")?,
        multicast_table: macs("multicast-table")?,
    })
}

/// What a session learned from QEMU's bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// Command mode entered (the first query is on its way).
    Ready,
    /// The NIC's filter now.
    RxFilter(RxFilterInfo),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Greeting,
    Negotiating,
    Ready,
}

const CAPABILITIES_ID: u64 = 0;

/// The client side of one QMP connection, following one NIC.
#[derive(Debug)]
pub struct QmpSession {
    device: String,
    decoder: QmpDecoder,
    phase: Phase,
    out: Vec<u8>,
    /// Id of the query in flight, if any (one at a time).
    in_flight: Option<u64>,
    /// An event came while a query was in flight: ask again when it returns.
    requery: bool,
    next_id: u64,
}

impl QmpSession {
    /// A session for a new connection, following NIC `device` (its QEMU `-device ...,id=`).
    pub fn new(device: impl Into<String>) -> QmpSession {
        QmpSession {
            device: device.into(),
            decoder: QmpDecoder::default(),
            phase: Phase::Greeting,
            out: Vec::new(),
            in_flight: None,
            requery: false,
            next_id: CAPABILITIES_ID + 1,
        }
    }

    /// Bytes of an unfinished message from QEMU held now.
    pub fn pending(&self) -> usize {
        self.decoder.pending()
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// In command mode.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Bytes to write to QEMU, taken.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Asks for the filter now (periodic re-query); nothing if a query is in flight or the
    /// session is not in command mode yet.
    pub fn query(&mut self) {
        if self.phase != Phase::Ready {
            return;
        }
        if self.in_flight.is_some() {
            self.requery = true;
            return;
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(CAPABILITIES_ID + 1);
        self.in_flight = Some(id);
        self.push(json!({"execute": "query-rx-filter", "arguments": {"name": self.device}, "id": id}));
    }

    fn push(&mut self, command: Value) {
        // A serde_json Value always serialises.
        self.out.extend_from_slice(command.to_string().as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Feeds bytes from QEMU; returns what they meant, in order. Errors do not end the
    /// session (the caller counts them; a connection that only sends errors is the caller's
    /// to drop).
    pub fn receive(&mut self, bytes: &[u8]) -> Vec<Result<SessionEvent, QmpError>> {
        let mut out = Vec::new();
        for message in self.decoder.feed(bytes) {
            match message {
                Ok(m) => {
                    if let Some(r) = self.handle(m) {
                        out.push(r);
                    }
                }
                Err(e) => out.push(Err(e)),
            }
        }
        out
    }

    fn handle(&mut self, message: QmpMessage) -> Option<Result<SessionEvent, QmpError>> {
        match (self.phase, message) {
            (Phase::Greeting, QmpMessage::Greeting) => {
                self.phase = Phase::Negotiating;
                self.push(json!({"execute": "qmp_capabilities", "id": CAPABILITIES_ID}));
                None
            }
            (Phase::Greeting, _) => Some(Err(QmpError::NoGreeting)),
            (Phase::Negotiating, QmpMessage::Return { id, .. }) if is_id(&id, CAPABILITIES_ID) => {
                self.phase = Phase::Ready;
                self.query();
                Some(Ok(SessionEvent::Ready))
            }
            (Phase::Negotiating, QmpMessage::Error { id, class, desc }) if is_id(&id, CAPABILITIES_ID) => {
                Some(Err(QmpError::Refused { command: "qmp_capabilities", class, desc }))
            }
            (Phase::Ready, QmpMessage::Event { name, data }) if name == "NIC_RX_FILTER_CHANGED" => {
                // `name` is absent when QEMU's NIC has no id; then it may be ours.
                let for_us = data.get("name").and_then(Value::as_str).is_none_or(|n| n == self.device);
                if for_us {
                    self.query();
                }
                None
            }
            (_, QmpMessage::Event { .. } | QmpMessage::Greeting) => None,
            (Phase::Ready, QmpMessage::Return { id, value }) if self.answers_query(&id) => {
                self.query_done();
                Some(parse_rx_filter(&value, &self.device).map(SessionEvent::RxFilter))
            }
            (Phase::Ready, QmpMessage::Error { id, class, desc }) if self.answers_query(&id) => {
                self.query_done();
                Some(Err(QmpError::Refused { command: "query-rx-filter", class, desc }))
            }
            // Replies to nothing we asked: ignored.
            (_, QmpMessage::Return { .. } | QmpMessage::Error { .. }) => None,
        }
    }

    fn answers_query(&self, id: &Option<Value>) -> bool {
        self.in_flight.is_some_and(|q| is_id(id, q))
    }

    fn query_done(&mut self) {
        self.in_flight = None;
        if std::mem::take(&mut self.requery) {
            self.query();
        }
    }
}

fn is_id(id: &Option<Value>, want: u64) -> bool {
    id.as_ref().and_then(Value::as_u64) == Some(want)
}

/// A `query-rx-filter` answer for one NIC (tests, fuzz seeds).
pub fn rx_filter_reply(id: u64, name: &str, mac: &str, promiscuous: bool, multicast: &[&str]) -> String {
    let mut filter = Map::new();
    filter.insert("name".into(), json!(name));
    filter.insert("promiscuous".into(), json!(promiscuous));
    filter.insert("multicast".into(), json!("normal"));
    filter.insert("unicast".into(), json!("normal"));
    filter.insert("vlan".into(), json!("normal"));
    filter.insert("broadcast-allowed".into(), json!(true));
    filter.insert("multicast-overflow".into(), json!(false));
    filter.insert("unicast-overflow".into(), json!(false));
    filter.insert("main-mac".into(), json!(mac));
    filter.insert("vlan-table".into(), json!([]));
    filter.insert("unicast-table".into(), json!([]));
    filter.insert("multicast-table".into(), json!(multicast));
    format!("{}\r\n", json!({"return": [Value::Object(filter)], "id": id}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": [\"oob\"]}}\r\n";

    fn ready(device: &str) -> QmpSession {
        let mut s = QmpSession::new(device);
        assert!(s.receive(GREETING.as_bytes()).is_empty());
        let out = String::from_utf8(s.take_output()).unwrap();
        assert!(out.contains("\"qmp_capabilities\""), "{out}");
        assert_eq!(s.receive(b"{\"return\": {}, \"id\": 0}\r\n"), vec![Ok(SessionEvent::Ready)]);
        let out = String::from_utf8(s.take_output()).unwrap();
        assert!(out.contains("\"query-rx-filter\"") && out.contains(&format!("\"name\":\"{device}\"")), "{out}");
        s
    }

    #[test]
    fn greeting_capabilities_query_and_answer() {
        let mut s = ready("vm1");
        let events = s.receive(rx_filter_reply(1, "vm1", "52:54:00:00:00:02", true, &["01:00:5e:00:00:01"]).as_bytes());
        let [Ok(SessionEvent::RxFilter(f))] = events.as_slice() else { panic!("{events:?}") };
        assert_eq!(f.main_mac, [0x52, 0x54, 0, 0, 0, 2]);
        assert!(f.promiscuous);
        assert_eq!(f.multicast_table, vec![[1, 0, 0x5e, 0, 0, 1]]);
    }

    #[test]
    fn an_event_for_our_nic_is_answered_with_a_query_others_are_not() {
        let mut s = ready("vm1");
        s.receive(rx_filter_reply(1, "vm1", "52:54:00:00:00:02", false, &[]).as_bytes());
        let ev = |name: &str| {
            format!(
                "{{\"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}, \"event\": \"NIC_RX_FILTER_CHANGED\", \"data\": {{\"name\": \"{name}\", \"path\": \"/machine/peripheral/{name}/virtio-backend\"}}}}\r\n"
            )
        };
        s.receive(ev("other").as_bytes());
        assert!(s.take_output().is_empty());
        s.receive(ev("vm1").as_bytes());
        assert!(String::from_utf8(s.take_output()).unwrap().contains("\"id\":2"));
        // A second event while that query is in flight: one more query once it returns.
        s.receive(ev("vm1").as_bytes());
        assert!(s.take_output().is_empty());
        s.receive(rx_filter_reply(2, "vm1", "52:54:00:00:00:02", false, &[]).as_bytes());
        assert!(String::from_utf8(s.take_output()).unwrap().contains("\"id\":3"));
    }

    #[test]
    fn errors_are_reported_and_the_session_goes_on() {
        let mut s = QmpSession::new("vm1");
        assert_eq!(s.receive(b"{\"return\": {}}\n"), vec![Err(QmpError::NoGreeting)]);
        let mut s = ready("vm1");
        let r = s.receive(
            b"{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"invalid net client name: vm1\"}}\r\n",
        );
        assert!(matches!(r.as_slice(), [Err(QmpError::Refused { command: "query-rx-filter", .. })]), "{r:?}");
        s.query();
        assert!(!s.take_output().is_empty(), "a new query after the refusal");
        assert!(matches!(s.receive(b"not json\n").as_slice(), [Err(QmpError::Json(_))]));
        assert!(matches!(s.receive(b"[1]\n").as_slice(), [Err(QmpError::NotAnObject)]));
        let bad = "{\"return\": [{\"name\": \"vm1\", \"main-mac\": \"zz\"}], \"id\": 2}\n";
        assert!(matches!(s.receive(bad.as_bytes()).as_slice(), [Err(QmpError::BadRxFilter(_))]));
    }

    #[test]
    fn an_overlong_line_is_dropped_up_to_its_end() {
        let mut d = QmpDecoder::default();
        let long = vec![b'x'; MAX_LINE + 1];
        assert_eq!(d.feed(&long), vec![Err(QmpError::TooLong)]);
        assert_eq!(d.pending(), 0);
        assert!(d.feed(b"xxxx").is_empty());
        let r = d.feed(b"xx\n{\"event\": \"X\"}\n");
        assert_eq!(r, vec![Ok(QmpMessage::Event { name: "X".into(), data: Value::Null })]);
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(parse_mac("52:54:00:AB:cd:01"), Some([0x52, 0x54, 0, 0xab, 0xcd, 1]));
        for bad in ["", "52:54:00:ab:cd", "52:54:00:ab:cd:01:02", "5:54:00:ab:cd:01", "+5:54:00:ab:cd:01"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    proptest! {
        /// Any bytes, split anywhere: the session never panics, keeps at most MAX_LINE bytes,
        /// and the same stream gives the same events however it is split.
        #[test]
        fn hostile_bytes_never_panic_and_splitting_does_not_matter(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
            split in any::<usize>(),
        ) {
            let mut stream = GREETING.as_bytes().to_vec();
            stream.extend_from_slice(b"{\"return\": {}, \"id\": 0}\n");
            for c in &chunks {
                stream.extend_from_slice(c);
            }
            stream.extend_from_slice(rx_filter_reply(1, "vm1", "52:54:00:00:00:02", false, &[]).as_bytes());
            let mut whole = QmpSession::new("vm1");
            let a = whole.receive(&stream);
            let at = split % (stream.len() + 1);
            let mut parts = QmpSession::new("vm1");
            let mut b = parts.receive(&stream[..at]);
            b.extend(parts.receive(&stream[at..]));
            prop_assert_eq!(a, b);
            prop_assert!(whole.decoder.pending() <= MAX_LINE);
        }
    }
}

//! The Prometheus exporter over real TCP on 127.0.0.1: scrapes parse as Prometheus text and
//! carry exactly the snapshot's values; anything but `GET /metrics` is refused.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmq_control::metrics::{
    BuildInfo, CONTENT_TYPE, FdbMetrics, MetricsConfig, MetricsExporter, MetricsSnapshot, NicQueueMetrics, PortMetrics,
    QueueMetrics, RxFilterMetrics, VhostMetrics, WorkerMetrics,
};
use vmq_control::protocol::{OffloadCounters, PortCounters};

const TIMEOUT: Duration = Duration::from_secs(5);

fn snapshot(scrape: u64) -> MetricsSnapshot {
    let port = |name: &str, base: u64, up: bool, queue: bool| PortMetrics {
        counters: PortCounters {
            port: name.into(),
            rx_packets: base + 1,
            rx_bytes: base + 2,
            tx_packets: base + 3,
            tx_bytes: base + 4,
            drops: [("oversize".to_string(), base + 5), ("spoofed".to_string(), base + 6)].into(),
            offload: OffloadCounters {
                segments: base + 7,
                csum_finished: base + 8,
                coalesced: base + 9,
                gso_passed: base + 10,
            },
            fdb_full: base + 11,
            kernel_drops: base + 12,
            corrupt_blocks: base + 13,
            fdb_moves: base + 14,
            fdb_limit: base + 15,
            mac_change_refused: base + 16,
            promiscuous_refused: base + 17,
            qmp_errors: base + 18,
        },
        up,
        queue_assigned: queue,
        rx_filter: queue.then_some(RxFilterMetrics { promiscuous: true, multicast_entries: base + 19 }),
    };
    MetricsSnapshot {
        ports: vec![port("vm1", 1000 * scrape, true, true), port("up0", 100_000 + scrape, false, false)],
        workers: vec![
            WorkerMetrics { worker: 0, busy_ratio: 0.25, panics: 0 },
            WorkerMetrics { worker: 1, busy_ratio: 0.875, panics: 2 },
        ],
        vhost: vec![
            VhostMetrics {
                port: "vm1".into(),
                connected: true,
                connections: 3 + scrape,
                refused: 1,
                panics: 0,
                logging: true,
                log_starts: 2,
                migrated_out: 1,
                announces: 1 + scrape,
            },
            VhostMetrics {
                port: "vm2".into(),
                connected: false,
                connections: 0,
                refused: 0,
                panics: 1,
                ..Default::default()
            },
        ],
        fdb: FdbMetrics { entries: 17 + scrape, capacity: 65536 },
        queues: QueueMetrics {
            budget: 8,
            in_use: vec![("up0".into(), 1)],
            nic_queues: vec![
                NicQueueMetrics { uplink: "up0".into(), queue: "default".into(), rx_packets: 5 },
                NicQueueMetrics { uplink: "up0".into(), queue: "1".into(), rx_packets: 90 + scrape },
            ],
        },
        build: BuildInfo { version: "0.1.0".into(), commit: Some("abc1234".into()) },
    }
}

struct HttpResponse {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

fn http(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(request).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status = status_line[9..12].parse().unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(": ").unwrap();
            (k.to_ascii_lowercase(), v.to_string())
        })
        .collect::<HashMap<_, _>>();
    assert_eq!(headers["content-length"].parse::<usize>().unwrap(), body.len());
    HttpResponse { status, headers, body: body.to_string() }
}

fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    http(addr, format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n").as_bytes())
}

/// A sample: metric name and sorted labels.
type Key = (String, BTreeMap<String, String>);

/// A small parser for the Prometheus text format (0.0.4): `# HELP`/`# TYPE` lines and samples
/// `name{label="value",...} value`. Panics on anything else, so a malformed exposition fails.
fn parse_exposition(text: &str) -> (HashMap<String, String>, HashMap<Key, f64>) {
    let mut types = HashMap::new();
    let mut samples = HashMap::new();
    let mut helped = std::collections::HashSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(!help.is_empty());
            helped.insert(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            assert!(helped.contains(name), "TYPE without HELP: {line}");
            assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "family twice: {name}");
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unterminated labels: {line}"));
                let labels = body
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').unwrap();
                        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap();
                        (k.to_string(), v.to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{name}");
        assert!(types.contains_key(&name), "sample before its TYPE: {line}");
        assert!(samples.insert((name, labels), value).is_none(), "duplicate sample {line}");
    }
    (types, samples)
}

fn key(name: &str, labels: &[(&str, &str)]) -> Key {
    (name.to_string(), labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

fn start(io_timeout: Duration) -> (MetricsExporter, Arc<AtomicU64>) {
    let scrapes = Arc::new(AtomicU64::new(0));
    let counter = scrapes.clone();
    let mut config = MetricsConfig::new("127.0.0.1:0".parse().unwrap());
    config.io_timeout = io_timeout;
    let exporter = MetricsExporter::start(
        config,
        Arc::new(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            snapshot(n)
        }),
    )
    .unwrap();
    (exporter, scrapes)
}

#[test]
fn a_scrape_parses_as_prometheus_text_and_equals_the_snapshot() {
    let (exporter, scrapes) = start(TIMEOUT);
    let response = get(exporter.local_addr(), "/metrics");
    assert_eq!(response.status, 200);
    assert_eq!(response.headers["content-type"], CONTENT_TYPE);
    assert!(CONTENT_TYPE.starts_with("text/plain; version=0.0.4"));
    let (types, samples) = parse_exposition(&response.body);
    assert_eq!(scrapes.load(Ordering::SeqCst), 1, "one snapshot per scrape");

    let expected = snapshot(1);
    let mut wanted: HashMap<Key, f64> = HashMap::new();
    for p in &expected.ports {
        let c = &p.counters;
        let port = [("port", c.port.as_str())];
        for (name, value) in [
            ("vmq_port_rx_packets_total", c.rx_packets),
            ("vmq_port_rx_bytes_total", c.rx_bytes),
            ("vmq_port_tx_packets_total", c.tx_packets),
            ("vmq_port_tx_bytes_total", c.tx_bytes),
            ("vmq_offload_segments_total", c.offload.segments),
            ("vmq_offload_csum_finished_total", c.offload.csum_finished),
            ("vmq_offload_coalesced_total", c.offload.coalesced),
            ("vmq_offload_gso_passed_total", c.offload.gso_passed),
            ("vmq_fdb_full_total", c.fdb_full),
            ("vmq_port_kernel_drops_total", c.kernel_drops),
            ("vmq_port_corrupt_blocks_total", c.corrupt_blocks),
            ("vmq_fdb_moves_total", c.fdb_moves),
            ("vmq_fdb_limit_total", c.fdb_limit),
            ("vmq_port_mac_change_refused_total", c.mac_change_refused),
            ("vmq_port_promiscuous_refused_total", c.promiscuous_refused),
            ("vmq_port_qmp_errors_total", c.qmp_errors),
            ("vmq_queue_assigned", u64::from(p.queue_assigned)),
            ("vmq_port_up", u64::from(p.up)),
        ] {
            wanted.insert(key(name, &port), value as f64);
        }
        if let Some(f) = &p.rx_filter {
            wanted.insert(key("vmq_port_guest_promiscuous", &port), f64::from(u8::from(f.promiscuous)));
            wanted.insert(key("vmq_port_guest_multicast_entries", &port), f.multicast_entries as f64);
        }
        for (reason, count) in &c.drops {
            wanted.insert(key("vmq_port_drops_total", &[("port", &c.port), ("reason", reason)]), *count as f64);
        }
    }
    for w in &expected.workers {
        wanted.insert(key("vmq_worker_busy_ratio", &[("worker", &w.worker.to_string())]), w.busy_ratio);
        wanted.insert(key("vmq_worker_panics_total", &[("worker", &w.worker.to_string())]), w.panics as f64);
    }
    for v in &expected.vhost {
        let port = [("port", v.port.as_str())];
        wanted.insert(key("vmq_vhost_connected", &port), f64::from(u8::from(v.connected)));
        wanted.insert(key("vmq_vhost_connections_total", &port), v.connections as f64);
        wanted.insert(key("vmq_vhost_refused_total", &port), v.refused as f64);
        wanted.insert(key("vmq_vhost_panics_total", &port), v.panics as f64);
        wanted.insert(key("vmq_vhost_dirty_logging", &port), f64::from(u8::from(v.logging)));
        wanted.insert(key("vmq_vhost_migration_log_starts_total", &port), v.log_starts as f64);
        wanted.insert(key("vmq_vhost_migrations_out_total", &port), v.migrated_out as f64);
        wanted.insert(key("vmq_vhost_announces_total", &port), v.announces as f64);
    }
    wanted.insert(key("vmq_fdb_entries", &[]), expected.fdb.entries as f64);
    wanted.insert(key("vmq_fdb_capacity", &[]), expected.fdb.capacity as f64);
    wanted.insert(key("vmq_vm_queue_budget", &[]), expected.queues.budget as f64);
    wanted.insert(key("vmq_vm_queues_in_use", &[("uplink", "up0")]), 1.0);
    for q in &expected.queues.nic_queues {
        let labels = [("uplink", q.uplink.as_str()), ("queue", q.queue.as_str())];
        wanted.insert(key("vmq_nic_queue_rx_packets_total", &labels), q.rx_packets as f64);
    }
    wanted.insert(key("vmq_build_info", &[("version", "0.1.0"), ("commit", "abc1234")]), 1.0);
    assert_eq!(samples, wanted);
    for (name, kind) in &types {
        let counter = name.ends_with("_total");
        assert_eq!(kind, if counter { "counter" } else { "gauge" }, "{name}");
    }
    assert_eq!(types.len(), 33);

    // The callback runs per scrape: the next scrape has the next snapshot's values.
    let (_, samples) = parse_exposition(&get(exporter.local_addr(), "/metrics?ignored=1").body);
    assert_eq!(samples[&key("vmq_port_rx_packets_total", &[("port", "vm1")])], 2001.0);
    assert_eq!(scrapes.load(Ordering::SeqCst), 2);
    exporter.shutdown();
}

#[test]
fn anything_but_get_metrics_is_refused_and_the_exporter_keeps_serving() {
    let (exporter, scrapes) = start(TIMEOUT);
    let addr = exporter.local_addr();
    assert_eq!(get(addr, "/").status, 404);
    assert_eq!(get(addr, "/metricsx").status, 404);
    assert_eq!(get(addr, "/metrics/x").status, 404);
    assert_eq!(http(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").status, 404);
    assert_eq!(http(addr, b"garbage\r\n\r\n").status, 400);
    let huge = format!("GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(http(addr, huge.as_bytes()).status, 431);
    // None of those took a snapshot; a proper scrape still works.
    assert_eq!(scrapes.load(Ordering::SeqCst), 0);
    assert_eq!(get(addr, "/metrics").status, 200);
    // Hand-typed requests with bare LF line ends work too.
    assert_eq!(http(addr, b"GET /metrics HTTP/1.0\n\n").status, 200);
}

#[test]
fn a_silent_client_costs_at_most_the_io_timeout() {
    let (exporter, _) = start(Duration::from_millis(200));
    let addr = exporter.local_addr();
    // Connects and sends nothing; the exporter serves one request at a time.
    let _silent = TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    let response = get(addr, "/metrics");
    assert_eq!(response.status, 200);
    assert!(started.elapsed() < TIMEOUT, "waited {:?}", started.elapsed());
}

#[test]
fn shutdown_is_prompt_and_releases_the_port() {
    let (exporter, _) = start(TIMEOUT);
    let addr = exporter.local_addr();
    assert_eq!(get(addr, "/metrics").status, 200);
    let started = Instant::now();
    exporter.shutdown();
    assert!(started.elapsed() < Duration::from_secs(1));
    // The address is free again: a new exporter can take it.
    let again = MetricsExporter::start(MetricsConfig::new(addr), Arc::new(MetricsSnapshot::default)).unwrap();
    assert_eq!(again.local_addr(), addr);
    let (types, samples) = parse_exposition(&get(addr, "/metrics").body);
    // With no ports nor workers, only the switch-wide values have samples.
    let mut names: Vec<&str> = samples.keys().map(|(name, _)| name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["vmq_build_info", "vmq_fdb_capacity", "vmq_fdb_entries", "vmq_vm_queue_budget"]);
    assert_eq!(types.len(), 33, "families are described even with no ports");
}

/// Metric names (`vmq_...`) in a text: PromQL expressions, dashboard JSON, alert rules.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("vmq_") {
        let start = i + at;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(text.len() - start);
        if boundary {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_use_is_exported() {
    let (exporter, _) = start(TIMEOUT);
    let (_, samples) = parse_exposition(&get(exporter.local_addr(), "/metrics").body);
    let exported: std::collections::BTreeSet<String> = samples.keys().map(|(name, _)| name.clone()).collect();
    let contrib = concat!(env!("CARGO_MANIFEST_DIR"), "/../../contrib/");

    let dashboard_text = std::fs::read_to_string(format!("{contrib}grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "the dashboard has {} queries", exprs.len());
    let in_dashboard = metric_names(&exprs.join("\n"));
    // Nothing outside the queries names a metric the check would miss.
    assert_eq!(metric_names(&dashboard_text), in_dashboard);

    let alerts = std::fs::read_to_string(format!("{contrib}prometheus-alerts.yml")).unwrap();
    assert!(alerts.contains("groups:") && alerts.matches("- alert: ").count() >= 10, "{alerts}");
    let in_alerts = metric_names(&alerts);

    for (file, names) in [("grafana-dashboard.json", &in_dashboard), ("prometheus-alerts.yml", &in_alerts)] {
        let missing: Vec<&String> = names.difference(&exported).collect();
        assert!(missing.is_empty(), "{file} uses metrics vmq does not export: {missing:?}");
    }
    // The dashboard shows every family vmq exports.
    let unshown: Vec<&String> = exported.difference(&in_dashboard).collect();
    assert!(unshown.is_empty(), "exported but not on the dashboard: {unshown:?}");
    assert!(metric_names("x{vmq_no} avmq_y vmq_fdb_entries/vmq_fdb_capacity").len() == 3);
}

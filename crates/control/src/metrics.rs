//! Prometheus exporter: `GET /metrics` over a minimal HTTP/1.1 server on its own thread.
//!
//! Metrics are built at scrape time from a snapshot callback, so a scrape reads whatever the
//! switch copies out for it and never touches the data path's hot state. The encoding is
//! prometheus-client's Prometheus text format (version 0.0.4), which every scraper reads.
//!
//! Hand-written HTTP on purpose: one fixed GET with no body does not justify an HTTP stack in
//! a switch; requests are size- and time-bounded and served one at a time.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::protocol::PortCounters;

/// `[control] metrics` default.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// The `Content-Type` of a scrape.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// What a scrape reports, copied out of the switch by the snapshot callback.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    pub ports: Vec<PortMetrics>,
    pub workers: Vec<WorkerMetrics>,
    /// vhost-user ports' connection state.
    pub vhost: Vec<VhostMetrics>,
    pub fdb: FdbMetrics,
    pub queues: QueueMetrics,
    pub build: BuildInfo,
}

/// A vhost-user port's socket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VhostMetrics {
    pub port: String,
    /// A frontend (QEMU) is connected now.
    pub connected: bool,
    /// Connections accepted since the port was added (more than one: the VM reconnected).
    pub connections: u64,
    /// Connections refused: a second frontend, or a peer uid not allowed.
    pub refused: u64,
    /// Panics caught while handling the frontend's messages (each ended its connection).
    pub panics: u64,
    /// Live migration: QEMU has dirty logging on (the VM is migrating away) now.
    pub logging: bool,
    /// Times dirty logging was switched on (migrations away begun).
    pub log_starts: u64,
    /// Times the VM was handed over (its rings stopped while logging).
    pub migrated_out: u64,
    /// RARP announces injected after the VM arrived (SEND_RARP).
    pub announces: u64,
}

/// The MAC table's size.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FdbMetrics {
    pub entries: u64,
    pub capacity: u64,
}

/// VM queues: the budget, and per uplink the VM queues feeding a port and the frames each NIC
/// queue delivered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueMetrics {
    pub budget: u64,
    /// (uplink, VM queues in use on it); every uplink listed, zeros included.
    pub in_use: Vec<(String, u64)>,
    pub nic_queues: Vec<NicQueueMetrics>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NicQueueMetrics {
    pub uplink: String,
    /// `default` or the VM queue's number.
    pub queue: String,
    pub rx_packets: u64,
}

/// `vmq_build_info`'s labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildInfo {
    pub version: String,
    /// The source commit, when the build was told it (`VMQ_BUILD_COMMIT`).
    pub commit: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PortMetrics {
    /// `counters.port` is the port's name (the `port` label).
    pub counters: PortCounters,
    pub up: bool,
    /// The port holds a VM queue of its own.
    pub queue_assigned: bool,
    /// VM ports whose guest's receive filter is relayed (QMP).
    pub rx_filter: Option<RxFilterMetrics>,
}

/// A VM port's applied guest receive filter.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RxFilterMetrics {
    pub promiscuous: bool,
    pub multicast_entries: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerMetrics {
    pub worker: u32,
    /// 0.0 to 1.0.
    pub busy_ratio: f64,
    /// Panics caught in the worker (each followed by a restart).
    pub panics: u64,
}

/// The snapshot callback: called once per scrape, on the exporter thread.
pub type SnapshotFn = dyn Fn() -> MetricsSnapshot + Send + Sync;

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub addr: SocketAddr,
    /// Time a client has to send its request, and we to send the answer.
    pub io_timeout: Duration,
    /// Longest request head (request line and headers) read.
    pub max_request_bytes: usize,
}

impl MetricsConfig {
    pub fn new(addr: SocketAddr) -> MetricsConfig {
        MetricsConfig { addr, io_timeout: Duration::from_secs(5), max_request_bytes: 8 * 1024 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start the metrics thread: {0}")]
    Thread(io::Error),
}

/// Prometheus text for a snapshot (what `GET /metrics` answers).
pub fn encode(snapshot: MetricsSnapshot) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

#[derive(Debug)]
struct SnapshotCollector(MetricsSnapshot);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let ports = &self.0.ports;
        type Get = fn(&PortMetrics) -> u64;
        let per_port: [(&str, &str, Get); 16] = [
            ("vmq_port_rx_packets", "Frames received from the port", |p| p.counters.rx_packets),
            ("vmq_port_rx_bytes", "Bytes received from the port", |p| p.counters.rx_bytes),
            ("vmq_port_tx_packets", "Frames sent to the port", |p| p.counters.tx_packets),
            ("vmq_port_tx_bytes", "Bytes sent to the port", |p| p.counters.tx_bytes),
            ("vmq_offload_segments", "Segments made by software segmentation toward the port", |p| {
                p.counters.offload.segments
            }),
            ("vmq_offload_csum_finished", "Checksums finished in software toward the port", |p| {
                p.counters.offload.csum_finished
            }),
            ("vmq_offload_coalesced", "Segments absorbed by receive coalescing toward the port", |p| {
                p.counters.offload.coalesced
            }),
            ("vmq_offload_gso_passed", "GSO frames delivered to the port as they were", |p| {
                p.counters.offload.gso_passed
            }),
            ("vmq_fdb_full", "MAC learning refused on the port because the table was full", |p| p.counters.fdb_full),
            ("vmq_port_kernel_drops", "Frames the kernel dropped before vmq read them (AF_PACKET ring full)", |p| {
                p.counters.kernel_drops
            }),
            ("vmq_port_corrupt_blocks", "AF_PACKET ring blocks skipped as corrupt", |p| p.counters.corrupt_blocks),
            ("vmq_fdb_moves", "Addresses that moved to the port from another", |p| p.counters.fdb_moves),
            ("vmq_fdb_limit", "MAC learning refused on the port because it reached max_learned_macs", |p| {
                p.counters.fdb_limit
            }),
            ("vmq_port_mac_change_refused", "Guest MAC changes refused by the port's policy (allow_mac_change)", |p| {
                p.counters.mac_change_refused
            }),
            (
                "vmq_port_promiscuous_refused",
                "Guest requests for promiscuous mode refused by the port's policy (allow_promiscuous)",
                |p| p.counters.promiscuous_refused,
            ),
            (
                "vmq_port_qmp_errors",
                "QMP relay errors: unusable messages from QEMU, refused queries, connections lost",
                |p| p.counters.qmp_errors,
            ),
        ];
        for (name, help, get) in per_port {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in ports {
                let labels = [("port", p.counters.port.as_str())];
                ConstCounter::new(get(p)).encode(family.encode_family(&labels)?)?;
            }
        }

        let mut drops =
            encoder.encode_descriptor("vmq_port_drops", "Frames dropped, by reason", None, MetricType::Counter)?;
        for p in ports {
            for (reason, count) in &p.counters.drops {
                let labels = [("port", p.counters.port.as_str()), ("reason", reason.as_str())];
                ConstCounter::new(*count).encode(drops.encode_family(&labels)?)?;
            }
        }

        type Flag = fn(&PortMetrics) -> bool;
        let flags: [(&str, &str, Flag); 2] = [
            (
                "vmq_queue_assigned",
                "1 if the port holds a VM queue of its own, 0 if it shares the default queue",
                |p| p.queue_assigned,
            ),
            ("vmq_port_up", "1 if the port passes traffic", |p| p.up),
        ];
        for (name, help, get) in flags {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for p in ports {
                let labels = [("port", p.counters.port.as_str())];
                ConstGauge::new(i64::from(get(p))).encode(family.encode_family(&labels)?)?;
            }
        }

        type FilterGet = fn(&RxFilterMetrics) -> i64;
        let filter_gauges: [(&str, &str, FilterGet); 2] = [
            (
                "vmq_port_guest_promiscuous",
                "1 if the guest's relayed receive filter is promiscuous and the policy allows it",
                |f| i64::from(f.promiscuous),
            ),
            ("vmq_port_guest_multicast_entries", "Multicast addresses in the guest's relayed receive filter", |f| {
                i64::try_from(f.multicast_entries).unwrap_or(i64::MAX)
            }),
        ];
        for (name, help, get) in filter_gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for p in ports {
                if let Some(f) = &p.rx_filter {
                    ConstGauge::new(get(f)).encode(family.encode_family(&[("port", p.counters.port.as_str())])?)?;
                }
            }
        }

        let vhost = &self.0.vhost;
        let mut connected = encoder.encode_descriptor(
            "vmq_vhost_connected",
            "1 if a frontend (QEMU) is connected to the vhost-user port's socket",
            None,
            MetricType::Gauge,
        )?;
        for v in vhost {
            ConstGauge::new(i64::from(v.connected)).encode(connected.encode_family(&[("port", v.port.as_str())])?)?;
        }
        let mut logging = encoder.encode_descriptor(
            "vmq_vhost_dirty_logging",
            "1 while QEMU has dirty-page logging on for the port (its VM is migrating away)",
            None,
            MetricType::Gauge,
        )?;
        for v in vhost {
            ConstGauge::new(i64::from(v.logging)).encode(logging.encode_family(&[("port", v.port.as_str())])?)?;
        }
        type VhostGet = fn(&VhostMetrics) -> u64;
        let vhost_counters: [(&str, &str, VhostGet); 6] = [
            (
                "vmq_vhost_connections",
                "Frontend connections accepted on the port's socket (more than one: reconnects)",
                |v| v.connections,
            ),
            ("vmq_vhost_refused", "Connections refused: a second frontend, or a peer uid not allowed", |v| v.refused),
            ("vmq_vhost_panics", "Panics caught handling the frontend's messages (each ended its connection)", |v| {
                v.panics
            }),
            (
                "vmq_vhost_migration_log_starts",
                "Times QEMU switched dirty logging on (live migrations away begun)",
                |v| v.log_starts,
            ),
            ("vmq_vhost_migrations_out", "Times the VM's rings were handed over while logging (migrated away)", |v| {
                v.migrated_out
            }),
            ("vmq_vhost_announces", "RARP announces injected for the VM after it arrived (SEND_RARP)", |v| v.announces),
        ];
        for (name, help, get) in vhost_counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for v in vhost {
                ConstCounter::new(get(v)).encode(family.encode_family(&[("port", v.port.as_str())])?)?;
            }
        }

        let fdb = self.0.fdb;
        let no_labels: [(&str, &str); 0] = [];
        for (name, help, value) in [
            ("vmq_fdb_entries", "Entries in the MAC table (static and learned)", fdb.entries),
            ("vmq_fdb_capacity", "Most entries the MAC table learns", fdb.capacity),
            ("vmq_vm_queue_budget", "VM queues the switch may hand out (per uplink)", self.0.queues.budget),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(family.encode_family(&no_labels)?)?;
        }
        let mut in_use = encoder.encode_descriptor(
            "vmq_vm_queues_in_use",
            "VM queues of the uplink that feed a VM port now",
            None,
            MetricType::Gauge,
        )?;
        for (uplink, n) in &self.0.queues.in_use {
            ConstGauge::new(i64::try_from(*n).unwrap_or(i64::MAX))
                .encode(in_use.encode_family(&[("uplink", uplink.as_str())])?)?;
        }
        let mut nic = encoder.encode_descriptor(
            "vmq_nic_queue_rx_packets",
            "Frames read from the uplink's receive queue (default: the software switch's)",
            None,
            MetricType::Counter,
        )?;
        for q in &self.0.queues.nic_queues {
            let labels = [("uplink", q.uplink.as_str()), ("queue", q.queue.as_str())];
            ConstCounter::new(q.rx_packets).encode(nic.encode_family(&labels)?)?;
        }
        let mut build = encoder.encode_descriptor(
            "vmq_build_info",
            "Always 1; the labels say which vmq runs",
            None,
            MetricType::Gauge,
        )?;
        let build_info = &self.0.build;
        let mut labels = vec![("version", build_info.version.as_str())];
        if let Some(commit) = &build_info.commit {
            labels.push(("commit", commit.as_str()));
        }
        ConstGauge::new(1i64).encode(build.encode_family(&labels)?)?;

        let mut busy = encoder.encode_descriptor(
            "vmq_worker_busy_ratio",
            "Share of time the worker spent doing work",
            None,
            MetricType::Gauge,
        )?;
        for w in &self.0.workers {
            let worker = w.worker.to_string();
            let labels = [("worker", worker.as_str())];
            ConstGauge::new(w.busy_ratio).encode(busy.encode_family(&labels)?)?;
        }
        let mut panics = encoder.encode_descriptor(
            "vmq_worker_panics",
            "Panics caught in the worker, each followed by a restart",
            None,
            MetricType::Counter,
        )?;
        for w in &self.0.workers {
            let worker = w.worker.to_string();
            let labels = [("worker", worker.as_str())];
            ConstCounter::new(w.panics).encode(panics.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// A running metrics exporter. Stop it with [`MetricsExporter::shutdown`] (or drop it).
pub struct MetricsExporter {
    local_addr: SocketAddr,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl MetricsExporter {
    /// Listens on `config.addr` (port 0: any free port, see [`MetricsExporter::local_addr`]) and
    /// serves scrapes on a thread of its own.
    pub fn start(config: MetricsConfig, snapshot: Arc<SnapshotFn>) -> Result<MetricsExporter, MetricsError> {
        let bind_err = |source| MetricsError::Bind { addr: config.addr, source };
        let listener = TcpListener::bind(config.addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let (wake, wake_rx) = UnixStream::pair().map_err(MetricsError::Thread)?;
        let thread = std::thread::Builder::new()
            .name("vmq-metrics".into())
            .spawn(move || serve_loop(&listener, &wake_rx, &config, &*snapshot))
            .map_err(MetricsError::Thread)?;
        tracing::info!(addr = %local_addr, "metrics at http://{local_addr}/metrics");
        Ok(MetricsExporter { local_addr, wake, thread: Some(thread) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops listening and joins the thread (which is at most one request's `io_timeout` away
    /// from noticing).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.wake.write_all(&[1]);
            let _ = thread.join();
        }
    }
}

impl Drop for MetricsExporter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_loop(listener: &TcpListener, wake: &UnixStream, config: &MetricsConfig, snapshot: &SnapshotFn) {
    loop {
        let (listener_ready, woken) = match crate::wait::listener_or_wake(listener, wake) {
            Ok(r) => (r.listener, r.woken),
            Err(e) => {
                tracing::error!(error = %e, "metrics poll failed; the exporter stops");
                return;
            }
        };
        if woken {
            return;
        }
        if !listener_ready {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = serve_one(stream, config, snapshot) {
                    tracing::debug!(error = %e, "metrics request failed");
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                let mut fds = [PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(100u16));
            }
        }
    }
}

/// The parts of a request line we act on.
#[derive(Debug, PartialEq, Eq)]
enum HttpRequest {
    Get { path: String },
    Other,
}

#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    TooLarge,
    Malformed,
}

/// Reads the request head (up to the blank line) within the size limit and the deadline.
fn read_head(stream: &mut TcpStream, max: usize, deadline: Instant) -> io::Result<Result<Vec<u8>, HeadError>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(Err(HeadError::Malformed));
        }
        head.extend_from_slice(&buf[..n]);
        // A blank line ends the head; tolerate bare LF line ends (hand-typed requests).
        let end = head.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| head.windows(2).position(|w| w == b"\n\n"));
        if let Some(end) = end {
            head.truncate(end);
            return Ok(if end > max { Err(HeadError::TooLarge) } else { Ok(head) });
        }
        if head.len() > max {
            return Ok(Err(HeadError::TooLarge));
        }
    }
}

fn parse_request_line(head: &[u8]) -> Result<HttpRequest, HeadError> {
    let text = std::str::from_utf8(head).map_err(|_| HeadError::Malformed)?;
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HeadError::Malformed);
    }
    let path = target.split('?').next().unwrap_or_default();
    Ok(if method == "GET" { HttpRequest::Get { path: path.to_string() } } else { HttpRequest::Other })
}

fn serve_one(mut stream: TcpStream, config: &MetricsConfig, snapshot: &SnapshotFn) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(config.io_timeout))?;
    let deadline = Instant::now() + config.io_timeout;
    let request = match read_head(&mut stream, config.max_request_bytes, deadline)? {
        Ok(head) => parse_request_line(&head),
        Err(e) => Err(e),
    };
    let (status, content_type, body) = match request {
        Ok(HttpRequest::Get { path }) if path == "/metrics" => match encode(snapshot()) {
            Ok(text) => ("200 OK", CONTENT_TYPE, text),
            Err(_) => ("500 Internal Server Error", "text/plain", "cannot encode the metrics\n".to_string()),
        },
        Ok(_) => ("404 Not Found", "text/plain", "vmq serves GET /metrics only\n".to_string()),
        Err(HeadError::TooLarge) => {
            ("431 Request Header Fields Too Large", "text/plain", "request head too large\n".to_string())
        }
        Err(HeadError::Malformed) => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/1.1\r\nHost: x"),
            Ok(HttpRequest::Get { path: "/metrics".into() })
        );
        assert_eq!(parse_request_line(b"GET /metrics?x=1 HTTP/1.0"), Ok(HttpRequest::Get { path: "/metrics".into() }));
        assert_eq!(parse_request_line(b"POST /metrics HTTP/1.1"), Ok(HttpRequest::Other));
        assert_eq!(parse_request_line(b"GET /metrics"), Err(HeadError::Malformed));
        assert_eq!(parse_request_line(b"GET /metrics SPDY/3"), Err(HeadError::Malformed));
        assert_eq!(parse_request_line(&[0xff, 0xfe]), Err(HeadError::Malformed));
    }
}

//! `vmq run`: start the data path from a configuration file and serve until SIGINT/SIGTERM.

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vmq_datapath::Datapath;

use vmq_control::{ControlError, ControlHandler, ControlServer, ErrorCode, MetricsExporter, Request, Response};

use crate::config;
use crate::control;
use crate::exit;
use crate::handler::DatapathHandler;

pub fn run(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmq: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    // Install the handlers before starting workers so that an early signal is not lost.
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmq: cannot install signal handlers: {e}");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    // The control socket first: if another vmq answers there, stop before touching any of its
    // ports (vhost-user sockets, TAPs).
    let handler = Arc::new(StartingHandler::default());
    let server = match ControlServer::start(control::server_config(&config), handler.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmq: control socket: {e}");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    let datapath = match Datapath::start(config.datapath_config()) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("vmq: {e}");
            server.shutdown();
            return ExitCode::from(exit::RUNTIME);
        }
    };
    let ready = Arc::new(DatapathHandler::new(datapath.clone()).with_socket_defaults(config.vhost.clone()));
    let _ = handler.ready.set(ready.clone());
    let metrics = match control::metrics_config(&config) {
        Some(cfg) => {
            let source = ready.clone();
            match MetricsExporter::start(cfg, Arc::new(move || source.metrics())) {
                Ok(m) => Some(m),
                Err(e) => {
                    eprintln!("vmq: metrics: {e}");
                    server.shutdown();
                    return ExitCode::from(exit::RUNTIME);
                }
            }
        }
        None => None,
    };
    tracing::info!(
        mode = config.mode.name(),
        workers = config.workers,
        ports = config.ports.len(),
        control = %config.control_socket.display(),
        metrics = ?config.metrics,
        "vmq running"
    );
    for p in datapath.ports() {
        tracing::info!(port = %p.config.spec.name, kind = ?p.config.spec.kind, up = p.up, mtu = p.config.spec.mtu,
            vlan = ?p.config.spec.vlan, queue = ?p.queue.map(|q| q.0), "port");
    }
    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "shutting down");
    }
    server.shutdown();
    if let Some(m) = metrics {
        m.shutdown();
    }
    for (name, s) in datapath.port_stats() {
        tracing::info!(port = %name, rx = s.rx_packets, tx = s.tx_packets, drops = s.total_drops(),
            coalesced = s.offload_coalesced, "final counters");
    }
    drop(handler);
    drop(ready);
    // The last handle: workers stop, TAPs and VM sockets close (VMs see their link go down).
    match Arc::try_unwrap(datapath) {
        Ok(dp) => dp.shutdown(),
        Err(_) => tracing::warn!("data path still referenced at shutdown"),
    }
    ExitCode::SUCCESS
}

/// Answers `busy` until the data path has started, then hands requests to it.
#[derive(Default)]
struct StartingHandler {
    ready: OnceLock<Arc<DatapathHandler>>,
}

impl ControlHandler for StartingHandler {
    fn handle(&self, request: Request) -> Result<Response, ControlError> {
        match self.ready.get() {
            Some(h) => h.handle(request),
            None => Err(ControlError::new(ErrorCode::Busy, "vmq is starting; try again")),
        }
    }
}

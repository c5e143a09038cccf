//! `vmq run`: start the data path from a configuration file and serve until SIGINT/SIGTERM;
//! SIGHUP reloads the file. Under systemd (`Type=notify`) the service manager hears READY=1 once
//! the data path, the control socket and the metrics exporter are up, RELOADING=1 and READY=1
//! around a reload, STOPPING=1 on the way out.

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vmq_datapath::Datapath;

use vmq_control::{ControlError, ControlHandler, ControlServer, ErrorCode, MetricsExporter, Request, Response};

use crate::config;
use crate::control;
use crate::exit;
use crate::handler::DatapathHandler;
use crate::notify::{self, State};

pub fn run(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmq: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    // Install the handlers before starting workers so that an early signal is not lost.
    let mut signals = match Signals::new([SIGINT, SIGTERM, SIGHUP]) {
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
    let relays = match crate::qmp_relay::QmpRelays::start(datapath.clone(), &config.qmp) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmq: QMP relay thread: {e}");
            server.shutdown();
            return ExitCode::from(exit::RUNTIME);
        }
    };
    let ready = Arc::new(DatapathHandler::new(datapath.clone()).with_config_file(path.to_path_buf(), config.clone()));
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
    notify::notify(State::Ready);
    for signal in signals.forever() {
        if signal == SIGHUP {
            reload(&ready, path);
            continue;
        }
        tracing::info!(signal, "shutting down");
        break;
    }
    notify::notify(State::Stopping);
    if let Some(r) = relays {
        r.shutdown();
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

/// SIGHUP: the configuration file again, its difference applied (or refused, logged).
fn reload(handler: &DatapathHandler, path: &Path) {
    notify::notify(State::Reloading);
    tracing::info!(file = %path.display(), "reloading the configuration");
    match handler.reload() {
        Ok(outcome) if outcome.plan.is_empty() => tracing::info!("configuration reloaded: nothing changed"),
        Ok(outcome) if outcome.failed.is_empty() => {
            tracing::info!(changes = %outcome.plan.summary(), "configuration reloaded")
        }
        Ok(outcome) => tracing::error!(
            changes = %outcome.plan.summary(),
            failed = ?outcome.failed,
            "configuration reloaded in part: the data path refused some changes"
        ),
        Err(e) => tracing::error!(error = %e, "reload refused; the running configuration stays"),
    }
    notify::notify(State::Ready);
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

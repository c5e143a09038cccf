//! `vmq run`: start the data path from a configuration file and serve until SIGINT/SIGTERM.

use std::path::Path;
use std::process::ExitCode;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vmq_core::switch::SwitchConfig;
use vmq_core::vmq::{QueuePolicy, VmqConfig};
use vmq_datapath::{Datapath, DatapathConfig};

use crate::cli::exit;
use crate::config::{self, Config};

/// The data-path configuration a validated [`Config`] describes.
pub fn datapath_config(c: &Config) -> DatapathConfig {
    DatapathConfig {
        mode: c.mode,
        workers: c.workers,
        vmq: VmqConfig {
            queues: c.vmq_queues,
            policy: if c.vmq_dynamic { QueuePolicy::Dynamic } else { QueuePolicy::Static },
            workers: c.workers as u16,
            hysteresis: c.hysteresis,
        },
        switch: SwitchConfig { fdb_capacity: c.fdb_capacity, fdb_aging_ns: c.fdb_aging_secs * 1_000_000_000 },
        ports: c.ports.clone(),
        rebalance_interval_ms: c.rebalance_interval_ms,
    }
}

pub fn run(path: &Path) -> ExitCode {
    init_logging();
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
    let datapath = match Datapath::start(datapath_config(&config)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vmq: {e}");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    tracing::info!(mode = config.mode.name(), workers = config.workers, ports = config.ports.len(), "vmq running");
    for port in &config.ports {
        tracing::info!(port = %port.spec.name, kind = ?port.spec.kind, mtu = port.spec.mtu, vlan = ?port.spec.vlan, "port up");
    }
    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "shutting down");
    }
    for (name, s) in datapath.port_stats() {
        tracing::info!(port = %name, rx = s.rx_packets, tx = s.tx_packets, drops = s.total_drops(), "final counters");
    }
    datapath.shutdown();
    ExitCode::SUCCESS
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

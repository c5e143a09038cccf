//! `config_file`: a configuration file, parsed and validated by vmq's own parser
//! (`crates/vmq/src/config.rs`, compiled in here by path: the binary crate keeps it private, and
//! it uses nothing else of that crate).
//!
//! Input: the file's bytes (invalid UTF-8 replaced, as a text editor would show it).
//!
//! Invariants: no panic; an error is `file:line:column: message` with a line inside the text
//! (or just past its end) and a column from 1; a parsed configuration is within the documented
//! limits (workers, queues, MTUs), its port names are unique and valid, no two of its ports
//! conflict (socket, interface, MAC and VLAN) by the parser's own rule, uplink references name
//! uplink ports, and parsing the same text again gives the same configuration.

#[allow(dead_code)] // vmq's loader and constants are not used here
#[path = "../../vmq/src/config.rs"]
mod parser;

pub use parser::{Config, ConfigError, EMBEDDED_DEFAULT, parse};
use vmq_core::PortKind;
use vmq_core::port::{MAX_MTU, MIN_MTU};

/// How the file ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigOutcome {
    /// Valid, with this many ports.
    Valid(usize),
    /// Refused at this line and column.
    Invalid(usize, usize),
}

/// The fuzz target.
pub fn config_file(data: &[u8]) {
    let _ = run_config_file(data);
}

pub fn run_config_file(data: &[u8]) -> ConfigOutcome {
    let text = String::from_utf8_lossy(data);
    match parse(&text, "fuzz.toml") {
        Ok(config) => {
            check_config(&config);
            let again = parse(&text, "fuzz.toml").expect("the same text parses again");
            assert_eq!(again, config, "parsing is not deterministic");
            ConfigOutcome::Valid(config.ports.len())
        }
        Err(ConfigError::Invalid { file, line, column, message }) => {
            let lines = text.matches('\n').count() + 1;
            assert_eq!(file, "fuzz.toml");
            assert!((1..=lines).contains(&line), "error at line {line} of a {lines}-line text: {message}");
            assert!(column >= 1, "column {column}: {message}");
            assert!(!message.is_empty(), "an error without a message");
            ConfigOutcome::Invalid(line, column)
        }
        Err(e @ ConfigError::Read { .. }) => panic!("parsing text read a file: {e}"),
    }
}

fn check_config(config: &Config) {
    assert!((1..=64).contains(&config.workers), "workers {}", config.workers);
    assert!(config.vmq_queues <= 1024, "queues {}", config.vmq_queues);
    assert!(config.hysteresis.is_finite() && (1.0..=100.0).contains(&config.hysteresis));
    for (i, port) in config.ports.iter().enumerate() {
        let name = &port.spec.name;
        assert!(
            (1..=32).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "port name {name:?}"
        );
        assert!((MIN_MTU..=MAX_MTU).contains(&port.spec.mtu), "port {name}: MTU {}", port.spec.mtu);
        for other in &config.ports[..i] {
            assert_ne!(&other.spec.name, name, "duplicate port name");
            assert!(parser::conflict(port, other).is_none(), "ports {name} and {} conflict", other.spec.name);
        }
        if let Some(uplink) = &port.uplink {
            assert!(
                config.ports.iter().any(|p| &p.spec.name == uplink && p.spec.kind == PortKind::Uplink),
                "port {name}: uplink {uplink:?} is no uplink port"
            );
        }
    }
}

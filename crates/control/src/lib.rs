//! vmq's control plane, independent of the data path: the control socket (JSON lines over a
//! Unix stream socket) with its server and client, the Prometheus exporter, and the
//! human-readable views of every response.
//!
//! The switch plugs in through [`ControlHandler`] (requests) and a snapshot callback
//! ([`metrics::MetricsSnapshot`]); nothing here touches frames or the data path's state.
#![forbid(unsafe_code)]

pub mod client;
mod lines;
pub mod metrics;
pub mod protocol;
pub mod qmp;
pub mod render;
pub mod server;
mod wait;

pub use client::{Client, ClientError};
pub use metrics::{MetricsConfig, MetricsExporter, MetricsSnapshot};
pub use protocol::{ControlError, ErrorCode, Reply, Request, Response};
pub use server::{ControlHandler, ControlServer, ServerConfig, ServerError};

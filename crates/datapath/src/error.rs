//! The errors the data path's API returns.

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("port {0:?} is configured twice")]
    DuplicatePort(String),
    #[error("no port named {0:?}")]
    NoSuchPort(String),
    #[error("port {port:?}: {kind} ports are not supported by this build of the data path yet")]
    Unsupported { port: String, kind: &'static str },
    #[error("port {0:?} has no sink attached")]
    NotAttached(String),
    #[error("port {port:?} names uplink {uplink:?}, which is not an uplink port")]
    BadUplink { port: String, uplink: String },
    #[error("port {0} has no VM queue")]
    NoQueue(u16),
    #[error("workers must be at least 1")]
    NoWorkers,
    #[error("too many ports (at most {0})")]
    TooManyPorts(usize),
    #[error("port {port:?}: {message}")]
    Backend { port: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot start worker thread: {0}")]
    Thread(#[source] std::io::Error),
}

//! Logging of `vmq run` to stderr: the filter from `--log-level` or `RUST_LOG` (default `info`),
//! human-readable text or one JSON object per line, and ANSI colour only when stderr is a
//! terminal and `NO_COLOR` is unset (<https://no-color.org>), so that files, pipes and journald
//! get plain text.

use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

/// The filter used when neither `--log-level` nor `RUST_LOG` says otherwise.
const DEFAULT_FILTER: &str = "info";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event and line (`timestamp`, `level`, `target`, `fields`).
    Json,
}

#[derive(Debug, Clone, Default, Args)]
pub struct LogArgs {
    /// What to log: a level (error, warn, info, debug, trace) or a filter in `RUST_LOG` syntax
    /// (`info,vmq_vhost=debug`). Takes precedence over `RUST_LOG`; default `info`.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// How each log event is written to stderr.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("--log-level {filter:?} is not a valid filter: {reason}")]
    BadLevel { filter: String, reason: String },
    #[error("RUST_LOG={filter:?} is not a valid filter: {reason}")]
    BadEnv { filter: String, reason: String },
    #[error("RUST_LOG is not valid UTF-8")]
    EnvNotUnicode,
    #[error("cannot install the logger: {0}")]
    Install(String),
}

/// The filter: `--log-level` first, then `RUST_LOG`, then [`DEFAULT_FILTER`]. A filter that
/// does not parse is an error rather than silently logging something else.
fn filter(args: &LogArgs, env: Option<std::ffi::OsString>) -> Result<EnvFilter, LogError> {
    if let Some(level) = &args.log_level {
        return EnvFilter::try_new(level)
            .map_err(|e| LogError::BadLevel { filter: level.clone(), reason: e.to_string() });
    }
    match env {
        None => Ok(EnvFilter::new(DEFAULT_FILTER)),
        Some(raw) => {
            let text = raw.into_string().map_err(|_| LogError::EnvNotUnicode)?;
            if text.trim().is_empty() {
                return Ok(EnvFilter::new(DEFAULT_FILTER));
            }
            EnvFilter::try_new(&text).map_err(|e| LogError::BadEnv { filter: text, reason: e.to_string() })
        }
    }
}

/// Colour only for a person at a terminal who did not ask for none.
fn use_colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the process-wide logger. Call once, before anything logs.
pub fn init(args: &LogArgs) -> Result<(), LogError> {
    let filter = filter(args, std::env::var_os("RUST_LOG"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match args.log_format {
        LogFormat::Text => {
            builder.with_ansi(use_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR"))).try_init()
        }
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
    installed.map_err(|e| LogError::Install(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(level: Option<&str>) -> LogArgs {
        LogArgs { log_level: level.map(str::to_string), log_format: LogFormat::Text }
    }

    #[test]
    fn log_level_wins_over_rust_log() {
        let f = filter(&args(Some("debug")), Some("error".into())).unwrap();
        assert_eq!(f.to_string(), "debug");
    }

    #[test]
    fn rust_log_applies_when_no_level_is_given() {
        let from_env = filter(&args(None), Some("warn,vmq=trace".into())).unwrap().to_string();
        assert!(from_env.contains("vmq=trace") && from_env.contains("warn"), "{from_env}");
        assert_eq!(filter(&args(None), None).unwrap().to_string(), "info");
        assert_eq!(filter(&args(None), Some("".into())).unwrap().to_string(), "info");
    }

    #[test]
    fn a_bad_filter_is_an_error_naming_it() {
        let e = filter(&args(Some("info,=[")), None).unwrap_err();
        assert!(matches!(e, LogError::BadLevel { .. }), "{e}");
        let e = filter(&args(None), Some("vmq=loud".into())).unwrap_err();
        assert!(e.to_string().contains("RUST_LOG=\"vmq=loud\""), "{e}");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some("".into())));
        assert!(!use_colour(true, Some("1".into())));
        assert!(!use_colour(false, None));
    }
}

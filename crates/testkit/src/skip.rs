//! Skipped tests, made visible: a test that cannot run here (not root, a tool or the guest image
//! missing) calls [`skip`] and returns. The harness hides the output of passing tests, so a skip
//! is also appended to a log that `.ci/run` counts, and where every test must run
//! (`VMQ_REQUIRE_ALL=1`, set by `.ci/run` in CI and as root) a skip is a failure.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

/// Set to `1` to turn every skip into a panic.
pub const REQUIRE_ALL_ENV: &str = "VMQ_REQUIRE_ALL";
/// The file skips are appended to; default `vmq-skips.log` in the OS temporary directory.
pub const SKIP_LOG_ENV: &str = "VMQ_SKIP_LOG";

/// True when `VMQ_REQUIRE_ALL=1`: every test must run, none may skip.
pub fn require_all() -> bool {
    std::env::var(REQUIRE_ALL_ENV).is_ok_and(|v| v == "1")
}

/// Where [`skip`] appends its `SKIPPED: test: reason` lines.
pub fn skip_log_path() -> PathBuf {
    std::env::var_os(SKIP_LOG_ENV).map_or_else(|| std::env::temp_dir().join("vmq-skips.log"), PathBuf::from)
}

/// Records that `test` did not run because of `reason`: a `SKIPPED: test: reason` line on stderr
/// and in the skip log. Panics instead of skipping when `VMQ_REQUIRE_ALL=1` (the line is logged
/// first, so the count stays right). The caller returns from the test afterwards.
pub fn skip(test: &str, reason: &str) {
    let line = format!("SKIPPED: {test}: {reason}");
    eprintln!("{line}");
    let path = skip_log_path();
    // One write of one short line to an O_APPEND file: lines of parallel tests do not interleave.
    let logged = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = logged {
        eprintln!("(could not append to the skip log {}: {e})", path.display());
    }
    if require_all() {
        panic!("{test} skipped, but {REQUIRE_ALL_ENV}=1 requires every test to run: {reason}");
    }
}

/// The name of the running test: libtest runs each test on a thread named after it.
pub fn current_test() -> String {
    std::thread::current().name().unwrap_or("unnamed test").to_string()
}

/// True when the effective user is root (from `/proc/self/status`; this crate has no unsafe).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// True when `tool` is on the PATH.
pub fn has_tool(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

/// True when the test can run: root and every tool in `tools` present. Otherwise [`skip`]s
/// `test` with the first thing missing and returns false.
pub fn root_with_tools_or_skip(test: &str, tools: &[&str]) -> bool {
    if !is_root() {
        skip(test, "needs root");
        return false;
    }
    if let Some(tool) = tools.iter().find(|t| !has_tool(t)) {
        skip(test, &format!("{tool} is not installed"));
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_name_is_the_thread_name() {
        assert_eq!(current_test(), "skip::tests::the_test_name_is_the_thread_name");
    }
}

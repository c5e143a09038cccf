//! A skip is logged and counted, and is a failure when `VMQ_REQUIRE_ALL=1`: the test binary runs
//! itself (one test, by exact name) with the environment of each case.

use std::path::PathBuf;
use std::process::Command;

/// Skips when run by the cases below (the variable is set only there); passes otherwise.
#[test]
fn skipping_child() {
    if std::env::var_os("VMQ_SKIP_SELFTEST").is_some() {
        vmq_testkit::skip(&vmq_testkit::skip::current_test(), "needs something this machine lacks");
    }
}

fn run_child(require_all: &str, log: &PathBuf) -> std::process::Output {
    let _ = std::fs::remove_file(log);
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "skipping_child", "--nocapture", "--test-threads=1"])
        .env("VMQ_SKIP_SELFTEST", "1")
        .env("VMQ_REQUIRE_ALL", require_all)
        .env("VMQ_SKIP_LOG", log)
        .output()
        .unwrap()
}

#[test]
fn a_skip_is_logged_and_passes_unless_every_test_is_required() {
    let log = std::env::temp_dir().join(format!("vqt-skip-{}-optional.log", std::process::id()));
    let out = run_child("0", &log);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("SKIPPED: skipping_child: needs something this machine lacks"), "{stderr}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged, "SKIPPED: skipping_child: needs something this machine lacks\n");
    let _ = std::fs::remove_file(&log);
}

#[test]
fn a_skip_fails_the_test_when_every_test_is_required() {
    let log = std::env::temp_dir().join(format!("vqt-skip-{}-required.log", std::process::id()));
    let out = run_child("1", &log);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a required test skipped and passed:\n{stdout}{stderr}");
    assert!(stderr.contains("VMQ_REQUIRE_ALL=1 requires every test to run"), "{stderr}");
    assert!(stdout.contains("1 failed"), "{stdout}");
    // Logged before the panic, so `.ci/run` counts it too.
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
    let _ = std::fs::remove_file(&log);
}

//! The harness reports a QEMU that cannot start with QEMU's own words, and reaps it.

use std::time::Duration;

use vmq_testkit::qemu::{Guest, GuestConfig, GuestError, guest_image_or_skip};

#[test]
fn qemu_without_a_backend_fails_with_its_stderr() {
    let Some(image) = guest_image_or_skip("qemu_without_a_backend_fails_with_its_stderr") else {
        return;
    };
    let socket = std::env::temp_dir().join(format!("vqv-testkit-nobackend-{}.sock", std::process::id()));
    let config = GuestConfig::new("orphan", &socket, "52:54:00:00:00:99").boot_timeout(Duration::from_secs(30));
    let mut guest = Guest::spawn(&image, config.clone()).expect("spawn QEMU");
    let pid = guest.pid();
    match guest.wait_ready(Duration::from_secs(30)) {
        Err(GuestError::Exited { tails, .. }) => {
            assert!(tails.contains("Failed to connect"), "QEMU's stderr is in the error:\n{tails}");
        }
        other => panic!("QEMU without a vhost-user backend must exit: {other:?}"),
    }
    assert!(guest.wait_exit(Duration::ZERO).is_some_and(|s| !s.success()));
    assert!(guest.stderr_log().contains(&socket.display().to_string()));
    drop(guest);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "QEMU (pid {pid}) reaped");
    // The same through boot().
    assert!(matches!(Guest::boot(&image, config), Err(GuestError::Exited { .. })));
}

#[test]
fn invalid_options_are_refused_before_qemu_starts() {
    let Some(image) = guest_image_or_skip("invalid_options_are_refused_before_qemu_starts") else {
        return;
    };
    let config = GuestConfig::new("bad", "/tmp/none.sock", "not-a-mac");
    assert!(matches!(Guest::spawn(&image, config), Err(GuestError::Config(_))));
}

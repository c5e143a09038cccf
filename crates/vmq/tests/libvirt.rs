//! libvirt end to end: the test starts its own `virtlogd` and `libvirtd` (no systemd) in private
//! mount, network and PID namespaces, boots the domain XML of docs/integration.md (read from
//! the file, only paths changed) under TCG on a vmq vhost-user port, and a plain QEMU guest on a
//! second port pings it through vmq: at 1500 and 9000 bytes, and again after `kill -9` of vmq and
//! a restart. A second domain on a socket libvirt's QEMU may not open shows the failure the
//! `socket_group`/`socket_mode` options avoid. Root-only; needs libvirtd, virtlogd, virsh,
//! unshare and the guest image.

mod guests;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guests::*;
use vmq_control::protocol::PortState;
use vmq_testkit::qemu::{Guest, VhostChardev, guest_image_or_skip};

const INTEGRATION_DOC: &str = include_str!("../../../docs/integration.md");

const BOOT: Duration = Duration::from_secs(90);

/// The paths in the doc's domain XML, which the test replaces with its own.
const DOC_SOCKET: &str = "/run/vmq/vm1.sock";
const DOC_KERNEL: &str = "/var/lib/libvirt/boot/vmlinuz";
const DOC_INITRD: &str = "/var/lib/libvirt/boot/initramfs.cpio.gz";
const DOC_CONSOLE: &str = "/var/log/libvirt/qemu/vmq-vm1.console";
const DOC_MAC: &str = "52:54:00:00:00:01";
const DOC_RECONNECT: &str = "<reconnect enabled='yes' timeout='1'/>";

/// Every ```xml block of docs/integration.md.
fn doc_xml_blocks() -> Vec<&'static str> {
    let mut blocks = Vec::new();
    let mut rest = INTEGRATION_DOC;
    while let Some(start) = rest.find("```xml\n") {
        let body = &rest[start + "```xml\n".len()..];
        let end = body.find("```").expect("an ```xml block of docs/integration.md is closed");
        blocks.push(&body[..end]);
        rest = &body[end..];
    }
    blocks
}

/// The doc's libvirt domain (the block with a vhostuser interface).
fn doc_domain_xml() -> &'static str {
    let domains: Vec<&str> = doc_xml_blocks().into_iter().filter(|b| b.contains("type='vhostuser'")).collect();
    assert_eq!(domains.len(), 1, "docs/integration.md has one vhostuser domain");
    let xml = domains[0];
    for needle in [DOC_SOCKET, DOC_KERNEL, DOC_INITRD, DOC_CONSOLE, DOC_MAC, DOC_RECONNECT] {
        assert!(xml.contains(needle), "the doc's domain XML contains {needle}");
    }
    xml
}

/// Every XML example in docs/integration.md is a domain libvirt's schema accepts.
#[test]
fn integration_doc_domain_xml_validates() {
    let test = "integration_doc_domain_xml_validates";
    if !vmq_testkit::skip::has_tool("virt-xml-validate") {
        vmq_testkit::skip::skip(test, "virt-xml-validate (libvirt-clients) is not installed");
        return;
    }
    let blocks = doc_xml_blocks();
    assert!(!blocks.is_empty(), "docs/integration.md has XML examples");
    let dir = TestDir::new("xmlvalidate");
    for (i, xml) in blocks.iter().enumerate() {
        let path = dir.join(&format!("domain{i}.xml"));
        std::fs::write(&path, xml).expect("write the XML");
        let out = Command::new("virt-xml-validate").arg(&path).arg("domain").output().expect("run virt-xml-validate");
        assert!(
            out.status.success(),
            "virt-xml-validate rejects XML block {i} of docs/integration.md:\n{}{}\n{xml}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Run inside the namespaces: private libvirt state on tmpfs, then virtlogd and libvirtd in the
/// foreground as children of this shell (PID 1 of the namespace).
const NAMESPACE_SCRIPT: &str = "set -e
for d in /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt /etc/libvirt/qemu; do
    mkdir -p $d
    mount -t tmpfs -o mode=0755 tmpfs $d
done
mkdir -p /var/lib/libvirt/qemu /var/cache/libvirt/qemu /var/log/libvirt/qemu
ip link set lo up
virtlogd &
libvirtd &
wait
";

/// `virtlogd` and `libvirtd` in their own mount, network and PID namespaces. Dropping it kills
/// `unshare` by PID; `--kill-child` then kills the namespace's first process, and with it every
/// process of the namespace (libvirtd, virtlogd, the domains' QEMU). The tmpfs state goes with
/// the mount namespace.
struct Libvirtd {
    unshare: Child,
    log: PathBuf,
}

impl Libvirtd {
    fn start(dir: &TestDir) -> Libvirtd {
        let log = dir.join("libvirtd.log");
        let log_file = std::fs::File::create(&log).expect("create libvirtd.log");
        let unshare = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"])
            .args(["sh", "-c", NAMESPACE_SCRIPT])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log fd"))
            .stderr(log_file)
            .spawn()
            .expect("start unshare");
        let mut libvirtd = Libvirtd { unshare, log };
        wait_for("libvirtd answering virsh", Duration::from_secs(60), || {
            if let Ok(Some(status)) = libvirtd.unshare.try_wait() {
                panic!("the libvirt namespace ended at start ({status}):\n{}", libvirtd.log_text());
            }
            libvirtd.virsh(&["list", "--all"]).map(|_| ())
        });
        libvirtd
    }

    /// libvirtd's socket, seen through `unshare`'s root (it lives in the private mount namespace).
    fn uri(&self) -> String {
        format!("qemu:///system?socket=/proc/{}/root/run/libvirt/libvirt-sock", self.unshare.id())
    }

    /// `virsh ARGS` (at most 60 s); its stdout, or stdout and stderr on failure.
    fn virsh(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("timeout")
            .args(["60", "virsh", "-c", &self.uri()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run virsh: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "virsh {} failed ({}): {stdout}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        // Our child, not reaped yet: its PID cannot have been reused.
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- libvirtd log (last 30 lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Waits for the guest's ready line in a domain's file console; returns the line.
fn wait_console_ready(console: &Path, timeout: Duration) -> String {
    wait_for("ready line on the domain's console", timeout, || {
        let text = std::fs::read_to_string(console).map_err(|e| format!("{}: {e}", console.display()))?;
        text.lines()
            .find(|l| l.contains("VMQ-GUEST-READY"))
            .map(|l| l.trim().to_string())
            .ok_or_else(|| format!("console so far: {}", text.lines().last().unwrap_or("")))
    })
}

/// Pings `target` from `guest` until one reply comes back (each try: 3 pings, at most `timeout`).
fn wait_ping(guest: &mut Guest, args: &str, timeout: Duration) {
    wait_for(&format!("ping reply ({args}) in {}", guest.name()), timeout, || {
        let (_, received, output) = guest_ping(guest, args, 3, 1);
        if received > 0 { Ok(()) } else { Err(output) }
    });
}

/// The doc's domain booted by libvirtd on a vmq port with `socket_group = "kvm"`,
/// `socket_mode = "0660"`; a testkit QEMU guest on another port pings it through vmq at 1500 and
/// 9000 bytes, before and after `kill -9` of vmq and a restart.
#[test]
fn libvirt_domain_pings_a_guest_through_vmq_and_survives_a_vmq_restart() {
    let test = "libvirt_domain_pings_a_guest_through_vmq_and_survives_a_vmq_restart";
    let Some(image) = guest_image_or_skip(test) else { return };
    if !vmq_testkit::skip::root_with_tools_or_skip(test, &["libvirtd", "virtlogd", "virsh", "unshare", "ip", "timeout"])
    {
        return;
    }
    let started = Instant::now();
    let dir = TestDir::new("libvirt");
    // libvirt's DAC driver chowns a domain's kernel and initrd to libvirt-qemu while it runs:
    // give it copies, not the shared image.
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initramfs.cpio.gz"));
    for (from, to) in [(&image.kernel, &kernel), (&image.initrd, &initrd)] {
        std::fs::copy(from, to).expect("copy the guest image");
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o644)).expect("chmod the guest image");
    }

    let (mac1, mac2, mac3) = (DOC_MAC, "52:54:00:00:00:02", "52:54:00:00:00:03");
    let libvirt_socket_policy = "socket_group = \"kvm\"\nsocket_mode = \"0660\"\n\n";
    let config = switch_header(&dir, 1)
        + &vhost_port(&dir, "vm1", mac1, 9000, 0, true)
        + libvirt_socket_policy
        + &vhost_port(&dir, "vm2", mac2, 9000, 0, true)
        + &vhost_port(&dir, "denied", mac3, 1500, 0, true);
    let mut vmq = Vmq::start(&dir, &config);

    let kvm_gid = std::fs::read_to_string("/etc/group")
        .expect("read /etc/group")
        .lines()
        .find_map(|l| l.strip_prefix("kvm:x:").and_then(|r| r.split(':').next()).and_then(|g| g.parse::<u32>().ok()))
        .expect("group kvm exists (libvirt-daemon-system)");
    let meta = std::fs::metadata(dir.join("vm1.sock")).expect("vm1's socket exists");
    assert_eq!((meta.gid(), meta.mode() & 0o777), (kvm_gid, 0o660), "vm1's socket: group kvm, mode 0660");

    // The plain QEMU guest boots while libvirtd starts.
    let mut vm2 = Guest::spawn(
        &image,
        guest_config(&dir, "vm2", mac2, "10.72.0.2").host_mtu(9000).chardev(VhostChardev::Reconnect { secs: 1 }),
    )
    .unwrap_or_else(|e| panic!("start QEMU: {e}"));
    let libvirtd = Libvirtd::start(&dir);

    let console = dir.join("vm1.console");
    let domain = doc_domain_xml()
        .replace(DOC_SOCKET, &dir.join("vm1.sock").to_string_lossy())
        .replace(DOC_KERNEL, &kernel.to_string_lossy())
        .replace(DOC_INITRD, &initrd.to_string_lossy())
        .replace(DOC_CONSOLE, &console.to_string_lossy());

    // Without the socket policy (vmq's default: owner root, group root, 0660) libvirt's QEMU,
    // running as libvirt-qemu, may not connect, and the domain does not start. (Without
    // reconnect, so that QEMU gives up at once instead of retrying.)
    let denied = domain
        .replace("vmq-vm1", "vmq-denied")
        .replace(&*dir.join("vm1.sock").to_string_lossy(), &dir.join("denied.sock").to_string_lossy())
        .replace(&*console.to_string_lossy(), &dir.join("denied.console").to_string_lossy())
        .replace(DOC_MAC, mac3)
        .replace(DOC_RECONNECT, "");
    let denied_path = dir.join("denied.xml");
    std::fs::write(&denied_path, &denied).expect("write denied.xml");
    let refused = libvirtd.virsh(&["create", &denied_path.to_string_lossy()]);
    let error = refused.expect_err("a domain on a socket libvirt-qemu may not open must not start");
    assert!(error.contains("Permission denied"), "the domain fails on the socket's permissions: {error}");

    let domain_path = dir.join("vm1.xml");
    std::fs::write(&domain_path, &domain).expect("write vm1.xml");
    let boot_started = Instant::now();
    libvirtd.virsh(&["create", &domain_path.to_string_lossy()]).unwrap_or_else(|e| panic!("{e}"));
    let ready = wait_console_ready(&console, BOOT);
    println!("LIBVIRT-BOOT seconds={:.1}", boot_started.elapsed().as_secs_f64());
    // host_mtu from <qemu:override> reached the guest: it came up at 9000.
    assert!(ready.ends_with("mtu=9000"), "the domain's guest came up at MTU 9000: {ready}");

    vm2.wait_ready(BOOT).unwrap_or_else(|e| panic!("{e}"));
    vmq.wait_state(&["vm1", "vm2"], PortState::Up, BOOT);
    wait_link_up(&mut vm2);
    wait_ping(&mut vm2, "10.72.0.1", Duration::from_secs(30));
    assert_ping(&mut vm2, "10.72.0.1", 3);
    // 8972 bytes of ICMP data: a 9000-byte IP packet each way, one frame each through vmq.
    let before = vmq.stats();
    assert_ping(&mut vm2, "-s 8972 10.72.0.1", 3);
    let d1 = Delta::between(&before, &vmq.stats(), "vm1");
    assert!(d1.tx_packets >= 3 && d1.rx_packets >= 3, "the jumbo pings crossed vm1's port: {d1:?}");
    let jumbo = 9014;
    assert!(
        d1.rx_bytes >= 3 * jumbo && d1.tx_bytes >= 3 * jumbo,
        "three 9014-byte frames each way on vm1's port: {d1:?}"
    );

    // kill -9 of vmq and a restart: the domain (<reconnect timeout='1'/>) and vm2 (reconnect=1)
    // connect again by themselves.
    vmq.kill9();
    let restarted = Instant::now();
    let vmq = Vmq::start(&dir, &config);
    vmq.wait_state(&["vm1", "vm2"], PortState::Up, Duration::from_secs(30));
    wait_ping(&mut vm2, "10.72.0.1", Duration::from_secs(30));
    println!("LIBVIRT-RESTART-GAP seconds={:.2}", restarted.elapsed().as_secs_f64());
    assert_ping(&mut vm2, "10.72.0.1", 3);

    let domains = libvirtd.virsh(&["list", "--name"]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(domains.split_whitespace().collect::<Vec<_>>(), ["vmq-vm1"], "only the vm1 domain runs");
    println!("LIBVIRT-TEST seconds={:.1}", started.elapsed().as_secs_f64());
}

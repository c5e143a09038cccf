//! A real QEMU (under TCG) with a Linux guest attaches to the vhost-user server: the virtio-net
//! driver negotiates offloads, the device starts, and a killed QEMU leaves the port down and
//! ready for the next one. Needs qemu-system-x86_64 and the guest image built by
//! tests/guest/build-guest.sh (CI builds it); skipped with a message when either is missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MRG_RXBUF};
use vmq_vhost::server::VhostUserServer;
use vmq_vhost::{DeviceEvent, NetDevice, NetDeviceConfig};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

fn guest_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::env::var_os("VMQ_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target/guest"))
}

/// Kills and reaps the QEMU process on every exit path.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_qemu(socket: &Path, mac: &str) -> Qemu {
    let guest = guest_dir();
    let child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "256", "-smp", "1", "-display", "none", "-no-reboot", "-nodefaults"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "q35,memory-backend=mem"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initramfs.cpio.gz"))
        .args(["-append", "console=ttyS0 panic=-1 vmq.ip=10.99.0.1/24"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", socket.display()))
        .args(["-netdev", "vhost-user,id=n0,chardev=c0"])
        .arg("-device")
        .arg(format!("virtio-net-pci,netdev=n0,mac={mac},vectors=0"))
        .arg("-serial")
        .arg(format!("file:{}", socket.with_extension("serial").display()))
        .args(["-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(socket.with_extension("qemu-log")).expect("qemu log file"))
        .spawn()
        .expect("start qemu-system-x86_64");
    Qemu(child)
}

struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start_server(socket: PathBuf, device: Arc<NetDevice>) -> (Server, Receiver<DeviceEvent>) {
    let (tx, rx) = channel();
    let (ready_tx, ready_rx) = channel();
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut server = VhostUserServer::new().unwrap();
            let tx = Mutex::new(tx);
            let config = NetDeviceConfig { mac: "52:54:00:00:00:11".parse().unwrap(), mtu: 9000, offloads: true };
            server
                .add_port(
                    "vm",
                    &socket,
                    config,
                    device,
                    Box::new(move |e| {
                        let _ = tx.lock().unwrap().send(e);
                    }),
                )
                .unwrap();
            ready_tx.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                server.poll(20).unwrap();
            }
        })
    };
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    (Server { stop, thread: Some(thread) }, rx)
}

#[test]
fn qemu_guest_attaches_and_reattaches() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("info").try_init();
    let guest = guest_dir();
    if !guest.join("vmlinuz").exists() || Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        eprintln!(
            "SKIPPED: needs qemu-system-x86_64 and a guest image in {} (tests/guest/build-guest.sh)",
            guest.display()
        );
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vmq-qemu-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vm.sock");
    let device = NetDevice::new();
    let (_server, events) = start_server(socket.clone(), device.clone());

    for round in 0..2 {
        let qemu = start_qemu(&socket, "52:54:00:00:00:11");
        // The guest's virtio-net driver probes the device and brings the rings up.
        let event = events.recv_timeout(BOOT_TIMEOUT).unwrap_or_else(|_| panic!("round {round}: device never started"));
        assert_eq!(event, DeviceEvent::Started);
        let features = device.acked_features();
        for (bit, name) in [
            (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
            (VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
            (VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
        ] {
            assert!(features & (1 << bit) != 0, "guest did not negotiate {name}: {features:#x}");
        }
        // kill -9 the VM: the port goes down and forgets the guest.
        drop(qemu);
        let event = events.recv_timeout(Duration::from_secs(30)).expect("device never stopped");
        assert_eq!(event, DeviceEvent::Stopped);
        assert!(!device.is_running());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

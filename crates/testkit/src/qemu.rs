//! Linux guests under QEMU (TCG) attached to a vhost-user socket, driven over their serial console.
//!
//! The guest image (kernel + initramfs) is built by `tests/guest/build-guest.sh`; its `/init`
//! configures `eth0` from the kernel command line, prints a ready line and then runs a
//! non-interactive busybox shell on `ttyS0` in raw mode (see the script for the protocol). QEMU's
//! serial port is its stdio: commands go into its stdin, everything the guest prints comes out of
//! its stdout and is kept (the serial log), as is QEMU's stderr, so that a failing test shows the
//! tail of both.
//!
//! ```no_run
//! use std::time::Duration;
//! use vmq_testkit::qemu::{Guest, GuestConfig, guest_image_or_skip};
//!
//! let Some(image) = guest_image_or_skip("my_test") else { return };
//! // ... start a vhost-user backend listening on /tmp/vm1.sock ...
//! let config = GuestConfig::new("vm1", "/tmp/vm1.sock", "52:54:00:00:00:01")
//!     .ipv4("10.0.0.1".parse().unwrap(), 24)
//!     .host_mtu(9000);
//! let mut guest = Guest::boot(&image, config).expect("guest boots");
//! assert_eq!(guest.ready_mtu(), Some(9000));
//! let out = guest.run("cat /sys/class/net/eth0/mtu", Duration::from_secs(10)).unwrap();
//! assert_eq!((out.status, out.output.trim()), (0, "9000"));
//! guest.spawn_background("iperf3 -s").unwrap();
//! // Dropping the guest kills QEMU (SIGKILL by PID) and reaps it.
//! ```

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The serial-console protocol version of the guest image this harness speaks
/// (`guest-format` in the image directory, written by `build-guest.sh`).
pub const GUEST_FORMAT: &str = "2";
/// First word of the line the guest prints when its shell is about to start.
pub const READY_MARKER: &str = "VMQ-GUEST-READY";
/// A TCG boot takes about 3 s alone; several guests on two busy cores take longer.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of [`Guest::run_ok`] and [`Guest::spawn_background`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The guest enforces a command's timeout itself (busybox `timeout`); the host waits this much
/// longer before it declares the console stuck.
const HOST_GRACE: Duration = Duration::from_secs(10);
/// Serial output and stderr kept per guest; older output is dropped beyond this.
const LOG_CAP: usize = 4 << 20;
/// Lines of each log shown when something fails.
pub const TAIL_LINES: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("guest option: {0}")]
    Config(String),
    #[error("cannot start qemu-system-x86_64: {0}")]
    Spawn(io::Error),
    #[error("guest {name}: QEMU exited ({status}) while waiting for {what}\n{tails}")]
    Exited { name: String, status: String, what: String, tails: String },
    #[error("guest {name}: no {what} within {secs:.1} s\n{tails}")]
    Timeout { name: String, what: String, secs: f64, tails: String },
    #[error("guest {name}: writing to the serial console: {source}")]
    Console { name: String, source: io::Error },
    #[error("guest {name}: the console is stuck since an earlier command never finished")]
    Stuck { name: String },
    #[error("guest {name}: {what}\n{tails}")]
    Unexpected { name: String, what: String, tails: String },
}

/// What a command printed (stdout and stderr together, CR removed, one trailing newline
/// trimmed) and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub output: String,
    pub status: i32,
}

/// A command left running in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Background {
    /// Guest PID of the shell that runs the command.
    pub pid: u32,
    /// Guest path of its output (stdout and stderr).
    pub log: String,
}

/// Why the QEMU tests cannot run here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// A tool or the image is missing: the test is skipped.
    Missing(String),
    /// The image exists but was built for another harness version: a setup error, not a skip.
    Stale(String),
}

/// A guest kernel and initramfs built by `tests/guest/build-guest.sh`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestImage {
    /// `$VMQ_GUEST_DIR`, else `target/guest` in the workspace.
    pub fn default_dir() -> PathBuf {
        match std::env::var_os("VMQ_GUEST_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"),
        }
    }

    /// Checks that QEMU and an image of the right format are there.
    pub fn find(dir: &Path) -> Result<GuestImage, Unavailable> {
        let qemu =
            Command::new("qemu-system-x86_64").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
        if !qemu.is_ok_and(|s| s.success()) {
            return Err(Unavailable::Missing("qemu-system-x86_64 is not installed".into()));
        }
        let image = GuestImage { kernel: dir.join("vmlinuz"), initrd: dir.join("initramfs.cpio.gz") };
        if !image.kernel.is_file() || !image.initrd.is_file() {
            return Err(Unavailable::Missing(format!(
                "no guest image in {} (bash tests/guest/build-guest.sh target/guest)",
                dir.display()
            )));
        }
        let format = std::fs::read_to_string(dir.join("guest-format")).unwrap_or_default();
        if format.trim() != GUEST_FORMAT {
            return Err(Unavailable::Stale(format!(
                "the guest image in {} has format {:?}, this harness needs {GUEST_FORMAT}: \
                 rebuild it with bash tests/guest/build-guest.sh {}",
                dir.display(),
                format.trim(),
                dir.display()
            )));
        }
        Ok(image)
    }
}

/// The guest image, or `None` after [`crate::skip`] when QEMU or the image is missing (a panic
/// when `VMQ_REQUIRE_ALL=1`). Panics on an image of the wrong format: that is a broken setup, not a
/// missing tool.
pub fn guest_image_or_skip(test: &str) -> Option<GuestImage> {
    match GuestImage::find(&GuestImage::default_dir()) {
        Ok(image) => Some(image),
        Err(Unavailable::Missing(reason)) => {
            crate::skip(test, &reason);
            None
        }
        Err(Unavailable::Stale(reason)) => panic!("{test}: {reason}"),
    }
}

/// How QEMU's vhost-user chardev meets the backend (vmq). docs/integration.md quotes the lines
/// [`vhost_user_chardev`] makes for each; the tests start QEMU with the same lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VhostChardev {
    /// QEMU connects to the backend's socket (vmq `vhost_mode = "server"`). If the backend goes
    /// away, the device stays down until QEMU restarts.
    #[default]
    Connect,
    /// QEMU connects, and after the connection drops tries again every `secs` seconds: vmq in
    /// server mode can restart under running guests.
    Reconnect { secs: u32 },
    /// QEMU listens on the socket and the backend connects (vmq `vhost_mode = "client"`). QEMU
    /// waits at startup until the backend has connected once (`wait=off` only keeps the
    /// chardev from blocking, vhost-user-net still waits for its first connection).
    Listen,
}

/// The `-chardev` value for a vhost-user socket: `socket,id=ID,path=PATH[,reconnect=N|,server=on,wait=off]`.
/// Commas in the path are doubled (QEMU's escaping).
pub fn vhost_user_chardev(id: &str, socket: &Path, mode: VhostChardev) -> String {
    let path = socket.to_string_lossy().replace(',', ",,");
    match mode {
        VhostChardev::Connect => format!("socket,id={id},path={path}"),
        VhostChardev::Reconnect { secs } => format!("socket,id={id},path={path},reconnect={secs}"),
        VhostChardev::Listen => format!("socket,id={id},path={path},server=on,wait=off"),
    }
}

/// The `-netdev` value of a vhost-user NIC on chardev `chardev`.
pub fn vhost_user_netdev(id: &str, chardev: &str) -> String {
    format!("vhost-user,id={id},chardev={chardev}")
}

/// How to start a guest. `new` gives the defaults; the other methods set one option each.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Shown in errors and logs.
    pub name: String,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// Who listens on `socket` (default: the backend, QEMU connects once).
    pub chardev: VhostChardev,
    /// `aa:bb:cc:dd:ee:ff`
    pub mac: String,
    /// Address of the guest's eth0; without one eth0 stays down.
    pub ipv4: Option<(Ipv4Addr, u8)>,
    /// `host_mtu` of the virtio-net device: the guest sees VIRTIO_NET_F_MTU with this value and
    /// QEMU sends VHOST_USER_NET_SET_MTU to the backend (if it offers the NET_MTU protocol feature).
    pub host_mtu: Option<u16>,
    /// Guest RAM in KiB (QEMU's `-m ...K`): whole MiB unless a test needs otherwise (see
    /// [`GuestConfig::memory_kib`]).
    pub memory_kib: u32,
    /// Appended to the kernel command line (e.g. `vmq.mtu=9000` sets eth0's MTU at boot).
    pub kernel_arg: Option<String>,
    pub boot_timeout: Duration,
    /// A QMP socket QEMU listens on (`-qmp unix:PATH,server=on,wait=off`) and the id its NIC
    /// gets there (`-device virtio-net-pci,id=...`), for a switch that follows the guest's
    /// receive filter.
    pub qmp: Option<(PathBuf, String)>,
    /// Start paused, waiting for a live migration from this URI (`-incoming`, e.g.
    /// `unix:/path`): the destination of a migration. The guest is then not booted here; see
    /// [`Guest::migrated_in`].
    pub incoming: Option<String>,
    /// Extra `key=value` properties of the virtio-net device (e.g. `guest_announce=off`).
    pub net_device_options: Vec<String>,
    /// Virtual CPUs (`-smp`).
    pub cpus: u8,
    /// Queue pairs of the vhost-user NIC: more than one sets `queues=N` on the netdev and
    /// `mq=on` on the device (the backend must offer that many).
    pub queue_pairs: u16,
}

impl GuestConfig {
    pub fn new(name: impl Into<String>, socket: impl Into<PathBuf>, mac: impl Into<String>) -> GuestConfig {
        GuestConfig {
            name: name.into(),
            socket: socket.into(),
            chardev: VhostChardev::default(),
            mac: mac.into(),
            ipv4: None,
            host_mtu: None,
            memory_kib: 256 * 1024,
            kernel_arg: None,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            qmp: None,
            incoming: None,
            net_device_options: Vec::new(),
            cpus: 1,
            queue_pairs: 1,
        }
    }

    /// QEMU serves QMP on `socket` (it listens, without waiting for a client); the NIC's id
    /// there is `nic_id` (it must differ from the netdev's, `net0`).
    pub fn qmp(mut self, socket: impl Into<PathBuf>, nic_id: impl Into<String>) -> GuestConfig {
        self.qmp = Some((socket.into(), nic_id.into()));
        self
    }

    pub fn ipv4(mut self, addr: Ipv4Addr, prefix: u8) -> GuestConfig {
        self.ipv4 = Some((addr, prefix));
        self
    }

    pub fn chardev(mut self, chardev: VhostChardev) -> GuestConfig {
        self.chardev = chardev;
        self
    }

    pub fn host_mtu(mut self, mtu: u16) -> GuestConfig {
        self.host_mtu = Some(mtu);
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> GuestConfig {
        self.memory_kib = mib.saturating_mul(1024);
        self
    }

    /// Guest RAM to the KiB, for sizes that are not whole MiB: QEMU 7.2 under TCG loses dirty
    /// pages the guest CPU writes during a live migration when RAM is a multiple of 256 KiB
    /// (its word-at-a-time dirty bitmap sync then skips TCG's TLB reset; fixed in QEMU 9.0,
    /// "physmem: Fix migration dirty bitmap coherency with TCG memory access"). The migration
    /// test sizes its guests off that multiple.
    pub fn memory_kib(mut self, kib: u32) -> GuestConfig {
        self.memory_kib = kib;
        self
    }

    pub fn kernel_arg(mut self, arg: impl Into<String>) -> GuestConfig {
        self.kernel_arg = Some(arg.into());
        self
    }

    pub fn boot_timeout(mut self, timeout: Duration) -> GuestConfig {
        self.boot_timeout = timeout;
        self
    }

    pub fn net_device_option(mut self, option: impl Into<String>) -> GuestConfig {
        self.net_device_options.push(option.into());
        self
    }

    pub fn cpus(mut self, cpus: u8) -> GuestConfig {
        self.cpus = cpus;
        self
    }

    /// A multiqueue NIC with `pairs` queue pairs (see [`GuestConfig::queue_pairs`]).
    pub fn queue_pairs(mut self, pairs: u16) -> GuestConfig {
        self.queue_pairs = pairs;
        self
    }

    pub fn incoming(mut self, uri: impl Into<String>) -> GuestConfig {
        self.incoming = Some(uri.into());
        self
    }

    fn validate(&self) -> Result<(), GuestError> {
        let mac_ok = self.mac.len() == 17
            && self.mac.split(':').count() == 6
            && self.mac.split(':').all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
        if !mac_ok {
            return Err(GuestError::Config(format!("MAC {:?} is not aa:bb:cc:dd:ee:ff", self.mac)));
        }
        if let Some((_, prefix)) = self.ipv4
            && prefix > 32
        {
            return Err(GuestError::Config(format!("IPv4 prefix /{prefix} is longer than 32")));
        }
        if self.host_mtu.is_some_and(|m| m < 68) {
            return Err(GuestError::Config("host_mtu below 68".into()));
        }
        if !(1..=16).contains(&self.cpus) || !(1..=16).contains(&self.queue_pairs) {
            return Err(GuestError::Config(format!(
                "{} CPUs / {} queue pairs outside 1..=16",
                self.cpus, self.queue_pairs
            )));
        }
        if !(64 * 1024..=16384 * 1024).contains(&self.memory_kib) || !self.memory_kib.is_multiple_of(4) {
            return Err(GuestError::Config(format!(
                "{} KiB of guest memory is outside 64 MiB..=16 GiB or not whole 4 KiB pages",
                self.memory_kib
            )));
        }
        if let Some(bad) = self.net_device_options.iter().find(|o| !o.contains('=') || o.contains([',', ' ', '\n'])) {
            return Err(GuestError::Config(format!("virtio-net device option {bad:?} is not one key=value")));
        }
        if let Some((socket, id)) = &self.qmp {
            let id_ok =
                !id.is_empty() && id != "net0" && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !id_ok || socket.to_string_lossy().contains(',') {
                return Err(GuestError::Config(format!("QMP socket {} / NIC id {id:?} unusable", socket.display())));
            }
        }
        if self.kernel_arg.as_deref().is_some_and(|a| a.contains(['\n', '"'])) {
            return Err(GuestError::Config("kernel argument with a newline or a quote".into()));
        }
        Ok(())
    }

    fn qemu_args(&self, image: &GuestImage) -> Vec<OsString> {
        let mut append = String::from("console=ttyS0 panic=-1");
        if let Some((addr, prefix)) = self.ipv4 {
            let _ = write!(append, " vmq.ip={addr}/{prefix}");
        }
        if let Some(arg) = &self.kernel_arg {
            let _ = write!(append, " {arg}");
        }
        // On a busy host the TCG guest's early timer check can miss its ticks and the kernel
        // panics ("IO-APIC + timer doesn't work"): seen in a loop of the migration test.
        append.push_str(" no_timer_check");
        // vectors=0: under TCG, QEMU 7.2 crashes in vhost_net_start with MSI-X on a vhost-user device.
        let mut device = format!("virtio-net-pci,netdev=net0,mac={},vectors=0", self.mac);
        if let Some(mtu) = self.host_mtu {
            let _ = write!(device, ",host_mtu={mtu}");
        }
        if self.queue_pairs > 1 {
            device.push_str(",mq=on");
        }
        for option in &self.net_device_options {
            let _ = write!(device, ",{option}");
        }
        let mut netdev = vhost_user_netdev("net0", "vhu0");
        if self.queue_pairs > 1 {
            let _ = write!(netdev, ",queues={}", self.queue_pairs);
        }
        if let Some((_, id)) = &self.qmp {
            let _ = write!(device, ",id={id}");
        }
        let kib = self.memory_kib;
        let args: Vec<String> = vec![
            "-name".into(),
            format!("vmq-test-{}", self.name.replace(',', "_")),
            "-accel".into(),
            "tcg".into(),
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            format!("{kib}K"),
            // vhost-user needs guest memory the backend can map: a shared memfd.
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={kib}K,share=on"),
            "-machine".into(),
            "q35,memory-backend=mem".into(),
            "-display".into(),
            "none".into(),
            "-nodefaults".into(),
            "-no-reboot".into(),
            "-monitor".into(),
            "none".into(),
            "-chardev".into(),
            vhost_user_chardev("vhu0", &self.socket, self.chardev),
            "-netdev".into(),
            netdev,
            "-device".into(),
            device,
            // The serial console is QEMU's stdin/stdout.
            "-chardev".into(),
            "stdio,id=ser0,signal=off".into(),
            "-serial".into(),
            "chardev:ser0".into(),
            "-append".into(),
            append,
        ];
        let mut args: Vec<OsString> = args.into_iter().map(OsString::from).collect();
        if let Some((socket, _)) = &self.qmp {
            let mut qmp = OsString::from("unix:");
            qmp.push(socket);
            qmp.push(",server=on,wait=off");
            args.extend(["-qmp".into(), qmp]);
        }
        if let Some(uri) = &self.incoming {
            args.extend(["-incoming".into(), uri.into()]);
        }
        args.extend(["-kernel".into(), image.kernel.clone().into_os_string()]);
        args.extend(["-initrd".into(), image.initrd.clone().into_os_string()]);
        args
    }
}

/// Output of one of QEMU's pipes, collected by a reader thread.
#[derive(Default)]
struct Stream {
    state: Mutex<StreamState>,
    grew: Condvar,
}

#[derive(Default)]
struct StreamState {
    buf: Vec<u8>,
    /// Stream offset of `buf[0]` (older output was dropped beyond LOG_CAP).
    base: usize,
    eof: bool,
}

impl StreamState {
    /// The bytes from stream offset `from` on (or from the oldest kept one), and the stream
    /// offset of the first of them.
    fn since(&self, from: usize) -> (&[u8], usize) {
        let index = (from.max(self.base) - self.base).min(self.buf.len());
        (&self.buf[index..], self.base + index)
    }
}

impl Stream {
    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn_reader(self: &Arc<Self>, mut pipe: impl Read + Send + 'static) -> JoinHandle<()> {
        let stream = self.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                let n = match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                let mut state = stream.lock();
                if n == 0 {
                    state.eof = true;
                    stream.grew.notify_all();
                    return;
                }
                state.buf.extend_from_slice(&chunk[..n]);
                if state.buf.len() > LOG_CAP {
                    let drop = state.buf.len() - LOG_CAP / 2;
                    state.buf.drain(..drop);
                    state.base += drop;
                }
                stream.grew.notify_all();
            }
        })
    }

    /// Waits until `find` matches the output from stream offset `from` on. `find` gets the
    /// bytes and their stream offset.
    fn wait_for<T>(
        &self,
        from: usize,
        deadline: Instant,
        mut find: impl FnMut(&[u8], usize) -> Option<T>,
    ) -> Result<T, WaitEnd> {
        let mut state = self.lock();
        loop {
            let (bytes, offset) = state.since(from);
            if let Some(found) = find(bytes, offset) {
                return Ok(found);
            }
            if state.eof {
                return Err(WaitEnd::Eof);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitEnd::Timeout);
            }
            state = self.grew.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock().buf).replace('\r', "")
    }

    fn tail(&self, lines: usize) -> String {
        let text = self.text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

enum WaitEnd {
    Timeout,
    Eof,
}

fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Wraps `s` in single quotes for the guest's shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A running QEMU with a Linux guest. Dropping it kills QEMU (SIGKILL to its PID) and reaps it.
pub struct Guest {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    serial: Arc<Stream>,
    stderr: Arc<Stream>,
    readers: Vec<JoinHandle<()>>,
    /// Serial output before this offset belongs to earlier commands.
    cursor: usize,
    next_command: u64,
    ready_line: Option<String>,
    exit_status: Option<ExitStatus>,
    stuck: bool,
    /// The log tails were already part of an error; don't print them again on a panic.
    tails_reported: bool,
}

impl Guest {
    /// Starts QEMU and waits for the guest's ready line (at most `config.boot_timeout`).
    pub fn boot(image: &GuestImage, config: GuestConfig) -> Result<Guest, GuestError> {
        let timeout = config.boot_timeout;
        let mut guest = Guest::spawn(image, config)?;
        guest.wait_ready(timeout)?;
        Ok(guest)
    }

    /// Takes over the console of a guest that arrived here by live migration from `source`
    /// (this QEMU was started with `-incoming`): commands run on this side from now on.
    pub fn migrated_in(&mut self, source: &Guest) {
        self.ready_line = source.ready_line.clone();
        // Fresh marker numbers: nothing of the source's console output is on this one.
        self.next_command = source.next_command + 1000;
    }

    /// Starts QEMU without waiting for the guest (for tests that expect QEMU to fail).
    pub fn spawn(image: &GuestImage, config: GuestConfig) -> Result<Guest, GuestError> {
        config.validate()?;
        let mut child = Command::new("qemu-system-x86_64")
            .args(config.qemu_args(image))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(GuestError::Spawn)?;
        let serial = Arc::new(Stream::default());
        let stderr = Arc::new(Stream::default());
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(serial.spawn_reader(out));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(stderr.spawn_reader(err));
        }
        Ok(Guest {
            name: config.name,
            stdin: child.stdin.take(),
            child,
            serial,
            stderr,
            readers,
            cursor: 0,
            next_command: 1,
            ready_line: None,
            exit_status: None,
            stuck: false,
            tails_reported: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Host PID of QEMU.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the ready line; returns it (`VMQ-GUEST-READY format=2 mtu=1500`).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<String, GuestError> {
        if let Some(line) = &self.ready_line {
            return Ok(line.clone());
        }
        let deadline = Instant::now() + timeout;
        let marker = READY_MARKER.as_bytes();
        let found = self.serial.wait_for(self.cursor, deadline, |bytes, offset| {
            let at = find_bytes(bytes, marker)?;
            let len = bytes[at..].iter().position(|&b| b == b'\n')?;
            Some((String::from_utf8_lossy(&bytes[at..at + len]).trim().to_string(), offset + at + len + 1))
        });
        let (line, end) = found.map_err(|end| self.wait_error(end, "the guest's ready line", timeout))?;
        self.cursor = end;
        self.ready_line = Some(line.clone());
        Ok(line)
    }

    /// eth0's MTU as the guest came up (from its ready line), before any test changed it.
    pub fn ready_mtu(&self) -> Option<u32> {
        let line = self.ready_line.as_deref()?;
        line.split_whitespace().find_map(|w| w.strip_prefix("mtu="))?.parse().ok()
    }

    /// Runs `command` with `sh -c` in the guest, stdin from /dev/null, and returns its output
    /// and exit status. The guest kills the command after `timeout`; then this returns
    /// `GuestError::Timeout`.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<CommandOutput, GuestError> {
        if self.stuck {
            return Err(GuestError::Stuck { name: self.name.clone() });
        }
        if self.ready_line.is_none() {
            self.wait_ready(DEFAULT_BOOT_TIMEOUT)?;
        }
        let id = self.next_command;
        self.next_command += 1;
        // The empty quotes keep the markers in the command text from matching its output, should
        // anything ever echo the input.
        let secs = timeout.as_secs().max(1) + u64::from(timeout.subsec_nanos() > 0);
        let line = format!(
            "echo VQB\"\"{id}; timeout -s KILL {secs} sh -c {} </dev/null 2>&1; echo VQE\"\"{id}:$?\n",
            shell_quote(command)
        );
        let written = self.stdin.as_mut().map(|s| s.write_all(line.as_bytes()).and_then(|()| s.flush()));
        if let Some(Err(source)) = written {
            return Err(GuestError::Console { name: self.name.clone(), source });
        }
        let begin = format!("VQB{id}\n");
        let end = format!("VQE{id}:");
        let started = Instant::now();
        let deadline = started + timeout + HOST_GRACE;
        let found = self.serial.wait_for(self.cursor, deadline, |bytes, offset| {
            let b = find_bytes(bytes, begin.as_bytes())?;
            let out_start = b + begin.len();
            let e = find_bytes(&bytes[out_start..], end.as_bytes())? + out_start;
            let status_start = e + end.len();
            let nl = bytes[status_start..].iter().position(|&c| c == b'\n')? + status_start;
            let status = String::from_utf8_lossy(&bytes[status_start..nl]).trim().parse::<i32>().unwrap_or(-1);
            let output = String::from_utf8_lossy(&bytes[out_start..e]).replace('\r', "");
            Some((output, status, offset + nl + 1))
        });
        let what = format!("end of command {command:?}");
        let (mut output, status, end_offset) = found.map_err(|end| {
            if matches!(end, WaitEnd::Timeout) {
                self.stuck = true;
            }
            self.wait_error(end, &what, timeout + HOST_GRACE)
        })?;
        self.cursor = end_offset;
        if started.elapsed() >= timeout && status == 128 + 9 {
            return Err(GuestError::Timeout {
                name: self.name.clone(),
                what: format!("end of command {command:?} (the guest killed it); output: {output}"),
                secs: timeout.as_secs_f64(),
                tails: self.tails_once(),
            });
        }
        if output.ends_with('\n') {
            output.pop();
        }
        Ok(CommandOutput { output, status })
    }

    /// Runs `command` (timeout [`DEFAULT_COMMAND_TIMEOUT`]) and returns its output; panics with
    /// the output, the exit status and the log tails unless it exits with 0.
    #[track_caller]
    pub fn run_ok(&mut self, command: &str) -> String {
        match self.run(command, DEFAULT_COMMAND_TIMEOUT) {
            Ok(CommandOutput { output, status: 0 }) => output,
            Ok(CommandOutput { output, status }) => {
                let tails = self.tails_once();
                panic!("guest {}: {command:?} exited with {status}:\n{output}\n{tails}", self.name)
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// Starts `command` in the background (`sh -c`, output to a log file in the guest) and
    /// returns at once. Use a daemon's own flag (`iperf3 -s -D`) or `kill <pid>` to stop it.
    pub fn spawn_background(&mut self, command: &str) -> Result<Background, GuestError> {
        let log = format!("/tmp/bg-{}.log", self.next_command);
        let line = format!("sh -c {} </dev/null >{log} 2>&1 & echo $!", shell_quote(command));
        let out = self.run(&line, DEFAULT_COMMAND_TIMEOUT)?;
        let pid = match out.output.trim().parse() {
            Ok(pid) if out.status == 0 => pid,
            _ => {
                return Err(GuestError::Unexpected {
                    name: self.name.clone(),
                    what: format!("no PID for background command {command:?}: {out:?}"),
                    tails: self.tails_once(),
                });
            }
        };
        Ok(Background { pid, log })
    }

    /// Waits until QEMU's stderr contains `needle`.
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> Result<(), GuestError> {
        let deadline = Instant::now() + timeout;
        let found = self.stderr.wait_for(0, deadline, |bytes, _| find_bytes(bytes, needle.as_bytes()));
        match found {
            Ok(_) => Ok(()),
            // EOF on stderr: QEMU exited without printing it.
            Err(end) => Err(self.wait_error(end, &format!("{needle:?} on QEMU's stderr"), timeout)),
        }
    }

    /// Waits for QEMU to exit by itself, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status {
                return Some(status);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit_status = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Polling a child's exit with a short period; there is no portable wait-with-timeout.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9 QEMU and reap it (idempotent). Returns how it ended.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.exit_status {
            return Ok(status);
        }
        // Our own child, by PID: it cannot have been reaped (and its PID reused) before wait().
        let _ = self.child.kill();
        let status = self.child.wait()?;
        self.exit_status = Some(status);
        Ok(status)
    }

    /// Everything the guest printed on its serial console (kept up to a few MiB).
    pub fn serial_log(&self) -> String {
        self.serial.text()
    }

    /// QEMU's stderr.
    pub fn stderr_log(&self) -> String {
        self.stderr.text()
    }

    /// The last lines of the serial log and of QEMU's stderr, for failure messages.
    pub fn log_tails(&self) -> String {
        format!(
            "--- guest {name}: serial console (last {TAIL_LINES} lines) ---\n{}\n\
             --- guest {name}: QEMU stderr (last {TAIL_LINES} lines) ---\n{}\n--- end of guest {name} ---",
            self.serial.tail(TAIL_LINES),
            self.stderr.tail(TAIL_LINES),
            name = self.name,
        )
    }

    fn tails_once(&mut self) -> String {
        self.tails_reported = true;
        self.log_tails()
    }

    fn wait_error(&mut self, end: WaitEnd, what: &str, timeout: Duration) -> GuestError {
        match end {
            WaitEnd::Timeout => GuestError::Timeout {
                name: self.name.clone(),
                what: what.to_string(),
                secs: timeout.as_secs_f64(),
                tails: self.tails_once(),
            },
            WaitEnd::Eof => {
                // The pipe closed: QEMU is exiting; give it a moment to be reaped.
                let status = self.wait_exit(Duration::from_secs(5)).map_or("still running".into(), |s| s.to_string());
                GuestError::Exited { name: self.name.clone(), status, what: what.to_string(), tails: self.tails_once() }
            }
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let reaped = match self.kill() {
            Ok(_) => true,
            Err(e) => {
                eprintln!("guest {}: cannot reap QEMU (pid {}): {e}", self.name, self.child.id());
                false
            }
        };
        self.stdin.take();
        // The readers end when QEMU's pipes close, i.e. once it is gone.
        for reader in self.readers.drain(..) {
            if reaped {
                let _ = reader.join();
            }
        }
        if std::thread::panicking() && !self.tails_reported {
            eprintln!("{}", self.log_tails());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("echo 'a b'"), r"'echo '\''a b'\'''");
    }

    #[test]
    fn config_is_validated() {
        let ok = GuestConfig::new("g", "/tmp/s", "52:54:00:00:00:01");
        assert!(ok.validate().is_ok());
        assert!(GuestConfig::new("g", "/tmp/s", "52:54:00:00:00").validate().is_err());
        assert!(GuestConfig::new("g", "/tmp/s", "52:54:00:00:00:0g").validate().is_err());
        assert!(ok.clone().ipv4(Ipv4Addr::LOCALHOST, 33).validate().is_err());
        assert!(ok.clone().host_mtu(10).validate().is_err());
        assert!(ok.clone().memory_mib(1).validate().is_err());
        assert!(ok.clone().memory_kib(262_134).validate().is_err(), "not whole pages");
        assert!(ok.clone().memory_kib(262_136).validate().is_ok());
        assert!(ok.kernel_arg("a\nb").validate().is_err());
    }

    #[test]
    fn qemu_command_line_carries_the_options() {
        let image = GuestImage { kernel: "/k".into(), initrd: "/i".into() };
        let config = GuestConfig::new("g", "/tmp/a,b.sock", "52:54:00:00:00:01")
            .ipv4(Ipv4Addr::new(10, 0, 0, 1), 24)
            .host_mtu(9000)
            .memory_mib(128)
            .kernel_arg("vmq.mtu=9000");
        let args: Vec<String> = config.qemu_args(&image).iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = args.join(" ");
        assert!(joined.contains("socket,id=vhu0,path=/tmp/a,,b.sock"), "{joined}");
        assert!(joined.contains("mac=52:54:00:00:00:01,vectors=0,host_mtu=9000"), "{joined}");
        assert!(joined.contains("memory-backend-memfd,id=mem,size=131072K,share=on"), "{joined}");
        assert!(joined.contains("-m 131072K"), "{joined}");
        assert!(joined.contains("console=ttyS0 panic=-1 vmq.ip=10.0.0.1/24 vmq.mtu=9000"), "{joined}");
        assert!(joined.contains("-netdev vhost-user,id=net0,chardev=vhu0"), "{joined}");
        assert!(joined.contains("-smp 1 ") && !joined.contains("mq=on"), "{joined}");
        let mq = GuestConfig::new("g", "/tmp/s", "52:54:00:00:00:01").cpus(2).queue_pairs(2);
        let joined =
            mq.qemu_args(&image).iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert!(joined.contains("-smp 2 "), "{joined}");
        assert!(joined.contains("-netdev vhost-user,id=net0,chardev=vhu0,queues=2"), "{joined}");
        assert!(joined.contains("vectors=0,mq=on"), "{joined}");
        assert!(mq.clone().queue_pairs(17).validate().is_err() && mq.cpus(0).validate().is_err());
    }

    #[test]
    fn chardev_lines_for_each_mode() {
        let socket = Path::new("/run/vmq/vm1.sock");
        assert_eq!(vhost_user_chardev("c0", socket, VhostChardev::Connect), "socket,id=c0,path=/run/vmq/vm1.sock");
        assert_eq!(
            vhost_user_chardev("c0", socket, VhostChardev::Reconnect { secs: 1 }),
            "socket,id=c0,path=/run/vmq/vm1.sock,reconnect=1"
        );
        assert_eq!(
            vhost_user_chardev("c0", Path::new("/tmp/a,b"), VhostChardev::Listen),
            "socket,id=c0,path=/tmp/a,,b,server=on,wait=off"
        );
    }

    #[test]
    fn stream_keeps_offsets_when_trimmed() {
        let mut state = StreamState { buf: b"abcdef".to_vec(), base: 10, eof: false };
        assert_eq!(state.since(0), (&b"abcdef"[..], 10));
        assert_eq!(state.since(12), (&b"cdef"[..], 12));
        assert_eq!(state.since(99), (&b""[..], 16));
        state.buf.drain(..2);
        state.base += 2;
        assert_eq!(state.since(0), (&b"cdef"[..], 12));
    }
}

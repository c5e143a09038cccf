//! Traffic between the demo's hosts, from the Linux stacks in their namespaces: reachability
//! (`ping`, or a UDP echo when ping is not installed) and TCP throughput (iperf3, or a built-in
//! sender and receiver whose sockets are opened inside the namespaces). Every wait is bounded.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmq_sys::netns;
use vmq_sys::socket::set_dont_fragment;

use super::lab::{Host, have, run};

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("{0}")]
    Lab(#[from] super::lab::LabError),
    #[error("network namespace: {0}")]
    Netns(#[from] netns::NetnsError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{0}")]
    Failed(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TrafficError {
    let what = what.into();
    move |source| TrafficError::Io { what, source }
}

const TCP_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7;

/// Which tools carry the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tools {
    pub ping: bool,
    pub iperf3: bool,
}

impl Tools {
    pub fn detect() -> Tools {
        Tools { ping: have("ping"), iperf3: have("iperf3") }
    }
}

/// Kills and reaps a helper process on every exit path.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Can `from` reach `to` (one echo, `size` bytes of payload, don't fragment)?
pub fn reachable(tools: Tools, from: &Host, to: &Host, size: usize) -> Result<bool, TrafficError> {
    if tools.ping {
        let size = size.to_string();
        let dst = to.ip.to_string();
        let args = [
            "netns",
            "exec",
            &from.netns,
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "1",
            "-q",
            "-M",
            "do",
            "-s",
            &size,
            &dst,
        ];
        return Ok(run("ip", &args).is_ok());
    }
    udp_echo(from, to, size)
}

/// A UDP echo in place of ping: the echo socket lives in `to`'s namespace, the probe in `from`'s.
/// `size` bytes of UDP payload make an IPv4 packet as large as ping's ICMP one with `-s size`
/// (both headers are 8 bytes), and both sockets set don't-fragment like `ping -M do`: a packet
/// above the path MTU is refused at send, so it cannot pass as fragments.
fn udp_echo(from: &Host, to: &Host, size: usize) -> Result<bool, TrafficError> {
    let server_addr = SocketAddr::from((to.ip, ECHO_PORT));
    let server = netns::run_in(&to.netns, || UdpSocket::bind(server_addr))?.map_err(io("echo socket"))?;
    server.set_read_timeout(Some(Duration::from_millis(200))).map_err(io("echo socket"))?;
    set_dont_fragment(&server).map_err(io("echo socket: IP_MTU_DISCOVER"))?;
    let client = netns::run_in(&from.netns, || UdpSocket::bind((from.ip, 0)))?.map_err(io("probe socket"))?;
    client.set_read_timeout(Some(Duration::from_millis(200))).map_err(io("probe socket"))?;
    set_dont_fragment(&client).map_err(io("probe socket: IP_MTU_DISCOVER"))?;
    let payload = vec![0x5a; size];
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = vec![0u8; size + 1];
    while Instant::now() < deadline {
        // The first probe may be spent on ARP. EMSGSIZE (above the MTU, DF set) is "unreachable".
        if let Err(e) = client.send_to(&payload, server_addr)
            && e.raw_os_error() == Some(nix::errno::Errno::EMSGSIZE as i32)
        {
            return Ok(false);
        }
        if let Ok((n, peer)) = server.recv_from(&mut buf) {
            let _ = server.send_to(&buf[..n], peer);
        }
        if let Ok((n, _)) = client.recv_from(&mut buf)
            && buf[..n] == payload[..]
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// TCP from `from` to `to` for `seconds`: the receiver's goodput in Gbit/s.
pub fn tcp_gbps(tools: Tools, from: &Host, to: &Host, seconds: f64) -> Result<f64, TrafficError> {
    if tools.iperf3 { iperf3(from, to, seconds) } else { builtin_tcp(from, to, seconds) }
}

fn iperf3(from: &Host, to: &Host, seconds: f64) -> Result<f64, TrafficError> {
    let bind = to.ip.to_string();
    let port = TCP_PORT.to_string();
    let server = Command::new("ip")
        .args(["netns", "exec", &to.netns, "iperf3", "-s", "-1", "-B", &bind, "-p", &port])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("start iperf3 server"))?;
    let _server = Reaped(server);
    wait_listening(&to.netns, to.ip, TCP_PORT, Duration::from_secs(5))?;
    // iperf3 reads -t as whole seconds (0 would mean "forever").
    let seconds = seconds.round().max(1.0);
    let secs = format!("{seconds:.0}");
    let client = Command::new("ip")
        .args(["netns", "exec", &from.netns, "iperf3", "-c", &bind, "-p", &port, "-t", &secs, "-J"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("start iperf3 client"))?;
    let mut client = Reaped(client);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds + 15.0);
    loop {
        match client.0.try_wait().map_err(io("iperf3 client"))? {
            Some(_) => break,
            None if Instant::now() > deadline => return Err(TrafficError::Failed("iperf3 did not finish".into())),
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = client.0.stdout.take() {
        stdout.read_to_string(&mut out).map_err(io("iperf3 output"))?;
    }
    let report: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| TrafficError::Failed(format!("iperf3 output is not JSON: {e}")))?;
    if let Some(err) = report.get("error").and_then(|e| e.as_str()) {
        return Err(TrafficError::Failed(format!("iperf3: {err}")));
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| TrafficError::Failed("iperf3 reported no received rate".into()))
}

/// Polls `/proc/thread-self/net/tcp` inside `netns` until something listens on ip:port.
fn wait_listening(netns_name: &str, ip: Ipv4Addr, port: u16, timeout: Duration) -> Result<(), TrafficError> {
    // /proc/net/tcp writes the local address as little-endian hex "0100C80A:1451", state 0A.
    let local = format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), port);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let table = netns::run_in(netns_name, || std::fs::read_to_string("/proc/thread-self/net/tcp"))?
            .map_err(io("read /proc/net/tcp"))?;
        let listening = table.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == local && f[3] == "0A"
        });
        if listening {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(TrafficError::Failed(format!("nothing listens on {ip}:{port} in {netns_name}")))
}

/// A sender and a receiver thread whose sockets were opened in the hosts' namespaces.
fn builtin_tcp(from: &Host, to: &Host, seconds: f64) -> Result<f64, TrafficError> {
    let addr = SocketAddr::from((to.ip, TCP_PORT));
    let listener = netns::run_in(&to.netns, || TcpListener::bind(addr))?.map_err(io("TCP listener"))?;
    listener.set_nonblocking(true).map_err(io("TCP listener"))?;
    let receiver = std::thread::spawn(move || -> Result<f64, TrafficError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(TrafficError::Io { what: "accept".into(), source: e }),
            }
        };
        stream.set_nonblocking(false).map_err(io("receiver"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(io("receiver"))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        let mut start = None;
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    start.get_or_insert_with(Instant::now);
                    total += n as u64;
                }
                Err(e) => return Err(TrafficError::Io { what: "receive".into(), source: e }),
            }
        }
        let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
        Ok(if secs > 0.0 { total as f64 * 8.0 / secs / 1e9 } else { 0.0 })
    });
    let connect = netns::run_in(&from.netns, || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
    let mut stream = connect.map_err(io("connect"))?;
    stream.set_write_timeout(Some(Duration::from_secs(5))).map_err(io("sender"))?;
    let chunk = vec![0xa5u8; 256 * 1024];
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < until {
        stream.write_all(&chunk).map_err(io("send"))?;
    }
    drop(stream);
    receiver.join().map_err(|_| TrafficError::Failed("receiver thread panicked".into()))?
}

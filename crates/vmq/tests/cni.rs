//! `vmq-cni` end to end (root only): the plugin invoked as a container runtime invokes it (the
//! `CNI_*` environment, the network configuration on stdin, the result or error on stdout)
//! against a real `vmq run`, with two "pods" (`unshare --net sleep` processes, reached by
//! `/proc/PID/ns/net`) and Debian's `host-local` IPAM plugin keeping its leases in a temporary
//! directory. Everything is removed on drop, also when the test fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const CNI: &str = env!("CARGO_BIN_EXE_vmq-cni");
/// Debian's containernetworking-plugins.
const CNI_PATH: &str = "/usr/lib/cni";

/// A "pod": a `sleep` in a network namespace of its own, known by `/proc/PID/ns/net` only.
/// Killed by PID on drop, which ends the namespace.
struct Pod {
    child: std::process::Child,
}

impl Pod {
    fn start() -> Pod {
        let child =
            Command::new("unshare").args(["--net", "sleep", "300"]).stdin(Stdio::null()).spawn().expect("unshare");
        let pod = Pod { child };
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        let entered = wait_until(WAIT, || std::fs::read_link(pod.netns()).is_ok_and(|l| l != own));
        assert!(entered, "unshare never entered a new namespace");
        pod
    }

    fn netns(&self) -> String {
        format!("/proc/{}/ns/net", self.child.id())
    }

    /// Runs a command in the pod's namespace (nsenter).
    fn exec(&self, args: &[&str]) -> std::process::Output {
        let net = format!("--net={}", self.netns());
        let mut all = vec!["nsenter", &net];
        all.extend_from_slice(args);
        run_bounded(&all, Duration::from_secs(15))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one plugin call printed and how it exited.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} {}", self.stdout, self.stderr))
    }

    /// Exit 0; the JSON printed, if any.
    fn ok(&self, what: &str) -> Option<Value> {
        assert_eq!(self.code, Some(0), "{what}: {} {}", self.stdout, self.stderr);
        (!self.stdout.trim().is_empty()).then(|| self.json())
    }

    /// A spec error: non-zero exit, `{"cniVersion","code","msg"}` on stdout with `code`.
    fn error(&self, what: &str, code: u64) -> String {
        assert_ne!(self.code, Some(0), "{what} succeeded: {}", self.stdout);
        let v = self.json();
        assert_eq!(v["code"], code, "{what}: {v}");
        assert_eq!(v["cniVersion"], "1.0.0", "{what}: {v}");
        format!("{} {}", v["msg"].as_str().expect("msg"), v["details"].as_str().unwrap_or(""))
    }
}

/// Invokes the plugin as a runtime does: a clean environment with the CNI variables, the
/// configuration on stdin.
fn cni(command: &str, container: &str, netns: Option<&str>, config: &Value) -> Outcome {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "2", "60", CNI])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web")
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        cmd.env("CNI_NETNS", ns);
    }
    let mut child = cmd.spawn().expect("run vmq-cni");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        // VERSION may exit without reading.
        let _ = stdin.write_all(config.to_string().as_bytes());
    }
    let out = child.wait_with_output().expect("wait vmq-cni");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The network configuration, as a runtime reads it from /etc/cni/net.d, with `prevResult`
/// for CHECK.
fn config(name: &str, socket: &Path, data_dir: &Path, prev: Option<&Value>) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": name,
        "type": "vmq-cni",
        "socket": socket,
        "mtu": 1500,
        "ipam": {
            "type": "host-local",
            "dataDir": data_dir,
            "ranges": [[{ "subnet": "10.251.0.0/24" }]],
            "routes": [{ "dst": "0.0.0.0/0" }]
        },
        "dns": { "nameservers": ["10.251.0.53"] }
    });
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c
}

/// The IPv4 address (without prefix) of a result's first IP configuration.
fn address(result: &Value) -> String {
    let cidr = result["ips"][0]["address"].as_str().expect("an address");
    cidr.split('/').next().unwrap().to_string()
}

/// Leases host-local holds: one file per address in its data directory.
fn leases(data_dir: &Path, network: &str) -> Vec<String> {
    let dir: PathBuf = data_dir.join(network);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.retain(|n| n.parse::<std::net::IpAddr>().is_ok());
    names.sort();
    names
}

fn has_port(vmq: &Vmq, name: &str) -> bool {
    vmq.show().ports.iter().any(|p| p.name == name)
}

#[test]
fn cni_plugin_attaches_pods_as_a_runtime_calls_it() {
    if !vmq_testkit::skip::root_with_tools_or_skip(
        &vmq_testkit::skip::current_test(),
        &["ip", "ping", "timeout", "nsenter", "unshare", "/usr/lib/cni/host-local"],
    ) {
        return;
    }
    let p = unique("cni");
    let mut vmq = Vmq::start(&p, &switch_section("vmq"));
    let data = TempDir::new(&format!("{p}-ipam"));
    let network = format!("{p}-net");
    let socket = vmq.socket().to_path_buf();
    let conf = |prev: Option<&Value>| config(&network, &socket, data.path(), prev);
    let (pod_a, pod_b) = (Pod::start(), Pod::start());
    let (id_a, id_b) = (format!("{p}-pod-a"), format!("{p}-pod-b"));
    let (ns_a, ns_b) = (pod_a.netns(), pod_b.netns());

    // VERSION.
    let v = cni("VERSION", "", None, &json!({"cniVersion": "1.0.0"})).ok("VERSION").expect("a version list");
    assert!(v["supportedVersions"].as_array().unwrap().contains(&json!("1.0.0")), "{v}");

    // ADD both pods: spec-conformant results, interfaces made by vmq inside the pods.
    let a = cni("ADD", &id_a, Some(&ns_a), &conf(None)).ok("ADD a").expect("a result");
    let b = cni("ADD", &id_b, Some(&ns_b), &conf(None)).ok("ADD b").expect("a result");
    for (r, ns) in [(&a, &ns_a), (&b, &ns_b)] {
        assert_eq!(r["cniVersion"], "1.0.0", "{r}");
        assert_eq!(r["interfaces"][0]["name"], "eth0", "{r}");
        assert_eq!(r["interfaces"][0]["sandbox"], ns.as_str(), "{r}");
        assert_eq!(r["ips"][0]["interface"], 0, "{r}");
        assert_eq!(r["ips"][0]["gateway"], "10.251.0.1", "{r}");
        assert!(r["ips"][0]["address"].as_str().unwrap().starts_with("10.251.0."), "{r}");
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0", "{r}");
        assert_eq!(r["dns"]["nameservers"][0], "10.251.0.53", "{r}");
        let mac = r["interfaces"][0]["mac"].as_str().unwrap();
        let byte0 = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!(byte0 & 3, 2, "locally administered unicast MAC: {mac}");
    }
    assert_ne!(address(&a), address(&b));
    assert_ne!(a["interfaces"][0]["mac"], b["interfaces"][0]["mac"]);
    let link = pod_a.exec(&["ip", "-o", "addr", "show", "dev", "eth0"]);
    let text = String::from_utf8_lossy(&link.stdout);
    assert!(text.contains(&format!("{}/24", address(&a))), "{text}");
    let route = pod_a.exec(&["ip", "route", "show", "default"]);
    assert!(String::from_utf8_lossy(&route.stdout).contains("via 10.251.0.1 dev eth0"), "{route:?}");
    let ports = vmq.show().ports;
    let port_a = ports.iter().find(|p| p.netns.as_deref() == Some(ns_a.as_str())).expect("vmq has a's port");
    assert!(port_a.name.starts_with("cni-") && port_a.ifname.as_deref() == Some("eth0"), "{port_a:?}");
    assert_eq!(port_a.mac.as_deref(), a["interfaces"][0]["mac"].as_str());
    let port_b_name = ports.iter().find(|p| p.netns.as_deref() == Some(ns_b.as_str())).expect("b's port").name.clone();
    assert_eq!(leases(data.path(), &network).len(), 2);

    // Traffic between the pods goes through vmq.
    let ping = pod_a.exec(&["ping", "-n", "-q", "-c", "3", "-i", "0.1", "-w", "10", &address(&b)]);
    assert!(String::from_utf8_lossy(&ping.stdout).contains(" 3 received"), "{ping:?}\n{}", vmq.log());
    assert!(vmq.stats(&port_a.name).tx_packets >= 3);

    // CHECK passes, and fails when the pod's networking is not as ADD left it.
    cni("CHECK", &id_a, Some(&ns_a), &conf(Some(&a))).ok("CHECK a");
    cni("CHECK", &id_b, Some(&ns_b), &conf(Some(&b))).ok("CHECK b");
    let cidr_a = a["ips"][0]["address"].as_str().unwrap();
    assert!(pod_a.exec(&["ip", "addr", "del", cidr_a, "dev", "eth0"]).status.success());
    let msg = cni("CHECK", &id_a, Some(&ns_a), &conf(Some(&a))).error("CHECK without the address", 101);
    assert!(msg.contains("lacks address"), "{msg}");
    assert!(pod_a.exec(&["ip", "addr", "add", cidr_a, "dev", "eth0"]).status.success());
    cni("CHECK", &id_a, Some(&ns_a), &conf(Some(&a))).ok("CHECK a again");

    // DEL b: port, interface and lease gone; DEL again (and without a namespace) succeeds.
    assert_eq!(cni("DEL", &id_b, Some(&ns_b), &conf(Some(&b))).ok("DEL b"), None);
    assert!(!has_port(&vmq, &port_b_name), "b's port survived DEL");
    let gone = pod_b.exec(&["ip", "link", "show", "dev", "eth0"]);
    assert!(!gone.status.success(), "eth0 still in pod b");
    assert_eq!(leases(data.path(), &network), vec![address(&a)]);
    cni("DEL", &id_b, Some(&ns_b), &conf(Some(&b))).ok("DEL b again");
    cni("DEL", &id_b, None, &conf(None)).ok("DEL b without CNI_NETNS");
    // a is untouched.
    cni("CHECK", &id_a, Some(&ns_a), &conf(Some(&a))).ok("CHECK a after DEL b");

    // Errors are spec errors.
    let mut old = conf(None);
    old["cniVersion"] = json!("0.3.1");
    cni("ADD", &id_b, Some(&ns_b), &old).error("ADD with cniVersion 0.3.1", 1);
    let mut nowhere = conf(None);
    nowhere["socket"] = json!(data.path().join("no-vmq.sock"));
    let msg = cni("ADD", &id_b, Some(&ns_b), &nowhere).error("ADD with vmq unreachable", 11);
    assert!(msg.contains("vmq is unreachable"), "{msg}");
    assert_eq!(leases(data.path(), &network), vec![address(&a)], "the failed ADD kept its lease");
    let mut no_ipam = conf(None);
    no_ipam.as_object_mut().unwrap().remove("ipam");
    cni("ADD", &id_b, Some(&ns_b), &no_ipam).error("ADD without ipam", 7);
    cni("ADD", &id_b, None, &conf(None)).error("ADD without CNI_NETNS", 4);
    let msg = cni("ADD", &id_b, Some("/proc/0/ns/net"), &conf(None)).error("ADD into a missing namespace", 3);
    assert!(msg.contains("does not exist"), "{msg}");
    // A second ADD of a's attachment (no DEL between) is refused, by host-local here (its error
    // passed on with its code), and a keeps its port, address and lease.
    let msg = cni("ADD", &id_a, Some(&ns_a), &conf(None)).error("ADD a twice", 999);
    assert!(msg.contains("IPAM plugin host-local") && msg.contains("duplicate allocation"), "{msg}");
    cni("CHECK", &id_a, Some(&ns_a), &conf(Some(&a))).ok("CHECK a after the refused ADD");
    assert_eq!(leases(data.path(), &network), vec![address(&a)], "the refused ADD kept a lease");
    // DEL while vmq is not running (its TAPs went with it) succeeds.
    cni("DEL", &id_b, Some(&ns_b), &nowhere).ok("DEL with vmq not running");

    // After a vmq restart the port is gone (ports added at run time are not kept): CHECK says so
    // with code 101, DEL succeeds and releases the lease.
    vmq.restart();
    let msg = cni("CHECK", &id_a, Some(&ns_a), &conf(Some(&a))).error("CHECK after a vmq restart", 101);
    assert!(msg.contains("vmq has no port") && msg.contains("restarted"), "{msg}");
    cni("DEL", &id_a, Some(&ns_a), &conf(Some(&a))).ok("DEL a after the restart");
    assert_eq!(leases(data.path(), &network), Vec::<String>::new());
}

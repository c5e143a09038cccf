//! Named network namespaces (root only).

mod common;

use std::net::UdpSocket;

use common::*;
use vmq_sys::link::{LinkCtl, LinkError};
use vmq_sys::netns::{self, Netns, NetnsError};

#[test]
fn create_run_in_delete() {
    if !can_run() {
        return;
    }
    let name = unique("ns");
    assert!(!netns::exists(&name));
    let ns = Netns::create(&name).expect("create");
    assert!(netns::exists(&name));
    // `ip` sees it as one of its own.
    let out = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&name));
    assert!(matches!(netns::create(&name), Err(NetnsError::AlreadyExists(n)) if n == name));

    // A socket made inside stays there: it can bind an address only that namespace has.
    ip_in(&name, &["link", "add", "vqs-dummy", "type", "veth", "peer", "name", "vqs-dummy2"]);
    ip_in(&name, &["addr", "add", "10.90.0.1/24", "dev", "vqs-dummy"]);
    ip_in(&name, &["link", "set", "vqs-dummy", "up"]);
    let sock = ns.run(|| UdpSocket::bind("10.90.0.1:0")).expect("run_in").expect("bind inside");
    assert!(UdpSocket::bind("10.90.0.1:0").is_err(), "the address does not exist out here");
    drop(sock);
    // Interfaces are looked up in the right namespace; lo is up (Netns::create does that).
    let ctl = LinkCtl::new(Some(&name)).unwrap();
    assert!(ctl.ifindex("vqs-dummy").unwrap() > 0);
    assert!(ctl.flags("lo").unwrap().up());
    let e = LinkCtl::new(None).unwrap().ifindex("vqs-dummy").unwrap_err();
    assert!(matches!(e, LinkError::NoSuchInterface { .. }), "{e:?}");
    assert_eq!(e.to_string(), "vqs-dummy: SIOCGIFINDEX: no such interface");
    let e = ctl.mtu("vqs-nothere").unwrap_err();
    assert_eq!(e.to_string(), format!("vqs-nothere (netns {name}): SIOCGIFMTU: no such interface"));

    // The closure's value comes back; a panic in it is re-raised, not swallowed.
    assert_eq!(ns.run(|| 41 + 1).unwrap(), 42);
    let panicked = std::panic::catch_unwind(|| ns.run(|| panic!("inside")));
    assert!(panicked.is_err());

    drop(ns);
    assert!(!netns::exists(&name));
    assert!(matches!(netns::delete(&name), Err(NetnsError::NotFound(_))));
}

#[test]
fn missing_and_invalid_names_are_errors() {
    if !can_run() {
        return;
    }
    let missing = unique("absent");
    let e = netns::run_in(&missing, || ()).unwrap_err();
    assert_eq!(e.to_string(), format!("netns {missing} does not exist"));
    assert!(matches!(LinkCtl::new(Some(&missing)).unwrap_err(), LinkError::Netns(NetnsError::NotFound(_))));
    for bad in ["", "a/b", "..", "."] {
        assert!(matches!(netns::create(bad), Err(NetnsError::InvalidName { .. })), "{bad:?}");
        assert!(matches!(netns::run_in(bad, || ()), Err(NetnsError::InvalidName { .. })), "{bad:?}");
    }
}

/// A process in a network namespace of its own, none under /run/netns (as a container
/// runtime's): `unshare --net sleep`, killed by PID on drop.
struct UnsharedProcess(std::process::Child);

impl UnsharedProcess {
    fn start() -> UnsharedProcess {
        let child = std::process::Command::new("unshare")
            .args(["--net", "sleep", "120"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("unshare");
        let p = UnsharedProcess(child);
        // unshare execs sleep once it is in the new namespace: wait for the link to differ.
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        let until = deadline(10);
        while std::fs::read_link(p.ns_path()).ok().is_none_or(|l| l == own) {
            assert!(std::time::Instant::now() < until, "unshare never entered a new namespace");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        p
    }

    fn ns_path(&self) -> String {
        format!("/proc/{}/ns/net", self.0.id())
    }
}

impl Drop for UnsharedProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn namespaces_by_path_are_entered_not_created() {
    if !can_run() {
        return;
    }
    // The bind-mounted file of a named namespace, by its path: the same namespace as the name.
    let name = unique("pa");
    let ns = Netns::create(&name).expect("create");
    ip_in(&name, &["link", "add", "vqs-pdummy", "type", "veth", "peer", "name", "vqs-pdummy2"]);
    let by_path = format!("/run/netns/{name}");
    assert!(netns::exists(&by_path));
    assert!(LinkCtl::new(Some(&by_path)).unwrap().ifindex("vqs-pdummy").unwrap() > 0);
    // /var/run is /run on Debian; a second spelling of the same file works as well.
    let var_run = format!("/var/run/netns/{name}");
    if std::path::Path::new(&var_run).exists() {
        assert!(LinkCtl::new(Some(&var_run)).unwrap().ifindex("vqs-pdummy").unwrap() > 0);
    }

    // A process's namespace: loopback there is down (fresh namespace), unlike ours.
    let proc = UnsharedProcess::start();
    let path = proc.ns_path();
    assert!(netns::exists(&path));
    let ctl = LinkCtl::new(Some(&path)).unwrap();
    assert!(!ctl.flags("lo").unwrap().up(), "not the process's namespace: lo is up");
    assert!(ctl.ifindex("vqs-pdummy").is_err(), "not the process's namespace: sees the named one's dummy");
    let own_inode = std::fs::metadata("/proc/thread-self/ns/net").unwrap();
    let inside = netns::run_in(&path, || std::fs::read_link("/proc/thread-self/ns/net").unwrap()).unwrap();
    assert_eq!(inside, std::fs::read_link(&path).unwrap());
    use std::os::unix::fs::MetadataExt;
    assert_ne!(std::fs::metadata(&path).unwrap().ino(), own_inode.ino());

    // Paths are entered, never created or deleted.
    assert!(matches!(netns::create(&path), Err(NetnsError::InvalidName { .. })));
    assert!(matches!(netns::delete(&path), Err(NetnsError::InvalidName { .. })));
    drop(ns);
}

#[test]
fn a_path_that_is_no_network_namespace_is_a_clear_error() {
    if !can_run() {
        return;
    }
    // Another kind of namespace, and a plain file: setns refuses both.
    for bad in ["/proc/self/ns/mnt", "/etc/hostname"] {
        let e = netns::run_in(bad, || ()).unwrap_err();
        assert!(matches!(e, NetnsError::NotANetns(_)), "{bad}: {e:?}");
        assert_eq!(e.to_string(), format!("netns {bad} is not a network namespace (setns refused it)"));
    }
    let missing = format!("/run/netns/{}", unique("nope"));
    assert!(!netns::exists(&missing));
    assert!(matches!(netns::run_in(&missing, || ()), Err(NetnsError::NotFound(_))));
    assert!(matches!(netns::run_in("/a\0b", || ()), Err(NetnsError::InvalidPath { .. })));
}

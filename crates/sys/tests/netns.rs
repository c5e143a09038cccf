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

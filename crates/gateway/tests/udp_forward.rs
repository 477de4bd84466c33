//! Inbound UDP forwards with real sockets: clients on host loopback reach a UDP echo
//! server in a guest namespace (on a TAP port) through a forward, two at once, each
//! getting its own replies; after removal nothing gets through. Needs root.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

use fabric::TapSource;
use testkit::{run as sh, Netns};

/// Sends `msg` from `sock` to `to` until an answer comes (the first datagram to a guest
/// the gateway has not seen yet is spent on finding it), or gives up.
fn ask(sock: &UdpSocket, to: SocketAddr, msg: &str) -> Option<String> {
    sock.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let mut buf = [0u8; 512];
    for _ in 0..6 {
        sock.send_to(msg.as_bytes(), to).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    None
}

#[test]
fn a_udp_forward_serves_two_clients_and_stops_when_removed() {
    if !rustix::process::geteuid().is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        assert!(
            std::env::var("VMFABRIC_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
            "must run here: needs root"
        );
        eprintln!("SKIP: needs root and /dev/net/tun");
        return;
    }
    let id = std::process::id() % 100_000;
    let ns = Netns(format!("uf{id}"));
    let _ = Command::new("ip")
        .args(["netns", "del", &ns.0])
        .stderr(std::process::Stdio::null())
        .status();
    let lab = common::lab("fwd", "10.98.0.0/24", |_| {});
    sh(&["ip", "netns", "add", &ns.0]);
    let (_, tap) = lab
        .sw
        .add_tap_port("fwd", "guest", TapSource::Name(format!("uft{id}")))
        .unwrap();
    sh(&["ip", "link", "set", &tap, "netns", &ns.0]);
    sh(&["ip", "-n", &ns.0, "addr", "add", "10.98.0.10/24", "dev", &tap]);
    sh(&["ip", "-n", &ns.0, "link", "set", &tap, "up"]);
    // The guest's service: a UDP echo inside the namespace.
    let (tx, rx) = std::sync::mpsc::channel();
    let guest_ns = ns.0.clone();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{guest_ns}")).unwrap();
        rustix::thread::move_into_link_name_space(f.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network)).unwrap();
        let s = UdpSocket::bind("10.98.0.10:7000").unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let reply = format!("{} from {}", String::from_utf8_lossy(&buf[..n]), from.ip());
            let _ = s.send_to(reply.as_bytes(), from);
        }
    });
    rx.recv().unwrap();

    let fw = lab
        .gw
        .add_forward(
            gateway::forward::Protocol::Udp,
            "127.0.0.1:0".parse().unwrap(),
            "10.98.0.10:7000".parse().unwrap(),
        )
        .unwrap();
    assert_eq!(lab.gw.forwards(), vec![fw.clone()]);
    let (a, b) = (
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        UdpSocket::bind("127.0.0.1:0").unwrap(),
    );
    assert_eq!(
        ask(&a, fw.host, "alpha").as_deref(),
        Some("alpha from 10.98.0.1"),
        "the guest sees the gateway's address"
    );
    // Two clients at once: each reply goes back to its own client.
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| ask(&a, fw.host, "again-a"));
        let hb = s.spawn(|| ask(&b, fw.host, "again-b"));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!(ra.as_deref(), Some("again-a from 10.98.0.1"));
    assert_eq!(rb.as_deref(), Some("again-b from 10.98.0.1"));

    assert!(lab.gw.remove_forward(fw.id));
    assert!(!lab.gw.remove_forward(fw.id));
    assert_eq!(ask(&a, fw.host, "after"), None, "a removed forward answers nothing");
    assert!(lab
        .gw
        .add_forward(
            gateway::forward::Protocol::Udp,
            "127.0.0.1:0".parse().unwrap(),
            "192.0.2.1:7".parse().unwrap()
        )
        .is_err());
}

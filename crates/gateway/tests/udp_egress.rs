//! UDP egress with real sockets: a "guest" network namespace on a TAP port reaches a
//! UDP echo server on host loopback through the host-access address, and one in an
//! "outside" namespace (joined to the host by a veth pair the test makes) through the
//! gateway's NAT; link-local is refused and counted. Needs root and /dev/net/tun.

mod common;

use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use fabric::TapSource;
use testkit::run as sh;

struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A UDP echo server on `addr`, in network namespace `ns` when given.
fn echo_server(ns: Option<String>, addr: &'static str) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
            rustix::thread::move_into_link_name_space(f.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
                .unwrap();
        }
        let s = UdpSocket::bind(addr).unwrap();
        tx.send(s.local_addr().unwrap().port()).unwrap();
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    rx.recv().unwrap()
}

#[test]
fn guests_reach_the_host_and_the_outside_over_udp_and_not_link_local() {
    let ready = rustix::process::geteuid().is_root() && std::path::Path::new("/dev/net/tun").exists();
    if !ready {
        assert!(
            std::env::var("VMFABRIC_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
            "must run here: needs root"
        );
        eprintln!("SKIP: needs root and /dev/net/tun");
        return;
    }
    let id = std::process::id() % 100_000;
    let (guest_ns, outside_ns) = (format!("ug{id}"), format!("uo{id}"));
    let _cleanup = Cleanup(vec![guest_ns.clone(), outside_ns.clone()]);
    let lab = common::lab("egress", "10.97.0.0/24", |cfg| {
        cfg.host_access = Some(cfg.default_host_access());
        cfg.udp_idle = Duration::from_secs(20);
        cfg.udp_dns_idle = Duration::from_secs(1);
    });

    // The guest: a namespace on a TAP port, routed through the gateway.
    sh(&["ip", "netns", "add", &guest_ns]);
    let (_, tap) = lab
        .sw
        .add_tap_port("egress", "guest", TapSource::Name(format!("ut{id}")))
        .unwrap();
    sh(&["ip", "link", "set", &tap, "netns", &guest_ns]);
    sh(&["ip", "-n", &guest_ns, "addr", "add", "10.97.0.10/24", "dev", &tap]);
    sh(&["ip", "-n", &guest_ns, "link", "set", &tap, "up"]);
    sh(&["ip", "-n", &guest_ns, "route", "add", "default", "via", "10.97.0.1"]);
    // The outside: a namespace behind a veth pair, a private /30 the test owns.
    sh(&["ip", "netns", "add", &outside_ns]);
    let (host_end, far_end) = (format!("uh{id}"), format!("uf{id}"));
    sh(&["ip", "link", "add", &host_end, "type", "veth", "peer", "name", &far_end]);
    sh(&["ip", "link", "set", &far_end, "netns", &outside_ns]);
    sh(&["ip", "addr", "add", "10.203.0.1/30", "dev", &host_end]);
    sh(&["ip", "link", "set", &host_end, "up"]);
    sh(&["ip", "-n", &outside_ns, "addr", "add", "10.203.0.2/30", "dev", &far_end]);
    sh(&["ip", "-n", &outside_ns, "link", "set", &far_end, "up"]);

    let loopback_port = echo_server(None, "127.0.0.1:0");
    let outside_port = echo_server(Some(outside_ns.clone()), "10.203.0.2:0");
    let dns_like = echo_server(Some(outside_ns.clone()), "10.203.0.2:53");
    // The guest's UDP client: a thread inside the guest namespace.
    let ask = |dst: &str, port: u16| -> String {
        let (ns, dst) = (guest_ns.clone(), format!("{dst}:{port}"));
        std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
            rustix::thread::move_into_link_name_space(f.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
                .unwrap();
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.send_to(format!("hello-{port}").as_bytes(), &dst).unwrap();
            let mut buf = [0u8; 2048];
            match s.recv(&mut buf) {
                Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
                Err(_) => String::new(),
            }
        })
        .join()
        .unwrap()
    };
    let got = ask("10.97.0.254", loopback_port);
    assert_eq!(
        got,
        format!("hello-{loopback_port}"),
        "host loopback via the host-access address"
    );
    assert_eq!(
        ask("10.203.0.2", outside_port),
        format!("hello-{outside_port}"),
        "the outside through NAT"
    );
    let flows = lab.gw.udp_flows();
    assert!(
        flows
            .iter()
            .any(|f| f.dst.to_string() == format!("10.203.0.2:{outside_port}")),
        "{flows:?}"
    );

    // Cloud metadata lives at link-local: refused, counted, answered with ICMP.
    let denied_before = lab.gw.counters().get("egress_denied").unwrap();
    ask("169.254.169.254", 53);
    assert!(lab.gw.counters().get("egress_denied").unwrap() > denied_before);
    // The host's own addresses are refused too (the veth end is one).
    ask("10.203.0.1", 9);
    assert!(lab.gw.counters().get("egress_denied").unwrap() > denied_before + 1);

    // A DNS-like flow idles out first; the others are still there when it has gone.
    assert_eq!(ask("10.203.0.2", dns_like), "hello-53");
    let dns_flow = |flows: &[gateway::udp_nat::FlowInfo]| flows.iter().any(|f| f.dst.port() == 53);
    let deadline = Instant::now() + Duration::from_secs(15);
    while dns_flow(&lab.gw.udp_flows()) {
        assert!(Instant::now() < deadline, "the DNS-like flow did not close");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        lab.gw.udp_flows().iter().any(|f| f.dst.port() == outside_port),
        "the ordinary flow outlives it: {:?}",
        lab.gw.udp_flows()
    );

    // Idle flows close.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lab.gw.udp_flows().is_empty() {
        assert!(
            Instant::now() < deadline,
            "flows did not close: {:?}",
            lab.gw.udp_flows()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = Command::new("ip").args(["link", "del", &host_end]).status();
}

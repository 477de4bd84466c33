//! vmfabric's nftables table with real traffic, all inside namespaces the test makes:
//! a "host" namespace with two vmfabric bridges (made through netlink) and a link to an
//! "outside" namespace; "guest" namespaces hang off the bridges. Guests reach the
//! outside masqueraded, an outside client reaches a guest through a forward (DNAT),
//! the two networks cannot reach each other, a locked port is not heard from another
//! source IP or MAC, a guest holds no more connections out than its share, removing a
//! network removes exactly its rules, and another table in the same namespace is never
//! touched. Needs root, nft and busybox (ping).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use hostnet::nft::{self, Egress, EgressRule, Forward, NetworkRules, PortLock, L4};

/// An instance's table, as a daemon names it.
const TABLE: &str = "vmfabric_test";
use hostnet::Links;
use testkit::{in_ns, run};

struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A server in `ns` on `addr` that answers every connection with the client's address.
fn who_am_i_server(ns: &str, addr: &'static str) {
    let listener = in_ns(ns, move || TcpListener::bind(addr).unwrap());
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let peer = s.peer_addr().unwrap();
            let _ = write!(s, "you are {}", peer.ip());
        }
    });
}

/// Blue's bound in this test.
const FLOWS_PER_GUEST: u32 = 3;

/// A server in `ns` on `addr` that holds each connection until its client ends it.
fn holding_server(ns: &str, addr: &'static str) {
    let listener = in_ns(ns, move || TcpListener::bind(addr).unwrap());
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut sink = [0u8; 64];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
}

fn ask(ns: &str, to: &'static str) -> Result<String, std::io::ErrorKind> {
    in_ns(ns, move || {
        let addr: SocketAddr = to.parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.kind())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).map_err(|e| e.kind())?;
        Ok(answer)
    })
}

#[test]
fn masquerade_forwards_and_isolation_with_real_traffic() {
    let ready = testkit::is_root() && Command::new("nft").arg("--version").output().is_ok();
    if !testkit::ready_or_skip(ready, "needs root and nft (apt-get install nftables)") {
        return;
    }
    let id = std::process::id() % 100_000;
    let [host, outside, g0, g1] = ["nh", "no", "ng", "nk"].map(|p| format!("{p}{id}"));
    let _cleanup = Namespaces(vec![host.clone(), outside.clone(), g0.clone(), g1.clone()]);
    for ns in [&host, &outside, &g0, &g1] {
        run(&["ip", "netns", "add", ns]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    run(&["ip", "netns", "exec", &host, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    // The host's bridges, made as vmfabric makes them.
    in_ns(&host, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let links = Links::connect().unwrap();
            links
                .ensure_bridge("vmfbr0", "network red", "10.72.0.1".parse().unwrap(), 24, None)
                .await
                .unwrap();
            links
                .ensure_bridge("vmfbr1", "network blue", "10.73.0.1".parse().unwrap(), 24, None)
                .await
                .unwrap();
        })
    });
    // Guests on the bridges, and the outside behind a /30.
    for (guest, bridge, addr, gw) in [
        (&g0, "vmfbr0", "10.72.0.2/24", "10.72.0.1"),
        (&g1, "vmfbr1", "10.73.0.2/24", "10.73.0.1"),
    ] {
        let (h, g) = (format!("{bridge}p"), "eth0".to_string());
        run(&[
            "ip", "-n", &host, "link", "add", &h, "type", "veth", "peer", "name", &g, "netns", guest,
        ]);
        run(&["ip", "-n", &host, "link", "set", &h, "master", bridge, "up"]);
        run(&["ip", "-n", guest, "addr", "add", addr, "dev", &g]);
        run(&["ip", "-n", guest, "link", "set", &g, "up"]);
        run(&["ip", "-n", guest, "route", "add", "default", "via", gw]);
    }
    run(&[
        "ip", "-n", &host, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &outside,
    ]);
    run(&["ip", "-n", &host, "addr", "add", "10.205.0.1/30", "dev", "up0"]);
    run(&["ip", "-n", &host, "link", "set", "up0", "up"]);
    run(&["ip", "-n", &outside, "addr", "add", "10.205.0.2/30", "dev", "eth0"]);
    run(&["ip", "-n", &outside, "link", "set", "eth0", "up"]);
    // Somebody else's table in the same namespace.
    run(&["ip", "netns", "exec", &host, "nft", "add", "table", "inet", "other"]);
    run(&[
        "ip", "netns", "exec", &host, "nft", "add", "chain", "inet", "other", "keep",
    ]);

    who_am_i_server(&outside, "10.205.0.2:8080");
    who_am_i_server(&g0, "10.72.0.2:80");
    who_am_i_server(&g1, "10.73.0.2:80");
    let g0_mac: fabric::Mac = run(&["ip", "-n", &g0, "link", "show", "eth0"])
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let red = NetworkRules {
        bridge: "vmfbr0".into(),
        subnet: "10.72.0.0/24".parse().unwrap(),
        router: "10.72.0.1".parse().unwrap(),
        egress: Egress::default(),
        ipv6: None,
        flows_per_guest: None,
        tunnel: None,
        forwards: vec![Forward {
            proto: "tcp".into(),
            host: "10.205.0.1:8081".parse().unwrap(),
            guest: "10.72.0.2:80".parse().unwrap(),
        }],
        // g0's bridge port, held to g0's MAC and address.
        locked_ports: vec![PortLock {
            ifname: "vmfbr0p".into(),
            mac: g0_mac,
            ips: vec!["10.72.0.2".parse().unwrap()],
            ips6: vec![],
        }],
    };
    let blue = NetworkRules {
        bridge: "vmfbr1".into(),
        subnet: "10.73.0.0/24".parse().unwrap(),
        router: "10.73.0.1".parse().unwrap(),
        egress: Egress::default(),
        ipv6: None,
        // Small, so that the test can reach it.
        flows_per_guest: Some(FLOWS_PER_GUEST),
        tunnel: None,
        forwards: vec![],
        locked_ports: vec![],
    };
    // Before the rules: the outside sees the guest's own address (no way back) and the
    // networks reach each other through the host's routing.
    assert!(ask(&g0, "10.205.0.2:8080").is_err(), "no masquerade yet, no way back");
    assert_eq!(ask(&g0, "10.73.0.2:80").as_deref(), Ok("you are 10.72.0.2"));

    let both = [red.clone(), blue.clone()];
    in_ns(&host, move || nft::apply(TABLE, &both).unwrap());
    assert_eq!(
        ask(&g0, "10.205.0.2:8080").as_deref(),
        Ok("you are 10.205.0.1"),
        "masqueraded"
    );
    assert_eq!(ask(&g1, "10.205.0.2:8080").as_deref(), Ok("you are 10.205.0.1"));
    assert_eq!(
        ask(&outside, "10.205.0.1:8081").as_deref(),
        Ok("you are 10.205.0.2"),
        "the forward reaches the guest"
    );
    assert!(ask(&g0, "10.73.0.2:80").is_err(), "red cannot reach blue");
    assert!(ask(&g1, "10.72.0.2:80").is_err(), "blue cannot reach red");

    // Applying again changes nothing (one table, the same rules).
    let both = [red.clone(), blue.clone()];
    in_ns(&host, move || nft::apply(TABLE, &both).unwrap());
    let table = run(&["ip", "netns", "exec", &host, "nft", "list", "table", "inet", TABLE]);
    assert_eq!(
        table.matches("masquerade").count(),
        4,
        "subnet and loopback sources, for each network: {table}"
    );

    // The locked port: heard from its own MAC and address, not from others.
    let ping = |args: &[&str]| {
        let mut cmd = vec!["ip", "netns", "exec", &g0, "busybox", "ping", "-c", "1", "-W", "2"];
        cmd.extend_from_slice(args);
        Command::new(cmd[0]).args(&cmd[1..]).output().unwrap().status.success()
    };
    assert!(ping(&["10.72.0.1"]), "the locked port's own traffic passes");
    run(&["ip", "-n", &g0, "addr", "add", "10.72.0.99/24", "dev", "eth0"]);
    assert!(
        !ping(&["-I", "10.72.0.99", "10.72.0.1"]),
        "a spoofed source IP is not heard"
    );
    run(&["ip", "-n", &g0, "link", "set", "eth0", "address", "02:de:ad:00:00:01"]);
    // The host forgets the old MAC, so only the lock can keep the new one out.
    run(&["ip", "-n", &host, "neigh", "flush", "dev", "vmfbr0"]);
    assert!(!ping(&["10.72.0.1"]), "a spoofed source MAC is not heard");
    run(&["ip", "-n", &g0, "link", "set", "eth0", "address", &g0_mac.to_string()]);
    assert!(ping(&["10.72.0.1"]), "back to its own MAC, heard again");

    // Red removed: exactly its rules go.
    let only_blue = [blue.clone()];
    in_ns(&host, move || nft::apply(TABLE, &only_blue).unwrap());
    let table = run(&["ip", "netns", "exec", &host, "nft", "list", "table", "inet", TABLE]);
    assert!(!table.contains("10.72.0.0/24") && !table.contains("dnat"), "{table}");
    assert!(table.contains("10.73.0.0/24"), "{table}");
    assert!(ask(&outside, "10.205.0.1:8081").is_err(), "the forward is gone");
    assert_eq!(ask(&g1, "10.205.0.2:8080").as_deref(), Ok("you are 10.205.0.1"));

    // Red again, under an egress policy: only the outside's port 8080, by TCP. The
    // host's services are out of reach, the router answers pings, and refusals are
    // answered (a reset, so the connect fails at once) and counted.
    who_am_i_server(&outside, "10.205.0.2:8083");
    who_am_i_server(&host, "10.205.0.1:9000");
    who_am_i_server(&host, "10.72.0.1:9001");
    let strict = NetworkRules {
        egress: Egress {
            rules: vec![EgressRule {
                allow: true,
                dst: "10.205.0.2/32".parse().unwrap(),
                proto: Some(L4::Tcp),
                ports: Some((8080, 8080)),
            }],
            default_allow: false,
        },
        ..red.clone()
    };
    // A default route, so that metadata's address is routed (and refused by policy)
    // rather than unreachable.
    run(&["ip", "-n", &host, "route", "add", "default", "via", "10.205.0.2"]);
    let both = [strict, blue.clone()];
    in_ns(&host, move || nft::apply(TABLE, &both).unwrap());
    assert_eq!(
        ask(&g0, "10.205.0.2:8080").as_deref(),
        Ok("you are 10.205.0.1"),
        "allowed by rule"
    );
    let refused = Err(std::io::ErrorKind::ConnectionRefused);
    assert_eq!(ask(&g0, "10.205.0.2:8083"), refused, "the default denies, with a reset");
    assert_eq!(ask(&g0, "169.254.169.254:80"), refused, "metadata is a built-in deny");
    assert_eq!(ask(&g0, "10.205.0.1:9000"), refused, "the host's own address");
    assert_eq!(ask(&g0, "10.72.0.1:9001"), refused, "the router's services");
    assert!(ping(&["10.72.0.1"]), "the router answers pings");
    assert_eq!(
        ask(&g1, "10.205.0.2:8083").as_deref(),
        Ok("you are 10.205.0.1"),
        "blue's policy is its own"
    );
    let counts = in_ns(&host, || nft::counters(TABLE).unwrap());
    let count = |name: &str| counts.iter().find(|(n, _)| n == name).map(|(_, c)| *c);
    assert!(count("egress_denied_vmfbr0") >= Some(2), "{counts:?}");
    assert!(count("input_denied_vmfbr0") >= Some(2), "{counts:?}");
    assert_eq!(count("egress_denied_vmfbr1"), Some(0), "{counts:?}");

    // Blue's guest holds its share of connections to the outside: one more is reset
    // (and counted) while red's guest still connects; when one closes, the share has
    // room again.
    holding_server(&outside, "10.205.0.2:8090");
    let hold = || {
        in_ns(&g1, || {
            TcpStream::connect_timeout(&"10.205.0.2:8090".parse().unwrap(), Duration::from_secs(3))
                .map_err(|e| e.kind())
        })
    };
    // The kernel forgets the connections of earlier checks once it sees them closed: a
    // refusal before the share is full is retried.
    let hold_retrying = || {
        (0..50).find_map(|_| {
            hold().ok().or_else(|| {
                std::thread::sleep(Duration::from_millis(100));
                None
            })
        })
    };
    let mut held: Vec<TcpStream> = (0..FLOWS_PER_GUEST).map(|_| hold_retrying().unwrap()).collect();
    assert_eq!(
        hold().err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "past the share"
    );
    assert_eq!(
        ask(&g0, "10.205.0.2:8080").as_deref(),
        Ok("you are 10.205.0.1"),
        "red is not bounded by blue"
    );
    drop(held.pop());
    // The outside closes its side once it reads the end; the kernel then stops
    // counting the connection.
    let again = hold_retrying();
    assert!(again.is_some(), "a closed connection gives its place back");
    let counts = in_ns(&host, || nft::counters(TABLE).unwrap());
    let flows_denied = counts.iter().find(|(n, _)| n == "flows_denied_vmfbr1").map(|(_, c)| *c);
    assert!(flows_denied >= Some(1), "{counts:?}");
    drop((held, again));

    in_ns(&host, || nft::remove(TABLE).unwrap());
    let all = run(&["ip", "netns", "exec", &host, "nft", "list", "ruleset"]);
    assert!(!all.contains("vmfabric"), "both of vmfabric's tables are gone: {all}");
    assert!(
        all.contains("table inet other") && all.contains("chain keep"),
        "others' tables stay:\n{all}"
    );
}

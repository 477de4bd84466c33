//! Two nodes of a cluster on one machine: each node a network namespace with a
//! vmfabric daemon, joined by an underlay bridge; etcd on the bridge's address; guests
//! as namespaces on the daemons' TAP ports. A network created on one node is served
//! by both; guests on different nodes lease distinct addresses, reach each other
//! through the VXLAN tunnel and each reach the same gateway address on their own
//! node; the race for one last address has one winner; with etcd stopped the guests'
//! traffic and renewals go on while a new guest's lease is refused and counted; a
//! forged VXLAN datagram from a stranger, or from a member in another node's name,
//! is dropped and counted. Needs root, etcd and busybox.

mod harness;

use std::ffi::OsStr;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::{run, Netns};

/// The test's underlay bridge, deleted when dropped (its veths go with the namespaces).
struct Bridge(String);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// A node: its namespace, underlay address and daemon.
struct Node {
    daemon: harness::Process,
    ns: String,
    underlay: String,
}

fn start_node(name: &str, ns: &str, underlay: &str, etcd: &str, dir: &Path, guests: &Path) -> Node {
    std::fs::create_dir_all(dir).unwrap();
    let args = [
        "--cluster-endpoints",
        etcd,
        "--node",
        name,
        "--underlay",
        underlay,
        "--node-ttl",
        "4",
    ];
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    Node {
        daemon: harness::Process::start_in(Some(ns), dir, guests, &args),
        ns: ns.to_string(),
        underlay: underlay.to_string(),
    }
}

/// Polls `f` until it is true, for up to `secs`.
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A guest namespace on a TAP port `port` the node's daemon makes for network `net`,
/// its NIC the TAP device itself.
fn guest(node: &Node, net: &str, port: &str, ns: &Netns) {
    let made = node.daemon.ok(
        "POST",
        &format!("/v1/networks/{net}/ports"),
        Some(json!({"name": port, "kind": "tap", "ifname": ns.0})),
    );
    run(&["ip", "-n", &node.ns, "link", "set", &ns.0, "netns", &ns.0]);
    // The guest's NIC has the MAC its port is locked to, as a VMM would set.
    let mac = made["mac"].as_str().unwrap();
    run(&["ip", "-n", &ns.0, "link", "set", &ns.0, "address", mac]);
    run(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
    run(&["ip", "-n", &ns.0, "link", "set", &ns.0, "up"]);
}

/// A guest on each node's port of `net`, namespaces `{prefix}a` and `{prefix}b`.
fn guest_on_each(a: &Node, b: &Node, net: &str, prefix: &str) -> (Netns, Netns) {
    let (ga, gb) = (Netns::new(&format!("{prefix}a")), Netns::new(&format!("{prefix}b")));
    guest(a, net, &format!("{}a", &net[..1]), &ga);
    guest(b, net, &format!("{}b", &net[..1]), &gb);
    (ga, gb)
}

/// One udhcpc exchange in `ns` (a few tries): the address, or None if none came.
fn lease(ns: &str, dir: &Path, tries: &str) -> Option<String> {
    std::fs::create_dir_all(dir).unwrap();
    let script = dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in bound|renew) ip -4 addr flush dev \"$interface\"; ip addr add \"$ip/$mask\" dev \"$interface\"; echo \"$ip\" > \"$(dirname \"$0\")/ip\" ;; esac\n",
    )
    .unwrap();
    run(&["chmod", "755", script.to_str().unwrap()]);
    let _ = std::fs::remove_file(dir.join("ip"));
    let ok = Command::new("ip")
        .args([
            "netns", "exec", ns, "busybox", "udhcpc", "-i", ns, "-q", "-f", "-n", "-t", tries, "-T", "1", "-s",
        ])
        .arg(&script)
        .output()
        .unwrap()
        .status
        .success();
    ok.then(|| std::fs::read_to_string(dir.join("ip")).unwrap().trim().to_string())
}

fn pings(ns: &str, ip: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "busybox", "ping", "-c", "1", "-W", "1", ip])
        .output()
        .unwrap()
        .status
        .success()
}

/// A counter's value from a daemon's metrics, by the start of its line.
fn metric(node: &Node, line_start: &str) -> u64 {
    node.daemon.metric(line_start)
}

/// What a node's gateways and ports counted, for a failure's message.
fn dhcp_lines(node: &Node) -> String {
    let text = node.daemon.ok("GET", "/metrics", None);
    let text = text.as_str().unwrap_or_default();
    text.lines()
        .filter(|l| {
            (l.starts_with("vmfabric_dhcp")
                || l.starts_with("vmfabric_port_")
                || l.starts_with("vmfabric_vxlan")
                || l.starts_with("vmfabric_cluster"))
                && !l.ends_with(" 0")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A VXLAN datagram for `vni` carrying an Ethernet frame from `src` to broadcast.
fn vxlan_datagram(vni: u32, src: [u8; 6]) -> Vec<u8> {
    let mut d = vec![0x08, 0, 0, 0];
    d.extend_from_slice(&vni.to_be_bytes()[1..]);
    d.push(0);
    d.extend_from_slice(&[0xff; 6]);
    d.extend_from_slice(&src);
    d.extend_from_slice(&[0x08, 0x06]);
    d.extend_from_slice(&[0; 46]);
    d
}

fn parse_mac(text: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, part) in text.split(':').enumerate() {
        m[i] = u8::from_str_radix(part, 16).unwrap();
    }
    m
}

#[test]
fn a_cluster_network_spans_two_nodes_through_vxlan_with_addresses_claimed_in_etcd() {
    if !testkit::ready_or_skip(testkit::is_root(), "needs root (namespaces, TAP devices)") {
        return;
    }
    let have_etcd = Command::new("etcd").arg("--version").output().is_ok();
    if !testkit::ready_or_skip(have_etcd, "needs etcd (apt-get install etcd-server)") {
        return;
    }
    let id = std::process::id() % 200 + 20;
    let dir = std::env::temp_dir().join(format!("vmf-multihost-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // The underlay: a bridge in this namespace, a veth to each node's namespace.
    let bridge = Bridge(format!("vmfu{id}"));
    let _ = Command::new("ip")
        .args(["link", "del", &bridge.0])
        .stderr(std::process::Stdio::null())
        .status();
    run(&["ip", "link", "add", &bridge.0, "type", "bridge"]);
    let base = format!("198.18.{id}");
    run(&["ip", "addr", "add", &format!("{base}.1/24"), "dev", &bridge.0]);
    run(&["ip", "link", "set", &bridge.0, "up"]);
    let node_ns: Vec<Netns> = ["a", "b"].iter().map(|n| Netns::new(&format!("mh{id}{n}"))).collect();
    for (i, ns) in node_ns.iter().enumerate() {
        let (outer, inner) = (format!("{}o", ns.0), format!("{}i", ns.0));
        run(&["ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner]);
        run(&["ip", "link", "set", &outer, "master", &bridge.0, "up"]);
        run(&["ip", "link", "set", &inner, "netns", &ns.0]);
        run(&[
            "ip",
            "-n",
            &ns.0,
            "addr",
            "add",
            &format!("{base}.{}/24", 11 + i),
            "dev",
            &inner,
        ]);
        run(&["ip", "-n", &ns.0, "link", "set", &inner, "up"]);
        run(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
    }
    let mut etcd = testkit::Etcd::start(&format!("{base}.1"), dir.join("etcd")).unwrap();
    let guests: PathBuf = std::env::var_os("VMFABRIC_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.clone());
    let a = start_node(
        "a",
        &node_ns[0].0,
        &format!("{base}.11"),
        &etcd.endpoint,
        &dir.join("a"),
        &guests,
    );
    let b = start_node(
        "b",
        &node_ns[1].0,
        &format!("{base}.12"),
        &etcd.endpoint,
        &dir.join("b"),
        &guests,
    );

    // Checked before anything is made: the underlay's MTU leaves 1450.
    let subnet = format!("10.66.{id}.0/24");
    let (status, body) = a.daemon.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "span", "subnet": subnet, "scope": "cluster"})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("at most 1450"), "{body}");
    let created = a.daemon.ok(
        "POST",
        "/v1/networks",
        Some(json!({"name": "span", "subnet": subnet, "mtu": 1450, "scope": "cluster"})),
    );
    let vni = created["vni"].as_u64().unwrap() as u32;
    assert_eq!(created["scope"], "cluster");
    // The name is the cluster's: node b may not make another of it.
    let (status, body) = b.daemon.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "span", "subnet": format!("10.65.{id}.0/24"), "mtu": 1450, "scope": "cluster"})),
    );
    assert_eq!(status, 409, "{body}");
    eventually(20, "node b serves the network", || {
        b.daemon.call("GET", "/v1/networks/span", None).0 == 200
    });

    // A guest on each node: distinct addresses, each other by ping through the
    // tunnel, and the same gateway address, answered on its own node.
    let (ga, gb) = guest_on_each(&a, &b, "span", &format!("mh{id}g"));
    let ip_a =
        lease(&ga.0, &dir.join("ga"), "10").unwrap_or_else(|| panic!("guest a leased no address: {}", dhcp_lines(&a)));
    let ip_b =
        lease(&gb.0, &dir.join("gb"), "10").unwrap_or_else(|| panic!("guest b leased no address: {}", dhcp_lines(&b)));
    assert_ne!(ip_a, ip_b, "one address handed out twice");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pings(&ga.0, &ip_b) {
        assert!(
            Instant::now() < deadline,
            "guest a never pinged guest b across nodes\nnode a:\n{}\nnode b:\n{}",
            dhcp_lines(&a),
            dhcp_lines(&b)
        );
    }
    assert!(pings(&gb.0, &ip_a));
    let gateway = format!("10.66.{id}.1");
    assert!(pings(&ga.0, &gateway) && pings(&gb.0, &gateway));
    let rx = "vmfabric_vxlan_total{what=\"rx_frames\"}";
    assert!(
        metric(&a, rx) > 0 && metric(&b, rx) > 0,
        "frames came through the tunnel"
    );
    assert!(
        metric(&a, "vmfabric_vxlan_total{what=\"kept_local\"}") > 0,
        "the gateway's frames stayed on their node"
    );

    // The race: one address left, a new guest on each node asks at the same moment.
    let last = format!("10.67.{id}.50");
    a.daemon.ok(
        "POST",
        "/v1/networks",
        Some(
            json!({"name": "race", "subnet": format!("10.67.{id}.0/24"), "mtu": 1450, "scope": "cluster",
                    "settings": {"dhcp": {"range": [last, last]}}}),
        ),
    );
    eventually(20, "node b serves the race network", || {
        b.daemon.call("GET", "/v1/networks/race", None).0 == 200
    });
    let (ra, rb) = guest_on_each(&a, &b, "race", &format!("mh{id}r"));
    let (dir_ra, dir_rb) = (dir.join("ra"), dir.join("rb"));
    let (ns_ra, ns_rb) = (ra.0.clone(), rb.0.clone());
    let first = std::thread::spawn(move || lease(&ns_ra, &dir_ra, "3"));
    let second = std::thread::spawn(move || lease(&ns_rb, &dir_rb, "3"));
    let (got_a, got_b) = (first.join().unwrap(), second.join().unwrap());
    assert!(
        got_a.is_some() != got_b.is_some(),
        "exactly one guest gets the last address: {got_a:?} {got_b:?}"
    );
    assert_eq!(got_a.or(got_b).unwrap(), last);
    let lost_on = |n: &Node| metric(n, "vmfabric_dhcp_claimed_elsewhere_total{network=\"race\"}");
    assert!(lost_on(&a) + lost_on(&b) > 0, "the loser's node was told the holder");

    // Forged VXLAN: from a stranger's address, and from a member in another
    // node's name (guest a's MAC, sent from node b's address).
    let ports = a.daemon.ok("GET", "/v1/networks/span/ports", None);
    let mac_a = parse_mac(ports[0]["mac"].as_str().unwrap());
    let stranger = UdpSocket::bind(format!("{base}.1:0")).unwrap();
    stranger
        .send_to(
            &vxlan_datagram(vni, [0x02, 0, 0, 0, 0x66, 1]),
            format!("{}:4789", b.underlay),
        )
        .unwrap();
    let (from_b, to_b) = (b.underlay.clone(), a.underlay.clone());
    testkit::in_ns(&b.ns, move || {
        let s = UdpSocket::bind(format!("{from_b}:0")).unwrap();
        s.send_to(&vxlan_datagram(vni, mac_a), format!("{to_b}:4789")).unwrap();
    });
    eventually(10, "the forged datagrams are counted", || {
        metric(&b, "vmfabric_vxlan_total{what=\"from_stranger\"}") >= 1
            && metric(&a, "vmfabric_vxlan_total{what=\"foreign_mac\"}") >= 1
    });

    // etcd stopped: traffic goes on, the bound guest renews from its node's cache,
    // a new guest's lease is refused (fail closed) and counted.
    etcd.stop();
    assert!(pings(&ga.0, &ip_b), "traffic needs no etcd");
    assert_eq!(
        lease(&ga.0, &dir.join("ga"), "5").as_deref(),
        Some(ip_a.as_str()),
        "renewed"
    );
    let gc = Netns::new(&format!("mh{id}gc"));
    guest(&a, "span", "gc", &gc);
    assert_eq!(lease(&gc.0, &dir.join("gc"), "3"), None, "no new lease without etcd");
    assert!(metric(&a, "vmfabric_dhcp_store_unavailable_total{network=\"span\"}") > 0);
    assert_eq!(metric(&a, "vmfabric_cluster_store_up"), 0);
    // Back: the new guest leases an address no one else holds.
    etcd.start_again();
    eventually(30, "node a sees etcd again", || {
        metric(&a, "vmfabric_cluster_store_up") == 1
    });
    let ip_c = lease(&gc.0, &dir.join("gc"), "10").expect("a lease once etcd is back");
    assert!(ip_c != ip_a && ip_c != ip_b, "{ip_c} handed out twice");

    // Deleted on one node, gone from both.
    a.daemon.ok("DELETE", "/v1/networks/race?force=true", None);
    eventually(20, "node b drops the deleted network", || {
        b.daemon.call("GET", "/v1/networks/race", None).0 == 404
    });
}

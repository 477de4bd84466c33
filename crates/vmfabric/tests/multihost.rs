//! Three nodes of a cluster on one machine: each node a network namespace with a
//! vmfabric daemon, joined by an underlay bridge; a three-member etcd on the bridge's
//! address; guests as namespaces on the daemons' TAP ports. A network created on one
//! node is served by all; guests on different nodes lease distinct addresses, reach
//! each other through the VXLAN tunnels and by name, and each reach the same gateway
//! address on their own node; the race for one last address has one winner; forged
//! VXLAN from a stranger, or from a member in another node's name, is dropped and
//! counted; node b killed with its etcd member: the others go on and still lease;
//! etcd stopped: traffic and renewals go on while a new lease is refused and counted;
//! a restarted node rebuilds with nothing held twice. A kernel-mode node beside a
//! userspace node on one dual-stack network. IPv6 between two userspace nodes: SLAAC
//! and DHCPv6 addresses, names, and locks on remote guests. Needs root, etcd, busybox,
//! dig and dhclient (and QEMU's guest).

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

/// Starts node `name`'s daemon in `ns`; `extra` are more `serve` flags.
fn start_node(name: &str, ns: &str, underlay: &str, etcd: &str, dir: &Path, guests: &Path, extra: &[&str]) -> Node {
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
    let args: Vec<&OsStr> = args.iter().chain(extra).map(OsStr::new).collect();
    Node {
        daemon: harness::Process::start_in(Some(ns), dir, guests, &args),
        ns: ns.to_string(),
        underlay: underlay.to_string(),
    }
}

/// The underlay: a bridge in this namespace at `198.18.{id}.1`, and a namespace per
/// node (`mh{id}{node}`) on a veth at `.11`, `.12`, ...; with the addresses' first
/// three octets.
fn underlay(id: u32, nodes: &[&str]) -> (Bridge, Vec<Netns>, String) {
    let bridge = Bridge(format!("vmfu{id}"));
    let _ = Command::new("ip")
        .args(["link", "del", &bridge.0])
        .stderr(std::process::Stdio::null())
        .status();
    run(&["ip", "link", "add", &bridge.0, "type", "bridge"]);
    let base = format!("198.18.{id}");
    run(&["ip", "addr", "add", &format!("{base}.1/24"), "dev", &bridge.0]);
    run(&["ip", "link", "set", &bridge.0, "up"]);
    let node_ns: Vec<Netns> = nodes.iter().map(|n| Netns::new(&format!("mh{id}{n}"))).collect();
    for (i, ns) in node_ns.iter().enumerate() {
        let (outer, inner) = (format!("{}o", ns.0), format!("{}i", ns.0));
        run(&["ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner]);
        run(&["ip", "link", "set", &outer, "master", &bridge.0, "up"]);
        run(&["ip", "link", "set", &inner, "netns", &ns.0]);
        let addr = format!("{base}.{}/24", 11 + i);
        run(&["ip", "-n", &ns.0, "addr", "add", &addr, "dev", &inner]);
        run(&["ip", "-n", &ns.0, "link", "set", &inner, "up"]);
        run(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
    }
    (bridge, node_ns, base)
}

/// What each test stands on: its id (its addresses and names), a scratch directory,
/// the underlay with a namespace per node, and etcd on the bridge's address.
struct Bed {
    id: u32,
    dir: PathBuf,
    _bridge: Bridge,
    node_ns: Vec<Netns>,
    base: String,
    etcd: testkit::Etcd,
}

/// A test bed for `nodes` and `members` etcd members, or None (said why) when this
/// machine cannot run one. `variant` keeps the tests of this binary apart.
fn bed(variant: u32, nodes: &[&str], members: usize) -> Option<Bed> {
    if !testkit::ready_or_skip(testkit::is_root(), "needs root (namespaces, TAP devices, bridges)") {
        return None;
    }
    let have_etcd = Command::new("etcd").arg("--version").output().is_ok();
    if !testkit::ready_or_skip(have_etcd, "needs etcd (apt-get install etcd-server)") {
        return None;
    }
    let id = (std::process::id() % 200 + 20) ^ variant;
    let dir = std::env::temp_dir().join(format!("vmf-multihost-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (bridge, node_ns, base) = underlay(id, nodes);
    let etcd = testkit::Etcd::start_members(&format!("{base}.1"), dir.join("etcd"), members).unwrap();
    Some(Bed {
        id,
        dir,
        _bridge: bridge,
        node_ns,
        base,
        etcd,
    })
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

/// After its node's daemon restarted (making the port's TAP device again, in the node's
/// namespace), moves guest `ns` back onto port `port` of `net`, with the port's MAC.
fn reattach(node: &Node, net: &str, port: &str, ns: &Netns) {
    run(&["ip", "-n", &node.ns, "link", "set", &ns.0, "netns", &ns.0]);
    let ports = node.daemon.ok("GET", &format!("/v1/networks/{net}/ports"), None);
    let mac = ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port)
        .unwrap_or_else(|| panic!("no port {port}: {ports}"))["mac"]
        .as_str()
        .unwrap()
        .to_string();
    run(&["ip", "-n", &ns.0, "link", "set", &ns.0, "address", &mac]);
    run(&["ip", "-n", &ns.0, "link", "set", &ns.0, "up"]);
}

/// A guest namespace `{prefix}{port}` on a new port `port` of `net` on `node`.
fn on_port(node: &Node, net: &str, prefix: &str, port: &str) -> Netns {
    let ns = Netns::new(&format!("{prefix}{port}"));
    guest(node, net, port, &ns);
    ns
}

/// What `name` resolves to at `server`, asked from namespace `ns` with dig.
fn dig(ns: &str, server: &str, name: &str) -> String {
    dig_record(ns, server, "A", name)
}

/// `name`'s records of type `qtype` at `server`, asked from namespace `ns` with dig.
fn dig_record(ns: &str, server: &str, qtype: &str, name: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "dig", "+short", "+time=1", "+tries=1"])
        .args([&format!("@{server}"), qtype, name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// etcd's view of the cluster, read as a node would (a few tries: a fresh client may
/// first pick a member that is down).
fn etcd_view(etcd: &testkit::Etcd) -> vmfabric::cluster::ClusterView {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut last = None;
        for _ in 0..10 {
            let store = vmfabric::cluster::ClusterStore::connect(
                &etcd.endpoints,
                "/vmfabric",
                "test",
                Duration::from_secs(3),
                None,
            );
            match store.await {
                Ok(s) => match s.view().await {
                    Ok(v) => return v,
                    Err(e) => last = Some(e),
                },
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        panic!("etcd never answered: {last:?}")
    })
}

/// One udhcpc exchange in `ns` (a few tries): the address, or None if none came.
fn lease(ns: &str, dir: &Path, tries: u32) -> Option<String> {
    testkit::udhcpc(ns, ns, dir, tries, &[]).and_then(|env| env.get("ip").cloned())
}

/// Whether `ns` fetches the test guest's web page from `ip`.
fn fetches_page(ns: &str, ip: &str) -> bool {
    let page = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "-m", "2"])
        .arg(format!("http://{ip}/"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&page.stdout).contains("hello from vmfabric guest")
}

/// Whether `ns` gets an answer from `ip` (IPv4 or IPv6) to one ping.
fn pings(ns: &str, ip: impl std::fmt::Display) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "busybox", "ping", "-c", "1", "-W", "1"])
        .arg(ip.to_string())
        .output()
        .unwrap()
        .status
        .success()
}

/// Waits until guest `ns` has formed `want` (its SLAAC address) and is past DAD.
fn formed(ns: &Netns, want: std::net::Ipv6Addr) {
    eventually(20, "the guest's SLAAC address is formed and past DAD", || {
        let shown = run(&["ip", "-n", &ns.0, "-6", "addr", "show", "dev", &ns.0]);
        shown
            .lines()
            .any(|l| l.contains(&format!("{want}/")) && !l.contains("tentative"))
    });
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

/// A VXLAN datagram for `vni` carrying an Ethernet frame from `src` to broadcast:
/// an ARP probe, or with `from` an IPv4 UDP datagram from that address.
fn vxlan_datagram(vni: u32, src: [u8; 6], from: Option<[u8; 4]>) -> Vec<u8> {
    let mut d = vxlan_header(vni, src);
    match from {
        None => {
            d.extend_from_slice(&[0x08, 0x06]);
            d.extend_from_slice(&[0; 46]);
        }
        Some(ip) => {
            d.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]);
            d.extend_from_slice(&ip);
            d.extend_from_slice(&[255, 255, 255, 255, 0, 9, 0, 9, 0, 8, 0, 0]);
            d.extend_from_slice(&[0; 18]);
        }
    }
    d
}

/// A VXLAN datagram for `vni` carrying an IPv6 UDP datagram from `src` at `from` to
/// all nodes (ff02::1).
fn vxlan_ipv6_datagram(vni: u32, src: [u8; 6], from: std::net::Ipv6Addr) -> Vec<u8> {
    let mut d = vxlan_header(vni, src);
    d.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 8, 17, 64]);
    d.extend_from_slice(&from.octets());
    d.extend_from_slice(&std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets());
    d.extend_from_slice(&[0, 9, 0, 9, 0, 8, 0, 0]);
    d
}

/// The VXLAN header for `vni` and an inner Ethernet header from `src` to broadcast,
/// its ethertype left to the caller.
fn vxlan_header(vni: u32, src: [u8; 6]) -> Vec<u8> {
    let mut d = vec![0x08, 0, 0, 0];
    d.extend_from_slice(&vni.to_be_bytes()[1..]);
    d.push(0);
    d.extend_from_slice(&[0xff; 6]);
    d.extend_from_slice(&src);
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
fn a_cluster_network_spans_three_nodes_through_vxlan_with_addresses_claimed_in_etcd() {
    // Three etcd members (member 1 counts as node b's: it goes down with it).
    let Some(Bed {
        id,
        dir,
        _bridge,
        node_ns,
        base,
        mut etcd,
    }) = bed(0, &["a", "b", "c"], 3)
    else {
        return;
    };
    let guest_image = std::env::var_os("VMFABRIC_GUEST_DIR").map(PathBuf::from);
    let with_vm = testkit::ready_or_skip(
        guest_image.is_some(),
        "the QEMU guest part needs VMFABRIC_GUEST_DIR (guest/build.sh DIR)",
    );
    let guests = guest_image.unwrap_or_else(|| dir.clone());
    let start = |i: usize| {
        let name = ["a", "b", "c"][i];
        let underlay = format!("{base}.{}", 11 + i);
        start_node(
            name,
            &node_ns[i].0,
            &underlay,
            &etcd.endpoint_list(),
            &dir.join(name),
            &guests,
            &[],
        )
    };
    let (mut a, b, mut c) = (start(0), start(1), start(2));

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
    for n in [&b, &c] {
        eventually(20, "every node serves the network", || {
            n.daemon.call("GET", "/v1/networks/span", None).0 == 200
        });
    }
    // A real QEMU guest on node a, serving HTTP: it boots while the rest goes on.
    if with_vm {
        a.daemon.ok(
            "POST",
            "/v1/vms",
            Some(json!({"name": "web", "network": "span", "http": true})),
        );
    }

    // A guest on each node: distinct addresses; a and c reach each other through
    // the tunnel, by name too, and the same gateway address on their own node.
    let prefix = format!("mh{id}");
    let (ga, gb, gc) = (
        on_port(&a, "span", &prefix, "sa"),
        on_port(&b, "span", &prefix, "sb"),
        on_port(&c, "span", &prefix, "sc"),
    );
    let leased = |ns: &Netns, n: &Node| {
        lease(&ns.0, &dir.join(&ns.0), 10).unwrap_or_else(|| panic!("{} leased no address: {}", ns.0, dhcp_lines(n)))
    };
    let (ip_a, ip_b, ip_c) = (leased(&ga, &a), leased(&gb, &b), leased(&gc, &c));
    assert!(
        ip_a != ip_b && ip_b != ip_c && ip_a != ip_c,
        "one address handed out twice: {ip_a} {ip_b} {ip_c}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pings(&ga.0, &ip_c) {
        assert!(
            Instant::now() < deadline,
            "guest a never pinged guest c across nodes\nnode a:\n{}\nnode c:\n{}",
            dhcp_lines(&a),
            dhcp_lines(&c)
        );
    }
    assert!(pings(&gc.0, &ip_a) && pings(&gb.0, &ip_a));
    let gateway = format!("10.66.{id}.1");
    assert!(pings(&ga.0, &gateway) && pings(&gc.0, &gateway));
    eventually(20, "guest a resolves guest c's name on its own node", || {
        dig(&ga.0, &gateway, "sc") == ip_c
    });
    assert_eq!(dig(&gc.0, &gateway, "sa"), ip_a);
    // A port that learns its MAC (the VMM picks one): the MAC it sends from is
    // published once seen, so a guest on another node reaches it.
    let gl = Netns::new(&format!("{prefix}sl"));
    a.daemon.ok(
        "POST",
        "/v1/networks/span/ports",
        Some(json!({"name": "sl", "kind": "tap", "ifname": gl.0, "learn_mac_once": true})),
    );
    run(&["ip", "-n", &a.ns, "link", "set", &gl.0, "netns", &gl.0]);
    let own_mac = format!("02:00:00:00:77:{:02x}", id % 256);
    run(&["ip", "-n", &gl.0, "link", "set", &gl.0, "address", &own_mac]);
    run(&["ip", "-n", &gl.0, "link", "set", "lo", "up"]);
    run(&["ip", "-n", &gl.0, "link", "set", &gl.0, "up"]);
    let ip_l = leased(&gl, &a);
    eventually(20, "guest c reaches the guest whose port learned its MAC", || {
        pings(&gc.0, &ip_l)
    });
    let rx = "vmfabric_vxlan_total{what=\"rx_frames\"}";
    assert!(
        metric(&a, rx) > 0 && metric(&c, rx) > 0,
        "frames came through the tunnel"
    );
    assert!(
        metric(&a, "vmfabric_vxlan_total{what=\"kept_local\"}") > 0,
        "the gateway's frames stayed on their node"
    );

    // Guest c finds the QEMU guest on node a by name and fetches its page.
    if with_vm {
        let web = a.daemon.wait_vm("web", &["ready", "failed"]);
        assert_eq!(web["state"], "ready", "{web}");
        let web_ip = web["ip"].as_str().unwrap().to_string();
        eventually(20, "guest c resolves the VM's name", || {
            dig(&gc.0, &gateway, "web") == web_ip
        });
        // Ready is told before the guest's httpd listens: a few tries.
        eventually(20, "guest c fetches the VM's page across nodes", || {
            fetches_page(&gc.0, &web_ip)
        });
    }

    // The race: one address left, a new guest on nodes a and b asks at once.
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
    let (ra, rb) = (on_port(&a, "race", &prefix, "ra"), on_port(&b, "race", &prefix, "rb"));
    let (dir_ra, dir_rb) = (dir.join("ra"), dir.join("rb"));
    let (ns_ra, ns_rb) = (ra.0.clone(), rb.0.clone());
    let first = std::thread::spawn(move || lease(&ns_ra, &dir_ra, 3));
    let second = std::thread::spawn(move || lease(&ns_rb, &dir_rb, 3));
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
    let forged = vxlan_datagram(vni, [0x02, 0, 0, 0, 0x66, 1], None);
    stranger.send_to(&forged, format!("{}:4789", c.underlay)).unwrap();
    // And node b's own guest, from an address it does not hold: its lock holds on
    // the other nodes too.
    let mac_b = b.daemon.ok("GET", "/v1/networks/span/ports", None)[0]["mac"]
        .as_str()
        .unwrap()
        .to_string();
    let not_held = [10, 66, id as u8, 200];
    let spoofed_before = metric(&a, "vmfabric_vxlan_total{what=\"spoofed\"}");
    let (from_b, to_a) = (b.underlay.clone(), a.underlay.clone());
    testkit::in_ns(&b.ns, move || {
        let s = UdpSocket::bind(format!("{from_b}:0")).unwrap();
        s.send_to(&vxlan_datagram(vni, mac_a, None), format!("{to_a}:4789"))
            .unwrap();
        let spoofed = vxlan_datagram(vni, parse_mac(&mac_b), Some(not_held));
        s.send_to(&spoofed, format!("{to_a}:4789")).unwrap();
    });
    eventually(10, "the forged datagrams are counted", || {
        metric(&c, "vmfabric_vxlan_total{what=\"from_stranger\"}") >= 1
            && metric(&a, "vmfabric_vxlan_total{what=\"foreign_mac\"}") >= 1
            && metric(&a, "vmfabric_vxlan_total{what=\"spoofed\"}") > spoofed_before
    });

    // Node b dies with its etcd member: a and c go on, new leases are granted (two
    // members of three are a quorum), and b's MACs leave with its etcd lease.
    b.daemon.kill_9();
    etcd.stop_member(1);
    assert!(pings(&ga.0, &ip_c), "a and c never needed b");
    let gd = on_port(&a, "span", &prefix, "sd");
    let ip_d = leased(&gd, &a);
    assert!(![&ip_a, &ip_b, &ip_c].contains(&&ip_d), "{ip_d} handed out twice");
    eventually(20, "node b is gone from etcd with its MACs", || {
        let view = etcd_view(&etcd);
        let span = &view.networks["span"];
        !view.nodes.contains_key("b") && !span.members.contains("b") && span.macs.values().all(|n| n != "b")
    });

    // etcd stopped: traffic goes on, a bound guest renews from its node's leases,
    // a new guest's lease is refused (fail closed) and counted.
    etcd.stop();
    assert!(
        pings(&ga.0, &ip_c) || pings(&ga.0, &ip_c),
        "traffic needs no etcd\nnode a:\n{}\nnode c:\n{}",
        dhcp_lines(&a),
        dhcp_lines(&c)
    );
    assert_eq!(
        lease(&ga.0, &dir.join(&ga.0), 5).as_deref(),
        Some(ip_a.as_str()),
        "renewed"
    );
    let ge = on_port(&c, "span", &prefix, "se");
    assert_eq!(lease(&ge.0, &dir.join(&ge.0), 3), None, "no new lease without etcd");
    assert!(metric(&c, "vmfabric_dhcp_store_unavailable_total{network=\"span\"}") > 0);
    assert_eq!(metric(&c, "vmfabric_cluster_store_up"), 0);
    // Back: the new guest leases an address no one else holds.
    etcd.start_again();
    eventually(30, "node c sees etcd again", || {
        metric(&c, "vmfabric_cluster_store_up") == 1
    });
    let ip_e = leased(&ge, &c);
    assert!(
        ![&ip_a, &ip_b, &ip_c, &ip_d].contains(&&ip_e),
        "{ip_e} handed out twice"
    );

    // Node a restarts: it rebuilds from its own store and etcd, its guest (on a new
    // TAP device, as after a VMM restart) keeps its address, nothing is held twice.
    let a_dir = dir.join("a");
    drop(a);
    a = start_node(
        "a",
        &node_ns[0].0,
        &format!("{base}.11"),
        &etcd.endpoint_list(),
        &a_dir,
        &guests,
        &[],
    );
    eventually(20, "node a serves the network again", || {
        a.daemon.call("GET", "/v1/networks/span", None).0 == 200 && metric(&a, "vmfabric_cluster_store_up") == 1
    });
    reattach(&a, "span", "sa", &ga);
    assert_eq!(
        lease(&ga.0, &dir.join(&ga.0), 10).as_deref(),
        Some(ip_a.as_str()),
        "kept its address"
    );
    eventually(20, "guest a reaches guest c again", || pings(&ga.0, &ip_c));
    let view = etcd_view(&etcd);
    let span = &view.networks["span"];
    no_mac_holds_two(span);
    assert!(span.members.contains("a") && view.nodes.contains_key("a"));

    // Deleted on one node, gone from the others.
    a.daemon.ok("DELETE", "/v1/networks/race?force=true", None);
    eventually(20, "node c drops the deleted network", || {
        c.daemon.call("GET", "/v1/networks/race", None).0 == 404
    });

    // Everything restarted at once (b stays dead), etcd too: the nodes rebuild from
    // their stores and etcd, their guests keep their addresses and reach each other,
    // and nothing is held twice.
    drop(a);
    drop(c);
    etcd.stop();
    etcd.start_again();
    let restart = |name: &str, i: usize| {
        start_node(
            name,
            &node_ns[i].0,
            &format!("{base}.{}", 11 + i),
            &etcd.endpoint_list(),
            &dir.join(name),
            &guests,
            &[],
        )
    };
    (a, c) = (restart("a", 0), restart("c", 2));
    for n in [&a, &c] {
        eventually(30, "each node serves the network again", || {
            n.daemon.call("GET", "/v1/networks/span", None).0 == 200 && metric(n, "vmfabric_cluster_store_up") == 1
        });
    }
    reattach(&a, "span", "sa", &ga);
    reattach(&c, "span", "sc", &gc);
    for (ns, ip) in [(&ga, &ip_a), (&gc, &ip_c)] {
        assert_eq!(
            lease(&ns.0, &dir.join(&ns.0), 10).as_deref(),
            Some(ip.as_str()),
            "kept its address"
        );
    }
    eventually(20, "guests a and c reach each other after the restart", || {
        pings(&ga.0, &ip_c) && pings(&gc.0, &ip_a)
    });
    let view = etcd_view(&etcd);
    let span = &view.networks["span"];
    no_mac_holds_two(span);
    assert_eq!(
        span.members,
        ["a", "c"].map(String::from).into(),
        "members: {:?}",
        span.members
    );
}

/// A kernel-mode node (a Linux bridge with a vxlan device, forwarding entries from
/// etcd) and a userspace node serve one network: a QEMU guest on the kernel node's TAP
/// port and a namespace guest on the userspace node lease distinct addresses (claimed
/// in etcd), reach each other through the two kinds of VTEP, over IPv4 and IPv6, by
/// name at their own gateway; the kernel node drops VXLAN from a stranger and a remote
/// guest's frame from an IPv4 or IPv6 address it does not hold, and counts both.
#[test]
fn a_kernel_mode_node_and_a_userspace_node_share_a_network() {
    let Some(image) = std::env::var_os("VMFABRIC_GUEST_DIR").map(PathBuf::from) else {
        testkit::ready_or_skip(
            false,
            "needs VMFABRIC_GUEST_DIR (guest/build.sh DIR) for its QEMU guest",
        );
        return;
    };
    let Some(t) = bed(1, &["u", "k"], 1) else { return };
    let (id, dir, base, etcd, node_ns) = (t.id, &t.dir, &t.base, &t.etcd, &t.node_ns);
    let endpoints = etcd.endpoint_list();
    let u = start_node(
        "u",
        &node_ns[0].0,
        &format!("{base}.11"),
        &endpoints,
        &dir.join("u"),
        &image,
        &[],
    );
    let start_k = || {
        start_node(
            "k",
            &node_ns[1].0,
            &format!("{base}.12"),
            &endpoints,
            &dir.join("k"),
            &image,
            &["--cluster-mode", "kernel"],
        )
    };
    let mut k = start_k();

    // Made on the kernel node; each node serves it in its own mode.
    let subnet = format!("10.68.{id}.0/24");
    let prefix: ipnet::Ipv6Net = format!("fd68:{id:x}::/64").parse().unwrap();
    let created = k.daemon.ok(
        "POST",
        "/v1/networks",
        Some(json!({"name": "mixed", "subnet": subnet, "ipv6": prefix.to_string(), "mtu": 1450, "scope": "cluster"})),
    );
    assert_eq!(created["mode"], "kernel", "{created}");
    let vni = created["vni"].as_u64().unwrap() as u32;
    eventually(20, "the userspace node serves the network", || {
        u.daemon.call("GET", "/v1/networks/mixed", None).0 == 200
    });
    assert_eq!(u.daemon.ok("GET", "/v1/networks/mixed", None)["mode"], "userspace");
    let gu = on_port(&u, "mixed", &format!("mh{id}"), "su");
    let ip_u = lease(&gu.0, &dir.join(&gu.0), 10)
        .unwrap_or_else(|| panic!("the userspace guest leased no address: {}", dhcp_lines(&u)));
    // The second address is a kernel node's gateway's on every node.
    assert!(!ip_u.ends_with(".2") && !ip_u.ends_with(".1"), "{ip_u}");
    let mac_u: fabric::Mac = u.daemon.ok("GET", "/v1/networks/mixed/ports", None)[0]["mac"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let slaac_u = gateway::config::slaac_address(prefix.network(), mac_u);
    formed(&gu, slaac_u);

    // A QEMU guest on the kernel node's TAP port pings the userspace guest (over IPv4
    // and, from its own SLAAC address, IPv6) and resolves its name at its own gateway.
    let port = k.daemon.ok(
        "POST",
        "/v1/networks/mixed/ports",
        Some(json!({"name": "kvm", "kind": "tap"})),
    );
    let nic = vm::Nic {
        backend: vm::NicBackend::Tap {
            ifname: port["path"].as_str().unwrap().to_string(),
        },
        mac: port["mac"].as_str().unwrap().parse().unwrap(),
    };
    let slaac_k = gateway::config::slaac_address(prefix.network(), nic.mac);
    let cmd = format!(
        "ping -c 3 -W 2 {ip_u} && echo ACROSS-OK; nslookup su && echo NAMED-OK; \
         for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do \
         ping6 -c 1 -W 1 {slaac_u} >/dev/null && echo V6-OK && break; sleep 1; done"
    );
    let (log, image) = (dir.join("kvm.log"), image.clone());
    let mut kvm = testkit::in_ns(&k.ns, move || {
        testkit::Guest::boot(&image, log, nic, "kvm", Some(&cmd), &["VMF_HTTP=1", "VMF_END=hang"])
    });
    let out = kvm.wait_for("VMFABRIC_CMD_EXIT");
    let ip_k = testkit::ready_ip(&out).unwrap();
    assert!(
        out.contains("ACROSS-OK") && out.contains("NAMED-OK") && out.contains("V6-OK"),
        "the kernel node's guest reached the userspace guest by address and name:\n{out}\nnode k:\n{}",
        dhcp_lines(&k)
    );
    assert_ne!(ip_k, ip_u);

    // The userspace guest finds the QEMU guest by name at its own gateway, and fetches
    // its page (TCP both ways through both VTEPs).
    let gateway = format!("10.68.{id}.1");
    eventually(20, "the userspace guest resolves the kernel node's guest", || {
        dig(&gu.0, &gateway, "kvm") == ip_k
    });
    eventually(20, "the userspace guest fetches the kernel node's guest's page", || {
        fetches_page(&gu.0, &ip_k)
    });
    assert_eq!(dig_record(&gu.0, &gateway, "AAAA", "kvm"), slaac_k.to_string());
    // Its first ping may wait for neighbour discovery across the tunnel.
    eventually(
        10,
        "the userspace guest pings the kernel node's guest over IPv6",
        || pings(&gu.0, slaac_k),
    );
    let view = etcd_view(etcd);
    let mixed = &view.networks["mixed"];
    let holder = |ip: &str| mixed.addresses[&ip.parse().unwrap()].node.clone();
    assert_eq!((holder(&ip_u), holder(&ip_k)), ("u".to_string(), "k".to_string()));
    assert!(mixed.members.contains("u") && mixed.members.contains("k"));

    // Reservations are claimed cluster-wide: the kernel node's guest's address is not
    // reservable on the userspace node for another MAC; a free one is, held in etcd by
    // that MAC until the reservation goes.
    let other_mac = "02:00:00:00:68:01";
    let (status, body) = u.daemon.call(
        "POST",
        "/v1/networks/mixed/reservations",
        Some(json!({"key": other_mac, "ip": ip_k})),
    );
    assert_eq!(status, 409, "{body}");
    let free = format!("10.68.{id}.250");
    u.daemon.ok(
        "POST",
        "/v1/networks/mixed/reservations",
        Some(json!({"key": other_mac, "ip": free})),
    );
    let free: std::net::Ipv4Addr = free.parse().unwrap();
    let holder = etcd_view(etcd).networks["mixed"]
        .addresses
        .get(&free)
        .map(|h| h.mac.to_string());
    assert_eq!(holder.as_deref(), Some(other_mac));
    u.daemon
        .ok("DELETE", &format!("/v1/networks/mixed/reservations/{other_mac}"), None);
    assert!(!etcd_view(etcd).networks["mixed"].addresses.contains_key(&free));

    // The kernel node restarts (its guest runs on): the vxlan device is made again
    // and programmed from etcd, and the guests reach each other as before.
    drop(k);
    k = start_k();
    eventually(
        20,
        "the restarted kernel node carries the guests' traffic again",
        || pings(&gu.0, &ip_k),
    );

    // An egress policy set on the kernel node is the network's: the userspace node's
    // gateway holds its own guest's NAT egress to it.
    let web = std::net::TcpListener::bind(format!("{base}.1:0")).unwrap();
    let web_url = format!("http://{}/", web.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in web.incoming().flatten() {
            let mut request = [0u8; 512];
            let _ = s.read(&mut request);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    run(&["ip", "-n", &gu.0, "route", "replace", "default", "via", &gateway]);
    let egress = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &gu.0, "curl", "-s", "-m", "2", &web_url])
            .output()
            .unwrap();
        out.stdout == b"ok"
    };
    assert!(egress(), "the userspace node's guest reaches the underlay through NAT");
    let deny = json!({"default": "allow", "rules": [{"action": "deny", "dst": format!("{base}.0/24")}]});
    k.daemon.ok("PUT", "/v1/networks/mixed/policy", Some(deny.clone()));
    eventually(
        20,
        "the policy set on the kernel node holds on the userspace node",
        || !egress(),
    );
    assert_eq!(u.daemon.ok("GET", "/v1/networks/mixed/policy", None), deny);

    // The kernel node refuses VXLAN from a stranger, the userspace guest's MAC from
    // another registered node, and from an address it does not hold.
    run(&[
        "ip",
        "addr",
        "add",
        &format!("{base}.2/24"),
        "dev",
        &format!("vmfu{id}"),
    ]);
    let stranger = UdpSocket::bind(format!("{base}.2:0")).unwrap();
    let forged = vxlan_datagram(vni, [0x02, 0, 0, 0, 0x66, 2], None);
    stranger.send_to(&forged, format!("{}:4789", k.underlay)).unwrap();
    // Node f: registered in etcd (at this namespace's underlay address), no guests.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let f = rt
        .block_on(vmfabric::cluster::ClusterStore::connect(
            &etcd.endpoints,
            "/vmfabric",
            "f",
            Duration::from_secs(3),
            None,
        ))
        .unwrap();
    let f_lease = rt.block_on(f.grant_lease(Duration::from_secs(60))).unwrap();
    rt.block_on(f.register(format!("{base}.1").parse().unwrap(), f_lease))
        .unwrap();
    let as_f = UdpSocket::bind(format!("{base}.1:0")).unwrap();
    eventually(20, "node f's datagram in node u's guest's name is refused", || {
        as_f.send_to(&vxlan_datagram(vni, mac_u.0, None), format!("{}:4789", k.underlay))
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        metric(&k, "vmfabric_vxlan_total{what=\"foreign_mac\"}") >= 1
    });
    let spoofed = vxlan_datagram(vni, mac_u.0, Some([10, 68, id as u8, 200]));
    let (from_u, to_k, ns_u) = (u.underlay.clone(), k.underlay.clone(), u.ns.clone());
    let send_from_u = move |datagram: Vec<u8>| {
        let (from_u, to_k) = (from_u.clone(), to_k.clone());
        testkit::in_ns(&ns_u, move || {
            let s = UdpSocket::bind(format!("{from_u}:0")).unwrap();
            s.send_to(&datagram, format!("{to_k}:4789")).unwrap();
        })
    };
    send_from_u(spoofed);
    let refused = || metric(&k, "vmfabric_vxlan_total{what=\"refused_frames\"}");
    eventually(10, "the kernel node counts what it refused", || {
        metric(&k, "vmfabric_vxlan_total{what=\"from_stranger\"}") >= 1 && refused() >= 1
    });
    // Over IPv6 too: the guest's own address passes, another is refused.
    let before = refused();
    let not_held = std::net::Ipv6Addr::from(u128::from(prefix.network()) | 0xbad);
    send_from_u(vxlan_ipv6_datagram(vni, mac_u.0, slaac_u));
    send_from_u(vxlan_ipv6_datagram(vni, mac_u.0, not_held));
    eventually(
        10,
        "the kernel node refuses the remote guest's spoofed IPv6 source",
        || refused() > before,
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(refused(), before + 1, "the remote guest's own IPv6 address passed");
    assert!(pings(&gu.0, &ip_k), "the refusals took nothing else");

    // Nothing the kernel node sent was in a MAC etcd does not place on it (its vxlan
    // device, with IPv6 on, sent solicitations and reports of its own).
    assert_eq!(
        metric(&u, "vmfabric_vxlan_total{what=\"foreign_mac\"}"),
        0,
        "the userspace node refused frames from the kernel node"
    );
    // The kernel port's address goes back to the cluster with the port.
    drop(kvm);
    k.daemon.ok("DELETE", "/v1/networks/mixed/ports/kvm", None);
    let ip_k: std::net::Ipv4Addr = ip_k.parse().unwrap();
    eventually(10, "the kernel port's address is given back in etcd", || {
        !etcd_view(etcd).networks["mixed"].addresses.contains_key(&ip_k)
    });
}

/// Two userspace nodes on a dual-stack cluster network: guests form their SLAAC
/// addresses and reach each other over IPv6 by name; DHCPv6 stays on a guest's node;
/// a remote guest's IPv6 frames from an address not its own are dropped.
#[test]
fn a_cluster_network_carries_ipv6_between_userspace_nodes() {
    let Some(t) = bed(2, &["a", "c"], 1) else { return };
    let (id, dir) = (t.id, &t.dir);
    let start = |i: usize, name: &str| {
        let underlay = format!("{}.{}", t.base, 11 + i);
        let endpoints = t.etcd.endpoint_list();
        start_node(name, &t.node_ns[i].0, &underlay, &endpoints, &dir.join(name), dir, &[])
    };
    let (a, c) = (start(0, "a"), start(1, "c"));
    let prefix: ipnet::Ipv6Net = format!("fd67:{id:x}::/64").parse().unwrap();
    let created = a.daemon.ok(
        "POST",
        "/v1/networks",
        Some(json!({
            "name": "six", "subnet": format!("10.67.{id}.0/24"), "ipv6": prefix.to_string(),
            "mtu": 1450, "scope": "cluster",
        })),
    );
    let vni = created["vni"].as_u64().unwrap() as u32;
    eventually(20, "node c serves the network", || {
        c.daemon.call("GET", "/v1/networks/six", None).0 == 200
    });
    // IPv6 reservations would need claims in etcd; the guests' own addresses do not.
    let (status, body) = a.daemon.call(
        "POST",
        "/v1/networks/six/reservations",
        Some(json!({"key": "02:00:00:00:67:01", "ip": format!("10.67.{id}.50"), "ipv6": format!("{}50", prefix.network())})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("IPv4 only"), "{body}");

    let ns_prefix = format!("mh{id}");
    let (ga, gc) = (
        on_port(&a, "six", &ns_prefix, "xa"),
        on_port(&c, "six", &ns_prefix, "xc"),
    );
    let mac_of = |n: &Node| -> fabric::Mac {
        n.daemon.ok("GET", "/v1/networks/six/ports", None)[0]["mac"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (mac_a, mac_c) = (mac_of(&a), mac_of(&c));
    for (ns, n) in [(&ga, &a), (&gc, &c)] {
        lease(&ns.0, &dir.join(&ns.0), 10).unwrap_or_else(|| panic!("{} leased no address: {}", ns.0, dhcp_lines(n)));
    }
    // Each guest forms its SLAAC address from its own node's advertisement.
    let slaac_a = gateway::config::slaac_address(prefix.network(), mac_a);
    let slaac_c = gateway::config::slaac_address(prefix.network(), mac_c);
    formed(&ga, slaac_a);
    formed(&gc, slaac_c);
    eventually(20, "guest a pings guest c over IPv6 across nodes", || {
        pings(&ga.0, slaac_c)
    });
    assert!(pings(&gc.0, slaac_a));
    let gateway6 = std::net::Ipv6Addr::from(u128::from(prefix.network()) | 1);
    assert!(
        pings(&ga.0, gateway6) && pings(&gc.0, gateway6),
        "each guest's own node answers as the gateway"
    );
    let gateway = format!("10.67.{id}.1");
    eventually(20, "guest a resolves guest c's AAAA on its own node", || {
        dig_record(&ga.0, &gateway, "AAAA", "xc") == slaac_c.to_string()
    });
    assert_eq!(dig_record(&gc.0, &gateway, "AAAA", "xa"), slaac_a.to_string());

    // DHCPv6 on node a: the guest's address is a function of its MAC, so no claim in
    // etcd; its SOLICIT goes to its own node's gateway alone, never through the tunnel.
    let (pid, leases) = (dir.join("dhclient6.pid"), dir.join("dhclient6.leases"));
    let out = Command::new("ip")
        .args(["netns", "exec", &ga.0, "timeout", "60", "dhclient", "-6", "-1", "-pf"])
        .args([
            pid.as_os_str(),
            OsStr::new("-lf"),
            leases.as_os_str(),
            OsStr::new(&ga.0),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dhclient -6: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = Command::new("kill")
        .arg(std::fs::read_to_string(&pid).unwrap_or_default().trim())
        .status();
    let dhcp6_a = gateway::config::dhcp6_address(prefix, mac_a);
    eventually(20, "guest c pings guest a's DHCPv6 address", || pings(&gc.0, dhcp6_a));
    let dhcp6_answers = |n: &Node| {
        let text = n.daemon.ok("GET", "/metrics", None);
        let text = text.as_str().unwrap_or_default().to_string();
        text.lines()
            .filter(|l| l.starts_with("vmfabric_dhcp6_messages"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert!(dhcp6_answers(&a) >= 2, "node a answered: {}", dhcp_lines(&a));
    assert_eq!(
        dhcp6_answers(&c),
        0,
        "node c's gateway heard guest a's DHCPv6: {}",
        dhcp_lines(&c)
    );

    // Guest c's MAC from node c, but from an IPv6 address it does not have: the lock
    // node a holds for it drops the frame.
    let spoofed_before = metric(&a, "vmfabric_vxlan_total{what=\"spoofed\"}");
    let (from_c, to_a) = (c.underlay.clone(), a.underlay.clone());
    let not_held = std::net::Ipv6Addr::from(u128::from(prefix.network()) | 0xbad);
    testkit::in_ns(&c.ns, move || {
        let s = UdpSocket::bind(format!("{from_c}:0")).unwrap();
        let own = vxlan_ipv6_datagram(vni, mac_c.0, slaac_c);
        s.send_to(&own, format!("{to_a}:4789")).unwrap();
        let spoofed = vxlan_ipv6_datagram(vni, mac_c.0, not_held);
        s.send_to(&spoofed, format!("{to_a}:4789")).unwrap();
    });
    eventually(10, "the spoofed IPv6 datagram is counted", || {
        metric(&a, "vmfabric_vxlan_total{what=\"spoofed\"}") == spoofed_before + 1
    });
}

/// Asserts that no MAC holds two live addresses of `net` in etcd.
fn no_mac_holds_two(net: &vmfabric::cluster::ClusterNetwork) {
    let mut holders: Vec<_> = net
        .addresses
        .values()
        .filter(|h| h.expires > now())
        .map(|h| h.mac)
        .collect();
    let held = holders.len();
    holders.sort_by_key(|m| m.0);
    holders.dedup();
    assert_eq!(holders.len(), held, "a MAC holds two addresses: {:?}", net.addresses);
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

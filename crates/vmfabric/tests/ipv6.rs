//! IPv6 on a userspace network, with real kernels: guest namespaces on TAP ports form
//! their addresses from the gateway's Router Advertisements (SLAAC), ping the gateway
//! and each other, resolve over IPv6 with dig (AAAA of a VM name, its PTR in
//! ip6.arpa, a forwarded name from a loopback upstream), and take a DHCPv6 lease with
//! ISC dhclient (the address works, shows in the leases, survives kill -9); a
//! hostile guest's Router Advertisement and its Neighbour Advertisement for another
//! guest's address reach no one (checked in the others' routes and neighbour tables,
//! and in its port's counters). On a kernel-mode network the bridge routes: guests
//! form addresses from the gateway's advertisements naming the bridge, reach an outside
//! namespace masqueraded, take DHCPv6, resolve AAAA at the gateway's ::2, and a hostile
//! port's RA, NAs, duplicate-address probe and spoofed source are stopped by the bridge
//! table. Needs root (TAP ports, namespaces; nft for kernel mode).

use std::net::Ipv6Addr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fabric::Mac;
use gateway::wire;
use serde_json::{json, Value};
use smoltcp::wire::{
    EthernetAddress, Icmpv6Repr, NdiscNeighborFlags, NdiscPrefixInfoFlags, NdiscPrefixInformation, NdiscRepr,
    NdiscRouterFlags,
};

mod harness;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmf-ipv6-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sh(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A namespace whose only link is a new TAP port of `network`, up with the port's MAC.
struct TapGuest {
    ns: testkit::Netns,
    ifname: String,
    mac: Mac,
}

fn tap_guest(d: &harness::Process, network: &str, name: &str) -> TapGuest {
    let ifname = format!("vmf6{name}{}", std::process::id() % 10000);
    let (s, v) = d.call(
        "POST",
        &format!("/v1/networks/{network}/ports"),
        Some(json!({"name": name, "kind": "tap", "ifname": ifname})),
    );
    assert_eq!(s, 201, "{v}");
    let mac = v["mac"].as_str().unwrap().to_string();
    let ns = testkit::Netns::new(&ifname);
    testkit::run(&["ip", "link", "set", &ifname, "netns", &ns.0]);
    testkit::run(&["ip", "-n", &ns.0, "link", "set", &ifname, "address", &mac]);
    testkit::run(&["ip", "-n", &ns.0, "link", "set", &ifname, "up"]);
    TapGuest {
        ns,
        ifname,
        mac: mac.parse().unwrap(),
    }
}

impl TapGuest {
    fn ip6(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", &self.ns.0, "-6"];
        all.extend(args);
        testkit::run(&all)
    }

    /// Waits for the kernel to form a global address from an advertised prefix.
    fn slaac_address(&self) -> Ipv6Addr {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let shown = self.ip6(&["addr", "show", "dev", &self.ifname, "scope", "global"]);
            let formed = shown.lines().find_map(|l| {
                let l = l.trim();
                let rest = l.strip_prefix("inet6 ")?;
                (!l.contains("tentative")).then(|| rest.split('/').next().unwrap().parse().unwrap())
            });
            if let Some(a) = formed {
                return a;
            }
            assert!(Instant::now() < deadline, "no address formed:\n{shown}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The default route, once the gateway's advertisement has set one.
    fn default_route(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let shown = self.ip6(&["route", "show", "default"]);
            if shown.contains("via") || Instant::now() > deadline {
                return shown;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs ISC dhclient -6 once (its files in `dir`) and checks it configured `want`.
    fn dhcpv6_address_is(&self, dir: &Path, want: Ipv6Addr) {
        let pid = dir.join(format!("dhclient6-{}.pid", self.ifname));
        let leases = dir.join(format!("dhclient6-{}.leases", self.ifname));
        let (ok, out) = sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns.0,
            "timeout",
            "60",
            "dhclient",
            "-6",
            "-1",
            "-v",
            "-pf",
            pid.to_str().unwrap(),
            "-lf",
            leases.to_str().unwrap(),
            &self.ifname,
        ]);
        assert!(ok, "dhclient -6 on {}: {out}", self.ifname);
        // Configured, and past duplicate address detection: a tentative address
        // answers nobody (CI once pinged it too early on a busy host).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let addrs = self.ip6(&["addr", "show", "dev", &self.ifname]);
            let line = addrs.lines().find(|l| l.contains(&format!("{want}/")));
            match line {
                Some(l) if !l.contains("tentative") => return,
                _ => assert!(
                    Instant::now() < deadline,
                    "{want} not configured, or still tentative:\n{addrs}\n{out}"
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// busybox's ping6 (setup.sh installs busybox-static), out of this guest's link.
    fn ping(&self, to: &str) -> (bool, String) {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns.0,
            "busybox",
            "ping6",
            "-I",
            &self.ifname,
            "-c",
            "2",
            "-W",
            "3",
            to,
        ])
    }
}

/// A hostile guest's Router Advertisement: itself as the default router, with a
/// prefix of its own (2001:db8:bad::/64) to autoconfigure from.
fn rogue_router_advert(mac: Mac) -> Icmpv6Repr<'static> {
    Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
        hop_limit: 64,
        flags: NdiscRouterFlags::empty(),
        router_lifetime: smoltcp::time::Duration::from_secs(1800),
        reachable_time: smoltcp::time::Duration::ZERO,
        retrans_time: smoltcp::time::Duration::ZERO,
        lladdr: Some(EthernetAddress(mac.0).into()),
        mtu: None,
        prefix_info: Some(NdiscPrefixInformation {
            prefix_len: 64,
            flags: NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF,
            valid_lifetime: smoltcp::time::Duration::from_secs(86400),
            preferred_lifetime: smoltcp::time::Duration::from_secs(14400),
            prefix: "2001:db8:bad::".parse().unwrap(),
        }),
    })
}

/// The modified EUI-64 address of `mac` in `prefix` (what Linux forms by default).
fn eui64(prefix: Ipv6Addr, mac: Mac) -> Ipv6Addr {
    gateway::config::slaac_address(prefix, mac)
}

fn port_drops(d: &harness::Process, network: &str, port: &str) -> Value {
    let (_, stats) = d.call("GET", "/v1/stats", None);
    let net = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["network"] == network)
        .unwrap();
    net["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == port)
        .map(|p| p["drops"].clone())
        .unwrap_or(Value::Null)
}

/// `vmfabric events --json` against a daemon, its lines gathered as they come.
struct EventStream {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl EventStream {
    /// Starts following, and returns once the stream is live: a port of its own comes
    /// up (its first datagram) and the stream has told of it. A port comes up once, so
    /// a probe that came up before the stream subscribed is replaced by a fresh one.
    fn follow(d: &harness::Process, dir: &Path) -> EventStream {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vmfabric"))
            .args(["events", "--json"])
            .env("VMFABRIC_SOCKET", &d.socket)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (out, sink) = (child.stdout.take().unwrap(), lines.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let stream = EventStream { child, lines };
        let network = d.call("GET", "/v1/networks", None).1[0]["name"]
            .as_str()
            .unwrap()
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        for attempt in 0.. {
            assert!(Instant::now() < deadline, "the event stream never went live");
            let name = format!("events-probe-{attempt}");
            let (probe, _) = raw_port(d, dir, &network, &name);
            let _ = probe.send(&[0u8; 60]);
            let told = Instant::now() + Duration::from_secs(2);
            while Instant::now() < told {
                if stream.saw(&format!(r#""port":"{name}""#)) {
                    return stream;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        unreachable!("the loop returns or fails")
    }

    fn saw(&self, fragment: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(fragment))
    }

    fn wait_for(&self, fragment: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.saw(fragment) {
            assert!(
                Instant::now() < deadline,
                "no event with {fragment}:\n{:#?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A unixgram port of `network` driven by the test: its socket and MAC.
fn raw_port(d: &harness::Process, dir: &Path, network: &str, name: &str) -> (UnixDatagram, Mac) {
    let (s, port) = d.call(
        "POST",
        &format!("/v1/networks/{network}/ports"),
        Some(json!({"name": name, "kind": "unixgram"})),
    );
    assert_eq!(s, 201, "{port}");
    let sock = UnixDatagram::bind(dir.join(format!("{name}.vm"))).unwrap();
    sock.connect(port["path"].as_str().unwrap()).unwrap();
    (sock, port["mac"].as_str().unwrap().parse().unwrap())
}

#[test]
fn guests_autoconfigure_from_the_gateway_and_a_hostile_guest_can_neither_route_nor_claim_addresses() {
    if !testkit::ready_or_skip(testkit::is_root(), "needs root for TAP ports and namespaces") {
        return;
    }
    let dir = tmp("slaac");
    // A daemon process, to be killed with -9 at the end.
    let no_guests = dir.join("no-guests");
    let d = harness::Process::start(&dir, &no_guests);
    let resolver = testkit::loopback_resolver(&dir, "outside.test", "192.0.2.7");
    let upstream = format!("127.0.0.1:{}", resolver.port);
    let (s, net) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "six", "subnet": "10.96.0.0/24", "ipv6": "auto",
                    "settings": {"dns": {"upstreams": [upstream]}}})),
    );
    assert_eq!(s, 201, "{net}");
    let prefix: ipnet::Ipv6Net = net["ipv6"].as_str().expect("a derived prefix").parse().unwrap();
    assert_eq!(prefix.prefix_len(), 64);
    assert_eq!(
        prefix.network().segments()[0] & 0xff00,
        0xfd00,
        "a unique local prefix: {prefix}"
    );
    let gateway_ip = Ipv6Addr::from(u128::from(prefix.network()) | 1);

    let a = tap_guest(&d, "six", "a");
    let b = tap_guest(&d, "six", "b");
    let a_ip = a.slaac_address();
    let b_ip = b.slaac_address();
    assert_eq!(a_ip, eui64(prefix.network(), a.mac));
    assert_eq!(b_ip, eui64(prefix.network(), b.mac));
    // The API shows what each port may send from.
    let (_, ports) = d.call("GET", "/v1/networks/six/ports", None);
    let port_a = ports.as_array().unwrap().iter().find(|p| p["name"] == "a").unwrap();
    assert!(
        port_a["ipv6"].as_array().unwrap().contains(&json!(a_ip.to_string())),
        "{port_a}"
    );

    // The gateway at its global and link-local addresses, and one guest from the other.
    let (ok, out) = a.ping(&gateway_ip.to_string());
    assert!(ok, "ping the gateway: {out}");
    let (_, shown) = d.call("GET", "/v1/networks/six", None);
    assert_eq!(shown["served"]["ipv6_address"], gateway_ip.to_string(), "{shown}");
    let gateway_ll = shown["served"]["ipv6_link_local"].as_str().unwrap().to_string();
    let (ok, out) = a.ping(&gateway_ll);
    assert!(ok, "ping the gateway's link-local address: {out}");
    let (ok, out) = b.ping(&a_ip.to_string());
    assert!(ok, "guest to guest: {out}");
    // The prefix is on the link, and the gateway is the default router.
    let routes = a.ip6(&["route", "show"]);
    assert!(routes.contains(&prefix.to_string()), "{routes}");
    assert!(a.default_route().contains(&gateway_ll), "{routes}");

    // Names over IPv6: a leases with a hostname (IPv4, as before); its name then has
    // an AAAA, its SLAAC address, which b reads from the gateway's IPv6 address.
    let lease = testkit::udhcpc_once(&a.ns.0, &a.ifname, &dir, &["-x", "hostname:alpha"]);
    assert!(lease.contains_key("ip"), "{lease:?}");
    assert_eq!(a.slaac_address(), a_ip, "the IPv4 lease left IPv6 alone");

    // A forward whose host side listens on IPv6 loopback reaches a's IPv4 server.
    let server = testkit::spawn_in_ns(&a.ns.0, || {
        use std::io::Write;
        let l = std::net::TcpListener::bind("0.0.0.0:8080").unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"hello over a v6 listener").unwrap();
    });
    let guest = format!("{}:8080", lease["ip"]);
    let (s, fw) = d.call(
        "POST",
        "/v1/networks/six/forwards",
        Some(json!({"host": "[::1]:0", "guest": guest})),
    );
    assert_eq!(s, 201, "{fw}");
    let host: std::net::SocketAddr = fw["host"].as_str().unwrap().parse().unwrap();
    assert!(host.is_ipv6() && host.port() != 0, "{fw}");
    let mut got = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.is_empty() && Instant::now() < deadline {
        use std::io::Read;
        if let Ok(mut c) = std::net::TcpStream::connect(host) {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = c.read_to_string(&mut got);
        }
        if got.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_eq!(got, "hello over a v6 listener");
    server.join().unwrap();
    let dig = |g: &TapGuest, args: &[&str]| {
        let server = format!("@{gateway_ip}");
        let mut all = vec![
            "ip", "netns", "exec", &g.ns.0, "dig", "+short", "+time=2", "+tries=2", &server,
        ];
        all.extend(args);
        let (ok, out) = sh(&all);
        assert!(ok, "dig {args:?}: {out}");
        out.trim().to_string()
    };
    assert_eq!(dig(&b, &["AAAA", "alpha.vm.internal"]), a_ip.to_string());
    assert_eq!(dig(&b, &["-x", &a_ip.to_string()]), "alpha.vm.internal.");
    assert_eq!(dig(&b, &["AAAA", "gateway.vm.internal"]), gateway_ip.to_string());
    assert_eq!(
        dig(&b, &["A", "outside.test"]),
        "192.0.2.7",
        "forwarded, asked over IPv6"
    );
    // DNS over TCP on the gateway's IPv6 address: local and forwarded answers.
    assert_eq!(dig(&b, &["+tcp", "AAAA", "alpha.vm.internal"]), a_ip.to_string());
    assert_eq!(dig(&a, &["+tcp", "A", "outside.test"]), "192.0.2.7");

    // DHCPv6 (stateful) with ISC dhclient: a's address is the one its port is locked
    // to, it works, the lease shows beside a's IPv4 lease, and the event stream says so.
    let events = EventStream::follow(&d, &dir);
    let want6 = gateway::config::dhcp6_address(prefix, a.mac);
    a.dhcpv6_address_is(&dir, want6);
    events.wait_for(&format!(
        r#""type":"lease6_bound","network":"six","ip":"{want6}","mac":"{}""#,
        a.mac
    ));
    let (ok, out) = b.ping(&want6.to_string());
    assert!(ok, "the DHCPv6 address answers: {out}");
    let leased6 = |d: &harness::Process| {
        let (_, v) = d.call("GET", "/v1/networks/six/leases", None);
        v.as_array()
            .unwrap()
            .iter()
            .find(|l| l["mac"] == a.mac.to_string())
            .map(|l| l["ipv6"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(leased6(&d), want6.to_string());
    assert_eq!(
        dig(&b, &["AAAA", "alpha.vm.internal"]),
        a_ip.to_string(),
        "the name keeps its SLAAC address"
    );

    // A reservation pins b's DHCPv6 address; its port is unlocked for it when bound.
    let pinned = Ipv6Addr::from(u128::from(prefix.network()) | 0xbeef);
    let (s, v) = d.call(
        "POST",
        "/v1/networks/six/reservations",
        Some(json!({"key": b.mac.to_string(), "ip": "10.96.0.77", "ipv6": pinned.to_string()})),
    );
    assert_eq!(s, 201, "{v}");
    b.dhcpv6_address_is(&dir, pinned);
    let (ok, out) = a.ping(&pinned.to_string());
    assert!(ok, "the reserved address answers: {out}");
    let (s, v) = d.call(
        "POST",
        "/v1/networks/six/reservations",
        Some(json!({"key": "other", "ip": "10.96.0.78", "ipv6": "2001:db8::1"})),
    );
    assert_eq!(s, 400, "a reserved IPv6 address outside the prefix: {v}");

    // A hostile guest advertises itself as a router with a prefix of its own, and
    // claims guest a's address for its own MAC, from its own link-local address
    // (which its port allows): neither reaches a or b.
    let (evil, evil_mac) = raw_port(&d, &dir, "six", "evil");
    let evil_ll = eui64(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), evil_mac);
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let all_nodes_mac = wire::ipv6_multicast_mac(all_nodes);
    let rogue_ra = rogue_router_advert(evil_mac);
    let spoofed_na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
        flags: NdiscNeighborFlags::OVERRIDE,
        target_addr: a_ip,
        lladdr: Some(EthernetAddress(evil_mac.0).into()),
    });
    for _ in 0..3 {
        evil.send(&wire::icmp6_frame(
            evil_mac,
            all_nodes_mac,
            evil_ll,
            all_nodes,
            &rogue_ra,
        ))
        .unwrap();
        evil.send(&wire::icmp6_frame(
            evil_mac,
            all_nodes_mac,
            evil_ll,
            all_nodes,
            &spoofed_na,
        ))
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    // A ping from b after the forgeries: b still reaches a at a's own MAC.
    let (ok, out) = b.ping(&a_ip.to_string());
    assert!(ok, "guest to guest after the forgeries: {out}");
    for g in [&a, &b] {
        let routes = g.ip6(&["route", "show"]);
        assert!(
            !routes.contains("2001:db8") && !routes.contains(&evil_ll.to_string()),
            "{routes}"
        );
        assert!(g.default_route().contains(&gateway_ll), "{routes}");
        let addrs = g.ip6(&["addr", "show"]);
        assert!(!addrs.contains("2001:db8"), "{addrs}");
    }
    let neigh = b.ip6(&["neigh", "show", &a_ip.to_string()]);
    assert!(
        neigh.contains(&a.mac.to_string()) && !neigh.contains(&evil_mac.to_string()),
        "b's entry for a: {neigh}"
    );
    let drops = port_drops(&d, "six", "evil");
    assert_eq!(drops["rogue_ra"], 3, "{drops}");
    assert_eq!(drops["spoofed"], 3, "the advertisement for a's address: {drops}");

    // The prefix and the DHCPv6 lease are the network's for good: a daemon killed
    // with -9 brings back the same ones.
    d.kill_9();
    let d = harness::Process::start(&dir, &no_guests);
    let (_, again) = d.call("GET", "/v1/networks/six", None);
    assert_eq!(again["ipv6"], net["ipv6"], "{again}");
    assert_eq!(leased6(&d), want6.to_string(), "the DHCPv6 lease after kill -9");
    drop((a, b));
}

/// A guest's TCP connect to `to` from inside its namespace: what it read after
/// sending `upload` bytes and closing its side, or the connect's error.
fn tcp_exchange(ns: &str, to: std::net::SocketAddr, upload: usize) -> std::io::Result<Vec<u8>> {
    testkit::in_ns(ns, move || {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
        c.set_read_timeout(Some(Duration::from_secs(30)))?;
        let chunk = vec![0x5a_u8; 64 * 1024];
        let mut left = upload;
        while left > 0 {
            let n = left.min(chunk.len());
            c.write_all(&chunk[..n])?;
            left -= n;
        }
        c.shutdown(std::net::Shutdown::Write)?;
        let mut got = Vec::new();
        c.read_to_end(&mut got)?;
        Ok(got)
    })
}

/// A TCP server that answers each client, once it has closed its side, with as many
/// bytes as it sent (a pattern), `clients` times.
fn counting_server(listener: std::net::TcpListener, clients: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for _ in 0..clients {
            let Ok((mut s, _)) = listener.accept() else { return };
            let mut n = 0;
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 {
                    break;
                }
                n += k;
            }
            let reply: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let _ = s.write_all(&reply);
        }
    })
}

#[test]
fn guests_reach_an_outside_ipv6_network_through_the_gateway_within_policy_and_the_host_only_at_host_access() {
    if !testkit::ready_or_skip(testkit::is_root(), "needs root for TAP ports, namespaces and veth") {
        return;
    }
    let dir = tmp("egress");
    let d = harness::Process::start(&dir, &dir.join("no-guests"));
    let (s, net) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "out6", "subnet": "10.97.0.0/24", "ipv6": "fd00:97::/64", "host_access": true})),
    );
    assert_eq!(s, 201, "{net}");
    // An "outside" network: a namespace behind a veth pair, fd99:97::2 there, the
    // host's end fd99:97::1.
    let tag = std::process::id() % 10000;
    let outside = testkit::Netns::new(&format!("vmf6out{tag}"));
    let (host_end, far_end) = (format!("vo6h{tag}"), format!("vo6f{tag}"));
    testkit::run(&["ip", "link", "add", &host_end, "type", "veth", "peer", "name", &far_end]);
    testkit::run(&["ip", "link", "set", &far_end, "netns", &outside.0]);
    testkit::run(&["ip", "-6", "addr", "add", "fd99:97::1/64", "dev", &host_end, "nodad"]);
    testkit::run(&["ip", "link", "set", &host_end, "up"]);
    let far = |args: &[&str]| {
        let mut all = vec!["ip", "-n", &outside.0];
        all.extend(args);
        testkit::run(&all)
    };
    far(&["-6", "addr", "add", "fd99:97::2/64", "dev", &far_end, "nodad"]);
    far(&["link", "set", &far_end, "up"]);
    far(&["link", "set", "lo", "up"]);
    let server: std::net::SocketAddr = "[fd99:97::2]:8080".parse().unwrap();
    let listener = testkit::in_ns(&outside.0, move || std::net::TcpListener::bind(server).unwrap());
    let web = counting_server(listener, 1);
    let udp = testkit::in_ns(&outside.0, || std::net::UdpSocket::bind("[fd99:97::2]:5353").unwrap());
    let udp_echo = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let (n, from) = udp.recv_from(&mut buf).unwrap();
        udp.send_to(&buf[..n], from).unwrap();
    });

    // Named apart from the other tests' guests: each name is a TAP device and a
    // namespace of this process.
    let a = tap_guest(&d, "out6", "e");
    a.slaac_address();
    let route = a.default_route();
    assert!(
        route.contains("via fe80::"),
        "the gateway is the default router: {route}"
    );

    // ICMPv6 echo, TCP both ways with megabytes, UDP: each re-originated from the host.
    let (ok, out) = a.ping("fd99:97::2");
    assert!(ok, "ping the outside: {out}");
    const BULK: usize = 8 << 20;
    let got = tcp_exchange(&a.ns.0, server, BULK).expect("TCP to the outside");
    assert_eq!(got.len(), BULK, "as many bytes back as sent");
    assert!(
        got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8),
        "in order, intact"
    );
    web.join().unwrap();
    let echoed = testkit::in_ns(&a.ns.0, || {
        let s = std::net::UdpSocket::bind("[::]:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(b"over udp6", "[fd99:97::2]:5353").unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = s.recv_from(&mut buf).unwrap();
        (buf[..n].to_vec(), from)
    });
    assert_eq!(echoed.0, b"over udp6");
    assert_eq!(
        echoed.1.to_string(),
        "[fd99:97::2]:5353",
        "answered as if from the server"
    );
    udp_echo.join().unwrap();

    // Host access: the prefix's ::2 leads to the host's [::1]. A server on every host
    // address is reached there, but not at the host's own address (a built-in deny).
    let host_listener = std::net::TcpListener::bind("[::]:0").unwrap();
    let host_port = host_listener.local_addr().unwrap().port();
    let host_server = counting_server(host_listener, 1);
    let (ok, named) = sh(&[
        "ip",
        "netns",
        "exec",
        &a.ns.0,
        "dig",
        "+short",
        "+time=2",
        "AAAA",
        "host.vm.internal",
        "@fd00:97::1",
    ]);
    assert!(
        ok && named.trim() == "fd00:97::2",
        "the host alias has an AAAA: {named}"
    );
    let host_access: std::net::SocketAddr = format!("[fd00:97::2]:{host_port}").parse().unwrap();
    let got = tcp_exchange(&a.ns.0, host_access, 1000).expect("the host at its host-access address");
    assert_eq!(got.len(), 1000);
    host_server.join().unwrap();
    let host_own: std::net::SocketAddr = format!("[fd99:97::1]:{host_port}").parse().unwrap();
    let e = tcp_exchange(&a.ns.0, host_own, 10).expect_err("the host's own address");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");

    // Forwards to a guest's IPv6 port, from either version's host side. The guest has
    // sent nothing from its global address yet: the gateway finds it by Neighbour
    // Solicitation. It sees the client as the gateway's IPv6 address.
    let f = tap_guest(&d, "out6", "f");
    let f_ip = f.slaac_address();
    let web6 = testkit::in_ns(&f.ns.0, || std::net::TcpListener::bind("[::]:8081").unwrap());
    let served = std::thread::spawn(move || {
        use std::io::Write;
        let (mut s, peer) = web6.accept().unwrap();
        s.write_all(b"hello from a v6 guest").unwrap();
        peer
    });
    let (s, fw) = d.call(
        "POST",
        "/v1/networks/out6/forwards",
        Some(json!({"host": "127.0.0.1:0", "guest": format!("[{f_ip}]:8081")})),
    );
    assert_eq!(s, 201, "{fw}");
    let host: std::net::SocketAddr = fw["host"].as_str().unwrap().parse().unwrap();
    let mut page = String::new();
    {
        use std::io::Read;
        let mut c = std::net::TcpStream::connect(host).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.read_to_string(&mut page).unwrap();
    }
    assert_eq!(page, "hello from a v6 guest");
    assert_eq!(served.join().unwrap().ip().to_string(), "fd00:97::1");
    let echo6 = testkit::in_ns(&f.ns.0, || std::net::UdpSocket::bind("[::]:7001").unwrap());
    let echoing = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let (n, from) = echo6.recv_from(&mut buf).unwrap();
        echo6.send_to(&buf[..n].to_ascii_uppercase(), from).unwrap();
        from
    });
    let (s, fw) = d.call(
        "POST",
        "/v1/networks/out6/forwards",
        Some(json!({"proto": "udp", "host": "[::1]:0", "guest": format!("[{f_ip}]:7001")})),
    );
    assert_eq!(s, 201, "{fw}");
    let client = std::net::UdpSocket::bind("[::1]:0").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.send_to(b"udp forward", fw["host"].as_str().unwrap()).unwrap();
    let mut buf = [0u8; 64];
    let n = client.recv(&mut buf).expect("the guest's answer");
    assert_eq!(&buf[..n], b"UDP FORWARD");
    assert_eq!(echoing.join().unwrap().ip().to_string(), "fd00:97::1");
    let (s, v) = d.call(
        "POST",
        "/v1/networks/out6/forwards",
        Some(json!({"host": "127.0.0.1:0", "guest": "[fd00:98::5]:80"})),
    );
    assert_eq!(s, 400, "a guest address off the prefix: {v}");

    // The egress policy takes IPv6 prefixes: the outside server's port is refused.
    let (s, v) = d.call(
        "PUT",
        "/v1/networks/out6/policy",
        Some(json!({"default": "allow", "rules": [
            {"action": "deny", "dst": "fd99:97::/64", "ports": "8080", "proto": "tcp"}]})),
    );
    assert_eq!(s, 200, "{v}");
    let e = tcp_exchange(&a.ns.0, server, 10).expect_err("denied by policy");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let (_, stats) = d.call("GET", "/v1/stats", None);
    let net = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["network"] == "out6")
        .unwrap();
    let gw = &net["gateway"]["counters"];
    assert!(gw["egress_denied"].as_u64().unwrap() >= 2, "{gw}");
    assert!(gw["nat_icmp_replies"].as_u64().unwrap() >= 2, "{gw}");
    drop((a, f, outside));
}

#[test]
fn bad_ipv6_prefixes_are_refused_with_a_reason() {
    let dir = tmp("bad");
    let d = harness::start(&dir, None);
    for (prefix, why) in [
        ("fd00:1::/48", "not a /64"),
        ("fe80::/64", "link-local"),
        ("ff02::/64", "multicast"),
        ("fd00:1::1/64", "host bits"),
        ("nonsense", "a /64 such as"),
    ] {
        let (s, v) = d.call(
            "POST",
            "/v1/networks",
            Some(json!({"name": "bad", "subnet": "10.97.0.0/24", "ipv6": prefix})),
        );
        assert!((400..500).contains(&s), "{prefix}: {s} {v}");
        assert!(v.to_string().contains(why), "{prefix}: {v}");
    }
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "small", "subnet": "10.97.0.0/24", "ipv6": "auto", "mtu": 1200})),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "one", "subnet": "10.97.0.0/24", "ipv6": "fd00:7::/64"})),
    );
    assert_eq!(s, 201, "{v}");
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "two", "subnet": "10.98.0.0/24", "ipv6": "fd00:7::/64"})),
    );
    assert_eq!(s, 409, "the same prefix twice: {v}");
    d.stop();
}

/// A namespace guest on a kernel-mode TAP port. The port's TAP device stays on the
/// bridge and is opened here, as a VMM would; the guest has a TAP of its own in its
/// namespace, and two threads carry frames between the two (the VMM's work).
struct KernelTapGuest {
    guest: TapGuest,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for KernelTapGuest {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn kernel_tap_guest(d: &harness::Process, network: &str, name: &str) -> KernelTapGuest {
    use std::io::{ErrorKind, Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let (s, port) = d.call(
        "POST",
        &format!("/v1/networks/{network}/ports"),
        Some(json!({"name": name, "kind": "tap"})),
    );
    assert_eq!(s, 201, "{port}");
    let opts = fabric::TunOptions {
        nonblocking: true,
        multi_queue: false,
        vnet_hdr: false,
    };
    let vmm = fabric::Tun::open(port["path"].as_str().unwrap(), opts).unwrap();
    let ifname = format!("vmk6{name}{}", std::process::id() % 10000);
    let inner = fabric::Tun::open(&ifname, opts).unwrap();
    let mac = port["mac"].as_str().unwrap().to_string();
    let ns = testkit::Netns::new(&ifname);
    testkit::run(&["ip", "link", "set", &ifname, "netns", &ns.0]);
    testkit::run(&["ip", "-n", &ns.0, "link", "set", &ifname, "address", &mac]);
    testkit::run(&["ip", "-n", &ns.0, "link", "set", &ifname, "up"]);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (vmm, inner) = (std::fs::File::from(vmm.into_fd()), std::fs::File::from(inner.into_fd()));
    for (mut from, mut to) in [(vmm.try_clone().unwrap(), inner.try_clone().unwrap()), (inner, vmm)] {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut frame = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                match from.read(&mut frame) {
                    Ok(n) => {
                        let _ = to.write(&frame[..n]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }
    KernelTapGuest {
        guest: TapGuest {
            ns,
            ifname,
            mac: mac.parse().unwrap(),
        },
        stop,
    }
}

#[test]
fn a_kernel_network_routes_ipv6_through_its_bridge_and_holds_each_port_to_its_addresses() {
    let ready = testkit::is_root() && std::process::Command::new("nft").arg("--version").output().is_ok();
    if !testkit::ready_or_skip(ready, "needs root (TAP, namespaces, veth) and nft") {
        return;
    }
    let dir = tmp("kernel6");
    let d = harness::Process::start(&dir, &dir.join("no-guests"));
    let _gone = harness::KernelInstanceGone::of(&dir.join("state"));
    let (s, net) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "k6", "subnet": "10.99.0.0/24", "mode": "kernel", "ipv6": "fd00:99::/64"})),
    );
    assert_eq!(s, 201, "{net}");
    // The outside: a namespace behind a veth pair, fd99:99::2 there, the host fd99:99::1.
    let tag = std::process::id() % 10000;
    let outside = testkit::Netns::new(&format!("vmfk6o{tag}"));
    let (host_end, far_end) = (format!("vk6h{tag}"), format!("vk6f{tag}"));
    let _veth = HostLink(host_end.clone());
    testkit::run(&["ip", "link", "add", &host_end, "type", "veth", "peer", "name", &far_end]);
    testkit::run(&["ip", "link", "set", &far_end, "netns", &outside.0]);
    testkit::run(&["ip", "-6", "addr", "add", "fd99:99::1/64", "dev", &host_end, "nodad"]);
    testkit::run(&["ip", "link", "set", &host_end, "up"]);
    testkit::run(&[
        "ip",
        "-n",
        &outside.0,
        "-6",
        "addr",
        "add",
        "fd99:99::2/64",
        "dev",
        &far_end,
        "nodad",
    ]);
    testkit::run(&["ip", "-n", &outside.0, "link", "set", &far_end, "up"]);
    let server: std::net::SocketAddr = "[fd99:99::2]:8080".parse().unwrap();
    let listener = testkit::in_ns(&outside.0, move || std::net::TcpListener::bind(server).unwrap());
    // Answers each client with the address it came from.
    let who = std::thread::spawn(move || {
        use std::io::Write;
        for _ in 0..1 {
            let (mut s, peer) = listener.accept().unwrap();
            s.write_all(peer.ip().to_string().as_bytes()).unwrap();
        }
    });

    let a = kernel_tap_guest(&d, "k6", "a");
    let b = kernel_tap_guest(&d, "k6", "b");
    let prefix = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0);
    let a_ip = a.guest.slaac_address();
    assert_eq!(
        a_ip,
        eui64(prefix, a.guest.mac),
        "SLAAC from the gateway's advertisement"
    );
    let b_ip = b.guest.slaac_address();
    let (_, ports) = d.call("GET", "/v1/networks/k6/ports", None);
    let port_a = ports.as_array().unwrap().iter().find(|p| p["name"] == "a").unwrap();
    assert!(
        port_a["ipv6"].as_array().unwrap().contains(&json!(a_ip.to_string())),
        "the port's view names the addresses it may use: {port_a}"
    );
    // The advertisement names the bridge as the router (its link-local, from its MAC),
    // and the bridge answers: the host routes, the gateway (at ::2) serves DNS.
    let bridge_ll = eui64(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        vmfabric::kernel::bridge_mac(&vmfabric::kernel::instance_of(&dir.join("state")), "k6"),
    );
    let route = a.guest.default_route();
    assert!(
        route.contains(&format!("via {bridge_ll}")),
        "the bridge routes: {route}"
    );
    for to in ["fd00:99::1", "fd00:99::2", &b_ip.to_string()] {
        let (ok, out) = a.guest.ping(to);
        assert!(ok, "ping {to}: {out}");
    }
    // A name over IPv6: b leases IPv4 with a hostname; its AAAA is its SLAAC address.
    let b_env = testkit::udhcpc_once(&b.guest.ns.0, &b.guest.ifname, &dir, &["-x", "hostname:bravo"]);
    assert!(b_env.contains_key("ip"), "{b_env:?}");
    let (ok, aaaa) = sh(&[
        "ip",
        "netns",
        "exec",
        &a.guest.ns.0,
        "dig",
        "+short",
        "+time=2",
        "+tries=2",
        "@fd00:99::2",
        "AAAA",
        "bravo.vm.internal",
    ]);
    assert!(
        ok && aaaa.trim() == b_ip.to_string(),
        "AAAA from the gateway at ::2: {aaaa}"
    );

    // Stateful DHCPv6 from the gateway on the uplink: the address works, its port lets it.
    let want6 = gateway::config::dhcp6_address("fd00:99::/64".parse().unwrap(), a.guest.mac);
    a.guest.dhcpv6_address_is(&dir, want6);
    let (ok, out) = b.guest.ping(&want6.to_string());
    assert!(ok, "a's DHCPv6 address: {out}");
    // A forward to an IPv6 guest is refused with the reason.
    let (s, v) = d.call(
        "POST",
        "/v1/networks/k6/forwards",
        Some(json!({"host": "127.0.0.1:18080", "guest": format!("[{a_ip}]:80")})),
    );
    assert!(s == 400 && v.to_string().contains("IPv4"), "{s} {v}");

    // Out through the host, masqueraded: the outside sees the host's address.
    let seen = tcp_exchange(&a.guest.ns.0, server, 0).expect("TCP to the outside over IPv6");
    assert_eq!(String::from_utf8_lossy(&seen), "fd99:99::1", "masqueraded");
    who.join().unwrap();
    // The host itself is not the guests' to reach, but for ping of the router.
    let e = tcp_exchange(&a.guest.ns.0, "[fd99:99::1]:22".parse().unwrap(), 0).expect_err("the host");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    // An IPv6 policy rule holds in the kernel's forward chain.
    let (s, v) = d.call(
        "PUT",
        "/v1/networks/k6/policy",
        Some(json!({"default": "allow", "rules": [
            {"action": "deny", "dst": "fd99:99::/64", "ports": "8080", "proto": "tcp"}]})),
    );
    assert_eq!(s, 200, "{v}");
    let e = tcp_exchange(&a.guest.ns.0, server, 0).expect_err("denied by policy");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let denied = |d: &harness::Process| {
        let (_, m) = d.call("GET", "/metrics", None);
        m.as_str()
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("vmfabric_kernel_egress_denied_total{network=\"k6\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(denied(&d) >= 1);

    // A hostile port (its frames written here): a Router Advertisement with a prefix of
    // its own, a Neighbour Advertisement claiming b's address and one claiming the
    // router's, a duplicate-address probe for a's, a packet from b's address. None
    // reaches a or b.
    let (s, evil) = d.call(
        "POST",
        "/v1/networks/k6/ports",
        Some(json!({"name": "evil", "kind": "tap"})),
    );
    assert_eq!(s, 201, "{evil}");
    let evil_mac: Mac = evil["mac"].as_str().unwrap().parse().unwrap();
    let evil_tap = std::fs::File::from(
        fabric::Tun::open(
            evil["path"].as_str().unwrap(),
            fabric::TunOptions {
                nonblocking: true,
                multi_queue: false,
                vnet_hdr: false,
            },
        )
        .unwrap()
        .into_fd(),
    );
    let evil_ll = eui64(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), evil_mac);
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let all_nodes_mac = wire::ipv6_multicast_mac(all_nodes);
    let rogue_ra = rogue_router_advert(evil_mac);
    let claim = |target: Ipv6Addr| {
        Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags: NdiscNeighborFlags::OVERRIDE,
            target_addr: target,
            lladdr: Some(EthernetAddress(evil_mac.0).into()),
        })
    };
    let router: Ipv6Addr = "fd00:99::1".parse().unwrap();
    // A probe goes to the target's solicited-node group (or Linux ignores it).
    let a_solicited = wire::solicited_node(a_ip);
    let dad_probe = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: a_ip,
        lladdr: None,
    });
    let echo_from_b = Icmpv6Repr::EchoRequest {
        ident: 7,
        seq_no: 1,
        data: b"spoofed",
    };
    let echoes_heard = |g: &TapGuest| {
        let (_, snmp6) = sh(&["ip", "netns", "exec", &g.ns.0, "cat", "/proc/net/snmp6"]);
        let count = snmp6.lines().find_map(|l| l.strip_prefix("Icmp6InEchos "));
        count.and_then(|c| c.trim().parse::<u64>().ok()).expect("Icmp6InEchos")
    };
    let echoes_before = echoes_heard(&a.guest);
    {
        use std::io::Write;
        let mut evil_tap = &evil_tap;
        for _ in 0..3 {
            let frames = [
                wire::icmp6_frame(evil_mac, all_nodes_mac, evil_ll, all_nodes, &rogue_ra),
                wire::icmp6_frame(evil_mac, all_nodes_mac, evil_ll, all_nodes, &claim(b_ip)),
                wire::icmp6_frame(evil_mac, all_nodes_mac, evil_ll, all_nodes, &claim(router)),
                wire::icmp6_frame(
                    evil_mac,
                    wire::ipv6_multicast_mac(a_solicited),
                    Ipv6Addr::UNSPECIFIED,
                    a_solicited,
                    &dad_probe,
                ),
                wire::icmp6_frame(evil_mac, a.guest.mac, b_ip, a_ip, &echo_from_b),
                // A DHCPv6 ADVERTISE, as a server would answer a's SOLICIT.
                wire::udp6_frame(
                    evil_mac,
                    a.guest.mac,
                    std::net::SocketAddrV6::new(evil_ll, 547, 0, 0),
                    std::net::SocketAddrV6::new(
                        eui64(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), a.guest.mac),
                        546,
                        0,
                        0,
                    ),
                    &[2, 0x12, 0x34, 0x56],
                ),
            ];
            for f in frames {
                evil_tap.write_all(&f).unwrap();
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    // Had the probe reached a, a would have defended its address to all nodes; had the
    // echo, a would count it.
    let mut defended = false;
    {
        use std::io::Read;
        let mut evil_tap = &evil_tap;
        let mut frame = [0u8; 2048];
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            match evil_tap.read(&mut frame) {
                Ok(n) if n >= 78 => {
                    let na = frame[12..14] == [0x86, 0xdd] && frame[20] == 58 && frame[54] == 136;
                    defended |= na && frame[6..12] == a.guest.mac.0 && frame[62..78] == a_ip.octets();
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
    assert!(!defended, "a heard the duplicate-address probe for its address");
    assert_eq!(
        echoes_heard(&a.guest),
        echoes_before,
        "a heard the echo from b's address"
    );
    let (ok, out) = a.guest.ping(&b_ip.to_string());
    assert!(ok, "a still reaches b after the forgeries: {out}");
    for g in [&a.guest, &b.guest] {
        let routes = g.ip6(&["route", "show"]);
        assert!(
            !routes.contains("2001:db8") && !routes.contains(&evil_ll.to_string()),
            "{routes}"
        );
        assert!(g.default_route().contains(&bridge_ll.to_string()), "{routes}");
        let neigh = g.ip6(&["neigh", "show"]);
        assert!(
            !neigh.contains(&evil_mac.to_string()),
            "no entry names the hostile MAC: {neigh}"
        );
    }
    let (ok, out) = a.guest.ping("fd00:99::1");
    assert!(ok, "the router, after a claim on its address: {out}");
    // Each drop counted, as the userspace switch counts its ports' (three rounds: the
    // RA; the ADVERTISE; two NAs, the probe and the spoofed source).
    let (_, m) = d.call("GET", "/metrics", None);
    let metric = |family: &str| {
        let line = format!("{family}_total{{network=\"k6\"}} ");
        let text = m.as_str().unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {line}in:\n{text}"))
    };
    assert_eq!(metric("vmfabric_kernel_rogue_ra"), 3);
    assert_eq!(metric("vmfabric_kernel_rogue_dhcp6"), 3);
    assert_eq!(metric("vmfabric_kernel_spoofed6"), 12);

    let (s, _) = d.call("DELETE", "/v1/networks/k6?force=true", None);
    assert_eq!(s, 204);
    drop((a, b, outside));
}

/// A host link the test made; deleted when dropped.
struct HostLink(String);

impl Drop for HostLink {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

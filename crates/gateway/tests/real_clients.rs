//! Real DHCP and DNS clients against the gateway: busybox udhcpc, ISC dhclient and dig
//! in network namespaces the test creates, each attached to the network by a TAP port.
//! Forwarded names are answered by a dnsmasq the test runs on 127.0.0.1 (never an
//! outside resolver). Needs root, /dev/net/tun, busybox, dhclient, dig and dnsmasq.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fabric::{NetworkConfig, Switch, SwitchConfig, TapSource};
use gateway::{Gateway, GatewayConfig, MemoryLeaseStore, Upstreams};
use testkit::Killed;

fn run_out(args: &[&str]) -> (bool, String) {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        ),
        Err(e) => (false, e.to_string()),
    }
}

fn sh(args: &[&str]) -> String {
    let (ok, out) = run_out(args);
    assert!(ok, "{} failed:\n{out}", args.join(" "));
    out
}

fn have(cmd: &str) -> bool {
    run_out(&["sh", "-c", &format!("command -v {cmd}")]).0
}

/// Skips (or, where every test must run, fails) with a reason.
fn missing_prerequisite() -> Option<String> {
    if !rustix::process::geteuid().is_root() || !Path::new("/dev/net/tun").exists() {
        return Some("needs root and /dev/net/tun".into());
    }
    for cmd in ["busybox", "dhclient", "dig", "dnsmasq", "ip"] {
        if !have(cmd) {
            return Some(format!(
                "needs {cmd} (apt-get install busybox-static isc-dhcp-client bind9-dnsutils dnsmasq-base iproute2)"
            ));
        }
    }
    None
}

fn skip_unless_ready(test: &str) -> bool {
    if let Some(why) = missing_prerequisite() {
        assert!(
            std::env::var("VMFABRIC_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
            "{test} must run here but {why}"
        );
        eprintln!("SKIP {test}: {why}");
        return false;
    }
    true
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A namespace with one TAP port of the network inside, removed on drop (with its own
/// resolv.conf: dhclient's script writes that one, not the host's).
struct Host {
    ns: String,
    _netns: testkit::Netns,
    ifname: String,
}

impl Host {
    fn new(sw: &Switch, network: &str, tag: &str) -> Host {
        let id = std::process::id() % 100_000;
        let netns = testkit::Netns::new(&format!("gw{id}{tag}"));
        let ns = netns.0.clone();
        let (_, ifname) = sw
            .add_tap_port(network, tag, TapSource::Name(format!("gt{id}{tag}")))
            .unwrap();
        sh(&["ip", "link", "set", &ifname, "netns", &ns]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", &ifname, "up"]);
        Host {
            ns,
            _netns: netns,
            ifname,
        }
    }

    fn exec(&self, args: &[&str]) -> (bool, String) {
        let mut full = vec!["ip", "netns", "exec", &self.ns];
        full.extend(args);
        run_out(&full)
    }

    fn spawn(&self, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn address(&self) -> Option<Ipv4Addr> {
        let (_, out) = self.exec(&["ip", "-4", "-o", "addr", "show", "dev", &self.ifname]);
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)?
            .split('/')
            .next()?
            .parse()
            .ok()
    }

    fn dig(&self, server: Ipv4Addr, args: &[&str]) -> String {
        let at = format!("@{server}");
        let mut full = vec!["dig", at.as_str(), "+time=3", "+tries=2"];
        full.extend(args);
        let (_, out) = self.exec(&full);
        out
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gw-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The udhcpc hook: configure the interface from the lease.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
bound) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface"
    echo "$1 $ip" >> "$(dirname "$0")/events" ;;
# A renewal keeps the address: replacing it in place keeps the neighbour cache too.
# (Flushing the interface's last address empties it, and then the RELEASE that follows
# waits for ARP while the deconfig flush drops it: a lost release under load.)
renew) ip addr replace "$ip/$mask" dev "$interface"
    echo "$1 $ip" >> "$(dirname "$0")/events" ;;
esac
"#;

struct Network {
    _rt: tokio::runtime::Runtime,
    sw: Switch,
    gw: Gateway,
    _dnsmasq: testkit::Resolver,
}

fn network(name: &str, subnet: &str, dir: &Path) -> Network {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sw = Switch::start(SwitchConfig::default()).unwrap();
    sw.add_network(name, NetworkConfig::default()).unwrap();
    // The upstream: dnsmasq on loopback knows one outside name and nothing else.
    let dnsmasq = testkit::loopback_resolver(dir, "outside.test", "192.0.2.7");
    let port = dnsmasq.port;
    let mut cfg = GatewayConfig::new(name, subnet.parse().unwrap());
    cfg.upstreams = Upstreams::Static(vec![format!("127.0.0.1:{port}").parse().unwrap()]);
    cfg.lease_time = Duration::from_secs(120);
    let gw = Gateway::attach(rt.handle(), &sw, name, cfg, Box::new(MemoryLeaseStore::default())).unwrap();
    Network {
        _rt: rt,
        sw,
        gw,
        _dnsmasq: dnsmasq,
    }
}

#[test]
fn udhcpc_gets_renews_and_releases_and_dig_resolves() {
    if !skip_unless_ready("udhcpc_gets_renews_and_releases_and_dig_resolves") {
        return;
    }
    let dir = tmpdir("udhcpc");
    let net = network("alpha", "10.231.0.0/24", &dir);
    let gw_ip = Ipv4Addr::new(10, 231, 0, 1);
    let host = Host::new(&net.sw, "alpha", "a");
    let script = dir.join("udhcpc.sh");
    std::fs::write(&script, UDHCPC_SCRIPT).unwrap();
    sh(&["chmod", "755", script.to_str().unwrap()]);
    let pidfile = dir.join("udhcpc.pid");
    let _client = Killed(host.spawn(&[
        "busybox",
        "udhcpc",
        "-f",
        "-i",
        &host.ifname,
        "-s",
        script.to_str().unwrap(),
        "-x",
        "hostname:web",
        "-t",
        "10",
        "-T",
        "1",
        "-p",
        pidfile.to_str().unwrap(),
    ]));
    wait_until("a lease", || net.gw.leases().len() == 1);
    let lease = net.gw.leases()[0].clone();
    assert_eq!(lease.hostname.as_deref(), Some("web"));
    wait_until("the address on the interface", || host.address() == Some(lease.ip));
    assert!(
        host.exec(&["busybox", "ping", "-c", "1", "-W", "3", &gw_ip.to_string()])
            .0,
        "gateway answers ping"
    );

    // DNS: local name (full and bare), the gateway's own, PTR, NXDOMAIN, and a forwarded name.
    assert_eq!(
        host.dig(gw_ip, &["+short", "web.vm.internal"]).trim(),
        lease.ip.to_string()
    );
    assert_eq!(host.dig(gw_ip, &["+short", "web"]).trim(), lease.ip.to_string());
    assert_eq!(
        host.dig(gw_ip, &["+short", "gateway.vm.internal"]).trim(),
        gw_ip.to_string()
    );
    assert_eq!(
        host.dig(gw_ip, &["+short", "-x", &lease.ip.to_string()]).trim(),
        "web.vm.internal."
    );
    assert!(host.dig(gw_ip, &["nobody.vm.internal"]).contains("status: NXDOMAIN"));
    assert_eq!(host.dig(gw_ip, &["+short", "outside.test"]).trim(), "192.0.2.7");
    // The same over TCP, local and forwarded, several queries on one connection.
    let tcp = host.dig(
        gw_ip,
        &[
            "+tcp",
            "+keepopen",
            "+short",
            "web.vm.internal",
            "outside.test",
            "nobody.vm.internal",
        ],
    );
    assert_eq!(
        tcp.split_whitespace().collect::<Vec<_>>(),
        vec![lease.ip.to_string(), "192.0.2.7".to_string()],
        "{tcp}"
    );
    let aaaa = host.dig(gw_ip, &["web.vm.internal", "AAAA"]);
    assert!(aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0"), "{aaaa}");
    let c = net.gw.counters();
    assert!(c.get("dns_forwarded").unwrap() >= 1 && c.get("dns_nxdomain").unwrap() >= 1);

    // Renew (SIGUSR1) keeps the address and extends the lease; release (SIGUSR2) ends it.
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    let requests = c.get("dhcp_request").unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // so the new expiry is visibly later
    sh(&["kill", "-USR1", &pid]);
    wait_until("the renewal", || {
        c.get("dhcp_request").unwrap() > requests && net.gw.leases().first().is_some_and(|l| l.expires > lease.expires)
    });
    assert_eq!(net.gw.leases()[0].ip, lease.ip);
    sh(&["kill", "-USR2", &pid]);
    wait_until("the release", || net.gw.leases().is_empty());
    assert_eq!(c.get("leases_released"), Some(1));
    // The client has no address any more to ask with; the name is gone from the zone.
    assert_eq!(net.gw.resolve("web"), None, "a released name is gone");
}

#[test]
fn dhclient_gets_and_releases_a_lease() {
    if !skip_unless_ready("dhclient_gets_and_releases_a_lease") {
        return;
    }
    let dir = tmpdir("dhclient");
    let net = network("beta", "10.232.0.0/24", &dir);
    let host = Host::new(&net.sw, "beta", "b");
    let (pid, leases) = (dir.join("dhclient.pid"), dir.join("dhclient.leases"));
    let (pid, leases) = (pid.to_str().unwrap(), leases.to_str().unwrap());
    let host_resolv_conf = std::fs::read("/etc/resolv.conf").ok();
    let (ok, out) = host.exec(&["dhclient", "-1", "-v", "-pf", pid, "-lf", leases, &host.ifname]);
    assert!(ok, "dhclient failed:\n{out}");
    assert_eq!(
        std::fs::read("/etc/resolv.conf").ok(),
        host_resolv_conf,
        "dhclient's script wrote the host's resolv.conf"
    );
    wait_until("a lease", || net.gw.leases().len() == 1);
    let lease = net.gw.leases()[0].clone();
    assert_eq!(host.address(), Some(lease.ip), "dhclient configured the leased address");
    assert!(std::fs::read_to_string(leases).unwrap().contains(&lease.ip.to_string()));
    let (ok, out) = host.exec(&["dhclient", "-r", "-v", "-pf", pid, "-lf", leases, &host.ifname]);
    assert!(ok, "dhclient -r failed:\n{out}");
    wait_until("the release", || net.gw.leases().is_empty());
}

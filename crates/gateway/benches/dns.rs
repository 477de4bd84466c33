//! DNS answers for local names: vmfabric's gateway against dnsmasq serving the same
//! names, side by side in one run, over the same path: a client in a network namespace
//! on a TAP port of a vmfabric network; dnsmasq in a second namespace on another TAP
//! port of the same network. Needs root, /dev/net/tun, iproute2 and dnsmasq.
//!
//! Two measures per server: answers per second with 64 queries in flight, and round
//! trip p50/p99 with one query at a time. Then round trips with a new socket per query
//! (as a resolver library's client makes them): local names from both servers, and
//! names the gateway forwards to a second dnsmasq on the host's loopback (the only
//! upstream it is given), the forwarded-DNS measure.
//!
//! Run: `cargo bench -p gateway --bench dns` (BENCH_SECS per measure, default 2).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fabric::{Switch, TapSource};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

const NAMES: usize = 64;

fn sh(args: &[&str]) {
    let ok = Command::new(args[0])
        .args(&args[1..])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{} failed", args.join(" "));
}

struct Cleanup(Vec<String>, Option<Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(c) = self.1.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn netns_with_tap(sw: &Switch, ns: &str, tap: &str, cidr: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
    sh(&["ip", "netns", "add", ns]);
    let (_, ifname) = sw.add_tap_port("bench", ns, TapSource::Name(tap.into())).unwrap();
    sh(&["ip", "link", "set", &ifname, "netns", ns]);
    sh(&["ip", "-n", ns, "addr", "add", cidr, "dev", &ifname]);
    sh(&["ip", "-n", ns, "link", "set", &ifname, "up"]);
    sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_utf8(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

struct Result {
    rate: f64,
    p50: Duration,
    p99: Duration,
    lost: u64,
}

/// Runs the load from inside namespace `ns` against `server`.
fn load(ns: &str, server: Ipv4Addr, secs: f64) -> Result {
    let nsfile = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    let server = SocketAddr::from((server, 53));
    std::thread::spawn(move || {
        rustix::thread::move_into_link_name_space(nsfile.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
            .expect("enter the client namespace");
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.connect(server).unwrap();
        let queries: Vec<Vec<u8>> = (0..NAMES).map(|i| query(0, &format!("vm{i}.vm.internal."))).collect();
        let mut buf = [0u8; 1500];
        // Warm up (ARP, caches).
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        for q in queries.iter().take(8) {
            sock.send(q).unwrap();
            let _ = sock.recv(&mut buf);
        }
        // Throughput: keep 64 in flight.
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut sent_at: HashMap<u16, Instant> = HashMap::new();
        let (mut id, mut answered, mut lost) = (0u16, 0u64, 0u64);
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        let send = |sock: &UdpSocket, sent_at: &mut HashMap<u16, Instant>, id: &mut u16| {
            *id = id.wrapping_add(1);
            let mut q = queries[*id as usize % NAMES].clone();
            q[..2].copy_from_slice(&id.to_be_bytes());
            sock.send(&q).unwrap();
            sent_at.insert(*id, Instant::now());
        };
        for _ in 0..64 {
            send(&sock, &mut sent_at, &mut id);
        }
        while Instant::now() < deadline {
            match sock.recv(&mut buf) {
                Ok(n) if n >= 12 => {
                    let rid = u16::from_be_bytes([buf[0], buf[1]]);
                    if sent_at.remove(&rid).is_some() {
                        answered += 1;
                        send(&sock, &mut sent_at, &mut id);
                    }
                }
                _ => {
                    // Timed out: count what is outstanding as lost, refill the window.
                    lost += sent_at.len() as u64;
                    sent_at.clear();
                    for _ in 0..64 {
                        send(&sock, &mut sent_at, &mut id);
                    }
                }
            }
        }
        let rate = answered as f64 / start.elapsed().as_secs_f64();
        // Drain what is still in flight.
        while sock.recv(&mut buf).is_ok() {}
        // Latency: one at a time.
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut rtts = Vec::new();
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < deadline {
            id = id.wrapping_add(1);
            let mut q = queries[id as usize % NAMES].clone();
            q[..2].copy_from_slice(&id.to_be_bytes());
            let t = Instant::now();
            sock.send(&q).unwrap();
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) if n >= 12 && buf[..2] == id.to_be_bytes() => {
                        rtts.push(t.elapsed());
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => {
                        lost += 1;
                        break;
                    }
                }
            }
        }
        assert!(
            !rtts.is_empty(),
            "{server}: no answer to any query sent one at a time ({lost} lost)"
        );
        rtts.sort();
        Result {
            rate,
            p50: rtts[rtts.len() / 2],
            p99: rtts[rtts.len() * 99 / 100],
            lost,
        }
    })
    .join()
    .unwrap()
}

/// Round trips with a new socket per query, one at a time, from inside `ns` (else from
/// the host): p50, p99 and how many got no answer.
fn fresh_sockets(ns: Option<&str>, server: SocketAddr, names: Vec<String>, secs: f64) -> (Duration, Duration, u64) {
    let nsfile = ns.map(|ns| std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap());
    std::thread::spawn(move || {
        if let Some(nsfile) = nsfile {
            rustix::thread::move_into_link_name_space(nsfile.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
                .expect("enter the client namespace");
        }
        let ask = |id: u16, name: &str| -> Option<Duration> {
            let t = Instant::now();
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.connect(server).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            sock.send(&query(id, name)).unwrap();
            let mut buf = [0u8; 1500];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) if n >= 12 && buf[..2] == id.to_be_bytes() => return Some(t.elapsed()),
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        };
        for (i, name) in names.iter().take(8).enumerate() {
            let _ = ask(i as u16, name);
        }
        let (mut rtts, mut lost, mut id) = (Vec::new(), 0u64, 0u16);
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < deadline {
            id = id.wrapping_add(1);
            match ask(id, &names[id as usize % names.len()]) {
                Some(rtt) => rtts.push(rtt),
                None => lost += 1,
            }
        }
        assert!(
            !rtts.is_empty(),
            "{server}: no answer to a new socket's query ({lost} lost)"
        );
        rtts.sort();
        (rtts[rtts.len() / 2], rtts[rtts.len() * 99 / 100], lost)
    })
    .join()
    .unwrap()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("dns bench: run it with `cargo bench -p gateway --bench dns`");
        return;
    }
    if !rustix::process::geteuid().is_root() {
        println!("dns bench: SKIP, needs root (network namespaces and TAP devices)");
        return;
    }
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let pid = std::process::id() % 10000;
    let upstream = SocketAddr::from(([127, 0, 0, 1], 20000 + (pid % 10000) as u16));
    let common::Lab { gw, sw, rt: _rt } = common::lab("bench", "10.250.0.0/24", |cfg| {
        cfg.upstreams = gateway::Upstreams::Static(vec![upstream]);
    });
    let (client_ns, ref_ns) = (format!("dnsc{pid}"), format!("dnsr{pid}"));
    let mut cleanup = Cleanup(vec![client_ns.clone(), ref_ns.clone()], None);
    netns_with_tap(&sw, &client_ns, &format!("dbc{pid}"), "10.250.0.10/24");
    netns_with_tap(&sw, &ref_ns, &format!("dbr{pid}"), "10.250.0.53/24");

    // The same 64 names in both servers.
    let mut dnsmasq = Command::new("ip");
    dnsmasq.args([
        "netns",
        "exec",
        &ref_ns,
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        // No pid file: two dnsmasqs share its default path, and a stale one stops the next.
        "--pid-file=",
    ]);
    dnsmasq.args([
        "--user=root",
        "--listen-address=10.250.0.53",
        "--bind-interfaces",
        "--cache-size=1000",
    ]);
    for i in 0..NAMES {
        let ip = Ipv4Addr::new(10, 250, 0, 100 + i as u8);
        gw.set_static_name(&format!("vm{i}"), ip, None);
        dnsmasq.arg(format!("--host-record=vm{i}.vm.internal,{ip}"));
    }
    cleanup.1 = Some(dnsmasq.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    // The gateway's upstream, on loopback: names only it knows.
    let mut upstream_dnsmasq = Command::new("dnsmasq");
    upstream_dnsmasq.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        // No pid file: two dnsmasqs share its default path, and a stale one stops the next.
        "--pid-file=",
        "--user=root",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--cache-size=1000",
    ]);
    upstream_dnsmasq.arg(format!("--port={}", upstream.port()));
    let external: Vec<String> = (0..NAMES).map(|i| format!("ext{i}.example.")).collect();
    for (i, name) in external.iter().enumerate() {
        upstream_dnsmasq.arg(format!(
            "--host-record={},192.0.2.{}",
            name.trim_end_matches('.'),
            1 + i
        ));
    }
    let _upstream = testkit::Killed(
        upstream_dnsmasq
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500)); // both dnsmasqs bind their sockets

    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    println!(
        "## DNS: local names from a client on a TAP port (median of {reps} interleaved runs, {secs} s per measure)\n"
    );
    println!("| server | answers/s (64 in flight) | p50 (1 in flight) | p99 | lost |");
    println!("|---|---:|---:|---:|---:|");
    let servers = [
        ("vmfabric gateway", Ipv4Addr::new(10, 250, 0, 1)),
        ("dnsmasq 2.90", Ipv4Addr::new(10, 250, 0, 53)),
    ];
    let mut runs: Vec<Vec<Result>> = vec![Vec::new(), Vec::new()];
    for _ in 0..reps {
        for (k, (_, ip)) in servers.iter().enumerate() {
            runs[k].push(load(&client_ns, *ip, secs));
        }
    }
    let mut rates = Vec::new();
    for ((name, _), mut v) in servers.iter().zip(runs) {
        v.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let r = v.swap_remove(v.len() / 2);
        rates.push(r.rate);
        println!(
            "| {name} | {:.0} | {:.0} µs | {:.0} µs | {} |",
            r.rate,
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.lost
        );
    }
    let ratio = rates[0] / rates[1];
    println!(
        "\nvmfabric / dnsmasq answers per second: {ratio:.2}× (target ≥ 1×: {})",
        if ratio >= 1.0 { "met" } else { "MISSED" }
    );

    println!(
        "\n## DNS with a new socket per query, one at a time (median of {reps} interleaved runs, {secs} s each)\n"
    );
    println!("| query | p50 | p99 | lost |");
    println!("|---|---:|---:|---:|");
    let local: Vec<String> = (0..NAMES).map(|i| format!("vm{i}.vm.internal.")).collect();
    let (gateway, reference) = (
        SocketAddr::from(([10, 250, 0, 1], 53)),
        SocketAddr::from(([10, 250, 0, 53], 53)),
    );
    let from_guest = Some(client_ns.as_str());
    // The last row is the forwarded row's upstream share: the same upstream asked
    // straight from the host, so that forwarded = switch path + upstream + the gateway's
    // own forwarding is visible term by term.
    let cases = [
        ("gateway, local name", from_guest, gateway, &local),
        (
            "gateway, forwarded to dnsmasq on loopback",
            from_guest,
            gateway,
            &external,
        ),
        ("dnsmasq in a namespace, local name", from_guest, reference, &local),
        (
            "the upstream dnsmasq asked from the host's loopback",
            None,
            upstream,
            &external,
        ),
    ];
    let mut fresh: Vec<Vec<(Duration, Duration, u64)>> = vec![Vec::new(); cases.len()];
    for _ in 0..reps {
        for (k, (_, ns, server, names)) in cases.iter().enumerate() {
            fresh[k].push(fresh_sockets(*ns, *server, names.to_vec(), secs));
        }
    }
    for ((what, _, _, _), mut v) in cases.iter().zip(fresh) {
        v.sort();
        let (p50, p99, lost) = v[v.len() / 2];
        println!(
            "| {what} | {:.0} µs | {:.0} µs | {lost} |",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
    println!(
        "gateway counters: {:?}",
        gw.counters()
            .snapshot()
            .into_iter()
            .filter(|(_, v)| *v > 0)
            .collect::<Vec<_>>()
    );
}

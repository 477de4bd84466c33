//! A hostile QEMU guest beside a victim guest on one userspace network, run by a real
//! daemon process. The attacker never asks for a lease: it configures the gateway's
//! address and claims it with gratuitous and unsolicited ARP, then takes the victim's
//! MAC and asks DHCP for the victim's address in its name. Meanwhile the victim renews
//! its lease, resolves a name and fetches a page from the host through NAT, round after
//! round: every round must succeed, its neighbour entry for the gateway must not point
//! at the attacker, and it must keep its lease. Then the attacker cycles through a
//! hundred source MACs (a MAC flood): every frame is dropped at its port and none is
//! learned. A second pair: a leased attacker opens UDP flows through NAT beyond its
//! share while the victim keeps its service. Needs root and QEMU with the guest image.

#[path = "../../vm/tests/common/mod.rs"]
mod common;
mod harness;

use harness::Process as Daemon;
use serde_json::{json, Value};

const ROUNDS: usize = 16;
/// Source MACs the attacker cycles through after its takeover attempt (a MAC flood;
/// one ARP probe each, a second apiece under TCG).
const MAC_FLOOD: usize = 60;

fn port_mac(d: &Daemon, network: &str, port: &str) -> String {
    d.ok("GET", &format!("/v1/networks/{network}/ports"), None)
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port)
        .map(|p| p["mac"].as_str().unwrap().to_string())
        .unwrap()
}

/// One pair of guests at a time: the NAT flood must open its flows faster than they
/// idle out (60 s), which four TCG guests on two cores may not.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What a test starts from: a daemon with network `arena`, and a web server on the
/// host's loopback.
struct Arena {
    _turn: std::sync::MutexGuard<'static, ()>,
    d: Daemon,
    web_port: u16,
    image: std::path::PathBuf,
    dir: std::path::PathBuf,
}

/// An [`Arena`] in `workdir` with `subnet` (host access on); `None` (the test skips)
/// without root or the guest image.
fn arena(workdir: &str, subnet: &str) -> Option<Arena> {
    let image = common::guest_dir()?;
    if !testkit::ready_or_skip(testkit::is_root(), "the hostile-guest suite runs as root") {
        return None;
    }
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::workdir(workdir);
    let d = Daemon::start(&dir, &image);
    let web_port = testkit::loopback_web_server("host");
    d.ok(
        "POST",
        "/v1/networks",
        Some(json!({"name": "arena", "subnet": subnet, "host_access": true})),
    );
    Some(Arena {
        _turn: turn,
        d,
        web_port,
        image,
        dir,
    })
}

/// Starts VM `name` on `arena` with `cmd` and waits for its lease; its address.
fn start_vm(d: &Daemon, name: &str, cmd: &str) -> String {
    d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"name": name, "network": "arena", "cmd": cmd})),
    );
    let vm = d.wait_vm(name, &["ready", "failed"]);
    assert_eq!(vm["state"], "ready", "{vm}");
    vm["ip"].as_str().unwrap().to_string()
}

/// The victim's `ROUND` lines once it is done: `rounds` of them, each ending `all_ok`.
fn victim_rounds(d: &Daemon, rounds: usize, all_ok: &str) -> Vec<String> {
    let out = d.wait_log("victim", "VICTIM-DONE");
    let lines: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("ROUND"))
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), rounds, "{out}");
    for r in &lines {
        assert!(r.ends_with(all_ok), "the victim lost service: {r}\n{out}");
    }
    lines
}

#[test]
fn a_hostile_guest_cannot_take_its_neighbours_gateway_or_lease() {
    let Some(Arena {
        _turn,
        d,
        web_port,
        image,
        dir,
    }) = arena("hostile", "10.86.0.0/24")
    else {
        return;
    };
    let victim_cmd = format!(
        "i=0; while [ $i -lt {ROUNDS} ]; do i=$((i+1)); sleep 2; ip=$(cat /run/ip); \
         if udhcpc -i eth0 -s /etc/dhcp-hook -n -q -t 3 -T 1 -r \"$ip\" >/dev/null 2>&1 \
            && [ \"$(cat /run/ip)\" = \"$ip\" ]; then r=ok; else r=fail; fi; \
         if nslookup gateway >/dev/null 2>&1; then n=ok; else n=fail; fi; \
         if timeout 10 wget -qO- http://10.86.0.254:{web_port}/ >/dev/null 2>&1; then w=ok; else w=fail; fi; \
         echo \"ROUND $i gw=$(ip neigh show 10.86.0.1 | cut -d' ' -f5) renew=$r dns=$n nat=$w\"; done; \
         echo VICTIM-DONE; sleep 600"
    );
    let victim_ip = start_vm(&d, "victim", &victim_cmd);
    let victim_mac = port_mac(&d, "arena", "victim");

    // The attacker: a guest on a stream port that never asks for a lease and attacks
    // at once: the state in which ports used to be open.
    let port = d.ok(
        "POST",
        "/v1/networks/arena/ports",
        Some(json!({"name": "attacker", "kind": "stream"})),
    );
    let attacker_mac = port["mac"].as_str().unwrap().to_string();
    let attack = format!(
        "ip link set eth0 up; ip addr add 10.86.0.1/24 dev eth0; sleep 1; \
         arping -U -c 30 -I eth0 10.86.0.1 >/dev/null 2>&1 & \
         arping -A -c 30 -I eth0 {victim_ip} >/dev/null 2>&1 & \
         sleep 30; \
         ip link set eth0 down; ip link set eth0 address {victim_mac}; ip link set eth0 up; \
         udhcpc -i eth0 -s /etc/dhcp-hook -n -q -t 3 -T 1 -r {victim_ip} && echo TAKEOVER-ACKED; \
         ip addr flush dev eth0; \
         i=0; while [ $i -lt {MAC_FLOOD} ]; do i=$((i+1)); \
           ip link set eth0 address 02:66:00:00:$(printf %02x $((i/256))):$(printf %02x $((i%256))); \
           arping -D -c 1 -w 1 -I eth0 10.86.0.99 >/dev/null 2>&1; \
         done; echo MAC-FLOOD-DONE; \
         echo ATTACK-DONE"
    );
    let nic = vm::Nic {
        backend: vm::NicBackend::Stream {
            path: port["path"].as_str().unwrap().into(),
        },
        mac: attacker_mac.parse().unwrap(),
    };
    let mut attacker = testkit::Guest::boot(
        &image,
        dir.join("attacker.console"),
        nic,
        "attacker",
        Some(&attack),
        &["VMF_IP=none", "VMF_END=hang"],
    );
    let attacker_out = attacker.wait_for("VMFABRIC_END");
    assert!(attacker_out.contains("ATTACK-DONE"), "{attacker_out}");
    assert!(attacker_out.contains("MAC-FLOOD-DONE"), "{attacker_out}");
    assert!(!attacker_out.contains("TAKEOVER-ACKED"), "{attacker_out}");

    for r in victim_rounds(&d, ROUNDS, "renew=ok dns=ok nat=ok") {
        assert!(
            !r.contains(&attacker_mac),
            "the victim's gateway entry points at the attacker: {r}"
        );
    }
    // (The victim sleeps after its rounds: a VM that ends takes its lease with it.)
    let leases: Vec<Value> = d
        .ok("GET", "/v1/networks/arena/leases", None)
        .as_array()
        .unwrap()
        .clone();
    let held = leases.iter().find(|l| l["ip"] == victim_ip.as_str()).unwrap();
    assert_eq!(
        held["mac"],
        victim_mac.as_str(),
        "the victim keeps its lease: {leases:?}"
    );
    // Every frame of the MAC flood (ARP probes from 0.0.0.0, which the port would pass
    // from its own MAC) came from a MAC the port is not locked to: dropped at the port,
    // so the table never saw them.
    let spoofed = d.metric("vmfabric_port_drops_total{network=\"arena\",port=\"attacker\",reason=\"spoofed\"}");
    // (The ARP phase before it sent up to 60 more.)
    println!("spoofed at the attacker's port: {spoofed}");
    assert!(spoofed >= MAC_FLOOD as u64 + 30, "{spoofed} spoofed frames");
    let table = d.ok("GET", "/metrics", None);
    let entries = table
        .as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("vmfabric_mac_table_entries{network=\"arena\"} "))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(usize::MAX);
    assert!(entries < 10, "the flood's MACs were learned: {entries} entries");
    drop(attacker);
    drop(d);
}

/// UDP flows through NAT the attacker opens: each lookup is a new socket in the guest,
/// so a new flow at the gateway (and a host socket), more than its share of 1,024.
const UDP_FLOWS: usize = 1_200;

/// A DNS-shaped UDP responder on the host's loopback: answers every query NXDOMAIN at
/// once (so busybox `nslookup` ends quickly) and counts the distinct host-side
/// sources it heard from, one per NAT flow.
fn loopback_nxdomain_responder() -> (u16, std::sync::Arc<std::sync::Mutex<std::collections::HashSet<u16>>>) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    let sources = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let seen = sources.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            seen.lock().unwrap().insert(from.port());
            // A response (QR), NXDOMAIN (RCODE 3), the question echoed.
            buf[2] |= 0x80;
            buf[3] = (buf[3] & 0xf0) | 3;
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    (port, sources)
}

/// A leased QEMU guest opens UDP flows through NAT as fast as it can, beyond its
/// share: the gateway admits its share and drops the rest, the daemon's descriptors
/// grow by at most that share, and a victim guest beside it keeps its DHCP renewals,
/// DNS, UDP through NAT (its own flows, to the same host service) and HTTP through
/// NAT throughout.
#[test]
fn a_guest_flooding_nat_with_udp_flows_exhausts_only_its_own_share() {
    let Some(Arena { _turn, d, web_port, .. }) = arena("hostile-nat", "10.87.0.0/24") else {
        return;
    };
    let (udp_port, sources) = loopback_nxdomain_responder();
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", d.pid())).unwrap().count();
    // Flows idle out after 60 s by default; a TCG guest under load has taken minutes to
    // open its share (seen: 1,201 flows in 426 s, never more than 242 at once). Long
    // idle times (a gateway setting) keep the share full however slow the flood.
    d.ok(
        "PUT",
        "/v1/networks/arena/settings",
        Some(json!({"flows": {"udp_idle_secs": 1800}})),
    );

    const NAT_ROUNDS: usize = 12;
    let victim_cmd = format!(
        "n=0; until ping -c 1 -W 1 attacker >/dev/null 2>&1 || [ $n -gt 300 ]; do n=$((n+1)); sleep 1; done; \
         i=0; while [ $i -lt {NAT_ROUNDS} ]; do i=$((i+1)); sleep 2; ip=$(cat /run/ip); \
         if udhcpc -i eth0 -s /etc/dhcp-hook -n -q -t 3 -T 1 -r \"$ip\" >/dev/null 2>&1 \
            && [ \"$(cat /run/ip)\" = \"$ip\" ]; then r=ok; else r=fail; fi; \
         if nslookup gateway >/dev/null 2>&1; then n=ok; else n=fail; fi; \
         if timeout 10 nslookup probe 10.87.0.254:{udp_port} 2>&1 | grep -q NXDOMAIN; then u=ok; else u=fail; fi; \
         if timeout 10 wget -qO- http://10.87.0.254:{web_port}/ >/dev/null 2>&1; then w=ok; else w=fail; fi; \
         echo \"ROUND $i renew=$r dns=$n udp=$u nat=$w\"; done; \
         echo VICTIM-DONE"
    );
    start_vm(&d, "victim", &victim_cmd);
    // Four loops of lookups, each a new UDP socket and so a new flow; a lookup the
    // gateway drops waits a second at most. The victim starts its rounds when the
    // attacker answers a ping, as the flood begins.
    let per_loop = UDP_FLOWS / 4;
    let attack = format!(
        "for l in 1 2 3 4; do ( i=0; while [ $i -lt {per_loop} ]; do i=$((i+1)); \
           timeout 1 nslookup f$l-$i 10.87.0.254:{udp_port} >/dev/null 2>&1; done; echo LOOP-DONE ) & done; \
         wait; echo FLOOD-DONE"
    );
    let fds_before = fds();
    start_vm(&d, "attacker", &attack);
    // Descriptors while the flood is on: its flows' host sockets, at most its share.
    let mut fds_peak = 0;
    let mut flows_peak = 0;
    let out = loop {
        fds_peak = fds_peak.max(fds());
        flows_peak = flows_peak.max(d.metric("vmfabric_nat_open_flows{network=\"arena\",proto=\"udp\"}"));
        let logs = d.logs("attacker");
        if logs.contains("FLOOD-DONE") {
            break logs;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert_eq!(out.matches("LOOP-DONE").count(), 4, "{out}");
    victim_rounds(&d, NAT_ROUNDS, "renew=ok dns=ok udp=ok nat=ok");
    let dropped = d.metric("vmfabric_nat_refused_total{network=\"arena\",proto=\"udp\",reason=\"dropped\"}");
    let flows = d.metric("vmfabric_nat_flows_total{network=\"arena\",proto=\"udp\"}");
    let heard = sources.lock().unwrap().len();
    println!(
        "UDP flows opened {flows}, datagrams dropped {dropped}, sources heard {heard}, \
         descriptors {fds_before} -> peak {fds_peak}, open flows peak {flows_peak}"
    );
    // The attacker filled its share. (The host may hear a few more sources than the
    // share: the victim's lookups too. At any one time the gauge below holds it to the
    // share.)
    assert!(heard >= 1_000, "the attacker did not fill its share: {heard} flows");
    assert!(dropped >= 50, "nothing past the share was dropped: {dropped}");
    assert!(
        fds_peak <= fds_before + 1_024 + 64,
        "{fds_before} -> {fds_peak} descriptors"
    );
    // The gauge of open flows saw the share fill, and no further.
    assert!(
        (1_000..=1_024 + NAT_ROUNDS as u64).contains(&flows_peak),
        "{flows_peak} open UDP flows at most"
    );
    drop(d);
}

//! A hostile QEMU guest beside a victim guest on one userspace network, run by a real
//! daemon process. The attacker never asks for a lease: it configures the gateway's
//! address and claims it with gratuitous and unsolicited ARP, then takes the victim's
//! MAC and asks DHCP for the victim's address in its name. Meanwhile the victim renews
//! its lease, resolves a name and fetches a page from the host through NAT, round after
//! round: every round must succeed, its neighbour entry for the gateway must not point
//! at the attacker, and it must keep its lease. Then the attacker cycles through a
//! hundred source MACs (a MAC flood): every frame is dropped at its port and none is
//! learned. Needs root and QEMU with the guest image.

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

#[test]
fn a_hostile_guest_cannot_take_its_neighbours_gateway_or_lease() {
    let Some(image) = common::guest_dir() else { return };
    if !testkit::ready_or_skip(testkit::is_root(), "the hostile-guest suite runs as root") {
        return;
    }
    let dir = common::workdir("hostile");
    let d = Daemon::start(&dir, &image);
    let web_port = testkit::loopback_web_server("host");
    d.ok(
        "POST",
        "/v1/networks",
        Some(json!({"name": "arena", "subnet": "10.86.0.0/24", "host_access": true})),
    );

    let victim_cmd = format!(
        "i=0; while [ $i -lt {ROUNDS} ]; do i=$((i+1)); sleep 2; ip=$(cat /run/ip); \
         if udhcpc -i eth0 -s /etc/dhcp-hook -n -q -t 3 -T 1 -r \"$ip\" >/dev/null 2>&1 \
            && [ \"$(cat /run/ip)\" = \"$ip\" ]; then r=ok; else r=fail; fi; \
         if nslookup gateway >/dev/null 2>&1; then n=ok; else n=fail; fi; \
         if timeout 10 wget -qO- http://10.86.0.254:{web_port}/ >/dev/null 2>&1; then w=ok; else w=fail; fi; \
         echo \"ROUND $i gw=$(ip neigh show 10.86.0.1 | cut -d' ' -f5) renew=$r dns=$n nat=$w\"; done; \
         echo VICTIM-DONE"
    );
    d.ok(
        "POST",
        "/v1/vms",
        Some(json!({"name": "victim", "network": "arena", "cmd": victim_cmd})),
    );
    let victim = d.wait_vm("victim", &["ready", "failed"]);
    assert_eq!(victim["state"], "ready", "{victim}");
    let victim_ip = victim["ip"].as_str().unwrap().to_string();
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

    let out = d.wait_log("victim", "VICTIM-DONE");
    let rounds: Vec<&str> = out.lines().filter(|l| l.starts_with("ROUND")).collect();
    assert_eq!(rounds.len(), ROUNDS, "{out}");
    for r in &rounds {
        assert!(
            r.ends_with("renew=ok dns=ok nat=ok"),
            "the victim lost service: {r}\n{out}"
        );
        assert!(
            !r.contains(&attacker_mac),
            "the victim's gateway entry points at the attacker: {r}"
        );
    }
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

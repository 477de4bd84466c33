//! Hostile guests on userspace ports made through the API: a port is locked from its
//! birth, so a guest that never asks for a lease can neither spoof nor poison, and
//! DHCP acts only on the sender's own lease. Real sockets, the daemon in process.

use std::net::Ipv4Addr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dhcproto::v4::{self, DhcpOption, MessageType};
use dhcproto::{Decodable, Decoder, Encodable};
use fabric::Mac;
use gateway::wire::{self, Inbound};
use serde_json::json;

mod harness;

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmf-hostile-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A guest on a new unixgram port of `default`: its socket, and the MAC it was given.
fn guest(d: &harness::Running, dir: &Path, name: &str) -> (UnixDatagram, Mac) {
    let (s, port) = d.call(
        "POST",
        "/v1/networks/default/ports",
        Some(json!({"name": name, "kind": "unixgram"})),
    );
    assert_eq!(s, 201, "{port}");
    let sock = UnixDatagram::bind(dir.join(format!("{name}.vm"))).unwrap();
    sock.connect(port["path"].as_str().unwrap()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (sock, port["mac"].as_str().unwrap().parse().unwrap())
}

fn dhcp(kind: MessageType, chaddr: Mac, eth_src: Mac, opts: Vec<DhcpOption>, ciaddr: Ipv4Addr) -> Vec<u8> {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut m = v4::Message::new_with_id(7, ciaddr, z, z, z, &chaddr.0);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in opts {
        m.opts_mut().insert(o);
    }
    wire::udp_frame(
        eth_src,
        Mac::BROADCAST,
        (ciaddr, 68),
        (Ipv4Addr::BROADCAST, 67),
        &m.to_vec().unwrap(),
    )
}

/// The next DHCP answer a guest gets.
fn dhcp_answer(sock: &UnixDatagram) -> v4::Message {
    let mut buf = [0u8; 2048];
    loop {
        let n = sock.recv(&mut buf).expect("a DHCP answer");
        if let Ok(Inbound::Udp {
            src_port: 67, payload, ..
        }) = wire::classify(&buf[..n])
        {
            return v4::Message::decode(&mut Decoder::new(payload)).unwrap();
        }
    }
}

/// DISCOVER then REQUEST what was offered, asking for `wanted` if given: the address
/// the guest is acked.
fn lease(sock: &UnixDatagram, mac: Mac, wanted: Option<Ipv4Addr>) -> Ipv4Addr {
    let z = Ipv4Addr::UNSPECIFIED;
    let ask: Vec<DhcpOption> = wanted.map(DhcpOption::RequestedIpAddress).into_iter().collect();
    sock.send(&dhcp(MessageType::Discover, mac, mac, ask, z)).unwrap();
    let offered = dhcp_answer(sock).yiaddr();
    let request = vec![
        DhcpOption::RequestedIpAddress(offered),
        DhcpOption::ServerIdentifier(GATEWAY),
    ];
    sock.send(&dhcp(MessageType::Request, mac, mac, request, z)).unwrap();
    let ack = dhcp_answer(sock);
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    ack.yiaddr()
}

fn arp(op: u16, eth_src: Mac, sender: (Mac, Ipv4Addr), target_ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Mac::BROADCAST.0.to_vec();
    f.extend(eth_src.0);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    f.extend(op.to_be_bytes());
    f.extend(sender.0 .0);
    f.extend(sender.1.octets());
    f.extend([0; 6]);
    f.extend(target_ip.octets());
    f
}

#[test]
fn a_guest_that_never_leased_can_neither_spoof_nor_speak_dhcp_for_another() {
    let dir = tmp("prelease");
    let d = harness::start(&dir, None);
    let (victim, victim_mac) = guest(&d, &dir, "victim");
    let (attacker, attacker_mac) = guest(&d, &dir, "attacker");

    victim
        .send(&dhcp(
            MessageType::Discover,
            victim_mac,
            victim_mac,
            vec![],
            Ipv4Addr::UNSPECIFIED,
        ))
        .unwrap();
    let ip = dhcp_answer(&victim).yiaddr();
    let request = vec![
        DhcpOption::RequestedIpAddress(ip),
        DhcpOption::ServerIdentifier(GATEWAY),
    ];
    victim
        .send(&dhcp(
            MessageType::Request,
            victim_mac,
            victim_mac,
            request.clone(),
            Ipv4Addr::UNSPECIFIED,
        ))
        .unwrap();
    assert_eq!(dhcp_answer(&victim).opts().msg_type(), Some(MessageType::Ack));

    // The attacker has no lease: an ARP reply taking the gateway's address, a frame
    // in the victim's MAC, IPv4 from an address it was never given, a Router
    // Advertisement; and DHCP in the victim's name from its own MAC.
    let spoofed = [
        arp(2, attacker_mac, (attacker_mac, GATEWAY), ip),
        arp(1, attacker_mac, (attacker_mac, GATEWAY), GATEWAY),
        arp(1, victim_mac, (victim_mac, ip), GATEWAY),
        wire::udp_frame(
            attacker_mac,
            Mac::BROADCAST,
            (Ipv4Addr::new(10, 77, 0, 50), 9),
            (ip, 9),
            b"spoof",
        ),
    ];
    for f in &spoofed {
        attacker.send(f).unwrap();
    }
    let mut ra = Mac::BROADCAST.0.to_vec();
    ra.extend(attacker_mac.0);
    ra.extend([0x86, 0xdd, 0x60, 0, 0, 0, 0, 16, 58, 255]);
    ra.extend([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    ra.extend([0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    ra.extend([134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]);
    attacker.send(&ra).unwrap();
    let in_victims_name = [
        dhcp(MessageType::Release, victim_mac, attacker_mac, vec![], ip),
        dhcp(
            MessageType::Request,
            victim_mac,
            attacker_mac,
            request,
            Ipv4Addr::UNSPECIFIED,
        ),
        dhcp(
            MessageType::Decline,
            victim_mac,
            attacker_mac,
            vec![DhcpOption::RequestedIpAddress(ip)],
            Ipv4Addr::UNSPECIFIED,
        ),
    ];
    for f in &in_victims_name {
        attacker.send(f).unwrap();
    }
    // What it may send before a lease: an ARP probe, which the victim sees.
    let probe = arp(
        1,
        attacker_mac,
        (attacker_mac, Ipv4Addr::UNSPECIFIED),
        Ipv4Addr::new(10, 77, 0, 99),
    );
    attacker.send(&probe).unwrap();
    let mut buf = [0u8; 2048];
    let first = victim.recv(&mut buf).expect("the probe");
    assert_eq!(&buf[..first], &probe[..], "the victim heard a spoofed frame first");

    let value = |prefix: &str| -> u64 {
        let metrics = d.daemon.metrics();
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
    };
    // The RELEASE comes from the victim's address, so the switch drops it with the
    // four spoofed frames; the REQUEST and DECLINE come from 0.0.0.0 and reach the
    // gateway, which refuses them.
    assert_eq!(
        value("vmfabric_port_drops_total{network=\"default\",port=\"attacker\",reason=\"spoofed\"}"),
        5
    );
    assert_eq!(
        value("vmfabric_port_drops_total{network=\"default\",port=\"attacker\",reason=\"ipv6_off\"}"),
        1
    );
    // The gateway reads its port on its own task: wait for it to have seen both.
    let foreign = "vmfabric_dhcp_refused_total{network=\"default\",reason=\"foreign_client\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while value(foreign) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(value(foreign), 2);
    // The claims on the gateway's address never reached it: the count of conflicts it
    // saw stays 0, because there was nothing left to act on.
    assert_eq!(value("vmfabric_arp_conflicts_total{network=\"default\"}"), 0);
    let (_, leases) = d.call("GET", "/v1/networks/default/leases", None);
    assert_eq!(leases[0]["mac"], victim_mac.to_string());
    assert_eq!(leases[0]["ip"], ip.to_string(), "the victim keeps its lease");
    // The page after all this (ports, drops, DHCP, a lease) is well formed.
    harness::check_metrics_pages(&d.socket);
    d.stop();
}

/// A port taken away takes its lease with it at once (not when the lease would have
/// run out), its address rests before another guest may lease it (a late packet to it
/// must not reach a new owner), and a forward to it resets its clients at once instead
/// of leaving them hanging.
#[test]
fn a_removed_port_frees_its_lease_at_once_and_its_forward_refuses() {
    let dir = tmp("gone");
    let d = harness::start(&dir, None);
    let (web, web_mac) = guest(&d, &dir, "web");
    let ip = lease(&web, web_mac, None);
    let (s, fwd) = d.call(
        "POST",
        "/v1/networks/default/forwards",
        Some(json!({"host": "127.0.0.1:0", "guest": format!("{ip}:80")})),
    );
    assert_eq!(s, 201, "{fwd}");
    let host: std::net::SocketAddr = fwd["host"].as_str().unwrap().parse().unwrap();
    let dangling = || d.call("GET", "/v1/networks/default/forwards", None).1[0]["dangling"].clone();
    assert_eq!(dangling(), json!(false), "its guest holds the address");

    let (s, _) = d.call("DELETE", "/v1/networks/default/ports/web", None);
    assert_eq!(s, 204);
    let (_, leases) = d.call("GET", "/v1/networks/default/leases", None);
    assert_eq!(leases, json!([]), "the lease went with its port");
    assert_eq!(dangling(), json!(true), "the forward is listed as dangling");

    // Another guest asks for the address: it rests, so it gets another.
    let (late, late_mac) = guest(&d, &dir, "late");
    assert_ne!(lease(&late, late_mac, Some(ip)), ip, "the gone port's address rests");

    // A client of the forward is reset, not left waiting for the gone guest (a connect
    // to it would wait 15 s before giving up).
    use std::io::Read;
    let mut client = std::net::TcpStream::connect(host).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let read = client.read(&mut [0u8; 16]);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset) || matches!(read, Ok(0)),
        "{read:?}"
    );
    let refused = d
        .daemon
        .metric_families()
        .value("vmfabric_forward_refused", &[("network", "default")]);
    assert_eq!(refused, Some(1));
    d.stop();
}

#[test]
fn port_macs_can_be_given_or_learned_once_and_are_refused_when_taken_or_bad() {
    let dir = tmp("macs");
    let d = harness::start(&dir, None);
    let add = |body: serde_json::Value| d.call("POST", "/v1/networks/default/ports", Some(body));
    let (s, p) = add(json!({"name": "given", "kind": "unixgram", "mac": "02:00:00:00:aa:01"}));
    assert_eq!((s, p["mac"].as_str()), (201, Some("02:00:00:00:aa:01")));
    let (s, _) = add(json!({"name": "again", "kind": "unixgram", "mac": "02:00:00:00:aa:01"}));
    assert_eq!(s, 409, "a MAC belongs to one port");
    let (s, _) = add(json!({"name": "bcast", "kind": "unixgram", "mac": "ff:ff:ff:ff:ff:ff"}));
    assert_eq!(s, 400);
    let (s, _) = add(json!({"name": "both", "kind": "unixgram", "mac": "02:00:00:00:aa:02", "learn_mac_once": true}));
    assert_eq!(s, 400);

    // A port that learns its MAC keeps the first one it hears.
    let (s, p) = add(json!({"name": "learner", "kind": "unixgram", "learn_mac_once": true}));
    assert_eq!((s, &p["learn_mac_once"]), (201, &json!(true)));
    let (_, observer) = d.daemon.switch().add_port("default", "observer").unwrap();
    let observer = UnixDatagram::from(observer);
    observer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let sock = UnixDatagram::bind(dir.join("learner.vm")).unwrap();
    sock.connect(p["path"].as_str().unwrap()).unwrap();
    let own = Mac([0x02, 0x11, 0, 0, 0, 1]);
    let probe = |mac: Mac| arp(1, mac, (mac, Ipv4Addr::UNSPECIFIED), Ipv4Addr::new(10, 77, 0, 98));
    sock.send(&probe(own)).unwrap();
    sock.send(&probe(Mac([0x02, 0x11, 0, 0, 0, 2]))).unwrap();
    sock.send(&probe(own)).unwrap();
    let mut buf = [0u8; 2048];
    for _ in 0..2 {
        observer.recv(&mut buf).unwrap();
        assert_eq!(&buf[6..12], &own.0, "only the first MAC is heard");
    }
    // The lock and the port survive a restart.
    d.stop();
    let d = harness::start(&dir, None);
    let (_, ports) = d.call("GET", "/v1/networks/default/ports", None);
    let learner = ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "learner")
        .unwrap();
    assert_eq!(learner["learn_mac_once"], json!(true));
    let given = ports.as_array().unwrap().iter().find(|p| p["name"] == "given").unwrap();
    assert_eq!(given["mac"], "02:00:00:00:aa:01");
    d.stop();
}

//! The hostile-guest checks of `hostile.rs`, on a kernel-mode network: two TAP ports on
//! the daemon's bridge, their guests played by this test writing raw frames to the TAP
//! devices. The victim gets its lease; the attacker, which never asks for one, claims
//! the router's and the gateway's addresses with ARP, sends from the victim's MAC and
//! from an address it does not hold, advertises itself as an IPv6 router, offers DHCP
//! (bare and inside 802.1Q and 802.1ad tags) and asks DHCP in the victim's name. None
//! of its spoofed frames may reach the victim, and the victim keeps its lease. Needs
//! root and nft.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dhcproto::v4::{self, DhcpOption, MessageType};
use dhcproto::{Decodable, Decoder, Encodable};
use fabric::{Mac, Tun, TunOptions};
use gateway::wire::{self, Inbound};
use serde_json::json;

mod harness;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmf-hostile-k-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A guest's end of a TAP port.
struct TapGuest {
    fd: std::os::fd::OwnedFd,
    mac: Mac,
    ip: Ipv4Addr,
}

impl TapGuest {
    fn open(port: &serde_json::Value) -> TapGuest {
        let tun = Tun::open(
            port["path"].as_str().unwrap(),
            TunOptions {
                nonblocking: true,
                multi_queue: false,
                vnet_hdr: false,
            },
        )
        .unwrap();
        TapGuest {
            fd: tun.into_fd(),
            mac: port["mac"].as_str().unwrap().parse().unwrap(),
            ip: Ipv4Addr::UNSPECIFIED,
        }
    }

    fn send(&self, frame: &[u8]) {
        rustix::io::write(self.fd.as_fd(), frame).unwrap();
    }

    /// The next frame within `wait`.
    fn recv(&self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 2048];
        while Instant::now() < deadline {
            match rustix::io::read(self.fd.as_fd(), &mut buf) {
                Ok(n) => return Some(buf[..n].to_vec()),
                Err(rustix::io::Errno::AGAIN) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("TAP read: {e}"),
            }
        }
        None
    }

    /// The next DHCP answer for this guest.
    fn dhcp_answer(&self) -> v4::Message {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(f) = self.recv(deadline.saturating_duration_since(Instant::now())) {
            if let Ok(Inbound::Udp {
                src_port: 67, payload, ..
            }) = wire::classify(&f)
            {
                let m = v4::Message::decode(&mut Decoder::new(payload)).unwrap();
                if m.chaddr().starts_with(&self.mac.0) {
                    return m;
                }
            }
        }
        panic!("no DHCP answer");
    }
}

fn dhcp(kind: MessageType, chaddr: Mac, eth_src: Mac, opts: Vec<DhcpOption>, ciaddr: Ipv4Addr) -> Vec<u8> {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut m = v4::Message::new_with_id(9, ciaddr, z, z, z, &chaddr.0);
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

/// `frame` with a VLAN tag of `tpid` (VLAN 1) after its addresses.
fn tagged(frame: &[u8], tpid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend(tpid.to_be_bytes());
    f.extend([0, 1]);
    f.extend(&frame[12..]);
    f
}

fn metric(d: &harness::Running, prefix: &str) -> u64 {
    d.daemon
        .metrics()
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_kernel_mode_guest_without_a_lease_can_neither_spoof_nor_serve_nor_act_in_anothers_name() {
    let ready = testkit::is_root() && Command::new("nft").arg("--version").output().is_ok();
    if !testkit::ready_or_skip(ready, "needs root and nft for kernel mode") {
        return;
    }
    let dir = tmp("spoof");
    let _gone = harness::KernelInstanceGone::of(&dir.join("state"));
    let d = harness::start(&dir, None);
    let bridge = format!("vmfhk{}", std::process::id() % 10000);
    let (s, v) = d.call(
        "POST",
        "/v1/networks",
        Some(json!({"name": "hk", "subnet": "10.91.0.0/24", "mode": "kernel", "bridge": bridge})),
    );
    assert_eq!(s, 201, "{v}");
    let add = |name: &str| {
        let (s, p) = d.call(
            "POST",
            "/v1/networks/hk/ports",
            Some(json!({"name": name, "kind": "tap"})),
        );
        assert_eq!(s, 201, "{p}");
        p
    };
    let (victim_port, attacker_port) = (add("victim"), add("attacker"));
    let mut victim = TapGuest::open(&victim_port);
    let attacker = TapGuest::open(&attacker_port);
    let reserved = |p: &serde_json::Value| -> Ipv4Addr {
        let (_, r) = d.call("GET", "/v1/networks/hk/reservations", None);
        r.as_array()
            .unwrap()
            .iter()
            .find(|x| x["key"] == p["mac"] || x["key"] == p["name"])
            .and_then(|x| x["ip"].as_str())
            .unwrap_or_else(|| panic!("no reservation for {p} in {r}"))
            .parse()
            .unwrap()
    };
    let attacker_ip = reserved(&attacker_port);

    // The victim's lease, through the bridge and the gateway's uplink.
    victim.send(&dhcp(
        MessageType::Discover,
        victim.mac,
        victim.mac,
        vec![],
        Ipv4Addr::UNSPECIFIED,
    ));
    let offer = victim.dhcp_answer();
    let server = match offer.opts().get(v4::OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => *ip,
        other => panic!("no server identifier: {other:?}"),
    };
    let request = vec![
        DhcpOption::RequestedIpAddress(offer.yiaddr()),
        DhcpOption::ServerIdentifier(server),
    ];
    victim.send(&dhcp(
        MessageType::Request,
        victim.mac,
        victim.mac,
        request.clone(),
        Ipv4Addr::UNSPECIFIED,
    ));
    let ack = victim.dhcp_answer();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    victim.ip = ack.yiaddr();
    let router = Ipv4Addr::new(10, 91, 0, 1);

    // What the attacker must not get to the victim.
    let mut ra = Mac::BROADCAST.0.to_vec();
    ra.extend(attacker.mac.0);
    ra.extend([0x86, 0xdd, 0x60, 0, 0, 0, 0, 16, 58, 255]);
    ra.extend([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    ra.extend([0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    ra.extend([134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut rogue_offer = v4::Message::new_with_id(
        9,
        Ipv4Addr::UNSPECIFIED,
        victim.ip,
        attacker_ip,
        Ipv4Addr::UNSPECIFIED,
        &victim.mac.0,
    );
    rogue_offer
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Offer));
    rogue_offer.opts_mut().insert(DhcpOption::Router(vec![attacker_ip]));
    let rogue_offer = wire::udp_frame(
        attacker.mac,
        Mac::BROADCAST,
        (attacker_ip, 67),
        (Ipv4Addr::BROADCAST, 68),
        &rogue_offer.to_vec().unwrap(),
    );
    let spoofed = [
        arp(2, attacker.mac, (attacker.mac, router), victim.ip),
        arp(1, attacker.mac, (attacker.mac, server), server),
        arp(1, victim.mac, (victim.mac, victim.ip), router),
        wire::udp_frame(
            attacker.mac,
            Mac::BROADCAST,
            (Ipv4Addr::new(10, 91, 0, 250), 9),
            (victim.ip, 9),
            b"spoof",
        ),
        ra,
        rogue_offer.clone(),
        tagged(&rogue_offer, 0x8100),
        tagged(&rogue_offer, 0x88a8),
        tagged(&tagged(&rogue_offer, 0x8100), 0x88a8),
    ];
    for f in &spoofed {
        attacker.send(f);
    }
    // DHCP in the victim's name, from the attacker's own MAC: from 0.0.0.0 it reaches
    // the gateway, which refuses it; the RELEASE claims the victim's address and does
    // not leave the attacker's port.
    let in_victims_name = [
        dhcp(MessageType::Release, victim.mac, attacker.mac, vec![], victim.ip),
        dhcp(
            MessageType::Request,
            victim.mac,
            attacker.mac,
            request,
            Ipv4Addr::UNSPECIFIED,
        ),
        dhcp(
            MessageType::Decline,
            victim.mac,
            attacker.mac,
            vec![DhcpOption::RequestedIpAddress(victim.ip)],
            Ipv4Addr::UNSPECIFIED,
        ),
    ];
    for f in &in_victims_name {
        attacker.send(f);
    }
    // A frame the attacker may send (its own MAC and reserved address): once the victim
    // has it, everything the attacker sent before was delivered or dropped.
    let barrier = wire::udp_frame(
        attacker.mac,
        Mac::BROADCAST,
        (attacker_ip, 9),
        (Ipv4Addr::new(10, 91, 0, 255), 9),
        b"barrier",
    );
    attacker.send(&barrier);
    let mut heard = Vec::new();
    loop {
        let f = victim
            .recv(Duration::from_secs(10))
            .expect("the barrier frame should reach the victim");
        if f == barrier {
            break;
        }
        heard.push(f);
    }
    // The path was open: the attacker's own DHCP broadcasts (from 0.0.0.0, its MAC)
    // crossed the bridge, so what is missing was dropped, not lost.
    assert!(heard.contains(&in_victims_name[1]), "{} frames heard", heard.len());
    for (i, f) in spoofed.iter().enumerate() {
        assert!(!heard.contains(f), "spoofed frame {i} reached the victim");
    }
    assert!(
        !heard.contains(&in_victims_name[0]),
        "the RELEASE from the victim's address"
    );

    // The gateway saw the REQUEST and DECLINE and refused both.
    let foreign = "vmfabric_dhcp_refused_total{network=\"hk\",reason=\"foreign_client\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&d, foreign) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(&d, foreign), 2);
    let (_, leases) = d.call("GET", "/v1/networks/hk/leases", None);
    let mine = leases
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mac"] == victim.mac.to_string())
        .unwrap_or_else(|| panic!("the victim's lease is gone: {leases}"));
    assert_eq!(mine["ip"], victim.ip.to_string(), "the victim keeps its address");
    let (s, _) = d.call("DELETE", "/v1/networks/hk?force=true", None);
    assert_eq!(s, 204);
    assert!(!Path::new("/sys/class/net").join(&bridge).exists());
    d.stop();
}

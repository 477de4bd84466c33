//! A guest floods its gateway with malformed and abusive frames at the rate a socket
//! takes them: garbage DHCP and DNS, bad checksums, IPv4 headers that lie about their
//! length, fragments, TCP to the gateway's DNS and through NAT, UDP NAT flows to as
//! many ports as it likes. The daemon is a real process, measured from outside: its
//! resident memory and open descriptors must come back near where they were once the
//! flows have timed out, and a victim beside the attacker must still get its DHCP
//! renewal and DNS answers afterwards. The figures are printed.

use std::net::Ipv4Addr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use dhcproto::v4::{self, DhcpOption, MessageType};
use dhcproto::{Decodable, Decoder, Encodable};
use fabric::Mac;
use gateway::wire::{self, Inbound};
use serde_json::json;

mod harness;

const NET: &str = "flood";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 92, 0, 1);
const HOST: Ipv4Addr = Ipv4Addr::new(10, 92, 0, 254);
/// Allowed growth of resident memory once the attack is over: glibc keeps part of what
/// the flows and queues used for reuse (measured and printed by the test: 28 MB before,
/// 36 MB after the first round, 39 MB after the second, here), so the bound is on that,
/// and a second round must mostly reuse it rather than add to it. (With a 64 KiB
/// receive buffer per UDP NAT flow it was 46, 49 and 74 MB after three rounds.)
const RSS_SLACK_KB: u64 = 16 * 1024;
const REUSE_SLACK_KB: u64 = 8 * 1024;
const FD_SLACK: usize = 8;

struct Guest {
    sock: UnixDatagram,
    mac: Mac,
    ip: Ipv4Addr,
    gateway_mac: Mac,
}

fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn dhcp_msg(kind: MessageType, mac: Mac, opts: Vec<DhcpOption>) -> Vec<u8> {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut m = v4::Message::new_with_id(11, z, z, z, z, &mac.0);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in opts {
        m.opts_mut().insert(o);
    }
    m.to_vec().unwrap()
}

fn answer(sock: &UnixDatagram, want_src_port: u16) -> (Mac, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let Ok(n) = sock.recv(&mut buf) else { continue };
        if let Ok(Inbound::Udp {
            src_port,
            src_mac,
            payload,
            ..
        }) = wire::classify(&buf[..n])
        {
            if src_port == want_src_port {
                return (src_mac, payload.to_vec());
            }
        }
    }
    panic!("no answer from port {want_src_port}");
}

/// DISCOVER and REQUEST; returns the leased address and the gateway's MAC.
fn lease(sock: &UnixDatagram, mac: Mac) -> (Ipv4Addr, Mac) {
    let z = Ipv4Addr::UNSPECIFIED;
    let send = |payload: Vec<u8>| {
        let f = wire::udp_frame(mac, Mac::BROADCAST, (z, 68), (Ipv4Addr::BROADCAST, 67), &payload);
        sock.send(&f).unwrap();
    };
    send(dhcp_msg(MessageType::Discover, mac, vec![]));
    let (_, offer) = answer(sock, 67);
    let offer = v4::Message::decode(&mut Decoder::new(&offer)).unwrap();
    send(dhcp_msg(
        MessageType::Request,
        mac,
        vec![
            DhcpOption::RequestedIpAddress(offer.yiaddr()),
            DhcpOption::ServerIdentifier(GATEWAY),
        ],
    ));
    let (gateway_mac, ack) = answer(sock, 67);
    let ack = v4::Message::decode(&mut Decoder::new(&ack)).unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    (ack.yiaddr(), gateway_mac)
}

fn guest(d: &harness::Process, dir: &Path, name: &str) -> Guest {
    let port = d.ok(
        "POST",
        &format!("/v1/networks/{NET}/ports"),
        Some(json!({"name": name, "kind": "unixgram"})),
    );
    let sock = UnixDatagram::bind(dir.join(format!("{name}.vm"))).unwrap();
    sock.connect(port["path"].as_str().unwrap()).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mac: Mac = port["mac"].as_str().unwrap().parse().unwrap();
    let (ip, gateway_mac) = lease(&sock, mac);
    Guest {
        sock,
        mac,
        ip,
        gateway_mac,
    }
}

/// An IPv4 packet with any header fields, checksummed.
fn ipv4(g: &Guest, dst: Ipv4Addr, proto: u8, flags_frag: u16, total_len: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = g.gateway_mac.0.to_vec();
    f.extend(g.mac.0);
    f.extend([0x08, 0x00]);
    let mut h = vec![0x45, 0];
    h.extend(total_len.to_be_bytes());
    h.extend([0, 1]);
    h.extend(flags_frag.to_be_bytes());
    h.extend([64, proto, 0, 0]);
    h.extend(g.ip.octets());
    h.extend(dst.octets());
    let mut sum: u32 = h.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let sum = !(sum as u16);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend(h);
    f.extend(payload);
    f
}

fn tcp_syn(g: &Guest, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut t = sport.to_be_bytes().to_vec();
    t.extend(dport.to_be_bytes());
    t.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    ipv4(g, dst, 6, 0, 40, &t)
}

/// The attack's frames, cycling through every kind; `i` varies ports and sizes.
fn garbage(g: &Guest, i: usize) -> Vec<u8> {
    let noise: Vec<u8> = (0..(i * 7919) % 600).map(|k| (k * 31 + i) as u8).collect();
    let port = 1024 + (i % 60000) as u16;
    match i % 9 {
        0 => wire::udp_frame(g.mac, g.gateway_mac, (g.ip, port), (GATEWAY, 53), &noise),
        1 => wire::udp_frame(g.mac, Mac::BROADCAST, (g.ip, 68), (Ipv4Addr::BROADCAST, 67), &noise),
        2 => {
            let mut f = wire::udp_frame(g.mac, g.gateway_mac, (g.ip, port), (GATEWAY, 53), b"\x12\x34\x01\x00");
            let last = f.len() - 1;
            f[last] ^= 0xff; // the UDP checksum no longer matches
            f
        }
        3 => ipv4(g, GATEWAY, 17, 0, 1400, &noise), // claims more than it carries
        4 => ipv4(g, HOST, 17, 0x2000, 28 + noise.len() as u16, &noise), // a first fragment
        5 => ipv4(g, HOST, 17, 0x00b9, 20 + noise.len() as u16, &noise), // a later fragment
        6 => tcp_syn(g, GATEWAY, port, 53),
        7 => tcp_syn(g, HOST, port, 9),
        // A new UDP NAT flow per source port, to the host's loopback.
        _ => wire::udp_frame(
            g.mac,
            g.gateway_mac,
            (g.ip, port),
            (HOST, 53),
            &noise[..noise.len().min(64)],
        ),
    }
}

/// One round of the attack; returns resident memory (kB) and descriptors once the
/// flows have timed out, and prints the figures.
fn attack(attacker: &Guest, pid: u32, (rss0, fds0): (u64, usize), round: usize) -> (u64, usize) {
    const FRAMES: usize = 300_000;
    let (mut peak_rss, mut peak_fds) = (rss0, fds0);
    let started = Instant::now();
    for i in 0..FRAMES {
        // A full socket means the switch is behind: the frame is the attacker's loss.
        let _ = attacker.sock.send(&garbage(attacker, i));
        if i % 10_000 == 0 {
            peak_rss = peak_rss.max(status_kb(pid, "VmRSS:"));
            peak_fds = peak_fds.max(fds(pid));
        }
    }
    let took = started.elapsed();
    // The flows time out (10 s for DNS-like ones); then the descriptors must be back.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (rss1, fds1) = loop {
        std::thread::sleep(Duration::from_secs(1));
        let (rss, n) = (status_kb(pid, "VmRSS:"), fds(pid));
        peak_rss = peak_rss.max(rss);
        peak_fds = peak_fds.max(n);
        if (n <= fds0 + FD_SLACK && Instant::now() > deadline - Duration::from_secs(15)) || Instant::now() > deadline {
            break (rss, n);
        }
    };
    println!(
        "flood round {round}: {FRAMES} frames in {took:?}; RSS {rss0} kB before, {peak_rss} kB at most, \
         {rss1} kB after; fds {fds0} before, {peak_fds} at most, {fds1} after"
    );
    (rss1, fds1)
}

#[test]
fn a_flood_of_bad_frames_leaves_the_daemon_as_it_found_it_and_the_victim_served() {
    if !testkit::ready_or_skip(testkit::is_root(), "the flood runs a real daemon as root") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmf-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = harness::Process::start(&dir, &dir);
    d.ok(
        "POST",
        "/v1/networks",
        Some(json!({"name": NET, "subnet": "10.92.0.0/24", "host_access": true})),
    );
    let victim = guest(&d, &dir, "victim");
    let attacker = guest(&d, &dir, "attacker");
    let pid = d.pid();
    std::thread::sleep(Duration::from_secs(1));
    let (rss0, fds0) = (status_kb(pid, "VmRSS:"), fds(pid));

    // Two rounds: memory the allocator keeps after the first must be reused by the
    // second, not added to.
    let mut after = Vec::new();
    for round in 1..=2 {
        let (rss1, fds1) = attack(&attacker, pid, (rss0, fds0), round);
        assert!(fds1 <= fds0 + FD_SLACK, "descriptors: {fds0} before, {fds1} after");
        after.push(rss1);
    }
    assert!(
        after[0] <= rss0 + RSS_SLACK_KB,
        "memory: {rss0} kB before, {} kB after the first round",
        after[0]
    );
    assert!(
        after[1] <= after[0] + REUSE_SLACK_KB,
        "memory grew again in the second round: {} kB, then {} kB",
        after[0],
        after[1]
    );
    let malformed = d.metric(&format!("vmfabric_gateway_malformed_frames_total{{network=\"{NET}\"}}"));
    assert!(malformed > 0, "the gateway counted the malformed frames");

    // The victim is still served: its renewal, and a DNS answer for the gateway's name.
    let (ip, _) = lease(&victim.sock, victim.mac);
    assert_eq!(ip, victim.ip, "the victim keeps its address");
    let mut q = vec![0x77, 0x77, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["gateway", "vm", "internal"] {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    let query = wire::udp_frame(victim.mac, victim.gateway_mac, (victim.ip, 40000), (GATEWAY, 53), &q);
    victim.sock.send(&query).unwrap();
    let (_, reply) = answer(&victim.sock, 53);
    assert_eq!(&reply[..2], &[0x77, 0x77]);
    assert_eq!(reply[3] & 0x0f, 0, "NOERROR: {reply:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

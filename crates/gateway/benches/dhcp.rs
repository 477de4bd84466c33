//! 1,000 DHCP clients, each on its own socketpair port of one network, complete
//! DISCOVER -> OFFER -> REQUEST -> ACK with the gateway. All clients send at once, as
//! after a mass boot; the time is from the first DISCOVER to the last ACK.
//!
//! Run: `cargo bench -p gateway --bench dhcp` (BENCH_CLIENTS, BENCH_REPS to change).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use dhcproto::v4::{self, DhcpOption, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use fabric::Mac;
use gateway::wire::{self, Inbound};

fn client_mac(i: usize) -> Mac {
    Mac([0x02, 0xdc, 0, 0, (i >> 8) as u8, i as u8])
}

fn request_frame(i: usize, kind: MessageType, extra: Vec<DhcpOption>) -> Vec<u8> {
    let mac = client_mac(i);
    let z = Ipv4Addr::UNSPECIFIED;
    let mut m = v4::Message::new_with_id(i as u32, z, z, z, z, &mac.0);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in extra {
        m.opts_mut().insert(o);
    }
    let payload = m.to_vec().unwrap();
    wire::udp_frame(mac, Mac::BROADCAST, (z, 68), (Ipv4Addr::BROADCAST, 67), &payload)
}

fn reply(sock: &UnixDatagram) -> v4::Message {
    let mut buf = vec![0u8; 2048];
    loop {
        let n = sock.recv(&mut buf).expect("a DHCP reply within the timeout");
        if let Ok(Inbound::Udp {
            src_port: 67, payload, ..
        }) = wire::classify(&buf[..n])
        {
            return v4::Message::decode(&mut Decoder::new(payload)).unwrap();
        }
    }
}

fn run(clients: usize) -> Duration {
    let common::Lab { gw, sw, rt: _rt } = common::lab("bench", "10.128.0.0/20", |_| {});
    let socks: Vec<UnixDatagram> = (0..clients)
        .map(|i| {
            let s = UnixDatagram::from(sw.add_port("bench", &format!("c{i}")).unwrap().1);
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        })
        .collect();
    let discovers: Vec<Vec<u8>> = (0..clients)
        .map(|i| request_frame(i, MessageType::Discover, vec![]))
        .collect();
    let start = Instant::now();
    for (s, d) in socks.iter().zip(&discovers) {
        s.send(d).unwrap();
    }
    for (i, s) in socks.iter().enumerate() {
        let offer = reply(s);
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        let server = match offer.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => *ip,
            _ => panic!("offer without server id"),
        };
        let req = vec![
            DhcpOption::ServerIdentifier(server),
            DhcpOption::RequestedIpAddress(offer.yiaddr()),
        ];
        s.send(&request_frame(i, MessageType::Request, req)).unwrap();
    }
    for s in &socks {
        assert_eq!(reply(s).opts().msg_type(), Some(MessageType::Ack));
    }
    let elapsed = start.elapsed();
    assert_eq!(gw.leases().len(), clients);
    elapsed
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("dhcp bench: run it with `cargo bench -p gateway --bench dhcp`");
        return;
    }
    let clients: usize = std::env::var("BENCH_CLIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    // Two fds per client port.
    let mut lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    lim.current = lim.maximum.or(Some(65536));
    let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, lim);
    let mut times: Vec<Duration> = (0..reps).map(|_| run(clients)).collect();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("## DHCP: {clients} clients, DISCOVER to ACK, all at once ({reps} runs)\n");
    println!("| | min | median | max |");
    println!("|---|---:|---:|---:|");
    println!(
        "| total time | {:.0} ms | {:.0} ms | {:.0} ms |",
        ms(times[0]),
        ms(times[reps / 2]),
        ms(times[reps - 1])
    );
    let verdict = if times[reps / 2] <= Duration::from_secs(1) {
        "met"
    } else {
        "MISSED"
    };
    println!("\nTarget ≤ 1 s (median): {verdict}.");
}

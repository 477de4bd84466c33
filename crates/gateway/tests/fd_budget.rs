//! The descriptor budget: when guests' flows would eat into the descriptors the daemon
//! keeps for itself, new flows are refused and counted, and everything else goes on.
//! Its own test binary, because the ceiling is process-wide.

mod common;

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use fabric::Mac;
use gateway::wire;

#[test]
fn guests_flows_stop_at_the_ceiling_and_the_gateway_goes_on() {
    let common::Lab { gw, sw, rt: _rt } = common::lab("n", "10.66.0.0/24", |cfg| {
        cfg.host_access = Some(cfg.default_host_access());
    });
    let (_, fd) = sw.add_port("n", "guest").unwrap();
    let guest = UnixDatagram::from(fd);
    guest.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let host_access = gw.config().host_access.unwrap();
    let me = Mac([2, 0, 0, 0, 0, 9]);
    // Room for a few flows only, above what the process holds now.
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let room = 6;
    gateway::fd_budget::set_ceiling(probe.as_raw_fd() as u64 + room);
    drop(probe);
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    for src_port in 40000..40040 {
        let f = wire::udp_frame(
            me,
            gw.config().gateway_mac,
            (Ipv4Addr::new(10, 66, 0, 9), src_port),
            (host_access, sink_port),
            b"flow",
        );
        guest.send(&f).unwrap();
    }
    let c = gw.counters();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.get("fd_budget_refused").unwrap() + c.get("nat_udp_flows").unwrap() < 40 {
        assert!(std::time::Instant::now() < deadline, "{:?}", c.snapshot());
        std::thread::sleep(Duration::from_millis(20));
    }
    let opened = c.get("nat_udp_flows").unwrap();
    assert!(opened > 0 && opened <= room, "{:?}", c.snapshot());
    assert_eq!(c.get("fd_budget_refused").unwrap(), 40 - opened);
    // The gateway still answers what needs no new descriptor.
    let ping = wire::arp_request(me, Ipv4Addr::new(10, 66, 0, 9), Ipv4Addr::new(10, 66, 0, 1));
    guest.send(&ping).unwrap();
    let mut buf = [0u8; 2048];
    let n = guest.recv(&mut buf).expect("an ARP reply");
    assert!(n >= 42);
    gateway::fd_budget::set_ceiling(u64::MAX);
}

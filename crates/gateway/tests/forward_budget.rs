//! Host clients of a forward hold connections from a budget of their own: however many
//! idle clients a forward has, the guests' own connections through NAT still open.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use fabric::Mac;
use gateway::forward::Protocol;
use gateway::tcp_peer::{Segment, TcpPeer};
use smoltcp::wire::TcpControl;

#[test]
fn idle_forward_clients_cannot_take_the_guests_egress() {
    let common::Lab { gw, sw, rt: _rt } = common::lab("n", "10.66.0.0/24", |cfg| {
        cfg.host_access = Some(cfg.default_host_access());
        cfg.tcp_forward_flows_total = 3;
        cfg.tcp_flows_total = 3;
    });
    let (_, fd) = sw.add_port("n", "guest").unwrap();
    let guest = UnixDatagram::from(fd);
    guest.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let guest_ip = Ipv4Addr::new(10, 66, 0, 9);
    let me = Mac([2, 0, 0, 0, 0, 9]);
    // The guest makes itself known (a forward to an address nobody is at refuses at
    // once), then answers nothing on the forward's port: each client's connection
    // waits there.
    guest
        .send(&gateway::wire::arp_request(me, guest_ip, Ipv4Addr::new(10, 66, 0, 1)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.guest_at(guest_ip.into()) {
        assert!(Instant::now() < deadline, "the gateway never saw the guest");
        std::thread::sleep(Duration::from_millis(20));
    }
    let fw = gw
        .add_forward(
            Protocol::Tcp,
            "127.0.0.1:0".parse().unwrap(),
            SocketAddrV4::new(guest_ip, 80).into(),
        )
        .unwrap();
    let clients: Vec<TcpStream> = (0..8).filter_map(|_| TcpStream::connect(fw.host).ok()).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.tcp_flows().len() < 3 {
        assert!(Instant::now() < deadline, "the forward's connections did not open");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(gw.tcp_flows().len(), 3, "forwards hold their budget and no more");

    // The guest's own connection to the host still opens.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut peer = TcpPeer {
        mac: me.0,
        ip: guest_ip.into(),
        port: 45000,
        server_mac: gw.config().gateway_mac.0,
        server_ip: gw.config().host_access.unwrap().into(),
        server_port: port,
        seq: 100,
        ack: 0,
    };
    guest
        .send(&peer.segment(&Segment {
            syn: true,
            window: 65535,
            mss: Some(1460),
            ..Default::default()
        }))
        .unwrap();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        assert!(Instant::now() < deadline, "no answer to the guest's SYN");
        let Ok(n) = guest.recv(&mut buf) else { continue };
        if let Some(seen) = peer.read(&[buf[..n].to_vec()]).into_iter().next() {
            break seen;
        }
    };
    assert_eq!(
        answer.control,
        TcpControl::Syn,
        "the guest's connect is answered, not reset: {answer:?}"
    );
    assert!(listener.accept().is_ok());
    drop(clients);
}

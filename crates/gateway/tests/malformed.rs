//! Garbage sent to the gateway is counted and dropped, and the gateway keeps serving.
//! Frames are injected through an ordinary socketpair port of the same network.

mod common;

use std::net::Ipv4Addr;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use dhcproto::v4::{self, DhcpOption, MessageType};
use dhcproto::Encodable;
use fabric::Mac;
use gateway::wire::{self, Inbound};
use gateway::Upstreams;

const CLIENT: Mac = Mac([0x02, 0, 0, 0, 0, 0x42]);

fn discover() -> Vec<u8> {
    let mut m = v4::Message::new_with_id(
        9,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &CLIENT.0,
    );
    m.opts_mut().insert(DhcpOption::MessageType(MessageType::Discover));
    m.to_vec().unwrap()
}

fn to_gateway(payload: &[u8], dport: u16, dst: Ipv4Addr) -> Vec<u8> {
    let src = if dport == 67 {
        (Ipv4Addr::UNSPECIFIED, 68)
    } else {
        (Ipv4Addr::new(10, 66, 0, 9), 5353)
    };
    wire::udp_frame(CLIENT, Mac::BROADCAST, src, (dst, dport), payload)
}

#[test]
fn malformed_dhcp_and_dns_are_counted_and_the_gateway_keeps_serving() {
    let common::Lab { gw, sw, rt: _rt } = common::lab("n", "10.66.0.0/24", |_| {});
    let (_, fd) = sw.add_port("n", "client").unwrap();
    let client = UnixDatagram::from(fd);
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let gw_ip = Ipv4Addr::new(10, 66, 0, 1);

    let mut huge_options = discover();
    huge_options.truncate(240);
    for _ in 0..2000 {
        huge_options.extend([12, 1, b'x']); // thousands of hostname options
    }
    let mut bad_hlen = discover();
    bad_hlen[2] = 200;
    let dhcp_garbage: Vec<Vec<u8>> = vec![vec![], vec![1; 7], discover()[..100].to_vec(), huge_options, bad_hlen];
    for g in &dhcp_garbage {
        client.send(&to_gateway(g, 67, Ipv4Addr::BROADCAST)).unwrap();
    }
    let mut lying_counts = vec![0x12, 0x34, 1, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0];
    lying_counts.extend([3, b'w', b'e', b'b', 0, 0, 1, 0, 1]);
    let dns_garbage: Vec<Vec<u8>> = vec![vec![], vec![0; 5], lying_counts, vec![0xff; 512]];
    for g in &dns_garbage {
        client.send(&to_gateway(g, 53, gw_ip)).unwrap();
    }
    // A frame whose UDP checksum is wrong never reaches a server.
    let mut bad_sum = to_gateway(&discover(), 67, Ipv4Addr::BROADCAST);
    *bad_sum.last_mut().unwrap() ^= 0x55;
    client.send(&bad_sum).unwrap();

    // Still serving: a good DISCOVER gets its OFFER.
    client.send(&to_gateway(&discover(), 67, Ipv4Addr::BROADCAST)).unwrap();
    let mut buf = vec![0u8; 2048];
    let offer = loop {
        let n = client.recv(&mut buf).expect("an offer");
        if let Ok(Inbound::Udp {
            src_port: 67, payload, ..
        }) = wire::classify(&buf[..n])
        {
            break payload.to_vec();
        }
    };
    let m = <v4::Message as dhcproto::Decodable>::decode(&mut dhcproto::Decoder::new(&offer)).unwrap();
    assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
    let c = gw.counters();
    assert!(c.get("dhcp_malformed").unwrap() >= 4, "{:?}", c.snapshot());
    assert_eq!(
        c.get("dns_malformed"),
        Some(dns_garbage.len() as u64),
        "{:?}",
        c.snapshot()
    );
    assert_eq!(c.get("malformed_frames"), Some(1));
}

#[test]
fn forwarded_queries_are_bounded_per_client() {
    // An upstream that never answers keeps every forwarded query in flight.
    let mute = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let common::Lab { gw, sw, rt: _rt } = common::lab("n", "10.66.0.0/24", |cfg| {
        cfg.upstreams = Upstreams::Static(vec![mute.local_addr().unwrap()]);
        cfg.dns_inflight_per_client = 2;
        cfg.dns_timeout = Duration::from_secs(2);
    });
    let (_, fd) = sw.add_port("n", "client").unwrap();
    let client = UnixDatagram::from(fd);
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let query = |id: u16| {
        let mut m = hickory_proto::op::Message::query();
        m.metadata.id = id;
        m.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_utf8("far.example.").unwrap(),
            hickory_proto::rr::RecordType::A,
        ));
        m.to_vec().unwrap()
    };
    for id in 0..5 {
        client
            .send(&to_gateway(&query(id), 53, Ipv4Addr::new(10, 66, 0, 1)))
            .unwrap();
    }
    // The two admitted queries end in SERVFAIL once the upstream's time is up.
    let mut buf = vec![0u8; 2048];
    let mut servfails = 0;
    while servfails < 2 {
        let n = client.recv(&mut buf).expect("SERVFAIL answers");
        if let Ok(Inbound::Udp {
            src_port: 53, payload, ..
        }) = wire::classify(&buf[..n])
        {
            let m = hickory_proto::op::Message::from_vec(payload).unwrap();
            assert_eq!(m.metadata.response_code, hickory_proto::op::ResponseCode::ServFail);
            servfails += 1;
        }
    }
    let c = gw.counters();
    assert_eq!(
        (c.get("dns_dropped"), c.get("dns_servfail")),
        (Some(3), Some(2)),
        "{:?}",
        c.snapshot()
    );
}

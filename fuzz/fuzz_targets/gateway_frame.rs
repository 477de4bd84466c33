//! The gateway's classification of a frame, the refusals it builds from what
//! classification kept, and its answers to IPv6 Neighbor Discovery and pings.
#![no_main]

use fabric::Mac;
use gateway::wire::Inbound;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    let mac = Mac([2, 0, 0, 0, 0, 1]);
    let from = (std::net::Ipv4Addr::new(10, 0, 0, 1), "fe80::1".parse().unwrap());
    let prohibited = gateway::wire::Unreachable::Prohibited;
    match gateway::wire::classify(frame) {
        Ok(Inbound::Tcp(head)) => {
            let _ = gateway::wire::tcp_reset(mac, &head);
            let _ = gateway::wire::icmp_unreachable(mac, from, &head.origin, prohibited);
        }
        Ok(Inbound::Udp { origin, .. } | Inbound::IcmpEcho { origin, .. } | Inbound::Udp6 { origin, .. }) => {
            let _ = gateway::wire::icmp_unreachable(mac, from, &origin, prohibited);
        }
        Ok(Inbound::Icmp6(message)) => {
            let _ = gateway::wire::icmp_unreachable(mac, from, &message.origin, prohibited);
            let mut cfg = gateway::GatewayConfig::new("fuzz", "10.0.0.0/24".parse().unwrap());
            cfg.ipv6 = Some("fd00:9::/64".parse().unwrap());
            let _ = gateway::ndp::answer(&cfg, &Default::default(), &message);
        }
        _ => {}
    }
});

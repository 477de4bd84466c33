//! DNS over TCP driven by a hostile peer: each 8-byte step picks the flags, options,
//! window, a sequence offset (probes, old data, data past the window), the payload
//! length, and whether time passes. The stack must neither panic nor hang.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::Arc;

use fabric::Mac;
use gateway::dns::Zone;
use gateway::tcp_dns::TcpDns;
use gateway::tcp_peer::{Segment, TcpPeer};
use gateway::GatewayCounters;
use libfuzzer_sys::fuzz_target;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fuzz_target!(|data: &[u8]| {
    let mut dns = TcpDns::new(
        Mac([2, 0, 0, 0, 0, 1]),
        &[(SERVER.into(), 24), ("fd00::1".parse().unwrap(), 64)],
        1500 + usize::from(data.first().copied().unwrap_or(0) & 1) * 64000,
        Arc::new(GatewayCounters::default()),
    );
    let zone = Zone::new("vm.internal", "10.0.0.0/24".parse().unwrap());
    // The third peer speaks IPv6: the window guard must hold for both versions.
    let mut peers: Vec<TcpPeer> = (0..3)
        .map(|i| match i {
            2 => TcpPeer::guest6(9 + i, 53),
            _ => TcpPeer::guest(9 + i, 53),
        })
        .collect();
    for p in &peers {
        dns.input(&p.arp_request());
    }
    let payload = vec![0x41u8; 66000];
    for step in data.chunks_exact(8) {
        let step: &[u8; 8] = step.try_into().expect("chunks of eight");
        let peer = &mut peers[usize::from(step[0] % 3)];
        let flags = step[1];
        let seg = Segment::from_step(step, peer.seq, &payload);
        let frame = peer.segment(&seg);
        dns.input(&frame);
        let out = dns.poll(&zone);
        peer.read(&out.frames);
        for (handle, _, _) in out.forward {
            dns.deliver(handle, &[0u8; 12]);
        }
        if flags & 128 != 0 {
            let _ = dns.poll_delay();
        }
    }
});

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
        &[SERVER],
        24,
        1500 + usize::from(data.first().copied().unwrap_or(0) & 1) * 64000,
        Arc::new(GatewayCounters::default()),
    );
    let zone = Zone::new("vm.internal", "10.0.0.0/24".parse().unwrap());
    let mut peers: Vec<TcpPeer> = (0..3).map(|i| TcpPeer::guest(9 + i, 53)).collect();
    for p in &peers {
        dns.input(&p.arp_request());
    }
    let payload = vec![0x41u8; 66000];
    for step in data.chunks_exact(8) {
        let peer = &mut peers[usize::from(step[0] % 3)];
        let flags = step[1];
        let window = u16::from_be_bytes([step[2], step[3]]);
        let offset = i16::from_be_bytes([step[4], step[5]]) as i32;
        let len = usize::from(u16::from_be_bytes([step[6], step[7]])) % payload.len();
        let seg = Segment {
            syn: flags & 1 != 0,
            fin: flags & 2 != 0,
            rst: flags & 4 != 0,
            ack: flags & 8 != 0,
            window,
            window_scale: (flags & 16 != 0).then_some(step[2] % 15),
            mss: (flags & 32 != 0).then_some(u16::from_be_bytes([step[3], step[2]])),
            seq: (flags & 64 != 0).then_some(peer.seq.wrapping_add(offset as u32)),
            payload: &payload[..len],
        };
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

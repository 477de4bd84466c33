//! The DHCP server with a lease store, fed a sequence of messages from a few clients,
//! DHCPv4 and DHCPv6 (the client byte's top bit picks v6). Input: records of [client
//! byte, time step, length (2 bytes), message].
#![no_main]

use std::sync::Arc;

use fabric::Mac;
use gateway::dhcp::DhcpServer;
use gateway::{GatewayConfig, GatewayCounters, MemoryLeaseStore};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut cfg = GatewayConfig::new("f", "10.9.0.0/29".parse().unwrap());
    cfg.lease_time = std::time::Duration::from_secs(60);
    cfg.ipv6 = Some("fd00:9::/64".parse().unwrap());
    let mut server = DhcpServer::new(
        Arc::new(cfg),
        Arc::new(GatewayCounters::default()),
        Box::new(MemoryLeaseStore::default()),
    );
    let mut now = 1_000;
    let mut rest = data;
    while rest.len() >= 4 {
        let (client, step, len) = (rest[0], rest[1], usize::from(u16::from_be_bytes([rest[2], rest[3]])));
        rest = &rest[4..];
        let msg = &rest[..len.min(rest.len())];
        rest = &rest[msg.len()..];
        now += u64::from(step);
        let from = Mac([2, 0, 0, 0, 0, client % 8]);
        if client & 0x80 != 0 {
            let _ = server.handle6(msg, from, now);
        } else {
            let _ = server.handle(msg, from, now);
        }
        let _ = server.expire(now);
    }
});

//! The gateway's classification of a frame and the refusals it builds from one.
#![no_main]

use fabric::Mac;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    if gateway::wire::classify(frame).is_ok() {
        let mac = Mac([2, 0, 0, 0, 0, 1]);
        let _ = gateway::wire::tcp_reset(mac, frame);
        let _ = gateway::wire::icmp_prohibited(mac, std::net::Ipv4Addr::new(10, 0, 0, 1), frame);
    }
});

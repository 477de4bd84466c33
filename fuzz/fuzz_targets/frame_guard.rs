//! The switch's decision on a frame from a guest: parse, lock, first-hop guard.
//! The first byte picks the lock and the network's settings; the rest is the frame.
#![no_main]

use fabric::frame::EthernetView;
use fabric::{Mac, NetworkConfig, PortLock};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, frame)) = data.split_first() else {
        return;
    };
    let cfg = NetworkConfig {
        ipv6: knobs & 1 != 0,
        dhcp_guard: knobs & 2 != 0,
        ..Default::default()
    };
    let mac = frame
        .get(6..12)
        .and_then(Mac::from_slice)
        .unwrap_or(Mac([2, 0, 0, 0, 0, 1]));
    let lock = PortLock {
        mac,
        ips: vec![std::net::Ipv4Addr::new(10, 0, 0, 5)],
        ips6: vec![],
    };
    let lock = (knobs & 4 != 0).then_some(&lock);
    if let Ok(view) = EthernetView::parse(frame, if knobs & 8 != 0 { 65520 } else { 1500 }) {
        let _ = fabric::guard::verdict(&cfg, lock, knobs & 16 != 0, &view);
        let _ = fabric::frame::ipv6_kind(&view);
        let _ = fabric::frame::l3_sender(&view);
        let _ = fabric::frame::is_dhcp_client_message(&view);
    }
});

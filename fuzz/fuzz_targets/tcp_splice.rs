//! The TCP splice driven by a hostile guest: a gateway on a real switch, its host side
//! a loopback echo server. Each input opens a connection from a new guest port and
//! plays 8-byte steps (flags, options, window, a sequence offset, the payload length,
//! whether time passes) as in `tcp_scenario`, then resets it; over IPv6 when the first
//! byte's top bit is set (the host-access address `::2`, an echo server on `[::1]`).
//! Nothing the guest sends may panic the gateway (its contained panics are counted, and
//! must stay zero).
#![no_main]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
use std::os::unix::net::UnixDatagram;
use std::sync::{Mutex, OnceLock};

use fabric::{NetworkConfig, Switch, SwitchConfig};
use gateway::tcp_peer::{Segment, TcpPeer};
use gateway::{Gateway, GatewayConfig, MemoryLeaseStore, TcpEngine, Upstreams};
use libfuzzer_sys::fuzz_target;

const HOST_ACCESS: Ipv4Addr = Ipv4Addr::new(10, 68, 0, 254);
const HOST_ACCESS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x68, 0, 0, 0, 0, 0, 2);

struct World {
    gw: Gateway,
    _sw: Switch,
    _rt: tokio::runtime::Runtime,
    guest: UnixDatagram,
    echo_port: u16,
    echo_port6: u16,
    next_port: u16,
}

/// A loopback echo server on `addr`; its port.
fn echo_server(addr: &str) -> u16 {
    let listener = TcpListener::bind(addr).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

fn world() -> &'static Mutex<World> {
    static WORLD: OnceLock<Mutex<World>> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let sw = Switch::start(SwitchConfig::default()).unwrap();
        sw.add_network("fz", NetworkConfig::default()).unwrap();
        let mut cfg = GatewayConfig::new("fz", "10.68.0.0/24".parse().unwrap());
        cfg.upstreams = Upstreams::Static(vec![]);
        cfg.host_access = Some(HOST_ACCESS);
        cfg.ipv6 = Some("fd00:68::/64".parse().unwrap());
        cfg.tcp_engine = TcpEngine::Splice;
        let gw = Gateway::attach(rt.handle(), &sw, "fz", cfg, Box::new(MemoryLeaseStore::default())).unwrap();
        let (_, fd) = sw.add_port("fz", "guest").unwrap();
        let guest = UnixDatagram::from(fd);
        guest.set_nonblocking(true).unwrap();
        Mutex::new(World {
            gw,
            _sw: sw,
            _rt: rt,
            guest,
            echo_port: echo_server("127.0.0.1:0"),
            echo_port6: echo_server("[::1]:0"),
            next_port: 1024,
        })
    })
}

fn drain(w: &World, peer: &mut TcpPeer) {
    let mut buf = vec![0u8; 70000];
    while let Ok(n) = w.guest.recv(&mut buf) {
        peer.read(&[buf[..n].to_vec()]);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut w = world().lock().unwrap_or_else(|p| p.into_inner());
    w.next_port = if w.next_port >= 65000 { 1024 } else { w.next_port + 1 };
    let ipv6 = data.first().is_some_and(|b| b & 0x80 != 0);
    let mut peer = if ipv6 {
        let mut p = TcpPeer::guest6(9, w.echo_port6);
        p.ip = Ipv6Addr::new(0xfd00, 0x68, 0, 0, 0, 0, 0, 9).into();
        p.server_ip = HOST_ACCESS6.into();
        p
    } else {
        let mut p = TcpPeer::guest(9, w.echo_port);
        p.ip = Ipv4Addr::new(10, 68, 0, 9).into();
        p.server_ip = HOST_ACCESS.into();
        p
    };
    peer.port = w.next_port;
    peer.server_mac = w.gw.config().gateway_mac.0;
    let payload = vec![0x41u8; 66000];
    let send = |peer: &mut TcpPeer, seg: &Segment| {
        let _ = w.guest.send(&peer.segment(seg));
    };
    send(
        &mut peer,
        &Segment {
            syn: true,
            window: 65535,
            window_scale: data.first().map(|b| (b & 0x7f) % 15),
            mss: Some(1460),
            ..Default::default()
        },
    );
    std::thread::sleep(std::time::Duration::from_millis(1));
    drain(&w, &mut peer);
    for step in data.chunks_exact(8) {
        let step: &[u8; 8] = step.try_into().expect("chunks of eight");
        let flags = step[1];
        let seg = Segment::from_step(step, peer.seq, &payload[..9000]);
        send(&mut peer, &seg);
        if flags & 128 != 0 {
            std::thread::sleep(std::time::Duration::from_micros(u64::from(step[0]) * 4));
        }
        drain(&w, &mut peer);
    }
    // Ended, so connections do not pile up across inputs.
    send(
        &mut peer,
        &Segment {
            rst: true,
            ..Default::default()
        },
    );
    let panics: u64 = w.gw.handler_panics().snapshot().iter().map(|(_, n)| n).sum();
    assert_eq!(
        panics,
        0,
        "the gateway caught a panic: {:?}",
        w.gw.handler_panics().snapshot()
    );
});

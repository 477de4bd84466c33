//! A VXLAN tunnel from a switch network to a Linux `vxlan` device on another "host" (a
//! network namespace behind a veth pair): a guest namespace on a TAP port pings and
//! talks TCP to the kernel's side through it, and datagrams from a non-member address,
//! for another VNI, with a MAC the sender does not own, or not VXLAN at all, are
//! counted and dropped. Needs root and /dev/net/tun.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::Arc;

use common::*;
use fabric::vxlan::{self, Remotes, Vtep};
use fabric::{Mac, NetworkConfig, TapSource};

fn sh(args: &[&str]) {
    let ok = Command::new(args[0])
        .args(&args[1..])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "command failed: {}", args.join(" "));
}

struct Cleanup(Vec<Vec<String>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = Command::new(&c[0]).args(&c[1..]).status();
        }
    }
}

/// Moves the calling thread into network namespace `ns`.
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&f),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap();
}

/// Sends `datagram` to `to` from `from`, inside namespace `ns`.
fn send_from(ns: &str, from: &str, to: SocketAddr, datagram: Vec<u8>) {
    let (ns, from) = (ns.to_string(), from.to_string());
    std::thread::spawn(move || {
        enter(&ns);
        let s = UdpSocket::bind((from.as_str(), 0)).unwrap();
        s.send_to(&datagram, to).unwrap();
    })
    .join()
    .unwrap();
}

#[test]
fn a_switch_network_and_a_kernel_vxlan_device_are_one_network_and_strangers_are_refused() {
    if !is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        skip("needs root and /dev/net/tun");
        return;
    }
    let id = std::process::id() % 100_000;
    let (remote, guest) = (format!("fvx{id}r"), format!("fvx{id}g"));
    let (host_end, far_end) = (format!("fvh{id}"), format!("fvr{id}"));
    let _cleanup = Cleanup(vec![
        vec!["ip".into(), "netns".into(), "del".into(), remote.clone()],
        vec!["ip".into(), "netns".into(), "del".into(), guest.clone()],
        vec!["ip".into(), "link".into(), "del".into(), host_end.clone()],
    ]);
    sh(&["ip", "netns", "add", &remote]);
    sh(&["ip", "netns", "add", &guest]);
    // The underlay: this host 10.252.77.1, the remote host .2 (and .3, a stranger).
    sh(&["ip", "link", "add", &host_end, "type", "veth", "peer", "name", &far_end]);
    sh(&["ip", "link", "set", &far_end, "netns", &remote]);
    sh(&["ip", "addr", "add", "10.252.77.1/24", "dev", &host_end]);
    sh(&["ip", "link", "set", &host_end, "up"]);
    for addr in ["10.252.77.2/24", "10.252.77.3/24"] {
        sh(&["ip", "-n", &remote, "addr", "add", addr, "dev", &far_end]);
    }
    sh(&["ip", "-n", &remote, "link", "set", &far_end, "up"]);
    // The remote host's side of the network: a kernel vxlan device, VNI 42, port 4789,
    // sending everything to this host (no learning: where MACs are is told).
    let remote_mac: Mac = "02:42:00:00:00:02".parse().unwrap();
    sh(&[
        "ip",
        "-n",
        &remote,
        "link",
        "add",
        "vx42",
        "type",
        "vxlan",
        "id",
        "42",
        "local",
        "10.252.77.2",
        "remote",
        "10.252.77.1",
        "dstport",
        "4789",
        "nolearning",
    ]);
    sh(&[
        "ip",
        "-n",
        &remote,
        "link",
        "set",
        "vx42",
        "address",
        &remote_mac.to_string(),
    ]);
    sh(&["ip", "-n", &remote, "addr", "add", "192.168.242.2/24", "dev", "vx42"]);
    sh(&["ip", "-n", &remote, "link", "set", "vx42", "up"]);
    // Between namespaces nothing computes a checksum the device left to hardware: the
    // inner TCP checksum would cross the veth unfinished. A real NIC (or no offload)
    // finishes it; here the device does.
    sh(&["ip", "netns", "exec", &remote, "ethtool", "-K", "vx42", "tx", "off"]);

    // This host: a network with a guest on a TAP port and the tunnel.
    let sw = Arc::new(switch());
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let underlay: IpAddr = "10.252.77.2".parse().unwrap();
    let vtep = Vtep::start(sw.clone(), "10.252.77.1:4789".parse().unwrap(), vxlan::DEFAULT_PORT).unwrap();
    let remotes = Remotes {
        members: vec![underlay],
        macs: HashMap::from([(remote_mac, underlay)]),
        local_everywhere: Vec::new(),
        locks: HashMap::new(),
    };
    let tunnel = vtep.attach("n", "vxlan", 42, remotes).unwrap();
    let (g, ifname) = sw.add_tap_port("n", "g", TapSource::Name(format!("fvg{id}"))).unwrap();
    sh(&["ip", "link", "set", &ifname, "netns", &guest]);
    sh(&["ip", "-n", &guest, "addr", "add", "192.168.242.1/24", "dev", &ifname]);
    sh(&["ip", "-n", &guest, "link", "set", &ifname, "up"]);
    sh(&["ip", "-n", &guest, "link", "set", "lo", "up"]);

    // Ping, then TCP: a server on the remote side answers with what it read, reversed.
    sh(&[
        "ip",
        "netns",
        "exec",
        &guest,
        "busybox",
        "ping",
        "-c",
        "3",
        "-W",
        "5",
        "192.168.242.2",
    ]);
    let server = {
        let remote = remote.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            enter(&remote);
            let l = std::net::TcpListener::bind("192.168.242.2:7000").unwrap();
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got.reverse();
            s.write_all(&got).unwrap();
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let echoed = {
        let (guest, sent) = (guest.clone(), sent.clone());
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            enter(&guest);
            let mut c = std::net::TcpStream::connect("192.168.242.2:7000").unwrap();
            c.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
            c.write_all(&sent).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut back = Vec::new();
            c.read_to_end(&mut back).unwrap();
            back
        })
        .join()
        .unwrap()
    };
    server.join().unwrap();
    let mut want = sent;
    want.reverse();
    assert!(echoed == want, "200 kB each way through the tunnel, intact");
    let c = vtep.counters();
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert!(get(&c.rx_frames) >= 3 && get(&c.tx_datagrams) >= 3);
    assert!(sw.port_counters(tunnel).unwrap().rx_frames >= 3);
    assert!(sw.port_counters(g).unwrap().rx_frames >= 3);

    // What is refused: each counted. Counted from where each count stands: the
    // kernel's device may have sent its own multicast (IPv6 neighbour discovery, from
    // its own MAC) before the tunnel was attached.
    let to: SocketAddr = "10.252.77.1:4789".parse().unwrap();
    let inner = frame(Mac::BROADCAST, remote_mac, 60, 0x77);
    let vxlan = |vni: u32, inner: &[u8]| [vxlan::header(vni).as_slice(), inner].concat();
    let refused = |what: &str, counter: &std::sync::atomic::AtomicU64, datagram: Vec<u8>, from: &str| {
        let before = get(counter);
        send_from(&remote, from, to, datagram);
        wait_until(what, || get(counter) > before);
    };
    refused(
        "a stranger's datagram counted",
        &c.from_stranger,
        vxlan(42, &inner),
        "10.252.77.3",
    );
    refused("another VNI counted", &c.unknown_vni, vxlan(43, &inner), "10.252.77.2");
    let not_its = frame(Mac::BROADCAST, "02:66:00:00:00:66".parse().unwrap(), 60, 0x77);
    refused(
        "a MAC the member does not own counted",
        &c.foreign_mac,
        vxlan(42, &not_its),
        "10.252.77.2",
    );
    refused(
        "a datagram that is not VXLAN counted",
        &c.malformed,
        vec![0u8; 64],
        "10.252.77.2",
    );

    // A member that leaves is a stranger from then on.
    vtep.set_remotes(42, Remotes::default()).unwrap();
    refused(
        "a former member's datagram counted",
        &c.from_stranger,
        vxlan(42, &inner),
        "10.252.77.2",
    );
    vtep.detach(42).unwrap();
    assert!(sw.port_counters(tunnel).is_none(), "the tunnel's port is gone");
}

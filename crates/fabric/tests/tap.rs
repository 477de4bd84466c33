//! TAP ports with the kernel on the other side, in network namespaces the test makes.
//! Needs root and /dev/net/tun; skips with a reason otherwise.

mod common;

use std::process::Command;

use common::*;
use fabric::{Mac, NetworkConfig, TapSource};

fn run(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn sh(args: &[&str]) {
    assert!(run(args), "command failed: {}", args.join(" "));
}

/// Deletes the namespaces (and so the devices in them) however the test ends.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            run(&["ip", "netns", "del", ns]);
        }
    }
}

fn ping_command() -> Option<Vec<&'static str>> {
    if run(&["sh", "-c", "command -v ping >/dev/null"]) {
        Some(vec!["ping"])
    } else if run(&["sh", "-c", "command -v busybox >/dev/null"]) {
        Some(vec!["busybox", "ping"])
    } else {
        None
    }
}

#[test]
fn tap_ports_join_two_namespaces_into_one_network() {
    if !is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP tap_ports_join_two_namespaces_into_one_network: needs root and /dev/net/tun");
        return;
    }
    let Some(ping) = ping_command() else {
        eprintln!("SKIP tap_ports_join_two_namespaces_into_one_network: needs ping or busybox");
        return;
    };
    let id = std::process::id() % 100_000;
    let (ns_a, ns_b) = (format!("fabt{id}a"), format!("fabt{id}b"));
    let _guard = Namespaces(vec![ns_a.clone(), ns_b.clone()]);
    sh(&["ip", "netns", "add", &ns_a]);
    sh(&["ip", "netns", "add", &ns_b]);

    let sw = switch();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let observer = Dgram::new(sw.add_port("n", "observer").unwrap().1);
    // A: created by name. B: a persistent device made by `ip`, opened by us, adopted.
    let (pa, if_a) = sw.add_tap_port("n", "a", TapSource::Name(format!("fta{id}"))).unwrap();
    let if_b = format!("ftb{id}");
    sh(&["ip", "tuntap", "add", "dev", &if_b, "mode", "tap"]);
    let (fd, name) = fabric::open_tap(&if_b).unwrap();
    let (pb, _) = sw.add_tap_port("n", "b", TapSource::Fd(fd, name)).unwrap();

    for (ifname, ns, ip) in [(&if_a, &ns_a, "10.213.0.1/24"), (&if_b, &ns_b, "10.213.0.2/24")] {
        sh(&["ip", "link", "set", ifname, "netns", ns]);
        sh(&["ip", "-n", ns, "addr", "add", ip, "dev", ifname]);
        sh(&["ip", "-n", ns, "link", "set", ifname, "up"]);
    }
    let mut cmd = vec!["ip", "netns", "exec", &ns_a];
    cmd.extend(&ping);
    cmd.extend(["-c", "3", "-W", "5", "10.213.0.2"]);
    let ok = run(&cmd);
    if !ok {
        run(&["ip", "-n", &ns_a, "-s", "link"]);
        run(&["ip", "-n", &ns_b, "-s", "link"]);
        eprintln!("a: {:?}\nb: {:?}", sw.port_counters(pa), sw.port_counters(pb));
        panic!("ping between the namespaces failed");
    }

    // The ARP broadcast of the first ping reached the third port too.
    let seen =
        std::iter::from_fn(|| observer.recv()).find(|f| f[12..14] == [0x08, 0x06] && f[0..6] == Mac::BROADCAST.0);
    assert!(
        seen.is_some(),
        "ARP broadcast from a TAP port should flood to the observer"
    );
    for p in [pa, pb] {
        wait_until("the pings to be counted", || {
            let c = sw.port_counters(p).unwrap();
            c.rx_frames >= 3 && c.tx_frames >= 3
        });
        let c = sw.port_counters(p).unwrap();
        // Frames that came while the other device was still down were refused by it
        // (peer_gone), and the namespaces' own IPv6 (router solicitations, DAD) is off
        // on this network (ipv6_off); nothing else may be dropped.
        let expected = c.drops(fabric::DropReason::PeerGone) + c.drops(fabric::DropReason::Ipv6Off);
        assert_eq!(c.total_drops(), expected, "{c:?}");
    }
    // Removing the port created by name removes its device.
    sw.remove_port(pa).unwrap();
    wait_until("the TAP device to disappear", || {
        !run(&["ip", "-n", &ns_a, "link", "show", &if_a])
    });
}

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

/// Receives one TCP connection on port 5001 and prints the bytes and their SHA-256.
const RECEIVER: &str = r#"
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001)); s.listen(1); s.settimeout(40)
c, _ = s.accept(); c.settimeout(30); h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d: break
    h.update(d); n += len(d)
print(n, h.hexdigest())
"#;

/// Sends `argv[2]` MiB of seeded bytes to `argv[1]`:5001 and prints them as the
/// receiver does.
const SENDER: &str = r#"
import hashlib, random, socket, sys, time
data = random.Random(7).randbytes(int(sys.argv[2]) << 20)
deadline = time.time() + 30
while True:
    try:
        c = socket.create_connection((sys.argv[1], 5001), timeout=5); break
    except OSError:
        if time.time() > deadline: sys.exit("no connection")
        time.sleep(0.1)
c.settimeout(30); c.sendall(data); c.close()
print(len(data), hashlib.sha256(data).hexdigest())
"#;

/// Moves `mib` MiB over TCP from namespace `from` to `to_ip` in namespace `to`;
/// returns what both ends printed.
fn transfer(from: &str, to: &str, to_ip: &str, mib: u32) -> (String, String) {
    let receiver = Command::new("ip")
        .args(["netns", "exec", to, "python3", "-c", RECEIVER])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sent = Command::new("ip")
        .args(["netns", "exec", from, "python3", "-c", SENDER, to_ip, &mib.to_string()])
        .output()
        .unwrap();
    let got = receiver.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&sent.stdout).trim().to_string(),
        String::from_utf8_lossy(&got.stdout).trim().to_string(),
    )
}

#[test]
fn tcp_segments_cross_whole_between_offload_ports_and_are_cut_for_a_port_without() {
    let name = "tcp_segments_cross_whole_between_offload_ports_and_are_cut_for_a_port_without";
    if !is_root() || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP {name}: needs root and /dev/net/tun");
        return;
    }
    if !run(&["sh", "-c", "command -v python3 >/dev/null"]) {
        eprintln!("SKIP {name}: needs python3");
        return;
    }
    let id = std::process::id() % 100_000;
    let ns: Vec<String> = ["a", "b", "c"].iter().map(|s| format!("fgso{id}{s}")).collect();
    let _guard = Namespaces(ns.clone());
    let sw = switch();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    // A and B: devices the switch makes, with virtio-net headers and offloads.
    // C: a plain TAP fd (no header), which must get MTU-sized, checksummed frames.
    let (pa, if_a) = sw.add_tap_port("n", "a", TapSource::Name(format!("fga{id}"))).unwrap();
    let (pb, if_b) = sw.add_tap_port("n", "b", TapSource::Name(format!("fgb{id}"))).unwrap();
    let if_c = format!("fgc{id}");
    sh(&["ip", "tuntap", "add", "dev", &if_c, "mode", "tap"]);
    let (fd, tap_name) = fabric::open_tap(&if_c).unwrap();
    let (pc, _) = sw.add_tap_port("n", "c", TapSource::Fd(fd, tap_name)).unwrap();
    let ips = ["10.214.0.1", "10.214.0.2", "10.214.0.3"];
    for ((ifname, ns), ip) in [&if_a, &if_b, &if_c].iter().zip(&ns).zip(ips) {
        sh(&["ip", "netns", "add", ns]);
        sh(&["ip", "link", "set", ifname, "netns", ns]);
        sh(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", ifname]);
        sh(&["ip", "-n", ns, "link", "set", ifname, "up"]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    let mtu_frame = 1514u64;
    for (to, port, whole) in [(1, pb, true), (2, pc, false)] {
        let before = sw.port_counters(port).unwrap();
        let (sent, got) = transfer(&ns[0], &ns[to], ips[to], 32);
        assert!(!sent.is_empty(), "the sender printed nothing");
        assert_eq!(sent, got, "the bytes that arrived are the bytes sent (to {})", ips[to]);
        let c = sw.port_counters(port).unwrap();
        let (frames, bytes) = (c.tx_frames - before.tx_frames, c.tx_bytes - before.tx_bytes);
        if whole {
            assert!(
                bytes / frames > mtu_frame,
                "an offload port takes segments larger than the MTU: {bytes} B in {frames} frames"
            );
        } else {
            assert!(
                frames >= (32 << 20) / mtu_frame,
                "a port without offloads gets MTU-sized frames: {bytes} B in {frames} frames"
            );
        }
    }
    let a = sw.port_counters(pa).unwrap();
    assert!(
        a.rx_bytes / a.rx_frames > mtu_frame,
        "the sender's TAP handed over segments larger than the MTU: {a:?}"
    );
    for p in [pa, pb, pc] {
        let c = sw.port_counters(p).unwrap();
        let expected = c.drops(fabric::DropReason::PeerGone) + c.drops(fabric::DropReason::Ipv6Off);
        assert_eq!(c.total_drops(), expected, "{c:?}");
    }
}

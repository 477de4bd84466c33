//! Port transports and lifecycle over real fds: unixgram and stream paths, port
//! locking, removal under load, dead peers, and a thousand ports.

mod common;

use std::net::Ipv4Addr;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use fabric::{DropReason, Mac, NetworkConfig, PortLock, SwitchEvent};

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fabric-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn unixgram_port_answers_the_peer_it_learned_and_notices_it_leave() {
    let dir = tmpdir("dgram");
    let sw = switch();
    let events = sw.take_events().unwrap();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let sw_path = dir.join("sw.sock");
    let port = sw.add_unixgram_port("n", "vm", &sw_path).unwrap();
    assert_eq!(sw.is_port_up(port), Some(false), "no peer yet");
    let other = Dgram::new(sw.add_port("n", "other").unwrap().1);

    // The VMM binds its own path and sends to the switch's, like QEMU -netdev dgram.
    let vm_path = dir.join("vm.sock");
    let vm = UnixDatagram::bind(&vm_path).unwrap();
    vm.set_read_timeout(Some(WAIT)).unwrap();
    vm.connect(&sw_path).unwrap();
    let hello = frame(Mac::BROADCAST, mac(1), 80, 1);
    vm.send(&hello).unwrap();
    assert_eq!(other.expect(), hello);
    wait_event(
        &events,
        "PortUp",
        |e| matches!(e, SwitchEvent::PortUp { port: p, peer: Some(path) } if *p == port && path.ends_with("vm.sock")),
    );
    let reply = frame(mac(1), mac(2), 90, 2);
    other.send(&reply);
    let mut buf = [0u8; 2000];
    let n = vm.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &reply[..]);

    // The VMM goes away; the next frame for it finds nobody and the port goes down.
    drop(vm);
    std::fs::remove_file(&vm_path).unwrap();
    other.send(&frame(Mac::BROADCAST, mac(2), 60, 3));
    wait_event(
        &events,
        "PortDown",
        |e| matches!(e, SwitchEvent::PortDown { port: p, .. } if *p == port),
    );
    assert_eq!(sw.is_port_up(port), Some(false));

    // It comes back on the same path and is heard again.
    let vm = UnixDatagram::bind(&vm_path).unwrap();
    vm.set_read_timeout(Some(WAIT)).unwrap();
    vm.send_to(&frame(Mac::BROADCAST, mac(1), 60, 4), &sw_path).unwrap();
    assert_eq!(other.expect().last(), Some(&4));
    wait_event(
        &events,
        "PortUp again",
        |e| matches!(e, SwitchEvent::PortUp { port: p, .. } if *p == port),
    );
    other.send(&frame(mac(1), mac(2), 60, 5));
    let n = vm.recv(&mut buf).unwrap();
    assert_eq!(buf[n - 1], 5);

    sw.remove_port(port).unwrap();
    assert!(!sw_path.exists(), "removing the port removes its socket file");
}

#[test]
fn a_live_socket_path_is_not_stolen_but_a_stale_one_is_reused() {
    let dir = tmpdir("stale");
    let sw = switch();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let path = dir.join("port.sock");
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    assert!(matches!(
        sw.add_stream_port("n", "x", &path),
        Err(fabric::FabricError::PathInUse(_))
    ));
    drop(live); // leaves the file behind, as a crash would
    assert!(path.exists());
    sw.add_stream_port("n", "x", &path).unwrap();
    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"data").unwrap();
    let err = sw.add_unixgram_port("n", "y", &file).unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"data",
        "a regular file is never removed"
    );
}

#[test]
fn stream_port_reassembles_split_frames_and_skips_oversize_ones() {
    let dir = tmpdir("stream");
    let sw = switch();
    let events = sw.take_events().unwrap();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let path = dir.join("st.sock");
    let port = sw.add_stream_port("n", "vm", &path).unwrap();
    let other = Dgram::new(sw.add_port("n", "other").unwrap().1);
    let mut vm = Stream::connect(&path);
    wait_event(
        &events,
        "PortUp",
        |e| matches!(e, SwitchEvent::PortUp { port: p, .. } if *p == port),
    );

    // A frame whose length prefix and body arrive in pieces.
    let f = frame(Mac::BROADCAST, mac(1), 1400, 1);
    let mut wire = (f.len() as u32).to_be_bytes().to_vec();
    wire.extend(&f);
    use std::io::Write;
    for piece in [&wire[..2], &wire[2..700], &wire[700..]] {
        vm.0.write_all(piece).unwrap();
        // Gives the switch a chance to read each piece alone; correctness does not
        // depend on it.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(other.expect(), f);

    // An announced 100 kB frame is skipped whole; the stream stays in step.
    vm.send(&vec![0xee; 100_000]);
    vm.send(&[1, 2, 3]); // runt
    let g = frame(Mac::BROADCAST, mac(1), 64, 2);
    vm.send(&g);
    assert_eq!(other.expect(), g);
    let c = sw.port_counters(port).unwrap();
    assert_eq!((c.drops(DropReason::Oversize), c.drops(DropReason::Runt)), (1, 1));

    // Frames to the VM come length-prefixed.
    let h = frame(mac(1), mac(2), 1000, 3);
    other.send(&h);
    assert_eq!(vm.recv().unwrap(), h);

    // The VMM disconnects; another may connect to the same path.
    drop(vm);
    wait_event(
        &events,
        "PortDown",
        |e| matches!(e, SwitchEvent::PortDown { port: p, .. } if *p == port),
    );
    let mut vm2 = Stream::connect(&path);
    wait_event(
        &events,
        "PortUp again",
        |e| matches!(e, SwitchEvent::PortUp { port: p, .. } if *p == port),
    );
    vm2.send(&frame(Mac::BROADCAST, mac(3), 64, 4));
    assert_eq!(other.expect().last(), Some(&4));
}

/// On a network whose ports are locked by a control plane, a port is born sealed: not
/// a frame passes between its creation and its lock.
#[test]
fn a_sealed_network_s_new_ports_pass_nothing_until_locked_or_trusted() {
    let sw = switch();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let (_, before) = sw.add_port("n", "before").unwrap();
    sw.seal_new_ports("n").unwrap();
    let (pa, a) = sw.add_port("n", "a").unwrap();
    let (pt, t) = sw.add_port("n", "trusted").unwrap();
    let (pb, b) = sw.add_port("n", "b").unwrap();
    let (before, a, t, b) = (Dgram::new(before), Dgram::new(a), Dgram::new(t), Dgram::new(b));
    a.send(&frame(Mac::BROADCAST, mac(1), 64, 1));
    t.send(&frame(Mac::BROADCAST, mac(7), 64, 2));
    // A port made before the seal stays as it was: its frame is the first B hears.
    before.send(&frame(Mac::BROADCAST, mac(9), 64, 3));
    assert_eq!(b.expect().last(), Some(&3), "the sealed ports' frames went nowhere");
    assert_eq!(sw.port_counters(pa).unwrap().drops(DropReason::Spoofed), 1);
    assert_eq!(sw.port_counters(pt).unwrap().drops(DropReason::Spoofed), 1);
    sw.lock_port(
        pa,
        Some(PortLock {
            mac: mac(1),
            ips: vec![],
            ips6: vec![],
        }),
    )
    .unwrap();
    sw.set_port_trusted(pt, true).unwrap();
    a.send(&frame(Mac::BROADCAST, mac(1), 64, 4));
    assert_eq!(b.expect().last(), Some(&4), "locked: its own MAC passes");
    t.send(&frame(Mac::BROADCAST, mac(7), 64, 5));
    assert_eq!(b.expect().last(), Some(&5), "trusted");
    // B, still sealed, is heard by nobody.
    b.send(&frame(Mac::BROADCAST, mac(2), 64, 6));
    wait_until("B's frame to be dropped", || {
        sw.port_counters(pb).unwrap().drops(DropReason::Spoofed) == 1
    });
    marker(&t, mac(7), 7);
    let heard = a.until_marker(7);
    assert!(
        !heard.iter().any(|f| f.last() == Some(&6)),
        "a sealed port's frame got through"
    );
    assert!(sw.seal_new_ports("nope").is_err());
}

#[test]
fn locked_port_drops_spoofed_mac_ip_and_arp() {
    let sw = switch();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let (pa, a) = sw.add_port("n", "a").unwrap();
    let (pb, b) = sw.add_port("n", "b").unwrap();
    let (a, b) = (Dgram::new(a), Dgram::new(b));
    let good_ip = Ipv4Addr::new(10, 77, 0, 5);
    let other_ip = Ipv4Addr::new(10, 77, 0, 6);
    let gw = Ipv4Addr::new(10, 77, 0, 1);
    sw.lock_port(
        pa,
        Some(PortLock {
            mac: mac(1),
            ips: vec![good_ip],
            ips6: vec![],
        }),
    )
    .unwrap();

    let spoofs = [
        frame(Mac::BROADCAST, mac(9), 64, 0),                        // another source MAC
        udp_frame(Mac::BROADCAST, mac(1), other_ip, gw, 1000, 53),   // another source IP
        arp_request(mac(1), mac(1), other_ip, gw),                   // ARP claiming another IP
        arp_request(mac(1), mac(9), good_ip, gw),                    // ARP claiming another MAC
        frame(Mac::BROADCAST, Mac([0x01, 0, 0x5e, 0, 0, 1]), 64, 0), // group source
    ];
    for f in &spoofs {
        a.send(f);
    }
    let allowed = [
        udp_frame(Mac::BROADCAST, mac(1), good_ip, gw, 1000, 53),
        udp_frame(
            Mac::BROADCAST,
            mac(1),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            68,
            67,
        ), // DHCP
        arp_request(mac(1), mac(1), good_ip, gw),
        arp_request(mac(1), mac(1), Ipv4Addr::UNSPECIFIED, good_ip), // ARP probe
    ];
    for f in &allowed {
        a.send(f);
    }
    for f in &allowed {
        assert_eq!(&b.expect(), f);
    }
    assert_eq!(
        sw.port_counters(pa).unwrap().drops(DropReason::Spoofed),
        spoofs.len() as u64
    );

    // Another port cannot take the locked MAC over.
    b.send(&frame(Mac::BROADCAST, mac(1), 64, 0x33));
    marker(&b, mac(2), 0x44);
    assert!(a.until_marker(0x44).is_empty(), "B was allowed to send as A's MAC");
    assert_eq!(sw.port_counters(pb).unwrap().drops(DropReason::Spoofed), 1);
    assert!(
        sw.lock_port(
            pb,
            Some(PortLock {
                mac: mac(1),
                ips: vec![],
                ips6: vec![],
            })
        )
        .is_err(),
        "one MAC, one port"
    );

    // Unlocked, anything goes again.
    sw.lock_port(pa, None).unwrap();
    a.send(&spoofs[0]);
    assert_eq!(b.expect(), spoofs[0]);
}

#[test]
fn dead_socketpair_peer_marks_the_port_down_once() {
    let sw = switch();
    let events = sw.take_events().unwrap();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let a = Dgram::new(sw.add_port("n", "a").unwrap().1);
    let (pb, b) = sw.add_port("n", "b").unwrap();
    let c = Dgram::new(sw.add_port("n", "c").unwrap().1);
    drop(b);
    a.send(&frame(Mac::BROADCAST, mac(1), 64, 1));
    wait_event(
        &events,
        "PortDown",
        |e| matches!(e, SwitchEvent::PortDown { port, .. } if *port == pb),
    );
    assert_eq!(sw.is_port_up(pb), Some(false));
    assert_eq!(c.expect().last(), Some(&1));
    // A down port is no longer flooded to: its drop count stays put.
    let before = sw.port_counters(pb).unwrap().drops(DropReason::PeerGone);
    for i in 0..10 {
        a.send(&frame(Mac::BROADCAST, mac(1), 64, 10 + i));
    }
    for i in 0..10 {
        assert_eq!(c.expect().last(), Some(&(10 + i)));
    }
    assert_eq!(sw.port_counters(pb).unwrap().drops(DropReason::PeerGone), before);
    assert!(
        events.try_iter().all(|e| !matches!(e, SwitchEvent::PortDown { .. })),
        "reported once"
    );
}

#[test]
fn ports_come_and_go_while_traffic_flows() {
    let sw = Arc::new(switch());
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let sender = Dgram::new(sw.add_port("n", "sender").unwrap().1);
    let (pk, keeper) = sw.add_port("n", "keeper").unwrap();
    let keeper = Dgram::new(keeper);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let blaster = std::thread::spawn(move || {
        let f = frame(Mac::BROADCAST, mac(1), 600, 0);
        let mut sent = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            sender.send(&f);
            sent += 1;
        }
        sent
    });
    let drain = std::thread::spawn(move || {
        let mut n = 0u64;
        keeper
            .0
            .set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .unwrap();
        while keeper.recv().is_some() {
            n += 1;
        }
        n
    });
    for round in 0..50 {
        let (p, fd) = sw.add_port("n", &format!("churn{round}")).unwrap();
        let ep = Dgram::new(fd);
        ep.expect(); // it is live: it gets the flood
        if round % 2 == 0 {
            drop(ep); // half die before removal, half are removed live
        }
        sw.remove_port(p).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let sent = blaster.join().unwrap();
    let got = drain.join().unwrap();
    assert!(sent > 0 && got > 0);
    let c = sw.port_counters(pk).unwrap();
    assert_eq!(
        c.tx_frames + c.drops(DropReason::QueueFull),
        sent,
        "every frame to the keeper is accounted for"
    );
}

#[test]
fn a_thousand_ports_on_one_network() {
    raise_fd_limit(4096);
    let sw = switch();
    sw.add_network("big", NetworkConfig::default()).unwrap();
    let eps: Vec<Dgram> = (0..1000)
        .map(|i| Dgram::new(sw.add_port("big", &format!("p{i}")).unwrap().1))
        .collect();
    let f = frame(Mac::BROADCAST, mac(1), 128, 0x5a);
    eps[0].send(&f);
    for ep in &eps[1..] {
        assert_eq!(ep.expect(), f);
    }
    eps[999].send(&frame(mac(1), mac(2), 64, 0x5b));
    assert_eq!(eps[0].expect().last(), Some(&0x5b));
    assert_eq!(sw.ports().len(), 1000);
    // Counted just after the send that delivered them.
    wait_until("1000 frames counted as sent", || {
        sw.network_counters("big").unwrap().tx_frames == 1000
    });
}

fn raise_fd_limit(want: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    let max = lim.maximum.unwrap_or(want);
    if lim.current.is_some_and(|c| c < want) {
        lim.current = Some(want.min(max));
        setrlimit(Resource::Nofile, lim).expect("raise RLIMIT_NOFILE");
    }
}

#[test]
fn a_slow_receiver_loses_only_its_own_frames() {
    let sw = switch();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let sender = Dgram::new(sw.add_port("n", "sender").unwrap().1);
    let (pslow, _slow) = sw.add_port("n", "slow").unwrap(); // never read
    let (pfast, fast) = sw.add_port("n", "fast").unwrap();
    let fast = Dgram::new(fast);
    const N: u64 = 20_000;
    // The sender stays at most this far ahead of the fast reader, so the fast port keeps
    // up however loaded the machine is; the slow port, never read, still overflows.
    const AHEAD: u64 = 1_000;
    let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let read_by_reader = read.clone();
    let reader = std::thread::spawn(move || {
        let mut n = 0;
        while n < N {
            fast.expect();
            n += 1;
            read_by_reader.store(n, Ordering::Relaxed);
        }
        n
    });
    let f = frame(Mac::BROADCAST, mac(1), 1000, 1);
    for sent in 0..N {
        if sent >= AHEAD {
            wait_until("the fast reader to catch up", || {
                read.load(Ordering::Relaxed) >= sent - AHEAD
            });
        }
        sender.send(&f);
    }
    assert_eq!(reader.join().unwrap(), N, "the fast port got every frame");
    let fast_c = sw.port_counters(pfast).unwrap();
    assert_eq!(fast_c.total_drops(), 0);
    // The slow port's socket and then its backlog filled up; the rest was dropped.
    let queued = fabric::SwitchConfig::default().egress_queue_frames as u64;
    wait_until("the slow port's frames to be accounted for", || {
        let s = sw.port_counters(pslow).unwrap();
        s.tx_frames + s.drops(DropReason::QueueFull) + queued == N
    });
    assert!(sw.port_counters(pslow).unwrap().drops(DropReason::QueueFull) > 0);
}

#[test]
fn a_stream_peer_that_reads_late_gets_whole_frames_in_order() {
    let dir = tmpdir("stream-late");
    let sw = switch();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let path = dir.join("st.sock");
    let port = sw.add_stream_port("n", "vm", &path).unwrap();
    let sender = Dgram::new(sw.add_port("n", "sender").unwrap().1);
    let mut vm = Stream::connect(&path);
    wait_until("the stream port to be up", || sw.is_port_up(port) == Some(true));
    // More than the socket and the port's queue hold: the switch writes what fits,
    // keeps the rest of a frame it began, and drops whole frames beyond its bound.
    const N: u32 = 12_000;
    for seq in 0..N {
        let mut f = frame(Mac::BROADCAST, mac(1), 1400, 0);
        f[14..18].copy_from_slice(&seq.to_be_bytes());
        sender.send(&f);
    }
    let c = || sw.port_counters(port).unwrap();
    wait_until("every frame queued or dropped", || {
        c().tx_frames + c().drops(DropReason::QueueFull) == u64::from(N)
    });
    assert!(
        c().drops(DropReason::QueueFull) > 0,
        "the test should overflow the queue"
    );
    let mut last = None;
    for _ in 0..c().tx_frames {
        let f = vm.recv().expect("a whole frame");
        assert_eq!(f.len(), 1400);
        let seq = u32::from_be_bytes(f[14..18].try_into().unwrap());
        assert!(
            last.is_none_or(|l| seq > l),
            "frames out of order: {seq} after {last:?}"
        );
        last = Some(seq);
    }
}

#[test]
fn only_a_trusted_port_may_answer_dhcp() {
    let (sw, eps) = network_with_ports(3);
    let [vm, gw, other] = <[Dgram; 3]>::try_from(eps).ok().unwrap();
    let ids: Vec<_> = sw.ports().iter().map(|p| p.id).collect();
    let offer = udp_frame(
        Mac::BROADCAST,
        mac(66),
        Ipv4Addr::new(10, 77, 0, 66),
        Ipv4Addr::BROADCAST,
        67,
        68,
    );
    vm.send(&offer);
    marker(&vm, mac(1), 0x10);
    assert!(other.until_marker(0x10).is_empty(), "a VM port served DHCP");
    assert!(gw.until_marker(0x10).is_empty());
    assert_eq!(sw.port_counters(ids[0]).unwrap().drops(DropReason::RogueDhcp), 1);
    // With no DHCP server trusted yet, a client's broadcast floods as usual.
    let discover = udp_frame(
        Mac::BROADCAST,
        mac(1),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        68,
        67,
    );
    vm.send(&discover);
    assert_eq!(other.expect(), discover);
    assert_eq!(gw.expect(), discover);
    sw.set_port_trusted(ids[1], true).unwrap();
    // Once there is one, client broadcasts go to it alone.
    vm.send(&discover);
    assert_eq!(gw.expect(), discover);
    marker(&vm, mac(1), 0x11);
    assert!(
        other.until_marker(0x11).is_empty(),
        "another VM saw a DHCP client broadcast"
    );
    gw.until_marker(0x11);
    let offer = udp_frame(
        Mac::BROADCAST,
        mac(2),
        Ipv4Addr::new(10, 77, 0, 1),
        Ipv4Addr::BROADCAST,
        67,
        68,
    );
    gw.send(&offer);
    assert_eq!(other.expect(), offer);
}

/// An IPv6 frame from `src` with the given extension headers and upper layer.
fn ipv6_frame(src: Mac, next: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(Mac::BROADCAST.0);
    f.extend(src.0);
    f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend((body.len() as u16).to_be_bytes());
    f.extend([next, 255]);
    f.extend([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend([0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend(body);
    f
}

/// `frame` with VLAN tags (ethertypes given, outermost first) after the MAC addresses.
fn tagged(frame: &[u8], tags: &[u16]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    for t in tags {
        f.extend(t.to_be_bytes());
        f.extend([0, 1]);
    }
    f.extend(&frame[12..]);
    f
}

#[test]
fn the_first_hop_guard_sees_through_tags_fragments_and_ipv6_extension_headers() {
    let sw = switch();
    sw.add_network("v4", NetworkConfig::default()).unwrap();
    sw.add_network(
        "v6",
        NetworkConfig {
            ipv6: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (attacker_id, attacker) = sw.add_port("v4", "attacker").unwrap();
    let (attacker, victim) = (Dgram::new(attacker), Dgram::new(sw.add_port("v4", "victim").unwrap().1));
    let offer = udp_frame(
        Mac::BROADCAST,
        mac(66),
        Ipv4Addr::new(10, 77, 0, 66),
        Ipv4Addr::BROADCAST,
        67,
        68,
    );
    // A tiny first fragment: the UDP header does not fit, so its ports are hidden.
    let mut tiny = offer[..14 + 20 + 4].to_vec();
    tiny[14 + 6] = 0x20; // more fragments, offset 0
    tiny[14 + 3] = 24; // total length
    let ra = ipv6_frame(mac(66), 58, &[134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]);
    let rogue_v4 = [
        tagged(&offer, &[0x8100]),
        tagged(&offer, &[0x88a8, 0x8100]),
        tagged(&offer, &[0x9100, 0x8100]),
        tagged(&offer, &[0x88a8, 0x8100, 0x8100]),
        tiny,
        ra.clone(),
        tagged(&ra, &[0x88a8]),
    ];
    for f in &rogue_v4 {
        attacker.send(f);
    }
    marker(&attacker, mac(66), 0x20);
    assert!(
        victim.until_marker(0x20).is_empty(),
        "a rogue server's frame reached the victim"
    );
    let c = sw.port_counters(attacker_id).unwrap();
    assert_eq!(c.drops(DropReason::RogueDhcp), 4);
    assert_eq!(c.drops(DropReason::Malformed), 1, "three tags");
    assert_eq!(c.drops(DropReason::Ipv6Off), 2);
    // A tagged frame that carries nothing a guard cares about still passes.
    let plain_tagged = tagged(&frame(Mac::BROADCAST, mac(66), 100, 1), &[0x8100]);
    attacker.send(&plain_tagged);
    assert_eq!(victim.expect(), plain_tagged);

    // On a network that carries IPv6: plain IPv6 passes, a router's messages do not,
    // also behind extension headers, nor a neighbour advertisement for another MAC.
    let (attacker_id, attacker) = sw.add_port("v6", "attacker").unwrap();
    let (attacker, victim) = (Dgram::new(attacker), Dgram::new(sw.add_port("v6", "victim").unwrap().1));
    let echo = ipv6_frame(mac(66), 58, &[128, 0, 0, 0, 0, 1, 0, 1]);
    attacker.send(&echo);
    assert_eq!(victim.expect(), echo);
    let mut hop_by_hop_ra = vec![58, 0, 1, 4, 0, 0, 0, 0]; // next: ICMPv6; PadN
    hop_by_hop_ra.extend([134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut fragment_ra = vec![58, 0, 0, 0, 0, 0, 0, 1]; // first fragment
    fragment_ra.extend([134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]);
    let hidden = vec![60, 0, 1, 4, 0, 0, 0, 0]; // a chain cut short
    let neighbour_advert = |lladdr: Mac| {
        let mut na = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
        na.extend([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
        na.extend([2, 1]);
        na.extend(lladdr.0);
        ipv6_frame(mac(66), 58, &na)
    };
    let dhcp6_advertise = ipv6_frame(mac(66), 17, &[2, 35, 2, 34, 0, 8, 0, 0]);
    let redirect = ipv6_frame(mac(66), 58, &[137, 0, 0, 0, 0, 0, 0, 0]);
    for f in [
        ra.clone(),
        ipv6_frame(mac(66), 0, &hop_by_hop_ra),
        ipv6_frame(mac(66), 44, &fragment_ra),
        ipv6_frame(mac(66), 0, &hidden),
        neighbour_advert(mac(9)),
        dhcp6_advertise,
        redirect,
    ] {
        attacker.send(&f);
    }
    let own = neighbour_advert(mac(66));
    attacker.send(&own);
    assert_eq!(victim.expect(), own, "only the guard's catches are dropped");
    let c = sw.port_counters(attacker_id).unwrap();
    assert_eq!(c.drops(DropReason::RogueRa), 4, "advertisements and the redirect");
    assert_eq!(c.drops(DropReason::RogueDhcp6), 1);
    assert_eq!(c.drops(DropReason::Ipv6Guard), 2, "a hidden upper layer, another's MAC");
}

#[test]
fn a_dhcp6_clients_multicast_goes_to_the_trusted_port_alone() {
    let sw = switch();
    let v6 = NetworkConfig {
        ipv6: true,
        ..Default::default()
    };
    sw.add_network("v6", v6).unwrap();
    let (vm, other) = (
        sw.add_port("v6", "vm").unwrap().1,
        sw.add_port("v6", "other").unwrap().1,
    );
    let (gw_id, gw) = sw.add_port("v6", "gateway").unwrap();
    let (vm, other, gw) = (Dgram::new(vm), Dgram::new(other), Dgram::new(gw));
    sw.set_port_trusted(gw_id, true).unwrap();
    let solicit = ipv6_frame(mac(1), 17, &[2, 34, 2, 35, 0, 8, 0, 0]);
    vm.send(&solicit);
    assert_eq!(gw.expect(), solicit);
    let echo = ipv6_frame(mac(1), 58, &[128, 0, 0, 0, 0, 1, 0, 1]);
    vm.send(&echo);
    assert_eq!(other.expect(), echo, "the VM saw the echo after it, and nothing before");
    assert_eq!(gw.expect(), echo);
}

#[test]
fn a_port_locked_to_its_first_mac_keeps_it_and_sends_nothing_but_dhcp_and_probes_before_a_lease() {
    let (sw, eps) = network_with_ports(2);
    let [vm, other] = <[Dgram; 2]>::try_from(eps).ok().unwrap();
    let id = sw.ports()[0].id;
    sw.lock_port_to_first_mac(id).unwrap();
    let discover = udp_frame(
        Mac::BROADCAST,
        mac(1),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        68,
        67,
    );
    vm.send(&discover);
    assert_eq!(other.expect(), discover);
    let probe = arp_request(mac(1), mac(1), Ipv4Addr::UNSPECIFIED, Ipv4Addr::new(10, 77, 0, 5));
    vm.send(&probe);
    assert_eq!(other.expect(), probe);
    // Another MAC, an address it was never given, a gratuitous ARP for the gateway.
    vm.send(&frame(Mac::BROADCAST, mac(2), 64, 1));
    vm.send(&udp_frame(
        Mac::BROADCAST,
        mac(1),
        Ipv4Addr::new(10, 77, 0, 9),
        Ipv4Addr::BROADCAST,
        5000,
        5000,
    ));
    vm.send(&arp_request(
        mac(1),
        mac(1),
        Ipv4Addr::new(10, 77, 0, 1),
        Ipv4Addr::new(10, 77, 0, 1),
    ));
    vm.send(&discover);
    assert_eq!(other.expect(), discover, "only the DISCOVER passes");
    assert_eq!(sw.port_counters(id).unwrap().drops(DropReason::Spoofed), 3);
}

#[test]
fn an_in_process_port_that_only_reads_gets_every_frame_the_switch_kept() {
    let sw = switch();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let sender = Dgram::new(sw.add_port("n", "sender").unwrap().1);
    let (port, end) = sw.add_inprocess_port("n", "service").unwrap();
    let wake = end.wake_receiver().unwrap();
    rustix::fs::fcntl_setfl(&wake, rustix::fs::OFlags::NONBLOCK).unwrap();
    let got = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // The reader waits on the wake-up only (as the gateway does), and sends nothing: a
    // lost "room" wake-up leaves frames in the switch's backlog for good.
    let reader = {
        let (got, stop) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !stop.load(Ordering::Relaxed) {
                // Slower than the switch, so its queue fills and the backlog grows,
                // but quick to take a frame once there, so room is made (and the
                // switch woken) while the switch is still at work.
                while let Some(f) = end.try_recv() {
                    end.recycle(f);
                    got.fetch_add(1, Ordering::Relaxed);
                    let t = std::time::Instant::now();
                    while t.elapsed() < std::time::Duration::from_micros(2) {
                        std::hint::spin_loop();
                    }
                }
                let mut fds = [rustix::event::PollFd::new(&wake, rustix::event::PollFlags::IN)];
                let timeout = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 50_000_000,
                };
                let _ = rustix::event::poll(&mut fds, Some(&timeout));
                while matches!(rustix::io::read(&wake, &mut buf), Ok(n) if n > 0) {}
            }
        })
    };
    const BURSTS: u64 = 200;
    const BURST: u64 = 1500;
    let f = frame(Mac::BROADCAST, mac(1), 200, 1);
    for burst in 1..=BURSTS {
        for _ in 0..BURST {
            sender.send(&f);
        }
        // Each burst is taken or dropped (past the queue's bounds) before the next:
        // none of it may wait in the backlog for a wake-up that never comes.
        wait_until("every frame of the burst taken or dropped", || {
            let c = sw.port_counters(port).unwrap();
            c.tx_frames + c.drops(DropReason::QueueFull) == burst * BURST && got.load(Ordering::Relaxed) == c.tx_frames
        });
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
}

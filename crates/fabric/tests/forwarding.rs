//! Learning-bridge behaviour over real socketpairs: flooding, learning, isolation,
//! MAC moves, aging, the table bound, and size checks.

mod common;

use std::time::Duration;

use common::*;
use fabric::{DropReason, Mac, ManualClock, NetworkConfig, SwitchConfig, SwitchEvent};

#[test]
fn broadcast_floods_to_every_other_port_and_never_back() {
    let (_sw, eps) = network_with_ports(4);
    let f = frame(Mac::BROADCAST, mac(1), 100, 7);
    eps[0].send(&f);
    for ep in &eps[1..] {
        assert_eq!(ep.expect(), f);
    }
    // The sender gets nothing back: the next thing it sees is another port's marker.
    marker(&eps[1], mac(2), 0xAA);
    assert!(eps[0].until_marker(0xAA).is_empty(), "frame echoed to its sender");
}

#[test]
fn unicast_to_a_learned_mac_reaches_only_that_port() {
    let (sw, eps) = network_with_ports(3);
    let [a, b, c] = <[Dgram; 3]>::try_from(eps).ok().unwrap();
    // B announces itself; everyone sees the broadcast.
    marker(&b, mac(2), 0x01);
    a.until_marker(0x01);
    c.until_marker(0x01);
    let f = frame(mac(2), mac(1), 200, 9);
    a.send(&f);
    assert_eq!(b.expect(), f);
    marker(&a, mac(1), 0x02);
    assert!(c.until_marker(0x02).is_empty(), "C saw unicast meant for B");
    let table = sw.mac_table("n").unwrap();
    assert!(table.iter().any(|e| e.mac == mac(2)) && table.iter().any(|e| e.mac == mac(1)));
}

#[test]
fn unknown_unicast_floods() {
    let (_sw, eps) = network_with_ports(3);
    let [a, b, c] = <[Dgram; 3]>::try_from(eps).ok().unwrap();
    let f = frame(mac(9), mac(1), 64, 3);
    a.send(&f);
    assert_eq!(b.expect(), f);
    assert_eq!(c.expect(), f);
}

#[test]
fn networks_are_isolated() {
    let sw = switch();
    sw.add_network("red", NetworkConfig::default()).unwrap();
    sw.add_network("blue", NetworkConfig::default()).unwrap();
    let r1 = Dgram::new(sw.add_port("red", "r1").unwrap().1);
    let r2 = Dgram::new(sw.add_port("red", "r2").unwrap().1);
    let b1 = Dgram::new(sw.add_port("blue", "b1").unwrap().1);
    let b2 = Dgram::new(sw.add_port("blue", "b2").unwrap().1);
    // The same MAC on both networks is two different hosts.
    r1.send(&frame(Mac::BROADCAST, mac(1), 64, 0x10));
    b1.send(&frame(Mac::BROADCAST, mac(1), 64, 0x20));
    r2.send(&frame(mac(1), mac(2), 64, 0x11));
    assert_eq!(r2.expect().last(), Some(&0x10));
    assert_eq!(b2.expect().last(), Some(&0x20));
    assert_eq!(r1.expect().last(), Some(&0x11));
    marker(&b2, mac(3), 0xBB);
    assert!(b1.until_marker(0xBB).is_empty(), "a red frame reached blue");
    let red = sw.network_counters("red").unwrap();
    let blue = sw.network_counters("blue").unwrap();
    assert_eq!(red.rx_frames, 2);
    assert_eq!(blue.rx_frames, 2);
}

#[test]
fn a_mac_that_moves_follows_its_new_port() {
    let sw = switch();
    let events = sw.take_events().unwrap();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let (_, a) = sw.add_port("n", "a").unwrap();
    let (pb, b) = sw.add_port("n", "b").unwrap();
    let (pd, d) = sw.add_port("n", "d").unwrap();
    let (a, b, d) = (Dgram::new(a), Dgram::new(b), Dgram::new(d));
    marker(&b, mac(2), 0x01);
    a.until_marker(0x01);
    d.until_marker(0x01);
    // The VM behind mac(2) migrates to port D.
    marker(&d, mac(2), 0x02);
    a.until_marker(0x02);
    b.until_marker(0x02);
    wait_event(
        &events,
        "MacMoved",
        |e| matches!(e, SwitchEvent::MacMoved { mac: m, from, to, .. } if *m == mac(2) && *from == pb && *to == pd),
    );
    let f = frame(mac(2), mac(1), 64, 5);
    a.send(&f);
    assert_eq!(d.expect(), f);
    marker(&a, mac(1), 0x03);
    assert!(
        b.until_marker(0x03).is_empty(),
        "old port still got the moved MAC's frame"
    );
}

#[test]
fn entries_age_out_with_the_clock() {
    let clock = ManualClock::default();
    let sw = fabric::Switch::start(SwitchConfig {
        clock: std::sync::Arc::new(clock.clone()),
        ..Default::default()
    })
    .unwrap();
    sw.add_network(
        "n",
        NetworkConfig {
            aging: Duration::from_secs(300),
            ..Default::default()
        },
    )
    .unwrap();
    let a = Dgram::new(sw.add_port("n", "a").unwrap().1);
    let b = Dgram::new(sw.add_port("n", "b").unwrap().1);
    let c = Dgram::new(sw.add_port("n", "c").unwrap().1);
    marker(&b, mac(2), 0x01);
    a.until_marker(0x01);
    c.until_marker(0x01);
    clock.advance(Duration::from_secs(299));
    a.send(&frame(mac(2), mac(1), 64, 0x02));
    assert_eq!(b.expect().last(), Some(&0x02));
    marker(&a, mac(1), 0x03);
    assert!(c.until_marker(0x03).is_empty(), "entry expired too early");
    b.until_marker(0x03);
    // mac(2) has been silent for 300 s now: unicast to it floods again.
    clock.advance(Duration::from_secs(1));
    assert!(sw.mac_table("n").unwrap().iter().all(|e| e.mac != mac(2)));
    a.send(&frame(mac(2), mac(1), 64, 0x04));
    assert_eq!(c.expect().last(), Some(&0x04), "an aged-out MAC should flood");
    assert_eq!(b.expect().last(), Some(&0x04));
}

#[test]
fn a_full_table_learns_nothing_new_but_still_delivers() {
    let sw = switch();
    sw.add_network(
        "n",
        NetworkConfig {
            mac_table_max: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let events = sw.take_events().unwrap();
    let a = Dgram::new(sw.add_port("n", "a").unwrap().1);
    let b = Dgram::new(sw.add_port("n", "b").unwrap().1);
    for n in 1..=6 {
        a.send(&frame(Mac::BROADCAST, mac(n), 64, n));
    }
    for n in 1..=6 {
        assert_eq!(
            b.expect().last(),
            Some(&n),
            "frames are delivered even when not learned"
        );
    }
    assert_eq!(sw.mac_table("n").unwrap().len(), 4);
    let c = sw.network_counters("n").unwrap();
    assert_eq!(c.not_learned, 2, "the two sources past the bound");
    assert_eq!(c.total_drops(), 0, "and their frames were delivered, not dropped");
    assert_eq!(sw.mac_table_len("n"), Some(4));
    wait_event(&events, "MacTableFull", |e| {
        matches!(e, SwitchEvent::MacTableFull { .. })
    });
}

#[test]
fn runts_and_oversize_frames_are_counted_and_dropped() {
    let sw = switch();
    sw.add_network("n", NetworkConfig::default()).unwrap();
    let (pa, a) = sw.add_port("n", "a").unwrap();
    let (a, b) = (Dgram::new(a), Dgram::new(sw.add_port("n", "b").unwrap().1));
    a.send(&[0u8; 13]);
    a.send(&[]);
    a.send(&frame(Mac::BROADCAST, mac(1), 1515, 1)); // one byte over MTU 1500
    a.send(&frame(Mac::BROADCAST, mac(1), 3000, 2)); // cut by the socket: never forwarded
    let full = frame(Mac::BROADCAST, mac(1), 1514, 3);
    a.send(&full);
    let mut tagged = frame(Mac::BROADCAST, mac(1), 1518, 4);
    tagged[12..14].copy_from_slice(&[0x81, 0x00]);
    a.send(&tagged);
    assert_eq!(b.expect(), full, "runts and oversize frames must not arrive");
    assert_eq!(b.expect(), tagged);
    let c = sw.port_counters(pa).unwrap();
    assert_eq!(c.drops(DropReason::Runt), 2);
    assert_eq!(c.drops(DropReason::Oversize), 2);
    assert_eq!(c.rx_frames, 6);
}

#[test]
fn jumbo_networks_carry_jumbo_frames() {
    let sw = switch();
    sw.add_network(
        "jumbo",
        NetworkConfig {
            mtu: 9000,
            ..Default::default()
        },
    )
    .unwrap();
    sw.add_network(
        "max",
        NetworkConfig {
            mtu: fabric::MAX_MTU,
            ..Default::default()
        },
    )
    .unwrap();
    let a = Dgram::new(sw.add_port("jumbo", "a").unwrap().1);
    let b = Dgram::new(sw.add_port("jumbo", "b").unwrap().1);
    let f = frame(Mac::BROADCAST, mac(1), 9014, 1);
    a.send(&f);
    a.send(&frame(Mac::BROADCAST, mac(1), 9015, 2));
    a.send(&frame(Mac::BROADCAST, mac(1), 60, 3));
    assert_eq!(b.expect(), f);
    assert_eq!(b.expect().last(), Some(&3));
    let x = Dgram::new(sw.add_port("max", "x").unwrap().1);
    let y = Dgram::new(sw.add_port("max", "y").unwrap().1);
    let big = frame(Mac::BROADCAST, mac(1), fabric::MAX_MTU + 14, 4);
    x.send(&big);
    assert_eq!(y.expect(), big);
}

#[test]
fn invalid_network_config_is_an_error() {
    let sw = switch();
    let err = sw
        .add_network(
            "n",
            NetworkConfig {
                mtu: 70000,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("mtu"), "{err}");
    sw.add_network("n", NetworkConfig::default()).unwrap();
    assert!(matches!(
        sw.add_network("n", NetworkConfig::default()),
        Err(fabric::FabricError::NetworkExists(_))
    ));
    assert!(matches!(
        sw.add_port("nope", "x"),
        Err(fabric::FabricError::NoSuchNetwork(_))
    ));
    let (p, _fd) = sw.add_port("n", "x").unwrap();
    assert!(matches!(
        sw.remove_network("n"),
        Err(fabric::FabricError::NetworkBusy(_, 1))
    ));
    sw.remove_port(p).unwrap();
    assert!(matches!(sw.remove_port(p), Err(fabric::FabricError::NoSuchPort(_))));
    sw.remove_network("n").unwrap();
    assert!(sw.networks().is_empty());
}

#[test]
fn live_capture_copies_frames_and_never_holds_them_back() {
    let (sw, eps) = network_with_ports(3);
    let [a, b, c] = <[Dgram; 3]>::try_from(eps).ok().unwrap();
    let ids: Vec<_> = sw.ports().iter().map(|p| p.id).collect();
    let all = sw.capture("n", None, 64).unwrap();
    let only_c = sw.capture("n", Some(ids[2]), 64).unwrap();
    let tiny = sw.capture("n", None, 2).unwrap(); // never read
    marker(&c, mac(3), 0x01); // C announces itself
    a.until_marker(0x01);
    b.until_marker(0x01);
    let ab = frame(mac(2), mac(1), 100, 0x02);
    a.send(&ab); // unknown unicast: flooded to B and C
    assert_eq!(b.expect(), ab);
    assert_eq!(c.expect(), ab);
    let ac = frame(mac(3), mac(1), 100, 0x03);
    a.send(&ac);
    assert_eq!(c.expect(), ac);
    let seen: Vec<Vec<u8>> = (0..3).map(|_| all.frames.recv_timeout(WAIT).unwrap().data).collect();
    assert_eq!(seen[1], ab);
    assert_eq!(seen[2], ac);
    let to_c: Vec<Vec<u8>> = (0..3).map(|_| only_c.frames.recv_timeout(WAIT).unwrap().data).collect();
    assert_eq!(
        to_c[1..],
        [ab.clone(), ac.clone()],
        "C's capture has what C sent and got"
    );
    assert!(tiny.dropped() >= 1, "a full capture loses copies");
    assert_eq!(
        sw.network_counters("n").unwrap().total_drops(),
        0,
        "and the network loses nothing"
    );
    assert!(sw.capture("nope", None, 1).is_err());
}

#[test]
fn a_mac_flood_cannot_make_a_locked_guests_unicast_flood() {
    let sw = switch();
    sw.add_network(
        "n",
        NetworkConfig {
            mac_table_max: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let attacker = Dgram::new(sw.add_port("n", "attacker").unwrap().1);
    let sender = Dgram::new(sw.add_port("n", "sender").unwrap().1);
    // The victim arrives after the flood filled the table; its port is locked at
    // creation, as the control plane does, and it has sent nothing yet.
    for n in 100..=110 {
        attacker.send(&frame(Mac::BROADCAST, mac(n), 64, n));
    }
    for _ in 100..=110 {
        sender.expect();
    }
    assert_eq!(sw.mac_table_len("n"), Some(4));
    let (victim_id, victim) = sw.add_port("n", "victim").unwrap();
    let victim = Dgram::new(victim);
    sw.lock_port(
        victim_id,
        Some(fabric::PortLock {
            mac: mac(7),
            ips: vec![],
            ips6: vec![],
        }),
    )
    .unwrap();
    let f = frame(mac(7), mac(1), 80, 0x33);
    sender.send(&f);
    assert_eq!(victim.expect(), f);
    marker(&sender, mac(1), 0x34);
    assert!(
        attacker.until_marker(0x34).is_empty(),
        "the victim's unicast flooded to the attacker"
    );
}

use super::*;
use crate::leases::MemoryLeaseStore;
use std::time::Duration;

fn server() -> (DhcpServer, MemoryLeaseStore) {
    let mut cfg = GatewayConfig::new("t", "10.9.0.0/29".parse().unwrap()); // hosts .1-.6
    cfg.lease_time = Duration::from_secs(600);
    let store = MemoryLeaseStore::default();
    let c = Arc::new(GatewayCounters::default());
    (DhcpServer::new(Arc::new(cfg), c, Box::new(store.clone())), store)
}

fn msg(mac: u8, kind: MessageType, opts: Vec<DhcpOption>, ciaddr: Ipv4Addr) -> Vec<u8> {
    let chaddr = [0x02, 0, 0, 0, 0, mac];
    let mut m = v4::Message::new_with_id(
        7,
        ciaddr,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &chaddr,
    );
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in opts {
        m.opts_mut().insert(o);
    }
    m.to_vec().unwrap()
}

/// A DISCOVER with one raw option added before the end marker.
fn with_raw_option(mac: u8, option: &[u8]) -> Vec<u8> {
    let mut bytes = msg(mac, MessageType::Discover, vec![], Ipv4Addr::UNSPECIFIED);
    let end = bytes.iter().rposition(|b| *b == 255).unwrap();
    bytes.splice(end..end, option.iter().copied());
    bytes
}

/// dhcproto asserts (debug builds) or underflows on these lengths; the server counts
/// them as malformed and goes on.
#[test]
fn options_with_lengths_the_decoder_trusts_are_refused_not_decoded() {
    let (mut s, _) = server();
    for bad in [
        &[80u8, 1, 0][..],
        &[81, 1, 0],
        &[81, 0],
        &[151, 0],
        &[51, 2, 0, 0],
        &[53, 0],
        // Found by the fuzzer: a fixed-size option given twice is joined (RFC 3396)
        // into one of twice the size, which dhcproto asserts against.
        &[154, 4, 0, 0, 0, 1, 154, 4, 0, 0, 0, 2],
        &[51, 4, 0, 0, 0, 1, 51, 4, 0, 0, 0, 2],
        // Options overloaded into sname/file are not checked, so not taken.
        &[52, 1, 3],
    ] {
        let (reply, _) = s.handle_unbound(&with_raw_option(1, bad), 100);
        assert!(reply.is_none(), "{bad:?} answered");
    }
    assert_eq!(s.counters.dhcp_malformed.load(std::sync::atomic::Ordering::Relaxed), 9);
    // Well-formed: Rapid Commit with length 0 still gets an answer.
    let (reply, _) = s.handle_unbound(&with_raw_option(1, &[80, 0]), 100);
    assert!(reply.is_some());
}

#[test]
fn a_client_speaks_only_for_its_own_hardware_address() {
    let (mut s, _) = server();
    let victim = Mac([0x02, 0, 0, 0, 0, 1]);
    let attacker = Mac([0x02, 0, 0, 0, 0, 2]);
    let offer = s
        .handle(
            &msg(1, MessageType::Discover, vec![], Ipv4Addr::UNSPECIFIED),
            victim,
            100,
        )
        .0
        .unwrap();
    let ip = decode(&offer).yiaddr();
    let req = vec![
        DhcpOption::RequestedIpAddress(ip),
        DhcpOption::ServerIdentifier(s.cfg.gateway_ip),
    ];
    let (ack, _) = s.handle(
        &msg(1, MessageType::Request, req.clone(), Ipv4Addr::UNSPECIFIED),
        victim,
        100,
    );
    assert!(ack.is_some());
    // The attacker's frames carry its own MAC; messages in the victim's name are dropped.
    let release = msg(1, MessageType::Release, vec![], ip);
    let decline = msg(
        1,
        MessageType::Decline,
        vec![DhcpOption::RequestedIpAddress(ip)],
        Ipv4Addr::UNSPECIFIED,
    );
    let takeover = msg(1, MessageType::Request, req, Ipv4Addr::UNSPECIFIED);
    for m in [release, decline, takeover] {
        let (reply, event) = s.handle(&m, attacker, 101);
        assert!(reply.is_none() && event.is_none());
    }
    assert_eq!(
        s.counters
            .dhcp_foreign_client
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    let lease = s.leases().next().unwrap();
    assert_eq!((lease.mac, lease.ip), (victim, ip), "the victim keeps its lease");
}

fn decode(r: &DhcpReply) -> v4::Message {
    v4::Message::decode(&mut Decoder::new(&r.bytes)).unwrap()
}

const Z: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
const GW: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);

fn bind(s: &mut DhcpServer, mac: u8, now: u64) -> Ipv4Addr {
    let offer = s
        .handle_unbound(&msg(mac, MessageType::Discover, vec![], Z), now)
        .0
        .unwrap();
    let ip = decode(&offer).yiaddr();
    let req = vec![DhcpOption::ServerIdentifier(GW), DhcpOption::RequestedIpAddress(ip)];
    let (ack, ev) = s.handle_unbound(&msg(mac, MessageType::Request, req, Z), now);
    assert_eq!(decode(&ack.unwrap()).opts().msg_type(), Some(MessageType::Ack));
    assert!(matches!(ev, Some(LeaseEvent::Bound(l)) if l.ip == ip));
    ip
}

#[test]
fn discover_offer_request_ack_with_all_options() {
    let (mut s, store) = server();
    let (offer, ev) = s.handle_unbound(&msg(1, MessageType::Discover, vec![], Z), 100);
    assert!(ev.is_none(), "an offer binds nothing");
    let offer = offer.unwrap();
    assert_eq!(offer.bytes.len(), MIN_BOOTP_LEN.max(offer.bytes.len()));
    let m = decode(&offer);
    assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 9, 0, 2));
    assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
    for code in [
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::DomainName,
        OptionCode::DomainSearch,
        OptionCode::InterfaceMtu,
        OptionCode::AddressLeaseTime,
        OptionCode::Renewal,
        OptionCode::Rebinding,
        OptionCode::ServerIdentifier,
    ] {
        assert!(m.opts().get(code).is_some(), "{code:?} missing");
    }
    assert!(store.load().unwrap().is_empty());
    assert_eq!(bind(&mut s, 1, 100), Ipv4Addr::new(10, 9, 0, 2));
    assert_eq!(store.load().unwrap().len(), 1, "written before the ACK");
    // The same client asking again gets the same address.
    assert_eq!(bind(&mut s, 1, 200), Ipv4Addr::new(10, 9, 0, 2));
    assert_eq!(s.leases().count(), 1, "one lease per MAC");
}

#[test]
fn request_for_another_server_is_ignored() {
    let (mut s, _) = server();
    s.handle_unbound(&msg(1, MessageType::Discover, vec![], Z), 0);
    let req = vec![
        DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 9, 0, 99)),
        DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 9, 0, 2)),
    ];
    assert!(matches!(
        s.handle_unbound(&msg(1, MessageType::Request, req, Z), 0),
        (None, None)
    ));
}

#[test]
fn renew_reboot_and_conflicts() {
    let (mut s, _) = server();
    let a = bind(&mut s, 1, 0);
    // RENEWING: ciaddr set, unicast answer.
    let (ack, _) = s.handle_unbound(&msg(1, MessageType::Request, vec![], a), 300);
    let ack = ack.unwrap();
    assert_eq!(
        (ack.dst_ip, decode(&ack).opts().msg_type()),
        (a, Some(MessageType::Ack))
    );
    // INIT-REBOOT of another client for A's address: NAK, broadcast.
    let (nak, _) = s.handle_unbound(
        &msg(2, MessageType::Request, vec![DhcpOption::RequestedIpAddress(a)], Z),
        300,
    );
    let nak = nak.unwrap();
    assert_eq!(
        (nak.dst_ip, decode(&nak).opts().msg_type()),
        (Ipv4Addr::BROADCAST, Some(MessageType::Nak))
    );
    // INIT-REBOOT for an address outside the subnet: NAK.
    let out = vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 168, 1, 5))];
    assert_eq!(
        decode(&s.handle_unbound(&msg(3, MessageType::Request, out, Z), 300).0.unwrap())
            .opts()
            .msg_type(),
        Some(MessageType::Nak)
    );
}

#[test]
fn a_discover_flood_cannot_take_bound_leases_or_drain_the_pool() {
    let (mut s, _) = server();
    let a = bind(&mut s, 1, 0);
    for mac in 10..200 {
        s.handle_unbound(&msg(mac, MessageType::Discover, vec![], Z), 1);
    }
    assert_eq!(s.leases().count(), 1);
    // A real client arriving during the flood still gets an address, never A's.
    let b = bind(&mut s, 2, 2);
    assert_ne!(a, b);
    assert_eq!(bind(&mut s, 1, 3), a);
}

#[test]
fn release_decline_and_expiry() {
    let (mut s, store) = server();
    let a = bind(&mut s, 1, 0);
    assert!(matches!(
        s.handle_unbound(&msg(1, MessageType::Release, vec![], a), 10).1,
        Some(LeaseEvent::Released { .. })
    ));
    assert!(store.load().unwrap().is_empty());
    let b = bind(&mut s, 2, 20);
    s.handle_unbound(
        &msg(2, MessageType::Decline, vec![DhcpOption::RequestedIpAddress(b)], Z),
        21,
    );
    let c = bind(&mut s, 3, 22);
    assert_ne!(c, b, "a declined address is quarantined");
    assert_eq!(s.next_expiry(), Some(622));
    let gone = s.expire(622);
    assert_eq!(
        gone,
        vec![LeaseEvent::Expired {
            mac: Mac([2, 0, 0, 0, 0, 3]),
            ip: c
        }]
    );
    assert_eq!(s.leases().count(), 0);
}

/// A port taken away: its lease goes at once, its address rests from other MACs for
/// `release_quarantine`, and its own MAC (the same port made again) may have it back.
#[test]
fn a_released_port_frees_its_lease_now_and_rests_its_address() {
    let (mut s, store) = server();
    let a = bind(&mut s, 1, 0);
    assert_eq!(
        s.release_port(Mac([2, 0, 0, 0, 0, 1]), 10),
        Some(LeaseEvent::Released {
            mac: Mac([2, 0, 0, 0, 0, 1]),
            ip: a
        })
    );
    assert!(store.load().unwrap().is_empty());
    assert_eq!(s.leases().count(), 0);
    assert_eq!(s.release_port(Mac([2, 0, 0, 0, 0, 1]), 10), None, "nothing left");
    let b = bind(&mut s, 2, 11);
    assert_ne!(b, a, "another MAC does not get the address while it rests");
    assert_eq!(bind(&mut s, 1, 12), a, "its own MAC does");
    s.release_port(Mac([2, 0, 0, 0, 0, 1]), 13);
    let rested = 13 + s.cfg.release_quarantine.as_secs();
    s.expire(rested);
    assert_eq!(bind(&mut s, 3, rested), a, "after the rest, anyone may");
}

#[test]
fn garbage_is_counted_not_answered() {
    let (mut s, _) = server();
    for bad in [&b""[..], &[1u8; 10], &[0xffu8; 300]] {
        assert!(matches!(s.handle_unbound(bad, 0), (None, None)));
    }
    // Cut right after the magic cookie: no message type left.
    let mut cut = msg(1, MessageType::Discover, vec![], Z);
    cut.truncate(240);
    assert!(matches!(s.handle_unbound(&cut, 0), (None, None)));
    assert_eq!(s.counters.dhcp_malformed.load(std::sync::atomic::Ordering::Relaxed), 4);
    // The server keeps serving.
    assert!(s
        .handle_unbound(&msg(1, MessageType::Discover, vec![], Z), 0)
        .0
        .is_some());
}

#[test]
fn reservations_by_mac_and_by_name() {
    let mut cfg = GatewayConfig::new("t", "10.9.0.0/24".parse().unwrap());
    let (r_mac, r_name) = (Ipv4Addr::new(10, 9, 0, 50), Ipv4Addr::new(10, 9, 0, 51));
    cfg.reservations = vec![
        crate::config::Reservation {
            key: ReservationKey::Mac(Mac([2, 0, 0, 0, 0, 1])),
            ip: r_mac,
            ip6: None,
        },
        crate::config::Reservation {
            key: ReservationKey::Name("db".into()),
            ip: r_name,
            ip6: None,
        },
        crate::config::Reservation {
            key: ReservationKey::Name("cache".into()),
            ip: Ipv4Addr::new(10, 9, 0, 52),
            ip6: None,
        },
    ];
    let c = Arc::new(GatewayCounters::default());
    let mut s = DhcpServer::new(Arc::new(cfg), c, Box::new(MemoryLeaseStore::default()));
    assert_eq!(bind(&mut s, 1, 0), r_mac);
    let offer = s
        .handle_unbound(
            &msg(2, MessageType::Discover, vec![DhcpOption::Hostname("db".into())], Z),
            0,
        )
        .0
        .unwrap();
    assert_eq!(decode(&offer).yiaddr(), r_name, "reserved by its DHCP hostname");
    s.set_name_hint(Mac([2, 0, 0, 0, 0, 3]), "cache".into());
    let offer = s
        .handle_unbound(&msg(3, MessageType::Discover, vec![], Z), 0)
        .0
        .unwrap();
    assert_eq!(
        decode(&offer).yiaddr(),
        Ipv4Addr::new(10, 9, 0, 52),
        "or by its port's label"
    );
    // Nobody else gets a reserved address, even by asking for it.
    let ask = vec![DhcpOption::RequestedIpAddress(r_mac)];
    let offer = s.handle_unbound(&msg(4, MessageType::Discover, ask, Z), 0).0.unwrap();
    assert!(![r_mac, r_name].contains(&decode(&offer).yiaddr()));
}

#[test]
fn extra_options_and_a_new_range_take_effect_without_a_restart() {
    let (mut s, _) = server();
    let mac = Mac([0x02, 0, 0, 0, 0, 1]);
    let discover = msg(1, MessageType::Discover, vec![], Ipv4Addr::UNSPECIFIED);
    let first = decode(&s.handle(&discover, mac, 100).0.unwrap());
    assert_eq!(first.yiaddr(), Ipv4Addr::new(10, 9, 0, 2));
    assert!(first.opts().get(v4::OptionCode::ClasslessStaticRoute).is_none());

    let mut cfg = (*s.cfg).clone();
    cfg.dhcp_range = (Ipv4Addr::new(10, 9, 0, 4), Ipv4Addr::new(10, 9, 0, 5));
    cfg.dhcp_extras.routes = vec![("192.168.50.0/24".parse().unwrap(), Ipv4Addr::new(10, 9, 0, 6))];
    cfg.dhcp_extras.ntp = vec![Ipv4Addr::new(10, 9, 0, 1)];
    cfg.dhcp_extras.raw = vec![(224, b"hello".to_vec())];
    cfg.validate().unwrap();
    s.set_config(Arc::new(cfg));

    let discover = msg(2, MessageType::Discover, vec![], Ipv4Addr::UNSPECIFIED);
    let second = decode(&s.handle(&discover, Mac([0x02, 0, 0, 0, 0, 2]), 101).0.unwrap());
    assert_eq!(second.yiaddr(), Ipv4Addr::new(10, 9, 0, 4), "the new range is used");
    let Some(DhcpOption::ClasslessStaticRoute(routes)) = second.opts().get(v4::OptionCode::ClasslessStaticRoute) else {
        panic!("no option 121");
    };
    // The default route rides along: a client that takes 121 ignores option 3.
    assert_eq!(routes.len(), 2);
    assert_eq!(routes[1], ("0.0.0.0/0".parse().unwrap(), Ipv4Addr::new(10, 9, 0, 1)));
    assert!(matches!(
        second.opts().get(v4::OptionCode::NtpServers),
        Some(DhcpOption::NtpServers(v)) if v == &vec![Ipv4Addr::new(10, 9, 0, 1)]
    ));
    assert!(matches!(
        second.opts().get(v4::OptionCode::Unknown(224)),
        Some(DhcpOption::Unknown(u)) if u.data() == b"hello"
    ));
}

#[test]
fn an_ipv6_reservation_by_name_pins_the_dhcpv6_address_and_says_so_for_the_lock() {
    use dhcproto::v6;
    let mut cfg = GatewayConfig::dual_stack_for_tests();
    let pinned: std::net::Ipv6Addr = "fd00:9::db".parse().unwrap();
    cfg.reservations = vec![crate::config::Reservation {
        key: ReservationKey::Name("db".into()),
        ip: Ipv4Addr::new(10, 9, 0, 60),
        ip6: Some(pinned),
    }];
    cfg.validate().unwrap();
    let mut s = DhcpServer::new(
        Arc::new(cfg.clone()),
        Arc::new(GatewayCounters::default()),
        Box::new(MemoryLeaseStore::default()),
    );
    let mac = Mac([2, 0, 0, 0, 0, 0x33]);
    s.set_name_hint(mac, "db".into());
    let mut m = v6::Message::new_with_id(v6::MessageType::Solicit, [1, 2, 3]);
    m.opts_mut()
        .insert(v6::DhcpOption::ClientId(vec![0, 3, 0, 1, 2, 0, 0, 0, 0, 0x33]));
    m.opts_mut().insert(v6::DhcpOption::IANA(v6::IANA {
        id: 1,
        t1: 0,
        t2: 0,
        opts: Default::default(),
    }));
    m.opts_mut().insert(v6::DhcpOption::RapidCommit);
    let reply = s.handle6(&m.to_vec().unwrap(), mac, 10).expect("a reply");
    let reply = v6::Message::decode(&mut Decoder::new(&reply)).unwrap();
    let Some(v6::DhcpOption::IANA(ia)) = reply.opts().get(v6::OptionCode::IANA) else {
        panic!("{reply:?}");
    };
    assert!(matches!(ia.opts.get(v6::OptionCode::IAAddr), Some(v6::DhcpOption::IAAddr(a)) if a.addr == pinned));
    assert_eq!(s.take_events6(), vec![LeaseEvent::Bound6 { mac, ip: pinned }]);
    // Outside the prefix, or on a network without IPv6, a reservation is refused.
    let mut bad = cfg.clone();
    bad.reservations[0].ip6 = Some("2001:db8::1".parse().unwrap());
    assert!(bad.validate().is_err());
    let mut v4_only = GatewayConfig::new("t", "10.9.0.0/24".parse().unwrap());
    v4_only.reservations = cfg.reservations.clone();
    assert!(v4_only.validate().is_err());
}

/// Two hosts' lease stores sharing one table of claims (what etcd is to a cluster),
/// which can be made unreachable.
#[derive(Clone, Default)]
struct SharedClaims {
    local: MemoryLeaseStore,
    claims: Arc<std::sync::Mutex<HashMap<Ipv4Addr, (Mac, u64)>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    now: Arc<std::sync::atomic::AtomicU64>,
}

impl LeaseStore for SharedClaims {
    fn load(&self) -> Result<Vec<Lease>, crate::StoreError> {
        self.local.load()
    }
    fn save(&mut self, lease: &Lease) -> Result<(), crate::StoreError> {
        self.local.save(lease)
    }
    fn remove(&mut self, mac: Mac) -> Result<(), crate::StoreError> {
        self.local.remove(mac)
    }
    fn load6(&self) -> Result<Vec<Lease6>, crate::StoreError> {
        self.local.load6()
    }
    fn save6(&mut self, lease: &Lease6) -> Result<(), crate::StoreError> {
        self.local.save6(lease)
    }
    fn remove6(&mut self, mac: Mac) -> Result<(), crate::StoreError> {
        self.local.remove6(mac)
    }
    fn claim(&mut self, ip: Ipv4Addr, mac: Mac, expires: u64) -> Claimed {
        if self.down.load(std::sync::atomic::Ordering::Relaxed) {
            return Claimed::Unavailable;
        }
        let now = self.now.load(std::sync::atomic::Ordering::Relaxed);
        let mut claims = self.claims.lock().unwrap();
        match claims.get(&ip) {
            Some((holder, until)) if *holder != mac && *until > now => Claimed::Taken,
            _ => {
                claims.insert(ip, (mac, expires));
                Claimed::Granted
            }
        }
    }
}

fn host(claims: &SharedClaims) -> DhcpServer {
    let mut cfg = GatewayConfig::new("t", "10.9.0.0/29".parse().unwrap()); // hosts .1-.6
    cfg.lease_time = Duration::from_secs(600);
    let store = SharedClaims {
        local: MemoryLeaseStore::default(),
        ..claims.clone()
    };
    DhcpServer::new(Arc::new(cfg), Arc::new(GatewayCounters::default()), Box::new(store))
}

fn count(s: &DhcpServer, c: fn(&GatewayCounters) -> &std::sync::atomic::AtomicU64) -> u64 {
    c(&s.counters).load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn hosts_sharing_a_network_never_offer_or_bind_one_address_twice() {
    let claims = SharedClaims::default();
    claims.now.store(100, std::sync::atomic::Ordering::Relaxed);
    let (mut a, mut b) = (host(&claims), host(&claims));
    // Both hosts would pick the first free address; the second host's pick was
    // claimed by the first, so it offers the next one.
    let offer_a = decode(
        &a.handle_unbound(&msg(1, MessageType::Discover, vec![], Z), 100)
            .0
            .unwrap(),
    )
    .yiaddr();
    let offer_b = decode(
        &b.handle_unbound(&msg(2, MessageType::Discover, vec![], Z), 100)
            .0
            .unwrap(),
    )
    .yiaddr();
    assert_ne!(offer_a, offer_b);
    assert_eq!(count(&b, |c| &c.dhcp_claimed_elsewhere), 1);
    // A guest on host b asking for host a's address by INIT-REBOOT is refused.
    let (nak, _) = b.handle_unbound(
        &msg(
            3,
            MessageType::Request,
            vec![DhcpOption::RequestedIpAddress(offer_a)],
            Z,
        ),
        100,
    );
    assert_eq!(decode(&nak.unwrap()).opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(bind(&mut a, 1, 100), offer_a);

    // The shared store unreachable: a new guest gets nothing (and asks again)...
    claims.down.store(true, std::sync::atomic::Ordering::Relaxed);
    let (nothing, _) = b.handle_unbound(&msg(4, MessageType::Discover, vec![], Z), 101);
    assert!(nothing.is_none());
    assert_eq!(count(&b, |c| &c.dhcp_store_unavailable), 1);
    // ...while a bound guest renews from the host's own leases.
    let renew = msg(1, MessageType::Request, vec![], offer_a);
    let (ack, _) = a.handle_unbound(&renew, 102);
    assert_eq!(decode(&ack.unwrap()).opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(count(&a, |c| &c.dhcp_store_unavailable), 0);

    // Back: a claim run out (host b's offer, never taken) is free for others again,
    // while guest 1's renewed lease still holds its address.
    claims.down.store(false, std::sync::atomic::Ordering::Relaxed);
    claims.now.store(500, std::sync::atomic::Ordering::Relaxed);
    let again = decode(
        &a.handle_unbound(&msg(5, MessageType::Discover, vec![], Z), 500)
            .0
            .unwrap(),
    )
    .yiaddr();
    assert_eq!(again, offer_b, "host b's stale offer gave way");
}

//! The gateway as its network's IPv6 router on the link (Neighbor Discovery, RFC 4861):
//! it advertises the network's /64 for stateless autoconfiguration (RFC 4862) with the
//! MTU and its DNS server and search list (RFC 8106), when asked and every few
//! minutes; it answers Neighbour Solicitations for its own addresses (its link-local
//! one and the prefix's `::1`) and the host-access address (`::2`, when on), and pings
//! to its own.
//!
//! It is the guests' default router: IPv6 off the prefix is re-originated from host
//! sockets like IPv4 (TCP, UDP, ICMPv6 echo; see `dispatch::routed_out6`). Its router
//! lifetime is three advertisement intervals, so a guest forgets a gateway that went
//! away within that.

use std::net::Ipv6Addr;

use fabric::Mac;
use smoltcp::time::Duration;
use smoltcp::wire::{
    EthernetAddress, Icmpv6Repr, NdiscNeighborFlags, NdiscPrefixInfoFlags, NdiscPrefixInformation, NdiscRepr,
    NdiscRouterFlags,
};

use crate::counters::GatewayCounters;
use crate::wire::{self, Icmp6, Icmp6Message};
use crate::GatewayConfig;

/// All nodes on the link (RFC 4291): where unsolicited advertisements go.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// How long a formed address stays valid and preferred without a new advertisement
/// (radvd's defaults); advertisements come far more often.
const VALID_LIFETIME: Duration = Duration::from_secs(86_400);
const PREFERRED_LIFETIME: Duration = Duration::from_secs(14_400);

/// The answer to an ICMPv6 message, if the gateway gives one.
pub fn answer(cfg: &GatewayConfig, c: &GatewayCounters, m: &Icmp6<'_>) -> Option<Vec<u8>> {
    cfg.ipv6?;
    match m.message {
        Icmp6Message::EchoRequest { ident, seq_no, data } if cfg.is_gateway_ip6(m.dst_ip) => {
            GatewayCounters::inc(&c.icmp_echo_replies);
            let reply = Icmpv6Repr::EchoReply { ident, seq_no, data };
            Some(wire::icmp6_frame(
                cfg.gateway_mac,
                m.src_mac,
                m.dst_ip,
                m.src_ip,
                &reply,
            ))
        }
        // Neighbour Discovery from beyond the link (hop limit below 255) is forged.
        _ if m.hop_limit != 255 => None,
        Icmp6Message::RouterSolicit => {
            // A solicitor with an address is answered directly (RFC 4861 allows it),
            // one still without one through all nodes.
            let to = if m.src_ip.is_unspecified() {
                (wire::ipv6_multicast_mac(ALL_NODES), ALL_NODES)
            } else {
                (m.src_mac, m.src_ip)
            };
            Some(router_advert(cfg, c, to))
        }
        Icmp6Message::NeighbourSolicit { target, lladdr }
            if cfg.is_gateway_ip6(target) || cfg.host_access6() == Some(target) =>
        {
            GatewayCounters::inc(&c.neighbour_adverts);
            // The host-access address is the gateway's to answer for, but no router's.
            let flags = if cfg.is_gateway_ip6(target) {
                NdiscNeighborFlags::ROUTER | NdiscNeighborFlags::OVERRIDE
            } else {
                NdiscNeighborFlags::OVERRIDE
            };
            let na = |flags| {
                Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                    flags,
                    target_addr: target,
                    lladdr: Some(EthernetAddress(cfg.gateway_mac.0).into()),
                })
            };
            if m.src_ip.is_unspecified() {
                // Someone's duplicate address detection tries the gateway's address: it
                // is told to all nodes that the address is taken (RFC 4861 7.2.4).
                let to = wire::ipv6_multicast_mac(ALL_NODES);
                return Some(wire::icmp6_frame(cfg.gateway_mac, to, target, ALL_NODES, &na(flags)));
            }
            let to_mac = lladdr.unwrap_or(m.src_mac);
            let repr = na(flags | NdiscNeighborFlags::SOLICITED);
            Some(wire::icmp6_frame(cfg.gateway_mac, to_mac, target, m.src_ip, &repr))
        }
        _ => None,
    }
}

/// A Neighbour Solicitation for a guest's `target` address (to its solicited-node
/// group, RFC 4291), from the gateway's global address: how a forward finds the MAC of
/// a guest it has not heard from on that address.
pub fn neighbour_solicit(cfg: &GatewayConfig, target: Ipv6Addr) -> Option<Vec<u8>> {
    let from = cfg.gateway_ip6()?;
    let group = wire::solicited_node(target);
    let repr = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: target,
        lladdr: Some(EthernetAddress(cfg.gateway_mac.0).into()),
    });
    Some(wire::icmp6_frame(
        cfg.gateway_mac,
        wire::ipv6_multicast_mac(group),
        from,
        group,
        &repr,
    ))
}

/// A Router Advertisement of the network's prefix and MTU, from the router's link-local
/// address (only a link-local source is believed; the gateway's own, or in kernel mode
/// the bridge's, for which the gateway speaks) to `to`.
pub fn router_advert(cfg: &GatewayConfig, c: &GatewayCounters, to: (Mac, Ipv6Addr)) -> Vec<u8> {
    GatewayCounters::inc(&c.router_adverts);
    let prefix_info = cfg.ipv6.map(|p| NdiscPrefixInformation {
        prefix_len: p.prefix_len(),
        flags: NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF,
        valid_lifetime: VALID_LIFETIME,
        preferred_lifetime: PREFERRED_LIFETIME,
        prefix: p.network(),
    });
    let repr = Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
        hop_limit: 64,
        flags: NdiscRouterFlags::empty(),
        router_lifetime: Duration::from_secs(advert_lifetime(cfg).into()),
        reachable_time: Duration::ZERO,
        retrans_time: Duration::ZERO,
        lladdr: Some(EthernetAddress(cfg.router6_mac().0).into()),
        mtu: Some(u32::from(cfg.mtu)),
        prefix_info,
    });
    let dns = dns_options(cfg);
    wire::icmp6_frame_with(cfg.gateway_mac, to.0, cfg.router_link_local(), to.1, &repr, &dns)
}

/// How long what an advertisement says holds without another: three intervals (RFC
/// 8106 asks so of DNS options); a router lifetime of at most 9000 s (RFC 4861).
fn advert_lifetime(cfg: &GatewayConfig) -> u32 {
    u32::try_from(cfg.router_advert_interval.as_secs() * 3)
        .unwrap_or(u32::MAX)
        .clamp(1, 9000)
}

/// The RDNSS and DNSSL options (RFC 8106): the gateway's global address as the DNS
/// server, the network's search list. By hand: smoltcp models neither. Their lifetime
/// is three advertisement intervals, as the RFC asks.
fn dns_options(cfg: &GatewayConfig) -> Vec<u8> {
    const RDNSS: u8 = 25;
    const DNSSL: u8 = 31;
    let Some(server) = cfg.gateway_ip6() else {
        return vec![];
    };
    let lifetime = advert_lifetime(cfg);
    let mut out = vec![RDNSS, 3, 0, 0];
    out.extend(lifetime.to_be_bytes());
    out.extend(server.octets());
    // Each domain in DNS wire form (length-prefixed labels, a zero to end), the whole
    // padded with zeros to 8-byte units. The config checked the names.
    let mut names = Vec::new();
    for domain in &cfg.search {
        for label in domain.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
            names.push(label.len().min(63) as u8);
            names.extend(label.bytes().take(63));
        }
        names.push(0);
    }
    if !names.is_empty() {
        let len = (8 + names.len()).div_ceil(8) * 8;
        if let Ok(units) = u8::try_from(len / 8) {
            out.extend([DNSSL, units, 0, 0]);
            out.extend(lifetime.to_be_bytes());
            out.extend(&names);
            out.resize(out.len() + len - 8 - names.len(), 0);
        }
    }
    out
}

/// The advertisement sent unasked, to all nodes.
pub fn unsolicited_advert(cfg: &GatewayConfig, c: &GatewayCounters) -> Option<Vec<u8>> {
    cfg.ipv6?;
    Some(router_advert(cfg, c, (wire::ipv6_multicast_mac(ALL_NODES), ALL_NODES)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{EthernetFrame, Icmpv6Packet, Ipv6Packet};

    const GUEST: Mac = Mac([0x02, 0, 0, 0, 0, 0x10]);

    fn cfg() -> GatewayConfig {
        GatewayConfig::dual_stack_for_tests()
    }

    /// A guest's ICMPv6 message as the gateway classifies it.
    fn from_guest(src: Ipv6Addr, dst: Ipv6Addr, dst_mac: Mac, repr: &Icmpv6Repr<'_>) -> Vec<u8> {
        wire::icmp6_frame(GUEST, dst_mac, src, dst, repr)
    }

    fn answer_to(cfg: &GatewayConfig, frame: &[u8]) -> Option<Vec<u8>> {
        match wire::classify(frame).unwrap() {
            wire::Inbound::Icmp6(m) => answer(cfg, &GatewayCounters::default(), &m),
            other => panic!("{other:?}"),
        }
    }

    /// The reply's addresses and its ICMPv6 message, its checksum verified.
    fn read(frame: &[u8]) -> (Mac, Ipv6Addr, Ipv6Addr, u8, Icmpv6Repr<'_>) {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        let ip = Ipv6Packet::new_checked(&frame[14..]).unwrap();
        let (src, dst, hop) = (ip.src_addr(), ip.dst_addr(), ip.hop_limit());
        let icmp = Icmpv6Packet::new_checked(&frame[54..]).unwrap();
        assert!(icmp.verify_checksum(&src, &dst));
        let repr = Icmpv6Repr::parse(&src, &dst, &icmp, &ChecksumCapabilities::default()).unwrap();
        (Mac(eth.dst_addr().0), src, dst, hop, repr)
    }

    #[test]
    fn a_router_solicitation_gets_the_prefix_the_mtu_and_a_default_route() {
        let cfg = cfg();
        let guest_ll: Ipv6Addr = "fe80::10".parse().unwrap();
        let rs = Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr: None });
        let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
        let frame = from_guest(guest_ll, all_routers, wire::ipv6_multicast_mac(all_routers), &rs);
        let reply = answer_to(&cfg, &frame).expect("an advertisement");
        let (to_mac, src, dst, hop, repr) = read(&reply);
        assert_eq!((to_mac, dst), (GUEST, guest_ll), "answered directly");
        assert_eq!(src, cfg.gateway_link_local());
        assert_eq!(hop, 255);
        let Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
            router_lifetime,
            mtu,
            prefix_info: Some(p),
            lladdr,
            ..
        }) = repr
        else {
            panic!("{repr:?}");
        };
        assert_eq!(router_lifetime, Duration::from_secs(600), "three intervals of 200 s");
        assert_eq!(mtu, Some(1500));
        assert_eq!((p.prefix, p.prefix_len), ("fd00:9::".parse().unwrap(), 64));
        assert!(p
            .flags
            .contains(NdiscPrefixInfoFlags::ADDRCONF | NdiscPrefixInfoFlags::ON_LINK));
        assert_eq!(lladdr.unwrap().as_bytes(), &cfg.gateway_mac.0);
        // RDNSS: the gateway's global address; DNSSL: the search list, in wire form.
        let body = &reply[54..];
        let rdnss = body.windows(2).position(|w| w == [25, 3]).expect("an RDNSS option");
        assert_eq!(&body[rdnss + 8..rdnss + 24], &cfg.gateway_ip6().unwrap().octets());
        assert!(
            body.windows(13).any(|w| w == b"\x02vm\x08internal\x00"),
            "a DNSSL option"
        );
        assert_eq!(body.len() % 8, 0, "options fill whole 8-byte units");

        // One without an address yet hears it through all nodes.
        let frame = from_guest(
            Ipv6Addr::UNSPECIFIED,
            all_routers,
            wire::ipv6_multicast_mac(all_routers),
            &rs,
        );
        let reply = answer_to(&cfg, &frame).unwrap();
        let (to_mac, _, dst, _, _) = read(&reply);
        assert_eq!((to_mac, dst), (Mac([0x33, 0x33, 0, 0, 0, 1]), ALL_NODES));
    }

    #[test]
    fn with_another_router_the_advertisement_names_it_and_the_gateway_moves_to_2() {
        let mut cfg = cfg();
        let bridge = Mac([0x02, 0xbb, 0, 0, 0, 1]);
        cfg.router6 = Some(bridge);
        let rs = Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr: None });
        let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
        let frame = from_guest(
            "fe80::10".parse().unwrap(),
            all_routers,
            wire::ipv6_multicast_mac(all_routers),
            &rs,
        );
        let reply = answer_to(&cfg, &frame).expect("an advertisement");
        let (_, src, _, _, repr) = read(&reply);
        assert_eq!(
            src,
            "fe80::bb:ff:fe00:1".parse::<Ipv6Addr>().unwrap(),
            "the bridge's link-local"
        );
        let Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
            lladdr,
            router_lifetime,
            ..
        }) = repr
        else {
            panic!("{repr:?}");
        };
        assert_eq!(lladdr.unwrap().as_bytes(), &bridge.0);
        assert!(router_lifetime > Duration::ZERO);
        assert_eq!(cfg.gateway_ip6(), Some("fd00:9::2".parse().unwrap()));
        assert_eq!(cfg.router_ip6(), Some("fd00:9::1".parse().unwrap()));
        // The DNS server it names is the gateway, at ::2.
        let body = &reply[54..];
        let rdnss = body.windows(2).position(|w| w == [25, 3]).expect("an RDNSS option");
        assert_eq!(&body[rdnss + 8..rdnss + 24], &cfg.gateway_ip6().unwrap().octets());
        // The gateway answers for ::2 and its own link-local, not for the router's ::1.
        assert!(cfg.is_gateway_ip6("fd00:9::2".parse().unwrap()));
        assert!(!cfg.is_gateway_ip6("fd00:9::1".parse().unwrap()));
    }

    #[test]
    fn neighbour_solicitations_for_the_gateway_are_answered_and_others_are_not() {
        let cfg = cfg();
        let guest: Ipv6Addr = "fd00:9::10".parse().unwrap();
        for target in [cfg.gateway_ip6().unwrap(), cfg.gateway_link_local()] {
            let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
                target_addr: target,
                lladdr: Some(EthernetAddress(GUEST.0).into()),
            });
            let reply = answer_to(&cfg, &from_guest(guest, target, cfg.gateway_mac, &ns)).unwrap();
            let (to_mac, src, dst, _, repr) = read(&reply);
            assert_eq!((to_mac, src, dst), (GUEST, target, guest));
            let Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                flags,
                target_addr,
                lladdr,
            }) = repr
            else {
                panic!("{repr:?}");
            };
            assert_eq!(target_addr, target);
            assert!(flags.contains(NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::ROUTER));
            assert_eq!(lladdr.unwrap().as_bytes(), &cfg.gateway_mac.0);
        }
        // Another guest's address is that guest's to answer.
        let other: Ipv6Addr = "fd00:9::11".parse().unwrap();
        let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr: other,
            lladdr: None,
        });
        assert!(answer_to(&cfg, &from_guest(guest, other, Mac::BROADCAST, &ns)).is_none());
        // Duplicate address detection of the gateway's address: defended to all nodes.
        let gw = cfg.gateway_ip6().unwrap();
        let dad = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr: gw,
            lladdr: None,
        });
        let reply = answer_to(&cfg, &from_guest(Ipv6Addr::UNSPECIFIED, gw, Mac::BROADCAST, &dad)).unwrap();
        let (_, _, dst, _, _) = read(&reply);
        assert_eq!(dst, ALL_NODES);
    }

    #[test]
    fn pings_to_the_gateway_are_answered_and_forged_discovery_or_no_ipv6_is_not() {
        let cfg = cfg();
        let guest: Ipv6Addr = "fd00:9::10".parse().unwrap();
        let gw = cfg.gateway_ip6().unwrap();
        let ping = Icmpv6Repr::EchoRequest {
            ident: 7,
            seq_no: 3,
            data: b"abc",
        };
        let reply = answer_to(&cfg, &from_guest(guest, gw, cfg.gateway_mac, &ping)).unwrap();
        let (_, src, dst, _, repr) = read(&reply);
        assert_eq!((src, dst), (gw, guest));
        assert!(matches!(
            repr,
            Icmpv6Repr::EchoReply {
                ident: 7,
                seq_no: 3,
                data: b"abc"
            }
        ));

        // A solicitation that crossed a router (hop limit below 255) is ignored.
        let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr: gw,
            lladdr: None,
        });
        let mut forged = from_guest(guest, gw, cfg.gateway_mac, &ns);
        forged[14 + 7] = 254;
        assert!(answer_to(&cfg, &forged).is_none());

        // Without IPv6 the gateway stays silent.
        let v4_only = GatewayConfig::new("t", "10.9.0.0/24".parse().unwrap());
        assert!(answer_to(&v4_only, &from_guest(guest, gw, cfg.gateway_mac, &ping)).is_none());
        assert!(unsolicited_advert(&v4_only, &GatewayCounters::default()).is_none());
    }
}

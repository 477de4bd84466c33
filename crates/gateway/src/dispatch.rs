//! Where a frame from the network goes. [`route`] is the one decision: it takes a
//! classified frame and names its service with what that service needs; [`deliver`]
//! hands it over. ARP and ICMP echo are answered here; DHCP, DNS (UDP and TCP), NAT
//! (UDP, ICMP, TCP) and forwards' return traffic go to their services; everything else
//! is counted and dropped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use smoltcp::wire::ArpOperation;

use fabric::offload::Offload;

use crate::dns::Decision;
use crate::wire::{Inbound, Origin, TcpHead};
use crate::*;

/// A UDP datagram or ICMP echo, as its service takes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Datagram<'a> {
    pub src_mac: Mac,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: &'a [u8],
    pub origin: Origin,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Echo<'a> {
    pub src_mac: Mac,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub ident: u16,
    pub seq_no: u16,
    pub data: &'a [u8],
    pub origin: Origin,
}

/// Where a classified frame goes, and what it carries there.
#[derive(Debug)]
pub(crate) enum Route<'a> {
    /// Answered here when it asks for an address the gateway holds; about the gateway,
    /// it also teaches both TCP stacks (smoltcp learns neighbours only from ARP).
    Arp {
        op: ArpOperation,
        sender_mac: Mac,
        sender_ip: Ipv4Addr,
        target_ip: Ipv4Addr,
        teaches_tcp: bool,
    },
    /// A ping to the gateway.
    Echo(Echo<'a>),
    /// ICMPv6 for the gateway: Neighbor Discovery and pings (see `ndp`).
    Icmp6(wire::Icmp6<'a>),
    Dhcp {
        src_mac: Mac,
        payload: &'a [u8],
    },
    /// A DNS query to one of the gateway's addresses, of either IP version.
    Dns(Datagram<'a>),
    /// A DHCPv6 client message (from port 546 to 547).
    Dhcp6 {
        src_mac: Mac,
        src: std::net::SocketAddrV6,
        payload: &'a [u8],
    },
    /// TCP to the gateway's own address: its DNS-over-TCP stack (which refuses other
    /// ports).
    GatewayTcp,
    /// TCP routed through the gateway, or a forward's connection to a guest.
    TcpNat(TcpHead),
    /// A ping routed through the gateway: re-sent from the host.
    IcmpNat(Echo<'a>),
    /// A guest answering a forwarded UDP client (to the gateway's address).
    ForwardReply(Datagram<'a>),
    /// Routed through the gateway (addressed to its MAC), bound elsewhere: egress.
    UdpNat(Datagram<'a>),
    /// IPv6 to beyond the link from a link-local address, which no router forwards:
    /// answered so (a guest whose global address is still tentative sends so).
    BeyondScope(Origin),
    Nowhere,
}

impl Route<'_> {
    /// The service that runs it, to name it when its handler panics.
    pub(crate) fn service(&self) -> contain::Service {
        use contain::Service;
        match self {
            Route::Arp { .. } => Service::Arp,
            Route::Echo(_) | Route::Icmp6(_) => Service::Icmp,
            Route::Dhcp { .. } | Route::Dhcp6 { .. } => Service::Dhcp,
            Route::Dns(_) => Service::Dns,
            Route::GatewayTcp => Service::DnsTcp,
            Route::TcpNat(_) => Service::TcpNat,
            Route::IcmpNat(_) => Service::IcmpNat,
            Route::ForwardReply(_) | Route::UdpNat(_) => Service::UdpNat,
            Route::BeyondScope(_) => Service::Icmp,
            Route::Nowhere => Service::Frame,
        }
    }
}

/// The one decision of where a frame goes. `nat_knows` says whether the TCP NAT has a
/// flow for a (guest, peer) pair: a forward's connections use the gateway's address.
pub(crate) fn route<'a>(
    cfg: &GatewayConfig,
    inbound: Inbound<'a>,
    nat_knows: impl FnOnce(&tcp_nat::FlowKey) -> bool,
) -> Route<'a> {
    match inbound {
        Inbound::Arp {
            op,
            sender_mac,
            sender_ip,
            target_ip,
        } => Route::Arp {
            op,
            sender_mac,
            sender_ip,
            target_ip,
            teaches_tcp: cfg.is_gateway_ip(target_ip) && sender_ip != target_ip,
        },
        Inbound::IcmpEcho {
            src_mac,
            dst_mac,
            src_ip,
            dst_ip,
            ident,
            seq_no,
            data,
            origin,
        } => {
            let echo = Echo {
                src_mac,
                src_ip: src_ip.into(),
                dst_ip: dst_ip.into(),
                ident,
                seq_no,
                data,
                origin,
            };
            if cfg.is_gateway_ip(dst_ip) {
                Route::Echo(echo)
            } else if dst_mac == cfg.gateway_mac && routed_out(cfg, src_ip, dst_ip) {
                Route::IcmpNat(echo)
            } else {
                Route::Nowhere
            }
        }
        Inbound::Udp {
            src_mac,
            dst_mac,
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            payload,
            origin,
        } => {
            let d = Datagram {
                src_mac,
                src: SocketAddrV4::new(src_ip, src_port).into(),
                dst: SocketAddrV4::new(dst_ip, dst_port).into(),
                payload,
                origin,
            };
            match (src_port, dst_port) {
                (68, 67) if dst_ip == Ipv4Addr::BROADCAST || cfg.is_gateway_ip(dst_ip) => {
                    Route::Dhcp { src_mac, payload }
                }
                (_, 53) if cfg.is_gateway_ip(dst_ip) => Route::Dns(d),
                _ if dst_ip == cfg.gateway_ip => Route::ForwardReply(d),
                _ if dst_mac == cfg.gateway_mac && routed_out(cfg, src_ip, dst_ip) => Route::UdpNat(d),
                _ => Route::Nowhere,
            }
        }
        Inbound::Tcp(head) => {
            let (to_gateway, leaves, out_of_scope) = match (head.src.ip(), head.dst.ip()) {
                (IpAddr::V4(src), IpAddr::V4(dst)) => (cfg.is_gateway_ip(dst), routed_out(cfg, src, dst), false),
                (IpAddr::V6(src), IpAddr::V6(dst)) => (
                    cfg.is_gateway_ip6(dst),
                    routed_out6(cfg, src, dst),
                    beyond_scope(cfg, src, dst),
                ),
                _ => (false, false, false),
            };
            let forwarded = to_gateway
                && nat_knows(&tcp_nat::FlowKey {
                    guest: head.src,
                    peer: head.dst,
                });
            if to_gateway && !forwarded {
                Route::GatewayTcp
            } else if head.dst_mac == cfg.gateway_mac && (forwarded || leaves) {
                Route::TcpNat(head)
            } else if head.dst_mac == cfg.gateway_mac && out_of_scope {
                Route::BeyondScope(head.origin)
            } else {
                Route::Nowhere
            }
        }
        Inbound::Icmp6(m) if cfg.ipv6.is_some() => match m.message {
            wire::Icmp6Message::EchoRequest { .. }
                if m.dst_mac == cfg.gateway_mac && beyond_scope(cfg, m.src_ip, m.dst_ip) =>
            {
                Route::BeyondScope(m.origin)
            }
            wire::Icmp6Message::EchoRequest { ident, seq_no, data }
                if m.dst_mac == cfg.gateway_mac && routed_out6(cfg, m.src_ip, m.dst_ip) =>
            {
                Route::IcmpNat(Echo {
                    src_mac: m.src_mac,
                    src_ip: m.src_ip.into(),
                    dst_ip: m.dst_ip.into(),
                    ident,
                    seq_no,
                    data,
                    origin: m.origin,
                })
            }
            _ => Route::Icmp6(m),
        },
        Inbound::Udp6 {
            src_mac,
            src,
            dst,
            payload,
            ..
        } if (src.port(), dst.port()) == (546, 547)
            && cfg.ipv6.is_some()
            && (*dst.ip() == crate::dhcp6::ALL_SERVERS || cfg.is_gateway_ip6(*dst.ip())) =>
        {
            Route::Dhcp6 { src_mac, src, payload }
        }
        Inbound::Udp6 {
            src_mac,
            dst_mac,
            src,
            dst,
            payload,
            origin,
        } => {
            let d = Datagram {
                src_mac,
                src: src.into(),
                dst: dst.into(),
                payload,
                origin,
            };
            if dst.port() == 53 && cfg.is_gateway_ip6(*dst.ip()) {
                Route::Dns(d)
            } else if Some(*dst.ip()) == cfg.gateway_ip6() {
                Route::ForwardReply(d)
            } else if dst_mac == cfg.gateway_mac && routed_out6(cfg, *src.ip(), *dst.ip()) {
                Route::UdpNat(d)
            } else if dst_mac == cfg.gateway_mac && beyond_scope(cfg, *src.ip(), *dst.ip()) {
                Route::BeyondScope(origin)
            } else {
                Route::Nowhere
            }
        }
        Inbound::Icmp6(_) | Inbound::Ignored => Route::Nowhere,
    }
}

/// Answers one frame; returns the frames to send back now, and whether the DNS TCP
/// stack got the frame and needs a run. Forwarded DNS queries are answered by their
/// own task. Each step runs contained (see `contain`): a panic drops this frame only.
///
/// A frame as offloaded as its guest sent it (a checksum left partial, a TCP segment of
/// up to 64 KiB: the gateway's port takes them) goes whole only to the TCP splice,
/// which writes its payload to a host socket in one piece and needs no checksum of
/// data that never left this machine; for anything else it is completed (cut and
/// checksummed) here first, as the switch would for a port without offloads.
pub(crate) fn handle_frame(
    shared: &Arc<Shared>,
    sock: &Arc<crate::port::GatewayPort>,
    frame: &[u8],
    offload: &Offload,
) -> (Vec<Vec<u8>>, bool) {
    use contain::{contained, Service};
    let checksum_left = !offload.is_plain();
    // Classifying checks UDP and ICMP checksums: only TCP may stay offloaded that far.
    if checksum_left && !(offload.is_tcp() && shared.splice.is_some()) {
        return handle_completed(shared, sock, frame, offload);
    }
    let classified = contained(&shared.panics, Service::Frame, frame, || {
        let inbound = wire::classify(frame)?;
        if let Some((ip, mac)) = inbound.sender() {
            shared.ctx.neighbours.saw(ip, mac);
        }
        Ok::<_, wire::WireError>(route(&shared.ctx.cfg(), inbound, |key| match &shared.splice {
            Some(s) => s.knows(key),
            None => shared.tcp.nat.lock().unwrap_or_else(|p| p.into_inner()).knows(key),
        }))
    });
    let route = match classified {
        Some(Ok(r)) => r,
        Some(Err(_)) => {
            GatewayCounters::inc(&shared.ctx.counters.malformed_frames);
            return (vec![], false);
        }
        None => return (vec![], false),
    };
    if checksum_left && !matches!(route, Route::TcpNat(_)) {
        return handle_completed(shared, sock, frame, offload);
    }
    contained(&shared.panics, route.service(), frame, || {
        #[cfg(test)]
        crate::tests::panic_if_marked(frame, crate::tests::HANDLER_MARK);
        deliver(shared, sock, frame, route, checksum_left)
    })
    .unwrap_or_default()
}

/// An offloaded frame for a service that reads complete frames: cut and checksummed
/// in software, each piece handled as a plain frame.
fn handle_completed(
    shared: &Arc<Shared>,
    sock: &Arc<crate::port::GatewayPort>,
    frame: &[u8],
    offload: &Offload,
) -> (Vec<Vec<u8>>, bool) {
    let mut soft = fabric::offload::SoftFrames::default();
    if soft.push(frame, offload).is_err() {
        GatewayCounters::inc(&shared.ctx.counters.malformed_frames);
        return (vec![], false);
    }
    let mut replies = Vec::new();
    let mut touched = false;
    for piece in soft.frames() {
        let (r, t) = handle_frame(shared, sock, piece, &Offload::default());
        replies.extend(r);
        touched |= t;
    }
    (replies, touched)
}

/// Hands a routed frame to its service.
fn deliver(
    shared: &Arc<Shared>,
    sock: &Arc<crate::port::GatewayPort>,
    frame: &[u8],
    route: Route<'_>,
    checksum_left: bool,
) -> (Vec<Vec<u8>>, bool) {
    let cfg = &shared.ctx.cfg();
    let c = &shared.ctx.counters;
    let replies = match route {
        Route::Arp {
            op,
            sender_mac,
            sender_ip,
            target_ip,
            teaches_tcp,
        } => {
            if teaches_tcp {
                shared.state().tcp.input(frame);
                shared.tcp.nat.lock().unwrap_or_else(|p| p.into_inner()).input(frame);
            }
            let reply = arp(cfg, c, op, sender_mac, sender_ip, target_ip);
            return (reply.into_iter().collect(), teaches_tcp);
        }
        Route::Echo(e) => match (e.dst_ip, e.src_ip) {
            (IpAddr::V4(from), IpAddr::V4(to)) => {
                GatewayCounters::inc(&c.icmp_echo_replies);
                vec![wire::icmp_echo_reply(
                    cfg.gateway_mac,
                    e.src_mac,
                    from,
                    to,
                    e.ident,
                    e.seq_no,
                    e.data,
                )]
            }
            // Pings to the gateway's IPv6 addresses are Neighbor Discovery's (`ndp`).
            _ => vec![],
        },
        Route::Icmp6(m) => {
            // Neighbour Discovery about the gateway teaches the DNS-over-TCP stack
            // whom it talks to, as ARP does over IPv4.
            let teaches = match m.message {
                wire::Icmp6Message::NeighbourSolicit { target, .. } => cfg.is_gateway_ip6(target),
                wire::Icmp6Message::NeighbourAdvert { .. } => cfg.is_gateway_ip6(m.dst_ip),
                _ => false,
            };
            if teaches {
                shared.state().tcp.input(frame);
            }
            let reply = crate::ndp::answer(cfg, c, &m);
            return (reply.into_iter().collect(), teaches);
        }
        Route::Dhcp { src_mac, payload } => {
            let (reply, event) = shared.state().dhcp.handle(payload, src_mac, unix_now());
            if let Some(ev) = event {
                shared.emit(ev);
            }
            reply
                .map(|r| {
                    wire::udp_frame(
                        cfg.gateway_mac,
                        r.dst_mac,
                        (cfg.gateway_ip, 67),
                        (r.dst_ip, 68),
                        &r.bytes,
                    )
                })
                .into_iter()
                .collect()
        }
        Route::Dns(d) => dns_query(shared, sock, d.src_mac, d.src, d.dst, d.payload),
        Route::Dhcp6 { src_mac, src, payload } => {
            let reply = shared.state().dhcp.handle6(payload, src_mac, unix_now());
            shared.emit_dhcp6();
            let server = std::net::SocketAddrV6::new(cfg.gateway_link_local(), 547, 0, 0);
            reply
                .map(|r| wire::udp6_frame(cfg.gateway_mac, src_mac, server, src, &r))
                .into_iter()
                .collect()
        }
        Route::GatewayTcp => {
            shared.state().tcp.input(frame);
            return (vec![], true);
        }
        Route::TcpNat(head) => match &shared.splice {
            Some(s) => crate::tcp_splice::inbound(s, frame, head, checksum_left),
            None => tcp_nat::inbound(&shared.tcp, sock, frame, head),
        },
        Route::IcmpNat(e) => {
            let key = icmp_nat::FlowKey {
                guest: e.src_ip,
                ident: e.ident,
                dst: e.dst_ip,
            };
            icmp_nat::outbound(&shared.icmp, sock, &e.origin, key, e.seq_no, e.data)
                .into_iter()
                .collect()
        }
        Route::ForwardReply(d) => {
            forward::reply(&shared.forwards, d.dst.port(), d.src.ip(), d.payload);
            vec![]
        }
        Route::UdpNat(d) => {
            let key = udp_nat::FlowKey {
                guest: d.src,
                dst: d.dst,
            };
            udp_nat::outbound(&shared.udp, sock, &d.origin, key, d.payload)
                .into_iter()
                .collect()
        }
        Route::BeyondScope(origin) => vec![shared.ctx.unreachable(&origin, wire::Unreachable::BeyondScope)],
        Route::Nowhere => vec![],
    };
    (replies, false)
}

/// ARP: a gratuitous one is counted (and a claim on a gateway address warned about);
/// a request for an address the gateway answers for gets its reply.
fn arp(
    cfg: &GatewayConfig,
    c: &GatewayCounters,
    op: ArpOperation,
    sender_mac: Mac,
    sender_ip: Ipv4Addr,
    target_ip: Ipv4Addr,
) -> Option<Vec<u8>> {
    if sender_ip == target_ip {
        GatewayCounters::inc(&c.arp_gratuitous);
        if cfg.is_gateway_ip(sender_ip) && sender_mac != cfg.gateway_mac {
            GatewayCounters::inc(&c.arp_conflicts);
            tracing::warn!(%sender_mac, ip = %sender_ip, "a host claims a gateway address");
        }
        return None;
    }
    if op == ArpOperation::Request && cfg.answers_for(target_ip) {
        GatewayCounters::inc(&c.arp_replies);
        return Some(wire::arp_reply(cfg.gateway_mac, target_ip, sender_mac, sender_ip));
    }
    None
}

/// A DNS query over UDP (to a gateway address of either IP version, `server`):
/// answered from the zone, or forwarded upstream by its own task.
fn dns_query(
    shared: &Arc<Shared>,
    sock: &Arc<crate::port::GatewayPort>,
    client_mac: Mac,
    client: std::net::SocketAddr,
    server: std::net::SocketAddr,
    query: &[u8],
) -> Vec<Vec<u8>> {
    let cfg = &shared.ctx.cfg();
    let c = &shared.ctx.counters;
    match dns::decide(&shared.state().zone, query) {
        Err(dns::Malformed) => {
            GatewayCounters::inc(&c.dns_malformed);
            vec![]
        }
        Ok(Decision::Answer { bytes, nxdomain }) => {
            GatewayCounters::inc(if nxdomain { &c.dns_nxdomain } else { &c.dns_local });
            wire::udp_frame_to(cfg.gateway_mac, client_mac, server, client, &bytes)
                .into_iter()
                .collect()
        }
        Ok(Decision::Forward { qname }) => {
            let to = ReplyTo::Udp {
                client_mac,
                client,
                server,
            };
            spawn_forward(shared, sock, query.to_vec(), qname, client.ip(), to, None);
            vec![]
        }
    }
}

/// Whether a packet from `src` to `dst`, sent to the gateway's MAC, leaves the network
/// through it: from a guest, to an address outside the subnet or the host-access one.
pub(crate) fn routed_out(cfg: &GatewayConfig, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    let inside = cfg.subnet.contains(&dst) && cfg.host_access != Some(dst);
    cfg.subnet.contains(&src) && !cfg.is_gateway_ip(dst) && !inside && !dst.is_broadcast() && !dst.is_multicast()
}

/// The same for IPv6: from a guest's address on the prefix (a link-local source
/// cannot leave the link), to a unicast address off the prefix or the host-access one.
pub(crate) fn routed_out6(cfg: &GatewayConfig, src: Ipv6Addr, dst: Ipv6Addr) -> bool {
    cfg.ipv6.is_some_and(|p| p.contains(&src)) && leaves_the_link6(cfg, dst)
}

/// Whether a packet from a link-local `src` asks to be routed off the link (to where
/// [`routed_out6`] would take it from a global source).
fn beyond_scope(cfg: &GatewayConfig, src: Ipv6Addr, dst: Ipv6Addr) -> bool {
    src.is_unicast_link_local() && leaves_the_link6(cfg, dst)
}

/// Whether the gateway routes IPv6 to `dst` off the network: a unicast address off the
/// prefix, or the host-access one.
fn leaves_the_link6(cfg: &GatewayConfig, dst: Ipv6Addr) -> bool {
    let Some(prefix) = cfg.ipv6 else {
        return false;
    };
    let inside = prefix.contains(&dst) && cfg.host_access6() != Some(dst);
    let unicast = !dst.is_multicast() && !dst.is_unspecified() && !dst.is_unicast_link_local();
    !cfg.is_gateway_ip6(dst) && !inside && unicast
}

#[cfg(test)]
mod tests {
    //! The decision alone: frames built with `wire`, classified, routed; no sockets.
    use super::*;

    const GUEST: Mac = Mac([0x02, 0, 0, 0, 0, 0x10]);

    fn cfg() -> GatewayConfig {
        GatewayConfig::new("t", "10.9.0.0/24".parse().unwrap())
    }

    fn udp(dst_mac: Mac, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
        wire::udp_frame(GUEST, dst_mac, src, dst, b"x")
    }

    /// An echo request: a reply's frame with its type (0) made a request (8).
    fn echo_request(dst_mac: Mac, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        use smoltcp::wire::{Icmpv4Packet, Ipv4Packet};
        let mut f = wire::icmp_echo_reply(GUEST, dst_mac, src, dst, 1, 1, b"p");
        let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
        let mut icmp = Icmpv4Packet::new_unchecked(ip.payload_mut());
        icmp.set_msg_type(smoltcp::wire::Icmpv4Message::EchoRequest);
        icmp.fill_checksum();
        f
    }

    fn routed(cfg: &GatewayConfig, frame: &[u8]) -> String {
        let r = route(cfg, wire::classify(frame).unwrap(), |_| false);
        format!("{r:?}").split(['(', ' ', '{']).next().unwrap().to_string()
    }

    #[test]
    fn each_kind_of_frame_has_one_destination() {
        let cfg = cfg();
        let (gw, gw_mac) = (cfg.gateway_ip, cfg.gateway_mac);
        let guest = Ipv4Addr::new(10, 9, 0, 20);
        let outside = Ipv4Addr::new(192, 0, 2, 7);
        let bcast = Mac::BROADCAST;
        let cases: [(&str, Vec<u8>); 10] = [
            (
                "Dhcp",
                udp(bcast, (Ipv4Addr::UNSPECIFIED, 68), (Ipv4Addr::BROADCAST, 67)),
            ),
            ("Dns", udp(gw_mac, (guest, 5000), (gw, 53))),
            ("ForwardReply", udp(gw_mac, (guest, 8080), (gw, 40000))),
            ("UdpNat", udp(gw_mac, (guest, 5000), (outside, 53))),
            // Bound outside, but not addressed to the gateway's MAC: not ours to route.
            ("Nowhere", udp(Mac([2, 0, 0, 0, 0, 0x11]), (guest, 5000), (outside, 53))),
            // Between two guests of the subnet: the switch's business.
            ("Nowhere", udp(gw_mac, (guest, 5000), (Ipv4Addr::new(10, 9, 0, 21), 53))),
            ("Echo", echo_request(gw_mac, guest, gw)),
            ("IcmpNat", echo_request(gw_mac, guest, outside)),
            ("Arp", wire::arp_request(GUEST, guest, gw)),
            ("Arp", wire::arp_reply(GUEST, guest, gw_mac, gw)),
        ];
        for (want, frame) in cases {
            assert_eq!(routed(&cfg, &frame), want, "{frame:02x?}");
        }
    }

    /// A TCP SYN over IPv6 from the test guest.
    fn tcp6_syn(dst_mac: Mac, src: Ipv6Addr, dst: (Ipv6Addr, u16)) -> Vec<u8> {
        use smoltcp::wire::{TcpControl, TcpRepr, TcpSeqNumber};
        let repr = TcpRepr {
            src_port: 40000,
            dst_port: dst.1,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(1),
            ack_number: None,
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        };
        let (src, dst) = (
            SocketAddr::new(src.into(), repr.src_port),
            SocketAddr::new(dst.0.into(), dst.1),
        );
        wire::tcp_frame(GUEST, dst_mac, src, dst, &repr).unwrap()
    }

    #[test]
    fn ipv6_off_the_prefix_is_routed_out_and_on_it_is_not() {
        use smoltcp::wire::Icmpv6Repr;
        let mut cfg = GatewayConfig::dual_stack_for_tests();
        cfg.host_access = Some(cfg.default_host_access());
        let gw_mac = cfg.gateway_mac;
        let guest: Ipv6Addr = "fd00:9::10".parse().unwrap();
        let outside: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let host_access = cfg.host_access6().unwrap();
        assert_eq!(host_access, "fd00:9::2".parse::<Ipv6Addr>().unwrap());
        let udp6 = |dst_mac: Mac, src: Ipv6Addr, dst: Ipv6Addr, port: u16| {
            let src = std::net::SocketAddrV6::new(src, 5000, 0, 0);
            wire::udp6_frame(GUEST, dst_mac, src, std::net::SocketAddrV6::new(dst, port, 0, 0), b"x")
        };
        let echo = |dst: Ipv6Addr| {
            let repr = Icmpv6Repr::EchoRequest {
                ident: 1,
                seq_no: 1,
                data: b"p",
            };
            wire::icmp6_frame(GUEST, gw_mac, guest, dst, &repr)
        };
        let link_local: Ipv6Addr = "fe80::10".parse().unwrap();
        let cases: [(&str, Vec<u8>); 12] = [
            ("UdpNat", udp6(gw_mac, guest, outside, 53)),
            ("UdpNat", udp6(gw_mac, guest, host_access, 9)),
            ("Dns", udp6(gw_mac, guest, cfg.gateway_ip6().unwrap(), 53)),
            // On the link: the switch's business, even when sent to the gateway's MAC.
            ("Nowhere", udp6(gw_mac, guest, "fd00:9::11".parse().unwrap(), 53)),
            // A link-local source cannot be routed: told so.
            ("BeyondScope", udp6(gw_mac, link_local, outside, 53)),
            ("BeyondScope", tcp6_syn(gw_mac, link_local, (host_access, 22))),
            ("Nowhere", udp6(Mac([2, 0, 0, 0, 0, 0x11]), guest, outside, 53)),
            ("IcmpNat", echo(outside)),
            ("Icmp6", echo(cfg.gateway_ip6().unwrap())),
            ("TcpNat", tcp6_syn(gw_mac, guest, (outside, 443))),
            ("TcpNat", tcp6_syn(gw_mac, guest, (host_access, 22))),
            ("GatewayTcp", tcp6_syn(gw_mac, guest, (cfg.gateway_ip6().unwrap(), 53))),
        ];
        for (want, frame) in cases {
            assert_eq!(routed(&cfg, &frame), want, "{frame:02x?}");
        }
    }

    #[test]
    fn an_ipv6_refusal_is_icmpv6_and_a_reset_is_tcp_over_ipv6() {
        use smoltcp::wire::{EthernetFrame, Icmpv6Packet, Icmpv6Repr, Ipv6Packet, TcpPacket};
        let cfg = GatewayConfig::dual_stack_for_tests();
        let guest: Ipv6Addr = "fd00:9::10".parse().unwrap();
        let outside: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let syn = tcp6_syn(cfg.gateway_mac, guest, (outside, 443));
        let Route::TcpNat(head) = route(&cfg, wire::classify(&syn).unwrap(), |_| false) else {
            panic!("not routed out");
        };
        let rst = wire::tcp_reset(cfg.gateway_mac, &head).expect("a reset");
        let ip = Ipv6Packet::new_checked(&rst[14..]).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (outside, guest));
        let tcp = TcpPacket::new_checked(&rst[54..]).unwrap();
        assert!(tcp.rst() && tcp.ack() && tcp.verify_checksum(&outside.into(), &guest.into()));
        assert_eq!(tcp.ack_number(), smoltcp::wire::TcpSeqNumber(2), "the SYN acknowledged");

        let from = (cfg.gateway_ip, cfg.gateway_link_local());
        let answer = wire::icmp_unreachable(cfg.gateway_mac, from, &head.origin, wire::Unreachable::Prohibited);
        let eth = EthernetFrame::new_checked(&answer[..]).unwrap();
        assert_eq!(eth.dst_addr().0, GUEST.0);
        let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (cfg.gateway_link_local(), guest));
        let icmp = Icmpv6Packet::new_checked(&answer[54..]).unwrap();
        let caps = smoltcp::phy::ChecksumCapabilities::default();
        let Icmpv6Repr::DstUnreachable { reason, header, data } =
            Icmpv6Repr::parse(&ip.src_addr(), &ip.dst_addr(), &icmp, &caps).unwrap()
        else {
            panic!("not a destination unreachable");
        };
        assert_eq!(reason, smoltcp::wire::Icmpv6DstUnreachable::AdminProhibit);
        assert_eq!((header.src_addr, header.dst_addr), (guest, outside));
        assert_eq!(&data[..4], &[0x9c, 0x40, 0x01, 0xbb], "ports 40000 -> 443");
    }

    #[test]
    fn arp_about_the_gateway_teaches_the_tcp_stacks_and_a_gratuitous_one_does_not() {
        let cfg = cfg();
        let guest = Ipv4Addr::new(10, 9, 0, 20);
        let teaches = |f: &[u8]| match route(&cfg, wire::classify(f).unwrap(), |_| false) {
            Route::Arp { teaches_tcp, .. } => teaches_tcp,
            other => panic!("{other:?}"),
        };
        assert!(teaches(&wire::arp_request(GUEST, guest, cfg.gateway_ip)));
        assert!(!teaches(&wire::arp_request(GUEST, guest, guest)));
        assert!(!teaches(&wire::arp_request(GUEST, guest, Ipv4Addr::new(10, 9, 0, 30))));
    }

    #[test]
    fn a_refusal_quotes_the_refused_packet_from_what_classification_kept() {
        use smoltcp::wire::{EthernetFrame, Icmpv4Message, Icmpv4Packet, Ipv4Packet};
        let cfg = cfg();
        let guest = Ipv4Addr::new(10, 9, 0, 20);
        let f = wire::udp_frame(
            GUEST,
            cfg.gateway_mac,
            (guest, 5000),
            (Ipv4Addr::new(192, 0, 2, 7), 9),
            b"payload",
        );
        let Route::UdpNat(d) = route(&cfg, wire::classify(&f).unwrap(), |_| false) else {
            panic!("not routed out");
        };
        let from = (cfg.gateway_ip, cfg.gateway_link_local());
        let answer = wire::icmp_unreachable(cfg.gateway_mac, from, &d.origin, wire::Unreachable::Prohibited);
        let eth = EthernetFrame::new_checked(&answer[..]).unwrap();
        assert_eq!(eth.dst_addr().0, GUEST.0);
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
        assert_eq!(icmp.msg_code(), 13, "communication administratively prohibited");
        // The refused packet's IPv4 header, then the first 8 bytes of its payload
        // (smoltcp will not parse a quoted, truncated packet back, so by hand).
        let quoted = icmp.data();
        assert_eq!(quoted.len(), 20 + 8);
        assert_eq!(&quoted[12..16], &guest.octets());
        assert_eq!(&quoted[16..20], &[192, 0, 2, 7]);
        assert_eq!(&quoted[20..24], &[0x13, 0x88, 0, 9], "ports 5000 -> 9");
    }
}

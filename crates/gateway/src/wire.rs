//! Frames in and out of the gateway, read and written with smoltcp's wire types.
//!
//! `classify` checks what it reads (lengths, IPv4 header and UDP/ICMP checksums) and
//! says what the frame is for, keeping what a refusal needs (the [`Origin`] of an IPv4
//! packet, a TCP segment's numbers), so an answer is never built by parsing the frame
//! again; the builders emit complete frames with checksums.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use fabric::Mac;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr,
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr, IpAddress,
    IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, NdiscRepr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    UdpPacket, UdpRepr,
};

/// What an inbound frame is, as far as the gateway cares.
#[derive(Debug)]
pub enum Inbound<'a> {
    Arp {
        op: ArpOperation,
        sender_mac: Mac,
        sender_ip: Ipv4Addr,
        target_ip: Ipv4Addr,
    },
    IcmpEcho {
        src_mac: Mac,
        dst_mac: Mac,
        src_ip: Ipv4Addr,
        dst_ip: Ipv4Addr,
        ident: u16,
        seq_no: u16,
        data: &'a [u8],
        origin: Origin,
    },
    Udp {
        src_mac: Mac,
        dst_mac: Mac,
        src_ip: Ipv4Addr,
        dst_ip: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
        payload: &'a [u8],
        origin: Origin,
    },
    /// A TCP segment; its checksum and the rest are the TCP stack's to check.
    Tcp(TcpHead),
    /// ICMPv6 the gateway answers (its checksum checked).
    Icmp6(Icmp6<'a>),
    /// A UDP datagram over IPv6 (its checksum checked).
    Udp6 {
        src_mac: Mac,
        dst_mac: Mac,
        src: SocketAddrV6,
        dst: SocketAddrV6,
        payload: &'a [u8],
        origin: Origin,
    },
    /// Valid, but nothing the gateway serves (other protocols, other ICMP types, IPv6
    /// other than the ICMPv6 above).
    Ignored,
}

/// An ICMPv6 message to the gateway, with the addresses it came with.
#[derive(Debug, Clone, Copy)]
pub struct Icmp6<'a> {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src_ip: Ipv6Addr,
    pub dst_ip: Ipv6Addr,
    /// Neighbour Discovery is valid only with 255: a message that crossed a router
    /// (RFC 4861 section 6.1) is ignored.
    pub hop_limit: u8,
    pub message: Icmp6Message<'a>,
    pub origin: Origin,
}

#[derive(Debug, Clone, Copy)]
pub enum Icmp6Message<'a> {
    EchoRequest {
        ident: u16,
        seq_no: u16,
        data: &'a [u8],
    },
    RouterSolicit,
    NeighbourSolicit {
        target: Ipv6Addr,
        lladdr: Option<Mac>,
    },
    /// A guest's answer to the gateway's solicitation (the switch let it through, so
    /// the address is the sender's).
    NeighbourAdvert {
        target: Ipv6Addr,
        lladdr: Option<Mac>,
    },
}

impl Inbound<'_> {
    /// Who sent it, by the addresses it claims (neighbours are learnt from ARP, UDP,
    /// ICMP echo and ICMPv6, and a Neighbour Advertisement speaks for its target).
    pub fn sender(&self) -> Option<(IpAddr, Mac)> {
        match *self {
            Inbound::Arp {
                sender_ip, sender_mac, ..
            } => Some((sender_ip.into(), sender_mac)),
            Inbound::IcmpEcho { src_ip, src_mac, .. } | Inbound::Udp { src_ip, src_mac, .. } => {
                Some((src_ip.into(), src_mac))
            }
            Inbound::Udp6 { src, src_mac, .. } => Some(((*src.ip()).into(), src_mac)),
            Inbound::Icmp6(Icmp6 {
                message: Icmp6Message::NeighbourAdvert { target, lladdr },
                src_mac,
                ..
            }) => Some((target.into(), lladdr.unwrap_or(src_mac))),
            Inbound::Icmp6(Icmp6 { src_ip, src_mac, .. }) => Some((src_ip.into(), src_mac)),
            Inbound::Tcp(_) | Inbound::Ignored => None,
        }
    }
}

/// The parts of a TCP segment that pick its handler; the TCP stack checks the rest.
#[derive(Debug, Clone, Copy)]
pub struct TcpHead {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub syn: bool,
    pub ack: bool,
    pub rst: bool,
    pub seq: TcpSeqNumber,
    pub ack_number: TcpSeqNumber,
    /// Sequence space the segment takes: its payload, and one each for SYN and FIN.
    pub seq_len: usize,
    pub origin: Origin,
}

/// What an ICMP error about a packet needs from it: who sent it, its header and the
/// first 8 bytes of its payload (RFC 792; for IPv6, RFC 4443 would take more, but the
/// guest's kernel matches an error to its socket by those 8: the ports).
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    pub src_mac: Mac,
    pub header: SentHeader,
    quote: [u8; 8],
    quote_len: u8,
}

/// The IP header of a packet an ICMP error is about.
#[derive(Debug, Clone, Copy)]
pub enum SentHeader {
    V4(Ipv4Repr),
    V6(Ipv6Repr),
}

/// Why a packet could not be delivered, in the terms of both ICMP versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// The egress policy refused it.
    Prohibited,
    /// The host side could not reach the destination.
    Host,
    /// An IPv6 packet from a link-local address to beyond the link (RFC 4443 code 2).
    BeyondScope,
}

impl Origin {
    fn new(src_mac: Mac, header: SentHeader, payload: &[u8]) -> Origin {
        let mut quote = [0u8; 8];
        let quote_len = payload.len().min(quote.len());
        quote[..quote_len].copy_from_slice(&payload[..quote_len]);
        Origin {
            src_mac,
            header,
            quote,
            quote_len: quote_len as u8,
        }
    }

    pub fn quote(&self) -> &[u8] {
        &self.quote[..usize::from(self.quote_len)]
    }
}

impl TcpHead {
    /// A connection's first segment.
    pub fn is_open(&self) -> bool {
        self.syn && !self.ack && !self.rst
    }
}

/// A frame that claims a protocol the gateway serves but breaks its rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("malformed Ethernet frame")]
    Ethernet,
    #[error("malformed ARP packet")]
    Arp,
    #[error("malformed IPv4 header or bad header checksum")]
    Ipv4,
    #[error("malformed IPv6 header")]
    Ipv6,
    #[error("malformed UDP datagram or bad checksum")]
    Udp,
    #[error("malformed ICMP message or bad checksum")]
    Icmp,
    #[error("truncated TCP header")]
    Tcp,
}

fn mac(a: EthernetAddress) -> Mac {
    Mac(a.0)
}

pub fn classify(frame: &[u8]) -> Result<Inbound<'_>, WireError> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| WireError::Ethernet)?;
    let caps = ChecksumCapabilities::default();
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            let pkt = ArpPacket::new_checked(eth.payload()).map_err(|_| WireError::Arp)?;
            match ArpRepr::parse(&pkt).map_err(|_| WireError::Arp)? {
                ArpRepr::EthernetIpv4 {
                    operation,
                    source_hardware_addr,
                    source_protocol_addr,
                    target_protocol_addr,
                    ..
                } => Ok(Inbound::Arp {
                    op: operation,
                    sender_mac: mac(source_hardware_addr),
                    sender_ip: source_protocol_addr,
                    target_ip: target_protocol_addr,
                }),
                _ => Ok(Inbound::Ignored),
            }
        }
        EthernetProtocol::Ipv4 => {
            let pkt = Ipv4Packet::new_checked(eth.payload()).map_err(|_| WireError::Ipv4)?;
            let ip = Ipv4Repr::parse(&pkt, &caps).map_err(|_| WireError::Ipv4)?;
            let (src, dst) = (IpAddress::Ipv4(ip.src_addr), IpAddress::Ipv4(ip.dst_addr));
            let origin = Origin::new(mac(eth.src_addr()), SentHeader::V4(ip), pkt.payload());
            match ip.next_header {
                IpProtocol::Udp => {
                    let udp = UdpPacket::new_checked(pkt.payload()).map_err(|_| WireError::Udp)?;
                    let repr = UdpRepr::parse(&udp, &src, &dst, &caps).map_err(|_| WireError::Udp)?;
                    Ok(Inbound::Udp {
                        src_mac: mac(eth.src_addr()),
                        dst_mac: mac(eth.dst_addr()),
                        src_ip: ip.src_addr,
                        dst_ip: ip.dst_addr,
                        src_port: repr.src_port,
                        dst_port: repr.dst_port,
                        payload: udp.payload(),
                        origin,
                    })
                }
                IpProtocol::Icmp => {
                    let icmp = Icmpv4Packet::new_checked(pkt.payload()).map_err(|_| WireError::Icmp)?;
                    match Icmpv4Repr::parse(&icmp, &caps) {
                        Ok(Icmpv4Repr::EchoRequest { ident, seq_no, data }) => Ok(Inbound::IcmpEcho {
                            src_mac: mac(eth.src_addr()),
                            dst_mac: mac(eth.dst_addr()),
                            src_ip: ip.src_addr,
                            dst_ip: ip.dst_addr,
                            ident,
                            seq_no,
                            data,
                            origin,
                        }),
                        Ok(_) => Ok(Inbound::Ignored),
                        // smoltcp refuses ICMP types it does not model; only a bad
                        // checksum or length makes the message malformed.
                        Err(_) if icmp.verify_checksum() => Ok(Inbound::Ignored),
                        Err(_) => Err(WireError::Icmp),
                    }
                }
                IpProtocol::Tcp => {
                    let (src_mac, dst_mac) = (mac(eth.src_addr()), mac(eth.dst_addr()));
                    let addrs = (IpAddr::V4(ip.src_addr), IpAddr::V4(ip.dst_addr));
                    tcp_head(src_mac, dst_mac, addrs, pkt.payload(), origin)
                }
                _ => Ok(Inbound::Ignored),
            }
        }
        EthernetProtocol::Ipv6 => classify_ipv6(mac(eth.src_addr()), mac(eth.dst_addr()), &frame[ETH..]),
        _ => Ok(Inbound::Ignored),
    }
}

/// A TCP segment's head, from its IP packet's addresses and payload.
fn tcp_head(
    src_mac: Mac,
    dst_mac: Mac,
    addrs: (IpAddr, IpAddr),
    segment: &[u8],
    origin: Origin,
) -> Result<Inbound<'_>, WireError> {
    let tcp = TcpPacket::new_checked(segment).map_err(|_| WireError::Tcp)?;
    Ok(Inbound::Tcp(TcpHead {
        src_mac,
        dst_mac,
        src: SocketAddr::new(addrs.0, tcp.src_port()),
        dst: SocketAddr::new(addrs.1, tcp.dst_port()),
        syn: tcp.syn(),
        ack: tcp.ack(),
        rst: tcp.rst(),
        seq: tcp.seq_number(),
        ack_number: tcp.ack_number(),
        seq_len: tcp.payload().len() + usize::from(tcp.syn()) + usize::from(tcp.fin()),
        origin,
    }))
}

fn classify_ipv6(src_mac: Mac, dst_mac: Mac, packet: &[u8]) -> Result<Inbound<'_>, WireError> {
    let pkt = Ipv6Packet::new_checked(packet).map_err(|_| WireError::Ipv6)?;
    let ip = Ipv6Repr::parse(&pkt).map_err(|_| WireError::Ipv6)?;
    // new_checked saw the payload length fit.
    let body = packet.get(40..40 + ip.payload_len).ok_or(WireError::Ipv6)?;
    let caps = ChecksumCapabilities::default();
    let origin = Origin::new(src_mac, SentHeader::V6(ip), body);
    // Extension headers (a hop-by-hop one before MLD, say) lead to nothing it serves.
    match ip.next_header {
        IpProtocol::Icmpv6 => {}
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(body).map_err(|_| WireError::Udp)?;
            let (src, dst) = (IpAddress::Ipv6(ip.src_addr), IpAddress::Ipv6(ip.dst_addr));
            let repr = UdpRepr::parse(&udp, &src, &dst, &caps).map_err(|_| WireError::Udp)?;
            return Ok(Inbound::Udp6 {
                src_mac,
                dst_mac,
                src: SocketAddrV6::new(ip.src_addr, repr.src_port, 0, 0),
                dst: SocketAddrV6::new(ip.dst_addr, repr.dst_port, 0, 0),
                payload: udp.payload(),
                origin,
            });
        }
        IpProtocol::Tcp => {
            let addrs = (IpAddr::V6(ip.src_addr), IpAddr::V6(ip.dst_addr));
            return tcp_head(src_mac, dst_mac, addrs, body, origin);
        }
        _ => return Ok(Inbound::Ignored),
    }
    let icmp = Icmpv6Packet::new_checked(body).map_err(|_| WireError::Icmp)?;
    let message = match Icmpv6Repr::parse(&ip.src_addr, &ip.dst_addr, &icmp, &caps) {
        Ok(Icmpv6Repr::EchoRequest { ident, seq_no, data }) => Icmp6Message::EchoRequest { ident, seq_no, data },
        Ok(Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { .. })) => Icmp6Message::RouterSolicit,
        Ok(Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr, lladdr })) => Icmp6Message::NeighbourSolicit {
            target: target_addr,
            lladdr: lladdr.and_then(|l| <[u8; 6]>::try_from(l.as_bytes()).ok()).map(Mac),
        },
        Ok(Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            target_addr, lladdr, ..
        })) => Icmp6Message::NeighbourAdvert {
            target: target_addr,
            lladdr: lladdr.and_then(|l| <[u8; 6]>::try_from(l.as_bytes()).ok()).map(Mac),
        },
        Ok(_) => return Ok(Inbound::Ignored),
        Err(_) if icmp.verify_checksum(&ip.src_addr, &ip.dst_addr) => return Ok(Inbound::Ignored),
        Err(_) => return Err(WireError::Icmp),
    };
    Ok(Inbound::Icmp6(Icmp6 {
        src_mac,
        dst_mac,
        src_ip: ip.src_addr,
        dst_ip: ip.dst_addr,
        hop_limit: ip.hop_limit,
        message,
        origin,
    }))
}

/// The Ethernet multicast address of an IPv6 multicast group (RFC 2464: `33:33` and the
/// group's last 32 bits).
/// The solicited-node multicast group of `addr` (RFC 4291 2.7.1): where a Neighbour
/// Solicitation for it goes.
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    Ipv6Addr::from(0xff02_0000_0000_0000_0000_0001_ff00_0000_u128 | (u128::from(addr) & 0x00ff_ffff))
}

/// The source and destination addresses and the TCP segment of an Ethernet frame that
/// carries TCP over IPv4 (unfragmented) or over IPv6 (right after the fixed header, as
/// smoltcp takes it); `None` for anything else. Bounds come from the checked headers.
pub fn tcp_in_frame(frame: &[u8]) -> Option<(IpAddr, IpAddr, &[u8])> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let packet = &frame[ETH..];
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
                return None;
            }
            let at = usize::from(ip.header_len())..usize::from(ip.total_len());
            Some((ip.src_addr().into(), ip.dst_addr().into(), packet.get(at)?))
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            let at = IPV6..IPV6 + usize::from(ip.payload_len());
            Some((ip.src_addr().into(), ip.dst_addr().into(), packet.get(at)?))
        }
        _ => None,
    }
}

pub fn ipv6_multicast_mac(group: Ipv6Addr) -> Mac {
    let o = group.octets();
    Mac([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// A complete Ethernet/IPv6/ICMPv6 frame; hop limit 255, as Neighbour Discovery needs.
pub fn icmp6_frame(src_mac: Mac, dst_mac: Mac, src: Ipv6Addr, dst: Ipv6Addr, repr: &Icmpv6Repr<'_>) -> Vec<u8> {
    icmp6_frame_with(src_mac, dst_mac, src, dst, repr, &[])
}

/// The same with `options` (whole NDP options, in 8-byte units) after what `repr`
/// writes: smoltcp models only some options (RDNSS, RFC 8106, is not among them).
pub fn icmp6_frame_with(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    repr: &Icmpv6Repr<'_>,
    options: &[u8],
) -> Vec<u8> {
    let icmp_len = repr.buffer_len() + options.len();
    let mut buf = vec![0u8; ETH + IPV6 + icmp_len];
    ethernet(&mut buf, src_mac, dst_mac, EthernetProtocol::Ipv6);
    Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp_len,
        hop_limit: 255,
    }
    .emit(&mut Ipv6Packet::new_unchecked(&mut buf[ETH..ETH + IPV6]));
    let body = &mut buf[ETH + IPV6..];
    body[repr.buffer_len()..].copy_from_slice(options);
    let mut icmp = Icmpv6Packet::new_unchecked(body);
    repr.emit(&src, &dst, &mut icmp, &ChecksumCapabilities::default());
    icmp.fill_checksum(&src, &dst);
    buf
}

fn ethernet(buf: &mut [u8], src: Mac, dst: Mac, ethertype: EthernetProtocol) {
    let mut frame = EthernetFrame::new_unchecked(buf);
    EthernetRepr {
        src_addr: EthernetAddress(src.0),
        dst_addr: EthernetAddress(dst.0),
        ethertype,
    }
    .emit(&mut frame);
}

const ETH: usize = 14;
const IPV4: usize = 20;
const IPV6: usize = 40;
const UDP: usize = 8;

fn ipv4(buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, payload_len: usize) {
    let repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: proto,
        payload_len,
        hop_limit: 64,
    };
    repr.emit(
        &mut Ipv4Packet::new_unchecked(&mut buf[ETH..]),
        &ChecksumCapabilities::default(),
    );
}

fn ipv6(buf: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr, proto: IpProtocol, payload_len: usize) {
    Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: proto,
        payload_len,
        hop_limit: 64,
    }
    .emit(&mut Ipv6Packet::new_unchecked(&mut buf[ETH..ETH + IPV6]));
}

/// A complete Ethernet/IPv4/UDP frame.
pub fn udp_frame(src_mac: Mac, dst_mac: Mac, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; ETH + IPV4 + UDP + payload.len()];
    ethernet(&mut buf, src_mac, dst_mac, EthernetProtocol::Ipv4);
    ipv4(&mut buf, src.0, dst.0, IpProtocol::Udp, UDP + payload.len());
    let repr = UdpRepr {
        src_port: src.1,
        dst_port: dst.1,
    };
    repr.emit(
        &mut UdpPacket::new_unchecked(&mut buf[ETH + IPV4..]),
        &IpAddress::Ipv4(src.0),
        &IpAddress::Ipv4(dst.0),
        payload.len(),
        |p| p.copy_from_slice(payload),
        &ChecksumCapabilities::default(),
    );
    buf
}

/// A complete Ethernet/IPv6/UDP frame (hop limit 64).
pub fn udp6_frame(src_mac: Mac, dst_mac: Mac, src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; ETH + IPV6 + UDP + payload.len()];
    ethernet(&mut buf, src_mac, dst_mac, EthernetProtocol::Ipv6);
    ipv6(&mut buf, *src.ip(), *dst.ip(), IpProtocol::Udp, UDP + payload.len());
    UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    }
    .emit(
        &mut UdpPacket::new_unchecked(&mut buf[ETH + IPV6..]),
        &IpAddress::Ipv6(*src.ip()),
        &IpAddress::Ipv6(*dst.ip()),
        payload.len(),
        |p| p.copy_from_slice(payload),
        &ChecksumCapabilities::default(),
    );
    buf
}

/// A UDP frame over whichever IP version the addresses are (both the same); `None`
/// for a mixed pair.
pub fn udp_frame_to(src_mac: Mac, dst_mac: Mac, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => Some(udp_frame(
            src_mac,
            dst_mac,
            (*s.ip(), s.port()),
            (*d.ip(), d.port()),
            payload,
        )),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => Some(udp6_frame(src_mac, dst_mac, s, d, payload)),
        _ => None,
    }
}

/// An ARP request from the gateway asking who has `target`.
pub fn arp_request(mac: Mac, ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut buf = vec![0u8; ETH + 28];
    ethernet(&mut buf, mac, Mac::BROADCAST, EthernetProtocol::Arp);
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(mac.0),
        source_protocol_addr: ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    repr.emit(&mut ArpPacket::new_unchecked(&mut buf[ETH..]));
    buf
}

/// An ARP reply telling `to` that `ip` is at `mac_of_ip`.
pub fn arp_reply(mac_of_ip: Mac, ip: Ipv4Addr, to_mac: Mac, to_ip: Ipv4Addr) -> Vec<u8> {
    let mut buf = vec![0u8; ETH + 28];
    ethernet(&mut buf, mac_of_ip, to_mac, EthernetProtocol::Arp);
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(mac_of_ip.0),
        source_protocol_addr: ip,
        target_hardware_addr: EthernetAddress(to_mac.0),
        target_protocol_addr: to_ip,
    };
    repr.emit(&mut ArpPacket::new_unchecked(&mut buf[ETH..]));
    buf
}

/// An ICMP destination-unreachable answer to `refused`, from the gateway's MAC and its
/// address of the packet's IP version (`from`: IPv4, IPv6).
pub fn icmp_unreachable(gateway_mac: Mac, from: (Ipv4Addr, Ipv6Addr), refused: &Origin, why: Unreachable) -> Vec<u8> {
    let header = match refused.header {
        SentHeader::V4(h) => h,
        SentHeader::V6(header) => {
            let reason = match why {
                Unreachable::Prohibited => Icmpv6DstUnreachable::AdminProhibit,
                Unreachable::Host => Icmpv6DstUnreachable::AddrUnreachable,
                Unreachable::BeyondScope => Icmpv6DstUnreachable::BeyondScope,
            };
            let repr = Icmpv6Repr::DstUnreachable {
                reason,
                header,
                data: refused.quote(),
            };
            return icmp6_frame(gateway_mac, refused.src_mac, from.1, header.src_addr, &repr);
        }
    };
    let reason = match why {
        Unreachable::Prohibited => Icmpv4DstUnreachable::CommProhibited,
        Unreachable::Host | Unreachable::BeyondScope => Icmpv4DstUnreachable::HostUnreachable,
    };
    let repr = Icmpv4Repr::DstUnreachable {
        reason,
        header,
        data: refused.quote(),
    };
    let mut buf = vec![0u8; ETH + IPV4 + repr.buffer_len()];
    ethernet(&mut buf, gateway_mac, refused.src_mac, EthernetProtocol::Ipv4);
    ipv4(&mut buf, from.0, header.src_addr, IpProtocol::Icmp, repr.buffer_len());
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut buf[ETH + IPV4..]),
        &ChecksumCapabilities::default(),
    );
    buf
}

/// A RST answering a guest's TCP segment (its connect refused), as if from its
/// destination; none for a RST.
pub fn tcp_reset(gateway_mac: Mac, refused: &TcpHead) -> Option<Vec<u8>> {
    if refused.rst {
        return None;
    }
    // RFC 9293 3.10.7.1: acknowledge the segment (its SYN and FIN count as one each) so
    // the guest accepts the reset.
    let (seq_number, ack_number) = if refused.ack {
        (refused.ack_number, None)
    } else {
        (TcpSeqNumber(0), Some(refused.seq + refused.seq_len))
    };
    let repr = TcpRepr {
        src_port: refused.dst.port(),
        dst_port: refused.src.port(),
        control: TcpControl::Rst,
        seq_number,
        ack_number,
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    tcp_frame(gateway_mac, refused.src_mac, refused.dst, refused.src, &repr)
}

/// A complete Ethernet/IP/TCP frame of `repr` between two addresses of one IP version
/// (`None` for a mixed pair).
pub fn tcp_frame(src_mac: Mac, dst_mac: Mac, src: SocketAddr, dst: SocketAddr, repr: &TcpRepr<'_>) -> Option<Vec<u8>> {
    let (mut buf, l4) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut buf = vec![0u8; ETH + IPV4 + repr.buffer_len()];
            ethernet(&mut buf, src_mac, dst_mac, EthernetProtocol::Ipv4);
            ipv4(&mut buf, s, d, IpProtocol::Tcp, repr.buffer_len());
            (buf, ETH + IPV4)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut buf = vec![0u8; ETH + IPV6 + repr.buffer_len()];
            ethernet(&mut buf, src_mac, dst_mac, EthernetProtocol::Ipv6);
            ipv6(&mut buf, s, d, IpProtocol::Tcp, repr.buffer_len());
            (buf, ETH + IPV6)
        }
        _ => return None,
    };
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut buf[l4..]),
        &IpAddress::from(src.ip()),
        &IpAddress::from(dst.ip()),
        &ChecksumCapabilities::default(),
    );
    Some(buf)
}

/// An ICMP echo reply from `src` to the requester.
pub fn icmp_echo_reply(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ident: u16,
    seq_no: u16,
    data: &[u8],
) -> Vec<u8> {
    let repr = Icmpv4Repr::EchoReply { ident, seq_no, data };
    let mut buf = vec![0u8; ETH + IPV4 + repr.buffer_len()];
    ethernet(&mut buf, src_mac, dst_mac, EthernetProtocol::Ipv4);
    ipv4(&mut buf, src, dst, IpProtocol::Icmp, repr.buffer_len());
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut buf[ETH + IPV4..]),
        &ChecksumCapabilities::default(),
    );
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = Mac([0x02, 0, 0, 0, 0, 1]);
    const B: Mac = Mac([0x02, 0, 0, 0, 0, 2]);

    #[test]
    fn udp_round_trip() {
        let f = udp_frame(
            A,
            B,
            (Ipv4Addr::new(10, 0, 0, 1), 53),
            (Ipv4Addr::new(10, 0, 0, 2), 5353),
            b"hello",
        );
        match classify(&f).unwrap() {
            Inbound::Udp {
                src_mac,
                src_ip,
                src_port,
                dst_port,
                payload,
                ..
            } => {
                assert_eq!(
                    (src_mac, src_ip, src_port, dst_port, payload),
                    (A, Ipv4Addr::new(10, 0, 0, 1), 53, 5353, &b"hello"[..])
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn corrupted_checksums_and_lengths_are_errors() {
        let f = udp_frame(
            A,
            B,
            (Ipv4Addr::new(10, 0, 0, 1), 53),
            (Ipv4Addr::new(10, 0, 0, 2), 5353),
            b"hello",
        );
        let mut bad_ip = f.clone();
        bad_ip[14 + 8] ^= 0xff; // TTL changes, header checksum no longer matches
        assert_eq!(classify(&bad_ip).unwrap_err(), WireError::Ipv4);
        let mut bad_udp = f.clone();
        *bad_udp.last_mut().unwrap() ^= 1;
        assert_eq!(classify(&bad_udp).unwrap_err(), WireError::Udp);
        assert_eq!(classify(&f[..30]).unwrap_err(), WireError::Ipv4);
        assert_eq!(classify(&f[..10]).unwrap_err(), WireError::Ethernet);
    }

    #[test]
    fn arp_and_icmp_replies_parse_back() {
        let r = arp_reply(A, Ipv4Addr::new(10, 0, 0, 1), B, Ipv4Addr::new(10, 0, 0, 2));
        assert!(matches!(
            classify(&r).unwrap(),
            Inbound::Arp {
                op: ArpOperation::Reply,
                sender_mac: A,
                ..
            }
        ));
        let e = icmp_echo_reply(
            A,
            B,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            7,
            9,
            b"ping",
        );
        let pkt = Ipv4Packet::new_checked(&e[14..]).unwrap();
        let icmp = Icmpv4Packet::new_checked(pkt.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert!(matches!(
            Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).unwrap(),
            Icmpv4Repr::EchoReply {
                ident: 7,
                seq_no: 9,
                ..
            }
        ));
    }
}

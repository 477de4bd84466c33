//! Views over Ethernet frames as they arrive from ports.
//!
//! The switch needs three things from a frame: its destination and source MAC and, for
//! locked ports, the sender's IPv4 address. The Ethernet header is read here with one
//! length check (every accessor after it indexes inside that length); ARP and IPv4 are
//! read with smoltcp's checked wire views, so a short or lying packet is an error,
//! never a panic.

use std::net::{Ipv4Addr, Ipv6Addr};

use smoltcp::wire::{ArpPacket, Ipv4Packet};

use crate::mac::Mac;

/// Ethernet header without a VLAN tag.
pub const ETH_HEADER_LEN: usize = 14;
/// Bytes an 802.1Q tag adds.
pub const VLAN_TAG_LEN: usize = 4;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
/// The pre-standard QinQ ethertype some switches still use.
pub const ETHERTYPE_QINQ_OLD: u16 = 0x9100;
/// VLAN tags the switch looks through (802.1ad outer + 802.1Q inner); a frame with
/// more is malformed to it.
pub const MAX_VLAN_TAGS: usize = 2;

fn is_tag(ethertype: u16) -> bool {
    matches!(ethertype, ETHERTYPE_VLAN | ETHERTYPE_QINQ | ETHERTYPE_QINQ_OLD)
}

/// Why a frame is unusable before any forwarding decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than an Ethernet header.
    Runt,
    /// Longer than the network's MTU allows for its kind of frame.
    Oversize,
}

/// A validated view of an Ethernet frame's header.
#[derive(Debug, Clone, Copy)]
pub struct EthernetView<'a> {
    bytes: &'a [u8],
}

impl<'a> EthernetView<'a> {
    /// Checks the length against the header and against `mtu` (the largest L3 payload):
    /// an untagged frame may carry `mtu` bytes after its 14-byte header, a VLAN-tagged
    /// frame 4 more.
    pub fn parse(bytes: &'a [u8], mtu: usize) -> Result<Self, FrameError> {
        if bytes.len() < ETH_HEADER_LEN {
            return Err(FrameError::Runt);
        }
        let view = EthernetView { bytes };
        let allowed = mtu + ETH_HEADER_LEN + if view.is_vlan_tagged() { VLAN_TAG_LEN } else { 0 };
        if bytes.len() > allowed {
            return Err(FrameError::Oversize);
        }
        Ok(view)
    }

    pub fn dst(&self) -> Mac {
        Mac(self.bytes[0..6].try_into().expect("length checked in parse"))
    }

    pub fn src(&self) -> Mac {
        Mac(self.bytes[6..12].try_into().expect("length checked in parse"))
    }

    /// The outer ethertype (0x8100 for a tagged frame).
    pub fn outer_ethertype(&self) -> u16 {
        u16::from_be_bytes([self.bytes[12], self.bytes[13]])
    }

    pub fn is_vlan_tagged(&self) -> bool {
        is_tag(self.outer_ethertype())
    }

    /// Ethertype and payload after the VLAN tags (up to [`MAX_VLAN_TAGS`], 802.1Q,
    /// 802.1ad or the old 0x9100 in any order), so that every check sees what a tagged
    /// frame really carries. `None` for a frame with more tags, or too short to hold
    /// the ones it announces.
    pub fn inner(&self) -> Option<(u16, &'a [u8])> {
        let mut ethertype = self.outer_ethertype();
        let mut rest = &self.bytes[ETH_HEADER_LEN..];
        for _ in 0..MAX_VLAN_TAGS {
            if !is_tag(ethertype) {
                return Some((ethertype, rest));
            }
            let tag = rest.get(..VLAN_TAG_LEN)?;
            ethertype = u16::from_be_bytes([tag[2], tag[3]]);
            rest = &rest[VLAN_TAG_LEN..];
        }
        (!is_tag(ethertype)).then_some((ethertype, rest))
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// What the UDP header of an IPv4 frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UdpPorts {
    /// Not IPv4/UDP, or a later fragment (which carries no UDP header).
    None,
    Ports(u16, u16),
    /// The first fragment of a UDP datagram too short to hold the UDP header: a way to
    /// hide the ports from a filter (RFC 1858's tiny fragments).
    Hidden,
}

/// The UDP ports of an IPv4/UDP frame. Reads only fixed offsets, so it is cheap
/// enough for every frame.
fn udp_ports(frame: &EthernetView<'_>) -> UdpPorts {
    let Some((ETHERTYPE_IPV4, ip)) = frame.inner() else {
        return UdpPorts::None;
    };
    let Some(&vihl) = ip.first() else { return UdpPorts::None };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ip.get(9) != Some(&17) {
        return UdpPorts::None;
    }
    let fragment_offset = ip.get(6..8).map(|b| u16::from_be_bytes([b[0] & 0x1f, b[1]]));
    if fragment_offset.is_some_and(|o| o != 0) {
        return UdpPorts::None;
    }
    match ip.get(ihl..ihl + 8) {
        Some(p) => UdpPorts::Ports(u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]])),
        None => UdpPorts::Hidden,
    }
}

/// Whether the frame is IPv4/UDP from source port 67 (a DHCP server speaking), seen
/// through VLAN tags, or a UDP first fragment that hides its ports.
pub fn is_dhcp_server_message(frame: &EthernetView<'_>) -> bool {
    match udp_ports(frame) {
        UdpPorts::Ports(src, _) => src == 67,
        UdpPorts::Hidden => true,
        UdpPorts::None => false,
    }
}

/// Whether the frame is a DHCP client speaking: IPv4/UDP from port 68 to port 67, or
/// IPv6/UDP from port 546 to port 547 right after the fixed header (where every
/// DHCPv6 client puts it; one hiding it behind extension headers is flooded as before).
pub fn is_dhcp_client_message(frame: &EthernetView<'_>) -> bool {
    udp_ports(frame) == UdpPorts::Ports(68, 67) || is_dhcp6_client_message(frame)
}

fn is_dhcp6_client_message(frame: &EthernetView<'_>) -> bool {
    const UDP: u8 = 17;
    let Some((ETHERTYPE_IPV6, ip)) = frame.inner() else {
        return false;
    };
    ip.first().is_some_and(|v| v >> 4 == 6)
        && ip.get(6) == Some(&UDP)
        && ip.get(40..44) == Some(&[0x02, 0x22, 0x02, 0x23])
}

/// What an IPv6 frame from a guest is, for the first-hop guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Kind {
    NotIpv6,
    /// Anything a guest may send when IPv6 passes the network.
    Plain,
    /// Router Advertisement (ICMPv6 134): only the gateway may route.
    RouterAdvert,
    /// Redirect (ICMPv6 137).
    Redirect,
    /// DHCPv6 from the server port (547 to 546): only the gateway may serve.
    Dhcp6Server,
    /// Neighbour Advertisement (ICMPv6 136): the address it speaks for, and the
    /// link-layer address it announces.
    NeighbourAdvert {
        target: Ipv6Addr,
        target_mac: Option<Mac>,
    },
    /// Cut short, or an upper layer hidden behind extension headers the first
    /// fragment does not hold (RFC 7113's evasion of RA guards).
    Malformed,
}

/// Classifies an IPv6 frame, walking extension headers to the upper layer. Fixed
/// offsets and bounds-checked slices only.
pub fn ipv6_kind(frame: &EthernetView<'_>) -> Ipv6Kind {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const DEST_OPTS: u8 = 60;
    const ICMPV6: u8 = 58;
    const UDP: u8 = 17;
    let Some((ethertype, ip)) = frame.inner() else {
        return Ipv6Kind::Malformed;
    };
    if ethertype != ETHERTYPE_IPV6 {
        return Ipv6Kind::NotIpv6;
    }
    let Some(header) = ip.get(..40) else {
        return Ipv6Kind::Malformed;
    };
    if header[0] >> 4 != 6 {
        return Ipv6Kind::Malformed;
    }
    let mut next = header[6];
    let mut rest = &ip[40..];
    // A handful of extension headers is all a real packet carries.
    for _ in 0..8 {
        match next {
            HOP_BY_HOP | ROUTING | DEST_OPTS => {
                let Some(h) = rest.get(..2) else {
                    return Ipv6Kind::Malformed;
                };
                let len = (usize::from(h[1]) + 1) * 8;
                let Some(tail) = rest.get(len..) else {
                    return Ipv6Kind::Malformed;
                };
                next = h[0];
                rest = tail;
            }
            FRAGMENT => {
                let Some(h) = rest.get(..8) else {
                    return Ipv6Kind::Malformed;
                };
                let offset = u16::from_be_bytes([h[2], h[3]]) >> 3;
                if offset != 0 {
                    // A later fragment: without its first fragment it is never
                    // reassembled, and the first one is checked.
                    return Ipv6Kind::Plain;
                }
                next = h[0];
                rest = &rest[8..];
            }
            ICMPV6 => {
                let Some(&icmp_type) = rest.first() else {
                    return Ipv6Kind::Malformed;
                };
                return match icmp_type {
                    134 => Ipv6Kind::RouterAdvert,
                    137 => Ipv6Kind::Redirect,
                    136 => match rest.get(8..24).and_then(|t| <[u8; 16]>::try_from(t).ok()) {
                        Some(target) => Ipv6Kind::NeighbourAdvert {
                            target: Ipv6Addr::from(target),
                            target_mac: neighbour_advert_lladdr(rest),
                        },
                        None => Ipv6Kind::Malformed,
                    },
                    _ => Ipv6Kind::Plain,
                };
            }
            UDP => {
                let Some(p) = rest.get(..4) else {
                    return Ipv6Kind::Malformed;
                };
                return if p[0..2] == 547u16.to_be_bytes() {
                    Ipv6Kind::Dhcp6Server
                } else {
                    Ipv6Kind::Plain
                };
            }
            _ => return Ipv6Kind::Plain,
        }
    }
    Ipv6Kind::Malformed
}

/// The Target Link-Layer Address option of a Neighbour Advertisement, if any.
fn neighbour_advert_lladdr(icmp: &[u8]) -> Option<Mac> {
    // type, code, checksum, flags (8 bytes), target address (16), then options.
    let mut opts = icmp.get(24..)?;
    while let Some(h) = opts.get(..2) {
        let len = usize::from(h[1]) * 8;
        if len == 0 {
            return None;
        }
        let opt = opts.get(..len)?;
        if h[0] == 2 && len == 8 {
            return Mac::from_slice(&opt[2..8]);
        }
        opts = &opts[len..];
    }
    None
}

/// What a frame claims about its sender at layer 3, for port locking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L3Sender {
    /// IPv4 packet from this source address; `dhcp_client` is set for UDP 68 → 67, the
    /// only traffic a client may send from 0.0.0.0.
    Ipv4 { src: Ipv4Addr, dhcp_client: bool },
    /// ARP with this sender hardware and protocol address.
    Arp { sender_mac: Mac, sender_ip: Ipv4Addr },
    /// IPv6 from this source address.
    Ipv6 { src: Ipv6Addr },
    /// Not IPv4, IPv6 or ARP: layer 3 says nothing the lock checks.
    Other,
    /// Claims to be IPv4, IPv6 or ARP but is malformed.
    Malformed,
}

/// Reads the layer-3 sender of a frame.
pub fn l3_sender(frame: &EthernetView<'_>) -> L3Sender {
    let Some((ethertype, payload)) = frame.inner() else {
        return L3Sender::Malformed;
    };
    match ethertype {
        ETHERTYPE_IPV4 => {
            let Ok(ip) = Ipv4Packet::new_checked(payload) else {
                return L3Sender::Malformed;
            };
            let src: Ipv4Addr = ip.src_addr();
            let dhcp_client = u8::from(ip.next_header()) == 17 && {
                let l4 = ip.payload();
                l4.len() >= 4 && l4[0..2] == 68u16.to_be_bytes() && l4[2..4] == 67u16.to_be_bytes()
            };
            L3Sender::Ipv4 { src, dhcp_client }
        }
        ETHERTYPE_ARP => {
            let Ok(arp) = ArpPacket::new_checked(payload) else {
                return L3Sender::Malformed;
            };
            let (hw, proto) = (arp.source_hardware_addr(), arp.source_protocol_addr());
            match (Mac::from_slice(hw), <[u8; 4]>::try_from(proto)) {
                (Some(sender_mac), Ok(ip)) if hw.len() == 6 => L3Sender::Arp {
                    sender_mac,
                    sender_ip: Ipv4Addr::from(ip),
                },
                _ => L3Sender::Malformed,
            }
        }
        ETHERTYPE_IPV6 => match payload.get(8..24).and_then(|a| <[u8; 16]>::try_from(a).ok()) {
            Some(src) if payload[0] >> 4 == 6 => L3Sender::Ipv6 {
                src: Ipv6Addr::from(src),
            },
            _ => L3Sender::Malformed,
        },
        _ => L3Sender::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARP_REQUEST: [u8; 42] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, // eth
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, // htype ptype hlen plen op
        0x52, 0x54, 0x00, 0x00, 0x00, 0x01, 10, 77, 0, 5, // sender
        0, 0, 0, 0, 0, 0, 10, 77, 0, 1, // target
    ];

    #[test]
    fn runt_and_oversize() {
        assert_eq!(EthernetView::parse(&[0u8; 13], 1500).unwrap_err(), FrameError::Runt);
        assert!(EthernetView::parse(&[0u8; 14], 1500).is_ok());
        assert!(EthernetView::parse(&[0u8; 1514], 1500).is_ok());
        assert_eq!(
            EthernetView::parse(&[0u8; 1515], 1500).unwrap_err(),
            FrameError::Oversize
        );
        let mut tagged = [0u8; 1518];
        tagged[12] = 0x81;
        assert!(EthernetView::parse(&tagged, 1500).is_ok());
        assert_eq!(
            EthernetView::parse(&[&tagged[..], &[0]].concat(), 1500).unwrap_err(),
            FrameError::Oversize
        );
    }

    #[test]
    fn reads_addresses_and_arp_sender() {
        let v = EthernetView::parse(&ARP_REQUEST, 1500).unwrap();
        assert!(v.dst().is_broadcast());
        assert_eq!(v.src(), Mac([0x52, 0x54, 0, 0, 0, 1]));
        assert_eq!(
            l3_sender(&v),
            L3Sender::Arp {
                sender_mac: Mac([0x52, 0x54, 0, 0, 0, 1]),
                sender_ip: Ipv4Addr::new(10, 77, 0, 5)
            }
        );
    }

    #[test]
    fn truncated_arp_is_malformed() {
        let v = EthernetView::parse(&ARP_REQUEST[..30], 1500).unwrap();
        assert_eq!(l3_sender(&v), L3Sender::Malformed);
    }

    #[test]
    fn tagged_frame_too_short_for_its_tag() {
        let mut f = [0u8; 16];
        f[12] = 0x81;
        let v = EthernetView::parse(&f, 1500).unwrap();
        assert_eq!(v.inner(), None);
        assert_eq!(l3_sender(&v), L3Sender::Malformed);
    }

    #[test]
    fn dhcp6_client_messages_are_dhcp_client_messages() {
        // A SOLICIT's start: IPv6 to ff02::1:2, UDP 546 -> 547.
        let mut f = vec![0x33, 0x33, 0, 1, 0, 2, 0x52, 0x54, 0, 0, 0, 2, 0x86, 0xdd];
        f.extend([0x60, 0, 0, 0, 0, 12, 17, 1]);
        f.extend([0xfe, 0x80].iter().chain(&[0; 14]));
        f.extend([0xff, 0x02].iter().chain(&[0; 11]).chain(&[1, 0, 2]));
        f.extend([0x02, 0x22, 0x02, 0x23, 0, 12, 0, 0, 1, 0, 0, 0]);
        let v = EthernetView::parse(&f, 1500).unwrap();
        assert!(is_dhcp_client_message(&v));
        // The server's answer (547 -> 546) is not, nor is other UDP, nor a short frame.
        let mut reply = f.clone();
        reply[54..58].copy_from_slice(&[0x02, 0x23, 0x02, 0x22]);
        assert!(!is_dhcp_client_message(&EthernetView::parse(&reply, 1500).unwrap()));
        let mut tcp = f.clone();
        tcp[20] = 6;
        assert!(!is_dhcp_client_message(&EthernetView::parse(&tcp, 1500).unwrap()));
        assert!(!is_dhcp_client_message(&EthernetView::parse(&f[..56], 1500).unwrap()));
    }

    #[test]
    fn ipv4_sender_and_dhcp_client() {
        // 20-byte IPv4 header, UDP 68 -> 67, from 0.0.0.0.
        let mut f = vec![0xff; 6];
        f.extend([0x52, 0x54, 0, 0, 0, 2, 0x08, 0x00]);
        let ip = [0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255];
        f.extend(ip);
        f.extend([0, 68, 0, 67, 0, 8, 0, 0]);
        let v = EthernetView::parse(&f, 1500).unwrap();
        assert_eq!(
            l3_sender(&v),
            L3Sender::Ipv4 {
                src: Ipv4Addr::UNSPECIFIED,
                dhcp_client: true
            }
        );
        // A header length field pointing past the end is malformed.
        let mut bad = f.clone();
        bad[14] = 0x4f;
        let v = EthernetView::parse(&bad, 1500).unwrap();
        assert_eq!(l3_sender(&v), L3Sender::Malformed);
    }
}

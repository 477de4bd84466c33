//! A scripted TCP peer for driving the gateway's smoltcp stacks in-process: it builds the
//! Ethernet/IP/TCP frames (either IP version) a guest would send (any flags, options, windows, sequence
//! numbers, including ones a well-behaved stack never sends) and reads the gateway's
//! answers. The regression tests and the fuzz targets use it to replay hostile segment
//! sequences without a network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv6Repr,
    IpAddress, NdiscRepr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};

/// One side of a TCP conversation as a guest on the network.
pub struct TcpPeer {
    pub mac: [u8; 6],
    pub ip: IpAddr,
    pub port: u16,
    pub server_mac: [u8; 6],
    pub server_ip: IpAddr,
    pub server_port: u16,
    /// Next sequence number this peer sends.
    pub seq: u32,
    /// What this peer acknowledges.
    pub ack: u32,
}

/// The TCP header fields of a frame the gateway sent to the peer.
#[derive(Debug, Clone)]
pub struct Seen {
    pub control: TcpControl,
    pub seq: u32,
    pub ack: Option<u32>,
    pub window: u16,
    pub window_scale: Option<u8>,
    pub payload: Vec<u8>,
}

/// What a segment the peer sends carries.
#[derive(Debug, Clone, Default)]
pub struct Segment<'a> {
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    /// Acknowledge `TcpPeer::ack` (every segment after the SYN does).
    pub ack: bool,
    pub window: u16,
    pub window_scale: Option<u8>,
    pub mss: Option<u16>,
    /// Sequence number to use instead of `TcpPeer::seq` (for probes and old data).
    pub seq: Option<u32>,
    pub payload: &'a [u8],
}

impl<'a> Segment<'a> {
    /// A segment from 8 bytes of a fuzzer's input, as the TCP fuzz targets play them:
    /// byte 1 the flags (SYN, FIN, RST, ACK, a window scale, an MSS, a sequence number
    /// other than the next, and in bit 7 whether time passes, left to the caller), 2-3
    /// the window, 4-5 a signed offset from `next_seq`, 6-7 the payload's length
    /// (modulo `payload`'s, whose bytes it carries).
    pub fn from_step(step: &[u8; 8], next_seq: u32, payload: &'a [u8]) -> Segment<'a> {
        let flags = step[1];
        let offset = i16::from_be_bytes([step[4], step[5]]) as i32;
        let len = usize::from(u16::from_be_bytes([step[6], step[7]])) % payload.len().max(1);
        Segment {
            syn: flags & 1 != 0,
            fin: flags & 2 != 0,
            rst: flags & 4 != 0,
            ack: flags & 8 != 0,
            window: u16::from_be_bytes([step[2], step[3]]),
            window_scale: (flags & 16 != 0).then_some(step[2] % 15),
            mss: (flags & 32 != 0).then_some(u16::from_be_bytes([step[3], step[2]])),
            seq: (flags & 64 != 0).then_some(next_seq.wrapping_add(offset as u32)),
            payload: &payload[..len.min(payload.len())],
        }
    }
}

impl TcpPeer {
    /// A guest at 10.0.0.`host` (MAC 02:00:00:00:00:`host`) talking to a server at
    /// 10.0.0.1 (MAC 02:00:00:00:00:01) on `server_port`, from port 40000.
    pub fn guest(host: u8, server_port: u16) -> TcpPeer {
        TcpPeer {
            mac: [2, 0, 0, 0, 0, host],
            ip: Ipv4Addr::new(10, 0, 0, host).into(),
            port: 40000,
            server_mac: [2, 0, 0, 0, 0, 1],
            server_ip: Ipv4Addr::new(10, 0, 0, 1).into(),
            server_port,
            seq: 1000,
            ack: 0,
        }
    }

    /// The window overrun that crashed smoltcp (its issue 1048), in the two batches a
    /// test feeds it once connected: `first` (1,459 bytes, here starting a DNS message
    /// announced as 65,535 bytes so a DNS server keeps reading) with a zero-length probe
    /// below the window, which draws a challenge ACK computed while those bytes are
    /// unread; then one segment of 64,500 bytes, past the right edge the server
    /// advertised but within the space it has once it read.
    pub fn window_overrun(&mut self) -> [Vec<Vec<u8>>; 2] {
        let mut first = vec![0xff, 0xff];
        first.extend(std::iter::repeat_n(0u8, 1457));
        let data = self.segment(&Segment {
            ack: true,
            window: 65535,
            payload: &first,
            ..Default::default()
        });
        let probe_seq = self.seq.wrapping_sub(2);
        let probe = self.segment(&Segment {
            ack: true,
            window: 65535,
            seq: Some(probe_seq),
            ..Default::default()
        });
        let past_edge = self.segment(&Segment {
            ack: true,
            window: 65535,
            payload: &[0; 64500],
            ..Default::default()
        });
        [vec![data, probe], vec![past_edge]]
    }

    /// The same peer over IPv6: fd00::`host` talking to fd00::1.
    pub fn guest6(host: u8, server_port: u16) -> TcpPeer {
        TcpPeer {
            ip: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, host.into()).into(),
            server_ip: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).into(),
            ..TcpPeer::guest(host, server_port)
        }
    }

    /// How the peer asks for the server's MAC, from which smoltcp learns the peer's:
    /// an ARP request, or over IPv6 a Neighbour Solicitation.
    pub fn arp_request(&self) -> Vec<u8> {
        let (IpAddr::V4(ip), IpAddr::V4(server_ip)) = (self.ip, self.server_ip) else {
            return self.neighbour_solicit();
        };
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(self.mac),
            source_protocol_addr: ip,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: server_ip,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(self.mac),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        };
        let mut buf = vec![0u8; eth.buffer_len() + arp.buffer_len()];
        let mut frame = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut frame);
        arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
        buf
    }

    fn neighbour_solicit(&self) -> Vec<u8> {
        let (IpAddr::V6(ip), IpAddr::V6(server_ip)) = (self.ip, self.server_ip) else {
            return Vec::new();
        };
        let ns = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr: server_ip,
            lladdr: Some(EthernetAddress(self.mac).into()),
        });
        let group = crate::wire::solicited_node(server_ip);
        let group_mac = crate::wire::ipv6_multicast_mac(group);
        crate::wire::icmp6_frame(fabric::Mac(self.mac), group_mac, ip, group, &ns)
    }

    /// Builds a segment; a sent SYN, FIN or payload advances `seq` unless `seg.seq` is set.
    /// A payload longer than an IPv4 packet can carry is cut to fit.
    pub fn segment(&mut self, seg: &Segment) -> Vec<u8> {
        let control = match (seg.syn, seg.fin, seg.rst) {
            (true, _, _) => TcpControl::Syn,
            (_, true, _) => TcpControl::Fin,
            (_, _, true) => TcpControl::Rst,
            _ => TcpControl::None,
        };
        let seq = seg.seq.unwrap_or(self.seq);
        // The most an IPv4 packet carries after its header and a TCP header with options
        // (an IPv6 one carries 20 bytes more).
        const MAX_PAYLOAD: usize = 65535 - 20 - 60;
        let payload = &seg.payload[..seg.payload.len().min(MAX_PAYLOAD)];
        let tcp = TcpRepr {
            src_port: self.port,
            dst_port: self.server_port,
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: seg.ack.then_some(TcpSeqNumber(self.ack as i32)),
            window_len: seg.window,
            window_scale: seg.window_scale,
            max_seg_size: seg.mss,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        if seg.seq.is_none() {
            self.seq = self.seq.wrapping_add(tcp.segment_len() as u32);
        }
        let from = SocketAddr::new(self.ip, self.port);
        let to = SocketAddr::new(self.server_ip, self.server_port);
        let mac = fabric::Mac;
        crate::wire::tcp_frame(mac(self.mac), mac(self.server_mac), from, to, &tcp).unwrap_or_default()
    }

    /// The TCP segments among `frames` that are addressed to this peer; a SYN, FIN or
    /// payload from the server moves `ack` to the end of what it covered.
    pub fn read(&mut self, frames: &[Vec<u8>]) -> Vec<Seen> {
        let mut seen = Vec::new();
        for f in frames {
            let Some((src, dst, segment)) = crate::wire::tcp_in_frame(f) else {
                continue;
            };
            let (src, dst) = (IpAddress::from(src), IpAddress::from(dst));
            if IpAddr::from(dst) != self.ip {
                continue;
            }
            let Ok(tcp) = TcpPacket::new_checked(segment) else {
                continue;
            };
            if tcp.dst_port() != self.port {
                continue;
            }
            let caps = ChecksumCapabilities::default();
            let Ok(repr) = TcpRepr::parse(&tcp, &src, &dst, &caps) else {
                continue;
            };
            let end = repr.seq_number + repr.segment_len();
            // Only forward: a retransmission of older data leaves the ack where it is.
            // A SYN sets where the server's sequence space starts.
            if repr.control == TcpControl::Syn
                || repr.segment_len() > 0 && (end.0 as u32).wrapping_sub(self.ack) as i32 > 0
            {
                self.ack = end.0 as u32;
            }
            seen.push(Seen {
                control: repr.control,
                seq: repr.seq_number.0 as u32,
                ack: repr.ack_number.map(|a| a.0 as u32),
                window: repr.window_len,
                window_scale: repr.window_scale,
                payload: repr.payload.to_vec(),
            });
        }
        seen
    }
}

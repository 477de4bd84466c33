//! TCP segments of the splice on the wire: a guest's segment read into the fields the
//! splice acts on, and the gateway's segments written with payload peeked in place.
//! Parsing and checksums are smoltcp's wire module; only the layout is ours, because
//! the payload is read by the kernel straight into the frame before the header exists.

use std::net::{IpAddr, SocketAddr};

use fabric::offload::Offload;
use fabric::Mac;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpControl,
    TcpOption, TcpPacket, TcpRepr,
};

use super::conn::Greeting;

pub(super) const ETH: usize = 14;
const IPV4: usize = 20;
const IPV6: usize = 40;
const TCP: usize = 20;

/// A guest's segment, as the splice needs it.
pub(super) struct Seg<'a> {
    pub control: TcpControl,
    pub fin: bool,
    pub seq: u32,
    pub ack: Option<u32>,
    pub window: u16,
    pub greeting: Greeting,
    pub payload: &'a [u8],
}

/// Reads the TCP segment of a frame the dispatcher classified as TCP; None if it is
/// malformed (bad checksum unless `checksum_left`, bad options, flags no stack sends).
pub(super) fn parse(frame: &[u8], checksum_left: bool) -> Option<Seg<'_>> {
    let (src, dst, segment) = crate::wire::tcp_in_frame(frame)?;
    let (src, dst) = (IpAddress::from(src), IpAddress::from(dst));
    let tcp = TcpPacket::new_checked(segment).ok()?;
    let mut caps = ChecksumCapabilities::default();
    if checksum_left {
        caps.tcp = smoltcp::phy::Checksum::Tx;
    }
    let repr = TcpRepr::parse(&tcp, &src, &dst, &caps).ok()?;
    let fin = tcp.fin();
    Some(Seg {
        control: repr.control,
        fin,
        seq: repr.seq_number.0 as u32,
        ack: repr.ack_number.map(|a| a.0 as u32),
        window: repr.window_len,
        greeting: Greeting {
            mss: repr.max_seg_size,
            scale: repr.window_scale,
            window: repr.window_len,
        },
        payload: repr.payload,
    })
}

/// Who a segment goes between.
pub(super) struct Emit {
    pub gateway_mac: Mac,
    pub guest_mac: Mac,
    /// The address the guest talks to (the gateway speaks as it).
    pub from: SocketAddr,
    pub to: SocketAddr,
}

impl Emit {
    /// Where the IP header ends and TCP's begins.
    fn l4(&self) -> usize {
        ETH + if self.from.is_ipv6() { IPV6 } else { IPV4 }
    }

    /// Ethernet, IP and TCP headers without options: where a data segment's payload
    /// starts.
    pub fn headers(&self) -> usize {
        self.l4() + TCP
    }
}

/// The headers' length before a segment's payload, without TCP options, for a
/// connection of either IP version.
pub(super) fn headers_len(ipv6: bool) -> usize {
    ETH + if ipv6 { IPV6 } else { IPV4 } + TCP
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Flags(u8);

impl Flags {
    pub const FIN: Flags = Flags(0x01);
    pub const SYN: Flags = Flags(0x02);
    pub const RST: Flags = Flags(0x04);
    pub const PSH: Flags = Flags(0x08);
    pub const ACK: Flags = Flags(0x10);
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// What a SYN of ours announces.
pub(super) struct SynOptions {
    pub mss: u16,
    pub scale: Option<u8>,
}

/// Frames for the guest, in order, each with what its virtio-net header is to say.
#[derive(Default)]
pub(super) struct Out {
    pub frames: Vec<(Vec<u8>, Offload)>,
}

impl Out {
    /// A frame complete as it is.
    pub fn push(&mut self, frame: Vec<u8>) {
        self.frames.push((frame, Offload::default()));
    }

    pub fn push_offloaded(&mut self, frame: Vec<u8>, offload: Offload) {
        self.frames.push((frame, offload));
    }

    pub fn extend(&mut self, frames: impl IntoIterator<Item = Vec<u8>>) {
        for f in frames {
            self.push(f);
        }
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn truncate(&mut self, len: usize) {
        self.frames.truncate(len);
    }

    /// Whether the last frame is a reset.
    pub fn ends_in_reset(&self) -> bool {
        self.frames.last().is_some_and(|(f, _)| is_reset(f))
    }
}

impl From<Vec<u8>> for Out {
    fn from(frame: Vec<u8>) -> Out {
        let mut out = Out::default();
        out.push(frame);
        out
    }
}

/// A segment with `payload_len` zero bytes of payload (the caller fills them) or none.
pub(super) fn build(
    e: &Emit,
    flags: Flags,
    seq: u32,
    ack: u32,
    window: u16,
    syn: Option<SynOptions>,
    payload_len: usize,
) -> Vec<u8> {
    let mut options = [0u8; 8];
    let mut options_len = 0;
    if let Some(o) = &syn {
        let mut rest = &mut options[..];
        rest = TcpOption::MaxSegmentSize(o.mss).emit(rest);
        if let Some(scale) = o.scale {
            // Padded to a 4-byte boundary with a no-op first.
            rest = TcpOption::NoOperation.emit(rest);
            rest = TcpOption::WindowScale(scale).emit(rest);
        }
        options_len = 8 - rest.len();
    }
    let mut frame = vec![0u8; e.headers() + options_len + payload_len];
    {
        let header_len = TCP + options_len;
        let mut packet = TcpPacket::new_unchecked(&mut frame[e.l4()..]);
        packet.set_header_len(header_len as u8);
        packet.options_mut().copy_from_slice(&options[..options_len]);
    }
    fill(e, &mut frame, flags, seq, ack, window);
    frame
}

/// Writes the Ethernet, IPv4 and TCP headers of a frame whose TCP options (if any) and
/// payload are in place, and its checksums.
pub(super) fn fill(e: &Emit, frame: &mut [u8], flags: Flags, seq: u32, ack: u32, window: u16) {
    fill_headers(e, frame, flags, seq, ack, window);
    let mut tcp = TcpPacket::new_unchecked(&mut frame[e.l4()..]);
    tcp.fill_checksum(&e.from.ip().into(), &e.to.ip().into());
}

/// Like [`fill`], but the TCP checksum is left to the port that delivers the frame,
/// and a payload longer than `mss` is cut into segments there (see
/// [`Offload::defer_tcp_checksum`]): a guest that takes offloads gets one frame, and
/// nobody sums its payload.
pub(super) fn fill_deferred(
    e: &Emit,
    frame: &mut [u8],
    flags: Flags,
    seq: u32,
    ack: u32,
    window: u16,
    mss: u16,
) -> Offload {
    fill_headers(e, frame, flags, seq, ack, window);
    Offload::defer_tcp_checksum(frame, mss).unwrap_or_else(|_| {
        // Not reached: the headers were just written. A complete frame is still right.
        fill(e, frame, flags, seq, ack, window);
        Offload::default()
    })
}

/// Everything but the TCP checksum.
fn fill_headers(e: &Emit, frame: &mut [u8], flags: Flags, seq: u32, ack: u32, window: u16) {
    let ip_len = frame.len() - ETH;
    {
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.set_src_addr(EthernetAddress(e.gateway_mac.0));
        eth.set_dst_addr(EthernetAddress(e.guest_mac.0));
        eth.set_ethertype(if e.from.is_ipv6() {
            EthernetProtocol::Ipv6
        } else {
            EthernetProtocol::Ipv4
        });
    }
    match (e.from.ip(), e.to.ip()) {
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut ip = Ipv6Packet::new_unchecked(&mut frame[ETH..]);
            ip.set_version(6);
            ip.set_traffic_class(0);
            ip.set_flow_label(0);
            ip.set_payload_len((ip_len - IPV6) as u16);
            ip.set_next_header(IpProtocol::Tcp);
            ip.set_hop_limit(64);
            ip.set_src_addr(src);
            ip.set_dst_addr(dst);
        }
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut ip = Ipv4Packet::new_unchecked(&mut frame[ETH..]);
            ip.set_version(4);
            ip.set_header_len(IPV4 as u8);
            ip.set_dscp(0);
            ip.set_ecn(0);
            ip.set_total_len(ip_len as u16);
            ip.set_ident(0);
            ip.clear_flags();
            ip.set_dont_frag(true);
            ip.set_frag_offset(0);
            ip.set_hop_limit(64);
            ip.set_next_header(IpProtocol::Tcp);
            ip.set_src_addr(src);
            ip.set_dst_addr(dst);
            ip.fill_checksum();
        }
        // Not built: a flow's key is made from one packet's addresses (or, for a
        // forward, two IPv4 ones), so its ends are of one version.
        _ => {}
    }
    let mut tcp = TcpPacket::new_unchecked(&mut frame[e.l4()..]);
    if tcp.header_len() < TCP as u8 {
        tcp.set_header_len(TCP as u8);
    }
    tcp.set_src_port(e.from.port());
    tcp.set_dst_port(e.to.port());
    tcp.set_seq_number(smoltcp::wire::TcpSeqNumber(seq as i32));
    tcp.set_ack_number(smoltcp::wire::TcpSeqNumber(ack as i32));
    tcp.clear_flags();
    tcp.set_fin(flags.0 & Flags::FIN.0 != 0);
    tcp.set_syn(flags.0 & Flags::SYN.0 != 0);
    tcp.set_rst(flags.0 & Flags::RST.0 != 0);
    tcp.set_psh(flags.0 & Flags::PSH.0 != 0);
    tcp.set_ack(flags.0 & Flags::ACK.0 != 0);
    tcp.set_window_len(window);
    tcp.set_urgent_at(0);
}

/// A reset at `seq` (no ACK), for a connection the gateway gives up or refuses.
pub(super) fn reset_for(e: &Emit, seq: u32) -> Vec<u8> {
    build(e, Flags::RST, seq, 0, 0, None, 0)
}

/// Whether a frame we built is a reset.
pub(super) fn is_reset(frame: &[u8]) -> bool {
    let ipv6 = frame.get(12..14) == Some(&[0x86, 0xdd]);
    frame
        .get(headers_len(ipv6) - TCP + 13)
        .is_some_and(|f| f & Flags::RST.0 != 0)
}

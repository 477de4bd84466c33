//! Checksum and segmentation offload: what a frame's virtio-net header says about it,
//! and the software fallback for a port that cannot take such a frame.
//!
//! A port that speaks virtio-net headers (a TAP opened with `IFF_VNET_HDR`) may hand
//! the switch a TCP segment of up to 64 KiB with its checksum left for the receiver to
//! fill. Such a frame crosses the switch as it is and leaves as it is on a port that
//! takes offloads; a port that does not (a socketpair, a stream, the gateway) gets it
//! cut into MTU-sized segments, each with complete IP and TCP checksums, here.
//!
//! Written by hand: smoltcp and etherparse parse and build single packets but do not
//! segment one, and smoltcp's IPv6 checksum helpers need its `proto-ipv6` feature,
//! which would change the gateway's own stack. The Internet checksum is a few lines.

use crate::counters::DropReason;
use crate::frame::{EthernetView, ETHERTYPE_IPV4, ETHERTYPE_IPV6};

/// Bytes of the virtio-net header TAP devices use by default (no `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;
/// The longest IP packet a segment offload carries (the IPv4 total length field's limit).
pub const MAX_GSO_PACKET: usize = 65535;

const F_NEEDS_CSUM: u8 = 1;
const F_DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
/// Where a TCP header keeps its checksum (a UDP header keeps it at 6).
const TCP_CSUM_OFFSET: usize = 16;
const TCP_CWR: u8 = 0x80;

/// A checksum left for the receiver: sum from `start` to the end of the frame and store
/// the result at `start + offset` (which holds the pseudo-header's sum meanwhile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialCsum {
    pub start: u16,
    pub offset: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoKind {
    Tcp4,
    Tcp6,
}

/// A TCP segment to be cut into `size`-byte payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    pub kind: GsoKind,
    pub size: u16,
    /// The sender set ECN's CWR and expects it on the first segment only.
    pub ecn: bool,
    /// Bytes of headers, as the sender counted them (a hint passed on to the next port).
    pub hdr_len: u16,
}

/// What a frame's virtio-net header says. The default is a plain frame: complete
/// checksums, no larger than the MTU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offload {
    pub csum: Option<PartialCsum>,
    pub gso: Option<Gso>,
    /// Checksums are known good (the gateway made them): a receiver that takes
    /// virtio-net headers need not verify them. Never taken from a port's own header:
    /// only this process says it.
    pub data_valid: bool,
}

/// A plain frame's offload, for batches that have none.
pub const PLAIN: [Offload; crate::sys::mmsg::BATCH] = [Offload {
    csum: None,
    gso: None,
    data_valid: false,
}; crate::sys::mmsg::BATCH];

impl Offload {
    pub fn is_plain(&self) -> bool {
        self.csum.is_none() && self.gso.is_none()
    }

    /// Whether what is left to the receiver is a TCP segment's work: cutting one, or its
    /// checksum (a partial checksum says its protocol only by where the sum goes).
    pub fn is_tcp(&self) -> bool {
        self.gso.is_some() || self.csum.is_some_and(|c| usize::from(c.offset) == TCP_CSUM_OFFSET)
    }

    /// Reads a virtio-net header (little-endian, as virtio 1.0 and TAP on x86 have it).
    /// UDP fragmentation offload and anything newer is never negotiated, so it is an error.
    pub fn from_vnet_hdr(hdr: &[u8]) -> Result<Offload, DropReason> {
        let hdr = hdr.get(..VNET_HDR_LEN).ok_or(DropReason::Malformed)?;
        let word = |i: usize| u16::from_le_bytes([hdr[i], hdr[i + 1]]);
        let csum = (hdr[0] & F_NEEDS_CSUM != 0).then(|| PartialCsum {
            start: word(6),
            offset: word(8),
        });
        let kind = match hdr[1] & !GSO_ECN {
            GSO_NONE => None,
            GSO_TCPV4 => Some(GsoKind::Tcp4),
            GSO_TCPV6 => Some(GsoKind::Tcp6),
            _ => return Err(DropReason::Malformed),
        };
        let gso = kind.map(|kind| Gso {
            kind,
            size: word(4),
            ecn: hdr[1] & GSO_ECN != 0,
            hdr_len: word(2),
        });
        Ok(Offload {
            csum,
            gso,
            data_valid: false,
        })
    }

    /// The virtio-net header that says this.
    pub fn to_vnet_hdr(&self) -> [u8; VNET_HDR_LEN] {
        let mut hdr = [0u8; VNET_HDR_LEN];
        if self.data_valid {
            hdr[0] = F_DATA_VALID;
        }
        if let Some(c) = self.csum {
            hdr[0] = F_NEEDS_CSUM;
            hdr[6..8].copy_from_slice(&c.start.to_le_bytes());
            hdr[8..10].copy_from_slice(&c.offset.to_le_bytes());
        }
        if let Some(g) = self.gso {
            hdr[1] = match g.kind {
                GsoKind::Tcp4 => GSO_TCPV4,
                GsoKind::Tcp6 => GSO_TCPV6,
            } | if g.ecn { GSO_ECN } else { 0 };
            hdr[2..4].copy_from_slice(&g.hdr_len.to_le_bytes());
            hdr[4..6].copy_from_slice(&g.size.to_le_bytes());
        }
        hdr
    }

    /// Whether the frame can be what its header says, on a network of `mtu`: the
    /// checksum's place inside the frame, a segment offload on a TCP packet of its IP
    /// version whose segments fit the MTU. Checked once, where the frame enters.
    pub fn check(&self, frame: &[u8], mtu: usize) -> Result<(), DropReason> {
        if let Some(c) = self.csum {
            let at = usize::from(c.start) + usize::from(c.offset);
            if usize::from(c.start) >= frame.len() || at + 2 > frame.len() {
                return Err(DropReason::Malformed);
            }
        }
        if let Some(g) = self.gso {
            let tcp = TcpFrame::parse(frame).ok_or(DropReason::Malformed)?;
            let matches = matches!((g.kind, tcp.v6), (GsoKind::Tcp4, false) | (GsoKind::Tcp6, true));
            if !matches || g.size == 0 || self.csum.is_none() {
                return Err(DropReason::Malformed);
            }
            if tcp.payload - tcp.l3 + usize::from(g.size) > mtu {
                return Err(DropReason::Oversize);
            }
        }
        Ok(())
    }
}

impl Offload {
    /// Leaves an Ethernet/IP/TCP frame's TCP checksum to whoever delivers it, for a
    /// sender in this process that builds its own segments (the gateway's TCP splice):
    /// the field gets the pseudo-header's sum over the whole segment's length, as Linux
    /// leaves it, and the offload says where the checksum goes; a payload longer than
    /// `segment_size` is to be cut into segments of that size. A port that takes
    /// offloads gets the frame as it is, any other the software fallback
    /// ([`SoftFrames`]); either way the payload is summed at most once, by whoever must.
    pub fn defer_tcp_checksum(frame: &mut [u8], segment_size: u16) -> Result<Offload, DropReason> {
        let tcp = TcpFrame::parse(frame).ok_or(DropReason::Malformed)?;
        if segment_size == 0 {
            return Err(DropReason::Malformed);
        }
        let pseudo = fold(pseudo_header_sum(frame, &tcp, frame.len() - tcp.l4));
        frame[tcp.l4 + TCP_CSUM_OFFSET..tcp.l4 + TCP_CSUM_OFFSET + 2].copy_from_slice(&pseudo.to_be_bytes());
        let segmented = frame.len() - tcp.payload > usize::from(segment_size);
        Ok(Offload {
            csum: Some(PartialCsum {
                start: tcp.l4 as u16,
                offset: TCP_CSUM_OFFSET as u16,
            }),
            gso: segmented.then_some(Gso {
                kind: if tcp.v6 { GsoKind::Tcp6 } else { GsoKind::Tcp4 },
                size: segment_size,
                ecn: false,
                hdr_len: tcp.payload as u16,
            }),
            data_valid: false,
        })
    }
}

/// Where the headers of an Ethernet/IP/TCP frame end.
struct TcpFrame {
    l3: usize,
    l4: usize,
    payload: usize,
    v6: bool,
}

impl TcpFrame {
    fn parse(frame: &[u8]) -> Option<TcpFrame> {
        let view = EthernetView::parse(frame, MAX_GSO_PACKET).ok()?;
        let (ethertype, ip) = view.inner()?;
        let l3 = frame.len() - ip.len();
        let (l4, v6) = match ethertype {
            ETHERTYPE_IPV4 => {
                let ihl = usize::from(ip.first()? & 0x0f) * 4;
                let whole = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
                // Not a fragment, carrying TCP, its length the frame's.
                let fragment = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff;
                if ip[0] >> 4 != 4 || ihl < 20 || ip.get(9) != Some(&6) || fragment != 0 || whole != ip.len() {
                    return None;
                }
                (l3 + ihl, false)
            }
            // Extension headers are not followed: TCP must come next.
            ETHERTYPE_IPV6 => {
                let payload_len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
                if ip[0] >> 4 != 6 || ip.get(6) != Some(&6) || payload_len + 40 != ip.len() {
                    return None;
                }
                (l3 + 40, true)
            }
            _ => return None,
        };
        let data_offset = usize::from(frame.get(l4 + 12)? >> 4) * 4;
        let payload = l4 + data_offset;
        (data_offset >= 20 && payload <= frame.len()).then_some(TcpFrame { l3, l4, payload, v6 })
    }
}

/// Frames made in software for a port that takes no offloads, in buffers reused from
/// batch to batch.
#[derive(Default)]
pub struct SoftFrames {
    bufs: Vec<Vec<u8>>,
    len: usize,
    cuts: TcpCuts,
}

impl SoftFrames {
    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn frames(&self) -> &[Vec<u8>] {
        &self.bufs[..self.len]
    }

    fn next(&mut self) -> &mut Vec<u8> {
        next_buffer(&mut self.bufs, &mut self.len)
    }

    /// Appends `frame` as a port without offloads must see it: cut into segments and
    /// checksummed as its offload asks (copied as it is when plain). The frame passed
    /// [`Offload::check`]; a frame that still does not parse is an error, never a panic,
    /// and leaves nothing of itself behind.
    pub fn push(&mut self, frame: &[u8], off: &Offload) -> Result<(), DropReason> {
        let before = self.len;
        let made = self.make(frame, off);
        if made.is_err() {
            self.len = before;
        }
        made
    }

    fn make(&mut self, frame: &[u8], off: &Offload) -> Result<(), DropReason> {
        match (off.gso, off.csum) {
            (Some(gso), _) => self.segment(frame, &gso),
            (None, Some(csum)) => {
                let buf = self.next();
                buf.extend_from_slice(frame);
                complete_checksum(buf, csum)
            }
            (None, None) => {
                self.next().extend_from_slice(frame);
                Ok(())
            }
        }
    }

    fn segment(&mut self, frame: &[u8], gso: &Gso) -> Result<(), DropReason> {
        self.cuts.clear();
        let cut = self.cuts.cut(frame, gso)?;
        for k in cut {
            let (headers, payload) = self.cuts.segment(k);
            let buf = next_buffer(&mut self.bufs, &mut self.len);
            buf.extend_from_slice(headers);
            buf.extend_from_slice(&frame[payload]);
        }
        Ok(())
    }
}

fn next_buffer<'b>(bufs: &'b mut Vec<Vec<u8>>, len: &mut usize) -> &'b mut Vec<u8> {
    if *len == bufs.len() {
        bufs.push(Vec::new());
    }
    let buf = &mut bufs[*len];
    *len += 1;
    buf.clear();
    buf
}

/// A TCP segmentation offload's segments, cut without a copy of their payload: each
/// segment's headers are made here (lengths, IP ID, sequence number, flags, complete
/// checksums), its payload is a range of the offloaded frame. A sender that gathers
/// (`sendmsg` with an iovec per part) sends them straight from the frame; cuts of
/// several frames accumulate until [`TcpCuts::clear`].
#[derive(Default)]
pub struct TcpCuts {
    headers: Vec<u8>,
    /// Per segment: its headers' range in `headers`, its payload's range in its frame.
    segments: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

impl TcpCuts {
    pub fn clear(&mut self) {
        self.headers.clear();
        self.segments.clear();
    }

    /// The segments cut so far.
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Segment `k`'s headers, and where its payload lies in the frame it was cut from.
    pub fn segment(&self, k: usize) -> (&[u8], std::ops::Range<usize>) {
        let (headers, payload) = &self.segments[k];
        (&self.headers[headers.clone()], payload.clone())
    }

    /// Cuts `frame` (a TCP segment of up to 64 KiB that passed [`Offload::check`]) into
    /// segments of `gso.size` payload bytes, the last possibly shorter; returns the
    /// indices of its segments. A frame that does not parse is an error and leaves
    /// nothing of itself behind.
    pub fn cut(&mut self, frame: &[u8], gso: &Gso) -> Result<std::ops::Range<usize>, DropReason> {
        self.cut_after(&[], frame, gso)
    }

    /// [`Self::cut`], each segment's headers preceded by `prefix` (a tunnel's header):
    /// one part fewer per datagram for a sender to gather, and for the kernel to copy
    /// from (a copy per part costs more than its bytes when parts are this small).
    pub fn cut_after(&mut self, prefix: &[u8], frame: &[u8], gso: &Gso) -> Result<std::ops::Range<usize>, DropReason> {
        let tcp = TcpFrame::parse(frame).ok_or(DropReason::Malformed)?;
        let size = usize::from(gso.size);
        if size == 0 {
            return Err(DropReason::Malformed);
        }
        let first = self.segments.len();
        let headers = &frame[..tcp.payload];
        let seq = u32::from_be_bytes(headers[tcp.l4 + 4..tcp.l4 + 8].try_into().expect("TCP header parsed"));
        let ip_id = u16::from_be_bytes([headers[tcp.l3 + 4], headers[tcp.l3 + 5]]);
        let flags = headers[tcp.l4 + 13];
        let data_len = frame.len() - tcp.payload;
        let count = data_len.div_ceil(size).max(1);
        for k in 0..count {
            let payload = tcp.payload + k * size..(tcp.payload + (k + 1) * size).min(frame.len());
            let at = self.headers.len();
            self.headers.extend_from_slice(prefix);
            let own = self.headers.len();
            self.headers.extend_from_slice(headers);
            let buf = &mut self.headers[own..];
            let ip_len = headers.len() + payload.len() - tcp.l3;
            if tcp.v6 {
                let payload_len = (ip_len - 40) as u16;
                buf[tcp.l3 + 4..tcp.l3 + 6].copy_from_slice(&payload_len.to_be_bytes());
            } else {
                buf[tcp.l3 + 2..tcp.l3 + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
                let id = ip_id.wrapping_add(k as u16);
                buf[tcp.l3 + 4..tcp.l3 + 6].copy_from_slice(&id.to_be_bytes());
                buf[tcp.l3 + 10..tcp.l3 + 12].fill(0);
                let sum = !fold(sum_words(&buf[tcp.l3..tcp.l4], 0));
                buf[tcp.l3 + 10..tcp.l3 + 12].copy_from_slice(&sum.to_be_bytes());
            }
            let seq_k = seq.wrapping_add((k * size) as u32);
            buf[tcp.l4 + 4..tcp.l4 + 8].copy_from_slice(&seq_k.to_be_bytes());
            let mut f = flags;
            if k + 1 < count {
                f &= !(TCP_FIN | TCP_PSH);
            }
            if k > 0 {
                f &= !TCP_CWR;
            }
            buf[tcp.l4 + 13] = f;
            buf[tcp.l4 + TCP_CSUM_OFFSET..tcp.l4 + TCP_CSUM_OFFSET + 2].fill(0);
            // The TCP header is a whole number of 32-bit words, so the payload's sum
            // continues the header's.
            let pseudo = pseudo_header_sum(buf, &tcp, ip_len - (tcp.l4 - tcp.l3));
            let sum = !fold(sum_words(&frame[payload.clone()], sum_words(&buf[tcp.l4..], pseudo)));
            buf[tcp.l4 + TCP_CSUM_OFFSET..tcp.l4 + TCP_CSUM_OFFSET + 2].copy_from_slice(&sum.to_be_bytes());
            self.segments.push((at..self.headers.len(), payload));
        }
        Ok(first..self.segments.len())
    }
}

/// Fills a checksum left partial: the one's-complement sum from `start` to the end,
/// which includes the pseudo-header sum the sender left in the field.
fn complete_checksum(frame: &mut [u8], csum: PartialCsum) -> Result<(), DropReason> {
    let start = usize::from(csum.start);
    let at = start + usize::from(csum.offset);
    if start >= frame.len() || at + 2 > frame.len() {
        return Err(DropReason::Malformed);
    }
    // A sum of zero is written as 0xffff, its other one's-complement form: to UDP a zero
    // field means "no checksum" (and is invalid over IPv6), as the kernel also avoids.
    let sum = match !fold(sum_words(&frame[start..], 0)) {
        0 => 0xffff,
        sum => sum,
    };
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Merges runs of consecutive IPv4 TCP segments of one flow into one segment whose
/// cutting and checksum are left to the port that takes it (what Linux's GRO does for a
/// NIC): frames that crossed a tunnel one MTU at a time reach a guest that takes
/// offloads as one 64 KiB write instead of forty. A segment joins a run only with its
/// own checksums right (so a damaged one is never re-summed into a good one), the
/// run's headers (addresses, ports, acknowledgement, window, options), the next
/// sequence number, the run's segment size (a shorter one, or one with PSH, ends the
/// run) and only ACK and PSH set. Everything else passes untouched, in order.
#[derive(Default)]
pub struct TcpCoalescer {
    out: std::collections::VecDeque<(Vec<u8>, Offload)>,
    run: Option<Run>,
}

struct Run {
    frame: Vec<u8>,
    l3: usize,
    l4: usize,
    payload: usize,
    segment: usize,
    segments: usize,
    next_seq: u32,
    /// A shorter segment or PSH came: nothing more joins.
    closed: bool,
}

const TCP_ACK: u8 = 0x10;

impl TcpCoalescer {
    /// Takes the next frame received.
    pub fn push(&mut self, frame: &[u8]) {
        self.push_into(frame, Vec::new);
    }

    /// [`Self::push`], a frame that needs a buffer of its own copied into `buffer()`
    /// (a spent one from a pool: fresh memory costs a page fault per page on first
    /// touch, more than the copy).
    pub fn push_into(&mut self, frame: &[u8], buffer: impl FnOnce() -> Vec<u8>) {
        if let Some(run) = &mut self.run {
            if run.take(frame) {
                return;
            }
            self.close();
        }
        let mut buf = buffer();
        buf.clear();
        match Run::start(frame) {
            Some(mut run) => {
                buf.reserve(MAX_GSO_PACKET);
                buf.extend_from_slice(frame);
                run.frame = buf;
                self.run = Some(run);
            }
            None => {
                buf.extend_from_slice(frame);
                self.out.push_back((buf, Offload::default()));
            }
        }
    }

    fn close(&mut self) {
        if let Some(run) = self.run.take() {
            self.out.push_back(run.finish());
        }
    }

    /// What was pushed, merged where it could be, in order; the run in progress ends.
    pub fn finish(&mut self) -> &mut std::collections::VecDeque<(Vec<u8>, Offload)> {
        self.close();
        &mut self.out
    }
}

impl Run {
    /// A run starting with `frame`, if it can start one: a good IPv4 TCP segment with
    /// payload, no IP options, only ACK (and PSH) set. Its `frame` is the caller's to
    /// fill with `frame`.
    fn start(frame: &[u8]) -> Option<Run> {
        let tcp = TcpFrame::parse(frame)?;
        let len = frame.len() - tcp.payload;
        let flags = frame[tcp.l4 + 13];
        if tcp.v6 || tcp.l4 - tcp.l3 != 20 || len == 0 || flags & !TCP_PSH != TCP_ACK || !checksums_good(frame, &tcp) {
            return None;
        }
        Some(Run {
            frame: Vec::new(),
            l3: tcp.l3,
            l4: tcp.l4,
            payload: tcp.payload,
            segment: len,
            segments: 1,
            next_seq: seq(frame, tcp.l4).wrapping_add(len as u32),
            closed: flags & TCP_PSH != 0,
        })
    }

    /// Appends `frame`'s payload if it continues this run.
    fn take(&mut self, frame: &[u8]) -> bool {
        if self.closed || frame.len() <= self.payload || frame.len() - self.payload > self.segment {
            return false;
        }
        let len = frame.len() - self.payload;
        if self.frame.len() + len > MAX_GSO_PACKET {
            return false;
        }
        let (l3, l4) = (self.l3, self.l4);
        let h = &self.frame;
        let same = frame[..l3 + 2] == h[..l3 + 2] // Ethernet, IP version, header length, TOS
            && frame[l3 + 6..l3 + 10] == h[l3 + 6..l3 + 10] // fragment bits, TTL, protocol
            && frame[l3 + 12..l4 + 4] == h[l3 + 12..l4 + 4] // addresses, ports
            && frame[l4 + 8..l4 + 13] == h[l4 + 8..l4 + 13] // acknowledgement, data offset
            && frame[l4 + 14..l4 + 16] == h[l4 + 14..l4 + 16] // window
            && frame[l4 + 20..self.payload] == h[l4 + 20..self.payload]; // options
        let flags = frame[l4 + 13];
        if !same || flags & !TCP_PSH != TCP_ACK || seq(frame, l4) != self.next_seq {
            return false;
        }
        let Some(tcp) = TcpFrame::parse(frame) else {
            return false;
        };
        if tcp.payload != self.payload || !checksums_good(frame, &tcp) {
            return false;
        }
        self.frame.extend_from_slice(&frame[self.payload..]);
        self.frame[l4 + 13] |= flags & TCP_PSH;
        self.segments += 1;
        self.next_seq = self.next_seq.wrapping_add(len as u32);
        self.closed = len < self.segment || flags & TCP_PSH != 0;
        true
    }

    /// The merged segment, its IP length and checksum set and its TCP checksum left
    /// partial; one segment alone as it came.
    fn finish(mut self) -> (Vec<u8>, Offload) {
        if self.segments == 1 {
            return (self.frame, Offload::default());
        }
        let l3 = self.l3;
        let total = (self.frame.len() - l3) as u16;
        self.frame[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
        self.frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let sum = !fold(sum_words(&self.frame[l3..self.l4], 0));
        self.frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
        match Offload::defer_tcp_checksum(&mut self.frame, self.segment as u16) {
            Ok(offload) => (self.frame, offload),
            // Not reached: the run's first frame parsed as a TCP segment.
            Err(_) => (self.frame, Offload::default()),
        }
    }
}

fn seq(frame: &[u8], l4: usize) -> u32 {
    u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]])
}

/// Whether an IPv4 TCP segment's IP header and TCP checksums are right.
fn checksums_good(frame: &[u8], tcp: &TcpFrame) -> bool {
    let ip_ok = fold(sum_words(&frame[tcp.l3..tcp.l4], 0)) == 0xffff;
    let tcp_len = frame.len() - tcp.l4;
    let tcp_ok = fold(sum_words(&frame[tcp.l4..], pseudo_header_sum(frame, tcp, tcp_len))) == 0xffff;
    ip_ok && tcp_ok
}

/// The TCP pseudo-header's sum: addresses, protocol and the TCP length.
fn pseudo_header_sum(frame: &[u8], tcp: &TcpFrame, tcp_len: usize) -> u32 {
    let addrs = if tcp.v6 {
        &frame[tcp.l3 + 8..tcp.l3 + 40]
    } else {
        &frame[tcp.l3 + 12..tcp.l3 + 20]
    };
    sum_words(addrs, 6 + tcp_len as u32)
}

/// Adds `bytes` as big-endian 16-bit words to `acc` (an odd last byte padded with
/// zero), in one's-complement arithmetic: the result folds (see [`fold`]) to the same
/// 16 bits. 2^16 is 1 modulo 2^16 - 1, so 32-bit words summed wide (see
/// [`crate::sys::wide_sum`]) give the same checksum; read in the machine's byte order,
/// the sum comes out byte-swapped, which a swap of the folded result undoes (RFC 1071
/// 2B).
fn sum_words(bytes: &[u8], acc: u32) -> u32 {
    let whole = bytes.len() & !3;
    let wide = crate::sys::wide_sum::sum_u32_words(&bytes[..whole]);
    let native = fold64((wide >> 32) + (wide & 0xffff_ffff));
    let folded = if cfg!(target_endian = "little") {
        native.swap_bytes()
    } else {
        native
    };
    let mut sum = u64::from(acc) + u64::from(folded);
    let mut pairs = bytes[whole..].chunks_exact(2);
    for p in &mut pairs {
        sum += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff_ffff {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// RFC 1071's sum of `bytes` as big-endian 16-bit words, folded and not complemented
/// (what a checksum field holds the complement of).
pub fn ones_complement_sum(bytes: &[u8]) -> u16 {
    fold(sum_words(bytes, 0))
}

fn fold64(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn fold(acc: u32) -> u16 {
    fold64(u64::from(acc))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    /// A TCP segment carrying `payload` with its checksum left partial, as a kernel
    /// with checksum offload hands it over: the pseudo-header's sum in the field.
    fn tcp_frame(v6: bool, payload: &[u8], flags: u8) -> (Vec<u8>, PartialCsum) {
        let mut f = Vec::new();
        f.extend_from_slice(&MAC_B);
        f.extend_from_slice(&MAC_A);
        let tcp_len = 20 + payload.len();
        if v6 {
            f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            f.extend_from_slice(&[6, 64]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
            f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
            let sum = !fold(sum_words(&f[14..34], 0));
            f[24..26].copy_from_slice(&sum.to_be_bytes());
        }
        let l4 = f.len();
        f.extend_from_slice(&[0x30, 0x39, 0x00, 0x50]);
        f.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
        let tcp = TcpFrame::parse(&f).unwrap();
        let pseudo = fold(pseudo_header_sum(&f, &tcp, tcp_len));
        f[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
        let csum = PartialCsum {
            start: l4 as u16,
            offset: 16,
        };
        (f, csum)
    }

    /// Checks a segment's IP and TCP checksums with smoltcp (an independent reader)
    /// and returns its sequence number, flags and payload.
    fn verify(seg: &[u8], v6: bool) -> (u32, u8, Vec<u8>) {
        use smoltcp::wire::{EthernetFrame, IpAddress, Ipv4Packet, TcpPacket};
        let eth = EthernetFrame::new_checked(seg).unwrap();
        let (tcp_bytes, src, dst) = if v6 {
            let ip = eth.payload();
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            assert_eq!(plen + 40, ip.len(), "IPv6 payload length");
            let tcp = TcpFrame::parse(seg).unwrap();
            let sum = fold(sum_words(
                &seg[tcp.l4..],
                pseudo_header_sum(seg, &tcp, seg.len() - tcp.l4),
            ));
            assert_eq!(sum, 0xffff, "TCP checksum over IPv6");
            let t = TcpPacket::new_checked(&ip[40..]).unwrap();
            return (t.seq_number().0 as u32, ip[40 + 13], t.payload().to_vec());
        } else {
            let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
            assert!(ip.verify_checksum(), "IPv4 header checksum");
            (
                ip.payload().to_vec(),
                IpAddress::Ipv4(ip.src_addr()),
                IpAddress::Ipv4(ip.dst_addr()),
            )
        };
        let t = TcpPacket::new_checked(&tcp_bytes[..]).unwrap();
        assert!(t.verify_checksum(&src, &dst), "TCP checksum over IPv4");
        (t.seq_number().0 as u32, tcp_bytes[13], t.payload().to_vec())
    }

    #[test]
    fn a_large_segment_is_cut_into_checksummed_segments_that_carry_the_same_bytes() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for v6 in [false, true] {
            let (frame, csum) = tcp_frame(v6, &payload, TCP_PSH | TCP_FIN | 0x10);
            let off = Offload {
                csum: Some(csum),
                gso: Some(Gso {
                    kind: if v6 { GsoKind::Tcp6 } else { GsoKind::Tcp4 },
                    size: 1400,
                    ecn: false,
                    hdr_len: 0,
                }),
                data_valid: false,
            };
            off.check(&frame, 1500).unwrap();
            let mut soft = SoftFrames::default();
            soft.push(&frame, &off).unwrap();
            assert_eq!(soft.frames().len(), 8, "10000 bytes in 1400-byte segments");
            let mut joined = Vec::new();
            for (k, seg) in soft.frames().iter().enumerate() {
                let (seq, flags, data) = verify(seg, v6);
                assert_eq!(seq, 0xffff_fff0u32.wrapping_add(joined.len() as u32), "seq wraps");
                let last = k == 7;
                assert_eq!(flags & (TCP_FIN | TCP_PSH) != 0, last, "FIN and PSH on the last only");
                assert!(seg.len() <= 1514);
                joined.extend_from_slice(&data);
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn cuts_of_several_frames_accumulate_and_point_into_their_own_frame() {
        let gso = |v6: bool| Gso {
            kind: if v6 { GsoKind::Tcp6 } else { GsoKind::Tcp4 },
            size: 1000,
            ecn: false,
            hdr_len: 0,
        };
        let frames: Vec<(Vec<u8>, bool)> = [(2500, false), (0, true), (1000, false)]
            .into_iter()
            .map(|(len, v6)| {
                let payload: Vec<u8> = (0..len as u32).map(|i| (i * 31 % 241) as u8).collect();
                (tcp_frame(v6, &payload, 0x10).0, v6)
            })
            .collect();
        let mut cuts = TcpCuts::default();
        let ranges: Vec<_> = frames.iter().map(|(f, v6)| cuts.cut(f, &gso(*v6)).unwrap()).collect();
        assert_eq!(ranges, [0..3, 3..4, 4..5], "three, one (no payload) and one segments");
        assert!(cuts.cut(&frames[0].0[..30], &gso(false)).is_err());
        assert_eq!(cuts.len(), 5, "a refused frame leaves nothing behind");
        for ((frame, v6), range) in frames.iter().zip(ranges) {
            let mut joined = Vec::new();
            for k in range {
                let (headers, payload) = cuts.segment(k);
                let segment = [headers, &frame[payload]].concat();
                joined.extend(verify(&segment, *v6).2);
            }
            let tcp = TcpFrame::parse(frame).unwrap();
            assert_eq!(joined, frame[tcp.payload..]);
        }
        cuts.clear();
        assert!(cuts.is_empty());
    }

    #[test]
    fn a_prefix_precedes_each_segments_headers_and_is_not_summed() {
        let gso = Gso {
            kind: GsoKind::Tcp4,
            size: 1000,
            ecn: false,
            hdr_len: 0,
        };
        let payload: Vec<u8> = (0..2500u32).map(|i| (i * 7 % 251) as u8).collect();
        let frame = tcp_frame(false, &payload, 0x10).0;
        let (mut plain, mut prefixed) = (TcpCuts::default(), TcpCuts::default());
        let prefix = [0x08, 0, 0, 0, 0, 0, 42, 0];
        assert_eq!(plain.cut(&frame, &gso).unwrap(), 0..3);
        assert_eq!(prefixed.cut_after(&prefix, &frame, &gso).unwrap(), 0..3);
        for k in 0..3 {
            let ((headers, payload), (with_prefix, same_payload)) = (plain.segment(k), prefixed.segment(k));
            assert_eq!(with_prefix, [&prefix[..], headers].concat(), "segment {k}");
            assert_eq!(payload, same_payload);
            verify(&[headers, &frame[payload]].concat(), false);
        }
    }

    #[test]
    fn a_deferred_checksum_is_what_a_kernel_leaves_and_completes_to_a_valid_one() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 13 % 253) as u8).collect();
        for v6 in [false, true] {
            let (kernel_made, csum) = tcp_frame(v6, &payload, TCP_PSH | 0x10);
            // The same frame with a garbage checksum field, as a sender that builds
            // headers and leaves the sum.
            let mut ours = kernel_made.clone();
            let at = usize::from(csum.start + csum.offset);
            ours[at..at + 2].copy_from_slice(&[0xde, 0xad]);
            let off = Offload::defer_tcp_checksum(&mut ours, 1400).unwrap();
            assert_eq!(ours, kernel_made, "the pseudo-header sum, as Linux leaves it");
            assert_eq!(off.csum, Some(csum));
            let gso = off.gso.expect("5000 bytes are more than a 1400-byte segment");
            assert_eq!((gso.size, usize::from(gso.hdr_len)), (1400, ours.len() - payload.len()));
            off.check(&ours, 1500).unwrap();
            let mut soft = SoftFrames::default();
            soft.push(&ours, &off).unwrap();
            let joined: Vec<u8> = soft.frames().iter().flat_map(|s| verify(s, v6).2).collect();
            assert_eq!(joined, payload);
            // One segment's worth: the checksum is deferred, the frame not cut.
            let (mut small, _) = tcp_frame(v6, &payload[..1400], 0x10);
            let off = Offload::defer_tcp_checksum(&mut small, 1400).unwrap();
            assert_eq!((off.csum.is_some(), off.gso), (true, None));
            soft.clear();
            soft.push(&small, &off).unwrap();
            verify(&soft.frames()[0], v6);
        }
        assert_eq!(
            Offload::defer_tcp_checksum(&mut [0u8; 60], 1400),
            Err(DropReason::Malformed),
            "not a TCP frame"
        );
    }

    #[test]
    fn a_partial_checksum_alone_is_completed() {
        let (frame, csum) = tcp_frame(false, b"hello, offload", TCP_PSH | 0x10);
        let off = Offload {
            csum: Some(csum),
            ..Offload::default()
        };
        let mut soft = SoftFrames::default();
        soft.push(&frame, &off).unwrap();
        verify(&soft.frames()[0], false);
    }

    #[test]
    fn only_tcp_work_left_to_the_receiver_counts_as_tcp() {
        let udp = PartialCsum { start: 34, offset: 6 };
        let tcp = PartialCsum { start: 34, offset: 16 };
        assert!(!Offload::default().is_tcp());
        assert!(!Offload {
            csum: Some(udp),
            ..Default::default()
        }
        .is_tcp());
        assert!(Offload {
            csum: Some(tcp),
            ..Default::default()
        }
        .is_tcp());
        let mut frame = tcp_frame(false, &[7u8; 3000], 0x10).0;
        assert!(Offload::defer_tcp_checksum(&mut frame, 1460).unwrap().is_tcp());
    }

    #[test]
    fn a_completed_checksum_is_never_zero() {
        // Bytes whose one's-complement sum is 0xffff: the checksum computes to zero.
        let mut frame = vec![0u8; 20];
        frame[10..12].copy_from_slice(&0xffffu16.to_be_bytes());
        let csum = PartialCsum { start: 0, offset: 16 };
        complete_checksum(&mut frame, csum).unwrap();
        assert_eq!(&frame[16..18], &[0xff, 0xff]);
    }

    #[test]
    fn segments_that_would_not_fit_the_mtu_and_lying_headers_are_refused() {
        let (frame, csum) = tcp_frame(false, &[0u8; 4000], 0x10);
        let gso = Gso {
            kind: GsoKind::Tcp4,
            size: 1460,
            ecn: false,
            hdr_len: 0,
        };
        let off = Offload {
            csum: Some(csum),
            gso: Some(gso),
            data_valid: false,
        };
        assert_eq!(off.check(&frame, 1400), Err(DropReason::Oversize));
        let v6 = Offload {
            gso: Some(Gso {
                kind: GsoKind::Tcp6,
                ..gso
            }),
            ..off
        };
        assert_eq!(v6.check(&frame, 1500), Err(DropReason::Malformed), "kind must match");
        let far = Offload {
            csum: Some(PartialCsum {
                start: 60,
                offset: 5000,
            }),
            ..Offload::default()
        };
        assert_eq!(far.check(&frame, 1500), Err(DropReason::Malformed));
        assert!(SoftFrames::default().push(&frame, &far).is_err());
        for cut in [0, 13, 20, 40, 54] {
            assert!(SoftFrames::default().push(&frame[..cut], &off).is_err(), "{cut}");
        }
    }

    #[test]
    fn the_wide_sum_folds_to_the_sum_of_16_bit_words() {
        let data: Vec<u8> = (0..70_004u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let lengths = (0..100).chain([1499, 1500, 65_535, 70_000]);
        for (len, start) in lengths.flat_map(|len| (0..4).map(move |start| (len, start))) {
            let bytes = &data[start..start + len];
            let mut plain = 0u64;
            for (i, b) in bytes.iter().enumerate() {
                plain += u64::from(*b) << if i % 2 == 0 { 8 } else { 0 };
            }
            while plain > 0xffff {
                plain = (plain & 0xffff) + (plain >> 16);
            }
            assert_eq!(
                fold(sum_words(bytes, 0x1234)),
                fold(plain as u32 + 0x1234),
                "{len} from {start}"
            );
            // All ones, where every carry counts.
            let ones = vec![0xffu8; len];
            let expected = match len {
                0 => 0,
                _ if len % 2 == 1 => 0xff00,
                _ => 0xffff,
            };
            assert_eq!(fold(sum_words(&ones, 0)), expected, "{len}");
        }
    }

    #[test]
    fn headers_round_trip() {
        let off = Offload {
            csum: Some(PartialCsum { start: 34, offset: 16 }),
            gso: Some(Gso {
                kind: GsoKind::Tcp6,
                size: 1440,
                ecn: true,
                hdr_len: 74,
            }),
            data_valid: false,
        };
        assert_eq!(Offload::from_vnet_hdr(&off.to_vnet_hdr()), Ok(off));
        let vouched = Offload {
            data_valid: true,
            ..Offload::default()
        };
        assert_eq!(vouched.to_vnet_hdr()[0], F_DATA_VALID);
        assert_eq!(
            Offload::from_vnet_hdr(&vouched.to_vnet_hdr()),
            Ok(Offload::default()),
            "a port cannot vouch for its own checksums"
        );
        assert_eq!(Offload::from_vnet_hdr(&[0; 10]), Ok(Offload::default()));
        assert_eq!(
            Offload::from_vnet_hdr(&[0, 3, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DropReason::Malformed),
            "UFO"
        );
        assert_eq!(Offload::from_vnet_hdr(&[0; 4]), Err(DropReason::Malformed));
    }

    /// A whole IPv4 segment of one flow at `seq`, its checksums complete (as it comes
    /// out of a tunnel).
    fn segment(seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
        let (mut f, csum) = tcp_frame(false, payload, flags);
        let l4 = usize::from(csum.start);
        f[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        f[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let tcp = TcpFrame::parse(&f).unwrap();
        let sum = !fold(sum_words(&f[l4..], pseudo_header_sum(&f, &tcp, f.len() - l4)));
        f[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
        f
    }

    #[test]
    fn consecutive_segments_of_a_flow_merge_into_one_that_cuts_back_into_them() {
        let payload: Vec<u8> = (0..4500u32).map(|i| (i * 7 % 251) as u8).collect();
        let sizes = [1000, 1000, 1000, 1000, 500];
        let mut coalescer = TcpCoalescer::default();
        let mut at = 0;
        let mut originals = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let flags = if i == sizes.len() - 1 { 0x18 } else { 0x10 };
            let seg = segment(1000 + at as u32, &payload[at..at + size], flags);
            coalescer.push(&seg);
            originals.push(seg);
            at += size;
        }
        let out: Vec<_> = coalescer.finish().drain(..).collect();
        assert_eq!(out.len(), 1, "one segment");
        let (merged, off) = &out[0];
        let gso = off.gso.expect("left to cut");
        assert_eq!((gso.size, gso.kind), (1000, GsoKind::Tcp4));
        let mut soft = SoftFrames::default();
        soft.push(merged, off).unwrap();
        let cut = soft.frames();
        assert_eq!(cut.len(), 5);
        let mut got = Vec::new();
        for (i, seg) in cut.iter().enumerate() {
            let (seq, flags, data) = verify(seg, false);
            assert_eq!(seq, 1000 + got.len() as u32);
            assert_eq!(flags & 0x08 != 0, i == 4, "PSH on the last only");
            got.extend(data);
        }
        assert_eq!(got, payload, "the same bytes, in order");
    }

    #[test]
    fn a_gap_a_damaged_segment_or_another_protocol_is_never_merged() {
        let data = [7u8; 1000];
        let mut damaged = segment(3000, &data, 0x10);
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        let not_tcp = vec![0xffu8; 60];
        let frames = [
            segment(1000, &data, 0x10),
            segment(2000, &data, 0x10),
            damaged.clone(),
            segment(5000, &data, 0x10),
            not_tcp.clone(),
            segment(6000, &data, 0x11),
        ];
        let mut coalescer = TcpCoalescer::default();
        for f in &frames {
            coalescer.push(f);
        }
        let out: Vec<_> = coalescer.finish().drain(..).collect();
        // 1000+2000 merge; the damaged one, the one after the gap, the non-TCP frame and
        // the FIN pass as they came.
        assert_eq!(out.len(), 5);
        assert!(out[0].1.gso.is_some());
        assert_eq!(out[1], (damaged, Offload::default()));
        assert_eq!(out[2], (frames[3].clone(), Offload::default()));
        assert_eq!(out[3], (not_tcp, Offload::default()));
        assert_eq!(out[4], (frames[5].clone(), Offload::default()));
    }
}

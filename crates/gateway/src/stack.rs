//! The plumbing between the gateway's frame loop and its smoltcp interfaces (TCP DNS
//! and TCP NAT): a device that is two frame queues, with a guard that holds guests to
//! the receive windows the stack advertised.
//!
//! Why the guard: smoltcp 0.12 accepts a segment up to the end of its receive buffer,
//! but computes "has the window grown enough to announce" as
//! `last_ack + last_window - next_ack` on sequence numbers, which panics ("subtract
//! sequence numbers with underflow", smoltcp issue 1048) when a peer has sent past the
//! right edge of the last window it was told. An honest peer never does; a guest can,
//! whenever the application has read from the buffer since the last ACK (the buffer
//! then has more room than was announced). Capping the buffer at 64 KiB (no window
//! scaling) is not enough: the regression test in `tcp_dns.rs` crashes an unscaled
//! stack too. So no segment reaches smoltcp that ends past the right edge of the
//! last window it sent on that connection; such segments are dropped and counted
//! (`tcp_beyond_window`), and the guest's TCP retransmits within the window like after
//! any loss.
//!
//! The edge is read from the segments the stack sends, mirroring what smoltcp records:
//! every non-RST segment it sends sets `last_ack`/`last_window`, except keep-alives
//! (one old byte), which it sends without recording. Every socket's receive buffer
//! stays at most 65,535 bytes so its window is never scaled (`UNSCALED_WINDOW`) and
//! the edge is exact: with scaling smoltcp rounds the announced window down.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetFrame, EthernetProtocol, TcpPacket};

use crate::counters::GatewayCounters;

/// The largest receive buffer a socket may have: smoltcp scales windows of larger
/// buffers, and the window guard needs exact, unscaled windows.
pub(crate) const UNSCALED_WINDOW: usize = 65535;

/// Frames in and out of a smoltcp interface.
pub(crate) struct Queue {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: Vec<Vec<u8>>,
    mtu: usize,
    guard: WindowGuard,
    counters: Arc<GatewayCounters>,
}

/// One TCP connection as the stack sees it: the guest's end, then the stack's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Conn {
    pub peer: (IpAddr, u16),
    pub local: (IpAddr, u16),
}

#[derive(Debug, Clone, Copy)]
struct Edge {
    /// The right edge of the last window sent, if an ACK was sent yet.
    right: Option<u32>,
    /// The end of the highest sequence number sent (keep-alives resend one byte below).
    sent_end: u32,
}

/// The right window edge per connection; see the module's comment.
#[derive(Default)]
struct WindowGuard {
    edges: HashMap<Conn, Edge>,
}

/// The TCP header fields the guard reads.
struct Segment {
    conn_from_sender: (IpAddr, u16, IpAddr, u16),
    rst: bool,
    syn: bool,
    fin: bool,
    seq: u32,
    ack: Option<u32>,
    window: u16,
    payload_len: usize,
}

fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    let (src, dst, segment) = crate::wire::tcp_in_frame(frame)?;
    let tcp = TcpPacket::new_checked(segment).ok()?;
    Some(Segment {
        conn_from_sender: (src, tcp.src_port(), dst, tcp.dst_port()),
        rst: tcp.rst(),
        syn: tcp.syn(),
        fin: tcp.fin(),
        seq: tcp.seq_number().0 as u32,
        ack: tcp.ack().then(|| tcp.ack_number().0 as u32),
        window: tcp.window_len(),
        payload_len: tcp.payload().len(),
    })
}

/// `a` is after `b` in sequence space.
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl WindowGuard {
    /// Records a segment the stack sent.
    fn sent(&mut self, frame: &[u8]) {
        let Some(seg) = tcp_segment(frame) else { return };
        let (src, sport, dst, dport) = seg.conn_from_sender;
        let conn = Conn {
            peer: (dst, dport),
            local: (src, sport),
        };
        if seg.rst {
            self.edges.remove(&conn);
            return;
        }
        let end = seg
            .seq
            .wrapping_add(seg.payload_len as u32 + u32::from(seg.syn) + u32::from(seg.fin));
        let edge = self.edges.entry(conn).or_insert(Edge {
            right: None,
            sent_end: end,
        });
        if seg.syn {
            // A new connection on this pair (smoltcp reuses listening sockets).
            *edge = Edge {
                right: None,
                sent_end: end,
            };
        }
        // A keep-alive resends one byte below what was sent, and smoltcp does not record
        // its window; a one-byte retransmission looks the same and is skipped too, which
        // only keeps the older (smaller) edge.
        let keep_alive = seg.payload_len == 1 && !seg.syn && !seg.fin && !seq_after(end, edge.sent_end);
        if seq_after(end, edge.sent_end) {
            edge.sent_end = end;
        }
        if !keep_alive {
            if let Some(ack) = seg.ack {
                edge.right = Some(ack.wrapping_add(u32::from(seg.window)));
            }
        }
    }

    /// Whether a segment from a guest stays within the window it was given.
    fn admits(&mut self, frame: &[u8]) -> bool {
        let Some(seg) = tcp_segment(frame) else { return true };
        let (src, sport, dst, dport) = seg.conn_from_sender;
        let conn = Conn {
            peer: (src, sport),
            local: (dst, dport),
        };
        let Some(Edge { right: Some(right), .. }) = self.edges.get(&conn) else {
            return true;
        };
        if seg.rst || seg.syn {
            return true;
        }
        let end = seg.seq.wrapping_add(seg.payload_len as u32 + u32::from(seg.fin));
        if seq_after(end, *right) {
            return false;
        }
        true
    }
}

impl Queue {
    /// `counters` takes `tcp_beyond_window`.
    pub fn new(mtu: usize, counters: Arc<GatewayCounters>) -> Queue {
        Queue {
            rx: VecDeque::new(),
            tx: Vec::new(),
            mtu,
            guard: WindowGuard::default(),
            counters,
        }
    }

    /// What the stack sent, less what the gateway's own responders answer (see
    /// [`answered_by_gateway`]).
    pub fn take_sent(&mut self) -> Vec<Vec<u8>> {
        self.tx.drain(..).filter(|f| !answered_by_gateway(f)).collect()
    }

    /// Forgets the edges of connections that are no longer in `live` (the connections
    /// the stack's sockets hold). Cheap to call often: it sweeps only when more
    /// connections are tracked than `live` holds, plus some slack.
    /// `sockets` is how many sockets the stack holds; `live` is asked only for a sweep.
    pub fn retain_conns(&mut self, sockets: usize, live: impl Fn() -> std::collections::HashSet<Conn>) {
        const SLACK: usize = 64;
        if self.guard.edges.len() > sockets + SLACK {
            let live = live();
            self.guard.edges.retain(|c, _| live.contains(c));
        }
    }
}

/// The connection a smoltcp socket holds, if it holds one.
pub(crate) fn socket_conn(s: &smoltcp::socket::tcp::Socket) -> Option<Conn> {
    let (l, r) = (s.local_endpoint()?, s.remote_endpoint()?);
    Some(Conn {
        peer: (r.addr.into(), r.port),
        local: (l.addr.into(), l.port),
    })
}

pub(crate) struct Rx(Vec<u8>);
pub(crate) struct Tx<'a>(&'a mut Vec<Vec<u8>>, &'a mut WindowGuard);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.1.sent(&buf);
        self.0.push(buf);
        r
    }
}

impl Device for Queue {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        // Checked here, as smoltcp takes each frame, so the edge includes everything
        // the stack sent before it.
        let frame = loop {
            let frame = self.rx.pop_front()?;
            if self.guard.admits(&frame) {
                break frame;
            }
            GatewayCounters::inc(&self.counters.tcp_beyond_window);
        };
        Some((Rx(frame), Tx(&mut self.tx, &mut self.guard)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx, &mut self.guard))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps
    }
}

/// Whether a frame the stack sent is the gateway's own responders' to send: an ARP
/// reply, or ICMPv6 other than a Neighbour Solicitation (the stack's Neighbour
/// Advertisements and any listener reports). The stack's ARP requests and
/// solicitations go out: they find the guests it answers.
pub(crate) fn answered_by_gateway(frame: &[u8]) -> bool {
    let Ok(f) = EthernetFrame::new_checked(frame) else {
        return true;
    };
    match f.ethertype() {
        EthernetProtocol::Arp => f.payload().get(7) == Some(&2),
        EthernetProtocol::Ipv6 => {
            const NEIGHBOUR_SOLICIT: u8 = 135;
            let icmp6 = f.payload().get(6) == Some(&58);
            icmp6 && f.payload().get(40) != Some(&NEIGHBOUR_SOLICIT)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp_peer::{Segment, TcpPeer};
    use smoltcp::iface::{Config, Interface, SocketSet};
    use smoltcp::socket::tcp;
    use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};
    use std::net::Ipv4Addr;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    /// A stack like the NAT's: an unscaled receive buffer that the application drains
    /// as data comes (the relay writes it to the host socket).
    struct Server {
        iface: Interface,
        device: Queue,
        sockets: SocketSet<'static>,
        handle: smoltcp::iface::SocketHandle,
        received: usize,
        now: i64,
    }

    impl Server {
        fn new(counters: Arc<GatewayCounters>) -> Server {
            let mut device = Queue::new(65520, counters);
            let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(MAC)));
            let mut iface = Interface::new(config, &mut device, Instant::from_millis(0));
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(SERVER.into(), 24));
            });
            let mut sockets = SocketSet::new(Vec::new());
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; UNSCALED_WINDOW]),
                tcp::SocketBuffer::new(vec![0; UNSCALED_WINDOW]),
            );
            s.listen(80).unwrap();
            let handle = sockets.add(s);
            Server {
                iface,
                device,
                sockets,
                handle,
                received: 0,
                now: 0,
            }
        }

        fn exchange(&mut self, peer: &mut TcpPeer, frames: Vec<Vec<u8>>) {
            self.now += 1;
            let now = Instant::from_millis(self.now);
            self.device.rx.extend(frames);
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            let s = self.sockets.get_mut::<tcp::Socket>(self.handle);
            while let Ok(n) = s.recv(|b| (b.len(), b.len())) {
                if n == 0 {
                    break;
                }
                self.received += n;
            }
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            let _ = self.iface.poll_delay(now, &self.sockets);
            let sent = self.device.take_sent();
            peer.read(&sent);
        }
    }

    /// The NAT's stack: the same overrun as the DNS-over-TCP regression test, against a
    /// socket that was never scaled. smoltcp panics without the guard.
    #[test]
    fn an_unscaled_stack_survives_a_peer_that_sends_past_the_window() {
        let counters = Arc::new(GatewayCounters::default());
        let mut server = Server::new(counters.clone());
        let mut peer = TcpPeer::guest(9, 80);
        let syn = peer.segment(&Segment {
            syn: true,
            window: 65535,
            mss: Some(65535),
            ..Default::default()
        });
        let arp = peer.arp_request();
        server.exchange(&mut peer, vec![arp, syn]);
        let ack = peer.segment(&Segment {
            ack: true,
            window: 65535,
            ..Default::default()
        });
        server.exchange(&mut peer, vec![ack]);
        let [first, past_edge] = peer.window_overrun();
        server.exchange(&mut peer, first);
        server.exchange(&mut peer, past_edge);
        assert_eq!(counters.tcp_beyond_window.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Within the window, the same connection still carries data.
        peer.seq = peer.seq.wrapping_sub(64500);
        let within = peer.segment(&Segment {
            ack: true,
            window: 65535,
            payload: &[3; 1000],
            ..Default::default()
        });
        server.exchange(&mut peer, vec![within]);
        assert_eq!(server.received, 1459 + 1000);
    }

    #[test]
    fn keep_alives_do_not_move_the_edge_but_acks_do() {
        let mut guard = WindowGuard::default();
        let peer = TcpPeer {
            mac: MAC,
            ip: SERVER.into(),
            port: 80,
            server_mac: [2, 0, 0, 0, 0, 9],
            server_ip: Ipv4Addr::new(10, 0, 0, 9).into(),
            server_port: 40000,
            seq: 100,
            ack: 5000,
        };
        // The guard reads the server's segments; build them with the peer helper
        // pointed the other way.
        let mut server = peer;
        guard.sent(&server.segment(&Segment {
            ack: true,
            window: 1000,
            payload: &[0; 10],
            ..Default::default()
        }));
        let conn = Conn {
            peer: (Ipv4Addr::new(10, 0, 0, 9).into(), 40000),
            local: (SERVER.into(), 80),
        };
        assert_eq!(guard.edges[&conn].right, Some(6000));
        server.ack = 5500;
        let keep_alive_seq = server.seq.wrapping_sub(1);
        guard.sent(&server.segment(&Segment {
            ack: true,
            window: 1000,
            seq: Some(keep_alive_seq),
            payload: &[0],
            ..Default::default()
        }));
        assert_eq!(guard.edges[&conn].right, Some(6000), "a keep-alive leaves the edge");
        guard.sent(&server.segment(&Segment {
            ack: true,
            window: 1000,
            ..Default::default()
        }));
        assert_eq!(guard.edges[&conn].right, Some(6500));
        guard.sent(&server.segment(&Segment {
            rst: true,
            ..Default::default()
        }));
        assert!(!guard.edges.contains_key(&conn), "a reset ends the connection");
    }
}

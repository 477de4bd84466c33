//! DNS over TCP on the gateway's address (RFC 7766): the same answers as over UDP, for
//! clients that retry truncated answers or always use TCP.
//!
//! Theory of operation: a smoltcp interface owns the gateway's addresses for TCP only.
//! The frame loop hands it TCP frames for the gateway and ARP frames about the
//! gateway, and over IPv6 Neighbour Solicitations for the gateway's addresses and
//! Neighbour Advertisements (smoltcp learns neighbours only from those); the gateway's
//! own responders keep answering, so the ARP replies and Neighbour Advertisements
//! smoltcp would send are dropped. One socket always
//! listens on port 53 while fewer than `MAX_CONNECTIONS` are open. Each connection
//! carries length-prefixed messages; local answers are written at once, forwarded ones
//! when the upstream answers. A connection is closed once the client closes its side
//! and nothing is pending, or when it sends something that is not a DNS query.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use fabric::Mac;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

use crate::counters::GatewayCounters;
use crate::dns::{self, Decision, Zone};
use crate::stack::Queue;

/// Open TCP DNS connections at most; further SYNs wait for a free slot.
pub const MAX_CONNECTIONS: usize = 32;
/// Connections (half-open ones too) one client address may hold, so that one guest's
/// SYNs cannot take every slot from the others.
pub const PER_CLIENT: usize = 4;
/// Receive buffer: the largest unscaled window (see `stack`); the connection's reader
/// drains it into the message being assembled.
const RX_BUFFER: usize = crate::stack::UNSCALED_WINDOW;
/// Send buffer: one whole maximal message and its length prefix.
const TX_BUFFER: usize = 65535 + 2;
/// A connection with no traffic for this long is dropped.
const IDLE: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Conn {
    rx: Vec<u8>,
    pending: usize,
    /// Counted against its client's `PER_CLIENT`.
    counted: bool,
}

/// What one run of the stack produced.
#[derive(Default)]
pub struct Output {
    pub frames: Vec<Vec<u8>>,
    /// Queries to forward upstream; answer them with [`TcpDns::deliver`].
    pub forward: Vec<(SocketHandle, Vec<u8>, hickory_proto::rr::Name)>,
    pub local: u64,
    pub nxdomain: u64,
    pub malformed: u64,
    /// Connections reset because their client already held `PER_CLIENT`.
    pub refused: u64,
}

pub struct TcpDns {
    iface: Interface,
    device: Queue,
    sockets: SocketSet<'static>,
    conns: HashMap<SocketHandle, Conn>,
    epoch: std::time::Instant,
}

impl TcpDns {
    /// A stack on the gateway's `addrs` (each with its prefix length), of either IP
    /// version.
    pub fn new(mac: Mac, addrs: &[(IpAddr, u8)], mtu: usize, counters: Arc<GatewayCounters>) -> TcpDns {
        let mut device = Queue::new(mtu, counters);
        let epoch = std::time::Instant::now();
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac.0)));
        let mut iface = Interface::new(config, &mut device, Instant::from_millis(0));
        iface.update_ip_addrs(|a| {
            for (ip, prefix) in addrs {
                let _ = a.push(IpCidr::new((*ip).into(), *prefix));
            }
        });
        let mut s = TcpDns {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            conns: HashMap::new(),
            epoch,
        };
        s.ensure_listener();
        s
    }

    fn now(&self) -> Instant {
        Instant::from_millis(self.epoch.elapsed().as_millis() as i64)
    }

    fn ensure_listener(&mut self) {
        let listening = self
            .sockets
            .iter()
            .any(|(_, s)| matches!(s, smoltcp::socket::Socket::Tcp(t) if t.is_listening()));
        if listening || self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
        );
        sock.set_timeout(Some(IDLE.into()));
        if sock.listen(53).is_ok() {
            let h = self.sockets.add(sock);
            self.conns.insert(h, Conn::default());
        }
    }

    /// Hands the stack a frame (TCP to the gateway, or ARP about it).
    pub fn input(&mut self, frame: &[u8]) {
        self.device.rx.push_back(frame.to_vec());
    }

    /// When the stack next needs to run (retransmissions, timeouts).
    pub fn poll_delay(&mut self) -> Option<Duration> {
        let now = self.now();
        self.iface.poll_delay(now, &self.sockets).map(Duration::from)
    }

    /// Writes a forwarded query's answer to its connection.
    pub fn deliver(&mut self, handle: SocketHandle, answer: &[u8]) {
        if let Some(c) = self.conns.get_mut(&handle) {
            c.pending = c.pending.saturating_sub(1);
            let sock = self.sockets.get_mut::<tcp::Socket>(handle);
            write_message(sock, answer);
        }
    }

    /// Runs the stack and the DNS conversation on every connection.
    pub fn poll(&mut self, zone: &Zone) -> Output {
        let mut out = Output::default();
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        out.refused = self.hold_clients_to_their_share();
        let mut gone = Vec::new();
        for (h, conn) in self.conns.iter_mut() {
            let sock = self.sockets.get_mut::<tcp::Socket>(*h);
            let mut buf = [0u8; 4096];
            while sock.can_recv() {
                match sock.recv_slice(&mut buf) {
                    Ok(n) if n > 0 => conn.rx.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            while conn.rx.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([conn.rx[0], conn.rx[1]]));
                if conn.rx.len() < 2 + len {
                    break;
                }
                let query: Vec<u8> = conn.rx.drain(..2 + len).skip(2).collect();
                match dns::decide(zone, &query) {
                    Ok(Decision::Answer { bytes, nxdomain }) => {
                        if nxdomain {
                            out.nxdomain += 1;
                        } else {
                            out.local += 1;
                        }
                        write_message(sock, &bytes);
                    }
                    Ok(Decision::Forward { qname }) => {
                        conn.pending += 1;
                        out.forward.push((*h, query, qname));
                    }
                    Err(dns::Malformed) => {
                        out.malformed += 1;
                        sock.abort();
                        conn.rx.clear();
                    }
                }
            }
            match sock.state() {
                tcp::State::CloseWait if conn.pending == 0 && sock.send_queue() == 0 => sock.close(),
                tcp::State::Closed | tcp::State::TimeWait => gone.push(*h),
                _ => {}
            }
        }
        for h in gone {
            self.conns.remove(&h);
            self.sockets.remove(h);
        }
        let sockets = &self.sockets;
        self.device.retain_conns(sockets.iter().count(), || {
            sockets
                .iter()
                .filter_map(|(_, s)| match s {
                    smoltcp::socket::Socket::Tcp(t) => crate::stack::socket_conn(t),
                    _ => None,
                })
                .collect()
        });
        self.ensure_listener();
        // Writes made above go out now.
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        out.frames = self.device.take_sent();
        out
    }
}

impl TcpDns {
    /// Resets the connections a client holds beyond `PER_CLIENT` (the newest: a
    /// client's established connections are kept, and it learns at once by the reset).
    fn hold_clients_to_their_share(&mut self) -> u64 {
        let mut by_client: HashMap<smoltcp::wire::IpAddress, usize> = HashMap::new();
        let mut refused = 0;
        for (h, conn) in self.conns.iter_mut() {
            let sock = self.sockets.get_mut::<tcp::Socket>(*h);
            let Some(remote) = sock.remote_endpoint() else { continue };
            if conn.counted {
                *by_client.entry(remote.addr).or_default() += 1;
            }
        }
        for (h, conn) in self.conns.iter_mut() {
            let sock = self.sockets.get_mut::<tcp::Socket>(*h);
            let Some(remote) = sock.remote_endpoint() else { continue };
            if conn.counted {
                continue;
            }
            let held = by_client.entry(remote.addr).or_default();
            if *held >= PER_CLIENT {
                sock.abort();
                refused += 1;
            } else {
                *held += 1;
                conn.counted = true;
            }
        }
        refused
    }
}

fn write_message(sock: &mut tcp::Socket, msg: &[u8]) {
    let Ok(len) = u16::try_from(msg.len()) else { return };
    // The buffer holds a whole maximal message, so both writes fit unless the client
    // stopped reading entirely; then the answer is lost with the connection.
    let _ = sock.send_slice(&len.to_be_bytes());
    let _ = sock.send_slice(msg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp_peer::{Segment, TcpPeer};
    use std::net::Ipv4Addr;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    fn server(counters: &Arc<GatewayCounters>) -> (TcpDns, Zone) {
        let addrs = [(SERVER.into(), 24), ("fd00::1".parse().unwrap(), 64)];
        let dns = TcpDns::new(Mac([2, 0, 0, 0, 0, 1]), &addrs, 1500, counters.clone());
        let zone = Zone::new("vm.internal", "10.0.0.0/24".parse().unwrap());
        (dns, zone)
    }

    fn peer() -> TcpPeer {
        TcpPeer::guest(9, 53)
    }

    fn exchange(dns: &mut TcpDns, zone: &Zone, peer: &mut TcpPeer, frames: Vec<Vec<u8>>) -> Vec<crate::tcp_peer::Seen> {
        for f in frames {
            dns.input(&f);
        }
        let out = dns.poll(zone);
        peer.read(&out.frames)
    }

    fn handshake(dns: &mut TcpDns, zone: &Zone, peer: &mut TcpPeer, window_scale: Option<u8>) -> crate::tcp_peer::Seen {
        let arp = peer.arp_request();
        let syn = peer.segment(&Segment {
            syn: true,
            window: 65535,
            window_scale,
            mss: Some(65535),
            ..Default::default()
        });
        let seen = exchange(dns, zone, peer, vec![arp, syn]);
        let synack = seen
            .into_iter()
            .find(|s| s.control == smoltcp::wire::TcpControl::Syn)
            .expect("SYN-ACK");
        let ack = peer.segment(&Segment {
            ack: true,
            window: 65535,
            ..Default::default()
        });
        exchange(dns, zone, peer, vec![ack]);
        synack
    }

    #[test]
    fn one_client_holds_at_most_its_share_of_connections() {
        let counters = Arc::new(GatewayCounters::default());
        let (mut dns, zone) = server(&counters);
        let mut refused = 0;
        let mut connect = |dns: &mut TcpDns, ip: Ipv4Addr, port: u16| {
            let mut p = peer();
            (p.ip, p.port) = (ip.into(), port);
            let arp = p.arp_request();
            let syn = p.segment(&Segment {
                syn: true,
                window: 65535,
                ..Default::default()
            });
            dns.input(&arp);
            dns.input(&syn);
            let out = dns.poll(&zone);
            refused += out.refused;
            p.read(&out.frames)
        };
        let greedy = Ipv4Addr::new(10, 0, 0, 9);
        for port in 0..PER_CLIENT as u16 + 2 {
            connect(&mut dns, greedy, 41000 + port);
        }
        let other = connect(&mut dns, Ipv4Addr::new(10, 0, 0, 10), 42000);
        assert_eq!(refused, 2, "the greedy client's connections past its share are reset");
        assert!(
            other.iter().any(|s| s.control == smoltcp::wire::TcpControl::Syn),
            "another client still connects"
        );
        assert!(other.iter().all(|s| s.control != smoltcp::wire::TcpControl::Rst));
    }

    /// The crash of the hostile-guests issue: a client offering window scaling, then
    /// data to the end of the server's buffer. It made smoltcp panic in
    /// `last_scaled_window` ("subtract sequence numbers with underflow") and took the
    /// whole gateway task down.
    #[test]
    fn dns_over_tcp_survives_a_client_that_fills_past_the_advertised_window() {
        overrun_by(peer());
    }

    /// The same over IPv6: the window guard reads IPv6 segments too.
    #[test]
    fn dns_over_tcp_on_ipv6_survives_a_client_that_fills_past_the_advertised_window() {
        overrun_by(TcpPeer::guest6(9, 53));
    }

    fn overrun_by(mut peer: TcpPeer) {
        let counters = Arc::new(GatewayCounters::default());
        let (mut dns, zone) = server(&counters);
        let synack = handshake(&mut dns, &zone, &mut peer, Some(7));
        let [first, past_edge] = peer.window_overrun();
        exchange(&mut dns, &zone, &mut peer, first);
        exchange(&mut dns, &zone, &mut peer, past_edge);
        let _ = dns.poll_delay();
        assert_eq!(
            synack.window_scale.unwrap_or(0),
            0,
            "the server must not scale its window"
        );
        assert!(
            counters.tcp_beyond_window.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "the segment past the edge was held back"
        );
    }
}

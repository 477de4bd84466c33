//! ICMP echo egress: a guest's pings re-sent from host ICMP sockets.
//!
//! Theory of operation: a flow is (guest address, echo identifier, destination). Its
//! first request passes the egress policy and the bounds, then gets a host socket
//! connected to the destination (the host's loopback for the host-access address):
//! an unprivileged ICMP datagram socket when `net.ipv4.ping_group_range` lets the
//! daemon's group use one, else a raw ICMP socket (needs CAP_NET_RAW). The kernel
//! picks a datagram socket's identifier; a raw socket's is drawn at random and its
//! replies are picked out by it. Replies go back to the guest with the guest's own
//! identifier, as if from the destination. A flow idles out after `icmp_idle`.
//!
//! ICMPv6 echo works alike over IPv6 sockets (the same sysctl governs IPv6 ping
//! sockets). The kernel fills in an ICMPv6 checksum itself (it covers addresses only it
//! knows), and an IPv6 raw socket delivers no IP header.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use fabric::Mac;
use rustix::net::{AddressFamily, SocketType};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Icmpv6Message, Icmpv6Packet, Icmpv6Repr, Ipv4Packet};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::counters::GatewayCounters;
use crate::ctx::Ctx;
use crate::wire;

/// Echo flows at most per guest and per network: a ping per destination is the usual
/// use, so these are far above what a well-behaved guest needs.
const FLOWS_PER_GUEST: usize = 64;
const FLOWS_TOTAL: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    pub guest: IpAddr,
    pub ident: u16,
    pub dst: IpAddr,
}

/// Guest pings re-originated from host ping sockets: the flow table beside the context.
pub(crate) struct IcmpNat {
    pub ctx: Arc<Ctx>,
    pub flows: std::sync::Mutex<FlowTable>,
}

#[derive(Default)]
pub(crate) struct FlowTable {
    flows: HashMap<FlowKey, mpsc::Sender<(u16, Vec<u8>)>>,
    per_guest: crate::flows::PerGuest,
}

impl FlowTable {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    fn remove(&mut self, key: &FlowKey) {
        if self.flows.remove(key).is_some() {
            self.per_guest.release(key.guest);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// SOCK_DGRAM ICMP ("ping socket"): the kernel owns the identifier.
    Datagram,
    /// SOCK_RAW ICMP: every ICMP message arrives with its IP header.
    Raw,
}

/// Which socket kind this host lets the daemon use, found once.
fn kind() -> Option<Kind> {
    static KIND: OnceLock<Option<Kind>> = OnceLock::new();
    *KIND.get_or_init(|| {
        if open(Kind::Datagram, false).is_ok() {
            Some(Kind::Datagram)
        } else if open(Kind::Raw, false).is_ok() {
            Some(Kind::Raw)
        } else {
            tracing::warn!(
                "no ICMP socket allowed (ping_group_range excludes this group and there is no CAP_NET_RAW): guests cannot ping outside"
            );
            None
        }
    })
}

/// An ICMP socket as a std UdpSocket: both are datagram sockets on an IP address, and
/// tokio's UdpSocket then gives async send and receive without any unsafe code.
fn open(kind: Kind, ipv6: bool) -> std::io::Result<std::net::UdpSocket> {
    let ty = match kind {
        Kind::Datagram => SocketType::DGRAM,
        Kind::Raw => SocketType::RAW,
    };
    let (family, proto) = if ipv6 {
        (AddressFamily::INET6, rustix::net::ipproto::ICMPV6)
    } else {
        (AddressFamily::INET, rustix::net::ipproto::ICMP)
    };
    let fd = rustix::net::socket_with(
        family,
        ty,
        rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        Some(proto),
    )?;
    Ok(std::net::UdpSocket::from(fd))
}

/// Sends a guest's echo request on its flow, opening the flow first when needed.
/// Returns a frame for the guest when the request is refused (ICMP prohibited).
pub(crate) fn outbound(
    svc: &Arc<IcmpNat>,
    port: &Arc<crate::port::GatewayPort>,
    origin: &wire::Origin,
    key: FlowKey,
    seq_no: u16,
    data: &[u8],
) -> Option<Vec<u8>> {
    let guest_mac = origin.src_mac;
    let cfg = &svc.ctx.cfg();
    let c = &svc.ctx.counters;
    let mut table = svc.flows.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(tx) = table.flows.get(&key) {
        if tx.try_send((seq_no, data.to_vec())).is_err() {
            GatewayCounters::inc(&c.nat_icmp_dropped);
        }
        return None;
    }
    if svc.ctx.egress.refused(key.dst, 0, crate::policy::Proto::Icmp) {
        return Some(svc.ctx.unreachable(origin, wire::Unreachable::Prohibited));
    }
    let mine = table.per_guest.count(key.guest);
    let Some(kind) = kind().filter(|_| mine < FLOWS_PER_GUEST && table.flows.len() < FLOWS_TOTAL) else {
        GatewayCounters::inc(&c.nat_icmp_dropped);
        return None;
    };
    let target = cfg.egress_target(SocketAddr::new(key.dst, 0)).ip();
    let sock = match open(kind, target.is_ipv6())
        .and_then(|s| s.connect(SocketAddr::new(target, 0)).map(|_| s))
        .and_then(UdpSocket::from_std)
    {
        Ok(s) if !crate::fd_budget::admits(&s) => {
            GatewayCounters::inc(&c.fd_budget_refused);
            GatewayCounters::inc(&c.nat_icmp_dropped);
            return None;
        }
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%target, "cannot open an ICMP flow: {e}");
            GatewayCounters::inc(&c.nat_icmp_dropped);
            return None;
        }
    };
    let (tx, rx) = mpsc::channel(16);
    let _ = tx.try_send((seq_no, data.to_vec()));
    table.flows.insert(key, tx);
    table.per_guest.add(key.guest);
    tokio::spawn(run_flow(svc.clone(), port.clone(), sock, kind, rx, key, guest_mac));
    None
}

async fn run_flow(
    svc: Arc<IcmpNat>,
    port: Arc<crate::port::GatewayPort>,
    sock: UdpSocket,
    kind: Kind,
    mut rx: mpsc::Receiver<(u16, Vec<u8>)>,
    key: FlowKey,
    guest_mac: Mac,
) {
    let cfg = svc.ctx.cfg_arc();
    let c = &svc.ctx.counters;
    // A datagram socket's identifier is rewritten by the kernel; a raw one keeps ours.
    let host_ident: u16 = rand::random();
    let caps = ChecksumCapabilities::default();
    // An echo reply the guest can take, with a raw socket's IPv4 header in front (and a
    // byte more: a longer one is cut and fails to parse).
    let mut buf = vec![0u8; cfg.max_ipv4_payload() + 60 + 1];
    loop {
        tokio::select! {
            req = rx.recv() => match req {
                Some((seq_no, data)) => {
                    let msg = echo_request(key.dst, host_ident, seq_no, &data);
                    if sock.send(&msg).await.is_ok() {
                        GatewayCounters::inc(&c.nat_icmp_requests);
                    }
                }
                None => break,
            },
            got = sock.recv(&mut buf) => {
                let Ok(n) = got else { continue };
                let icmp = match (kind, key.dst) {
                    (Kind::Raw, IpAddr::V4(_)) => match Ipv4Packet::new_checked(&buf[..n]) {
                        Ok(ip) => &buf[ip.header_len() as usize..n],
                        Err(_) => continue,
                    },
                    _ => &buf[..n],
                };
                let Some((ident, seq_no, data)) = echo_reply(key.dst, icmp, &caps) else { continue };
                if kind == Kind::Raw && ident != host_ident {
                    continue; // somebody else's ping
                }
                GatewayCounters::inc(&c.nat_icmp_replies);
                let frame = match (key.dst, key.guest) {
                    (IpAddr::V4(from), IpAddr::V4(to)) => {
                        wire::icmp_echo_reply(cfg.gateway_mac, guest_mac, from, to, key.ident, seq_no, data)
                    }
                    (IpAddr::V6(from), IpAddr::V6(to)) => {
                        let reply = Icmpv6Repr::EchoReply { ident: key.ident, seq_no, data };
                        wire::icmp6_frame(cfg.gateway_mac, guest_mac, from, to, &reply)
                    }
                    _ => continue, // a flow's ends are of one version
                };
                let _ = port.send(&frame).await;
            }
            _ = tokio::time::sleep(cfg.icmp_idle) => break,
        }
    }
    svc.flows.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
}

/// An echo request to `dst` as a host ICMP socket of its version takes it. An ICMPv6
/// checksum is left to the kernel: it covers the source address, which only the
/// kernel picks.
fn echo_request(dst: IpAddr, ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
    match dst {
        IpAddr::V4(_) => {
            let repr = Icmpv4Repr::EchoRequest { ident, seq_no, data };
            let mut msg = vec![0u8; repr.buffer_len()];
            repr.emit(
                &mut Icmpv4Packet::new_unchecked(&mut msg),
                &ChecksumCapabilities::default(),
            );
            msg
        }
        IpAddr::V6(_) => {
            let mut msg = vec![0u8; 8 + data.len()];
            let mut pkt = Icmpv6Packet::new_unchecked(&mut msg);
            pkt.set_msg_type(Icmpv6Message::EchoRequest);
            pkt.set_msg_code(0);
            pkt.set_echo_ident(ident);
            pkt.set_echo_seq_no(seq_no);
            pkt.payload_mut().copy_from_slice(data);
            msg
        }
    }
}

/// An echo reply's identifier, sequence number and data, from an ICMP message a host
/// socket for `dst` received (without any IP header). The kernel checked an ICMPv6
/// checksum (against addresses not at hand here).
fn echo_reply<'a>(dst: IpAddr, icmp: &'a [u8], caps: &ChecksumCapabilities) -> Option<(u16, u16, &'a [u8])> {
    match dst {
        IpAddr::V4(_) => {
            let pkt = Icmpv4Packet::new_checked(icmp).ok()?;
            match Icmpv4Repr::parse(&pkt, caps).ok()? {
                Icmpv4Repr::EchoReply { ident, seq_no, data } => Some((ident, seq_no, data)),
                _ => None,
            }
        }
        IpAddr::V6(_) => {
            let pkt = Icmpv6Packet::new_checked(icmp).ok()?;
            (pkt.msg_type() == Icmpv6Message::EchoReply && pkt.msg_code() == 0)
                .then(|| (pkt.echo_ident(), pkt.echo_seq_no(), &icmp[8..]))
        }
    }
}

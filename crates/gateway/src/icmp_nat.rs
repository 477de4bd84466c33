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

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, OnceLock};

use fabric::Mac;
use rustix::net::{AddressFamily, SocketType};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Ipv4Packet};
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
    pub guest: Ipv4Addr,
    pub ident: u16,
    pub dst: Ipv4Addr,
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
        if open(Kind::Datagram).is_ok() {
            Some(Kind::Datagram)
        } else if open(Kind::Raw).is_ok() {
            Some(Kind::Raw)
        } else {
            tracing::warn!(
                "no ICMP socket allowed (ping_group_range excludes this group and there is no CAP_NET_RAW): guests cannot ping outside"
            );
            None
        }
    })
}

/// An ICMP socket as a std UdpSocket: both are datagram sockets on an IPv4 address, and
/// tokio's UdpSocket then gives async send and receive without any unsafe code.
fn open(kind: Kind) -> std::io::Result<std::net::UdpSocket> {
    let ty = match kind {
        Kind::Datagram => SocketType::DGRAM,
        Kind::Raw => SocketType::RAW,
    };
    let fd = rustix::net::socket_with(
        AddressFamily::INET,
        ty,
        rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        Some(rustix::net::ipproto::ICMP),
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
    let host_access = cfg.host_access == Some(key.dst);
    if svc.ctx.egress.refused(key.dst, 0, crate::policy::Proto::Icmp) {
        return Some(wire::icmp_prohibited(cfg.gateway_mac, cfg.gateway_ip, origin));
    }
    let mine = table.per_guest.count(key.guest);
    let Some(kind) = kind().filter(|_| mine < FLOWS_PER_GUEST && table.flows.len() < FLOWS_TOTAL) else {
        GatewayCounters::inc(&c.nat_icmp_dropped);
        return None;
    };
    let target = if host_access { Ipv4Addr::LOCALHOST } else { key.dst };
    let sock = match open(kind)
        .and_then(|s| s.connect(SocketAddrV4::new(target, 0)).map(|_| s))
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
                    let repr = Icmpv4Repr::EchoRequest { ident: host_ident, seq_no, data: &data };
                    let mut msg = vec![0u8; repr.buffer_len()];
                    repr.emit(&mut Icmpv4Packet::new_unchecked(&mut msg), &caps);
                    if sock.send(&msg).await.is_ok() {
                        GatewayCounters::inc(&c.nat_icmp_requests);
                    }
                }
                None => break,
            },
            got = sock.recv(&mut buf) => {
                let Ok(n) = got else { continue };
                let icmp = match kind {
                    Kind::Datagram => &buf[..n],
                    Kind::Raw => match Ipv4Packet::new_checked(&buf[..n]) {
                        Ok(ip) => &buf[ip.header_len() as usize..n],
                        Err(_) => continue,
                    },
                };
                let Ok(pkt) = Icmpv4Packet::new_checked(icmp) else { continue };
                let Ok(Icmpv4Repr::EchoReply { ident, seq_no, data }) = Icmpv4Repr::parse(&pkt, &caps) else {
                    continue;
                };
                if kind == Kind::Raw && ident != host_ident {
                    continue; // somebody else's ping
                }
                GatewayCounters::inc(&c.nat_icmp_replies);
                let frame = wire::icmp_echo_reply(cfg.gateway_mac, guest_mac, key.dst, key.guest, key.ident, seq_no, data);
                let _ = port.send(&frame).await;
            }
            _ = tokio::time::sleep(cfg.icmp_idle) => break,
        }
    }
    svc.flows.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
}

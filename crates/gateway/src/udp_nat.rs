//! UDP egress: a guest's UDP flows re-originated from host sockets.
//!
//! Theory of operation: a flow is (guest address and port, destination address and
//! port). Its first datagram passes the egress policy and the bounds, then gets a host
//! socket connected to the destination (or to the host's loopback when the destination
//! is the network's host-access address); datagrams go out through it and replies come
//! back to the guest as if from the destination. Both IP versions work alike: an IPv6
//! flow gets an IPv6 host socket (the host-access address's loopback is `[::1]`). A
//! flow with no traffic for `udp_idle` closes (`udp_dns_idle`, shorter, for flows to
//! port 53). Flows are bounded per guest and per network; going past a bound is
//! counted and the datagram dropped.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fabric::Mac;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::counters::GatewayCounters;
use crate::ctx::Ctx;
use crate::wire;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub guest: SocketAddr,
    pub dst: SocketAddr,
}

pub(crate) struct Flow {
    tx: mpsc::Sender<Vec<u8>>,
}

/// A flow as [`crate::Gateway::udp_flows`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowInfo {
    pub guest: SocketAddr,
    pub dst: SocketAddr,
}

/// Guest UDP re-originated from host sockets: the flow table beside the context.
pub(crate) struct UdpNat {
    pub ctx: Arc<Ctx>,
    pub flows: std::sync::Mutex<FlowTable>,
}

#[derive(Default)]
pub(crate) struct FlowTable {
    flows: HashMap<FlowKey, Flow>,
    per_guest: crate::flows::PerGuest,
}

impl FlowTable {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn list(&self) -> Vec<FlowInfo> {
        self.flows
            .keys()
            .map(|k| FlowInfo {
                guest: k.guest,
                dst: k.dst,
            })
            .collect()
    }

    fn remove(&mut self, key: &FlowKey) {
        if self.flows.remove(key).is_some() {
            self.per_guest.release(key.guest.ip());
        }
    }
}

/// Sends a guest's datagram on its flow, opening the flow first when needed. Returns a
/// frame for the guest when the datagram is refused by policy (ICMP prohibited).
pub(crate) fn outbound(
    svc: &Arc<UdpNat>,
    port: &Arc<crate::port::GatewayPort>,
    origin: &wire::Origin,
    key: FlowKey,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let guest_mac = origin.src_mac;
    let cfg = &svc.ctx.cfg();
    let c = &svc.ctx.counters;
    let mut table = svc.flows.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(flow) = table.flows.get(&key) {
        if flow.tx.try_send(payload.to_vec()).is_err() {
            GatewayCounters::inc(&c.nat_udp_dropped);
        }
        return None;
    }
    if svc
        .ctx
        .egress
        .refused(key.dst.ip(), key.dst.port(), crate::policy::Proto::Udp)
    {
        return Some(svc.ctx.unreachable(origin, wire::Unreachable::Prohibited));
    }
    let mine = table.per_guest.count(key.guest.ip());
    if mine >= cfg.udp_flows_per_guest || table.flows.len() >= cfg.udp_flows_total {
        GatewayCounters::inc(&c.nat_udp_dropped);
        return None;
    }
    let target = cfg.egress_target(key.dst);
    let any = SocketAddr::new(unspecified_like(target.ip()), 0);
    let sock = match std::net::UdpSocket::bind(any)
        .and_then(|s| s.connect(target).map(|_| s))
        .and_then(|s| s.set_nonblocking(true).map(|_| s))
        .and_then(UdpSocket::from_std)
    {
        Ok(s) if !crate::fd_budget::admits(&s) => {
            GatewayCounters::inc(&c.fd_budget_refused);
            GatewayCounters::inc(&c.nat_udp_dropped);
            return None;
        }
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%target, "cannot open a UDP flow: {e}");
            GatewayCounters::inc(&c.nat_udp_dropped);
            return None;
        }
    };
    // A few datagrams may queue while the host socket is busy; more are dropped.
    let (tx, rx) = mpsc::channel(64);
    let _ = tx.try_send(payload.to_vec());
    table.flows.insert(key, Flow { tx });
    table.per_guest.add(key.guest.ip());
    GatewayCounters::inc(&c.nat_udp_flows);
    tokio::spawn(run_flow(svc.clone(), port.clone(), sock, rx, key, guest_mac));
    None
}

async fn run_flow(
    svc: Arc<UdpNat>,
    port: Arc<crate::port::GatewayPort>,
    sock: UdpSocket,
    mut rx: mpsc::Receiver<Vec<u8>>,
    key: FlowKey,
    guest_mac: Mac,
) {
    let idle: Duration = if key.dst.port() == 53 {
        svc.ctx.cfg().udp_dns_idle
    } else {
        svc.ctx.cfg().udp_idle
    };
    let c = &svc.ctx.counters;
    // Sized to what fits a frame to the guest, plus one byte to notice a datagram that
    // does not: a flow's buffer is its largest allocation, and a guest may open a
    // thousand flows (64 KiB each left the allocator holding tens of MB after floods).
    let max = svc.ctx.cfg().max_udp_payload(key.guest.is_ipv6());
    let mut buf = vec![0u8; max + 1];
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(p) => {
                    if sock.send(&p).await.is_ok() {
                        c.nat_udp_tx_bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
                    }
                }
                None => break,
            },
            got = sock.recv(&mut buf) => {
                // An error here is an ICMP error from the far side (port unreachable):
                // nothing to deliver, the flow stays until it idles out.
                if let Ok(n) = got {
                    if n > max {
                        GatewayCounters::inc(&c.nat_udp_dropped);
                        continue;
                    }
                    c.nat_udp_rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    let cfg = svc.ctx.cfg();
                    // A flow's two ends are of one IP version, so there is a frame.
                    if let Some(frame) = wire::udp_frame_to(cfg.gateway_mac, guest_mac, key.dst, key.guest, &buf[..n]) {
                        let _ = port.send(&frame).await;
                    }
                }
            }
            _ = tokio::time::sleep(idle) => break,
        }
    }
    svc.flows.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
}

/// The unspecified address of `ip`'s version: what a host socket binds to.
pub(crate) fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

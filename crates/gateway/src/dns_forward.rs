//! Queries the gateway does not answer itself go upstream, bounded per client and in
//! total, each answered back to its client (UDP) or its TCP connection.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::*;

/// Releases a query's place in the in-flight bounds when its task ends.
pub(crate) struct InflightGuard {
    shared: Arc<Shared>,
    client: IpAddr,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.shared.inflight_total.fetch_sub(1, Ordering::Relaxed);
        let mut map = self.shared.inflight_by_client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.client);
            }
        }
    }
}

pub(crate) fn spawn_forward(
    shared: &Arc<Shared>,
    sock: &Arc<crate::port::GatewayPort>,
    query: Vec<u8>,
    qname: hickory_proto::rr::Name,
    client_ip: IpAddr,
    reply_to: ReplyTo,
    tcp_answers: Option<tokio::sync::mpsc::UnboundedSender<(smoltcp::iface::SocketHandle, Vec<u8>)>>,
) {
    let cfg = &shared.ctx.cfg();
    {
        let mut map = shared.inflight_by_client.lock().unwrap_or_else(|p| p.into_inner());
        let mine = map.entry(client_ip).or_insert(0);
        if *mine >= cfg.dns_inflight_per_client
            || shared.inflight_total.load(Ordering::Relaxed) >= cfg.dns_inflight_total
        {
            GatewayCounters::inc(&shared.ctx.counters.dns_dropped);
            if *mine == 0 {
                map.remove(&client_ip);
            }
            return;
        }
        *mine += 1;
        shared.inflight_total.fetch_add(1, Ordering::Relaxed);
    }
    let guard = InflightGuard {
        shared: shared.clone(),
        client: client_ip,
    };
    let sock = sock.clone();
    tokio::spawn(async move {
        let shared = guard.shared.clone();
        let cfg = shared.ctx.cfg_arc();
        let upstreams = upstream::servers_for(&cfg.forwarders, &qname, shared.upstreams.current());
        let answer = upstream::forward(&query, &upstreams, cfg.dns_timeout).await;
        let bytes = match answer {
            Some(a) => {
                GatewayCounters::inc(&shared.ctx.counters.dns_forwarded);
                a
            }
            None => {
                GatewayCounters::inc(&shared.ctx.counters.dns_servfail);
                match dns::servfail(&query) {
                    Some(b) => b,
                    None => return,
                }
            }
        };
        match (reply_to, tcp_answers) {
            (
                ReplyTo::Udp {
                    client_mac,
                    client,
                    server,
                },
                _,
            ) => {
                if let Some(frame) = wire::udp_frame_to(cfg.gateway_mac, client_mac, server, client, &bytes) {
                    let _ = sock.send(&frame).await;
                }
            }
            (ReplyTo::Tcp(handle), Some(tx)) => {
                let _ = tx.send((handle, bytes));
            }
            (ReplyTo::Tcp(_), None) => {}
        }
        drop(guard);
    });
}

//! Where a frame from the network goes: ARP and ICMP answered here, DHCP, DNS
//! (UDP and TCP), NAT (UDP, ICMP, TCP) and forwards' return traffic handed to their
//! services, everything else counted and dropped.

use std::net::Ipv4Addr;
use std::sync::Arc;

use smoltcp::wire::ArpOperation;
use tokio::net::UnixDatagram;

use crate::dns::Decision;
use crate::wire::Inbound;
use crate::*;

/// Answers one frame; returns the frames to send back now, and whether the TCP stack
/// got the frame and needs a run. Forwarded DNS queries are answered by their own task.
/// Each step runs contained (see `contain`): a panic drops this frame only.
pub(crate) fn handle_frame(shared: &Arc<Shared>, sock: &Arc<UnixDatagram>, frame: &[u8]) -> (Vec<Vec<u8>>, bool) {
    use contain::{contained, Service};
    let inbound = match contained(&shared.panics, Service::Frame, frame, || wire::classify(frame)) {
        Some(Ok(i)) => i,
        Some(Err(_)) => {
            GatewayCounters::inc(&shared.ctx.counters.malformed_frames);
            return (vec![], false);
        }
        None => return (vec![], false),
    };
    let service = service_of(&shared.ctx.cfg, &inbound);
    contained(&shared.panics, service, frame, || {
        #[cfg(test)]
        tests::panic_if_marked(frame, tests::HANDLER_MARK);
        let (tcp_touched, mut out) = feed_tcp(shared, sock, frame, &inbound);
        out.extend(answer_frame(shared, sock, frame, inbound));
        (out, tcp_touched)
    })
    .unwrap_or_default()
}

/// The service a classified frame is for, to name it when its handler panics.
pub(crate) fn service_of(cfg: &GatewayConfig, inbound: &Inbound<'_>) -> contain::Service {
    use contain::Service;
    match inbound {
        Inbound::Arp { .. } => Service::Arp,
        Inbound::IcmpEcho { dst_ip, .. } if cfg.is_gateway_ip(*dst_ip) => Service::Icmp,
        Inbound::IcmpEcho { .. } => Service::IcmpNat,
        Inbound::Udp { dst_port: 67, .. } => Service::Dhcp,
        Inbound::Udp {
            dst_ip, dst_port: 53, ..
        } if cfg.is_gateway_ip(*dst_ip) => Service::Dns,
        Inbound::Udp { .. } => Service::UdpNat,
        Inbound::Tcp(head) if cfg.is_gateway_ip(*head.dst.ip()) && head.dst.port() == 53 => Service::DnsTcp,
        Inbound::Tcp(_) => Service::TcpNat,
        Inbound::Ignored => Service::Frame,
    }
}

/// Gives the TCP stacks the frames they need: TCP for the gateway's DNS goes to the DNS
/// stack, TCP routed through the gateway (and a forward's connections to the gateway's
/// address) to the NAT stack, and ARP about the gateway to both (smoltcp learns
/// neighbours only from ARP). Returns whether the DNS stack needs a run; the NAT
/// stack's answers are returned to send.
pub(crate) fn feed_tcp(
    shared: &Arc<Shared>,
    sock: &Arc<UnixDatagram>,
    frame: &[u8],
    inbound: &Inbound<'_>,
) -> (bool, Vec<Vec<u8>>) {
    let cfg = &shared.ctx.cfg;
    match *inbound {
        Inbound::Tcp(head) => {
            let dst = *head.dst.ip();
            let nat_key = tcp_nat::FlowKey {
                guest: head.src,
                peer: head.dst,
            };
            let forwarded =
                cfg.is_gateway_ip(dst) && shared.tcp.nat.lock().unwrap_or_else(|p| p.into_inner()).knows(&nat_key);
            if cfg.is_gateway_ip(dst) && !forwarded {
                shared.state().tcp.input(frame);
                return (true, vec![]);
            }
            if head.dst_mac == cfg.gateway_mac && (forwarded || routed_out(cfg, *head.src.ip(), dst)) {
                return (false, tcp_nat::inbound(&shared.tcp, sock, frame, head));
            }
            (false, vec![])
        }
        Inbound::Arp {
            target_ip, sender_ip, ..
        } if cfg.is_gateway_ip(target_ip) && sender_ip != target_ip => {
            shared.state().tcp.input(frame);
            shared.tcp.nat.lock().unwrap_or_else(|p| p.into_inner()).input(frame);
            (true, vec![])
        }
        _ => (false, vec![]),
    }
}

pub(crate) fn answer_frame(
    shared: &Arc<Shared>,
    sock: &Arc<UnixDatagram>,
    frame: &[u8],
    inbound: Inbound<'_>,
) -> Vec<Vec<u8>> {
    let cfg = &shared.ctx.cfg;
    let c = &shared.ctx.counters;
    match &inbound {
        Inbound::Arp {
            sender_mac, sender_ip, ..
        } => shared.ctx.neighbours.saw(*sender_ip, *sender_mac),
        Inbound::Udp { src_mac, src_ip, .. } => shared.ctx.neighbours.saw(*src_ip, *src_mac),
        Inbound::IcmpEcho { src_mac, src_ip, .. } => shared.ctx.neighbours.saw(*src_ip, *src_mac),
        _ => {}
    }
    match inbound {
        Inbound::Arp {
            op,
            sender_mac,
            sender_ip,
            target_ip,
        } => {
            if sender_ip == target_ip {
                GatewayCounters::inc(&c.arp_gratuitous);
                if cfg.is_gateway_ip(sender_ip) && sender_mac != cfg.gateway_mac {
                    GatewayCounters::inc(&c.arp_conflicts);
                    tracing::warn!(%sender_mac, ip = %sender_ip, "a host claims a gateway address");
                }
                return vec![];
            }
            if op == ArpOperation::Request && cfg.answers_for(target_ip) {
                GatewayCounters::inc(&c.arp_replies);
                return vec![wire::arp_reply(cfg.gateway_mac, target_ip, sender_mac, sender_ip)];
            }
            vec![]
        }
        Inbound::IcmpEcho {
            src_mac,
            src_ip,
            dst_ip,
            ident,
            seq_no,
            data,
            ..
        } if cfg.is_gateway_ip(dst_ip) => {
            GatewayCounters::inc(&c.icmp_echo_replies);
            vec![wire::icmp_echo_reply(
                cfg.gateway_mac,
                src_mac,
                dst_ip,
                src_ip,
                ident,
                seq_no,
                data,
            )]
        }
        Inbound::Udp {
            dst_port: 67,
            src_port: 68,
            dst_ip,
            src_mac,
            payload,
            ..
        } if dst_ip == Ipv4Addr::BROADCAST || cfg.is_gateway_ip(dst_ip) => {
            let (reply, event) = shared.state().dhcp.handle(payload, src_mac, unix_now());
            if let Some(ev) = event {
                shared.emit(ev);
            }
            reply
                .map(|r| {
                    wire::udp_frame(
                        cfg.gateway_mac,
                        r.dst_mac,
                        (cfg.gateway_ip, 67),
                        (r.dst_ip, 68),
                        &r.bytes,
                    )
                })
                .into_iter()
                .collect()
        }
        Inbound::Udp {
            dst_port: 53,
            src_mac,
            src_ip,
            dst_ip,
            src_port,
            payload,
            ..
        } if cfg.is_gateway_ip(dst_ip) => {
            let reply_to =
                move |bytes: &[u8]| wire::udp_frame(cfg.gateway_mac, src_mac, (dst_ip, 53), (src_ip, src_port), bytes);
            let decision = dns::decide(&shared.state().zone, payload);
            match decision {
                Err(dns::Malformed) => {
                    GatewayCounters::inc(&c.dns_malformed);
                    vec![]
                }
                Ok(Decision::Answer { bytes, nxdomain }) => {
                    GatewayCounters::inc(if nxdomain { &c.dns_nxdomain } else { &c.dns_local });
                    vec![reply_to(&bytes)]
                }
                Ok(Decision::Forward) => {
                    let to = ReplyTo::Udp {
                        client_mac: src_mac,
                        client: (src_ip, src_port),
                        server_ip: dst_ip,
                    };
                    spawn_forward(shared, sock, payload.to_vec(), src_ip, to, None);
                    vec![]
                }
            }
        }
        // A ping routed through the gateway: re-sent from the host.
        Inbound::IcmpEcho {
            src_mac,
            dst_mac,
            src_ip,
            dst_ip,
            ident,
            seq_no,
            data,
        } if dst_mac == cfg.gateway_mac && routed_out(cfg, src_ip, dst_ip) => {
            let key = icmp_nat::FlowKey {
                guest: src_ip,
                ident,
                dst: dst_ip,
            };
            icmp_nat::outbound(&shared.icmp, sock, frame, src_mac, key, seq_no, data)
                .into_iter()
                .collect()
        }
        // A guest answering a forwarded client.
        Inbound::Udp {
            dst_ip,
            dst_port,
            src_ip,
            payload,
            ..
        } if dst_ip == cfg.gateway_ip && forward::reply(&shared.forwards, dst_port, src_ip, payload) => {
            vec![]
        }
        // Routed through the gateway (addressed to its MAC), bound elsewhere: egress.
        Inbound::Udp {
            src_mac,
            dst_mac,
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            payload,
        } if dst_mac == cfg.gateway_mac && routed_out(cfg, src_ip, dst_ip) => {
            let key = udp_nat::FlowKey {
                guest: std::net::SocketAddrV4::new(src_ip, src_port),
                dst: std::net::SocketAddrV4::new(dst_ip, dst_port),
            };
            udp_nat::outbound(&shared.udp, sock, frame, src_mac, key, payload)
                .into_iter()
                .collect()
        }
        _ => vec![],
    }
}

/// Whether a packet from `src` to `dst`, sent to the gateway's MAC, leaves the network
/// through it: from a guest, to an address outside the subnet or the host-access one.
pub(crate) fn routed_out(cfg: &GatewayConfig, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    let inside = cfg.subnet.contains(&dst) && cfg.host_access != Some(dst);
    cfg.subnet.contains(&src) && !cfg.is_gateway_ip(dst) && !inside && !dst.is_broadcast() && !dst.is_multicast()
}

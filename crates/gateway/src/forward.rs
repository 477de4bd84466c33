//! Inbound port forwards: a host `address:port` that delivers to a guest's port, over
//! TCP or UDP. The guest sees every forwarded client as the gateway's address.
//!
//! TCP: a forward listens on a host socket; each accepted client becomes a connection
//! the gateway's TCP stack opens to the guest from `gateway:port` (see `tcp_nat`).
//! Removing the forward closes the listener; connections already made carry on.
//!
//! UDP: a forward listens on a host UDP socket. Each client (source
//! address) gets a flow with its own gateway-side port, so the guest's replies, sent to
//! `gateway:that port`, go back to that client alone. The guest sees datagrams from the
//! gateway's address. Flows idle out after `udp_idle`. The guest's MAC comes from what
//! the gateway has seen it send (ARP, DHCP, any IPv4; UDP and ICMPv6 over IPv6); for a
//! guest not seen yet the gateway asks with an ARP request (a Neighbour Solicitation
//! for an IPv6 guest) and that first datagram is dropped (counted).
//! Removing a forward closes its socket and forgets its flows; nothing else waits.
//!
//! A guest's IPv6 address works alike: the guest sees clients as the gateway's IPv6
//! address (the prefix's `::1`). Either host side serves either guest side. TCP to an
//! IPv6 guest needs the splice engine (the default).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::counters::GatewayCounters;
use crate::ctx::Ctx;
use crate::wire;

/// Gateway-side ports handed to forward flows (outside Linux's usual ephemeral range,
/// which the gateway never binds: these ports exist only in frames to guests).
const FLOW_PORTS: std::ops::Range<u16> = 20000..30000;

/// A forward's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardInfo {
    pub id: u64,
    pub protocol: Protocol,
    pub host: SocketAddr,
    pub guest: SocketAddr,
}

pub(crate) struct ForwardEntry {
    pub info: ForwardInfo,
    pub task: tokio::task::JoinHandle<()>,
}

/// One client of one forward.
pub(crate) struct ClientFlow {
    pub socket: Arc<UdpSocket>,
    pub client: SocketAddr,
    pub forward: u64,
    pub last: Instant,
}

/// Host listeners carried to guest ports: the forwards beside the context and the TCP
/// translator that carries their connections.
pub(crate) struct ForwardService {
    pub ctx: Arc<Ctx>,
    pub table: std::sync::Mutex<Forwards>,
    pub tcp: Arc<crate::tcp_nat::TcpService>,
    pub splice: Option<Arc<crate::tcp_splice::SpliceService>>,
}

#[derive(Default)]
pub(crate) struct Forwards {
    pub entries: HashMap<u64, ForwardEntry>,
    /// Gateway-side port -> client flow.
    pub flows: HashMap<u16, ClientFlow>,
    next_id: u64,
    next_port: u16,
}

impl Forwards {
    fn port_for(&mut self, forward: u64, client: SocketAddr, socket: &Arc<UdpSocket>, idle: Duration) -> Option<u16> {
        let now = Instant::now();
        if let Some((p, f)) = self
            .flows
            .iter_mut()
            .find(|(_, f)| f.forward == forward && f.client == client)
        {
            f.last = now;
            return Some(*p);
        }
        self.flows.retain(|_, f| now.duration_since(f.last) < idle);
        let span = FLOW_PORTS.end - FLOW_PORTS.start;
        for _ in 0..span {
            let p = FLOW_PORTS.start + self.next_port % span;
            self.next_port = self.next_port.wrapping_add(1);
            if let std::collections::hash_map::Entry::Vacant(slot) = self.flows.entry(p) {
                slot.insert(ClientFlow {
                    socket: socket.clone(),
                    client,
                    forward,
                    last: now,
                });
                return Some(p);
            }
        }
        None
    }
}

/// Starts a forward from `host` to `guest`.
pub(crate) fn add(
    svc: &Arc<ForwardService>,
    port: &Arc<crate::port::GatewayPort>,
    rt: &tokio::runtime::Handle,
    protocol: Protocol,
    host: SocketAddr,
    guest: SocketAddr,
) -> std::io::Result<ForwardInfo> {
    let _g = rt.enter();
    let mut fw = svc.table.lock().unwrap_or_else(|p| p.into_inner());
    let id = fw.next_id + 1;
    let (info, task) = match protocol {
        Protocol::Udp => {
            let std_sock = std::net::UdpSocket::bind(host)?;
            std_sock.set_nonblocking(true)?;
            let socket = Arc::new(UdpSocket::from_std(std_sock)?);
            let info = ForwardInfo {
                id,
                protocol,
                host: socket.local_addr()?,
                guest,
            };
            let task = rt.spawn(serve(svc.clone(), port.clone(), socket, info.clone()));
            (info, task)
        }
        Protocol::Tcp => {
            let std_listener = std::net::TcpListener::bind(host)?;
            std_listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(std_listener)?;
            let info = ForwardInfo {
                id,
                protocol,
                host: listener.local_addr()?,
                guest,
            };
            let task = rt.spawn(accept(svc.clone(), port.clone(), listener, guest));
            (info, task)
        }
    };
    fw.next_id = id;
    fw.entries.insert(
        info.id,
        ForwardEntry {
            info: info.clone(),
            task,
        },
    );
    Ok(info)
}

/// Stops a forward: its socket closes and its flows are forgotten.
pub(crate) fn remove(svc: &ForwardService, id: u64) -> bool {
    let mut fw = svc.table.lock().unwrap_or_else(|p| p.into_inner());
    let Some(entry) = fw.entries.remove(&id) else {
        return false;
    };
    entry.task.abort();
    fw.flows.retain(|_, f| f.forward != id);
    true
}

async fn accept(
    svc: Arc<ForwardService>,
    port: Arc<crate::port::GatewayPort>,
    listener: TcpListener,
    guest: SocketAddr,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) if !crate::fd_budget::admits(&stream) => {
                crate::counters::GatewayCounters::inc(&svc.ctx.counters.fd_budget_refused);
                drop(stream);
            }
            Ok((stream, _)) => {
                tokio::spawn(connect_guest(svc.clone(), port.clone(), guest, stream));
            }
            // Out of descriptors and the like: wait rather than spin.
            Err(e) => {
                tracing::warn!("forward listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// How long a host client waits for a guest the gateway has not seen to answer ARP.
const GUEST_ARP_WAIT: Duration = Duration::from_millis(500);

/// Carries one host client to the guest, if a guest is there: one that holds a lease
/// or was seen, or that answers ARP at once. Otherwise (its port is gone, or it never
/// came) the client gets a reset now, not a connect that hangs until it times out.
///
/// The splice addresses the guest's MAC itself (the smoltcp engine resolves it on its
/// own), so for it a guest must have been heard from: one that took a lease and has
/// sent nothing since (a VM serving and never calling out) is asked by ARP first.
async fn connect_guest(
    svc: Arc<ForwardService>,
    port: Arc<crate::port::GatewayPort>,
    guest: SocketAddr,
    stream: TcpStream,
) {
    let ip = guest.ip();
    let known = || match &svc.splice {
        Some(_) => svc.ctx.neighbours.get(ip).is_some(),
        None => svc.ctx.guest_at(ip),
    };
    if !known() {
        if let Some(ask) = solicit(&svc.ctx.cfg(), ip) {
            let _ = port.send(&ask).await;
        }
        let deadline = tokio::time::Instant::now() + GUEST_ARP_WAIT;
        while !known() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    match (&svc.splice, svc.ctx.neighbours.get(ip)) {
        (Some(splice), Some(mac)) => match stream.into_std() {
            Ok(s) => crate::tcp_splice::forward_client(splice.clone(), guest, mac, s.into()).await,
            Err(_) => GatewayCounters::inc(&svc.ctx.counters.forward_refused),
        },
        (None, _) if svc.ctx.guest_at(ip) => match guest {
            SocketAddr::V4(guest) => crate::tcp_nat::forward_client(svc.tcp.clone(), guest, stream).await,
            // The stack engine carries IPv4 only.
            SocketAddr::V6(_) => GatewayCounters::inc(&svc.ctx.counters.forward_refused),
        },
        _ => {
            GatewayCounters::inc(&svc.ctx.counters.forward_refused);
            let _ = stream.set_zero_linger();
        }
    }
}

async fn serve(
    svc: Arc<ForwardService>,
    port: Arc<crate::port::GatewayPort>,
    socket: Arc<UdpSocket>,
    info: ForwardInfo,
) {
    let cfg = svc.ctx.cfg_arc();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buf).await else {
            return;
        };
        let guest_ip = info.guest.ip();
        let Some(mac) = svc.ctx.neighbours.get(guest_ip) else {
            // Not seen yet: ask, and let the client's retry find it.
            GatewayCounters::inc(&svc.ctx.counters.forward_dropped);
            if let Some(ask) = solicit(&cfg, guest_ip) {
                let _ = port.send(&ask).await;
            }
            continue;
        };
        let flow_port = {
            let mut fw = svc.table.lock().unwrap_or_else(|p| p.into_inner());
            fw.port_for(info.id, client, &socket, cfg.udp_idle)
        };
        let Some(flow_port) = flow_port else {
            GatewayCounters::inc(&svc.ctx.counters.forward_dropped);
            continue;
        };
        let Some(from) = gateway_address(&cfg, guest_ip) else {
            continue;
        };
        let frame = wire::udp_frame_to(
            cfg.gateway_mac,
            mac,
            SocketAddr::new(from, flow_port),
            info.guest,
            &buf[..n],
        );
        if let Some(frame) = frame {
            let _ = port.send(&frame).await;
        }
    }
}

/// A guest's reply to `gateway:flow_port`: back to the client of that flow, if any.
pub(crate) fn reply(svc: &ForwardService, flow_port: u16, guest: IpAddr, payload: &[u8]) -> bool {
    let target = {
        let mut fw = svc.table.lock().unwrap_or_else(|p| p.into_inner());
        let Some(forward) = fw.flows.get(&flow_port).map(|f| f.forward) else {
            return false;
        };
        let forward_guest = fw.entries.get(&forward).map(|e| e.info.guest.ip());
        if forward_guest != Some(guest) {
            return false;
        }
        let flow = fw.flows.get_mut(&flow_port).expect("looked up above");
        flow.last = Instant::now();
        (flow.socket.clone(), flow.client)
    };
    // try_send_to: the host socket is local and rarely full; a full one drops the reply.
    target.0.try_send_to(payload, target.1).is_ok()
}

/// The gateway's address guests see forwarded clients come from, of `guest`'s version
/// (none for IPv6 on a network without it).
pub(crate) fn gateway_address(cfg: &crate::GatewayConfig, guest: IpAddr) -> Option<IpAddr> {
    match guest {
        IpAddr::V4(_) => Some(cfg.gateway_ip.into()),
        IpAddr::V6(_) => cfg.gateway_ip6().map(IpAddr::V6),
    }
}

/// Asks who has a guest's address: ARP for IPv4, a Neighbour Solicitation for IPv6.
fn solicit(cfg: &crate::GatewayConfig, guest: IpAddr) -> Option<Vec<u8>> {
    match guest {
        IpAddr::V4(ip) => Some(wire::arp_request(cfg.gateway_mac, cfg.gateway_ip, ip)),
        IpAddr::V6(ip) => crate::ndp::neighbour_solicit(cfg, ip),
    }
}

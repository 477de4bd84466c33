//! vmfabric's gateway: the virtual host on every network.
//!
//! A gateway is an ordinary, trusted port of its network (a socketpair port of the
//! switch). It answers ARP and ICMP echo for its addresses, serves DHCP and DNS, and
//! reports lease changes as [`LeaseEvent`]s for the control plane, which locks ports.
//! It never reaches into switch state.
//!
//! One tokio task per gateway reads frames from the port and answers in order; only
//! forwarded DNS queries run beside it, each bounded per client and in total.
#![forbid(unsafe_code)]

pub mod config;
pub mod contain;
pub mod counters;
pub mod dhcp;
pub mod dns;
pub mod fd_budget;
mod flows;
pub mod forward;
mod icmp_nat;
pub mod leases;
pub mod policy;
mod stack;
pub mod tcp_dns;
pub mod tcp_nat;
#[doc(hidden)] // a scripted guest TCP peer for the tests and fuzz targets
pub mod tcp_peer;
pub mod udp_nat;
pub mod upstream;
pub mod wire;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fabric::{Mac, PortId, Switch};
use smoltcp::wire::ArpOperation;
use tokio::net::UnixDatagram;

pub use config::{ConfigError, GatewayConfig, Reservation, ReservationKey, Upstreams};
pub use counters::GatewayCounters;
pub use dhcp::LeaseEvent;
pub use leases::{Lease, LeaseStore, MemoryLeaseStore, StoreError};

use dhcp::DhcpServer;
use dns::{Decision, Zone};
use upstream::UpstreamSet;
use wire::Inbound;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("attach the gateway to the network: {0}")]
    Fabric(#[from] fabric::FabricError),
    #[error("gateway socket: {0}")]
    Io(#[from] std::io::Error),
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct State {
    dhcp: DhcpServer,
    zone: Zone,
    tcp: tcp_dns::TcpDns,
}

/// Where a forwarded query's answer goes.
#[derive(Clone, Copy)]
enum ReplyTo {
    Udp {
        client_mac: Mac,
        client: (Ipv4Addr, u16),
        server_ip: Ipv4Addr,
    },
    Tcp(smoltcp::iface::SocketHandle),
}

struct Shared {
    cfg: Arc<GatewayConfig>,
    counters: Arc<GatewayCounters>,
    panics: Arc<contain::PanicCounters>,
    state: Mutex<State>,
    upstreams: UpstreamSet,
    inflight_total: AtomicUsize,
    inflight_by_client: Mutex<HashMap<Ipv4Addr, usize>>,
    events: Mutex<Option<mpsc::Sender<LeaseEvent>>>,
    udp_flows: Mutex<udp_nat::FlowTable>,
    forwards: Mutex<forward::Forwards>,
    /// Guest addresses and the MACs they were last seen with.
    neighbours: Mutex<HashMap<Ipv4Addr, Mac>>,
    /// The egress policy in force (starts as the config's, replaceable at run time).
    egress: Mutex<policy::EgressPolicy>,
    /// The other networks' subnets, which the egress policy keeps out of reach.
    other_subnets: Mutex<Vec<ipnet::Ipv4Net>>,
    host_addrs: policy::HostAddresses,
    tcp_nat: Mutex<tcp_nat::TcpNat>,
    icmp_flows: Mutex<icmp_nat::FlowTable>,
}

impl Shared {
    fn neighbour(&self, ip: Ipv4Addr) -> Option<Mac> {
        self.neighbours
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .copied()
    }

    /// Remembers where a guest address was seen (bounded: a guest cannot grow it past
    /// the subnet).
    fn saw(&self, ip: Ipv4Addr, mac: Mac) {
        if self.cfg.subnet.contains(&ip) && !ip.is_unspecified() && mac.is_unicast() {
            self.neighbours
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(ip, mac);
        }
    }

    /// Whether the egress policy refuses `dst:port` over `proto` (counted when it does).
    /// The host-access address is not subject to it: the network enabled it.
    fn egress_refused(&self, dst: Ipv4Addr, port: u16, proto: policy::Proto) -> bool {
        if self.cfg.host_access == Some(dst) {
            return false;
        }
        let others = self.other_subnets.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let egress = self.egress.lock().unwrap_or_else(|p| p.into_inner());
        let refused = egress.check(dst, port, proto, &others, &self.host_addrs).is_err();
        if refused {
            GatewayCounters::inc(&self.counters.egress_denied);
        }
        refused
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, ev: LeaseEvent) {
        let mut st = self.state();
        match &ev {
            LeaseEvent::Bound(l) => {
                if let Some(name) = &l.hostname {
                    st.zone.set(name, l.ip);
                }
            }
            LeaseEvent::Released { ip, .. } | LeaseEvent::Expired { ip, .. } => st.zone.remove_ip(*ip),
        }
        drop(st);
        if let Some(tx) = self.events.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(ev);
        }
    }
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    rt: tokio::runtime::Handle,
    /// The gateway's end of its switch port, for forwards to send on.
    sock: Arc<UnixDatagram>,
    port: PortId,
    events: Mutex<Option<mpsc::Receiver<LeaseEvent>>>,
    task: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Attaches a gateway to `network` on `switch` and starts serving on `rt`.
    pub fn attach(
        rt: &tokio::runtime::Handle,
        switch: &Switch,
        network: &str,
        cfg: GatewayConfig,
        store: Box<dyn LeaseStore>,
    ) -> Result<Gateway, GatewayError> {
        cfg.validate()?;
        let cfg = Arc::new(cfg);
        let counters = Arc::new(GatewayCounters::default());
        let dhcp = DhcpServer::new(cfg.clone(), counters.clone(), store);
        let mut zone = Zone::new(&cfg.domain, cfg.subnet);
        zone.set("gateway", cfg.gateway_ip);
        for l in dhcp.leases() {
            if let Some(name) = &l.hostname {
                zone.set(name, l.ip);
            }
        }
        let (tx, rx) = mpsc::channel();
        let cfg_egress = cfg.egress.clone();
        let tcp = new_tcp_dns(&cfg, &counters);
        let panics = Arc::new(contain::PanicCounters::default());
        let (port, fd) = switch.add_port(network, "gateway")?;
        switch.set_port_trusted(port, true)?;
        let std_sock = std::os::unix::net::UnixDatagram::from(fd);
        std_sock.set_nonblocking(true)?;
        let sock = {
            let _guard = rt.enter();
            Arc::new(UnixDatagram::from_std(std_sock)?)
        };
        let nat = tcp_nat::TcpNat::new(&cfg, sock.clone(), counters.clone(), panics.clone());
        let shared = Arc::new(Shared {
            panics,
            tcp_nat: Mutex::new(nat),
            icmp_flows: Mutex::default(),
            upstreams: UpstreamSet::new(cfg.upstreams.clone()),
            cfg,
            counters,
            state: Mutex::new(State { dhcp, zone, tcp }),
            inflight_total: AtomicUsize::new(0),
            inflight_by_client: Mutex::new(HashMap::new()),
            events: Mutex::new(Some(tx)),
            udp_flows: Mutex::default(),
            forwards: Mutex::default(),
            neighbours: Mutex::default(),
            other_subnets: Mutex::default(),
            egress: Mutex::new(cfg_egress),
            host_addrs: policy::HostAddresses::default(),
        });
        let task = rt.spawn(supervise(shared.clone(), sock.clone()));
        let writer = rt.spawn(tcp_nat::write_outbox(shared.clone()));
        Ok(Gateway {
            shared,
            rt: rt.clone(),
            sock: sock.clone(),
            port,
            events: Mutex::new(Some(rx)),
            task,
            writer,
        })
    }

    /// The switch port the gateway sits on.
    pub fn port(&self) -> PortId {
        self.port
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.shared.cfg
    }

    pub fn counters(&self) -> &GatewayCounters {
        &self.shared.counters
    }

    /// Panics in protocol handlers that were contained, per service.
    pub fn handler_panics(&self) -> &contain::PanicCounters {
        &self.shared.panics
    }

    /// Lease changes, for the control plane; the first caller gets them.
    pub fn take_events(&self) -> Option<mpsc::Receiver<LeaseEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn leases(&self) -> Vec<Lease> {
        let mut v: Vec<Lease> = self.shared.state().dhcp.leases().cloned().collect();
        v.sort_by_key(|l| u32::from(l.ip));
        v
    }

    /// Names a MAC by its port's label, for VMs that send no DHCP hostname.
    pub fn set_name_hint(&self, mac: Mac, name: &str) {
        if let Some(label) = dhcp::sanitize_hostname(name) {
            self.shared.state().dhcp.set_name_hint(mac, label);
        }
    }

    /// Replaces the reservations, refusing any that does not fit the network.
    pub fn set_reservations(&self, reservations: Vec<Reservation>) -> Result<(), ConfigError> {
        for r in &reservations {
            self.shared.cfg.validate_reservation(r)?;
        }
        self.shared.state().dhcp.set_reservations(reservations);
        Ok(())
    }

    /// Forwards TCP connections or UDP datagrams arriving at `host` (port 0: any free
    /// port) to `guest`; replies go back to each client. The guest sees the gateway's
    /// address as the source of every client.
    pub fn add_forward(
        &self,
        protocol: forward::Protocol,
        host: std::net::SocketAddr,
        guest: std::net::SocketAddrV4,
    ) -> std::io::Result<forward::ForwardInfo> {
        if !self.shared.cfg.subnet.contains(guest.ip()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not on this network", guest.ip()),
            ));
        }
        forward::add(&self.shared, &self.sock, &self.rt, protocol, host, guest)
    }

    /// Stops a forward; returns whether there was one.
    pub fn remove_forward(&self, id: u64) -> bool {
        forward::remove(&self.shared, id)
    }

    pub fn forwards(&self) -> Vec<forward::ForwardInfo> {
        let fw = self.shared.forwards.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = fw.entries.values().map(|e| e.info.clone()).collect();
        v.sort_by_key(|f| f.id);
        v
    }

    /// The UDP flows the gateway carries for its guests now.
    pub fn udp_flows(&self) -> Vec<udp_nat::FlowInfo> {
        self.shared.udp_flows.lock().unwrap_or_else(|p| p.into_inner()).list()
    }

    /// The TCP connections the gateway carries for its guests now (egress and forwards).
    pub fn tcp_flows(&self) -> Vec<tcp_nat::TcpFlowInfo> {
        tcp_nat::list(&self.shared)
    }

    /// Replaces the egress policy; it applies to flows opened from now on.
    pub fn set_egress_policy(&self, policy: policy::EgressPolicy) {
        *self.shared.egress.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    pub fn egress_policy(&self) -> policy::EgressPolicy {
        self.shared.egress.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Tells the gateway the other networks' subnets, which its guests may not reach.
    pub fn set_other_subnets(&self, subnets: Vec<ipnet::Ipv4Net>) {
        *self.shared.other_subnets.lock().unwrap_or_else(|p| p.into_inner()) = subnets;
    }

    /// Publishes a name that no lease backs (a host with a static address).
    pub fn set_static_name(&self, label: &str, ip: Ipv4Addr) {
        self.shared.state().zone.set(label, ip);
    }

    pub fn resolve(&self, label: &str) -> Option<Ipv4Addr> {
        self.shared.state().zone.lookup(label)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
        self.writer.abort();
    }
}

/// Frames the gateway takes from its port before running its TCP stacks.
const BATCH: usize = 64;

fn new_tcp_dns(cfg: &GatewayConfig, counters: &Arc<GatewayCounters>) -> tcp_dns::TcpDns {
    let gateway_ips: Vec<Ipv4Addr> = std::iter::once(cfg.gateway_ip)
        .chain(cfg.extra_ips.iter().copied())
        .collect();
    tcp_dns::TcpDns::new(
        cfg.gateway_mac,
        &gateway_ips,
        cfg.subnet.prefix_len(),
        usize::from(cfg.mtu),
        counters.clone(),
    )
}

/// Runs the gateway's frame loop, and runs it again if it ever dies of a panic that
/// escaped the handlers' containment: the leases, flows and names live in `Shared`
/// and outlive the loop, so a restart loses at most the frames in hand.
async fn supervise(shared: Arc<Shared>, sock: Arc<UnixDatagram>) {
    /// Aborts the loop when the supervisor itself is aborted (the gateway dropped).
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    loop {
        let mut run = AbortOnDrop(tokio::spawn(serve(shared.clone(), sock.clone())));
        match (&mut run.0).await {
            // The loop returns only when the port is gone: the gateway was removed.
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                shared.panics.record(contain::Service::Task);
                tracing::error!(subnet = %shared.cfg.subnet, "gateway task panicked; restarting it with its leases");
                // A pause, so an input that kills the loop every time cannot spin a core.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => return,
        }
    }
}

async fn serve(shared: Arc<Shared>, sock: Arc<UnixDatagram>) {
    let mut buf = vec![0u8; 65536 + 64];
    // Answers of forwarded TCP queries come back here, to be written by this task.
    let (tcp_tx, mut tcp_rx) = tokio::sync::mpsc::unbounded_channel::<(smoltcp::iface::SocketHandle, Vec<u8>)>();
    loop {
        let (next, tcp_delay) = {
            let mut st = shared.state();
            (st.dhcp.next_expiry(), st.tcp.poll_delay())
        };
        let nat_delay = shared.tcp_nat.lock().unwrap_or_else(|p| p.into_inner()).poll_delay();
        let sleep = match next {
            Some(at) => Duration::from_secs(at.saturating_sub(unix_now())),
            None => Duration::from_secs(24 * 3600),
        };
        let tcp_sleep = tcp_delay.unwrap_or(Duration::from_secs(24 * 3600));
        let nat_sleep = nat_delay.unwrap_or(Duration::from_secs(24 * 3600));
        tokio::select! {
            r = sock.recv(&mut buf) => match r {
                Ok(n) => {
                    // Take what else is waiting too, up to a batch, and run the TCP
                    // stacks once for all of it.
                    let mut tcp_touched = false;
                    let mut len = Some(n);
                    let mut taken = 0;
                    while let Some(n) = len {
                        #[cfg(test)]
                        tests::panic_if_marked(&buf[..n], tests::TASK_MARK);
                        let (replies, touched) = handle_frame(&shared, &sock, &buf[..n]);
                        tcp_touched |= touched;
                        for reply in replies {
                            let _ = sock.send(&reply).await;
                        }
                        taken += 1;
                        len = if taken < BATCH { sock.try_recv(&mut buf).ok() } else { None };
                    }
                    shared.tcp_nat.lock().unwrap_or_else(|p| p.into_inner()).poll_pending();
                    if tcp_touched {
                        run_tcp(&shared, &sock, &tcp_tx).await;
                    }
                }
                Err(e) => {
                    tracing::warn!("gateway port closed: {e}");
                    return;
                }
            },
            Some((handle, answer)) = tcp_rx.recv() => {
                shared.state().tcp.deliver(handle, &answer);
                run_tcp(&shared, &sock, &tcp_tx).await;
            }
            _ = tokio::time::sleep(tcp_sleep) => run_tcp(&shared, &sock, &tcp_tx).await,
            _ = tokio::time::sleep(nat_sleep) => shared.tcp_nat.lock().unwrap_or_else(|p| p.into_inner()).poll(),
            _ = tokio::time::sleep(sleep) => {
                let gone = shared.state().dhcp.expire(unix_now());
                for ev in gone {
                    shared.emit(ev);
                }
            }
        }
    }
}

/// Runs the TCP DNS stack, sends what it produced and forwards what it must.
async fn run_tcp(
    shared: &Arc<Shared>,
    sock: &Arc<UnixDatagram>,
    answers: &tokio::sync::mpsc::UnboundedSender<(smoltcp::iface::SocketHandle, Vec<u8>)>,
) {
    let out = {
        let mut st = shared.state();
        let State { tcp, zone, .. } = &mut *st;
        match contain::contained(&shared.panics, contain::Service::DnsTcp, &[], || tcp.poll(zone)) {
            Some(out) => out,
            None => {
                // The stack's state is unknown after a panic inside it: start it anew
                // (its connections are lost; the clients retry).
                *tcp = new_tcp_dns(&shared.cfg, &shared.counters);
                return;
            }
        }
    };
    let c = &shared.counters;
    c.dns_local.fetch_add(out.local, Ordering::Relaxed);
    c.dns_nxdomain.fetch_add(out.nxdomain, Ordering::Relaxed);
    c.dns_malformed.fetch_add(out.malformed, Ordering::Relaxed);
    c.dns_tcp_refused.fetch_add(out.refused, Ordering::Relaxed);
    for frame in out.frames {
        let _ = sock.send(&frame).await;
    }
    for (handle, query) in out.forward {
        let client = Ipv4Addr::UNSPECIFIED; // TCP connections share one in-flight budget
        spawn_forward(shared, sock, query, client, ReplyTo::Tcp(handle), Some(answers.clone()));
    }
}

/// Answers one frame; returns the frames to send back now, and whether the TCP stack
/// got the frame and needs a run. Forwarded DNS queries are answered by their own task.
/// Each step runs contained (see `contain`): a panic drops this frame only.
fn handle_frame(shared: &Arc<Shared>, sock: &Arc<UnixDatagram>, frame: &[u8]) -> (Vec<Vec<u8>>, bool) {
    use contain::{contained, Service};
    let inbound = match contained(&shared.panics, Service::Frame, frame, || wire::classify(frame)) {
        Some(Ok(i)) => i,
        Some(Err(_)) => {
            GatewayCounters::inc(&shared.counters.malformed_frames);
            return (vec![], false);
        }
        None => return (vec![], false),
    };
    let service = service_of(&shared.cfg, &inbound);
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
fn service_of(cfg: &GatewayConfig, inbound: &Inbound<'_>) -> contain::Service {
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
fn feed_tcp(
    shared: &Arc<Shared>,
    sock: &Arc<UnixDatagram>,
    frame: &[u8],
    inbound: &Inbound<'_>,
) -> (bool, Vec<Vec<u8>>) {
    let cfg = &shared.cfg;
    match *inbound {
        Inbound::Tcp(head) => {
            let dst = *head.dst.ip();
            let nat_key = tcp_nat::FlowKey {
                guest: head.src,
                peer: head.dst,
            };
            let forwarded =
                cfg.is_gateway_ip(dst) && shared.tcp_nat.lock().unwrap_or_else(|p| p.into_inner()).knows(&nat_key);
            if cfg.is_gateway_ip(dst) && !forwarded {
                shared.state().tcp.input(frame);
                return (true, vec![]);
            }
            if head.dst_mac == cfg.gateway_mac && (forwarded || routed_out(cfg, *head.src.ip(), dst)) {
                return (false, tcp_nat::inbound(shared, sock, frame, head));
            }
            (false, vec![])
        }
        Inbound::Arp {
            target_ip, sender_ip, ..
        } if cfg.is_gateway_ip(target_ip) && sender_ip != target_ip => {
            shared.state().tcp.input(frame);
            shared.tcp_nat.lock().unwrap_or_else(|p| p.into_inner()).input(frame);
            (true, vec![])
        }
        _ => (false, vec![]),
    }
}

fn answer_frame(shared: &Arc<Shared>, sock: &Arc<UnixDatagram>, frame: &[u8], inbound: Inbound<'_>) -> Vec<Vec<u8>> {
    let cfg = &shared.cfg;
    let c = &shared.counters;
    match &inbound {
        Inbound::Arp {
            sender_mac, sender_ip, ..
        } => shared.saw(*sender_ip, *sender_mac),
        Inbound::Udp { src_mac, src_ip, .. } => shared.saw(*src_ip, *src_mac),
        Inbound::IcmpEcho { src_mac, src_ip, .. } => shared.saw(*src_ip, *src_mac),
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
            icmp_nat::outbound(shared, sock, frame, src_mac, key, seq_no, data)
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
        } if dst_ip == cfg.gateway_ip && forward::reply(shared, dst_port, src_ip, payload) => {
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
            udp_nat::outbound(shared, sock, frame, src_mac, key, payload)
                .into_iter()
                .collect()
        }
        _ => vec![],
    }
}

/// Whether a packet from `src` to `dst`, sent to the gateway's MAC, leaves the network
/// through it: from a guest, to an address outside the subnet or the host-access one.
fn routed_out(cfg: &GatewayConfig, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    let inside = cfg.subnet.contains(&dst) && cfg.host_access != Some(dst);
    cfg.subnet.contains(&src) && !cfg.is_gateway_ip(dst) && !inside && !dst.is_broadcast() && !dst.is_multicast()
}

/// Releases a query's place in the in-flight bounds when its task ends.
struct InflightGuard {
    shared: Arc<Shared>,
    client: Ipv4Addr,
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

fn spawn_forward(
    shared: &Arc<Shared>,
    sock: &Arc<UnixDatagram>,
    query: Vec<u8>,
    client_ip: Ipv4Addr,
    reply_to: ReplyTo,
    tcp_answers: Option<tokio::sync::mpsc::UnboundedSender<(smoltcp::iface::SocketHandle, Vec<u8>)>>,
) {
    let cfg = &shared.cfg;
    {
        let mut map = shared.inflight_by_client.lock().unwrap_or_else(|p| p.into_inner());
        let mine = map.entry(client_ip).or_insert(0);
        if *mine >= cfg.dns_inflight_per_client
            || shared.inflight_total.load(Ordering::Relaxed) >= cfg.dns_inflight_total
        {
            GatewayCounters::inc(&shared.counters.dns_dropped);
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
        let upstreams = shared.upstreams.current();
        let answer = upstream::forward(&query, &upstreams, shared.cfg.dns_timeout).await;
        let bytes = match answer {
            Some(a) => {
                GatewayCounters::inc(&shared.counters.dns_forwarded);
                a
            }
            None => {
                GatewayCounters::inc(&shared.counters.dns_servfail);
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
                    server_ip,
                },
                _,
            ) => {
                let cfg = &shared.cfg;
                let frame = wire::udp_frame(cfg.gateway_mac, client_mac, (server_ip, 53), client, &bytes);
                let _ = sock.send(&frame).await;
            }
            (ReplyTo::Tcp(handle), Some(tx)) => {
                let _ = tx.send((handle, bytes));
            }
            (ReplyTo::Tcp(_), None) => {}
        }
        drop(guard);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{DhcpOption, MessageType};
    use dhcproto::{Decodable, Encodable};
    use std::os::unix::net::UnixDatagram as StdDatagram;

    /// Frames carrying these bytes make the handler (or the loop, outside the
    /// handlers' containment) panic, standing for a bug that a guest's input finds.
    pub(crate) const HANDLER_MARK: &[u8] = b"vmfabric-test-panic-in-handler";
    pub(crate) const TASK_MARK: &[u8] = b"vmfabric-test-panic-in-task";

    pub(crate) fn panic_if_marked(frame: &[u8], mark: &[u8]) {
        if frame.windows(mark.len()).any(|w| w == mark) {
            panic!("injected by the test");
        }
    }

    const CLIENT: Mac = Mac([2, 0, 0, 0, 0, 0x42]);

    fn client_msg(kind: MessageType, opts: Vec<DhcpOption>) -> Vec<u8> {
        let mut m = dhcproto::v4::Message::new_with_id(
            9,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &CLIENT.0,
        );
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in opts {
            m.opts_mut().insert(o);
        }
        let payload = m.to_vec().unwrap();
        wire::udp_frame(
            CLIENT,
            Mac::BROADCAST,
            (Ipv4Addr::UNSPECIFIED, 68),
            (Ipv4Addr::BROADCAST, 67),
            &payload,
        )
    }

    fn discover() -> Vec<u8> {
        client_msg(MessageType::Discover, vec![])
    }

    fn answer(client: &StdDatagram) -> Option<dhcproto::v4::Message> {
        let mut buf = vec![0u8; 2048];
        while let Ok(n) = client.recv(&mut buf) {
            if let Ok(Inbound::Udp {
                src_port: 67, payload, ..
            }) = wire::classify(&buf[..n])
            {
                return dhcproto::v4::Message::decode(&mut dhcproto::Decoder::new(payload)).ok();
            }
        }
        None
    }

    fn offered(client: &StdDatagram) -> bool {
        answer(client).is_some_and(|m| m.opts().msg_type() == Some(MessageType::Offer))
    }

    fn marked(mark: &[u8]) -> Vec<u8> {
        wire::udp_frame(
            CLIENT,
            Mac::BROADCAST,
            (Ipv4Addr::new(10, 67, 0, 9), 1000),
            (Ipv4Addr::new(10, 67, 0, 1), 9),
            mark,
        )
    }

    #[test]
    fn a_panic_in_a_handler_costs_one_frame_and_a_panic_in_the_loop_a_restart() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let sw = Switch::start(fabric::SwitchConfig::default()).unwrap();
        sw.add_network("n", fabric::NetworkConfig::default()).unwrap();
        let mut cfg = GatewayConfig::new("n", "10.67.0.0/24".parse().unwrap());
        cfg.upstreams = Upstreams::Static(vec![]);
        let gw = Gateway::attach(rt.handle(), &sw, "n", cfg, Box::new(MemoryLeaseStore::default())).unwrap();
        let (_, fd) = sw.add_port("n", "client").unwrap();
        let client = StdDatagram::from(fd);
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client.send(&discover()).unwrap();
        let offer = answer(&client).unwrap();
        let request = client_msg(
            MessageType::Request,
            vec![
                DhcpOption::RequestedIpAddress(offer.yiaddr()),
                DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 67, 0, 1)),
            ],
        );
        client.send(&request).unwrap();
        assert_eq!(answer(&client).unwrap().opts().msg_type(), Some(MessageType::Ack));

        client.send(&marked(HANDLER_MARK)).unwrap();
        client.send(&discover()).unwrap();
        assert!(offered(&client), "the gateway answers after a handler panicked");
        assert_eq!(gw.handler_panics().get(contain::Service::Dns), 0);
        assert_eq!(gw.handler_panics().get(contain::Service::UdpNat), 1);

        client.send(&marked(TASK_MARK)).unwrap();
        client.send(&discover()).unwrap();
        assert!(offered(&client), "the gateway answers after its loop was restarted");
        assert_eq!(gw.handler_panics().get(contain::Service::Task), 1);
        assert_eq!(gw.leases().len(), 1, "the lease outlives the restart");
        assert_eq!(gw.leases()[0].ip, offer.yiaddr());
        drop(gw);
        drop(rt);
    }
}

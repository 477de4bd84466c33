//! vmfabric's gateway: the virtual host on every network.
//!
//! A gateway is an ordinary, trusted port of its network (a socketpair port of the
//! switch). It answers ARP and ICMP echo for its addresses, serves DHCP and DNS, and
//! reports lease changes as [`LeaseEvent`]s for the control plane, which locks ports.
//! It never reaches into switch state.
//!
//! One tokio task per gateway reads frames from the port and answers in order; only
//! forwarded DNS queries run beside it, each bounded per client and in total.
// Unsafe code only in `sys` (two socket calls rustix does not wrap).
#![deny(unsafe_code)]

pub mod config;
pub mod contain;
pub mod counters;
pub mod dhcp;
pub mod dhcp6;
pub mod dns;
pub mod fd_budget;
mod flows;
pub mod forward;
mod icmp_nat;
pub mod leases;
mod names;
pub mod ndp;
pub mod policy;
mod port;
mod stack;
mod sys;
pub mod tcp_dns;
pub mod tcp_nat;
#[doc(hidden)] // a scripted guest TCP peer for the tests and fuzz targets
pub mod tcp_peer;
mod tcp_splice;
pub mod udp_nat;
pub mod upstream;
pub mod wire;

mod ctx;
mod dispatch;
mod dns_forward;
mod serve;

use dispatch::*;
use dns_forward::*;
use serve::*;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicUsize;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use fabric::{Mac, PortId, Switch};

pub use config::{ConfigError, GatewayConfig, Reservation, ReservationKey, TcpEngine, Upstreams};
pub use counters::GatewayCounters;
pub use dhcp::LeaseEvent;
pub use leases::{Claimed, Lease, Lease6, LeaseStore, MemoryLeaseStore, StoreError};

use dhcp::DhcpServer;
use dns::Zone;
use upstream::UpstreamSet;

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
        client: std::net::SocketAddr,
        /// The gateway's address the query went to (port 53).
        server: std::net::SocketAddr,
    },
    Tcp(smoltcp::iface::SocketHandle),
}

struct Shared {
    /// The config, counters, neighbours and egress check the services share too.
    ctx: Arc<ctx::Ctx>,
    panics: Arc<contain::PanicCounters>,
    state: Mutex<State>,
    upstreams: UpstreamSet,
    inflight_total: AtomicUsize,
    inflight_by_client: Mutex<HashMap<std::net::IpAddr, usize>>,
    events: Mutex<Option<mpsc::Sender<LeaseEvent>>>,
    udp: Arc<udp_nat::UdpNat>,
    icmp: Arc<icmp_nat::IcmpNat>,
    tcp: Arc<tcp_nat::TcpService>,
    /// The splice, when the config picks it over the stack for guest TCP.
    splice: Option<Arc<tcp_splice::SpliceService>>,
    forwards: Arc<forward::ForwardService>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, ev: LeaseEvent) {
        let mut st = self.state();
        let mut leased = self.ctx.leased.lock().unwrap_or_else(|p| p.into_inner());
        match &ev {
            LeaseEvent::Bound(l) => {
                if let Some(name) = &l.hostname {
                    st.zone.set(name, l.ip);
                    if let Some(ip6) = self.ctx.cfg().slaac_address_of(l.mac) {
                        st.zone.set6(name, ip6);
                    }
                }
                leased.insert(l.ip);
            }
            LeaseEvent::Released { ip, .. } | LeaseEvent::Expired { ip, .. } => {
                st.zone.remove_ip(*ip);
                leased.remove(ip);
            }
            // Names keep their SLAAC address; the port locks care about these.
            LeaseEvent::Bound6 { .. } | LeaseEvent::Ended6 { .. } => {}
        }
        drop(leased);
        drop(st);
        if let Some(tx) = self.events.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(ev);
        }
    }

    /// Sends on what DHCPv6 bound and ended since it last did.
    fn emit_dhcp6(&self) {
        let events = self.state().dhcp.take_events6();
        for ev in events {
            self.emit(ev);
        }
    }
}

/// Flows a gateway carries now, by protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenFlows {
    pub udp: usize,
    pub tcp: usize,
    pub icmp: usize,
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    rt: tokio::runtime::Handle,
    /// The gateway's end of its switch port, for forwards to send on.
    sock: Arc<crate::port::GatewayPort>,
    port: PortId,
    events: Mutex<Option<mpsc::Receiver<LeaseEvent>>>,
    task: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
    splice_writer: Option<tokio::task::JoinHandle<()>>,
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
        zone.configure(&cfg);
        zone.set("gateway", cfg.gateway_ip);
        if let Some(ip6) = cfg.gateway_ip6() {
            zone.set6("gateway", ip6);
        }
        for l in dhcp.leases() {
            if let Some(name) = &l.hostname {
                zone.set(name, l.ip);
                if let Some(ip6) = cfg.slaac_address_of(l.mac) {
                    zone.set6(name, ip6);
                }
            }
        }
        let (tx, rx) = mpsc::channel();
        let tcp_dns = new_tcp_dns(&cfg, &counters);
        let panics = Arc::new(contain::PanicCounters::default());
        let (port, end) = switch.add_inprocess_port(network, "gateway")?;
        switch.set_port_trusted(port, true)?;
        let sock = {
            let _guard = rt.enter();
            // Only the splice takes a guest's segment offloads whole; for the stack the
            // switch's thread cuts them, beside this one.
            let takes_offloads = cfg.tcp_engine == config::TcpEngine::Splice;
            Arc::new(port::GatewayPort::new(end, takes_offloads)?)
        };
        let nat = tcp_nat::TcpNat::new(&cfg, sock.clone(), counters.clone(), panics.clone());
        let ctx = Arc::new(ctx::Ctx::new(cfg.clone(), counters.clone()));
        ctx.leased
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(dhcp.leases().map(|l| l.ip));
        let tcp = Arc::new(tcp_nat::TcpService {
            ctx: ctx.clone(),
            nat: Mutex::new(nat),
        });
        let splice = (cfg.tcp_engine == config::TcpEngine::Splice)
            .then(|| Arc::new(tcp_splice::SpliceService::new(ctx.clone(), sock.clone())));
        let shared = Arc::new(Shared {
            panics,
            udp: Arc::new(udp_nat::UdpNat {
                ctx: ctx.clone(),
                flows: Mutex::default(),
            }),
            icmp: Arc::new(icmp_nat::IcmpNat {
                ctx: ctx.clone(),
                flows: Mutex::default(),
            }),
            forwards: Arc::new(forward::ForwardService {
                ctx: ctx.clone(),
                table: Mutex::default(),
                tcp: tcp.clone(),
                splice: splice.clone(),
            }),
            tcp,
            splice,
            ctx,
            upstreams: UpstreamSet::new(cfg.upstreams.clone()),
            state: Mutex::new(State {
                dhcp,
                zone,
                tcp: tcp_dns,
            }),
            inflight_total: AtomicUsize::new(0),
            inflight_by_client: Mutex::new(HashMap::new()),
            events: Mutex::new(Some(tx)),
        });
        // The bindings the store held, for the port locks.
        shared.emit_dhcp6();
        let task = rt.spawn(supervise(shared.clone(), sock.clone()));
        let writer = rt.spawn(tcp_nat::write_outbox(shared.tcp.clone()));
        let splice_writer = shared.splice.clone().map(|s| rt.spawn(tcp_splice::write_outbox(s)));
        Ok(Gateway {
            shared,
            rt: rt.clone(),
            sock: sock.clone(),
            port,
            events: Mutex::new(Some(rx)),
            task,
            writer,
            splice_writer,
        })
    }

    /// The switch port the gateway sits on.
    pub fn port(&self) -> PortId {
        self.port
    }

    /// Takes new settings while running: DNS (domain, search list, upstreams,
    /// forwarders, records), DHCP (range, lease time, options), flow bounds and
    /// timeouts. Leases, flows and forwards stay. Its addresses, MTU and host access
    /// are the network's and cannot change here.
    pub fn reconfigure(&self, cfg: GatewayConfig) -> Result<(), GatewayError> {
        cfg.validate()?;
        if !self.shared.ctx.cfg().same_identity(&cfg) {
            return Err(ConfigError(
                "the gateway's subnet, addresses, MTU, host access and TCP engine are fixed while it runs".into(),
            )
            .into());
        }
        let cfg = Arc::new(cfg);
        let mut st = self.shared.state();
        st.dhcp.set_config(cfg.clone());
        st.zone.configure(&cfg);
        self.shared.upstreams.set_source(cfg.upstreams.clone());
        self.shared.ctx.set_cfg(cfg);
        Ok(())
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<GatewayConfig> {
        self.shared.ctx.cfg_arc()
    }

    pub fn counters(&self) -> &GatewayCounters {
        &self.shared.ctx.counters
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

    /// The DHCPv6 bindings now.
    pub fn leases6(&self) -> Vec<Lease6> {
        let mut v: Vec<Lease6> = self.shared.state().dhcp.leases6().cloned().collect();
        v.sort_by_key(|l| l.ip);
        v
    }

    /// Names a MAC by its port's label, for VMs that send no DHCP hostname.
    pub fn set_name_hint(&self, mac: Mac, name: &str) {
        if let Some(label) = names::sanitize_hostname(name) {
            self.shared.state().dhcp.set_name_hint(mac, label);
        }
    }

    /// Replaces the reservations, refusing any that does not fit the network.
    pub fn set_reservations(&self, reservations: Vec<Reservation>) -> Result<(), ConfigError> {
        for r in &reservations {
            self.shared.ctx.cfg().validate_reservation(r)?;
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
        guest: std::net::SocketAddr,
    ) -> std::io::Result<forward::ForwardInfo> {
        let cfg = self.shared.ctx.cfg();
        let on_network = match guest.ip() {
            std::net::IpAddr::V4(ip) => cfg.subnet.contains(&ip),
            std::net::IpAddr::V6(ip) => cfg.ipv6.is_some_and(|p| p.contains(&ip)),
        };
        if !on_network {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not on this network", guest.ip()),
            ));
        }
        forward::add(&self.shared.forwards, &self.sock, &self.rt, protocol, host, guest)
    }

    /// Stops a forward; returns whether there was one.
    pub fn remove_forward(&self, id: u64) -> bool {
        forward::remove(&self.shared.forwards, id)
    }

    pub fn forwards(&self) -> Vec<forward::ForwardInfo> {
        let fw = self.shared.forwards.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = fw.entries.values().map(|e| e.info.clone()).collect();
        v.sort_by_key(|f| f.id);
        v
    }

    /// How many flows the gateway carries now: UDP, TCP (egress and forwards), ICMP.
    pub fn open_flows(&self) -> OpenFlows {
        OpenFlows {
            udp: self.shared.udp.flows.lock().unwrap_or_else(|p| p.into_inner()).len(),
            tcp: match &self.shared.splice {
                Some(s) => s.len(),
                None => self.shared.tcp.nat.lock().unwrap_or_else(|p| p.into_inner()).len(),
            },
            icmp: self.shared.icmp.flows.lock().unwrap_or_else(|p| p.into_inner()).len(),
        }
    }

    /// The UDP flows the gateway carries for its guests now.
    pub fn udp_flows(&self) -> Vec<udp_nat::FlowInfo> {
        self.shared.udp.flows.lock().unwrap_or_else(|p| p.into_inner()).list()
    }

    /// The TCP connections the gateway carries for its guests now (egress and forwards).
    pub fn tcp_flows(&self) -> Vec<tcp_nat::TcpFlowInfo> {
        match &self.shared.splice {
            Some(s) => s.list(),
            None => tcp_nat::list(&self.shared.tcp),
        }
    }

    /// Replaces the egress policy; it applies to flows opened from now on.
    pub fn set_egress_policy(&self, policy: policy::EgressPolicy) {
        self.shared.ctx.egress.set_policy(policy);
    }

    pub fn egress_policy(&self) -> policy::EgressPolicy {
        self.shared.ctx.egress.policy()
    }

    /// Tells the gateway the other networks' subnets and IPv6 prefixes, which its
    /// guests may not reach.
    pub fn set_other_subnets(&self, subnets: Vec<ipnet::IpNet>) {
        self.shared.ctx.egress.set_other_subnets(subnets);
    }

    /// The port of `mac` is gone: its lease, DNS name and neighbour entry go now, and
    /// its address rests (`release_quarantine`) before another guest may lease it.
    /// Returns the address it held.
    pub fn release_port(&self, mac: Mac) -> Option<Ipv4Addr> {
        let event = self.shared.state().dhcp.release_port(mac, unix_now());
        self.shared.emit_dhcp6();
        self.shared.ctx.neighbours.forget_mac(mac);
        let event = event?;
        let ip = match &event {
            LeaseEvent::Released { ip, .. } => *ip,
            _ => return None,
        };
        self.shared.emit(event);
        Some(ip)
    }

    /// Whether some guest is at `ip`: it holds a lease, or frames came from it.
    pub fn guest_at(&self, ip: std::net::IpAddr) -> bool {
        self.shared.ctx.guest_at(ip)
    }

    /// Publishes a name that no lease backs (a host with a static address, a guest
    /// on another node), with its IPv6 address when it has one.
    pub fn set_static_name(&self, label: &str, ip: Ipv4Addr, ip6: Option<std::net::Ipv6Addr>) {
        let mut st = self.shared.state();
        st.zone.set(label, ip);
        if let Some(ip6) = ip6 {
            st.zone.set6(label, ip6);
        }
    }

    /// Takes back a name [`Gateway::set_static_name`] published, if it still points
    /// at `ip`.
    pub fn remove_static_name(&self, label: &str, ip: Ipv4Addr) {
        let mut st = self.shared.state();
        if st.zone.lookup(label) == Some(ip) {
            st.zone.remove_ip(ip);
        }
    }

    pub fn resolve(&self, label: &str) -> Option<Ipv4Addr> {
        self.shared.state().zone.lookup(label)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
        self.writer.abort();
        if let Some(w) = &self.splice_writer {
            w.abort();
        }
    }
}

/// Frames the gateway takes from its port before running its TCP stacks.
const BATCH: usize = 64;

fn new_tcp_dns(cfg: &GatewayConfig, counters: &Arc<GatewayCounters>) -> tcp_dns::TcpDns {
    let v4 = std::iter::once(cfg.gateway_ip).chain(cfg.extra_ips.iter().copied());
    let v4 = v4.map(|ip| (ip.into(), cfg.subnet.prefix_len()));
    let v6 = cfg
        .gateway_ip6()
        .into_iter()
        .chain(cfg.ipv6.map(|_| cfg.gateway_link_local()))
        .map(|ip| (ip.into(), 64));
    let gateway_ips: Vec<(std::net::IpAddr, u8)> = v4.chain(v6).collect();
    tcp_dns::TcpDns::new(cfg.gateway_mac, &gateway_ips, usize::from(cfg.mtu), counters.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{DhcpOption, MessageType};
    use dhcproto::{Decodable, Encodable};
    use std::os::unix::net::UnixDatagram as StdDatagram;
    use std::time::Duration;
    use wire::Inbound;

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

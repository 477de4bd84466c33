//! What the gateway's services share, and nothing more: the configuration, the
//! counters, where guests were last seen, and the egress check. Each service owns its
//! own table beside it (`UdpNat`, `IcmpNat`, `TcpService`, `ForwardService`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, RwLock};

use fabric::Mac;

use crate::config::GatewayConfig;
use crate::counters::GatewayCounters;
use crate::policy;

pub(crate) struct Ctx {
    /// Swapped whole when the network's settings change; readers see one version.
    config: arc_swap::ArcSwap<GatewayConfig>,
    pub counters: Arc<GatewayCounters>,
    pub neighbours: Neighbours,
    /// Addresses leases hold now (kept by the lease events), for services that must
    /// know whether a guest is there without asking the DHCP server.
    pub leased: Mutex<std::collections::HashSet<Ipv4Addr>>,
    pub egress: Egress,
}

impl Ctx {
    pub fn cfg(&self) -> arc_swap::Guard<Arc<GatewayConfig>> {
        self.config.load()
    }

    pub fn cfg_arc(&self) -> Arc<GatewayConfig> {
        self.config.load_full()
    }

    pub fn set_cfg(&self, cfg: Arc<GatewayConfig>) {
        self.config.store(cfg);
    }

    /// The ICMP destination-unreachable answer to a guest's packet, from the gateway's
    /// address of the packet's IP version.
    pub fn unreachable(&self, refused: &crate::wire::Origin, why: crate::wire::Unreachable) -> Vec<u8> {
        let cfg = self.cfg();
        let from = (cfg.gateway_ip, cfg.gateway_link_local());
        crate::wire::icmp_unreachable(cfg.gateway_mac, from, refused, why)
    }

    /// Whether some guest is at `ip`: it holds a lease, or frames came from it.
    pub fn guest_at(&self, ip: IpAddr) -> bool {
        let leased = match ip {
            IpAddr::V4(v4) => self.leased.lock().unwrap_or_else(|p| p.into_inner()).contains(&v4),
            IpAddr::V6(_) => false,
        };
        leased || self.neighbours.get(ip).is_some()
    }

    pub fn new(cfg: Arc<GatewayConfig>, counters: Arc<GatewayCounters>) -> Ctx {
        Ctx {
            neighbours: Neighbours {
                subnet: cfg.subnet,
                prefix: cfg.ipv6,
                map: Mutex::default(),
            },
            leased: Mutex::default(),
            egress: Egress {
                state: RwLock::new(EgressState {
                    policy: cfg.egress.clone(),
                    other_subnets: Vec::new(),
                }),
                host_access: [cfg.host_access.map(IpAddr::V4), cfg.host_access6().map(IpAddr::V6)]
                    .into_iter()
                    .flatten()
                    .collect(),
                host_addrs: policy::HostAddresses::default(),
                counters: counters.clone(),
            },
            config: arc_swap::ArcSwap::new(cfg),
            counters,
        }
    }
}

/// Guest addresses and the MACs they were last seen with (bounded: a guest cannot
/// grow it past the subnet; on the IPv6 prefix, past what its port lets it send from).
pub(crate) struct Neighbours {
    subnet: ipnet::Ipv4Net,
    prefix: Option<ipnet::Ipv6Net>,
    map: Mutex<HashMap<IpAddr, Mac>>,
}

impl Neighbours {
    pub fn get(&self, ip: IpAddr) -> Option<Mac> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&ip).copied()
    }

    /// Forgets every address last seen with `mac` (its port is gone).
    pub fn forget_mac(&self, mac: Mac) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, m| *m != mac);
    }

    pub fn saw(&self, ip: IpAddr, mac: Mac) {
        let on_network = match ip {
            IpAddr::V4(v4) => self.subnet.contains(&v4),
            IpAddr::V6(v6) => self.prefix.is_some_and(|p| p.contains(&v6)),
        };
        if on_network && !ip.is_unspecified() && mac.is_unicast() {
            self.map.lock().unwrap_or_else(|p| p.into_inner()).insert(ip, mac);
        }
    }
}

struct EgressState {
    /// The policy in force (starts as the config's, replaceable at run time).
    policy: policy::EgressPolicy,
    /// The other networks' subnets and IPv6 prefixes, which the policy keeps out of
    /// reach.
    other_subnets: Vec<ipnet::IpNet>,
}

/// The egress check every NAT service asks before it opens a flow.
pub(crate) struct Egress {
    state: RwLock<EgressState>,
    /// The network's host-access addresses (one per IP version), none when off. Fixed
    /// for the gateway's life: a change of host access restarts it
    /// (`GatewayConfig::same_identity`).
    host_access: Vec<IpAddr>,
    host_addrs: policy::HostAddresses,
    counters: Arc<GatewayCounters>,
}

impl Egress {
    /// Whether the policy refuses `dst:port` over `proto` (counted when it does). The
    /// host-access address is not subject to it: the network enabled it.
    pub fn refused(&self, dst: IpAddr, port: u16, proto: policy::Proto) -> bool {
        if self.host_access.contains(&dst) {
            return false;
        }
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        let refused = st
            .policy
            .check(dst, port, proto, &st.other_subnets, &self.host_addrs)
            .is_err();
        if refused {
            GatewayCounters::inc(&self.counters.egress_denied);
        }
        refused
    }

    pub fn policy(&self) -> policy::EgressPolicy {
        self.state.read().unwrap_or_else(|p| p.into_inner()).policy.clone()
    }

    pub fn set_policy(&self, policy: policy::EgressPolicy) {
        self.state.write().unwrap_or_else(|p| p.into_inner()).policy = policy;
    }

    pub fn set_other_subnets(&self, subnets: Vec<ipnet::IpNet>) {
        self.state.write().unwrap_or_else(|p| p.into_inner()).other_subnets = subnets;
    }
}

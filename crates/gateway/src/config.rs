//! A network's gateway configuration, with the defaults users expect and validation
//! that turns every mistake into a message.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use fabric::Mac;
use ipnet::{Ipv4Net, Ipv6Net};

/// Where forwarded DNS queries go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstreams {
    /// The `nameserver` lines of a resolv.conf, re-read when the file changes.
    ResolvConf(PathBuf),
    Static(Vec<SocketAddr>),
}

/// What a reservation is keyed on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReservationKey {
    Mac(Mac),
    /// The VM's name: its DHCP hostname or its port's label.
    Name(String),
}

/// A DNS record the gateway answers itself, beside the VMs' names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticRecord {
    /// A single label lives under the network's domain (`db` is `db.vm.internal`); a
    /// name with a dot is taken as written (`api.corp.example`).
    pub name: String,
    pub data: RecordData,
    pub ttl: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordData {
    A(Ipv4Addr),
    Aaaa(std::net::Ipv6Addr),
    Cname(String),
    Txt(String),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
}

/// Queries for names under `domain` go to `servers` instead of the upstreams (a
/// corporate zone reached over a VPN, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarder {
    pub domain: String,
    pub servers: Vec<SocketAddr>,
}

/// DHCP options the server would not send on its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DhcpExtras {
    /// Option 121 (RFC 3442) routes; a client that takes them ignores option 3, so the
    /// default route via the router is sent with them.
    pub routes: Vec<(Ipv4Net, Ipv4Addr)>,
    /// Option 42.
    pub ntp: Vec<Ipv4Addr>,
    /// Other options by number, their payload as given.
    pub raw: Vec<(u8, Vec<u8>)>,
}

/// Option numbers the server writes itself (or that frame the options): a raw option
/// may not replace them.
pub const SERVER_OWNED_OPTIONS: &[u8] = &[
    0, 1, 3, 6, 15, 26, 28, 42, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 61, 119, 121, 255,
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub key: ReservationKey,
    pub ip: Ipv4Addr,
    /// On a network with IPv6: the address DHCPv6 gives it instead of its MAC's own.
    pub ip6: Option<Ipv6Addr>,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub subnet: Ipv4Net,
    pub gateway_ip: Ipv4Addr,
    /// The router DHCP announces when it is not the gateway itself (kernel mode: the
    /// Linux bridge routes, the gateway serves DHCP and DNS beside it).
    pub router: Option<Ipv4Addr>,
    /// The MAC of the IPv6 router when it is not the gateway (kernel mode: the host's
    /// bridge routes the prefix at its `::1`). Router Advertisements then name it, from
    /// its link-local address and with its MAC, and the gateway itself takes `::2`.
    pub router6: Option<Mac>,
    pub gateway_mac: Mac,
    /// More addresses the gateway answers ARP and ICMP for.
    pub extra_ips: Vec<Ipv4Addr>,
    /// First and last address DHCP hands out (inclusive).
    pub dhcp_range: (Ipv4Addr, Ipv4Addr),
    pub lease_time: Duration,
    /// How long an OFFER keeps its address for the client before a REQUEST.
    pub offer_hold: Duration,
    /// How long a DECLINEd address stays out of the pool.
    pub decline_quarantine: Duration,
    /// How long the address of a port taken away stays out of other MACs' reach (a
    /// late packet to it must not find a new owner); its own MAC may have it back.
    pub release_quarantine: Duration,
    /// DNS domain of the VMs' names.
    pub domain: String,
    pub search: Vec<String>,
    pub mtu: u16,
    pub upstreams: Upstreams,
    pub reservations: Vec<Reservation>,
    /// Records answered beside the VMs' names.
    pub records: Vec<StaticRecord>,
    /// The name (under the domain) of the host-access address, when host access is on;
    /// empty for none.
    pub host_alias: String,
    pub forwarders: Vec<Forwarder>,
    pub dhcp_extras: DhcpExtras,
    /// Lock a VM's port to its MAC and leased IP when the lease is bound.
    pub lock_ports: bool,
    pub dns_timeout: Duration,
    pub dns_inflight_per_client: usize,
    pub dns_inflight_total: usize,
    /// The address at which guests reach the host's loopback; `None` (the default)
    /// keeps the host out of reach. Never the gateway's own address.
    pub host_access: Option<Ipv4Addr>,
    pub egress: crate::policy::EgressPolicy,
    /// A UDP flow with no traffic for this long is closed.
    pub udp_idle: Duration,
    /// The same for DNS-like flows (to port 53), which are one question and one answer.
    pub udp_dns_idle: Duration,
    pub udp_flows_per_guest: usize,
    pub udp_flows_total: usize,
    /// TCP connections guests open at once, per guest and per network.
    pub tcp_flows_per_guest: usize,
    pub tcp_flows_total: usize,
    /// TCP connections host clients hold through forwards at once, per network: a
    /// budget of their own, so idle clients of a forward cannot take guests' egress.
    pub tcp_forward_flows_total: usize,
    /// How long a guest's connect may wait for the host-side connect.
    pub tcp_connect_timeout: Duration,
    /// Each direction's buffer of one TCP connection: the most the gateway holds for it
    /// (raised to 16 MTUs when that is more, so jumbo frames keep a useful window).
    pub tcp_buffer: usize,
    /// What carries guest TCP: the splice onto host sockets, or the smoltcp stack.
    pub tcp_engine: TcpEngine,
    /// An ICMP echo flow (guest, id, destination) with no traffic for this long closes.
    pub icmp_idle: Duration,
    /// The network's IPv6 prefix (a /64: SLAAC needs one), when it has IPv6: the
    /// gateway routes for it (Router Advertisements) at `prefix::1` and its link-local
    /// address. `None`: IPv4 only.
    pub ipv6: Option<Ipv6Net>,
    /// How often the gateway advertises itself unasked (guests also ask when their link
    /// comes up); its router lifetime is three times this.
    pub router_advert_interval: Duration,
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid gateway configuration: {0}")]
pub struct ConfigError(pub String);

/// The engine that carries guests' TCP connections (egress and forwards).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TcpEngine {
    /// Terminated in a smoltcp stack, bytes relayed to host sockets through its buffers.
    Stack,
    /// Segments mapped onto host socket calls, no buffer of the gateway's own
    /// (see `tcp_splice`): faster in every measured case (BENCHMARKS.md).
    #[default]
    Splice,
}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

impl GatewayConfig {
    /// Defaults for `subnet`: gateway `.1`, DHCP from `.2` to the last host but one (the
    /// last is kept for the host-access address), 1 h leases,
    /// domain `vm.internal` (`.internal` is reserved for private use, so it never
    /// collides with public names), upstreams from /etc/resolv.conf.
    pub fn new(network: &str, subnet: Ipv4Net) -> GatewayConfig {
        let subnet = subnet.trunc();
        let base = u32::from(subnet.network());
        // The last host address is kept out of the pool for the host-access address.
        let last_lease = u32::from(subnet.broadcast()).saturating_sub(2);
        GatewayConfig {
            subnet,
            gateway_ip: Ipv4Addr::from(base + 1),
            router: None,
            gateway_mac: Mac::derived(&["gateway", network]),
            extra_ips: Vec::new(),
            dhcp_range: (Ipv4Addr::from(base + 2), Ipv4Addr::from(last_lease.max(base + 2))),
            lease_time: Duration::from_secs(3600),
            offer_hold: Duration::from_secs(30),
            decline_quarantine: Duration::from_secs(600),
            release_quarantine: Duration::from_secs(60),
            domain: "vm.internal".into(),
            search: vec!["vm.internal".into()],
            mtu: 1500,
            upstreams: Upstreams::ResolvConf("/etc/resolv.conf".into()),
            reservations: Vec::new(),
            records: Vec::new(),
            host_alias: "host".into(),
            forwarders: Vec::new(),
            dhcp_extras: DhcpExtras::default(),
            lock_ports: true,
            dns_timeout: Duration::from_secs(3),
            dns_inflight_per_client: 16,
            dns_inflight_total: 256,
            host_access: None,
            egress: crate::policy::EgressPolicy::default(),
            udp_idle: Duration::from_secs(60),
            udp_dns_idle: Duration::from_secs(10),
            udp_flows_per_guest: 1024,
            udp_flows_total: 16384,
            tcp_flows_per_guest: 512,
            tcp_flows_total: 2048,
            tcp_forward_flows_total: 1024,
            tcp_connect_timeout: Duration::from_secs(15),
            tcp_buffer: 256 * 1024,
            tcp_engine: TcpEngine::default(),
            icmp_idle: Duration::from_secs(30),
            ipv6: None,
            router6: None,
            router_advert_interval: Duration::from_secs(200),
        }
    }

    /// The IPv6 prefix a network gets when none is named: a unique local /64 (RFC 4193)
    /// whose 40-bit global ID comes from the network's name, so it is the same on every
    /// start and differs between networks.
    pub fn derived_ipv6_prefix(network: &str) -> Ipv6Net {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("vmfabric ipv6 prefix\0{network}").as_bytes());
        let mut octets = [0u8; 16];
        octets[0] = 0xfd;
        octets[1..6].copy_from_slice(&digest[..5]);
        Ipv6Net::new(Ipv6Addr::from(octets), 64).expect("64 is a valid prefix length")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let net = &self.subnet;
        if !(1..=30).contains(&net.prefix_len()) {
            return err(format!("prefix /{} is outside 1..=30", net.prefix_len()));
        }
        if net.addr() != net.network() {
            return err(format!("{net} has host bits set; the network is {}", net.trunc()));
        }
        let host = |ip: Ipv4Addr| net.contains(&ip) && ip != net.network() && ip != net.broadcast();
        if !host(self.gateway_ip) {
            return err(format!("gateway {} is not a host address of {net}", self.gateway_ip));
        }
        for ip in &self.extra_ips {
            if !host(*ip) {
                return err(format!("extra gateway address {ip} is not a host address of {net}"));
            }
        }
        let (first, last) = self.dhcp_range;
        if !host(first) || !host(last) || u32::from(first) > u32::from(last) {
            return err(format!(
                "DHCP range {first}-{last} is not an ordered range of host addresses of {net}"
            ));
        }
        let in_range = |ip: Ipv4Addr| (u32::from(first)..=u32::from(last)).contains(&u32::from(ip));
        if in_range(self.gateway_ip) || self.extra_ips.iter().any(|ip| in_range(*ip)) {
            return err(format!("DHCP range {first}-{last} overlaps a gateway address"));
        }
        if !self.gateway_mac.is_unicast() {
            return err(format!("gateway MAC {} is not unicast", self.gateway_mac));
        }
        if self.lease_time < Duration::from_secs(60) {
            return err("lease time must be at least 60 s");
        }
        if !(68..=65520).contains(&self.mtu) {
            return err(format!("MTU {} is outside 68..=65520", self.mtu));
        }
        for name in std::iter::once(&self.domain).chain(&self.search) {
            if hickory_proto::rr::Name::from_utf8(name).is_err() || name.is_empty() {
                return err(format!("{name:?} is not a valid DNS domain"));
            }
        }
        for r in &self.reservations {
            self.validate_reservation(r)?;
        }
        self.validate_dns_extras()?;
        self.validate_dhcp_extras()?;
        if let Some(r) = self.router {
            if !host(r) || in_range(r) || self.is_gateway_ip(r) {
                return err(format!(
                    "router {r} must be a host address of {net} outside the DHCP range and not the gateway's"
                ));
            }
        }
        if let Some(h) = self.host_access {
            if !host(h) || self.is_gateway_ip(h) || in_range(h) {
                return err(format!(
                    "host access address {h} must be a host address of {net} outside the DHCP range and not the gateway's"
                ));
            }
        }
        if self.udp_flows_per_guest == 0
            || self.udp_flows_total == 0
            || self.udp_idle.is_zero()
            || self.udp_dns_idle.is_zero()
        {
            return err("UDP flow bounds and idle time must be above zero");
        }
        if self.tcp_flows_per_guest == 0
            || self.tcp_flows_total == 0
            || self.tcp_forward_flows_total == 0
            || self.tcp_connect_timeout.is_zero()
        {
            return err("TCP flow bounds and connect timeout must be above zero");
        }
        if self.tcp_buffer < 4 * usize::from(self.mtu) {
            return err(format!("TCP buffer {} is below four MTUs", self.tcp_buffer));
        }
        if self.dns_inflight_per_client == 0 || self.dns_inflight_total == 0 {
            return err("DNS in-flight bounds must be at least 1");
        }
        if let Some(prefix) = self.ipv6 {
            validate_ipv6_prefix(prefix).map_err(ConfigError)?;
            if self.mtu < 1280 {
                return err(format!("MTU {} is below IPv6's minimum of 1280", self.mtu));
            }
        }
        if !(Duration::from_secs(4)..=Duration::from_secs(1800)).contains(&self.router_advert_interval) {
            return err("the router advertisement interval must be within 4..=1800 s (RFC 4861)");
        }
        Ok(())
    }

    fn validate_dns_extras(&self) -> Result<(), ConfigError> {
        let dns_name = |n: &str| !n.is_empty() && hickory_proto::rr::Name::from_utf8(n).is_ok();
        if !self.host_alias.is_empty()
            && crate::names::sanitize_hostname(&self.host_alias).as_deref() != Some(self.host_alias.as_str())
        {
            return err(format!("host alias {:?} must be a DNS label", self.host_alias));
        }
        for r in &self.records {
            if !dns_name(&r.name) {
                return err(format!("record name {:?} is not a valid DNS name", r.name));
            }
            match &r.data {
                RecordData::Cname(t) | RecordData::Srv { target: t, .. } if !dns_name(t) => {
                    return err(format!("record {}: target {t:?} is not a valid DNS name", r.name));
                }
                RecordData::Txt(t) if t.len() > 255 => {
                    return err(format!("record {}: TXT text is longer than 255 bytes", r.name));
                }
                _ => {}
            }
        }
        for f in &self.forwarders {
            if !dns_name(&f.domain) {
                return err(format!("forwarder domain {:?} is not a valid DNS name", f.domain));
            }
            if f.servers.is_empty() {
                return err(format!("forwarder for {} names no server", f.domain));
            }
            let ours = hickory_proto::rr::Name::from_utf8(&self.domain).ok();
            let theirs = hickory_proto::rr::Name::from_utf8(&f.domain).ok();
            if let (Some(ours), Some(theirs)) = (ours, theirs) {
                if ours.zone_of(&theirs) {
                    return err(format!(
                        "forwarder domain {} is inside the network's own domain {}",
                        f.domain, self.domain
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_dhcp_extras(&self) -> Result<(), ConfigError> {
        for (dst, via) in &self.dhcp_extras.routes {
            if dst.addr() != dst.network() {
                return err(format!("route {dst} has host bits set; the network is {}", dst.trunc()));
            }
            if !self.subnet.contains(via) {
                return err(format!(
                    "route {dst} via {via}: the next hop is outside {}",
                    self.subnet
                ));
            }
        }
        for (code, data) in &self.dhcp_extras.raw {
            if SERVER_OWNED_OPTIONS.contains(code) {
                return err(format!(
                    "DHCP option {code} is written by the server; set it through its own setting"
                ));
            }
            if data.len() > 255 {
                return err(format!("DHCP option {code} is longer than 255 bytes"));
            }
        }
        Ok(())
    }

    /// Whether `new` changes only what a running gateway can take without a restart:
    /// everything but its addresses, MTU, router and host access.
    pub fn same_identity(&self, new: &GatewayConfig) -> bool {
        self.subnet == new.subnet
            && self.gateway_ip == new.gateway_ip
            && self.gateway_mac == new.gateway_mac
            && self.extra_ips == new.extra_ips
            && self.router == new.router
            && self.router6 == new.router6
            && self.mtu == new.mtu
            && self.host_access == new.host_access
            && self.tcp_buffer == new.tcp_buffer
            && self.tcp_engine == new.tcp_engine
            && self.ipv6 == new.ipv6
    }

    /// A reservation must name a host address of the subnet that is not the gateway's.
    pub fn validate_reservation(&self, r: &Reservation) -> Result<(), ConfigError> {
        let net = &self.subnet;
        let host = net.contains(&r.ip) && r.ip != net.network() && r.ip != net.broadcast();
        if !host || self.is_gateway_ip(r.ip) {
            return err(format!("reserved address {} is not a free host address of {net}", r.ip));
        }
        if let Some(ip6) = r.ip6 {
            match self.ipv6 {
                None => return err(format!("reserved IPv6 address {ip6}: the network has no IPv6")),
                Some(p)
                    if !p.contains(&ip6)
                        || self.is_gateway_ip6(ip6)
                        || Some(ip6) == self.router_ip6()
                        || ip6 == p.network()
                        || Some(ip6) == self.host_access6() =>
                {
                    return err(format!("reserved IPv6 address {ip6} is not a free address of {p}"));
                }
                Some(_) => {}
            }
        }
        if let ReservationKey::Name(n) = &r.key {
            if crate::names::sanitize_hostname(n).as_deref() != Some(n.as_str()) {
                return err(format!(
                    "reservation name {n:?} must be a DNS label: lower-case letters, digits, inner '-'"
                ));
            }
        }
        Ok(())
    }

    /// The largest IPv4 payload a frame to a guest can carry (the network's MTU less
    /// the IPv4 header): what a NAT flow reads from the host at most, since more could
    /// not reach the guest in one frame anyway.
    pub fn max_ipv4_payload(&self) -> usize {
        usize::from(self.mtu).saturating_sub(20)
    }

    /// The address a network's host access gets by default: the last host address.
    pub fn default_host_access(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.broadcast()) - 1)
    }

    /// The IPv6 address at which guests reach the host's IPv6 loopback: the prefix's
    /// `::2`, when host access is on and the network has IPv6.
    pub fn host_access6(&self) -> Option<Ipv6Addr> {
        self.host_access?;
        Some(Ipv6Addr::from(u128::from(self.ipv6?.network()) | 2))
    }

    /// Whether `ip` is a host-access address (of either version; none when off).
    pub fn is_host_access(&self, ip: std::net::IpAddr) -> bool {
        match ip {
            std::net::IpAddr::V4(v4) => self.host_access == Some(v4),
            std::net::IpAddr::V6(v6) => self.host_access6() == Some(v6),
        }
    }

    /// Where the host socket for a guest's flow to `dst` connects: the host's loopback
    /// of the same version for a host-access address, else `dst` itself.
    pub fn egress_target(&self, dst: std::net::SocketAddr) -> std::net::SocketAddr {
        use std::net::{IpAddr, Ipv6Addr, SocketAddr};
        match dst.ip() {
            ip if !self.is_host_access(ip) => dst,
            IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), dst.port()),
            IpAddr::V6(_) => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), dst.port()),
        }
    }

    /// The largest UDP payload a frame to a guest can carry over either IP version:
    /// what a UDP flow reads from the host at most.
    pub fn max_udp_payload(&self, ipv6: bool) -> usize {
        let ip_header = if ipv6 { 40 } else { 20 };
        usize::from(self.mtu).saturating_sub(ip_header + 8)
    }

    /// Whether the gateway answers ARP and ping for `ip`: its own addresses and the
    /// host-access address when enabled.
    pub fn answers_for(&self, ip: Ipv4Addr) -> bool {
        self.is_gateway_ip(ip) || self.host_access == Some(ip)
    }

    /// Whether `ip` is one of the gateway's own addresses.
    pub fn is_gateway_ip(&self, ip: Ipv4Addr) -> bool {
        ip == self.gateway_ip || self.extra_ips.contains(&ip)
    }

    /// The gateway's global IPv6 address: the prefix's `::1`, or `::2` when another
    /// host routes the prefix ([`GatewayConfig::router6`]) from `::1`.
    pub fn gateway_ip6(&self) -> Option<Ipv6Addr> {
        let prefix = self.ipv6?;
        let host = if self.router6.is_some() { 2 } else { 1 };
        Some(Ipv6Addr::from(u128::from(prefix.network()) | host))
    }

    /// The prefix's router: the gateway's `::1`, or the other router's.
    pub fn router_ip6(&self) -> Option<Ipv6Addr> {
        Some(Ipv6Addr::from(u128::from(self.ipv6?.network()) | 1))
    }

    /// The MAC Router Advertisements name: the gateway's, or the other router's.
    pub fn router6_mac(&self) -> Mac {
        self.router6.unwrap_or(self.gateway_mac)
    }

    /// The link-local address guests route through: the router's, from its MAC.
    pub fn router_link_local(&self) -> Ipv6Addr {
        slaac_address(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), self.router6_mac())
    }

    /// The gateway's link-local address, from its MAC (modified EUI-64, RFC 4291): what
    /// it sends Router Advertisements from, and what guests route through.
    pub fn gateway_link_local(&self) -> Ipv6Addr {
        slaac_address(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), self.gateway_mac)
    }

    /// The address a guest with `mac` forms on the network's prefix (none without IPv6):
    /// what its port is locked to, and what its name's AAAA says.
    pub fn slaac_address_of(&self, mac: Mac) -> Option<Ipv6Addr> {
        Some(slaac_address(self.ipv6?.network(), mac))
    }

    /// The address DHCPv6 gives a guest with `mac` (none without IPv6): see
    /// [`dhcp6_address`].
    pub fn dhcp6_address_of(&self, mac: Mac) -> Option<Ipv6Addr> {
        Some(dhcp6_address(self.ipv6?, mac))
    }

    /// Whether `ip` is one of the gateway's IPv6 addresses (none without IPv6).
    pub fn is_gateway_ip6(&self, ip: Ipv6Addr) -> bool {
        self.ipv6.is_some() && (Some(ip) == self.gateway_ip6() || ip == self.gateway_link_local())
    }
}

#[cfg(test)]
impl GatewayConfig {
    /// 10.9.0.0/24 with fd00:9::/64: the dual-stack network of the unit tests.
    pub(crate) fn dual_stack_for_tests() -> GatewayConfig {
        let mut cfg = GatewayConfig::new("t", "10.9.0.0/24".parse().unwrap());
        cfg.ipv6 = Some("fd00:9::/64".parse().unwrap());
        cfg
    }
}

/// The address SLAAC forms from a /64 and a MAC: the prefix, then the MAC as a modified
/// EUI-64 interface identifier (RFC 4291 appendix A: `ff:fe` in the middle, the
/// universal/local bit flipped). What a Linux guest takes by default.
pub fn slaac_address(prefix: Ipv6Addr, mac: Mac) -> Ipv6Addr {
    let m = mac.0;
    let iid = [m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]];
    let mut octets = prefix.octets();
    octets[8..].copy_from_slice(&iid);
    Ipv6Addr::from(octets)
}

/// The address DHCPv6 gives a guest with `mac` on `prefix`: a function of the two
/// alone, so the port lock knows it from the port's birth and it is the same after any
/// restart. Its interface identifier is hashed, with the universal/local bit clear and
/// no `ff:fe` in the middle, so it is never a SLAAC address (modified EUI-64 of a MAC).
pub fn dhcp6_address(prefix: Ipv6Net, mac: Mac) -> Ipv6Addr {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"vmfabric dhcp6\0");
    h.update(prefix.network().octets());
    h.update(mac.0);
    let digest = h.finalize();
    let mut octets = prefix.network().octets();
    octets[8..].copy_from_slice(&digest[..8]);
    octets[8] &= !0x02;
    if octets[11] == 0xff && octets[12] == 0xfe {
        octets[12] = 0;
    }
    // Never the subnet-router anycast ::0, the router's ::1 nor the gateway's ::2.
    if octets[8..15].iter().all(|b| *b == 0) && octets[15] <= 2 {
        octets[15] = 3;
    }
    Ipv6Addr::from(octets)
}

/// A network's IPv6 prefix must be a /64 of unicast space that is neither link-local nor
/// loopback, with no host bits.
pub fn validate_ipv6_prefix(prefix: Ipv6Net) -> Result<(), String> {
    if prefix.prefix_len() != 64 {
        return Err(format!(
            "IPv6 prefix {prefix} is not a /64 (stateless autoconfiguration needs one)"
        ));
    }
    if prefix.addr() != prefix.network() {
        return Err(format!("{prefix} has host bits set; the prefix is {}", prefix.trunc()));
    }
    let a = prefix.network();
    let first = a.segments()[0];
    if a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || (first & 0xffc0) == 0xfe80
        || a.to_ipv4_mapped().is_some()
    {
        return Err(format!(
            "IPv6 prefix {prefix} is not unicast space a network can use (link-local, multicast, loopback, v4-mapped)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> GatewayConfig {
        GatewayConfig::new("default", "10.77.0.0/24".parse().unwrap())
    }

    #[test]
    fn defaults_are_valid() {
        let c = cfg();
        c.validate().unwrap();
        assert_eq!(c.gateway_ip, Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(
            c.dhcp_range,
            (Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 253))
        );
        assert!(c.gateway_mac.is_locally_administered());
    }

    #[test]
    fn a_derived_ipv6_prefix_is_a_stable_ula_of_its_own_and_the_gateway_sits_on_it() {
        let a = GatewayConfig::derived_ipv6_prefix("default");
        assert_eq!(
            a,
            GatewayConfig::derived_ipv6_prefix("default"),
            "the same on every start"
        );
        assert_ne!(a, GatewayConfig::derived_ipv6_prefix("other"));
        assert_eq!((a.addr().segments()[0] & 0xff00, a.prefix_len()), (0xfd00, 64));
        let mut c = cfg();
        assert!(c.gateway_ip6().is_none() && !c.is_gateway_ip6(c.gateway_link_local()));
        c.ipv6 = Some(a);
        c.validate().unwrap();
        let global = c.gateway_ip6().unwrap();
        assert_eq!(u128::from(global), u128::from(a.network()) | 1);
        assert!(c.is_gateway_ip6(global) && c.is_gateway_ip6(c.gateway_link_local()));
        // Modified EUI-64: ff:fe in the middle, the universal/local bit flipped.
        let mac = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(
            slaac_address("fe80::".parse().unwrap(), mac),
            "fe80::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap()
        );
        for bad in [
            "fd00::/48",
            "fe80::/64",
            "ff02::/64",
            "fd00::1/64",
            "::ffff:0:0/64",
            "::/64",
        ] {
            c.ipv6 = Some(bad.parse().unwrap());
            assert!(c.validate().is_err(), "{bad}");
        }
        c.ipv6 = Some(a);
        c.mtu = 1200;
        assert!(c.validate().is_err(), "IPv6 needs an MTU of 1280");
    }

    fn rec(name: &str, data: RecordData) -> StaticRecord {
        StaticRecord {
            name: name.into(),
            data,
            ttl: 60,
        }
    }

    #[test]
    fn mistakes_are_errors() {
        type Breaks = Box<dyn Fn(&mut GatewayConfig)>;
        let bad: Vec<(&str, Breaks)> = vec![
            ("prefix", Box::new(|c| c.subnet = "10.0.0.0/31".parse().unwrap())),
            ("prefix", Box::new(|c| c.subnet = "0.0.0.0/0".parse().unwrap())),
            ("gateway", Box::new(|c| c.gateway_ip = Ipv4Addr::new(10, 78, 0, 1))),
            ("gateway", Box::new(|c| c.gateway_ip = Ipv4Addr::new(10, 77, 0, 255))),
            ("overlaps", Box::new(|c| c.gateway_ip = Ipv4Addr::new(10, 77, 0, 9))),
            (
                "range",
                Box::new(|c| c.dhcp_range = (Ipv4Addr::new(10, 77, 0, 9), Ipv4Addr::new(10, 77, 0, 3))),
            ),
            ("MTU", Box::new(|c| c.mtu = 10)),
            ("domain", Box::new(|c| c.domain = "bad..name".into())),
            (
                "reserved",
                Box::new(|c| {
                    c.reservations.push(Reservation {
                        key: ReservationKey::Name("x".into()),
                        ip: Ipv4Addr::new(10, 77, 0, 1),
                        ip6: None,
                    })
                }),
            ),
            (
                "record",
                Box::new(|c| c.records.push(rec("bad..name", RecordData::A(Ipv4Addr::LOCALHOST)))),
            ),
            (
                "target",
                Box::new(|c| c.records.push(rec("www", RecordData::Cname("a..b".into())))),
            ),
            (
                "inside",
                Box::new(|c| {
                    c.forwarders.push(Forwarder {
                        domain: "x.vm.internal".into(),
                        servers: vec!["127.0.0.1:53".parse().unwrap()],
                    })
                }),
            ),
            (
                "written by the server",
                Box::new(|c| c.dhcp_extras.raw.push((3, vec![1, 2, 3, 4]))),
            ),
            (
                "next hop",
                Box::new(|c| {
                    c.dhcp_extras
                        .routes
                        .push(("10.1.0.0/16".parse().unwrap(), Ipv4Addr::new(10, 1, 0, 1)))
                }),
            ),
            ("alias", Box::new(|c| c.host_alias = "Not A Label".into())),
        ];
        for (word, f) in bad {
            let mut c = cfg();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(word), "{e} should mention {word}");
        }
    }
}

//! The API's vocabulary: what clients send and what they are shown, shared by the
//! API, the control plane, the typed client and the config file. Names and MTUs are
//! checked once, when a body is read; protocols, actions and directions are enums, so
//! the rest of the code never parses text again.
//!
//! The store keeps its own row types (`store.rs`); these types are the API's and
//! serialise exactly as the API always answered.

use std::net::{Ipv4Addr, SocketAddr};

use fabric::Mac;
use serde::{Deserialize, Serialize};

mod checked;
mod settings;

pub use checked::*;
pub use settings::*;

/// Who carries a network's frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// vmfabric's userspace switch; ports are sockets (and TAP devices it reads).
    #[default]
    Userspace,
    /// A Linux bridge; ports are persistent TAP devices on it that the VMM opens.
    Kernel,
}

impl NetworkMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Userspace => "userspace",
            NetworkMode::Kernel => "kernel",
        }
    }
}

/// Where a network lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// On this host only.
    #[default]
    Host,
    /// On every node of the cluster (`serve --cluster-endpoints`): stored in etcd,
    /// tunnelled between the nodes over VXLAN, addresses claimed cluster-wide.
    Cluster,
}

impl Scope {
    pub fn is_host(&self) -> bool {
        *self == Scope::Host
    }
}

/// How a port is reached, as stored and as the API takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PortKind {
    /// One frame a datagram on a Unix socket path (QEMU -netdev dgram, vfkit).
    Unixgram,
    /// Length-prefixed frames on a Unix stream socket (QEMU -netdev stream, passt).
    Stream,
    /// A TAP device (the record's path holds the interface name).
    Tap,
    /// A socketpair whose VM end was handed to the client; it lives as long as the
    /// daemon and is not stored (the other end cannot come back after a restart).
    Socketpair,
    /// A vhost-user listener (QEMU -netdev vhost-user, Cloud Hypervisor
    /// vhost_user=true): frames move through the guest's shared memory.
    #[serde(rename = "vhost-user")]
    #[value(name = "vhost-user")]
    VhostUser,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortRecord {
    pub network: String,
    pub name: String,
    pub kind: PortKind,
    pub path: String,
    #[serde(with = "mac_text")]
    #[schema(value_type = String, pattern = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")]
    pub mac: Mac,
    /// The port is locked to the first MAC its VMM sends from, not to `mac` (for VMMs
    /// that choose their own).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub learn_mac_once: bool,
    /// Kernel-mode TAP devices: how they are made.
    #[serde(flatten)]
    pub tap: TapSettings,
}

/// How a kernel-mode port's TAP device is made (the VMM must open it to match).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TapSettings {
    /// The user and group allowed to open it (an unprivileged VMM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_gid: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub multi_queue: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vnet_hdr: bool,
}

impl TapSettings {
    pub fn is_default(&self) -> bool {
        *self == TapSettings::default()
    }
}

/// Serde for `Mac` as text, here so the data plane needs no serde.
pub mod mac_text {
    use fabric::Mac;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(mac: &Mac, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&mac.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Serde for a network's IPv6 prefix, where `auto` (or `::/0`) asks for one derived
/// from the network's name: it reads as `::/0` until the network is created.
pub mod ipv6_prefix {
    use ipnet::Ipv6Net;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(prefix: &Option<Ipv6Net>, s: S) -> Result<S::Ok, S::Error> {
        match prefix {
            Some(p) => s.serialize_str(&p.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv6Net>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => parse(&text).map(Some).map_err(serde::de::Error::custom),
        }
    }

    /// `auto`, or a prefix in CIDR notation.
    pub fn parse(text: &str) -> Result<Ipv6Net, String> {
        if text == "auto" {
            return Ok(Ipv6Net::default());
        }
        text.parse()
            .map_err(|e| format!("IPv6 prefix {text:?}: {e} (a /64 such as fd00:1:2:3::/64, or auto)"))
    }
}

/// A network to create, and as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub name: Name,
    /// Left out: the first private /24 that overlaps no other network and no host
    /// route (10.77.0.0/24, 10.78.0.0/24, ...).
    #[serde(default)]
    #[schema(value_type = String, example = "10.77.0.0/24", pattern = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$")]
    pub subnet: ipnet::Ipv4Net,
    #[serde(default)]
    pub mtu: Mtu,
    /// IPv6 beside IPv4: a /64 prefix the gateway advertises for autoconfiguration, or
    /// `auto` for a unique local /64 derived from the network's name. Left out: IPv4
    /// only (guests' IPv6 is dropped at their ports).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "ipv6_prefix")]
    #[schema(value_type = Option<String>, example = "auto")]
    pub ipv6: Option<ipnet::Ipv6Net>,
    /// Run a gateway (ARP/ICMP, DHCP, DNS) on the network.
    #[serde(default = "yes")]
    pub gateway: bool,
    /// Guests reach the host's loopback at the subnet's last host address (and its `[::1]`
    /// at the IPv6 prefix's `::2`).
    #[serde(default)]
    pub host_access: bool,
    /// Who carries the frames: vmfabric's switch, or a Linux bridge.
    #[serde(default)]
    pub mode: NetworkMode,
    /// Kernel mode: ports cannot reach each other, only the gateway and the router.
    #[serde(default)]
    pub isolated: bool,
    /// Kernel mode: the bridge's name (default: derived from the network's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// The gateway's DNS, DHCP and flow settings; unset ones keep their defaults.
    #[serde(default)]
    pub settings: GatewaySettings,
    /// This host only, or every node of the cluster.
    #[serde(default, skip_serializing_if = "Scope::is_host")]
    pub scope: Scope,
    /// A cluster network's VXLAN network identifier (1 to 16777215; default: derived
    /// from the name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 16777215)]
    pub vni: Option<u32>,
}

fn yes() -> bool {
    true
}

impl NetworkSpec {
    /// A network with the defaults the API gives (gateway on, MTU 1500, userspace).
    pub fn new(name: Name, subnet: ipnet::Ipv4Net) -> NetworkSpec {
        NetworkSpec {
            name,
            subnet,
            mtu: Mtu::default(),
            ipv6: None,
            gateway: true,
            host_access: false,
            mode: NetworkMode::default(),
            isolated: false,
            bridge: None,
            settings: GatewaySettings::default(),
            scope: Scope::Host,
            vni: None,
        }
    }

    /// The VXLAN network identifier a cluster network has when none was given: from
    /// its name, so every node derives the same one.
    pub fn derived_vni(name: &str) -> u32 {
        let m = fabric::Mac::derived(&["vni", name]).0;
        (u32::from_be_bytes([0, m[3], m[4], m[5]])).max(1)
    }
}

/// A network as listed: its settings and how much lives on it. Its own fields, not a
/// flattened [`NetworkSpec`]: a request body refuses unknown fields, and the schema
/// must not say a view does.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkView {
    pub name: Name,
    #[schema(value_type = String, example = "10.77.0.0/24", pattern = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$")]
    pub subnet: ipnet::Ipv4Net,
    pub mtu: Mtu,
    /// Its IPv6 prefix, when it carries IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "ipv6_prefix")]
    #[schema(value_type = Option<String>, example = "fd3c:1f0a:77e2::/64")]
    pub ipv6: Option<ipnet::Ipv6Net>,
    pub gateway: bool,
    pub host_access: bool,
    pub mode: NetworkMode,
    pub isolated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Scope::is_host")]
    pub scope: Scope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    pub ports: usize,
    pub leases: usize,
    /// The gateway settings chosen for it (unset ones have their defaults).
    #[serde(default, skip_serializing_if = "GatewaySettings::is_default")]
    pub settings: GatewaySettings,
    /// What the network's gateway serves (none without a gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<GatewayView>,
    /// The network's frames so far (its ports together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<TrafficView>,
    /// Set when the stored network could not be brought back at start: why. It stays
    /// stored; DELETE removes it, a restart tries again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// What a network's gateway serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GatewayView {
    #[schema(value_type = String, format = Ipv4)]
    pub address: Ipv4Addr,
    /// Its global IPv6 address (the prefix's `::1`), when the network carries IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv6)]
    pub ipv6_address: Option<std::net::Ipv6Addr>,
    /// The link-local address it advertises itself from (guests' next hop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv6)]
    pub ipv6_link_local: Option<std::net::Ipv6Addr>,
    /// First and last address DHCP gives out.
    #[schema(value_type = [String])]
    pub dhcp_range: (Ipv4Addr, Ipv4Addr),
    pub lease_secs: u64,
    pub dns_domain: String,
    pub dns_search: Vec<String>,
    /// Where other names are asked: the servers set, or the host's resolv.conf's.
    pub dns_upstreams: String,
    /// The name of the host-access address, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_name: Option<String>,
    /// Where guests reach the host's loopback, when the network allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub host_access: Option<Ipv4Addr>,
}

impl GatewayView {
    pub fn of(cfg: &gateway::GatewayConfig) -> GatewayView {
        GatewayView {
            address: cfg.gateway_ip,
            ipv6_address: cfg.gateway_ip6(),
            ipv6_link_local: cfg.ipv6.map(|_| cfg.gateway_link_local()),
            dhcp_range: cfg.dhcp_range,
            lease_secs: cfg.lease_time.as_secs(),
            dns_domain: cfg.domain.clone(),
            dns_search: cfg.search.clone(),
            dns_upstreams: match &cfg.upstreams {
                gateway::Upstreams::Static(v) => v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                gateway::Upstreams::ResolvConf(p) => format!("those of {}", p.display()),
            },
            host_name: cfg
                .host_access
                .filter(|_| !cfg.host_alias.is_empty())
                .map(|_| format!("{}.{}", cfg.host_alias, cfg.domain)),
            host_access: cfg.host_access,
        }
    }
}

/// Frames and bytes a network's ports received (rx) and sent (tx), and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrafficView {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub dropped: u64,
}

/// A network's counters now, for `GET /v1/stats` (and `vmfabric stats`): the same
/// numbers `/metrics` gives, shaped for reading.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkStats {
    pub network: Name,
    pub traffic: TrafficView,
    /// Dropped frames by reason (only reasons seen).
    pub drops: std::collections::BTreeMap<String, u64>,
    pub mac_table_entries: u64,
    pub ports: Vec<PortStats>,
    /// None without a gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortStats {
    pub port: String,
    pub traffic: TrafficView,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub drops: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GatewayStats {
    pub leases: u64,
    /// Flows NAT carries now.
    pub open_flows: OpenFlowsView,
    /// Every gateway counter by name (`dhcp_ack`, `dns_forwarded`, `nat_tcp_flows`, ...;
    /// the metric each feeds is in `/metrics`).
    pub counters: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OpenFlowsView {
    pub tcp: u64,
    pub udp: u64,
    pub icmp: u64,
}

/// One line of `GET /v1/events`: when, and what happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventView {
    /// RFC 3339, UTC.
    pub time: String,
    #[serde(flatten)]
    pub event: Event,
}

/// What the daemon reports as it happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A port's peer is there (connected, first datagram, device up).
    PortUp {
        network: String,
        port: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
    },
    /// A port's peer went away.
    PortDown {
        network: String,
        port: String,
        reason: String,
    },
    LeaseBound {
        network: String,
        #[schema(value_type = String, format = Ipv4)]
        ip: Ipv4Addr,
        mac: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
    },
    LeaseReleased {
        network: String,
        #[schema(value_type = String, format = Ipv4)]
        ip: Ipv4Addr,
        mac: String,
    },
    LeaseExpired {
        network: String,
        #[schema(value_type = String, format = Ipv4)]
        ip: Ipv4Addr,
        mac: String,
    },
    /// A DHCPv6 binding made or renewed.
    Lease6Bound {
        network: String,
        #[schema(value_type = String, format = Ipv6)]
        ip: std::net::Ipv6Addr,
        mac: String,
    },
    /// A DHCPv6 binding ended (released, declined, expired, or its port gone).
    Lease6Ended {
        network: String,
        #[schema(value_type = String, format = Ipv6)]
        ip: std::net::Ipv6Addr,
        mac: String,
    },
    /// A MAC was seen behind another port than before.
    MacMoved {
        network: String,
        mac: String,
        from: String,
        to: String,
    },
    /// The network's MAC table is full: new sources are delivered but not learned.
    MacTableFull { network: String },
    /// A VM changed state (`starting`, `running`, `ready`, `stopped`, `failed`).
    VmState {
        vm: String,
        network: String,
        state: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>, format = Ipv4)]
        ip: Option<Ipv4Addr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Guest traffic the egress policy refused, sampled: the count since the last such
    /// event of the network (at most one a second).
    PolicyRefused { network: String, refused: u64 },
    /// This reader fell behind and missed `missed` events.
    Lagged { missed: u64 },
}

impl From<&fabric::CounterSnapshot> for TrafficView {
    fn from(c: &fabric::CounterSnapshot) -> Self {
        TrafficView {
            rx_frames: c.rx_frames,
            rx_bytes: c.rx_bytes,
            tx_frames: c.tx_frames,
            tx_bytes: c.tx_bytes,
            dropped: c.drops_by_reason().map(|(_, n)| n).sum(),
        }
    }
}

impl NetworkView {
    pub fn of(spec: &NetworkSpec, ports: usize, leases: usize, failed: Option<String>) -> NetworkView {
        NetworkView {
            name: spec.name.clone(),
            subnet: spec.subnet,
            mtu: spec.mtu,
            ipv6: spec.ipv6,
            gateway: spec.gateway,
            host_access: spec.host_access,
            mode: spec.mode,
            isolated: spec.isolated,
            bridge: spec.bridge.clone(),
            scope: spec.scope,
            vni: spec.vni,
            ports,
            leases,
            settings: spec.settings.clone(),
            served: None,
            traffic: None,
            failed,
        }
    }
}

/// A port to create.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub name: Name,
    pub kind: PortKind,
    /// TAP ports: the interface name (default: `vmf-` and the port name, cut to 15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// Kernel-mode TAP ports: the user and group that may open the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_gid: Option<u32>,
    /// Kernel-mode TAP ports: a multi-queue device (the VMM opens it with as many queues).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub multi_queue: bool,
    /// Kernel-mode TAP ports: made with IFF_VNET_HDR.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vnet_hdr: bool,
    /// Userspace ports: this MAC instead of the one derived from the names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Userspace ports: lock to the first MAC the VMM sends from (for VMMs that choose
    /// their own) instead of the assigned one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub learn_mac_once: bool,
}

impl PortSpec {
    /// A port of `kind` with every option at its default.
    pub fn new(name: Name, kind: PortKind) -> PortSpec {
        PortSpec {
            name,
            kind,
            ifname: None,
            owner_uid: None,
            owner_gid: None,
            multi_queue: false,
            vnet_hdr: false,
            mac: None,
            learn_mac_once: false,
        }
    }

    pub fn tap_settings(&self) -> TapSettings {
        TapSettings {
            owner_uid: self.owner_uid,
            owner_gid: self.owner_gid,
            multi_queue: self.multi_queue,
            vnet_hdr: self.vnet_hdr,
        }
    }
}

/// What to give each VMM for a port: only lines that work for this port on its
/// network. A VMM a port does not suit has no line; `note` then says what the port is
/// for and where to go instead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmmLines {
    /// QEMU's `-netdev`/`-device` arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<String>,
    /// vfkit's `--device` argument.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfkit: Option<String>,
    /// Cloud Hypervisor's `--net` argument.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_hypervisor: Option<String>,
    /// Firecracker's `network-interfaces` entry (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firecracker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A port as the API shows it, with what to give the VMM.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortView {
    #[serde(flatten)]
    pub record: PortRecord,
    pub up: bool,
    /// On a network with IPv6: the addresses the port may send from (link-local, SLAAC
    /// and DHCPv6, all from its MAC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub ipv6: Vec<std::net::Ipv6Addr>,
    /// The same as `vmm.qemu` (empty where QEMU cannot use the port).
    pub qemu_args: String,
    pub vmm: VmmLines,
    /// Set when the stored port could not be brought back at start: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// A socketpair port: created and its VM end handed to the caller (an fd) at once.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SocketpairSpec {
    pub name: Name,
    /// This MAC instead of the one derived from the names.
    #[serde(default)]
    pub mac: Option<String>,
    /// Lock the port to the first source MAC its VMM sends from.
    #[serde(default)]
    pub learn_mac_once: bool,
}

/// A fixed address for a MAC or a VM name (its DHCP hostname or port name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationSpec {
    /// A MAC address or a VM name.
    pub key: String,
    #[schema(value_type = String, format = Ipv4)]
    pub ip: Ipv4Addr,
    /// On a network with IPv6: the address DHCPv6 gives it instead of the one derived
    /// from its MAC (inside the network's prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv6)]
    pub ipv6: Option<std::net::Ipv6Addr>,
}

impl ReservationSpec {
    pub fn to_gateway(&self) -> gateway::Reservation {
        let key = match self.key.parse::<Mac>() {
            Ok(mac) => gateway::ReservationKey::Mac(mac),
            Err(_) => gateway::ReservationKey::Name(self.key.clone()),
        };
        gateway::Reservation {
            key,
            ip: self.ip,
            ip6: self.ipv6,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseView {
    #[schema(value_type = String, format = Ipv4)]
    pub ip: Ipv4Addr,
    #[serde(with = "mac_text")]
    #[schema(value_type = String, pattern = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")]
    pub mac: Mac,
    pub hostname: Option<String>,
    /// When the lease runs out, in seconds since the Unix epoch.
    pub expires: u64,
    /// The same, in RFC 3339 (UTC).
    #[schema(format = DateTime)]
    pub expires_at: String,
    /// The same MAC's DHCPv6 address, on a network with IPv6, while it holds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Ipv6)]
    pub ipv6: Option<std::net::Ipv6Addr>,
    /// When that DHCPv6 binding runs out, in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_expires: Option<u64>,
}

impl From<gateway::Lease> for LeaseView {
    fn from(l: gateway::Lease) -> Self {
        LeaseView {
            ip: l.ip,
            mac: l.mac,
            hostname: l.hostname,
            expires: l.expires,
            expires_at: i64::try_from(l.expires)
                .ok()
                .and_then(|s| jiff::Timestamp::from_second(s).ok())
                .map(|t| t.to_string())
                .unwrap_or_default(),
            ipv6: None,
            ipv6_expires: None,
        }
    }
}

impl LeaseView {
    /// A network's leases, each with its MAC's DHCPv6 binding when there is one.
    pub fn of(leases: Vec<gateway::Lease>, leases6: &[gateway::Lease6]) -> Vec<LeaseView> {
        leases
            .into_iter()
            .map(|l| {
                let v6 = leases6.iter().find(|b| b.mac == l.mac);
                LeaseView {
                    ipv6: v6.map(|b| b.ip),
                    ipv6_expires: v6.map(|b| b.expires),
                    ..LeaseView::from(l)
                }
            })
            .collect()
    }
}

/// What an egress rule (or the policy's default) does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// The protocols an egress rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleProto {
    Tcp,
    Udp,
    Icmp,
}

/// A port or an inclusive range of ports, written "53" or "1000-2000".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl utoipa::PartialSchema for PortRange {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[0-9]+(-[0-9]+)?$"))
            .examples(["53", "1000-2000"])
            .into()
    }
}

impl utoipa::ToSchema for PortRange {}

impl TryFrom<String> for PortRange {
    type Error = Invalid;
    fn try_from(text: String) -> Result<PortRange, Invalid> {
        let bad = || Invalid(format!("bad port range {text:?} (a port, or two joined by '-')"));
        let (lo, hi) = text.split_once('-').unwrap_or((&text, &text));
        let parse = |x: &str| x.trim().parse::<u16>().map_err(|_| bad());
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if lo > hi {
            return Err(bad());
        }
        Ok(PortRange { lo, hi })
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> String {
        if r.lo == r.hi {
            r.lo.to_string()
        } else {
            format!("{}-{}", r.lo, r.hi)
        }
    }
}

/// An egress policy as the API takes and shows it (and as the store keeps it, in
/// JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// What happens when no rule matches.
    #[serde(default)]
    pub default: Action,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub action: Action,
    /// An IPv4 or IPv6 CIDR.
    #[schema(value_type = String, example = "10.0.0.0/8")]
    pub dst: ipnet::IpNet,
    /// Absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    /// Absent: every protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<RuleProto>,
}

impl PolicySpec {
    pub fn to_gateway(&self) -> gateway::policy::EgressPolicy {
        use gateway::policy as p;
        let action = |a: Action| match a {
            Action::Allow => p::Action::Allow,
            Action::Deny => p::Action::Deny,
        };
        p::EgressPolicy {
            rules: self
                .rules
                .iter()
                .map(|r| p::Rule {
                    action: action(r.action),
                    dst: r.dst.trunc(),
                    ports: r.ports.map(|r| (r.lo, r.hi)),
                    proto: r.proto.map(|x| match x {
                        RuleProto::Tcp => p::Proto::Tcp,
                        RuleProto::Udp => p::Proto::Udp,
                        RuleProto::Icmp => p::Proto::Icmp,
                    }),
                })
                .collect(),
            default: action(self.default),
        }
    }
}

/// The protocols a port forward carries.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ForwardProto {
    #[default]
    Tcp,
    Udp,
}

impl ForwardProto {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardProto::Tcp => "tcp",
            ForwardProto::Udp => "udp",
        }
    }

    pub fn to_gateway(self) -> gateway::forward::Protocol {
        match self {
            ForwardProto::Tcp => gateway::forward::Protocol::Tcp,
            ForwardProto::Udp => gateway::forward::Protocol::Udp,
        }
    }

    pub fn from_gateway(p: gateway::forward::Protocol) -> ForwardProto {
        match p {
            gateway::forward::Protocol::Tcp => ForwardProto::Tcp,
            gateway::forward::Protocol::Udp => ForwardProto::Udp,
        }
    }
}

impl std::str::FromStr for ForwardProto {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<ForwardProto, Invalid> {
        match s {
            "tcp" => Ok(ForwardProto::Tcp),
            "udp" => Ok(ForwardProto::Udp),
            other => Err(Invalid(format!("forward protocol {other:?} is not tcp or udp"))),
        }
    }
}

/// A port forward as the API takes and shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwardSpec {
    #[serde(default)]
    pub proto: ForwardProto,
    /// Host address and port; port 0 picks a free one.
    #[schema(value_type = String, example = "127.0.0.1:8080", pattern = r"^(\[[0-9a-fA-F:.]+\]|[0-9]{1,3}(\.[0-9]{1,3}){3}):[0-9]{1,5}$")]
    pub host: SocketAddr,
    /// The guest's IPv4 or IPv6 address (on the network's prefix) and port.
    #[schema(value_type = String, example = "10.77.0.5:80", pattern = r"^(\[[0-9a-fA-F:.]+\]|[0-9]{1,3}(\.[0-9]{1,3}){3}):[0-9]{1,5}$")]
    pub guest: SocketAddr,
}

/// A port forward as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ForwardView {
    pub proto: ForwardProto,
    #[schema(value_type = String, example = "127.0.0.1:8080")]
    pub host: SocketAddr,
    #[schema(value_type = String, example = "10.77.0.5:80")]
    pub guest: SocketAddr,
    /// No guest holds the guest address now (its port is gone, or it never came): new
    /// connections are refused at once.
    pub dangling: bool,
}

/// A network's NAT flows, as the API shows them.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FlowsView {
    pub tcp: Vec<TcpFlowView>,
    pub udp: Vec<UdpFlowView>,
}

/// Who opened a TCP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The guest connected out.
    Egress,
    /// A host client came in through a forward.
    Forward,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TcpFlowView {
    #[schema(value_type = String)]
    pub guest: std::net::SocketAddr,
    /// The other end as the guest sees it (the gateway's address for a forward).
    #[schema(value_type = String)]
    pub peer: std::net::SocketAddr,
    pub direction: Direction,
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UdpFlowView {
    #[schema(value_type = String)]
    pub guest: std::net::SocketAddr,
    #[schema(value_type = String)]
    pub dst: std::net::SocketAddr,
}

#[cfg(test)]
mod tests;

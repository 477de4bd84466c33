//! The daemon's state: the switch, one gateway per network, the store, and the
//! operations the API offers on them.
//!
//! Every change is written to the store before it is acknowledged, and everything the
//! data plane holds is rebuilt from the store at start: networks and their gateways
//! (with their leases), and ports listening again on the same paths with the same MACs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use fabric::{Mac, NetworkConfig, PortId, Switch, SwitchConfig, SwitchEvent};
use gateway::{Gateway, GatewayConfig, Lease};
use serde::{Deserialize, Serialize};

use crate::control::locks::{ControlEvent, PortLocker};
use crate::store::{DbError, NetworkMode, NetworkRecord, PortKind, PortRecord, Store};

/// What went wrong, in the terms the API reports.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<fabric::FabricError> for ApiError {
    fn from(e: fabric::FabricError) -> Self {
        match e {
            fabric::FabricError::InvalidConfig(m) => ApiError::BadRequest(m),
            fabric::FabricError::PathInUse(p) => ApiError::Conflict(format!("socket path {p} is in use")),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// A port to create.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortRequest {
    pub name: String,
    pub kind: PortKind,
    /// TAP ports: the interface name (default: `vmf-` and the port name, cut to 15).
    #[serde(default)]
    pub ifname: Option<String>,
    /// Kernel-mode TAP ports: the user and group that may open the device.
    #[serde(default)]
    pub owner_uid: Option<u32>,
    #[serde(default)]
    pub owner_gid: Option<u32>,
    /// Kernel-mode TAP ports: a multi-queue device (the VMM opens it with as many queues).
    #[serde(default)]
    pub multi_queue: bool,
    /// Kernel-mode TAP ports: made with IFF_VNET_HDR.
    #[serde(default)]
    pub vnet_hdr: bool,
    /// Userspace ports: this MAC instead of the one derived from the names.
    #[serde(default)]
    pub mac: Option<String>,
    /// Userspace ports: lock to the first MAC the VMM sends from (for VMMs that choose
    /// their own) instead of the assigned one.
    #[serde(default)]
    pub learn_mac_once: bool,
}

/// The MAC a new userspace port is locked to from birth: `mac` if given (unicast, not
/// another port's), else one derived from the names; with `learn_mac_once`, the lock
/// waits for the VMM's first frame (the derived MAC is still shown).
pub fn choose_mac(
    network: &str,
    name: &str,
    mac: Option<&str>,
    learn_mac_once: bool,
    taken: impl Fn(Mac) -> bool,
) -> Result<(Mac, bool), ApiError> {
    let mac = match mac {
        None => Mac::derived(&[network, name]),
        Some(_) if learn_mac_once => {
            return Err(ApiError::BadRequest(
                "mac and learn_mac_once exclude each other: give the MAC, or let the port learn it".into(),
            ))
        }
        Some(text) => {
            let mac: Mac = text
                .parse()
                .map_err(|e| ApiError::BadRequest(format!("mac {text:?}: {e}")))?;
            if !mac.is_unicast() || mac == Mac([0; 6]) {
                return Err(ApiError::BadRequest(format!("mac {mac} is not a unicast address")));
            }
            if taken(mac) {
                return Err(ApiError::Conflict(format!(
                    "mac {mac} belongs to another port on {network:?}"
                )));
            }
            mac
        }
    };
    Ok((mac, learn_mac_once))
}

impl PortRequest {
    pub fn tap_settings(&self) -> crate::store::TapSettings {
        crate::store::TapSettings {
            owner_uid: self.owner_uid,
            owner_gid: self.owner_gid,
            multi_queue: self.multi_queue,
            vnet_hdr: self.vnet_hdr,
        }
    }
}

/// A port as the API shows it, with what to give the VMM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortView {
    #[serde(flatten)]
    pub record: PortRecord,
    pub up: bool,
    pub qemu_args: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkView {
    #[serde(flatten)]
    pub record: NetworkRecord,
    pub ports: usize,
    pub leases: usize,
}

/// A fixed address for a MAC or a VM name (its DHCP hostname or port name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationView {
    /// A MAC address or a VM name.
    pub key: String,
    pub ip: std::net::Ipv4Addr,
}

impl ReservationView {
    fn to_gateway(&self) -> gateway::Reservation {
        let key = match self.key.parse::<Mac>() {
            Ok(mac) => gateway::ReservationKey::Mac(mac),
            Err(_) => gateway::ReservationKey::Name(self.key.clone()),
        };
        gateway::Reservation { key, ip: self.ip }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseView {
    pub ip: std::net::Ipv4Addr,
    #[serde(with = "crate::store::mac_text")]
    pub mac: Mac,
    pub hostname: Option<String>,
    pub expires: u64,
}

impl From<Lease> for LeaseView {
    fn from(l: Lease) -> Self {
        LeaseView {
            ip: l.ip,
            mac: l.mac,
            hostname: l.hostname,
            expires: l.expires,
        }
    }
}

struct Net {
    record: NetworkRecord,
    gateway: Option<Arc<Gateway>>,
    ports: HashMap<String, (PortId, PortRecord)>,
    /// Kernel mode: the switch port on the bridge's uplink TAP, where the gateway is.
    uplink: Option<PortId>,
}

/// A subnet a network can live on: unicast, not loopback, link-local or broadcast,
/// written without host bits, with room for the gateway (or router and gateway), the
/// host-access address and at least one guest. Checked before anything is made:
/// smoltcp panics on a multicast gateway address.
fn valid_subnet(subnet: ipnet::Ipv4Net) -> Result<(), ApiError> {
    let net = subnet.network();
    let bad = |why: &str| Err(ApiError::BadRequest(format!("subnet {subnet}: {why}")));
    if subnet.addr() != net {
        return bad(&format!("has host bits set (the network is {})", subnet.trunc()));
    }
    if net.is_multicast() || net.is_broadcast() || u32::from(net) >= u32::from(std::net::Ipv4Addr::new(240, 0, 0, 0)) {
        return bad("is not unicast");
    }
    if net.is_loopback() || net.is_link_local() || net.is_unspecified() || net.octets()[0] == 0 {
        return bad("is loopback, link-local or this-network");
    }
    if subnet.prefix_len() > 28 {
        return bad("is too small: a network needs /28 or larger (gateway, router, host access and guests)");
    }
    Ok(())
}

/// A gateway egress policy in the terms of the kernel's rules (the same semantics).
fn kernel_egress(p: &gateway::policy::EgressPolicy) -> hostnet::nft::Egress {
    use gateway::policy::{Action, Proto};
    use hostnet::nft::{EgressRule, L4};
    hostnet::nft::Egress {
        rules: p
            .rules
            .iter()
            .map(|r| EgressRule {
                allow: r.action == Action::Allow,
                dst: r.dst,
                proto: r.proto.map(|p| match p {
                    Proto::Tcp => L4::Tcp,
                    Proto::Udp => L4::Udp,
                    Proto::Icmp => L4::Icmp,
                }),
                ports: r.ports,
            })
            .collect(),
        default_allow: p.default == Action::Allow,
    }
}

fn kernel_error(e: hostnet::HostnetError) -> ApiError {
    match e {
        hostnet::HostnetError::Foreign { .. } | hostnet::HostnetError::Invalid(_) => ApiError::Conflict(e.to_string()),
        other => ApiError::Internal(format!("kernel mode: {other}")),
    }
}

pub struct Daemon {
    switch: Arc<Switch>,
    store: Arc<Store>,
    rt: tokio::runtime::Handle,
    run_dir: PathBuf,
    nets: Mutex<HashMap<String, Net>>,
    /// Port ids to (network, port name), for naming VMs after their port.
    labels: Arc<Mutex<HashMap<PortId, (String, String)>>>,
    gateways: Arc<Mutex<HashMap<String, Arc<Gateway>>>>,
    control: mpsc::Sender<ControlEvent>,
    locker: Arc<Mutex<PortLocker>>,
    /// Kernel mode: what the nftables refusal counters held before the table was last
    /// written (writing starts them again), by counter name.
    kernel_denied: Mutex<HashMap<String, u64>>,
    vms: Arc<crate::vms::Vms>,
    /// Scopes this daemon's kernel devices (see `kernel::instance_of`).
    instance: String,
    /// Serialises changes to networks and ports, so a check and the change it guards
    /// cannot interleave with another request's (the data plane is never behind it).
    changes: Mutex<()>,
}

fn valid_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{what} name {name:?} must be 1 to 64 characters of letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )))
    }
}

fn qemu_args(p: &PortRecord, run_dir: &std::path::Path) -> String {
    let netdev = match p.kind {
        PortKind::Unixgram => {
            let guest = run_dir.join("guests").join(format!("{}-{}.sock", p.network, p.name));
            format!(
                "-netdev dgram,id=net0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                guest.display(),
                p.path
            )
        }
        PortKind::Stream => format!("-netdev stream,id=net0,server=off,addr.type=unix,addr.path={}", p.path),
        PortKind::Tap => format!("-netdev tap,id=net0,ifname={},script=no,downscript=no", p.path),
        PortKind::Socketpair => "-netdev dgram,id=net0,local.type=fd,local.str=FD".to_string(),
    };
    format!("{netdev} -device virtio-net-pci,netdev=net0,mac={}", p.mac)
}

impl Daemon {
    /// Opens the store in `state_dir`, starts the data plane and rebuilds it from the
    /// store. With an empty store, creates the network `default` on 10.77.0.0/24.
    pub fn start(state_dir: PathBuf, run_dir: PathBuf, rt: tokio::runtime::Handle) -> anyhow::Result<Arc<Daemon>> {
        Daemon::start_with_guests(state_dir, run_dir, None, rt)
    }

    /// Like [`Daemon::start`], able to run VMs from the guest image in `guest_dir`.
    pub fn start_with_guests(
        state_dir: PathBuf,
        run_dir: PathBuf,
        guest_dir: Option<PathBuf>,
        rt: tokio::runtime::Handle,
    ) -> anyhow::Result<Arc<Daemon>> {
        Daemon::start_configured(state_dir, run_dir, guest_dir, rt, None, true)
    }

    /// Like [`Daemon::start_with_guests`]; with an empty store, `first` (a config
    /// file's declaration of `default`, say) replaces the built-in default network.
    /// `sandbox` confines the switch thread (off only for debugging).
    pub fn start_configured(
        state_dir: PathBuf,
        run_dir: PathBuf,
        guest_dir: Option<PathBuf>,
        rt: tokio::runtime::Handle,
        first: Option<NetworkRecord>,
        sandbox: bool,
    ) -> anyhow::Result<Arc<Daemon>> {
        let vms = crate::vms::Vms::new(guest_dir, run_dir.join("vms"));
        std::fs::create_dir_all(&state_dir)?;
        std::fs::create_dir_all(run_dir.join("ports"))?;
        std::fs::create_dir_all(run_dir.join("guests"))?;
        let store = Store::open(&state_dir.join("vmfabric.db"))?;
        let switch = Arc::new(Switch::start(SwitchConfig {
            sandbox,
            ..SwitchConfig::default()
        })?);
        let (control, control_rx) = mpsc::channel();
        let labels: Arc<Mutex<HashMap<PortId, (String, String)>>> = Arc::default();
        let gateways: Arc<Mutex<HashMap<String, Arc<Gateway>>>> = Arc::default();
        // Switch events: name VMs after their port, then on to the port locker.
        let events = switch
            .take_events()
            .ok_or_else(|| anyhow::anyhow!("switch events taken"))?;
        {
            let (control, labels, gateways) = (control.clone(), labels.clone(), gateways.clone());
            std::thread::Builder::new()
                .name("switch-events".into())
                .spawn(move || {
                    for ev in events {
                        match &ev {
                            SwitchEvent::PortUp { port, peer } => {
                                tracing::info!(%port, peer = peer.as_deref().unwrap_or("-"), "port up")
                            }
                            SwitchEvent::PortDown { port, reason } => tracing::info!(%port, %reason, "port down"),
                            SwitchEvent::MacTableFull { network } => tracing::warn!(%network, "MAC table full"),
                            other => tracing::debug!(?other, "switch event"),
                        }
                        if let SwitchEvent::MacLearned { network, mac, port } = &ev {
                            let label = lock(&labels).get(port).map(|(_, name)| name.clone());
                            let gw = lock(&gateways).get(network).cloned();
                            if let (Some(label), Some(gw)) = (label, gw) {
                                gw.set_name_hint(*mac, &label);
                            }
                        }
                        if control.send(ControlEvent::Switch(ev)).is_err() {
                            break;
                        }
                    }
                })?;
        }
        let locker = Arc::new(Mutex::new(PortLocker::new(switch.clone())));
        {
            let locker = locker.clone();
            std::thread::Builder::new().name("port-locker".into()).spawn(move || {
                for ev in control_rx {
                    lock(&locker).handle(&ev);
                }
            })?;
        }
        let daemon = Arc::new(Daemon {
            switch,
            store,
            rt,
            run_dir,
            nets: Mutex::new(HashMap::new()),
            labels,
            gateways,
            control,
            locker,
            kernel_denied: Mutex::default(),
            instance: crate::kernel::instance_of(&state_dir),
            changes: Mutex::new(()),
            vms,
        });
        daemon.vms.supervise(Arc::downgrade(&daemon));
        let saved = daemon.store.networks()?;
        if saved.is_empty() {
            let default = first.unwrap_or_else(|| NetworkRecord {
                name: "default".into(),
                subnet: "10.77.0.0/24".parse().expect("literal"),
                mtu: 1500,
                gateway: true,
                host_access: false,
                mode: Default::default(),
                isolated: false,
                bridge: None,
            });
            if let Some((route, iface)) = crate::hostroutes::overlapping(default.subnet) {
                tracing::warn!(%route, %iface, "the default network overlaps a host route");
            }
            daemon
                .create_network(default, true)
                .map_err(|e| anyhow::anyhow!("create the default network: {e}"))?;
        } else {
            for rec in saved {
                daemon
                    .bring_up_network(rec)
                    .map_err(|e| anyhow::anyhow!("restore a network: {e}"))?;
            }
            for port in daemon.store.ports()? {
                daemon
                    .bring_up_port(port)
                    .map_err(|e| anyhow::anyhow!("restore a port: {e}"))?;
            }
            daemon.vms.restore(&daemon);
        }
        daemon.reconcile_kernel();
        Ok(daemon)
    }

    fn nets(&self) -> MutexGuard<'_, HashMap<String, Net>> {
        lock(&self.nets)
    }

    pub fn switch(&self) -> &Switch {
        &self.switch
    }

    fn bring_up_network(&self, rec: NetworkRecord) -> Result<(), ApiError> {
        let name = rec.name.clone();
        let kernel = rec.mode == NetworkMode::Kernel;
        let base = u32::from(rec.subnet.network());
        // Kernel mode: the bridge routes at .1, the gateway serves DHCP and DNS at .2.
        let router = crate::kernel::router_of(&rec);
        if kernel {
            crate::kernel::bring_up(&self.instance, &rec, router).map_err(kernel_error)?;
        }
        let cfg = NetworkConfig {
            mtu: rec.mtu as usize,
            ..NetworkConfig::default()
        };
        cfg.validate()?;
        self.switch.add_network(&rec.name, cfg)?;
        let gateway = if rec.gateway {
            let mut gcfg = GatewayConfig::new(&rec.name, rec.subnet);
            gcfg.mtu = u16::try_from(rec.mtu).unwrap_or(u16::MAX);
            if rec.host_access {
                gcfg.host_access = Some(gcfg.default_host_access());
            }
            if kernel {
                gcfg.router = Some(router);
                gcfg.gateway_ip = std::net::Ipv4Addr::from(base + 2);
                gcfg.dhcp_range.0 = std::net::Ipv4Addr::from(base + 3);
                // Every guest arrives through the uplink: the kernel holds ports to
                // their MAC and address (the bridge-family rules), not the switch.
                gcfg.lock_ports = false;
                // The host is the router here; there is no mapped address to offer.
                gcfg.host_access = None;
            }
            gcfg.reservations = self
                .store
                .reservations(&rec.name)?
                .into_iter()
                .map(|(key, ip)| ReservationView { key, ip }.to_gateway())
                .collect();
            let gw = Gateway::attach(
                &self.rt,
                &self.switch,
                &rec.name,
                gcfg,
                Box::new(self.store.leases_of(&rec.name)),
            )
            .map_err(|e| ApiError::BadRequest(e.to_string()));
            let gw = match gw {
                Ok(gw) => Arc::new(gw),
                Err(e) => {
                    let _ = self.switch.remove_network(&rec.name);
                    return Err(e);
                }
            };
            if gw.config().lock_ports {
                let mut locker = lock(&self.locker);
                locker.enable(&rec.name, gw.port());
                locker.remember_leases(&rec.name, gw.leases().into_iter().map(|l| (l.mac, l.ip)));
            }
            if let Some(leases) = gw.take_events() {
                let (control, network) = (self.control.clone(), rec.name.clone());
                std::thread::spawn(move || {
                    for event in leases {
                        match &event {
                            gateway::LeaseEvent::Bound(l) => {
                                let name = l.hostname.as_deref().unwrap_or("-");
                                tracing::info!(%network, ip = %l.ip, mac = %l.mac, name, "lease bound")
                            }
                            other => tracing::info!(%network, ?other, "lease ended"),
                        }
                        if control
                            .send(ControlEvent::Lease {
                                network: network.clone(),
                                event,
                            })
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
            lock(&self.gateways).insert(rec.name.clone(), gw.clone());
            Some(gw)
        } else {
            None
        };
        let uplink = if kernel {
            let source = fabric::TapSource::Name(crate::kernel::uplink_name(&self.instance, &rec.name));
            match self.switch.add_tap_port(&rec.name, "uplink", source) {
                Ok((id, _)) => Some(id),
                Err(e) => {
                    if let Some(gw) = &gateway {
                        let _ = self.switch.remove_port(gw.port());
                        lock(&self.gateways).remove(&rec.name);
                    }
                    let _ = self.switch.remove_network(&rec.name);
                    return Err(e.into());
                }
            }
        } else {
            None
        };
        self.nets().insert(
            rec.name.clone(),
            Net {
                record: rec,
                gateway,
                ports: HashMap::new(),
                uplink,
            },
        );
        if kernel {
            self.apply_kernel_rules()?;
        }
        self.share_subnets();
        // Bound first: the nets lock must be released before restoring takes it again.
        let gw = self.nets().get(&name).and_then(|n| n.gateway.clone());
        if let Some(gw) = gw {
            self.restore_gateway_state(&name, &gw);
        }
        Ok(())
    }

    /// Tells every gateway the other networks' subnets, which its guests may not reach.
    fn share_subnets(&self) {
        let nets = self.nets();
        for (name, net) in nets.iter() {
            if let Some(gw) = &net.gateway {
                let others = nets
                    .iter()
                    .filter(|(n, _)| *n != name)
                    .map(|(_, o)| o.record.subnet)
                    .collect();
                gw.set_other_subnets(others);
            }
        }
    }

    /// Creates a network. A subnet that overlaps a host route is refused unless `force`:
    /// VMs on it would shadow the host's real neighbours.
    pub fn create_network(&self, rec: NetworkRecord, force: bool) -> Result<NetworkRecord, ApiError> {
        let _serial = lock(&self.changes);
        valid_name("network", &rec.name)?;
        valid_subnet(rec.subnet)?;
        if let Some((route, iface)) = crate::hostroutes::overlapping(rec.subnet).filter(|_| !force) {
            return Err(ApiError::Conflict(format!(
                "subnet {} overlaps the host route {route} on {iface}; pick another subnet or create with force=true",
                rec.subnet
            )));
        }
        {
            let nets = self.nets();
            if nets.contains_key(&rec.name) {
                return Err(ApiError::Conflict(format!("network {:?} already exists", rec.name)));
            }
            if let Some(other) = nets.values().find(|n| {
                n.record.subnet.contains(&rec.subnet.network()) || rec.subnet.contains(&n.record.subnet.network())
            }) {
                return Err(ApiError::Conflict(format!(
                    "subnet {} overlaps network {:?} ({})",
                    rec.subnet, other.record.name, other.record.subnet
                )));
            }
        }
        if (rec.isolated || rec.bridge.is_some()) && rec.mode != NetworkMode::Kernel {
            return Err(ApiError::BadRequest(
                "isolated and bridge are kernel-mode options (mode=kernel)".into(),
            ));
        }
        if let Some(b) = &rec.bridge {
            let ok = (1..16).contains(&b.len()) && !b.contains(['/', ' ', ':', '\0']);
            if !ok {
                return Err(ApiError::BadRequest(format!(
                    "bridge name {b:?}: 1 to 15 characters, no '/', ':' or space"
                )));
            }
        }
        if rec.gateway {
            GatewayConfig::new(&rec.name, rec.subnet)
                .validate()
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        }
        self.bring_up_network(rec.clone())?;
        if let Err(e) = self.store.put_network(&rec) {
            let _ = self.delete_network_unserialised(&rec.name, true);
            return Err(e.into());
        }
        Ok(rec)
    }

    pub fn delete_network(&self, name: &str, force: bool) -> Result<(), ApiError> {
        let _serial = lock(&self.changes);
        self.delete_network_unserialised(name, force)
    }

    fn delete_network_unserialised(&self, name: &str, force: bool) -> Result<(), ApiError> {
        let ports: Vec<String> = {
            let nets = self.nets();
            let net = nets
                .get(name)
                .ok_or_else(|| ApiError::NotFound(format!("no network named {name:?}")))?;
            if !net.ports.is_empty() && !force {
                return Err(ApiError::Conflict(format!(
                    "network {name:?} has {} port(s); remove them first or delete with force=true",
                    net.ports.len()
                )));
            }
            net.ports.keys().cloned().collect()
        };
        for p in ports {
            self.remove_port_unserialised(name, &p)?;
        }
        self.store.delete_network(name)?;
        let net = self.nets().remove(name);
        lock(&self.gateways).remove(name);
        let kernel = net.as_ref().is_some_and(|n| n.record.mode == NetworkMode::Kernel);
        let bridge = net
            .as_ref()
            .map(|n| crate::kernel::bridge_name(&self.instance, &n.record));
        if let Some(net) = net {
            if let Some(gw) = net.gateway {
                let _ = self.switch.remove_port(gw.port());
            }
            if let Some(uplink) = net.uplink {
                let _ = self.switch.remove_port(uplink);
            }
        }
        self.switch.remove_network(name)?;
        if kernel {
            let devices = vec![
                crate::kernel::uplink_name(&self.instance, name),
                bridge.unwrap_or_default(),
            ];
            crate::kernel::remove(devices).map_err(kernel_error)?;
            self.apply_kernel_rules()?;
        }
        self.share_subnets();
        Ok(())
    }

    pub fn networks(&self) -> Vec<NetworkView> {
        let mut v: Vec<NetworkView> = self
            .nets()
            .values()
            .map(|n| NetworkView {
                record: n.record.clone(),
                ports: n.ports.len(),
                leases: n.gateway.as_ref().map(|g| g.leases().len()).unwrap_or(0),
            })
            .collect();
        v.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        v
    }

    pub fn network(&self, name: &str) -> Result<NetworkView, ApiError> {
        self.networks()
            .into_iter()
            .find(|n| n.record.name == name)
            .ok_or_else(|| ApiError::NotFound(format!("no network named {name:?}")))
    }

    fn bring_up_port(&self, rec: PortRecord) -> Result<PortId, ApiError> {
        if self.mode_of(&rec.network)? == NetworkMode::Kernel {
            let net = self.network(&rec.network)?.record;
            let bridge = crate::kernel::bridge_name(&self.instance, &net);
            crate::kernel::add_port(&self.instance, &bridge, &rec, net.mtu, net.isolated).map_err(kernel_error)?;
            let id = crate::kernel::port_id();
            let mut nets = self.nets();
            if let Some(net) = nets.get_mut(&rec.network) {
                net.ports.insert(rec.name.clone(), (id, rec));
            }
            return Ok(id);
        }
        let path = PathBuf::from(&rec.path);
        let id = match rec.kind {
            PortKind::Unixgram => self.switch.add_unixgram_port(&rec.network, &rec.name, &path)?,
            PortKind::Stream => self.switch.add_stream_port(&rec.network, &rec.name, &path)?,
            PortKind::Tap => {
                let source = fabric::TapSource::Name(rec.path.clone());
                self.switch
                    .add_tap_port(&rec.network, &rec.name, source)
                    .map(|(id, _)| id)?
            }
            PortKind::Socketpair => return Err(ApiError::Internal("socketpair ports are not restored".into())),
        };
        if let Err(e) = self.lock_from_birth(&rec, id) {
            let _ = self.switch.remove_port(id);
            return Err(e);
        }
        lock(&self.labels).insert(id, (rec.network.clone(), rec.name.clone()));
        let mut nets = self.nets();
        let net = nets
            .get_mut(&rec.network)
            .ok_or_else(|| ApiError::NotFound(format!("no network named {:?}", rec.network)))?;
        net.ports.insert(rec.name.clone(), (id, rec));
        Ok(id)
    }

    pub fn add_port(&self, network: &str, req: PortRequest) -> Result<PortView, ApiError> {
        let _serial = lock(&self.changes);
        valid_name("port", &req.name)?;
        {
            let nets = self.nets();
            let net = nets
                .get(network)
                .ok_or_else(|| ApiError::NotFound(format!("no network named {network:?}")))?;
            if net.ports.contains_key(&req.name) {
                return Err(ApiError::Conflict(format!(
                    "port {:?} already exists on {network:?}",
                    req.name
                )));
            }
        }
        if req.kind != PortKind::Tap && req.ifname.is_some() {
            return Err(ApiError::BadRequest("ifname is for TAP ports only".into()));
        }
        if self.mode_of(network)? == NetworkMode::Kernel {
            if req.mac.is_some() || req.learn_mac_once {
                return Err(ApiError::BadRequest(
                    "a kernel-mode port gets a stable MAC that its bridge rules hold it to; mac and learn_mac_once are for userspace ports".into(),
                ));
            }
            return self.add_kernel_port(network, req);
        }
        if !req.tap_settings().is_default() {
            return Err(ApiError::BadRequest(
                "owner, multi_queue and vnet_hdr are for kernel-mode TAP ports (the switch opens userspace ones)"
                    .into(),
            ));
        }
        let socket = |ext: &str| {
            let file = format!("{}.{ext}", req.name);
            self.run_dir
                .join("ports")
                .join(network)
                .join(file)
                .display()
                .to_string()
        };
        let path =
            match req.kind {
                PortKind::Unixgram => socket("sock"),
                PortKind::Stream => socket("stream"),
                PortKind::Tap => req
                    .ifname
                    .clone()
                    .unwrap_or_else(|| format!("vmf-{}", req.name).chars().take(15).collect()),
                PortKind::Socketpair => return Err(ApiError::BadRequest(
                    "a socketpair port hands its VM end over the API connection: POST /v1/networks/{name}/socketpairs \
                     with `Upgrade: vmfabric-fd` (the CLI: vmfabric port add NET NAME --kind socketpair -- CMD {fd})"
                        .into(),
                )),
            };
        let (mac, learn_mac_once) = choose_mac(network, &req.name, req.mac.as_deref(), req.learn_mac_once, |m| {
            self.mac_taken(network, m)
        })?;
        let rec = PortRecord {
            network: network.to_string(),
            name: req.name.clone(),
            kind: req.kind,
            path,
            mac,
            learn_mac_once,
            tap: Default::default(),
        };
        let id = self.bring_up_port(rec.clone())?;
        if let Err(e) = self.store.put_port(&rec) {
            let _ = self.remove_port_unserialised(network, &req.name);
            return Err(e.into());
        }
        Ok(PortView {
            up: self.switch.is_port_up(id).unwrap_or(false),
            qemu_args: qemu_args(&rec, &self.run_dir),
            record: rec,
        })
    }

    /// A port of a kernel network: a persistent TAP device on its bridge with a stable
    /// MAC, an address from the pool held for it by a reservation (a reservation by the
    /// port's name wins), and the bridge-family rules that keep it to both.
    fn add_kernel_port(&self, network: &str, req: PortRequest) -> Result<PortView, ApiError> {
        if req.kind != PortKind::Tap {
            return Err(ApiError::BadRequest(
                "a kernel-mode network takes TAP ports (the VMM opens the device by name)".into(),
            ));
        }
        let (taken, subnet) = {
            let nets = self.nets();
            let net = nets
                .get(network)
                .ok_or_else(|| ApiError::NotFound(format!("no network named {network:?}")))?;
            let taken: std::collections::HashSet<Mac> = net.ports.values().map(|(_, p)| p.mac).collect();
            (taken, net.record.subnet)
        };
        let mac = hostnet::mac::stable_mac(network, &req.name, &taken);
        let ifname = req
            .ifname
            .clone()
            .unwrap_or_else(|| crate::kernel::tap_name(&self.instance, network, &req.name));
        let reservations = self.store.reservations(network)?;
        let by_name = reservations.iter().find(|(k, _)| *k == req.name).map(|(_, ip)| *ip);
        let base = u32::from(subnet.network());
        let used: std::collections::HashSet<std::net::Ipv4Addr> = reservations
            .iter()
            .filter(|(k, _)| *k != req.name)
            .map(|(_, ip)| *ip)
            .chain(self.leases(network)?.into_iter().filter(|l| l.mac != mac).map(|l| l.ip))
            .chain([std::net::Ipv4Addr::from(base + 2)])
            .collect();
        let pool = hostnet::ipam::Pool {
            subnet,
            gateway: std::net::Ipv4Addr::from(base + 1),
        };
        let ip = pool.assign(&used, &Default::default(), by_name).map_err(kernel_error)?;
        let rec = PortRecord {
            network: network.to_string(),
            name: req.name.clone(),
            kind: PortKind::Tap,
            path: ifname,
            mac,
            learn_mac_once: false,
            tap: req.tap_settings(),
        };
        let key = mac.to_string();
        self.reserve_unserialised(network, ReservationView { key: key.clone(), ip })?;
        let stored = self
            .bring_up_port(rec.clone())
            .and_then(|_| self.store.put_port(&rec).map_err(ApiError::from));
        if let Err(e) = stored {
            let _ = self.remove_port_unserialised(network, &req.name);
            let _ = self.unreserve_unserialised(network, &key);
            return Err(e);
        }
        self.apply_kernel_rules()?;
        Ok(PortView {
            up: true,
            qemu_args: qemu_args(&rec, &self.run_dir),
            record: rec,
        })
    }

    pub fn remove_port(&self, network: &str, name: &str) -> Result<(), ApiError> {
        let _serial = lock(&self.changes);
        self.remove_port_unserialised(network, name)
    }

    /// Points a unixgram port at its VMM's socket path (for a VM adopted after a
    /// restart, which may have nothing to send for a while).
    pub fn set_port_peer(&self, network: &str, name: &str, peer: &std::path::Path) -> Result<(), ApiError> {
        let id = {
            let nets = self.nets();
            let net = nets
                .get(network)
                .ok_or_else(|| ApiError::NotFound(format!("no network named {network:?}")))?;
            net.ports
                .get(name)
                .map(|(id, _)| *id)
                .ok_or_else(|| ApiError::NotFound(format!("no port {name:?} on {network:?}")))?
        };
        self.switch.set_unixgram_peer(id, peer)?;
        Ok(())
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    fn remove_port_unserialised(&self, network: &str, name: &str) -> Result<(), ApiError> {
        let (id, rec) = {
            let mut nets = self.nets();
            let net = nets
                .get_mut(network)
                .ok_or_else(|| ApiError::NotFound(format!("no network named {network:?}")))?;
            net.ports
                .remove(name)
                .ok_or_else(|| ApiError::NotFound(format!("no port {name:?} on {network:?}")))?
        };
        self.store.delete_port(network, name)?;
        if self.mode_of(network)? == NetworkMode::Kernel {
            crate::kernel::remove(vec![rec.path.clone()]).map_err(kernel_error)?;
            // Its address goes back to the pool.
            let _ = self.unreserve_unserialised(network, &rec.mac.to_string());
            return self.apply_kernel_rules();
        }
        lock(&self.labels).remove(&id);
        lock(&self.locker).forget_port(network, id);
        self.switch.remove_port(id)?;
        Ok(())
    }

    /// Whether another port of `network` has (or may come to have) this MAC.
    fn mac_taken(&self, network: &str, mac: Mac) -> bool {
        self.nets()
            .get(network)
            .is_some_and(|n| n.ports.values().any(|(_, p)| p.mac == mac))
    }

    /// Locks a new userspace port to its MAC (or its first MAC) before any frame of
    /// its passes, where the network's gateway locks ports.
    fn lock_from_birth(&self, rec: &PortRecord, id: PortId) -> Result<(), ApiError> {
        let mac = (!rec.learn_mac_once).then_some(rec.mac);
        lock(&self.locker)
            .register_port(&rec.network, id, mac)
            .map_err(|e| match e {
                fabric::FabricError::InvalidConfig(msg) => ApiError::Conflict(msg),
                e => e.into(),
            })
    }

    /// After a start: removes this daemon's kernel devices that the store no longer
    /// knows (a crash after a delete) and writes the nftables tables again.
    fn reconcile_kernel(&self) {
        let (known, any) = {
            let nets = self.nets();
            let mut known = std::collections::HashSet::new();
            let mut any = false;
            for n in nets.values().filter(|n| n.record.mode == NetworkMode::Kernel) {
                any = true;
                known.insert(crate::kernel::bridge_name(&self.instance, &n.record));
                known.insert(crate::kernel::uplink_name(&self.instance, &n.record.name));
                known.extend(n.ports.values().map(|(_, p)| p.path.clone()));
            }
            (known, any)
        };
        match crate::kernel::remove_stale(&self.instance, known) {
            Ok(gone) if !gone.is_empty() => tracing::info!(?gone, "removed stale kernel devices"),
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot look for stale kernel devices: {e}"),
        }
        if any {
            if let Err(e) = self.apply_kernel_rules() {
                tracing::warn!("cannot write the nftables tables: {e}");
            }
        }
    }

    fn mode_of(&self, network: &str) -> Result<NetworkMode, ApiError> {
        self.nets()
            .get(network)
            .map(|n| n.record.mode)
            .ok_or_else(|| ApiError::NotFound(format!("no network named {network:?}")))
    }

    /// Writes vmfabric's nftables tables for every kernel network: masquerade, no
    /// traffic between networks, each port held to its MAC and reserved address.
    fn apply_kernel_rules(&self) -> Result<(), ApiError> {
        let rules: Vec<hostnet::nft::NetworkRules> = {
            let nets = self.nets();
            nets.values()
                .filter(|n| n.record.mode == NetworkMode::Kernel)
                .map(|n| {
                    // One query per network: each port's reservation (keyed by MAC).
                    let reserved = self.store.reservations(&n.record.name).unwrap_or_default();
                    let policy = self.policy_of(&n.record.name).unwrap_or_default();
                    hostnet::nft::NetworkRules {
                        bridge: crate::kernel::bridge_name(&self.instance, &n.record),
                        subnet: n.record.subnet,
                        router: crate::kernel::router_of(&n.record),
                        egress: kernel_egress(&policy),
                        ipv6: false,
                        forwards: self.kernel_forwards(&n.record.name).unwrap_or_default(),
                        locked_ports: n
                            .ports
                            .values()
                            .map(|(_, p)| hostnet::nft::PortLock {
                                ifname: p.path.clone(),
                                mac: p.mac,
                                ips: reserved
                                    .iter()
                                    .filter(|(key, _)| *key == p.mac.to_string())
                                    .map(|(_, ip)| *ip)
                                    .collect(),
                            })
                            .collect(),
                    }
                })
                .collect()
        };
        // Writing the table starts its refusal counters again: keep what they held.
        if let Ok(counts) = hostnet::nft::counters() {
            let mut kept = lock(&self.kernel_denied);
            for (name, n) in counts {
                *kept.entry(name).or_default() += n;
            }
        }
        let result = if rules.is_empty() {
            hostnet::nft::remove()
        } else {
            hostnet::nft::apply(&rules)
        };
        result.map_err(kernel_error)
    }

    /// The egress policy stored for a network (the default when none was set).
    fn policy_of(&self, network: &str) -> Result<gateway::policy::EgressPolicy, ApiError> {
        match self.store.policy(network)? {
            Some(json) => serde_json::from_str::<PolicyView>(&json)
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .to_gateway(),
            None => Ok(Default::default()),
        }
    }

    /// A kernel network's refusals so far: (egress, input), from its nftables counters.
    /// `now` is what the counters hold at present ([`hostnet::nft::counters`]).
    fn kernel_refusals(&self, rec: &NetworkRecord, now: &[(String, u64)]) -> (u64, u64) {
        let bridge = crate::kernel::bridge_name(&self.instance, rec);
        let kept = lock(&self.kernel_denied);
        let total = |chain: &str| {
            let name = hostnet::nft::counter_name(chain, &bridge);
            kept.get(&name).copied().unwrap_or(0) + now.iter().find(|(n, _)| *n == name).map_or(0, |(_, c)| *c)
        };
        (total("egress"), total("input"))
    }

    pub fn ports(&self, network: &str) -> Result<Vec<PortView>, ApiError> {
        let nets = self.nets();
        let net = nets
            .get(network)
            .ok_or_else(|| ApiError::NotFound(format!("no network named {network:?}")))?;
        let mut v: Vec<PortView> = net
            .ports
            .values()
            .map(|(id, rec)| PortView {
                record: rec.clone(),
                up: self.switch.is_port_up(*id).unwrap_or(false),
                qemu_args: qemu_args(rec, &self.run_dir),
            })
            .collect();
        v.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(v)
    }

    fn gateway_of(&self, network: &str) -> Result<Arc<Gateway>, ApiError> {
        let nets = self.nets();
        let net = nets
            .get(network)
            .ok_or_else(|| ApiError::NotFound(format!("no network named {network:?}")))?;
        net.gateway
            .clone()
            .ok_or_else(|| ApiError::BadRequest(format!("network {network:?} has no gateway (no DHCP)")))
    }

    pub fn reservations(&self, network: &str) -> Result<Vec<ReservationView>, ApiError> {
        self.gateway_of(network)?;
        let v = self.store.reservations(network)?;
        Ok(v.into_iter().map(|(key, ip)| ReservationView { key, ip }).collect())
    }

    /// Adds or replaces a reservation; it applies to the next DHCP exchange.
    pub fn reserve(&self, network: &str, r: ReservationView) -> Result<ReservationView, ApiError> {
        let _serial = lock(&self.changes);
        self.reserve_unserialised(network, r)
    }

    fn reserve_unserialised(&self, network: &str, r: ReservationView) -> Result<ReservationView, ApiError> {
        let gw = self.gateway_of(network)?;
        let mut all = self.reservations(network)?;
        if let Some(other) = all.iter().find(|o| o.ip == r.ip && o.key != r.key) {
            return Err(ApiError::Conflict(format!(
                "{} is already reserved for {}",
                r.ip, other.key
            )));
        }
        all.retain(|o| o.key != r.key);
        all.push(r.clone());
        gw.set_reservations(all.iter().map(ReservationView::to_gateway).collect())
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        self.store.put_reservation(network, &r.key, r.ip)?;
        Ok(r)
    }

    pub fn unreserve(&self, network: &str, key: &str) -> Result<(), ApiError> {
        let _serial = lock(&self.changes);
        self.unreserve_unserialised(network, key)
    }

    fn unreserve_unserialised(&self, network: &str, key: &str) -> Result<(), ApiError> {
        let gw = self.gateway_of(network)?;
        if !self.store.delete_reservation(network, key)? {
            return Err(ApiError::NotFound(format!("no reservation for {key:?} on {network:?}")));
        }
        let rest = self.reservations(network)?;
        gw.set_reservations(rest.iter().map(ReservationView::to_gateway).collect())
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(())
    }

    /// Adds a socketpair port and returns its VM end, for handing to the client.
    pub fn add_socketpair_port(
        &self,
        network: &str,
        name: &str,
        mac: Option<&str>,
        learn_mac_once: bool,
    ) -> Result<(PortView, std::os::fd::OwnedFd), ApiError> {
        let _serial = lock(&self.changes);
        valid_name("port", name)?;
        let (mac, learn_mac_once) = choose_mac(network, name, mac, learn_mac_once, |m| self.mac_taken(network, m))?;
        {
            let nets = self.nets();
            let net = nets
                .get(network)
                .ok_or_else(|| ApiError::NotFound(format!("no network named {network:?}")))?;
            if net.ports.contains_key(name) {
                return Err(ApiError::Conflict(format!(
                    "port {name:?} already exists on {network:?}"
                )));
            }
        }
        let (id, vm_end) = self.switch.add_port(network, name)?;
        let rec = PortRecord {
            network: network.to_string(),
            name: name.to_string(),
            kind: PortKind::Socketpair,
            path: "-".into(),
            mac,
            learn_mac_once,
            tap: Default::default(),
        };
        if let Err(e) = self.lock_from_birth(&rec, id) {
            let _ = self.switch.remove_port(id);
            return Err(e);
        }
        lock(&self.labels).insert(id, (network.to_string(), name.to_string()));
        if let Some(net) = self.nets().get_mut(network) {
            net.ports.insert(name.to_string(), (id, rec.clone()));
        }
        let view = PortView {
            up: true,
            qemu_args: qemu_args(&rec, &self.run_dir),
            record: rec,
        };
        Ok((view, vm_end))
    }

    /// Starts a live capture of a network, or of one of its ports.
    pub fn capture(&self, network: &str, port: Option<&str>) -> Result<fabric::Capture, ApiError> {
        let port_id = {
            let nets = self.nets();
            let net = nets
                .get(network)
                .ok_or_else(|| ApiError::NotFound(format!("no network named {network:?}")))?;
            match port {
                Some(p) => Some(
                    net.ports
                        .get(p)
                        .ok_or_else(|| ApiError::NotFound(format!("no port {p:?} on {network:?}")))?
                        .0,
                ),
                None => None,
            }
        };
        // A few thousand frames of slack; a reader slower than that loses copies.
        Ok(self.switch.capture(network, port_id, 4096)?)
    }

    /// The NAT flows the network's gateway carries now.
    pub fn flows(&self, network: &str) -> Result<FlowsView, ApiError> {
        let gw = self.gateway_of(network)?;
        let mut tcp: Vec<TcpFlowView> = gw
            .tcp_flows()
            .into_iter()
            .map(|f| TcpFlowView {
                guest: f.guest,
                peer: f.peer,
                direction: match f.direction {
                    gateway::tcp_nat::Direction::Egress => "egress".into(),
                    gateway::tcp_nat::Direction::Forward => "forward".into(),
                },
                state: f.state,
            })
            .collect();
        tcp.sort_by_key(|f| (f.guest, f.peer));
        let mut udp: Vec<UdpFlowView> = gw
            .udp_flows()
            .into_iter()
            .map(|f| UdpFlowView {
                guest: f.guest,
                dst: f.dst,
            })
            .collect();
        udp.sort_by_key(|f| (f.guest, f.dst));
        Ok(FlowsView { tcp, udp })
    }

    pub fn leases(&self, network: &str) -> Result<Vec<LeaseView>, ApiError> {
        let nets = self.nets();
        let net = nets
            .get(network)
            .ok_or_else(|| ApiError::NotFound(format!("no network named {network:?}")))?;
        Ok(net
            .gateway
            .as_ref()
            .map(|g| g.leases().into_iter().map(LeaseView::from).collect())
            .unwrap_or_default())
    }

    /// Counters in the Prometheus text format.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        let nets = self.nets();
        let mut names: Vec<&String> = nets.keys().collect();
        names.sort();
        out.push_str("# TYPE vmfabric_port_frames_total counter\n# TYPE vmfabric_port_drops_total counter\n");
        let kernel_counts = if nets.values().any(|n| n.record.mode == NetworkMode::Kernel) {
            hostnet::nft::counters().unwrap_or_default()
        } else {
            Vec::new()
        };
        for name in &names {
            let net = &nets[*name];
            if net.record.mode == NetworkMode::Kernel {
                let (egress, input) = self.kernel_refusals(&net.record, &kernel_counts);
                out.push_str(&format!(
                    "vmfabric_kernel_egress_denied_total{{network=\"{name}\"}} {egress}\n"
                ));
                out.push_str(&format!(
                    "vmfabric_kernel_input_denied_total{{network=\"{name}\"}} {input}\n"
                ));
            }
            if let Some(c) = self.switch.network_counters(name) {
                counter_lines(&mut out, "network", &format!("network=\"{name}\""), &c);
            }
            if let Some(n) = self.switch.mac_table_len(name) {
                out.push_str(&format!("vmfabric_mac_table_entries{{network=\"{name}\"}} {n}\n"));
            }
            let mut ports: Vec<(&String, &(PortId, PortRecord))> = net.ports.iter().collect();
            ports.sort_by_key(|(n, _)| *n);
            for (pname, (id, _)) in ports {
                if let Some(c) = self.switch.port_counters(*id) {
                    counter_lines(&mut out, "port", &format!("network=\"{name}\",port=\"{pname}\""), &c);
                }
            }
            if let Some(gw) = &net.gateway {
                out.push_str(&format!(
                    "vmfabric_leases{{network=\"{name}\"}} {}\n",
                    gw.leases().len()
                ));
                for (k, v) in gw.counters().snapshot() {
                    out.push_str(&format!("vmfabric_gateway_{k}_total{{network=\"{name}\"}} {v}\n"));
                }
                for (service, v) in gw.handler_panics().snapshot() {
                    out.push_str(&format!(
                        "vmfabric_gateway_handler_panics_total{{network=\"{name}\",service=\"{service}\"}} {v}\n"
                    ));
                }
            }
        }
        out
    }

    pub fn vms(&self) -> &crate::vms::Vms {
        &self.vms
    }

    /// Stops the VMs and removes the ports' socket files; the store keeps everything
    /// for the next start.
    pub fn shutdown(&self) {
        self.vms.stop_all(self);
        let ids: Vec<PortId> = self
            .nets()
            .values()
            .flat_map(|n| n.ports.values().map(|(id, _)| *id))
            .collect();
        for id in ids {
            let _ = self.switch.remove_port(id);
        }
    }
}

/// The Prometheus lines of one set of data-plane counters (`vmfabric_{kind}_*`).
fn counter_lines(out: &mut String, kind: &str, labels: &str, c: &fabric::CounterSnapshot) {
    for (dir, frames, bytes) in [("rx", c.rx_frames, c.rx_bytes), ("tx", c.tx_frames, c.tx_bytes)] {
        out.push_str(&format!(
            "vmfabric_{kind}_frames_total{{{labels},dir=\"{dir}\"}} {frames}\n"
        ));
        out.push_str(&format!(
            "vmfabric_{kind}_bytes_total{{{labels},dir=\"{dir}\"}} {bytes}\n"
        ));
    }
    for (reason, n) in c.drops_by_reason() {
        out.push_str(&format!(
            "vmfabric_{kind}_drops_total{{{labels},reason=\"{}\"}} {n}\n",
            reason.as_str()
        ));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An egress policy as the API takes and shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyView {
    /// "allow" or "deny": what happens when no rule matches.
    #[serde(default = "allow")]
    pub default: String,
    #[serde(default)]
    pub rules: Vec<RuleView>,
}

fn allow() -> String {
    "allow".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleView {
    /// "allow" or "deny".
    pub action: String,
    pub dst: ipnet::Ipv4Net,
    /// "53" or "1000-2000"; absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<String>,
    /// "tcp", "udp" or "icmp"; absent: every protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
}

fn action(s: &str) -> Result<gateway::policy::Action, ApiError> {
    match s {
        "allow" => Ok(gateway::policy::Action::Allow),
        "deny" => Ok(gateway::policy::Action::Deny),
        other => Err(ApiError::BadRequest(format!(
            "action {other:?} is neither \"allow\" nor \"deny\""
        ))),
    }
}

impl PolicyView {
    pub fn to_gateway(&self) -> Result<gateway::policy::EgressPolicy, ApiError> {
        let rules = self
            .rules
            .iter()
            .map(|r| {
                let ports = match r.ports.as_deref() {
                    None => None,
                    Some(p) => {
                        let (lo, hi) = p.split_once('-').unwrap_or((p, p));
                        let parse = |x: &str| {
                            x.trim()
                                .parse::<u16>()
                                .map_err(|_| ApiError::BadRequest(format!("bad port range {p:?}")))
                        };
                        let (lo, hi) = (parse(lo)?, parse(hi)?);
                        if lo > hi {
                            return Err(ApiError::BadRequest(format!("bad port range {p:?}")));
                        }
                        Some((lo, hi))
                    }
                };
                let proto = match r.proto.as_deref() {
                    None => None,
                    Some("tcp") => Some(gateway::policy::Proto::Tcp),
                    Some("udp") => Some(gateway::policy::Proto::Udp),
                    Some("icmp") => Some(gateway::policy::Proto::Icmp),
                    Some(other) => {
                        return Err(ApiError::BadRequest(format!(
                            "protocol {other:?} is not tcp, udp or icmp"
                        )))
                    }
                };
                Ok(gateway::policy::Rule {
                    action: action(&r.action)?,
                    dst: r.dst.trunc(),
                    ports,
                    proto,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(gateway::policy::EgressPolicy {
            rules,
            default: action(&self.default)?,
        })
    }
}

impl From<hostnet::nft::Forward> for ForwardView {
    fn from(f: hostnet::nft::Forward) -> ForwardView {
        ForwardView {
            proto: f.proto,
            host: std::net::SocketAddr::V4(f.host),
            guest: f.guest,
        }
    }
}

/// A network's NAT flows, as the API shows them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowsView {
    pub tcp: Vec<TcpFlowView>,
    pub udp: Vec<UdpFlowView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TcpFlowView {
    pub guest: std::net::SocketAddrV4,
    /// The other end as the guest sees it (the gateway's address for a forward).
    pub peer: std::net::SocketAddrV4,
    /// "egress" (the guest connected out) or "forward" (a host client came in).
    pub direction: String,
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UdpFlowView {
    pub guest: std::net::SocketAddrV4,
    pub dst: std::net::SocketAddrV4,
}

/// A port forward as the API takes and shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardView {
    /// "tcp" (the default) or "udp".
    #[serde(default = "tcp")]
    pub proto: String,
    /// Host address and port; port 0 picks a free one.
    pub host: std::net::SocketAddr,
    pub guest: std::net::SocketAddrV4,
}

fn tcp() -> String {
    "tcp".into()
}

fn forward_protocol(name: &str) -> Result<gateway::forward::Protocol, ApiError> {
    match name {
        "tcp" => Ok(gateway::forward::Protocol::Tcp),
        "udp" => Ok(gateway::forward::Protocol::Udp),
        other => Err(ApiError::BadRequest(format!(
            "forward protocol {other:?} is not tcp or udp"
        ))),
    }
}

impl Daemon {
    pub fn policy(&self, network: &str) -> Result<PolicyView, ApiError> {
        self.gateway_of(network)?;
        match self.store.policy(network)? {
            Some(json) => serde_json::from_str(&json).map_err(|e| ApiError::Internal(e.to_string())),
            None => Ok(PolicyView {
                default: allow(),
                rules: vec![],
            }),
        }
    }

    pub fn set_policy(&self, network: &str, p: PolicyView) -> Result<PolicyView, ApiError> {
        let _serial = lock(&self.changes);
        let gw = self.gateway_of(network)?;
        let policy = p.to_gateway()?;
        let json = serde_json::to_string(&p).map_err(|e| ApiError::Internal(e.to_string()))?;
        self.store.put_policy(network, &json)?;
        gw.set_egress_policy(policy);
        if self.mode_of(network)? == NetworkMode::Kernel {
            // The guests' traffic bypasses the gateway here: the kernel enforces it.
            self.apply_kernel_rules()?;
        }
        Ok(p)
    }

    pub fn forwards(&self, network: &str) -> Result<Vec<ForwardView>, ApiError> {
        if self.mode_of(network)? == NetworkMode::Kernel {
            return Ok(self
                .kernel_forwards(network)?
                .into_iter()
                .map(ForwardView::from)
                .collect());
        }
        let gw = self.gateway_of(network)?;
        Ok(gw
            .forwards()
            .into_iter()
            .map(|f| ForwardView {
                proto: f.protocol.as_str().into(),
                host: f.host,
                guest: f.guest,
            })
            .collect())
    }

    pub fn add_forward(&self, network: &str, f: ForwardView) -> Result<ForwardView, ApiError> {
        let _serial = lock(&self.changes);
        let protocol = forward_protocol(&f.proto)?;
        if self.mode_of(network)? == NetworkMode::Kernel {
            return self.add_kernel_forward(network, f);
        }
        let gw = self.gateway_of(network)?;
        let info = gw.add_forward(protocol, f.host, f.guest).map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => ApiError::Conflict(format!("{} is in use", f.host)),
            std::io::ErrorKind::InvalidInput => ApiError::BadRequest(e.to_string()),
            _ => ApiError::BadRequest(format!("cannot listen on {}: {e}", f.host)),
        })?;
        let view = ForwardView {
            proto: protocol.as_str().into(),
            host: info.host,
            guest: info.guest,
        };
        if let Err(e) = self.store.put_forward(
            network,
            &info.host.to_string(),
            &info.guest.to_string(),
            protocol.as_str(),
        ) {
            gw.remove_forward(info.id);
            return Err(e.into());
        }
        Ok(view)
    }

    /// Removes the forwards from `host`: both protocols unless `proto` names one.
    pub fn remove_forward(&self, network: &str, host: &str, proto: Option<&str>) -> Result<(), ApiError> {
        let _serial = lock(&self.changes);
        if self.mode_of(network)? == NetworkMode::Kernel {
            let only = proto.map(forward_protocol).transpose()?.map(|p| p.as_str().to_string());
            let found: Vec<_> = self
                .kernel_forwards(network)?
                .into_iter()
                .filter(|f| f.host.to_string() == host && only.as_ref().is_none_or(|p| *p == f.proto))
                .collect();
            if found.is_empty() {
                return Err(ApiError::NotFound(format!("no forward from {host} on {network:?}")));
            }
            for f in found {
                self.store.delete_forward(host, &f.proto)?;
            }
            return self.apply_kernel_rules();
        }
        let gw = self.gateway_of(network)?;
        let only = proto.map(forward_protocol).transpose()?;
        let found: Vec<_> = gw
            .forwards()
            .into_iter()
            .filter(|f| f.host.to_string() == host && only.is_none_or(|p| p == f.protocol))
            .collect();
        if found.is_empty() {
            return Err(ApiError::NotFound(format!("no forward from {host} on {network:?}")));
        }
        for f in found {
            self.store.delete_forward(host, f.protocol.as_str())?;
            gw.remove_forward(f.id);
        }
        Ok(())
    }

    /// A kernel network's forwards as stored (they live in nftables, not the gateway).
    fn kernel_forwards(&self, network: &str) -> Result<Vec<hostnet::nft::Forward>, ApiError> {
        Ok(self
            .store
            .forwards(network)?
            .into_iter()
            .filter_map(|(host, guest, proto)| {
                Some(hostnet::nft::Forward {
                    proto,
                    host: host.parse().ok()?,
                    guest: guest.parse().ok()?,
                })
            })
            .collect())
    }

    /// A forward on a kernel network: DNAT rules (prerouting for outside clients,
    /// output for the host's own, loopback included).
    fn add_kernel_forward(&self, network: &str, f: ForwardView) -> Result<ForwardView, ApiError> {
        let std::net::SocketAddr::V4(host) = f.host else {
            return Err(ApiError::BadRequest(
                "kernel-mode forwards listen on IPv4 addresses".into(),
            ));
        };
        if host.port() == 0 {
            return Err(ApiError::BadRequest(
                "kernel-mode forwards need a host port (nothing listens to pick one)".into(),
            ));
        }
        let subnet = self.network(network)?.record.subnet;
        if !subnet.contains(f.guest.ip()) {
            return Err(ApiError::BadRequest(format!("{} is not on {network:?}", f.guest.ip())));
        }
        let taken = self.nets().keys().cloned().collect::<Vec<_>>().into_iter().any(|n| {
            self.store
                .forwards(&n)
                .unwrap_or_default()
                .iter()
                .any(|(h, _, p)| *h == host.to_string() && *p == f.proto)
        });
        if taken {
            return Err(ApiError::Conflict(format!("{} is in use", f.host)));
        }
        self.store
            .put_forward(network, &host.to_string(), &f.guest.to_string(), &f.proto)?;
        if let Err(e) = self.apply_kernel_rules() {
            let _ = self.store.delete_forward(&host.to_string(), &f.proto);
            return Err(e);
        }
        Ok(f)
    }

    /// Puts a restored gateway's stored policy and forwards back in force.
    fn restore_gateway_state(&self, network: &str, gw: &Gateway) {
        if let Ok(p) = self.policy(network) {
            match p.to_gateway() {
                Ok(policy) => gw.set_egress_policy(policy),
                Err(e) => tracing::warn!(%network, "stored policy unusable: {e}"),
            }
        }
        let kernel = self.mode_of(network).is_ok_and(|m| m == NetworkMode::Kernel);
        for (host, guest, proto) in self.store.forwards(network).unwrap_or_default() {
            if kernel {
                break; // in nftables, written with the other kernel rules
            }
            let (Ok(h), Ok(g), Ok(p)) = (host.parse(), guest.parse(), forward_protocol(&proto)) else {
                continue;
            };
            if let Err(e) = gw.add_forward(p, h, g) {
                tracing::warn!(%network, %host, "cannot restore forward: {e}");
            }
        }
    }
}

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
use gateway::{Gateway, GatewayConfig};

use crate::control::error::ControlError;
use crate::control::locks::{ControlEvent, PortLocker};
use crate::model::Name;
pub use crate::model::{
    FlowsView, ForwardProto, ForwardSpec, LeaseView, NetworkSpec, NetworkView, PolicySpec, PortSpec, PortView,
    ReservationSpec, TcpFlowView, UdpFlowView,
};
use crate::store::{NetworkMode, PortKind, PortRecord, Store};

/// The MAC a new userspace port is locked to from birth: `mac` if given (unicast, not
/// another port's), else one derived from the names; with `learn_mac_once`, the lock
/// waits for the VMM's first frame (the derived MAC is still shown).
pub fn choose_mac(
    network: &str,
    name: &str,
    mac: Option<&str>,
    learn_mac_once: bool,
    taken: impl Fn(Mac) -> bool,
) -> Result<(Mac, bool), ControlError> {
    let mac = match mac {
        None => Mac::derived(&[network, name]),
        Some(_) if learn_mac_once => {
            return Err(ControlError::invalid(
                "mac and learn_mac_once exclude each other: give the MAC, or let the port learn it",
            ))
        }
        Some(text) => {
            let mac: Mac = text
                .parse()
                .map_err(|e| ControlError::invalid(format!("mac {text:?}: {e}")))?;
            if !mac.is_unicast() || mac == Mac([0; 6]) {
                return Err(ControlError::invalid(format!("mac {mac} is not a unicast address")));
            }
            if taken(mac) {
                return Err(ControlError::Conflict(format!(
                    "mac {mac} belongs to another port on {network:?}"
                )));
            }
            mac
        }
    };
    Ok((mac, learn_mac_once))
}

/// Takes the state directory for this process: two daemons on one store would each
/// believe their own copy of it (and fight over its kernel devices). The lock is the
/// kernel's (`flock`), so it goes with the process however it ends; the file holds the
/// holder's pid for the error the next one prints.
fn lock_state_dir(state_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = state_dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    // A daemon that is just exiting (a restart) gets a moment to let go.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut held = file.try_lock();
    while matches!(held, Err(std::fs::TryLockError::WouldBlock)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        held = file.try_lock();
    }
    if let Err(std::fs::TryLockError::Error(e)) = held {
        return Err(anyhow::anyhow!("lock {}: {e}", path.display()));
    }
    if let Err(std::fs::TryLockError::WouldBlock) = held {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        anyhow::bail!(
            "the state directory {} is in use by another vmfabric daemon (pid {}); stop it, or give this one its own --state-dir",
            state_dir.display(),
            holder.trim()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Stored objects that could not be restored: by name, the spec when it parsed and
/// the reason.
#[derive(Default)]
struct Failed {
    networks: HashMap<String, (Option<NetworkSpec>, String)>,
    ports: HashMap<(String, String), (Option<PortRecord>, String)>,
}

struct Net {
    record: NetworkSpec,
    gateway: Option<Arc<Gateway>>,
    ports: HashMap<String, (PortId, PortRecord)>,
    /// Kernel mode: the switch port on the bridge's uplink TAP, where the gateway is.
    uplink: Option<PortId>,
}

/// A subnet a network can live on: unicast, not loopback, link-local or broadcast,
/// written without host bits, with room for the gateway (or router and gateway), the
/// host-access address and at least one guest. Checked before anything is made:
/// smoltcp panics on a multicast gateway address.
fn valid_subnet(subnet: ipnet::Ipv4Net) -> Result<(), ControlError> {
    let net = subnet.network();
    let bad = |why: &str| Err(ControlError::invalid(format!("subnet {subnet}: {why}")));
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
    /// Held for the daemon's life: one instance per state directory.
    _state_lock: std::fs::File,
    /// What the store holds but could not be brought back at start, with why.
    failed: Mutex<Failed>,
    /// Serialises changes to networks and ports, so a check and the change it guards
    /// cannot interleave with another request's (the data plane is never behind it).
    changes: Mutex<()>,
}

/// Where a unixgram port's VMM binds its end (the path `qemu_args` prints).
fn guest_socket(run_dir: &std::path::Path, network: &str, port: &str) -> PathBuf {
    run_dir.join("guests").join(format!("{network}-{port}.sock"))
}

fn qemu_args(p: &PortRecord, run_dir: &std::path::Path) -> String {
    let netdev = match p.kind {
        PortKind::Unixgram => {
            let guest = guest_socket(run_dir, &p.network, &p.name);
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
        first: Option<NetworkSpec>,
        sandbox: bool,
    ) -> anyhow::Result<Arc<Daemon>> {
        let vms = crate::vms::Vms::new(guest_dir, run_dir.join("vms"));
        std::fs::create_dir_all(&state_dir)?;
        // Leases, MACs and names are nobody else's business.
        std::fs::set_permissions(&state_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let state_lock = lock_state_dir(&state_dir)?;
        std::fs::create_dir_all(run_dir.join("ports"))?;
        std::fs::create_dir_all(run_dir.join("guests"))?;
        let store = Store::open(&state_dir.join("vmfabric.db"))?;
        std::fs::set_permissions(
            state_dir.join("vmfabric.db"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
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
            failed: Mutex::default(),
            _state_lock: state_lock,
            vms,
        });
        daemon.vms.supervise(Arc::downgrade(&daemon));
        let saved = daemon.store.networks()?;
        if saved.is_empty() {
            let default = first.unwrap_or_else(|| {
                NetworkSpec::new(
                    Name::new("network", "default").expect("literal"),
                    "10.77.0.0/24".parse().expect("literal"),
                )
            });
            if let Some((route, iface)) = crate::hostroutes::overlapping(default.subnet) {
                tracing::warn!(%route, %iface, "the default network overlaps a host route");
            }
            daemon
                .create_network(default, true)
                .map_err(|e| anyhow::anyhow!("create the default network: {e}"))?;
        } else {
            daemon.restore(saved)?;
        }
        daemon.reconcile_kernel();
        Ok(daemon)
    }

    /// Brings back what the store holds. What cannot come back (a row that no longer
    /// parses, a socket path now in use, a kernel device that cannot be made) stays in
    /// the store, is logged and listed with its reason, and can be removed through the
    /// API; everything else starts.
    fn restore(self: &Arc<Self>, saved: Vec<Result<NetworkSpec, crate::store::BadRow>>) -> anyhow::Result<()> {
        for row in saved {
            let failure = match row {
                Ok(spec) => match self.bring_up_network(spec.clone()) {
                    Ok(()) => continue,
                    Err(e) => (spec.name.to_string(), Some(spec), e.to_string()),
                },
                Err(bad) => (bad.key.clone(), None, bad.to_string()),
            };
            tracing::error!(network = %failure.0, "cannot restore the network: {}", failure.2);
            lock(&self.failed).networks.insert(failure.0, (failure.1, failure.2));
        }
        for row in self.store.ports()? {
            let failure = match row {
                Ok(rec) if lock(&self.failed).networks.contains_key(&rec.network) => {
                    let why = format!("its network {:?} did not come back", rec.network);
                    (rec.network.clone(), rec.name.clone(), Some(rec), why)
                }
                Ok(rec) => match self.bring_up_port(rec.clone()) {
                    Ok(_) => continue,
                    Err(e) => (rec.network.clone(), rec.name.clone(), Some(rec), e.to_string()),
                },
                Err(bad) => {
                    let (net, name) = bad.key.split_once('/').unwrap_or((&bad.key, ""));
                    (net.to_string(), name.to_string(), None, bad.to_string())
                }
            };
            tracing::error!(network = %failure.0, port = %failure.1, "cannot restore the port: {}", failure.3);
            lock(&self.failed)
                .ports
                .insert((failure.0, failure.1), (failure.2, failure.3));
        }
        self.vms.restore(self);
        Ok(())
    }

    fn nets(&self) -> MutexGuard<'_, HashMap<String, Net>> {
        lock(&self.nets)
    }

    pub fn switch(&self) -> &Switch {
        &self.switch
    }

    fn bring_up_network(&self, rec: NetworkSpec) -> Result<(), ControlError> {
        let name = rec.name.to_string();
        let kernel = rec.mode == NetworkMode::Kernel;
        let base = u32::from(rec.subnet.network());
        // Kernel mode: the bridge routes at .1, the gateway serves DHCP and DNS at .2.
        let router = crate::kernel::router_of(&rec);
        let cfg = NetworkConfig {
            mtu: usize::from(rec.mtu.get()),
            ..NetworkConfig::default()
        };
        // Everything is checked before the first device is made.
        cfg.validate()?;
        valid_subnet(rec.subnet)?;
        if kernel {
            crate::kernel::bring_up(&self.instance, &rec, router)?;
        }
        self.switch.add_network(&rec.name, cfg)?;
        let gateway = if rec.gateway {
            let mut gcfg = GatewayConfig::new(&rec.name, rec.subnet);
            gcfg.mtu = rec.mtu.get();
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
                .reservations(rec.name.as_str())?
                .into_iter()
                .map(|(key, ip)| ReservationSpec { key, ip }.to_gateway())
                .collect();
            let gw = Gateway::attach(
                &self.rt,
                &self.switch,
                &rec.name,
                gcfg,
                Box::new(self.store.leases_of(rec.name.as_str())),
            )
            .map_err(|e| ControlError::invalid(e.to_string()));
            let gw = match gw {
                Ok(gw) => Arc::new(gw),
                Err(e) => {
                    let _ = self.switch.remove_network(rec.name.as_str());
                    return Err(e);
                }
            };
            if gw.config().lock_ports {
                let mut locker = lock(&self.locker);
                locker.enable(&rec.name, gw.port());
                locker.remember_leases(&rec.name, gw.leases().into_iter().map(|l| (l.mac, l.ip)));
            }
            if let Some(leases) = gw.take_events() {
                let (control, network) = (self.control.clone(), rec.name.to_string());
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
            lock(&self.gateways).insert(rec.name.to_string(), gw.clone());
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
                        lock(&self.gateways).remove(rec.name.as_str());
                    }
                    let _ = self.switch.remove_network(rec.name.as_str());
                    return Err(e.into());
                }
            }
        } else {
            None
        };
        self.nets().insert(
            rec.name.to_string(),
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
    pub fn create_network(&self, rec: NetworkSpec, force: bool) -> Result<NetworkSpec, ControlError> {
        let _serial = lock(&self.changes);
        valid_subnet(rec.subnet)?;
        if let Some((route, iface)) = crate::hostroutes::overlapping(rec.subnet).filter(|_| !force) {
            return Err(ControlError::Conflict(format!(
                "subnet {} overlaps the host route {route} on {iface}; pick another subnet or create with force=true",
                rec.subnet
            )));
        }
        {
            let nets = self.nets();
            if nets.contains_key(rec.name.as_str()) || lock(&self.failed).networks.contains_key(rec.name.as_str()) {
                return Err(ControlError::Conflict(format!("network {:?} already exists", rec.name)));
            }
            if let Some(other) = nets.values().find(|n| {
                n.record.subnet.contains(&rec.subnet.network()) || rec.subnet.contains(&n.record.subnet.network())
            }) {
                return Err(ControlError::Conflict(format!(
                    "subnet {} overlaps network {:?} ({})",
                    rec.subnet, other.record.name, other.record.subnet
                )));
            }
        }
        if (rec.isolated || rec.bridge.is_some()) && rec.mode != NetworkMode::Kernel {
            return Err(ControlError::invalid(
                "isolated and bridge are kernel-mode options (mode=kernel)",
            ));
        }
        if let Some(b) = &rec.bridge {
            crate::model::check_ifname("bridge", b)?;
        }
        if rec.gateway {
            GatewayConfig::new(&rec.name, rec.subnet)
                .validate()
                .map_err(|e| ControlError::invalid(e.to_string()))?;
        }
        self.bring_up_network(rec.clone())?;
        if let Err(e) = self.store.put_network(&rec) {
            let _ = self.delete_network_unserialised(&rec.name, true);
            return Err(e.into());
        }
        Ok(rec)
    }

    pub fn delete_network(&self, name: &str, force: bool) -> Result<(), ControlError> {
        let _serial = lock(&self.changes);
        self.delete_network_unserialised(name, force)
    }

    fn delete_network_unserialised(&self, name: &str, force: bool) -> Result<(), ControlError> {
        if lock(&self.failed).networks.contains_key(name) && !self.nets().contains_key(name) {
            // Never came back at start: only its rows remain.
            self.store.delete_network(name)?;
            let mut failed = lock(&self.failed);
            failed.networks.remove(name);
            failed.ports.retain(|(net, _), _| net != name);
            return Ok(());
        }
        let ports: Vec<String> = {
            let nets = self.nets();
            let net = nets
                .get(name)
                .ok_or_else(|| ControlError::NoNetwork(name.to_string()))?;
            if !net.ports.is_empty() && !force {
                return Err(ControlError::Conflict(format!(
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
                // Its forwards' listeners hold the gateway: close them with it.
                for f in gw.forwards() {
                    gw.remove_forward(f.id);
                }
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
            crate::kernel::remove(devices)?;
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
                spec: n.record.clone(),
                ports: n.ports.len(),
                leases: n.gateway.as_ref().map(|g| g.leases().len()).unwrap_or(0),
                failed: None,
            })
            .collect();
        let failed = lock(&self.failed);
        v.extend(failed.networks.values().filter_map(|(spec, why)| {
            Some(NetworkView {
                spec: spec.clone()?,
                ports: failed
                    .ports
                    .keys()
                    .filter(|(n, _)| spec.as_ref().is_some_and(|s| *n == *s.name))
                    .count(),
                leases: 0,
                failed: Some(why.clone()),
            })
        }));
        v.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        v
    }

    pub fn network(&self, name: &str) -> Result<NetworkView, ControlError> {
        self.networks()
            .into_iter()
            .find(|n| n.spec.name.as_str() == name)
            .ok_or_else(|| ControlError::NoNetwork(name.to_string()))
    }

    fn bring_up_port(&self, rec: PortRecord) -> Result<PortId, ControlError> {
        if self.mode_of(&rec.network)? == NetworkMode::Kernel {
            let net = self.network(&rec.network)?.spec;
            let bridge = crate::kernel::bridge_name(&self.instance, &net);
            crate::kernel::add_port(&self.instance, &bridge, &rec, net.mtu.into(), net.isolated)?;
            let id = crate::kernel::port_id();
            let mut nets = self.nets();
            if let Some(net) = nets.get_mut(&rec.network) {
                net.ports.insert(rec.name.to_string(), (id, rec));
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
            PortKind::Socketpair => return Err(ControlError::Host("socketpair ports are not restored".into())),
        };
        if let Err(e) = self.lock_from_birth(&rec, id) {
            let _ = self.switch.remove_port(id);
            return Err(e);
        }
        lock(&self.labels).insert(id, (rec.network.clone(), rec.name.to_string()));
        let mut nets = self.nets();
        let net = nets
            .get_mut(&rec.network)
            .ok_or_else(|| ControlError::NoNetwork(rec.network.to_string()))?;
        net.ports.insert(rec.name.to_string(), (id, rec));
        Ok(id)
    }

    pub fn add_port(&self, network: &str, req: PortSpec) -> Result<PortView, ControlError> {
        let _serial = lock(&self.changes);
        {
            let nets = self.nets();
            let net = nets
                .get(network)
                .ok_or_else(|| ControlError::NoNetwork(network.to_string()))?;
            if net.ports.contains_key(req.name.as_str()) {
                return Err(ControlError::Conflict(format!(
                    "port {:?} already exists on {network:?}",
                    req.name
                )));
            }
        }
        if req.kind != PortKind::Tap && req.ifname.is_some() {
            return Err(ControlError::invalid("ifname is for TAP ports only"));
        }
        if self.mode_of(network)? == NetworkMode::Kernel {
            if req.mac.is_some() || req.learn_mac_once {
                return Err(ControlError::invalid(
                    "a kernel-mode port gets a stable MAC that its bridge rules hold it to; mac and learn_mac_once are for userspace ports",
                ));
            }
            return self.add_kernel_port(network, req);
        }
        if !req.tap_settings().is_default() {
            return Err(ControlError::invalid(
                "owner, multi_queue and vnet_hdr are for kernel-mode TAP ports (the switch opens userspace ones)",
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
                PortKind::Socketpair => return Err(ControlError::invalid(
                    "a socketpair port hands its VM end over the API connection: POST /v1/networks/{name}/socketpairs \
                     with `Upgrade: vmfabric-fd` (the CLI: vmfabric port add NET NAME --kind socketpair -- CMD {fd})",
                )),
            };
        match req.kind {
            PortKind::Unixgram => {
                crate::model::check_socket_path(std::path::Path::new(&path))?;
                crate::model::check_socket_path(&self.guest_socket(network, &req.name))?;
            }
            PortKind::Stream => crate::model::check_socket_path(std::path::Path::new(&path))?,
            PortKind::Tap => {
                crate::model::check_ifname("interface", &path)?;
                // A device that exists belongs to someone else (the switch makes its
                // TAPs and they go with it): never attach to it.
                if std::path::Path::new("/sys/class/net").join(&path).exists() {
                    return Err(ControlError::conflict(format!(
                        "interface {path:?} exists; a userspace TAP port makes its own device (pick another ifname)"
                    )));
                }
            }
            PortKind::Socketpair => {}
        }
        let (mac, learn_mac_once) = choose_mac(network, &req.name, req.mac.as_deref(), req.learn_mac_once, |m| {
            self.mac_taken(network, m)
        })?;
        let rec = PortRecord {
            network: network.to_string(),
            name: req.name.to_string(),
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
            failed: None,
        })
    }

    /// A port of a kernel network: a persistent TAP device on its bridge with a stable
    /// MAC, an address from the pool held for it by a reservation (a reservation by the
    /// port's name wins), and the bridge-family rules that keep it to both.
    fn add_kernel_port(&self, network: &str, req: PortSpec) -> Result<PortView, ControlError> {
        if req.kind != PortKind::Tap {
            return Err(ControlError::invalid(
                "a kernel-mode network takes TAP ports (the VMM opens the device by name)",
            ));
        }
        let (taken, subnet) = {
            let nets = self.nets();
            let net = nets
                .get(network)
                .ok_or_else(|| ControlError::NoNetwork(network.to_string()))?;
            let taken: std::collections::HashSet<Mac> = net.ports.values().map(|(_, p)| p.mac).collect();
            (taken, net.record.subnet)
        };
        let mac = hostnet::mac::stable_mac(network, &req.name, &taken);
        let ifname = req
            .ifname
            .clone()
            .unwrap_or_else(|| crate::kernel::tap_name(&self.instance, network, &req.name));
        crate::model::check_ifname("interface", &ifname)?;
        let reservations = self.store.reservations(network)?;
        let by_name = reservations
            .iter()
            .find(|(k, _)| k.as_str() == req.name.as_str())
            .map(|(_, ip)| *ip);
        let base = u32::from(subnet.network());
        let used: std::collections::HashSet<std::net::Ipv4Addr> = reservations
            .iter()
            .filter(|(k, _)| k.as_str() != req.name.as_str())
            .map(|(_, ip)| *ip)
            .chain(self.leases(network)?.into_iter().filter(|l| l.mac != mac).map(|l| l.ip))
            .chain([std::net::Ipv4Addr::from(base + 2)])
            .collect();
        let pool = hostnet::ipam::Pool {
            subnet,
            gateway: std::net::Ipv4Addr::from(base + 1),
        };
        let ip = pool.assign(&used, &Default::default(), by_name)?;
        let rec = PortRecord {
            network: network.to_string(),
            name: req.name.to_string(),
            kind: PortKind::Tap,
            path: ifname,
            mac,
            learn_mac_once: false,
            tap: req.tap_settings(),
        };
        let key = mac.to_string();
        self.reserve_unserialised(network, ReservationSpec { key: key.clone(), ip })?;
        let stored = self
            .bring_up_port(rec.clone())
            .and_then(|_| self.store.put_port(&rec).map_err(ControlError::from));
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
            failed: None,
        })
    }

    pub fn remove_port(&self, network: &str, name: &str) -> Result<(), ControlError> {
        let _serial = lock(&self.changes);
        self.remove_port_unserialised(network, name)
    }

    /// Points a unixgram port at its VMM's socket path (for a VM adopted after a
    /// restart, which may have nothing to send for a while).
    pub fn set_port_peer(&self, network: &str, name: &str, peer: &std::path::Path) -> Result<(), ControlError> {
        let id = {
            let nets = self.nets();
            let net = nets
                .get(network)
                .ok_or_else(|| ControlError::NoNetwork(network.to_string()))?;
            net.ports
                .get(name)
                .map(|(id, _)| *id)
                .ok_or_else(|| ControlError::no_port(network, name))?
        };
        self.switch.set_unixgram_peer(id, peer)?;
        Ok(())
    }

    fn guest_socket(&self, network: &str, port: &str) -> PathBuf {
        guest_socket(&self.run_dir, network, port)
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    fn remove_port_unserialised(&self, network: &str, name: &str) -> Result<(), ControlError> {
        let key = (network.to_string(), name.to_string());
        if lock(&self.failed).ports.contains_key(&key) {
            // Never came back at start: only its row remains.
            self.store.delete_port(network, name)?;
            lock(&self.failed).ports.remove(&key);
            return Ok(());
        }
        let (id, rec) = {
            let mut nets = self.nets();
            let net = nets
                .get_mut(network)
                .ok_or_else(|| ControlError::NoNetwork(network.to_string()))?;
            net.ports
                .remove(name)
                .ok_or_else(|| ControlError::no_port(network, name))?
        };
        self.store.delete_port(network, name)?;
        if self.mode_of(network)? == NetworkMode::Kernel {
            crate::kernel::remove(vec![rec.path.clone()])?;
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
    fn lock_from_birth(&self, rec: &PortRecord, id: PortId) -> Result<(), ControlError> {
        let mac = (!rec.learn_mac_once).then_some(rec.mac);
        lock(&self.locker)
            .register_port(&rec.network, id, mac)
            .map_err(|e| match e {
                fabric::FabricError::InvalidConfig(msg) => ControlError::Conflict(msg),
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
                known.insert(crate::kernel::uplink_name(&self.instance, n.record.name.as_str()));
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
            // Before tables were per instance they were all called `vmfabric`: a table
            // of that name holds an older daemon's rules for devices now gone.
            if let Err(e) = hostnet::nft::remove(hostnet::nft::LEGACY_TABLE) {
                tracing::warn!("cannot remove the old shared nftables table: {e}");
            }
            if let Err(e) = self.apply_kernel_rules() {
                tracing::warn!("cannot write the nftables tables: {e}");
            }
        }
    }

    /// This instance's nftables tables (both families share the name).
    fn nft_table(&self) -> String {
        hostnet::nft::table_name(&self.instance)
    }

    fn mode_of(&self, network: &str) -> Result<NetworkMode, ControlError> {
        self.nets()
            .get(network)
            .map(|n| n.record.mode)
            .ok_or_else(|| ControlError::NoNetwork(network.to_string()))
    }

    /// Writes vmfabric's nftables tables for every kernel network: masquerade, no
    /// traffic between networks, each port held to its MAC and reserved address.
    fn apply_kernel_rules(&self) -> Result<(), ControlError> {
        let rules: Vec<hostnet::nft::NetworkRules> = {
            let nets = self.nets();
            nets.values()
                .filter(|n| n.record.mode == NetworkMode::Kernel)
                .map(|n| {
                    // One query per network: each port's reservation (keyed by MAC).
                    let reserved = self.store.reservations(n.record.name.as_str()).unwrap_or_default();
                    let policy = self.policy_of(n.record.name.as_str()).unwrap_or_default();
                    hostnet::nft::NetworkRules {
                        bridge: crate::kernel::bridge_name(&self.instance, &n.record),
                        subnet: n.record.subnet,
                        router: crate::kernel::router_of(&n.record),
                        egress: kernel_egress(&policy),
                        ipv6: false,
                        forwards: self.kernel_forwards(n.record.name.as_str()).unwrap_or_default(),
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
        if let Ok(counts) = hostnet::nft::counters(&self.nft_table()) {
            let mut kept = lock(&self.kernel_denied);
            for (name, n) in counts {
                *kept.entry(name).or_default() += n;
            }
        }
        let result = if rules.is_empty() {
            hostnet::nft::remove(&self.nft_table())
        } else {
            hostnet::nft::apply(&self.nft_table(), &rules)
        };
        Ok(result?)
    }

    /// The egress policy stored for a network (the default when none was set).
    fn policy_of(&self, network: &str) -> Result<gateway::policy::EgressPolicy, ControlError> {
        match self.store.policy(network)? {
            Some(json) => Ok(serde_json::from_str::<PolicySpec>(&json)
                .map_err(|e| ControlError::Host(format!("stored policy of {network:?}: {e}")))?
                .to_gateway()),
            None => Ok(Default::default()),
        }
    }

    /// A kernel network's refusals so far: (egress, input), from its nftables counters.
    /// `now` is what the counters hold at present ([`hostnet::nft::counters`]).
    fn kernel_refusals(&self, rec: &NetworkSpec, now: &[(String, u64)]) -> (u64, u64) {
        let bridge = crate::kernel::bridge_name(&self.instance, rec);
        let kept = lock(&self.kernel_denied);
        let total = |chain: &str| {
            let name = hostnet::nft::counter_name(chain, &bridge);
            kept.get(&name).copied().unwrap_or(0) + now.iter().find(|(n, _)| *n == name).map_or(0, |(_, c)| *c)
        };
        (total("egress"), total("input"))
    }

    pub fn ports(&self, network: &str) -> Result<Vec<PortView>, ControlError> {
        let nets = self.nets();
        let net = nets
            .get(network)
            .ok_or_else(|| ControlError::NoNetwork(network.to_string()))?;
        let mut v: Vec<PortView> = net
            .ports
            .values()
            .map(|(id, rec)| PortView {
                record: rec.clone(),
                up: self.switch.is_port_up(*id).unwrap_or(false),
                qemu_args: qemu_args(rec, &self.run_dir),
                failed: None,
            })
            .collect();
        let failed = lock(&self.failed);
        v.extend(failed.ports.iter().filter_map(|((n, _), (rec, why))| {
            let rec = rec.clone().filter(|_| n == network)?;
            Some(PortView {
                up: false,
                qemu_args: qemu_args(&rec, &self.run_dir),
                record: rec,
                failed: Some(why.clone()),
            })
        }));
        v.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(v)
    }

    fn gateway_of(&self, network: &str) -> Result<Arc<Gateway>, ControlError> {
        let nets = self.nets();
        let net = nets
            .get(network)
            .ok_or_else(|| ControlError::NoNetwork(network.to_string()))?;
        net.gateway
            .clone()
            .ok_or_else(|| ControlError::invalid(format!("network {network:?} has no gateway (no DHCP)")))
    }

    pub fn reservations(&self, network: &str) -> Result<Vec<ReservationSpec>, ControlError> {
        self.gateway_of(network)?;
        let v = self.store.reservations(network)?;
        Ok(v.into_iter().map(|(key, ip)| ReservationSpec { key, ip }).collect())
    }

    /// Adds or replaces a reservation; it applies to the next DHCP exchange.
    pub fn reserve(&self, network: &str, r: ReservationSpec) -> Result<ReservationSpec, ControlError> {
        let _serial = lock(&self.changes);
        self.reserve_unserialised(network, r)
    }

    fn reserve_unserialised(&self, network: &str, r: ReservationSpec) -> Result<ReservationSpec, ControlError> {
        let gw = self.gateway_of(network)?;
        let mut all = self.reservations(network)?;
        if let Some(other) = all.iter().find(|o| o.ip == r.ip && o.key != r.key) {
            return Err(ControlError::Conflict(format!(
                "{} is already reserved for {}",
                r.ip, other.key
            )));
        }
        all.retain(|o| o.key != r.key);
        all.push(r.clone());
        gw.set_reservations(all.iter().map(ReservationSpec::to_gateway).collect())
            .map_err(|e| ControlError::invalid(e.to_string()))?;
        self.store.put_reservation(network, &r.key, r.ip)?;
        Ok(r)
    }

    pub fn unreserve(&self, network: &str, key: &str) -> Result<(), ControlError> {
        let _serial = lock(&self.changes);
        self.unreserve_unserialised(network, key)
    }

    fn unreserve_unserialised(&self, network: &str, key: &str) -> Result<(), ControlError> {
        let gw = self.gateway_of(network)?;
        if !self.store.delete_reservation(network, key)? {
            return Err(ControlError::NotFound(format!(
                "no reservation for {key:?} on {network:?}"
            )));
        }
        let rest = self.reservations(network)?;
        gw.set_reservations(rest.iter().map(ReservationSpec::to_gateway).collect())
            .map_err(|e| ControlError::Host(e.to_string()))?;
        Ok(())
    }

    /// Adds a socketpair port and returns its VM end, for handing to the client.
    pub fn add_socketpair_port(
        &self,
        network: &str,
        name: &Name,
        mac: Option<&str>,
        learn_mac_once: bool,
    ) -> Result<(PortView, std::os::fd::OwnedFd), ControlError> {
        let _serial = lock(&self.changes);
        let name = name.as_str();
        let (mac, learn_mac_once) = choose_mac(network, name, mac, learn_mac_once, |m| self.mac_taken(network, m))?;
        {
            let nets = self.nets();
            let net = nets
                .get(network)
                .ok_or_else(|| ControlError::NoNetwork(network.to_string()))?;
            if net.ports.contains_key(name) {
                return Err(ControlError::Conflict(format!(
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
            failed: None,
        };
        Ok((view, vm_end))
    }

    /// Starts a live capture of a network, or of one of its ports.
    pub fn capture(&self, network: &str, port: Option<&str>) -> Result<fabric::Capture, ControlError> {
        let port_id = {
            let nets = self.nets();
            let net = nets
                .get(network)
                .ok_or_else(|| ControlError::NoNetwork(network.to_string()))?;
            match port {
                Some(p) => Some(net.ports.get(p).ok_or_else(|| ControlError::no_port(network, p))?.0),
                None => None,
            }
        };
        // A few thousand frames of slack; a reader slower than that loses copies.
        Ok(self.switch.capture(network, port_id, 4096)?)
    }

    /// The NAT flows the network's gateway carries now.
    pub fn flows(&self, network: &str) -> Result<FlowsView, ControlError> {
        let gw = self.gateway_of(network)?;
        let mut tcp: Vec<TcpFlowView> = gw
            .tcp_flows()
            .into_iter()
            .map(|f| TcpFlowView {
                guest: f.guest,
                peer: f.peer,
                direction: match f.direction {
                    gateway::tcp_nat::Direction::Egress => crate::model::Direction::Egress,
                    gateway::tcp_nat::Direction::Forward => crate::model::Direction::Forward,
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

    pub fn leases(&self, network: &str) -> Result<Vec<LeaseView>, ControlError> {
        let nets = self.nets();
        let net = nets
            .get(network)
            .ok_or_else(|| ControlError::NoNetwork(network.to_string()))?;
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
            hostnet::nft::counters(&self.nft_table()).unwrap_or_default()
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
        // Forward listeners run on threads of their own: close them (the store keeps
        // the forwards for the next start).
        let gateways: Vec<Arc<Gateway>> = self.nets().values().filter_map(|n| n.gateway.clone()).collect();
        for gw in gateways {
            for f in gw.forwards() {
                gw.remove_forward(f.id);
            }
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

impl Daemon {
    pub fn policy(&self, network: &str) -> Result<PolicySpec, ControlError> {
        self.gateway_of(network)?;
        match self.store.policy(network)? {
            Some(json) => serde_json::from_str(&json).map_err(|e| ControlError::Host(e.to_string())),
            None => Ok(PolicySpec::default()),
        }
    }

    pub fn set_policy(&self, network: &str, p: PolicySpec) -> Result<PolicySpec, ControlError> {
        let _serial = lock(&self.changes);
        let gw = self.gateway_of(network)?;
        let policy = p.to_gateway();
        let json = serde_json::to_string(&p).map_err(|e| ControlError::Host(e.to_string()))?;
        self.store.put_policy(network, &json)?;
        gw.set_egress_policy(policy);
        if self.mode_of(network)? == NetworkMode::Kernel {
            // The guests' traffic bypasses the gateway here: the kernel enforces it.
            self.apply_kernel_rules()?;
        }
        Ok(p)
    }

    pub fn forwards(&self, network: &str) -> Result<Vec<ForwardSpec>, ControlError> {
        if self.mode_of(network)? == NetworkMode::Kernel {
            return self.stored_forwards(network);
        }
        let gw = self.gateway_of(network)?;
        Ok(gw
            .forwards()
            .into_iter()
            .map(|f| ForwardSpec {
                proto: ForwardProto::from_gateway(f.protocol),
                host: f.host,
                guest: f.guest,
            })
            .collect())
    }

    pub fn add_forward(&self, network: &str, f: ForwardSpec) -> Result<ForwardSpec, ControlError> {
        let _serial = lock(&self.changes);
        if self.mode_of(network)? == NetworkMode::Kernel {
            return self.add_kernel_forward(network, f);
        }
        let gw = self.gateway_of(network)?;
        let info = gw
            .add_forward(f.proto.to_gateway(), f.host, f.guest)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AddrInUse => ControlError::conflict(format!("{} is in use", f.host)),
                std::io::ErrorKind::InvalidInput => ControlError::invalid(e.to_string()),
                _ => ControlError::invalid(format!("cannot listen on {}: {e}", f.host)),
            })?;
        let view = ForwardSpec {
            proto: f.proto,
            host: info.host,
            guest: info.guest,
        };
        if let Err(e) = self.store.put_forward(network, &view) {
            gw.remove_forward(info.id);
            return Err(e.into());
        }
        Ok(view)
    }

    /// Removes the forwards from `host`: both protocols unless `proto` names one. A
    /// stored forward that could not be restored (its host port was taken) goes too.
    pub fn remove_forward(&self, network: &str, host: &str, proto: Option<&str>) -> Result<(), ControlError> {
        let _serial = lock(&self.changes);
        let only = proto.map(str::parse::<ForwardProto>).transpose()?;
        let wanted = |f: &ForwardSpec| f.host.to_string() == host && only.is_none_or(|p| p == f.proto);
        let stored: Vec<ForwardSpec> = self.stored_forwards(network)?.into_iter().filter(wanted).collect();
        if self.mode_of(network)? == NetworkMode::Kernel {
            if stored.is_empty() {
                return Err(ControlError::NotFound(format!("no forward from {host} on {network:?}")));
            }
            for f in &stored {
                self.store.delete_forward(host, f.proto)?;
            }
            return self.apply_kernel_rules();
        }
        let gw = self.gateway_of(network)?;
        let live: Vec<_> = gw
            .forwards()
            .into_iter()
            .filter(|f| {
                wanted(&ForwardSpec {
                    proto: ForwardProto::from_gateway(f.protocol),
                    host: f.host,
                    guest: f.guest,
                })
            })
            .collect();
        if live.is_empty() && stored.is_empty() {
            return Err(ControlError::NotFound(format!("no forward from {host} on {network:?}")));
        }
        for f in &stored {
            self.store.delete_forward(host, f.proto)?;
        }
        for f in live {
            gw.remove_forward(f.id);
        }
        Ok(())
    }

    /// A network's forwards as stored; rows that no longer parse are logged and left
    /// out (they stay in the store, and `DELETE` by host still finds nothing to do).
    fn stored_forwards(&self, network: &str) -> Result<Vec<ForwardSpec>, ControlError> {
        Ok(self
            .store
            .forwards(network)?
            .into_iter()
            .filter_map(|row| row.map_err(|bad| tracing::warn!("{bad}")).ok())
            .collect())
    }

    /// A kernel network's forwards in the terms of its nftables rules.
    fn kernel_forwards(&self, network: &str) -> Result<Vec<hostnet::nft::Forward>, ControlError> {
        Ok(self
            .stored_forwards(network)?
            .into_iter()
            .filter_map(|f| match f.host {
                std::net::SocketAddr::V4(host) => Some(hostnet::nft::Forward {
                    proto: f.proto.as_str().to_string(),
                    host,
                    guest: f.guest,
                }),
                std::net::SocketAddr::V6(_) => None,
            })
            .collect())
    }

    /// A forward on a kernel network: DNAT rules (prerouting for outside clients,
    /// output for the host's own, loopback included).
    fn add_kernel_forward(&self, network: &str, f: ForwardSpec) -> Result<ForwardSpec, ControlError> {
        let std::net::SocketAddr::V4(host) = f.host else {
            return Err(ControlError::invalid("kernel-mode forwards listen on IPv4 addresses"));
        };
        if host.port() == 0 {
            return Err(ControlError::invalid(
                "kernel-mode forwards need a host port (nothing listens to pick one)",
            ));
        }
        let subnet = self.network(network)?.spec.subnet;
        if !subnet.contains(f.guest.ip()) {
            return Err(ControlError::invalid(format!("{} is not on {network:?}", f.guest.ip())));
        }
        let names: Vec<String> = self.nets().keys().cloned().collect();
        let taken = names.iter().any(|n| {
            self.stored_forwards(n)
                .unwrap_or_default()
                .iter()
                .any(|o| o.host == f.host && o.proto == f.proto)
        });
        if taken {
            return Err(ControlError::conflict(format!("{} is in use", f.host)));
        }
        self.store.put_forward(network, &f)?;
        if let Err(e) = self.apply_kernel_rules() {
            let _ = self.store.delete_forward(&host.to_string(), f.proto);
            return Err(e);
        }
        Ok(f)
    }

    /// Puts a restored gateway's stored policy and forwards back in force.
    fn restore_gateway_state(&self, network: &str, gw: &Gateway) {
        match self.policy(network) {
            Ok(p) => gw.set_egress_policy(p.to_gateway()),
            Err(e) => tracing::warn!(%network, "stored policy unusable: {e}"),
        }
        if self.mode_of(network).is_ok_and(|m| m == NetworkMode::Kernel) {
            return; // in nftables, written with the other kernel rules
        }
        for f in self.stored_forwards(network).unwrap_or_default() {
            if let Err(e) = gw.add_forward(f.proto.to_gateway(), f.host, f.guest) {
                tracing::error!(%network, host = %f.host, "cannot restore the forward (it stays stored; DELETE removes it): {e}");
            }
        }
    }
}

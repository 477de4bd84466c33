//! This daemon as a node of a cluster: its etcd lease kept alive, its registration,
//! and a loop that makes the node match what etcd says. Cluster networks are brought
//! up and down here as they come and go; each gets a VXLAN tunnel port whose remote
//! members and MACs come from etcd (never flood-and-learn); this node's guests' MACs
//! and membership are published under its lease. The data path never waits for etcd:
//! when etcd is away the tunnels keep what they were last told.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fabric::vxlan::{Remotes, Vtep, VtepCounters};
use fabric::{Mac, PortId, PortLock, Switch};
use gateway::Lease;

use super::{ClusterError, ClusterStore, ClusterView};
use crate::control::Control;
use crate::model::{NetworkMode, NetworkSpec};

/// What VXLAN adds to each frame on the underlay: outer IPv4 (20), UDP (8), VXLAN (8)
/// and the inner Ethernet header (14), which the network's MTU does not count.
pub const VXLAN_OVERHEAD: u16 = 50;

/// How a daemon joins a cluster (`serve --cluster-endpoints ...`).
#[derive(Clone)]
pub struct NodeConfig {
    pub endpoints: Vec<String>,
    /// Where this cluster's keys live in etcd.
    pub prefix: String,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// The address other nodes send this node's VXLAN datagrams to.
    pub underlay: IpAddr,
    pub vxlan_port: u16,
    /// The underlay's MTU: cluster networks' MTU is at most this less [`VXLAN_OVERHEAD`].
    pub underlay_mtu: u16,
    /// How long this node's keys outlive its last keep-alive.
    pub lease_ttl: Duration,
    /// What carries this node's cluster networks: its switch and a userspace VTEP, or
    /// Linux bridges with vxlan devices.
    pub mode: NetworkMode,
    /// TLS to etcd, for `https://` endpoints.
    pub tls: Option<super::ClusterTls>,
    /// The daemon's runtime, where etcd requests run.
    pub runtime: tokio::runtime::Handle,
}

/// A renewal or release waiting to reach etcd.
#[derive(Debug, Clone)]
pub enum WriteBack {
    Hold(Lease),
    Release(Mac),
}

/// The locks of other nodes' guests: each MAC to the addresses it holds now (none
/// before its lease: then only DHCP and ARP probes, which stay on its node anyway).
fn remote_locks(net: &super::ClusterNetwork, me: &str) -> HashMap<Mac, PortLock> {
    let now = super::now_secs();
    let mut locks: HashMap<Mac, PortLock> = net
        .macs
        .iter()
        .filter(|(_, node)| node.as_str() != me)
        .map(|(mac, _)| {
            let lock = PortLock {
                mac: *mac,
                ips: Vec::new(),
                // Functions of the MAC, as a local port's lock has them.
                ips6: crate::control::locks::ipv6_addresses(net.spec.ipv6, *mac),
            };
            (*mac, lock)
        })
        .collect();
    for (ip, holder) in net.addresses.iter().filter(|(_, h)| h.expires > now) {
        if let Some(lock) = locks.get_mut(&holder.mac) {
            lock.ips.push(*ip);
        }
    }
    locks
}

/// Other nodes' guests' names on one network: each one's address and MAC.
type RemoteNames = HashMap<String, (Ipv4Addr, Mac)>;

/// One cluster network's tunnel on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tunnel {
    vni: u32,
    port: PortId,
}

/// The node's link to the cluster, shared by the control plane (which creates and
/// deletes cluster networks and gives their gateways [`super::leases::ClusterLeases`])
/// and the loop that follows etcd.
pub struct ClusterLink {
    pub store: ClusterStore,
    cfg: NodeConfig,
    /// The userspace VTEP; none on a kernel-mode node (its vxlan devices own the port).
    vtep: Option<Vtep>,
    /// Whether etcd answered lately; claims fail at once while it does not.
    healthy: AtomicBool,
    /// This node's etcd lease; 0 while it has none.
    lease: AtomicI64,
    /// The lease this node's keys were last written under: a new lease writes them
    /// all again (the old one's keys go when it expires).
    published: AtomicI64,
    pending: Mutex<HashMap<(String, Ipv4Addr), WriteBack>>,
    tunnels: Mutex<HashMap<String, Tunnel>>,
    /// Other nodes' guests' names this node's gateways answer, by network.
    remote_names: Mutex<HashMap<String, RemoteNames>>,
    wake: tokio::sync::Notify,
    stop: AtomicBool,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long one etcd request may take in the loop before the loop calls etcd away.
const REQUEST_WAIT: Duration = Duration::from_secs(3);

impl ClusterLink {
    /// Connects to etcd and opens the VXLAN socket; the loop starts with [`Self::start`].
    pub fn join(cfg: NodeConfig, switch: Arc<Switch>) -> anyhow::Result<Arc<ClusterLink>> {
        use anyhow::Context;
        let store = cfg
            .runtime
            .block_on(ClusterStore::connect(
                &cfg.endpoints,
                &cfg.prefix,
                &cfg.node,
                REQUEST_WAIT,
                cfg.tls.as_ref(),
            ))
            .with_context(|| format!("connect to etcd at {}", cfg.endpoints.join(",")))?;
        let local = SocketAddr::new(cfg.underlay, cfg.vxlan_port);
        let vtep = match cfg.mode {
            NetworkMode::Userspace => {
                Some(Vtep::start(switch, local, cfg.vxlan_port).with_context(|| format!("VXLAN on {local}"))?)
            }
            NetworkMode::Kernel => {
                anyhow::ensure!(
                    cfg.underlay.is_ipv4(),
                    "a kernel-mode node's vxlan devices need an IPv4 underlay address"
                );
                None
            }
        };
        Ok(Arc::new(ClusterLink {
            store,
            cfg,
            vtep,
            healthy: AtomicBool::new(false),
            lease: AtomicI64::new(0),
            published: AtomicI64::new(0),
            pending: Mutex::new(HashMap::new()),
            tunnels: Mutex::new(HashMap::new()),
            remote_names: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
        }))
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.cfg.runtime
    }

    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_unhealthy(&self) {
        self.healthy.store(false, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// The largest MTU a cluster network may have.
    pub fn max_mtu(&self) -> u16 {
        self.cfg.underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
    }

    /// The userspace VTEP's counters (a kernel-mode node counts in nftables).
    pub fn vtep_counters(&self) -> Option<&VtepCounters> {
        self.vtep.as_ref().map(Vtep::counters)
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Claims `ip` for `mac` in etcd, waiting for the answer (not on a runtime thread).
    pub fn claim(&self, network: &str, ip: Ipv4Addr, mac: Mac, expires: u64) -> Result<super::Claim, ClusterError> {
        self.block_on(self.store.claim_address(network, ip, mac, expires, None))
    }

    /// Gives `ip` up in etcd if `mac` holds it.
    pub fn release(&self, network: &str, ip: Ipv4Addr, mac: Mac) -> Result<(), ClusterError> {
        self.block_on(self.store.release_address(network, ip, mac)).map(|_| ())
    }

    /// The addresses etcd holds for a network's guests, on every node.
    pub fn held_addresses(&self, network: &str) -> Result<HashSet<Ipv4Addr>, ClusterError> {
        self.block_on(self.store.held_addresses(network))
    }

    /// Queues a lease's renewal or release for etcd; the loop writes it.
    pub fn write_back(&self, network: &str, ip: Ipv4Addr, what: WriteBack) {
        locked(&self.pending).insert((network.to_string(), ip), what);
        self.wake.notify_one();
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = Result<T, ClusterError>>) -> Result<T, ClusterError> {
        self.cfg.runtime.block_on(async {
            match tokio::time::timeout(REQUEST_WAIT, f).await {
                Ok(r) => r,
                Err(_) => Err(ClusterError::Timeout(REQUEST_WAIT)),
            }
        })
    }

    /// Stores a new cluster network in etcd; false if the cluster has one of that name.
    pub fn publish_network(&self, spec: &NetworkSpec) -> Result<bool, ClusterError> {
        let r = self.block_on(self.store.create_network(spec));
        self.wake.notify_one();
        r
    }

    /// Sets a cluster network's egress policy in etcd: every node applies it.
    pub fn publish_policy(&self, network: &str, policy: &str) -> Result<bool, ClusterError> {
        let r = self.block_on(self.store.put_policy(network, policy));
        self.wake.notify_one();
        r
    }

    /// Removes a cluster network from etcd: every node takes it down.
    pub fn unpublish_network(&self, name: &str) -> Result<(), ClusterError> {
        let r = self.block_on(self.store.delete_network(name));
        self.wake.notify_one();
        r
    }

    /// Follows etcd on a thread of its own until [`Self::stop`].
    pub fn start(self: &Arc<Self>, control: Weak<Control>) -> std::io::Result<()> {
        let link = self.clone();
        std::thread::Builder::new()
            .name("vmf-cluster".into())
            .spawn(move || link.follow(control))?;
        Ok(())
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    fn follow(self: Arc<Self>, control: Weak<Control>) {
        let mut last_error = String::new();
        while !self.stop.load(Ordering::Relaxed) {
            let Some(control) = control.upgrade() else { return };
            let revision = match self.sync(&control) {
                Ok(rev) => {
                    if !self.healthy.swap(true, Ordering::Relaxed) {
                        tracing::info!(node = %self.cfg.node, "cluster state in sync with etcd");
                    }
                    last_error.clear();
                    Some(rev)
                }
                Err(e) => {
                    self.healthy.store(false, Ordering::Relaxed);
                    let e = e.to_string();
                    if e != last_error {
                        tracing::warn!(node = %self.cfg.node, "etcd: {e}; tunnels keep their last state");
                        last_error = e;
                    }
                    None
                }
            };
            drop(control);
            // Until etcd changes, something here asks for a write, or a while passes
            // (a watch may miss nothing, but a lost connection ends it silently).
            self.cfg.runtime.block_on(async {
                let watch = async {
                    match revision {
                        Some(rev) => {
                            let _ = self.store.changed_since(rev).await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                let pause = if revision.is_some() { 5 } else { 1 };
                tokio::select! {
                    _ = watch => {}
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(pause)) => {}
                }
            });
        }
    }

    /// The lease this node's keys live under, granted anew (and kept alive) if lost.
    fn ensure_lease(self: &Arc<Self>) -> Result<i64, ClusterError> {
        let lease = self.lease.load(Ordering::Relaxed);
        if lease != 0 {
            return Ok(lease);
        }
        let lease = self.block_on(self.store.grant_lease(self.cfg.lease_ttl))?;
        self.lease.store(lease, Ordering::Relaxed);
        let link = self.clone();
        self.cfg.runtime.spawn(async move { link.keep_alive(lease).await });
        Ok(lease)
    }

    /// Renews `lease` a few times a TTL until it expires. A failed renewal (the member
    /// it went to died, etcd is away) is tried again while the lease may still live:
    /// a new lease would drop this node's keys for a while when the old one expired.
    async fn keep_alive(self: Arc<Self>, lease: i64) {
        let ttl = self.cfg.lease_ttl;
        let mut renewed = tokio::time::Instant::now();
        let why = loop {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            match tokio::time::timeout(ttl / 3, self.store.renew_lease(lease)).await {
                Ok(Ok(left)) if left > 0 => {
                    renewed = tokio::time::Instant::now();
                    tokio::time::sleep(ttl / 3).await;
                }
                Ok(Ok(_)) => break "expired".to_string(),
                Ok(Err(e)) if renewed.elapsed() > ttl => break e.to_string(),
                Err(_) if renewed.elapsed() > ttl => break "etcd did not answer".to_string(),
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        };
        tracing::warn!(node = %self.cfg.node, "lost the node's etcd lease: {why}");
        let _ = self
            .lease
            .compare_exchange(lease, 0, Ordering::Relaxed, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// One pass: read etcd, make this node match, write what waits. The revision read.
    fn sync(self: &Arc<Self>, control: &Arc<Control>) -> Result<i64, ClusterError> {
        let lease = self.ensure_lease()?;
        // What this node serves, taken before etcd is read: a network created here
        // meanwhile is in etcd before it is served, so it is never taken for one etcd
        // no longer has.
        let local: HashSet<String> = control
            .cluster_networks()
            .into_iter()
            .map(|s| s.name.to_string())
            .collect();
        let view = self.block_on(self.store.view())?;
        let republish = self.published.load(Ordering::Relaxed) != lease;
        if republish || view.nodes.get(&self.cfg.node) != Some(&self.cfg.underlay) {
            self.block_on(self.store.register(self.cfg.underlay, lease))?;
        }
        self.follow_networks(control, &view, &local, lease, republish)?;
        self.published.store(lease, Ordering::Relaxed);
        self.flush_write_backs()?;
        Ok(view.revision)
    }

    fn follow_networks(
        &self,
        control: &Arc<Control>,
        view: &ClusterView,
        local: &HashSet<String>,
        lease: i64,
        republish: bool,
    ) -> Result<(), ClusterError> {
        let me = self.cfg.node.as_str();
        for (name, net) in &view.networks {
            if !local.contains(name) {
                match control.adopt_cluster_network(net.spec.clone()) {
                    Ok(()) => tracing::info!(network = %name, "serving the cluster network"),
                    Err(e) => tracing::warn!(network = %name, "cannot serve the cluster network: {e}"),
                }
            }
        }
        for name in local.iter().filter(|n| !view.networks.contains_key(*n)) {
            self.close_tunnel(name);
            match control.drop_cluster_network(name) {
                Ok(()) => tracing::info!(network = %name, "the cluster network is gone"),
                Err(e) => tracing::warn!(network = %name, "cannot take the cluster network down: {e}"),
            }
        }
        let live_ip = |node: &String| view.nodes.get(node).copied().filter(|_| node != me);
        for (name, net) in &view.networks {
            let Some(gateway_mac) = control.cluster_network_parts(name) else {
                continue;
            };
            let vni = net.spec.vni.unwrap_or_else(|| NetworkSpec::derived_vni(name));
            let remotes = Remotes {
                members: net.members.iter().filter_map(live_ip).collect(),
                macs: net
                    .macs
                    .iter()
                    .filter_map(|(mac, node)| Some((*mac, live_ip(node)?)))
                    .collect(),
                local_everywhere: gateway_mac.into_iter().collect(),
                locks: remote_locks(net, me),
            };
            match &self.vtep {
                Some(vtep) => self.open_tunnel(vtep, control, name, vni, remotes),
                None => {
                    let nodes: Vec<IpAddr> = view.nodes.keys().filter_map(live_ip).collect();
                    if let Err(e) = control.follow_kernel_tunnel(name, &remotes, &nodes) {
                        tracing::warn!(network = %name, "vxlan device: {e}");
                    }
                }
            }
            if republish || !net.members.contains(me) {
                self.block_on(self.store.join_network(name, lease))?;
            }
            let ours = control.port_macs(name);
            for mac in &ours {
                if republish || net.macs.get(mac).map(String::as_str) != Some(me) {
                    self.block_on(self.store.publish_mac(name, *mac, lease))?;
                }
            }
            for (mac, _) in net.macs.iter().filter(|(m, n)| n.as_str() == me && !ours.contains(m)) {
                self.block_on(self.store.withdraw_mac(name, *mac))?;
            }
            if let Some(policy) = &net.policy {
                if let Err(e) = control.follow_cluster_policy(name, policy) {
                    tracing::warn!(network = %name, "the cluster's egress policy: {e}");
                }
            }
            let now = super::now_secs();
            let names = net
                .addresses
                .iter()
                .filter(|(_, h)| h.node != me && h.expires > now)
                .filter_map(|(ip, h)| Some((h.name.clone()?, (*ip, h.mac))))
                .collect();
            self.follow_names(control, name, names);
        }
        locked(&self.remote_names).retain(|net, _| view.networks.contains_key(net));
        Ok(())
    }

    /// Makes the network's gateway answer exactly `names` for other nodes' guests.
    fn follow_names(&self, control: &Arc<Control>, network: &str, names: RemoteNames) {
        let mut all = locked(&self.remote_names);
        let known = all.entry(network.to_string()).or_default();
        for (label, (ip, mac)) in known.iter().filter(|(l, held)| names.get(*l) != Some(*held)) {
            control.name_remote_guest(network, label, *ip, *mac, false);
        }
        for (label, (ip, mac)) in names.iter().filter(|(l, held)| known.get(*l) != Some(*held)) {
            control.name_remote_guest(network, label, *ip, *mac, true);
        }
        *known = names;
    }

    /// Makes sure `network` is tunnelled as `vni` to `remotes`.
    fn open_tunnel(&self, vtep: &Vtep, control: &Arc<Control>, network: &str, vni: u32, remotes: Remotes) {
        let mut tunnels = locked(&self.tunnels);
        if let Some(t) = tunnels.get(network) {
            if t.vni == vni {
                if let Err(e) = vtep.set_remotes(vni, remotes) {
                    tracing::warn!(%network, "tunnel: {e}");
                }
                return;
            }
            let _ = vtep.detach(t.vni);
            tunnels.remove(network);
        }
        match vtep.attach(network, "vxlan", vni, remotes) {
            Ok(port) => {
                if let Err(e) = control.open_tunnel_port(network, port) {
                    tracing::warn!(%network, "tunnel port: {e}");
                    let _ = vtep.detach(vni);
                    return;
                }
                tracing::info!(%network, vni, "tunnel open");
                tunnels.insert(network.to_string(), Tunnel { vni, port });
            }
            Err(e) => tracing::warn!(%network, vni, "cannot open the tunnel: {e}"),
        }
    }

    fn close_tunnel(&self, network: &str) {
        if let (Some(t), Some(vtep)) = (locked(&self.tunnels).remove(network), &self.vtep) {
            let _ = vtep.detach(t.vni);
        }
    }

    /// Writes queued renewals and releases; what fails stays queued.
    fn flush_write_backs(&self) -> Result<(), ClusterError> {
        let queued: Vec<_> = locked(&self.pending).drain().collect();
        let mut failed = None;
        for ((network, ip), what) in queued {
            let done = match &what {
                WriteBack::Hold(l) => self
                    .block_on(self.store.claim_address(&network, ip, l.mac, l.expires, l.hostname.as_deref()))
                    .map(|claim| {
                        if let super::Claim::TakenBy(other) = claim {
                            tracing::warn!(%network, %ip, mac = %l.mac, %other, "a lease renewed here is held by another MAC in etcd");
                        }
                    }),
                WriteBack::Release(mac) => self.block_on(self.store.release_address(&network, ip, *mac)).map(|_| ()),
            };
            if let Err(e) = done {
                // Newer news for the address wins over this.
                locked(&self.pending).entry((network, ip)).or_insert(what);
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

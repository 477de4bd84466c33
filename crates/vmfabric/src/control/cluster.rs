//! Cluster networks in the control plane: the checks and steps a network of scope
//! `cluster` adds to a host's own, and what the node's etcd loop
//! ([`crate::cluster::node`]) asks of the control plane.

use std::collections::HashSet;
use std::sync::Arc;

use fabric::{Mac, PortId};
use gateway::LeaseStore;

use super::error::ControlError;
use super::state::State;
use super::Control;
use crate::cluster::leases::ClusterLeases;
use crate::cluster::node::ClusterLink;
use crate::model::{NetworkMode, NetworkSpec, Scope};

impl Control {
    /// Makes this daemon a node of a cluster: before networks are restored, so a
    /// restored cluster network's gateway claims through etcd from the start.
    pub(super) fn join_cluster(&self, link: Arc<ClusterLink>) {
        let _ = self.cluster.set(link);
    }

    pub fn cluster(&self) -> Option<&Arc<ClusterLink>> {
        self.cluster.get()
    }

    fn link(&self, spec: &NetworkSpec) -> Result<Option<&Arc<ClusterLink>>, ControlError> {
        match (spec.scope, self.cluster.get()) {
            (Scope::Host, _) => Ok(None),
            (Scope::Cluster, Some(link)) => Ok(Some(link)),
            (Scope::Cluster, None) => Err(ControlError::invalid(
                "scope cluster needs a daemon in a cluster (vmfabric serve --cluster-endpoints URL --node NAME --underlay ADDR)",
            )),
        }
    }

    /// What a cluster network may not be (yet), and its VXLAN numbers.
    pub(super) fn check_scope(&self, st: &State, spec: &NetworkSpec) -> Result<(), ControlError> {
        let Some(link) = self.link(spec)? else {
            return match spec.vni {
                Some(_) => Err(ControlError::invalid("vni is for networks of scope cluster")),
                None => Ok(()),
            };
        };
        if spec.mode != link.config().mode {
            return Err(ControlError::invalid(format!(
                "this node serves cluster networks in mode {} (vmfabric serve --cluster-mode)",
                link.config().mode.as_str()
            )));
        }
        if let Some(vni) = spec.vni.filter(|v| !(1..=fabric::vxlan::MAX_VNI).contains(v)) {
            return Err(ControlError::invalid(format!("vni {vni}: 1 to 16777215")));
        }
        if spec.mtu.get() > link.max_mtu() {
            return Err(ControlError::invalid(format!(
                "MTU {} does not fit the underlay: VXLAN adds {} bytes to an underlay MTU of {}, so at most {}",
                spec.mtu.get(),
                crate::cluster::node::VXLAN_OVERHEAD,
                link.max_mtu() + crate::cluster::node::VXLAN_OVERHEAD,
                link.max_mtu()
            )));
        }
        if let Some(other) = st
            .nets
            .values()
            .find(|n| n.spec.scope == Scope::Cluster && n.spec.vni == spec.vni && n.spec.name != spec.name)
        {
            return Err(ControlError::conflict(format!(
                "vni {:?} is network {:?}'s",
                spec.vni,
                other.spec.name.as_str()
            )));
        }
        Ok(())
    }

    /// Stores a new cluster network in etcd (nothing for a host's own).
    pub(super) fn publish_cluster_network(&self, spec: &NetworkSpec) -> Result<(), ControlError> {
        let Some(link) = self.link(spec)? else { return Ok(()) };
        match link.publish_network(spec) {
            Ok(true) => Ok(()),
            Ok(false) => Err(ControlError::conflict(format!(
                "the cluster has a network {:?} already",
                spec.name.as_str()
            ))),
            Err(e) => Err(ControlError::host(format!("etcd: {e}"))),
        }
    }

    /// Stores a cluster network's egress policy in etcd, for every node (nothing for a
    /// host's own network): refused while etcd cannot be reached.
    pub(super) fn publish_cluster_policy(&self, spec: &NetworkSpec, json: &str) -> Result<(), ControlError> {
        let Some(link) = self.link(spec)? else { return Ok(()) };
        match link.publish_policy(&spec.name, json) {
            Ok(true) => Ok(()),
            Ok(false) => Err(ControlError::conflict(format!(
                "the cluster no longer has network {:?}",
                spec.name.as_str()
            ))),
            Err(e) => Err(ControlError::host(format!("etcd: {e}"))),
        }
    }

    /// Claims a cluster network's reservation in etcd, for the MAC it is keyed by: an
    /// address another node's guest holds cannot be reserved here. A reservation keyed
    /// by a name is claimed when its guest binds (the gateway claims every binding).
    pub(super) fn claim_reservation(
        &self,
        spec: &NetworkSpec,
        key: &str,
        ip: std::net::Ipv4Addr,
        ipv6: Option<std::net::Ipv6Addr>,
    ) -> Result<(), ControlError> {
        if ipv6.is_some() && self.link(spec)?.is_some() {
            return Err(ControlError::invalid(
                "a cluster network's reservations are IPv4 only: an IPv6 address is not claimed cluster-wide (a guest's DHCPv6 address is a function of its MAC, the same on every node)",
            ));
        }
        let (Some(link), Ok(mac)) = (self.link(spec)?, key.parse::<Mac>()) else {
            return Ok(());
        };
        match link.claim(&spec.name, ip, mac, u64::MAX) {
            Ok(crate::cluster::Claim::Won | crate::cluster::Claim::Held) => Ok(()),
            Ok(crate::cluster::Claim::TakenBy(other)) => Err(ControlError::conflict(format!(
                "{ip} is held in the cluster by {other}"
            ))),
            Err(e) => Err(ControlError::host(format!("etcd: {e}"))),
        }
    }

    /// Gives a MAC-keyed reservation's address back in etcd (logged if etcd is away:
    /// the address then stays unused, never given twice).
    pub(super) fn release_reservation(&self, spec: &NetworkSpec, key: &str, ip: std::net::Ipv4Addr) {
        let (Ok(Some(link)), Ok(mac)) = (self.link(spec), key.parse::<Mac>()) else {
            return;
        };
        if let Err(e) = link.release(&spec.name, ip, mac) {
            tracing::warn!(network = %spec.name.as_str(), %ip, %mac, "cannot give the reserved address back in etcd: {e}");
        }
    }

    /// Removes a cluster network from etcd: refused while etcd cannot be reached, so
    /// a node never drops a network the others still serve.
    pub(super) fn unpublish_cluster_network(&self, spec: &NetworkSpec) -> Result<(), ControlError> {
        let Some(link) = self.link(spec)? else { return Ok(()) };
        link.unpublish_network(&spec.name)
            .map_err(|e| ControlError::host(format!("etcd: {e}")))
    }

    /// Where a network's gateway keeps its leases: SQLite, and for a cluster network
    /// also claims in etcd.
    pub(super) fn lease_store(&self, spec: &NetworkSpec) -> Result<Box<dyn LeaseStore>, ControlError> {
        let local = self.store.leases_of(&spec.name);
        Ok(match self.link(spec)? {
            Some(link) => Box::new(ClusterLeases::new(link.clone(), &spec.name, local)),
            None => Box::new(local),
        })
    }

    /// The cluster networks this node serves now.
    pub fn cluster_networks(&self) -> Vec<NetworkSpec> {
        let st = self.lock();
        st.nets
            .values()
            .map(|n| &n.spec)
            .chain(st.failed.networks.values().filter_map(|(s, _)| s.as_ref()))
            .filter(|s| s.scope == Scope::Cluster)
            .cloned()
            .collect()
    }

    /// A cluster network's mode is each node's own (`serve --cluster-mode`): a spec
    /// that asks for none (the default, userspace) gets this node's.
    pub(super) fn node_mode(&self, spec: &mut NetworkSpec) {
        if let (Scope::Cluster, Some(link)) = (spec.scope, self.cluster.get()) {
            if spec.mode == NetworkMode::Userspace {
                spec.mode = link.config().mode;
            }
        }
    }

    /// Serves a cluster network etcd has (made on another node, or while this one
    /// was down): as created there, in this node's mode, without asking etcd again.
    pub fn adopt_cluster_network(&self, mut spec: NetworkSpec) -> Result<(), ControlError> {
        if spec.scope != Scope::Cluster {
            return Err(ControlError::invalid("not a cluster network"));
        }
        if let Some(link) = self.cluster.get() {
            spec.mode = link.config().mode;
            // Bridge names and isolation are one node's choices, not the cluster's.
            spec.bridge = None;
        }
        let mut st = self.lock();
        if st.failed.networks.contains_key(spec.name.as_str()) || st.nets.contains_key(spec.name.as_str()) {
            // Served already (created here a moment ago), or stored here but failed
            // to come back (a restart tries again).
            return Ok(());
        }
        // The creating node checked its host routes; this one serves it as it is.
        self.check_network(&st, &spec, true)?;
        self.make_network(&mut st, &spec)
    }

    /// Takes down a cluster network etcd no longer has, with its ports, here only.
    pub fn drop_cluster_network(&self, name: &str) -> Result<(), ControlError> {
        let mut st = self.lock();
        self.forget_network(&mut st, name)
    }

    /// A cluster network served here: `Some(its gateway's MAC, if it has a gateway)`.
    pub fn cluster_network_parts(&self, name: &str) -> Option<Option<Mac>> {
        let st = self.lock();
        let net = st.nets.get(name).filter(|n| n.spec.scope == Scope::Cluster)?;
        Some(net.gateway.as_ref().map(|g| g.config().gateway_mac))
    }

    /// Publishes (or with `add` false, takes back) the DNS name of a guest on another
    /// node, in this node's gateway of the network: its IPv4 address, and on a network
    /// with IPv6 the SLAAC address of its MAC (as a local guest's name has).
    pub fn name_remote_guest(&self, network: &str, label: &str, ip: std::net::Ipv4Addr, mac: Mac, add: bool) {
        let st = self.lock();
        let Some(gw) = st.nets.get(network).and_then(|n| n.gateway.as_ref()) else {
            return;
        };
        if add {
            gw.set_static_name(label, ip, gw.config().slaac_address_of(mac));
        } else {
            gw.remove_static_name(label, ip);
        }
    }

    /// The MACs of a network's ports on this node: each port's own, or for a port
    /// that learns its MAC, the one its VMM sent from (none before its first frame).
    pub fn port_macs(&self, name: &str) -> HashSet<Mac> {
        let st = self.lock();
        let Some(net) = st.nets.get(name) else {
            return HashSet::new();
        };
        let learning: HashSet<PortId> = net
            .ports
            .values()
            .filter(|p| p.rec.learn_mac_once)
            .filter_map(|p| p.handle.switch_port())
            .collect();
        net.ports
            .values()
            .filter(|p| !p.rec.learn_mac_once)
            .map(|p| p.rec.mac)
            .chain(st.locker.macs_of(name, &learning))
            .collect()
    }

    /// Programs a kernel-mode cluster network's VXLAN device for `remotes` (from etcd)
    /// and `nodes` (every other registered node), and its rules when they change.
    pub fn follow_kernel_tunnel(
        &self,
        name: &str,
        remotes: &fabric::vxlan::Remotes,
        nodes: &[std::net::IpAddr],
    ) -> Result<(), ControlError> {
        let mut st = self.lock();
        let tunnel = st
            .nets
            .get_mut(name)
            .and_then(|n| n.backend.kernel_mut())
            .and_then(|k| k.tunnel.as_mut());
        let Some(tunnel) = tunnel else { return Ok(()) };
        if tunnel.follow(remotes, nodes)? {
            super::kernel_rules::apply_rules(&self.env(), &mut st)?;
        }
        Ok(())
    }

    /// Lets a network's tunnel port carry frames: never locked to one MAC (the VTEP
    /// holds remote MACs to their nodes), not trusted (remote gateways' DHCP and RAs
    /// stay out).
    pub fn open_tunnel_port(&self, name: &str, port: PortId) -> Result<(), ControlError> {
        let mut st = self.lock();
        st.net(name)?;
        st.locker.exempt(port);
        self.switch.set_port_trusted(port, false)?;
        Ok(())
    }
}

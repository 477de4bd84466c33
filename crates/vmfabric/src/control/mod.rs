//! The control plane: one `Control` owns every network, port, forward and policy,
//! under one lock. Each change follows the same steps: check (pure, nothing made),
//! make (the backend's effect), persist (or undo the effect), commit to the state.
//! Deletes persist first: once the store forgot an object, taking it down cannot be
//! refused. The user/kernel difference lives in [`backend`] alone.

pub mod error;
pub mod locks;
pub mod vms;

mod backend;
mod cluster;
mod env;
mod events;
mod kernel_net;
mod kernel_rules;
pub mod metrics;
pub mod privileges;
mod restore;
mod sandbox;
mod services;
mod state;
mod stats;
mod user_net;

use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use fabric::{NetworkConfig, Switch};
use gateway::{Gateway, GatewayConfig};

use backend::Backend;
use env::{Env, PortHandle};
use error::ControlError;
use locks::ControlEvent;
use state::{NetState, PortState, State};

use crate::model::{GatewaySettings, Name, NetworkSpec, NetworkView, PortSpec, PortView};
use crate::store::{PortKind, PortRecord, Store};

pub use services::{CaptureHandle, MAX_CAPTURES};
pub use user_net::choose_mac;

pub struct Control {
    switch: Arc<Switch>,
    store: Arc<Store>,
    /// Where the gateways run (confined threads: see `sandbox/`).
    gateways: sandbox::GatewayRuntime,
    run_dir: PathBuf,
    /// Scopes this daemon's kernel devices and tables (see `kernel::instance_of`).
    instance: String,
    state: Arc<Mutex<State>>,
    /// Into the events thread (lease events from the gateways).
    events: mpsc::Sender<ControlEvent>,
    /// Out to `GET /v1/events`.
    bus: events::EventBus,
    vms: Arc<vms::Vms>,
    /// Set when the daemon is a node of a cluster (before any network is restored).
    cluster: std::sync::OnceLock<Arc<crate::cluster::node::ClusterLink>>,
    /// Held for the daemon's life: one instance per state directory.
    _state_lock: std::fs::File,
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

impl Control {
    fn env(&self) -> Env<'_> {
        Env {
            switch: &self.switch,
            store: &self.store,
            run_dir: &self.run_dir,
            instance: &self.instance,
            cluster: self.cluster.get(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn switch(&self) -> &Switch {
        &self.switch
    }

    pub fn vms(&self) -> &vms::Vms {
        &self.vms
    }

    /// Checks a new network against the rules and the others; nothing is made.
    fn check_network(&self, st: &State, spec: &NetworkSpec, force: bool) -> Result<(), ControlError> {
        valid_subnet(spec.subnet)?;
        if let Some((route, iface)) = crate::hostroutes::overlapping(spec.subnet).filter(|_| !force) {
            return Err(ControlError::conflict(format!(
                "subnet {} overlaps the host route {route} on {iface}; pick another subnet or create with force (`--force`; force=true in the API)",
                spec.subnet
            )));
        }
        if st.network_exists(&spec.name) {
            return Err(ControlError::conflict(format!(
                "network {:?} already exists",
                spec.name.as_str()
            )));
        }
        if let Some(other) = st
            .nets
            .values()
            .find(|n| n.spec.subnet.contains(&spec.subnet.network()) || spec.subnet.contains(&n.spec.subnet.network()))
        {
            return Err(ControlError::conflict(format!(
                "subnet {} overlaps network {:?} ({})",
                spec.subnet,
                other.spec.name.as_str(),
                other.spec.subnet
            )));
        }
        if let Some(prefix) = spec.ipv6 {
            gateway::config::validate_ipv6_prefix(prefix).map_err(ControlError::invalid)?;
            if let Some(other) = st.nets.values().find(|n| n.spec.ipv6 == Some(prefix)) {
                return Err(ControlError::conflict(format!(
                    "IPv6 prefix {prefix} is network {:?}'s",
                    other.spec.name.as_str()
                )));
            }
            if spec.mtu.get() < 1280 {
                return Err(ControlError::invalid(format!(
                    "MTU {} is below IPv6's minimum of 1280",
                    spec.mtu.get()
                )));
            }
        }
        Backend::check_network(spec)?;
        if spec.gateway {
            gateway_config(spec, &self.instance)?;
        }
        self.check_scope(st, spec)?;
        Ok(())
    }

    /// Creates a network. A subnet that overlaps a host route is refused unless `force`:
    /// VMs on it would shadow the host's real neighbours. No subnet (0.0.0.0/0, what a
    /// body without one reads as): the first free private /24.
    pub fn create_network(&self, mut spec: NetworkSpec, force: bool) -> Result<NetworkSpec, ControlError> {
        let mut st = self.lock();
        if spec.ipv6 == Some(ipnet::Ipv6Net::default()) {
            spec.ipv6 = Some(GatewayConfig::derived_ipv6_prefix(&spec.name));
        }
        if spec.subnet == ipnet::Ipv4Net::default() {
            let taken: Vec<ipnet::Ipv4Net> = st.nets.values().map(|n| n.spec.subnet).collect();
            spec.subnet = crate::hostroutes::free_subnet(&taken).ok_or_else(|| {
                ControlError::conflict("no free private /24 is left (10.77-254.0.0, 192.168.100-254.0); name a subnet")
            })?;
        }
        if spec.scope == crate::model::Scope::Cluster {
            spec.vni = Some(spec.vni.unwrap_or_else(|| NetworkSpec::derived_vni(&spec.name)));
            self.node_mode(&mut spec);
        }
        self.check_network(&st, &spec, force)?;
        // The cluster first: a name taken there is not this node's to take.
        self.publish_cluster_network(&spec)?;
        if let Err(e) = self.make_network(&mut st, &spec) {
            let _ = self.unpublish_cluster_network(&spec);
            return Err(e);
        }
        Ok(spec)
    }

    /// Brings a checked network up and stores it; taken down again if the store
    /// refuses it.
    fn make_network(&self, st: &mut State, spec: &NetworkSpec) -> Result<(), ControlError> {
        self.bring_up_network(st, spec.clone())?;
        if let Err(e) = self.store.put_network(spec) {
            self.tear_down_network(st, &spec.name);
            return Err(e.into());
        }
        Ok(())
    }

    /// The store forgets a network, its ports, leases and forwards in one transaction;
    /// then everything it had here (if it came up at all) is taken down.
    fn forget_network(&self, st: &mut State, name: &str) -> Result<(), ControlError> {
        self.store.delete_network(name)?;
        st.failed.networks.remove(name);
        st.failed.ports.retain(|(net, _), _| net != name);
        self.tear_down_network(st, name);
        Ok(())
    }

    /// Makes a network's switch network, backend and gateway, undoing what was made
    /// when a later step fails, and commits it to the state.
    fn bring_up_network(&self, st: &mut State, spec: NetworkSpec) -> Result<(), ControlError> {
        let cfg = NetworkConfig {
            mtu: usize::from(spec.mtu.get()),
            ipv6: spec.ipv6.is_some(),
            ..NetworkConfig::default()
        };
        // Everything is checked before the first device is made.
        cfg.validate()?;
        valid_subnet(spec.subnet)?;
        let env = self.env();
        let mut backend = Backend::prepare(&env, &spec)?;
        if let Err(e) = self.switch.add_network(&spec.name, cfg) {
            let _ = backend.tear_down(&env, &spec);
            return Err(e.into());
        }
        let gateway = match self.attach_gateway(st, &spec) {
            Ok(gw) => gw,
            Err(e) => {
                let _ = self.switch.remove_network(&spec.name);
                let _ = backend.tear_down(&env, &spec);
                return Err(e);
            }
        };
        if let Err(e) = backend.attach(&env, &spec) {
            if let Some(gw) = &gateway {
                let _ = self.switch.remove_port(gw.port());
            }
            let _ = self.switch.remove_network(&spec.name);
            let _ = backend.tear_down(&env, &spec);
            return Err(e);
        }
        let name = spec.name.to_string();
        let kernel = backend.is_kernel();
        st.nets.insert(
            name.clone(),
            NetState {
                spec,
                gateway: gateway.clone(),
                backend,
                ports: Default::default(),
            },
        );
        if kernel {
            if let Err(e) = kernel_rules::apply_rules(&env, st) {
                self.tear_down_network(st, &name);
                return Err(e);
            }
        }
        share_subnets(st);
        if let Some(gw) = gateway {
            self.restore_gateway_state(st, &name, &gw);
        }
        Ok(())
    }

    /// The network's gateway, attached to its switch network (none if it has none).
    fn attach_gateway(&self, st: &mut State, spec: &NetworkSpec) -> Result<Option<Arc<Gateway>>, ControlError> {
        if !spec.gateway {
            return Ok(None);
        }
        let mut gcfg = gateway_config(spec, &self.instance)?;
        gcfg.reservations = kernel_net::stored_reservations(&self.store, &spec.name)?
            .iter()
            .map(crate::model::ReservationSpec::to_gateway)
            .collect();
        let gw = Gateway::attach(
            self.gateways.handle(),
            &self.switch,
            &spec.name,
            gcfg,
            self.lease_store(spec)?,
        )
        .map_err(|e| ControlError::invalid(e.to_string()))?;
        let gw = Arc::new(gw);
        if gw.config().lock_ports {
            // Every port made from now on is born sealed, until the locker locks it.
            if let Err(e) = self.switch.seal_new_ports(&spec.name) {
                let _ = self.switch.remove_port(gw.port());
                return Err(e.into());
            }
            st.locker.enable(&spec.name, gw.port(), spec.ipv6);
            st.locker
                .remember_leases(&spec.name, gw.leases().into_iter().map(|l| (l.mac, l.ip)));
        }
        if let Some(leases) = gw.take_events() {
            events::forward_leases(spec.name.to_string(), leases, self.events.clone());
        }
        Ok(Some(gw))
    }

    /// Events from now on, as JSON lines.
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.bus.subscribe()
    }

    /// How many clients follow the events now.
    pub fn event_readers(&self) -> usize {
        self.bus.readers()
    }

    /// Changes a network's gateway settings: checked, stored, then in force at once
    /// (leases, flows and forwards stay).
    pub fn set_settings(&self, network: &str, settings: GatewaySettings) -> Result<NetworkSpec, ControlError> {
        let mut st = self.lock();
        let net = st.net(network)?;
        let mut spec = net.spec.clone();
        spec.settings = settings;
        let mut cfg = gateway_config(&spec, &self.instance)?;
        if let Some(gw) = &net.gateway {
            cfg.reservations = gw.config().reservations.clone();
            gw.reconfigure(cfg).map_err(|e| ControlError::invalid(e.to_string()))?;
        }
        if let Err(e) = self.store.put_network(&spec) {
            if let Some(gw) = &net.gateway {
                // Back to what the store still says.
                if let Ok(old) = gateway_config(&net.spec, &self.instance) {
                    let _ = gw.reconfigure(GatewayConfig {
                        reservations: gw.config().reservations.clone(),
                        ..old
                    });
                }
            }
            return Err(e.into());
        }
        let net = st.nets.get_mut(network).expect("looked up above");
        net.spec = spec.clone();
        if net.backend.is_kernel() {
            // The kernel bounds each guest's flows from the same settings.
            kernel_rules::apply_rules(&self.env(), &mut st)?;
        }
        Ok(spec)
    }

    /// Takes a network out of the state and down: its forwards' listeners, gateway,
    /// switch network and backend devices. Nothing here can be refused.
    fn tear_down_network(&self, st: &mut State, name: &str) {
        let Some(mut net) = st.nets.remove(name) else {
            return;
        };
        let env = self.env();
        for p in std::mem::take(&mut net.ports).into_values() {
            if let Some(id) = p.handle.switch_port() {
                st.index.remove(&id);
            }
            if let Err(e) = net
                .backend
                .remove_port(&env, net.gateway.as_deref(), &mut st.locker, &p.rec, &p.handle)
            {
                tracing::warn!(network = %name, port = %p.rec.name, "removing the port: {e}");
            }
        }
        if let Some(gw) = &net.gateway {
            // Its forwards' listeners hold the gateway: close them with it.
            for f in gw.forwards() {
                gw.remove_forward(f.id);
            }
            let _ = self.switch.remove_port(gw.port());
        }
        if let Err(e) = self.switch.remove_network(name) {
            tracing::warn!(network = %name, "removing the switch network: {e}");
        }
        if let Err(e) = net.backend.tear_down(&env, &net.spec) {
            tracing::warn!(network = %name, "removing its devices: {e}");
        }
        if net.backend.is_kernel() {
            if let Err(e) = kernel_rules::apply_rules(&env, st) {
                tracing::warn!("cannot write the nftables tables: {e}");
            }
        }
        share_subnets(st);
    }

    pub fn delete_network(&self, name: &str, force: bool) -> Result<(), ControlError> {
        let mut st = self.lock();
        if !st.nets.contains_key(name) && st.failed.networks.contains_key(name) {
            // Never came back at start: only its rows remain.
            return self.forget_network(&mut st, name);
        }
        let net = st.net(name)?;
        if !net.ports.is_empty() && !force {
            return Err(ControlError::conflict(format!(
                "network {name:?} has {} port(s); remove them first or delete with force (`--force`; force=true in the API)",
                net.ports.len()
            )));
        }
        // Every node takes a cluster network down; this one at once.
        self.unpublish_cluster_network(&net.spec.clone())?;
        self.forget_network(&mut st, name)
    }

    pub fn networks(&self) -> Vec<NetworkView> {
        let st = self.lock();
        let mut v: Vec<NetworkView> = st
            .nets
            .values()
            .map(|n| {
                let leases = n.gateway.as_ref().map(|g| g.leases().len()).unwrap_or(0);
                NetworkView {
                    served: n.gateway.as_ref().map(|g| crate::model::GatewayView::of(&g.config())),
                    traffic: self.switch.network_counters(&n.spec.name).as_ref().map(Into::into),
                    ..NetworkView::of(&n.spec, n.ports.len(), leases, None)
                }
            })
            .collect();
        v.extend(st.failed.networks.values().filter_map(|(spec, why)| {
            let spec = spec.as_ref()?;
            let ports = st.failed.ports.keys().filter(|(n, _)| *n == *spec.name).count();
            Some(NetworkView::of(spec, ports, 0, Some(why.clone())))
        }));
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn network(&self, name: &str) -> Result<NetworkView, ControlError> {
        self.networks()
            .into_iter()
            .find(|n| n.name.as_str() == name)
            .ok_or_else(|| ControlError::NoNetwork(name.to_string()))
    }

    /// A live port's view; on a network with IPv6 (`prefix`), with the IPv6 addresses
    /// its lock allows (none known ahead for a port that learns its MAC).
    fn view(&self, net: &state::NetState, rec: &PortRecord, handle: &PortHandle) -> PortView {
        let mut v = self.port_view(
            net.backend.is_kernel(),
            rec.clone(),
            net.backend.port_up(&self.env(), handle),
            None,
        );
        if !rec.learn_mac_once {
            v.ipv6 = locks::ipv6_addresses(net.spec.ipv6, rec.mac);
        }
        v
    }

    /// A port's view, with what each VMM is given for it.
    fn port_view(&self, kernel: bool, record: PortRecord, up: bool, failed: Option<String>) -> PortView {
        let vmm = user_net::vmm_lines(&record, &self.run_dir, kernel);
        PortView {
            up,
            ipv6: vec![],
            qemu_args: vmm.qemu.clone().unwrap_or_default(),
            vmm,
            record,
            failed,
        }
    }

    pub fn add_port(&self, network: &str, spec: PortSpec) -> Result<PortView, ControlError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let net = state::net_in(&st.nets, network)?;
        if net.ports.contains_key(spec.name.as_str())
            || st
                .failed
                .ports
                .contains_key(&(network.to_string(), spec.name.to_string()))
        {
            return Err(ControlError::conflict(format!(
                "port {:?} already exists on {network:?}",
                spec.name.as_str()
            )));
        }
        if spec.kind != PortKind::Tap && spec.ifname.is_some() {
            return Err(ControlError::invalid("ifname is for TAP ports only"));
        }
        if spec.kind == PortKind::Tap {
            privileges::need_net_admin("a TAP port")?;
        }
        net.backend.check_port(&spec)?;
        let env = self.env();
        let (rec, handle) = net.backend.add_port(&env, &net.parts(), &mut st.locker, &spec)?;
        if let Err(e) = self.store.put_port(&rec) {
            let _ = net
                .backend
                .remove_port(&env, net.gateway.as_deref(), &mut st.locker, &rec, &handle);
            return Err(e.into());
        }
        let view = self.view(net, &rec, &handle);
        let kernel = net.backend.is_kernel();
        self.commit_port(st, rec, handle);
        if kernel {
            kernel_rules::apply_rules(&env, st)?;
        }
        Ok(view)
    }

    fn commit_port(&self, st: &mut State, rec: PortRecord, handle: PortHandle) {
        if let Some(id) = handle.switch_port() {
            st.index.insert(id, (rec.network.clone(), rec.name.clone()));
        }
        if let Some(net) = st.nets.get_mut(&rec.network) {
            net.ports.insert(rec.name.clone(), PortState { rec, handle });
        }
    }

    /// Adds a socketpair port and returns its VM end, for handing to the client.
    pub fn add_socketpair_port(
        &self,
        network: &str,
        name: &Name,
        mac: Option<&str>,
        learn_mac_once: bool,
    ) -> Result<(PortView, std::os::fd::OwnedFd), ControlError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let net = state::net_in(&st.nets, network)?;
        if net.ports.contains_key(name.as_str()) {
            return Err(ControlError::conflict(format!(
                "port {:?} already exists on {network:?}",
                name.as_str()
            )));
        }
        let (mac, learn_mac_once) = choose_mac(network, name, mac, learn_mac_once, |m| {
            net.ports.values().any(|p| p.rec.mac == m)
        })?;
        if net.backend.is_kernel() {
            return Err(ControlError::invalid("a kernel-mode network takes TAP ports"));
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
        if let Err(e) = user_net::lock_from_birth(&mut st.locker, &rec, id) {
            let _ = self.switch.remove_port(id);
            return Err(e);
        }
        let view = self.port_view(false, rec.clone(), true, None);
        self.commit_port(st, rec, PortHandle::Switch(id));
        Ok((view, vm_end))
    }

    pub fn remove_port(&self, network: &str, name: &str) -> Result<(), ControlError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let key = (network.to_string(), name.to_string());
        if st.failed.ports.contains_key(&key) {
            // Never came back at start: only its row remains.
            self.store.delete_port(network, name)?;
            st.failed.ports.remove(&key);
            return Ok(());
        }
        st.net(network)?.port(network, name)?;
        // The store forgets it first: once it did, taking it down cannot be refused.
        self.store.delete_port(network, name)?;
        let net = st.nets.get_mut(network).expect("checked above");
        let port = net.ports.remove(name).expect("checked above");
        if let Some(id) = port.handle.switch_port() {
            st.index.remove(&id);
        }
        let env = self.env();
        if let Err(e) = net
            .backend
            .remove_port(&env, net.gateway.as_deref(), &mut st.locker, &port.rec, &port.handle)
        {
            tracing::warn!(%network, port = %name, "taking the port down: {e}");
        }
        // Its lease and DNS name go with it, not when the lease would have run out.
        if let Some(ip) = net.gateway.as_ref().and_then(|gw| gw.release_port(port.rec.mac)) {
            tracing::info!(%network, port = %name, %ip, "released the port's lease");
        }
        if net.backend.is_kernel() {
            kernel_rules::apply_rules(&env, st)?;
        }
        Ok(())
    }

    /// Points a unixgram port at its VMM's socket path (for a VM adopted after a
    /// restart, which may have nothing to send for a while).
    pub fn set_port_peer(&self, network: &str, name: &str, peer: &std::path::Path) -> Result<(), ControlError> {
        let st = self.lock();
        let port = st.net(network)?.port(network, name)?;
        let id = port
            .handle
            .switch_port()
            .ok_or_else(|| ControlError::invalid(format!("port {name:?} is not a switch port")))?;
        self.switch.set_unixgram_peer(id, peer)?;
        Ok(())
    }

    pub fn ports(&self, network: &str) -> Result<Vec<PortView>, ControlError> {
        let st = self.lock();
        let net = st.net(network)?;
        let mut v: Vec<PortView> = net.ports.values().map(|p| self.view(net, &p.rec, &p.handle)).collect();
        let kernel = net.backend.is_kernel();
        v.extend(st.failed.ports.iter().filter_map(|((n, _), (rec, why))| {
            let rec = rec.clone().filter(|_| n == network)?;
            Some(self.port_view(kernel, rec, false, Some(why.clone())))
        }));
        v.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(v)
    }

    /// Stops the VMs and removes the ports' sockets and the forwards' listeners; the
    /// store keeps everything for the next start.
    pub fn shutdown(&self) {
        if let Some(link) = self.cluster.get() {
            link.stop();
        }
        self.vms.stop_all(self);
        let st = self.lock();
        for net in st.nets.values() {
            for p in net.ports.values() {
                if let Some(id) = p.handle.switch_port() {
                    let _ = self.switch.remove_port(id);
                }
            }
            if let Some(gw) = &net.gateway {
                for f in gw.forwards() {
                    gw.remove_forward(f.id);
                }
            }
        }
    }
}

/// Tells every gateway the other networks' subnets and IPv6 prefixes, which its guests
/// may not reach.
fn share_subnets(st: &State) {
    for (name, net) in &st.nets {
        if let Some(gw) = &net.gateway {
            let others = st
                .nets
                .iter()
                .filter(|(n, _)| *n != name)
                .flat_map(|(_, o)| {
                    let v6 = o.spec.ipv6.map(ipnet::IpNet::V6);
                    std::iter::once(ipnet::IpNet::V4(o.spec.subnet)).chain(v6)
                })
                .collect();
            gw.set_other_subnets(others);
        }
    }
}

impl vms::PortBroker for Control {
    fn add_port(&self, network: &str, spec: PortSpec) -> Result<PortView, ControlError> {
        Control::add_port(self, network, spec)
    }

    fn remove_port(&self, network: &str, name: &str) -> Result<(), ControlError> {
        Control::remove_port(self, network, name)
    }

    fn set_port_peer(&self, network: &str, name: &str, peer: &std::path::Path) -> Result<(), ControlError> {
        Control::set_port_peer(self, network, name, peer)
    }

    fn port(&self, network: &str, name: &str) -> Option<PortView> {
        self.ports(network).ok()?.into_iter().find(|p| p.record.name == name)
    }

    fn lease(&self, network: &str, mac: fabric::Mac) -> Option<crate::model::LeaseView> {
        self.leases(network).ok()?.into_iter().find(|l| l.mac == mac)
    }
}

#[cfg(test)]
mod tests;

/// The configuration a network's gateway runs with: the defaults for its subnet, its
/// mode's part (for kernel mode, of this daemon `instance`'s bridge), then the
/// operator's settings, checked together.
fn gateway_config(spec: &NetworkSpec, instance: &str) -> Result<GatewayConfig, ControlError> {
    let mut gcfg = GatewayConfig::new(&spec.name, spec.subnet);
    gcfg.mtu = spec.mtu.get();
    gcfg.ipv6 = spec.ipv6;
    if spec.host_access {
        gcfg.host_access = Some(gcfg.default_host_access());
    }
    if spec.mode == crate::model::NetworkMode::Kernel {
        kernel_net::KernelNet::gateway_config(spec, instance, &mut gcfg);
    }
    if spec.scope == crate::model::Scope::Cluster {
        // The same on every node, whatever its mode: a kernel-mode node's gateway
        // serves at the second address, so no node leases it.
        let third = std::net::Ipv4Addr::from(u32::from(spec.subnet.network()) + 3);
        gcfg.dhcp_range.0 = gcfg.dhcp_range.0.max(third);
    }
    spec.settings
        .apply(&mut gcfg)
        .map_err(|e| ControlError::invalid(format!("gateway settings: {e}")))?;
    Ok(gcfg)
}

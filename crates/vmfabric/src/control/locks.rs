//! Port security tied to leases.
//!
//! A port is locked from birth: to the MAC vmfabric assigned it (or, for VMMs that
//! choose their own, to the first MAC it sends from), with no address, which lets the
//! VM ask for a lease (DHCP from 0.0.0.0, ARP probes) and nothing else. The switch
//! says which port a MAC is on (`MacLearned`/`MacMoved`); a gateway says which address
//! a MAC holds (`LeaseEvent`). Neither knows the other, so the control plane joins
//! them: once both are known, the VM's port is locked to its MAC and leased address.
//! When the lease ends the port goes back to its MAC with no address. Events may
//! arrive in either order.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use fabric::{Mac, PortId, PortLock, Switch, SwitchEvent};
use gateway::LeaseEvent;
use tracing::{info, warn};

/// Something a layer reported, tagged with the network where it matters.
#[derive(Debug, Clone)]
pub enum ControlEvent {
    Switch(SwitchEvent),
    Lease { network: String, event: LeaseEvent },
}

#[derive(Default)]
struct NetworkLocks {
    ports: HashMap<Mac, PortId>,
    /// The MAC's current lease; `None` once it ended. Absent: never leased, not locked.
    leases: HashMap<Mac, Option<Ipv4Addr>>,
    /// The MAC's DHCPv6 address while it holds one (a reserved one is not among the
    /// addresses its MAC gives it).
    leases6: HashMap<Mac, Ipv6Addr>,
}

/// Locks ports to their leases on networks whose gateway asks for it.
pub struct PortLocker {
    switch: Arc<Switch>,
    /// Networks with locking on, with their gateway's port (never locked) and their
    /// IPv6 prefix, if they carry IPv6.
    enabled: HashMap<String, (PortId, Option<ipnet::Ipv6Net>)>,
    nets: HashMap<String, NetworkLocks>,
    /// Ports that carry many MACs and are never locked (a cluster network's tunnel:
    /// the VTEP holds each remote MAC to its node instead).
    exempt: std::collections::HashSet<PortId>,
}

impl PortLocker {
    pub fn new(switch: Arc<Switch>) -> PortLocker {
        PortLocker {
            switch,
            enabled: HashMap::new(),
            nets: HashMap::new(),
            exempt: Default::default(),
        }
    }

    /// Turns locking on for `network`, whose gateway sits on `gateway_port`; with an
    /// IPv6 prefix, ports are also locked to the IPv6 addresses their MAC gives them.
    pub fn enable(&mut self, network: &str, gateway_port: PortId, ipv6: Option<ipnet::Ipv6Net>) {
        self.enabled.insert(network.to_string(), (gateway_port, ipv6));
    }

    /// The leases a gateway already holds when it starts (from the store), so that a
    /// restored port is locked to its address at once, not only after a renewal.
    pub fn remember_leases(&mut self, network: &str, leases: impl IntoIterator<Item = (Mac, Ipv4Addr)>) {
        let n = self.nets.entry(network.to_string()).or_default();
        for (mac, ip) in leases {
            n.leases.insert(mac, Some(ip));
        }
    }

    /// Locks a new port from birth: to `mac`, or with `None` to the first MAC it sends
    /// from. Ports of networks without locking are left open.
    pub fn register_port(&mut self, network: &str, port: PortId, mac: Option<Mac>) -> Result<(), fabric::FabricError> {
        if !self.enabled.contains_key(network) {
            return Ok(());
        }
        match mac {
            Some(mac) => {
                self.nets
                    .entry(network.to_string())
                    .or_default()
                    .ports
                    .insert(mac, port);
                self.lock(network, port, mac)
            }
            None => self.switch.lock_port_to_first_mac(port),
        }
    }

    /// Forgets a removed port's MAC, so the MAC may be locked to another port later.
    /// Never locks `port`, whatever MACs it carries.
    pub fn exempt(&mut self, port: PortId) {
        self.exempt.insert(port);
    }

    /// The MACs `ports` of `network` were seen sending from (a port that learns its
    /// MAC has one once its VMM sent a frame).
    pub fn macs_of(&self, network: &str, ports: &std::collections::HashSet<PortId>) -> Vec<Mac> {
        self.nets
            .get(network)
            .map(|n| {
                n.ports
                    .iter()
                    .filter(|(_, p)| ports.contains(p))
                    .map(|(m, _)| *m)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn forget_port(&mut self, network: &str, port: PortId) {
        self.exempt.remove(&port);
        if let Some(n) = self.nets.get_mut(network) {
            n.ports.retain(|_, p| *p != port);
        }
    }

    pub fn handle(&mut self, ev: &ControlEvent) {
        match ev {
            ControlEvent::Switch(SwitchEvent::MacLearned { network, mac, port })
            | ControlEvent::Switch(SwitchEvent::MacMoved {
                network, mac, to: port, ..
            }) => {
                if self.enabled.get(network).is_none_or(|(gateway, _)| gateway == port) || self.exempt.contains(port) {
                    return;
                }
                self.nets.entry(network.clone()).or_default().ports.insert(*mac, *port);
                self.apply(network, *mac);
            }
            ControlEvent::Lease { network, event } => {
                if !self.enabled.contains_key(network) {
                    return;
                }
                let n = self.nets.entry(network.clone()).or_default();
                let mac = match event {
                    LeaseEvent::Bound(l) => {
                        n.leases.insert(l.mac, Some(l.ip));
                        l.mac
                    }
                    LeaseEvent::Released { mac, .. } | LeaseEvent::Expired { mac, .. } => {
                        n.leases.insert(*mac, None);
                        *mac
                    }
                    LeaseEvent::Bound6 { mac, ip } => {
                        n.leases6.insert(*mac, *ip);
                        *mac
                    }
                    LeaseEvent::Ended6 { mac, ip } => {
                        if n.leases6.get(mac) == Some(ip) {
                            n.leases6.remove(mac);
                        }
                        *mac
                    }
                };
                self.apply(network, mac);
            }
            ControlEvent::Switch(_) => {}
        }
    }

    fn apply(&self, network: &str, mac: Mac) {
        let Some(n) = self.nets.get(network) else {
            return;
        };
        let Some(port) = n.ports.get(&mac).copied() else {
            return;
        };
        if let Err(e) = self.lock(network, port, mac) {
            warn!(%network, %port, %mac, "cannot lock port: {e}");
        }
    }

    /// Locks `port` to `mac` and the address it holds a lease for, if any.
    fn lock(&self, network: &str, port: PortId, mac: Mac) -> Result<(), fabric::FabricError> {
        let lease = self
            .nets
            .get(network)
            .and_then(|n| n.leases.get(&mac).copied().flatten());
        let ips: Vec<Ipv4Addr> = lease.into_iter().collect();
        let prefix = self.enabled.get(network).and_then(|(_, p)| *p);
        let mut ips6 = ipv6_addresses(prefix, mac);
        let leased6 = self.nets.get(network).and_then(|n| n.leases6.get(&mac));
        ips6.extend(leased6.filter(|a| !ips6.contains(a)));
        self.switch.lock_port(
            port,
            Some(PortLock {
                mac,
                ips: ips.clone(),
                ips6: ips6.clone(),
            }),
        )?;
        info!(%network, %port, %mac, ips = ?ips, ips6 = ?ips6, "port locked");
        Ok(())
    }
}

/// The IPv6 addresses a MAC may use on a network with `prefix` (none without one): its
/// link-local and SLAAC addresses, both from the MAC (modified EUI-64), as Linux forms
/// them by default, and the address DHCPv6 gives it (a function of the MAC too). A
/// guest that forms others (privacy or stable-privacy addresses) is held to these.
pub(crate) fn ipv6_addresses(prefix: Option<ipnet::Ipv6Net>, mac: Mac) -> Vec<Ipv6Addr> {
    use gateway::config::{dhcp6_address, slaac_address};
    let Some(prefix) = prefix else { return vec![] };
    let link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0);
    vec![
        slaac_address(link_local, mac),
        slaac_address(prefix.network(), mac),
        dhcp6_address(prefix, mac),
    ]
}

/// Runs a locker over `events` on its own thread until every sender is gone.
pub fn spawn(mut locker: PortLocker, events: std::sync::mpsc::Receiver<ControlEvent>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("port-locker".into())
        .spawn(move || {
            for ev in events {
                locker.handle(&ev);
            }
        })
        .expect("spawn the port-locker thread")
}

//! Port security tied to leases.
//!
//! The switch says which port a MAC is on (`MacLearned`/`MacMoved`); a gateway says
//! which address a MAC holds (`LeaseEvent`). Neither knows the other, so the control
//! plane joins them: once both are known, the VM's port is locked to its MAC and
//! leased address. When the lease ends the port stays locked to the MAC with no
//! address, which still lets the VM ask for a new lease and nothing else. Events may
//! arrive in either order.

use std::collections::HashMap;
use std::net::Ipv4Addr;
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
}

/// Locks ports to their leases on networks whose gateway asks for it.
pub struct PortLocker {
    switch: Arc<Switch>,
    /// Networks with locking on, with their gateway's port (never locked).
    enabled: HashMap<String, PortId>,
    nets: HashMap<String, NetworkLocks>,
}

impl PortLocker {
    pub fn new(switch: Arc<Switch>) -> PortLocker {
        PortLocker {
            switch,
            enabled: HashMap::new(),
            nets: HashMap::new(),
        }
    }

    /// Turns locking on for `network`, whose gateway sits on `gateway_port`.
    pub fn enable(&mut self, network: &str, gateway_port: PortId) {
        self.enabled.insert(network.to_string(), gateway_port);
    }

    pub fn handle(&mut self, ev: &ControlEvent) {
        match ev {
            ControlEvent::Switch(SwitchEvent::MacLearned { network, mac, port })
            | ControlEvent::Switch(SwitchEvent::MacMoved {
                network, mac, to: port, ..
            }) => {
                if self.enabled.get(network) == Some(port) || !self.enabled.contains_key(network) {
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
        // Before its first lease a port stays open; from then on it is locked.
        let Some(lease) = n.leases.get(&mac) else {
            return;
        };
        let ips: Vec<Ipv4Addr> = lease.iter().copied().collect();
        match self.switch.lock_port(port, Some(PortLock { mac, ips: ips.clone() })) {
            Ok(()) => info!(%network, %port, %mac, ips = ?ips, "port locked"),
            Err(e) => warn!(%network, %port, %mac, "cannot lock port: {e}"),
        }
    }
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

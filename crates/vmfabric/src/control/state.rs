//! What the control plane holds, all of it behind `Control`'s one lock: the networks
//! with their gateways, backends and ports, the index from switch port ids to port
//! names (kept here and nowhere else), what could not be restored, and the port
//! locker.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use fabric::PortId;
use gateway::Gateway;

use super::backend::Backend;
use super::env::{NetParts, PortHandle};
use super::error::ControlError;
use super::locks::PortLocker;
use crate::model::NetworkSpec;
use crate::store::PortRecord;

pub(crate) struct State {
    pub nets: BTreeMap<String, NetState>,
    /// Switch port id -> (network, port): names VMs after their port.
    pub index: HashMap<PortId, (String, String)>,
    pub failed: Failed,
    pub locker: PortLocker,
    pub captures: Captures,
    /// Kernel mode: what the nftables refusal counters held before the tables were
    /// last written (writing starts them again), by counter name.
    pub kernel_denied: HashMap<String, u64>,
}

pub(crate) struct NetState {
    pub spec: NetworkSpec,
    pub gateway: Option<Arc<Gateway>>,
    pub backend: Backend,
    pub ports: BTreeMap<String, PortState>,
}

pub(crate) struct PortState {
    pub rec: PortRecord,
    pub handle: PortHandle,
}

/// Stored objects that could not be restored at start: by name, the spec when it
/// parsed, and the reason. They stay stored; DELETE removes them.
#[derive(Default)]
pub(crate) struct Failed {
    pub networks: HashMap<String, (Option<NetworkSpec>, String)>,
    pub ports: HashMap<(String, String), (Option<PortRecord>, String)>,
}

/// The live captures, with the copies each lost, and what ended ones lost by network
/// (so the counters never go back).
#[derive(Default)]
pub(crate) struct Captures {
    pub live: BTreeMap<u64, LiveCapture>,
    pub next_id: u64,
    pub ended_lost: BTreeMap<String, u64>,
}

pub(crate) struct LiveCapture {
    pub network: String,
    pub lost: Arc<std::sync::atomic::AtomicU64>,
}

impl State {
    pub fn new(locker: PortLocker) -> State {
        State {
            nets: BTreeMap::new(),
            index: HashMap::new(),
            failed: Failed::default(),
            captures: Captures::default(),
            locker,
            kernel_denied: HashMap::new(),
        }
    }

    pub fn net(&self, name: &str) -> Result<&NetState, ControlError> {
        net_in(&self.nets, name)
    }

    pub fn gateway(&self, name: &str) -> Result<Arc<Gateway>, ControlError> {
        self.net(name)?
            .gateway
            .clone()
            .ok_or_else(|| ControlError::invalid(format!("network {name:?} has no gateway (no DHCP)")))
    }

    /// Whether a name is taken by a network, live or failed to restore.
    pub fn network_exists(&self, name: &str) -> bool {
        self.nets.contains_key(name) || self.failed.networks.contains_key(name)
    }
}

/// A network by name, from the map alone (so the caller may borrow the state's other
/// fields beside it).
pub(crate) fn net_in<'a>(nets: &'a BTreeMap<String, NetState>, name: &str) -> Result<&'a NetState, ControlError> {
    nets.get(name).ok_or_else(|| ControlError::NoNetwork(name.to_string()))
}

impl NetState {
    /// What a backend may know of this network.
    pub fn parts(&self) -> NetParts<'_> {
        NetParts {
            spec: &self.spec,
            gateway: self.gateway.as_deref(),
            macs: self.ports.values().map(|p| p.rec.mac).collect(),
        }
    }

    pub fn port(&self, network: &str, name: &str) -> Result<&PortState, ControlError> {
        self.ports.get(name).ok_or_else(|| ControlError::no_port(network, name))
    }
}

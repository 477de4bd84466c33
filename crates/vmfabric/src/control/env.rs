//! What the backends are given: the host's parts ([`Env`]), a read-only view of the
//! network they act on ([`NetParts`]), and what they hand back. It depends on no other
//! room of the control plane, so backends never reach the controller or its state.

use std::path::Path;
use std::sync::Arc;

use fabric::{Mac, PortId, Switch};
use gateway::Gateway;

use crate::model::NetworkSpec;
use crate::store::Store;

/// What a backend may use: the data plane, the store, where sockets go, and which
/// daemon instance it is (kernel names are scoped by it).
pub(crate) struct Env<'a> {
    pub switch: &'a Arc<Switch>,
    pub store: &'a Store,
    pub run_dir: &'a Path,
    pub instance: &'a str,
    /// The cluster this daemon is a node of: a cluster network's addresses are
    /// claimed there, and its kernel-mode bridge gets a VXLAN device.
    pub cluster: Option<&'a Arc<crate::cluster::node::ClusterLink>>,
}

/// How a port is reached: a switch port, or a TAP device on a bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PortHandle {
    Switch(PortId),
    Kernel { ifname: String },
}

impl PortHandle {
    pub fn switch_port(&self) -> Option<PortId> {
        match self {
            PortHandle::Switch(id) => Some(*id),
            PortHandle::Kernel { .. } => None,
        }
    }
}

/// What a backend may know of the network it acts on.
pub(crate) struct NetParts<'a> {
    pub spec: &'a NetworkSpec,
    pub gateway: Option<&'a Gateway>,
    /// The MACs its ports hold (a new port's must differ).
    pub macs: Vec<Mac>,
}

/// How to take back a forward that was started but could not be stored.
pub(crate) enum ForwardUndo {
    Nothing,
    Gateway(u64),
}

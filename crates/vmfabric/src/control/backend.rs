//! Who carries a network's frames: vmfabric's switch (`User`) or a Linux bridge
//! (`Kernel`). This is the one place that tells the two apart; the backends get what
//! they need as arguments ([`Env`], the network's state) and never call back into
//! the controller.

use std::path::Path;

use gateway::Gateway;

use super::env::{Env, ForwardUndo, NetParts, PortHandle};
use super::error::ControlError;
use super::kernel_net::{self, KernelNet};
use super::locks::PortLocker;
use super::user_net;
use crate::model::{ForwardSpec, NetworkMode, NetworkSpec, PortSpec};
use crate::store::PortRecord;

pub(crate) enum Backend {
    User,
    Kernel(KernelNet),
}

impl Backend {
    /// Checks a network's mode-specific options; nothing is made.
    pub fn check_network(spec: &NetworkSpec) -> Result<(), ControlError> {
        match spec.mode {
            NetworkMode::Userspace if spec.isolated || spec.bridge.is_some() => Err(ControlError::invalid(
                "isolated and bridge are kernel-mode options (mode=kernel)",
            )),
            NetworkMode::Userspace => Ok(()),
            NetworkMode::Kernel => {
                if let Some(b) = &spec.bridge {
                    crate::model::check_ifname("bridge", b)?;
                }
                super::privileges::need_net_admin("a kernel-mode network (a bridge, TAP devices, nftables)")
            }
        }
    }

    /// Makes what the mode needs before the switch network exists (a kernel network's
    /// bridge and uplink device). Everything about `spec` was checked before.
    pub fn prepare(env: &Env, spec: &NetworkSpec) -> Result<Backend, ControlError> {
        match spec.mode {
            NetworkMode::Userspace => Ok(Backend::User),
            NetworkMode::Kernel => Ok(Backend::Kernel(KernelNet::prepare(env, spec)?)),
        }
    }

    /// Connects the mode's part to the switch network, once it and its gateway exist.
    pub fn attach(&mut self, env: &Env, spec: &NetworkSpec) -> Result<(), ControlError> {
        match self {
            Backend::User => Ok(()),
            Backend::Kernel(k) => k.attach(env, spec),
        }
    }

    /// Undoes `prepare` and `attach` (a failed creation, or a delete).
    pub fn tear_down(&mut self, env: &Env, spec: &NetworkSpec) -> Result<(), ControlError> {
        match self {
            Backend::User => Ok(()),
            Backend::Kernel(k) => k.tear_down(env, spec),
        }
    }

    pub fn is_kernel(&self) -> bool {
        matches!(self, Backend::Kernel(_))
    }

    /// The kernel network, for its rules; `None` in userspace mode.
    pub fn kernel_mut(&mut self) -> Option<&mut KernelNet> {
        match self {
            Backend::Kernel(k) => Some(k),
            Backend::User => None,
        }
    }

    pub fn kernel(&self) -> Option<&KernelNet> {
        match self {
            Backend::Kernel(k) => Some(k),
            Backend::User => None,
        }
    }

    /// Checks a port request against the mode; nothing is made.
    pub fn check_port(&self, spec: &PortSpec) -> Result<(), ControlError> {
        match self {
            Backend::User => user_net::check_port(spec),
            Backend::Kernel(_) => kernel_net::check_port(spec),
        }
    }

    /// Makes a port (the request was checked). Returns its record and handle.
    pub fn add_port(
        &self,
        env: &Env,
        net: &NetParts,
        locker: &mut PortLocker,
        spec: &PortSpec,
    ) -> Result<(PortRecord, PortHandle), ControlError> {
        match self {
            Backend::User => user_net::add_port(env, net, locker, spec),
            Backend::Kernel(k) => k.add_port(env, net, spec),
        }
    }

    /// Makes a stored port again (at start).
    pub fn restore_port(
        &self,
        env: &Env,
        net: &NetParts,
        locker: &mut PortLocker,
        rec: &PortRecord,
    ) -> Result<PortHandle, ControlError> {
        match self {
            Backend::User => user_net::restore_port(env, locker, rec),
            Backend::Kernel(k) => k.restore_port(env, net, rec),
        }
    }

    pub fn remove_port(
        &self,
        env: &Env,
        gateway: Option<&Gateway>,
        locker: &mut PortLocker,
        rec: &PortRecord,
        handle: &PortHandle,
    ) -> Result<(), ControlError> {
        match (self, handle) {
            (Backend::User, PortHandle::Switch(id)) => user_net::remove_port(env, locker, rec, *id),
            (Backend::Kernel(k), PortHandle::Kernel { ifname }) => k.remove_port(env, gateway, rec, ifname),
            _ => Err(ControlError::host(format!(
                "port {:?} of {:?} has a handle of the other mode",
                rec.name, rec.network
            ))),
        }
    }

    /// Whether the port is up: its VMM attached (switch ports) or its device present.
    pub fn port_up(&self, env: &Env, handle: &PortHandle) -> bool {
        match handle {
            PortHandle::Switch(id) => env.switch.is_port_up(*id).unwrap_or(false),
            PortHandle::Kernel { ifname } => Path::new("/sys/class/net").join(ifname).exists(),
        }
    }

    /// The network's forwards: the gateway's listeners, or the stored DNAT rules.
    pub fn forwards(&self, env: &Env, name: &str, gateway: Option<&Gateway>) -> Result<Vec<ForwardSpec>, ControlError> {
        match self {
            Backend::User => Ok(gateway.map(user_net::forwards).unwrap_or_default()),
            Backend::Kernel(_) => kernel_net::stored_forwards(env, name),
        }
    }

    /// Starts a forward (the kernel's are written with the rules, by the caller).
    pub fn add_forward(
        &self,
        spec: &NetworkSpec,
        gateway: Option<&Gateway>,
        f: ForwardSpec,
    ) -> Result<(ForwardSpec, ForwardUndo), ControlError> {
        match self {
            Backend::User => {
                let gw = gateway.ok_or_else(|| ControlError::invalid("forwards need the network's gateway"))?;
                user_net::add_forward(gw, f)
            }
            Backend::Kernel(_) => kernel_net::check_forward(spec, f).map(|f| (f, ForwardUndo::Nothing)),
        }
    }

    /// Stops the live forwards from `host` that match.
    pub fn remove_forwards(&self, gateway: Option<&Gateway>, wanted: &dyn Fn(&ForwardSpec) -> bool) -> usize {
        match (self, gateway) {
            (Backend::User, Some(gw)) => user_net::remove_forwards(gw, wanted),
            _ => 0,
        }
    }
}

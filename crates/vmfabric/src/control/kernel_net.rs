//! Kernel-mode networks: a Linux bridge routes at the subnet's first address, the
//! gateway serves DHCP and DNS beside it through an uplink TAP the switch reads,
//! guests' ports are persistent TAP devices held by bridge rules to a stable MAC and
//! the address the pool reserved for them, and forwards and the egress policy are
//! nftables rules of this instance's own tables. Devices are made by `crate::kernel`.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};

use fabric::{Mac, PortId};
use gateway::{Gateway, GatewayConfig};

use super::env::{Env, NetParts, PortHandle};
use super::error::ControlError;
use crate::kernel;
use crate::model::{ForwardSpec, NetworkSpec, PolicySpec, PortKind, PortSpec, ReservationSpec};
use crate::store::{PortRecord, Store};

pub(crate) struct KernelNet {
    pub(super) bridge: String,
    /// The switch port on the bridge's uplink TAP, where the gateway is.
    uplink: Option<PortId>,
}

fn base(spec: &NetworkSpec) -> u32 {
    u32::from(spec.subnet.network())
}

impl KernelNet {
    pub fn prepare(env: &Env, spec: &NetworkSpec) -> Result<KernelNet, ControlError> {
        kernel::bring_up(env.instance, spec, kernel::router_of(spec))?;
        Ok(KernelNet {
            bridge: kernel::bridge_name(env.instance, spec),
            uplink: None,
        })
    }

    /// Kernel mode's part of a gateway's configuration: the bridge routes, for IPv4
    /// and for the IPv6 prefix (the gateway's advertisements name it).
    pub fn gateway_config(spec: &NetworkSpec, instance: &str, cfg: &mut GatewayConfig) {
        cfg.router = Some(kernel::router_of(spec));
        cfg.router6 = spec.ipv6.map(|_| kernel::bridge_mac(instance, &spec.name));
        cfg.gateway_ip = Ipv4Addr::from(base(spec) + 2);
        cfg.dhcp_range.0 = Ipv4Addr::from(base(spec) + 3);
        // Every guest arrives through the uplink: the kernel holds ports to their MAC
        // and address (the bridge-family rules), not the switch.
        cfg.lock_ports = false;
        // The host is the router here; there is no mapped address to offer.
        cfg.host_access = None;
    }

    pub fn attach(&mut self, env: &Env, spec: &NetworkSpec) -> Result<(), ControlError> {
        let source = fabric::TapSource::Name(kernel::uplink_name(env.instance, &spec.name));
        let (id, _) = env.switch.add_tap_port(&spec.name, "uplink", source)?;
        self.uplink = Some(id);
        Ok(())
    }

    pub fn tear_down(&mut self, env: &Env, spec: &NetworkSpec) -> Result<(), ControlError> {
        if let Some(id) = self.uplink.take() {
            let _ = env.switch.remove_port(id);
        }
        kernel::remove(vec![kernel::uplink_name(env.instance, &spec.name), self.bridge.clone()])?;
        Ok(())
    }

    /// A port: a persistent TAP device on the bridge with a stable MAC, and an address
    /// from the pool held for it by a reservation (a reservation by the port's name
    /// wins). The caller writes the rules that keep it to both.
    pub fn add_port(
        &self,
        env: &Env,
        net: &NetParts,
        spec: &PortSpec,
    ) -> Result<(PortRecord, PortHandle), ControlError> {
        let network = net.spec.name.as_str();
        let taken: HashSet<Mac> = net.macs.iter().copied().collect();
        let mac = hostnet::mac::stable_mac(network, &spec.name, &taken);
        let ifname = spec
            .ifname
            .clone()
            .unwrap_or_else(|| kernel::tap_name(env.instance, network, &spec.name));
        crate::model::check_ifname("interface", &ifname)?;
        let reservations = env.store.reservations(network)?;
        let by_name = reservations
            .iter()
            .find(|(k, _)| k.as_str() == spec.name.as_str())
            .map(|(_, ip)| *ip);
        let leases = net.gateway.map(|g| g.leases()).unwrap_or_default();
        let used: HashSet<Ipv4Addr> = reservations
            .iter()
            .filter(|(k, _)| k.as_str() != spec.name.as_str())
            .map(|(_, ip)| *ip)
            .chain(leases.into_iter().filter(|l| l.mac != mac).map(|l| l.ip))
            .chain([Ipv4Addr::from(base(net.spec) + 2)])
            .collect();
        let pool = hostnet::ipam::Pool {
            subnet: net.spec.subnet,
            gateway: Ipv4Addr::from(base(net.spec) + 1),
        };
        let ip = pool.assign(&used, &Default::default(), by_name)?;
        let rec = PortRecord {
            network: network.to_string(),
            name: spec.name.to_string(),
            kind: PortKind::Tap,
            path: ifname,
            mac,
            learn_mac_once: false,
            tap: spec.tap_settings(),
        };
        let gw = net.gateway;
        reserve(
            env.store,
            network,
            gw,
            ReservationSpec {
                key: mac.to_string(),
                ip,
                ipv6: None,
            },
        )?;
        match self.restore_port(env, net, &rec) {
            Ok(handle) => Ok((rec, handle)),
            Err(e) => {
                let _ = unreserve(env.store, network, gw, &mac.to_string());
                Err(e)
            }
        }
    }

    pub fn restore_port(&self, env: &Env, net: &NetParts, rec: &PortRecord) -> Result<PortHandle, ControlError> {
        kernel::add_port(env.instance, &self.bridge, rec, net.spec.mtu.into(), net.spec.isolated)?;
        Ok(PortHandle::Kernel {
            ifname: rec.path.clone(),
        })
    }

    /// Removes the device; its address goes back to the pool.
    pub fn remove_port(
        &self,
        env: &Env,
        gateway: Option<&Gateway>,
        rec: &PortRecord,
        ifname: &str,
    ) -> Result<(), ControlError> {
        kernel::remove(vec![ifname.to_string()])?;
        let _ = unreserve(env.store, &rec.network, gateway, &rec.mac.to_string());
        Ok(())
    }
}

pub fn check_port(spec: &PortSpec) -> Result<(), ControlError> {
    if spec.kind != PortKind::Tap {
        return Err(ControlError::invalid(
            "a kernel-mode network takes TAP ports (the VMM opens the device by name)",
        ));
    }
    if spec.mac.is_some() || spec.learn_mac_once {
        return Err(ControlError::invalid(
            "a kernel-mode port gets a stable MAC that its bridge rules hold it to; mac and learn_mac_once are for userspace ports",
        ));
    }
    Ok(())
}

/// Adds or replaces a reservation in the store and the gateway.
pub fn reserve(store: &Store, network: &str, gw: Option<&Gateway>, r: ReservationSpec) -> Result<(), ControlError> {
    let mut all: Vec<ReservationSpec> = stored_reservations(store, network)?;
    all.retain(|o| o.key != r.key);
    all.push(r.clone());
    if let Some(gw) = gw {
        gw.set_reservations(all.iter().map(ReservationSpec::to_gateway).collect())
            .map_err(|e| ControlError::invalid(e.to_string()))?;
    }
    store.put_reservation(network, &r.key, r.ip, r.ipv6)?;
    Ok(())
}

/// Removes a reservation from the store and the gateway; false if there was none.
pub fn unreserve(store: &Store, network: &str, gw: Option<&Gateway>, key: &str) -> Result<bool, ControlError> {
    if !store.delete_reservation(network, key)? {
        return Ok(false);
    }
    if let Some(gw) = gw {
        let rest = stored_reservations(store, network)?;
        gw.set_reservations(rest.iter().map(ReservationSpec::to_gateway).collect())
            .map_err(ControlError::host)?;
    }
    Ok(true)
}

pub fn stored_reservations(store: &Store, network: &str) -> Result<Vec<ReservationSpec>, ControlError> {
    Ok(store
        .reservations_with_ipv6(network)?
        .into_iter()
        .map(|(key, ip, ipv6)| ReservationSpec { key, ip, ipv6 })
        .collect())
}

/// A network's forwards as stored; rows that no longer parse are logged and left out
/// (they stay in the store).
pub fn stored_forwards(env: &Env, network: &str) -> Result<Vec<ForwardSpec>, ControlError> {
    Ok(env
        .store
        .forwards(network)?
        .into_iter()
        .filter_map(|row| row.map_err(|bad| tracing::warn!("{bad}")).ok())
        .collect())
}

/// A forward on a kernel network, checked: DNAT rules need an IPv4 host address
/// with a port, to a guest on the network.
pub fn check_forward(spec: &NetworkSpec, f: ForwardSpec) -> Result<ForwardSpec, ControlError> {
    let SocketAddr::V4(host) = f.host else {
        return Err(ControlError::invalid("kernel-mode forwards listen on IPv4 addresses"));
    };
    if host.port() == 0 {
        return Err(ControlError::invalid(
            "kernel-mode forwards need a host port (nothing listens to pick one)",
        ));
    }
    let on_subnet =
        match f.guest.ip() {
            std::net::IpAddr::V4(ip) => spec.subnet.contains(&ip),
            // The DNAT rules are IPv4's (a userspace network forwards to IPv6 guests).
            std::net::IpAddr::V6(_) => return Err(ControlError::invalid(
                "kernel-mode forwards go to a guest's IPv4 address; forwards to IPv6 guests need a userspace network",
            )),
        };
    if !on_subnet {
        return Err(ControlError::invalid(format!(
            "{} is not on {:?}",
            f.guest.ip(),
            spec.name.as_str()
        )));
    }
    Ok(f)
}

/// The egress policy stored for a network (the default when none was set).
pub fn stored_policy(store: &Store, network: &str) -> Result<PolicySpec, ControlError> {
    match store.policy(network)? {
        Some(json) => {
            serde_json::from_str(&json).map_err(|e| ControlError::Host(format!("stored policy of {network:?}: {e}")))
        }
        None => Ok(PolicySpec::default()),
    }
}

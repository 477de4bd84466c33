//! Kernel-mode networks: a Linux bridge routes at the subnet's first address, the
//! gateway serves DHCP and DNS beside it through an uplink TAP the switch reads,
//! guests' ports are persistent TAP devices held by bridge rules to a stable MAC and
//! the address the pool reserved for them, and forwards and the egress policy are
//! nftables rules of this instance's own tables. Devices are made by `crate::kernel`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use fabric::{Mac, PortId};
use gateway::{Gateway, GatewayConfig};

use super::env::{Env, NetParts, PortHandle};
use super::error::ControlError;
use crate::cluster::node::ClusterLink;
use crate::kernel;
use crate::model::Scope;
use crate::model::{ForwardSpec, NetworkSpec, PolicySpec, PortKind, PortSpec, ReservationSpec};
use crate::store::{PortRecord, Store};

pub(crate) struct KernelNet {
    pub(super) bridge: String,
    /// The switch port on the bridge's uplink TAP, where the gateway is.
    uplink: Option<PortId>,
    /// A cluster network's VXLAN device on the bridge.
    pub(super) tunnel: Option<Box<KernelTunnel>>,
}

/// A cluster network's VXLAN device: its forwarding entries and its rules, as etcd
/// last said.
pub(crate) struct KernelTunnel {
    device: String,
    /// (MAC, node) entries programmed; the all-zeros MAC for each member node.
    programmed: HashSet<(Mac, IpAddr)>,
    pub(super) rules: hostnet::nft::TunnelRules,
}

impl KernelTunnel {
    /// Programs the device for `remotes` (other nodes: members, where each MAC lives,
    /// what each holds) and `nodes` (every registered node's underlay address);
    /// whether its nftables rules changed.
    pub fn follow(&mut self, remotes: &fabric::vxlan::Remotes, nodes: &[IpAddr]) -> Result<bool, ControlError> {
        let everyone = Mac([0; 6]);
        let want: HashSet<(Mac, IpAddr)> = remotes
            .members
            .iter()
            .map(|ip| (everyone, *ip))
            .chain(remotes.macs.iter().map(|(mac, ip)| (*mac, *ip)))
            .collect();
        if want != self.programmed {
            let add = want.difference(&self.programmed).copied().collect();
            let del = self.programmed.difference(&want).copied().collect();
            kernel::program_fdb(&self.device, add, del)?;
            self.programmed = want;
        }
        let mut peers: Vec<Ipv4Addr> = nodes
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        peers.sort();
        let mut remote: Vec<hostnet::nft::RemoteGuest> = remotes
            .macs
            .iter()
            .filter_map(|(mac, node)| {
                let IpAddr::V4(node) = node else { return None };
                let lock = remotes.locks.get(mac);
                let mut ips = lock.map(|l| l.ips.clone()).unwrap_or_default();
                let mut ips6 = lock.map(|l| l.ips6.clone()).unwrap_or_default();
                ips.sort();
                ips6.sort();
                Some(hostnet::nft::RemoteGuest {
                    mac: *mac,
                    node: *node,
                    ips,
                    ips6,
                })
            })
            .collect();
        remote.sort();
        let rules = hostnet::nft::TunnelRules {
            peers,
            remote,
            ..self.rules.clone()
        };
        let changed = rules != self.rules;
        self.rules = rules;
        Ok(changed)
    }
}

fn base(spec: &NetworkSpec) -> u32 {
    u32::from(spec.subnet.network())
}

/// A kernel-mode cluster network's gateway (DHCP and DNS at the second address): the
/// same on every kernel-mode node, and never across a tunnel.
fn services_mac(network: &str) -> Mac {
    Mac::derived(&["gateway services", network])
}

impl KernelNet {
    pub fn prepare(env: &Env, spec: &NetworkSpec) -> Result<KernelNet, ControlError> {
        kernel::bring_up(env.instance, spec, kernel::router_of(spec))?;
        let mut made = KernelNet {
            bridge: kernel::bridge_name(env.instance, spec),
            uplink: None,
            tunnel: None,
        };
        if let (Scope::Cluster, Some(link)) = (spec.scope, env.cluster) {
            match KernelNet::tunnel(env, spec, link) {
                Ok(t) => made.tunnel = Some(Box::new(t)),
                Err(e) => {
                    let _ = made.tear_down(env, spec);
                    return Err(e);
                }
            }
        }
        Ok(made)
    }

    /// A cluster network's VXLAN device, made afresh; until etcd is read its rules
    /// let nothing in.
    fn tunnel(env: &Env, spec: &NetworkSpec, link: &ClusterLink) -> Result<KernelTunnel, ControlError> {
        let cfg = link.config();
        let IpAddr::V4(local) = cfg.underlay else {
            return Err(ControlError::invalid(
                "a kernel-mode node needs an IPv4 underlay address",
            ));
        };
        let opts = hostnet::VxlanOptions {
            vni: spec.vni.unwrap_or_else(|| NetworkSpec::derived_vni(&spec.name)),
            local,
            port: cfg.vxlan_port,
            mtu: spec.mtu.get().into(),
        };
        let vni = opts.vni;
        kernel::add_vxlan(env.instance, spec, opts)?;
        let device = kernel::vxlan_name(env.instance, &spec.name);
        Ok(KernelTunnel {
            rules: hostnet::nft::TunnelRules {
                ifname: device.clone(),
                port: cfg.vxlan_port,
                vni,
                peers: Vec::new(),
                kept_local: vec![kernel::bridge_mac_of(env.instance, spec), services_mac(&spec.name)],
                remote: Vec::new(),
            },
            device,
            programmed: HashSet::new(),
        })
    }

    /// Kernel mode's part of a gateway's configuration: the bridge routes, for IPv4
    /// and for the IPv6 prefix (the gateway's advertisements name it).
    pub fn gateway_config(spec: &NetworkSpec, instance: &str, cfg: &mut GatewayConfig) {
        cfg.router = Some(kernel::router_of(spec));
        cfg.router6 = spec.ipv6.map(|_| kernel::bridge_mac(instance, &spec.name));
        cfg.gateway_ip = Ipv4Addr::from(base(spec) + 2);
        cfg.dhcp_range.0 = Ipv4Addr::from(base(spec) + 3);
        if spec.scope == Scope::Cluster {
            // The bridge has the distributed gateway's MAC (the router guests know).
            cfg.gateway_mac = services_mac(&spec.name);
        }
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
        let mut devices = vec![kernel::uplink_name(env.instance, &spec.name), self.bridge.clone()];
        if spec.scope == Scope::Cluster {
            devices.insert(0, kernel::vxlan_name(env.instance, &spec.name));
        }
        self.tunnel = None;
        kernel::remove(devices)?;
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
        let ip = match (self.tunnel.is_some(), env.cluster) {
            (true, Some(link)) => claim_in_cluster(link, network, &pool, used, by_name, mac)?,
            _ => pool.assign(&used, &Default::default(), by_name)?,
        };
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
                self.release_in_cluster(env, network, ip, mac);
                Err(e)
            }
        }
    }

    /// Gives a cluster network's address back in etcd (a node that cannot reach
    /// etcd leaves it held: the address stays unused rather than given twice).
    fn release_in_cluster(&self, env: &Env, network: &str, ip: Ipv4Addr, mac: Mac) {
        if let (Some(_), Some(link)) = (&self.tunnel, env.cluster) {
            if let Err(e) = link.release(network, ip, mac) {
                tracing::warn!(%network, %ip, %mac, "cannot give the address back in etcd: {e}");
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
        let key = rec.mac.to_string();
        let held = env
            .store
            .reservations(&rec.network)?
            .into_iter()
            .find(|(k, _)| *k == key);
        let _ = unreserve(env.store, &rec.network, gateway, &key);
        if let Some((_, ip)) = held {
            self.release_in_cluster(env, &rec.network, ip, rec.mac);
        }
        Ok(())
    }
}

/// An address for a new port of a cluster network: free here and claimed in etcd,
/// so no other node's guest has it.
fn claim_in_cluster(
    link: &ClusterLink,
    network: &str,
    pool: &hostnet::ipam::Pool,
    mut used: HashSet<Ipv4Addr>,
    by_name: Option<Ipv4Addr>,
    mac: Mac,
) -> Result<Ipv4Addr, ControlError> {
    let etcd = |e: crate::cluster::ClusterError| ControlError::host(format!("etcd: {e}"));
    used.extend(link.held_addresses(network).map_err(etcd)?);
    // Each refused claim takes one address out: others may claim at the same time.
    for _ in 0..16 {
        let ip = pool.assign(&used, &Default::default(), by_name)?;
        match link.claim(network, ip, mac, u64::MAX).map_err(etcd)? {
            crate::cluster::Claim::Won | crate::cluster::Claim::Held => return Ok(ip),
            crate::cluster::Claim::TakenBy(_) if by_name.is_some() => {
                return Err(ControlError::conflict(format!(
                    "{ip}, reserved for the port, is another node's guest's"
                )))
            }
            crate::cluster::Claim::TakenBy(_) => {
                used.insert(ip);
            }
        }
    }
    Err(ControlError::conflict(
        "other nodes took every address tried; try again",
    ))
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

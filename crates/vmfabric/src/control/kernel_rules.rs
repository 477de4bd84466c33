//! This instance's nftables tables, written whole from the state of every kernel
//! network (masquerade, isolation, port locks, egress policy, forwards), their refusal
//! counters, and the start-up reconciliation of kernel devices.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};

use super::env::Env;
use super::error::ControlError;
use super::kernel_net::{stored_forwards, stored_policy, KernelNet};
use super::state::{NetState, State};
use crate::kernel;

/// A gateway egress policy in the terms of the kernel's rules (the same semantics).
fn kernel_egress(p: &gateway::policy::EgressPolicy) -> hostnet::nft::Egress {
    use gateway::policy::{Action, Proto};
    use hostnet::nft::{EgressRule, L4};
    hostnet::nft::Egress {
        rules: p
            .rules
            .iter()
            .map(|r| EgressRule {
                allow: r.action == Action::Allow,
                dst: r.dst,
                proto: r.proto.map(|p| match p {
                    Proto::Tcp => L4::Tcp,
                    Proto::Udp => L4::Udp,
                    Proto::Icmp => L4::Icmp,
                }),
                ports: r.ports,
            })
            .collect(),
        default_allow: p.default == Action::Allow,
    }
}

/// A kernel-mode guest's live connections out of its network: what the userspace
/// gateway lets one guest hold, its TCP and UDP shares together (the kernel counts
/// every protocol's conntrack entries alike).
fn kernel_flows_per_guest(spec: &crate::model::NetworkSpec, instance: &str) -> u32 {
    // The settings were checked when they were stored; the gateway's defaults stand in
    // should they ever not be.
    let cfg =
        super::gateway_config(spec, instance).unwrap_or_else(|_| gateway::GatewayConfig::new(&spec.name, spec.subnet));
    u32::try_from(cfg.tcp_flows_per_guest + cfg.udp_flows_per_guest).unwrap_or(u32::MAX)
}

/// This instance's nftables tables (both families share the name).
pub fn table(instance: &str) -> String {
    hostnet::nft::table_name(instance)
}

/// The addresses a kernel network's guests hold: each port's reservation. `None` for
/// a userspace network, whose gateway knows its guests.
pub fn held_addresses(env: &Env, network: &str, n: &NetState) -> Option<HashSet<Ipv4Addr>> {
    n.backend.kernel()?;
    Some(held_among(&env.store.reservations(network).unwrap_or_default(), n))
}

/// Of `reserved` (key, address), the addresses reserved for `n`'s ports' MACs.
fn held_among(reserved: &[(String, Ipv4Addr)], n: &NetState) -> HashSet<Ipv4Addr> {
    let macs: HashSet<String> = n.ports.values().map(|p| p.rec.mac.to_string()).collect();
    reserved
        .iter()
        .filter(|(key, _)| macs.contains(key))
        .map(|(_, ip)| *ip)
        .collect()
}

/// Writes this instance's nftables tables for every kernel network: masquerade, no
/// traffic between networks, each port held to its MAC and reserved address, the
/// egress policy and the forwards.
pub fn apply_rules(env: &Env, st: &mut State) -> Result<(), ControlError> {
    let mut rules = Vec::new();
    for n in st.nets.values() {
        let Some(k) = n.backend.kernel() else {
            continue;
        };
        let name = n.spec.name.as_str();
        // One query per network: each port's reservation (keyed by MAC).
        let reserved = env.store.reservations(name).unwrap_or_default();
        // A reservation may pin a port's DHCPv6 address instead of its MAC's own.
        let reserved6: Vec<(String, std::net::Ipv6Addr)> = match n.spec.ipv6 {
            Some(_) => env
                .store
                .reservations_with_ipv6(name)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(key, _, ip6)| Some((key, ip6?)))
                .collect(),
            None => vec![],
        };
        let policy = stored_policy(env.store, name).unwrap_or_default().to_gateway();
        let held = held_among(&reserved, n);
        // A forward whose guest is gone gets no DNAT: its clients meet the host's own
        // refusal at once instead of a guest that never answers.
        let forwards = stored_forwards(env, name)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| match (f.host, f.guest) {
                (SocketAddr::V4(host), SocketAddr::V4(guest)) if held.contains(guest.ip()) => {
                    Some(hostnet::nft::Forward {
                        proto: f.proto.as_str().to_string(),
                        host,
                        guest,
                    })
                }
                _ => None,
            })
            .collect();
        rules.push(hostnet::nft::NetworkRules {
            bridge: k.bridge.clone(),
            subnet: n.spec.subnet,
            router: kernel::router_of(&n.spec),
            egress: kernel_egress(&policy),
            ipv6: n.spec.ipv6,
            flows_per_guest: Some(kernel_flows_per_guest(&n.spec, env.instance)),
            tunnel: k.tunnel.as_ref().map(|t| t.rules.clone()),
            forwards,
            locked_ports: n
                .ports
                .values()
                .map(|p| hostnet::nft::PortLock {
                    ifname: p.rec.path.clone(),
                    mac: p.rec.mac,
                    ips: reserved
                        .iter()
                        .filter(|(key, _)| *key == p.rec.mac.to_string())
                        .map(|(_, ip)| *ip)
                        .collect(),
                    ips6: super::locks::ipv6_addresses(n.spec.ipv6, p.rec.mac)
                        .into_iter()
                        .chain(
                            reserved6
                                .iter()
                                .filter(|(key, _)| *key == p.rec.mac.to_string() || *key == p.rec.name.as_str())
                                .map(|(_, ip)| *ip),
                        )
                        .collect(),
                })
                .collect(),
        });
    }
    let table = table(env.instance);
    // Writing the tables starts their refusal counters again: keep what they held.
    if let Ok(counts) = hostnet::nft::counters(&table) {
        for (name, n) in counts {
            *st.kernel_denied.entry(name).or_default() += n;
        }
    }
    if rules.is_empty() {
        hostnet::nft::remove(&table)?;
    } else {
        hostnet::nft::apply(&table, &rules)?;
    }
    Ok(())
}

/// What a kernel network's nftables counter `counter` ("egress", "input", "flows", or
/// one of [`hostnet::nft::BRIDGE_COUNTERS`]) has counted so far, across rewrites of the
/// tables. `now` is what the counters hold at present ([`hostnet::nft::counters`]).
pub fn refused(st: &State, k: &KernelNet, now: &[(String, u64)], counter: &str) -> u64 {
    let name = hostnet::nft::counter_name(counter, &k.bridge);
    st.kernel_denied.get(&name).copied().unwrap_or(0) + now.iter().find(|(n, _)| *n == name).map_or(0, |(_, c)| *c)
}

/// After a start: removes this instance's kernel devices that the store no longer
/// knows (a crash after a delete) and writes the nftables tables again.
pub fn reconcile(env: &Env, st: &mut State) {
    let mut known = HashSet::new();
    let mut any = false;
    for n in st.nets.values() {
        if let Some(k) = n.backend.kernel() {
            any = true;
            known.insert(k.bridge.clone());
            known.insert(kernel::uplink_name(env.instance, &n.spec.name));
            known.insert(kernel::vxlan_name(env.instance, &n.spec.name));
            known.extend(n.ports.values().map(|p| p.rec.path.clone()));
        }
    }
    match kernel::remove_stale(env.instance, known) {
        Ok(gone) if !gone.is_empty() => tracing::info!(?gone, "removed stale kernel devices"),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot look for stale kernel devices: {e}"),
    }
    if any {
        // Before tables were per instance they were all called `vmfabric`: a table of
        // that name holds an older daemon's rules for devices now gone.
        if let Err(e) = hostnet::nft::remove(hostnet::nft::LEGACY_TABLE) {
            tracing::warn!("cannot remove the old shared nftables table: {e}");
        }
        if let Err(e) = apply_rules(env, st) {
            tracing::warn!("cannot write the nftables tables: {e}");
        }
    }
}

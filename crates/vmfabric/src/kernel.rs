//! Kernel-mode networks in the daemon: the Linux bridge and TAP devices (through
//! `hostnet`), and the nftables tables, kept in line with the store.
//!
//! A kernel network's bridge holds the subnet's first host address and routes (with
//! masquerade) for its guests; vmfabric's gateway serves DHCP and DNS beside it at the
//! second address, reached through an "uplink" TAP device on the bridge that the
//! userspace switch reads. Guests' ports are persistent TAP devices on the bridge that
//! their VMM opens by name. Device names are derived from the network and port names
//! (SHA-256, like MACs), so they are the same after every restart.

use std::collections::HashSet;
use std::future::Future;

use fabric::Mac;
use hostnet::{HostnetError, Links, TapOptions};

use crate::model::NetworkSpec;
use crate::store::PortRecord;

fn device_name(prefix: &str, parts: &[&str]) -> String {
    // A derived MAC is SHA-256 of the parts; four of its bytes name the device.
    let m = Mac::derived(parts).0;
    format!("{prefix}{:02x}{:02x}{:02x}{:02x}", m[1], m[2], m[3], m[4])
}

/// Names and tags are scoped by the daemon instance (its state directory), so two
/// daemons on one host never share or clean up each other's devices.
/// The network's bridge: the name it was given, or one derived from its name.
pub fn bridge_name(instance: &str, rec: &NetworkSpec) -> String {
    rec.bridge
        .clone()
        .unwrap_or_else(|| device_name("vmfb", &["bridge", instance, &rec.name]))
}

/// The bridge's MAC: stable, so guests' neighbour entries and the gateway's IPv6
/// advertisements (which name the bridge as the router) survive restarts.
pub fn bridge_mac(instance: &str, network: &str) -> Mac {
    Mac::derived(&["bridge", instance, network])
}

/// The bridge's MAC as made: a cluster network's is its gateway's, the same on every
/// node (the distributed gateway: a guest that moves keeps its router's MAC).
pub fn bridge_mac_of(instance: &str, rec: &NetworkSpec) -> Mac {
    match rec.scope {
        crate::model::Scope::Cluster => gateway::GatewayConfig::new(&rec.name, rec.subnet).gateway_mac,
        crate::model::Scope::Host => bridge_mac(instance, &rec.name),
    }
}

/// A cluster network's VXLAN device on its bridge.
pub fn vxlan_name(instance: &str, network: &str) -> String {
    device_name("vmfx", &["vxlan", instance, network])
}

pub fn uplink_name(instance: &str, network: &str) -> String {
    device_name("vmfu", &["uplink", instance, network])
}

pub fn tap_name(instance: &str, network: &str, port: &str) -> String {
    device_name("vmft", &["tap", instance, network, port])
}

/// The instance id of the daemon whose state lives in `state_dir`.
pub fn instance_of(state_dir: &std::path::Path) -> String {
    let path = state_dir.canonicalize().unwrap_or_else(|_| state_dir.to_path_buf());
    device_name("", &["instance", &path.display().to_string()])
}

/// Runs netlink work on a thread of its own: the daemon's callers may be on its tokio
/// runtime, where blocking on another future is not allowed.
fn on_netlink<T, F, Fut>(work: F) -> Result<T, HostnetError>
where
    T: Send + 'static,
    F: FnOnce(Links) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, HostnetError>>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move { work(Links::connect()?).await })
    })
    .join()
    .map_err(|_| HostnetError::Invalid("the netlink thread panicked".into()))?
}

/// The host's address on a kernel network's bridge: the subnet's first host.
pub fn router_of(rec: &NetworkSpec) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(rec.subnet.network()) + 1)
}

/// Makes (or adopts) the network's bridge with the router address and its uplink TAP.
pub fn bring_up(instance: &str, rec: &NetworkSpec, router: std::net::Ipv4Addr) -> Result<(), HostnetError> {
    let localnet = format!("/proc/sys/net/ipv4/conf/{}/route_localnet", bridge_name(instance, rec));
    let bridge_dev = bridge_name(instance, rec);
    let instance_name = instance.to_string();
    let mac = bridge_mac_of(instance, rec);
    let (name, prefix, mtu, instance) = (
        rec.name.to_string(),
        rec.subnet.prefix_len(),
        u32::from(rec.mtu),
        instance.to_string(),
    );
    on_netlink(move |links| async move {
        let tag = format!("{instance} network {name}");
        let bridge = links
            .ensure_bridge_with(&bridge_dev, &tag, router, prefix, Some(mtu), Some(mac))
            .await?;
        let opts = TapOptions {
            mtu: Some(mtu),
            ..Default::default()
        };
        let tag = format!("{instance} uplink {name}");
        links
            .ensure_tap(&uplink_name(&instance, &name), &tag, bridge, &opts)
            .await?;
        Ok(())
    })?;
    enable_forwarding();
    let bridge_v6 = |key: &str| format!("/proc/sys/net/ipv6/conf/{}/{key}", bridge_name(&instance_name, rec));
    match rec.ipv6 {
        Some(prefix) => {
            // The bridge routes the prefix at `::1` and at the link-local address the
            // gateway's advertisements name (from the bridge's MAC, whatever address
            // generation the host uses); it takes no advertisements itself.
            for (key, value) in [("disable_ipv6", "0"), ("accept_ra", "0")] {
                std::fs::write(bridge_v6(key), value)
                    .map_err(|e| HostnetError::Invalid(format!("cannot set {}: {e}", bridge_v6(key))))?;
            }
            let router6 = std::net::Ipv6Addr::from(u128::from(prefix.network()) | 1);
            let link_local = gateway::config::slaac_address(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), mac);
            let bridge_dev = bridge_name(&instance_name, rec);
            let prefix_len = prefix.prefix_len();
            on_netlink(move |links| async move {
                let index = existing(&links, &bridge_dev).await?;
                links.ensure_address6(index, link_local, 64).await?;
                links.ensure_address6(index, router6, prefix_len).await
            })?;
            enable_forwarding6();
        }
        None => {
            // No IPv6 on the bridge: the host has no link-local address there for
            // guests to reach (guests' IPv6 is dropped at their ports by the rules).
            if let Err(e) = std::fs::write(bridge_v6("disable_ipv6"), "1") {
                tracing::warn!(
                    "cannot set {} ({e}): the host keeps an IPv6 link-local address on the bridge",
                    bridge_v6("disable_ipv6")
                );
            }
        }
    }
    // Forwards from the host's loopback are DNATed out through the bridge; the
    // nftables guard keeps guests from addressing the loopback in return.
    if let Err(e) = std::fs::write(&localnet, "1") {
        tracing::warn!("cannot set {localnet} ({e}): forwards from 127.0.0.1 will not reach guests");
    }
    Ok(())
}

/// The index of the device `name` vmfabric made, which must be there.
async fn existing(links: &Links, name: &str) -> Result<u32, HostnetError> {
    links
        .index(name)
        .await?
        .ok_or_else(|| HostnetError::Invalid(format!("{name} is missing (deleted by hand?)")))
}

/// Makes (or adopts) a port's TAP device on the network's bridge.
/// The device keeps a MAC of its own: the guest's MAC goes to the VMM and the port's
/// rules, never to the host side, or the bridge would take the guest's frames.
pub fn add_port(instance: &str, bridge: &str, rec: &PortRecord, mtu: u32, isolated: bool) -> Result<(), HostnetError> {
    let (instance, bridge_dev, rec) = (instance.to_string(), bridge.to_string(), rec.clone());
    on_netlink(move |links| async move {
        let bridge = existing(&links, &bridge_dev).await?;
        let owner = match (rec.tap.owner_uid, rec.tap.owner_gid) {
            (None, None) => None,
            (uid, gid) => Some((uid.unwrap_or(0), gid.unwrap_or(0))),
        };
        let opts = TapOptions {
            mtu: Some(mtu),
            isolated,
            owner,
            multi_queue: rec.tap.multi_queue,
            vnet_hdr: rec.tap.vnet_hdr,
            ..Default::default()
        };
        let tag = format!("{instance} port {}/{}", rec.network, rec.name);
        links.ensure_tap(&rec.path, &tag, bridge, &opts).await?;
        Ok(())
    })
}

/// Makes a cluster network's VXLAN device on its bridge afresh (no forwarding entries).
pub fn add_vxlan(instance: &str, rec: &NetworkSpec, opts: hostnet::VxlanOptions) -> Result<(), HostnetError> {
    let (bridge_dev, device) = (bridge_name(instance, rec), vxlan_name(instance, &rec.name));
    let tag = format!("{instance} vxlan {}", rec.name);
    on_netlink(move |links| async move {
        let bridge = existing(&links, &bridge_dev).await?;
        links.ensure_vxlan(&device, &tag, bridge, &opts).await?;
        Ok(())
    })?;
    // Checksums are filled before encapsulation, not left to the underlay's NIC: a
    // virtual underlay (veth, virtio) hands a frame's partial checksum on as it is, and
    // a node that reads VXLAN from a socket (vmfabric's userspace VTEP) never learns
    // it was partial. (ethtool: netlink's ethtool family has no crate we use.)
    let device = vxlan_name(instance, &rec.name);
    let out = std::process::Command::new("ethtool")
        .args(["-K", &device, "tx", "off"])
        .output()
        .map_err(|e| HostnetError::Invalid(format!("ethtool: {e}")))?;
    if !out.status.success() {
        return Err(HostnetError::Invalid(format!(
            "ethtool -K {device} tx off: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Changes a VXLAN device's forwarding entries: (MAC, node) pairs; the all-zeros MAC
/// is a member that gets broadcasts.
pub fn program_fdb(
    device: &str,
    add: Vec<(Mac, std::net::IpAddr)>,
    del: Vec<(Mac, std::net::IpAddr)>,
) -> Result<(), HostnetError> {
    let device = device.to_string();
    on_netlink(move |links| async move {
        let index = existing(&links, &device).await?;
        for (mac, dst) in del {
            links.fdb_del(index, mac, dst).await?;
        }
        for (mac, dst) in add {
            links.fdb_add(index, mac, dst).await?;
        }
        Ok(())
    })
}

/// Deletes devices vmfabric made (missing ones are fine).
pub fn remove(names: Vec<String>) -> Result<(), HostnetError> {
    on_netlink(move |links| async move {
        for n in names {
            links.remove(&n).await?;
        }
        Ok(())
    })
}

/// Deletes the devices vmfabric made that the store no longer knows (a crash after a
/// network or port was deleted); returns their names.
pub fn remove_stale(instance: &str, known: HashSet<String>) -> Result<Vec<String>, HostnetError> {
    let instance = instance.to_string();
    on_netlink(move |links| async move { links.remove_stale(&instance, &known).await })
}

/// Kernel networks with IPv6 route it too. Forwarding turns every interface into a
/// router, and a router ignores Router Advertisements unless `accept_ra` is 2: the
/// interfaces that take them now (1) are moved to 2 first, so the host keeps the
/// addresses and routes its own uplinks learn (what libvirt asks operators to do).
fn enable_forwarding6() {
    const ALL: &str = "/proc/sys/net/ipv6/conf/all/forwarding";
    if std::fs::read_to_string(ALL).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    let interfaces = std::fs::read_dir("/proc/sys/net/ipv6/conf")
        .into_iter()
        .flatten()
        .flatten();
    for dir in interfaces {
        let accept_ra = dir.path().join("accept_ra");
        if std::fs::read_to_string(&accept_ra).is_ok_and(|v| v.trim() == "1") {
            match std::fs::write(&accept_ra, "2") {
                Ok(()) => tracing::info!(
                    "{}: accept_ra 1 -> 2, to keep taking Router Advertisements with IPv6 forwarding on",
                    dir.file_name().to_string_lossy()
                ),
                Err(e) => tracing::warn!("cannot set {} to 2 ({e})", accept_ra.display()),
            }
        }
    }
    match std::fs::write(ALL, "1") {
        Ok(()) => tracing::info!("enabled IPv6 forwarding for kernel-mode networks with IPv6"),
        Err(e) => {
            tracing::warn!("cannot enable IPv6 forwarding ({e}): kernel-mode guests reach only the host over IPv6")
        }
    }
}

/// Kernel networks route between the guests and the host's uplinks.
fn enable_forwarding() {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    match std::fs::write(PATH, "1") {
        Ok(()) => tracing::info!("enabled IPv4 forwarding for kernel-mode networks"),
        Err(e) => tracing::warn!("cannot enable IPv4 forwarding ({e}): kernel-mode guests reach only the host"),
    }
}

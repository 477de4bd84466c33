//! Bridges and TAP devices through netlink, idempotent and crash-safe: what vmfabric
//! created carries its alias and is adopted when found again; a device of the same name
//! without it is somebody else's and is never touched.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{LinkBridge, LinkBridgePort, LinkUnspec, LinkVxlan};

use crate::{HostnetError, ALIAS_PREFIX};

const EEXIST: i32 = -libc::EEXIST;
const ENODEV: i32 = -libc::ENODEV;

/// A device vmfabric made, as found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedLink {
    pub index: u32,
    pub name: String,
    /// The alias after [`ALIAS_PREFIX`]: what vmfabric noted about it.
    pub tag: String,
    /// The bridge it is attached to, if any.
    pub controller: Option<u32>,
}

/// How a port's TAP device is made.
#[derive(Debug, Clone, Default)]
pub struct TapOptions {
    /// uid and gid allowed to open it (an unprivileged VMM).
    pub owner: Option<(u32, u32)>,
    pub multi_queue: bool,
    pub vnet_hdr: bool,
    /// The host side's MAC (never the guest's: the bridge would take the guest's frames
    /// for itself).
    pub mac: Option<fabric::Mac>,
    /// Bridge port isolation: no frames to or from other isolated ports (the gateway's
    /// uplink and the bridge itself stay reachable).
    pub isolated: bool,
    pub mtu: Option<u32>,
}

/// How a network's VXLAN device is made: RFC 7348 encapsulation as Linux and
/// vmfabric's userspace VTEP both speak it.
#[derive(Debug, Clone)]
pub struct VxlanOptions {
    pub vni: u32,
    /// This host's underlay address: datagrams leave from it.
    pub local: Ipv4Addr,
    pub port: u16,
    pub mtu: u32,
}

/// A netlink connection in the network namespace of the thread that opened it.
pub struct Links {
    handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Links {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn code(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code()),
        _ => None,
    }
}

fn describe(msg: &LinkMessage) -> (String, Option<String>, Option<u32>) {
    let (mut name, mut alias, mut controller) = (String::new(), None, None);
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::IfAlias(s) => alias = Some(s.clone()),
            LinkAttribute::Controller(c) => controller = Some(*c),
            _ => {}
        }
    }
    (name, alias, controller)
}

fn valid_name(name: &str) -> Result<(), HostnetError> {
    fabric::check_ifname(name).map_err(|e| HostnetError::Invalid(e.to_string()))
}

impl Links {
    /// Opens the connection; call inside a tokio runtime, on a thread in the namespace
    /// to manage.
    pub fn connect() -> Result<Links, HostnetError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        Ok(Links { handle, task })
    }

    /// The device named `name`: `Ok(None)` when there is none.
    async fn find(&self, name: &str) -> Result<Option<LinkMessage>, HostnetError> {
        let mut s = self.handle.link().get().match_name(name.to_string()).execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if code(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The index of `name` if vmfabric made it; an error if somebody else did.
    async fn ours(&self, name: &str) -> Result<Option<u32>, HostnetError> {
        match self.find(name).await? {
            None => Ok(None),
            Some(m) => match describe(&m).1 {
                Some(a) if a.starts_with(ALIAS_PREFIX) => Ok(Some(m.header.index)),
                _ => Err(HostnetError::Foreign { name: name.to_string() }),
            },
        }
    }

    async fn index_of(&self, name: &str) -> Result<u32, HostnetError> {
        self.find(name)
            .await?
            .map(|m| m.header.index)
            .ok_or_else(|| HostnetError::Invalid(format!("{name} vanished while being set up")))
    }

    /// Makes (or adopts) the bridge `name` with the gateway's address, tagged `tag`, up.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        tag: &str,
        addr: Ipv4Addr,
        prefix: u8,
        mtu: Option<u32>,
    ) -> Result<u32, HostnetError> {
        self.ensure_bridge_with(name, tag, addr, prefix, mtu, None).await
    }

    /// [`Links::ensure_bridge`] with a fixed MAC, so the bridge's address does not follow
    /// whichever port happens to have the lowest.
    pub async fn ensure_bridge_with(
        &self,
        name: &str,
        tag: &str,
        addr: Ipv4Addr,
        prefix: u8,
        mtu: Option<u32>,
        mac: Option<fabric::Mac>,
    ) -> Result<u32, HostnetError> {
        valid_name(name)?;
        let index = match self.ours(name).await? {
            Some(i) => i,
            None => {
                match self.handle.link().add(LinkBridge::new(name).build()).execute().await {
                    Ok(()) => {}
                    // Made by a racing call a moment ago: the alias check below tells.
                    Err(e) if code(&e) == Some(EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                self.index_of(name).await?
            }
        };
        let mut set = LinkUnspec::new_with_index(index)
            .alias(format!("{ALIAS_PREFIX}{tag}"))
            .up();
        if let Some(mtu) = mtu {
            set = set.mtu(mtu);
        }
        if let Some(mac) = mac {
            set = set.address(mac.0.to_vec());
        }
        self.handle.link().set(set.build()).execute().await?;
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(index),
            Err(e) if code(&e) == Some(EEXIST) => Ok(index),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the device `index` the IPv6 address `addr/prefix` (kept if it is there),
    /// usable at once: no duplicate address detection, since the address is vmfabric's
    /// by construction (the router's `::1` of a prefix of its own).
    pub async fn ensure_address6(&self, index: u32, addr: std::net::Ipv6Addr, prefix: u8) -> Result<(), HostnetError> {
        use rtnetlink::packet_route::address::AddressHeaderFlags;
        let mut add = self.handle.address().add(index, IpAddr::V6(addr), prefix);
        add.message_mut().header.flags = AddressHeaderFlags::Nodad;
        match add.execute().await {
            Ok(()) => Ok(()),
            Err(e) if code(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes (or adopts) the persistent TAP device `name`, tagged `tag`, on `bridge`, up.
    pub async fn ensure_tap(&self, name: &str, tag: &str, bridge: u32, opts: &TapOptions) -> Result<u32, HostnetError> {
        valid_name(name)?;
        if self.ours(name).await?.is_none() {
            make_persistent_tap(name, opts.owner, opts.multi_queue, opts.vnet_hdr)?;
        }
        let index = self.index_of(name).await?;
        let mut set = LinkUnspec::new_with_index(index)
            .alias(format!("{ALIAS_PREFIX}{tag}"))
            .controller(bridge)
            .up();
        if let Some(mac) = opts.mac {
            set = set.address(mac.0.to_vec());
        }
        if let Some(mtu) = opts.mtu {
            set = set.mtu(mtu);
        }
        self.handle.link().set(set.build()).execute().await?;
        let port = LinkBridgePort::new(index).isolated(opts.isolated).build();
        self.handle.link().set_port(port).execute().await?;
        Ok(index)
    }

    /// Makes the VXLAN device `name`, tagged `tag`, on `bridge`, up, with an empty
    /// forwarding table: one found from before is made again, so no entry of a past
    /// run outlives it. No learning: where a MAC lives is programmed ([`Self::fdb_add`]).
    pub async fn ensure_vxlan(
        &self,
        name: &str,
        tag: &str,
        bridge: u32,
        opts: &VxlanOptions,
    ) -> Result<u32, HostnetError> {
        valid_name(name)?;
        if let Some(old) = self.ours(name).await? {
            self.handle.link().del(old).execute().await?;
        }
        let link = LinkVxlan::new(name, opts.vni)
            .local(opts.local)
            .port(opts.port)
            .learning(false)
            .mtu(opts.mtu)
            .build();
        self.handle.link().add(link).execute().await?;
        let index = self.index_of(name).await?;
        // Before it is up: the device itself is no host on the network, and with IPv6
        // it would send its own solicitations and reports into the tunnel, in a MAC no
        // node's guest has (the others count them as foreign).
        let no_ipv6 = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
        if let Err(e) = std::fs::write(&no_ipv6, "1") {
            tracing::debug!("{no_ipv6}: {e} (a host without IPv6)");
        }
        let set = LinkUnspec::new_with_index(index)
            .alias(format!("{ALIAS_PREFIX}{tag}"))
            .controller(bridge)
            .up();
        self.handle.link().set(set.build()).execute().await?;
        // The bridge does not learn on it either: remote MACs stay where etcd says.
        let port = LinkBridgePort::new(index).learning(false).build();
        self.handle.link().set_port(port).execute().await?;
        Ok(index)
    }

    /// Sends frames for `mac` on the VXLAN device `index` to `dst`, and has the bridge
    /// send them to the device (a static entry: it does not learn there). The
    /// all-zeros MAC adds `dst` to those that get broadcasts and unknown unicast
    /// (head-end replication: one entry per member, hence appended, not replaced).
    pub async fn fdb_add(&self, index: u32, mac: fabric::Mac, dst: IpAddr) -> Result<(), HostnetError> {
        use rtnetlink::packet_core::{NLM_F_APPEND, NLM_F_REPLACE};
        if mac == fabric::Mac([0; 6]) {
            return self
                .neighbour_request(fdb_entry(index, mac, Some(dst)), NLM_F_APPEND)
                .await;
        }
        self.neighbour_request(fdb_entry(index, mac, Some(dst)), NLM_F_REPLACE)
            .await?;
        self.neighbour_request(fdb_entry(index, mac, None), NLM_F_REPLACE).await
    }

    /// Takes back what [`Self::fdb_add`] programmed; an entry already gone is fine.
    pub async fn fdb_del(&self, index: u32, mac: fabric::Mac, dst: IpAddr) -> Result<(), HostnetError> {
        const ENOENT: i32 = -libc::ENOENT;
        let mut entries = vec![fdb_entry(index, mac, Some(dst))];
        if mac != fabric::Mac([0; 6]) {
            entries.push(fdb_entry(index, mac, None));
        }
        for entry in entries {
            match self.handle.neighbours().del(entry).execute().await {
                Err(e) if code(&e) == Some(ENOENT) => {}
                r => r?,
            }
        }
        Ok(())
    }

    /// A new neighbour entry with the creation flag `how` (rtnetlink's own request
    /// cannot append).
    async fn neighbour_request(
        &self,
        entry: rtnetlink::packet_route::neighbour::NeighbourMessage,
        how: u16,
    ) -> Result<(), HostnetError> {
        use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST};
        use rtnetlink::packet_route::RouteNetlinkMessage;
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(entry));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | how;
        let mut handle = self.handle.clone();
        let mut answers = handle.request(req)?;
        while let Some(m) = futures_util::StreamExt::next(&mut answers).await {
            match m.payload {
                // Appending an entry that is there already.
                NetlinkPayload::Error(e) if e.raw_code() == EEXIST => {}
                NetlinkPayload::Error(e) => return Err(rtnetlink::Error::NetlinkError(e).into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// The index of the device vmfabric made under `name`, if there is one.
    pub async fn index(&self, name: &str) -> Result<Option<u32>, HostnetError> {
        self.ours(name).await
    }

    /// Every device vmfabric made in this namespace.
    pub async fn owned(&self) -> Result<Vec<OwnedLink>, HostnetError> {
        let mut s = self.handle.link().get().execute();
        let mut found = Vec::new();
        while let Some(m) = s.try_next().await? {
            let (name, alias, controller) = describe(&m);
            if let Some(tag) = alias.as_deref().and_then(|a| a.strip_prefix(ALIAS_PREFIX)) {
                found.push(OwnedLink {
                    index: m.header.index,
                    name,
                    tag: tag.to_string(),
                    controller,
                });
            }
        }
        Ok(found)
    }

    /// Deletes a device vmfabric made (by name); false when there is none.
    pub async fn remove(&self, name: &str) -> Result<bool, HostnetError> {
        match self.ours(name).await? {
            Some(index) => {
                self.handle.link().del(index).execute().await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Deletes every device vmfabric made whose tag starts with `scope` (one daemon's
    /// devices, when several run) and whose name is not in `known` (left by a crash
    /// after its network or port was deleted); returns their names. Devices without
    /// vmfabric's alias are never touched.
    pub async fn remove_stale(&self, scope: &str, known: &HashSet<String>) -> Result<Vec<String>, HostnetError> {
        let mut gone = Vec::new();
        for l in self.owned().await? {
            if l.tag.starts_with(scope) && !known.contains(&l.name) {
                self.handle.link().del(l.index).execute().await?;
                tracing::info!(device = %l.name, tag = %l.tag, "removed a stale vmfabric device");
                gone.push(l.name);
            }
        }
        Ok(gone)
    }
}

/// With `dst`, the VXLAN device's own forwarding entry (`bridge fdb ... dev VXLAN dst
/// IP self permanent`); without, the bridge's static entry for the MAC on that device
/// (`... master static`).
fn fdb_entry(
    index: u32,
    mac: fabric::Mac,
    dst: Option<IpAddr>,
) -> rtnetlink::packet_route::neighbour::NeighbourMessage {
    use rtnetlink::packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    };
    use rtnetlink::packet_route::AddressFamily;
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    match dst {
        Some(dst) => {
            m.header.state = NeighbourState::Permanent;
            m.header.flags = NeighbourFlags::Own;
            m.attributes.push(NeighbourAttribute::Destination(match dst {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        }
        None => {
            // Permanent would make it the bridge's own address; static is NOARP.
            m.header.state = NeighbourState::Noarp;
            m.header.flags = NeighbourFlags::Controller;
        }
    }
    m
}

/// Creates the TAP device `name` if it does not exist (an existing one is reused) and
/// makes it persistent, owned by `owner` (uid, gid) when given, so an unprivileged VMM
/// can open it. The fd used to set it up is closed on return.
fn make_persistent_tap(
    name: &str,
    owner: Option<(u32, u32)>,
    multi_queue: bool,
    vnet_hdr: bool,
) -> std::io::Result<()> {
    let tun = fabric::Tun::open(
        name,
        fabric::TunOptions {
            nonblocking: false,
            multi_queue,
            vnet_hdr,
        },
    )?;
    if let Some((uid, gid)) = owner {
        tun.set_owner(uid)?;
        tun.set_group(gid)?;
    }
    tun.set_persist(true)
}

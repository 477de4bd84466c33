//! NAT and isolation for kernel-mode networks with nftables.
//!
//! Each vmfabric instance owns one table, `inet vmfabric_<instance>` ([`table_name`]),
//! and never touches another (two daemons on one host keep their rules apart). The
//! table is
//! written whole from the desired state in one nft transaction (the table is added,
//! deleted and built again in the same batch, which the kernel applies atomically):
//! removing a network or a forward re-applies without it, so exactly its rules go, and
//! a restart after a crash converges to the store's state. Rules (through the
//! `nftables` crate and the `nft` binary):
//! - postrouting (nat): traffic from a network's subnet leaving for anywhere else is
//!   masqueraded;
//! - prerouting and output (nat): each forward DNATs `host address:port` to the guest,
//!   for clients arriving from outside and for clients on the host itself;
//! - forward (filter): what a guest sends out of its network passes the network's
//!   egress policy with the userspace gateway's semantics (gateway::policy): ordered
//!   rules, first match decides, the built-in denies (169.254.0.0/16, the other vmfabric
//!   networks; the host's own addresses are input's) lifted only by an explicit allow,
//!   then the default; refusals answered with a TCP reset or ICMP administratively
//!   prohibited, counted in `egress_denied_<bridge>`;
//!   Before the policy, a guest's new connections leaving its network are bounded per
//!   guest address (a port sends only from its own): past `flows_per_guest` live
//!   conntrack entries, refused the same way and counted in `flows_denied_<bridge>`,
//!   so one guest cannot fill the host's conntrack table for the others;
//! - input (filter): a guest reaches the host only for ICMP echo to the router and what
//!   an explicit allow rule names (forwards are DNAT'd before input and pass through
//!   forward); everything else is refused and counted in `input_denied_<bridge>`. DHCP
//!   and DNS are the gateway's, reached on the bridge, never the host's input.
//!
//! Port security needs the bridge family, so a second table of the same name, `bridge`
//! family, written
//! in the same transaction: a locked port (its MAC and leased addresses) may send only
//! from that MAC, and IPv4 and ARP only from those addresses (0.0.0.0 stays allowed for
//! DHCP and ARP probes), like the userspace switch's port locks; no port may send
//! VLAN-tagged frames (the kernel's address checks would not see inside them) or, on a
//! network without IPv6, IPv6 (the bridge itself has IPv6 disabled).
//!
//! On a network with an IPv6 prefix the bridge routes it at the prefix's `::1` (the
//! gateway's advertisements name the bridge), and the same rules hold for IPv6: a
//! port sends only from its link-local, SLAAC and DHCPv6 addresses (`::` for duplicate
//! address detection), never a Router Advertisement, redirect or DHCPv6 server message
//! (RA guard), and no Neighbour Advertisement, nor a DAD probe, for an address not its
//! own; guests leave masqueraded (NAT66: the prefix is a unique local one, which the
//! outside could not route back; the documented choice), under the same egress policy,
//! flow bound and isolation as IPv4; they reach the host only for ping to `::1` and
//! Neighbour Discovery.

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nftables::batch::Batch;
use nftables::expr::{
    Expression, Meta, MetaKey, NamedExpression, Payload, PayloadBase, PayloadField, PayloadRaw, Prefix, Range, SetItem,
    CT,
};
use nftables::schema::{
    self, Chain, Counter, NfCmd, NfListObject, NfObject, Nftables, Rule, SetType, SetTypeValue, Table,
};
use nftables::stmt::{self, Match, NATFamily, Operator, Reject, RejectType, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};

use crate::HostnetError;

/// The tables' name before tables were per instance (removed at start: see
/// [`remove`]).
pub const LEGACY_TABLE: &str = "vmfabric";

/// The rule builders below describe objects of one table; its name is set last, by
/// [`in_table`], so the builders need not carry it.
const UNNAMED: &str = "vmfabric";

/// The name of an instance's tables (nft names take letters, digits and '_').
pub fn table_name(instance: &str) -> String {
    let id: String = instance.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    format!("vmfabric_{id}")
}

/// Puts every object of a batch in `table`.
fn in_table(mut nft: Nftables<'static>, table: &str) -> Nftables<'static> {
    let name: Cow<'static, str> = Cow::Owned(table.to_string());
    for obj in nft.objects.to_mut().iter_mut() {
        // The builders only add and delete tables, chains, rules and counters.
        let list = match obj {
            NfObject::ListObject(l) | NfObject::CmdObject(NfCmd::Add(l) | NfCmd::Delete(l)) => l,
            _ => continue,
        };
        match list {
            NfListObject::Table(t) => t.name = name.clone(),
            NfListObject::Chain(c) => c.table = name.clone(),
            NfListObject::Rule(r) => r.table = name.clone(),
            NfListObject::Counter(c) => c.table = name.clone(),
            NfListObject::Set(set) => set.table = name.clone(),
            _ => {}
        }
    }
    nft
}

const LOOPBACK: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8);

/// A forward: connections to `host` (any local address when unspecified) go to `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// "tcp" or "udp".
    pub proto: String,
    pub host: SocketAddrV4,
    pub guest: SocketAddrV4,
}

/// A port locked to its MAC and addresses (an empty list: only DHCP and ARP probes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortLock {
    pub ifname: String,
    pub mac: fabric::Mac,
    pub ips: Vec<Ipv4Addr>,
    /// On a network with IPv6: the addresses the port may send from and claim.
    pub ips6: Vec<Ipv6Addr>,
}

/// The layer-4 protocols an egress rule may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
    Icmp,
}

/// One egress rule: what the gateway's `policy::Rule` says, for nftables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    pub allow: bool,
    /// Of either IP version; a rule matches only its own version's traffic.
    pub dst: IpNet,
    /// `None`: every protocol.
    pub proto: Option<L4>,
    /// Inclusive range; `None`: every port (and ICMP).
    pub ports: Option<(u16, u16)>,
}

/// A network's egress policy: ordered rules, then the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    pub rules: Vec<EgressRule>,
    pub default_allow: bool,
}

impl Default for Egress {
    fn default() -> Self {
        Egress {
            rules: Vec::new(),
            default_allow: true,
        }
    }
}

/// What the tables hold for one kernel-mode network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRules {
    pub bridge: String,
    pub subnet: Ipv4Net,
    /// The host's address on the bridge (guests may ping it).
    pub router: Ipv4Addr,
    pub forwards: Vec<Forward>,
    pub locked_ports: Vec<PortLock>,
    pub egress: Egress,
    /// The network's IPv6 prefix, routed by the bridge at its `::1`; `None`: guests'
    /// IPv6 is dropped at their ports.
    pub ipv6: Option<Ipv6Net>,
    /// Live connections out of the network each guest address may hold (`None`: no
    /// bound).
    pub flows_per_guest: Option<u32>,
    /// A cluster network's VXLAN device on the bridge.
    pub tunnel: Option<TunnelRules>,
}

/// What a cluster network's VXLAN device may carry: datagrams only from the cluster's
/// nodes, frames only from other nodes' guests (each from the addresses it holds),
/// and never the gateway's own frames (it is the same gateway on every node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRules {
    pub ifname: String,
    /// The UDP port VXLAN arrives on.
    pub port: u16,
    pub vni: u32,
    /// The registered nodes' underlay addresses.
    pub peers: Vec<Ipv4Addr>,
    /// MACs every node has as its own: the gateway's and the router's.
    pub kept_local: Vec<fabric::Mac>,
    /// Other nodes' guests.
    pub remote: Vec<RemoteGuest>,
}

/// A guest on another node: its MAC, that node's underlay address, and the addresses
/// it holds (IPv6 ones where the network carries IPv6).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteGuest {
    pub mac: fabric::Mac,
    pub node: Ipv4Addr,
    pub ips: Vec<Ipv4Addr>,
    pub ips6: Vec<Ipv6Addr>,
}

/// What a tunnel's refusals are counted as: frames (bridge family), datagrams from
/// strangers and datagrams in another node's guest's name (inet).
pub const TUNNEL_COUNTERS: [&str; 3] = ["tunnel", "vxlan", "foreign"];

const LINK_LOCAL: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16);

impl NetworkRules {
    /// The bridge's address on the IPv6 prefix.
    pub fn router6(&self) -> Option<Ipv6Addr> {
        Some(Ipv6Addr::from(u128::from(self.ipv6?.network()) | 1))
    }
}

/// The address field of `dst`'s IP version ("ip" or "ip6").
fn ip_field(dst: &IpNet, name: &'static str) -> Expression<'static> {
    match dst {
        IpNet::V4(_) => field("ip", name),
        IpNet::V6(_) => field("ip6", name),
    }
}

/// The named counter of refusals in a network's forward (egress) or input chain.
pub fn counter_name(chain: &str, bridge: &str) -> String {
    format!("{chain}_denied_{bridge}")
}

fn number(n: u32) -> Expression<'static> {
    Expression::Number(n)
}

fn established() -> Statement<'static> {
    is(
        Expression::Named(NamedExpression::CT(CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        Operator::IN,
        set([text("established"), text("related")]),
    )
}

fn l4proto(p: L4) -> Expression<'static> {
    text(match p {
        L4::Tcp => "tcp",
        L4::Udp => "udp",
        L4::Icmp => "icmp",
    })
}

/// The matches of an egress rule, as the gateway's `Rule::matches` reads it: a port
/// range matches TCP and UDP only.
fn egress_match(r: &EgressRule) -> Vec<Statement<'static>> {
    let mut m = vec![is(ip_field(&r.dst, "daddr"), Operator::EQ, prefix(r.dst))];
    match (r.proto, r.ports) {
        (Some(p), _) => m.push(is(meta(MetaKey::L4proto), Operator::EQ, l4proto(p))),
        (None, Some(_)) => m.push(is(
            meta(MetaKey::L4proto),
            Operator::IN,
            set([l4proto(L4::Tcp), l4proto(L4::Udp)]),
        )),
        (None, None) => {}
    }
    if let Some((lo, hi)) = r.ports {
        let range = Expression::Range(Box::new(Range {
            range: [number(u32::from(lo)), number(u32::from(hi))],
        }));
        m.push(is(field("th", "dport"), Operator::EQ, range));
    }
    m
}

/// Refusals as the userspace gateway answers them: TCP with a reset, the rest with
/// ICMP administratively prohibited; each counted.
fn refusals(chain: &'static str, base: Vec<Statement<'static>>, counter: &str) -> Vec<NfListObject<'static>> {
    let count = || Statement::Counter(stmt::Counter::Named(counter.to_string().into()));
    let mut tcp = base.clone();
    tcp.push(is(meta(MetaKey::L4proto), Operator::EQ, l4proto(L4::Tcp)));
    tcp.push(count());
    tcp.push(Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))));
    let mut rest = base;
    rest.push(count());
    rest.push(Statement::Reject(Some(Reject::new(
        Some(RejectType::ICMPX),
        Some(RejectCode::AdminProhibited),
    ))));
    vec![rule(chain, tcp), rule(chain, rest)]
}

fn field(protocol: &'static str, name: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: name.into(),
    })))
}

fn prefix(net: impl Into<IpNet>) -> Expression<'static> {
    let net: IpNet = net.into();
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(net.network().to_string().into())),
        len: u32::from(net.prefix_len()),
    }))
}

/// The 128 bits of an ICMPv6 Neighbour Solicitation's or Advertisement's target
/// address (after type, code, checksum and 32 bits of flags). Raw: nft 1.0.6 (Debian
/// 12) has no `icmpv6 taddr`.
fn nd_target() -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadRaw(PayloadRaw {
        base: PayloadBase::TH,
        offset: 64,
        len: 128,
    })))
}

/// An IPv6 address as the integer a raw 128-bit payload compares with.
fn raw128(a: Ipv6Addr) -> Expression<'static> {
    text(format!("{:#034x}", u128::from(a)))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn is(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn text(s: impl ToString) -> Expression<'static> {
    Expression::String(s.to_string().into())
}

fn chain(name: &'static str, kind: NfChainType, hook: NfHook, prio: i32) -> NfListObject<'static> {
    family_chain(NfFamily::INet, name, kind, hook, prio)
}

fn family_chain(
    family: NfFamily,
    name: &'static str,
    kind: NfChainType,
    hook: NfHook,
    prio: i32,
) -> NfListObject<'static> {
    NfListObject::Chain(Chain {
        family,
        table: UNNAMED.into(),
        name: name.into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Default::default()
    })
}

fn rule(chain: &'static str, expr: Vec<Statement<'static>>) -> NfListObject<'static> {
    family_rule(NfFamily::INet, chain, expr)
}

fn family_rule(family: NfFamily, chain: &'static str, expr: Vec<Statement<'static>>) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family,
        table: UNNAMED.into(),
        chain: chain.into(),
        expr: Cow::Owned(expr),
        ..Default::default()
    })
}

fn family_table(family: NfFamily) -> NfListObject<'static> {
    NfListObject::Table(Table {
        family,
        name: UNNAMED.into(),
        ..Default::default()
    })
}

fn set(items: impl IntoIterator<Item = Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(items.into_iter().map(SetItem::Element).collect()))
}

/// The bridge-family rules that hold a port to its MAC and addresses.
fn port_lock_rules(lock: &PortLock) -> Vec<Vec<Statement<'static>>> {
    let from_port = || is(meta(MetaKey::Iifname), Operator::EQ, text(&lock.ifname));
    let allowed = || set(lock.ips.iter().copied().chain([Ipv4Addr::UNSPECIFIED]).map(text));
    vec![
        vec![
            from_port(),
            is(field("ether", "saddr"), Operator::NEQ, text(lock.mac)),
            Statement::Drop(None),
        ],
        vec![
            from_port(),
            is(
                field("ether", "type"),
                Operator::IN,
                set([number(0x8100), number(0x88a8), number(0x9100)]),
            ),
            Statement::Drop(None),
        ],
        vec![
            from_port(),
            is(field("ip", "saddr"), Operator::NEQ, allowed()),
            Statement::Drop(None),
        ],
        vec![
            from_port(),
            is(field("arp", "saddr ip"), Operator::NEQ, allowed()),
            Statement::Drop(None),
        ],
    ]
}

/// What the bridge table counts per network with IPv6, as the userspace switch's port
/// drops do: Router Advertisements and redirects, DHCPv6 server messages, and IPv6
/// sources or Neighbour Discovery targets a port does not hold.
pub const BRIDGE_COUNTERS: [&str; 3] = ["rogue_ra", "rogue_dhcp6", "spoofed6"];

/// The bridge-family rules that hold a port to its IPv6 addresses on a network with
/// IPv6 (`bridge`).
fn port_lock_rules6(lock: &PortLock, bridge: &str) -> Vec<Vec<Statement<'static>>> {
    let from_port = || vec![is(meta(MetaKey::Iifname), Operator::EQ, text(&lock.ifname))];
    lock_rules6(from_port, &lock.ips6, bridge, None)
}

/// The bridge-family rules that hold a sender (`who` matches it: a port, or a remote
/// guest's MAC arriving by a tunnel) to the IPv6 addresses `ips6` on a network with
/// IPv6 (`bridge`): its sources, the targets it may advertise or probe, and no router
/// or DHCPv6 server messages; each drop counted by its kind, or all as `count_as`.
fn lock_rules6(
    who: impl Fn() -> Vec<Statement<'static>>,
    ips6: &[Ipv6Addr],
    bridge: &str,
    count_as: Option<&str>,
) -> Vec<Vec<Statement<'static>>> {
    let icmp6_type = |t: &str| is(field("icmpv6", "type"), Operator::EQ, text(t));
    // Not its own: every target when it has none (an empty set is no nft expression).
    let not_own_target = || match ips6.is_empty() {
        true => vec![],
        false => vec![is(nd_target(), Operator::NEQ, set(ips6.iter().copied().map(raw128)))],
    };
    let counted_drop = |counter: &str, matches: Vec<Statement<'static>>| {
        let mut all = who();
        all.extend(matches);
        all.push(Statement::Counter(stmt::Counter::Named(
            counter_name(count_as.unwrap_or(counter), bridge).into(),
        )));
        all.push(Statement::Drop(None));
        all
    };
    let sources = set(ips6.iter().copied().chain([Ipv6Addr::UNSPECIFIED]).map(text));
    let mut advert = vec![icmp6_type("nd-neighbor-advert")];
    advert.extend(not_own_target());
    // A duplicate address probe (from ::) for another's address would make its owner
    // give the address up.
    let mut probe = vec![
        is(field("ip6", "saddr"), Operator::EQ, text(Ipv6Addr::UNSPECIFIED)),
        icmp6_type("nd-neighbor-solicit"),
    ];
    probe.extend(not_own_target());
    vec![
        counted_drop("spoofed6", vec![is(field("ip6", "saddr"), Operator::NEQ, sources)]),
        counted_drop(
            "rogue_ra",
            vec![is(
                field("icmpv6", "type"),
                Operator::IN,
                set([text("nd-router-advert"), text("nd-redirect")]),
            )],
        ),
        counted_drop(
            "rogue_dhcp6",
            vec![
                is(meta(MetaKey::L4proto), Operator::EQ, l4proto(L4::Udp)),
                is(field("th", "sport"), Operator::EQ, number(547)),
            ],
        ),
        counted_drop("spoofed6", advert),
        counted_drop("spoofed6", probe),
    ]
}

fn dnat(f: &Forward) -> Result<Vec<Statement<'static>>, HostnetError> {
    let proto: &'static str = match f.proto.as_str() {
        "tcp" => "tcp",
        "udp" => "udp",
        other => {
            return Err(HostnetError::Invalid(format!(
                "forward protocol {other:?} is not tcp or udp"
            )))
        }
    };
    let mut expr = Vec::new();
    if !f.host.ip().is_unspecified() {
        expr.push(is(field("ip", "daddr"), Operator::EQ, text(f.host.ip())));
    }
    expr.push(is(
        field(proto, "dport"),
        Operator::EQ,
        Expression::Number(u32::from(f.host.port())),
    ));
    expr.push(Statement::DNAT(Some(NAT {
        addr: Some(text(f.guest.ip())),
        family: Some(NATFamily::IP),
        port: Some(Expression::Number(u32::from(f.guest.port()))),
        flags: None,
    })));
    Ok(expr)
}

/// The whole table `table` for `networks`, as one transaction.
pub fn ruleset(table: &str, networks: &[NetworkRules]) -> Result<Nftables<'static>, HostnetError> {
    Ok(in_table(unnamed_ruleset(networks)?, table))
}

fn unnamed_ruleset(networks: &[NetworkRules]) -> Result<Nftables<'static>, HostnetError> {
    let mut b = Batch::new();
    // Add-then-delete empties a table whether or not it existed.
    for family in [NfFamily::INet, NfFamily::Bridge] {
        b.add(family_table(family));
        b.delete(family_table(family));
        b.add(family_table(family));
    }
    b.add(family_chain(
        NfFamily::Bridge,
        "ports",
        NfChainType::Filter,
        NfHook::Prerouting,
        -200,
    ));
    b.add(chain("postrouting", NfChainType::NAT, NfHook::Postrouting, 100));
    b.add(chain("prerouting", NfChainType::NAT, NfHook::Prerouting, -100));
    b.add(chain("output", NfChainType::NAT, NfHook::Output, -100));
    b.add(chain("forward", NfChainType::Filter, NfHook::Forward, 0));
    b.add(chain("input", NfChainType::Filter, NfHook::Input, 0));
    b.add(chain("guard", NfChainType::Filter, NfHook::Prerouting, -300));
    if networks.iter().any(|n| n.tunnel.is_some()) {
        // Frames leaving by a tunnel: bridged from a port, or the bridge's own.
        for (name, hook) in [("tunnel_out", NfHook::Forward), ("tunnel_own", NfHook::Output)] {
            b.add(family_chain(NfFamily::Bridge, name, NfChainType::Filter, hook, 0));
        }
    }
    for n in networks {
        if n.flows_per_guest.is_some() {
            let families = [(IpFamily::V4, true), (IpFamily::V6, n.ipv6.is_some())];
            for family in families.into_iter().filter_map(|(f, on)| on.then_some(f)) {
                b.add(NfListObject::Set(Box::new(schema::Set {
                    family: NfFamily::INet,
                    table: UNNAMED.into(),
                    name: flows_set(&n.bridge, family).into(),
                    set_type: SetTypeValue::Single(match family {
                        IpFamily::V4 => SetType::Ipv4Addr,
                        IpFamily::V6 => SetType::Ipv6Addr,
                    }),
                    // No `dynamic` flag: nft 1.0.6 (Debian 12) refuses it in JSON and
                    // sets it itself for a set that rules add to.
                    // One element per guest address: a /16 is the largest subnet (on
                    // IPv6, a guest's few addresses each).
                    size: Some(65_536),
                    ..Default::default()
                })));
            }
        }
        let bridge_counters = BRIDGE_COUNTERS.iter().filter(|_| n.ipv6.is_some());
        let tunnel_counters = n.tunnel.iter().flat_map(|_| {
            [
                (NfFamily::Bridge, &TUNNEL_COUNTERS[0]),
                (NfFamily::INet, &TUNNEL_COUNTERS[1]),
                (NfFamily::INet, &TUNNEL_COUNTERS[2]),
            ]
        });
        let counters = ["egress", "input", "flows"]
            .iter()
            .map(|c| (NfFamily::INet, c))
            .chain(bridge_counters.map(|c| (NfFamily::Bridge, c)))
            .chain(tunnel_counters);
        for (family, chain) in counters {
            b.add(NfListObject::Counter(Counter {
                family,
                table: UNNAMED.into(),
                name: counter_name(chain, &n.bridge).into(),
                handle: None,
                packets: None,
                bytes: None,
            }));
        }
    }
    for n in networks {
        b.add(rule(
            "postrouting",
            vec![
                is(field("ip", "saddr"), Operator::EQ, prefix(n.subnet)),
                is(field("ip", "daddr"), Operator::NEQ, prefix(n.subnet)),
                Statement::Masquerade(None),
            ],
        ));
        if let Some(p6) = n.ipv6 {
            b.add(rule(
                "postrouting",
                vec![
                    is(field("ip6", "saddr"), Operator::EQ, prefix(p6)),
                    is(field("ip6", "daddr"), Operator::NEQ, prefix(p6)),
                    Statement::Masquerade(None),
                ],
            ));
        }
        // Host-local clients of forwards to 127.0.0.1 leave through the bridge with a
        // loopback source (the bridge has route_localnet on): it becomes the bridge's.
        b.add(rule(
            "postrouting",
            vec![
                is(meta(MetaKey::Oifname), Operator::EQ, text(&n.bridge)),
                is(field("ip", "saddr"), Operator::EQ, prefix(LOOPBACK)),
                Statement::Masquerade(None),
            ],
        ));
        // route_localnet would also let guests address the host's loopback: never.
        b.add(rule(
            "guard",
            vec![
                is(meta(MetaKey::Iifname), Operator::EQ, text(&n.bridge)),
                is(field("ip", "daddr"), Operator::EQ, prefix(LOOPBACK)),
                Statement::Drop(None),
            ],
        ));
        for f in &n.forwards {
            b.add(rule("prerouting", dnat(f)?));
            b.add(rule("output", dnat(f)?));
        }
        for lock in &n.locked_ports {
            for expr in port_lock_rules(lock) {
                b.add(family_rule(NfFamily::Bridge, "ports", expr));
            }
            if n.ipv6.is_some() {
                for expr in port_lock_rules6(lock, &n.bridge) {
                    b.add(family_rule(NfFamily::Bridge, "ports", expr));
                }
            } else {
                b.add(family_rule(
                    NfFamily::Bridge,
                    "ports",
                    vec![
                        is(meta(MetaKey::Iifname), Operator::EQ, text(&lock.ifname)),
                        is(field("ether", "type"), Operator::EQ, number(0x86dd)),
                        Statement::Drop(None),
                    ],
                ));
            }
        }
        if let Some(t) = &n.tunnel {
            for obj in tunnel_rules(t, &n.bridge, n.ipv6.is_some()) {
                b.add(obj);
            }
        }
        for obj in egress_rules(n, networks) {
            b.add(obj);
        }
        for obj in input_rules(n) {
            b.add(obj);
        }
    }
    Ok(b.to_nftables())
}

/// A tunnel's rules: what [`TunnelRules`] says, each refusal counted. On a network
/// that carries IPv6 (`carries_ipv6`) a remote guest's IPv6 is held to its addresses as
/// a local port's is; elsewhere IPv6 never enters.
fn tunnel_rules(t: &TunnelRules, bridge: &str, carries_ipv6: bool) -> Vec<NfListObject<'static>> {
    let counted = |counter: &str, mut matches: Vec<Statement<'static>>| {
        matches.push(Statement::Counter(stmt::Counter::Named(
            counter_name(counter, bridge).into(),
        )));
        matches.push(Statement::Drop(None));
        matches
    };
    let from = || is(meta(MetaKey::Iifname), Operator::EQ, text(&t.ifname));
    let to = || is(meta(MetaKey::Oifname), Operator::EQ, text(&t.ifname));
    let local_macs = || set(t.kept_local.iter().map(text));
    let mut out = Vec::new();
    // Datagrams from anybody but the cluster's nodes (a guest's too): never decapsulated.
    let mut stranger = vec![is(field("udp", "dport"), Operator::EQ, number(u32::from(t.port)))];
    if !t.peers.is_empty() {
        stranger.push(is(field("ip", "saddr"), Operator::NEQ, set(t.peers.iter().map(text))));
    }
    out.push(rule("guard", counted("vxlan", stranger)));
    // A member node's datagram for this network in another node's guest's name: the
    // inner source MAC, read from the datagram before it is decapsulated (UDP header,
    // VXLAN header: flags, VNI at bit 32; then the inner destination and source MACs).
    let raw = |offset: u32, len: u32| {
        Expression::Named(NamedExpression::Payload(Payload::PayloadRaw(PayloadRaw {
            base: PayloadBase::TH,
            offset,
            len,
        })))
    };
    for g in &t.remote {
        let mac = g.mac.0.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
        let foreign = vec![
            is(field("udp", "dport"), Operator::EQ, number(u32::from(t.port))),
            is(raw(96, 24), Operator::EQ, number(t.vni)),
            is(raw(176, 48), Operator::EQ, text(format!("{mac:#014x}"))),
            is(field("ip", "saddr"), Operator::NEQ, text(g.node)),
        ];
        out.push(rule("guard", counted("foreign", foreign)));
    }
    let mut inbound = vec![counted(
        "tunnel",
        vec![from(), is(field("ether", "saddr"), Operator::IN, local_macs())],
    )];
    let mut stranger_mac = vec![from()];
    if !t.remote.is_empty() {
        let macs = set(t.remote.iter().map(|g| text(g.mac)));
        stranger_mac.push(is(field("ether", "saddr"), Operator::NEQ, macs));
    }
    inbound.push(counted("tunnel", stranger_mac));
    if !carries_ipv6 {
        inbound.push(counted(
            "tunnel",
            vec![from(), is(field("ether", "type"), Operator::EQ, number(0x86dd))],
        ));
    }
    for g in &t.remote {
        let allowed = || set(g.ips.iter().copied().chain([Ipv4Addr::UNSPECIFIED]).map(text));
        let of = || is(field("ether", "saddr"), Operator::EQ, text(g.mac));
        inbound.push(counted(
            "tunnel",
            vec![from(), of(), is(field("ip", "saddr"), Operator::NEQ, allowed())],
        ));
        inbound.push(counted(
            "tunnel",
            vec![from(), of(), is(field("arp", "saddr ip"), Operator::NEQ, allowed())],
        ));
        if carries_ipv6 {
            inbound.extend(lock_rules6(|| vec![from(), of()], &g.ips6, bridge, Some("tunnel")));
        }
    }
    out.extend(inbound.into_iter().map(|r| family_rule(NfFamily::Bridge, "ports", r)));
    for chain in ["tunnel_out", "tunnel_own"] {
        let own = vec![
            to(),
            is(field("ether", "saddr"), Operator::IN, local_macs()),
            Statement::Drop(None),
        ];
        out.push(family_rule(NfFamily::Bridge, chain, own));
        // DHCP (and DHCPv6) is each node's own gateway's to answer.
        let dhcp = vec![
            to(),
            is(field("udp", "dport"), Operator::IN, set([number(67), number(547)])),
            Statement::Drop(None),
        ];
        out.push(family_rule(NfFamily::Bridge, chain, dhcp));
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IpFamily {
    V4,
    V6,
}

/// The dynamic set that counts each guest address's connections on `bridge`, one per
/// IP version.
fn flows_set(bridge: &str, family: IpFamily) -> String {
    match family {
        IpFamily::V4 => format!("flows_{bridge}"),
        IpFamily::V6 => format!("flows6_{bridge}"),
    }
}

/// Refuses a guest's new connection past its bound: the counting statement (marked
/// for [`with_flow_bounds`]) comes after the protocol match, so each rule counts only
/// what it may refuse. Per IP version: a set statement reads its address where its
/// version has it, so each rule first matches the version.
fn flow_bound(n: &NetworkRules, from_guests: Vec<Statement<'static>>, family: IpFamily) -> Vec<NfListObject<'static>> {
    let counter = counter_name("flows", &n.bridge);
    let count = || Statement::Counter(stmt::Counter::Named(counter.clone().into()));
    let (nfproto, source) = match family {
        IpFamily::V4 => ("ipv4", field("ip", "saddr")),
        IpFamily::V6 => ("ipv6", field("ip6", "saddr")),
    };
    let over = || {
        Statement::Set(stmt::Set {
            op: stmt::SetOp::Add,
            elem: source.clone(),
            set: format!("@{}", flows_set(&n.bridge, family)).into(),
        })
    };
    let mut base = from_guests;
    base.push(is(meta(MetaKey::Nfproto), Operator::EQ, text(nfproto)));
    base.push(is(
        Expression::Named(NamedExpression::CT(CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        Operator::IN,
        text("new"),
    ));
    let mut tcp = base.clone();
    tcp.push(is(meta(MetaKey::L4proto), Operator::EQ, l4proto(L4::Tcp)));
    tcp.extend([over(), count()]);
    tcp.push(Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))));
    // Not TCP again: a connection counted twice would take two places.
    let mut rest = base;
    rest.push(is(meta(MetaKey::L4proto), Operator::NEQ, l4proto(L4::Tcp)));
    rest.extend([over(), count()]);
    rest.push(Statement::Reject(Some(Reject::new(
        Some(RejectType::ICMPX),
        Some(RejectCode::AdminProhibited),
    ))));
    vec![rule("forward", tcp), rule("forward", rest)]
}

/// Gives each flow-bounding set statement its `ct count over N`. Written into the JSON
/// by hand: the `nftables` crate (0.6) has no field for a set statement's stateful
/// statements (`"stmt"`), which is where nft takes `ct count`.
fn with_flow_bounds(mut json: serde_json::Value, networks: &[NetworkRules]) -> serde_json::Value {
    fn visit(v: &mut serde_json::Value, bounds: &[(String, u32)]) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::Object(set)) = map.get_mut("set") {
                    let named = set.get("set").and_then(|s| s.as_str()).map(str::to_string);
                    if let Some((_, n)) = named.and_then(|name| bounds.iter().find(|(b, _)| *b == name)) {
                        set.insert(
                            "stmt".into(),
                            serde_json::json!([{ "ct count": { "val": n, "inv": true } }]),
                        );
                    }
                }
                map.values_mut().for_each(|v| visit(v, bounds));
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| visit(v, bounds)),
            _ => {}
        }
    }
    let bounds: Vec<(String, u32)> = networks
        .iter()
        .filter_map(|n| Some((n, n.flows_per_guest?)))
        .flat_map(|(n, bound)| [IpFamily::V4, IpFamily::V6].map(|f| (format!("@{}", flows_set(&n.bridge, f)), bound)))
        .collect();
    visit(&mut json, &bounds);
    json
}

/// What [`apply`] hands to nft: [`ruleset`] with the flow bounds.
pub fn ruleset_json(table: &str, networks: &[NetworkRules]) -> Result<serde_json::Value, HostnetError> {
    let json = serde_json::to_value(ruleset(table, networks)?).map_err(|e| HostnetError::Nft(e.to_string()))?;
    Ok(with_flow_bounds(json, networks))
}

/// Traffic from `n`'s guests leaving their network: the egress policy.
fn egress_rules(n: &NetworkRules, networks: &[NetworkRules]) -> Vec<NfListObject<'static>> {
    let from_guests = || {
        vec![
            is(meta(MetaKey::Iifname), Operator::EQ, text(&n.bridge)),
            is(meta(MetaKey::Oifname), Operator::NEQ, text(&n.bridge)),
        ]
    };
    let counter = counter_name("egress", &n.bridge);
    let mut out = Vec::new();
    let mut first = from_guests();
    first.push(established());
    first.push(Statement::Accept(None));
    out.push(rule("forward", first));
    if n.flows_per_guest.is_some() {
        out.extend(flow_bound(n, from_guests(), IpFamily::V4));
        if n.ipv6.is_some() {
            out.extend(flow_bound(n, from_guests(), IpFamily::V6));
        }
    }
    // A port range with ICMP can never match (as in the gateway): such rules are left out.
    for r in n
        .egress
        .rules
        .iter()
        .filter(|r| !(r.proto == Some(L4::Icmp) && r.ports.is_some()))
    {
        let mut m = from_guests();
        m.extend(egress_match(r));
        if r.allow {
            m.push(Statement::Accept(None));
            out.push(rule("forward", m));
        } else {
            out.extend(refusals("forward", m, &counter));
        }
    }
    let mut link_local = from_guests();
    link_local.push(is(field("ip", "daddr"), Operator::EQ, prefix(LINK_LOCAL)));
    out.extend(refusals("forward", link_local, &counter));
    for other in networks.iter().filter(|o| o.bridge != n.bridge) {
        let mut m = from_guests();
        m.push(is(meta(MetaKey::Oifname), Operator::EQ, text(&other.bridge)));
        out.extend(refusals("forward", m.clone(), &counter));
        let mut by_address = from_guests();
        by_address.push(is(field("ip", "daddr"), Operator::EQ, prefix(other.subnet)));
        out.extend(refusals("forward", by_address, &counter));
        if let Some(p6) = other.ipv6 {
            let mut by_prefix = from_guests();
            by_prefix.push(is(field("ip6", "daddr"), Operator::EQ, prefix(p6)));
            out.extend(refusals("forward", by_prefix, &counter));
        }
    }
    if !n.egress.default_allow {
        out.extend(refusals("forward", from_guests(), &counter));
    }
    out
}

/// Traffic from `n`'s guests to the host itself.
fn input_rules(n: &NetworkRules) -> Vec<NfListObject<'static>> {
    let from_guests = || vec![is(meta(MetaKey::Iifname), Operator::EQ, text(&n.bridge))];
    let mut out = Vec::new();
    let mut replies = from_guests();
    replies.push(established());
    replies.push(Statement::Accept(None));
    out.push(rule("input", replies));
    let mut ping = from_guests();
    ping.push(is(field("ip", "daddr"), Operator::EQ, text(n.router)));
    ping.push(is(field("icmp", "type"), Operator::EQ, text("echo-request")));
    ping.push(Statement::Accept(None));
    out.push(rule("input", ping));
    if let Some(router6) = n.router6() {
        let mut ping6 = from_guests();
        ping6.push(is(field("ip6", "daddr"), Operator::EQ, text(router6)));
        ping6.push(is(field("icmpv6", "type"), Operator::EQ, text("echo-request")));
        ping6.push(Statement::Accept(None));
        out.push(rule("input", ping6));
        // Neighbour Discovery with the bridge (its link-local and `::1`): routing needs it.
        let mut nd = from_guests();
        nd.push(is(
            field("icmpv6", "type"),
            Operator::IN,
            set([text("nd-neighbor-solicit"), text("nd-neighbor-advert")]),
        ));
        nd.push(Statement::Accept(None));
        out.push(rule("input", nd));
    }
    for r in n
        .egress
        .rules
        .iter()
        .filter(|r| r.allow && !(r.proto == Some(L4::Icmp) && r.ports.is_some()))
    {
        let mut m = from_guests();
        m.extend(egress_match(r));
        m.push(Statement::Accept(None));
        out.push(rule("input", m));
    }
    // Broadcasts and multicast (DHCP discovers, mDNS) reach the host's bridge too;
    // they are the gateway's or nobody's: dropped quietly, not counted as refusals.
    let mut group = from_guests();
    group.push(is(
        field("ip", "daddr"),
        Operator::IN,
        set([
            text(Ipv4Addr::BROADCAST),
            prefix(Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4)),
        ]),
    ));
    group.push(Statement::Drop(None));
    out.push(rule("input", group));
    if n.ipv6.is_some() {
        // IPv6's multicast (router solicitations, MLD reports) likewise.
        let mut group6 = from_guests();
        group6.push(is(
            field("ip6", "daddr"),
            Operator::EQ,
            prefix(Ipv6Net::new_assert(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8)),
        ));
        group6.push(Statement::Drop(None));
        out.push(rule("input", group6));
    }
    out.extend(refusals("input", from_guests(), &counter_name("input", &n.bridge)));
    out
}

/// The counters of vmfabric's tables, both families (name, packets), as the kernel
/// holds them now; they start again from zero whenever the tables are written.
pub fn counters(table: &str) -> Result<Vec<(String, u64)>, HostnetError> {
    let mut out = Vec::new();
    for family in ["inet", "bridge"] {
        let args = ["-j", "list", "counters", "table", family, table];
        let rs = nftables::helper::get_current_ruleset_with_args(nftables::helper::DEFAULT_NFT, args)
            .map_err(|e| HostnetError::Nft(e.to_string()))?;
        out.extend(rs.objects.iter().filter_map(|o| match o {
            NfObject::ListObject(NfListObject::Counter(c)) => {
                Some((c.name.to_string(), u64::from(c.packets.unwrap_or(0))))
            }
            _ => None,
        }));
    }
    Ok(out)
}

/// Writes the table `table` for `networks` (an empty list leaves an empty table).
pub fn apply(table: &str, networks: &[NetworkRules]) -> Result<(), HostnetError> {
    let payload = ruleset_json(table, networks)?.to_string();
    let no_args: [&str; 0] = [];
    nftables::helper::apply_ruleset_raw(&payload, nftables::helper::DEFAULT_NFT, no_args)
        .map(drop)
        .map_err(|e| HostnetError::Nft(e.to_string()))
}

/// Removes the tables named `table` altogether (both families; adding first makes
/// it work whether or not they exist). Also how a start clears [`LEGACY_TABLE`].
pub fn remove(table: &str) -> Result<(), HostnetError> {
    let mut b = Batch::new();
    for family in [NfFamily::INet, NfFamily::Bridge] {
        b.add(family_table(family));
        b.delete(family_table(family));
    }
    nftables::helper::apply_ruleset(&in_table(b.to_nftables(), table)).map_err(|e| HostnetError::Nft(e.to_string()))
}

/// Whether a guest address is inside one of `networks` (for callers checking forwards).
pub fn owns(networks: &[NetworkRules], ip: Ipv4Addr) -> bool {
    networks.iter().any(|n| n.subnet.contains(&ip))
}

#[cfg(test)]
#[path = "nft_tests.rs"]
mod tests;

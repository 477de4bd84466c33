//! NAT and isolation for kernel-mode networks with nftables.
//!
//! vmfabric owns one table, `inet vmfabric`, and never touches another. The table is
//! written whole from the desired state in one nft transaction (the table is added,
//! deleted and built again in the same batch, which the kernel applies atomically):
//! removing a network or a forward re-applies without it, so exactly its rules go, and
//! a restart after a crash converges to the store's state. Rules (through the
//! `nftables` crate and the `nft` binary):
//! - postrouting (nat): traffic from a network's subnet leaving for anywhere else is
//!   masqueraded;
//! - prerouting and output (nat): each forward DNATs `host address:port` to the guest,
//!   for clients arriving from outside and for clients on the host itself;
//! - forward (filter): nothing crosses from one vmfabric bridge to another.
//!
//! Port security needs the bridge family, so a second table, `bridge vmfabric`, written
//! in the same transaction: a locked port (its MAC and leased addresses) may send only
//! from that MAC, and IPv4 and ARP only from those addresses (0.0.0.0 stays allowed for
//! DHCP and ARP probes), like the userspace switch's port locks.

use std::borrow::Cow;
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;
use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Match, NATFamily, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::HostnetError;

pub const TABLE: &str = "vmfabric";

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
}

/// What the tables hold for one kernel-mode network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRules {
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub forwards: Vec<Forward>,
    pub locked_ports: Vec<PortLock>,
}

fn field(protocol: &'static str, name: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: name.into(),
    })))
}

fn prefix(net: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(net.network().to_string().into())),
        len: u32::from(net.prefix_len()),
    }))
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
        table: TABLE.into(),
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
        table: TABLE.into(),
        chain: chain.into(),
        expr: Cow::Owned(expr),
        ..Default::default()
    })
}

fn family_table(family: NfFamily) -> NfListObject<'static> {
    NfListObject::Table(Table {
        family,
        name: TABLE.into(),
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

/// The whole table for `networks`, as one transaction.
pub fn ruleset(networks: &[NetworkRules]) -> Result<Nftables<'static>, HostnetError> {
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
    b.add(chain("guard", NfChainType::Filter, NfHook::Prerouting, -300));
    for n in networks {
        b.add(rule(
            "postrouting",
            vec![
                is(field("ip", "saddr"), Operator::EQ, prefix(n.subnet)),
                is(field("ip", "daddr"), Operator::NEQ, prefix(n.subnet)),
                Statement::Masquerade(None),
            ],
        ));
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
        }
        for other in networks.iter().filter(|o| o.bridge != n.bridge) {
            b.add(rule(
                "forward",
                vec![
                    is(meta(MetaKey::Iifname), Operator::EQ, text(&n.bridge)),
                    is(meta(MetaKey::Oifname), Operator::EQ, text(&other.bridge)),
                    Statement::Drop(None),
                ],
            ));
        }
    }
    Ok(b.to_nftables())
}

/// Writes the table for `networks` (an empty list leaves an empty table).
pub fn apply(networks: &[NetworkRules]) -> Result<(), HostnetError> {
    let rs = ruleset(networks)?;
    nftables::helper::apply_ruleset(&rs).map_err(|e| HostnetError::Nft(e.to_string()))
}

/// Removes vmfabric's tables altogether.
pub fn remove() -> Result<(), HostnetError> {
    let mut b = Batch::new();
    for family in [NfFamily::INet, NfFamily::Bridge] {
        b.add(family_table(family));
        b.delete(family_table(family));
    }
    nftables::helper::apply_ruleset(&b.to_nftables()).map_err(|e| HostnetError::Nft(e.to_string()))
}

/// Whether a guest address is inside one of `networks` (for callers checking forwards).
pub fn owns(networks: &[NetworkRules], ip: Ipv4Addr) -> bool {
    networks.iter().any(|n| n.subnet.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_holds_masquerade_dnat_and_isolation() {
        let nets = vec![
            NetworkRules {
                bridge: "vmfbr0".into(),
                subnet: "10.70.0.0/24".parse().unwrap(),
                forwards: vec![Forward {
                    proto: "tcp".into(),
                    host: "0.0.0.0:8080".parse().unwrap(),
                    guest: "10.70.0.2:80".parse().unwrap(),
                }],
                locked_ports: vec![PortLock {
                    ifname: "vmft0".into(),
                    mac: fabric::Mac::derived(&["t", "p"]),
                    ips: vec!["10.70.0.2".parse().unwrap()],
                }],
            },
            NetworkRules {
                bridge: "vmfbr1".into(),
                subnet: "10.71.0.0/24".parse().unwrap(),
                forwards: vec![],
                locked_ports: vec![],
            },
        ];
        let json = serde_json::to_string(&ruleset(&nets).unwrap()).unwrap();
        assert_eq!(
            json.matches("\"masquerade\"").count(),
            4,
            "subnet and loopback, each network: {json}"
        );
        assert!(json.contains("\"dnat\""), "{json}");
        assert_eq!(
            json.matches("\"drop\"").count(),
            2 + 3 + 2,
            "each direction between the two bridges, the lock's MAC, IP and ARP rules, and each bridge's loopback guard"
        );
        let bad = vec![NetworkRules {
            forwards: vec![Forward {
                proto: "sctp".into(),
                ..nets[0].forwards[0].clone()
            }],
            ..nets[0].clone()
        }];
        assert!(ruleset(&bad).is_err());
    }
}

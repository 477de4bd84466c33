//! Which destinations a network's guests may reach through the gateway.
//!
//! Rules are checked in order and the first match decides; when none matches, the
//! default decides. Before the rules come the built-in denies, which only an explicit
//! allow rule for that very destination lifts: link-local addresses (169.254.0.0/16,
//! where cloud metadata services live, and fe80::/10), the host's own addresses, every
//! other vmfabric network's subnet and IPv6 prefix, and IPv6 addresses that carry an
//! IPv4 one (v4-mapped `::ffff:a.b.c.d` and v4-compatible `::a.b.c.d`: a host socket
//! would take them to the IPv4 address inside, round the IPv4 checks).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub dst: IpNet,
    /// Inclusive port range; `None` is every port (and ICMP).
    pub ports: Option<(u16, u16)>,
    /// `None` is every protocol.
    pub proto: Option<Proto>,
}

impl Rule {
    fn matches(&self, dst: IpAddr, port: u16, proto: Proto) -> bool {
        self.dst.contains(&dst)
            && self.proto.is_none_or(|p| p == proto)
            && self
                .ports
                .is_none_or(|(lo, hi)| proto != Proto::Icmp && (lo..=hi).contains(&port))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    pub rules: Vec<Rule>,
    pub default: Action,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        EgressPolicy {
            rules: Vec::new(),
            default: Action::Allow,
        }
    }
}

/// Why a destination was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    LinkLocal,
    /// An IPv6 address with an IPv4 one inside (v4-mapped or v4-compatible).
    Ipv4Inside,
    HostAddress,
    OtherNetwork,
    Rule,
}

/// Remembers which addresses are the host's own, for a while: binding to an address
/// succeeds exactly when it is local, which answers without parsing interface lists.
#[derive(Default)]
pub struct HostAddresses {
    cache: Mutex<HashMap<IpAddr, (bool, Instant)>>,
}

const HOST_ADDR_TTL: Duration = Duration::from_secs(10);

impl HostAddresses {
    pub fn is_local(&self, ip: IpAddr) -> bool {
        if ip.is_loopback() || ip.is_unspecified() {
            return true;
        }
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((local, at)) = c.get(&ip) {
            if at.elapsed() < HOST_ADDR_TTL {
                return *local;
            }
        }
        let local = std::net::UdpSocket::bind((ip, 0)).is_ok();
        if c.len() > 4096 {
            c.clear();
        }
        c.insert(ip, (local, Instant::now()));
        local
    }
}

impl EgressPolicy {
    /// Decides a guest's packet to `dst:port`. `others` are the other networks' subnets.
    pub fn check(
        &self,
        dst: IpAddr,
        port: u16,
        proto: Proto,
        others: &[IpNet],
        host: &HostAddresses,
    ) -> Result<(), Denied> {
        let explicit = self.rules.iter().find(|r| r.matches(dst, port, proto));
        if explicit.is_some_and(|r| r.action == Action::Allow) {
            return Ok(());
        }
        match dst {
            IpAddr::V4(v4) if v4.is_link_local() => return Err(Denied::LinkLocal),
            IpAddr::V6(v6) if v6.is_unicast_link_local() => return Err(Denied::LinkLocal),
            IpAddr::V6(v6) if carries_ipv4(v6) => return Err(Denied::Ipv4Inside),
            _ => {}
        }
        if others.iter().any(|n| n.contains(&dst)) {
            return Err(Denied::OtherNetwork);
        }
        if host.is_local(dst) {
            return Err(Denied::HostAddress);
        }
        match explicit.map(|r| r.action).unwrap_or(self.default) {
            Action::Allow => Ok(()),
            Action::Deny => Err(Denied::Rule),
        }
    }
}

/// Whether a host socket sending to `ip` would reach an IPv4 address instead:
/// v4-mapped (`::ffff:0:0/96`) or the deprecated v4-compatible (`::/96`, less `::` and
/// `::1`, which are checked as themselves).
fn carries_ipv4(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let high_zero = s[..5].iter().all(|&x| x == 0);
    high_zero && (s[5] == 0xffff || (s[5] == 0 && u128::from(ip) > 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: Action, dst: &str, ports: Option<(u16, u16)>, proto: Option<Proto>) -> Rule {
        Rule {
            action,
            dst: dst.parse().unwrap(),
            ports,
            proto,
        }
    }

    #[test]
    fn built_in_denies_and_ordered_rules() {
        let host = HostAddresses::default();
        let others: Vec<IpNet> = vec!["10.88.0.0/24".parse().unwrap(), "fd00:88::/64".parse().unwrap()];
        let open = EgressPolicy::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            open.check(ip("169.254.169.254"), 80, Proto::Tcp, &others, &host),
            Err(Denied::LinkLocal)
        );
        assert_eq!(
            open.check(ip("10.88.0.7"), 22, Proto::Tcp, &others, &host),
            Err(Denied::OtherNetwork)
        );
        assert_eq!(
            open.check(ip("127.0.0.1"), 22, Proto::Tcp, &others, &host),
            Err(Denied::HostAddress)
        );
        assert_eq!(open.check(ip("192.0.2.10"), 443, Proto::Tcp, &others, &host), Ok(()));
        assert_eq!(open.check(ip("2001:db8::7"), 443, Proto::Tcp, &others, &host), Ok(()));
        for (dst, why) in [
            ("fe80::1", Denied::LinkLocal),
            ("fd00:88::7", Denied::OtherNetwork),
            ("::1", Denied::HostAddress),
            ("::", Denied::HostAddress),
            ("::ffff:127.0.0.1", Denied::Ipv4Inside),
            ("::ffff:192.0.2.10", Denied::Ipv4Inside),
            ("::127.0.0.1", Denied::Ipv4Inside),
        ] {
            assert_eq!(open.check(ip(dst), 80, Proto::Udp, &others, &host), Err(why), "{dst}");
        }
        let strict = EgressPolicy {
            rules: vec![
                rule(Action::Deny, "192.0.2.10/32", Some((443, 443)), Some(Proto::Tcp)),
                rule(Action::Allow, "192.0.2.0/24", Some((400, 500)), None),
                rule(Action::Allow, "169.254.169.254/32", Some((80, 80)), Some(Proto::Tcp)),
                rule(Action::Allow, "2001:db8:1::/48", None, None),
            ],
            default: Action::Deny,
        };
        assert_eq!(
            strict.check(ip("192.0.2.10"), 443, Proto::Tcp, &others, &host),
            Err(Denied::Rule),
            "first match wins"
        );
        assert_eq!(strict.check(ip("192.0.2.10"), 443, Proto::Udp, &others, &host), Ok(()));
        assert_eq!(
            strict.check(ip("192.0.2.10"), 80, Proto::Udp, &others, &host),
            Err(Denied::Rule),
            "default deny"
        );
        assert_eq!(
            strict.check(ip("169.254.169.254"), 80, Proto::Tcp, &others, &host),
            Ok(()),
            "explicitly allowed"
        );
        assert_eq!(
            strict.check(ip("192.0.2.20"), 450, Proto::Icmp, &others, &host),
            Err(Denied::Rule),
            "ports exclude ICMP"
        );
        assert_eq!(
            strict.check(ip("2001:db8:1::9"), 22, Proto::Tcp, &others, &host),
            Ok(())
        );
        assert_eq!(
            strict.check(ip("2001:db8:2::9"), 22, Proto::Tcp, &others, &host),
            Err(Denied::Rule),
            "IPv6 outside the allowed prefix: the default"
        );
    }
}

//! What a guest's port may send: the decisions the switch makes on every frame from
//! an untrusted port, as pure functions of the frame, the port's lock and the
//! network's configuration (unit-tested and fuzzed without sockets).

use crate::counters::DropReason;
use crate::frame::{is_dhcp_server_message, l3_sender, EthernetView, Ipv6Kind, L3Sender};
use crate::port::PortLock;

/// Why `frame` from a port must not pass, if it must not: the port's lock (`Spoofed`)
/// first, then, for untrusted ports, the first-hop guard.
pub fn verdict(
    cfg: &crate::NetworkConfig,
    lock: Option<&PortLock>,
    trusted: bool,
    frame: &EthernetView<'_>,
) -> Option<DropReason> {
    if frame.src().is_group() || !lock_allows(lock, frame, cfg.ipv6) {
        return Some(DropReason::Spoofed);
    }
    if trusted {
        return None;
    }
    first_hop_violation(cfg, frame)
}

/// Why a frame from an untrusted port must not reach the others: it speaks for a
/// DHCP server or an IPv6 router, or hides what it carries behind VLAN tags.
pub fn first_hop_violation(cfg: &crate::NetworkConfig, view: &EthernetView<'_>) -> Option<DropReason> {
    if view.inner().is_none() {
        return Some(DropReason::Malformed);
    }
    if cfg.dhcp_guard && is_dhcp_server_message(view) {
        return Some(DropReason::RogueDhcp);
    }
    match crate::frame::ipv6_kind(view) {
        Ipv6Kind::NotIpv6 => None,
        _ if !cfg.ipv6 => Some(DropReason::Ipv6Off),
        Ipv6Kind::Plain => None,
        Ipv6Kind::NeighbourAdvert { target_mac, .. } if target_mac.is_none_or(|m| m == view.src()) => None,
        Ipv6Kind::RouterAdvert | Ipv6Kind::Redirect => Some(DropReason::RogueRa),
        Ipv6Kind::Dhcp6Server => Some(DropReason::RogueDhcp6),
        Ipv6Kind::NeighbourAdvert { .. } | Ipv6Kind::Malformed => Some(DropReason::Ipv6Guard),
    }
}

/// Whether a locked port may send this frame. IPv6 is judged by the lock only where
/// the network carries it (elsewhere the first-hop guard drops it as `ipv6_off`).
pub fn lock_allows(lock: Option<&PortLock>, frame: &EthernetView<'_>, carries_ipv6: bool) -> bool {
    let Some(lock) = lock else { return true };
    if frame.src() != lock.mac {
        return false;
    }
    let ip_ok = |ip: std::net::Ipv4Addr| lock.ips.contains(&ip);
    match l3_sender(frame) {
        L3Sender::Ipv4 { src, dhcp_client } => ip_ok(src) || (src.is_unspecified() && dhcp_client),
        L3Sender::Arp { sender_mac, sender_ip } => {
            sender_mac == lock.mac && (ip_ok(sender_ip) || sender_ip.is_unspecified())
        }
        L3Sender::Ipv6 { .. } if !carries_ipv6 => true,
        L3Sender::Ipv6 { src } => {
            // `::` only probes for duplicates (and joins groups meanwhile): it claims
            // no address. A Neighbour Advertisement claims its target.
            let src_ok = src.is_unspecified() || lock.ips6.contains(&src);
            let claims_ok = match crate::frame::ipv6_kind(frame) {
                Ipv6Kind::NeighbourAdvert { target, .. } => lock.ips6.contains(&target),
                _ => true,
            };
            src_ok && claims_ok
        }
        L3Sender::Other => true,
        L3Sender::Malformed => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mac::Mac;

    fn frame(src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Mac::BROADCAST.0.to_vec();
        f.extend(src.0);
        f.extend(ethertype.to_be_bytes());
        f.extend(payload);
        f
    }

    #[test]
    fn a_trusted_port_skips_the_first_hop_guard_but_not_its_lock() {
        let cfg = crate::NetworkConfig::default();
        let me = Mac([2, 0, 0, 0, 0, 1]);
        let lock = PortLock {
            mac: me,
            ips: vec![],
            ips6: vec![],
        };
        let v6 = frame(me, 0x86dd, &[0x60; 48]);
        let view = EthernetView::parse(&v6, 1500).unwrap();
        assert_eq!(verdict(&cfg, Some(&lock), false, &view), Some(DropReason::Ipv6Off));
        assert_eq!(verdict(&cfg, Some(&lock), true, &view), None);
        let other = frame(Mac([2, 0, 0, 0, 0, 2]), 0x88b5, &[0; 46]);
        let view = EthernetView::parse(&other, 1500).unwrap();
        assert_eq!(verdict(&cfg, Some(&lock), true, &view), Some(DropReason::Spoofed));
        let group = frame(Mac([3, 0, 0, 0, 0, 2]), 0x88b5, &[0; 46]);
        let view = EthernetView::parse(&group, 1500).unwrap();
        assert_eq!(verdict(&cfg, None, false, &view), Some(DropReason::Spoofed));
    }

    /// An IPv6 packet from `src`: ICMPv6 of `icmp_type` whose target (for a Neighbour
    /// Advertisement) is `target`.
    fn ipv6(src: std::net::Ipv6Addr, icmp_type: u8, target: std::net::Ipv6Addr) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 24, 58, 255];
        p.extend(src.octets());
        p.extend(std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets());
        p.extend([icmp_type, 0, 0, 0, 0x20, 0, 0, 0]);
        p.extend(target.octets());
        p
    }

    #[test]
    fn on_an_ipv6_network_a_locked_port_sends_only_from_its_addresses_and_claims_only_them() {
        let cfg = crate::NetworkConfig {
            ipv6: true,
            ..Default::default()
        };
        let me = Mac([2, 0, 0, 0, 0, 1]);
        let mine: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
        let theirs: std::net::Ipv6Addr = "fd00::2".parse().unwrap();
        let lock = PortLock {
            mac: me,
            ips: vec![],
            ips6: vec![mine],
        };
        let judge = |payload: Vec<u8>| {
            let f = frame(me, 0x86dd, &payload);
            verdict(&cfg, Some(&lock), false, &EthernetView::parse(&f, 1500).unwrap())
        };
        const ECHO: u8 = 128;
        const NEIGHBOUR_ADVERT: u8 = 136;
        assert_eq!(judge(ipv6(mine, ECHO, theirs)), None);
        assert_eq!(judge(ipv6(theirs, ECHO, theirs)), Some(DropReason::Spoofed));
        // Duplicate address detection speaks from `::`.
        assert_eq!(judge(ipv6(std::net::Ipv6Addr::UNSPECIFIED, 135, theirs)), None);
        assert_eq!(judge(ipv6(mine, NEIGHBOUR_ADVERT, mine)), None);
        assert_eq!(
            judge(ipv6(mine, NEIGHBOUR_ADVERT, theirs)),
            Some(DropReason::Spoofed),
            "an advertisement for another's address"
        );
        assert_eq!(judge(ipv6(mine, 134, mine)), Some(DropReason::RogueRa));
        // A network without IPv6 leaves it to the guard, which drops it all.
        let v4_only = crate::NetworkConfig::default();
        let f = frame(me, 0x86dd, &ipv6(theirs, ECHO, theirs));
        let view = EthernetView::parse(&f, 1500).unwrap();
        assert_eq!(verdict(&v4_only, Some(&lock), false, &view), Some(DropReason::Ipv6Off));
    }
}

//! What this daemon may do with the privileges it runs with: userspace networks need
//! none; TAP devices, bridges and nftables need CAP_NET_ADMIN; ICMP echo through NAT
//! needs CAP_NET_RAW or a `net.ipv4.ping_group_range` that holds the daemon's group.

use rustix::thread::{capabilities, CapabilitySet};

use super::error::ControlError;

fn effective() -> CapabilitySet {
    capabilities(None)
        .map(|c| c.effective)
        .unwrap_or(CapabilitySet::empty())
}

/// Refuses what needs CAP_NET_ADMIN when the daemon lacks it, saying why and what
/// works instead.
pub fn need_net_admin(what: &str) -> Result<(), ControlError> {
    if effective().contains(CapabilitySet::NET_ADMIN) {
        return Ok(());
    }
    Err(ControlError::invalid(format!(
        "{what} needs CAP_NET_ADMIN, and this daemon runs unprivileged (uid {}): run it as root, or use a unixgram, stream or socketpair port on a userspace network",
        rustix::process::getuid().as_raw()
    )))
}

/// For the log at start: what an unprivileged daemon cannot do. `None` when it can
/// do everything.
pub fn unprivileged_note() -> Option<String> {
    let caps = effective();
    if caps.contains(CapabilitySet::NET_ADMIN | CapabilitySet::NET_RAW) {
        return None;
    }
    let gid = rustix::process::getgid().as_raw();
    let pings = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|n| n.parse::<u64>().ok());
            Some((it.next()??, it.next()??))
        })
        .is_some_and(|(lo, hi)| (lo..=hi).contains(&u64::from(gid)));
    let mut cannot = vec![];
    if !caps.contains(CapabilitySet::NET_ADMIN) {
        cannot.push("TAP ports and kernel-mode networks need CAP_NET_ADMIN".to_string());
    }
    if !caps.contains(CapabilitySet::NET_RAW) && !pings {
        cannot.push(format!(
            "guests' pings out through NAT need CAP_NET_RAW or net.ipv4.ping_group_range to hold gid {gid}"
        ));
    }
    if !caps.contains(CapabilitySet::NET_BIND_SERVICE) {
        cannot.push("forwards from host ports below 1024 need CAP_NET_BIND_SERVICE".to_string());
    }
    Some(format!(
        "running unprivileged (uid {}): userspace networks work (ports, DHCP, DNS, TCP and UDP NAT, forwards); {}",
        rustix::process::getuid().as_raw(),
        cannot.join("; ")
    ))
}

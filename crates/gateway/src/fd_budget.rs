//! Descriptors kept for the daemon itself.
//!
//! Every socket a guest makes the gateway open (NAT flows, DNS questions sent
//! upstream, connections accepted for forwards) must leave the daemon enough
//! descriptors for its API, its ports and its store; otherwise one guest's flood of
//! flows leaves `accept` on the API socket failing and the daemon deaf. The per-guest
//! and per-network flow bounds do not add up to a process-wide guarantee, so this is
//! the last one: a guest-driven socket whose descriptor number reaches the ceiling is
//! closed again and the flow refused (`fd_budget_refused`). Descriptors are allocated
//! lowest-first, so a descriptor's number is, within the few the process holds
//! elsewhere, how many are open: no counting on the hot path.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering};

static CEILING: AtomicU64 = AtomicU64::new(u64::MAX);

/// Guest-driven sockets may use descriptors below `ceiling` only.
pub fn set_ceiling(ceiling: u64) {
    CEILING.store(ceiling, Ordering::Relaxed);
}

pub fn ceiling() -> u64 {
    CEILING.load(Ordering::Relaxed)
}

/// Raises the soft descriptor limit to the hard one and sets the ceiling `reserve`
/// below it. Returns the limit now in force.
pub fn raise_limit(reserve: u64) -> std::io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised)?;
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    set_ceiling(now.saturating_sub(reserve));
    Ok(now)
}

/// Whether a socket a guest made the gateway open may stay open.
pub fn admits(fd: impl AsFd) -> bool {
    (fd.as_fd().as_raw_fd() as u64) < ceiling()
}

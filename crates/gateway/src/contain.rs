//! Containment for the code that parses what guests send.
//!
//! A bug in one protocol handler (ours or a crate's) must cost one message or one
//! connection, not the network's gateway: each handler runs under [`contained`], which
//! turns a panic into a dropped input, a count per service (`handler_panics{service}`)
//! and a log line with the input's digest (the first panic of a service, then at every
//! power of two, so a guest repeating the input cannot flood the log). State behind a
//! poisoned lock is used as it is: each handler leaves its tables consistent between
//! statements, and losing the gateway is the worse outcome.

use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};

/// The handlers that take untrusted bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Classifying a frame, before any handler.
    Frame,
    Arp,
    Icmp,
    Dhcp,
    Dns,
    /// The DNS-over-TCP stack.
    DnsTcp,
    /// The TCP NAT stack (egress and forwards).
    TcpNat,
    UdpNat,
    IcmpNat,
    /// The gateway task itself, restarted by its supervisor.
    Task,
}

impl Service {
    pub const ALL: [Service; 10] = [
        Service::Frame,
        Service::Arp,
        Service::Icmp,
        Service::Dhcp,
        Service::Dns,
        Service::DnsTcp,
        Service::TcpNat,
        Service::UdpNat,
        Service::IcmpNat,
        Service::Task,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Frame => "frame",
            Service::Arp => "arp",
            Service::Icmp => "icmp",
            Service::Dhcp => "dhcp",
            Service::Dns => "dns",
            Service::DnsTcp => "dns_tcp",
            Service::TcpNat => "tcp_nat",
            Service::UdpNat => "udp_nat",
            Service::IcmpNat => "icmp_nat",
            Service::Task => "task",
        }
    }
}

/// Panics caught, per service.
#[derive(Debug, Default)]
pub struct PanicCounters {
    counts: [AtomicU64; Service::ALL.len()],
}

impl PanicCounters {
    pub fn get(&self, service: Service) -> u64 {
        self.counts[service as usize].load(Ordering::Relaxed)
    }

    /// Every service with its count, for metrics.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Service::ALL.iter().map(|s| (s.name(), self.get(*s))).collect()
    }

    /// Counts a panic; true when it should be logged.
    pub(crate) fn record(&self, service: Service) -> bool {
        let n = self.counts[service as usize].fetch_add(1, Ordering::Relaxed) + 1;
        n.is_power_of_two()
    }
}

/// A short digest of an input, to find it again in a capture (not a security hash).
pub fn digest(input: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Runs `f`; a panic inside it is counted against `service`, logged, and becomes `None`.
pub fn contained<R>(counters: &PanicCounters, service: Service, input: &[u8], f: impl FnOnce() -> R) -> Option<R> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => Some(r),
        Err(payload) => {
            if counters.record(service) {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(
                    service = service.name(),
                    input_len = input.len(),
                    input_digest = %digest(input),
                    count = counters.get(service),
                    "handler panicked on guest input and was contained: {what}"
                );
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_none_and_a_count() {
        let c = PanicCounters::default();
        assert_eq!(contained(&c, Service::Dhcp, b"ok", || 7), Some(7));
        for _ in 0..3 {
            assert_eq!(contained(&c, Service::Dhcp, b"bad", || -> u8 { panic!("boom") }), None);
        }
        assert_eq!(c.get(Service::Dhcp), 3);
        assert_eq!(c.get(Service::Dns), 0);
        assert!(c.snapshot().contains(&("dhcp", 3)));
    }
}

//! Per-port and per-network counters.
//!
//! The worker thread is the only writer; readers (metrics, tests) load the atomics at
//! any time without asking the worker. Relaxed ordering is enough: each counter is
//! independent and only has to be eventually exact. The worker adds once per batch, not
//! once per frame, where it can.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a frame was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than an Ethernet header.
    Runt,
    /// Larger than the network's MTU allows, or truncated by the socket.
    Oversize,
    /// Unicast to a MAC that sits on the frame's own port: nowhere to go.
    NoRoute,
    /// The destination's egress queue was full.
    QueueFull,
    /// Source MAC or sender IP not allowed on the port.
    Spoofed,
    /// The destination's peer has gone.
    PeerGone,
    /// A DHCP server message (UDP source port 67) from a port not trusted to serve DHCP.
    RogueDhcp,
    /// IPv6 from an untrusted port on a network that does not carry IPv6.
    Ipv6Off,
    /// An IPv6 Router Advertisement or redirect from an untrusted port: only the
    /// gateway routes.
    RogueRa,
    /// A DHCPv6 server message (from port 547) from an untrusted port.
    RogueDhcp6,
    /// A Neighbour Advertisement for another MAC than its sender's, or IPv6 hiding its
    /// upper layer behind extension headers, from an untrusted port.
    Ipv6Guard,
    /// More VLAN tags than the switch looks through, or a tag cut short.
    Malformed,
}

impl DropReason {
    pub const ALL: [DropReason; 12] = [
        DropReason::Runt,
        DropReason::Oversize,
        DropReason::NoRoute,
        DropReason::QueueFull,
        DropReason::Spoofed,
        DropReason::PeerGone,
        DropReason::RogueDhcp,
        DropReason::Ipv6Off,
        DropReason::RogueRa,
        DropReason::RogueDhcp6,
        DropReason::Ipv6Guard,
        DropReason::Malformed,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            DropReason::Runt => "runt",
            DropReason::Oversize => "oversize",
            DropReason::NoRoute => "no_route",
            DropReason::QueueFull => "queue_full",
            DropReason::Spoofed => "spoofed",
            DropReason::PeerGone => "peer_gone",
            DropReason::RogueDhcp => "rogue_dhcp",
            DropReason::Ipv6Off => "ipv6_off",
            DropReason::RogueRa => "rogue_ra",
            DropReason::RogueDhcp6 => "rogue_dhcp6",
            DropReason::Ipv6Guard => "ipv6_guard",
            DropReason::Malformed => "malformed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Live counters of one port or one network.
#[derive(Debug, Default)]
pub struct Counters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    /// Frames whose source MAC could not be learned because the MAC table was full.
    /// They are delivered (flooded when their destination is unknown), so this is not
    /// a drop reason.
    not_learned: AtomicU64,
}

impl Counters {
    pub(crate) fn add_rx(&self, frames: u64, bytes: u64) {
        self.rx_frames.fetch_add(frames, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_tx(&self, frames: u64, bytes: u64) {
        self.tx_frames.fetch_add(frames, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_not_learned(&self, frames: u64) {
        self.not_learned.fetch_add(frames, Ordering::Relaxed);
    }

    pub(crate) fn add_drop(&self, reason: DropReason, frames: u64) {
        self.drops[reason.index()].fetch_add(frames, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let mut drops = [0u64; DropReason::ALL.len()];
        for (d, a) in drops.iter_mut().zip(&self.drops) {
            *d = a.load(Ordering::Relaxed);
        }
        CounterSnapshot {
            rx_frames: self.rx_frames.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            tx_frames: self.tx_frames.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            drops,
            not_learned: self.not_learned.load(Ordering::Relaxed),
        }
    }
}

/// Counter values at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    drops: [u64; DropReason::ALL.len()],
    /// Delivered frames whose source the full MAC table could not learn.
    pub not_learned: u64,
}

impl CounterSnapshot {
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Every drop reason with its count, in a fixed order.
    pub fn drops_by_reason(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.drops(*r)))
    }
}

//! What the outside world knows of a port: its id, transport, lock and events.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::mac::Mac;

/// A port's identity; never reused within one switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u64);

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How a port reaches its VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// SOCK_DGRAM socketpair; the VM holds the other end.
    Socketpair,
    /// A bound SOCK_DGRAM path; the VMM sends from its own bound path.
    Unixgram { path: PathBuf },
    /// A listening SOCK_STREAM path; frames carry a 4-byte big-endian length.
    Stream { path: PathBuf },
    /// A TAP device.
    Tap { ifname: String },
    /// A listening vhost-user path; the VMM shares the guest's memory.
    VhostUser { path: PathBuf },
    /// A service in this process (the gateway), through shared queues.
    InProcess,
}

impl Transport {
    pub fn kind(&self) -> &'static str {
        match self {
            Transport::Socketpair => "socketpair",
            Transport::Unixgram { .. } => "unixgram",
            Transport::Stream { .. } => "stream",
            Transport::Tap { .. } => "tap",
            Transport::VhostUser { .. } => "vhost-user",
            Transport::InProcess => "in-process",
        }
    }
}

/// Where a TAP port's device comes from.
#[derive(Debug)]
pub enum TapSource {
    /// Create (or attach to) the device with this name; `%d` picks a free number.
    Name(String),
    /// Adopt an fd already attached to a TAP device (`IFF_TAP|IFF_NO_PI`), with its name.
    Fd(std::os::fd::OwnedFd, String),
}

/// Restricts what a port may send: frames must carry `mac` as source, and IPv4 and ARP
/// frames one of `ips` as sender. 0.0.0.0 is always allowed for a DHCP client and for
/// ARP probes, so a port locked with no addresses can still ask for a lease. On a
/// network that carries IPv6, IPv6 frames must come from one of `ips6` (or `::`, for
/// duplicate address detection), and a Neighbour Advertisement may speak only for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortLock {
    pub mac: Mac,
    pub ips: Vec<Ipv4Addr>,
    pub ips6: Vec<std::net::Ipv6Addr>,
}

/// Something that happened in the data plane, for the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchEvent {
    /// The port's peer is there (connected, or first datagram from a new peer).
    PortUp {
        port: PortId,
        peer: Option<String>,
    },
    /// The port's peer has gone; the port forwards nothing until it is back or removed.
    PortDown {
        port: PortId,
        reason: String,
    },
    MacLearned {
        network: String,
        mac: Mac,
        port: PortId,
    },
    MacMoved {
        network: String,
        mac: Mac,
        from: PortId,
        to: PortId,
    },
    /// The network's MAC table is full (reported once until it has room again).
    MacTableFull {
        network: String,
    },
}

/// A port as listed by [`crate::Switch::ports`].
#[derive(Debug, Clone)]
pub struct PortInfo {
    pub id: PortId,
    pub network: String,
    pub label: String,
    pub transport: Transport,
    pub up: bool,
}

/// One MAC table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacEntry {
    pub mac: Mac,
    pub port: PortId,
    pub age: std::time::Duration,
}

/// A copy of a frame for a live capture.
#[derive(Debug, Clone)]
pub struct CapturedFrame {
    /// When it passed, since the Unix epoch.
    pub at: std::time::Duration,
    /// The port it came in through.
    pub from: PortId,
    pub data: Vec<u8>,
}

/// A live capture: copies of frames, until this is dropped. A reader that falls behind
/// loses copies (counted in [`Capture::dropped`]); the network never waits for it.
pub struct Capture {
    pub frames: std::sync::mpsc::Receiver<CapturedFrame>,
    pub(crate) dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Capture {
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The count of copies this capture lost, readable while another thread owns the
    /// capture (for metrics).
    pub fn loss_counter(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.dropped.clone()
    }
}

//! What the handle asks of the worker thread, and what the two share.

use super::*;

/// State the worker shares with the handle for reading without a command.
#[derive(Debug, Default)]
pub(crate) struct PortShared {
    pub counters: Counters,
    pub up: AtomicBool,
}

#[derive(Debug, Default)]
pub(crate) struct NetShared {
    pub counters: Counters,
    pub mac_entries: AtomicU64,
}

/// A port's and its network's drop counters, for a thread that serves the port (a
/// vhost-user device) to count what never reached the switch.
pub(crate) struct DropCounters {
    pub port: Arc<PortShared>,
    pub net: Arc<NetShared>,
}

impl DropCounters {
    pub(crate) fn add(&self, reason: DropReason) {
        self.port.counters.add_drop(reason, 1);
        self.net.counters.add_drop(reason, 1);
    }
}

pub(crate) struct NewPort {
    pub id: PortId,
    pub io: PortFd,
    pub shared: Arc<PortShared>,
}

pub(crate) type Reply<T> = SyncSender<Result<T>>;

pub(crate) enum Command {
    AddNetwork {
        name: String,
        config: NetworkConfig,
        shared: Arc<NetShared>,
        reply: Reply<()>,
    },
    RemoveNetwork {
        name: String,
        reply: Reply<()>,
    },
    AddPort {
        network: String,
        port: NewPort,
        reply: Reply<()>,
    },
    RemovePort {
        id: PortId,
        reply: Reply<()>,
    },
    LockPort {
        id: PortId,
        lock: Option<PortLock>,
        reply: Reply<()>,
    },
    SealNewPorts {
        network: String,
        reply: Reply<()>,
    },
    LockToFirstMac {
        id: PortId,
        reply: Reply<()>,
    },
    TrustPort {
        id: PortId,
        trusted: bool,
        reply: Reply<()>,
    },
    SetPeer {
        id: PortId,
        peer: UnixPeer,
        reply: Reply<()>,
    },
    MacTable {
        network: String,
        reply: Reply<Vec<MacEntry>>,
    },
    AddCapture {
        network: String,
        tap: CaptureTap,
        reply: Reply<()>,
    },
    AddPoller {
        poller: Box<dyn Poller>,
        reply: Reply<u64>,
    },
    RemovePoller {
        id: u64,
        reply: Reply<()>,
    },
    Shutdown,
}

//! The forwarding thread.
//!
//! Theory of operation: one thread owns every port, network and MAC table, so the hot
//! path takes no lock. It sleeps in `epoll_wait` with no timeout (an idle switch never
//! wakes) and is woken by port fds or by the control eventfd. For a readable port it
//! receives a batch of frames (`recvmmsg` for datagram sockets, one large `read` for a
//! stream, reads until EAGAIN for a TAP), decides each frame's destinations, then sends
//! each destination its share of the batch in one `sendmmsg` (or one `write` for a
//! stream). Frames are sent straight from the receive buffers; they are copied only
//! when a destination cannot take them now, into that port's bounded backlog, which is
//! drained when epoll reports the port writable. A full backlog drops that port's
//! frames and nobody else's.
//!
//! Invariants: a frame never leaves on its own port or on another network's port; a
//! port that is down is never sent to and, for a socketpair, no longer polled; every
//! frame received is either delivered or counted as a drop with its reason.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use rustix::buffer::spare_capacity;
use rustix::event::epoll;
use rustix::io::Errno;
use tracing::{debug, warn};

use crate::clock::Clock;
use crate::config::{NetworkConfig, MAX_RX_FRAME_LEN};
use crate::counters::{Counters, DropReason};
use crate::error::{FabricError, Result};
use crate::frame::{is_dhcp_client_message, EthernetView, FrameError};
use crate::mac::Mac;
use crate::offload::{Offload, SoftFrames};
use crate::port::{CapturedFrame, MacEntry, PortId, PortLock, SwitchEvent};
use crate::switch::table::{Learned, MacTable};
use crate::sys::mmsg::{Received, UnixPeer, BATCH};

const WAKE_TOKEN: u64 = u64::MAX;
/// Set in the token of a poller's fd (a port's token is its slot, 33 bits at most).
const POLLER_TOKEN: u64 = 1 << 62;
/// Batches read from one port per wake-up before the others get their turn.
const ROUNDS_PER_WAKE: usize = 8;
/// Bytes read from one port per wake-up: a TAP's offloaded segments are 64 KiB each, and
/// eight rounds of them (3 MB) kept a tunnel's acknowledgements waiting behind them,
/// which held a guest's TCP at 3 ms of round trip (BENCHMARKS.md, VXLAN).
const TURN_BYTES: usize = 128 << 10;
/// Backlog buffers kept for reuse instead of being freed.
const SPARE_BUFFERS: usize = 4096;

fn token(slot: u32, conn: bool) -> u64 {
    (u64::from(slot) << 1) | u64::from(conn)
}

mod command;
mod egress;
mod forward;
mod lifecycle;
mod port_io;
mod rx;

pub(crate) use command::*;
pub(crate) use port_io::PortFd;
use port_io::{IoLimits, PortIo};

struct Port {
    id: PortId,
    net: usize,
    shared: Arc<PortShared>,
    io: PortIo,
    up: bool,
    lock: Option<PortLock>,
    /// Lock to the source MAC of the first frame (for VMMs that choose their own MAC).
    lock_to_first_mac: bool,
    /// May send DHCP server messages (the network's gateway).
    trusted: bool,
    /// Born on a network that seals new ports, and not locked or trusted yet:
    /// everything it sends is dropped.
    sealed: bool,
    /// Frames copied for later, with what their virtio-net header said.
    backlog: VecDeque<(Vec<u8>, Offload)>,
    out_armed: bool,
}

struct Net {
    name: String,
    config: NetworkConfig,
    shared: Arc<NetShared>,
    ports: Vec<u32>,
    table: MacTable,
    /// MACs locked to a port: no other port may send from them.
    locked: HashMap<Mac, u32>,
    full_reported: bool,
    /// New ports are born sealed (see `Switch::seal_new_ports`).
    seal_new_ports: bool,
    /// Live captures; empty unless someone is watching, so forwarding pays one check.
    captures: Vec<CaptureTap>,
}

/// Where a capture's copies go: every frame of the network, or those to and from one port.
pub(crate) struct CaptureTap {
    pub port: Option<PortId>,
    pub slot: Option<u32>,
    pub tx: SyncSender<CapturedFrame>,
    pub dropped: Arc<AtomicU64>,
}

impl CaptureTap {
    /// Offers a copy; a full channel (slow reader) loses the copy, never the frame.
    /// Returns false once the reader is gone.
    fn offer(&self, at: Duration, from: PortId, frame: &[u8]) -> bool {
        match self.tx.try_send(CapturedFrame {
            at,
            from,
            data: frame.to_vec(),
        }) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Everything forwarding touches, apart from the receive buffers.
struct Fabric {
    epoll: OwnedFd,
    clock: Arc<dyn Clock>,
    events: SyncSender<SwitchEvent>,
    events_dropped: Arc<AtomicU64>,
    egress_queue_frames: usize,
    stream_queue_bytes: usize,
    socket_buffer_bytes: usize,
    ports: Vec<Option<Port>>,
    free_slots: Vec<u32>,
    by_id: HashMap<PortId, u32>,
    nets: Vec<Option<Net>>,
    net_by_name: HashMap<String, usize>,
    /// Per destination slot: indices into the batch being forwarded.
    pending: Vec<Vec<u16>>,
    dirty: Vec<u32>,
    spare: Vec<Vec<u8>>,
    /// Segments made for a port that takes no offloads.
    soft: SoftFrames,
}

/// Where received frames land. Datagram and TAP ports receive into `bufs`; a stream
/// port lends its own buffer as `stream` for one batch, its frames at `spans`.
struct RxBuffers {
    bufs: Vec<Box<[u8]>>,
    meta: [Received; BATCH],
    /// What each frame's virtio-net header said (ports that have one).
    offloads: [Offload; BATCH],
    peers: Box<[UnixPeer; BATCH]>,
    stream: Vec<u8>,
    spans: [(usize, usize); BATCH],
    /// An in-process port's frames, lent for one batch.
    owned: Vec<Vec<u8>>,
}

impl RxBuffers {
    fn new() -> RxBuffers {
        RxBuffers {
            bufs: (0..BATCH)
                .map(|_| vec![0u8; MAX_RX_FRAME_LEN + 1].into_boxed_slice())
                .collect(),
            meta: [Received::default(); BATCH],
            offloads: [Offload::default(); BATCH],
            peers: Box::new([UnixPeer::default(); BATCH]),
            stream: Vec::new(),
            spans: [(0, 0); BATCH],
            owned: Vec::with_capacity(BATCH),
        }
    }
}

/// Work a service of this process has the switch thread do beside forwarding (a VXLAN
/// tunnel endpoint): its frames then reach the switch's queues, and leave them, without
/// waking a thread of its own on the way, which on a machine of few cores shared with
/// the guests costs more than the work.
pub(crate) trait Poller: Send {
    /// Readable while the poller has work (an epoll fd of its own).
    fn fd(&self) -> std::os::fd::BorrowedFd<'_>;
    /// Does the work there is now, without blocking.
    fn poll(&mut self);
    /// Whether it holds work back for more to join it (see [`Poller::settle`]).
    fn holds(&self) -> bool {
        false
    }
    /// Called after each round of events while it [holds](Poller::holds) work back,
    /// `idle` when nothing else is ready: it does that work by the next round at the
    /// latest, at once when idle.
    fn settle(&mut self, _idle: bool) {}
}

pub(crate) struct Worker {
    fab: Fabric,
    rx: RxBuffers,
    wake: Arc<OwnedFd>,
    commands: Receiver<Command>,
    /// By index (the low bits of their token); a removed one leaves a hole.
    pollers: Vec<Option<Box<dyn Poller>>>,
}

pub(crate) struct WorkerSetup {
    pub wake: Arc<OwnedFd>,
    pub commands: Receiver<Command>,
    pub events: SyncSender<SwitchEvent>,
    pub events_dropped: Arc<AtomicU64>,
    pub clock: Arc<dyn Clock>,
    pub egress_queue_frames: usize,
    pub stream_queue_bytes: usize,
    pub socket_buffer_bytes: usize,
}

impl Worker {
    pub(crate) fn new(s: WorkerSetup) -> io::Result<Worker> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(
            &epoll,
            &*s.wake,
            epoll::EventData::new_u64(WAKE_TOKEN),
            epoll::EventFlags::IN,
        )?;
        Ok(Worker {
            fab: Fabric {
                epoll,
                clock: s.clock,
                events: s.events,
                events_dropped: s.events_dropped,
                egress_queue_frames: s.egress_queue_frames,
                stream_queue_bytes: s.stream_queue_bytes,
                socket_buffer_bytes: s.socket_buffer_bytes,
                ports: Vec::new(),
                free_slots: Vec::new(),
                by_id: HashMap::new(),
                nets: Vec::new(),
                net_by_name: HashMap::new(),
                pending: Vec::new(),
                dirty: Vec::with_capacity(64),
                spare: Vec::new(),
                soft: SoftFrames::default(),
            },
            rx: RxBuffers::new(),
            wake: s.wake,
            commands: s.commands,
            pollers: Vec::new(),
        })
    }

    pub(crate) fn run(mut self) {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
        let now = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        loop {
            events.clear();
            // A poller holding work back gets to do it before the thread sleeps, and
            // only then: what is ready now may join it.
            let holding = self.pollers.iter().flatten().any(|p| p.holds());
            match epoll::wait(&self.fab.epoll, spare_capacity(&mut events), holding.then_some(&now)) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => {
                    warn!("switch worker stops: epoll_wait failed: {e}");
                    return;
                }
            }
            if holding && events.is_empty() {
                self.pollers.iter_mut().flatten().for_each(|p| p.settle(true));
                continue;
            }
            for ev in &events {
                let tok = ev.data.u64();
                if tok == WAKE_TOKEN {
                    if !self.drain_commands() {
                        return;
                    }
                    continue;
                }
                if tok & POLLER_TOKEN != 0 {
                    if let Some(Some(p)) = self.pollers.get_mut((tok & !POLLER_TOKEN) as usize) {
                        p.poll();
                    }
                    continue;
                }
                let slot = (tok >> 1) as u32;
                let conn = tok & 1 == 1;
                if self.fab.port(slot).is_none() {
                    continue; // removed earlier in this batch
                }
                let flags = ev.flags;
                let ring = self.fab.port(slot).is_some_and(|p| p.io.room_wakes_reader());
                if flags.contains(epoll::EventFlags::OUT) && !ring {
                    self.fab.drain_backlog(slot);
                }
                if flags.intersects(
                    epoll::EventFlags::IN | epoll::EventFlags::ERR | epoll::EventFlags::HUP | epoll::EventFlags::RDHUP,
                ) {
                    self.readable(slot, conn);
                }
                // An in-process port says "room" on the wake-up its frames use, which
                // the read above drained: the backlog goes after it, so a wake-up for
                // room made after this push is a new event. (Pushed before the read,
                // the port could make room and wake us between the push and the
                // drain, and that wake-up was lost: the backlog, with every frame for
                // the gateway behind it, waited for the gateway to send something.)
                if ring && self.fab.port(slot).is_some_and(|p| !p.backlog.is_empty()) {
                    self.fab.drain_backlog(slot);
                }
            }
            for p in self.pollers.iter_mut().flatten() {
                if p.holds() {
                    p.settle(false);
                }
            }
        }
    }

    /// Returns false when told to shut down.
    fn drain_commands(&mut self) -> bool {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&*self.wake, &mut buf);
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Shutdown => return false,
                Command::AddNetwork {
                    name,
                    config,
                    shared,
                    reply,
                } => {
                    let _ = reply.send(self.fab.add_network(name, config, shared));
                }
                Command::RemoveNetwork { name, reply } => {
                    let _ = reply.send(self.fab.remove_network(&name));
                }
                Command::AddPort { network, port, reply } => {
                    let _ = reply.send(self.fab.add_port(&network, port));
                }
                Command::RemovePort { id, reply } => {
                    let _ = reply.send(self.fab.remove_port(id));
                }
                Command::LockPort { id, lock, reply } => {
                    let _ = reply.send(self.fab.lock_port(id, lock));
                }
                Command::LockToFirstMac { id, reply } => {
                    let _ = reply.send(self.fab.lock_port(id, None).and_then(|()| {
                        let slot = self.fab.slot_of(id)?;
                        self.fab.port_mut(slot).expect("indexed port exists").lock_to_first_mac = true;
                        Ok(())
                    }));
                }
                Command::TrustPort { id, trusted, reply } => {
                    let _ = reply.send(self.fab.slot_of(id).map(|slot| {
                        let port = self.fab.port_mut(slot).expect("indexed port exists");
                        port.trusted = trusted;
                        port.sealed = false;
                    }));
                }
                Command::SealNewPorts { network, reply } => {
                    let _ = reply.send(self.fab.seal_new_ports(&network));
                }
                Command::SetPeer { id, peer, reply } => {
                    let _ = reply.send(self.fab.slot_of(id).map(|slot| self.fab.set_peer(slot, peer)));
                }
                Command::AddCapture { network, tap, reply } => {
                    let _ = reply.send(self.fab.add_capture(&network, tap));
                }
                Command::MacTable { network, reply } => {
                    let _ = reply.send(self.fab.mac_table(&network));
                }
                Command::AddPoller { poller, reply } => {
                    let _ = reply.send(self.add_poller(poller));
                }
                Command::RemovePoller { id, reply } => {
                    let gone = self.pollers.get_mut(id as usize).and_then(Option::take);
                    let _ = reply.send(match gone {
                        Some(p) => {
                            let _ = epoll::delete(&self.fab.epoll, p.fd());
                            drop(p);
                            Ok(())
                        }
                        None => Err(FabricError::InvalidConfig(format!("no poller {id}"))),
                    });
                }
            }
        }
        true
    }
}

impl Worker {
    fn add_poller(&mut self, poller: Box<dyn Poller>) -> Result<u64> {
        let id = self
            .pollers
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.pollers.len());
        let data = epoll::EventData::new_u64(POLLER_TOKEN | id as u64);
        epoll::add(&self.fab.epoll, poller.fd(), data, epoll::EventFlags::IN)
            .map_err(|e| FabricError::io("watch a poller's fd", e.into()))?;
        if id == self.pollers.len() {
            self.pollers.push(None);
        }
        self.pollers[id] = Some(poller);
        Ok(id as u64)
    }
}

impl Fabric {
    fn port(&self, slot: u32) -> Option<&Port> {
        self.ports.get(slot as usize).and_then(Option::as_ref)
    }

    fn port_mut(&mut self, slot: u32) -> Option<&mut Port> {
        self.ports.get_mut(slot as usize).and_then(Option::as_mut)
    }

    fn port_id(&self, slot: u32) -> PortId {
        self.port(slot).map(|p| p.id).unwrap_or(PortId(u64::MAX))
    }

    fn net(&self, idx: usize) -> &Net {
        self.nets[idx]
            .as_ref()
            .expect("a port's network exists while the port does")
    }

    fn emit(&self, ev: SwitchEvent) {
        emit(&self.events, &self.events_dropped, ev);
    }

    /// Frames the socket cut or the stream announced as too long: received and dropped.
    fn count_cut(&self, slot: u32, frames: u64, bytes: u64) {
        if frames == 0 {
            return;
        }
        if let Some(p) = self.port(slot) {
            let net = &self.net(p.net).shared.counters;
            for c in [&p.shared.counters, net] {
                c.add_rx(frames, bytes);
                c.add_drop(DropReason::Oversize, frames);
            }
        }
    }

    fn count_drop(&self, slot: u32, reason: DropReason, frames: u64) {
        if frames == 0 {
            return;
        }
        if let Some(p) = self.port(slot) {
            p.shared.counters.add_drop(reason, frames);
            self.net(p.net).shared.counters.add_drop(reason, frames);
        }
    }
}

/// Hands an event to the control plane, or counts it when nobody keeps up.
fn emit(events: &SyncSender<SwitchEvent>, dropped: &AtomicU64, ev: SwitchEvent) {
    if let Err(TrySendError::Full(_)) = events.try_send(ev) {
        dropped.fetch_add(1, Ordering::Relaxed);
    }
}

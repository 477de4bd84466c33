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
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use rustix::buffer::spare_capacity;
use rustix::event::epoll;
use rustix::io::Errno;
use rustix::net::SocketFlags;
use tracing::{debug, warn};

use crate::clock::Clock;
use crate::config::{NetworkConfig, MAX_FRAME_LEN};
use crate::counters::{Counters, DropReason};
use crate::error::{FabricError, Result};
use crate::frame::{is_dhcp_client_message, EthernetView, FrameError};
use crate::mac::Mac;
use crate::port::{CapturedFrame, MacEntry, PortId, PortLock, SwitchEvent};
use crate::switch::table::{Learned, MacTable};
use crate::sys::mmsg::{recv_batch, send_batch, Received, UnixPeer, BATCH};
use crate::transport;

const WAKE_TOKEN: u64 = u64::MAX;
/// Batches read from one port per wake-up before the others get their turn.
const ROUNDS_PER_WAKE: usize = 8;
/// Backlog buffers kept for reuse instead of being freed.
const SPARE_BUFFERS: usize = 4096;
/// Extra room in a stream port's receive buffer beyond one maximal frame, so one read
/// usually brings many frames.
const STREAM_RX_SLACK: usize = 256 << 10;

fn token(slot: u32, conn: bool) -> u64 {
    (u64::from(slot) << 1) | u64::from(conn)
}

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

/// The fd a new port is served through.
pub(crate) enum PortIo {
    /// A socketpair end: connected, the peer is fixed.
    Connected(OwnedFd),
    /// A bound datagram path; the peer is whoever sends to it.
    Path(OwnedFd),
    /// A listening stream path.
    Listener(OwnedFd),
    Tap(OwnedFd),
}

pub(crate) struct NewPort {
    pub id: PortId,
    pub io: PortIo,
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
    Shutdown,
}

struct StreamConn {
    fd: OwnedFd,
    rx: Vec<u8>,
    rx_len: usize,
    /// Bytes of an oversize frame still to skip.
    discard: usize,
    tx: Vec<u8>,
    tx_off: usize,
}

enum Kind {
    Connected(OwnedFd),
    Path {
        sock: OwnedFd,
        peer: Option<UnixPeer>,
    },
    Stream {
        listener: OwnedFd,
        conn: Option<StreamConn>,
    },
    Tap(OwnedFd),
}

struct Port {
    id: PortId,
    net: usize,
    shared: Arc<PortShared>,
    kind: Kind,
    up: bool,
    lock: Option<PortLock>,
    /// Lock to the source MAC of the first frame (for VMMs that choose their own MAC).
    lock_to_first_mac: bool,
    /// May send DHCP server messages (the network's gateway).
    trusted: bool,
    backlog: VecDeque<Vec<u8>>,
    out_armed: bool,
}

impl Port {
    /// The fd epoll watches for writability, if the port can be written now.
    fn writable_fd(&self) -> Option<(BorrowedFd<'_>, bool)> {
        match &self.kind {
            Kind::Connected(fd) | Kind::Path { sock: fd, .. } | Kind::Tap(fd) => Some((fd.as_fd(), false)),
            Kind::Stream { conn: Some(c), .. } => Some((c.fd.as_fd(), true)),
            Kind::Stream { conn: None, .. } => None,
        }
    }
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
    fn offer(&self, at: Duration, frame: &[u8]) -> bool {
        match self.tx.try_send(CapturedFrame {
            at,
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
}

struct RxBuffers {
    bufs: Vec<Box<[u8]>>,
    meta: [Received; BATCH],
    peers: Box<[UnixPeer; BATCH]>,
}

pub(crate) struct Worker {
    fab: Fabric,
    rx: RxBuffers,
    wake: Arc<OwnedFd>,
    commands: Receiver<Command>,
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

fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::ENOENT
                | libc::EPIPE
                | libc::ECONNRESET
                | libc::ENOTCONN
                | libc::EBADFD
                | libc::EIO
        )
    )
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
        let bufs = (0..BATCH)
            .map(|_| vec![0u8; MAX_FRAME_LEN + 1].into_boxed_slice())
            .collect();
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
            },
            rx: RxBuffers {
                bufs,
                meta: [Received::default(); BATCH],
                peers: Box::new([UnixPeer::default(); BATCH]),
            },
            wake: s.wake,
            commands: s.commands,
        })
    }

    pub(crate) fn run(mut self) {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
        loop {
            events.clear();
            match epoll::wait(&self.fab.epoll, spare_capacity(&mut events), None) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => {
                    warn!("switch worker stops: epoll_wait failed: {e}");
                    return;
                }
            }
            for ev in &events {
                let tok = ev.data.u64();
                if tok == WAKE_TOKEN {
                    if !self.drain_commands() {
                        return;
                    }
                    continue;
                }
                let slot = (tok >> 1) as u32;
                let conn = tok & 1 == 1;
                if self.fab.port(slot).is_none() {
                    continue; // removed earlier in this batch
                }
                let flags = ev.flags;
                if flags.contains(epoll::EventFlags::OUT) {
                    self.fab.drain_backlog(slot);
                }
                if flags.intersects(
                    epoll::EventFlags::IN | epoll::EventFlags::ERR | epoll::EventFlags::HUP | epoll::EventFlags::RDHUP,
                ) {
                    self.readable(slot, conn);
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
                        self.fab.port_mut(slot).expect("indexed port exists").trusted = trusted;
                    }));
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
            }
        }
        true
    }

    fn readable(&mut self, slot: u32, conn: bool) {
        let Some(port) = self.fab.port(slot) else {
            return;
        };
        match &port.kind {
            Kind::Connected(_) | Kind::Path { .. } => self.read_datagrams(slot),
            Kind::Tap(_) => self.read_tap(slot),
            Kind::Stream { .. } if conn => self.read_stream(slot),
            Kind::Stream { .. } => self.fab.accept(slot),
        }
    }

    fn read_datagrams(&mut self, slot: u32) {
        for _ in 0..ROUNDS_PER_WAKE {
            let Some(port) = self.fab.port(slot) else {
                return;
            };
            let max_len = self.fab.net(port.net).config.max_frame_len();
            let (sock, is_path) = match &port.kind {
                Kind::Connected(fd) => (fd.as_fd(), false),
                Kind::Path { sock, .. } => (sock.as_fd(), true),
                _ => return,
            };
            let peers = if is_path { Some(&mut *self.rx.peers) } else { None };
            let n = match recv_batch(sock, &mut self.rx.bufs, max_len, &mut self.rx.meta, peers) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_peer_gone(&e) => {
                    self.fab.port_down(slot, format!("receive failed: {e}"));
                    return;
                }
                Err(e) => {
                    warn!(port = %self.fab.port_id(slot), "receive failed: {e}");
                    return;
                }
            };
            if is_path {
                if let Some(peer) = self.rx.peers[..n].iter().rev().find(|p| p.is_named()) {
                    self.fab.set_peer(slot, *peer);
                }
            }
            let mut frames: [&[u8]; BATCH] = [&[]; BATCH];
            let mut k = 0;
            let (mut cut, mut cut_bytes) = (0u64, 0u64);
            for (buf, meta) in self.rx.bufs.iter().zip(&self.rx.meta[..n]) {
                if meta.truncated {
                    cut += 1;
                    cut_bytes += meta.len as u64;
                } else {
                    frames[k] = &buf[..meta.len];
                    k += 1;
                }
            }
            self.fab.count_cut(slot, cut, cut_bytes);
            self.fab.forward(slot, &frames[..k]);
            if n < BATCH {
                return;
            }
        }
    }

    fn read_tap(&mut self, slot: u32) {
        for _ in 0..ROUNDS_PER_WAKE {
            let Some(port) = self.fab.port(slot) else {
                return;
            };
            let max_len = self.fab.net(port.net).config.max_frame_len();
            let Kind::Tap(fd) = &port.kind else { return };
            let (mut n, mut cut, mut failed) = (0, 0u64, None);
            while n < BATCH {
                // One more byte than allowed: a read that fills it was cut.
                match rustix::io::read(fd, &mut self.rx.bufs[n][..max_len + 1]) {
                    Ok(len) if len > max_len => cut += 1,
                    Ok(len) => {
                        self.rx.meta[n].len = len;
                        n += 1;
                    }
                    Err(Errno::INTR) => {}
                    Err(Errno::AGAIN) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let mut frames: [&[u8]; BATCH] = [&[]; BATCH];
            for ((f, buf), meta) in frames.iter_mut().zip(&self.rx.bufs).zip(&self.rx.meta[..n]) {
                *f = &buf[..meta.len];
            }
            self.fab.count_cut(slot, cut, cut * (max_len as u64 + 1));
            self.fab.forward(slot, &frames[..n]);
            if let Some(e) = failed {
                self.fab.port_down(slot, format!("TAP read failed: {e}"));
                return;
            }
            if n < BATCH {
                return;
            }
        }
    }

    fn read_stream(&mut self, slot: u32) {
        let Some(port) = self.fab.port_mut(slot) else {
            return;
        };
        let net = port.net;
        let Kind::Stream { conn, .. } = &mut port.kind else {
            return;
        };
        let Some(mut c) = conn.take() else { return };
        let max_frame = self.fab.net(net).config.max_frame_len();
        let mut closed = None;
        for _ in 0..ROUNDS_PER_WAKE {
            match rustix::io::read(&c.fd, &mut c.rx[c.rx_len..]) {
                Ok(0) => closed = Some("the peer closed the stream".to_string()),
                Ok(n) => c.rx_len += n,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => break,
                Err(e) => closed = Some(format!("stream read failed: {e}")),
            }
            let mut off = c.discard.min(c.rx_len);
            c.discard -= off;
            loop {
                let mut frames: [&[u8]; BATCH] = [&[]; BATCH];
                let mut k = 0;
                while k < BATCH && c.discard == 0 && c.rx_len - off >= 4 {
                    let len_bytes: [u8; 4] = c.rx[off..off + 4].try_into().expect("4 bytes checked");
                    let flen = u32::from_be_bytes(len_bytes) as usize;
                    let avail = c.rx_len - off - 4;
                    if flen > max_frame {
                        // The length says where the next frame starts, so the stream
                        // stays in step: skip this one, now and in later reads.
                        let skip = flen.min(avail);
                        c.discard = flen - skip;
                        off += 4 + skip;
                        self.fab.count_cut(slot, 1, flen as u64);
                        continue;
                    }
                    if avail < flen {
                        break;
                    }
                    frames[k] = &c.rx[off + 4..off + 4 + flen];
                    k += 1;
                    off += 4 + flen;
                }
                self.fab.forward(slot, &frames[..k]);
                if k < BATCH {
                    break;
                }
            }
            c.rx.copy_within(off..c.rx_len, 0);
            c.rx_len -= off;
            if closed.is_some() {
                break;
            }
        }
        if let Some(reason) = closed {
            let _ = epoll::delete(&self.fab.epoll, &c.fd);
            self.fab.port_down(slot, reason);
            return;
        }
        if let Some(Port {
            kind: Kind::Stream { conn, .. },
            ..
        }) = self.fab.port_mut(slot)
        {
            *conn = Some(c);
        }
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

    /// Decides where each frame of a batch from `src` goes, then sends.
    fn forward(&mut self, src: u32, frames: &[&[u8]]) {
        if frames.is_empty() {
            return;
        }
        if self.ports[src as usize].as_ref().is_some_and(|p| p.lock_to_first_mac) {
            self.lock_to_first_mac(src, frames);
        }
        let now = self.clock.now();
        let Some(port) = self.ports[src as usize].as_ref() else {
            return;
        };
        let net = self.nets[port.net].as_mut().expect("port's network exists");
        let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
        port.shared.counters.add_rx(frames.len() as u64, bytes);
        net.shared.counters.add_rx(frames.len() as u64, bytes);
        let mut drops = [0u64; DropReason::ALL.len()];
        let (pending, dirty, ports) = (&mut self.pending, &mut self.dirty, &self.ports);
        let mut push = |dest: u32, i: usize| {
            let list = &mut pending[dest as usize];
            if list.is_empty() {
                dirty.push(dest);
            }
            list.push(i as u16);
        };
        let mut last_src: Option<Mac> = None;
        let mut last_dst: Option<(Mac, Option<u32>)> = None;
        for (i, f) in frames.iter().enumerate() {
            let view = match EthernetView::parse(f, net.config.mtu) {
                Ok(v) => v,
                Err(FrameError::Runt) => {
                    drops[DropReason::Runt as usize] += 1;
                    continue;
                }
                Err(FrameError::Oversize) => {
                    drops[DropReason::Oversize as usize] += 1;
                    continue;
                }
            };
            let smac = view.src();
            // A burst from one VM repeats its source and destination. Within a batch
            // the clock stands still and a repeated source changes nothing, so both
            // answers are reused instead of hashed again.
            let repeated_src = last_src == Some(smac);
            let stolen = !repeated_src && net.locked.get(&smac).is_some_and(|owner| *owner != src);
            if stolen {
                drops[DropReason::Spoofed as usize] += 1;
                continue;
            }
            if let Some(reason) = crate::guard::verdict(&net.config, port.lock.as_ref(), port.trusted, &view) {
                drops[reason as usize] += 1;
                continue;
            }
            let learned = if repeated_src {
                Learned::Refreshed
            } else {
                net.table.learn(smac, src, now)
            };
            last_src = Some(smac);
            match learned {
                Learned::Refreshed => {}
                Learned::New => {
                    last_dst = None;
                    net.full_reported = false;
                    emit(
                        &self.events,
                        &self.events_dropped,
                        SwitchEvent::MacLearned {
                            network: net.name.clone(),
                            mac: smac,
                            port: port.id,
                        },
                    );
                }
                Learned::Moved { from } => {
                    last_dst = None;
                    let from = ports[from as usize].as_ref().map(|p| p.id).unwrap_or(PortId(u64::MAX));
                    emit(
                        &self.events,
                        &self.events_dropped,
                        SwitchEvent::MacMoved {
                            network: net.name.clone(),
                            mac: smac,
                            from,
                            to: port.id,
                        },
                    );
                }
                Learned::Full => {
                    drops[DropReason::TableFull as usize] += 1;
                    if !net.full_reported {
                        net.full_reported = true;
                        let ev = SwitchEvent::MacTableFull {
                            network: net.name.clone(),
                        };
                        emit(&self.events, &self.events_dropped, ev);
                    }
                }
            }
            let dmac = view.dst();
            let known = match last_dst {
                _ if dmac.is_group() => None,
                Some((m, known)) if m == dmac => known,
                _ => {
                    // A locked MAC's port is known whatever the table holds: a MAC
                    // flood that fills the table cannot make a guest's unicast flood.
                    let known = net.table.lookup(&dmac, now).or_else(|| net.locked.get(&dmac).copied());
                    last_dst = Some((dmac, known));
                    known
                }
            };
            match known {
                Some(d) if d == src => drops[DropReason::NoRoute as usize] += 1,
                Some(d) => push(d, i),
                None => {
                    // A DHCP client's broadcast is for the DHCP server only: under the
                    // guard it goes to the trusted ports, so VMs neither see each
                    // other's DHCP nor pay for flooding it.
                    let only_trusted = net.config.dhcp_guard && is_dhcp_client_message(&view);
                    let mut sent = false;
                    for &d in &net.ports {
                        let eligible = ports[d as usize]
                            .as_ref()
                            .is_some_and(|p| p.up && (!only_trusted || p.trusted));
                        if d != src && eligible {
                            push(d, i);
                            sent = true;
                        }
                    }
                    if only_trusted && !sent {
                        // No trusted server on this network: behave as a plain switch.
                        for &d in &net.ports {
                            if d != src && ports[d as usize].as_ref().is_some_and(|p| p.up) {
                                push(d, i);
                            }
                        }
                    }
                }
            }
        }
        net.shared.mac_entries.store(net.table.len() as u64, Ordering::Relaxed);
        for (reason, n) in DropReason::ALL.iter().zip(drops) {
            if n > 0 {
                port.shared.counters.add_drop(*reason, n);
                net.shared.counters.add_drop(*reason, n);
            }
        }
        if !net.captures.is_empty() {
            let at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let (pending, dirty) = (&self.pending, &self.dirty);
            net.captures.retain(|tap| match tap.slot {
                // A whole network: each frame once, as it came in.
                None => frames.iter().all(|f| tap.offer(at, f)),
                // One port: what it sent, then what it is about to be sent.
                Some(p) if p == src => frames.iter().all(|f| tap.offer(at, f)),
                Some(p) => {
                    !dirty.contains(&p) || pending[p as usize].iter().all(|i| tap.offer(at, frames[*i as usize]))
                }
            });
        }
        let mut dirty = mem::take(&mut self.dirty);
        for &d in &dirty {
            let list = mem::take(&mut self.pending[d as usize]);
            self.transmit(d, &list, frames);
            self.pending[d as usize] = list;
            self.pending[d as usize].clear();
        }
        dirty.clear();
        self.dirty = dirty;
    }

    fn transmit(&mut self, d: u32, idx: &[u16], frames: &[&[u8]]) {
        let mut list: [&[u8]; BATCH] = [&[]; BATCH];
        for (slot, i) in list.iter_mut().zip(idx) {
            *slot = frames[*i as usize];
        }
        let list = &list[..idx.len()];
        let Some(port) = self.port_mut(d) else { return };
        if !port.up {
            self.count_drop(d, DropReason::PeerGone, list.len() as u64);
            return;
        }
        if let Kind::Stream { .. } = port.kind {
            self.queue_stream(d, list);
            return;
        }
        if !port.backlog.is_empty() {
            self.enqueue(d, list);
            return;
        }
        let mut off = 0;
        while off < list.len() {
            let Some(port) = self.port(d) else { return };
            match send_frames(&port.kind, &list[off..]) {
                Ok(k) => {
                    let bytes = list[off..off + k].iter().map(|f| f.len() as u64).sum();
                    port.shared.counters.add_tx(k as u64, bytes);
                    self.net(port.net).shared.counters.add_tx(k as u64, bytes);
                    off += k;
                }
                Err(e) => match send_failure(&e, &port.kind) {
                    SendFailure::Later => {
                        self.enqueue(d, &list[off..]);
                        return;
                    }
                    SendFailure::Retry => {}
                    SendFailure::Drop(reason) => {
                        self.count_drop(d, reason, 1);
                        off += 1;
                    }
                    SendFailure::Down => {
                        self.count_drop(d, DropReason::PeerGone, (list.len() - off) as u64);
                        self.port_down(d, format!("send failed: {e}"));
                        return;
                    }
                },
            }
        }
    }

    /// Copies frames into the port's backlog (bounded) and asks for writability.
    fn enqueue(&mut self, d: u32, frames: &[&[u8]]) {
        let cap = self.egress_queue_frames;
        let Some(port) = self.ports[d as usize].as_mut() else {
            return;
        };
        let mut dropped = 0;
        for f in frames {
            if port.backlog.len() >= cap {
                dropped += 1;
                continue;
            }
            let mut b = self.spare.pop().unwrap_or_default();
            b.clear();
            b.extend_from_slice(f);
            port.backlog.push_back(b);
        }
        self.count_drop(d, DropReason::QueueFull, dropped);
        self.set_out_interest(d, true);
    }

    fn set_out_interest(&mut self, d: u32, want: bool) {
        let Some(port) = self.port(d) else { return };
        if port.out_armed == want {
            return;
        }
        let Some((fd, conn)) = port.writable_fd() else {
            return;
        };
        let mut flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
        if want {
            flags |= epoll::EventFlags::OUT;
        }
        if let Err(e) = epoll::modify(&self.epoll, fd, epoll::EventData::new_u64(token(d, conn)), flags) {
            warn!(port = %port.id, "epoll modify failed: {e}");
            return;
        }
        if let Some(p) = self.port_mut(d) {
            p.out_armed = want;
        }
    }

    /// The port became writable: send what waits.
    fn drain_backlog(&mut self, d: u32) {
        let Some(port) = self.port(d) else { return };
        if let Kind::Stream { .. } = port.kind {
            self.flush_stream(d);
            return;
        }
        loop {
            let Some(port) = self.ports[d as usize].as_mut() else {
                return;
            };
            if port.backlog.is_empty() {
                break;
            }
            let mut list: [&[u8]; BATCH] = [&[]; BATCH];
            for (s, f) in list.iter_mut().zip(&port.backlog) {
                *s = f;
            }
            let n = port.backlog.len().min(BATCH);
            match send_frames(&port.kind, &list[..n]) {
                Ok(k) => {
                    let mut bytes = 0;
                    for _ in 0..k {
                        let buf = port.backlog.pop_front().expect("k <= backlog length");
                        bytes += buf.len() as u64;
                        if self.spare.len() < SPARE_BUFFERS {
                            self.spare.push(buf);
                        }
                    }
                    port.shared.counters.add_tx(k as u64, bytes);
                    let net = port.net;
                    self.net(net).shared.counters.add_tx(k as u64, bytes);
                }
                Err(e) => match send_failure(&e, &port.kind) {
                    SendFailure::Later => return,
                    SendFailure::Retry => {}
                    SendFailure::Drop(reason) => {
                        port.backlog.pop_front();
                        self.count_drop(d, reason, 1);
                    }
                    SendFailure::Down => {
                        self.port_down(d, format!("send failed: {e}"));
                        return;
                    }
                },
            }
        }
        self.set_out_interest(d, false);
    }

    fn queue_stream(&mut self, d: u32, frames: &[&[u8]]) {
        let cap = self.stream_queue_bytes;
        let Some(port) = self.ports[d as usize].as_mut() else {
            return;
        };
        let Kind::Stream { conn: Some(c), .. } = &mut port.kind else {
            self.count_drop(d, DropReason::PeerGone, frames.len() as u64);
            return;
        };
        let (mut queued, mut bytes, mut dropped) = (0u64, 0u64, 0u64);
        for f in frames {
            if c.tx.len() - c.tx_off + 4 + f.len() > cap {
                dropped += 1;
                continue;
            }
            c.tx.extend_from_slice(&(f.len() as u32).to_be_bytes());
            c.tx.extend_from_slice(f);
            queued += 1;
            bytes += f.len() as u64;
        }
        // Counted as sent once the stream has taken them: the bytes are in order
        // behind what is already queued and will follow unless the peer goes away.
        port.shared.counters.add_tx(queued, bytes);
        let net = port.net;
        self.net(net).shared.counters.add_tx(queued, bytes);
        self.count_drop(d, DropReason::QueueFull, dropped);
        self.flush_stream(d);
    }

    fn flush_stream(&mut self, d: u32) {
        let Some(port) = self.ports[d as usize].as_mut() else {
            return;
        };
        let Kind::Stream { conn: Some(c), .. } = &mut port.kind else {
            return;
        };
        let mut failed = None;
        while c.tx_off < c.tx.len() {
            match rustix::io::write(&c.fd, &c.tx[c.tx_off..]) {
                Ok(n) => c.tx_off += n,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if c.tx_off == c.tx.len() {
            c.tx.clear();
            c.tx_off = 0;
        } else if c.tx_off > c.tx.len() / 2 {
            c.tx.drain(..c.tx_off);
            c.tx_off = 0;
        }
        let waiting = !c.tx.is_empty();
        if let Some(e) = failed {
            self.port_down(d, format!("stream write failed: {e}"));
            return;
        }
        self.set_out_interest(d, waiting);
    }

    fn accept(&mut self, slot: u32) {
        loop {
            let Some(port) = self.port(slot) else { return };
            let Kind::Stream { listener, conn } = &port.kind else {
                return;
            };
            let fd = match rustix::net::accept_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
                Ok(fd) => fd,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return,
                Err(e) => {
                    warn!(port = %port.id, "accept failed: {e}");
                    return;
                }
            };
            if conn.is_some() {
                warn!(port = %port.id, "refused a second connection: one VMM per stream port");
                continue;
            }
            transport::size_buffers(&fd, self.socket_buffer_bytes);
            let id = port.id;
            let max_frame = self.net(port.net).config.max_frame_len();
            if let Err(e) = epoll::add(
                &self.epoll,
                &fd,
                epoll::EventData::new_u64(token(slot, true)),
                epoll::EventFlags::IN | epoll::EventFlags::RDHUP,
            ) {
                warn!(port = %id, "cannot watch the new connection: {e}");
                continue;
            }
            let c = StreamConn {
                fd,
                rx: vec![0; max_frame + 4 + STREAM_RX_SLACK],
                rx_len: 0,
                discard: 0,
                tx: Vec::with_capacity(64 << 10),
                tx_off: 0,
            };
            let port = self.port_mut(slot).expect("checked above");
            if let Kind::Stream { conn, .. } = &mut port.kind {
                *conn = Some(c);
            }
            port.out_armed = false;
            self.mark_up(slot, None);
        }
    }

    fn set_peer(&mut self, slot: u32, peer: UnixPeer) {
        let Some(port) = self.port_mut(slot) else {
            return;
        };
        let Kind::Path { peer: current, .. } = &mut port.kind else {
            return;
        };
        if current.as_ref() == Some(&peer) {
            return;
        }
        *current = Some(peer);
        let was_up = port.up;
        port.up = false;
        if was_up {
            debug!(port = %port.id, "peer changed to {}", peer.display());
        }
        self.mark_up(slot, Some(peer.display()));
    }

    fn mark_up(&mut self, slot: u32, peer: Option<String>) {
        let Some(port) = self.port_mut(slot) else {
            return;
        };
        if port.up {
            return;
        }
        port.up = true;
        port.shared.up.store(true, Ordering::Relaxed);
        let id = port.id;
        debug!(port = %id, peer = peer.as_deref().unwrap_or("-"), "port up");
        self.emit(SwitchEvent::PortUp { port: id, peer });
    }

    /// The port's peer is gone: stop sending to it, forget its MACs and what waited
    /// for it, and stop polling what can never come back.
    fn port_down(&mut self, slot: u32, reason: String) {
        let epoll = &self.epoll;
        let Some(port) = self.ports[slot as usize].as_mut() else {
            return;
        };
        let queued = port.backlog.len() as u64;
        for b in port.backlog.drain(..) {
            if self.spare.len() < SPARE_BUFFERS {
                self.spare.push(b);
            }
        }
        match &mut port.kind {
            Kind::Connected(fd) | Kind::Tap(fd) => {
                let _ = epoll::delete(epoll, &*fd);
            }
            Kind::Path { sock, peer } => {
                *peer = None;
                if port.out_armed {
                    let _ = epoll::modify(
                        epoll,
                        &*sock,
                        epoll::EventData::new_u64(token(slot, false)),
                        epoll::EventFlags::IN,
                    );
                }
            }
            Kind::Stream { conn, .. } => {
                if let Some(c) = conn.take() {
                    let _ = epoll::delete(epoll, &c.fd);
                }
            }
        }
        port.out_armed = false;
        let was_up = mem::replace(&mut port.up, false);
        port.shared.up.store(false, Ordering::Relaxed);
        let (id, net) = (port.id, port.net);
        self.count_drop(slot, DropReason::PeerGone, queued);
        if let Some(n) = self.nets[net].as_mut() {
            n.table.purge_slot(slot);
        }
        if was_up {
            debug!(port = %id, "port down: {reason}");
            self.emit(SwitchEvent::PortDown { port: id, reason });
        }
    }

    fn add_network(&mut self, name: String, config: NetworkConfig, shared: Arc<NetShared>) -> Result<()> {
        if self.net_by_name.contains_key(&name) {
            return Err(FabricError::NetworkExists(name));
        }
        config.validate()?;
        let net = Net {
            name: name.clone(),
            table: MacTable::new(config.mac_table_max, config.aging),
            config,
            shared,
            ports: Vec::new(),
            locked: HashMap::new(),
            full_reported: false,
            captures: Vec::new(),
        };
        let idx = match self.nets.iter().position(Option::is_none) {
            Some(i) => {
                self.nets[i] = Some(net);
                i
            }
            None => {
                self.nets.push(Some(net));
                self.nets.len() - 1
            }
        };
        self.net_by_name.insert(name, idx);
        Ok(())
    }

    fn remove_network(&mut self, name: &str) -> Result<()> {
        let idx = *self
            .net_by_name
            .get(name)
            .ok_or_else(|| FabricError::NoSuchNetwork(name.into()))?;
        let ports = self.net(idx).ports.len();
        if ports > 0 {
            return Err(FabricError::NetworkBusy(name.into(), ports));
        }
        self.net_by_name.remove(name);
        self.nets[idx] = None;
        Ok(())
    }

    fn add_port(&mut self, network: &str, new: NewPort) -> Result<()> {
        let net = *self
            .net_by_name
            .get(network)
            .ok_or_else(|| FabricError::NoSuchNetwork(network.into()))?;
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.ports.push(None);
                self.pending.push(Vec::with_capacity(BATCH));
                (self.ports.len() - 1) as u32
            }
        };
        let (kind, up, flags) = match new.io {
            PortIo::Connected(fd) => (Kind::Connected(fd), true, epoll::EventFlags::IN),
            PortIo::Path(sock) => (Kind::Path { sock, peer: None }, false, epoll::EventFlags::IN),
            // Edge-triggered: accept runs until EAGAIN, and a failing accept (EMFILE)
            // must not spin.
            PortIo::Listener(listener) => (
                Kind::Stream { listener, conn: None },
                false,
                epoll::EventFlags::IN | epoll::EventFlags::ET,
            ),
            PortIo::Tap(fd) => (Kind::Tap(fd), true, epoll::EventFlags::IN),
        };
        let fd = match &kind {
            Kind::Connected(fd) | Kind::Tap(fd) | Kind::Path { sock: fd, .. } | Kind::Stream { listener: fd, .. } => fd,
        };
        if let Err(e) = epoll::add(&self.epoll, fd, epoll::EventData::new_u64(token(slot, false)), flags) {
            self.free_slots.push(slot);
            return Err(FabricError::io("watch the port's fd", e.into()));
        }
        self.ports[slot as usize] = Some(Port {
            id: new.id,
            net,
            shared: new.shared,
            kind,
            up: false,
            lock: None,
            lock_to_first_mac: false,
            trusted: false,
            backlog: VecDeque::new(),
            out_armed: false,
        });
        self.by_id.insert(new.id, slot);
        self.nets[net].as_mut().expect("looked up above").ports.push(slot);
        if up {
            self.mark_up(slot, None);
        }
        Ok(())
    }

    fn slot_of(&self, id: PortId) -> Result<u32> {
        self.by_id.get(&id).copied().ok_or(FabricError::NoSuchPort(id.0))
    }

    fn remove_port(&mut self, id: PortId) -> Result<()> {
        let slot = self.slot_of(id)?;
        let port = self.ports[slot as usize].take().expect("indexed port exists");
        match &port.kind {
            Kind::Connected(fd) | Kind::Tap(fd) | Kind::Path { sock: fd, .. } => {
                let _ = epoll::delete(&self.epoll, fd);
            }
            Kind::Stream { listener, conn } => {
                let _ = epoll::delete(&self.epoll, listener);
                if let Some(c) = conn {
                    let _ = epoll::delete(&self.epoll, &c.fd);
                }
            }
        }
        port.shared.up.store(false, Ordering::Relaxed);
        if let Some(net) = self.nets[port.net].as_mut() {
            net.ports.retain(|s| *s != slot);
            net.table.purge_slot(slot);
            net.locked.retain(|_, s| *s != slot);
            net.captures.retain(|tap| tap.slot != Some(slot));
            net.shared.mac_entries.store(net.table.len() as u64, Ordering::Relaxed);
        }
        for b in port.backlog {
            if self.spare.len() < SPARE_BUFFERS {
                self.spare.push(b);
            }
        }
        self.pending[slot as usize].clear();
        self.by_id.remove(&id);
        self.free_slots.push(slot);
        Ok(())
    }

    /// Locks a port waiting for its first MAC to the first usable source MAC among
    /// `frames` (unicast, not locked to another port); the lock then judges them all.
    fn lock_to_first_mac(&mut self, src: u32, frames: &[&[u8]]) {
        let Some(port) = self.ports[src as usize].as_ref() else {
            return;
        };
        let (id, net) = (port.id, self.net(port.net));
        let first = frames.iter().find_map(|f| {
            let mac = EthernetView::parse(f, net.config.mtu).ok()?.src();
            let free = net.locked.get(&mac).is_none_or(|owner| *owner == src);
            (mac.is_unicast() && free).then_some(mac)
        });
        if let Some(mac) = first {
            if self.lock_port(id, Some(PortLock { mac, ips: vec![] })).is_ok() {
                self.ports[src as usize]
                    .as_mut()
                    .expect("checked above")
                    .lock_to_first_mac = false;
            }
        }
    }

    fn lock_port(&mut self, id: PortId, lock: Option<PortLock>) -> Result<()> {
        let slot = self.slot_of(id)?;
        let net_idx = self.port(slot).expect("indexed").net;
        let net = self.nets[net_idx].as_mut().expect("port's network exists");
        if let Some(l) = &lock {
            if let Some(owner) = net.locked.get(&l.mac).filter(|s| **s != slot) {
                let owner = self.ports[*owner as usize].as_ref().map(|p| p.id.0).unwrap_or(0);
                return Err(FabricError::InvalidConfig(format!(
                    "MAC {} is already locked to port {owner}",
                    l.mac
                )));
            }
            if l.mac.is_group() {
                return Err(FabricError::InvalidConfig(format!(
                    "cannot lock a port to group address {}",
                    l.mac
                )));
            }
        }
        net.locked.retain(|_, s| *s != slot);
        if let Some(l) = &lock {
            net.locked.insert(l.mac, slot);
            // A MAC learned elsewhere before the lock now belongs to this port only.
            if net.table.lookup(&l.mac, self.clock.now()).is_some_and(|s| s != slot) {
                net.table.learn(l.mac, slot, self.clock.now());
            }
        }
        self.ports[slot as usize].as_mut().expect("indexed").lock = lock;
        Ok(())
    }

    fn add_capture(&mut self, network: &str, mut tap: CaptureTap) -> Result<()> {
        let idx = *self
            .net_by_name
            .get(network)
            .ok_or_else(|| FabricError::NoSuchNetwork(network.into()))?;
        if let Some(port) = tap.port {
            let slot = self.slot_of(port)?;
            if self.port(slot).map(|p| p.net) != Some(idx) {
                return Err(FabricError::InvalidConfig(format!(
                    "port {port} is not on network {network:?}"
                )));
            }
            tap.slot = Some(slot);
        }
        self.nets[idx]
            .as_mut()
            .expect("indexed network exists")
            .captures
            .push(tap);
        Ok(())
    }

    fn mac_table(&self, network: &str) -> Result<Vec<MacEntry>> {
        let idx = *self
            .net_by_name
            .get(network)
            .ok_or_else(|| FabricError::NoSuchNetwork(network.into()))?;
        let now = self.clock.now();
        Ok(self
            .net(idx)
            .table
            .entries(now)
            .map(|(mac, slot, age)| MacEntry {
                mac,
                port: self.port_id(slot),
                age,
            })
            .collect())
    }
}

/// Hands an event to the control plane, or counts it when nobody keeps up.
fn emit(events: &SyncSender<SwitchEvent>, dropped: &AtomicU64, ev: SwitchEvent) {
    if let Err(TrySendError::Full(_)) = events.try_send(ev) {
        dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sends frames on a datagram or TAP port: a batch on sockets, one frame on a TAP.
/// Returns how many went. (Stream ports queue bytes instead: `queue_stream`.)
fn send_frames(kind: &Kind, frames: &[&[u8]]) -> io::Result<usize> {
    match kind {
        Kind::Connected(fd) => send_batch(fd.as_fd(), frames, None),
        Kind::Path { sock, peer: Some(p) } => send_batch(sock.as_fd(), frames, Some(p)),
        Kind::Path { peer: None, .. } => Err(io::Error::from_raw_os_error(libc::ENOTCONN)),
        Kind::Tap(fd) => rustix::io::write(fd, frames[0]).map(|_| 1).map_err(io::Error::from),
        Kind::Stream { .. } => Err(io::Error::other("stream ports queue bytes, not frames")),
    }
}

/// What a failed send means, for the frame at the head and for the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendFailure {
    /// The socket is full: keep the frames and wait for writability.
    Later,
    /// Interrupted: send again now.
    Retry,
    /// This frame cannot go (too big, no kernel buffers, a TAP that is down): count it
    /// and go on with the next.
    Drop(DropReason),
    /// The peer is gone: the port goes down.
    Down,
}

/// The one errno table of the send paths (transmit and the backlog drain), so a
/// condition is never counted under two reasons.
fn send_failure(e: &io::Error, kind: &Kind) -> SendFailure {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::WouldBlock, _) => SendFailure::Later,
        (io::ErrorKind::Interrupted, _) => SendFailure::Retry,
        (_, Some(libc::EMSGSIZE)) => SendFailure::Drop(DropReason::Oversize),
        (_, Some(libc::ENOBUFS)) => SendFailure::Drop(DropReason::QueueFull),
        // A TAP whose interface is administratively down refuses frames with EIO; it
        // is still there and will take frames once it is up.
        (_, Some(libc::EIO)) if matches!(kind, Kind::Tap(_)) => SendFailure::Drop(DropReason::PeerGone),
        _ => SendFailure::Down,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_errno_table_for_both_send_paths() {
        let sock = || {
            let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
            Kind::Connected(a.into())
        };
        let err = |n| io::Error::from_raw_os_error(n);
        let udp = sock();
        assert_eq!(send_failure(&err(libc::EAGAIN), &udp), SendFailure::Later);
        assert_eq!(send_failure(&err(libc::EINTR), &udp), SendFailure::Retry);
        assert_eq!(
            send_failure(&err(libc::EMSGSIZE), &udp),
            SendFailure::Drop(DropReason::Oversize)
        );
        assert_eq!(
            send_failure(&err(libc::ENOBUFS), &udp),
            SendFailure::Drop(DropReason::QueueFull)
        );
        assert_eq!(
            send_failure(&err(libc::EIO), &udp),
            SendFailure::Down,
            "EIO is only a TAP's 'down'"
        );
        assert_eq!(send_failure(&err(libc::ECONNREFUSED), &udp), SendFailure::Down);
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let tap = Kind::Tap(a.into());
        assert_eq!(
            send_failure(&err(libc::EIO), &tap),
            SendFailure::Drop(DropReason::PeerGone)
        );
    }
}

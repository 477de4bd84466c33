//! TCP egress and forwards without a TCP stack of our own: the splice.
//!
//! Theory of operation (the design passt documents): each guest connection is mapped
//! onto one host socket, and the gateway keeps no byte of its own for it.
//! - Guest to host: a segment at the expected sequence number is written to the host
//!   socket at once; what the socket does not take is not acknowledged, and the window
//!   announced to the guest is the room in the host socket's send side, so a guest
//!   within its window is always taken whole. When the host socket refused part of a
//!   segment, its next room is announced with duplicate ACKs, which make the guest
//!   send the rest at once instead of after its retransmission timeout.
//! - Host to guest: data stays in the host socket's receive queue until the guest
//!   acknowledges it. It is read with MSG_PEEK from where the last send ended (the
//!   kernel's SO_PEEK_OFF, or by peeking the sent part again into scratch on kernels
//!   before 6.9) straight into the frames' payloads, as far as the guest's window
//!   goes; an ACK discards the acknowledged bytes (MSG_TRUNC), a retransmission peeks
//!   them again. The host socket's buffers and flow control are the only ones.
//! - The guest's SYN waits for the host connect: a refusal answers RST, a failure ICMP
//!   host unreachable (as [`crate::tcp_nat`]). MSS comes from the MTU and the guest's
//!   option, window scaling is offered when the guest offers it.
//! - FIN either way is a half-close (shutdown of the host's write side, or a FIN to the
//!   guest once the host's data is all acknowledged); a reset either way is a reset.
//!
//! Guest segments are taken on the frame loop; each connection's task waits on its
//! host socket (readable while the guest's window has room, writable while a guest
//! segment waits for room) and its timers (retransmission, zero-window probe,
//! keep-alive), and is woken when the guest's ACK opens the window.

mod conn;
mod segment;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fabric::Mac;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::counters::GatewayCounters;
use crate::ctx::Ctx;
use crate::tcp_nat::{Direction, FlowKey, TcpFlowInfo};
use crate::wire::{self, TcpHead};
use conn::{Conn, Outcome};
use segment::Out;

/// Gateway-side ports for forwarded connections, as the guest sees them.
const FORWARD_PORTS: std::ops::Range<u16> = 30000..60000;

pub(crate) struct SpliceService {
    pub ctx: Arc<Ctx>,
    table: Mutex<Table>,
    port: Arc<crate::port::GatewayPort>,
    /// Wakes the task that writes the outbox when the port had no room.
    writer: Notify,
}

enum Entry {
    /// The guest's SYN is held while the host side connects.
    Connecting,
    Open(Box<Conn>, Arc<Notify>),
}

struct Flow {
    entry: Entry,
    direction: Direction,
}

#[derive(Default)]
struct Table {
    flows: HashMap<FlowKey, Flow>,
    budget: crate::flows::TcpBudget,
    next_forward_port: u16,
    /// Connections that owe the guest an ACK at the end of the frame batch.
    acks: Vec<FlowKey>,
    outbox: VecDeque<(Vec<u8>, fabric::offload::Offload)>,
}

impl SpliceService {
    pub fn new(ctx: Arc<Ctx>, port: Arc<crate::port::GatewayPort>) -> SpliceService {
        SpliceService {
            ctx,
            table: Mutex::default(),
            port,
            writer: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn knows(&self, key: &FlowKey) -> bool {
        self.lock().flows.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.lock().flows.len()
    }

    pub fn list(&self) -> Vec<TcpFlowInfo> {
        self.lock()
            .flows
            .iter()
            .map(|(key, flow)| TcpFlowInfo {
                guest: key.guest,
                peer: key.peer,
                direction: flow.direction,
                state: match &flow.entry {
                    Entry::Connecting => "CONNECTING".into(),
                    Entry::Open(c, _) => c.state_name().into(),
                },
            })
            .collect()
    }

    /// Sends frames in order behind whatever waits in the outbox.
    fn send(&self, table: &mut Table, out: Out) {
        if out.frames.is_empty() {
            return;
        }
        let was_empty = table.outbox.is_empty();
        table.outbox.extend(out.frames);
        if was_empty && !self.flush(table) {
            self.writer.notify_one();
        }
    }

    /// Sends what the outbox holds until the port is full; true when it is empty.
    fn flush(&self, table: &mut Table) -> bool {
        while !table.outbox.is_empty() {
            if self.port.try_send_owned(&mut table.outbox).is_err() {
                return false;
            }
        }
        true
    }

    /// The end of a batch of guest frames: each connection that took data writes it to
    /// its host socket in one call, and owes the guest one ACK.
    pub fn after_batch(&self) {
        let mut table = self.lock();
        let keys = std::mem::take(&mut table.acks);
        let mut out = Out::default();
        for key in keys {
            let Some(Flow {
                entry: Entry::Open(conn, notify),
                ..
            }) = table.flows.get_mut(&key)
            else {
                continue;
            };
            let was_full = conn.wants_host_writable();
            let flushed = conn.flush_pending();
            account(&self.ctx.counters, conn);
            let end = match flushed {
                Err(()) => {
                    out.push(conn.reset_guest());
                    Some(true)
                }
                Ok(()) => {
                    out.extend(conn.take_ack());
                    if conn.wants_host_writable() && !was_full {
                        notify.notify_one();
                    }
                    conn.finished().then_some(false)
                }
            };
            if let Some(reset_host) = end {
                SpliceService::forget(&mut table, &key, reset_host);
            }
        }
        self.send(&mut table, out);
    }

    /// Takes a flow into the table if its direction's budget has room (see
    /// [`crate::flows::TcpBudget`]).
    fn admit(&self, table: &mut Table, key: FlowKey, direction: Direction) -> bool {
        let bounds = crate::flows::TcpBounds::of(&self.ctx.cfg());
        if table.flows.contains_key(&key) || !table.budget.admit(key.guest.ip(), direction, &bounds) {
            return false;
        }
        table.flows.insert(
            key,
            Flow {
                entry: Entry::Connecting,
                direction,
            },
        );
        true
    }

    /// Drops a connection; its host socket closes when its task lets go (with a reset
    /// when `reset_host`).
    fn forget(table: &mut Table, key: &FlowKey, reset_host: bool) {
        let Some(flow) = table.flows.remove(key) else { return };
        if let Entry::Open(mut conn, notify) = flow.entry {
            if reset_host {
                let _ = rustix::net::sockopt::set_socket_linger(conn.host.get_ref(), Some(Duration::ZERO));
            } else {
                conn.prepare_orderly_close();
            }
            // The task sees its connection gone and ends, closing the socket.
            notify.notify_one();
        }
        table.budget.release(key.guest.ip(), flow.direction);
    }
}

/// Takes a guest's TCP segment routed through the gateway; returns frames to send now.
/// `checksum_left`: the guest left the TCP checksum to us (an offload), so it is not
/// checked, as the kernel does not check a segment that never crossed a wire.
pub(crate) fn inbound(svc: &Arc<SpliceService>, frame: &[u8], head: TcpHead, checksum_left: bool) -> Vec<Vec<u8>> {
    let key = FlowKey {
        guest: head.src,
        peer: head.dst,
    };
    let mut table = svc.lock();
    let Some(flow) = table.flows.get_mut(&key) else {
        drop(table);
        if head.is_open() {
            return open(svc, frame, head, key, checksum_left);
        }
        // Anything else for no connection: a reset, as a closed port answers.
        return wire::tcp_reset(svc.ctx.cfg().gateway_mac, &head).into_iter().collect();
    };
    let Entry::Open(conn, notify) = &mut flow.entry else {
        // The guest retransmits its SYN while the host side connects.
        return vec![];
    };
    let Some(seg) = segment::parse(frame, checksum_left) else {
        GatewayCounters::inc(&svc.ctx.counters.malformed_frames);
        return vec![];
    };
    let mut out = Out::default();
    let before = (conn.ack_due, conn.wants_host_writable());
    let outcome = conn.on_segment(&seg, Instant::now(), &mut out);
    account(&svc.ctx.counters, conn);
    let owes_ack = conn.ack_due && !before.0;
    let Outcome { done, reset_host, wake } = outcome;
    if wake || (conn.wants_host_writable() && !before.1) {
        notify.notify_one();
    }
    if owes_ack {
        table.acks.push(key);
    }
    if done {
        SpliceService::forget(&mut table, &key, reset_host);
    }
    svc.send(&mut table, out);
    vec![]
}

/// A guest's new connection: checked, counted, then connected from the host.
fn open(svc: &Arc<SpliceService>, syn: &[u8], head: TcpHead, key: FlowKey, checksum_left: bool) -> Vec<Vec<u8>> {
    let cfg = svc.ctx.cfg();
    let c = &svc.ctx.counters;
    let dst = key.peer.ip();
    let reset = || wire::tcp_reset(cfg.gateway_mac, &head).into_iter().collect();
    let to_gateway = match dst {
        IpAddr::V4(v4) => cfg.is_gateway_ip(v4),
        IpAddr::V6(v6) => cfg.is_gateway_ip6(v6),
    };
    if to_gateway || svc.ctx.egress.refused(dst, key.peer.port(), crate::policy::Proto::Tcp) {
        return reset();
    }
    let Some(seg) = segment::parse(syn, checksum_left) else {
        GatewayCounters::inc(&c.malformed_frames);
        return vec![];
    };
    let greeting = (seg.seq, seg.greeting);
    if !svc.admit(&mut svc.lock(), key, Direction::Egress) {
        GatewayCounters::inc(&c.nat_tcp_bounded);
        return reset();
    }
    let target = cfg.egress_target(key.peer);
    let socket = match crate::tcp_nat::start_connect(target) {
        Ok(s) if !crate::fd_budget::admits(&s) => {
            GatewayCounters::inc(&c.fd_budget_refused);
            SpliceService::forget(&mut svc.lock(), &key, false);
            return reset();
        }
        Ok(s) => s,
        Err(e) => return refuse(svc, key, head, target, e),
    };
    let timeout = cfg.tcp_connect_timeout;
    match crate::tcp_nat::connect_outcome(&socket) {
        Some(Ok(())) => connected(svc, key, head, greeting, socket),
        Some(Err(e)) => refuse(svc, key, head, target, e),
        None => {
            let svc = svc.clone();
            tokio::spawn(async move {
                let answer = match finish_connect(socket, timeout).await {
                    Ok(fd) => connected(&svc, key, head, greeting, fd),
                    Err(e) => refuse(&svc, key, head, target, e),
                };
                for frame in answer {
                    let _ = svc.port.send(&frame).await;
                }
            });
            vec![]
        }
    }
}

async fn finish_connect(fd: OwnedFd, timeout: Duration) -> std::io::Result<OwnedFd> {
    let fd = crate::sys::async_fd(fd)?;
    match tokio::time::timeout(timeout, fd.writable()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    }
    let fd = fd.into_inner();
    match rustix::net::sockopt::socket_error(&fd)? {
        Ok(()) => Ok(fd),
        Err(e) => Err(e.into()),
    }
}

/// The host side refused or failed: the guest's connect fails the same way.
fn refuse(svc: &SpliceService, key: FlowKey, head: TcpHead, target: SocketAddr, e: std::io::Error) -> Vec<Vec<u8>> {
    SpliceService::forget(&mut svc.lock(), &key, false);
    crate::tcp_nat::refusal(&svc.ctx, head, target, e)
}

/// An initial sequence number nobody can guess (RFC 6528's goal, by randomness).
fn initial_sequence() -> u32 {
    rand::random()
}

/// The host side is up: the guest gets its SYN-ACK and the connection its task.
fn connected(
    svc: &Arc<SpliceService>,
    key: FlowKey,
    head: TcpHead,
    (seq, greeting): (u32, conn::Greeting),
    fd: OwnedFd,
) -> Vec<Vec<u8>> {
    let cfg = svc.ctx.cfg();
    let host = match crate::sys::async_fd(fd) {
        Ok(h) => Arc::new(h),
        Err(e) => return refuse(svc, key, head, key.peer, e),
    };
    let _ = rustix::net::sockopt::set_tcp_nodelay(host.get_ref(), true);
    let _ = rustix::net::sockopt::set_socket_keepalive(host.get_ref(), true);
    let mut conn = Conn::new(
        key,
        Direction::Egress,
        head.src_mac,
        cfg.gateway_mac,
        host.clone(),
        usize::from(cfg.mtu),
        initial_sequence(),
        Instant::now(),
    );
    conn.greet(seq, &greeting);
    let syn_ack = conn.handshake();
    let notify = Arc::new(Notify::new());
    {
        let mut table = svc.lock();
        let Some(flow) = table.flows.get_mut(&key) else {
            return vec![];
        };
        flow.entry = Entry::Open(Box::new(conn), notify.clone());
    }
    GatewayCounters::inc(&svc.ctx.counters.nat_tcp_flows);
    tokio::spawn(drive(svc.clone(), key, host, notify));
    vec![syn_ack]
}

/// Connects a forward's host client to `guest`: our SYN goes to the guest, and the
/// client's socket is the connection's host socket.
pub(crate) async fn forward_client(svc: Arc<SpliceService>, guest: SocketAddr, guest_mac: Mac, fd: OwnedFd) {
    let cfg = svc.ctx.cfg_arc();
    // The forward was checked against the network when added.
    let Some(gateway) = crate::forward::gateway_address(&cfg, guest.ip()) else {
        return;
    };
    let key = {
        let mut table = svc.lock();
        let span = FORWARD_PORTS.end - FORWARD_PORTS.start;
        let key = (0..span).find_map(|_| {
            let port = FORWARD_PORTS.start + table.next_forward_port % span;
            table.next_forward_port = table.next_forward_port.wrapping_add(1);
            let key = FlowKey {
                guest,
                peer: SocketAddr::new(gateway, port),
            };
            (!table.flows.contains_key(&key)).then_some(key)
        });
        key.filter(|key| svc.admit(&mut table, *key, Direction::Forward))
    };
    let Some(key) = key else {
        GatewayCounters::inc(&svc.ctx.counters.nat_tcp_bounded);
        let _ = rustix::net::sockopt::set_socket_linger(&fd, Some(Duration::ZERO));
        return;
    };
    let host = match crate::sys::async_fd(fd) {
        Ok(h) => Arc::new(h),
        Err(_) => {
            SpliceService::forget(&mut svc.lock(), &key, false);
            return;
        }
    };
    let _ = rustix::net::sockopt::set_tcp_nodelay(host.get_ref(), true);
    let mut conn = Conn::new(
        key,
        Direction::Forward,
        guest_mac,
        cfg.gateway_mac,
        host.clone(),
        usize::from(cfg.mtu),
        initial_sequence(),
        Instant::now(),
    );
    conn.give_up_unanswered_after(cfg.tcp_connect_timeout, Instant::now());
    let syn = conn.handshake();
    let notify = Arc::new(Notify::new());
    {
        let mut table = svc.lock();
        if let Some(flow) = table.flows.get_mut(&key) {
            flow.entry = Entry::Open(Box::new(conn), notify.clone());
        }
        svc.send(&mut table, Out::from(syn));
    }
    GatewayCounters::inc(&svc.ctx.counters.nat_tcp_flows);
    drive(svc, key, host, notify).await;
}

/// A connection's task: moves host data to the guest as its window allows, announces
/// host room, runs the timers, until the connection is forgotten.
async fn drive(svc: Arc<SpliceService>, key: FlowKey, host: Arc<AsyncFd<OwnedFd>>, notify: Arc<Notify>) {
    let c = svc.ctx.counters.clone();
    loop {
        let (want_read, want_write, deadline) = {
            let mut table = svc.lock();
            let Some(Flow {
                entry: Entry::Open(conn, _),
                ..
            }) = table.flows.get_mut(&key)
            else {
                return;
            };
            let mut out = Out::default();
            let now = Instant::now();
            // Timers first: a retransmission rewinds, and the pump resends at once.
            let mut failed = conn.on_timer(now, &mut out).is_err();
            if !failed {
                failed = conn.pump(now, &mut out).is_err();
            }
            account(&c, conn);
            if failed {
                if !out.ends_in_reset() {
                    out.push(conn.reset_guest());
                }
                SpliceService::forget(&mut table, &key, true);
                svc.send(&mut table, out);
                return;
            }
            let wants = (conn.wants_host_readable(), conn.wants_host_writable(), conn.deadline());
            svc.send(&mut table, out);
            wants
        };
        let sleep = tokio::time::sleep_until(deadline.into());
        tokio::select! {
            r = host.readable(), if want_read => {
                if let Ok(mut guard) = r {
                    guard.clear_ready();
                }
            }
            w = host.writable(), if want_write => {
                if let Ok(mut guard) = w {
                    guard.clear_ready();
                }
                let mut table = svc.lock();
                let mut out = Out::default();
                if let Some(Flow { entry: Entry::Open(conn, _), .. }) = table.flows.get_mut(&key) {
                    conn.host_writable(&mut out);
                }
                svc.send(&mut table, out);
            }
            _ = notify.notified() => {}
            _ = sleep => {}
        }
    }
}

/// Adds what a connection did since last asked to the gateway's counters.
fn account(counters: &GatewayCounters, conn: &mut Conn) {
    use std::sync::atomic::Ordering::Relaxed;
    let counts = conn.take_counts();
    for (counter, value) in [
        (&counters.nat_tcp_tx_bytes, counts.to_host),
        (&counters.nat_tcp_rx_bytes, counts.to_guest),
        (&counters.nat_tcp_host_refusals, counts.host_refusals),
    ] {
        if value > 0 {
            counter.fetch_add(value, Relaxed);
        }
    }
}

/// Writes the outbox whenever the port had no room.
pub(crate) async fn write_outbox(svc: Arc<SpliceService>) {
    loop {
        svc.writer.notified().await;
        while !svc.flush(&mut svc.lock()) {
            if svc.port.writable().await.is_err() {
                return;
            }
        }
    }
}

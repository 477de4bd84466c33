//! TCP egress and TCP port forwards: guest connections terminated in a smoltcp stack
//! and carried on host sockets.
//!
//! Theory of operation: one smoltcp interface per gateway owns the gateway's address
//! and, in any-IP mode, every address a guest connects to. A guest's SYN to an outside
//! address is held while the gateway connects a host socket to the destination (the
//! host's loopback for the host-access address); only when that connect succeeds does a
//! smoltcp socket listen on the destination and take the held SYN, so the guest's
//! connect succeeds exactly when the real one did. A refused connect answers the guest
//! with RST, a failed or timed-out one with ICMP host unreachable. Forwards work the
//! other way round: a host client's connection makes the stack connect to the guest
//! from the gateway's address.
//!
//! Each open connection has a task that moves bytes between its smoltcp socket and its
//! host socket, only as far as the other side takes them: it writes to the host what
//! the guest sent only while the host socket accepts it, and reads the host socket only
//! while the guest's side has buffer room, so the advertised windows carry flow control
//! end to end and nothing queues without bound (each direction holds at most
//! `tcp_buffer` bytes). A FIN in either direction is passed on as a half-close
//! (shutdown of the host socket's write side, or close of the smoltcp socket), a reset
//! as a reset (SO_LINGER 0 toward the host, abort toward the guest). After every run of
//! the stack, tasks whose socket changed are woken.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::counters::GatewayCounters;
use crate::ctx::Ctx;
use crate::stack::{Queue, UNSCALED_WINDOW};
use crate::wire::{self, TcpHead};

/// A connection as the guest sees it: its own end and its peer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub guest: SocketAddr,
    pub peer: SocketAddr,
}

/// Who opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The guest, to an outside address (or the host-access address).
    Egress,
    /// A host client, through a port forward.
    Forward,
}

/// A connection as [`crate::Gateway::tcp_flows`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpFlowInfo {
    pub guest: SocketAddr,
    pub peer: SocketAddr,
    pub direction: Direction,
    /// The TCP state toward the guest ("CONNECTING" while the host side connects).
    pub state: String,
}

enum Slot {
    Connecting,
    Open(SocketHandle),
}

struct Flow {
    slot: Slot,
    direction: Direction,
}

/// What a connection's task last saw of its socket; a change wakes it.
struct Watch {
    notify: Arc<Notify>,
    seen: (tcp::State, usize, usize),
}

/// A guest connection dies after this long without an answer to keep-alives, so a
/// vanished guest does not hold flows forever.
const DEAD_PEER: Duration = Duration::from_secs(300);
const KEEP_ALIVE: Duration = Duration::from_secs(75);
/// Egress passes per run of the stack: up to this many segments per connection.
const EGRESS_PASSES: usize = 64;
/// Gateway-side ports for forwarded connections, as the guest sees them.
const FORWARD_PORTS: std::ops::Range<u16> = 30000..60000;

/// Guest TCP translated to host sockets: the translator beside the context.
pub(crate) struct TcpService {
    pub ctx: Arc<Ctx>,
    pub nat: Mutex<TcpNat>,
}

pub(crate) struct TcpNat {
    iface: Interface,
    device: Queue,
    sockets: SocketSet<'static>,
    flows: HashMap<FlowKey, Flow>,
    watches: HashMap<SocketHandle, Watch>,
    budget: crate::flows::TcpBudget,
    epoch: std::time::Instant,
    buffer: usize,
    next_forward_port: u16,
    /// The gateway's port, and the frames waiting for room in it, in order.
    port: Arc<crate::port::GatewayPort>,
    outbox: std::collections::VecDeque<Vec<u8>>,
    /// Wakes the task that writes the outbox when the port has room again.
    writer: Arc<Notify>,
    panics: Arc<crate::contain::PanicCounters>,
}

impl TcpNat {
    pub fn new(
        cfg: &crate::GatewayConfig,
        port: Arc<crate::port::GatewayPort>,
        counters: Arc<GatewayCounters>,
        panics: Arc<crate::contain::PanicCounters>,
    ) -> TcpNat {
        let (mac, gateway_ip, prefix) = (cfg.gateway_mac, cfg.gateway_ip, cfg.subnet.prefix_len());
        let mtu = usize::from(cfg.mtu);
        let buffer = cfg.tcp_buffer.max(16 * mtu);
        let mut device = Queue::new(mtu, counters);
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac.0)));
        let mut iface = Interface::new(config, &mut device, Instant::from_millis(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(gateway_ip.into(), prefix));
        });
        // Any-IP: the stack takes segments for every address routed through the gateway.
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(gateway_ip);
        TcpNat {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            flows: HashMap::new(),
            watches: HashMap::new(),
            budget: Default::default(),
            epoch: std::time::Instant::now(),
            buffer,
            next_forward_port: 0,
            port,
            outbox: Default::default(),
            writer: Arc::new(Notify::new()),
            panics,
        }
    }

    fn now(&self) -> Instant {
        Instant::from_millis(self.epoch.elapsed().as_millis() as i64)
    }

    pub fn knows(&self, key: &FlowKey) -> bool {
        self.flows.contains_key(key)
    }

    /// Queues a frame for the stack; the next [`TcpNat::poll`] takes it.
    pub fn input(&mut self, frame: &[u8]) {
        self.device.rx.push_back(frame.to_vec());
    }

    /// Runs the stack if frames wait for it (the frame loop feeds a batch, then runs
    /// the stack once: one pass answers a burst of ACKs).
    pub fn poll_pending(&mut self) {
        if !self.device.rx.is_empty() {
            self.poll();
        }
    }

    pub fn poll_delay(&mut self) -> Option<Duration> {
        let now = self.now();
        self.iface.poll_delay(now, &self.sockets).map(Duration::from)
    }

    /// Runs the stack, queues what it sent and wakes the tasks whose socket changed.
    pub fn poll(&mut self) {
        let now = self.now();
        let (iface, device, sockets) = (&mut self.iface, &mut self.device, &mut self.sockets);
        // Contained (see `contain`): what the stack sent before a panic still goes out.
        crate::contain::contained(&self.panics, crate::contain::Service::TcpNat, &[], || {
            iface.poll(now, device, sockets);
            // smoltcp sends at most one segment per socket in a pass; pass again while
            // sockets still have segments ready, so a full window leaves in one run.
            for _ in 0..EGRESS_PASSES {
                if iface.poll_egress(now, device, sockets) == PollResult::None {
                    break;
                }
            }
        });
        for (handle, watch) in self.watches.iter_mut() {
            let s = self.sockets.get::<tcp::Socket>(*handle);
            let seen = (s.state(), s.recv_queue(), s.send_queue());
            let (state, received, unacked) = watch.seen;
            // Woken for new state, new data from the guest, or room toward the guest.
            if seen.0 != state || seen.1 > received || seen.2 < unacked {
                watch.notify.notify_one();
            }
            watch.seen = seen;
        }
        let sockets = &self.sockets;
        let watches = &self.watches;
        self.device.retain_conns(watches.len(), || {
            watches
                .keys()
                .filter_map(|h| crate::stack::socket_conn(sockets.get::<tcp::Socket>(*h)))
                .collect()
        });
        // Sent while the stack is locked, so segments leave in the order it made them
        // (tasks sending on their own after unlocking would reorder them, and smoltcp
        // answers duplicate ACKs by resending the whole window). Without blocking: what
        // the port cannot take now waits in the outbox for the writer task.
        let was_empty = self.outbox.is_empty();
        self.outbox.extend(self.device.take_sent());
        // When the outbox already held frames, the writer task is on it.
        if was_empty && !self.flush() {
            self.writer.notify_one();
        }
    }

    /// Sends what the outbox holds, in batches, until the port is full; true when it
    /// is empty.
    fn flush(&mut self) -> bool {
        while !self.outbox.is_empty() {
            let frames: Vec<&[u8]> = self.outbox.make_contiguous().iter().take(32).map(|f| &f[..]).collect();
            let sent = self.port.try_send_frames(&frames);
            match sent {
                Ok(n) if n > 0 => drop(self.outbox.drain(..n)),
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                    // Not a full port: this frame cannot go (the port is going away).
                    self.outbox.pop_front();
                }
                _ => return false,
            }
        }
        true
    }

    /// Takes a flow into the table if its direction's budget has room (see
    /// [`crate::flows::TcpBudget`]).
    fn admit(&mut self, key: FlowKey, direction: Direction, bounds: &crate::flows::TcpBounds) -> bool {
        if self.flows.contains_key(&key) || !self.budget.admit(key.guest.ip(), direction, bounds) {
            return false;
        }
        self.flows.insert(
            key,
            Flow {
                slot: Slot::Connecting,
                direction,
            },
        );
        true
    }

    fn new_socket(&mut self, timeout: Duration) -> tcp::Socket<'static> {
        // The receive side stays within 64 KiB so the window is never scaled and the
        // window guard's edges are exact (see `stack`; smoltcp issue 1048, first seen
        // here under a 200 MiB transfer with a 256 KiB buffer).
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.buffer.min(UNSCALED_WINDOW)]),
            tcp::SocketBuffer::new(vec![0; self.buffer]),
        );
        // Bytes are relayed as they come; coalescing is the endpoints' business.
        s.set_nagle_enabled(false);
        s.set_timeout(Some(timeout.into()));
        s
    }

    fn watch(&mut self, key: FlowKey, handle: SocketHandle) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let s = self.sockets.get::<tcp::Socket>(handle);
        let seen = (s.state(), s.recv_queue(), s.send_queue());
        self.watches.insert(
            handle,
            Watch {
                notify: notify.clone(),
                seen,
            },
        );
        if let Some(f) = self.flows.get_mut(&key) {
            f.slot = Slot::Open(handle);
        }
        notify
    }

    /// The host side of a guest's connect is up: a socket takes the held SYN.
    fn accept(&mut self, key: FlowKey, syn: &[u8], timeout: Duration) -> Option<(SocketHandle, Arc<Notify>)> {
        // Frames queued before this SYN must not meet the listening socket.
        self.iface.poll(self.now(), &mut self.device, &mut self.sockets);
        let mut s = self.new_socket(timeout);
        s.listen(IpListenEndpoint {
            addr: Some(key.peer.ip().into()),
            port: key.peer.port(),
        })
        .ok()?;
        let handle = self.sockets.add(s);
        let notify = self.watch(key, handle);
        self.input(syn);
        Some((handle, notify))
    }

    /// A forward's client is connected: the stack connects to the guest.
    fn connect(&mut self, guest: SocketAddrV4, gateway_ip: Ipv4Addr, cfg: &crate::GatewayConfig) -> Option<Opened> {
        let span = FORWARD_PORTS.end - FORWARD_PORTS.start;
        let key = (0..span).find_map(|_| {
            let port = FORWARD_PORTS.start + self.next_forward_port % span;
            self.next_forward_port = self.next_forward_port.wrapping_add(1);
            let key = FlowKey {
                guest: guest.into(),
                peer: SocketAddrV4::new(gateway_ip, port).into(),
            };
            (!self.flows.contains_key(&key)).then_some(key)
        })?;
        if !self.admit(key, Direction::Forward, &crate::flows::TcpBounds::of(cfg)) {
            return None;
        }
        let mut s = self.new_socket(cfg.tcp_connect_timeout);
        let remote = IpEndpoint::new((*guest.ip()).into(), guest.port());
        let local = IpListenEndpoint {
            addr: Some(gateway_ip.into()),
            port: key.peer.port(),
        };
        if s.connect(self.iface.context(), remote, local).is_err() {
            self.forget(&key);
            return None;
        }
        let handle = self.sockets.add(s);
        let notify = self.watch(key, handle);
        Some(Opened { key, handle, notify })
    }

    /// Drops a connection and everything kept for it.
    fn forget(&mut self, key: &FlowKey) {
        let Some(flow) = self.flows.remove(key) else { return };
        if let Slot::Open(handle) = flow.slot {
            self.watches.remove(&handle);
            self.sockets.remove(handle);
        }
        self.budget.release(key.guest.ip(), flow.direction);
    }

    /// Connections carried now (egress and forwards).
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn list(&self) -> Vec<TcpFlowInfo> {
        self.flows
            .iter()
            .map(|(key, flow)| TcpFlowInfo {
                guest: key.guest,
                peer: key.peer,
                direction: flow.direction,
                state: match flow.slot {
                    Slot::Connecting => "CONNECTING".into(),
                    Slot::Open(h) => format!("{}", self.sockets.get::<tcp::Socket>(h).state()).to_uppercase(),
                },
            })
            .collect()
    }
}

struct Opened {
    key: FlowKey,
    handle: SocketHandle,
    notify: Arc<Notify>,
}

mod service;

pub(crate) use service::{connect_outcome, forward_client, inbound, list, refusal, start_connect, write_outbox};

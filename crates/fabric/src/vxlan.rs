//! VXLAN tunnels (RFC 7348) that join a switch network to the same network on other
//! hosts, wire-compatible with Linux's `vxlan` devices.
//!
//! A [`Vtep`] owns one UDP socket on the underlay (port 4789 by default) and serves
//! every tunnelled network through it: each network gets an in-process port on the
//! switch, so the switch learns the remote MACs behind that port and floods to it like
//! to any other. Frames the switch sends to the port go to the host the destination
//! MAC lives on, or to every member host for broadcast and unknown unicast (head-end
//! replication); where MACs live is told, not learnt from traffic (flood-and-learn
//! would let any member claim any MAC). A datagram is taken only from a member host's
//! address, for a network this VTEP serves, with an inner source MAC that lives on the
//! host that sent it; the rest is counted and dropped.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use rustix::event::{epoll, eventfd, EventfdFlags};

use crate::error::{FabricError, Result};
use crate::frame::EthernetView;
use crate::offload::{Offload, SoftFrames, TcpCuts};
use crate::{InProcessEnd, Mac, PortId, PortLock, Switch};

/// The IANA port for VXLAN (Linux's `dstport` default is 8472 unless told 4789).
pub const DEFAULT_PORT: u16 = 4789;
/// The VXLAN header: flags, reserved, the 24-bit VNI, reserved.
pub const HEADER_LEN: usize = 8;
/// What VXLAN over IPv4 adds to a frame on the underlay: outer Ethernet, IPv4, UDP and
/// VXLAN headers. A 1500-byte underlay carries inner frames of 1450 bytes (MTU 1450).
pub const OVERHEAD_IPV4: usize = 14 + 20 + 8 + HEADER_LEN;
/// The largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// The "I" flag: the VNI field is valid (RFC 7348 5).
const FLAG_VNI: u8 = 0x08;
const ETHERNET_HEADER: usize = 14;

/// Why a datagram is not a VXLAN frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VxlanError {
    #[error("shorter than a VXLAN header and an Ethernet header")]
    Short,
    #[error("the VNI flag is not set")]
    NoVni,
}

/// The VXLAN header for `vni`. Eight bytes by hand: no packet crate in use here
/// (smoltcp, etherparse) models VXLAN.
pub fn header(vni: u32) -> [u8; HEADER_LEN] {
    let v = vni.to_be_bytes();
    [FLAG_VNI, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// The VNI and the inner Ethernet frame of a VXLAN datagram. Reserved bits are
/// ignored on receipt, as the RFC asks.
pub fn decapsulate(datagram: &[u8]) -> std::result::Result<(u32, &[u8]), VxlanError> {
    if datagram.len() < HEADER_LEN + ETHERNET_HEADER {
        return Err(VxlanError::Short);
    }
    if datagram[0] & FLAG_VNI == 0 {
        return Err(VxlanError::NoVni);
    }
    let vni = u32::from_be_bytes([0, datagram[4], datagram[5], datagram[6]]);
    Ok((vni, &datagram[HEADER_LEN..]))
}

/// The other hosts of a tunnelled network, as the cluster's state says: every member
/// gets broadcast and unknown unicast; a MAC in `macs` lives on that member only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Remotes {
    pub members: Vec<IpAddr>,
    pub macs: HashMap<Mac, IpAddr>,
    /// MACs every host answers as itself (the distributed gateway's): frames from or
    /// to them stay on this host, so each host's gateway serves its own guests only.
    pub local_everywhere: Vec<Mac>,
    /// What a remote MAC may send from (the addresses it holds), as a local port's
    /// lock holds a local guest: frames from other addresses are dropped (`spoofed`).
    /// A MAC without an entry is judged by its member only.
    pub locks: HashMap<Mac, PortLock>,
}

/// What a VTEP did and refused, since it started.
#[derive(Debug, Default)]
pub struct VtepCounters {
    /// Frames taken from the underlay into a network.
    pub rx_frames: AtomicU64,
    /// Datagrams sent to member hosts (a flooded frame counts once per member).
    pub tx_datagrams: AtomicU64,
    /// Datagrams from an address that is no member of the network they name.
    pub from_stranger: AtomicU64,
    /// Datagrams for a VNI this VTEP does not serve.
    pub unknown_vni: AtomicU64,
    /// Frames whose inner source MAC does not live on the host that sent them.
    pub foreign_mac: AtomicU64,
    /// Frames from an address their remote MAC does not hold.
    pub spoofed: AtomicU64,
    /// Datagrams that are not VXLAN.
    pub malformed: AtomicU64,
    /// Times the switch had no room for frames: they waited, and the socket with them.
    pub switch_full: AtomicU64,
    /// Sends the underlay refused.
    pub send_errors: AtomicU64,
    /// Frames from or to the distributed gateway, kept on this host.
    pub kept_local: AtomicU64,
}

impl VtepCounters {
    /// Name and value of each counter, for metrics.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("rx_frames", get(&self.rx_frames)),
            ("tx_datagrams", get(&self.tx_datagrams)),
            ("from_stranger", get(&self.from_stranger)),
            ("unknown_vni", get(&self.unknown_vni)),
            ("foreign_mac", get(&self.foreign_mac)),
            ("spoofed", get(&self.spoofed)),
            ("malformed", get(&self.malformed)),
            ("switch_full", get(&self.switch_full)),
            ("send_errors", get(&self.send_errors)),
            ("kept_local", get(&self.kept_local)),
        ]
    }
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// One tunnelled network.
struct Tunnel {
    vni: u32,
    port: PortId,
    end: InProcessEnd,
    /// Readable when the switch queued frames for the tunnel.
    wake: OwnedFd,
    remotes: ArcSwap<Remotes>,
}

struct Shared {
    socket: UdpSocket,
    /// The members' VXLAN port (the same across a cluster).
    remote_port: u16,
    /// By VNI; replaced whole when a network joins or leaves (rare), read per frame.
    tunnels: ArcSwap<HashMap<u32, Arc<Tunnel>>>,
    counters: VtepCounters,
    /// Whether runs of a segment's datagrams go as one segmented send (UDP_SEGMENT);
    /// cleared for good when the kernel refuses one.
    segmented_sends: AtomicBool,
    /// Written when `tunnels` changed.
    control: OwnedFd,
}

/// A VXLAN tunnel endpoint serving any number of a switch's networks over one
/// underlay socket. The switch's thread does its work (see [`crate::switch::Poller`]).
pub struct Vtep {
    shared: Arc<Shared>,
    switch: Arc<Switch>,
    /// The switch's name for the work it does for this VTEP.
    poller: u64,
}

const SOCKET_TOKEN: u64 = u64::MAX;
const CONTROL_TOKEN: u64 = u64::MAX - 1;

impl Vtep {
    /// Binds `local` (an underlay address and port) and starts serving; members are
    /// sent to on `remote_port`.
    pub fn start(switch: Arc<Switch>, local: SocketAddr, remote_port: u16) -> Result<Vtep> {
        let socket = UdpSocket::bind(local).map_err(|e| FabricError::io(format!("bind VXLAN socket {local}"), e))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| FabricError::io("make the VXLAN socket non-blocking", e))?;
        crate::transport::size_buffers(&socket, 4 << 20);
        // Runs from one member come up as one buffer (a kernel without it: one by one).
        if let Err(e) = crate::sys::udp_gso::enable_gro(socket.as_fd()) {
            tracing::debug!("the VXLAN socket receives datagrams one by one: UDP_GRO: {e}");
        }
        let control = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| FabricError::io("create the VTEP's eventfd", e.into()))?;
        let shared = Arc::new(Shared {
            socket,
            remote_port,
            tunnels: ArcSwap::from_pointee(HashMap::new()),
            counters: VtepCounters::default(),
            segmented_sends: AtomicBool::new(true),
            control,
        });
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| FabricError::io("create the VTEP's epoll", e.into()))?;
        for (fd, token) in [
            (shared.socket.as_fd(), SOCKET_TOKEN),
            (shared.control.as_fd(), CONTROL_TOKEN),
        ] {
            epoll::add(&epoll, fd, epoll::EventData::new_u64(token), epoll::EventFlags::IN)
                .map_err(|e| FabricError::io("watch the VTEP's fds", e.into()))?;
        }
        let serving = Serving {
            shared: shared.clone(),
            epoll,
            watched: HashMap::new(),
            arena: vec![0u8; ARENA],
            out: Outgoing::default(),
            held: Held::default(),
        };
        let poller = switch.add_poller(Box::new(serving))?;
        Ok(Vtep { shared, switch, poller })
    }

    /// The address the underlay socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.socket.local_addr()
    }

    /// Tunnels `network` as `vni` to `remotes`: a port `label` on it carries the
    /// network's frames to and from them.
    pub fn attach(&self, network: &str, label: &str, vni: u32, remotes: Remotes) -> Result<PortId> {
        if vni > MAX_VNI {
            return Err(FabricError::InvalidConfig(format!("VNI {vni} is more than 24 bits")));
        }
        if self.shared.tunnels.load().contains_key(&vni) {
            return Err(FabricError::InvalidConfig(format!("VNI {vni} is tunnelled already")));
        }
        let (port, end) = self.switch.add_inprocess_port(network, label)?;
        end.take_offloads();
        let wake = match end.wake_receiver() {
            Ok(fd) => fd,
            Err(e) => {
                let _ = self.switch.remove_port(port);
                return Err(FabricError::io("the tunnel port's wake-up fd", e));
            }
        };
        let tunnel = Arc::new(Tunnel {
            vni,
            port,
            end,
            wake,
            remotes: ArcSwap::from_pointee(remotes),
        });
        self.shared.tunnels.rcu(|t| {
            let mut t = HashMap::clone(t);
            t.insert(vni, tunnel.clone());
            t
        });
        // Weak: the sink lives in the port's ring, which the tunnel holds.
        let shared = Arc::downgrade(&self.shared);
        tunnel.end.send_directly(Box::new(move |frames, offloads| {
            if let Some(shared) = shared.upgrade() {
                send_batch(&shared, vni, frames, offloads);
            }
        }));
        self.poke();
        Ok(port)
    }

    /// Says where the members of `vni`'s network are now.
    pub fn set_remotes(&self, vni: u32, remotes: Remotes) -> Result<()> {
        let tunnels = self.shared.tunnels.load();
        let t = tunnels
            .get(&vni)
            .ok_or_else(|| FabricError::InvalidConfig(format!("VNI {vni} is not tunnelled")))?;
        t.remotes.store(Arc::new(remotes));
        Ok(())
    }

    /// Ends `vni`'s tunnel and removes its port.
    pub fn detach(&self, vni: u32) -> Result<()> {
        let mut gone = None;
        self.shared.tunnels.rcu(|t| {
            let mut t = HashMap::clone(t);
            gone = t.remove(&vni);
            t
        });
        self.poke();
        match gone {
            Some(t) => self.switch.remove_port(t.port),
            None => Err(FabricError::InvalidConfig(format!("VNI {vni} is not tunnelled"))),
        }
    }

    pub fn counters(&self) -> &VtepCounters {
        &self.shared.counters
    }

    fn poke(&self) {
        let _ = rustix::io::write(&self.shared.control, &1u64.to_ne_bytes());
    }
}

impl Drop for Vtep {
    fn drop(&mut self) {
        let _ = self.switch.remove_poller(self.poller);
        for t in self.shared.tunnels.load().values() {
            let _ = self.switch.remove_port(t.port);
        }
    }
}

/// Reads everything waiting on a non-blocking fd (an eventfd or a wake-up pipe).
fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 64];
    while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {}
}

/// What the VTEP's work needs from turn to turn, owned by the switch thread that does it.
struct Serving {
    shared: Arc<Shared>,
    /// The underlay socket, the control eventfd and each tunnel's wake-up.
    epoll: OwnedFd,
    watched: HashMap<u32, Arc<Tunnel>>,
    arena: Vec<u8>,
    out: Outgoing,
    held: Held,
}

impl crate::switch::Poller for Serving {
    fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }

    fn holds(&self) -> bool {
        TAIL.with_borrow(|tail| !tail.bytes.is_empty())
    }

    /// What waits for a fuller send waits one round of the switch's events at most.
    fn settle(&mut self, idle: bool) {
        TAIL.with_borrow_mut(|tail| {
            if idle || tail.waited {
                tail.flush();
            } else {
                tail.waited = true;
            }
        });
    }

    /// Datagrams in, frames out, tunnels watched as they come and go.
    fn poll(&mut self) {
        let Serving {
            shared,
            epoll,
            watched,
            arena,
            out,
            held,
        } = self;
        let mut events = [std::mem::MaybeUninit::<epoll::Event>::uninit(); 64];
        let now = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        let ready = match epoll::wait(&*epoll, &mut events, Some(&now)) {
            Ok((ready, _)) => ready,
            Err(e) => {
                if e != rustix::io::Errno::INTR {
                    tracing::warn!("the VTEP could not see what is ready: epoll_wait failed: {e}");
                }
                return;
            }
        };
        for ev in ready.iter() {
            match ev.data.u64() {
                SOCKET_TOKEN => {
                    receive(shared, arena, held);
                    if !held.is_empty() {
                        // The switch is behind: what comes next waits in the socket's
                        // buffer until it took what is held.
                        pause_reading(shared, epoll, true);
                    }
                }
                CONTROL_TOKEN => {
                    drain(&shared.control);
                    rewatch(shared, epoll, watched);
                    if !held.is_empty() {
                        held.forget_gone(watched);
                        if held.is_empty() {
                            pause_reading(shared, epoll, false);
                        }
                    }
                }
                vni => {
                    if let Some(t) = watched.get(&(vni as u32)) {
                        // Drained before the queues are looked at, so a wake-up that
                        // comes meanwhile is not lost.
                        drain(&t.wake);
                        if held.deliver(t) && held.is_empty() {
                            pause_reading(shared, epoll, false);
                        }
                        transmit(shared, t, out);
                    }
                }
            }
        }
    }
}

/// Stops (or resumes) taking datagrams off the underlay socket.
fn pause_reading(shared: &Shared, epoll: &OwnedFd, pause: bool) {
    let flags = if pause {
        epoll::EventFlags::empty()
    } else {
        epoll::EventFlags::IN
    };
    let data = epoll::EventData::new_u64(SOCKET_TOKEN);
    if let Err(e) = epoll::modify(epoll, shared.socket.as_fd(), data, flags) {
        tracing::warn!(
            "the VTEP could not {} reading its socket: {e}",
            if pause { "pause" } else { "resume" }
        );
    }
}

/// Frames taken off the underlay that the switch had no room for yet, by network:
/// they wait for the switch to take them (it wakes the tunnel when it made room), and
/// the socket is not read meanwhile, so a burst waits in the socket's buffer instead
/// of being lost at the switch (TCP takes every loss as congestion).
#[derive(Default)]
struct Held {
    frames: HashMap<u32, std::collections::VecDeque<(Vec<u8>, Offload)>>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Hands `t` what is held for it; whether anything was held.
    fn deliver(&mut self, t: &Tunnel) -> bool {
        let Some(queue) = self.frames.get_mut(&t.vni) else {
            return false;
        };
        let _ = t.end.relay_owned(queue);
        if queue.is_empty() {
            self.frames.remove(&t.vni);
        }
        true
    }

    /// Keeps what the switch did not take of `frames` for `vni`.
    fn keep(&mut self, vni: u32, frames: &mut std::collections::VecDeque<(Vec<u8>, Offload)>) {
        self.frames.entry(vni).or_default().extend(frames.drain(..));
    }

    /// Drops what is held for networks no longer tunnelled.
    fn forget_gone(&mut self, tunnels: &HashMap<u32, Arc<Tunnel>>) {
        self.frames.retain(|vni, _| tunnels.contains_key(vni));
    }
}

/// Watches the wake-up fds of the tunnels there are now, and no others.
fn rewatch(shared: &Arc<Shared>, epoll: &OwnedFd, watched: &mut HashMap<u32, Arc<Tunnel>>) {
    let now = shared.tunnels.load_full();
    watched.retain(|vni, t| {
        let stays = now.get(vni).is_some_and(|n| Arc::ptr_eq(n, t));
        if !stays {
            let _ = epoll::delete(epoll, &t.wake);
        }
        stays
    });
    for (vni, t) in now.iter() {
        if watched.contains_key(vni) {
            continue;
        }
        let data = epoll::EventData::new_u64(u64::from(*vni));
        if epoll::add(epoll, &t.wake, data, epoll::EventFlags::IN).is_ok() {
            watched.insert(*vni, t.clone());
            // Frames may have been queued before the fd was watched.
            transmit(shared, t, &mut Outgoing::default());
        }
    }
}

/// Bytes taken off the underlay per turn before they go to the switch: the switch
/// writes them on before the next turn, so little waits (1 MB turns kept a guest's TCP
/// at a longer round trip).
const RX_TURN_BYTES: usize = 256 << 10;
/// The receive arena: a turn's datagrams, back to back (the last read may start just
/// short of the turn's bytes).
const ARENA: usize = RX_TURN_BYTES + MAX_DATAGRAM;
const MAX_DATAGRAM: usize = 65536;
/// Frames sent per `sendmmsg`.
const TX_BATCH: usize = 32;

/// Takes what waits on the underlay socket into the networks it is for: a turn's
/// datagrams first, then each network's frames in one batch (one wake-up of the
/// switch per network, not one per frame); what the switch has no room for is held.
fn receive(shared: &Shared, arena: &mut [u8], held: &mut Held) {
    let c = &shared.counters;
    let tunnels = shared.tunnels.load();
    // (tunnel, start, length) of each frame taken this turn.
    let mut taken: Vec<(&Arc<Tunnel>, usize, usize)> = Vec::with_capacity(256);
    let mut admission = Admission::default();
    let mut used = 0;
    while used < RX_TURN_BYTES && taken.len() < 256 {
        let got = crate::sys::udp_gso::recv_coalesced(shared.socket.as_fd(), &mut arena[used..used + MAX_DATAGRAM]);
        let Ok((n, from, segment)) = got else { break };
        // A coalesced run is datagrams of `segment` bytes back to back, the last
        // possibly shorter.
        let segment = segment.unwrap_or(n).max(1);
        for start in (0..n).step_by(segment) {
            let len = segment.min(n - start);
            if let Some(t) = admission.admit(shared, &tunnels, &arena[used + start..used + start + len], from) {
                taken.push((t, used + start + HEADER_LEN, len - HEADER_LEN));
            }
        }
        used += n;
    }
    let mut rest = taken.as_slice();
    while let Some((t, ..)) = rest.first() {
        // Consecutive frames of one network go together (a turn is mostly one flow),
        // a TCP flow's segments merged back into one as the sender's TSO made them.
        let run = rest.iter().take_while(|(u, ..)| Arc::ptr_eq(u, t)).count();
        let mut coalescer = crate::offload::TcpCoalescer::default();
        for (_, at, len) in &rest[..run] {
            coalescer.push_into(&arena[*at..*at + *len], || t.end.buffer());
        }
        let merged = coalescer.finish();
        if !held.frames.contains_key(&t.vni) {
            // Remote bytes: never vouched for (what the coalescer merged it verified).
            let _ = t.end.relay_owned(merged);
        }
        if !merged.is_empty() {
            count(&c.switch_full);
            held.keep(t.vni, merged);
        }
        c.rx_frames.fetch_add(run as u64, Ordering::Relaxed);
        rest = &rest[run..];
    }
}

/// Who may send into which network, as a receive turn judges its datagrams. A turn's
/// datagrams mostly come from one MAC on one member: what was found for the last one
/// admitted (its tunnel, its lock) serves the next from the same sender and MAC,
/// without looking them up again (three hash lookups a datagram were a tenth of the
/// turn's own work).
#[derive(Default)]
struct Admission<'t> {
    last: Option<Admitted<'t>>,
}

struct Admitted<'t> {
    vni: u32,
    sender: IpAddr,
    src: Mac,
    tunnel: &'t Arc<Tunnel>,
    lock: Option<PortLock>,
}

impl<'t> Admission<'t> {
    /// The tunnel a datagram from `from` is for, if it passes every check; else
    /// counted and `None`.
    fn admit(
        &mut self,
        shared: &Shared,
        tunnels: &'t HashMap<u32, Arc<Tunnel>>,
        datagram: &[u8],
        from: SocketAddr,
    ) -> Option<&'t Arc<Tunnel>> {
        let c = &shared.counters;
        let Ok((vni, frame)) = decapsulate(datagram) else {
            count(&c.malformed);
            return None;
        };
        let sender = from.ip().to_canonical();
        let src = Mac::from_slice(frame.get(6..12).unwrap_or_default());
        let known = self
            .last
            .as_ref()
            .filter(|a| a.vni == vni && a.sender == sender && Some(a.src) == src);
        let admitted = match known {
            Some(a) => a,
            None => self.last.insert(Self::look_up(shared, tunnels, vni, sender, src)?),
        };
        if let Some(lock) = &admitted.lock {
            // A lock with IPv6 addresses is for a network that carries IPv6; elsewhere
            // IPv6 is left to the tunnel port's first-hop guard (dropped as `ipv6_off`).
            let carries_ipv6 = !lock.ips6.is_empty();
            let allowed = EthernetView::parse(frame, crate::MAX_MTU)
                .is_ok_and(|view| crate::guard::lock_allows(Some(lock), &view, carries_ipv6));
            if !allowed {
                count(&c.spoofed);
                return None;
            }
        }
        Some(admitted.tunnel)
    }

    /// Whether `src` on `sender` may send into `vni`'s network, from the tunnels and
    /// their remotes as they are now.
    fn look_up(
        shared: &Shared,
        tunnels: &'t HashMap<u32, Arc<Tunnel>>,
        vni: u32,
        sender: IpAddr,
        src: Option<Mac>,
    ) -> Option<Admitted<'t>> {
        let c = &shared.counters;
        let Some(tunnel) = tunnels.get(&vni) else {
            count(&c.unknown_vni);
            return None;
        };
        let remotes = tunnel.remotes.load();
        if !remotes.members.contains(&sender) {
            count(&c.from_stranger);
            return None;
        }
        let Some(src) = src.filter(|m| remotes.macs.get(m) == Some(&sender)) else {
            count(&c.foreign_mac);
            return None;
        };
        Some(Admitted {
            vni,
            sender,
            src,
            tunnel,
            lock: remotes.locks.get(&src).cloned(),
        })
    }
}

/// What a transmit batch makes of its frames, in buffers reused from batch to batch.
#[derive(Default)]
struct Plan {
    /// Segments cut from offloaded frames, their payloads left in place.
    cuts: TcpCuts,
    /// Frames completed or cut in software (a checksum left partial, or an underlay
    /// that refuses segmented sends).
    soft: SoftFrames,
    /// What goes to which member, in order; frames by their place in the batch.
    sends: Vec<(Queued, SocketAddr)>,
}

impl Plan {
    fn clear(&mut self) {
        self.cuts.clear();
        self.soft.clear();
        self.sends.clear();
    }

    fn is_full(&self) -> bool {
        self.sends.len() >= TX_BATCH
    }

    /// Plans the datagrams for `frame`, the batch's `index`th, to the members it is
    /// for; what it cannot send is counted.
    fn add(
        &mut self,
        shared: &Shared,
        remotes: &Remotes,
        header: &[u8],
        index: usize,
        frame: &[u8],
        offload: &Offload,
    ) {
        let c = &shared.counters;
        let dst = Mac::from_slice(&frame[..6.min(frame.len())]);
        let src = Mac::from_slice(frame.get(6..12).unwrap_or_default());
        let local = |m: Option<Mac>| m.is_some_and(|m| remotes.local_everywhere.contains(&m));
        if local(src) || local(dst) {
            count(&c.kept_local);
            return;
        }
        let known = dst.filter(Mac::is_unicast).and_then(|m| remotes.macs.get(&m));
        let targets: &[IpAddr] = match known {
            Some(ip) => std::slice::from_ref(ip),
            None => &remotes.members,
        };
        let sends = &mut self.sends;
        let mut queue = |what: Queued| {
            for ip in targets {
                sends.push((what, SocketAddr::new(*ip, shared.remote_port)));
            }
        };
        let made = match offload.gso {
            _ if offload.is_plain() => {
                queue(Queued::Frame(index));
                Ok(())
            }
            Some(gso) if shared.segmented_sends.load(Ordering::Relaxed) => self
                .cuts
                .cut_after(header, frame, &gso)
                .map(|cut| queue(Queued::Cut(index, cut.start, cut.end))),
            _ => {
                let before = self.soft.frames().len();
                let made = self.soft.push(frame, offload);
                (before..self.soft.frames().len()).for_each(|i| queue(Queued::Soft(i)));
                made
            }
        };
        if made.is_err() {
            count(&c.malformed);
        }
    }
}

/// Frames taken off a tunnel's queue for a transmit batch, in buffers reused from
/// batch to batch.
#[derive(Default)]
struct Outgoing {
    /// Frames as the switch queued them (recycled once the batch went).
    frames: Vec<Vec<u8>>,
    offloads: Vec<Offload>,
}

/// Sends what the switch queued for a tunnel, [`TX_BATCH`] frames a turn (see
/// [`send_frames`]). Frames reach the queue only before the tunnel's port sends
/// directly (see [`Vtep::attach`]).
fn transmit(shared: &Arc<Shared>, t: &Tunnel, out: &mut Outgoing) {
    loop {
        out.frames.clear();
        out.offloads.clear();
        while out.frames.len() < TX_BATCH {
            let Some((frame, offload)) = t.end.try_recv_offloaded() else {
                break;
            };
            out.frames.push(frame);
            out.offloads.push(offload);
        }
        if out.frames.is_empty() {
            return;
        }
        let frames: Vec<&[u8]> = out.frames.iter().map(Vec::as_slice).collect();
        send_frames(shared, t, &frames, &out.offloads);
        for f in out.frames.drain(..) {
            t.end.recycle(f);
        }
    }
}

/// What the switch hands the tunnel for `vni` from its own buffers, sent (see
/// [`send_frames`]).
fn send_batch(shared: &Arc<Shared>, vni: u32, frames: &[&[u8]], offloads: &[Offload]) {
    let tunnels = shared.tunnels.load();
    if let Some(t) = tunnels.get(&vni) {
        send_frames(shared, t, frames, offloads);
    }
    // Else detached meanwhile: its frames have nowhere to go.
}

thread_local! {
    /// A transmit batch's plan, per switch thread (the only threads that send).
    static PLAN: std::cell::RefCell<Plan> = std::cell::RefCell::new(Plan::default());
    /// Datagrams held for a fuller send, per switch thread.
    static TAIL: std::cell::RefCell<Tail> = std::cell::RefCell::new(Tail::default());
}

/// The last datagrams cut from a segment, too few for a send of their own, held
/// (copied) for the next segment to the same member to top up. A guest's 64 KiB TCP
/// segment of 46 pieces makes 46 datagrams of 1,472 bytes at MTU 1450, more than one
/// segmented send carries (65,507 bytes): without holding, every segment costs a
/// second send of two datagrams, a second trip through the underlay and the far host's
/// receive. Only full-sized datagrams are held (a segmented send's datagrams are all
/// one size but the last), and for one round of the switch's events at most, never
/// while the thread sleeps (see [`crate::switch::Poller::settle`]); any other send
/// flushes them first, so nothing overtakes them.
#[derive(Default)]
struct Tail {
    owner: Weak<Shared>,
    to: Option<SocketAddr>,
    /// Each datagram's size; `bytes` holds whole datagrams back to back.
    size: usize,
    bytes: Vec<u8>,
    /// Held through a whole round of the switch's events already.
    waited: bool,
}

impl Tail {
    fn count(&self) -> usize {
        self.bytes.len() / self.size.max(1)
    }

    /// What is held, a datagram at a time (for an underlay that refuses segmented sends).
    fn singles(&self, to: SocketAddr) -> Vec<([&[u8]; 2], SocketAddr)> {
        self.bytes
            .chunks(self.size.max(1))
            .map(|d| ([d, &[][..]], to))
            .collect()
    }

    /// Whether what is held may lead a send of `size`-byte datagrams to `to` by `shared`.
    fn continues(&self, shared: &Arc<Shared>, to: SocketAddr, size: usize) -> bool {
        !self.bytes.is_empty()
            && self.to == Some(to)
            && self.size == size
            && Weak::ptr_eq(&self.owner, &Arc::downgrade(shared))
    }

    /// Sends what is held on its own.
    fn flush(&mut self) {
        let (Some(to), false) = (self.to, self.bytes.is_empty()) else {
            return;
        };
        if let Some(shared) = self.owner.upgrade() {
            let size = u16::try_from(self.size).expect("held datagrams passed the size check");
            let one_by_one = || self.singles(to);
            send_run(
                &shared,
                to,
                &[io::IoSlice::new(&self.bytes)],
                size,
                self.count(),
                one_by_one,
            );
        }
        self.bytes.clear();
    }
}

/// Sends `frames` to the member hosts they are for, [`TX_BATCH`] datagrams at most a
/// `sendmmsg`, each datagram the shared VXLAN header and the frame gathered without a
/// copy. The tunnel port takes offloads: a 64 KiB TCP segment is cut into the
/// network's MTU here, its payload never copied: its datagrams go as one segmented
/// send, gathered from the segment.
fn send_frames(shared: &Arc<Shared>, t: &Tunnel, frames: &[&[u8]], offloads: &[Offload]) {
    let remotes = t.remotes.load();
    let header = header(t.vni);
    PLAN.with_borrow_mut(|plan| {
        let mut first = 0;
        plan.clear();
        for (i, (frame, offload)) in frames.iter().zip(offloads).enumerate() {
            plan.add(shared, &remotes, &header, i - first, frame, offload);
            if plan.is_full() {
                send_all(shared, &header, &frames[first..=i], plan);
                plan.clear();
                first = i + 1;
            }
        }
        if !plan.sends.is_empty() {
            send_all(shared, &header, &frames[first..], plan);
        }
    });
}

/// A datagram (or a run of them) waiting in a transmit batch: a frame as the switch
/// queued it, one made in software, or the segments `start..end` cut from a frame, to
/// go as one segmented send.
#[derive(Clone, Copy)]
enum Queued {
    Frame(usize),
    Soft(usize),
    Cut(usize, usize, usize),
}

/// Sends a batch's datagrams as `plan` says, in order: runs of single datagrams by
/// `sendmmsg`, a frame's cut segments by segmented sends.
fn send_all(shared: &Arc<Shared>, header: &[u8], frames: &[&[u8]], plan: &Plan) {
    let mut rest = plan.sends.as_slice();
    while let Some((first, to)) = rest.first() {
        if let Queued::Cut(frame, start, end) = *first {
            send_cut(shared, frames[frame], &plan.cuts, start..end, *to);
            rest = &rest[1..];
            continue;
        }
        // Held datagrams go first: nothing overtakes them.
        TAIL.with_borrow_mut(Tail::flush);
        let singles: Vec<([&[u8]; 2], SocketAddr)> = rest
            .iter()
            .map_while(|(what, to)| match *what {
                Queued::Frame(i) => Some(([frames[i], &[]], *to)),
                Queued::Soft(i) => Some(([plan.soft.frames()[i].as_slice(), &[]], *to)),
                Queued::Cut(..) => None,
            })
            .collect();
        send_singles(shared, header, &singles);
        rest = &rest[singles.len()..];
    }
}

/// A frame's cut segments to `to`: all but the last are the same size, so the kernel
/// cuts their datagrams from one gathered buffer (the segment's headers after the
/// VXLAN header, its payload in the frame, for each), as many a send as it takes,
/// the first topped up from what an earlier segment left held ([`Tail`]) and a short
/// run of full-sized ones at the end held in turn. An underlay that refuses gets them
/// one by one, and every later frame is cut in software.
fn send_cut(shared: &Arc<Shared>, frame: &[u8], cuts: &TcpCuts, segments: std::ops::Range<usize>, to: SocketAddr) {
    use crate::sys::udp_gso::{MAX_BYTES, MAX_SEGMENTS};
    let parts = |k: usize| {
        let (headers, payload) = cuts.segment(k);
        [headers, &frame[payload]]
    };
    let datagram = |k: usize| parts(k).iter().map(|p| p.len()).sum::<usize>();
    let size = datagram(segments.start);
    let per_send = (MAX_BYTES / size).clamp(1, MAX_SEGMENTS);
    // The size a segmented send is told, while the underlay takes them (a refusal
    // below turns them off for the rest too).
    let segmented = || {
        u16::try_from(size)
            .ok()
            .filter(|_| shared.segmented_sends.load(Ordering::Relaxed))
    };
    TAIL.with_borrow_mut(|tail| {
        if !tail.continues(shared, to, size) || segmented().is_none() {
            tail.flush();
        }
        let mut ks: &[usize] = &segments.collect::<Vec<_>>();
        while !ks.is_empty() {
            let held = tail.count();
            let (chunk, rest) = ks.split_at(ks.len().min(per_send - held));
            ks = rest;
            let singles = || -> Vec<([&[u8]; 2], SocketAddr)> { chunk.iter().map(|&k| (parts(k), to)).collect() };
            let Some(size16) = segmented() else {
                // Larger than a segmented send describes (not for an MTU that passed
                // the offload check), or the underlay refused one before.
                send_singles(shared, &[], &singles());
                continue;
            };
            if ks.is_empty() && held + chunk.len() < per_send && chunk.iter().all(|&k| datagram(k) == size) {
                // Too few for a send: held for the next segment to top up.
                if held == 0 {
                    tail.owner = Arc::downgrade(shared);
                    tail.to = Some(to);
                    tail.size = size;
                    tail.waited = false;
                }
                for &k in chunk {
                    parts(k).iter().for_each(|p| tail.bytes.extend_from_slice(p));
                }
                return;
            }
            let mut gathered: Vec<io::IoSlice<'_>> = Vec::with_capacity(1 + 2 * chunk.len());
            if held > 0 {
                gathered.push(io::IoSlice::new(&tail.bytes));
            }
            gathered.extend(chunk.iter().flat_map(|&k| parts(k).map(io::IoSlice::new)));
            let one_by_one = || [tail.singles(to), singles()].concat();
            send_run(shared, to, &gathered, size16, held + chunk.len(), one_by_one);
            tail.bytes.clear();
        }
    });
}

/// One segmented send of `datagrams` datagrams of `size` bytes gathered from `parts`
/// (the last possibly shorter). A full buffer loses them, as it would a datagram; an
/// underlay that refuses segmented sends gets them one by one (`one_by_one`), and
/// every later frame is cut in software.
fn send_run<'a>(
    shared: &Shared,
    to: SocketAddr,
    parts: &[io::IoSlice<'_>],
    size: u16,
    datagrams: usize,
    one_by_one: impl FnOnce() -> Vec<([&'a [u8]; 2], SocketAddr)>,
) {
    let c = &shared.counters;
    match crate::sys::udp_gso::send_segments(shared.socket.as_fd(), to, parts, size) {
        Ok(_) => {
            c.tx_datagrams.fetch_add(datagrams as u64, Ordering::Relaxed);
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            c.send_errors.fetch_add(datagrams as u64, Ordering::Relaxed);
        }
        Err(e) => {
            if shared.segmented_sends.swap(false, Ordering::Relaxed) {
                tracing::info!("the underlay refuses segmented sends ({e}); VXLAN datagrams go one by one");
            }
            send_singles(shared, &[], &one_by_one());
        }
    }
}

/// One `sendmmsg` (and more for what it did not take) for `sends`: (frame in parts,
/// member), each datagram `header` and the frame's parts, gathered without a copy.
fn send_singles(shared: &Shared, header: &[u8], sends: &[([&[u8]; 2], SocketAddr)]) {
    use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags};
    let c = &shared.counters;
    let iovs: Vec<[io::IoSlice<'_>; 3]> = sends
        .iter()
        .map(|([head, rest], _)| [io::IoSlice::new(header), io::IoSlice::new(head), io::IoSlice::new(rest)])
        .collect();
    let addrs: Vec<rustix::net::SocketAddrAny> = sends
        .iter()
        .map(|(_, to)| rustix::net::SocketAddrAny::from(*to))
        .collect();
    let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> = sends.iter().map(|_| Default::default()).collect();
    let mut msgs: Vec<MMsgHdr<'_>> = addrs
        .iter()
        .zip(&iovs)
        .zip(controls.iter_mut())
        .map(|((to, iov), control)| MMsgHdr::new_with_addr(to, iov, control))
        .collect();
    let mut at = 0;
    while at < msgs.len() {
        match sendmmsg(&shared.socket, &mut msgs[at..], SendFlags::empty()) {
            Ok(0) | Err(_) => {
                // The first of the rest was refused (a full buffer, an unreachable
                // member): it is lost, the others are tried.
                count(&c.send_errors);
                at += 1;
            }
            Ok(n) => {
                c.tx_datagrams.fetch_add(n as u64, Ordering::Relaxed);
                at += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_carries_the_vni_and_the_flag_and_reads_back() {
        let h = header(0x12_3456);
        assert_eq!(h, [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        let mut datagram = h.to_vec();
        datagram.extend([0xaa; 60]);
        let (vni, frame) = decapsulate(&datagram).unwrap();
        assert_eq!((vni, frame.len()), (0x12_3456, 60));
        // Reserved bits set by a sender are ignored.
        datagram[1] = 0xff;
        datagram[7] = 0xff;
        assert_eq!(decapsulate(&datagram).unwrap().0, 0x12_3456);
    }

    /// An IPv4 frame from `src` (MAC and address) to the broadcast MAC.
    fn ipv4_frame(src: Mac, ip: [u8; 4]) -> Vec<u8> {
        let mut f = [Mac::BROADCAST.0, src.0].concat();
        f.extend([0x08, 0x00, 0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]);
        f.extend(ip);
        f.extend([10, 0, 0, 255]);
        f.extend([0u8; 8]);
        f
    }

    /// A switch (unconfined, as tests run) with one network, "n".
    fn switch_with_network_n() -> Arc<Switch> {
        let switch = Arc::new(
            Switch::start(crate::SwitchConfig {
                sandbox: false,
                ..Default::default()
            })
            .unwrap(),
        );
        switch.add_network("n", crate::NetworkConfig::default()).unwrap();
        switch
    }

    #[test]
    fn within_a_turn_what_was_found_for_a_sender_is_reused_but_every_frame_meets_its_lock() {
        let switch = switch_with_network_n();
        let vtep = Vtep::start(switch.clone(), "127.0.0.1:0".parse().unwrap(), DEFAULT_PORT).unwrap();
        let (member, other): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let (locked, free): (Mac, Mac) = (
            "02:00:00:00:00:0a".parse().unwrap(),
            "02:00:00:00:00:0b".parse().unwrap(),
        );
        let remotes = Remotes {
            members: vec![member, other],
            macs: HashMap::from([(locked, member), (free, member)]),
            locks: HashMap::from([(
                locked,
                PortLock {
                    mac: locked,
                    ips: vec!["10.0.0.5".parse().unwrap()],
                    ips6: vec![],
                },
            )]),
            ..Default::default()
        };
        vtep.attach("n", "tunnel", 42, remotes).unwrap();
        let tunnels = vtep.shared.tunnels.load_full();
        let c = &vtep.shared.counters;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let datagram = |vni: u32, src: Mac, ip: [u8; 4]| [&header(vni)[..], &ipv4_frame(src, ip)].concat();
        let from = |ip: IpAddr| SocketAddr::new(ip, DEFAULT_PORT);
        let mut turn = Admission::default();
        let mut admit = |d: Vec<u8>, sender: IpAddr| turn.admit(&vtep.shared, &tunnels, &d, from(sender)).is_some();

        assert!(admit(datagram(42, locked, [10, 0, 0, 5]), member));
        assert!(
            !admit(datagram(42, locked, [10, 0, 0, 6]), member),
            "the same MAC again, from an address it does not hold"
        );
        assert_eq!(get(&c.spoofed), 1);
        assert!(admit(datagram(42, locked, [10, 0, 0, 5]), member));
        assert!(
            !admit(datagram(42, locked, [10, 0, 0, 5]), other),
            "the MAC from a member it does not live on"
        );
        assert_eq!(get(&c.foreign_mac), 1);
        assert!(!admit(datagram(43, locked, [10, 0, 0, 5]), member), "another VNI");
        assert_eq!(get(&c.unknown_vni), 1);
        assert!(
            admit(datagram(42, free, [10, 0, 0, 77]), member),
            "a MAC without a lock"
        );
        assert!(
            !admit(datagram(42, free, [10, 0, 0, 77]), "127.0.0.9".parse().unwrap()),
            "a stranger"
        );
        assert_eq!(get(&c.from_stranger), 1);
        assert!(
            !admit(datagram(42, locked, [10, 0, 0, 6]), member),
            "after another MAC, the lock again"
        );
        assert_eq!(get(&c.spoofed), 2);
    }

    /// An IPv4 TCP segment of `pieces` MSS-sized pieces from `src` to `dst`, its
    /// checksum and cutting left to the tunnel, as a guest's TAP hands it over.
    fn tcp_segment(src: Mac, dst: Mac, seq: u32, pieces: usize) -> (Vec<u8>, Offload) {
        let payload: Vec<u8> = (0..pieces * MSS).map(|i| (i % 251) as u8).collect();
        let mut f = [dst.0, src.0].concat();
        f.extend([0x08, 0x00, 0x45, 0]);
        f.extend(((40 + payload.len()) as u16).to_be_bytes());
        f.extend([0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend([0x30, 0x39, 0x00, 0x50]);
        f.extend(seq.to_be_bytes());
        f.extend([0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend(payload);
        let offload = Offload::defer_tcp_checksum(&mut f, MSS as u16).unwrap();
        (f, offload)
    }
    /// A guest's TCP payload per piece at MTU 1450 (with timestamps).
    const MSS: usize = 1398;

    #[test]
    fn a_segments_last_datagrams_top_up_the_next_segments_send_and_nothing_overtakes_them() {
        let switch = switch_with_network_n();
        // The member: a plain socket that takes runs of datagrams as one buffer, as
        // a VTEP does, so each send shows as one read.
        let member = UdpSocket::bind("127.0.0.1:0").unwrap();
        crate::sys::udp_gso::enable_gro(member.as_fd()).unwrap();
        member
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let port = member.local_addr().unwrap().port();
        let vtep = Vtep::start(switch.clone(), "127.0.0.1:0".parse().unwrap(), port).unwrap();
        let (here, there): (Mac, Mac) = (
            "02:00:00:00:00:01".parse().unwrap(),
            "02:00:00:00:00:02".parse().unwrap(),
        );
        let remotes = Remotes {
            members: vec!["127.0.0.1".parse().unwrap()],
            macs: HashMap::from([(there, "127.0.0.1".parse().unwrap())]),
            ..Default::default()
        };
        vtep.attach("n", "tunnel", 42, remotes).unwrap();
        let tunnel = vtep.shared.tunnels.load().get(&42).unwrap().clone();

        // Two 46-piece segments: 92 datagrams of 1,472 bytes, 44 to a send at most.
        let (a, a_off) = tcp_segment(here, there, 1000, 46);
        let (b, b_off) = tcp_segment(here, there, 1000 + 46 * MSS as u32, 46);
        send_frames(&vtep.shared, &tunnel, &[&a], &[a_off]);
        assert!(
            TAIL.with_borrow(|t| t.count()) == 2,
            "the first segment's last two wait"
        );
        send_frames(&vtep.shared, &tunnel, &[&b], &[b_off]);
        // An ARP request (a single datagram) must not overtake what is held.
        let mut arp = [Mac::BROADCAST.0, here.0].concat();
        arp.extend([0x08, 0x06]);
        arp.extend([0u8; 28]);
        send_frames(&vtep.shared, &tunnel, &[&arp], &[Offload::default()]);
        assert!(
            TAIL.with_borrow(|t| t.bytes.is_empty()),
            "a single send flushed what was held"
        );

        let mut reads = Vec::new();
        let mut datagrams = Vec::new();
        let mut buf = vec![0u8; 65536];
        while datagrams.len() < 93 {
            let (n, _, segment) = crate::sys::udp_gso::recv_coalesced(member.as_fd(), &mut buf).unwrap();
            let segment = segment.unwrap_or(n);
            reads.push(n.div_ceil(segment));
            datagrams.extend(buf[..n].chunks(segment).map(<[u8]>::to_vec));
        }
        assert_eq!(reads, [44, 44, 4, 1], "sends of 44 datagrams, not 44 + 2 per segment");
        // In order, each the piece it should be, the ARP request last.
        for (i, d) in datagrams[..92].iter().enumerate() {
            let (vni, inner) = decapsulate(d).unwrap();
            assert_eq!((vni, inner.len()), (42, 14 + 40 + MSS));
            let seq = u32::from_be_bytes(inner[38..42].try_into().unwrap());
            assert_eq!(seq, 1000 + (i * MSS) as u32, "datagram {i} in order");
            let at = (i % 46) * MSS;
            assert!(
                inner[54..]
                    .iter()
                    .enumerate()
                    .all(|(j, &x)| x == ((at + j) % 251) as u8),
                "datagram {i}'s payload"
            );
        }
        assert_eq!(decapsulate(&datagrams[92]).unwrap().1, &arp[..]);
        assert_eq!(vtep.shared.counters.tx_datagrams.load(Ordering::Relaxed), 93);
    }

    #[test]
    fn what_is_not_vxlan_is_refused() {
        assert_eq!(decapsulate(&[0x08; 21]), Err(VxlanError::Short));
        let mut datagram = vec![0u8; 64];
        assert_eq!(decapsulate(&datagram), Err(VxlanError::NoVni));
        datagram[0] = 0x08;
        assert!(decapsulate(&datagram).is_ok());
    }
}

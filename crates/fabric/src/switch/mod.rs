//! The switch handle: what the rest of vmfabric calls to shape the data plane.
//!
//! A `Switch` owns one forwarding thread (see [`worker`]). Every change (networks,
//! ports, locks) is a command sent over a channel with an eventfd kick, answered once
//! the worker has applied it, so a caller that got `Ok` knows the port is live. Counters
//! are read straight from shared atomics, without a round trip.
//!
//! One forwarding thread serves every network: on the machines vmfabric targets (a few
//! cores shared with the VMs) a single thread that never locks moves more frames than
//! several that share MAC tables.

mod table;
mod worker;

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rustix::event::EventfdFlags;

use crate::config::{NetworkConfig, SwitchConfig};
use crate::counters::CounterSnapshot;
use crate::error::{FabricError, Result};
use crate::port::{Capture, MacEntry, PortId, PortInfo, PortLock, SwitchEvent, TapSource, Transport};
use crate::sys::tun::{self, Tun, TunOptions};
use crate::transport;
use worker::{Command, NetShared, NewPort, PortFd, PortShared, Worker, WorkerSetup};
pub(crate) use worker::{DropCounters, Poller};

struct PortRecord {
    network: String,
    label: String,
    transport: Transport,
    shared: Arc<PortShared>,
    /// The thread serving a vhost-user port's VMM; stopped when the record goes.
    server: Option<crate::vhost_user::VhostUserServer>,
}

#[derive(Default)]
struct Registry {
    networks: HashMap<String, Arc<NetShared>>,
    ports: HashMap<PortId, PortRecord>,
}

/// A running L2 switch with any number of isolated networks.
pub struct Switch {
    commands: Sender<Command>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    events: Mutex<Option<Receiver<SwitchEvent>>>,
    events_dropped: Arc<AtomicU64>,
    registry: Mutex<Registry>,
    next_port: AtomicU64,
    config: SwitchConfig,
}

impl Switch {
    /// Starts the forwarding thread. It sleeps until there is work.
    pub fn start(config: SwitchConfig) -> Result<Switch> {
        let wake = Arc::new(
            rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .map_err(|e| FabricError::io("create eventfd", e.into()))?,
        );
        let (commands, command_rx) = mpsc::channel();
        let (event_tx, event_rx) = mpsc::sync_channel(config.event_capacity);
        let events_dropped = Arc::new(AtomicU64::new(0));
        let worker = Worker::new(WorkerSetup {
            wake: wake.clone(),
            commands: command_rx,
            events: event_tx,
            events_dropped: events_dropped.clone(),
            clock: config.clock.clone(),
            egress_queue_frames: config.egress_queue_frames,
            stream_queue_bytes: config.stream_queue_bytes,
            socket_buffer_bytes: config.socket_buffer_bytes,
        })
        .map_err(|e| FabricError::io("set up the switch worker", e))?;
        let sandbox = config.sandbox;
        let thread = std::thread::Builder::new()
            .name("fabric-switch".into())
            .spawn(move || {
                if sandbox {
                    if let Err(e) = crate::sys::seccomp::drop_capabilities() {
                        tracing::warn!("the switch thread keeps the daemon's capabilities: {e}");
                    }
                    if let Err(e) = crate::sys::seccomp::confine_switch_thread() {
                        tracing::warn!("the switch thread runs without its seccomp filter: {e}");
                    }
                }
                worker.run()
            })
            .map_err(|e| FabricError::io("spawn the switch thread", e))?;
        Ok(Switch {
            commands,
            wake,
            thread: Some(thread),
            events: Mutex::new(Some(event_rx)),
            events_dropped,
            registry: Mutex::new(Registry::default()),
            next_port: AtomicU64::new(1),
            config,
        })
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // The registry is only mutated in small blocks that cannot panic half-way.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick(&self) {
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
    }

    fn call<T>(&self, make: impl FnOnce(worker::Reply<T>) -> Command) -> Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.commands.send(make(tx)).map_err(|_| FabricError::Stopped)?;
        self.kick();
        rx.recv().map_err(|_| FabricError::Stopped)?
    }

    pub fn add_network(&self, name: &str, config: NetworkConfig) -> Result<()> {
        if name.is_empty() {
            return Err(FabricError::InvalidConfig("a network needs a name".into()));
        }
        let shared = Arc::new(NetShared::default());
        let (name_owned, shared_w) = (name.to_string(), shared.clone());
        self.call(|reply| Command::AddNetwork {
            name: name_owned,
            config,
            shared: shared_w,
            reply,
        })?;
        self.registry().networks.insert(name.to_string(), shared);
        Ok(())
    }

    /// Removes an empty network.
    pub fn remove_network(&self, name: &str) -> Result<()> {
        let name_owned = name.to_string();
        self.call(|reply| Command::RemoveNetwork {
            name: name_owned,
            reply,
        })?;
        self.registry().networks.remove(name);
        Ok(())
    }

    pub fn networks(&self) -> Vec<String> {
        let mut v: Vec<String> = self.registry().networks.keys().cloned().collect();
        v.sort();
        v
    }

    fn attach(&self, network: &str, label: &str, transport: Transport, io: PortFd) -> Result<PortId> {
        self.attach_shared(network, label, transport, io, Arc::new(PortShared::default()))
    }

    fn attach_shared(
        &self,
        network: &str,
        label: &str,
        transport: Transport,
        io: PortFd,
        shared: Arc<PortShared>,
    ) -> Result<PortId> {
        let id = PortId(self.next_port.fetch_add(1, Ordering::Relaxed));
        let port = NewPort {
            id,
            io,
            shared: shared.clone(),
        };
        let network_owned = network.to_string();
        self.call(|reply| Command::AddPort {
            network: network_owned,
            port,
            reply,
        })?;
        let record = PortRecord {
            network: network.into(),
            label: label.into(),
            transport,
            shared,
            server: None,
        };
        self.registry().ports.insert(id, record);
        Ok(id)
    }

    /// Adds a socketpair port and returns the VM's end (blocking, close-on-exec), the
    /// in-process attachment VZ-style VMMs and QEMU `-netdev dgram,local.type=fd` take.
    pub fn add_port(&self, network: &str, label: &str) -> Result<(PortId, OwnedFd)> {
        let (ours, theirs) = transport::socketpair(self.config.socket_buffer_bytes)?;
        let id = self.attach(network, label, Transport::Socketpair, PortFd::Connected(ours))?;
        Ok((id, theirs))
    }

    /// Binds a datagram socket at `path`. The VMM sends from its own bound path; the
    /// switch answers to the last address that sent to it.
    pub fn add_unixgram_port(&self, network: &str, label: &str, path: &Path) -> Result<PortId> {
        let sock = transport::bind_unixgram(path, self.config.socket_mode, self.config.socket_buffer_bytes)?;
        let t = Transport::Unixgram {
            path: path.to_path_buf(),
        };
        self.attach(network, label, t, PortFd::Path(sock)).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
    }

    /// Listens on a stream socket at `path` (4-byte big-endian length, then the frame).
    /// One VMM at a time; a new one may connect after the last one went away.
    pub fn add_stream_port(&self, network: &str, label: &str, path: &Path) -> Result<PortId> {
        let sock = transport::listen_stream(path, self.config.socket_mode, self.config.socket_buffer_bytes)?;
        let t = Transport::Stream {
            path: path.to_path_buf(),
        };
        self.attach(network, label, t, PortFd::Listener(sock)).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
    }

    /// Adds a TAP port; returns its id and the device's name. A device created here by
    /// name is not persistent: it goes away with the port. It is opened with a
    /// virtio-net header and checksum and TCP segmentation offloads, so the kernel
    /// hands over (and takes) 64 KiB segments; an fd handed over keeps its framing,
    /// and gets the offloads if it has the header.
    pub fn add_tap_port(&self, network: &str, label: &str, source: TapSource) -> Result<(PortId, String)> {
        let (fd, ifname, vnet_hdr) = match source {
            TapSource::Name(name) => {
                let opts = TunOptions {
                    nonblocking: true,
                    vnet_hdr: true,
                    ..Default::default()
                };
                let tun = Tun::open(&name, opts).map_err(|e| FabricError::io(format!("open TAP {name}"), e))?;
                let ifname = tun.name().to_string();
                (tun.into_fd(), ifname, Some(crate::offload::VNET_HDR_LEN))
            }
            TapSource::Fd(fd, name) => {
                rustix::io::ioctl_fionbio(&fd, true)
                    .map_err(|e| FabricError::io("make TAP fd non-blocking", e.into()))?;
                let vnet_hdr = tun::vnet_hdr_len(fd.as_fd()).map_err(|e| FabricError::io("read TAP flags", e))?;
                if vnet_hdr.is_some_and(|n| !(10..=12).contains(&n)) {
                    return Err(FabricError::io(
                        "TAP fd",
                        std::io::Error::new(
                            std::io::ErrorKind::Unsupported,
                            "a virtio-net header of other than 10 or 12 bytes",
                        ),
                    ));
                }
                (fd, name, vnet_hdr)
            }
        };
        if vnet_hdr.is_some() {
            tun::set_offload(fd.as_fd(), tun::SWITCH_OFFLOADS)
                .map_err(|e| FabricError::io(format!("set offloads on TAP {ifname}"), e))?;
        }
        let t = Transport::Tap { ifname: ifname.clone() };
        let id = self.attach(network, label, t, PortFd::Tap { fd, vnet_hdr })?;
        Ok((id, ifname))
    }

    /// Adds a port served by something in this process (a gateway): frames pass through
    /// shared queues, not a socket. The port is up from the start.
    pub fn add_inprocess_port(&self, network: &str, label: &str) -> Result<(PortId, crate::InProcessEnd)> {
        let ring = Arc::new(crate::ring::FrameRing::new()?);
        ring.set_peer(Some("in-process".into()));
        let id = self.attach(network, label, Transport::InProcess, PortFd::Ring(ring.clone()))?;
        Ok((id, crate::InProcessEnd::new(ring)))
    }

    /// Listens for a vhost-user VMM at `path` (QEMU's `-netdev vhost-user`, Cloud
    /// Hypervisor's `--net vhost_user=true`); the VMM must share the guest's memory. A
    /// VMM may connect again after its last connection ended.
    pub fn add_vhost_user_port(&self, network: &str, label: &str, path: &Path) -> Result<PortId> {
        let net = self
            .registry()
            .networks
            .get(network)
            .cloned()
            .ok_or_else(|| FabricError::NoSuchNetwork(network.into()))?;
        let ring = Arc::new(crate::ring::FrameRing::new()?);
        let shared = Arc::new(PortShared::default());
        let counters = Arc::new(DropCounters {
            port: shared.clone(),
            net,
        });
        let t = Transport::VhostUser {
            path: path.to_path_buf(),
        };
        let id = self.attach_shared(network, label, t, PortFd::Ring(ring.clone()), shared)?;
        match crate::vhost_user::VhostUserServer::start(path, self.config.socket_mode, label, ring, counters) {
            Ok(server) => {
                if let Some(rec) = self.registry().ports.get_mut(&id) {
                    rec.server = Some(server);
                }
                Ok(id)
            }
            Err(e) => {
                let _ = self.remove_port(id);
                Err(e)
            }
        }
    }

    /// Removes a port while traffic flows; its socket file, if any, is deleted.
    pub fn remove_port(&self, id: PortId) -> Result<()> {
        self.call(|reply| Command::RemovePort { id, reply })?;
        let rec = self.registry().ports.remove(&id);
        if let Some(rec) = rec {
            remove_socket_file(&rec.transport);
        }
        Ok(())
    }

    /// From now on, a new port of `network` is born sealed: everything it sends is
    /// dropped (counted as `spoofed`) until it is locked ([`Switch::lock_port`],
    /// [`Switch::lock_port_to_first_mac`]) or trusted. For a control plane that locks
    /// every port: no port is open, not even between its creation and its lock.
    pub fn seal_new_ports(&self, network: &str) -> Result<()> {
        let network = network.to_string();
        self.call(|reply| Command::SealNewPorts { network, reply })
    }

    /// Locks a port to a MAC and IPv4 addresses (`None` unlocks).
    pub fn lock_port(&self, id: PortId, lock: Option<PortLock>) -> Result<()> {
        self.call(|reply| Command::LockPort { id, lock, reply })
    }

    /// Locks a port to the source MAC of the first frame it sends (with no addresses:
    /// until [`Switch::lock_port`] gives it some, only DHCP from 0.0.0.0 and ARP probes
    /// pass). For VMMs that choose their own MAC.
    pub fn lock_port_to_first_mac(&self, id: PortId) -> Result<()> {
        self.call(|reply| Command::LockToFirstMac { id, reply })
    }

    /// Trusts a port to serve DHCP (the network's gateway); others' DHCP server
    /// messages are dropped as `rogue_dhcp` where the network's `dhcp_guard` is on.
    pub fn set_port_trusted(&self, id: PortId, trusted: bool) -> Result<()> {
        self.call(|reply| Command::TrustPort { id, trusted, reply })
    }

    /// Tells a unixgram port where its VMM's socket is, so frames reach the VMM before
    /// it has sent anything (after a restart of the switch, say). Later senders still
    /// take over as usual.
    pub fn set_unixgram_peer(&self, id: PortId, path: &Path) -> Result<()> {
        let peer =
            crate::sys::mmsg::UnixPeer::from_path(path).map_err(|e| FabricError::InvalidConfig(e.to_string()))?;
        self.call(|reply| Command::SetPeer { id, peer, reply })
    }

    pub fn port_counters(&self, id: PortId) -> Option<CounterSnapshot> {
        self.registry().ports.get(&id).map(|r| r.shared.counters.snapshot())
    }

    pub fn network_counters(&self, name: &str) -> Option<CounterSnapshot> {
        self.registry().networks.get(name).map(|n| n.counters.snapshot())
    }

    /// Entries in the network's MAC table right now (as last counted by the worker).
    pub fn mac_table_len(&self, name: &str) -> Option<u64> {
        self.registry()
            .networks
            .get(name)
            .map(|n| n.mac_entries.load(Ordering::Relaxed))
    }

    pub fn is_port_up(&self, id: PortId) -> Option<bool> {
        self.registry()
            .ports
            .get(&id)
            .map(|r| r.shared.up.load(Ordering::Relaxed))
    }

    pub fn ports(&self) -> Vec<PortInfo> {
        let reg = self.registry();
        let mut v: Vec<PortInfo> = reg
            .ports
            .iter()
            .map(|(id, r)| PortInfo {
                id: *id,
                network: r.network.clone(),
                label: r.label.clone(),
                transport: r.transport.clone(),
                up: r.shared.up.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Has the switch thread do `poller`'s work beside forwarding, from now until
    /// [`Switch::remove_poller`].
    pub(crate) fn add_poller(&self, poller: Box<dyn Poller>) -> Result<u64> {
        self.call(|reply| Command::AddPoller { poller, reply })
    }

    /// Stops a poller; it is dropped on the switch thread before this returns.
    pub(crate) fn remove_poller(&self, id: u64) -> Result<()> {
        self.call(|reply| Command::RemovePoller { id, reply })
    }

    pub fn mac_table(&self, network: &str) -> Result<Vec<MacEntry>> {
        let network = network.to_string();
        self.call(|reply| Command::MacTable { network, reply })
    }

    /// Starts a live capture of every frame entering `network`, or of the frames to
    /// and from `port` only, with room for `capacity` copies in flight.
    pub fn capture(&self, network: &str, port: Option<PortId>, capacity: usize) -> Result<Capture> {
        let (tx, frames) = mpsc::sync_channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let tap = worker::CaptureTap {
            port,
            slot: None,
            tx,
            dropped: dropped.clone(),
        };
        let network = network.to_string();
        self.call(|reply| Command::AddCapture { network, tap, reply })?;
        Ok(Capture { frames, dropped })
    }

    /// The event stream; the first caller gets it.
    pub fn take_events(&self) -> Option<Receiver<SwitchEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Events lost because nobody read them fast enough.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped.load(Ordering::Relaxed)
    }
}

fn remove_socket_file(t: &Transport) {
    if let Transport::Unixgram { path } | Transport::Stream { path } = t {
        let _ = std::fs::remove_file(path);
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let ports = std::mem::take(&mut self.registry().ports);
        for rec in ports.values() {
            remove_socket_file(&rec.transport);
        }
    }
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::BorrowedFd;
    use std::time::Duration;

    /// Says each time it is polled, and when it is dropped.
    struct Telling {
        ready: OwnedFd,
        polled: mpsc::Sender<&'static str>,
    }

    impl Poller for Telling {
        fn fd(&self) -> BorrowedFd<'_> {
            self.ready.as_fd()
        }
        fn poll(&mut self) {
            let mut buf = [0u8; 8];
            let _ = rustix::io::read(&self.ready, &mut buf);
            let _ = self.polled.send("polled");
        }
    }

    impl Drop for Telling {
        fn drop(&mut self) {
            let _ = self.polled.send("dropped");
        }
    }

    #[test]
    fn the_switch_thread_polls_a_poller_while_its_fd_is_readable_and_drops_it_when_removed() {
        let switch = Switch::start(SwitchConfig {
            sandbox: false,
            ..Default::default()
        })
        .unwrap();
        let ready = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap();
        let signal = rustix::io::dup(&ready).unwrap();
        let (tx, said) = mpsc::channel();
        let id = switch.add_poller(Box::new(Telling { ready, polled: tx })).unwrap();
        let next = || said.recv_timeout(Duration::from_secs(5));
        assert!(
            said.recv_timeout(Duration::from_millis(200)).is_err(),
            "polled with nothing ready"
        );
        rustix::io::write(&signal, &1u64.to_ne_bytes()).unwrap();
        assert_eq!(next(), Ok("polled"));
        switch.remove_poller(id).unwrap();
        assert_eq!(
            said.try_recv(),
            Ok("dropped"),
            "removed, it is dropped before remove_poller returns"
        );
        rustix::io::write(&signal, &1u64.to_ne_bytes()).unwrap();
        assert!(
            said.recv_timeout(Duration::from_millis(200)).is_err(),
            "polled after its removal"
        );
        assert!(switch.remove_poller(id).is_err(), "removed twice");
    }
}

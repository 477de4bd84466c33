//! vhost-user-net ports: the VMM (QEMU, Cloud Hypervisor) connects to a listening path
//! and shares the guest's memory, and frames move through the virtqueues in that memory
//! with no system call per frame.
//!
//! The protocol (memory table, rings, features) is rust-vmm's `vhost-user-backend`: per
//! connection it runs a thread for the control messages and a queue thread that calls
//! [`device::NetDevice`]. The queue thread passes frames to the switch thread through
//! the port's [`FrameRing`], so the switch still owns forwarding, learning, locks,
//! counters and captures for this port as for every other. A VMM that goes away (or
//! restarts) may connect again: each connection gets a fresh device state.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::{debug, warn};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::error::{FabricError, Result};
use crate::ring::FrameRing;

pub(crate) mod device;
mod relay;

use device::NetDevice;

/// The connection in progress, and whether the port is going away; one lock so a
/// removal can never miss a connection that is just starting.
#[derive(Default)]
struct Session {
    closing: bool,
    current: Option<ShutdownHandle>,
    vmm: Option<UnixStream>,
}

/// Serves one vhost-user port's listening path until dropped.
pub(crate) struct VhostUserServer {
    path: PathBuf,
    private_dir: PathBuf,
    session: Arc<Mutex<Session>>,
    thread: Option<JoinHandle<()>>,
}

/// Where the backend library connects to the relay: a directory only this process's
/// user can enter, made fresh (never one that was there before).
fn private_dir() -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("vmfabric-vhost-user-{}-{n}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| FabricError::io(format!("create {}", dir.display()), e))?;
    Ok(dir)
}

struct Endpoints {
    public: UnixListener,
    backend: UnixListener,
    backend_path: PathBuf,
}

impl VhostUserServer {
    /// Listens at `path` (mode `mode`) and serves VMMs one after another.
    pub(crate) fn start(
        path: &Path,
        mode: u32,
        name: &str,
        ring: Arc<FrameRing>,
        counters: Arc<crate::switch::DropCounters>,
    ) -> Result<VhostUserServer> {
        crate::transport::prepare_socket_path(path)?;
        let public =
            UnixListener::bind(path).map_err(|e| FabricError::io(format!("listen on {}", path.display()), e))?;
        crate::transport::set_mode(path, mode)?;
        let private_dir = private_dir()?;
        let backend_path = private_dir.join("backend.sock");
        let backend = UnixListener::bind(&backend_path)
            .map_err(|e| FabricError::io(format!("listen on {}", backend_path.display()), e))?;
        let ends = Endpoints {
            public,
            backend,
            backend_path,
        };
        let session = Arc::new(Mutex::new(Session::default()));
        let s = session.clone();
        let thread_name = format!("vhost-user {name}");
        let thread = std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || serve(&ends, &thread_name, &ring, &counters, &s))
            .map_err(|e| FabricError::io("start the vhost-user thread", e))?;
        Ok(VhostUserServer {
            path: path.to_path_buf(),
            private_dir,
            session,
            thread: Some(thread),
        })
    }
}

fn lock(s: &Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The peer's process id (SO_PEERCRED).
fn peer_pid(sock: &UnixStream) -> Option<u32> {
    rustix::net::sockopt::socket_peercred(sock)
        .ok()
        .map(|c| c.pid.as_raw_nonzero().get() as u32)
}

fn serve(
    ends: &Endpoints,
    name: &str,
    ring: &Arc<FrameRing>,
    counters: &Arc<crate::switch::DropCounters>,
    session: &Mutex<Session>,
) {
    loop {
        let vmm = match ends.public.accept() {
            Ok((vmm, _)) => vmm,
            Err(e) => {
                warn!("{name}: accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if lock(session).closing {
            return;
        }
        let peer = match peer_pid(&vmm) {
            Some(pid) => format!("vhost-user frontend pid {pid}"),
            None => "vhost-user frontend".to_string(),
        };
        let device = Arc::new(Mutex::new(NetDevice::new(ring.clone(), counters.clone())));
        let mut daemon =
            match VhostUserDaemon::new(name.to_string(), device, GuestMemoryAtomic::new(GuestMemoryMmap::new())) {
                Ok(d) => d,
                Err(e) => {
                    warn!("{name}: cannot serve: {e}");
                    return;
                }
            };
        if let Err(e) = device::watch_ring(&daemon, ring) {
            warn!("{name}: cannot watch the ring: {e}");
            device::stop_queue_thread(&daemon);
            return;
        }
        let Some(backend_side) = connect_backend(&mut daemon, ends) else {
            warn!("{name}: the backend library did not connect");
            device::stop_queue_thread(&daemon);
            continue;
        };
        {
            let mut s = lock(session);
            if s.closing {
                device::stop_queue_thread(&daemon);
                return;
            }
            s.current = daemon.shutdown_handle();
            s.vmm = vmm.try_clone().ok();
        }
        // What waited for an earlier VMM is not this one's.
        ring.discard_to_port();
        ring.set_peer(Some(peer));
        let relay = std::thread::Builder::new()
            .name(format!("{name} relay"))
            .spawn(move || relay::run(vmm, backend_side));
        let ended = daemon.wait();
        {
            let mut s = lock(session);
            s.current = None;
            if let Some(v) = s.vmm.take() {
                let _ = v.shutdown(std::net::Shutdown::Both);
            }
        }
        if let Ok(t) = relay {
            let _ = t.join();
        }
        ring.set_peer(None);
        device::stop_queue_thread(&daemon);
        match ended {
            Ok(()) => debug!("{name}: the VMM disconnected"),
            Err(e) => debug!("{name}: the VMM's connection ended: {e}"),
        }
    }
}

/// Has the library connect to the private listener and returns our end, making sure
/// the connection is the library's (this process's), not another's.
fn connect_backend(daemon: &mut device::Daemon, ends: &Endpoints) -> Option<UnixStream> {
    let path = ends.backend_path.to_str()?;
    daemon.start_client(path).ok()?;
    let (ours, _) = ends.backend.accept().ok()?;
    (peer_pid(&ours) == Some(std::process::id())).then_some(ours)
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        {
            let mut s = lock(&self.session);
            s.closing = true;
            if let Some(h) = s.current.take() {
                h.shutdown();
            }
            if let Some(v) = s.vmm.take() {
                let _ = v.shutdown(std::net::Shutdown::Both);
            }
        }
        // Wakes a thread waiting in accept; it sees `closing` and ends.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir_all(&self.private_dir);
    }
}

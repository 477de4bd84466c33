//! Start-up: the state directory taken for this process, the data plane started, and
//! everything the store holds brought back. What cannot come back (a row that no
//! longer parses, a socket path now in use, a device that cannot be made) stays in
//! the store, is logged and listed with its reason, and can be removed through the
//! API; everything else starts.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use fabric::{Switch, SwitchConfig};

use super::locks::PortLocker;
use super::state::State;
use super::{kernel_rules, Control};
use crate::model::{Name, NetworkSpec};
use crate::store::{BadRow, Store};

/// Takes the state directory for this process: two daemons on one store would each
/// believe their own copy of it (and fight over its kernel devices). The lock is the
/// kernel's (`flock`), so it goes with the process however it ends; the file holds the
/// holder's pid for the error the next one prints.
fn lock_state_dir(state_dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = state_dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    // A daemon that is just exiting (a restart) gets a moment to let go.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut held = file.try_lock();
    while matches!(held, Err(std::fs::TryLockError::WouldBlock)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        held = file.try_lock();
    }
    if let Err(std::fs::TryLockError::Error(e)) = held {
        return Err(anyhow::anyhow!("lock {}: {e}", path.display()));
    }
    if let Err(std::fs::TryLockError::WouldBlock) = held {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        anyhow::bail!(
            "the state directory {} is in use by another vmfabric daemon (pid {}); stop it, or give this one its own --state-dir",
            state_dir.display(),
            holder.trim()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

impl Control {
    /// Opens the store in `state_dir`, starts the data plane and rebuilds it from the
    /// store. With an empty store, creates the network `default` on 10.77.0.0/24.
    pub fn start(state_dir: PathBuf, run_dir: PathBuf) -> anyhow::Result<Arc<Control>> {
        Control::start_with_guests(state_dir, run_dir, None)
    }

    /// Like [`Control::start`], able to run VMs from the guest image in `guest_dir`.
    pub fn start_with_guests(
        state_dir: PathBuf,
        run_dir: PathBuf,
        guest_dir: Option<PathBuf>,
    ) -> anyhow::Result<Arc<Control>> {
        Control::start_configured(state_dir, run_dir, guest_dir, None, true, None)
    }

    /// Like [`Control::start_with_guests`]; with an empty store, `first` (a config
    /// file's declaration of `default`, say) replaces the built-in default network.
    /// `sandbox` confines the switch thread and the gateways' threads (off only for
    /// debugging; see `sandbox/`).
    pub fn start_configured(
        state_dir: PathBuf,
        run_dir: PathBuf,
        guest_dir: Option<PathBuf>,
        first: Option<NetworkSpec>,
        sandbox: bool,
        cluster: Option<crate::cluster::node::NodeConfig>,
    ) -> anyhow::Result<Arc<Control>> {
        crate::model::check_run_dir(&run_dir)?;
        std::fs::create_dir_all(&state_dir)?;
        // Leases, MACs and names are nobody else's business.
        std::fs::set_permissions(&state_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let state_lock = lock_state_dir(&state_dir)?;
        std::fs::create_dir_all(run_dir.join("ports"))?;
        std::fs::create_dir_all(run_dir.join("guests"))?;
        let db = state_dir.join("vmfabric.db");
        let store = Store::open(&db)?;
        std::fs::set_permissions(&db, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let switch = Arc::new(Switch::start(SwitchConfig {
            sandbox,
            ..SwitchConfig::default()
        })?);
        let switch_events = switch
            .take_events()
            .ok_or_else(|| anyhow::anyhow!("switch events taken"))?;
        let state = Arc::new(Mutex::new(State::new(PortLocker::new(switch.clone()))));
        let (events, events_rx) = mpsc::channel();
        let bus = super::events::EventBus::default();
        super::events::spawn(state.clone(), switch_events, events.clone(), events_rx, bus.clone())?;
        let vms = super::vms::Vms::new(guest_dir, run_dir.clone(), store.clone(), bus.clone());
        let control = Arc::new(Control {
            switch,
            store,
            gateways: super::sandbox::GatewayRuntime::start(sandbox, &state_dir)?,
            run_dir,
            instance: crate::kernel::instance_of(&state_dir),
            state,
            events,
            bus,
            vms,
            cluster: Default::default(),
            _state_lock: state_lock,
        });
        if let Some(cfg) = cluster {
            control.join_cluster(crate::cluster::node::ClusterLink::join(cfg, control.switch.clone())?);
        }
        let broker: Arc<dyn super::vms::PortBroker> = control.clone();
        control.vms.supervise(Arc::downgrade(&broker));
        let saved = control.store.networks()?;
        if saved.is_empty() {
            let default = first.unwrap_or_else(|| {
                NetworkSpec::new(
                    Name::new("network", "default").expect("literal"),
                    "10.77.0.0/24".parse().expect("literal"),
                )
            });
            if let Some((route, iface)) = crate::hostroutes::overlapping(default.subnet) {
                tracing::warn!(%route, %iface, "the default network overlaps a host route");
            }
            control
                .create_network(default, true)
                .map_err(|e| anyhow::anyhow!("create the default network: {e}"))?;
        } else {
            control.restore(saved)?;
            control.vms.restore(&*control);
        }
        {
            let mut st = control.lock();
            kernel_rules::reconcile(&control.env(), &mut st);
        }
        if let Some(link) = control.cluster.get() {
            link.start(Arc::downgrade(&control))?;
        }
        Ok(control)
    }

    fn restore(&self, saved: Vec<Result<NetworkSpec, BadRow>>) -> anyhow::Result<()> {
        let mut guard = self.lock();
        let st = &mut *guard;
        for row in saved {
            let (name, spec, why) = match row {
                Ok(spec) => match self.bring_up_network(st, spec.clone()) {
                    Ok(()) => continue,
                    Err(e) => (spec.name.to_string(), Some(spec), e.to_string()),
                },
                Err(bad) => (bad.key.clone(), None, bad.to_string()),
            };
            tracing::error!(network = %name, "cannot restore the network: {why}");
            st.failed.networks.insert(name, (spec, why));
        }
        let env = self.env();
        for row in self.store.ports()? {
            let (network, name, rec, why) = match row {
                Ok(rec) => match st.nets.get(&rec.network) {
                    None => {
                        let why = format!("its network {:?} did not come back", rec.network);
                        (rec.network.clone(), rec.name.clone(), Some(rec), why)
                    }
                    Some(net) => match net.backend.restore_port(&env, &net.parts(), &mut st.locker, &rec) {
                        Ok(handle) => {
                            self.commit_port(st, rec, handle);
                            continue;
                        }
                        Err(e) => (rec.network.clone(), rec.name.clone(), Some(rec), e.to_string()),
                    },
                },
                Err(bad) => {
                    let (net, name) = bad.key.split_once('/').unwrap_or((&bad.key, ""));
                    (net.to_string(), name.to_string(), None, bad.to_string())
                }
            };
            tracing::error!(%network, port = %name, "cannot restore the port: {why}");
            st.failed.ports.insert((network, name), (rec, why));
        }
        Ok(())
    }
}

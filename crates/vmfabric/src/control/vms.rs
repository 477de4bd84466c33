//! VMs the daemon runs: each on a unixgram port of its network, named after the VM,
//! with the test guest image, supervised by a thread that keeps their state current.
//!
//! A VM is Ready when its console shows this boot's readiness marker with the address
//! the network's gateway leased to its MAC. When a VM ends (stopped, powered off, or its
//! VMM died) its port is removed. VMs live as long as the daemon: they are its child
//! processes and are stopped with it. Each running VM is recorded in the store, so a
//! daemon that was killed (`kill -9`) adopts the VMMs that outlived it when it starts
//! again: same port, same address, state from the console.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fabric::Mac;
use serde::{Deserialize, Serialize};
use vm::{Nic, NicBackend, QemuVm, VmConfig, VmState};

use crate::control::error::ControlError;
use crate::model::PortSpec;
use crate::store::PortKind;

/// A VM to run.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmRequest {
    pub name: String,
    pub network: String,
    /// Shell command the guest runs once its network is up; it powers off after.
    /// Without one it stays up.
    #[serde(default)]
    pub cmd: Option<String>,
    /// Serve /www over HTTP on port 80 in the guest.
    #[serde(default)]
    pub http: bool,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default = "one")]
    pub cpus: u32,
}

fn default_memory() -> u32 {
    96
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmView {
    pub name: String,
    pub network: String,
    /// starting, running, ready, paused, stopped or failed.
    pub state: String,
    #[schema(value_type = Option<String>)]
    pub ip: Option<std::net::Ipv4Addr>,
    pub reason: Option<String>,
    pub pid: Option<u32>,
    pub port: String,
    #[serde(with = "crate::model::mac_text")]
    #[schema(value_type = String)]
    pub mac: Mac,
}

/// Everything about one VM, for `vm inspect`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmInspect {
    #[serde(flatten)]
    pub vm: VmView,
    /// What it was run with.
    pub request: VmRequest,
    /// Its serial console, and QEMU's own messages beside it.
    pub console: String,
    pub qemu_log: String,
    /// QEMU's word on the run state (`running`, `paused`, ...), when QMP answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp_status: Option<String>,
    /// Its port, while it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_view: Option<crate::model::PortView>,
    /// Its lease, while it holds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<crate::model::LeaseView>,
}

struct Entry {
    vm: QemuVm,
    req: VmRequest,
    mac: Mac,
    console: PathBuf,
    nic: PathBuf,
    port_removed: bool,
    recorded: bool,
}

/// What the store keeps of a running VM, to adopt its VMM after a restart.
#[derive(Debug, Serialize, Deserialize)]
struct VmRecord {
    req: VmRequest,
    pid: u32,
    start_time: u64,
    nonce: String,
    qmp: PathBuf,
    console: PathBuf,
    nic: PathBuf,
    #[serde(with = "crate::model::mac_text")]
    mac: Mac,
}

impl Entry {
    fn record(&self) -> Option<VmRecord> {
        let id = self.vm.process()?;
        Some(VmRecord {
            req: self.req.clone(),
            pid: id.pid,
            start_time: id.start_time,
            nonce: self.vm.nonce().to_string(),
            qmp: self.vm.qmp_path().to_path_buf(),
            console: self.console.clone(),
            nic: self.nic.clone(),
            mac: self.mac,
        })
    }
}

pub struct Vms {
    guest_dir: Option<PathBuf>,
    /// The daemon's run dir; VMs' files are under `vms/`.
    run_dir: PathBuf,
    dir: PathBuf,
    /// Where running VMs are recorded, to adopt them after a restart.
    store: Arc<crate::store::Store>,
    entries: Mutex<HashMap<String, Entry>>,
    /// VM state changes go out here.
    bus: super::events::EventBus,
}

/// What VM supervision needs of the control plane: a port per VM, pointed at its VMM,
/// and the address the VM leased. The control plane implements it; this module never
/// sees the controller itself.
pub trait PortBroker: Send + Sync {
    fn add_port(&self, network: &str, spec: PortSpec) -> Result<crate::model::PortView, ControlError>;
    fn remove_port(&self, network: &str, name: &str) -> Result<(), ControlError>;
    fn set_port_peer(&self, network: &str, name: &str, peer: &std::path::Path) -> Result<(), ControlError>;
    fn lease_of(&self, network: &str, mac: fabric::Mac) -> Option<std::net::Ipv4Addr>;
}

fn view(e: &Entry) -> VmView {
    let (state, ip, reason) = match e.vm.state() {
        VmState::Starting => ("starting", None, None),
        VmState::Running => ("running", None, None),
        VmState::Ready { ip } => ("ready", Some(*ip), None),
        VmState::Paused => ("paused", None, None),
        VmState::Stopped => ("stopped", None, None),
        VmState::Failed { reason } => ("failed", None, Some(reason.clone())),
    };
    VmView {
        name: e.req.name.clone(),
        network: e.req.network.clone(),
        state: state.into(),
        ip,
        reason,
        pid: e.vm.process().map(|p| p.pid),
        port: e.req.name.clone(),
        mac: e.mac,
    }
}

impl Vms {
    pub fn new(
        guest_dir: Option<PathBuf>,
        run_dir: PathBuf,
        store: Arc<crate::store::Store>,
        bus: super::events::EventBus,
    ) -> Arc<Vms> {
        Arc::new(Vms {
            guest_dir,
            dir: run_dir.join(crate::model::SocketPlace::VmNic.subdir()),
            run_dir,
            store,
            entries: Mutex::new(HashMap::new()),
            bus,
        })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the supervisor: every quarter second, brings each VM's state up to date
    /// and frees the port of a VM that ended.
    pub fn supervise(self: &Arc<Self>, broker: Weak<dyn PortBroker>) {
        let vms = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("vm-supervisor".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250));
                let (Some(vms), Some(broker)) = (vms.upgrade(), broker.upgrade()) else {
                    return;
                };
                vms.refresh(&*broker);
            });
    }

    fn refresh(&self, broker: &dyn PortBroker) {
        let mut ended = Vec::new();
        for e in self.entries().values_mut() {
            if !e.recorded {
                if let Some(r) = e.record() {
                    let json = serde_json::to_string(&r).expect("plain data");
                    e.recorded = self.store.put_vm(&e.req.name, &json).is_ok();
                }
            }
            let leased = broker.lease_of(&e.req.network, e.mac);
            let before = e.vm.state().clone();
            let state = e.vm.poll(leased).clone();
            if state != before {
                self.announce(&view(e));
            }
            if matches!(state, VmState::Stopped | VmState::Failed { .. }) && !e.port_removed {
                e.port_removed = true;
                ended.push((e.req.network.clone(), e.req.name.clone()));
            }
        }
        for (network, port) in ended {
            let _ = self.store.delete_vm(&port);
            let _ = broker.remove_port(&network, &port);
        }
    }

    /// Adopts the VMMs an earlier run of the daemon left running; forgets the others
    /// and frees their ports.
    pub fn restore(&self, broker: &dyn PortBroker) {
        for json in self.store.vms().unwrap_or_default() {
            let r: VmRecord = match serde_json::from_str(&json) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("unreadable VM record, dropped: {e}");
                    continue;
                }
            };
            let id = vm::process::ProcessId {
                pid: r.pid,
                start_time: r.start_time,
            };
            match QemuVm::adopt(id, r.qmp, r.console.clone(), r.nonce) {
                Some(vm) => {
                    tracing::info!(vm = %r.req.name, pid = r.pid, "adopted a running VM");
                    if let Err(e) = broker.set_port_peer(&r.req.network, &r.req.name, &r.nic) {
                        tracing::warn!(vm = %r.req.name, "cannot point its port at the VMM: {e}");
                    }
                    let entry = Entry {
                        vm,
                        req: r.req.clone(),
                        mac: r.mac,
                        console: r.console,
                        nic: r.nic,
                        port_removed: false,
                        recorded: true,
                    };
                    self.entries().insert(r.req.name, entry);
                }
                None => {
                    tracing::info!(vm = %r.req.name, "its VMM ended while the daemon was down");
                    let _ = self.store.delete_vm(&r.req.name);
                    let _ = broker.remove_port(&r.req.network, &r.req.name);
                }
            }
        }
    }

    pub fn run(&self, broker: &dyn PortBroker, req: VmRequest) -> Result<VmView, ControlError> {
        let guest = self.guest_dir.clone().ok_or_else(|| {
            ControlError::invalid("this daemon has no guest image: start it with --guest-dir (guest/build.sh DIR)")
        })?;
        if self
            .entries()
            .get(&req.name)
            .is_some_and(|e| !matches!(e.vm.state(), VmState::Stopped | VmState::Failed { .. }))
        {
            return Err(ControlError::Conflict(format!("VM {:?} is running", req.name)));
        }
        let port = broker.add_port(
            &req.network,
            PortSpec::new(crate::model::Name::new("VM", &req.name)?, PortKind::Unixgram),
        )?;
        std::fs::create_dir_all(&self.dir).map_err(|e| ControlError::Host(e.to_string()))?;
        let console = self.dir.join(format!("{}.console", req.name));
        let nic = crate::model::socket_path(&self.run_dir, crate::model::SocketPlace::VmNic, &[&req.name]);
        let cmdline = vm::GuestCmdline {
            http: req.http,
            cmd: req.cmd.clone(),
            ..vm::GuestCmdline::dhcp(&req.name)
        }
        .args();
        let config = VmConfig {
            name: req.name.clone(),
            namespace: req.network.clone(),
            kernel: guest.join("vmlinuz"),
            initramfs: guest.join("initramfs.cpio.gz"),
            root_disk: None,
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            attachments: vec![Nic {
                backend: NicBackend::Unixgram {
                    switch_path: port.record.path.clone().into(),
                    guest_path: nic.clone(),
                },
                mac: port.record.mac,
            }],
            serial_log: console.clone(),
            cmdline,
            netns: None,
        };
        let vm = match QemuVm::start(&config, &self.dir) {
            Ok(vm) => vm,
            Err(e) => {
                let _ = broker.remove_port(&req.network, &req.name);
                return Err(match e {
                    vm::driver::DriverError::Config(c) => ControlError::invalid(c.to_string()),
                    other => ControlError::Host(other.to_string()),
                });
            }
        };
        let mut entry = Entry {
            vm,
            mac: port.record.mac,
            req: req.clone(),
            console,
            nic,
            port_removed: false,
            recorded: false,
        };
        if let Some(r) = entry.record() {
            let json = serde_json::to_string(&r).expect("plain data");
            entry.recorded = self.store.put_vm(&req.name, &json).is_ok();
        }
        let v = view(&entry);
        self.entries().insert(req.name.clone(), entry);
        self.announce(&v);
        Ok(v)
    }

    /// A VM's state, out to the event stream.
    fn announce(&self, v: &VmView) {
        self.bus.publish(crate::model::Event::VmState {
            vm: v.name.clone(),
            network: v.network.clone(),
            state: v.state.clone(),
            ip: v.ip,
            reason: v.reason.clone(),
        });
    }

    pub fn list(&self) -> Vec<VmView> {
        let mut v: Vec<VmView> = self.entries().values().map(view).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn get(&self, name: &str) -> Result<VmView, ControlError> {
        self.entries()
            .get(name)
            .map(view)
            .ok_or_else(|| ControlError::NotFound(format!("no VM named {name:?}")))
    }

    /// Stops a VM (powerdown, then SIGTERM, then SIGKILL) and forgets it.
    pub fn stop(&self, broker: &dyn PortBroker, name: &str) -> Result<VmView, ControlError> {
        let mut e = self
            .entries()
            .remove(name)
            .ok_or_else(|| ControlError::NotFound(format!("no VM named {name:?}")))?;
        e.vm.stop(Duration::from_secs(3));
        let _ = self.store.delete_vm(name);
        if !e.port_removed {
            let _ = broker.remove_port(&e.req.network, &e.req.name);
        }
        let v = view(&e);
        self.announce(&v);
        Ok(v)
    }

    /// A VM with its request, files, QMP status, port and lease.
    pub fn inspect(&self, control: &super::Control, name: &str) -> Result<VmInspect, ControlError> {
        let (vm, request, console, qmp_status) = {
            let entries = self.entries();
            let e = entries
                .get(name)
                .ok_or_else(|| ControlError::NotFound(format!("no VM named {name:?}")))?;
            (view(e), e.req.clone(), e.console.clone(), e.vm.qmp_status())
        };
        let port_view = control
            .ports(&vm.network)
            .ok()
            .and_then(|ps| ps.into_iter().find(|p| p.record.name == vm.port));
        let lease = control
            .leases(&vm.network)
            .ok()
            .and_then(|ls| ls.into_iter().find(|l| l.mac == vm.mac));
        Ok(VmInspect {
            vm,
            request,
            qemu_log: ::vm::driver::stderr_log(&console).display().to_string(),
            console: console.display().to_string(),
            qmp_status,
            port_view,
            lease,
        })
    }

    /// Stops a VM and runs it again with the request it was run with.
    pub fn restart(&self, broker: &dyn PortBroker, name: &str) -> Result<VmView, ControlError> {
        let req = self
            .entries()
            .get(name)
            .map(|e| e.req.clone())
            .ok_or_else(|| ControlError::NotFound(format!("no VM named {name:?}")))?;
        self.stop(broker, name)?;
        self.run(broker, req)
    }

    /// Pauses a VM (its vCPUs stop; its port and lease stay) or lets it run on.
    pub fn set_paused(&self, name: &str, paused: bool) -> Result<VmView, ControlError> {
        let v = {
            let mut entries = self.entries();
            let e = entries
                .get_mut(name)
                .ok_or_else(|| ControlError::NotFound(format!("no VM named {name:?}")))?;
            let done = if paused { e.vm.pause() } else { e.vm.resume() };
            done.map_err(ControlError::conflict)?;
            view(e)
        };
        self.announce(&v);
        Ok(v)
    }

    pub fn logs(&self, name: &str) -> Result<String, ControlError> {
        let path = self
            .entries()
            .get(name)
            .map(|e| e.console.clone())
            .ok_or_else(|| ControlError::NotFound(format!("no VM named {name:?}")))?;
        Ok(std::fs::read(&path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default())
    }

    /// Stops every VM (daemon shutdown).
    pub fn stop_all(&self, broker: &dyn PortBroker) {
        let names: Vec<String> = self.entries().keys().cloned().collect();
        for n in names {
            let _ = self.stop(broker, &n);
        }
    }
}

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
    /// The network of its first NIC.
    pub network: String,
    /// Further networks, a NIC on each, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_networks: Vec<String>,
    /// The network whose lease makes the VM Ready (default: `network`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_network: Option<String>,
    /// Shell command the guest runs once its network is up; it powers off after.
    /// Without one it stays up. (The daemon's test guest only.)
    #[serde(default)]
    pub cmd: Option<String>,
    /// Serve /www over HTTP on port 80 in the guest. (The daemon's test guest only.)
    #[serde(default)]
    pub http: bool,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default = "one")]
    pub cpus: u32,
    /// The kernel to boot; default: the daemon's guest image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub kernel: Option<PathBuf>,
    /// Its initramfs; default: the guest image's, unless a root disk or kernel is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command-line words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub append: Vec<String>,
    /// The root filesystem's disk (the guest's /dev/vda); mode default `overlay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk: Option<vm::Disk>,
    /// Data disks, /dev/vdb on; mode default `rw`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<vm::Disk>,
    /// Host directories the guest mounts by tag (virtio-fs where the host has
    /// virtiofsd, else virtio-9p).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<vm::Share>,
    /// Give the guest a vsock device with a CID the daemon allocates.
    #[serde(default)]
    pub vsock: bool,
    /// ... or with this CID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_cid: Option<u32>,
    /// A cloud-init NoCloud seed (meta-data names the VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInitData>,
    /// systemd's machine id (32 lowercase hex digits); default: derived from the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// Its NICs are vhost-user ports (frames through the guest's memory, which QEMU
    /// then shares) instead of unixgram ones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vhost_user: bool,
}

/// What a VM's cloud-init reads besides its name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudInitData {
    /// `#cloud-config` YAML.
    #[serde(default)]
    pub user_data: Option<String>,
    /// Network config YAML; without it cloud-init takes DHCP on the first NIC.
    #[serde(default)]
    pub network_config: Option<String>,
}

impl VmRequest {
    /// A VM of the daemon's test guest on `network`, as the API's defaults make it.
    pub fn new(name: &str, network: &str) -> VmRequest {
        VmRequest {
            name: name.into(),
            network: network.into(),
            extra_networks: vec![],
            ready_network: None,
            cmd: None,
            http: false,
            memory_mib: default_memory(),
            cpus: 1,
            kernel: None,
            initrd: None,
            append: vec![],
            root_disk: None,
            disks: vec![],
            shares: vec![],
            vsock: false,
            vsock_cid: None,
            cloud_init: None,
            machine_id: None,
            vhost_user: false,
        }
    }

    /// Every network it has a NIC on, the first first.
    fn networks(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.network).chain(&self.extra_networks)
    }

    /// Every host file or directory it names, to check against the daemon's VM paths.
    fn host_paths_mut(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        let files = self.kernel.iter_mut().chain(&mut self.initrd);
        let disks = self.root_disk.iter_mut().chain(&mut self.disks).map(|d| &mut d.path);
        files.chain(disks).chain(self.shares.iter_mut().map(|s| &mut s.host))
    }
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
    /// Its vsock address, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_cid: Option<u32>,
}

/// One of a VM's NICs: its port and what it leased.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmNic {
    pub network: String,
    pub port: String,
    #[serde(with = "crate::model::mac_text")]
    #[schema(value_type = String)]
    pub mac: Mac,
    #[schema(value_type = Option<String>)]
    pub ip: Option<std::net::Ipv4Addr>,
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
    /// Every NIC, the first first.
    pub nics: Vec<VmNic>,
    /// Its first NIC's port, while it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_view: Option<crate::model::PortView>,
    /// Its first NIC's lease, while it holds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<crate::model::LeaseView>,
}

/// A NIC of a running VM: its port, and the socket its VMM end binds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NicPort {
    network: String,
    port: String,
    #[serde(with = "crate::model::mac_text")]
    mac: Mac,
    guest_path: PathBuf,
}

struct Entry {
    vm: QemuVm,
    req: VmRequest,
    /// The first is the VM's own (named after it, on `req.network`).
    nics: Vec<NicPort>,
    console: PathBuf,
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
    nics: Vec<NicPort>,
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
            nics: self.nics.clone(),
        })
    }

    fn ready_nic(&self) -> &NicPort {
        ready_nic(&self.req, &self.nics)
    }
}

/// Of a VM's NICs, the one whose lease makes it Ready.
fn ready_nic<'a>(req: &VmRequest, nics: &'a [NicPort]) -> &'a NicPort {
    let ready = req.ready_network.as_ref().unwrap_or(&req.network);
    nics.iter().find(|n| &n.network == ready).unwrap_or(&nics[0])
}

pub struct Vms {
    guest_dir: Option<PathBuf>,
    /// The daemon's run dir; VMs' files are under `vms/`.
    run_dir: PathBuf,
    dir: PathBuf,
    /// Where running VMs are recorded, to adopt them after a restart.
    store: Arc<crate::store::Store>,
    entries: Mutex<HashMap<String, Entry>>,
    /// VMs the config file declared that would not start, as `vm ls` shows them
    /// (failed, with why) until they are run again or stopped.
    unstarted: Mutex<HashMap<String, VmView>>,
    /// Host directories VMs may name besides the guest image's ([`Vms::allow_paths`]).
    allowed: Mutex<Vec<PathBuf>>,
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
    fn port(&self, network: &str, name: &str) -> Option<crate::model::PortView>;
    fn lease(&self, network: &str, mac: fabric::Mac) -> Option<crate::model::LeaseView>;
}

/// A NIC's port as it is made: where its switch end listens, besides what is kept.
struct NewNic {
    nic: NicPort,
    switch_path: PathBuf,
}

fn remove_ports(broker: &dyn PortBroker, nics: &[NicPort]) {
    for n in nics {
        let _ = broker.remove_port(&n.network, &n.port);
    }
}

/// The lowest vsock CID (guests take 3 on) none of `taken` holds.
fn free_cid(taken: &std::collections::HashSet<u32>) -> u32 {
    (3..).find(|c| !taken.contains(c)).expect("fewer VMs than CIDs")
}

/// A VM's machine id when none is given: stable for its name, so a restarted VM is the
/// same machine to systemd and journald.
fn derived_machine_id(name: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("vmfabric-vm/{name}"));
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
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
    let nic = e.ready_nic();
    VmView {
        name: e.req.name.clone(),
        network: nic.network.clone(),
        state: state.into(),
        ip,
        reason,
        pid: e.vm.process().map(|p| p.pid),
        port: nic.port.clone(),
        mac: nic.mac,
        vsock_cid: e.req.vsock_cid,
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
            allowed: Mutex::new(Vec::new()),
            unstarted: Mutex::new(HashMap::new()),
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
            let nic = e.ready_nic();
            let leased = broker.lease(&nic.network, nic.mac).map(|l| l.ip);
            let before = e.vm.state().clone();
            let state = e.vm.poll(leased).clone();
            if state != before {
                self.announce(&view(e));
            }
            if matches!(state, VmState::Stopped | VmState::Failed { .. }) && !e.port_removed {
                e.port_removed = true;
                ended.push((e.req.name.clone(), e.nics.clone()));
            }
        }
        for (name, nics) in ended {
            let _ = self.store.delete_vm(&name);
            remove_ports(broker, &nics);
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
                    for nic in &r.nics {
                        if let Err(e) = broker.set_port_peer(&nic.network, &nic.port, &nic.guest_path) {
                            tracing::warn!(vm = %r.req.name, "cannot point its port at the VMM: {e}");
                        }
                    }
                    let entry = Entry {
                        vm,
                        req: r.req.clone(),
                        nics: r.nics,
                        console: r.console,
                        port_removed: false,
                        recorded: true,
                    };
                    self.entries().insert(r.req.name, entry);
                }
                None => {
                    tracing::info!(vm = %r.req.name, "its VMM ended while the daemon was down");
                    let _ = self.store.delete_vm(&r.req.name);
                    remove_ports(broker, &r.nics);
                }
            }
        }
    }

    pub fn run(&self, broker: &dyn PortBroker, req: VmRequest) -> Result<VmView, ControlError> {
        if self
            .entries()
            .get(&req.name)
            .is_some_and(|e| !matches!(e.vm.state(), VmState::Stopped | VmState::Failed { .. }))
        {
            return Err(ControlError::Conflict(format!("VM {:?} is running", req.name)));
        }
        // An ended VM of this name goes first: its files (QMP socket, overlays) are
        // where the new one's will be.
        let ended = self.entries().remove(&req.name);
        drop(ended);
        let mut req = req;
        self.check_request(&mut req)?;
        let (kernel, initramfs) = self.boot_files(&req)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| ControlError::Host(e.to_string()))?;
        let (nics, switch_paths): (Vec<NicPort>, Vec<PathBuf>) = self
            .add_nic_ports(broker, &req)?
            .into_iter()
            .map(|n| (n.nic, n.switch_path))
            .unzip();
        let console = self.dir.join(format!("{}.console", req.name));
        let mut cmdline = vm::GuestCmdline {
            http: req.http,
            cmd: req.cmd.clone(),
            ..vm::GuestCmdline::dhcp(&req.name)
        }
        .args();
        cmdline.push(format!("VMF_NICS={}", nics.len()));
        cmdline.push(format!("VMF_READY_MAC={}", ready_nic(&req, &nics).mac));
        cmdline.extend(req.append.iter().cloned());
        let config = VmConfig {
            name: req.name.clone(),
            namespace: req.network.clone(),
            kernel,
            initramfs,
            root_disk: req.root_disk.clone(),
            data_disks: req.disks.clone(),
            shares: req.shares.clone(),
            vsock_cid: req.vsock_cid,
            cloud_init: req.cloud_init.as_ref().map(|c| vm::CloudInit {
                instance_id: format!("iid-{}", req.name),
                hostname: req.name.clone(),
                user_data: c.user_data.clone(),
                network_config: c.network_config.clone(),
            }),
            machine_id: req.machine_id.clone(),
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            attachments: nics
                .iter()
                .zip(switch_paths)
                .map(|(n, switch_path)| Nic {
                    backend: match req.vhost_user {
                        // A queue pair per vCPU, as many as the port serves.
                        true => NicBackend::VhostUser {
                            path: switch_path,
                            queues: req.cpus.clamp(1, fabric::VHOST_USER_MAX_QUEUE_PAIRS as u32) as u16,
                        },
                        false => NicBackend::Unixgram {
                            switch_path,
                            guest_path: n.guest_path.clone(),
                        },
                    },
                    mac: n.mac,
                })
                .collect(),
            serial_log: console.clone(),
            cmdline,
            netns: None,
        };
        let vm = match QemuVm::start(&config, &self.dir) {
            Ok(vm) => vm,
            Err(e) => {
                remove_ports(broker, &nics);
                return Err(match e {
                    vm::driver::DriverError::Config(c) => ControlError::invalid(c.to_string()),
                    vm::driver::DriverError::Storage(s) => ControlError::invalid(s.to_string()),
                    other => ControlError::Host(other.to_string()),
                });
            }
        };
        let mut entry = Entry {
            vm,
            nics,
            req: req.clone(),
            console,
            port_removed: false,
            recorded: false,
        };
        if let Some(r) = entry.record() {
            let json = serde_json::to_string(&r).expect("plain data");
            entry.recorded = self.store.put_vm(&req.name, &json).is_ok();
        }
        let v = view(&entry);
        self.unstarted().remove(&req.name);
        self.entries().insert(req.name.clone(), entry);
        self.announce(&v);
        Ok(v)
    }

    /// Lets VMs use host files and directories under `dirs` (disks, shares, kernels)
    /// besides the guest image's. Nothing else on the host is theirs to name: the API's
    /// users need not be root.
    pub fn allow_paths(&self, dirs: Vec<PathBuf>) {
        *self.allowed.lock().unwrap_or_else(|p| p.into_inner()) = dirs;
    }

    /// Checks what validation of the VM's config cannot (names, networks, which host
    /// paths it may use) and fills in what the daemon chooses (vsock CID, machine id).
    fn check_request(&self, req: &mut VmRequest) -> Result<(), ControlError> {
        crate::model::Name::new("VM", &req.name)?;
        if let Some(r) = &req.ready_network {
            if !req.networks().any(|n| n == r) {
                return Err(ControlError::invalid(format!(
                    "ready network {r:?} is none of the VM's networks"
                )));
            }
        }
        let allowed: Vec<PathBuf> = {
            let extra = self.allowed.lock().unwrap_or_else(|p| p.into_inner());
            self.guest_dir
                .iter()
                .chain(extra.iter())
                .filter_map(|d| d.canonicalize().ok())
                .collect()
        };
        for path in req.host_paths_mut() {
            // A path that does not exist is refused by the config's validation, by name.
            let Ok(real) = path.canonicalize() else { continue };
            if !allowed.iter().any(|dir| real.starts_with(dir)) {
                return Err(ControlError::invalid(format!(
                    "{} is outside the directories this daemon lets VMs use (serve --vm-path DIR)",
                    path.display()
                )));
            }
            // QEMU gets the path that was checked: a symlink swapped after the check
            // cannot lead it elsewhere.
            *path = real;
        }
        let taken: std::collections::HashSet<u32> = self
            .entries()
            .values()
            .filter(|e| !matches!(e.vm.state(), VmState::Stopped | VmState::Failed { .. }))
            .filter_map(|e| e.req.vsock_cid)
            .collect();
        match req.vsock_cid {
            Some(cid) if taken.contains(&cid) => {
                return Err(ControlError::Conflict(format!("vsock CID {cid} belongs to another VM")));
            }
            None if req.vsock => req.vsock_cid = Some(free_cid(&taken)),
            _ => {}
        }
        if req.machine_id.is_none() {
            req.machine_id = Some(derived_machine_id(&req.name));
        }
        Ok(())
    }

    /// The kernel and initramfs: the request's, else the guest image's (whose
    /// initramfs goes with its kernel only and is the root unless a disk is).
    fn boot_files(&self, req: &VmRequest) -> Result<(PathBuf, Option<PathBuf>), ControlError> {
        let guest = self.guest_dir.as_ref();
        let kernel = match (&req.kernel, guest) {
            (Some(k), _) => k.clone(),
            (None, Some(g)) => g.join("vmlinuz"),
            (None, None) => {
                return Err(ControlError::invalid(
                    "this daemon has no guest image (serve --guest-dir DIR, made by guest/build.sh DIR): give the VM a kernel",
                ))
            }
        };
        let initramfs = match (&req.initrd, guest) {
            (Some(i), _) => Some(i.clone()),
            (None, Some(g)) if req.kernel.is_none() && req.root_disk.is_none() => Some(g.join("initramfs.cpio.gz")),
            _ => None,
        };
        Ok((kernel, initramfs))
    }

    /// A unixgram (or vhost-user) port per NIC: the first named after the VM, the
    /// others `NAME-nicI`.
    /// All or none: a port that cannot be made takes back the ones made before it.
    fn add_nic_ports(&self, broker: &dyn PortBroker, req: &VmRequest) -> Result<Vec<NewNic>, ControlError> {
        let mut made: Vec<NewNic> = Vec::new();
        for (i, network) in req.networks().enumerate() {
            let port = match i {
                0 => req.name.clone(),
                _ => format!("{}-nic{i}", req.name),
            };
            let added = crate::model::Name::new("port", &port)
                .map_err(ControlError::from)
                .and_then(|n| {
                    let kind = match req.vhost_user {
                        true => PortKind::VhostUser,
                        false => PortKind::Unixgram,
                    };
                    broker.add_port(network, PortSpec::new(n, kind))
                });
            match added {
                Ok(view) => made.push(NewNic {
                    switch_path: view.record.path.clone().into(),
                    nic: NicPort {
                        network: network.clone(),
                        guest_path: crate::model::socket_path(
                            &self.run_dir,
                            crate::model::SocketPlace::VmNic,
                            &[&port],
                        ),
                        port,
                        mac: view.record.mac,
                    },
                }),
                Err(e) => {
                    remove_ports(broker, &made.into_iter().map(|n| n.nic).collect::<Vec<_>>());
                    return Err(e);
                }
            }
        }
        Ok(made)
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

    fn unstarted(&self) -> std::sync::MutexGuard<'_, HashMap<String, VmView>> {
        self.unstarted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a VM the config file declares, unless it runs already (adopted after a
    /// restart). One that will not start is listed as failed with the reason: at
    /// daemon start nobody is there to be told otherwise.
    pub fn run_declared(&self, broker: &dyn PortBroker, req: VmRequest) {
        if self.entries().contains_key(&req.name) {
            return;
        }
        let name = req.name.clone();
        if let Err(e) = self.run(broker, req.clone()) {
            tracing::error!(vm = %name, "the declared VM did not start: {e}");
            let v = VmView {
                state: "failed".into(),
                reason: Some(e.to_string()),
                pid: None,
                ip: None,
                port: name.clone(),
                // The MAC its port gets on a userspace network, for the record.
                mac: Mac::derived(&[&req.network, &name]),
                network: req.network,
                name: name.clone(),
                vsock_cid: None,
            };
            self.announce(&v);
            self.unstarted().insert(name, v);
        }
    }

    pub fn list(&self) -> Vec<VmView> {
        let mut v: Vec<VmView> = self.entries().values().map(view).collect();
        v.extend(self.unstarted().values().cloned());
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn get(&self, name: &str) -> Result<VmView, ControlError> {
        let running = self.entries().get(name).map(view);
        running
            .or_else(|| self.unstarted().get(name).cloned())
            .ok_or_else(|| ControlError::NotFound(format!("no VM named {name:?}")))
    }

    /// Stops a VM (powerdown, then SIGTERM, then SIGKILL) and forgets it.
    pub fn stop(&self, broker: &dyn PortBroker, name: &str) -> Result<VmView, ControlError> {
        if let Some(v) = self.unstarted().remove(name) {
            return Ok(v);
        }
        let mut e = self
            .entries()
            .remove(name)
            .ok_or_else(|| ControlError::NotFound(format!("no VM named {name:?}")))?;
        e.vm.stop(Duration::from_secs(3));
        let _ = self.store.delete_vm(name);
        if !e.port_removed {
            remove_ports(broker, &e.nics);
        }
        let v = view(&e);
        self.announce(&v);
        Ok(v)
    }

    /// A VM with its request, files, QMP status, ports and leases.
    pub fn inspect(&self, broker: &dyn PortBroker, name: &str) -> Result<VmInspect, ControlError> {
        let (vm, request, console, qmp_status, nics) = {
            let entries = self.entries();
            let e = entries
                .get(name)
                .ok_or_else(|| ControlError::NotFound(format!("no VM named {name:?}")))?;
            (
                view(e),
                e.req.clone(),
                e.console.clone(),
                e.vm.qmp_status(),
                e.nics.clone(),
            )
        };
        let port_view = broker.port(&vm.network, &vm.port);
        let lease = broker.lease(&vm.network, vm.mac);
        let nics = nics
            .into_iter()
            .map(|n| VmNic {
                ip: broker.lease(&n.network, n.mac).map(|l| l.ip),
                network: n.network,
                port: n.port,
                mac: n.mac,
            })
            .collect();
        Ok(VmInspect {
            vm,
            request,
            qemu_log: ::vm::driver::stderr_log(&console).display().to_string(),
            console: console.display().to_string(),
            qmp_status,
            nics,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_free_cid_from_three_and_stable_machine_ids() {
        let taken: std::collections::HashSet<u32> = [3, 4, 6].into_iter().collect();
        assert_eq!(free_cid(&taken), 5);
        assert_eq!(free_cid(&Default::default()), 3);
        let id = derived_machine_id("web-1");
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')));
        assert_eq!(id, derived_machine_id("web-1"), "stable for a name");
        assert_ne!(id, derived_machine_id("web-2"));
    }
}
